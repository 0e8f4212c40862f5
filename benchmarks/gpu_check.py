"""Kernels on real hardware: correctness against the references, then a block-size sweep.

The unit tests run the Pallas kernels in interpret mode on CPU; this script runs them compiled
(Triton on GPU, Mosaic on TPU) and compares with the plain-jnp references:

- flash attention forward and gradients (f32 and bf16; masked and unmasked; odd lengths and a
  head dim that is not a power of two), errors relative to the reference's largest value;
- the fused solver step a x + sum_i b_i D_i (f32, bf16), max abs error;
- forward+backward time of the Pallas attention over (block_q, block_k) at S = 4096, against
  cuDNN (`jax.nn.dot_product_attention`) in the same run.

    python benchmarks/gpu_check.py [--out benchmarks/out] [--repeats 10]

Writes gpu_check.json to --out. Not meaningful on CPU (it refuses to run there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import _timing
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.kernels.attention import attention_reference, flash_attention
from jaxdiff.kernels.solver_step import solver_step, solver_step_reference

ATTENTION_CASES = [  # (B, S, T, H, D, masked, dtype)
    (2, 256, 256, 4, 64, False, jnp.float32),
    (2, 257, 77, 4, 72, True, jnp.float32),
    (1, 1025, 1025, 2, 128, True, jnp.float32),
    (2, 1024, 1024, 4, 64, False, jnp.bfloat16),
    (1, 4096, 4096, 2, 128, True, jnp.bfloat16),
]
TOLERANCE = {jnp.float32: 2e-3, jnp.bfloat16: 3e-2}  # TF32/bf16 tensor cores, relative to max


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check_attention():
    rows = []
    for B, S, T, H, D, masked, dtype in ATTENTION_CASES:
        kq, kk, kv, kg, km = jax.random.split(jax.random.key(S + T + D), 5)
        q = jax.random.normal(kq, (B, S, H, D), dtype)
        k = jax.random.normal(kk, (B, T, H, D), dtype)
        v = jax.random.normal(kv, (B, T, H, D), dtype)
        g = jax.random.normal(kg, (B, S, H, D), dtype)
        mask = jax.random.uniform(km, (B, T)) < 0.7 if masked else None
        if masked and B > 1:
            mask = mask.at[0].set(False)  # a batch row with no visible key: output 0

        def vjp(fn):
            out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
            return (out, *pull(g))

        got = jax.jit(lambda: vjp(flash_attention))()
        ref = jax.jit(lambda: vjp(attention_reference))()
        errs = {name: _rel(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
        ok = all(e <= TOLERANCE[dtype] for e in errs.values())
        if masked and B > 1:
            ok = ok and float(jnp.max(jnp.abs(got[0][0].astype(jnp.float32)))) == 0.0
        rows.append(dict(B=B, S=S, T=T, H=H, D=D, masked=masked, dtype=jnp.dtype(dtype).name,
                         ok=bool(ok), **errs))
        print(f"attention {rows[-1]}", flush=True)
    return rows


def check_solver():
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        for n, k in ((1 << 20, 1), (3 * 1000 + 7, 3), (1 << 22, 4)):
            keys = jax.random.split(jax.random.key(n + k), 2)
            x = jax.random.normal(keys[0], (n,), dtype)
            ds = jax.random.normal(keys[1], (k, n), dtype)
            b = jnp.linspace(-1.0, 2.0, k)
            got = jax.jit(solver_step)(0.7, x, b, ds)
            ref = solver_step_reference(0.7, x, b, ds)
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32))))
            tol = 1e-5 if dtype == jnp.float32 else 2e-2
            rows.append(dict(n=n, k=k, dtype=jnp.dtype(dtype).name, max_abs=err,
                             ok=bool(err <= tol)))
            print(f"solver_step {rows[-1]}", flush=True)
    return rows


def sweep_blocks(repeats):
    """fwd+bwd ms of Pallas attention per (block_q, block_k) vs cuDNN, bf16, S = 4096."""
    rows = []
    for D in (64, 128):
        shape = (4, 4096, 8, D)
        q, k, v = (jax.random.normal(key, shape, jnp.bfloat16)
                   for key in jax.random.split(jax.random.key(D), 3))
        contenders = {}

        def fwdbwd(fn):
            step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                                    argnums=(0, 1, 2)))
            return lambda: jax.block_until_ready(step(q, k, v))

        contenders["cudnn"] = fwdbwd(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, implementation="cudnn"))
        for bq in (64, 128):
            for bk in (32, 64, 128):
                fn = fwdbwd(lambda q, k, v, bq=bq, bk=bk: flash_attention(
                    q, k, v, block_q=bq, block_k=bk))
                try:
                    fn()
                    contenders[f"pallas_{bq}x{bk}"] = fn
                except Exception as err:  # noqa: BLE001 -- reported, not raised
                    rows.append(dict(D=D, impl=f"pallas_{bq}x{bk}",
                                     error=str(err).splitlines()[0][:160]))
        contenders["cudnn"]()
        times = _timing.interleaved(contenders, repeats=repeats, warmup=2, pause=0.01)
        base = statistics.median(times["cudnn"])
        for name, ts in times.items():
            ms = 1e3 * statistics.median(ts)
            rows.append(dict(D=D, impl=name, fwdbwd_ms=ms, vs_cudnn=base * 1e3 / ms))
            print(f"sweep {rows[-1]}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    if jax.default_backend() == "cpu":
        sys.exit("gpu_check.py: needs a GPU or TPU backend; the CPU runs interpret mode "
                 "(use the unit tests)")
    device = jax.devices()[0].device_kind
    print(f"device: {device}, jax {jax.__version__}", flush=True)
    result = dict(device=device, jax=jax.__version__, attention=check_attention(),
                  solver_step=check_solver())
    result["block_sweep"] = sweep_blocks(args.repeats)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    bad = [r for r in result["attention"] + result["solver_step"] if not r["ok"]]
    print(f"correctness: {len(bad)} failing case(s)")


if __name__ == "__main__":
    main()
