"""transformers `CLIPTextModel` / `CLIPTextModelWithProjection` folders <-> `jaxdiff.models.clip`
(Stable Diffusion's `text_encoder`, SDXL's `text_encoder_2`).

The Flax tree mirrors the hub's state_dict names (`text_model.encoder.layers.0.self_attn.q_proj`),
so loading is `folders.load_params` with one exception: transformers 5 saves a `CLIPTextModel`
without the `text_model.` prefix, which `load` detects and strips. The `position_ids` buffer
that older checkpoints carry is skipped (positions are always 0 .. S-1). `export` writes the
prefixed layout, which every transformers version loads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.interop import folders
from jaxdiff.models.clip import ACTIVATIONS, CLIPTextModel, CLIPTextModelWithProjection

CLASSES = {"CLIPTextModel": CLIPTextModel,
           "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
PREFIX = "text_model."
POSITION_IDS = ("text_model.embeddings.position_ids", "embeddings.position_ids")
# transformers 5's CLIPTextConfig defaults, for keys a config.json leaves out
DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
         "num_attention_heads", "max_position_embeddings", "projection_dim")


def _class_name(config):
    names = config.get("architectures") or []
    return "CLIPTextModelWithProjection" if "CLIPTextModelWithProjection" in names \
        else "CLIPTextModel"


def _value(config, key):
    value = config.get(key)
    return DEFAULTS[key] if value is None else value


def from_config(config, *, dtype=jnp.float32, param_dtype=None, implementation=None):
    """The `CLIPTextModel` or `CLIPTextModelWithProjection` (by `architectures`) of a
    transformers `CLIPTextConfig` dict; compute in `dtype`, weights in `param_dtype` (default:
    `dtype`). One-line ValueError for a value the module cannot reproduce."""
    fields = {key: _value(config, key) for key in DEFAULTS}
    for key in SIZES:
        if not isinstance(fields[key], int) or isinstance(fields[key], bool) or fields[key] <= 0:
            raise ValueError(f"CLIP text config {key}={fields[key]!r} must be a positive integer")
    if fields["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"CLIP text config hidden_act={fields['hidden_act']!r} is not supported; "
                         f"allowed: {', '.join(ACTIVATIONS)}")
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise ValueError(f"CLIP text config hidden_size={fields['hidden_size']} is not divisible "
                         f"by num_attention_heads={fields['num_attention_heads']}")
    eos = fields["eos_token_id"]
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    if not isinstance(eos, int) or isinstance(eos, bool):
        raise ValueError(f"CLIP text config eos_token_id={eos!r} is not supported; allowed: one "
                         "integer token id")
    fields["eos_token_id"] = eos
    if not isinstance(fields["layer_norm_eps"], (int, float)) or fields["layer_norm_eps"] < 0:
        raise ValueError(f"CLIP text config layer_norm_eps={fields['layer_norm_eps']!r} must be a "
                         "number >= 0")
    fields["layer_norm_eps"] = float(fields["layer_norm_eps"])
    cls = CLASSES[_class_name(config)]
    if cls is CLIPTextModel:
        fields.pop("projection_dim")
    return cls(**fields, implementation=implementation, dtype=dtype,
               param_dtype=dtype if param_dtype is None else param_dtype)


def abstract_params(module):
    """The module's parameter shapes (no computation)."""
    ids = jnp.zeros((1, module.max_position_embeddings), jnp.int32)
    return jax.eval_shape(module.init, jax.random.key(0), ids)["params"]


def load(folder, *, dtype=None, shardings=None, implementation=None):
    """(module, params) of a transformers CLIP text-encoder folder (`config.json` +
    `model.safetensors`), weights cast to `dtype` (default: float32) and placed by `shardings`
    (see `folders.load_params`). A folder of another class is a one-line ValueError."""
    config = folders.read_config(folder)
    folders.check_class(config, tuple(CLASSES), folder)
    dtype = jnp.float32 if dtype is None else dtype
    module = from_config(config, dtype=dtype, implementation=implementation)
    tensors = folders.Tensors(folders.weight_files(folder))
    # transformers 5 writes CLIPTextModel without the text_model. prefix; the hub files have it
    final = "final_layer_norm.weight"
    bare = final in tensors and PREFIX + final not in tensors

    def rename(path):
        key = folders.torch_key(path)
        return key[len(PREFIX):] if bare and key.startswith(PREFIX) else None

    params = folders.load_params(tensors, abstract_params(module), rename=rename, dtype=dtype,
                                 shardings=shardings, ignore=POSITION_IDS,
                                 what=type(module).__name__)
    return module, params


def config_of(module, params=None):
    """The transformers `config.json` dict that rebuilds `module`."""
    name = type(module).__name__
    if name not in CLASSES:
        raise ValueError(f"cannot export a {name}; allowed: {', '.join(CLASSES)}")
    config = {"architectures": [name], "model_type": "clip_text_model",
              "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02}
    for key in DEFAULTS:
        if hasattr(module, key):
            config[key] = getattr(module, key)
    if name == "CLIPTextModel":
        config["projection_dim"] = DEFAULTS["projection_dim"]  # unused; keeps the config complete
    if params is not None:
        leaf = jax.tree_util.tree_leaves(params)[0]
        config["dtype"] = np.dtype(leaf.dtype).name
    return config


def export(folder, module, params):
    """Write `params` of `module` as a transformers folder (`config.json` + `model.safetensors`,
    hub key layout) that `CLIPTextModel`/`CLIPTextModelWithProjection.from_pretrained` loads."""
    return folders.save_params(folder, params, config_of(module, params),
                               filename="model.safetensors")
