"""The built-in feature network for scikit-learn's 8x8 digits: FD, precision/recall and
classifier agreement of digit samples, offline.

A small MLP classifier (64 -> 128 -> 64 -> 10, GELU) trained on the train split of the
`digits` dataset (`jaxdiff.data.digits`, 1597 images) by `python -m jaxdiff.eval.train_digits`;
its weights ship in `digits_features.npz` next to this file. Its penultimate layer (64 values)
plays the role Inception-v3's pool features play in FID (Heusel et al. 2017, Sec. 3), scaled
down to the data: a Frechet distance in this space is "FD_digits", comparable between runs of
this package only. The held-out test split (200 images) is never seen in training; its accuracy
is stored in the weights file (`test_accuracy`).

Inputs are images (N, H, W, 1) in [-1, 1] with H = W = 8k; larger ones (digits16) are average-
pooled k x k to 8x8. Values are clipped to [-1, 1] first, so that a sample's overshoot is read
as the nearest valid pixel.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_features.npz")
WIDTHS = (64, 128, 64, 10)  # input, hidden, features, classes
BATCH = 1024  # rows per call of the jitted network: bounded memory, one compiled shape


def forward(params, x):
    """(features, logits) of flattened 8x8 images x (N, 64) in [-1, 1]; params {w0, b0, ...}."""
    h = jax.nn.gelu(x @ params["w0"] + params["b0"])  # (N, 128)
    f = jax.nn.gelu(h @ params["w1"] + params["b1"])  # (N, 64)
    return f, f @ params["w2"] + params["b2"]


def to_8x8(images):
    """(N, H, W, 1) in [-1, 1] with H = W = 8k to (N, 64) by k x k average pooling, clipped."""
    x = np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[-1] != 1:
        raise ValueError(f"digit images must have shape (N, H, W, 1), got {x.shape}")
    n, h, w, _ = x.shape
    if h % 8 or w % 8 or h != w:
        raise ValueError(f"digit images must be square with side a multiple of 8, got {h}x{w}")
    k = h // 8
    x = x[..., 0].reshape(n, 8, k, 8, k).mean(axis=(2, 4)).reshape(n, 64)
    return np.clip(x, -1.0, 1.0)


@functools.lru_cache(maxsize=4)
def load(path=WEIGHTS):
    """The shipped network: (params as numpy arrays, metadata dict with `test_accuracy`)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"digits feature weights {path} are missing; recreate them with "
                                "python -m jaxdiff.eval.train_digits")
    with np.load(path) as z:
        names = [k for k in z.files if k[0] in "wb" and k[1:].isdigit()]
        params = {k: np.asarray(z[k]) for k in names}  # numpy: safe to cache inside a trace
        meta = {k: z[k].item() for k in z.files if k not in names}
    return params, meta


_forward = jax.jit(forward)


def _apply(images, params):
    """(features, logits) in chunks of BATCH rows, as numpy."""
    x = to_8x8(images)
    params = load()[0] if params is None else params
    f, g = [np.zeros((0, WIDTHS[2]), np.float32)], [np.zeros((0, WIDTHS[3]), np.float32)]
    for i in range(0, len(x), BATCH):
        n = min(BATCH, len(x) - i)
        fi, gi = _forward(params, _pad(x[i:i + n]))
        f.append(np.asarray(fi)[:n])
        g.append(np.asarray(gi)[:n])
    return np.concatenate(f), np.concatenate(g)


def _pad(x):
    """x padded with zero rows to BATCH rows (one compiled shape for every call)."""
    return np.concatenate([x, np.zeros((BATCH - len(x), x.shape[1]), x.dtype)])


def features(images, params=None):
    """Penultimate-layer features (N, 64) of digit images, float32 numpy."""
    return _apply(images, params)[0]


def logits(images, params=None):
    """Class logits (N, 10) of digit images, float32 numpy."""
    return _apply(images, params)[1]


def agreement(images, labels):
    """Fraction of samples the network assigns to their requested label, and per class."""
    pred = np.argmax(logits(images), axis=-1)
    labels = np.asarray(labels)
    per_class = {int(c): float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}
    return float(np.mean(pred == labels)), per_class


def pool_8x8(images):
    """(N, H, W, 1) in [-1, 1], H = W = 8k, to (N, 64) as `to_8x8` does, in jax (traceable and
    differentiable: a reward or a guidance gradient can go through it)."""
    n, h, w, _ = images.shape
    if h % 8 or w % 8 or h != w:
        raise ValueError(f"digit images must be square with side a multiple of 8, got {h}x{w}")
    k = h // 8
    x = images[..., 0].reshape(n, 8, k, 8, k).mean(axis=(2, 4)).reshape(n, 64)
    return jnp.clip(x, -1.0, 1.0)


def log_prob(images, labels, params=None):
    """log p(label | image) under the built-in network, per image (N,): jax in and out,
    jittable and differentiable (e.g. a steering reward, `jaxdiff.steer`)."""
    params = load()[0] if params is None else params
    _, logits_ = forward(params, pool_8x8(images))
    logp = jax.nn.log_softmax(logits_, axis=-1)
    return jnp.take_along_axis(logp, jnp.asarray(labels, jnp.int32)[:, None], axis=-1)[:, 0]
