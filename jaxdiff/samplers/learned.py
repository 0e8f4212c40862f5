"""A learned multistep solver: the per-step table (a_i, c_i0, ..., c_i,k-1) of
`jaxdiff.core.solver_fit`, applied in the shared loop with one model call per step:

    x_{i+1} = a_i x_i + sum_j c_ij D_{i-j}    (D of the last k steps, most recent first),

optionally with its corrector table (rows (a'_i, c'_i, c'_i0, ...)): as soon as D_i = D(x_i) is
known, x_i <- a'_i x_{i-1} + c'_i D_i + sum_j c'_ij D_{i-1-j} (UniC-style: no extra call, D_i
kept at the predicted point; row 0 unused).

The tables and the grid come from a solver file (`jaxdiff.core.solver_fit.load_solver`);
`jaxdiff.sample(..., sampler="learned", sampler_file=PATH)` reads it and passes them as data
(one compiled program per shapes). Called directly, pass `coefficients` (and `corrector`) with
at least `num_steps` rows (rows past them are ignored, so tables padded to the grid's capacity
work).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff.samplers.base import lift, run
from jaxdiff.samplers.multistep import combine, push


def learned(denoiser, x, sigmas, *, coefficients, corrector=None, num_steps=None,
            trajectory=False):
    """Applies a learned solver table `coefficients` (rows (a, c_0, ..., c_{k-1})) on `sigmas`,
    with the `corrector` table (rows (a', c'_new, c'_0, ..., c'_{k-1})) when given."""
    coefficients = jnp.asarray(coefficients)
    if coefficients.ndim != 2 or coefficients.shape[1] < 2:
        raise ValueError(f"coefficients has shape {coefficients.shape}; expected (steps, k + 1)")
    if coefficients.shape[0] < sigmas.shape[0] - 1 and num_steps is None:
        raise ValueError(f"coefficients has {coefficients.shape[0]} rows but sigmas has "
                         f"{sigmas.shape[0] - 1} steps")
    k = coefficients.shape[1] - 1
    if corrector is not None:
        corrector = jnp.asarray(corrector)
        if corrector.shape != (coefficients.shape[0], k + 2):
            raise ValueError(f"corrector has shape {corrector.shape}; expected "
                             f"({coefficients.shape[0]}, {k + 2}) to go with coefficients")
    denoiser, state = lift(denoiser)

    def step(i, x, carry, state):
        hist, x_prev = carry
        D, state = denoiser(x, sigmas[i], state)
        if corrector is not None:
            crow = corrector[i]
            xc = combine(crow[0], crow[2:], x_prev, hist) + jnp.asarray(crow[1], x.dtype) * D
            x = jnp.where(i > 0, xc, x)
        hist = push(hist, D)
        row = coefficients[i]
        return combine(row[0], row[1:], x, hist), (hist, x), state

    hist = jnp.zeros((k,) + x.shape, x.dtype)
    return run(step, x, sigmas, (hist, x), state, num_steps=num_steps, trajectory=trajectory)


SAMPLERS = {"learned": learned}
