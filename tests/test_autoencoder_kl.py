"""diffusers `AutoencoderKL` in Flax (`jaxdiff.models.autoencoder_kl`, `jaxdiff.interop.
autoencoder_kl`) against diffusers: tiny random-weight VAEs written by `save_pretrained`, loaded
by jaxdiff, compared on encode (posterior mean / logvar / KL), decode and the full forward pass
in float32 and float64; the export round trip through `diffusers.AutoencoderKL.from_pretrained`;
checkpoints with the pre-rename attention names; one-line errors for bad folders and inputs."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxdiff.interop import autoencoder_kl as vae_io  # noqa: E402
from jaxdiff.interop import folders  # noqa: E402
from jaxdiff.models.autoencoder_kl import DiagonalGaussian  # noqa: E402

TINY = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
            layers_per_block=1, sample_size=16)
# three levels, no mid-block attention, no quant convs, other widths, a shift factor
OTHER = dict(block_out_channels=(4, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3, in_channels=2, out_channels=1,
             latent_channels=3, norm_num_groups=2, layers_per_block=2, sample_size=16,
             mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
             scaling_factor=0.5, shift_factor=0.25)


def _rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _nchw(x):
    return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))


def _nhwc(t):
    return t.detach().cpu().numpy().transpose(0, 2, 3, 1)


def _torch_vae(folder, seed=0, **config):
    """A diffusers AutoencoderKL with every parameter drawn N(0, 0.2²) (its zero-initialised
    biases and unit norms would hide mistakes), saved to `folder`."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return model


def _images(batch=2, size=16, channels=3, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, size, size, channels))


def _reference(model, x):
    """diffusers' posterior mean, logvar, KL, decode(mean) and forward (mode), NHWC numpy."""
    with torch.no_grad():
        post = model.encode(_nchw(x)).latent_dist
        return dict(mean=_nhwc(post.mean), logvar=_nhwc(post.logvar), kl=post.kl().numpy(),
                    decode=_nhwc(model.decode(post.mean).sample),
                    forward=_nhwc(model(_nchw(x)).sample))


