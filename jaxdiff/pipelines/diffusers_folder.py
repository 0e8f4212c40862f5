"""Pipelines over diffusers pipeline folders: text-to-image (Stable Diffusion 1.x/2.x, SDXL, SD3)
and class-to-image (DiT), composed from jaxdiff's networks and samplers.

A diffusers pipeline folder (`save_pretrained`, or a downloaded model repository) holds
`model_index.json` and one subfolder a component: `scheduler/`, `vae/`, `unet/` or
`transformer/`, `text_encoder[_2]/` with `tokenizer[_2]/`. Each network is built from its
`config.json` and loaded by its family's module in `jaxdiff.interop`; the scheduler config
becomes `jaxdiff.sample` arguments (`jaxdiff.interop.diffusers.from_scheduler_config`), or any
jaxdiff sampler on the same process replaces it (`sampler=`).

What each pipeline reproduces of diffusers' (same latents and scheduler config -> the same
image, tests/test_pipelines.py):
- prompt encoding: SD 1.x/2.x the CLIP encoder's last hidden state; SDXL the penultimate hidden
  states of both encoders side by side, the second one's projected pooled output and the size
  conditioning (original size, crop (0, 0), target size), zeros for an empty negative prompt
  when the folder's `force_zeros_for_empty_prompt`; SD3 the two CLIP encoders' penultimate
  states, zero-padded to the joint attention width, followed by zeros standing in for the
  optional T5 encoder (as diffusers does without `text_encoder_3`), pooled outputs side by side;
- classifier-free guidance on one batched network call ([cond; uncond]); guidance 1: none;
- the VAE decode of latents / scaling_factor + shift_factor, mapped to [0, 1].

Networks compute in `dtype` (float32 or bfloat16: weights cast on load); latents, schedules and
sampler coefficients stay float32 (DESIGN.md numerics).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff.core import guidance as guidance_lib
from jaxdiff.interop import diffusers as schedulers
from jaxdiff.interop.folders import read_config

# model_index.json `_class_name` -> the kind of pipeline
PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
             "StableDiffusion3Pipeline": "sd3", "DiTPipeline": "dit"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
T5_TOKENS = 256  # diffusers' SD3 max_sequence_length: the T5 stand-in's length


def read_index(folder):
    """The pipeline folder's `model_index.json` and its kind (one-line errors otherwise)."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder {folder!r} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} has no model_index.json: not a diffusers pipeline "
                                "folder (point --model at the folder that holds it)")
    with open(path) as f:
        index = json.load(f)
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{folder!r} holds a {name}; supported pipelines: "
                         f"{', '.join(PIPELINES)}")
    return index, PIPELINES[name]


def _dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if np.dtype(dtype) not in (np.dtype(jnp.float32), np.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={np.dtype(dtype)} is not supported; allowed: "
                         f"{', '.join(DTYPES)}")
    return dtype


def _computing(module, dtype):
    """`module` computing in `dtype` (its parameters are cast on load)."""
    return module.clone(dtype=dtype) if hasattr(module, "dtype") else module


def _present(index, folder, name):
    """Whether the pipeline has the component `name` (listed with a class, and on disk)."""
    entry = index.get(name)
    return (isinstance(entry, list) and entry[0] is not None
            and os.path.isdir(os.path.join(folder, name)))


@dataclasses.dataclass
class _Net:
    """A network and its params; `apply` is compiled once per argument shapes (the jitted
    function lives as long as the pipeline, so repeated calls reuse its programs)."""

    module: Any
    params: Any

    def __post_init__(self):
        self._apply = jax.jit(self.module.apply,
                              static_argnames=("method", "output_hidden_states"))

    def apply(self, *args, **kwargs):
        return self._apply({"params": self.params}, *args, **kwargs)


def _load_vae(folder, dtype):
    from jaxdiff.interop import autoencoder_kl

    module, params = autoencoder_kl.load(os.path.join(folder, "vae"), dtype=dtype)
    return _Net(_computing(module, dtype), params)


