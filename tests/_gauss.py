"""Toy problems with closed forms, shared by the sampler tests: Gaussian data N(MU, STD^2) with
its ideal denoiser, a three-mode 2-D Gaussian mixture, Karras grids, and a denoiser wrapper that
counts the model calls that actually run."""

import jax
import jax.numpy as jnp

from jaxdiff.core import analytic, schedules
from jaxdiff.core.process import EDM

MU, STD = 0.3, 0.6
GAUSS = analytic.gaussian_denoiser(MU, STD)
# three overlapping modes: a nonlinear field, smooth enough for asymptotic orders
GMM = analytic.gmm_denoiser(
    jnp.array([[0.5, -0.3], [-0.6, 0.4], [0.1, 0.9]]), jnp.array([0.2, 0.3, 0.25]),
    jnp.array([0.3, 0.3, 0.4]),
)


def karras_grid(n, final_zero=True, capacity=None):
    """EDM's Karras grid of n steps in float32, padded to `capacity` levels + 1 if given."""
    grid = schedules.karras(EDM(), n, final_zero=final_zero)
    return jnp.asarray(grid if capacity is None else schedules.pad(grid, capacity), jnp.float32)


def counting(D):
    """(D plus a host-side counter, the list it appends to): one entry per model call that
    actually executes (a call skipped by a lax.cond adds none)."""
    calls = []

    def counted(x, s):
        jax.debug.callback(lambda: calls.append(1))
        return D(x, s)

    return counted, calls
