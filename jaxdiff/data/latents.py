"""An image autoencoder's latents as a training set: latent diffusion (Rombach et al. 2022).

A diffusion model trained in the latent space of a KL-regularised autoencoder sees each image
as the posterior mean of its encoding, rescaled to unit variance: LDM's `scale_factor` is
1 / std of the latents (Sec. 4.3.2 and App. G; computed there on the first batch, here on the
whole train split), and diffusers' `shift_factor` (SD3, Flux) their mean. The model trains on
`(z - shift) * scale`; its samples go back through `z = latent / scale + shift` and the decoder
(`AutoencoderKL.from_latent`, then `decode`).

- `in_batches(fn, x, batch=...)`: a network over a whole split (the encoder over the images, the
  decoder over samples) in fixed-size batches (one compiled program);
- `scale_shift(z)`: (scale, shift) of the latents of a train split;
- `cached(path, make, expect=...)`: a latents file (`.npz`: z, label, scale, shift and what
  made them), made once by `make()` and written atomically (a temporary name, then
  `os.replace`), read back after while its records match `expect`;
- `build(x, label, batch_size=...)`: a grain iterator of `{"x", "label"}` batches over arrays in
  memory, shuffled, sharded over processes and checkpointable exactly as
  `jaxdiff.data.pipeline.build`'s (the same stages, `ArraySource` as the source).

Library functions take explicit arguments; `jaxdiff.cli.build` reads the configs (`data.latents`
names the autoencoder run) and restores the autoencoder.
"""

from __future__ import annotations

import os
import socket

import grain
import numpy as np

from jaxdiff.data import pipeline
from jaxdiff.data.toy2d import ArraySource

BATCH = 256  # rows per call of `in_batches`


def in_batches(fn, x, *, batch=BATCH):
    """fn(rows (batch, ...)) -> (batch, ...) over all of `x` (numpy, any length) in batches of
    `batch` (the last one padded with its final row, the padding dropped): float32 numpy. One
    batch shape: one compiled program for any length."""
    x = np.asarray(x, np.float32)
    if not len(x):
        raise ValueError("in_batches: no rows")
    out = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        out.append(np.asarray(fn(chunk), np.float32)[:n])
    return np.concatenate(out)


def scale_shift(z):
    """(scale, shift) = (1 / std, mean) over every value of the latents `z`: `(z - shift) *
    scale` has mean 0 and variance 1."""
    z = np.asarray(z, np.float64)
    std = float(np.std(z))
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"the latents have standard deviation {std}; they cannot be scaled to "
                         "unit variance (a collapsed or diverged autoencoder?)")
    return 1.0 / std, float(np.mean(z))


def to_latent(z, scale, shift):
    """The diffusion model's latent of an autoencoder latent: (z - shift) * scale."""
    return ((np.asarray(z, np.float32) - np.float32(shift)) * np.float32(scale)).astype(
        np.float32)


def cached(path, make, *, expect=None):
    """The arrays of the latents file `path` ({z, label, scale, shift, ...}, as numpy / Python
    scalars): read when it exists and its entries equal `expect` (e.g. the autoencoder's
    checkpoint step), else `make()` (a dict of the same), written atomically first.

    A file whose records differ from `expect` is refused (ValueError, one line): latents made
    by another autoencoder would silently change a run trained on them; delete the file to make
    them anew."""
    expect = dict(expect or {})
    if os.path.exists(path):
        data = read(path)
        for key, want in expect.items():
            if key not in data or data[key] != want:
                raise ValueError(
                    f"{path} holds latents made with {key}={data.get(key)!r}, not {want!r} as "
                    "now; delete it to encode the data anew (runs trained on the old latents "
                    "then no longer decode as they did)")
        return data
    data = dict(make(), **expect)
    write(path, data)
    return read(path)


def write(path, data):
    """`data` (arrays and scalars) as the .npz `path`, atomically: a per-process temporary name
    in the same directory, then `os.replace`, so readers never see a partial file and processes
    writing the same file at once do not clash."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in data.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read(path):
    """A latents file: arrays as numpy, 0-d entries as Python scalars."""
    with np.load(path) as f:
        return {k: (f[k].item() if f[k].ndim == 0 else np.asarray(f[k])) for k in f.files}


def build(x, label, *, batch_size, seed=0, shuffle=True, num_epochs=None, process_index=0,
          process_count=1, num_threads=4, prefetch=8):
    """Per-process iterator of `{"x": float32, "label": int32}` batches of `batch_size` over
    the arrays `x` (N, ...) and `label` (N,), as `jaxdiff.data.pipeline.build` gives them for a
    dataset: a global permutation per epoch from `seed`, batches never straddling epochs, every
    `process_count`-th batch for process `process_index`; `get_state()` / `set_state()` resume
    the exact stream."""
    pipeline._check_args("latents", batch_size, seed, num_epochs, process_index, process_count,
                         False, None)
    if len(x) != len(label):
        raise ValueError(f"{len(x)} latents but {len(label)} labels")
    ds = grain.MapDataset.source(ArraySource(np.asarray(x, np.float32),
                                             np.asarray(label, np.int32)))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = pipeline._shard(ds, batch_size, process_index, process_count)
    ds = ds.map(pipeline._to_model_inputs).repeat(num_epochs)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))
