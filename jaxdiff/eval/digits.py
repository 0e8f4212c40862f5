"""Does a sample look like the digit it was asked for? A logistic-regression classifier on
scikit-learn's real 8x8 digits (the data the demo trains on) judges class-conditional samples.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=1)
def classifier():
    """Multinomial logistic regression on all 1797 real digits, pixels scaled to [-1, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    x = d.images.reshape(len(d.images), -1) / 8.0 - 1.0
    return LogisticRegression(max_iter=2000, C=1.0).fit(x, d.target)


def _to_8x8(images):
    """(N, H, W, 1) in [-1, 1] with H = W = 8k to (N, 64) by k x k average pooling."""
    x = np.asarray(images, np.float64)[..., 0]
    n, h, w = x.shape
    if h % 8 or w % 8 or h != w:
        raise ValueError(f"digit images must be square with side a multiple of 8, got {h}x{w}")
    k = h // 8
    return x.reshape(n, 8, k, 8, k).mean(axis=(2, 4)).reshape(n, 64)


def agreement(images, labels):
    """Fraction of samples the classifier assigns to their requested label, and per class."""
    pred = classifier().predict(_to_8x8(images))
    labels = np.asarray(labels)
    per_class = {int(c): float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}
    return float(np.mean(pred == labels)), per_class
