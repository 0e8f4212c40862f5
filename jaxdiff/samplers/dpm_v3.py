"""DPM-Solver-v3's multistep update (Zheng et al. 2023) on tables from
`jaxdiff.core.dpmv3_stats.v3_tables` (empirical model statistics + grid): one model call per
step, x' = E x + C + sum_j W_j N_{i-j} with N = D - L1 x, the history of N in the loop carry.

The tables depend on the grid, so build them eagerly for the grid you pass:
`dpm_v3(D, x, sigmas, tables=v3_tables(ems(D, x0, levels, key), sigmas, order=2))`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff.samplers.base import lift, run
from jaxdiff.samplers.multistep import push


def dpm_v3(denoiser, x, sigmas, *, tables, num_steps=None, trajectory=False):
    """DPM-Solver-v3 multistep with precomputed per-step tables (module docstring)."""
    E, C, L1, W = (jnp.asarray(tables[k], x.dtype) for k in ("E", "C", "L1", "W"))
    denoiser, state = lift(denoiser)

    def step(i, x, hist, state):
        D, state = denoiser(x, sigmas[i], state)
        hist = push(hist, D - L1[i] * x)
        x = E[i] * x + C[i] + jnp.sum(W[i][:, None] * hist, axis=0)  # W: (k, *data shape)
        return x, hist, state

    hist = jnp.zeros((W.shape[1],) + x.shape, x.dtype)
    return run(step, x, sigmas, hist, state, num_steps=num_steps, trajectory=trajectory)


SAMPLERS = {"dpm_v3": dpm_v3}
