"""Triton settings sweep for the Pallas attention kernels: num_warps x num_stages, forward and
backward separately, at S = 4096 (bf16, B = 4, H = 8, D in {64, 128}), against cuDNN.

The kernels build their `CompilerParams` in `jaxdiff.kernels.attention._call` (forward with 3
stages, the two backward kernels with 2). This script swaps that module's `pltriton` for a shim
that overrides (num_warps, num_stages) of the forward or of the backward kernels, compiles a
fresh program per setting, and times forward alone (forward settings) and forward+backward
(backward settings, forward at its default), cuDNN in the same interleaved run.

    python benchmarks/gpu_tune.py [--out benchmarks/out] [--repeats 7]

Writes gpu_tune.json. GPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import types

import _timing
import jax
import jax.numpy as jnp

from jaxdiff.kernels import attention

REAL = attention.pltriton
OVERRIDE = {}  # "fwd" / "bwd" -> (num_warps, num_stages)


def _params(num_warps, num_stages):
    kind = "fwd" if num_stages == 3 else "bwd"  # _call: forward 3 stages, backward 2
    warps, stages = OVERRIDE.get(kind, (num_warps, num_stages))
    return REAL.CompilerParams(num_warps=warps, num_stages=stages)


def _compiled(fn, q, k, v, kind, setting, grad):
    """A program compiled now, under `setting` for `kind` ("fwd"/"bwd"/None)."""
    OVERRIDE.clear()
    if kind:
        OVERRIDE[kind] = setting
    if grad:
        step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                                argnums=(0, 1, 2)))
    else:
        step = jax.jit(fn)
    compiled = step.lower(q, k, v).compile()
    OVERRIDE.clear()
    return lambda: jax.block_until_ready(compiled(q, k, v))


def sweep(repeats):
    rows = []
    for D in (64, 128):
        q, k, v = (jax.random.normal(key, (4, 4096, 8, D), jnp.bfloat16)
                   for key in jax.random.split(jax.random.key(D), 3))
        cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        for grad, kind, stages in ((False, "fwd", (2, 3, 4)), (True, "bwd", (1, 2, 3))):
            contenders = {"cudnn": _compiled(cudnn, q, k, v, None, None, grad),
                          "default": _compiled(attention.flash_attention, q, k, v, None, None,
                                               grad)}
            for warps in (4, 8):
                for st in stages:
                    name = f"{kind} warps={warps} stages={st}"
                    try:
                        contenders[name] = _compiled(attention.flash_attention, q, k, v, kind,
                                                     (warps, st), grad)
                    except Exception as err:  # noqa: BLE001 -- reported, not raised
                        rows.append(dict(D=D, grad=grad, impl=name,
                                         error=str(err).splitlines()[0][:160]))
            times = _timing.interleaved(contenders, repeats=repeats, warmup=2, pause=0.01)
            base = statistics.median(times["cudnn"])
            for name, ts in times.items():
                ms = 1e3 * statistics.median(ts)
                rows.append(dict(D=D, grad=grad, impl=name, ms=ms, vs_cudnn=base * 1e3 / ms))
                print(f"tune {rows[-1]}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit("gpu_tune.py: needs a GPU (it tunes Triton settings)")
    attention.pltriton = types.SimpleNamespace(CompilerParams=_params)
    rows = sweep(args.repeats)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_tune.json"), "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), f,
                  indent=1)


if __name__ == "__main__":
    main()
