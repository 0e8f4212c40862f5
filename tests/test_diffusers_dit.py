"""diffusers `DiTTransformer2DModel` folders onto jaxdiff's DiT (`jaxdiff.interop.diffusers_dit`):
a tiny random diffusers DiT written by `save_pretrained` and loaded into jaxdiff gives diffusers'
outputs (float32 and float64), a jaxdiff DiT exported to a folder loads in diffusers with the same
outputs, and folders or modules that cannot be converted are refused in one line."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxdiff.interop import diffusers_dit  # noqa: E402
from jaxdiff.models import DiT  # noqa: E402
from jaxdiff.models.layers import timestep_embedding  # noqa: E402

K = 10  # classes; label K is the null label
TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
            num_attention_heads=2, attention_head_dim=8, num_embeds_ada_norm=K,
            norm_type="ada_norm_zero")


def _rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _torch_dit(seed=0, **overrides):
    """The tiny diffusers DiT, every parameter drawn from N(0, 0.1²), block 0's timestep/label
    embedder copied into every block (as converted checkpoints hold it)."""
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.data.normal_(0, 0.1)
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return model


def _inputs(batch=4, seed=0):
    """NCHW latents, timesteps over the whole range (fractional too), labels with the null one
    (K: the table's extra row, what jaxdiff's DiT uses for y=None)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 4, 8, 8)).astype(np.float32)
    t = np.array([0.0, 17.5, 500.0, 999.0], np.float32)[:batch]
    y = np.array([0, 3, 9, K])[:batch]
    return x, t, y


def _torch_out(model, x, t, y, double=False):
    dtype = torch.float64 if double else torch.float32
    with torch.no_grad():
        out = model.to(dtype)(torch.from_numpy(x).to(dtype), torch.from_numpy(t),
                              torch.from_numpy(y)).sample
    return out.numpy()


def _ours(module, params, x, t, y):
    """jaxdiff's DiT on the NCHW inputs (it takes NHWC), the output back as NCHW."""
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), t, y)
    return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(model, folder) of the tiny DiT with diffusers' default norm_eps (1e-5)."""
    model = _torch_dit()
    path = str(tmp_path_factory.mktemp("dit") / "transformer")
    model.save_pretrained(path)
    return model, path


def test_load_matches_diffusers_float32(folder):
    model, path = folder
    x, t, y = _inputs()
    module, params = diffusers_dit.load(path)
    assert isinstance(module, DiT) and module.learn_sigma and module.num_classes == K
    assert (module.hidden_size, module.depth, module.num_heads) == (16, 2, 2)
    sd = model.state_dict()
    qkv = np.concatenate([sd[f"transformer_blocks.1.attn1.to_{n}.weight"].numpy() for n in "qkv"])
    np.testing.assert_array_equal(params["blocks.1"]["attn"]["qkv"]["kernel"], qkv.T)
    np.testing.assert_array_equal(  # the null-label row K is carried over
        params["y_embedder"]["embedding_table"]["embedding"][K],
        sd["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"][K].numpy())
    ref = _torch_out(model, x, t, y)
    ours = _ours(module, params, x, t, y)
    assert ours.shape == ref.shape == (4, 8, 8, 8)
    assert module.mlp_norm_eps == 1e-5 and module.frequency_shift == 1
    assert _rel(ours, ref) <= 1e-5


def test_load_matches_diffusers_float64(folder, tmp_path):
    """With norm_eps=1e-6 the two compute the same function: float64 agrees to 1e-6 (timestep
    features are float32 in both; jaxdiff's DiT returns float32)."""
    model = _torch_dit(norm_eps=1e-6)
    model.load_state_dict(folder[0].state_dict())
    model.save_pretrained(tmp_path)
    x, t, y = _inputs()
    with jax.enable_x64(True):
        module, params = diffusers_dit.load(str(tmp_path), dtype=jnp.float64)
        assert params["blocks.0"]["mlp"]["fc1"]["kernel"].dtype == jnp.float64
        ours = _ours(module, params, x.astype(np.float64), t, y)
    assert _rel(ours, _torch_out(model, x, t, y, double=True)) <= 1e-6


def test_export_round_trip(tmp_path):
    """A jaxdiff DiT (random weights, learn_sigma off) -> export -> diffusers `from_pretrained`
    gives jaxdiff's outputs; `load` gives back the same params."""
    config = {**TINY, "_class_name": "DiTTransformer2DModel", "out_channels": None}
    module = diffusers_dit.from_config(config)
    x, t, y = _inputs()
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x.transpose(0, 2, 3, 1), t,
                                     y)["params"])
    rng = np.random.default_rng(1)  # every weight random: DiT's init zeroes the adaLN layers
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape), jnp.float32), shapes)
    path = str(tmp_path / "exported")
    diffusers_dit.export(path, module, params, sample_size=8)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["norm_eps"] == module.mlp_norm_eps
    model = diffusers.DiTTransformer2DModel.from_pretrained(path).eval()
    assert model.config.out_channels == 4
    sd = model.state_dict()
    np.testing.assert_array_equal(  # the one embedder is written into every block
        sd["transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.weight"].numpy(),
        np.asarray(params["t_embedder"]["mlp.2"]["kernel"]).T)
    ours = _ours(module, params, x, t, y)
    assert _rel(ours, _torch_out(model, x, t, y)) <= 1e-4
    again, back = diffusers_dit.load(path)
    assert again == module
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    with pytest.raises(ValueError, match=r"frequency_shift=0\.0 .*build the module with from_c"):
        diffusers_dit.export(path, DiT(patch_size=2, hidden_size=16, depth=2, num_heads=2,
                                       num_classes=K), params)


