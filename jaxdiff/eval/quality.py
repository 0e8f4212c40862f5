"""Sample quality and likelihood of a trained model, from explicit arguments (no configs).

- FD: Frechet distance between Gaussians fitted to features of samples and of real data
  (Heusel et al. 2017, Sec. 3), FD_digits with the built-in digits network
  (`jaxdiff.eval.digits`) or FID with Inception-v3 pool3 features (`jaxdiff.eval.inception`);
  `real_fd`: the FD of real training data at the samples' count and class balance.
- PR: improved precision and recall, k-NN manifolds in the same features (Kynkaanniemi et al.
  2019, Sec. 2).
- NLL: bits/dim through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2;
  `jaxdiff.core.likelihood`), with uniform dequantization of 8-bit pixels as score_sde does.
- NFE: model evaluations of a sampler, counted at run time (`count_nfe`).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff.core import likelihood
from jaxdiff.eval import images as images_lib
from jaxdiff.eval import metrics as metrics_lib

FEATURES = ("digits", "inception", "raw")
ADAPTIVE = ("ode",)  # samplers whose NFE depends on the model (not a function of the steps)
PIXEL_BIN = 2.0 / 255.0  # width of one 8-bit level in [-1, 1] (data pipeline: k / 127.5 - 1)
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's FID Inception weights


def feature_fn(features, *, inception_weights=None):
    """data (N, ...) in [-1, 1] -> (N, D) features: `features` names the built-in digits network
    ("digits"), the FID Inception-v3 ("inception", pool3, 2048 values) loaded from
    `inception_weights`, or the raw data flattened ("raw", for low-dimensional data such as the
    2-D toy sets)."""
    if features == "raw":
        return lambda x: np.asarray(x, np.float32).reshape(len(x), -1)
    if features == "digits":
        from jaxdiff.eval import digits

        return digits.features
    if features != "inception":
        raise ValueError(f"features={features!r} is unknown; allowed: {', '.join(FEATURES)}")
    if not inception_weights:
        raise ValueError(f"features='inception' needs inception_weights=<.pth or .npz file> "
                         f"({INCEPTION_FILE}; nothing is downloaded)")
    from jaxdiff.eval import inception

    params = inception.load_fid_weights(inception_weights)
    return lambda x: inception.fid_features(params, images_lib.to_uint8(x))


def default_features(dataset):
    """The features FD and PR use for `dataset` unless told otherwise: the built-in digits
    network for the digits datasets, the data itself for the 2-D toy sets, Inception-v3 for
    other images."""
    from jaxdiff.data import DIGITS, toy2d

    if dataset in DIGITS:
        return "digits"
    return "raw" if dataset in toy2d.GENERATORS else "inception"


def classifier_agreement_fn(dataset):
    """`(samples, labels) -> (agreement, per_class)`: the share of class-conditional samples
    that a built-in classifier of `dataset`'s classes assigns to their requested label
    (`jaxdiff.eval.digits.agreement` for the digits datasets); None where there is none."""
    from jaxdiff.data import DIGITS

    if dataset not in DIGITS:
        return None
    from jaxdiff.eval import digits

    return digits.agreement


def real_data(name, split, *, num=None, data_dir=None):
    """The first `num` (default all) examples of a dataset split, in file order, as numpy
    (x in [-1, 1], labels) from the training pipeline (`jaxdiff.data.build`)."""
    rows = list(_examples(name, split, num, data_dir))
    if not rows:
        raise ValueError(f"split {split!r} of {name!r} is empty")
    return (np.concatenate([r["x"] for r in rows]), np.concatenate([r["label"] for r in rows]))


def real_features(name, split, featurize, *, num=None, data_dir=None, chunk=1000):
    """(features, labels) of the examples `real_data` gives, featurized `chunk` examples at a
    time: only the features are held, not the images."""
    rows, feats, labels = _examples(name, split, num, data_dir), [], []
    while batch := list(itertools.islice(rows, chunk)):
        feats.append(np.asarray(featurize(np.concatenate([r["x"] for r in batch]))))
        labels.append(np.concatenate([r["label"] for r in batch]))
    if not feats:
        raise ValueError(f"split {split!r} of {name!r} is empty")
    return np.concatenate(feats), np.concatenate(labels)


def _examples(name, split, num, data_dir):
    from jaxdiff import data as data_lib

    it = data_lib.build(name, split, batch_size=1, shuffle=False, num_epochs=1,
                        data_dir=data_dir, num_threads=1, prefetch=64)
    return itertools.islice(it, num)


def sample_quality(fake, real_feats, featurize, *, metrics, k=3):
    """{fd, precision, recall} (those asked for in `metrics`) of samples `fake` against
    precomputed real features."""
    fake_feats = featurize(fake)
    out = {}
    if "fd" in metrics:
        out["fd"] = metrics_lib.frechet_distance(fake_feats, real_feats)
    if "pr" in metrics:
        out["precision"], out["recall"] = metrics_lib.precision_recall(real_feats, fake_feats,
                                                                       k=k)
    return out


def real_fd(train_feats, real_feats, *, num, train_labels=None, class_counts=None, draws=10,
            seed=0):
    """FD to `real_feats` of real data at a model's sample count and class balance: `draws`
    random draws of `num` rows of `train_feats` (features of training examples), each with
    `class_counts[k]` rows of class k (`train_labels`) when given, as a class-conditional model's
    samples have.

    FD is biased upward by a small sample (and lowered by an even class balance), so only real
    data of the same count and balance is comparable with a model's FD. Drawn without
    replacement, a draw is an i.i.d. sample of the data distribution: the mean is what a model
    that samples the data distribution exactly scores in expectation. It is no strict lower
    bound: one draw varies by about `fd_real_std`, and so does a model's FD. With replacement
    (`fd_real_replace`) where the training examples (of a class) are fewer than needed; then the
    duplicates raise it.

    Returns {fd_real (mean over draws), fd_real_std (one draw's spread; draws share
    `train_feats`, so it understates a fresh draw's when `num` nears their count),
    fd_real_std_err (of the mean), fd_real_draws, fd_real_replace}."""
    if draws < 2:
        raise ValueError(f"draws={draws}: a spread needs at least 2 draws")
    if class_counts is None:
        groups, counts = [np.arange(len(train_feats))], [num]
    else:
        labels = np.asarray(train_labels)
        groups = [np.flatnonzero(labels == k) for k in range(len(class_counts))]
        counts = [int(c) for c in class_counts]
        if sum(counts) != num:
            raise ValueError(f"class_counts add up to {sum(counts)}, not num={num}")
        empty = [k for k, (g, c) in enumerate(zip(groups, counts)) if c and not len(g)]
        if empty:
            raise ValueError(f"no training examples of class {empty[0]} to draw from")
    replace = [c > len(g) for g, c in zip(groups, counts)]
    rng = np.random.default_rng(seed)
    fds = []
    for _ in range(draws):
        rows = np.concatenate([rng.choice(g, c, replace=r)
                               for g, c, r in zip(groups, counts, replace)])
        fds.append(metrics_lib.frechet_distance(train_feats[rows], real_feats))
    std = float(np.std(fds, ddof=1))
    return {"fd_real": float(np.mean(fds)), "fd_real_std": std,
            "fd_real_std_err": std / math.sqrt(draws), "fd_real_draws": draws,
            "fd_real_replace": any(replace)}


_calls = []  # run-time model calls of `_stand_in`, appended by its host callback


def _stand_in(x, t):
    """A network that outputs zeros and counts its executed calls (one module-level function, so
    one compiled sampling program per sampler serves every step count)."""
    jax.debug.callback(lambda: _calls.append(1))
    return jnp.zeros_like(x)


def count_nfe(process, prediction, *, sampler, steps, shape, schedule=None, options=None):
    """Model evaluations `jaxdiff.sample` makes with `sampler` over `steps` steps, counted at run
    time on a stand-in network (one sample of `shape`); None for adaptive samplers."""
    if sampler in ADAPTIVE:
        return None
    _calls.clear()
    x = jaxdiff.sample(_stand_in, jnp.zeros((1, *shape), jnp.float32), process=process,
                       prediction=prediction, sampler=sampler, steps=steps, schedule=schedule,
                       key=jax.random.key(0), **dict(options or {}))
    jax.block_until_ready(x)
    jax.effects_barrier()
    return len(_calls)


def batched_bits_per_dim(model_fn, process, prediction, x, *, key, args=(), quantized=True,
                         divergence="auto", batch=100, rtol=1e-5, atol=1e-5):
    """Per-example bits/dim of data `x` (numpy, any length) under a network: its denoiser
    (`jaxdiff.core.denoiser`) through `jaxdiff.core.likelihood.bits_per_dim`, `batch` examples per
    ODE solve (one compiled program, the last batch padded); `args` (e.g. null class labels, one
    per example) go to the network.

    quantized: x holds 8-bit pixels k / 127.5 - 1; they are dequantized with uniform noise over
    their bin [x, x + 2/255), and bits/dim bound the discrete likelihood (Theis et al. 2016).
    divergence: "exact", "hutchinson" (one Rademacher probe), or "auto"
    (`likelihood.resolve_divergence`)."""
    divergence = likelihood.resolve_divergence(divergence, x.shape[1:])
    solve = _bpd_solver(process, prediction, divergence, quantized, rtol, atol)
    if not isinstance(model_fn, jax.tree_util.Partial):  # params (if any) as data to the jit
        model_fn = jax.tree_util.Partial(model_fn)
    x = np.asarray(x, np.float32)
    out = []
    for i in range(0, len(x), batch):
        n = min(batch, len(x) - i)
        xb, ab = _pad_rows(x[i:i + n], batch), [_pad_rows(np.asarray(a)[i:i + n], batch)
                                                for a in args]
        out.append(np.asarray(solve(model_fn, xb, ab, jax.random.fold_in(key, i)))[:n])
    return np.concatenate(out)


def _bpd_solver(process, prediction, divergence, quantized, rtol, atol):
    """One jitted bits/dim solve of a batch (x, args) with fixed settings."""
    sigma_min, sigma_max = float(process.sigma_min), float(process.sigma_max)

    def solve(model_fn, x, args, key):
        D = jaxdiff.denoiser(model_fn, process, prediction)
        return likelihood.bits_per_dim(
            lambda y, s: D(y, s, *args), x, sigma_min=sigma_min, sigma_max=sigma_max, key=key,
            data_scale=PIXEL_BIN if quantized else 1.0, dequantize=quantized,
            divergence=divergence, rtol=rtol, atol=atol)

    return jax.jit(solve)


def _pad_rows(a, n):
    """`a` with its last row repeated up to `n` rows (a fixed batch shape for one program)."""
    return a if len(a) == n else np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)])
