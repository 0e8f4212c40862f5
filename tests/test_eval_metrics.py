"""Fréchet distance, k-NN precision/recall and Inception Score against closed forms."""

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

from jaxdiff.eval.metrics import (
    feature_stats,
    frechet_distance,
    frechet_distance_gaussians,
    inception_score,
    precision_recall,
)


def _random_cov(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _fd_scipy(mu1, c1, mu2, c2):
    """Reference formula with a general (non-symmetric) sqrtm, as pytorch-fid computes it."""
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    return np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)


def test_feature_stats_match_numpy():
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    mu, cov = feature_stats(x)
    assert mu.dtype == np.float64 and cov.shape == (3, 3)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x.astype(np.float64).T), rtol=1e-12)


def test_fd_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fd_diagonal_covs_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance_gaussians(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_fd_commuting_covs_closed_form():
    # Same eigenbasis Q: W2² = |dmu|² + sum (sqrt(a_i) - sqrt(b_i))².
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.01, 4, size=6), rng.uniform(0.01, 4, size=6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance_gaussians(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-10)


def test_fd_general_covs_match_scipy_sqrtm():
    rng = np.random.default_rng(4)
    c1, c2 = _random_cov(rng, 12), _random_cov(rng, 12, scale=2.0)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    want = _fd_scipy(mu1, c1, mu2, c2)
    assert frechet_distance_gaussians(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-9)


def test_fd_sampled_gaussians_match_closed_form():
    rng = np.random.default_rng(5)
    d, n = 4, 40000
    c1, c2 = _random_cov(rng, d), _random_cov(rng, d, scale=0.5)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    x = rng.multivariate_normal(mu1, c1, size=n)
    y = rng.multivariate_normal(mu2, c2, size=n)
    want = frechet_distance_gaussians(mu1, c1, mu2, c2)
    assert want > 1.0
    # Sampling error of the fitted moments is O(1/sqrt(n)) ~ 0.005 per entry.
    assert frechet_distance(x, y) == pytest.approx(want, abs=0.05)


def test_fd_singular_covariance_is_finite_and_consistent():
    # N <= D: both covariances are rank-deficient; pytorch-fid would need its eps fallback.
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(6, 20)), rng.normal(size=(6, 20)) + 1.0
    fd = frechet_distance(x, y)
    assert np.isfinite(fd) and fd > 0
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    mu1, c1 = feature_stats(x)
    mu2, c2 = feature_stats(y)
    assert fd == pytest.approx(_fd_scipy(mu1, c1, mu2, c2), rel=1e-4)


def test_fd_one_dimensional_features():
    x = np.array([[0.0], [2.0], [4.0]])  # mean 2, var 4
    y = np.array([[1.0], [2.0], [3.0]])  # mean 2, var 1
    assert frechet_distance(x, y) == pytest.approx((2.0 - 1.0) ** 2, rel=1e-12)


def test_precision_recall_identical_sets():
    x = np.random.default_rng(7).normal(size=(200, 8))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_far_disjoint_sets():
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(100, 5)), rng.normal(size=(120, 5)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_subset_high_precision_low_recall():
    real = np.random.default_rng(9).normal(size=(1000, 2))
    fake = real[np.linalg.norm(real, axis=1) < 0.5]  # the core of the real set
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == 1.0
    assert recall < 0.4


def test_precision_recall_hand_computed_1d():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii: all 1
    fake = np.array([[0.5], [10.0]])  # k=1 radii: both 9.5
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)


def test_precision_recall_matches_brute_force_and_chunking():
    rng = np.random.default_rng(10)
    real, fake = rng.normal(size=(60, 3)), rng.normal(size=(45, 3)) * 0.7 + 0.8
    k = 4
    d_rr, d_ff, d_fr = cdist(real, real), cdist(fake, fake), cdist(fake, real)
    r_real, r_fake = np.sort(d_rr, 1)[:, k], np.sort(d_ff, 1)[:, k]
    want_p = np.mean(np.any(d_fr <= r_real[None, :], axis=1))
    want_r = np.mean(np.any(d_fr.T <= r_fake[None, :], axis=1))
    assert 0.0 < want_p < 1.0 and 0.0 < want_r < 1.0
    for chunk in (7, 1024):
        p, r = precision_recall(real, fake, k=k, chunk=chunk)
        assert p == pytest.approx(want_p) and r == pytest.approx(want_r)


def test_inception_score_confident_uniform_is_num_classes():
    c, n = 10, 200
    logits = np.zeros((n, c))
    logits[np.arange(n), np.arange(n) % c] = 1e3  # one-hot predictions, every class equally
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(c, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_identical_predictions_is_one():
    logits = np.tile(np.random.default_rng(11).normal(size=(1, 7)), (50, 1))
    mean, std = inception_score(logits, splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_hand_computed_splits():
    # Split 1: two confident samples of different classes -> IS 2; split 2: same class -> 1.
    logits = np.array([[50.0, 0.0, 0.0], [0.0, 50.0, 0.0], [0.0, 0.0, 50.0], [0.0, 0.0, 50.0]])
    mean, std = inception_score(logits, splits=2)
    assert mean == pytest.approx(1.5, rel=1e-9) and std == pytest.approx(0.5, rel=1e-9)
    shifted = inception_score(logits + 123.0, splits=2)  # softmax is shift invariant
    assert shifted == pytest.approx((mean, std), rel=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: feature_stats(np.zeros((1, 4))), "at least 2 samples"),
        (lambda: feature_stats(np.zeros(4)), "2-D"),
        (lambda: frechet_distance(np.zeros((5, 3)), np.zeros((5, 4))), "feature dims differ"),
        (lambda: frechet_distance(np.full((5, 3), np.nan), np.zeros((5, 3))), "NaN"),
        (lambda: frechet_distance_gaussians(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)),
         "covariance"),
        (lambda: frechet_distance_gaussians(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2)),
         "feature dims differ"),
        (lambda: precision_recall(np.zeros((10, 2)), np.zeros((10, 3))), "feature dims differ"),
        (lambda: precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3), "at least 4"),
        (lambda: precision_recall(np.zeros((10, 2)), np.zeros((10, 2)), k=0), "k must be"),
        (lambda: precision_recall(np.zeros((10, 2)), np.zeros((10, 2)), chunk=0), "chunk"),
        (lambda: inception_score(np.zeros((5, 3)), splits=10), "N=5 < splits=10"),
        (lambda: inception_score(np.zeros((5, 3)), splits=0), "splits must be"),
        (lambda: inception_score(np.zeros((5, 1)), splits=1), "at least 2 classes"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
