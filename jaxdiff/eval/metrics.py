"""Sample-quality metrics over feature vectors, independent of the network that made them.

- Fréchet distance between Gaussians fitted to two feature sets (FID when the features are
  InceptionV3 pool3 activations; Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update
  Rule Converge to a Local Nash Equilibrium", Sec. 3 / App. A):
  d² = |mu1 - mu2|² + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2)).
- Improved precision and recall with k-NN manifolds (Kynkäänniemi et al. 2019, "Improved
  Precision and Recall Metric for Assessing Generative Models", Sec. 2).
- Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs", Sec. 4):
  IS = exp(E_x KL(p(y|x) || p(y))), mean and std over splits.
- Sliced Wasserstein-p distance between point clouds (Bonneel et al. 2015, "Sliced and Radon
  Wasserstein Barycenters of Measures", Sec. 2.2): the p-th root of the mean over random unit
  directions of W_p^p between the 1-D projections.

All functions take and return NumPy; they compute in float64.
"""

from __future__ import annotations

import numpy as np


def _as_features(feats, name, min_rows=2):
    """Validate a (N, D) feature array and return it as float64."""
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) feature array, got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} samples, got N={x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one feature dimension, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf; features must be finite")
    return x


def _same_dim(a, b, name_a, name_b):
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature dims differ: {name_a} has D={a.shape[1]}, {name_b} has D={b.shape[1]}"
        )


def feature_stats(feats):
    """Mean and (unbiased, N-1) covariance of (N, D) features, float64: the FID statistics."""
    x = _as_features(feats, "feats")
    mu = x.mean(axis=0)
    cov = np.atleast_2d(np.cov(x, rowvar=False))
    return mu, cov


def _sym_sqrt(c):
    """Square root of a symmetric PSD matrix by eigendecomposition (negative rounding -> 0)."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_gaussian(mu, cov, name):
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    cov = np.atleast_2d(np.asarray(cov, dtype=np.float64))
    d = mu.shape[0]
    if mu.ndim != 1 or cov.shape != (d, d):
        raise ValueError(
            f"{name}: mean must be (D,) and covariance (D, D), got {mu.shape} and {cov.shape}"
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(cov))):
        raise ValueError(f"{name}: mean and covariance must be finite")
    return mu, cov


def frechet_distance_gaussians(mu1, cov1, mu2, cov2):
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2).

    tr((C1 C2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix C1^(1/2) C2 C1^(1/2), which has the same spectrum as C1 C2. Unlike a general
    sqrtm of the non-symmetric product, this never yields complex parts and stays finite for
    singular covariances (N <= D), so pytorch-fid's eps * I fallback is not needed.
    """
    mu1, cov1 = _check_gaussian(mu1, cov1, "first Gaussian")
    mu2, cov2 = _check_gaussian(mu2, cov2, "second Gaussian")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dims differ: D={mu1.shape[0]} vs D={mu2.shape[0]}")
    s1 = _sym_sqrt(cov1)
    m = s1 @ cov2 @ s1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean
    return float(max(d2, 0.0))  # only rounding can make it negative


def frechet_distance(feats_a, feats_b):
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (FID on pool3)."""
    a = _as_features(feats_a, "feats_a")
    b = _as_features(feats_b, "feats_b")
    _same_dim(a, b, "feats_a", "feats_b")
    return frechet_distance_gaussians(*feature_stats(a), *feature_stats(b))


def _sq_dists(a, b):
    """(len(a), len(b)) squared Euclidean distances, clipped at 0 against rounding."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _knn_radii_sq(x, k, chunk):
    """Squared distance from each row of x to its k-th nearest other row (self excluded)."""
    out = np.empty(len(x))
    for i in range(0, len(x), chunk):
        d = _sq_dists(x[i : i + chunk], x)
        # index k, not k - 1: the zero distance to itself is the 0-th neighbour.
        out[i : i + chunk] = np.partition(d, k, axis=1)[:, k]
    return out


def _coverage(queries, support, radii_sq, chunk):
    """Fraction of query rows inside at least one k-NN ball around the support rows."""
    hits = 0
    for i in range(0, len(queries), chunk):
        d = _sq_dists(queries[i : i + chunk], support)
        hits += int(np.any(d <= radii_sq[None, :], axis=1).sum())
    return hits / len(queries)


