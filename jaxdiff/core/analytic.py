"""Closed-form denoisers and exact solutions, for tests, benchmarks and notebooks.

For data x0 ~ N(mean, std^2 I) the VE-view marginal at noise level sigma is N(mean, (std^2 +
sigma^2) I), the ideal denoiser is E[x0 | x] = mean + std^2 / (std^2 + sigma^2) (x - mean), and
the probability-flow ODE dx/dsigma = (x - D)/sigma has the exact solution
x(sigma') = mean + (x(sigma) - mean) sqrt((std^2 + sigma'^2) / (std^2 + sigma^2)).
A Gaussian mixture gives an exact multimodal denoiser: the responsibility-weighted mean of the
per-component denoisers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdiff.core.denoiser import expand_like


def gaussian_denoiser(mean, std):
    """Ideal denoiser for x0 ~ N(mean, std^2 I); mean broadcasts against x, sigma is a scalar
    or one level per sample."""

    def D(x, sigma, *args):
        var, s2 = jnp.square(std), expand_like(jnp.square(jnp.asarray(sigma, x.dtype)), x)
        return mean + var / (var + s2) * (x - mean)

    return D


def gaussian_ode(x, sigma_from, sigma_to, mean, std):
    """Exact probability-flow ODE map from noise level sigma_from to sigma_to (Gaussian data)."""
    var = jnp.square(std)
    return mean + (x - mean) * jnp.sqrt((var + sigma_to**2) / (var + sigma_from**2))


def gaussian_log_density(x, sigma, mean, std):
    """log p_sigma(x) of the VE-view marginal N(mean, (std^2 + sigma^2) I), summed per sample."""
    var = jnp.square(std) + jnp.square(sigma)
    quad = jnp.square(x - mean) / var + jnp.log(2 * math.pi * var)
    return -0.5 * jnp.sum(quad, axis=tuple(range(1, x.ndim)))


def gmm_denoiser(means, stds, weights):
    """Ideal denoiser for a mixture of isotropic Gaussians; means (K, d), stds (K,), weights (K,).

    x has shape (B, d); sigma is a scalar or (B,)."""
    means, stds = jnp.asarray(means), jnp.asarray(stds)
    log_w = jnp.log(jnp.asarray(weights) / jnp.sum(jnp.asarray(weights)))

    def D(x, sigma, *args):
        sigma = jnp.asarray(sigma, x.dtype).reshape(-1, 1)  # (B or 1, 1)
        var = jnp.square(stds)[None, :] + jnp.square(sigma)  # (B, K)
        diff = x[:, None, :] - means[None]  # (B, K, d)
        d = x.shape[-1]
        logp = log_w - 0.5 * (jnp.sum(diff**2, -1) / var + d * jnp.log(var))  # (B, K)
        r = jax.nn.softmax(logp, axis=-1)
        per = means[None] + (jnp.square(stds)[None, :] / var)[..., None] * diff  # (B, K, d)
        return jnp.einsum("bk,bkd->bd", r, per)

    return D
