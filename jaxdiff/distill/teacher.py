"""A student's teacher: what the student records of it (the run, the step and a digest of the
parameters, so that its provenance can be checked later), the teacher under classifier-free
guidance as one network (`with_cfg`), and a student's init from its params (`graft`)."""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np


def params_digest(params):
    """sha256 (hex) over a parameter tree's paths, dtypes, shapes and bytes, in flatten order:
    equal for bit-identical trees, different when any leaf, shape, dtype or name differs."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.asarray(jax.device_get(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def teacher_record(workdir, step, params):
    """{"workdir": absolute path, "step": the checkpoint step, "params_sha256": digest}: the
    `teacher` entry of a student's config."""
    return {"workdir": os.path.abspath(workdir), "step": int(step),
            "params_sha256": params_digest(params)}


def with_cfg(apply, w, num_classes):
    """The teacher under classifier-free guidance at scale w as one network: u + w (c - u) of
    its raw outputs (every prediction type is affine in the denoiser with the same
    coefficients, so this is CFG on the denoiser); the network itself for w = 1 or no classes."""
    if not num_classes or w == 1.0:
        return apply

    def guided(params, x, t, y):
        c = apply(params, x, t, y)
        u = apply(params, x, t, jnp.full_like(y, num_classes))
        return u + w * (c - u)

    return guided


def graft(fresh, source):
    """`fresh` (a student's init) with every entry `source` also has taken from `source`; a
    guidance embedding only the student has starts at zero output (`zero_last`). Leaves are
    copies in the student's dtypes: a train step that donates them never touches the source."""
    if isinstance(fresh, dict):
        out = {}
        for k, v in fresh.items():
            if k in source:
                out[k] = graft(v, source[k])
            elif k in ("guidance_embed", "w_embedder"):
                out[k] = zero_last(v)
            else:
                out[k] = v
        return out
    return jnp.array(source, fresh.dtype, copy=True)  # the step donates it: never the teacher's


def zero_last(tree):
    """An embedder's params with its final dense layer (the last in name order) zeroed."""
    last = sorted(tree)[-1]  # the embedder's final dense layer ("mlp.2")
    return {k: (jax.tree.map(jnp.zeros_like, v) if k == last else v) for k, v in tree.items()}