def precision_recall(real_feats, fake_feats, *, k=3, chunk=1024):
    """Improved precision and recall (Kynkäänniemi et al. 2019, Sec. 2), k-NN radius k.

    precision: fraction of fake samples inside the real manifold (the union of balls around each
    real sample reaching its k-th nearest real neighbour); recall: fraction of real samples
    inside the fake manifold. Distances are computed `chunk` rows at a time, so memory is
    O(chunk * N) rather than O(N²).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    real = _as_features(real_feats, "real_feats", min_rows=k + 1)
    fake = _as_features(fake_feats, "fake_feats", min_rows=k + 1)
    _same_dim(real, fake, "real_feats", "fake_feats")
    precision = _coverage(fake, real, _knn_radii_sq(real, k, chunk), chunk)
    recall = _coverage(real, fake, _knn_radii_sq(fake, k, chunk), chunk)
    return precision, recall


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def inception_score(logits, *, splits=10):
    """Inception Score (Salimans et al. 2016, Sec. 4) from (N, C) classifier logits.

    The N samples are cut, in the given order, into `splits` contiguous parts of near-equal size;
    each part gives exp(mean_i KL(p(y|x_i) || mean_j p(y|x_j))). Returns the mean and the
    (population) std of the per-split scores. Shuffle beforehand if the order is not random.
    """
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"splits must be a positive integer, got {splits!r}")
    z = _as_features(logits, "logits", min_rows=1)
    n, c = z.shape
    if c < 2:
        raise ValueError(f"logits need at least 2 classes, got C={c}")
    if n < splits:
        raise ValueError(f"need at least one sample per split: N={n} < splits={splits}")
    log_p = _log_softmax(z)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        p = np.exp(part)
        marginal = p.mean(axis=0)
        # A class no sample in the split picks has p = 0 everywhere and adds 0 (p log p -> 0);
        # log(1) there avoids 0 * inf = nan.
        log_marginal = np.log(np.where(marginal > 0, marginal, 1.0))
        kl = np.sum(p * (part - log_marginal[None, :]), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _wp_pow_1d(pa, pb, p):
    """Exact W_p^p between 1-D empirical measures, per column of sorted pa (n, P), pb (m, P).

    Both quantile functions are step functions jumping at i/n and j/m; between consecutive
    jumps of the merged grid both are constant, so the integral over (0, 1) is an exact sum.
    For n == m this is mean |pa - pb|^p of the sorted values."""
    n, m = len(pa), len(pb)
    if n == m:
        return np.mean(np.abs(pa - pb) ** p, axis=0)
    u = np.union1d(np.arange(n + 1) / n, np.arange(m + 1) / m)
    mid, du = (u[:-1] + u[1:]) / 2, np.diff(u)
    ia = np.minimum((mid * n).astype(np.int64), n - 1)
    ib = np.minimum((mid * m).astype(np.int64), m - 1)
    return du @ (np.abs(pa[ia] - pb[ib]) ** p)


def sliced_wasserstein(a, b, *, projections=256, seed=0, p=2):
    """Sliced Wasserstein-p distance between point clouds a (N, D) and b (M, D), N != M allowed.

    Directions are `projections` normal draws from numpy's default_rng(seed), normalised; each
    gives the exact 1-D W_p between the projected empirical measures. Returns
    (mean over directions of W_p^p)^(1/p) as a float."""
    if isinstance(projections, bool) or not isinstance(projections, (int, np.integer)) or (
        projections < 1
    ):
        raise ValueError(f"projections must be a positive integer, got {projections!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float, np.number)) or not p >= 1 or (
        not np.isfinite(p)
    ):
        raise ValueError(f"p must be a finite number >= 1, got {p!r}")
    a = _as_features(a, "a")
    b = _as_features(b, "b")
    _same_dim(a, b, "a", "b")
    theta = np.random.default_rng(seed).normal(size=(projections, a.shape[1]))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    # directions in chunks: the projected clouds take (N + M) x chunk floats, not x projections
    chunk = max(1, (1 << 22) // (len(a) + len(b)))
    total = 0.0
    for i in range(0, projections, chunk):
        t = theta[i : i + chunk].T
        total += _wp_pow_1d(np.sort(a @ t, axis=0), np.sort(b @ t, axis=0), p).sum()
    return float((total / projections) ** (1.0 / p))
