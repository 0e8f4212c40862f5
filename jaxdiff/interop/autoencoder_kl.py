"""diffusers `AutoencoderKL` folders (`vae/` of a Stable Diffusion / SDXL / SD3 / Flux pipeline)
<-> `jaxdiff.models.autoencoder_kl.AutoencoderKL`.

The Flax tree mirrors diffusers' state_dict, so `folders.torch_key` names every parameter; the
only exception is older checkpoints (saved before diffusers renamed its attention block) whose
mid-block attention is stored as `query`, `key`, `value`, `proj_attn`: they are read under those
names, as diffusers' own loader does.

- `from_config(config, *, dtype=None, attention_impl=None) -> AutoencoderKL`
- `load(folder, *, dtype=None, shardings=None, attention_impl=None) -> (model, params)`
- `export(folder, model, params, *, dtype=None) -> folder` (readable by
  `diffusers.AutoencoderKL.from_pretrained`)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.interop import folders
from jaxdiff.models.autoencoder_kl import DOWN_BLOCKS, UP_BLOCKS, AutoencoderKL
from jaxdiff.models.diffusers_blocks import ACTIVATIONS

CLASSES = ("AutoencoderKL",)
# config keys that become module fields, and those that do not change the network
FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types",
          "block_out_channels", "layers_per_block", "act_fn", "latent_channels",
          "norm_num_groups", "sample_size", "scaling_factor", "shift_factor", "latents_mean",
          "latents_std", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")
IGNORED = ("force_upcast",)  # a PyTorch dtype policy; here the caller picks the dtype
# the pre-rename names of the mid-block attention's projections
LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _check_dtype(dtype):
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype {np.dtype(dtype)} cannot hold AutoencoderKL weights; allowed: "
                         "a floating dtype (float32, bfloat16, float16, float64)")


def from_config(config, *, dtype=None, attention_impl=None):
    """The Flax `AutoencoderKL` a diffusers `config.json` dict describes (computing and holding
    parameters in `dtype`, float32 by default); one-line ValueError for a key or value it does
    not support."""
    _check_dtype(dtype)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in FIELDS + IGNORED)
    if unknown:
        raise ValueError(f"AutoencoderKL config key(s) {', '.join(unknown)} are not supported; "
                         f"allowed: {', '.join(FIELDS + IGNORED)}")
    fields = {k: config[k] for k in FIELDS if k in config}
    for key in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean",
                "latents_std"):
        if fields.get(key) is not None:
            fields[key] = tuple(fields[key])
    for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                "norm_num_groups"):
        value = fields.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"AutoencoderKL config {key}={value!r} is not supported; allowed: "
                             "a positive integer")
    chans = fields.get("block_out_channels", AutoencoderKL.block_out_channels)
    if not chans or any(not isinstance(c, int) or c < 1 for c in chans):
        raise ValueError(f"AutoencoderKL config block_out_channels={chans!r} is not supported; "
                         "allowed: a non-empty list of positive integers")
    groups = fields.get("norm_num_groups", AutoencoderKL.norm_num_groups)
    if any(c % groups for c in chans):
        raise ValueError(f"AutoencoderKL config block_out_channels={list(chans)} is not "
                         f"supported with norm_num_groups={groups}; allowed: widths divisible by "
                         "it")
    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        types = fields.get(key, getattr(AutoencoderKL, key))
        bad = [t for t in types if t not in allowed]
        if bad or len(types) != len(chans):
            raise ValueError(f"AutoencoderKL config {key}={list(types)!r} is not supported; "
                             f"allowed: {len(chans)} (one per block_out_channels) of "
                             f"{', '.join(allowed)}")
    act = fields.get("act_fn", "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"AutoencoderKL config act_fn={act!r} is not supported; allowed: "
                         f"{', '.join(ACTIVATIONS)}")
    scale = fields.get("scaling_factor", AutoencoderKL.scaling_factor)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale == 0:
        raise ValueError(f"AutoencoderKL config scaling_factor={scale!r} is not supported; "
                         "allowed: a nonzero number")
    dtype = jnp.float32 if dtype is None else dtype
    return AutoencoderKL(**fields, attention_impl=attention_impl, dtype=dtype, param_dtype=dtype)


def abstract_params(model):
    """The model's parameter tree as ShapeDtypeStructs (no weights computed)."""
    side = 2 ** (len(model.block_out_channels) - 1)
    x = jax.ShapeDtypeStruct((1, side, side, model.in_channels), model.dtype)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def _legacy_rename(tensors):
    """Read the mid-block attention under its pre-rename names where the folder has them."""

    def rename(path):
        key = folders.torch_key(path)
        if ".attentions." not in key or key in tensors:
            return None
        for new, old in LEGACY_ATTENTION.items():
            legacy = key.replace(f".{new}.", f".{old}.")
            if legacy != key and legacy in tensors:
                return legacy
        return None

    return rename


def load(folder, *, dtype=None, shardings=None, attention_impl=None):
    """(model, params) from a diffusers `AutoencoderKL` folder (`config.json` +
    `diffusion_pytorch_model.safetensors`, or shards). `dtype`: compute and parameter dtype
    (default float32); `shardings`: see `folders.load_params`."""
    _check_dtype(dtype)
    config = folders.read_config(folder)
    folders.check_class(config, CLASSES, folder)
    model = from_config(config, dtype=dtype, attention_impl=attention_impl)
    tensors = folders.Tensors(folders.weight_files(folder))
    params = folders.load_params(tensors, abstract_params(model), rename=_legacy_rename(tensors),
                                 dtype=dtype, shardings=shardings, what="AutoencoderKL")
    return model, params


def config_of(model):
    """The diffusers `config.json` dict of `model`."""
    config = {"_class_name": "AutoencoderKL"}
    for key in FIELDS:
        value = getattr(model, key)
        config[key] = list(value) if isinstance(value, tuple) else value
    config["force_upcast"] = True
    return config


def export(folder, model, params, *, dtype=None):
    """Write `params` of `model` as a diffusers AutoencoderKL folder (atomically: an existing
    folder is replaced whole or left as it was); `dtype` casts the stored weights."""
    if dtype is not None:
        _check_dtype(dtype)
    return folders.save_params(folder, params, config_of(model), dtype=dtype)
