"""A JAX peer in the same run: jaxdiff vs flaxdiff (PyPI 0.2.11) on their closest UNet and DiT.

Both libraries are Flax linen on the same jax/jaxlib, so the ratio measures the libraries (model
code, train step, sampling loop), not the framework. Per model family, two measurements:

1. a train step: eps-prediction MSE on the DDPM linear-beta schedule (1000 steps), unconditional,
   float32, one fixed batch, the same optax transformation for both (jaxdiff's
   `train.make_optimizer`: global-norm clipping 1.0 + AdamW, constant lr) and one EMA of decay
   0.999, jitted, compile excluded. jaxdiff: `train.make_train_step(diffusion_objective(...))`,
   state donated. flaxdiff: its own step, `GeneralDiffusionTrainer._define_train_step` (the
   function its `fit` loop calls, jitted by flaxdiff, batch donated, so each call gets a fresh
   device copy of the fixed batch, which costs microseconds), with its p2 loss weights switched
   off (`p2_loss_weight_gamma=0`, weight 1) and no label dropout (`unconditional_prob=0`).
2. a 50-step deterministic DDIM run from noise to data on the EMA params, each library as it
   jits: jaxdiff's `jaxdiff.sample` compiles the whole loop into one program (a 50-step call
   after the first does not recompile); flaxdiff's `DDIMSampler.generate_samples` jits the
   model call and runs the loop and the DDIM update eagerly in Python. Both make 50 network
   evaluations.

Matched models (parameter counts and forward FLOPs per image, from XLA's cost analysis, are
printed, and the time ratio is also given per FLOP; the differences are listed in the output):
  UNet: attention-free conv UNet, 3 levels (64, 128, 128 channels). jaxdiff `num_res_blocks=2`
    has 2 encoder and 3 decoder res blocks per level; flaxdiff's `Unet` has num_res_blocks of
    each, its encoder blocks at the narrower input width, so `num_res_blocks=3` (3 and 3) is
    the closest: with 2 it has 33% fewer parameters and 19% fewer FLOPs than jaxdiff's, with 3
    9% fewer parameters and 7% more FLOPs.
    flaxdiff's `Unet` reads `textcontext.shape` in every call and its attention blocks attend
    to that context (cross-attention only, `only_pure_attention`), so it has no unconditional
    self-attention configuration; both sides therefore run without attention (flaxdiff:
    `attention_configs=(None,) * 3`, given an unused (B, 1, 1) zero context by a parameter-free
    wrapper; jaxdiff: `attn_resolutions=()`, `mid_attn=False`).
  DiT: 6 blocks, width 256, 4 heads, MLP ratio 4, patch 4 on 32x32x3 (64 tokens), adaLN
    conditioning on t only. flaxdiff's `SimpleDiT` uses RoPE, jaxdiff's `DiT` fixed sin-cos
    positions; the final layers differ (flaxdiff: LayerNorm + Dense, jaxdiff: adaLN).

flaxdiff is not a jaxdiff dependency and is not installed into the project's venv (its
requirements add albumentations, albucore, opencv-python-headless, augmax, clu, the `orbax`
shim, python-dotenv, simsimd and stringzilla; none of jaxdiff's pins would change, but none of
them is needed here). `make bench-flaxdiff` installs it
and the one extra module its trainer imports (clu) without dependencies into
.venv/flaxdiff-peer, which this script puts on sys.path (or --flaxdiff-path / $FLAXDIFF_PATH).
Without flaxdiff the script prints one line and exits with code 2.

    python benchmarks/flaxdiff_peer.py [--quick] [--repeats 3] [--models unet,dit]
        [--flaxdiff-path DIR]

Full sizes: 32x32x3; UNet train batch 8, sampling batch 4; DiT train batch 16 (2 steps per
timed repeat), sampling batch 8. About 4 CPU-minutes; on 2 cores shared with other jobs the wall
time is set by the load (29 min at load average 6-9, mostly compilation). --quick: 8x8 images,
one-block models, 5 sampling steps (compilation dominates: ~3 min on 2 busy cores).

Prints a table and writes benchmarks/out/flaxdiff_peer.json.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings

import _timing
import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff import models, train
from jaxdiff.core.process import DiscreteVP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PATH = os.path.join(ROOT, ".venv", "flaxdiff-peer")
FLAXDIFF_VERSION = "0.2.11"
EMA_DECAY = 0.999  # flaxdiff's trainer default

FULL = {
    "unet": dict(name="UNet (conv, 64-128-128)", family="unet", image=32, channels=3,
                 batch=16, sample_batch=8, steps=50, train_steps_per_repeat=2,
                 jaxdiff=dict(channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                              attn_resolutions=(), mid_attn=False, norm_groups=32),
                 flaxdiff=dict(emb_features=256, feature_depths=(64, 128, 128),
                               num_res_blocks=3, num_middle_res_blocks=1, norm_groups=32)),
    "dit": dict(name="DiT (6 x 256, patch 4)", family="dit", image=32, channels=3,
                batch=16, sample_batch=8, steps=50, train_steps_per_repeat=2,
                jaxdiff=dict(depth=6, hidden_size=256, num_heads=4, patch_size=4),
                flaxdiff=dict(num_layers=6, emb_features=256, num_heads=4, patch_size=4)),
}
QUICK = {  # smoke-test sizes: every code path, seconds
    "unet": dict(FULL["unet"], name="UNet tiny", image=8, batch=2, sample_batch=2, steps=5,
                 train_steps_per_repeat=1,
                 jaxdiff=dict(FULL["unet"]["jaxdiff"], channels=8, channel_mult=(1, 2),
                              num_res_blocks=1, norm_groups=4),
                 flaxdiff=dict(FULL["unet"]["flaxdiff"], emb_features=32, feature_depths=(8, 16),
                               num_res_blocks=2, norm_groups=4)),
    "dit": dict(FULL["dit"], name="DiT tiny", image=8, batch=2, sample_batch=2, steps=5,
                train_steps_per_repeat=1,
                jaxdiff=dict(depth=1, hidden_size=32, num_heads=2, patch_size=2),
                flaxdiff=dict(num_layers=1, emb_features=32, num_heads=2, patch_size=2)),
}
DIFFERENCES = {
    "unet": "flaxdiff (num_res_blocks=3): 3 encoder res blocks per level at the level's input "
            "width, 3 decoder blocks, one extra res block after the last upsampling, additive "
            "time embedding, Fourier time features; jaxdiff (num_res_blocks=2): 2 encoder "
            "blocks at the level's width, 3 decoder blocks, AdaGN (scale + shift) time "
            "embedding, sinusoidal time features",
    "dit": "flaxdiff: RoPE, Fourier time features through a 4x-wide projection, final "
           "LayerNorm + Dense; jaxdiff: fixed 2-D sin-cos positions, sinusoidal time MLP, "
           "adaLN final layer",
}


def import_flaxdiff(path):
    """Puts `path` (when it exists) first on sys.path and imports the flaxdiff modules this
    benchmark uses; returns them as a dict, or raises ImportError."""
    if path and os.path.isdir(path) and path not in sys.path:
        sys.path.insert(0, path)
    with warnings.catch_warnings():  # its jax.experimental.shard_map imports are deprecated
        warnings.simplefilter("ignore")
        import flaxdiff
        from flaxdiff.inputs import DiffusionInputConfig
        from flaxdiff.models.simple_dit import SimpleDiT
        from flaxdiff.models.simple_unet import Unet
        from flaxdiff.predictors import EpsilonPredictionTransform
        from flaxdiff.samplers import DDIMSampler
        from flaxdiff.schedulers import LinearNoiseSchedule
        from flaxdiff.trainer import GeneralDiffusionTrainer
    try:
        from importlib.metadata import version

        ver = version("flaxdiff")
    except Exception:  # noqa: BLE001 - metadata may be missing for a path install
        ver = "unknown"
    return dict(module=flaxdiff, version=ver, path=os.path.dirname(os.path.dirname(
        flaxdiff.__file__)), DiffusionInputConfig=DiffusionInputConfig, SimpleDiT=SimpleDiT,
        Unet=Unet, EpsilonPredictionTransform=EpsilonPredictionTransform,
        DDIMSampler=DDIMSampler, LinearNoiseSchedule=LinearNoiseSchedule,
        GeneralDiffusionTrainer=GeneralDiffusionTrainer)


def n_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def forward_gflop(apply, variables, shape):
    """XLA's cost-analysis FLOPs (in G) of one forward pass `apply(variables, x, t)` on one
    image of `shape`."""
    x, t = jnp.zeros((1, *shape), jnp.float32), jnp.full((1,), 500, jnp.int32)
    cost = jax.jit(apply).lower(variables, x, t).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) / 1e9 if cost else float("nan")


# ---------------------------------------------------------------------------------- jaxdiff

def jaxdiff_case(spec, x, noise, tx, lr_fn):
    """jaxdiff's jitted, state-donating train step and its 50-step DDIM `jaxdiff.sample`."""
    if spec["family"] == "unet":
        model = models.build("unet", dropout=0.0, **spec["jaxdiff"])
    else:
        model = models.build("dit", learn_sigma=False, **spec["jaxdiff"])
    state = train.init_state(model, tx, x_shape=x.shape[1:], num_classes=0, seed=0,
                             ema_decays=(EMA_DECAY,))
    objective = train.diffusion_objective(model, process=DiscreteVP.linear(), prediction="eps",
                                          num_classes=0, p_uncond=0.0)
    step = jax.jit(train.make_train_step(objective, tx, lr_fn, ema_decays=(EMA_DECAY,)),
                   donate_argnums=0)
    batch = {"x": jnp.asarray(x), "label": jnp.zeros((x.shape[0],), jnp.int32)}
    compiled, compile_s = _timing.timed(lambda: step.lower(state, batch).compile())
    holder = [state]
    k = spec["train_steps_per_repeat"]

    def train_run():
        for _ in range(k):
            holder[0], _ = compiled(holder[0], batch)
        jax.block_until_ready(holder[0])

    noise = jnp.asarray(noise)
    process, steps = DiscreteVP.linear(), spec["steps"]

    def sample_run():
        net = train.network(model, holder[0].ema_params[0])
        return jaxdiff.sample(net, noise, process=process, prediction="eps", sampler="ddim",
                              steps=steps).block_until_ready()

    _, first_sample_s = _timing.timed(sample_run)
    gflop = forward_gflop(lambda p, x, t: model.apply({"params": p}, x, t), state.params,
                          x.shape[1:])
    return dict(train=train_run, sample=sample_run, params=n_params(state.params),
                fwd_gflop_per_image=gflop, train_compile_s=compile_s,
                sample_first_call_s=first_sample_s)


