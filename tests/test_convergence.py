"""Every ODE sampler converges to the exact probability-flow solution for Gaussian data, at its
theoretical order: the fitted log-log slope of error vs steps.

Set-up: x0 ~ N(0.3, 0.6^2) in 4 dims, EDM process (sigma 80 -> 0.002), Karras grid (rho = 7)
ending at sigma_min (no jump to 0, whose error does not shrink with the step count), float64,
16/32/64 steps -- or 64/128/256 where a method is still pre-asymptotic at 16..64 (DEIS-3,
LMS-3/4, 3M), or a uniform-lambda grid where the Karras grid makes a method's leading error
term nearly cancel (DPM-Solver-3: slope 4.6 there).
Tolerance: the slope must lie in [p - 0.35, p + 0.8]. Below: a real order deficit (a first-order
slip in a second-order method shows as ~1.0 against 2). Above: at these step counts higher-order
error terms still cancel in part, so measured slopes can exceed p; an order-p method cannot look
like order p + 1 over a doubling range of 16..64 steps with this slack.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.core import analytic, schedules
from jaxdiff.core.process import EDM
from jaxdiff.samplers import SAMPLERS
from tests._gauss import GAUSS, MU, STD

COARSE, FINE = (16, 32, 64), (64, 128, 256)

# (sampler, options, order, steps, schedule)
# euler and dpm_solver_1 are not listed: they are DDIM step for step (bit for bit,
# test_samplers_single.py::test_first_order_methods_are_ddim), so DDIM's order is theirs
CASES = [
    ("ddim", {}, 1, COARSE, "karras"),
    ("heun", {}, 2, COARSE, "karras"),
    ("dpm_solver_2", {}, 2, COARSE, "karras"),
    ("dpm_solver_3", {}, 3, COARSE, "logsnr"),
    ("dpmpp_2s", {}, 2, COARSE, "karras"),
    # diffusers' singlestep scheme: its final first-order steps (lower_order_final) make
    # order=3 second order on a grid ending above 0, so order 2 is what is checked
    ("dpmpp_singlestep", {"order": 2}, 2, COARSE, "karras"),
    ("dpmpp_2m", {}, 2, COARSE, "karras"),
    # dpmpp_3m's default is the reference (DPM-Solver, diffusers, k-diffusion) update, whose
    # phi_3 weight is half the Taylor one: formally second order. exact_phi3=True is third.
    ("dpmpp_3m", {}, 2, FINE, "karras"),
    ("dpmpp_3m", {"exact_phi3": True}, 3, FINE, "karras"),
    # UniPC without lower_order_final, whose first-order last step caps every order at 2 on a
    # grid ending above 0; UniC raises the predictor's order by one
    ("unipc", {"order": 1, "lower_order_final": False}, 2, COARSE, "karras"),
    ("unipc", {"order": 2, "lower_order_final": False}, 3, COARSE, "karras"),
    ("unipc", {"order": 3, "lower_order_final": False}, 4, COARSE, "karras"),
    ("unipc", {"order": 2, "variant": "bh1", "lower_order_final": False}, 3, COARSE, "karras"),
    ("unipc", {"order": 2, "corrector": False, "lower_order_final": False}, 2, COARSE, "karras"),
    ("unipc", {"order": 3, "corrector": False, "lower_order_final": False}, 3, COARSE, "karras"),
    ("deis", {"order": 2}, 2, COARSE, "karras"),
    ("deis", {"order": 3}, 3, FINE, "karras"),
    ("lms", {"order": 2}, 2, COARSE, "karras"),
    ("lms", {"order": 3}, 3, FINE, "karras"),
    ("lms", {"order": 4}, 4, FINE, "karras"),
    # iPNDM's fixed uniform-step weights are second order on the non-uniform Karras grid
    # (test_samplers_multistep: they equal LMS's exact weights on a uniform grid)
    ("ipndm", {}, 2, COARSE, "karras"),
]


def fitted_order(name, options, steps=COARSE, schedule="karras"):
    """Slope of log error vs log steps; one compiled program serves every step count."""
    fn, D = SAMPLERS[name], GAUSS
    errors = []
    with jax.enable_x64(True):
        x_T = 80.0 * jax.random.normal(jax.random.key(0), (3, 4), jnp.float64)
        run = jax.jit(lambda x, s, n: fn(D, x, s, num_steps=n, **options))
        for n in steps:
            grid = schedules.get(schedule)(EDM(), n, final_zero=False)
            x = run(x_T, jnp.asarray(schedules.pad(grid, max(steps))), n)
            exact = analytic.gaussian_ode(x_T, grid[0], grid[-1], MU, STD)
            errors.append(float(jnp.sqrt(jnp.mean((x - exact) ** 2))))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return slope, errors


@pytest.mark.parametrize("name,options,order,steps,schedule", CASES,
                         ids=[f"{c[0]}{c[1] or ''}" for c in CASES])
def test_order(name, options, order, steps, schedule):
    slope, errors = fitted_order(name, options, steps, schedule)
    assert order - 0.35 <= slope <= order + 0.8, f"slope {slope:.2f}, errors {errors}"
