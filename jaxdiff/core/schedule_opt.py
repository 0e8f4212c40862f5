"""Schedules optimised for a given denoiser, sampler and step count.

At a handful of steps the placement of the noise levels matters as much as the solver
(Align Your Steps, Sabour et al. 2024; GITS, Chen et al. 2024; the "optimised schedule" line of
LITERATURE.md). `optimize_schedule` fits the grid directly: it minimises the mean squared
distance between the sampler's output and a tight reference solution of the probability-flow
ODE from the same starting points, by gradient descent through the sampler (its loop is a
`lax.scan` when the step count is static, so it differentiates in reverse mode).

The grid keeps its two ends -- the first level (where the prior is matched) and the last
positive level, then 0 -- and parametrises the n - 1 gaps in log sigma by a softmax, so every
iterate is a valid decreasing grid. Fit on calibration draws, evaluate on fresh ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def grid_from_logits(logits, sigma_max, sigma_end, final_zero=True, free_end=False):
    """Decreasing grid from sigma_max whose log-gaps are softmax(logits) shares of
    log(sigma_max / sigma_end). With `free_end` the last share is the distance from the last
    level down to the floor sigma_end, so that level moves too; otherwise it lands on sigma_end."""
    gaps = jax.nn.softmax(logits) * (jnp.log(sigma_max) - jnp.log(sigma_end))
    drops = jnp.cumsum(gaps)[:-1] if free_end else jnp.cumsum(gaps)
    levels = jnp.exp(jnp.log(sigma_max) - jnp.concatenate([jnp.zeros(1), drops]))
    if not free_end:
        levels = levels.at[-1].set(sigma_end)  # exact end, free of round-off
    return jnp.append(levels, 0.0) if final_zero else levels


def logits_from_grid(levels, sigma_floor=None):
    """Inverse of `grid_from_logits` for decreasing positive levels (an initialisation)."""
    levels = np.asarray(levels, np.float64)
    if sigma_floor is not None:
        levels = np.append(levels, sigma_floor)
    return jnp.asarray(np.log(np.maximum(-np.diff(np.log(levels)), 1e-12)))


def optimize_schedule(
    sampler,
    denoiser,
    x_init,
    x_ref,
    init_grid,
    *,
    sigma_floor=None,
    iters=300,
    learning_rate=0.05,
    sampler_options=None,
):
    """Fits the levels of `init_grid` (n + 1 levels ending at 0, or n + 1 positive levels) so
    that `sampler(denoiser, x_init, grid)` lands on `x_ref`.

    x_init: calibration starting states at init_grid[0] (VE view); x_ref: their reference
    solutions at init_grid[-1]. The first level stays; the last positive level stays too unless
    the grid ends at 0 and `sigma_floor` is given (the smallest level the model is valid at).
    Returns (grid as float64 numpy, loss history)."""
    init_grid = np.asarray(init_grid, np.float64)
    final_zero = bool(init_grid[-1] == 0)
    levels = init_grid[:-1] if final_zero else init_grid
    free_end = final_zero and sigma_floor is not None
    if len(levels) < (2 if free_end else 3):
        raise ValueError(f"a grid of {len(levels)} positive levels has no level to fit")
    if free_end and not 0 < sigma_floor < levels[-1] * (1 + 1e-9):
        raise ValueError(f"sigma_floor={sigma_floor!r} must be in (0, {levels[-1]:g}]")
    sigma_max = float(levels[0])
    sigma_end = float(sigma_floor) if free_end else float(levels[-1])
    options = dict(sampler_options or {})

    def loss_fn(logits):
        grid = grid_from_logits(logits, sigma_max, sigma_end, final_zero, free_end)
        grid = grid.astype(x_init.dtype)
        x = sampler(denoiser, x_init, grid, **options)
        return jnp.mean(jnp.square(x - x_ref))

    opt = optax.adam(learning_rate)

    @jax.jit
    def update(logits, state):
        loss, grad = jax.value_and_grad(loss_fn)(logits)
        grad = jnp.nan_to_num(grad)  # a rare overflow in one coefficient must not poison Adam
        updates, state = opt.update(grad, state)
        return optax.apply_updates(logits, updates), state, loss

    logits = logits_from_grid(levels, sigma_end if free_end else None).astype(x_init.dtype)
    state = opt.init(logits)
    best, best_loss, history = logits, np.inf, []
    for _ in range(iters):
        new, state, loss = update(logits, state)
        loss = float(loss)
        history.append(loss)
        if loss < best_loss:  # loss belongs to `logits`, the iterate before the update
            best, best_loss = logits, loss
        logits = new
    grid = grid_from_logits(best, sigma_max, sigma_end, final_zero, free_end)
    return np.asarray(grid, np.float64), history
