"""diffusers `UNet2DConditionModel` folders (Stable Diffusion 1.x/2.x/XL's `unet`) <->
`jaxdiff.models.unet_condition.UNet2DConditionModel`.

The Flax module's fields are the diffusers config keys it supports, and its tree mirrors the
state_dict names, so loading is `folders.load_params` without renames and export writes the
module's fields back as `config.json`. A config key the module cannot reproduce (another block
type, class embeddings other than a label table, Kandinsky's image embeddings, ...) is a
one-line ValueError naming the key, its value and what is allowed; keys that do not change the
supported blocks (`resnet_skip_time_act`, `resnet_out_scale_factor`,
`addition_embed_type_num_heads`) are accepted with any value and not written back.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdiff.interop import folders
from jaxdiff.models.diffusers_blocks import ACTIVATIONS
from jaxdiff.models.unet_condition import (
    ADDITION_EMBED_TYPES,
    TIME_SCALE_SHIFTS,
    UNet2DConditionModel,
)

CLASS = "UNet2DConditionModel"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose config keys this mirrors
NOT_FIELDS = ("implementation", "dtype", "param_dtype", "parent", "name")
FIELDS = tuple(f.name for f in dataclasses.fields(UNet2DConditionModel)
               if f.name not in NOT_FIELDS)
# keys whose only supported value is diffusers' default (a list of falses counts as false)
FIXED = {"only_cross_attention": False, "mid_block_only_cross_attention": None,
         "num_attention_heads": None, "dual_cross_attention": False, "class_embed_type": None,
         "encoder_hid_dim": None, "encoder_hid_dim_type": None,
         "time_embedding_type": "positional", "attention_type": "default",
         "cross_attention_norm": None}
FIXED_ALSO = {"mid_block_only_cross_attention": (False,)}  # further values meaning the default
# keys that only other block types read
IGNORED = ("resnet_skip_time_act", "resnet_out_scale_factor", "addition_embed_type_num_heads")
POSITIVE = ("in_channels", "out_channels", "norm_num_groups", "conv_in_kernel",
            "conv_out_kernel")
POSITIVE_OR_NONE = ("num_class_embeds", "addition_time_embed_dim",
                    "projection_class_embeddings_input_dim", "time_embedding_dim",
                    "time_cond_proj_dim")
ACTIVATION_KEYS = ("act_fn", "time_embedding_act_fn", "timestep_post_act")


def _tuples(value):
    """JSON lists (nested) as tuples, so the module's fields are hashable."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fixed(config):
    for key, default in FIXED.items():
        value = config.get(key, default)
        if key == "only_cross_attention" and isinstance(value, (list, tuple)):
            ok = all(v is False for v in value)
        else:
            ok = value == default and type(value) is type(default) \
                or value in FIXED_ALSO.get(key, ())
        if not ok:
            raise ValueError(f"UNet2DConditionModel config {key}={value!r} is not supported; "
                             f"allowed: {default!r}")


def _check_values(fields):
    for key in POSITIVE:
        if not _is_int(fields[key]) or fields[key] < 1:
            raise ValueError(f"UNet2DConditionModel config {key}={fields[key]!r} is not "
                             "supported; allowed: a positive integer")
    for key in POSITIVE_OR_NONE:
        if fields[key] is not None and (not _is_int(fields[key]) or fields[key] < 1):
            raise ValueError(f"UNet2DConditionModel config {key}={fields[key]!r} is not "
                             "supported; allowed: a positive integer or null")
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if fields[key] % 2 == 0:
            raise ValueError(f"UNet2DConditionModel config {key}={fields[key]} is not supported; "
                             "allowed: an odd kernel size")
    if not _is_int(fields["downsample_padding"]) or fields["downsample_padding"] < 0:
        raise ValueError(f"UNet2DConditionModel config downsample_padding="
                         f"{fields['downsample_padding']!r} is not supported; allowed: an "
                         "integer >= 0")
    for key in ACTIVATION_KEYS:
        if not (fields[key] is None and key != "act_fn") and fields[key] not in ACTIVATIONS:
            raise ValueError(f"UNet2DConditionModel config {key}={fields[key]!r} is not "
                             f"supported; allowed: {', '.join(ACTIVATIONS)}"
                             + ("" if key == "act_fn" else " or null"))
    if fields["resnet_time_scale_shift"] not in TIME_SCALE_SHIFTS:
        raise ValueError(f"UNet2DConditionModel config resnet_time_scale_shift="
                         f"{fields['resnet_time_scale_shift']!r} is not supported; allowed: "
                         f"{', '.join(TIME_SCALE_SHIFTS)}")
    kind = fields["addition_embed_type"]
    if kind not in ADDITION_EMBED_TYPES:
        raise ValueError(f"UNet2DConditionModel config addition_embed_type={kind!r} is not "
                         "supported; allowed: null or 'text_time' (SDXL)")
    if kind == "text_time":
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if fields[key] is None:
                raise ValueError(f"UNet2DConditionModel config addition_embed_type='text_time' "
                                 f"needs {key} (a positive integer), got null")
        if fields["projection_class_embeddings_input_dim"] < fields["addition_time_embed_dim"]:
            raise ValueError("UNet2DConditionModel config projection_class_embeddings_input_dim="
                             f"{fields['projection_class_embeddings_input_dim']} is smaller than "
                             f"addition_time_embed_dim={fields['addition_time_embed_dim']}")
    for key in ("norm_eps", "freq_shift", "mid_block_scale_factor", "dropout"):
        if not isinstance(fields[key], (int, float)) or isinstance(fields[key], bool):
            raise ValueError(f"UNet2DConditionModel config {key}={fields[key]!r} is not "
                             "supported; allowed: a number")


