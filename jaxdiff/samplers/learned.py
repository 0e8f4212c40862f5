"""A learned multistep solver: the per-step table (a_i, c_i0, ..., c_i,k-1) of
`jaxdiff.core.solver_fit`, applied in the shared loop with one model call per step:

    x_{i+1} = a_i x_i + sum_j c_ij D_{i-j}    (D of the last k steps, most recent first).

The table and the grid come from a solver file (`jaxdiff.core.solver_fit.load_solver`);
`jaxdiff.sample(..., sampler="learned", sampler_file=PATH)` reads it and passes both as data
(one compiled program per shapes). Called directly, pass `coefficients` with at least
`num_steps` rows (rows past them are ignored, so a table padded to the grid's capacity works).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff.samplers.base import lift, run
from jaxdiff.samplers.multistep import combine, push


def learned(denoiser, x, sigmas, *, coefficients, num_steps=None, trajectory=False):
    """Applies a learned solver table `coefficients` (rows (a, c_0, ..., c_{k-1})) on `sigmas`."""
    coefficients = jnp.asarray(coefficients)
    if coefficients.ndim != 2 or coefficients.shape[1] < 2:
        raise ValueError(f"coefficients has shape {coefficients.shape}; expected (steps, k + 1)")
    if coefficients.shape[0] < sigmas.shape[0] - 1 and num_steps is None:
        raise ValueError(f"coefficients has {coefficients.shape[0]} rows but sigmas has "
                         f"{sigmas.shape[0] - 1} steps")
    k = coefficients.shape[1] - 1
    denoiser, state = lift(denoiser)

    def step(i, x, hist, state):
        D, state = denoiser(x, sigmas[i], state)
        hist = push(hist, D)
        row = coefficients[i]
        return combine(row[0], row[1:], x, hist), hist, state

    hist = jnp.zeros((k,) + x.shape, x.dtype)
    return run(step, x, sigmas, hist, state, num_steps=num_steps, trajectory=trajectory)


SAMPLERS = {"learned": learned}