def _encode_decode(model, params, x, z):
    """jaxdiff's posterior mean, logvar, KL of x and decode of [z; posterior mode], one jit
    (the second half of the decode is the forward pass: decode(mode(encode(x))))."""

    def run(params, x, z):
        v = {"params": params}
        post = model.apply(v, x, method="encode")
        both = model.apply(v, jnp.concatenate([z, post.mode()]), method="decode")
        return dict(mean=post.mean, logvar=post.logvar, kl=post.kl(), decode=both[: len(z)],
                    forward=both[len(z):])

    return jax.device_get(jax.jit(run)(params, x, z))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers model, its folder, jaxdiff model, params loaded from the folder)."""
    folder = str(tmp_path_factory.mktemp("vae") / "vae")
    torch_model = _torch_vae(folder, **TINY)
    return torch_model, folder, *vae_io.load(folder)


def test_parity_float32(tiny):
    torch_model, _, model, params = tiny
    x = _images().astype(np.float32)
    ref = _reference(torch_model, x)
    ours = _encode_decode(model, params, x, ref["mean"])
    errors = {k: _rel(ours[k], ref[k]) for k in ref}
    assert ours["mean"].shape == (2, 8, 8, 4) and ours["forward"].shape == (2, 16, 16, 3)
    assert all(e <= 1e-4 for e in errors.values()), errors
    # the posterior draws mean + std * N(0, I) from the key, and its mode is the mean
    post = DiagonalGaussian(jnp.asarray(ref["mean"]), jnp.asarray(ref["logvar"]))
    key = jax.random.key(3)
    eps = np.asarray(jax.random.normal(key, ref["mean"].shape))
    np.testing.assert_allclose(post.sample(key), ref["mean"] + np.exp(0.5 * ref["logvar"]) * eps,
                               rtol=1e-6, atol=1e-6)
    assert post.mode() is post.mean
    # logvar is clipped to [-30, 20] as diffusers clips it
    clipped = DiagonalGaussian.from_moments(jnp.array([[[[0.0, 0.0, -50.0, 50.0]]]]))
    np.testing.assert_array_equal(clipped.logvar, [[[[-30.0, 20.0]]]])


def test_decode_parity_float64(tiny):
    torch_model, folder, _, _ = tiny
    reference = copy.deepcopy(torch_model).double()
    z = np.random.default_rng(1).standard_normal((2, 8, 8, 4))
    with torch.no_grad():
        ref = _nhwc(reference.decode(_nchw(z)).sample)
    with jax.enable_x64(True):
        model, params = vae_io.load(folder, dtype=jnp.float64)
        assert jax.tree.leaves(params)[0].dtype == jnp.float64
        ours = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))(params, z)
        assert ours.dtype == jnp.float64
        error = _rel(ours, ref)
    assert error <= 1e-6, error


def test_other_config(tmp_path):
    """Three levels, two resnets per level, no mid-block attention, no quant convs, a shift
    factor: encode and the module's own forward (`__call__`)."""
    folder = str(tmp_path / "vae")
    torch_model = _torch_vae(folder, seed=1, **OTHER)
    model, params = vae_io.load(folder)
    assert "quant_conv" not in params and "attentions.0" not in params["encoder"]["mid_block"]
    x = _images(channels=2, seed=2).astype(np.float32)
    ref = _reference(torch_model, x)
    del ref["decode"]

    def run(params, x):
        post = model.apply({"params": params}, x, method="encode")
        return dict(mean=post.mean, logvar=post.logvar, kl=post.kl(),
                    forward=model.apply({"params": params}, x))

    ours = jax.device_get(jax.jit(run)(params, x))
    assert ours["mean"].shape == (2, 4, 4, 3) and ours["forward"].shape == (2, 16, 16, 1)
    errors = {k: _rel(ours[k], ref[k]) for k in ref}
    assert all(e <= 1e-4 for e in errors.values()), errors
    # the diffusion model's latent: (z - shift) * scale, and back
    z = ours["mean"]
    np.testing.assert_allclose(model.to_latent(z), (z - 0.25) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(model.from_latent(model.to_latent(z)), z, rtol=1e-5, atol=1e-6)


def test_export_round_trip(tiny, tmp_path):
    torch_model, _, model, params = tiny
    out = vae_io.export(str(tmp_path / "exported"), model, params)
    again = diffusers.AutoencoderKL.from_pretrained(out).eval()
    assert tuple(again.config.block_out_channels) == (8, 16)
    assert again.config.scaling_factor == torch_model.config.scaling_factor
    original = dict(torch_model.state_dict())
    for key, value in again.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), original[key].numpy(), err_msg=key)
    x = _images(seed=4).astype(np.float32)
    with torch.no_grad():
        a, b = again(_nchw(x)).sample.numpy(), torch_model(_nchw(x)).sample.numpy()
    np.testing.assert_array_equal(a, b)
    # and into an existing folder, in bfloat16: replaced whole
    vae_io.export(out, model, params, dtype=jnp.bfloat16)
    tensors = folders.Tensors(folders.weight_files(out))
    assert tensors.dtype("decoder.conv_out.weight") == jnp.bfloat16
    assert len(tensors) == len(original)


