"""`jaxdiff.models.unet_condition` against diffusers' `UNet2DConditionModel`: tiny random-weight
SD 1.x, SD 2.x (plus the optional features) and SDXL-shaped models saved with `save_pretrained`,
loaded by `jaxdiff.interop.unet_condition.load`, give diffusers' outputs on the same inputs
(float32, and float64 for SD 1.x); `export` writes a folder diffusers loads back to the same
model; unsupported configs are one-line errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxdiff.interop import folders, unet_condition  # noqa: E402

SD1 = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
           layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
           attention_head_dim=4, norm_num_groups=4)
# SD 2.x's linear projections and per-block head counts, plus every optional feature the port
# supports: per-layer transformer depths, LCM's timestep_cond, class labels concatenated to
# the time embedding, scale-shift ResNets, the attention-free mid block, odd kernels/padding,
# and a sample size the downsampling does not divide (explicit upsample sizes)
SD2 = dict(SD1, use_linear_projection=True, attention_head_dim=(2, 4), layers_per_block=(1, 2),
           out_channels=3, transformer_layers_per_block=((2,), 1),
           reverse_transformer_layers_per_block=(1, (1, 2)), time_cond_proj_dim=6,
           num_class_embeds=3, class_embeddings_concat=True, resnet_time_scale_shift="scale_shift",
           mid_block_type="UNetMidBlock2D", time_embedding_act_fn="silu",
           timestep_post_act="silu", time_embedding_dim=24, center_input_sample=True,
           conv_in_kernel=1, conv_out_kernel=1, downsample_padding=0, flip_sin_to_cos=False,
           freq_shift=1, mid_block_scale_factor=1.5)
POOLED = 10  # SDXL: pooled text embedding width; 6 time ids of addition_time_embed_dim each
SDXL = dict(SD1, use_linear_projection=True, attention_head_dim=(2, 4),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=POOLED + 6 * 8)


def _torch_unet(config, folder):
    """A diffusers UNet with every parameter drawn from N(0, 0.1²) (zero-initialised output
    convs would hide bugs), saved to `folder`."""
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return model


def _inputs(config, size=(8, 8), seed=1):
    """(sample NCHW, timesteps, encoder_hidden_states, keyword arguments) as torch tensors."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, config["in_channels"], *size, generator=g)
    context = torch.randn(2, 5, config["cross_attention_dim"], generator=g)
    kwargs = {}
    if config.get("addition_embed_type") == "text_time":
        ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 4, 8, 64, 64]])
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, POOLED, generator=g),
                                       "time_ids": ids}
    if config.get("num_class_embeds"):
        kwargs["class_labels"] = torch.tensor([2, 0])
    if config.get("time_cond_proj_dim"):
        kwargs["timestep_cond"] = torch.randn(2, config["time_cond_proj_dim"], generator=g)
    return sample, torch.tensor([10.0, 700.0]), context, kwargs


def _reference(model, inputs, double=False):
    cast = (lambda a: a.double() if a.is_floating_point() else a) if double else (lambda a: a)
    sample, t, context, kwargs = jax.tree_util.tree_map(cast, inputs)
    model = model.double() if double else model.float()
    with torch.no_grad():
        return model(sample, t, context, **kwargs).sample.numpy()


def _ours(apply, params, inputs):
    """The jaxdiff UNet (`apply`: its jitted `module.apply`) on the same inputs (NHWC inside),
    as NCHW numpy."""
    sample, t, context, kwargs = jax.tree_util.tree_map(lambda a: a.numpy(), inputs)
    out = apply({"params": params}, sample.transpose(0, 2, 3, 1), t, context, **kwargs)
    return np.asarray(out).transpose(0, 3, 1, 2)


def _close(ours, ref, rtol):
    """assert_allclose scaled to the output; returns the max error relative to max |ref|."""
    scale = float(np.abs(ref).max())
    assert scale > 1e-3  # the random weights give a non-trivial output
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * 0.1 * scale)
    return float(np.abs(ours - ref).max() / scale)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: torch's thread pool only spins (seconds of CPU on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders_(tmp_path_factory):
    """{name: (torch model, folder)} for the three configs, built once."""
    root = tmp_path_factory.mktemp("unet_condition")
    return {name: (_torch_unet(config, root / name), root / name)
            for name, config in (("sd1", SD1), ("sd2", SD2), ("sdxl", SDXL))}


@pytest.fixture(scope="module")
def loaded(folders_):
    """name -> (module, params, jitted module.apply) from `unet_condition.load` of that folder,
    loaded (and compiled, on first use) once."""
    cache = {}

    def get(name):
        if name not in cache:
            module, params = unet_condition.load(folders_[name][1])
            cache[name] = module, params, jax.jit(module.apply)
        return cache[name]

    return get


