"""PF-ODE likelihood against closed forms for Gaussian data (float64).

What is compared: the ODE transports the data, taken as the state at sigma_min, to sigma_max.
For data N(mu, Sigma) the exact answer is therefore log N(x0; mu, Sigma + sigma_min^2 I), with
the prior at sigma_max either the exact marginal N(mu, Sigma + sigma_max^2 I) (isolating the ODE
and divergence error) or the default VE prior N(0, sigma_max^2 I) (adding its mismatch).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.core import analytic, likelihood
from jaxdiff.core.denoiser import model_from_denoiser
from jaxdiff.core.process import VPLinear

MU, STD, DIM = 0.4, 0.6, 4
S_MIN, S_MAX = 1e-3, 1e3
LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def data(n, key=0):
    return MU + STD * jax.random.normal(jax.random.key(key), (n, DIM), jnp.float64)


def exact_prior(sigma, mean, std):
    return lambda x: analytic.gaussian_log_density(x, sigma, mean, std)


@pytest.mark.parametrize("prior,tol", [("exact", 1e-4), ("ve", 1e-2)])
def test_exact_divergence_matches_closed_form(prior, tol):
    x0 = data(16)
    prior_logp = exact_prior(S_MAX, MU, STD) if prior == "exact" else None
    bpd = jax.jit(lambda x: likelihood.bits_per_dim(
        analytic.gaussian_denoiser(MU, STD), x, sigma_min=S_MIN, sigma_max=S_MAX,
        divergence="exact", prior_logp=prior_logp))(x0)
    want = -analytic.gaussian_log_density(x0, S_MIN, MU, STD) / (DIM * LN2)
    err = float(jnp.max(jnp.abs(bpd - want)))
    assert err < tol, f"max error {err:.2e} bits/dim"


def test_process_denoiser_matches_closed_form():
    """A VP network (eps-prediction) through `jaxdiff.core.denoiser`, range from the process."""
    process = VPLinear()
    D = jaxdiff.denoiser(model_from_denoiser(analytic.gaussian_denoiser(MU, STD), process, "eps"),
                         process, "eps")
    lo, hi = float(process.sigma_min), float(process.sigma_max)
    x0 = data(8)
    nats = jax.jit(lambda x: likelihood.nll(D, x, sigma_min=lo, sigma_max=hi, divergence="exact",
                                            prior_logp=exact_prior(hi, MU, STD)))(x0)
    err = jnp.abs(nats + analytic.gaussian_log_density(x0, lo, MU, STD)) / (DIM * LN2)
    assert 1e-3 < lo < 0.1 and hi > 100 and float(jnp.max(err)) < 1e-4


# Correlated Gaussian data N(MU, Q diag(LAM) Q^T): a non-diagonal Jacobian, so Rademacher probes
# have nonzero variance. With one probe e fixed per solve the estimate of int div f du is e^T M e,
# M = Q diag(m) Q^T, m_j = int sigma^2 / (lam_j + sigma^2) du = log((lam_j + S_MAX^2) /
# (lam_j + S_MIN^2)) / 2; its variance is 2 ||M||_F^2 (Gaussian) or 2 sum_{i != j} M_ij^2
# (Rademacher).
LAM = np.array([0.02, 0.2, 1.0, 3.0])
Q = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, DIM)))[0]


def correlated_denoiser(x, sigma, *args):
    z = (x - MU) @ Q
    return MU + (z * LAM / (LAM + jnp.square(sigma))) @ Q.T


def correlated_prior(x):
    return analytic.gaussian_log_density((x - MU) @ Q, S_MAX, 0.0, np.sqrt(LAM))


def hutchinson_std(probe):
    m = 0.5 * np.log((LAM + S_MAX**2) / (LAM + S_MIN**2))
    M = (Q * m) @ Q.T
    off = M - np.diag(np.diag(M))
    return np.sqrt(2 * np.sum(M**2) if probe == "gaussian" else 2 * np.sum(off**2))


def test_hutchinson_unbiased_with_expected_variance():
    n = 400
    x0 = MU + jax.random.normal(jax.random.key(1), (n, DIM), jnp.float64) @ (Q * np.sqrt(LAM)).T

    def run(x, key, divergence, probe="rademacher", num_probes=1):
        return likelihood.nll(correlated_denoiser, x, sigma_min=S_MIN, sigma_max=S_MAX, key=key,
                              divergence=divergence, probe=probe, num_probes=num_probes,
                              prior_logp=correlated_prior)

    run = jax.jit(run, static_argnums=(2, 3, 4))
    exact = run(x0, None, "exact")
    closed = -analytic.gaussian_log_density((x0 - MU) @ Q, S_MIN, 0.0, np.sqrt(LAM))
    assert float(jnp.max(jnp.abs(exact - closed))) < 1e-3  # nats; solver tolerance
    for probe, k, key in [("rademacher", 1, 2), ("gaussian", 1, 3), ("rademacher", 8, 4)]:
        diff = np.asarray(run(x0, jax.random.key(key), "hutchinson", probe, k) - exact)
        want_std = hutchinson_std(probe) / np.sqrt(k)
        assert abs(diff.mean()) < 4 * want_std / np.sqrt(n), (probe, k, diff.mean(), want_std)
        assert np.std(diff) == pytest.approx(want_std, rel=0.2), (probe, k)


def test_dequantized_bpd_bounds_discrete_likelihood():
    """8-bit data in [-1, 1): bpd with uniform dequantization and the +7 offset matches the exact
    bits/dim of the discrete bins under N(MU, STD^2 + S_MIN^2). The Jensen gap (a bound in
    expectation over u) is ~1e-5 here; one draw of u per sample adds ~3e-4 of noise."""
    w = 2.0 / 256
    k = jnp.clip(jnp.floor((data(64, key=4) + 1.0) / w), 0, 255)
    x = w * k - 1.0  # lower bin edges
    bpd = jax.jit(lambda x, key: likelihood.bits_per_dim(
        analytic.gaussian_denoiser(MU, STD), x, sigma_min=S_MIN, sigma_max=S_MAX, key=key,
        data_scale=w, dequantize=True, divergence="exact",
        prior_logp=exact_prior(S_MAX, MU, STD)))(x, jax.random.key(5))
    scale = np.sqrt(STD**2 + S_MIN**2)
    cdf = lambda v: jax.scipy.stats.norm.cdf(v, MU, scale)
    discrete = -jnp.sum(jnp.log2(cdf(x + w) - cdf(x)), axis=1) / DIM
    gap = float(jnp.mean(bpd - discrete))
    assert abs(gap) < 2e-3, gap  # without the +7 offset the gap would be -7


def test_bad_arguments():
    D = analytic.gaussian_denoiser(MU, STD)
    x = data(2)
    cases = [
        (dict(divergence="skilling"), "divergence='skilling'"),
        (dict(probe="sphere", key=jax.random.key(0)), "probe='sphere'"),
        (dict(num_probes=0, key=jax.random.key(0)), "num_probes=0"),
        (dict(), "needs key"),
        (dict(sigma_min=0.0, divergence="exact"), "sigma_min=0.0"),
        (dict(sigma_max=1e-4, divergence="exact"), "sigma_max=0.0001"),
    ]
    for kw, msg in cases:
        kw = dict(dict(sigma_min=S_MIN, sigma_max=S_MAX), **kw)
        with pytest.raises(ValueError, match=msg):
            likelihood.nll(D, x, **kw)
    with pytest.raises(ValueError, match="dequantize"):
        likelihood.bits_per_dim(D, x, sigma_min=S_MIN, sigma_max=S_MAX, dequantize=True,
                                divergence="exact")


def test_auto_divergence_is_exact_for_small_data_only():
    """"auto": the exact trace up to EXACT_MAX_DIM values per example, Hutchinson's above (which
    then needs a key); the named choices stay as they are."""
    n = likelihood.EXACT_MAX_DIM
    assert likelihood.resolve_divergence("auto", (n,)) == "exact"
    assert likelihood.resolve_divergence("auto", (n + 1,)) == "hutchinson"
    assert likelihood.resolve_divergence("exact", (n + 1,)) == "exact"
    with pytest.raises(ValueError, match="divergence='auto' needs key"):
        likelihood.nll(analytic.gaussian_denoiser(MU, STD), jnp.zeros((2, n + 1)),
                       sigma_min=S_MIN, sigma_max=S_MAX, divergence="auto")
