"""diffusers `DiTTransformer2DModel` folders <-> `jaxdiff.models.DiT` (Peebles & Xie 2023).

diffusers' DiT (norm_type "ada_norm_zero"; the older `Transformer2DModel` folders of DiT with a
`patch_size` hold the same weights) is the network of `jaxdiff.models.dit` under other names:

    diffusers                                           jaxdiff DiT
    pos_embed.proj                  (patch conv)        x_embedder.proj
    transformer_blocks.0.norm1.emb.timestep_embedder.linear_1 / linear_2
                                                        t_embedder.mlp.0 / mlp.2
    transformer_blocks.0.norm1.emb.class_embedder.embedding_table
                                    (K + 1 rows)        y_embedder.embedding_table
    transformer_blocks.N.norm1.linear                   blocks.N.adaLN_modulation.1
    transformer_blocks.N.attn1.to_q / to_k / to_v       blocks.N.attn.qkv (rows q, k, v)
    transformer_blocks.N.attn1.to_out.0                 blocks.N.attn.proj
    transformer_blocks.N.ff.net.0.proj / ff.net.2       blocks.N.mlp.fc1 / fc2
    proj_out_1                      (final adaLN)       final_layer.adaLN_modulation.1
    proj_out_2                                          final_layer.linear

Both split the block modulation as (shift, scale, gate) for attention then for the MLP, and the
final one as (shift, scale); both patchify row-major with the same 2-D sin-cos table; the label
table's last row (index K) is the classifier-free-guidance null label in both. diffusers keeps a
copy of the timestep/label embedder in every block (only block 0's is used); jaxdiff has one, so
loading takes block 0's and refuses a folder whose blocks' embedders differ, and export writes it
into every block.

Two things differ from the facebookresearch reference that `jaxdiff.models.DiT` follows:

- timestep features: diffusers' `CombinedTimestepLabelEmbeddings` uses `Timesteps(256,
  flip_sin_to_cos=True, downscale_freq_shift=1)`: [cos, sin] at frequencies 10000^(-i/127), where
  the reference (and `jaxdiff.models.layers.timestep_embedding`) uses 10000^(-i/128). No weight
  change makes one the other, so `from_config` builds a `DiT` with `frequency_shift=1`, which
  gives diffusers' frequencies; `export` refuses a DiT with another shift (train a DiT with
  `frequency_shift=1` in its config's model section to export it to diffusers exactly).
- the LayerNorm before the MLP uses `norm_eps` (default 1e-5) in diffusers, 1e-6 in the
  reference: the DiT's `mlp_norm_eps` takes the folder's, and export writes the module's.

diffusers recomputes its position table for another image size as a grid interpolated to
`sample_size` (`base_size`); jaxdiff's DiT uses the plain grid at every size, so the two agree at
`sample_size` (and diffusers' unpatchify assumes square images). jaxdiff's DiT takes x as NHWC and
the timestep `t` as diffusers does (the same numbers, `time_scale=1`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxdiff.interop import folders
from jaxdiff.models.dit import DiT

CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")
FREQUENCY_SIZE = 256  # CombinedTimestepLabelEmbeddings' Timesteps(num_channels=256)
FREQUENCY_SHIFT = 1.0  # ... and its downscale_freq_shift
CLASS_DROPOUT_PROB = 0.1  # LabelEmbedding's: > 0, so the table has the null row

# each class's constructor defaults for the keys that matter (a config may omit any of them)
_DEFAULTS = {
    "DiTTransformer2DModel": dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None,
        num_layers=28, attention_bias=True, sample_size=32, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        norm_elementwise_affine=False, norm_eps=1e-5),
    "Transformer2DModel": dict(
        num_attention_heads=16, attention_head_dim=88, in_channels=None, out_channels=None,
        num_layers=1, attention_bias=False, sample_size=None, patch_size=None,
        activation_fn="geglu", num_embeds_ada_norm=None, norm_type="layer_norm",
        norm_elementwise_affine=True, norm_eps=1e-5, cross_attention_dim=None,
        num_vector_embeds=None, only_cross_attention=False, double_self_attention=False,
        attention_type="default", caption_channels=None, interpolation_scale=None),
}
_OVERRIDES = ("dtype", "param_dtype", "attention_impl", "remat")

# the embedder every diffusers block repeats: (its key suffix, the jaxdiff module it becomes)
_EMBEDDER = "norm1.emb."
_EMB_SUFFIXES = ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
                 "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias",
                 "class_embedder.embedding_table.weight")


# --- config -------------------------------------------------------------------------------------


def _settings(config):
    """The config's values that matter, defaults filled in per class; one-line ValueError for
    anything jaxdiff's DiT cannot compute."""
    name = config.get("_class_name") or "DiTTransformer2DModel"
    if name not in _DEFAULTS:
        raise ValueError(f"_class_name={name!r} is not a diffusers DiT; allowed: "
                         f"{', '.join(CLASS_NAMES)}")
    c = {k: config.get(k, v) for k, v in _DEFAULTS[name].items()}

    def need(key, ok, allowed):
        if not ok:
            raise ValueError(f"{name} {key}={c[key]!r} is not supported by jaxdiff's DiT; "
                             f"allowed: {allowed}")

    positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
    need("norm_type", c["norm_type"] == "ada_norm_zero", "'ada_norm_zero'")
    for key in ("patch_size", "in_channels", "num_layers", "num_attention_heads",
                "attention_head_dim", "num_embeds_ada_norm", "sample_size"):
        need(key, positive(c[key]), "a positive integer")
    C = c["in_channels"]
    need("out_channels", c["out_channels"] in (None, C, 2 * C),
         f"null, in_channels={C} or 2 * in_channels={2 * C} (learn_sigma)")
    need("activation_fn", c["activation_fn"] == "gelu-approximate", "'gelu-approximate'")
    need("attention_bias", c["attention_bias"] is True, "true")
    need("norm_elementwise_affine", c["norm_elementwise_affine"] is False, "false")
    need("norm_eps", isinstance(c["norm_eps"], (int, float)) and c["norm_eps"] >= 0,
         "a number >= 0")
    need("sample_size", c["sample_size"] % c["patch_size"] == 0,
         f"a multiple of patch_size={c['patch_size']}")
    if name == "Transformer2DModel":
        for key in ("cross_attention_dim", "num_vector_embeds", "caption_channels"):
            need(key, c[key] is None, "null")
        for key in ("only_cross_attention", "double_self_attention"):
            need(key, c[key] is False, "false")
        need("attention_type", c["attention_type"] == "default", "'default'")
        scale = c["interpolation_scale"]
        scale = max(c["sample_size"] // 64, 1) if scale is None else scale
        need("interpolation_scale", scale == 1,
             "1 (null with sample_size < 128): jaxdiff's position table is not interpolated")
    return c


def from_config(config, **fields):
    """The `DiT` (frequency_shift=1) of a diffusers DiT `config.json` dict; `fields`: dtype,
    param_dtype, attention_impl, remat. One-line ValueError for a config it cannot compute."""
    unknown = sorted(set(fields) - set(_OVERRIDES))
    if unknown:
        raise ValueError(f"from_config takes no field(s) {unknown}; allowed: "
                         f"{', '.join(_OVERRIDES)}")
    c = _settings(config)
    return DiT(
        patch_size=c["patch_size"],
        hidden_size=c["num_attention_heads"] * c["attention_head_dim"],
        depth=c["num_layers"],
        num_heads=c["num_attention_heads"],
        mlp_ratio=4.0,  # FeedForward(mult=4)
        num_classes=c["num_embeds_ada_norm"],
        class_dropout_prob=CLASS_DROPOUT_PROB,
        learn_sigma=c["out_channels"] == 2 * c["in_channels"],
        frequency_size=FREQUENCY_SIZE,
        frequency_shift=FREQUENCY_SHIFT,
        mlp_norm_eps=float(c["norm_eps"]),
        **fields,
    )


def _check_module(module):
    """One-line ValueError unless `module` computes what a diffusers DiT can."""
    if not isinstance(module, DiT):
        raise ValueError(f"module is a {type(module).__name__}, not a jaxdiff DiT")
    shift = getattr(module, "frequency_shift", 0.0)
    checks = [
        ("frequency_shift", shift, shift == FREQUENCY_SHIFT, f"{FREQUENCY_SHIFT:g} (diffusers' "
         "timestep frequencies: build the module with from_config, or train a DiT with "
         "frequency_shift=1 in its config's model section)"),
        ("frequency_size", module.frequency_size, module.frequency_size == FREQUENCY_SIZE,
         str(FREQUENCY_SIZE)),
        ("mlp_ratio", module.mlp_ratio, module.mlp_ratio == 4, "4"),
        ("num_classes", module.num_classes, module.num_classes > 0, "> 0"),
        ("class_dropout_prob", module.class_dropout_prob, module.class_dropout_prob > 0,
         "> 0 (the null-label row)"),
        ("guidance_embed", module.guidance_embed, not module.guidance_embed, "False"),
        ("time_scale", module.time_scale, module.time_scale == 1, "1"),
    ]
    for key, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{type(module).__name__} {key}={value!r} has no diffusers "
                             f"DiTTransformer2DModel equivalent; allowed: {allowed}")


