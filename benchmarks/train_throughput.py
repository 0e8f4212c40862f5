"""Train-step throughput: jaxdiff vs the same architecture in PyTorch (diffusers), same run.

Models: DiT-S/2 (Peebles & Xie 2023, Table 1: depth 12, width 384, 6 heads, patch 2) on a
32x32x4 latent, class-conditional over 1000 classes, batch 32; and the CIFAR-10 UNet of
configs/cifar10_ddpmpp.py (DDPM++-style, Song et al. 2021) on 32x32x3, batch 16. The PyTorch
peers are diffusers' DiTTransformer2DModel and UNet2DModel configured to match
(`_torch_peers.py`); both sides print parameter counts. Both train steps: DDPM's eps loss on
the linear schedule, CFG label dropout 0.1 (DiT), global-norm clipping 1.0, AdamW, one EMA,
float32, data excluded (one fixed batch). PyTorch runs eager and, where it works,
`torch.compile`d; the contenders alternate within the run and each reports the median (and
min) step time over the repeats.

Model FLOPs: DiT analytically (matmuls only: 24 T D^2 + 4 T^2 D per block and token set,
plus patch embedding, conditioning and final layer); UNet from XLA's cost analysis of the
compiled forward pass. A train step counts as 3 forward passes (forward + backward = 2x). The
fraction of peak divides jaxdiff's model FLOP/s by the larger measured float32 GEMM rate (a
2048^3 jnp matmul and torch.mm, both printed, timed in the same rotation as the train steps).

    python benchmarks/train_throughput.py [--quick] [--repeats 3] [--models dit,unet]
        [--torch-compile auto|on|off] [--unet-batch 32] [--xla-options KEY=VALUE[,KEY=VALUE]]

`--xla-options` (repeatable) adds a contender: jaxdiff's same step compiled with those XLA
debug options (`compile(compiler_options=...)`, e.g. xla_cpu_experimental_ynn_fusion_type=
to turn YNNPACK fusions off), so XLA:CPU flags are compared within one run. Every contender
also reports the process CPU seconds of its steps (all threads), which stay comparable when
the machine is shared and wall times are not.

The script restarts itself with the `jaxdiff` command's host malloc settings on a CPU host
(`jaxdiff.cli.hostmalloc`: freed XLA buffers stay in the process, no page faults per step);
`JAXDIFF_HOST_MALLOC=system` runs it with glibc's defaults instead, for the before/after.

Prints a table and writes benchmarks/out/train_throughput.json.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import _timing
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import models, train
from jaxdiff.core.process import DiscreteVP

FULL = {
    "dit": dict(name="DiT-S/2", family="dit", batch=32, image=32, channels=4, num_classes=1000,
                arch=dict(depth=12, hidden_size=384, num_heads=6, patch_size=2)),
    "unet": dict(name="UNet CIFAR-10 (DDPM++)", family="unet", batch=16, image=32, channels=3,
                 num_classes=0,
                 arch=dict(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=4,
                           attn_resolutions=(16,), num_heads=4, norm_groups=32, dropout=0.1)),
}
QUICK = {  # smoke-test sizes: every code path, seconds of compilation
    "dit": dict(FULL["dit"], name="DiT tiny", batch=2, image=4, num_classes=10,
                arch=dict(depth=1, hidden_size=32, num_heads=2, patch_size=2)),
    "unet": dict(FULL["unet"], name="UNet tiny", batch=2, image=4,
                 arch=dict(channels=8, channel_mult=(1,), num_res_blocks=1,
                           attn_resolutions=(4,), num_heads=2, norm_groups=4, dropout=0.1)),
}
MATMUL_N = {"full": 2048, "quick": 128}


def dit_forward_flops(*, depth, hidden_size, patch_size, image, channels, frequency_size=256,
                      **_):
    """Matmul FLOPs (2 per multiply-add) of one DiT forward pass on one image."""
    T, D, pc = (image // patch_size) ** 2, hidden_size, patch_size**2 * channels
    block = 24 * T * D * D + 4 * T * T * D + 12 * D * D  # qkv, proj, mlp; QK^T, AV; adaLN
    return depth * block + 2 * T * pc * D + 2 * (frequency_size * D + D * D) + 4 * D * D \
        + 2 * T * D * pc


def _cost_flops(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _jax_model(spec):
    kw = dict(spec["arch"], num_classes=spec["num_classes"])
    if spec["family"] == "dit":
        return models.build("dit", learn_sigma=False, **kw)
    return models.build("unet", **kw)


def jax_case(spec, x, y, compiler_options=None):
    """jaxdiff's jitted, state-donating train step on one fixed batch; compile excluded.
    `compiler_options`: XLA debug options for this compilation only (`--xla-options`)."""
    model, nc = _jax_model(spec), spec["num_classes"]
    tx, lr_fn = train.make_optimizer(lr=1e-4, total_steps=10**6, schedule="constant")
    state = train.init_state(model, tx, x_shape=x.shape[1:], num_classes=nc, seed=0,
                             ema_decays=(0.9999,))
    objective = train.diffusion_objective(model, process=DiscreteVP.linear(), prediction="eps",
                                          num_classes=nc, p_uncond=0.1 if nc else 0.0)
    step = jax.jit(train.make_train_step(objective, tx, lr_fn, ema_decays=(0.9999,)),
                   donate_argnums=0)
    batch = {"x": jnp.asarray(x), "label": jnp.asarray(y)}
    compiled, compile_s = _timing.timed(
        lambda: step.lower(state, batch).compile(compiler_options=compiler_options))
    labels = (batch["label"][:1],) if nc else ()
    fwd = jax.jit(lambda p, x, *a: train.ModelApply(model)(p, x, jnp.zeros((1,)), *a))
    fwd_flops = _cost_flops(fwd.lower(state.params, batch["x"][:1], *labels).compile())
    holder = [state]

    def run():
        holder[0], _ = compiled(holder[0], batch)
        jax.block_until_ready(holder[0])

    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    return dict(run=run, params=n_params, compile_s=compile_s, step_flops_xla=_cost_flops(compiled),
                forward_flops_xla_per_image=fwd_flops)


def torch_case(spec, x, y, compile_model):
    """diffusers' model of the same architecture, eager or torch.compile'd; the first call
    (compilation when compiled) is timed separately."""
    import _torch_peers as peers
    import torch

    common = dict(image_size=spec["image"], in_channels=spec["channels"])
    if spec["family"] == "dit":
        module = peers.diffusers_dit(num_classes=spec["num_classes"], **spec["arch"], **common)
    else:
        module = peers.diffusers_unet(**spec["arch"], **common)
    step = peers.make_train_step(module, conditional=spec["family"] == "dit",
                                 compile_model=compile_model)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y.astype(np.int64))
    _, first_s = _timing.timed(lambda: step(xt, yt))
    return dict(run=lambda: step(xt, yt), params=peers.param_count(module), first_call_s=first_s)


def matmul_contenders(n):
    """Float32 GEMMs of n x n x n (2 n^3 FLOPs): a jitted jnp.matmul and torch.mm. They join the
    train steps' rotation, so the peak is measured under the same machine load."""
    import torch

    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    mm = jax.jit(jnp.matmul)
    return {"matmul jax": lambda: mm(ja, ja).block_until_ready(),
            "matmul torch": lambda: torch.mm(ta, ta)}