def test_legacy_attention_names(tiny, tmp_path):
    """Checkpoints saved before diffusers renamed its attention block (query, key, value,
    proj_attn) load to the same parameters."""
    from safetensors.numpy import load_file, save_file

    _, folder, _, params = tiny
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    tensors = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in tensors.items():
        for new, old in names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in renamed
    save_file(renamed, str(legacy / "diffusion_pytorch_model.safetensors"))
    (legacy / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    _, params_legacy = vae_io.load(str(legacy))
    got, want = folders.flatten(params_legacy), folders.flatten(params)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


def _one_line_error(fn, *needles, kind=ValueError):
    with pytest.raises(kind) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_bad_input_one_line_errors(tiny, tmp_path, monkeypatch):
    from safetensors.numpy import load_file, save_file

    _, folder, model, params = tiny
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    config = json.load(open(os.path.join(folder, "config.json")))

    def copy_folder(name, cfg=None, tensors=None):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(cfg or config))
        if tensors is None:
            (path / "diffusion_pytorch_model.safetensors").write_bytes(open(weights, "rb").read())
        else:
            save_file(tensors, str(path / "diffusion_pytorch_model.safetensors"))
        return str(path)

    # a folder of another class
    clip = copy_folder("clip", {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                "hidden_size": 32})
    _one_line_error(lambda: vae_io.load(clip), "clip_text_model", "AutoencoderKL")
    unet = copy_folder("unet", {"_class_name": "UNet2DConditionModel"})
    _one_line_error(lambda: vae_io.load(unet), "UNet2DConditionModel")
    # a missing tensor
    tensors = load_file(weights)
    gone = "decoder.up_blocks.0.resnets.1.conv2.weight"
    missing = copy_folder("missing", tensors={k: v for k, v in tensors.items() if k != gone})
    _one_line_error(lambda: vae_io.load(missing), gone)
    # a truncated file
    truncated = copy_folder("truncated")
    path = os.path.join(truncated, "diffusion_pytorch_model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    _one_line_error(lambda: vae_io.load(truncated), "truncated")
    # a dtype that cannot hold weights
    _one_line_error(lambda: vae_io.load(folder, dtype=jnp.int32), "int32")
    # config values this port does not build
    attn = copy_folder("attn", {**config, "down_block_types": ["AttnDownEncoderBlock2D"] * 2})
    _one_line_error(lambda: vae_io.load(attn), "down_block_types", "AttnDownEncoderBlock2D",
                    "DownEncoderBlock2D")
    _one_line_error(lambda: vae_io.from_config({**config, "act_fn": "tanh"}), "act_fn", "silu")
    _one_line_error(lambda: vae_io.from_config({**config, "norm_num_groups": 3}),
                    "norm_num_groups=3")
    _one_line_error(lambda: vae_io.from_config({**config, "norm_type": "spatial"}), "norm_type")
    # an image with the wrong channel count, and sampling without a key
    _one_line_error(lambda: model.apply({"params": params}, jnp.zeros((1, 16, 16, 4)),
                                        method="encode"), "3 channels")
    _one_line_error(lambda: model.apply({"params": params}, jnp.zeros((1, 16, 16, 3)),
                                        sample_posterior=True), "key")
    # export into an existing folder is atomic: a failed write leaves the old folder intact
    target = copy_folder("target")
    before = {f: open(os.path.join(target, f), "rb").read() for f in os.listdir(target)}

    def broken(path, tensors):
        raise OSError("disk full")

    monkeypatch.setattr(folders, "_write_safetensors", broken)
    _one_line_error(lambda: vae_io.export(target, model, params), "disk full", kind=OSError)
    after = {f: open(os.path.join(target, f), "rb").read() for f in os.listdir(target)}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["clip", "unet", "missing", "truncated", "attn", "target"])


def _block_params(torch_block, flax_block, *args):
    """The torch block's weights (drawn N(0, 0.2²)) as the Flax block's params, each found by
    `folders.torch_key` alone: the names must mirror diffusers'."""
    from flax import traverse_util

    with torch.no_grad():
        for p in torch_block.parameters():
            p.normal_(0, 0.2)
    state = {k: v.numpy() for k, v in torch_block.state_dict().items()}
    abstract = jax.eval_shape(flax_block.init, jax.random.key(0), *args)["params"]
    flat = {}
    for path, leaf in folders.flatten(abstract).items():
        value = state.pop(folders.torch_key(path))
        flat[path] = value.transpose(folders.torch_perm(path, value.ndim))
    assert not state, sorted(state)  # every diffusers weight has its Flax counterpart
    return traverse_util.unflatten_dict(flat)