# --- the key table ------------------------------------------------------------------------------


def _layout(depth):
    """[(jaxdiff module path, diffusers module names, kind)] for every parameterised module;
    kind: "linear", "conv" or "embed"; several names are concatenated along the output."""
    emb = f"transformer_blocks.0.{_EMBEDDER}"
    table = [
        (("x_embedder", "proj"), ["pos_embed.proj"], "conv"),
        (("t_embedder", "mlp.0"), [emb + "timestep_embedder.linear_1"], "linear"),
        (("t_embedder", "mlp.2"), [emb + "timestep_embedder.linear_2"], "linear"),
        (("y_embedder", "embedding_table"), [emb + "class_embedder.embedding_table"], "embed"),
    ]
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        table += [
            ((f"blocks.{i}", "adaLN_modulation.1"), [b + "norm1.linear"], "linear"),
            ((f"blocks.{i}", "attn", "qkv"), [b + f"attn1.to_{n}" for n in "qkv"], "linear"),
            ((f"blocks.{i}", "attn", "proj"), [b + "attn1.to_out.0"], "linear"),
            ((f"blocks.{i}", "mlp", "fc1"), [b + "ff.net.0.proj"], "linear"),
            ((f"blocks.{i}", "mlp", "fc2"), [b + "ff.net.2"], "linear"),
        ]
    table += [
        (("final_layer", "adaLN_modulation.1"), ["proj_out_1"], "linear"),
        (("final_layer", "linear"), ["proj_out_2"], "linear"),
    ]
    return table


