"""Paired datasets: examples stored with the noise they were generated from (reflow's
(noise, sample) couplings, `jaxdiff.distill`), as one .npz file read through grain like every
dataset here: shuffled, batched, repeated, with a checkpointable iterator state.

    pairs.write(path, x=samples, noise=noise, label=labels)   # atomic
    it = pairs.build(path, batch_size=32, seed=0)             # {"x", "noise", "label"} batches
"""

from __future__ import annotations

import os

import grain
import numpy as np

KEYS = ("x", "noise", "label")


def write(path, *, x, noise, label):
    """Writes the arrays to `path` (.npz) atomically: a killed write leaves no file there."""
    x, noise, label = np.asarray(x, np.float32), np.asarray(noise, np.float32), np.asarray(label)
    if x.shape != noise.shape or label.shape != x.shape[:1]:
        raise ValueError(f"pairs: x {x.shape}, noise {noise.shape} and label {label.shape} must "
                         "share the first dimension (and x and noise their shape)")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, x=x, noise=noise, label=label.astype(np.int32))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path):
    """{"x", "noise", "label"} arrays of a pairs file; one line for a file that is not one."""
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in KEYS}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a pairs file (.npz with {', '.join(KEYS)}): "
                         f"{type(e).__name__}") from None
    return arrays


class _Source:
    """Random access to the pairs: item i is {"x", "noise", "label"} at row i."""

    def __init__(self, arrays):
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays["x"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.arrays.items()}


def build(path, *, batch_size, seed=0, shuffle=True, num_epochs=None):
    """An iterator of {"x", "noise", "label"} batches (drop_remainder) of the pairs at `path`,
    shuffled by `seed`, repeated forever by default."""
    arrays = load(path)
    if len(arrays["x"]) < batch_size:
        raise ValueError(f"{path} holds {len(arrays['x'])} pairs, fewer than one batch of "
                         f"{batch_size}")
    ds = grain.MapDataset.source(_Source(arrays))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.batch(batch_size, drop_remainder=True).repeat(num_epochs)
    return iter(ds.to_iter_dataset())
