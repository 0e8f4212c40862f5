"""Compile time of jaxdiff's train step and of its sampler, and that the latter does not grow with
the number of steps.

Train step: `jaxdiff.train.make_train_step` jitted with the state donated (as `jaxdiff.train`
runs it) for the digits demo UNet (configs/digits.py, 8x8x1, batch 64, EDM) and for DiT-S/2
(Peebles & Xie 2023; 32x32x4, batch 32, 1000 classes, DDPM eps loss), lowered from abstract
shapes (no allocation); trace + lowering and XLA compilation are timed separately.

Sampler: `jaxdiff.sample` (DPM-Solver++(2M), Lu et al. 2022b) with the digits UNet as network
(--quick: a tiny MLP).
The sampler is one program: the grid is padded to a fixed capacity and the step count is data
(`jaxdiff/samplers/base.py`), so its loop is a `while_loop` that is never unrolled. Two
measurements: (a) a fresh compile (caches cleared) at 10, 100 and 1000 steps with the default
capacity (256, 256, 1024): compile = first call minus a warm call; (b) one program of capacity
1024 serving 10, 100 and 1000 steps: traces are counted (`jaxdiff.sampling.trace_count()`).

    python benchmarks/compile_time.py [--quick] [--repeats 3]

Prints a table and writes benchmarks/out/compile_time.json.
"""

from __future__ import annotations

import os

import _timing
import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff import models, sampling, train
from jaxdiff.core.process import EDM, DiscreteVP

DIGITS_UNET = dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                   norm_groups=8, dropout=0.1, num_classes=10)
FULL = {
    "train": [
        dict(name="UNet digits", model=dict(name="unet", **DIGITS_UNET), shape=(8, 8, 1),
             batch=64, process=EDM(sigma_data=0.5), prediction="edm",
             loss=dict(time_sampling="lognormal")),
        dict(name="DiT-S/2", model=dict(name="dit", preset="DiT-S/2", num_classes=1000,
                                        learn_sigma=False),
             shape=(32, 32, 4), batch=32, process=DiscreteVP.linear(), prediction="eps", loss={}),
    ],
    "sampler_model": dict(name="unet", **DIGITS_UNET), "sampler_shape": (8, 8, 1),
    "steps": (10, 100, 1000),
}
QUICK = {  # smoke-test sizes: the same code paths, a few seconds of compilation each
    "train": [
        dict(FULL["train"][1], name="DiT tiny", shape=(4, 4, 4), batch=2,
             model=dict(name="dit", depth=1, hidden_size=32, num_heads=2, patch_size=2,
                        num_classes=10, learn_sigma=False)),
    ],
    "sampler_model": dict(name="mlp", width=16, depth=1), "sampler_shape": (2,),
    "steps": (10, 100, 300),
}


def train_step_compile(spec):
    """(trace + lower seconds, XLA compile seconds) of the donated, jitted train step."""
    kw = dict(spec["model"])
    model = models.build(kw.pop("name"), **kw)
    nc = kw.get("num_classes", 0)
    tx, lr_fn = train.make_optimizer(lr=1e-4, total_steps=10**6, schedule="constant")
    state = train.abstract_state(model, tx, x_shape=spec["shape"], num_classes=nc,
                                 ema_decays=(0.9999,))
    batch = {"x": jax.ShapeDtypeStruct((spec["batch"],) + spec["shape"], jnp.float32),
             "label": jax.ShapeDtypeStruct((spec["batch"],), jnp.int32)}
    objective = train.diffusion_objective(model, process=spec["process"],
                                          prediction=spec["prediction"], num_classes=nc,
                                          loss_options=spec["loss"])
    step = jax.jit(train.make_train_step(objective, tx, lr_fn, ema_decays=(0.9999,)),
                   donate_argnums=0)
    lowered, lower_s = _timing.timed(lambda: step.lower(state, batch))
    _, compile_s = _timing.timed(lowered.compile)
    return dict(model=spec["name"], batch=spec["batch"], shape=list(spec["shape"]),
                trace_lower_s=lower_s, compile_s=compile_s, total_s=lower_s + compile_s)


def _sampler_call(spec):
    """`call(steps, capacity)` -> seconds of one blocking jaxdiff.sample call."""
    kw = dict(spec["sampler_model"])
    model = models.build(kw.pop("name"), **kw)
    x = jnp.zeros((1,) + spec["sampler_shape"], jnp.float32)
    params = jax.jit(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,)))["params"])()
    net = train.network(model, jax.tree.map(jnp.asarray, params))
    noise = jax.random.normal(jax.random.key(1), x.shape)

    def call(steps, capacity=None):
        _, s = _timing.timed(lambda: jaxdiff.sample(
            net, noise, process=EDM(sigma_data=0.5), prediction="edm", sampler="dpmpp_2m",
            steps=steps, capacity=capacity).block_until_ready())
        return s
    return call


def sampler_compile(spec, repeats):
    """(a) fresh compile per step count; (b) one capacity-1024 program for every step count."""
    call, fresh, shared = _sampler_call(spec), [], []
    for steps in spec["steps"]:
        jax.clear_caches()
        before = sampling.trace_count()
        first = call(steps)
        warm = float(np.median([call(steps) for _ in range(repeats)]))
        fresh.append(dict(steps=steps, capacity=sampling._capacity(steps, None), first_call_s=first,
                          warm_call_s=warm, compile_s=first - warm,
                          traces=sampling.trace_count() - before))
    jax.clear_caches()
    capacity = max(1024, max(spec["steps"]))
    for steps in spec["steps"]:
        before = sampling.trace_count()
        first = call(steps, capacity)
        shared.append(dict(steps=steps, capacity=capacity, first_call_s=first,
                           warm_call_s=float(np.median([call(steps, capacity)
                                                        for _ in range(repeats)])),
                           traces=sampling.trace_count() - before))
    return fresh, shared


def report(train_rows, fresh, shared, load, network):
    rows = [[r["model"], r["batch"], f"{r['trace_lower_s']:.2f}", f"{r['compile_s']:.2f}",
             f"{r['total_s']:.2f}"] for r in train_rows]
    lines = ["Train step (jit, donated state):",
             _timing.table(["model", "B", "trace+lower s", "XLA compile s", "total s"], rows), "",
             f"Sampler (jaxdiff.sample, dpmpp_2m, network {network}):",
             _timing.table(["steps", "capacity", "fresh compile s", "traces", "warm call s",
                            "one program: first call s", "one program: traces"],
                           [[f["steps"], f["capacity"], f"{f['compile_s']:.2f}", f["traces"],
                             f"{f['warm_call_s']:.4f}", f"{s['first_call_s']:.4f}", s["traces"]]
                            for f, s in zip(fresh, shared)]),
             "", f"load average before/after: {load[0]} / {load[1]}"]
    return "\n".join(lines)


def main():
    _, args = _timing.parse_args(__doc__.splitlines()[0], repeats=3)
    spec = QUICK if args.quick else FULL
    load_before = os.getloadavg()
    train_rows = [train_step_compile(s) for s in spec["train"]]
    fresh, shared = sampler_compile(spec, args.repeats)
    load = (tuple(round(v, 2) for v in load_before), tuple(round(v, 2) for v in os.getloadavg()))
    print(report(train_rows, fresh, shared, load, spec["sampler_model"]))
    path = _timing.write_json(args.out, "compile_time", dict(
        machine=_timing.machine(), load_avg_before=load[0], load_avg_after=load[1],
        quick=args.quick, sampler_network=spec["sampler_model"], train_step=train_rows,
        sampler_fresh=fresh, sampler_one_program=shared))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
