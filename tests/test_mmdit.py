"""Stable Diffusion 3's MMDiT (`jaxdiff.models.mmdit`, `jaxdiff.interop.sd3`) against diffusers'
`SD3Transformer2DModel`: tiny random-weight folders written by `save_pretrained`, loaded by
jaxdiff, the same inputs through both (float32 and float64), the SD3.5 options (RMS q/k norm,
dual attention), a latent grid smaller than the position table (its centred crop), export read
back by diffusers' `from_pretrained`, and one-line errors for folders and configs it refuses."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxdiff.interop import folders, sd3  # noqa: E402
from jaxdiff.models.mmdit import MMDiT, PatchEmbed, pos_embed_table  # noqa: E402

TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
            pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8)
SD35 = dict(TINY, qk_norm="rms_norm", dual_attention_layers=[0])


def _torch_model(config, seed=0):
    """A diffusers SD3Transformer2DModel with every parameter drawn from N(0, 0.1²)."""
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.data.normal_(0, 0.1)
    return model


def _folder(tmp_path_factory, config, name):
    model = _torch_model(config)
    folder = tmp_path_factory.mktemp(name) / "transformer"
    model.save_pretrained(folder)
    return model, str(folder)


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return _folder(tmp_path_factory, TINY, "sd3")


@pytest.fixture(scope="module")
def sd35_folder(tmp_path_factory):
    return _folder(tmp_path_factory, SD35, "sd35")


def _inputs(height, width, batch=2, tokens=5, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, TINY["in_channels"], height, width))
    ctx = rng.normal(size=(batch, tokens, TINY["joint_attention_dim"]))
    pooled = rng.normal(size=(batch, TINY["pooled_projection_dim"]))
    t = np.linspace(150.0, 850.0, batch)
    return [a.astype(dtype) for a in (x, ctx, pooled)] + [t.astype(np.float32)]


def _reference(model, x, ctx, pooled, t):
    with torch.no_grad():
        out = model(torch.tensor(x), torch.tensor(ctx), torch.tensor(pooled), torch.tensor(t))
    return out.sample.numpy()


def _ours(module, params, x, ctx, pooled, t):
    out = jax.jit(module.apply)({"params": params}, x.transpose(0, 2, 3, 1), ctx, pooled, t)
    return np.asarray(out).transpose(0, 3, 1, 2)  # NHWC -> diffusers' NCHW


def _rel(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def test_sd3_matches_diffusers_float32(sd3_folder):
    model, folder = sd3_folder
    module, params = sd3.load(folder)
    assert isinstance(module, MMDiT) and module.inner_dim == 16
    assert params["transformer_blocks.1"]["attn"].get("to_add_out") is None  # context_pre_only
    inputs = _inputs(8, 8)  # the 4x4 patch grid of sample_size 8 (the table's centre)
    ref = _reference(model, *inputs)
    ours = _ours(module, params, *inputs)
    assert ours.shape == ref.shape == (2, 4, 8, 8) and np.abs(ref).max() > 0.1
    assert _rel(ours, ref) <= 1e-4


def test_sd3_matches_diffusers_float64(sd3_folder):
    model, folder = sd3_folder
    inputs = _inputs(8, 8, dtype=np.float64)
    # diffusers computes the timestep features in float32 even in a float64 model; their
    # rounding grows with t (t·f's ulp), so small timesteps keep that noise below the test's
    # (at t ~ 850 it reaches ~5e-7 of the output on its own)
    inputs[3] = np.array([3.0, 17.0], np.float32)
    ref = _reference(model.double(), *inputs)
    model.float()
    with jax.enable_x64(True):
        module, params = sd3.load(folder, dtype=jnp.float64)
        assert params["proj_out"]["kernel"].dtype == jnp.float64
        ours = _ours(module, params, *inputs)
    assert ours.dtype == np.float64
    assert _rel(ours, ref) <= 1e-6


def test_smaller_latent_grid_uses_centred_crop_of_pos_table(sd3_folder):
    model, folder = sd3_folder
    # the buffer diffusers saved is the table we recompute ...
    stored = folders.Tensors(folders.weight_files(folder)).read(sd3.POS_EMBED_KEY)
    np.testing.assert_allclose(stored[0], pos_embed_table(16, 8, 4), rtol=0, atol=1e-6)
    # ... and on a 6x4 latent (3x2 patches of the 8x8 table: rows 2-4, columns 3-4) the patch
    # embedding adds diffusers' `cropped_pos_embed` (a zero convolution leaves only the table)
    embed = PatchEmbed(patch_size=2, embed_dim=16, pos_embed_max_size=8, base_size=4)
    zero = {"proj": {"kernel": jnp.zeros((2, 2, 4, 16)), "bias": jnp.zeros(16)}}
    ours = np.asarray(embed.apply({"params": zero}, jnp.zeros((1, 6, 4, 4))))
    crop = model.pos_embed.cropped_pos_embed(6, 4).numpy()
    table = pos_embed_table(16, 8, 4).reshape(8, 8, 16)
    np.testing.assert_array_equal(crop[0], table[2:5, 3:5].reshape(6, 16))
    np.testing.assert_allclose(ours, crop, rtol=0, atol=1e-7)
    # the whole network on that grid: test_sd35_rms_qk_norm_and_dual_attention_match_diffusers


def test_sd35_rms_qk_norm_and_dual_attention_match_diffusers(sd35_folder):
    model, folder = sd35_folder
    module, params = sd3.load(folder)
    assert module.qk_norm == "rms_norm" and module.dual_attention_layers == (0,)
    block = params["transformer_blocks.0"]
    assert {"norm_q", "norm_k", "norm_added_q", "norm_added_k"} <= set(block["attn"])
    assert {"to_q", "norm_q", "to_out.0"} <= set(block["attn2"]) and "add_q_proj" not in block[
        "attn2"]
    assert block["norm1"]["linear"]["kernel"].shape == (16, 9 * 16)
    # the RMSNorm weights were perturbed too: they carry information the test would miss if 1
    assert float(jnp.abs(block["attn"]["norm_q"]["scale"] - 1).max()) > 0.5
    inputs = _inputs(6, 4, seed=2)  # 3x2 patches, a non-square crop at row 2, column 3
    assert _rel(_ours(module, params, *inputs), _reference(model, *inputs)) <= 1e-4


def test_export_round_trip_through_diffusers(sd35_folder, tmp_path):
    model, folder = sd35_folder
    module, params = sd3.load(folder)
    out = sd3.export(tmp_path / "exported", module, {"params": params})
    with open(f"{out}/config.json") as f:
        assert json.load(f)["_class_name"] == "SD3Transformer2DModel"
    back = diffusers.SD3Transformer2DModel.from_pretrained(out).eval()
    assert back.config.qk_norm == "rms_norm" and list(back.config.dual_attention_layers) == [0]
    original, exported = model.state_dict(), back.state_dict()
    assert set(original) == set(exported)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key].numpy(), value.numpy(), err_msg=key)
    inputs = _inputs(8, 8, seed=3)
    np.testing.assert_array_equal(_reference(back, *inputs), _reference(model, *inputs))
    module2, params2 = sd3.load(out)
    assert module2 == module
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_other_class_folder_is_a_one_line_error(tmp_path):
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="holds a AutoencoderKL, not a SD3Transformer2DModel") as e:
        sd3.load(str(tmp_path / "vae"))
    assert "\n" not in str(e.value)


def test_changed_pos_table_and_bad_configs_are_refused(sd3_folder, tmp_path):
    _, folder = sd3_folder
    tensors = folders.Tensors(folders.weight_files(folder))
    weights = {k: tensors.read(k) for k in tensors}
    weights[sd3.POS_EMBED_KEY] = weights[sd3.POS_EMBED_KEY] * 1.01
    bad = tmp_path / "bad"
    with open(f"{folder}/config.json") as f:
        folders.save_params(bad, {}, json.load(f), extra=weights)
    with pytest.raises(ValueError, match="pos_embed.pos_embed differs from the 2-D sin-cos table"):
        sd3.load(str(bad))
    for change, match in ((dict(qk_norm="layer_norm"), "qk_norm='layer_norm' is not supported"),
                          (dict(caption_projection_dim=12), "caption_projection_dim=12"),
                          (dict(pos_embed_max_size=None), "pos_embed_max_size=None"),
                          (dict(dual_attention_layers=[2]), "dual_attention_layers=\\[2\\]"),
                          (dict(use_pos_embed=False), "key 'use_pos_embed' is not supported")):
        with pytest.raises(ValueError, match=match) as e:
            sd3.from_config({**TINY, **change})
        assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors():
    module = sd3.from_config(TINY)
    x, ctx, pooled, t = (jnp.asarray(a) for a in _inputs(8, 8))
    x = x.transpose(0, 2, 3, 1)
    params = sd3.abstract_params(module)
    too_big = jnp.zeros((2, 18, 18, 4))
    for args, match in (((too_big, ctx, pooled, t), "more than pos_embed_max_size=8"),
                        ((x[:, :7], ctx, pooled, t), "not divisible by patch_size=2"),
                        ((x, ctx[..., :5], pooled, t), "encoder_hidden_states must be"),
                        ((x, ctx, pooled[:1], t), "pooled_projections must be")):
        with pytest.raises(ValueError, match=match) as e:
            jax.eval_shape(module.apply, {"params": params}, *args)
        assert "\n" not in str(e.value)
    out = jax.eval_shape(module.apply, {"params": params}, x, ctx, pooled, t)
    assert out.shape == (2, 8, 8, 4)
