"""Exact Gaussian-mixture posteriors (jaxdiff.core.analytic) against rejection sampling, dense
grids and Monte Carlo, and the sliced Wasserstein distance against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr

from jaxdiff.core import analytic
from jaxdiff.eval.metrics import sliced_wasserstein

# 1-D prior: three separated, unequal modes
MEANS_1D, STDS_1D, W_1D = np.array([[-1.5], [0.3], [2.0]]), np.array([0.4, 0.7, 0.3]), np.array(
    [0.3, 0.5, 0.2]
)
# 2-D prior: three overlapping modes
MEANS_2D = np.array([[0.5, -0.3], [-0.6, 0.4], [0.1, 0.9]])
STDS_2D, W_2D = np.array([0.3, 0.45, 0.25]), np.array([0.3, 0.3, 0.4])


def _mixture_moments(w, means, covs):
    """Mean and covariance of the whole mixture sum_k w_k N(mu_k, Sigma_k), float64."""
    w, means, covs = (np.asarray(v, np.float64) for v in (w, means, covs))
    mean = w @ means
    second = np.einsum("k,kij->ij", w, covs + means[:, :, None] * means[:, None, :])
    return mean, second - np.outer(mean, mean)


def _normal_pdf(r2, var, d):
    return np.exp(-0.5 * r2 / var) / (2 * np.pi * var) ** (d / 2)


@pytest.mark.parametrize("a", [1.0, 0.7])
def test_1d_posterior_matches_rejection_sampling(a):
    rng = np.random.default_rng(0)
    sigma_y, y, n = 0.5, 0.9, 250_000
    comp = rng.choice(3, size=n, p=W_1D)
    x = MEANS_1D[comp, 0] + STDS_1D[comp] * rng.normal(size=n)
    lik = np.exp(-0.5 * (y - a * x) ** 2 / sigma_y**2)  # max 1: an acceptance probability
    acc = np.sort(x[rng.uniform(size=n) < lik])
    w, mu, cov = (np.asarray(v, np.float64)
                  for v in analytic.gmm_posterior(MEANS_1D, STDS_1D, W_1D, [[a]], [y], sigma_y))
    assert w.sum() == pytest.approx(1.0, abs=1e-6)
    mean, var = (v.item() for v in _mixture_moments(w, mu, cov))
    k = len(acc)
    assert abs(acc.mean() - mean) < 5 * math.sqrt(var / k)
    assert abs(acc.var() - var) < 5 * np.std((acc - mean) ** 2) / math.sqrt(k)
    cdf = ndtr((acc[:, None] - mu[None, :, 0]) / np.sqrt(cov[None, :, 0, 0])) @ w
    ks = np.max(np.maximum(np.arange(1, k + 1) / k - cdf, cdf - np.arange(k) / k))
    assert ks < 1.95 / math.sqrt(k)  # Kolmogorov's 0.1% critical value
    # evidence: p(y) = E_prior N(y; a x, sigma_y^2) = E[lik] / (sqrt(2 pi) sigma_y)
    z_mc = lik.mean() / (math.sqrt(2 * math.pi) * sigma_y)
    log_z = float(analytic.gmm_log_evidence(MEANS_1D, STDS_1D, W_1D, [[a]], [y], sigma_y))
    assert abs(math.exp(log_z) / z_mc - 1) < 5 * lik.std() / lik.mean() / math.sqrt(n)


def _grid(lo=-4.0, hi=4.0, num=801):
    g = np.linspace(lo, hi, num)
    X, Y = np.meshgrid(g, g, indexing="ij")
    return np.stack([X.ravel(), Y.ravel()], axis=1), (g[1] - g[0]) ** 2


def _grid_components(pts, log_lik):
    """Per-component unnormalised posterior mass prior_k(x) * lik(x) on grid points."""
    r2 = np.sum((pts[None] - MEANS_2D[:, None]) ** 2, axis=-1)  # (K, P)
    return W_2D[:, None] * _normal_pdf(r2, STDS_2D[:, None] ** 2, 2) * np.exp(log_lik)[None]


def _check_against_grid(post, pts, mass, dA):
    w, mu, cov = (np.asarray(v, np.float64) for v in post)
    z_k = mass.sum(1) * dA
    np.testing.assert_allclose(w, z_k / z_k.sum(), atol=1e-5)
    mu_grid = (mass @ pts) / mass.sum(1, keepdims=True)
    np.testing.assert_allclose(mu, mu_grid, atol=1e-5)
    p = mass.sum(0) / mass.sum()
    m_grid = p @ pts
    c_grid = (pts - m_grid).T @ ((pts - m_grid) * p[:, None])
    mean, c = _mixture_moments(w, mu, cov)
    np.testing.assert_allclose(mean, m_grid, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(c, c_grid, rtol=1e-3, atol=1e-6)
    return z_k.sum()


def test_2d_posterior_and_evidence_match_dense_grid():
    A, y, sigma_y = np.array([[0.8, -0.5]]), np.array([0.3]), 0.4
    pts, dA = _grid()
    log_lik = -0.5 * ((y[0] - pts @ A[0]) / sigma_y) ** 2 - math.log(math.sqrt(2 * np.pi) * sigma_y)
    mass = _grid_components(pts, log_lik)
    post = analytic.gmm_posterior(MEANS_2D, STDS_2D, W_2D, A, y, sigma_y)
    z = _check_against_grid(post, pts, mass, dA)
    log_z = float(analytic.gmm_log_evidence(MEANS_2D, STDS_2D, W_2D, A, y, sigma_y))
    assert log_z == pytest.approx(math.log(z), abs=1e-5)


def test_tilt_is_posterior_with_identity_and_matches_grid():
    center, tau = np.array([0.4, 0.6]), 0.35
    tilt = analytic.gmm_tilt(MEANS_2D, STDS_2D, W_2D, center, tau)
    post = analytic.gmm_posterior(MEANS_2D, STDS_2D, W_2D, np.eye(2), center, tau)
    for t, p in zip(tilt, post):
        np.testing.assert_allclose(t, p, rtol=1e-6, atol=1e-7)
    pts, dA = _grid()
    mass = _grid_components(pts, -0.5 * np.sum((pts - center) ** 2, 1) / tau**2)
    _check_against_grid(tilt, pts, mass, dA)


@pytest.mark.parametrize("row", [[1.0, 0.0], [0.6, 0.8]])
def test_noiseless_measurement_is_exact(row):
    A, y = np.array([row]), np.array([0.4])
    w, mu, cov = analytic.gmm_posterior(MEANS_2D, STDS_2D, W_2D, A, y, 0.0)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in (w, mu, cov))
    x = np.asarray(analytic.gmm_sample(jax.random.key(0), w, mu, cov, 20_000), np.float64)
    np.testing.assert_allclose(x @ A[0], y[0], atol=1e-5)
    # along the unobserved direction u the component stays N(u . mu_k, s_k^2)
    u, a = np.array([-row[1], row[0]]), np.asarray(A[0])
    np.testing.assert_allclose(np.asarray(mu) @ u, MEANS_2D @ u, atol=1e-6)
    np.testing.assert_allclose(np.einsum("i,kij,j->k", u, cov, u), STDS_2D**2, rtol=1e-5)
    want = W_2D * _normal_pdf((y[0] - MEANS_2D @ a) ** 2, STDS_2D**2, 1)
    np.testing.assert_allclose(w, want / want.sum(), rtol=1e-5)


def test_working_dtype_follows_x64():
    out = analytic.gmm_posterior(MEANS_2D, STDS_2D, W_2D, [[1.0, 0.0]], [0.4], 0.1)
    assert all(v.dtype == jnp.float32 for v in out)
    with jax.enable_x64(True):
        out = analytic.gmm_posterior(MEANS_2D, STDS_2D, W_2D, [[1.0, 0.0]], [0.4], 0.1)
        assert all(v.dtype == jnp.float64 for v in out)


def test_posterior_traces_under_jit_and_vmap():
    # value checks are skipped for traced inputs; shapes are still checked
    ys = np.array([[0.1], [0.4]])
    post = jax.jit(jax.vmap(lambda y: analytic.gmm_posterior(MEANS_2D, STDS_2D, W_2D,
                                                             [[1.0, 0.0]], y, 0.1)))(ys)
    want = analytic.gmm_posterior(MEANS_2D, STDS_2D, W_2D, [[1.0, 0.0]], ys[1], 0.1)
    for got, w in zip(post, want):
        np.testing.assert_allclose(got[1], w, rtol=1e-5, atol=1e-7)


def _full_cov_mixture():
    rng = np.random.default_rng(3)
    B = rng.normal(size=(3, 2, 2)) * 0.3
    covs = B @ np.swapaxes(B, 1, 2) + 0.05 * np.eye(2)
    return W_2D, MEANS_2D, covs


def test_sample_moments_match_mixture():
    w, means, covs = _full_cov_mixture()
    x = np.asarray(analytic.gmm_sample(jax.random.key(1), w, means, covs, 100_000), np.float64)
    mean, cov = _mixture_moments(w, means, covs)
    n = len(x)
    assert np.all(np.abs(x.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / n))
    d = x - mean
    prods = d[:, :, None] * d[:, None, :]
    assert np.all(np.abs(prods.mean(0) - cov) < 5 * prods.std(0) / math.sqrt(n))


def test_log_density_normalised_and_matches_formula():
    w, means, covs = _full_cov_mixture()
    pts, dA = _grid(-7.0, 7.0, 401)  # > 5.5 stds beyond every mode
    logp = np.asarray(analytic.gmm_log_density(pts, w, means, covs), np.float64)
    assert np.exp(logp).sum() * dA == pytest.approx(1.0, abs=1e-4)
    inv, det = np.linalg.inv(covs), np.linalg.det(covs)
    diff = pts[None] - means[:, None]
    quad = np.einsum("kpi,kij,kpj->kp", diff, inv, diff)
    want = np.log(w @ (np.exp(-0.5 * quad) / (2 * np.pi * np.sqrt(det))[:, None]))
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-5)
    iso = analytic.isotropic_covs(STDS_2D, 2)
    got = analytic.gmm_log_density(pts[:5], W_2D, MEANS_2D, iso)
    r2 = np.sum((pts[None, :5] - MEANS_2D[:, None]) ** 2, -1)
    want = np.log(W_2D @ _normal_pdf(r2, STDS_2D[:, None] ** 2, 2))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(A=[[1.0, 0.0, 0.0]]), "A must be an"),
        (dict(y=[0.1, 0.2]), "y must have shape"),
        (dict(sigma_y=-0.1), "sigma_y must be finite and >= 0"),
        (dict(stds=[0.3, 0.0, 0.2]), "stds must be finite and > 0"),
        (dict(weights=[0.0, 0.0, 0.0]), "weights must be finite"),
        (dict(weights=[0.5, 0.5]), "weights must have shape"),
        (dict(A=[[1.0, 0.0], [2.0, 0.0]], y=[0.1, 0.2], sigma_y=0.0), "A A\\^T invertible"),
    ],
)
def test_bad_posterior_input_is_one_line_error(kwargs, match):
    args = dict(means=MEANS_2D, stds=STDS_2D, weights=W_2D, A=[[1.0, 0.0]], y=[0.1], sigma_y=0.1)
    with pytest.raises(ValueError, match=match) as err:
        analytic.gmm_posterior(**{**args, **kwargs})
    assert "\n" not in str(err.value)


def test_bad_mixture_input_is_one_line_error():
    w, means, covs = _full_cov_mixture()
    for call, match in [
        (lambda: analytic.gmm_sample(jax.random.key(0), w, means, covs[:, :1], 3), "covs must"),
        (lambda: analytic.gmm_sample(jax.random.key(0), w, means, covs, 0), "n must"),
        (lambda: analytic.gmm_log_density(np.zeros((4, 3)), w, means, covs), "x must"),
        (lambda: analytic.gmm_tilt(MEANS_2D, STDS_2D, W_2D, [0.0], 0.1), "center must"),
        (lambda: analytic.gmm_tilt(MEANS_2D, STDS_2D, W_2D, [0.0, 0.0], -1.0), "tau must"),
        (lambda: analytic.isotropic_covs(STDS_2D, 0), "d must"),
    ]:
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_sliced_wasserstein_identical_clouds_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 3))
    assert sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_1d_shift():
    # in d = 1 each direction is +-1, so SW_p = W_p = |m| between N(0, 1) and N(m, 1)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200_000, 1)), rng.normal(size=(200_000, 1)) - 1.5
    assert sliced_wasserstein(a, b, projections=4) == pytest.approx(1.5, rel=0.02)
    # n != m: the exact 1-D distance between step quantile functions
    assert sliced_wasserstein(a, b[:70_001], projections=4) == pytest.approx(1.5, rel=0.02)
    assert sliced_wasserstein(a, b, projections=4, p=1) == pytest.approx(1.5, rel=0.02)


def test_sliced_wasserstein_unequal_sizes_exact_small_case():
    # a = {0, 1}, b = {0, 1, 2}: the quantile functions differ by 1 on (1/3, 1/2) and (2/3, 1),
    # so W_1 = W_2^2 = 1/2 along either direction (+-1)
    a, b = np.array([[0.0], [1.0]]), np.array([[2.0], [0.0], [1.0]])
    assert sliced_wasserstein(a, b, p=1, projections=3) == pytest.approx(0.5, rel=1e-12)
    assert sliced_wasserstein(a, b, projections=3) == pytest.approx(math.sqrt(0.5), rel=1e-12)


def test_sliced_wasserstein_2d_shift_and_seed():
    # shift delta in d = 2: W_2^2 along theta is (theta . delta)^2, mean |delta|^2 / 2
    rng = np.random.default_rng(2)
    a = rng.normal(size=(8_000, 2))
    b = rng.normal(size=(6_000, 2)) + np.array([1.2, -0.9])
    want = math.hypot(1.2, -0.9) / math.sqrt(2)
    # the direction average has a relative std of about 0.35 / sqrt(projections)
    s0 = sliced_wasserstein(a, b, projections=1000, seed=0)
    s1 = sliced_wasserstein(a, b, projections=1000, seed=1)
    assert s0 == pytest.approx(want, rel=0.05)
    assert s1 == pytest.approx(s0, rel=0.05)
    assert s0 != s1


@pytest.mark.parametrize(
    "a, b, kwargs, match",
    [
        (np.zeros((5, 2)), np.zeros((5, 3)), {}, "feature dims differ"),
        (np.zeros(5), np.zeros((5, 1)), {}, "a must be a 2-D"),
        (np.zeros((1, 2)), np.zeros((5, 2)), {}, "at least 2 samples"),
        (np.full((3, 2), np.nan), np.zeros((5, 2)), {}, "NaN or inf"),
        (np.zeros((3, 2)), np.zeros((5, 2)), {"projections": 0}, "projections must"),
        (np.zeros((3, 2)), np.zeros((5, 2)), {"p": 0.5}, "p must"),
    ],
)
def test_sliced_wasserstein_bad_input(a, b, kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        sliced_wasserstein(a, b, **kwargs)
    assert "\n" not in str(err.value)