# --------------------------------------------------------------------------------- flaxdiff

def flaxdiff_model(fd, spec):
    import flax.linen as nn

    C = spec["channels"]
    if spec["family"] == "dit":
        return fd["SimpleDiT"](output_channels=C, mlp_ratio=4, **spec["flaxdiff"])
    cfg = spec["flaxdiff"]
    unet = fd["Unet"](output_channels=C, attention_configs=(None,) * len(cfg["feature_depths"]),
                      **cfg)

    class UnconditionalUnet(nn.Module):
        """flaxdiff's Unet with an unused zero text context (it reads textcontext.shape even
        when no block attends); no parameters of its own."""

        unet: nn.Module

        @nn.compact
        def __call__(self, x, temb):
            return self.unet(x, temb, jnp.zeros((x.shape[0], 1, 1), x.dtype))

    return UnconditionalUnet(unet)


def flaxdiff_case(fd, spec, x, tx):
    """flaxdiff's own trainer step (`GeneralDiffusionTrainer._define_train_step`, the function
    its `fit` calls) and its DDIMSampler, on the same optax transformation."""
    model = flaxdiff_model(fd, spec)
    schedule = fd["LinearNoiseSchedule"](1000, p2_loss_weight_gamma=0)  # loss weight 1
    H, C = spec["image"], spec["channels"]
    config = fd["DiffusionInputConfig"](sample_data_key="image", sample_data_shape=(H, H, C),
                                        conditions=[])
    ckpt_dir = tempfile.mkdtemp(prefix="flaxdiff_peer_")  # its trainer makes a checkpointer
    absl = logging.getLogger("absl")  # ... with orbax's legacy API, which warns
    level = absl.level
    absl.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = fd["GeneralDiffusionTrainer"](
            model, tx, schedule, config, jax.random.PRNGKey(0), unconditional_prob=0.0,
            distributed_training=False, checkpoint_base_path=ckpt_dir,
            model_output_transform=fd["EpsilonPredictionTransform"]())
        trainer.ema_decay = EMA_DECAY
        step = trainer._define_train_step(batch_size=spec["batch"])
    absl.setLevel(level)
    images = ((x + 1) * 127.5).astype(np.float32)  # its step maps [0, 255] to [-1, 1]
    device_index = jnp.array(0)
    holder = [trainer.state, trainer.rngstate]
    k = spec["train_steps_per_repeat"]

    def train_run():
        for _ in range(k):
            holder[0], _, holder[1] = step(holder[0], holder[1],
                                           {"image": jnp.asarray(images)}, device_index)
        jax.block_until_ready(holder[0])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, compile_s = _timing.timed(train_run)  # first call: trace + compile + k steps
    sampler = fd["DDIMSampler"](model=model, noise_schedule=schedule,
                                model_output_transform=fd["EpsilonPredictionTransform"](),
                                input_config=config, guidance_scale=0.0)

    def sample_run():
        with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar
            return sampler.generate_samples(
                params=holder[0].ema_params, num_samples=spec["sample_batch"], resolution=H,
                diffusion_steps=spec["steps"], start_step=1000, end_step=0).block_until_ready()

    _, first_sample_s = _timing.timed(sample_run)
    gflop = forward_gflop(model.apply, holder[0].params, x.shape[1:])
    return dict(train=train_run, sample=sample_run, params=n_params(trainer.state.params),
                fwd_gflop_per_image=gflop, train_first_call_s=compile_s,
                sample_first_call_s=first_sample_s, checkpoint_dir=ckpt_dir)