def test_timestep_features_match_diffusers():
    """diffusers' Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1) features; shift 0
    gives jaxdiff's own (the reference DiT's)."""
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0.0, 1.0, 17.5, 500.0, 999.0], np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True,
                                 downscale_freq_shift=1).numpy()
    ours = np.asarray(timestep_embedding(t, 256, shift=1.0))
    # one frequency of torch's float32 exp is an ulp off the rounded one: at t = 999 that moves
    # one cos/sin pair by < 1e-4; every other feature agrees to float32 rounding
    assert np.abs(ours - ref).max() < 1e-4
    assert np.mean(np.abs(ours - ref) < 1e-6) > 0.98
    ref0 = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True,
                                  downscale_freq_shift=0).numpy()
    assert np.abs(np.asarray(timestep_embedding(t, 256)) - ref0).max() < 1e-4


def test_different_embedders_and_bad_state_dicts_are_refused(folder, tmp_path):
    from safetensors.torch import save_file

    model, path = folder
    module = diffusers_dit.from_config(dict(model.config))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    params = diffusers_dit.params_from_diffusers(sd, module)  # a plain state_dict works too
    assert params["blocks.1"]["attn"]["proj"]["kernel"].shape == (16, 16)
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
    shutil.copy(os.path.join(path, "config.json"), tmp_path)
    save_file({**sd, key: sd[key] + 1e-3}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=rf"^weight '{key}' differs from block 0's: jaxdiff's"):
        diffusers_dit.load(str(tmp_path))
    missing = {k: v for k, v in sd.items() if "to_k" not in k}
    with pytest.raises(ValueError, match=r"lacks 4 weight\(s\) .*attn1\.to_k\.bias"):
        diffusers_dit.params_from_diffusers(missing, module)
    with pytest.raises(ValueError, match=r"holds 1 weight\(s\) .*: norm_out\.weight"):
        diffusers_dit.params_from_diffusers({**sd, "norm_out.weight": sd["proj_out_1.bias"]},
                                            module)
    key = "transformer_blocks.0.ff.net.2.weight"
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(16, 32\); the DiT needs \(16, 64"):
        diffusers_dit.params_from_diffusers({**sd, key: sd[key][:, :32]}, module)


def test_other_class_and_unsupported_configs_are_refused(tmp_path):
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=4, out_channels=4,
                                 block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D",),
                                 up_block_types=("UpBlock2D",))
    unet.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds a UNet2DModel, not a DiTTransformer2DModel"):
        diffusers_dit.load(str(tmp_path))
    base = {**TINY, "_class_name": "DiTTransformer2DModel"}
    for key, value, allowed in [
        ("norm_type", "ada_norm", "'ada_norm_zero'"),
        ("out_channels", 5, r"null, in_channels=4 or 2 \* in_channels=8"),
        ("activation_fn", "geglu", "'gelu-approximate'"),
        ("norm_eps", -1.0, "a number >= 0"),
        ("norm_elementwise_affine", True, "false"),
    ]:
        with pytest.raises(ValueError, match=rf"^DiTTransformer2DModel {key}={value!r} is not "
                                             rf"supported by jaxdiff's DiT; allowed: {allowed}"):
            diffusers_dit.from_config({**base, key: value})
    legacy = {**TINY, "_class_name": "Transformer2DModel", "attention_bias": True,
              "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
              "sample_size": 128}
    with pytest.raises(ValueError, match=r"interpolation_scale=None .*not interpolated"):
        diffusers_dit.from_config(legacy)
    assert diffusers_dit.from_config({**legacy, "sample_size": 32}).depth == 2
    with pytest.raises(ValueError, match=r"from_config takes no field\(s\) \['depth'\]"):
        diffusers_dit.from_config(base, depth=3)


def test_load_casts_and_places(folder):
    _, path = folder
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    module, params = diffusers_dit.load(path, dtype=jnp.bfloat16, shardings=sharding)
    assert module.dtype == module.param_dtype == jnp.bfloat16
    leaves = jax.tree_util.tree_leaves(params)
    assert all(a.dtype == jnp.bfloat16 and a.sharding == sharding for a in leaves)
    with pytest.raises(ValueError, match=r"dtype int32 cannot hold weights"):
        diffusers_dit.load(path, dtype=jnp.int32)
