"""The KL-regularised image autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3 and
App. G) as diffusers' `AutoencoderKL` builds it, in Flax, NHWC, with diffusers' parameter names
(`jaxdiff.interop.autoencoder_kl` loads and exports its folders).

- `Encoder`: conv_in -> down_blocks (`DownEncoderBlock2D`: resnets, then a stride-2 conv with
  the (0, 1) bottom/right pad, except the last) -> mid_block (`UNetMidBlock2D`: resnet,
  single-head spatial self-attention, resnet) -> GroupNorm -> SiLU -> conv_out to 2 x latent
  channels (mean and log-variance).
- `Decoder`: conv_in -> mid_block -> up_blocks (`UpDecoderBlock2D`, widths reversed,
  layers_per_block + 1 resnets, nearest x2 + conv except the last) -> GroupNorm -> SiLU -> conv_out.
- `DiagonalGaussian`: the posterior N(mean, exp(logvar)), logvar clipped to [-30, 20].
- `AutoencoderKL`: encoder + 1x1 `quant_conv`, 1x1 `post_quant_conv` + decoder (either conv
  optional), `encode`, `decode`, `__call__`, and the latent scaling of the diffusion model
  (`to_latent`, `from_latent`).

Images are (B, H, W, in_channels), latents (B, H / 2^(levels-1), W / 2^(levels-1),
latent_channels).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxdiff.models.diffusers_blocks import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    activation,
    conv2d,
    group_norm,
)

EPS = 1e-6  # the VAE's GroupNorm epsilon everywhere
DOWN_BLOCKS = ("DownEncoderBlock2D",)
UP_BLOCKS = ("UpDecoderBlock2D",)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` ResnetBlock2D (no time embedding) [+ Downsample2D `downsamplers.0`]."""

    out_channels: int
    num_layers: int = 1
    groups: int = 32
    act_fn: str = "silu"
    add_downsample: bool = True
    downsample_padding: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock2D(out_channels=self.out_channels, groups=self.groups, eps=EPS,
                              non_linearity=self.act_fn, name=f"resnets.{i}", **kw)(x)
        if self.add_downsample:
            x = Downsample2D(use_conv=True, out_channels=self.out_channels,
                             padding=self.downsample_padding, name="downsamplers.0", **kw)(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` ResnetBlock2D (no time embedding) [+ Upsample2D `upsamplers.0`]."""

    out_channels: int
    num_layers: int = 1
    groups: int = 32
    act_fn: str = "silu"
    add_upsample: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock2D(out_channels=self.out_channels, groups=self.groups, eps=EPS,
                              non_linearity=self.act_fn, name=f"resnets.{i}", **kw)(x)
        if self.add_upsample:
            x = Upsample2D(use_conv=True, out_channels=self.out_channels, name="upsamplers.0",
                           **kw)(x)
        return x


class UNetMidBlock2D(nn.Module):
    """`resnets.0` -> [`attentions.0`: GroupNorm'd self-attention over the H*W positions, one
    head as wide as the channels, residual] -> `resnets.1` (the VAE's mid block, no temb)."""

    groups: int = 32
    act_fn: str = "silu"
    add_attention: bool = True
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        C = x.shape[-1]
        resnet = dict(groups=self.groups, eps=EPS, non_linearity=self.act_fn, **kw)
        x = ResnetBlock2D(name="resnets.0", **resnet)(x)
        if self.add_attention:
            x = Attention(heads=1, dim_head=C, bias=True, norm_num_groups=self.groups, eps=EPS,
                          residual_connection=True, implementation=self.attention_impl,
                          name="attentions.0", **kw)(x)
        return ResnetBlock2D(name="resnets.1", **resnet)(x)


def _check_blocks(kind, types, allowed, block_out_channels, groups):
    """One-line errors for block lists the VAE cannot build."""
    types = tuple(types)
    if len(types) != len(block_out_channels):
        raise ValueError(f"AutoencoderKL has {len(types)} {kind} but {len(block_out_channels)} "
                         f"block_out_channels {tuple(block_out_channels)}; they must match")
    for t in types:
        if t not in allowed:
            raise ValueError(f"AutoencoderKL {kind} entry {t!r} is not supported; allowed: "
                             f"{', '.join(allowed)}")
    for c in block_out_channels:
        if c % groups:
            raise ValueError(f"AutoencoderKL block_out_channels {tuple(block_out_channels)} are "
                             f"not all divisible by norm_num_groups={groups}")


class Encoder(nn.Module):
    """diffusers' VAE `Encoder` (see the module docstring): (B, H, W, in) -> (B, h, w, 2 x
    out_channels) with `double_z`."""

    out_channels: int = 4
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    double_z: bool = True
    mid_block_add_attention: bool = True
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        _check_blocks("down_block_types", self.down_block_types, DOWN_BLOCKS,
                      self.block_out_channels, self.norm_num_groups)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans, groups = tuple(self.block_out_channels), self.norm_num_groups
        x = conv2d(chans[0], 3, name="conv_in", **kw)(jnp.asarray(x, self.dtype))
        for i, c in enumerate(chans):
            x = DownEncoderBlock2D(c, self.layers_per_block, groups, self.act_fn,
                                   add_downsample=i < len(chans) - 1, name=f"down_blocks.{i}",
                                   **kw)(x)
        x = UNetMidBlock2D(groups, self.act_fn, self.mid_block_add_attention,
                           self.attention_impl, name="mid_block", **kw)(x)
        x = activation(self.act_fn)(group_norm(x, groups, EPS, name="conv_norm_out", **kw))
        width = 2 * self.out_channels if self.double_z else self.out_channels
        return conv2d(width, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """diffusers' VAE `Decoder` (group-norm variant; see the module docstring):
    (B, h, w, latent) -> (B, H, W, out_channels)."""

    out_channels: int = 3
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        _check_blocks("up_block_types", self.up_block_types, UP_BLOCKS, self.block_out_channels,
                      self.norm_num_groups)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans, groups = tuple(reversed(self.block_out_channels)), self.norm_num_groups
        x = conv2d(chans[0], 3, name="conv_in", **kw)(jnp.asarray(z, self.dtype))
        x = UNetMidBlock2D(groups, self.act_fn, self.mid_block_add_attention,
                           self.attention_impl, name="mid_block", **kw)(x)
        for i, c in enumerate(chans):
            x = UpDecoderBlock2D(c, self.layers_per_block + 1, groups, self.act_fn,
                                 add_upsample=i < len(chans) - 1, name=f"up_blocks.{i}", **kw)(x)
        x = activation(self.act_fn)(group_norm(x, groups, EPS, name="conv_norm_out", **kw))
        return conv2d(self.out_channels, 3, name="conv_out", **kw)(x)


@flax.struct.dataclass
class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over latents (B, h, w, C): the VAE posterior, a pytree (it
    can leave a jitted function). `logvar` is clipped to [-30, 20] on construction
    (`from_moments`), as diffusers' DiagonalGaussianDistribution does."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments):
        """From the encoder's (B, h, w, 2C) output: first C channels mean, last C logvar."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def sample(self, key):
        """mean + std * eps, eps ~ N(0, I) drawn from `key` (a jax.random key)."""
        eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self):
        return self.mean

    def kl(self, other=None):
        """KL(self || other) per sample, summed over (h, w, C); other=None: the standard
        normal."""
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (jnp.square(self.mean - other.mean) / other.var + self.var / other.var
                     - 1.0 - self.logvar + other.logvar)
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))

    def nll(self, sample, axes=(1, 2, 3)):
        """-log N(sample; mean, var) summed over `axes`."""
        return 0.5 * jnp.sum(jnp.log(2.0 * jnp.pi) + self.logvar
                             + jnp.square(sample - self.mean) / self.var, axis=axes)


class AutoencoderKL(nn.Module):
    """diffusers' `AutoencoderKL` (fields are its config's; `sample_size`, `latents_mean`,
    `latents_std` are kept for export only). NHWC.

    `model.apply(v, x, method="encode") -> DiagonalGaussian`,
    `model.apply(v, z, method="decode") -> image`,
    `model.apply(v, x, key=None, sample_posterior=False)`: decode(posterior sample with `key`,
    or its mode). `to_latent(z) = (z - shift_factor) * scaling_factor` turns a VAE latent into
    the diffusion model's, `from_latent` inverts it (plain methods: call them on the module
    itself, no variables needed).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: Sequence[float] | None = None
    latents_std: Sequence[float] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shared = dict(block_out_channels=tuple(self.block_out_channels),
                      layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups, act_fn=self.act_fn,
                      mid_block_add_attention=self.mid_block_add_attention,
                      attention_impl=self.attention_impl, **kw)
        self.encoder = Encoder(out_channels=self.latent_channels,
                               down_block_types=tuple(self.down_block_types), **shared)
        self.decoder = Decoder(out_channels=self.out_channels,
                               up_block_types=tuple(self.up_block_types), **shared)
        if self.use_quant_conv:
            self.quant_conv = conv2d(2 * self.latent_channels, 1, **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv2d(self.latent_channels, 1, **kw)

    def encode(self, x):
        """Images (B, H, W, in_channels) -> the posterior over latents (a DiagonalGaussian)."""
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"AutoencoderKL.encode takes NHWC images with {self.in_channels} "
                             f"channels, got shape {x.shape}")
        h = self.encoder(x)
        if self.use_quant_conv:
            h = self.quant_conv(h)
        return DiagonalGaussian.from_moments(h)

    def decode(self, z):
        """Latents (B, h, w, latent_channels) (unscaled: `from_latent` first) -> images."""
        if z.shape[-1] != self.latent_channels:
            raise ValueError(f"AutoencoderKL.decode takes NHWC latents with "
                             f"{self.latent_channels} channels, got shape {z.shape}")
        z = jnp.asarray(z, self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x, key=None, sample_posterior=False):
        """decode(encode(x)): the posterior's sample (needs `key`) or its mode."""
        if sample_posterior and key is None:
            raise ValueError("AutoencoderKL(sample_posterior=True) needs key= (a jax.random key)")
        posterior = self.encode(x)
        return self.decode(posterior.sample(key) if sample_posterior else posterior.mode())

    def to_latent(self, z):
        """A VAE latent -> the diffusion model's: (z - shift_factor) * scaling_factor."""
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def from_latent(self, latent):
        """The diffusion model's latent -> the VAE's: latent / scaling_factor + shift_factor."""
        return latent / self.scaling_factor + (self.shift_factor or 0.0)