def test_sd1_parity_float32_and_float64(folders_, loaded):
    model, folder = folders_["sd1"]
    module, params, apply = loaded("sd1")
    inputs = _inputs(SD1)
    assert _close(_ours(apply, params, inputs), _reference(model, inputs), 1e-4) < 1e-5
    with jax.enable_x64(True):
        module, params = unet_condition.load(folder, dtype=jnp.float64)
        ours = _ours(jax.jit(module.apply), params, inputs)
        assert ours.dtype == np.float64
        assert _close(ours, _reference(model, inputs, double=True), 1e-6) < 1e-6


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_sd2_and_sdxl_parity_float32(folders_, loaded, name):
    model = folders_[name][0]
    config = {"sd2": SD2, "sdxl": SDXL}[name]
    module, params, apply = loaded(name)
    if name == "sdxl":  # SDXL's add_embedding: pooled text (10) + 6 time ids x 8 features
        assert params["add_embedding"]["linear_1"]["kernel"].shape == (POOLED + 48, 32)
        depths = [k for k in params["mid_block"]["attentions.0"] if k.startswith("transformer")]
        assert len(depths) == 2
    inputs = _inputs(config, size=(7, 9) if name == "sd2" else (8, 8))
    assert _close(_ours(apply, params, inputs), _reference(model, inputs), 1e-4) < 1e-5


def test_export_round_trip_through_diffusers(folders_, loaded, tmp_path):
    model = folders_["sd2"][0]
    module, params, apply = loaded("sd2")
    # 1. the loaded weights written back: diffusers rebuilds the original model exactly
    out = unet_condition.export(tmp_path / "exported", module, params)
    back = diffusers.UNet2DConditionModel.from_pretrained(out).eval()
    plain = lambda config: json.loads(json.dumps({k: v for k, v in config.items()
                                                  if not k.startswith("_")}))
    assert plain(back.config) == plain(model.config)
    ref, theirs = model.state_dict(), back.state_dict()
    assert sorted(ref) == sorted(theirs)
    assert all(torch.equal(ref[k], theirs[k]) for k in ref)
    assert unet_condition.from_config(folders.read_config(out)) == module
    # 2. weights changed on the jaxdiff side: diffusers computes what jaxdiff computes
    changed = jax.tree_util.tree_map(lambda a: np.asarray(a) * np.float32(1.25) + np.float32(0.01),
                                     params)  # numpy: no per-shape compiles
    out = unet_condition.export(tmp_path / "changed", module, changed)
    back = diffusers.UNet2DConditionModel.from_pretrained(out).eval()
    inputs = _inputs(SD2, size=(7, 9), seed=2)
    _close(_ours(apply, changed, inputs), _reference(back, inputs), 1e-4)


@pytest.mark.parametrize("change, message", [
    ({"down_block_types": ["AttnDownBlock2D", "DownBlock2D"]},
     "down_block_types entry 'AttnDownBlock2D' is not supported; allowed: CrossAttnDownBlock2D"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep' is not supported; allowed: "
                                       "None"),
    ({"addition_embed_type": "text_image"}, "addition_embed_type='text_image' is not supported"),
    ({"encoder_hid_dim": 7}, "encoder_hid_dim=7 is not supported"),
    ({"only_cross_attention": True}, "only_cross_attention=True is not supported"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier' is not supported"),
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type="),
    ({"attention_head_dim": [2, 4, 8]}, "attention_head_dim=[2, 4, 8] has 3 entries"),
    ({"attention_head_dim": 3}, "block_out_channels 8 is not divisible into attention_head_dim=3"),
    ({"act_fn": "tanh"}, "act_fn='tanh' is not supported"),
    ({"addition_embed_type": "text_time"}, "needs addition_time_embed_dim"),
    ({"transformer_layers_per_block": [[1], 1]}, "needs reverse_transformer_layers_per_block"),
    ({"brand_new_key": 1}, "config key 'brand_new_key' is unknown"),
])
def test_bad_config_is_a_one_line_error(change, message):
    config = json.loads(json.dumps(dict(SD1, _class_name="UNet2DConditionModel")))
    with pytest.raises(ValueError, match="^[^\n]*$") as info:
        unet_condition.from_config({**config, **change})
    assert message in str(info.value)
    # keys only other block types read are accepted with any value
    module = unet_condition.from_config({**config, "resnet_skip_time_act": True})
    assert module.block_out_channels == (8, 16) and module.attention_head_dim == 4


def test_wrong_folder_and_missing_inputs_are_one_line_errors(loaded, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="holds a AutoencoderKL, not a UNet2DConditionModel"):
        unet_condition.load(tmp_path)
    module, params, _ = loaded("sdxl")
    sample, t, context = jnp.zeros((1, 8, 8, 4)), jnp.zeros(()), jnp.zeros((1, 5, 12))
    assert params["conv_in"]["kernel"].shape == (3, 3, 4, 8)
    with pytest.raises(ValueError, match="needs added_cond_kwargs with text_embeds and time_ids"):
        jax.eval_shape(module.apply, {"params": params}, sample, t, context)
    bad = {"text_embeds": jnp.zeros((1, POOLED + 1)), "time_ids": jnp.zeros((1, 6))}
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim is 58"):
        jax.eval_shape(module.apply, {"params": params}, sample, t, context, bad)
    with pytest.raises(ValueError, match=r"encoder_hidden_states width 7 differs"):
        jax.eval_shape(module.apply, {"params": params}, sample, t, jnp.zeros((1, 5, 7)), bad)
    with pytest.raises(ValueError, match=r"sample must be \(B, H, W, 4\) NHWC"):
        jax.eval_shape(module.apply, {"params": params}, sample[..., :3], t, context, bad)