def _load_text(folder, index, dtype):
    """[(tokenizer, encoder)] for text_encoder, text_encoder_2 (those present)."""
    from jaxdiff.interop import clip, tokenizer

    out = []
    for suffix in ("", "_2"):
        if not _present(index, folder, f"text_encoder{suffix}"):
            continue
        module, params = clip.load(os.path.join(folder, f"text_encoder{suffix}"), dtype=dtype)
        tok = tokenizer.load_tokenizer(os.path.join(folder, f"tokenizer{suffix}"))
        out.append((tok, _Net(_computing(module, dtype), params)))
    if not out:
        raise FileNotFoundError(f"{folder!r} has no text_encoder: a text-to-image pipeline "
                                "needs one")
    return out


def _vae_scale(vae):
    return 2 ** (len(vae.module.block_out_channels) - 1)


def _decode(vae, latents):
    """Latents -> images (N, H, W, 3) in [0, 1], as diffusers' pipelines post-process."""
    module = vae.module
    z = module.from_latent(jnp.asarray(latents, jnp.float32))
    image = vae.apply(z.astype(module.dtype), method="decode")
    return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def _sampling(scheduler, steps, sampler, mu=None):
    """`jaxdiff.sample` keyword arguments: the folder's scheduler, or `sampler` (a jaxdiff
    sampler name) on the scheduler's process and prediction; and the final scale (a key is
    always passed: stochastic samplers draw from it, the others ignore it)."""
    s = schedulers.from_scheduler_config(scheduler, steps, mu=mu)
    if sampler is None:
        return s.sample_kwargs(), s.final_scale
    return dict(process=s.process, prediction=s.prediction, sampler=sampler, steps=steps), 1.0


def _guided(scale, cond, uncond, extra):
    """The guidance object: CFG on [cond; uncond] (none for scale 1), then the scheduler's
    own x0 clipping (`extra`)."""
    g = guidance_lib.CFG(scale, cond, uncond) if scale != 1 else None
    if extra is not None:
        g = extra if g is None else guidance_lib.Chain((g, extra))
    return g


def _sample(fn, params, noise, cond, uncond, guidance, kwargs, final, seed):
    """Runs `jaxdiff.sample` with `fn(params, x, t, cond)`; unguided: cond bound."""
    g = _guided(guidance, cond, uncond, kwargs.pop("guidance", None))
    if g is None or guidance == 1:
        model_fn = jax.tree_util.Partial(_bound, fn, params, cond)
    else:
        model_fn = jax.tree_util.Partial(fn, params)
    x = jaxdiff.sample(model_fn, noise, guidance=g, key=jax.random.key(seed + 1), **kwargs)
    return x * final


def _bound(fn, params, cond, x, t, *args):
    return fn(params, x, t, cond, *args)


def _noise(seed, num, shape, noise):
    if noise is not None:
        noise = jnp.asarray(noise, jnp.float32)
        if noise.shape != (num, *shape):
            raise ValueError(f"noise has shape {noise.shape}; expected {(num, *shape)} "
                             "(N, H/8, W/8, C) NHWC")
        return noise
    return jax.random.normal(jax.random.key(seed), (num, *shape), jnp.float32)


