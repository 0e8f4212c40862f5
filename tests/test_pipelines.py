"""End to end: tiny random Stable Diffusion 1.x-, SD3- and DiT-shaped pipeline folders written by
diffusers' `save_pretrained` give the same images in `jaxdiff.pipelines` as in diffusers' own
pipelines from the same latents and scheduler config; `jaxdiff generate` writes them; bad
folders are one-line errors."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxdiff import pipelines  # noqa: E402
from tests._cli import main as cli  # noqa: E402

PROMPT = "a photo of the cat"


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table, which CLIP's BPE vocabulary is written in."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokenizer(folder, max_length=16):
    """A CLIP tokenizer folder with a byte-level vocabulary and a few merges."""
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars]
    merges = ["t h", "th e</w>", "c a", "ca t</w>", "o t", "p h", "ph ot"]
    for m in merges:
        vocab.append(m.replace(" ", ""))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(dict.fromkeys(vocab))}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = transformers.CLIPTokenizer(os.path.join(folder, "vocab.json"),
                                     os.path.join(folder, "merges.txt"),
                                     model_max_length=max_length)
    return tok, len(dict.fromkeys(vocab))


def _perturb(module, seed, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def _clip(vocab, projection=False, hidden=16, seed=0):
    cfg = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      max_position_embeddings=16, projection_dim=hidden,
                                      bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                      pad_token_id=vocab - 1)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return _perturb(cls(cfg), seed)


def _vae(seed=1, shift_factor=None):
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                  layers_per_block=1, sample_size=16, scaling_factor=0.5,
                                  shift_factor=shift_factor)
    return _perturb(vae, seed, 0.05)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "pipe"
    tok, vocab = tiny_tokenizer(str(folder / "_tok"))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=4)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, clip_sample=False,
                                        set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=_vae(), text_encoder=_clip(vocab), tokenizer=tok, unet=_perturb(unet, 2, 0.05),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder, pipe


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "pipe"
    tok, vocab = tiny_tokenizer(str(folder / "_tok"))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=4, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16, transformer_layers_per_block=(1, 2))
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear",
                                                 beta_start=0.00085, beta_end=0.012,
                                                 steps_offset=1, timestep_spacing="leading")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_clip(vocab, seed=7), tokenizer=tok,
        text_encoder_2=_clip(vocab, projection=True, seed=8), tokenizer_2=tok,
        unet=_perturb(unet, 9, 0.05), scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder, pipe


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3") / "pipe"
    tok, vocab = tiny_tokenizer(str(folder / "_tok"))
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=40, caption_projection_dim=16,
        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=8)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=_perturb(transformer, 3, 0.05),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.1), text_encoder=_clip(vocab, projection=True, seed=4),
        tokenizer=tok,
        text_encoder_2=_clip(vocab, projection=True, seed=5), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    return folder, pipe


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit") / "pipe"
    transformer = diffusers.DiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
        num_attention_heads=2, attention_head_dim=8, num_embeds_ada_norm=1000)  # its null: 1000
    _perturb(transformer, 6, 0.05)
    sd = transformer.state_dict()  # one embedder in every block, as real DiT checkpoints have
    with torch.no_grad():
        for key, value in sd.items():
            if ".norm1.emb." in key and not key.startswith("transformer_blocks.0."):
                value.copy_(sd["transformer_blocks.0." + key.split(".", 2)[2]])
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=_vae(),
                                 scheduler=diffusers.DDIMScheduler(clip_sample=False))
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())  # as the hub's DiT folders
    index["id2label"] = {"0": "zero", "1": "one, uno"}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder, pipe


def _latents(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _relative(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_sd_pipeline_matches_diffusers(sd_folder):
    folder, ref = sd_folder
    noise = _latents((2, 8, 8, 4))  # NHWC
    with torch.no_grad():
        want = ref(PROMPT, negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0,
                   num_images_per_prompt=2, height=16, width=16,
                   latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)), output_type="np").images
    pipe = pipelines.load(str(folder))
    assert isinstance(pipe, pipelines.TextToImage) and pipe.default_size() == 16
    got = pipe(PROMPT, negative_prompt="blurry", steps=4, guidance=5.0, num=2, noise=noise)
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert _relative(got, want) <= 1e-3, _relative(got, want)
    # another jaxdiff sampler on the folder's process: a valid image, close to DDIM's at 4 steps
    other = pipe(PROMPT, steps=4, guidance=5.0, num=2, noise=noise, sampler="dpmpp_2m")
    assert other.shape == got.shape and np.all((other >= 0) & (other <= 1))


def test_sdxl_pipeline_matches_diffusers(sdxl_folder):
    """Both encoders' penultimate states, the second one's pooled projection, size
    conditioning, zeros for the empty negative prompt; Euler with diffusers' sigma scaling."""
    folder, ref = sdxl_folder
    noise = _latents((1, 8, 8, 4), seed=3)
    with torch.no_grad():
        want = ref(PROMPT, num_inference_steps=4, guidance_scale=5.0, height=16, width=16,
                   latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)), output_type="np").images
    pipe = pipelines.load(str(folder))
    assert pipe.kind == "sdxl" and pipe.force_zeros
    got = pipe(PROMPT, steps=4, guidance=5.0, noise=noise, height=16, width=16)
    assert _relative(got, want) <= 1e-3, _relative(got, want)


