"""Closed-form denoisers and exact solutions, for tests, benchmarks and notebooks.

For data x0 ~ N(mean, std^2 I) the VE-view marginal at noise level sigma is N(mean, (std^2 +
sigma^2) I), the ideal denoiser is E[x0 | x] = mean + std^2 / (std^2 + sigma^2) (x - mean), and
the probability-flow ODE dx/dsigma = (x - D)/sigma has the exact solution
x(sigma') = mean + (x(sigma) - mean) sqrt((std^2 + sigma'^2) / (std^2 + sigma^2)).
A Gaussian mixture gives an exact multimodal denoiser: the responsibility-weighted mean of the
per-component denoisers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core.denoiser import expand_like
from jaxdiff.core.process import short_repr


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


# Exact posteriors of a Gaussian-mixture prior under a linear Gaussian measurement
# y = A x0 + sigma_y n, n ~ N(0, I_m): the posterior is again a mixture, with full covariances
# (Bishop 2006, "Pattern Recognition and Machine Learning", Sec. 2.3.3 per component). With
# S_k = s_k^2 A A^T + sigma_y^2 I and the gain G_k = s_k^2 A^T S_k^{-1},
#   mu_k' = mu_k + G_k (y - A mu_k),   w_k' propto w_k N(y; A mu_k, S_k),
#   Sigma_k' = s_k^2 (I - G_k A)(I - G_k A)^T + sigma_y^2 G_k G_k^T.
# Only S_k is inverted, so sigma_y = 0 works whenever A A^T is invertible. Sigma_k' is the Joseph
# form of s_k^2 (I - G_k A): equal in exact arithmetic, but PSD by construction, so rounding in
# G_k A ~ I (sigma_y = 0) leaves a variance of order eps^2, not eps, along the measured directions.


def _working(x):
    return jnp.asarray(x, dtype=jnp.result_type(float))


def _concrete(x):
    """x as a NumPy array, or None when it is traced (its value checks are then skipped)."""
    try:
        return np.asarray(x, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_weights(weights, k):
    w = _working(weights)
    if w.shape != (k,):
        raise ValueError(f"weights must have shape ({k},) for {k} components, got {w.shape}")
    wc = _concrete(weights)
    if wc is not None and not (np.all(np.isfinite(wc)) and np.all(wc >= 0) and wc.sum() > 0):
        raise ValueError(f"weights must be finite, >= 0 and sum to > 0, got {short_repr(wc)}")
    return w


def _check_prior(means, stds, weights):
    """Validate an isotropic mixture; returns means (K, d), variances (K,), log weights (K,)."""
    mu, s = _working(means), _working(stds)
    if mu.ndim != 2 or mu.shape[0] < 1 or mu.shape[1] < 1:
        raise ValueError(f"means must be a (K, d) array with K, d >= 1, got shape {mu.shape}")
    k = mu.shape[0]
    if s.shape != (k,):
        raise ValueError(f"stds must have shape ({k},) for {k} components, got {s.shape}")
    sc, mc = _concrete(stds), _concrete(means)
    if sc is not None and not (np.all(np.isfinite(sc)) and np.all(sc > 0)):
        raise ValueError(f"stds must be finite and > 0, got {short_repr(sc)}")
    if mc is not None and not np.all(np.isfinite(mc)):
        raise ValueError(f"means must be finite, got {short_repr(mc)}")
    w = _check_weights(weights, k)
    return mu, jnp.square(s), jnp.log(w / jnp.sum(w))


def _check_measurement(A, y, sigma_y, d, noise_name="sigma_y"):
    """Validate A (m, d), y (m,) and a scalar noise level >= 0 (A of full row rank if 0)."""
    A_, y_, sy = _working(A), _working(y), _working(sigma_y)
    if A_.ndim != 2 or A_.shape[0] < 1 or A_.shape[1] != d:
        raise ValueError(f"A must be an (m, d) matrix with d = {d} columns, got shape {A_.shape}")
    if y_.shape != (A_.shape[0],):
        raise ValueError(f"y must have shape ({A_.shape[0]},) (the rows of A), got {y_.shape}")
    if sy.ndim != 0:
        raise ValueError(f"{noise_name} must be a scalar, got shape {sy.shape}")
    Ac, yc, sc = _concrete(A), _concrete(y), _concrete(sigma_y)
    if Ac is not None and not np.all(np.isfinite(Ac)):
        raise ValueError(f"A must be finite, got {short_repr(Ac)}")
    if yc is not None and not np.all(np.isfinite(yc)):
        raise ValueError(f"y must be finite, got {short_repr(yc)}")
    if sc is not None and not (np.isfinite(sc) and sc >= 0):
        raise ValueError(f"{noise_name} must be finite and >= 0, got {float(sc)!r}")
    if sc is not None and sc == 0 and Ac is not None and np.linalg.matrix_rank(Ac) < Ac.shape[0]:
        raise ValueError(f"{noise_name} = 0 needs A A^T invertible (full row rank), "
                         f"got rank {np.linalg.matrix_rank(Ac)} < m = {Ac.shape[0]}")
    return A_, y_, sy


def _condition_component(mu, var, A, y, sigma_y):
    """log N(y; A mu, S), posterior mean and covariance of one component N(mu, var I)."""
    m, d = A.shape
    L = jnp.linalg.cholesky(var * (A @ A.T) + jnp.square(sigma_y) * jnp.eye(m, dtype=A.dtype))
    r = y - A @ mu
    z = jax.scipy.linalg.solve_triangular(L, r, lower=True)
    log_lik = -0.5 * (z @ z + m * math.log(2 * math.pi)) - jnp.sum(jnp.log(jnp.diag(L)))
    G = var * jax.scipy.linalg.cho_solve((L, True), A).T  # (d, m) = var A^T S^{-1}
    I_GA = jnp.eye(d, dtype=A.dtype) - G @ A
    cov = var * (I_GA @ I_GA.T) + jnp.square(sigma_y) * (G @ G.T)  # Joseph form, see above
    return log_lik, mu + G @ r, cov


# one compiled program per shape: eagerly, each of the ~30 small ops would compile on its own
_condition_all = jax.jit(jax.vmap(_condition_component, in_axes=(0, 0, None, None, None)))


def _condition(means, stds, weights, A, y, sigma_y, noise_name="sigma_y"):
    """(log w_k, log N(y; A mu_k, S_k), mu_k', Sigma_k') for all components."""
    mu, var, log_w = _check_prior(means, stds, weights)
    A, y, sigma_y = _check_measurement(A, y, sigma_y, mu.shape[1], noise_name)
    return (log_w, *_condition_all(mu, var, A, y, sigma_y))


def gmm_posterior(means, stds, weights, A, y, sigma_y):
    """Exact posterior of the isotropic mixture sum_k w_k N(mu_k, s_k^2 I) given one measurement
    y = A x0 + sigma_y n: returns (weights' (K,), means' (K, d), covs' (K, d, d)).

    means (K, d), stds (K,), weights (K,) (normalised here), A (m, d), y (m,), sigma_y >= 0
    (0 needs A of full row rank). The posterior weights sum to 1."""
    log_w, log_lik, mu_post, covs = _condition(means, stds, weights, A, y, sigma_y)
    return jax.nn.softmax(log_w + log_lik), mu_post, covs


def gmm_log_evidence(means, stds, weights, A, y, sigma_y):
    """log p(y) = logsumexp_k(log w_k + log N(y; A mu_k, s_k^2 A A^T + sigma_y^2 I)), a scalar."""
    log_w, log_lik, _, _ = _condition(means, stds, weights, A, y, sigma_y)
    return jax.nn.logsumexp(log_w + log_lik)


def gmm_tilt(means, stds, weights, center, tau):
    """The reward-tilted target p(x) exp(-|x - center|^2 / (2 tau^2)) / Z of an isotropic mixture,
    as (weights', means', covs'): the posterior for A = I, y = center, sigma_y = tau (tau >= 0)."""
    d = _working(means).shape[-1]
    c = _working(center)
    if c.shape != (d,):
        raise ValueError(f"center must have shape ({d},) like one mean, got {c.shape}")
    eye = jnp.eye(d, dtype=c.dtype)
    log_w, log_lik, mu_post, covs = _condition(means, stds, weights, eye, c, tau, "tau")
    return jax.nn.softmax(log_w + log_lik), mu_post, covs


def isotropic_covs(stds, d):
    """Full covariances (K, d, d) = s_k^2 I_d of an isotropic mixture, for gmm_sample and
    gmm_log_density."""
    s = _working(stds)
    if s.ndim != 1:
        raise ValueError(f"stds must be a (K,) array, got shape {s.shape}")
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"d must be a positive integer, got {d!r}")
    sc = _concrete(stds)
    if sc is not None and not (np.all(np.isfinite(sc)) and np.all(sc >= 0)):
        raise ValueError(f"stds must be finite and >= 0, got {short_repr(sc)}")
    return jnp.square(s)[:, None, None] * jnp.eye(int(d), dtype=s.dtype)


def _check_full_mixture(weights, means, covs):
    """Validate a full-covariance mixture; returns log weights (K,), means (K, d), covs."""
    mu, C = _working(means), _working(covs)
    if mu.ndim != 2 or mu.shape[0] < 1 or mu.shape[1] < 1:
        raise ValueError(f"means must be a (K, d) array with K, d >= 1, got shape {mu.shape}")
    k, d = mu.shape
    if C.shape != (k, d, d):
        raise ValueError(f"covs must have shape ({k}, {d}, {d}) to match means, got {C.shape}")
    Cc = _concrete(covs)
    if Cc is not None and not np.all(np.isfinite(Cc)):
        raise ValueError(f"covs must be finite, got {short_repr(Cc)}")
    w = _check_weights(weights, k)
    # symmetrise: a covariance from rounding-prone algebra may be off by an ulp across the diagonal
    return jnp.log(w / jnp.sum(w)), mu, 0.5 * (C + jnp.swapaxes(C, -1, -2))


def _psd_factor(C):
    """F with F F^T = C for a symmetric PSD C (singular allowed, unlike Cholesky).

    Eigenvalues below eigh's own rounding error (d * eps * the largest) are zeroed: a true zero
    variance (sigma_y = 0 posteriors) then stays exactly zero instead of sqrt(eps)."""
    lam, V = jnp.linalg.eigh(C)
    tol = C.shape[-1] * jnp.finfo(C.dtype).eps * jnp.max(jnp.abs(lam), axis=-1, keepdims=True)
    return V * jnp.sqrt(jnp.where(lam > tol, lam, 0.0))[..., None, :]


def gmm_sample(key, weights, means, covs, n):
    """n exact draws (n, d) from the mixture sum_k w_k N(mu_k, Sigma_k); covs (K, d, d) may be
    singular (positive semi-definite); build isotropic ones with `isotropic_covs`."""
    log_w, mu, C = _check_full_mixture(weights, means, covs)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return _mixture_sample(key, log_w, mu, C, int(n))


@functools.partial(jax.jit, static_argnums=4)
def _mixture_sample(key, log_w, mu, C, n):
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.categorical(k_comp, log_w, shape=(n,))
    z = jax.random.normal(k_noise, (n, mu.shape[1]), dtype=mu.dtype)
    return mu[comp] + jnp.einsum("nij,nj->ni", _psd_factor(C)[comp], z)


def gmm_log_density(x, weights, means, covs):
    """log density (n,) at points x (n, d) of the mixture sum_k w_k N(mu_k, Sigma_k); covs
    (K, d, d) must be positive definite."""
    log_w, mu, C = _check_full_mixture(weights, means, covs)
    x = _working(x)
    if x.ndim != 2 or x.shape[1] != mu.shape[1]:
        raise ValueError(f"x must be an (n, {mu.shape[1]}) array of points, got shape {x.shape}")
    return _mixture_log_density(x, log_w, mu, C)


@jax.jit
def _mixture_log_density(x, log_w, mu, C):
    L = jnp.linalg.cholesky(C)  # (K, d, d)
    diff = x[None, :, :] - mu[:, None, :]  # (K, n, d)
    z = jax.scipy.linalg.solve_triangular(L, jnp.swapaxes(diff, 1, 2), lower=True)  # (K, d, n)
    half_logdet = jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), axis=-1)  # (K,)
    log_n = -0.5 * (jnp.sum(z**2, axis=1) + mu.shape[1] * math.log(2 * math.pi))
    return jax.nn.logsumexp(log_w[:, None] + log_n - half_logdet[:, None], axis=0)
