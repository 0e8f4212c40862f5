"""What a student records of its teacher (issue 15): the run, the step and a digest of the
parameters, so that a student's provenance can be checked against the teacher run later."""

from __future__ import annotations

import hashlib
import os

import jax
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