def test_sd3_pipeline_matches_diffusers(sd3_folder):
    """SD3 without its T5 encoder (zeros in its place, as diffusers does) and flow matching."""
    folder, ref = sd3_folder
    noise = _latents((1, 8, 8, 4), seed=1)
    with torch.no_grad():
        want = ref(PROMPT, num_inference_steps=4, guidance_scale=4.0, height=16, width=16,
                   latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)), output_type="np",
                   max_sequence_length=256).images
    pipe = pipelines.load(str(folder))
    got = pipe(PROMPT, steps=4, guidance=4.0, noise=noise)
    assert got.shape == want.shape == (1, 16, 16, 3)
    assert _relative(got, want) <= 1e-3, _relative(got, want)


def test_dit_pipeline_matches_diffusers(dit_folder):
    """Class-to-image: CFG on the noise channels of a learned-sigma DiT, labels by name."""
    folder, ref = dit_folder
    # DiTPipeline draws its own latents: the same draw from its generator, NHWC for jaxdiff
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref([1, 0], num_inference_steps=4, guidance_scale=3.0, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    noise = noise.numpy().transpose(0, 2, 3, 1)
    pipe = pipelines.load(str(folder))
    assert isinstance(pipe, pipelines.ClassToImage)
    got = pipe(["uno", "zero"], steps=4, guidance=3.0, noise=noise)
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert _relative(got, want) <= 1e-3, _relative(got, want)
    with pytest.raises(ValueError, match="class 'two' is not a label of this model"):
        pipe(["two"], steps=1)


def test_generate_cli_writes_the_image(sd_folder, tmp_path):
    folder, _ = sd_folder
    out = tmp_path / "img.png"
    code, err = cli("generate", "--model", str(folder), "--prompt", PROMPT, "--steps", "2",
                    "--num", "2", "--out", str(out))
    assert code == 0, err
    from PIL import Image

    assert Image.open(out).size == (16 * 2 + 1, 16)  # a row of two 16x16 images, 1 px apart


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--class", "1"], "give --prompt (text-to-image) or --class"),
    (["--prompt", "x", "--steps", "0"], "--steps=0 must be >= 1"),
    (["--prompt", "x", "--dtype", "int8"], "--dtype=int8 is not supported"),
    (["--prompt", "x", "--sampler", "nope"], "--sampler=nope is unknown"),
    (["--prompt", "x", "--out", "x.jpg"], "--out=x.jpg must end in .png"),
])
def test_generate_cli_bad_flags(sd_folder, args, message):
    folder, _ = sd_folder
    code, err = cli("generate", "--model", str(folder), *args)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_bad_folders_are_one_line(sd_folder, tmp_path):
    folder, _ = sd_folder
    code, err = cli("generate", "--model", str(folder / "unet"), "--prompt", "x")
    assert code == 1 and "has no model_index.json" in err[0], err
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    code, err = cli("generate", "--model", str(other), "--prompt", "x")
    assert code == 1 and "holds a FluxPipeline; supported pipelines" in err[0], err
