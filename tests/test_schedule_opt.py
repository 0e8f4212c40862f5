"""Schedule fitting: valid grids, fixed ends, and lower error on held-out draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.core import analytic, schedules
from jaxdiff.core.process import EDM
from jaxdiff.core.schedule_opt import grid_from_logits, logits_from_grid, optimize_schedule
from jaxdiff.samplers import SAMPLERS

MEANS = np.array([[-1.0, 0.5], [1.0, -0.5], [0.2, 1.0]])


def test_logits_round_trip():
    grid = schedules.karras(EDM(), 6)
    levels = grid[:-1]
    back = grid_from_logits(logits_from_grid(levels), levels[0], levels[-1])
    np.testing.assert_allclose(back, grid, rtol=1e-5)
    free = grid_from_logits(logits_from_grid(levels, 1e-3), levels[0], 1e-3, free_end=True)
    np.testing.assert_allclose(free, grid, rtol=1e-5)


def test_fitted_schedule_beats_its_start_on_fresh_draws():
    D = analytic.gmm_denoiser(MEANS, np.full(3, 0.15), np.ones(3))
    with jax.enable_x64(True):
        def draws(seed):
            x = 80.0 * jax.random.normal(jax.random.key(seed), (128, 2), jnp.float64)
            ref = SAMPLERS["ode"](D, x, jnp.array([80.0, 0.0]), rtol=1e-9, atol=1e-9)
            return x, ref

        (x_cal, r_cal), (x_test, r_test) = draws(0), draws(1)
        init = schedules.karras(EDM(), 4)
        grid, history = optimize_schedule(SAMPLERS["ddim"], D, x_cal, r_cal, init, iters=150,
                                          sigma_floor=0.002)
        err = lambda g: float(jnp.sqrt(jnp.mean((SAMPLERS["ddim"](D, x_test, jnp.asarray(g))
                                                  - r_test) ** 2)))
        assert grid[0] == pytest.approx(80.0) and grid[-1] == 0.0 and len(grid) == 5
        assert np.all(np.diff(grid) < 0) and grid[-2] >= 0.002 * (1 - 1e-9)
        assert min(history) < 0.7 * history[0]
        assert err(grid) < 0.8 * err(init), (err(grid), err(init))


def test_bad_floor():
    D = analytic.gaussian_denoiser(0.0, 1.0)
    x = jnp.ones((2, 2))
    with pytest.raises(ValueError, match="sigma_floor=5.0 must be in"):
        optimize_schedule(SAMPLERS["ddim"], D, x, x, schedules.karras(EDM(), 4), sigma_floor=5.0)