# ------------------------------------------------------------------------------------ runner

def run_case(fd, spec, repeats):
    rng = np.random.default_rng(0)
    H, C = spec["image"], spec["channels"]
    x = np.clip(rng.standard_normal((spec["batch"], H, H, C)), -1, 1).astype(np.float32)
    noise = rng.standard_normal((spec["sample_batch"], H, H, C)).astype(np.float32)
    tx, lr_fn = train.make_optimizer(lr=1e-4, total_steps=10**6, schedule="constant")
    j = jaxdiff_case(spec, x, noise, tx, lr_fn)
    _timing.progress(f"{spec['name']}: jaxdiff {j['params']:,} params, step compiled in "
                     f"{j['train_compile_s']:.1f} s, first sample call "
                     f"{j['sample_first_call_s']:.1f} s")
    f = flaxdiff_case(fd, spec, x, tx)
    _timing.progress(f"{spec['name']}: flaxdiff {f['params']:,} params, first train call "
                     f"{f['train_first_call_s']:.1f} s, first sample call "
                     f"{f['sample_first_call_s']:.1f} s")
    k = spec["train_steps_per_repeat"]
    t_train = _timing.interleaved({"jaxdiff": j.pop("train"), "flaxdiff": f.pop("train")},
                                  repeats=repeats, pause=0.2)
    t_sample = _timing.interleaved({"jaxdiff": j.pop("sample"), "flaxdiff": f.pop("sample")},
                                   repeats=repeats, pause=0.2)
    out = dict(model=spec["name"], family=spec["family"], image=[H, H, C], batch=spec["batch"],
               sample_batch=spec["sample_batch"], sample_steps=spec["steps"],
               train_steps_per_repeat=k, jaxdiff_arch=spec["jaxdiff"],
               flaxdiff_arch=spec["flaxdiff"], differences=DIFFERENCES[spec["family"]],
               info={"jaxdiff": j, "flaxdiff": f}, train={}, sample={})
    for name, ts in t_train.items():
        out["train"][name] = _timing.stats([t / k for t in ts])  # seconds per step
    for name, ts in t_sample.items():
        out["sample"][name] = _timing.stats(ts)
    flop_ratio = j["fwd_gflop_per_image"] / f["fwd_gflop_per_image"]
    out["fwd_flop_ratio_jaxdiff_over_flaxdiff"] = flop_ratio
    for kind in ("train", "sample"):
        jd, fd_ = out[kind]["jaxdiff"], out[kind]["flaxdiff"]
        out[kind]["ratio_jaxdiff_over_flaxdiff"] = jd["median_s"] / fd_["median_s"]
        out[kind]["ratio_min"] = jd["min_s"] / fd_["min_s"]
        # time per FLOP, jaxdiff over flaxdiff (the models' FLOPs differ a little)
        out[kind]["ratio_per_flop"] = out[kind]["ratio_jaxdiff_over_flaxdiff"] / flop_ratio
    return out


