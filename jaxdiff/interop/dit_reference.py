"""facebookresearch/DiT checkpoints <-> `jaxdiff.models.DiT` params (Peebles & Xie 2023).

The parameter tree of `jaxdiff.models.dit` mirrors the reference `models.py` one-to-one: joining
a Flax path with "." gives the PyTorch state_dict key up to the leaf name (`kernel` <-> `weight`,
transposed; `embedding` <-> `weight`), e.g. `blocks.3.attn.qkv.kernel` <->
`blocks.3.attn.qkv.weight`, so conversion is a rename. The reference's `pos_embed` buffer is not
a parameter here: it is recomputed from the image size, and checked on import.
"""

from __future__ import annotations

import flax.linen as nn
import numpy as np

from jaxdiff.interop.torch_weights import kernel_from_torch, kernel_to_torch, nest, to_numpy
from jaxdiff.models.dit import sincos_pos_embed_2d


def _module_names(module_path):
    """'blocks.3.attn.qkv' -> ('blocks.3', 'attn', 'qkv'): the Flax module names along a torch
    module path (a numbered child of a ModuleList joins its parent's name)."""
    path = []
    for token in module_path.split("."):
        if token.isdigit() and path:
            path[-1] = f"{path[-1]}.{token}"
        else:
            path.append(token)
    return tuple(path)


def dit_from_torch_state_dict(state_dict):
    """Flax `params` tree from a facebookresearch/DiT state_dict (name -> tensor or array).

    Linear weights (out, in) become kernels (in, out); the patch conv (D, C, p, p) becomes
    (p, p, C, D); the label table keeps its layout. `pos_embed` is checked against the fixed
    embedding and dropped. An unknown or repeated key raises ValueError.
    """
    flat = {}
    for key, value in state_dict.items():
        value = to_numpy(value)
        if key == "pos_embed":
            _check_pos_embed(value)
            continue
        module, _, leaf = key.rpartition(".")
        if leaf not in ("weight", "bias") or not module:
            raise ValueError(f"state_dict key {key!r} is not a DiT parameter")
        if leaf == "weight" and module.endswith("embedding_table"):
            leaf = "embedding"
        elif leaf == "weight":
            leaf, value = "kernel", kernel_from_torch(value)
        path = _module_names(module) + (leaf,)
        if path in flat:
            raise ValueError(f"state_dict key {key!r} appears twice")
        flat[path] = value
    return nest(flat)


def _check_pos_embed(value):
    """The reference stores its fixed sin-cos table; it must be the one we recompute."""
    _, tokens, dim = value.shape
    grid = int(round(np.sqrt(tokens)))
    if not np.allclose(value[0], sincos_pos_embed_2d(dim, grid, grid), atol=1e-5):
        raise ValueError("state_dict pos_embed differs from the fixed 2-D sin-cos embedding")


def dit_torch_key(path):
    """Flax param path (tuple of names) -> the reference state_dict key."""
    *modules, leaf = path
    name = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join(modules + [name])


def dit_to_torch_state_dict(params):
    """Inverse of `dit_from_torch_state_dict` (numpy arrays, no `pos_embed`)."""
    out = {}
    stack = [((), nn.unbox(params))]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((path + (k,), v) for k, v in node.items())
            continue
        value = np.asarray(node)
        if path[-1] == "kernel":
            value = kernel_to_torch(value)
        out[dit_torch_key(path)] = value
    return dict(sorted(out.items()))
