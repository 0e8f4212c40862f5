"""PyTorch state_dicts <-> Flax parameter trees: the pieces every conversion shares.

A torch `Linear` weight is (out, in) and a `Conv2d` weight (out, in, kh, kw); Flax stores the
kernel as (in, out) and (kh, kw, in, out). torch is imported only to read a `.pth` file.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def to_numpy(value):
    """A torch tensor (on any device) or an array-like as a numpy array."""
    return np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)


def kernel_from_torch(weight):
    """A torch Linear/Conv2d weight as the Flax kernel: (out, in) -> (in, out), OIHW -> HWIO."""
    return weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T


def kernel_to_torch(kernel):
    """The inverse of `kernel_from_torch`: (in, out) -> (out, in), HWIO -> OIHW."""
    return kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T


def nest(flat):
    """{path tuple: array} -> the nested params dict, leaves as jax arrays."""
    params = {}
    for path, value in flat.items():
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(value)
    return params


def read_state_dict(path):
    """{key: tensor or array} from a torch `.pth`/`.pt` file (needs torch) or an `.npz` of the
    same keys."""
    path = str(path)
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    if path.endswith((".pth", ".pt")):
        import torch  # only needed for the PyTorch file

        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state_dict, dict):
            raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state_dict")
        return state_dict
    raise ValueError(f"weights file must end in .pth, .pt or .npz, got {path!r}")
