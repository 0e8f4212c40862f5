"""diffusers `SD3Transformer2DModel` folders (Stable Diffusion 3 / 3.5's `transformer/`) <->
`jaxdiff.models.mmdit.MMDiT`.

The Flax tree mirrors the diffusers state_dict, so the keys follow from the Flax paths
(`folders.torch_key`) with no rename. The folder's one buffer, the fixed position table
`pos_embed.pos_embed`, is recomputed by the model; on load it is compared with the recomputed
table (a folder whose table differs is refused), on export it is written so that diffusers'
`from_pretrained` finds every key it expects.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.interop import folders
from jaxdiff.models.mmdit import QK_NORMS, MMDiT, pos_embed_table

CLASS_NAMES = ("SD3Transformer2DModel",)
POS_EMBED_KEY = "pos_embed.pos_embed"
# config.json keys -> MMDiT fields (the same names), with diffusers' defaults
DEFAULTS = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=18,
                attention_head_dim=64, num_attention_heads=18, joint_attention_dim=4096,
                caption_projection_dim=1152, pooled_projection_dim=2048, out_channels=16,
                pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None)
POSITIVE = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
            "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
            "pooled_projection_dim", "out_channels", "pos_embed_max_size")


def from_config(config, *, dtype=jnp.float32, param_dtype=None, attention_impl=None):
    """The `MMDiT` a diffusers `SD3Transformer2DModel` config.json (dict) describes; one-line
    ValueError for a key or value it does not support."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DEFAULTS)
    if unknown:
        raise ValueError(f"SD3Transformer2DModel config key {unknown[0]!r} is not supported; "
                         f"allowed: {', '.join(DEFAULTS)}")
    fields = {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}}
    if fields["out_channels"] is None:  # diffusers: out_channels defaults to in_channels
        fields["out_channels"] = fields["in_channels"]
    for key in POSITIVE:
        value = fields[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"SD3Transformer2DModel config {key}={value!r} is not supported; "
                             "allowed: a positive integer")
    if fields["qk_norm"] not in QK_NORMS:
        raise ValueError(f"SD3Transformer2DModel config qk_norm={fields['qk_norm']!r} is not "
                         f"supported; allowed: {', '.join(map(repr, QK_NORMS))}")
    layers, n = fields["dual_attention_layers"], fields["num_layers"]
    if not isinstance(layers, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in layers):
        raise ValueError(f"SD3Transformer2DModel config dual_attention_layers={layers!r} is not "
                         f"supported; allowed: a list of block indices in [0, {n})")
    fields["dual_attention_layers"] = tuple(layers)
    inner = fields["num_attention_heads"] * fields["attention_head_dim"]
    if fields["caption_projection_dim"] != inner:
        raise ValueError(f"SD3Transformer2DModel config caption_projection_dim="
                         f"{fields['caption_projection_dim']} is not supported; allowed: "
                         f"num_attention_heads * attention_head_dim = {inner}")
    if inner % 4:
        raise ValueError(f"SD3Transformer2DModel config num_attention_heads * attention_head_dim"
                         f"={inner} is not supported; allowed: a multiple of 4 (2-D sin-cos table)")
    if fields["sample_size"] < fields["patch_size"]:
        raise ValueError(f"SD3Transformer2DModel config sample_size={fields['sample_size']} is "
                         f"not supported; allowed: at least patch_size={fields['patch_size']}")
    return MMDiT(**fields, attention_impl=attention_impl, dtype=dtype,
                 param_dtype=dtype if param_dtype is None else param_dtype)


def to_config(module):
    """The diffusers config.json dict of an `MMDiT`."""
    config = {key: getattr(module, key) for key in DEFAULTS}
    config["dual_attention_layers"] = list(config["dual_attention_layers"])
    return {"_class_name": CLASS_NAMES[0], **config}


def abstract_params(module):
    """The shapes and dtypes of the module's parameters (`jax.eval_shape`, nothing computed)."""
    p = module.patch_size
    inputs = (jnp.zeros((1, p, p, module.in_channels), module.dtype),
              jnp.zeros((1, 1, module.joint_attention_dim), module.dtype),
              jnp.zeros((1, module.pooled_projection_dim), module.dtype),
              jnp.zeros((1,), jnp.float32))
    return jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]


def load(folder, *, dtype=None, shardings=None, attention_impl=None):
    """(module, params) from a diffusers `SD3Transformer2DModel` folder: the module computes and
    holds its parameters in `dtype` (default float32); `shardings` as in `folders.load_params`.
    Use as `module.apply({"params": params}, hidden_states, encoder_hidden_states,
    pooled_projections, timestep)`."""
    config = folders.read_config(folder)
    folders.check_class(config, CLASS_NAMES, folder)
    module = from_config(config, dtype=jnp.float32 if dtype is None else dtype,
                         attention_impl=attention_impl)
    tensors = folders.Tensors(folders.weight_files(folder))
    params = folders.load_params(tensors, abstract_params(module), dtype=dtype,
                                 shardings=shardings, ignore=(POS_EMBED_KEY,),
                                 what="SD3Transformer2DModel")
    if POS_EMBED_KEY in tensors:
        _check_pos_embed(tensors, module, folder)
    return module, params


def _table(module):
    return pos_embed_table(module.inner_dim, module.pos_embed_max_size,
                           module.sample_size // module.patch_size)[None]


def _check_pos_embed(tensors, module, folder):
    """The folder's stored table must be the one the model recomputes (to its dtype's rounding)."""
    want = _table(module)
    shape = tensors.shape(POS_EMBED_KEY)
    if shape != want.shape:
        raise ValueError(f"{folder!r}: {POS_EMBED_KEY} has shape {shape}; the config needs "
                         f"{want.shape}")
    stored = tensors.read(POS_EMBED_KEY).astype(np.float32)
    tol = 4 * float(jnp.finfo(tensors.dtype(POS_EMBED_KEY)).eps)
    err = float(np.max(np.abs(stored - want)))
    if not err <= tol:
        raise ValueError(f"{folder!r}: {POS_EMBED_KEY} differs from the 2-D sin-cos table its "
                         f"config implies (max error {err:.3g}); this converter cannot load it")


def export(folder, module, params):
    """Write `params` (a tree or {"params": tree}) of an `MMDiT` as a diffusers folder
    (config.json + diffusion_pytorch_model.safetensors, with the position-table buffer) that
    `SD3Transformer2DModel.from_pretrained` loads."""
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    return folders.save_params(folder, params, to_config(module),
                               extra={POS_EMBED_KEY: _table(module)})