def from_config(config, *, dtype=jnp.float32, param_dtype=None, implementation=None):
    """The `UNet2DConditionModel` of a diffusers `config.json` dict; compute in `dtype`,
    weights in `param_dtype` (default: `dtype`). One-line ValueError for a key or value the
    module cannot reproduce."""
    unknown = sorted(k for k in config
                     if not k.startswith("_") and k not in FIELDS and k not in FIXED
                     and k not in IGNORED)
    if unknown:
        raise ValueError(f"UNet2DConditionModel config key {unknown[0]!r} is unknown; allowed: "
                         "the keys of diffusers' UNet2DConditionModel")
    _check_fixed(config)
    defaults = {f.name: f.default for f in dataclasses.fields(UNet2DConditionModel)}
    fields = {key: _tuples(config.get(key, defaults[key])) for key in FIELDS}
    _check_values(fields)
    module = UNet2DConditionModel(**fields, implementation=implementation, dtype=dtype,
                                  param_dtype=dtype if param_dtype is None else param_dtype)
    module.plan()  # block types, per-block lists, divisibility: one-line errors now
    return module


def example_inputs(module, batch=1):
    """Zero inputs of the smallest size the module takes: (sample, timestep,
    encoder_hidden_states, keyword arguments), for `init` and shape inference."""
    plan = module.plan()
    side = 2 ** (len(module.block_out_channels) - 1)
    sample = jnp.zeros((batch, side, side, module.in_channels), module.dtype)
    context = jnp.zeros((batch, 1, plan["cross_dims"][0]), module.dtype)
    kwargs = {}
    if module.addition_embed_type == "text_time":
        width = module.projection_class_embeddings_input_dim - module.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": jnp.zeros((batch, width), module.dtype),
                                       "time_ids": jnp.zeros((batch, 1), jnp.float32)}
    if module.num_class_embeds is not None:
        kwargs["class_labels"] = jnp.zeros((batch,), jnp.int32)
    if module.time_cond_proj_dim is not None:
        kwargs["timestep_cond"] = jnp.zeros((batch, module.time_cond_proj_dim), module.dtype)
    return sample, jnp.zeros((batch,), jnp.float32), context, kwargs


def abstract_params(module):
    """The module's parameter shapes (no computation)."""
    sample, t, context, kwargs = example_inputs(module)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), sample, t, context,
                                              **kwargs))["params"]


def init(module, key):
    """Freshly initialised parameters of `module` (random weights, e.g. for tests)."""
    sample, t, context, kwargs = example_inputs(module)
    return module.init(key, sample, t, context, **kwargs)["params"]


def load(folder, *, dtype=None, shardings=None, implementation=None):
    """(module, params) of a diffusers `UNet2DConditionModel` folder (`config.json` +
    `diffusion_pytorch_model.safetensors` or its shards), computing in and with weights cast to
    `dtype` (default: float32), placed by `shardings` (see `folders.load_params`). A folder of
    another class is a one-line ValueError."""
    config = folders.read_config(folder)
    folders.check_class(config, (CLASS,), folder)
    dtype = jnp.float32 if dtype is None else dtype
    module = from_config(config, dtype=dtype, implementation=implementation)
    params = folders.load_params(folder, abstract_params(module), dtype=dtype,
                                 shardings=shardings, what=CLASS)
    return module, params


def config_of(module):
    """The diffusers `config.json` dict that rebuilds `module`."""
    if not isinstance(module, UNet2DConditionModel):
        raise ValueError(f"cannot export a {type(module).__name__}; allowed: {CLASS}")
    module.plan()
    config = {"_class_name": CLASS, "_diffusers_version": DIFFUSERS_VERSION}
    for key in FIELDS:
        config[key] = getattr(module, key)
    return config


def export(folder, module, params):
    """Write `params` of `module` as a diffusers folder (`config.json` +
    `diffusion_pytorch_model.safetensors`) that `UNet2DConditionModel.from_pretrained` loads."""
    return folders.save_params(folder, params, config_of(module))
