"""The FID InceptionV3 (pool3 features, 1008-way logits) in Flax, with weights from a local file.

FID (Heusel et al. 2017, App. A) is defined on the 2048-d pool3 activations of the TensorFlow
graph `inception-2015-12-05` (Szegedy et al. 2016, "Rethinking the Inception Architecture").
That graph differs from torchvision's InceptionV3: the 3x3 average pools in the A/C/E_1 blocks
do not count the zero padding, the last block (Mixed_7c, "E_2") pools by max instead of
average, the classifier has 1008 classes, and its input is bilinearly resized to 299x299 the way
TensorFlow 1.x did (source pixel = dst * in/out, no half-pixel offset) and scaled by
(x - 128) / 128. All of this is reproduced here; tests check it against torch-fidelity's
`feature_extractor_inceptionv3` on random weights.

Weights: the pytorch-fid / torch-fidelity file `pt_inception-2015-12-05-6726825d.pth` (a torch
state_dict, keys like `Mixed_5b.branch1x1.conv.weight`, `...bn.running_var`, `fc.weight`) is
read by `load_fid_weights`; torch is imported only for `.pth`. `convert_pth_to_npz` writes the
same state_dict as a `.npz` that loads without torch. Nothing is downloaded. The key map lives
here, beside the network, because these weights are part of the metric's definition; the
generic PyTorch pieces (file reading, kernel layout) are `jaxdiff.interop.torch_weights`.

Convention: `fid_features` takes NHWC images with values in [0, 255] (uint8 or float, like
torch-fidelity's uint8 input; use `jaxdiff.eval.images.to_uint8` on model outputs in [-1, 1], which
also quantizes them as saving PNGs would); a single channel is repeated to RGB.
Batch norm is inference-only, so its running statistics sit in `params` (`bn/mean`, `bn/var`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxdiff.interop.torch_weights import kernel_from_torch, nest, read_state_dict, to_numpy

INPUT_SIZE = 299
_HIGHEST = jax.lax.Precision.HIGHEST  # FID wants f32 convolutions, not TF32/bf16 passes


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class BatchNormFrozen(nn.Module):
    """Inference batch norm (TF eps 1e-3): (x - mean) / sqrt(var + eps) * scale + bias."""

    eps: float = 1e-3

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv2d(nn.Module):
    """Conv (no bias) -> frozen batch norm -> ReLU; kernel/stride/padding as in torch."""

    features: int
    kernel: int | tuple = 1
    stride: int = 1
    padding: int | tuple = 0

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=_HIGHEST,
                    name="conv")(x)
        return nn.relu(BatchNormFrozen(name="bn")(x))


def _avg_pool_3x3(x):
    # TF's SAME average pool divides by the number of real (non-padding) pixels.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, name="branch1x1")(x)
        b5 = BasicConv2d(48, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorized 7x7 convolutions (1x7 and 7x1)."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = BasicConv2d(192, name="branch1x1")(x)
        b7 = BasicConv2d(c7, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, **row, name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, **row, name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, **row, name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 heads; pool="max" is the FID graph's Mixed_7c quirk."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = BasicConv2d(320, name="branch1x1")(x)
        b3 = BasicConv2d(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3_2a")(b3),
                              BasicConv2d(384, **col, name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = BasicConv2d(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
    """The 2048 -> 1008 classifier, returning logits without and with its bias."""

    classes: int = 1008

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.classes))
        bias = self.param("bias", nn.initializers.zeros, (self.classes,))
        unbiased = jnp.dot(x, kernel, precision=_HIGHEST)
        return unbiased, unbiased + bias


class FIDInceptionV3(nn.Module):
    """InceptionV3 of the FID graph; input (N, 299, 299, 3) scaled to [-1, 1).

    Returns {"pool3": (N, 2048), "logits_unbiased": (N, 1008), "logits": (N, 1008)}; the
    Inception Score of Salimans et al. used the unbiased logits.
    """

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)  # (N, 149, 149, 32)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)  # (N, 147, 147, 32)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)  # (N, 73, 73, 64)
        x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)  # (N, 71, 71, 192)
        x = _max_pool_3x3_s2(x)  # (N, 35, 35, 192)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, name=name)(x)  # (N, 35, 35, 256 or 288)
        x = InceptionB(name="Mixed_6a")(x)  # (N, 17, 17, 768)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)  # (N, 8, 8, 1280)
        x = InceptionE("avg", name="Mixed_7b")(x)  # (N, 8, 8, 2048)
        x = InceptionE("max", name="Mixed_7c")(x)
        pool3 = x.mean(axis=(1, 2))  # (N, 2048)
        unbiased, logits = Logits(name="fc")(pool3)
        return {"pool3": pool3, "logits_unbiased": unbiased, "logits": logits}


def resize_bilinear_tf1(x, size):
    """Bilinear resize of NHWC float images as TF 1.x `resize_bilinear(align_corners=False)`.

    Output pixel i samples source coordinate i * in/out (no half-pixel centres; the ratio is
    rounded to float32 as torch-fidelity does), interpolating between floor and floor + 1
    (clamped at the edge). No antialiasing when shrinking. Computes in x's dtype.
    """

    def axis_weights(n_in, n_out):
        src = jnp.arange(n_out, dtype=x.dtype) * np.float32(n_in / n_out).astype(x.dtype)
        lo = jnp.floor(src).astype(jnp.int32)
        return lo, jnp.minimum(lo + 1, n_in - 1), src - lo.astype(x.dtype)

    (h_out, w_out), (_, h, w, _) = size, x.shape
    ylo, yhi, dy = axis_weights(h, h_out)
    xlo, xhi, dx = axis_weights(w, w_out)
    top, bottom = x[:, ylo], x[:, yhi]  # (N, h_out, W, C)
    dx = dx[None, None, :, None]
    row0 = top[:, :, xlo] + (top[:, :, xhi] - top[:, :, xlo]) * dx
    row1 = bottom[:, :, xlo] + (bottom[:, :, xhi] - bottom[:, :, xlo]) * dx
    return row0 + (row1 - row0) * dy[None, :, None, None]


def preprocess(images, dtype=jnp.float32):
    """(N, H, W, 1 or 3) values in [0, 255] -> (N, 299, 299, 3) in [-1, 1), in `dtype`."""
    x = jnp.asarray(images).astype(dtype)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
    return (x - 128.0) / 128.0


@jax.jit
def _forward(params, images):
    return FIDInceptionV3().apply({"params": params}, preprocess(images))


def _check_images(images):
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be NHWC with 1 or 3 channels, got shape {x.shape}")
    if x.shape[0] == 0 or min(x.shape[1:3]) < 1:
        raise ValueError(f"images must be a non-empty batch of non-empty images, got {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"images must be real numbers, got dtype {x.dtype}")
    lo, hi = float(x.min()), float(x.max())
    if not (0.0 <= lo and hi <= 255.0):  # also catches NaN
        raise ValueError(
            f"images must have values in [0, 255] (jaxdiff.eval.images.to_uint8 maps model outputs"
            f" in [-1, 1] there), got range [{lo}, {hi}]")
    return x


def inception_outputs(params, images, *, batch_size=50):
    """pool3 features and logits of NHWC images in [0, 255], `batch_size` images per call.

    Returns a dict of float32 numpy arrays as `FIDInceptionV3`. The last batch is padded to
    `batch_size` so one compiled program serves every batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    x = _check_images(images)
    n, b = x.shape[0], min(batch_size, x.shape[0])
    parts = []
    for i in range(0, n, b):
        chunk = x[i : i + b]
        pad = b - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out = _forward(params, chunk)
        parts.append({k: np.asarray(v)[: b - pad] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def fid_features(params, images, *, batch_size=50):
    """(N, 2048) pool3 features of NHWC images with values in [0, 255] (see module doc)."""
    return inception_outputs(params, images, batch_size=batch_size)["pool3"]


# ---------------------------------------------------------------- weights


@functools.lru_cache(maxsize=1)
def param_shapes():
    """{flax path tuple: shape} of every FIDInceptionV3 parameter (no compute)."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    tree = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), x)["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(v.shape) for path, v in flat}


_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _param_path_of_key(key):
    """pytorch-fid state_dict key -> FIDInceptionV3 param path, or None for keys that carry no
    weights (`num_batches_tracked`)."""
    *modules, leaf = key.split(".")
    if leaf == "num_batches_tracked":
        return None
    if modules and modules[-1] == "bn":
        return (*modules, _BN_LEAVES.get(leaf, leaf))
    return (*modules, {"weight": "kernel"}.get(leaf, leaf))


def params_from_torch_state_dict(state_dict):
    """Flax params from a pytorch-fid / torch-fidelity InceptionV3 state_dict.

    Keys must be exactly the FID model's (`num_batches_tracked` is ignored); an unknown,
    missing or mis-shaped entry raises ValueError.
    """
    shapes, flat = param_shapes(), {}
    for key, value in state_dict.items():
        path = _param_path_of_key(key)
        if path is None:
            continue
        if path not in shapes:
            raise ValueError(f"state_dict key {key!r} is not a FID InceptionV3 parameter")
        value = to_numpy(value).astype(np.float32)
        value = kernel_from_torch(value) if path[-1] == "kernel" else value
        if value.shape != shapes[path]:
            raise ValueError(f"state_dict {key!r} has shape {value.shape} after transposing to "
                             f"flax layout; the model needs {shapes[path]}")
        flat[path] = value
    missing = sorted(".".join(p) for p in shapes.keys() - flat.keys())
    if missing:
        raise ValueError(f"state_dict lacks {len(missing)} FID InceptionV3 entries, e.g. "
                         f"{missing[:3]} (flax names)")
    return nest(flat)


def load_fid_weights(path):
    """Flax params of the FID InceptionV3 from a local `.pth` (torch) or converted `.npz`.

    E.g. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`; nothing is downloaded.
    """
    return params_from_torch_state_dict(read_state_dict(path))


def convert_pth_to_npz(pth_path, npz_path):
    """Write the torch state_dict in `pth_path` as an `.npz` of the same keys (needs torch)."""
    state_dict = read_state_dict(pth_path)
    params_from_torch_state_dict(state_dict)  # refuse to write a file that would not load
    arrays = {k: to_numpy(v) for k, v in state_dict.items()
              if not k.endswith("num_batches_tracked")}
    np.savez(npz_path, **arrays)