def _leaves(kind):
    """(jaxdiff leaf, diffusers leaf) pairs of a module kind."""
    if kind == "embed":
        return [("embedding", "weight")]
    return [("kernel", "weight"), ("bias", "bias")]


def _to_torch(value, leaf):
    """A jaxdiff leaf in PyTorch layout: kernels (in, out) -> (out, in), HWIO -> OIHW."""
    if leaf != "kernel":
        return value
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T


def _from_torch(value, leaf):
    """The inverse of `_to_torch`."""
    if leaf != "kernel":
        return value
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def _expected_keys(depth):
    """Every key of a diffusers DiT state_dict with `depth` blocks."""
    keys = {f"{name}.{t}" for _, names, kind in _layout(depth) for name in names
            for _, t in _leaves(kind)}
    keys |= {f"transformer_blocks.{i}.{_EMBEDDER}{s}" for i in range(depth) for s in _EMB_SUFFIXES}
    return keys


def _numpy(value):
    """A torch tensor (bfloat16 included) or an array-like as numpy."""
    if hasattr(value, "detach"):
        import torch  # a torch tensor was given, so torch is there

        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return np.asarray(value)


def _torch_shape(shape, leaf):
    """The PyTorch shape of a jaxdiff leaf of `shape` (see `_to_torch`)."""
    shape = tuple(shape)
    if leaf != "kernel":
        return shape
    return tuple(shape[a] for a in (3, 2, 0, 1)) if len(shape) == 4 else shape[::-1]


