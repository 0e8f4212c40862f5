"""The exact-posterior benchmark of `benchmarks/inverse.py`: a 2-D Gaussian-mixture prior (exact
denoiser), a linear Gaussian measurement y = A x0 + sigma_y n, and its posterior, a Gaussian
mixture in closed form (`jaxdiff.core.analytic.gmm_posterior`). Every solver runs on the exact
denoiser, so what is measured is the solver's own error against the posterior.

Errors of N returned samples: the posterior-mean error, the mixture-weight error (total
variation between the share of samples each posterior component claims and its exact weight)
and the sliced Wasserstein distance to a large exact reference. The noise floor is the same
distance for N exact posterior samples.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff import inverse, steer
from jaxdiff.core import analytic
from jaxdiff.core.denoiser import model_from_denoiser
from jaxdiff.core.process import EDM
from jaxdiff.eval import metrics

# six components, uneven weights; y = 0 observes x1 + 0.5 x2 through noise 0.3: two modes
MEANS = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, -2.0], [1.5, 1.5], [-1.5, -1.5]])
STDS = np.full(6, 0.35)
WEIGHTS = np.array([0.3, 0.1, 0.2, 0.15, 0.15, 0.1])
A = np.array([[1.0, 0.5]])
SIGMA_Y = 0.3
Y = np.array([0.0])
PROCESS = EDM(sigma_data=1.5)
REFERENCE = 20000


def data_std():
    """The prior's per-coordinate std (PiGDM's Gaussian approximation and the SMC twist)."""
    second = np.sum(WEIGHTS[:, None] * (MEANS**2 + STDS[:, None] ** 2), 0)
    return float(np.sqrt(np.mean(second - np.sum(WEIGHTS[:, None] * MEANS, 0) ** 2)))


def network():
    return model_from_denoiser(analytic.gmm_denoiser(MEANS, STDS, WEIGHTS), PROCESS, "x0")


def posterior():
    return analytic.gmm_posterior(MEANS, STDS, WEIGHTS, A, Y, SIGMA_Y)


def exact_samples(n, seed):
    w, m, c = posterior()
    return np.asarray(analytic.gmm_sample(jax.random.key(seed), w, m, c, n))


def exact_prior(n, seed):
    return np.asarray(analytic.gmm_sample(jax.random.key(seed), WEIGHTS, MEANS,
                                          analytic.isotropic_covs(STDS, 2), n))


def run_prior(sampler, steps, n, seed=0):
    """n unsteered draws of `sampler` from the exact prior denoiser."""
    noise = jax.random.normal(jax.random.key(seed), (n, 2))
    return np.asarray(jaxdiff.sample(network(), noise, process=PROCESS, prediction="x0",
                                     sampler=sampler, steps=steps, key=jax.random.key(seed + 1)))


def claims(x):
    """Index of the posterior component with the highest responsibility for each sample."""
    w, m, c = posterior()
    logp = jnp.stack([jnp.log(w[k]) + jax.scipy.stats.multivariate_normal.logpdf(x, m[k], c[k])
                      for k in range(len(w))], -1)
    return np.asarray(jnp.argmax(logp, -1))


def errors(x, reference):
    """{mean_err, weight_tv, sw} of samples x (N, 2) against the exact posterior."""
    w, m, _ = posterior()
    share = np.bincount(claims(x), minlength=len(w)) / len(x)
    mean = np.asarray(jnp.sum(w[:, None] * m, 0))
    return dict(mean_err=float(np.linalg.norm(x.mean(0) - mean)),
                weight_tv=float(0.5 * np.abs(share - np.asarray(w)).sum()),
                sw=float(metrics.sliced_wasserstein(x, reference)))


def floor(n, reference, draws=20):
    """SW of n exact posterior samples to the reference, over `draws` draws: what a perfect
    sampler scores ({mean, sd, min, max}; with two well-separated modes SW is dominated by
    how the n samples happen to split between them, so it varies widely)."""
    sw = [metrics.sliced_wasserstein(exact_samples(n, 100 + i), reference) for i in range(draws)]
    return dict(mean=float(np.mean(sw)), sd=float(np.std(sw)), min=float(np.min(sw)),
                max=float(np.max(sw)))


def run_solver(name, steps, n, seed=0, **options):
    """n samples of solver `name` (jaxdiff.inverse.SOLVERS) at `steps` steps (NFE = steps)."""
    op = inverse.Matrix(A, sigma_y=SIGMA_Y)
    y = jnp.broadcast_to(jnp.asarray(Y, jnp.float32), (n, 1))
    if name == "pigdm":
        options.setdefault("data_std", data_std())
    x = inverse.solve(network(), y, op, solver=name, process=PROCESS, prediction="x0",
                      steps=steps, key=jax.random.key(seed), **options)
    return np.asarray(x)


def likelihood_reward(x0, sigma):
    """log N(y; A x0, sigma_y^2 + r^2 |A|^2) with r^2 = sigma^2 s^2 / (sigma^2 + s^2): the
    measurement's likelihood, widened at noise level sigma by the spread of x0 around its
    estimate (PiGDM's approximation); exactly the likelihood at sigma = 0."""
    s2 = data_std() ** 2
    r2 = jnp.square(sigma) * s2 / (jnp.square(sigma) + s2)
    var = SIGMA_Y**2 + r2 * float(np.sum(A**2))
    resid = jnp.sum(jnp.square(Y - x0 @ jnp.asarray(A.T, x0.dtype)), -1)
    return -0.5 * resid / var - 0.5 * jnp.log(2 * math.pi * var)


def run_smc(particles, steps, n, seed=0, sampler="ddpm", chunk=256):
    """n draws, each from an independent FK/SMC run of `particles` particles (NFE per draw:
    steps * particles), picked by the final weights."""
    out = []
    for start in range(0, n, chunk):
        g = min(chunk, n - start)
        fk = steer.FK(likelihood_reward, particles=particles, groups=g,
                      key=jax.random.key(seed * 7919 + start + 1))
        noise = jax.random.normal(jax.random.key(seed * 7919 + start), (g * particles, 2))
        x, state = jaxdiff.sample(network(), noise, process=PROCESS, prediction="x0",
                                  sampler=sampler, steps=steps, guidance=fk,
                                  key=jax.random.key(seed * 7919 + start + 2))
        out.append(np.asarray(steer.select(x, state, jax.random.key(start + 3))))
    return np.concatenate(out)
