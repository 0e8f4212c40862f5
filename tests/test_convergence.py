"""Every ODE sampler converges to the exact probability-flow solution for Gaussian data, at its
theoretical order: the fitted log-log slope of error vs steps.

Set-up: x0 ~ N(0.3, 0.6^2) in 4 dims, EDM process (sigma 80 -> 0.002), Karras grid (rho = 7)
ending at sigma_min (no jump to 0, whose error does not shrink with the step count), float64.
Tolerance: the slope must lie in [p - 0.35, p + 0.8]. Below: a real order deficit (a first-order
slip in a second-order method shows as ~1.0 against 2). Above: at these step counts higher-order
error terms still cancel in part, so measured slopes can exceed p; an order-p method cannot look
like order p + 1 over a doubling range of 16..64 steps with this slack.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import analytic, schedules
from jaxdiff.process import EDM
from jaxdiff.samplers import SAMPLERS

MU, STD = 0.3, 0.6
STEPS = (16, 32, 64)

# (sampler, options, order)
CASES = [
    ("ddim", {}, 1),
]


def fitted_order(name, options, steps=STEPS):
    fn = SAMPLERS[name]
    D = analytic.gaussian_denoiser(MU, STD)
    errors = []
    with jax.enable_x64(True):
        x_T = 80.0 * jax.random.normal(jax.random.key(0), (3, 4), jnp.float64)
        for n in steps:
            sig = jnp.asarray(schedules.karras(EDM(), n, final_zero=False))
            x = jax.jit(lambda x, s: fn(D, x, s, **options))(x_T, sig)
            exact = analytic.gaussian_ode(x_T, sig[0], sig[-1], MU, STD)
            errors.append(float(jnp.sqrt(jnp.mean((x - exact) ** 2))))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return slope, errors


@pytest.mark.parametrize("name,options,order", CASES, ids=[f"{c[0]}{c[1] or ''}" for c in CASES])
def test_order(name, options, order):
    slope, errors = fitted_order(name, options)
    assert order - 0.35 <= slope <= order + 0.8, f"slope {slope:.2f}, errors {errors}"