@dataclasses.dataclass
class TextToImage:
    """A text-to-image pipeline (`load`): SD 1.x/2.x and SDXL (`unet`), SD3 (`transformer`)."""

    kind: str
    folder: str
    text: list
    denoiser: _Net
    vae: _Net
    scheduler: dict
    force_zeros: bool = False

    def __post_init__(self):
        # one function object for the pipeline's life: jaxdiff.sample's compiled program is
        # keyed on it
        self._fn = _mmdit_fn(self.denoiser) if self.kind == "sd3" else _unet_fn(self.denoiser)

    def encode(self, prompts):
        """(context, pooled or None) for a list of prompts, as the folder's pipeline builds
        them (module docstring)."""
        if self.kind == "sd":
            tok, enc = self.text[0]
            return enc.apply(jnp.asarray(tok(prompts))).last_hidden_state, None
        states, pooled = [], None
        for tok, enc in self.text:
            out = enc.apply(jnp.asarray(tok(prompts)), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled_i = out.text_embeds if out.text_embeds is not None else out.pooler_output
            pooled = pooled_i if self.kind == "sdxl" else (
                pooled_i if pooled is None else jnp.concatenate([pooled, pooled_i], -1))
        context = jnp.concatenate(states, axis=-1)
        if self.kind == "sd3":
            width = self.denoiser.module.joint_attention_dim
            context = jnp.pad(context, ((0, 0), (0, 0), (0, width - context.shape[-1])))
            t5 = jnp.zeros((context.shape[0], T5_TOKENS, width), context.dtype)
            context = jnp.concatenate([context, t5], axis=1)
        return context, pooled

    def default_size(self):
        """Diffusers' default image size: the denoiser's sample_size times the VAE's factor."""
        return self.denoiser.module.sample_size * _vae_scale(self.vae)

    def __call__(self, prompt, *, negative_prompt=None, steps=25, guidance=7.5, seed=0, num=1,
                 height=None, width=None, sampler=None, noise=None, return_latents=False):
        """Images (num, H, W, 3) in [0, 1] for `prompt` (a string, or a list of num strings).

        `noise`: the initial latents (num, H/f, W/f, C) as standard normal draws (diffusers'
        `latents=` before its init_noise_sigma scaling), else drawn from `seed`. `sampler`: a
        jaxdiff sampler name instead of the folder's scheduler."""
        prompts = [prompt] * num if isinstance(prompt, str) else list(prompt)
        num = len(prompts)
        height = height or self.default_size()
        width = width or self.default_size()
        f = _vae_scale(self.vae)
        if height % f or width % f:
            raise ValueError(f"height={height} and width={width} must be multiples of {f} "
                             "(the VAE's downsampling)")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps={steps!r} must be an integer >= 1")
        channels = self.vae.module.latent_channels
        shape = (height // f, width // f, channels)
        cond, pooled = self.encode(prompts)
        if negative_prompt is None and self.force_zeros:
            uncond, pooled_u = jnp.zeros_like(cond), jnp.zeros_like(pooled)
        else:
            negs = [negative_prompt or ""] * num
            uncond, pooled_u = self.encode(negs)
        mu = None
        if self.kind == "sd3" and self.scheduler.get("use_dynamic_shifting"):
            mu = _shift(self.scheduler, shape[0] * shape[1] // self.denoiser.module.patch_size ** 2)
        kwargs, final = _sampling(self.scheduler, steps, sampler, mu)
        if self.kind == "sdxl":
            ids = jnp.tile(jnp.asarray([[height, width, 0, 0, height, width]], jnp.float32),
                           (num, 1))
            c, u = (cond, {"text_embeds": pooled, "time_ids": ids}), (
                uncond, {"text_embeds": pooled_u, "time_ids": ids})
        elif self.kind == "sd":
            c, u = (cond, None), (uncond, None)
        else:
            c, u = (cond, pooled), (uncond, pooled_u)
        fn = self._fn
        latents = _sample(fn, self.denoiser.params, _noise(seed, num, shape, noise), c, u,
                          guidance, kwargs, final, seed)
        images = np.asarray(_decode(self.vae, latents))
        return (images, np.asarray(latents)) if return_latents else images


def _unet_fn(net):
    module = net.module

    def fn(params, x, t, cond):
        context, added = cond
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        out = module.apply({"params": params}, x.astype(module.dtype), t,
                           context.astype(module.dtype), added)
        return out.astype(jnp.float32)

    return fn


def _mmdit_fn(net):
    module = net.module

    def fn(params, x, t, cond):
        context, pooled = cond
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        out = module.apply({"params": params}, x.astype(module.dtype),
                           context.astype(module.dtype), pooled.astype(module.dtype), t)
        return out.astype(jnp.float32)

    return fn


def _shift(cfg, seq_len):
    """FlowMatch's dynamic shift mu for `seq_len` image tokens (diffusers' calculate_shift)."""
    lo, hi = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    a, b = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (b - a) / (hi - lo)
    return seq_len * m + a - m * lo


@dataclasses.dataclass
class ClassToImage:
    """Class-to-image with a DiT pipeline folder (`load`): CFG on the noise channels, the
    learned-variance channels dropped (diffusers' DiTPipeline)."""

    folder: str
    denoiser: _Net
    vae: _Net
    scheduler: dict
    labels: dict
    latent_shape: tuple  # (H, W, C): the transformer config's sample_size and in_channels

    def __post_init__(self):
        module, channels = self.denoiser.module, self.latent_shape[-1]

        def fn(params, x, t, labels):  # the noise channels (learned-sigma ones dropped)
            t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
            out = module.apply({"params": params}, x.astype(module.dtype), t, labels)
            return out[..., :channels].astype(jnp.float32)

        self._fn = fn  # one function for the pipeline's life (see TextToImage)

    def __call__(self, class_labels, *, steps=25, guidance=4.0, seed=0, sampler=None,
                 noise=None, return_latents=False):
        """Images (N, H, W, 3) in [0, 1], one per class label (ints, or names the folder's
        `id2label` knows)."""
        ids = [self._label(c) for c in np.atleast_1d(np.asarray(class_labels, dtype=object))]
        shape = self.latent_shape
        kwargs, final = _sampling(self.scheduler, steps, sampler)
        null = self.denoiser.module.num_classes
        y = jnp.asarray(ids, jnp.int32)
        latents = _sample(self._fn, self.denoiser.params, _noise(seed, len(ids), shape, noise), y,
                          jnp.full_like(y, null), guidance, kwargs, final, seed)
        images = np.asarray(_decode(self.vae, latents))
        return (images, np.asarray(latents)) if return_latents else images

    def _label(self, c):
        if isinstance(c, (int, np.integer)) or (isinstance(c, str) and c.isdigit()):
            k = int(c)
            if not 0 <= k < self.denoiser.module.num_classes:
                raise ValueError(f"class {k} is outside 0..{self.denoiser.module.num_classes - 1}")
            return k
        for k, names in self.labels.items():
            if c in [n.strip() for n in names.split(",")]:
                return int(k)
        raise ValueError(f"class {c!r} is not a label of this model (its id2label)")


def load(folder, *, dtype="float32"):
    """The pipeline in a diffusers pipeline folder: `TextToImage` or `ClassToImage`."""
    index, kind = read_index(folder)
    dtype = _dtype(dtype)
    scheduler_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(scheduler_path):
        raise FileNotFoundError(f"{folder!r} has no scheduler/scheduler_config.json")
    with open(scheduler_path) as f:
        scheduler = json.load(f)
    vae = _load_vae(folder, dtype)
    if kind == "dit":
        from jaxdiff.interop import diffusers_dit

        path = os.path.join(folder, "transformer")
        module, params = diffusers_dit.load(path, dtype=dtype)
        config = read_config(path)
        shape = (config.get("sample_size", 32),) * 2 + (config.get("in_channels", 4),)
        labels = index.get("id2label") or {}
        return ClassToImage(folder, _Net(_computing(module, dtype), params), vae, scheduler,
                            labels, shape)
    text = _load_text(folder, index, dtype)
    if kind == "sd3":
        from jaxdiff.interop import sd3

        module, params = sd3.load(os.path.join(folder, "transformer"), dtype=dtype)
    else:
        from jaxdiff.interop import unet_condition

        module, params = unet_condition.load(os.path.join(folder, "unet"), dtype=dtype)
    return TextToImage(kind, folder, text, _Net(_computing(module, dtype), params), vae,
                       scheduler, force_zeros=bool(index.get("force_zeros_for_empty_prompt")))