def test_shared_blocks_match_diffusers():
    """The `diffusers_blocks` paths the VAE does not take: ResnetBlock2D with a time embedding
    (added, and scale_shift with up-sampling), cross-attention with a key-padding mask,
    TimestepEmbedding with cond_proj, the timestep features, Upsample2D to an output size."""
    from diffusers.models.attention_processor import Attention as TorchAttention
    from diffusers.models.embeddings import TimestepEmbedding as TorchTimestepEmbedding
    from diffusers.models.embeddings import get_timestep_embedding as torch_timestep_embedding
    from diffusers.models.resnet import ResnetBlock2D as TorchResnet
    from diffusers.models.upsampling import Upsample2D as TorchUpsample

    from jaxdiff.models import diffusers_blocks as db

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 6, 8)).astype(np.float32)
    temb = rng.standard_normal((2, 12)).astype(np.float32)
    errors = {}
    for name, kw in (("resnet", dict(out_channels=16, groups=4)),
                     ("resnet_scale_shift_up", dict(out_channels=8, groups=2, up=True,
                                                    time_embedding_norm="scale_shift",
                                                    output_scale_factor=2.0))):
        ours_block = db.ResnetBlock2D(temb_channels=12, **kw)
        theirs = TorchResnet(in_channels=8, temb_channels=12, **kw).eval()
        params = _block_params(theirs, ours_block, x, temb)
        with torch.no_grad():
            ref = _nhwc(theirs(_nchw(x), torch.tensor(temb)))
        errors[name] = _rel(jax.jit(ours_block.apply)({"params": params}, x, temb), ref)
    tokens = rng.standard_normal((2, 5, 8)).astype(np.float32)
    context = rng.standard_normal((2, 7, 6)).astype(np.float32)
    keep = np.ones((2, 7), bool)
    keep[0, 4:] = False
    ours_attn = db.Attention(heads=3, dim_head=5)
    theirs_attn = TorchAttention(8, cross_attention_dim=6, heads=3, dim_head=5).eval()
    params = _block_params(theirs_attn, ours_attn, tokens, context)
    with torch.no_grad():  # diffusers' additive mask: 0 keep, -10000 drop
        ref = theirs_attn(torch.tensor(tokens), torch.tensor(context),
                          attention_mask=torch.tensor(np.where(keep, 0.0, -1e4).astype(np.float32)))
    errors["cross_attention"] = _rel(jax.jit(ours_attn.apply)(
        {"params": params}, tokens, context, keep[:, None, None, :]), ref.numpy())
    sample = rng.standard_normal((2, 16)).astype(np.float32)
    cond = rng.standard_normal((2, 5)).astype(np.float32)
    ours_emb = db.TimestepEmbedding(32, cond_proj_dim=5)
    theirs_emb = TorchTimestepEmbedding(16, 32, cond_proj_dim=5).eval()
    params = _block_params(theirs_emb, ours_emb, sample)
    with torch.no_grad():
        ref = theirs_emb(torch.tensor(sample), torch.tensor(cond)).numpy()
    errors["timestep_embedding"] = _rel(ours_emb.apply({"params": params}, sample, cond), ref)
    t = np.array([0.0, 3.5, 999.0], np.float32)
    for flip, shift, dim in ((True, 0, 32), (False, 1, 33)):
        ref = torch_timestep_embedding(torch.tensor(t), dim, flip, shift).numpy()
        errors[f"timesteps_{dim}"] = _rel(db.get_timestep_embedding(t, dim, flip, shift), ref)
    with torch.no_grad():
        ref = _nhwc(TorchUpsample(8)(_nchw(x), output_size=(13, 9)))
    errors["upsample_to_size"] = _rel(db.Upsample2D().apply({}, x, output_size=(13, 9)), ref)
    assert all(e <= 1e-5 for e in errors.values()), errors