def _abstract(module, in_channels):
    """The module's parameter shapes for images with `in_channels` channels, unboxed."""
    p = module.patch_size
    x = jax.ShapeDtypeStruct((1, p, p, in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    tree = jax.eval_shape(lambda a, b, c: module.init(jax.random.key(0), a, b, c), x, t, y)
    return folders.flatten(tree["params"])


def _some(keys, n=4):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


# --- load ---------------------------------------------------------------------------------------


def params_from_diffusers(tensors_or_state_dict, module, *, in_channels=None):
    """The params tree of `module` (a DiT of `from_config`) from a diffusers DiT state_dict: a
    `folders.Tensors` or a {key: tensor or array} dict; numpy leaves in the stored dtype.

    Checks every key (missing and extra named in one line; a persistent `pos_embed.pos_embed`
    buffer is allowed), every shape, and that every block's copy of the timestep/label embedder
    equals block 0's. `in_channels`: the image channels (default: the patch conv's).
    """
    _check_module(module)
    tensors = tensors_or_state_dict
    depth = module.depth
    expected = _expected_keys(depth)
    present = set(tensors)
    missing = expected - present
    extra = present - expected - {"pos_embed.pos_embed"}
    if missing:
        raise ValueError(f"the state_dict lacks {len(missing)} weight(s) of a {depth}-block "
                         f"diffusers DiT: {_some(missing)} (another architecture or config?)")
    if extra:
        raise ValueError(f"the state_dict holds {len(extra)} weight(s) a {depth}-block diffusers "
                         f"DiT does not have: {_some(extra)} (another architecture or config?)")
    read = {"pos_embed.proj.weight": _numpy(tensors["pos_embed.proj.weight"])}
    if in_channels is None:
        shape = read["pos_embed.proj.weight"].shape
        in_channels = shape[1] if len(shape) == 4 else 0
    abstract = _abstract(module, in_channels)

    def value(key, shape):
        if key not in read:
            read[key] = _numpy(tensors[key])
        if tuple(read[key].shape) != tuple(shape):
            raise ValueError(f"weight {key!r} has shape {tuple(read[key].shape)}; the DiT needs "
                             f"{tuple(shape)} (another config?)")
        return read[key]

    flat = {}
    for path, names, kind in _layout(depth):
        for leaf, t_leaf in _leaves(kind):
            full = _torch_shape(abstract[(*path, leaf)].shape, leaf)
            part = (full[0] // len(names),) + tuple(full[1:])
            parts = [value(f"{name}.{t_leaf}", part) for name in names]
            joined = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            flat[(*path, leaf)] = _from_torch(joined, leaf)
    for i in range(1, depth):
        for suffix in _EMB_SUFFIXES:
            key, first = f"transformer_blocks.{i}.{_EMBEDDER}{suffix}", read[
                f"transformer_blocks.0.{_EMBEDDER}{suffix}"]
            if not np.array_equal(value(key, first.shape), first):
                raise ValueError(f"weight {key!r} differs from block 0's: jaxdiff's DiT has one "
                                 "timestep/label embedder, and diffusers uses only block 0's")
    from flax import traverse_util

    return traverse_util.unflatten_dict(flat)


def load(folder, *, dtype=None, shardings=None):
    """(module, params) of a diffusers DiT folder (`config.json` + safetensors): the
    DiT of its config and its weights, cast to `dtype` (default float32; the module
    then computes in it too) and placed with `shardings` (one `jax.sharding.Sharding` for every
    leaf, a tree of them like params, or None for the default device). Call it as
    `module.apply({"params": params}, x_nhwc, t, y)`."""
    config = folders.read_config(folder)
    folders.check_class(config, CLASS_NAMES, folder)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype {np.dtype(dtype)} cannot hold weights; allowed: a floating "
                         "dtype (float32, bfloat16, float16, float64)")
    module = from_config(config, **({} if dtype is None else dict(dtype=dtype, param_dtype=dtype)))
    tensors = folders.Tensors(folders.weight_files(folder))
    flat = folders.flatten(params_from_diffusers(tensors, module,
                                                 in_channels=_settings(config)["in_channels"]))
    target = np.dtype(module.param_dtype)
    placement = _placement(shardings, flat)
    out = {}
    for path, leaf in flat.items():
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            folders._check_fits(folders.torch_key(path), leaf, target)
            leaf = leaf.astype(target)
        out[path] = jax.device_put(leaf, placement[path]) if placement else jnp.asarray(leaf)
    from flax import traverse_util

    return module, traverse_util.unflatten_dict(out)


def _placement(shardings, flat):
    """{path: Sharding} from None, one Sharding, or a tree like the params."""
    if shardings is None:
        return {}
    if isinstance(shardings, jax.sharding.Sharding):
        return dict.fromkeys(flat, shardings)
    given = folders.flatten(shardings)
    missing = sorted(".".join(p) for p in set(flat) - set(given))
    if missing:
        raise ValueError(f"shardings has no entry for {len(missing)} parameter(s): "
                         f"{_some(missing)}")
    return given


# --- export -------------------------------------------------------------------------------------


def export(folder, module, params, *, sample_size=32):
    """Write `params` of `module` (a DiT with frequency_shift=1, e.g. from `load` or
    `from_config`) as a folder `diffusers.DiTTransformer2DModel.from_pretrained` loads:
    config.json (norm_eps: the module's mlp_norm_eps) and diffusion_pytorch_model.safetensors
    in the params' dtype, the embedder copied into every block. `sample_size`: the latent size
    recorded in the config (diffusers' default 32, DiT-256's); written atomically."""
    _check_module(module)
    if set(params) == {"params"}:
        params = params["params"]
    flat = {k: np.asarray(jax.device_get(v)) for k, v in folders.flatten(params).items()}
    kernel = flat.get(("x_embedder", "proj", "kernel"))
    if kernel is None or kernel.ndim != 4:
        raise ValueError("params have no x_embedder.proj.kernel: not the params of a DiT")
    in_channels = int(kernel.shape[2])
    abstract = _abstract(module, in_channels)
    if set(flat) != set(abstract):
        names = lambda paths: _some({".".join(p) for p in paths}) or "none"
        lack, extra = set(abstract) - set(flat), set(flat) - set(abstract)
        raise ValueError(f"params do not match the module: missing {names(lack)}, "
                         f"extra {names(extra)}")
    for path, leaf in abstract.items():
        if flat[path].shape != tuple(leaf.shape):
            raise ValueError(f"param {'.'.join(path)} has shape {flat[path].shape}; the module "
                             f"needs {tuple(leaf.shape)}")
    if not (isinstance(sample_size, int) and sample_size > 0
            and sample_size % module.patch_size == 0):
        raise ValueError(f"sample_size={sample_size!r} must be a positive multiple of "
                         f"patch_size={module.patch_size}")
    tensors = {}
    for path, names, kind in _layout(module.depth):
        for leaf, t_leaf in _leaves(kind):
            parts = np.split(_to_torch(flat[(*path, leaf)], leaf), len(names), axis=0)
            for name, part in zip(names, parts):
                tensors[f"{name}.{t_leaf}"] = np.ascontiguousarray(part)
    for i in range(1, module.depth):
        for suffix in _EMB_SUFFIXES:
            tensors[f"transformer_blocks.{i}.{_EMBEDDER}{suffix}"] = tensors[
                f"transformer_blocks.0.{_EMBEDDER}{suffix}"]
    heads = module.num_heads
    if module.hidden_size % heads:
        raise ValueError(f"hidden_size={module.hidden_size} is not divisible by "
                         f"num_heads={heads}")
    config = {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": heads,
        "attention_head_dim": module.hidden_size // heads,
        "in_channels": in_channels,
        "out_channels": 2 * in_channels if module.learn_sigma else in_channels,
        "num_layers": module.depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "attention_bias": True,
        "sample_size": sample_size,
        "patch_size": module.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": module.num_classes,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": float(module.mlp_norm_eps),
    }
    return folders.save_params(folder, {}, config, extra=tensors)