def report(results, load, fd_version):
    rows = []
    for r in results:
        for kind, what in (("train", f"train step (B={r['batch']})"),
                           ("sample", f"{r['sample_steps']}-step DDIM (B={r['sample_batch']})")):
            s = r[kind]
            ratio = f"{s['ratio_jaxdiff_over_flaxdiff']:.2f} ({s['ratio_min']:.2f})"
            for name in ("jaxdiff", "flaxdiff"):
                info = r["info"][name]
                first = name == "jaxdiff"
                rows.append([r["model"], what, name, f"{info['params']:,}",
                             f"{info['fwd_gflop_per_image']:.3f}",
                             f"{s[name]['median_s']:.4f}", f"{s[name]['min_s']:.4f}",
                             ratio if first else "", f"{s['ratio_per_flop']:.2f}" if first else ""])
    head = ["model", "measurement", "library", "params", "fwd GFLOP/img", "s (median)", "s (min)",
            "jaxdiff/flaxdiff median (min)", "per FLOP"]
    lines = [_timing.table(head, rows), ""]
    for r in results:
        j, f = r["info"]["jaxdiff"], r["info"]["flaxdiff"]
        lines.append(f"{r['model']}: jaxdiff step compile {j['train_compile_s']:.1f} s, first "
                     f"sample call {j['sample_first_call_s']:.1f} s; flaxdiff first train call "
                     f"{f['train_first_call_s']:.1f} s, first sample call "
                     f"{f['sample_first_call_s']:.1f} s. Differences: {r['differences']}.")
    lines.append(f"flaxdiff {fd_version}; train step s are per step; ratio < 1: jaxdiff "
                 f"faster; per FLOP: the median ratio divided by the forward-FLOP ratio. "
                 f"load average before/after: {load[0]} / {load[1]}")
    return "\n".join(lines)