def peak_of(times, n):
    """{lib: FLOP/s} at the median and at the best repeat, and the machine peak (the larger)."""
    med = {k.split()[-1]: 2 * n**3 / float(np.median(v)) for k, v in times.items()}
    best = {k.split()[-1]: 2 * n**3 / min(v) for k, v in times.items()}
    return dict(n=n, median_flops=med, best_flops=best, peak_median=max(med.values()),
                peak_best=max(best.values()))


def _torch_variants(mode, quick):
    if mode == "off" or (mode == "auto" and quick):
        return {"torch eager": False}
    return {"torch eager": False, "torch compile": True}


def run_case(spec, args, n_matmul):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((spec["batch"], spec["image"], spec["image"], spec["channels"]),
                            np.float32)
    y = rng.integers(0, max(spec["num_classes"], 1), spec["batch"]).astype(np.int32)
    contenders, info, skipped = {}, {}, {}
    j = jax_case(spec, x, y)
    contenders["jaxdiff"], info["jaxdiff"] = j.pop("run"), j
    _timing.progress(f"{spec['name']}: jaxdiff step compiled in {j['compile_s']:.1f} s")
    for options in args.xla_options:
        label = "jaxdiff [" + ",".join(f"{k}={v}" for k, v in options.items()) + "]"
        j = jax_case(spec, x, y, compiler_options=options)
        contenders[label], info[label] = j.pop("run"), j
        _timing.progress(f"{spec['name']}: {label} step compiled in {j['compile_s']:.1f} s")
    for label, comp in _torch_variants(args.torch_compile, args.quick).items():
        try:
            t = torch_case(spec, x, y, comp)
        except Exception as e:  # torch.compile may not work on every machine: report it
            if args.torch_compile == "on":
                raise
            skipped[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            traceback.print_exc()
            continue
        contenders[label], info[label] = t.pop("run"), t
        _timing.progress(f"{spec['name']}: {label} first call {t['first_call_s']:.1f} s")
    matmuls = matmul_contenders(n_matmul)
    cpu = {name: [] for name in contenders}
    timed = {name: _with_cpu_time(fn, cpu[name]) for name, fn in contenders.items()}
    times = _timing.interleaved({**timed, **matmuls}, repeats=args.repeats, pause=0.2)
    peak = peak_of({k: times.pop(k) for k in matmuls}, n_matmul)
    for name, seconds in cpu.items():  # drop the warm-up call
        info[name]["cpu_s_median"] = float(np.median(seconds[-args.repeats:]))
    return _summarise(spec, times, info, skipped, peak)


def _with_cpu_time(fn, out):
    """fn, appending the process CPU seconds (all threads) of each call to `out`."""
    def run():
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return run


def _summarise(spec, times, info, skipped, peak):
    B = spec["batch"]
    j = info["jaxdiff"]
    if spec["family"] == "dit":
        fwd = dit_forward_flops(image=spec["image"], channels=spec["channels"], **spec["arch"])
        flops_method = "analytic matmul count, train step = 3x forward"
    else:
        fwd = j["forward_flops_xla_per_image"]
        flops_method = "XLA cost analysis of the forward pass, train step = 3x forward"
    step_flops = 3 * fwd * B
    out = dict(model=spec["name"], batch=B, image=[spec["image"]] * 2 + [spec["channels"]],
               arch=spec["arch"], num_classes=spec["num_classes"], model_flops_per_step=step_flops,
               forward_flops_per_image=fwd, flops_method=flops_method, skipped=skipped,
               matmul_peak=peak, contenders={})
    for name, ts in times.items():
        s = _timing.stats(ts)
        s.update(info[name], img_per_s=B / s["median_s"], img_per_s_best=B / s["min_s"])
        out["contenders"][name] = s
    jd = out["contenders"]["jaxdiff"]
    jd["model_flops_per_s"] = step_flops / jd["median_s"]
    jd["fraction_of_peak"] = jd["model_flops_per_s"] / peak["peak_median"]
    jd["fraction_of_peak_best"] = step_flops / jd["min_s"] / peak["peak_best"]
    for name, s in out["contenders"].items():
        s["jaxdiff_speedup"] = s["median_s"] / jd["median_s"]
        s["jaxdiff_speedup_best"] = s["min_s"] / jd["min_s"]
    return out


def _gflops(peak, lib):
    return f"{lib} {peak['median_flops'][lib] / 1e9:.1f} ({peak['best_flops'][lib] / 1e9:.1f})"


def report(results, load):
    rows = []
    for r in results:
        for name, s in r["contenders"].items():
            frac = (f"{100 * s['fraction_of_peak']:.0f}% ({100 * s['fraction_of_peak_best']:.0f}%)"
                    if "fraction_of_peak" in s else "")
            rows.append([r["model"], r["batch"], name, f"{s['params']:,}",
                         f"{s['median_s']:.3f}", f"{s['min_s']:.3f}", f"{s['cpu_s_median']:.3f}",
                         f"{s['img_per_s']:.2f}",
                         f"{s['jaxdiff_speedup']:.2f}x ({s['jaxdiff_speedup_best']:.2f}x)", frac])
    head = ["model", "B", "implementation", "params", "step s (median)", "step s (min)",
            "CPU s (median)", "img/s", "jaxdiff speedup median (min)",
            "of matmul peak median (min)"]
    lines = [_timing.table(head, rows), ""]
    for r in results:
        p = r["matmul_peak"]
        lines.append(
            f"{r['model']}: model FLOPs/step {r['model_flops_per_step'] / 1e9:.1f} G "
            f"({r['flops_method']}); f32 GEMM {p['n']}^3 in the same rotation, median (best) "
            f"GFLOP/s: {_gflops(p, 'jax')}, {_gflops(p, 'torch')}; "
            f"skipped: {r['skipped'] or 'none'}")
    lines.append(f"load average before/after: {load[0]} / {load[1]}; host malloc: "
                 f"{host_malloc()}")
    return "\n".join(lines)


def host_malloc():
    """The host malloc settings this process runs with (`jaxdiff.cli.hostmalloc`)."""
    from jaxdiff.cli import hostmalloc

    set_ = {k: os.environ[k] for k in hostmalloc.ENV if k in os.environ}
    return "jaxdiff (" + ", ".join(f"{k}={v}" for k, v in set_.items()) + ")" if set_ else \
        "glibc defaults"


def main():
    ap, args = _timing.parse_args(__doc__.splitlines()[0], repeats=3, extra=_extra_args)
    unknown = sorted(set(args.models) - set(FULL))
    if unknown:
        ap.error(f"--models {unknown[0]!r} is unknown; allowed: {', '.join(FULL)}")
    import torch

    torch.set_num_threads(os.cpu_count())
    specs = QUICK if args.quick else FULL
    if args.unet_batch:
        specs = dict(specs, unet=dict(specs["unet"], batch=args.unet_batch))
    load_before = os.getloadavg()
    n_matmul = MATMUL_N["quick" if args.quick else "full"]
    results = [run_case(specs[m], args, n_matmul) for m in args.models]
    load = (tuple(round(v, 2) for v in load_before), tuple(round(v, 2) for v in os.getloadavg()))
    text = report(results, load)
    print(text)
    path = _timing.write_json(args.out, "train_throughput", dict(
        machine=_timing.machine(), host_malloc=host_malloc(), load_avg_before=load[0],
        load_avg_after=load[1],
        quick=args.quick, results=results))
    print(f"wrote {path}")


def _extra_args(ap):
    ap.add_argument("--models", type=lambda s: s.split(","), default=["dit", "unet"])
    ap.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto",
                    help="auto: compiled and eager, except eager only with --quick")
    ap.add_argument("--unet-batch", type=int, default=0, help="override the UNet batch size")
    ap.add_argument("--xla-options", type=_xla_options, action="append", default=[],
                    metavar="KEY=VALUE[,KEY=VALUE]",
                    help="also time jaxdiff's step compiled with these XLA options (repeatable)")


def _xla_options(text):
    """'k=v,k2=v2' -> {k: v, k2: v2} (a value may be empty: 'k=')."""
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if not pairs or any(len(p) != 2 or not p[0] for p in pairs):
        raise ValueError(f"--xla-options {text!r}: expected KEY=VALUE[,KEY=VALUE]")
    return dict(pairs)


if __name__ == "__main__":
    from jaxdiff.cli import hostmalloc

    # as the `jaxdiff` command does on a CPU host (JAXDIFF_HOST_MALLOC=system: glibc defaults);
    # both frameworks run in this process, so both get the same settings. Only as a script:
    # main() called in-process (the tests) must not replace its caller's process.
    hostmalloc.reexec(sys.argv)
    main()
