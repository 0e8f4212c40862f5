"""Kernel benchmarks: attention (xla / pallas / cudnn) and the fused solver step.

Attention: forward and forward+backward of `jaxdiff.models.layers.attention(q, k, v,
implementation=impl)` for impl in xla, pallas (the FlashAttention kernel of Dao et al. 2022,
`jaxdiff.kernels.attention`), cudnn (`jax.nn.dot_product_attention`), bf16, over sequence
lengths S and head dims D; throughput counts 4 B H S^2 D flops forward and 3.5x that for
forward+backward (the backward's five S^2 D matmuls on top of the forward's two).

Solver step: the linear multistep update x' = a x + sum_i b_i D_i, as the samplers' jnp
`combine` and as the fused kernel `jaxdiff.kernels.solver_step`, run `inner` times in a
`fori_loop` on a donated x (in place, as in the sampling loop; the loop keeps dispatch out of
the time). Achieved bandwidth = bytes that must move ((k + 2) arrays) / time, compared with the
device's measured copy bandwidth (x -> x + 1 in the same loop, read + write).

Targets (H100): pallas attention fwd+bwd >= 0.9x cuDNN at S >= 1024; solver step >= 80% of the
measured copy bandwidth.

    python benchmarks/kernels.py [--quick] [--repeats N] [--out benchmarks/out]

--quick: tiny sizes (seconds on CPU, Pallas in interpret mode). cuDNN rows are skipped, with a
note, when the backend is not GPU; a failing row is reported with its error, not raised. Every
contender runs alternately within one process (warm-up, then repeats, median reported).
Prints the tables and writes kernels.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import _timing
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.kernels.solver_step import hbm_bytes, solver_step
from jaxdiff.models.layers import attention
from jaxdiff.samplers.multistep import combine

FULL = dict(seq=(256, 1024, 4096), head_dim=(64, 128), batch=4, heads=8, sizes=(1 << 26,),
            blocks=(8, 16, 64, 128), copy_size=1 << 28, inner=10)
QUICK = dict(seq=(64, 128), head_dim=(32, 64), batch=1, heads=2, sizes=(1 << 15,), blocks=(),
             copy_size=1 << 20, inner=2)
IMPLS = ("xla", "pallas", "cudnn")
PAUSE_S = 0.02


def interleaved(contenders, repeats):
    """Median seconds of each zero-argument callable (which blocks until done), the contenders
    timed alternately (`_timing.interleaved`)."""
    times = _timing.interleaved(contenders, repeats=repeats, warmup=2, pause=PAUSE_S)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _first_line(err):
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:160]


# --- attention -------------------------------------------------------------------------------


def _attention_fns(impl, q, k, v):
    """(forward, forward+backward) zero-argument callables for one implementation."""
    fwd = jax.jit(lambda q, k, v: attention(q, k, v, implementation=impl))

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, implementation=impl).astype(jnp.float32))

    bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return (lambda: jax.block_until_ready(fwd(q, k, v)),
            lambda: jax.block_until_ready(bwd(q, k, v)))


def _skip_reason(impl, backend):
    if impl == "cudnn" and backend != "gpu":
        return f"skipped: cuDNN needs a GPU (backend={backend})"
    return None


def bench_attention(cfg, repeats, backend):
    """One row per (S, D, impl): fwd and fwd+bwd medians, or the reason it did not run."""
    rows = []
    for seq in cfg["seq"]:
        for d in cfg["head_dim"]:
            shape = (cfg["batch"], seq, cfg["heads"], d)
            keys = jax.random.split(jax.random.key(seq * 1000 + d), 3)
            q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
            contenders, notes = {}, {}
            for impl in IMPLS:
                notes[impl] = _skip_reason(impl, backend)
                if notes[impl] is None:
                    try:  # compile and check once here, so that a failure is one row's note
                        fwd, fwdbwd = _attention_fns(impl, q, k, v)
                        fwd(), fwdbwd()
                        contenders[(impl, "fwd")], contenders[(impl, "fwdbwd")] = fwd, fwdbwd
                    except Exception as err:  # noqa: BLE001 -- reported in the table
                        notes[impl] = "error: " + _first_line(err)
            times = interleaved(contenders, repeats) if contenders else {}
            flops = 4 * cfg["batch"] * cfg["heads"] * seq * seq * d
            for impl in IMPLS:
                row = dict(S=seq, D=d, B=cfg["batch"], H=cfg["heads"], impl=impl, note=notes[impl])
                if notes[impl] is None:
                    row.update(fwd_ms=1e3 * times[(impl, "fwd")],
                               fwdbwd_ms=1e3 * times[(impl, "fwdbwd")])
                    row.update(fwd_tflops=flops / times[(impl, "fwd")] / 1e12,
                               fwdbwd_tflops=3.5 * flops / times[(impl, "fwdbwd")] / 1e12)
                rows.append(row)
    return rows


# --- solver step -----------------------------------------------------------------------------


def _looped(update, inner):
    """jit of `inner` in-place applications of update(a, x, b, ds), x donated."""

    def many(a, x, b, ds):
        return jax.lax.fori_loop(0, inner, lambda i, x: update(a, x, b, ds), x)

    return jax.jit(many, donate_argnums=1)


def copy_bandwidth(size, inner, repeats):
    """Measured read + write bandwidth (GB/s) of x -> x + 1 in float32."""
    state = {"x": jnp.zeros((size,), jnp.float32)}
    fn = _looped(lambda a, x, b, ds: x + 1, inner)

    def run():
        state["x"] = jax.block_until_ready(fn(None, state["x"], None, None))

    t = interleaved({"copy": run}, repeats)["copy"] / inner
    return 2 * size * 4 / t / 1e9


def _stepper(update, size, k, dtype, inner, seed):
    """A zero-argument callable running `inner` updates on a donated x held in a closure."""
    keys = jax.random.split(jax.random.key(seed), 2)
    state = {"x": jax.random.normal(keys[0], (size,), dtype)}
    ds = jax.random.normal(keys[1], (k, size), dtype)
    a, b = jnp.float32(0.5), jnp.full((k,), 0.5 / k, jnp.float32)  # keeps x bounded
    fn = _looped(update, inner)

    def run():
        state["x"] = jax.block_until_ready(fn(a, state["x"], b, ds))

    return run


def _solver_contenders(size, k, dtype, blocks, inner):
    jnp_update = lambda a, x, b, ds: combine(a, b, x, ds)  # noqa: E731 -- the samplers' path
    contenders = {"jnp": _stepper(jnp_update, size, k, dtype, inner, 1)}
    contenders["pallas"] = _stepper(solver_step, size, k, dtype, inner, 2)
    for blk in blocks:  # on an accelerator: other row blocks than the default
        step = lambda a, x, b, ds, blk=blk: solver_step(a, x, b, ds, block=blk)  # noqa: E731
        contenders[f"pallas block={blk}"] = _stepper(step, size, k, dtype, inner, 2)
    return contenders


def bench_solver(cfg, repeats, copy_gbs, accelerator):
    """One row per (size, dtype, k, impl): median time, achieved GB/s, fraction of copy GB/s."""
    rows = []
    blocks = cfg["blocks"] if accelerator else ()
    for size in cfg["sizes"]:
        for dtype in (jnp.float32, jnp.bfloat16):
            for k in (1, 3):
                contenders, notes = {}, {}
                fns = _solver_contenders(size, k, dtype, blocks, cfg["inner"])
                for name, fn in fns.items():
                    try:
                        fn()
                        contenders[name] = fn
                    except Exception as err:  # noqa: BLE001 -- reported in the table
                        notes[name] = "error: " + _first_line(err)
                times = {name: t / cfg["inner"]
                         for name, t in interleaved(contenders, repeats).items()}
                nbytes = hbm_bytes(jax.ShapeDtypeStruct((size,), dtype), k)
                for name in list(contenders) + list(notes):
                    row = dict(impl=name, n=size, dtype=jnp.dtype(dtype).name, k=k,
                               note=notes.get(name))
                    if name in times:
                        gbs = nbytes / times[name] / 1e9
                        row.update(ms=1e3 * times[name], gbs=gbs, frac_copy=gbs / copy_gbs)
                    rows.append(row)
    return rows


# --- output ----------------------------------------------------------------------------------


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def attention_table(rows):
    return _timing.table(
        ["S", "D", "impl", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "note"],
        [[r["S"], r["D"], r["impl"], _fmt(r.get("fwd_ms"), ".3f"),
          _fmt(r.get("fwd_tflops"), ".3f"), _fmt(r.get("fwdbwd_ms"), ".3f"),
          _fmt(r.get("fwdbwd_tflops"), ".3f"), r["note"] or ""] for r in rows])


def solver_table(rows):
    return _timing.table(
        ["n", "dtype", "k", "impl", "ms", "GB/s", "of copy BW", "note"],
        [[r["n"], r["dtype"], r["k"], r["impl"], _fmt(r.get("ms"), ".4f"),
          _fmt(r.get("gbs"), ".1f"), _fmt(r.get("frac_copy"), ".2f"), r["note"] or ""]
         for r in rows])


def targets(att_rows, solver_rows):
    """The issue's targets, as measured here (None where a contender did not run)."""
    ratios = {}
    for r in att_rows:
        if r["impl"] == "pallas" and r["S"] >= 1024:
            peer = next(p for p in att_rows if p["impl"] == "cudnn" and
                        (p["S"], p["D"]) == (r["S"], r["D"]))
            ok = "fwdbwd_ms" in r and "fwdbwd_ms" in peer
            ratios[f"S={r['S']} D={r['D']}"] = (
                peer["fwdbwd_ms"] / r["fwdbwd_ms"] if ok else None)
    fracs = [r["frac_copy"] for r in solver_rows if r["impl"].startswith("pallas")
             and "frac_copy" in r]
    return {"pallas_vs_cudnn_fwdbwd_speed (>= 0.9)": ratios,
            "solver_step_best_frac_of_copy_bw (>= 0.8)": max(fracs) if fracs else None,
            "solver_step_min_frac_of_copy_bw_default_block": min(
                [r["frac_copy"] for r in solver_rows if r["impl"] == "pallas"
                 and "frac_copy" in r], default=None)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20; 5)")
    ap.add_argument("--out", default="benchmarks/out", help="folder for kernels.json")
    args = ap.parse_args()
    repeats = args.repeats or (5 if args.quick else 20)
    if repeats < 1:
        ap.error(f"--repeats={repeats} must be >= 1")
    cfg = QUICK if args.quick else FULL
    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    print(f"device: {device} (backend {backend}), jax {jax.__version__}, "
          f"{'quick' if args.quick else 'full'} run, median of {repeats}")
    copy_gbs = copy_bandwidth(cfg["copy_size"], cfg["inner"], repeats)
    print(f"measured copy bandwidth: {copy_gbs:.1f} GB/s\n")
    att = bench_attention(cfg, repeats, backend)
    print("attention, bf16, B={batch} H={heads}\n".format(**cfg) + attention_table(att) + "\n")
    solver = bench_solver(cfg, repeats, copy_gbs, backend in ("gpu", "tpu"))
    print("solver step x' = a x + sum_i b_i D_i (x donated)\n" + solver_table(solver) + "\n")
    goal = targets(att, solver)
    print("targets: " + json.dumps(goal, indent=1))
    os.makedirs(args.out, exist_ok=True)
    result = dict(device=device, backend=backend, jax=jax.__version__, quick=args.quick,
                  repeats=repeats, copy_gbs=copy_gbs, attention=att, solver_step=solver,
                  targets=goal, numpy=np.__version__)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