def main():
    ap, args = _timing.parse_args(__doc__.splitlines()[0], repeats=3, extra=_extra_args)
    unknown = sorted(set(args.models) - set(FULL))
    if unknown:
        ap.error(f"--models {unknown[0]!r} is unknown; allowed: {', '.join(FULL)}")
    try:
        fd = import_flaxdiff(args.flaxdiff_path)
    except ImportError as e:
        print(f"flaxdiff_peer: flaxdiff is not importable ({type(e).__name__}: {e}); install it "
              f"with `make bench-flaxdiff` (into {DEFAULT_PATH}) or pass --flaxdiff-path")
        sys.exit(2)
    _timing.progress(f"flaxdiff {fd['version']} from {fd['path']}")
    specs = QUICK if args.quick else FULL
    load_before = os.getloadavg()
    results = [run_case(fd, specs[m], args.repeats) for m in args.models]
    load = (tuple(round(v, 2) for v in load_before), tuple(round(v, 2) for v in os.getloadavg()))
    print(report(results, load, fd["version"]))
    path = _timing.write_json(args.out, "flaxdiff_peer", dict(
        machine=dict(_timing.machine(), flaxdiff=fd["version"]), load_avg_before=load[0],
        load_avg_after=load[1], quick=args.quick, repeats=args.repeats, results=results))
    print(f"wrote {path}")


def _extra_args(ap):
    ap.add_argument("--models", type=lambda s: s.split(","), default=["unet", "dit"])
    ap.add_argument("--flaxdiff-path", default=os.environ.get("FLAXDIFF_PATH", DEFAULT_PATH),
                    help="folder flaxdiff was pip-installed into with --target "
                         "(default $FLAXDIFF_PATH or .venv/flaxdiff-peer)")


if __name__ == "__main__":
    main()
