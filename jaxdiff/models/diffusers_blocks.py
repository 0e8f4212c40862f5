"""Flax mirrors of the building blocks diffusers' UNets and VAEs share, NHWC, with diffusers'
submodule names so that `jaxdiff.interop.folders.torch_key` maps every parameter to its
state_dict key without a rename table.

Public API (stable: the text-conditioned UNet and the AutoencoderKL import it):

- `get_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False,
  downscale_freq_shift=1.0, scale=1.0, max_period=10000) -> (B, embedding_dim) float32`
- `Timesteps(num_channels, flip_sin_to_cos=False, downscale_freq_shift=1.0, scale=1.0)`:
  `__call__(timesteps)`; no parameters.
- `TimestepEmbedding(time_embed_dim, act_fn="silu", out_dim=None, post_act_fn=None,
  cond_proj_dim=None, sample_proj_bias=True)`: `__call__(sample, condition=None)`;
  params `linear_1`, `linear_2`, `cond_proj` (no bias; only with cond_proj_dim).
- `ResnetBlock2D(out_channels=None, temb_channels=None, groups=32, groups_out=None, eps=1e-6,
  non_linearity="swish", dropout=0.0, skip_time_act=False, time_embedding_norm="default",
  output_scale_factor=1.0, use_in_shortcut=None, up=False, down=False, conv_shortcut_bias=True,
  conv_2d_out_channels=None)`: `__call__(x, temb=None, *, train=False)`; params `norm1`,
  `conv1`, `time_emb_proj` (when temb_channels is set), `norm2`, `conv2`, `conv_shortcut`.
- `Downsample2D(use_conv=False, out_channels=None, padding=1, kernel_size=3, bias=True)`:
  `__call__(x)`; param `conv` (diffusers' `name="op"` also stores it as `conv`).
- `Upsample2D(use_conv=False, out_channels=None, kernel_size=3, padding=1, bias=True,
  interpolate=True)`: `__call__(x, output_size=None)`; param `conv`.
- `Attention(heads=8, dim_head=64, bias=False, out_bias=True, norm_num_groups=None, eps=1e-5,
  rescale_output_factor=1.0, residual_connection=False, dropout=0.0, implementation=None)`:
  `__call__(hidden_states, encoder_hidden_states=None, mask=None, *, train=False)`; params
  `group_norm` (with norm_num_groups), `to_q`, `to_k`, `to_v`, `to_out.0`.
- `activation(name)`: diffusers' `get_activation` names ("swish", "silu", "mish", "gelu",
  "relu") -> a function (`ACTIVATIONS` holds them).
- Layer helpers: `conv2d(features, kernel_size, *, name=None, dtype, param_dtype, strides=1,
  padding=None, use_bias=True)` (torch Conv2d padding), `linear(features, *, name=None, dtype,
  param_dtype, use_bias=True, axes=("embed", "embed"))`, `group_norm(x, groups, eps, *, name,
  dtype, param_dtype, axis_name="conv_out")` (applies torch GroupNorm to x (B, ..., C)).

Every module has `dtype` (compute) and `param_dtype` fields, float32 by default. Input widths
(diffusers' `in_channels`, `query_dim`, `cross_attention_dim`, the temb width) are read from the
inputs, as Flax does. Group norms run in at least float32 (float64 under x64), and attention
goes through `jaxdiff.models.layers.attention` (softmax in float32), so diffusers'
`upcast_attention`/`upcast_softmax` need no counterpart. Parameters carry logical axis names
like the rest of `jaxdiff.models`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import attention

zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()

ACTIVATIONS = {"swish": nn.silu, "silu": nn.silu, "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
               "gelu": lambda x: nn.gelu(x, approximate=False), "relu": nn.relu}


def activation(name):
    """diffusers' `get_activation(name)` as a JAX function; one-line error for another name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _norm_dtype(dtype):
    """Norms and softmax run in float32, or wider when the model computes wider (float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def conv2d(features, kernel_size, *, name=None, dtype, param_dtype, strides=1, padding=None,
           use_bias=True):
    """A PyTorch-style Conv2d (symmetric `padding`, default kernel_size // 2; or explicit
    ((top, bottom), (left, right))) with logical axis names on its HWIO kernel (name=None in a
    `setup`, which names it by its attribute)."""
    if padding is None:
        padding = kernel_size // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                   padding=padding, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                   kernel_init=nn.with_logical_partitioning(
                       nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
                   bias_init=nn.with_logical_partitioning(zeros, ("conv_out",)), name=name)


def linear(features, *, name=None, dtype, param_dtype, use_bias=True, axes=("embed", "embed")):
    """A PyTorch-style Linear: nn.Dense with logical axis names (in, out) on its kernel."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                    bias_init=nn.with_logical_partitioning(zeros, axes[-1:]), name=name)


def group_norm(x, groups, eps, *, name, dtype, param_dtype, axis_name="conv_out"):
    """torch.nn.GroupNorm(groups, C, eps) over x (B, ..., C): statistics per sample and group
    over all positions, computed in at least float32 (two-pass variance, as torch), then
    cast to `dtype`. One-line error when `groups` does not divide C."""
    channels = x.shape[-1]
    if channels % groups:
        raise ValueError(f"group norm {name!r}: {channels} channels are not divisible into "
                         f"{groups} groups")
    wide = _norm_dtype(dtype)
    norm = nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=wide, param_dtype=param_dtype,
                        use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(ones, (axis_name,)),
                        bias_init=nn.with_logical_partitioning(zeros, (axis_name,)), name=name)
    return norm(x.astype(wide)).astype(dtype)


# --- timesteps ---------------------------------------------------------------------------------


def get_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False,
                           downscale_freq_shift=1.0, scale=1.0, max_period=10000):
    """diffusers' sinusoidal timestep features: (B,) -> (B, embedding_dim).

    Frequencies f_i = max_period^(-i / (half - downscale_freq_shift)), i < half = dim // 2;
    features [sin(scale t f), cos(scale t f)] ([cos, sin] with flip_sin_to_cos), zero-padded
    to an odd `embedding_dim`. Always float32, as diffusers computes it whatever the model's
    dtype (a float64 model casts the result, like diffusers' `t_emb.to(sample.dtype)`); the
    exponents are divided in numpy, which rounds as torch does.
    """
    t = jnp.asarray(timesteps)
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D array (one per sample), got shape {t.shape}")
    half = embedding_dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    freqs = jnp.exp(jnp.asarray(exponent / np.float32(half - downscale_freq_shift)))
    args = jnp.float32(scale) * (t.astype(jnp.float32)[:, None] * freqs[None, :])
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if embedding_dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nn.Module):
    """diffusers' `Timesteps`: `get_timestep_embedding` with fixed settings (no parameters)."""

    num_channels: int
    flip_sin_to_cos: bool = False
    downscale_freq_shift: float = 1.0
    scale: float = 1.0

    def __call__(self, timesteps):
        return get_timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos,
                                      self.downscale_freq_shift, self.scale)


class TimestepEmbedding(nn.Module):
    """diffusers' `TimestepEmbedding`: [sample + cond_proj(condition)] -> linear_1 -> act ->
    linear_2 [-> post_act]. `cond_proj` (no bias) exists when `cond_proj_dim` is set (LCM's
    guidance-scale conditioning); the input width is the sample's."""

    time_embed_dim: int
    act_fn: str | None = "silu"
    out_dim: int | None = None
    post_act_fn: str | None = None
    cond_proj_dim: int | None = None
    sample_proj_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample, condition=None):  # (B, in) [, (B, cond_proj_dim)] -> (B, out)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        sample = jnp.asarray(sample, self.dtype)
        if self.cond_proj_dim is not None:
            proj = linear(sample.shape[-1], name="cond_proj", use_bias=False, **kw)
            if condition is not None:
                sample = sample + proj(condition)
            elif self.is_initializing():  # create the parameter even when init passes none
                proj(jnp.zeros((1, self.cond_proj_dim), self.dtype))
        elif condition is not None:
            raise ValueError("TimestepEmbedding got a condition but has no cond_proj "
                             "(cond_proj_dim=None)")
        h = linear(self.time_embed_dim, name="linear_1", use_bias=self.sample_proj_bias,
                   axes=(None, "embed"), **kw)(sample)
        if self.act_fn is not None:
            h = activation(self.act_fn)(h)
        h = linear(self.out_dim or self.time_embed_dim, name="linear_2",
                   use_bias=self.sample_proj_bias, **kw)(h)
        if self.post_act_fn is not None:
            h = activation(self.post_act_fn)(h)
        return h


# --- resampling --------------------------------------------------------------------------------


def _nearest(x, size):
    """torch `F.interpolate(mode="nearest")` of x (B, H, W, C) to `size` (H', W'): source index
    floor(dst * in / out)."""
    (H, W), (Ho, Wo) = x.shape[1:3], size
    rows = np.minimum(np.floor(np.arange(Ho) * (H / Ho)).astype(int), H - 1)
    cols = np.minimum(np.floor(np.arange(Wo) * (W / Wo)).astype(int), W - 1)
    return x[:, rows][:, :, cols]


class Downsample2D(nn.Module):
    """diffusers' `Downsample2D`: a stride-2 conv `conv` (kernel_size, `padding` on every side;
    padding=0 pads (0, 1) at the bottom and right first, as the VAE encoder does), or a 2x2
    average pool without `use_conv`. diffusers keeps this conv under `conv` whatever its
    `name` argument (`name="conv"` also stores a duplicate `Conv2d_0`, which a loader should
    ignore)."""

    use_conv: bool = False
    out_channels: int | None = None
    padding: int = 1
    kernel_size: int = 3
    bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, H, W, C) -> (B, ceil-ish H/2, W/2, out)
        x = jnp.asarray(x, self.dtype)
        if not self.use_conv:
            if self.out_channels not in (None, x.shape[-1]):
                raise ValueError(f"Downsample2D without a conv keeps the channels ({x.shape[-1]}),"
                                 f" got out_channels={self.out_channels}")
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return conv2d(self.out_channels or x.shape[-1], self.kernel_size, strides=2, padding=pad,
                      use_bias=self.bias, name="conv", dtype=self.dtype,
                      param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
    """diffusers' `Upsample2D`: nearest-neighbour x2 (or to `output_size`), then the conv
    `conv` with `use_conv`. Transposed-conv upsampling is not mirrored."""

    use_conv: bool = False
    out_channels: int | None = None
    kernel_size: int = 3
    padding: int = 1
    bias: bool = True
    interpolate: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, output_size=None):  # (B, H, W, C) -> (B, 2H, 2W, out)
        x = jnp.asarray(x, self.dtype)
        if self.interpolate:
            if output_size is None:
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            else:
                x = _nearest(x, tuple(output_size))
        if self.use_conv:
            x = conv2d(self.out_channels or x.shape[-1], self.kernel_size, padding=self.padding,
                       use_bias=self.bias, name="conv", dtype=self.dtype,
                       param_dtype=self.param_dtype)(x)
        return x


# --- residual block ----------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    """diffusers' `ResnetBlock2D` (NHWC): norm1 -> act [-> up/down] -> conv1 [+ time_emb_proj(
    act(temb))] -> norm2 (scale/shift from temb with "scale_shift") -> act -> dropout -> conv2,
    plus the input (through the 1x1 `conv_shortcut` when the width changes or
    `use_in_shortcut`), divided by `output_scale_factor`.

    `temb_channels`: None (the default here, unlike diffusers' 512) means no `time_emb_proj`;
    any other value creates it, its input width read from `temb`, which must then be given.
    `up`/`down` resample both branches by nearest x2 / 2x2 average pool (diffusers' kernel=None).
    """

    out_channels: int | None = None
    temb_channels: int | None = None
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    non_linearity: str = "swish"
    dropout: float = 0.0
    skip_time_act: bool = False
    time_embedding_norm: str = "default"
    output_scale_factor: float = 1.0
    use_in_shortcut: bool | None = None
    up: bool = False
    down: bool = False
    conv_shortcut_bias: bool = True
    conv_2d_out_channels: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None, *, train=False):  # (B, H, W, C), (B, T) -> (B, H', W', out)
        if self.time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"ResnetBlock2D time_embedding_norm={self.time_embedding_norm!r} is "
                             "not supported; allowed: default, scale_shift")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = activation(self.non_linearity)
        x = jnp.asarray(x, self.dtype)
        C = x.shape[-1]
        out = self.out_channels or C
        final = self.conv_2d_out_channels or out
        h = act(group_norm(x, self.groups, self.eps, name="norm1", **kw))
        if self.up:
            x, h = Upsample2D(**kw)(x), Upsample2D(**kw)(h)
        elif self.down:
            x, h = Downsample2D(**kw)(x), Downsample2D(**kw)(h)
        h = conv2d(out, 3, name="conv1", **kw)(h)
        emb = None
        if self.temb_channels is not None:
            if temb is None:
                raise ValueError("this ResnetBlock2D has a time_emb_proj (temb_channels="
                                 f"{self.temb_channels}) and needs temb")
            emb = temb if self.skip_time_act else act(jnp.asarray(temb, self.dtype))
            width = 2 * out if self.time_embedding_norm == "scale_shift" else out
            emb = linear(width, name="time_emb_proj", axes=("embed", "conv_out"), **kw)(emb)
            emb = emb[:, None, None, :]
        if self.time_embedding_norm == "default":
            if emb is not None:
                h = h + emb
            h = group_norm(h, self.groups_out or self.groups, self.eps, name="norm2", **kw)
        else:
            if emb is None:
                raise ValueError("ResnetBlock2D with time_embedding_norm='scale_shift' needs temb")
            h = group_norm(h, self.groups_out or self.groups, self.eps, name="norm2", **kw)
            scale, shift = jnp.split(emb, 2, axis=-1)
            h = h * (1 + scale) + shift
        h = nn.Dropout(self.dropout, deterministic=not train)(act(h))
        h = conv2d(final, 3, name="conv2", **kw)(h)
        shortcut = C != final if self.use_in_shortcut is None else self.use_in_shortcut
        if shortcut:
            x = conv2d(final, 1, name="conv_shortcut", use_bias=self.conv_shortcut_bias, **kw)(x)
        return (x + h) / self.output_scale_factor


# --- attention ---------------------------------------------------------------------------------


class Attention(nn.Module):
    """diffusers' `Attention` with its default processor, on tokens (B, S, C) or a feature map
    (B, H, W, C) (flattened to H*W tokens and reshaped back):

    [group_norm] -> to_q; to_k, to_v of `encoder_hidden_states` (B, T, D_ctx) or of the normed
    input -> `heads` heads of `dim_head` -> softmax(q k^T / sqrt(dim_head)) v through
    `jaxdiff.models.layers.attention` -> `to_out.0` [-> dropout] [+ input with
    residual_connection] -> / rescale_output_factor.

    `mask`: optional boolean, broadcastable to (B, heads, S, T), True where a query may attend
    (diffusers' additive attention masks are `mask = bias > -1` of its 0 / -10000 form).
    `bias`: biases on to_q/to_k/to_v (diffusers' default False; the VAE uses True); `out_bias`
    on to_out.0. The output width is the input's.
    """

    heads: int = 8
    dim_head: int = 64
    bias: bool = False
    out_bias: bool = True
    norm_num_groups: int | None = None
    eps: float = 1e-5
    rescale_output_factor: float = 1.0
    residual_connection: bool = False
    dropout: float = 0.0
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states=None, mask=None, *, train=False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.asarray(hidden_states, self.dtype)
        if x.ndim not in (3, 4):
            raise ValueError(f"Attention takes (B, S, C) tokens or a (B, H, W, C) feature map, "
                             f"got shape {x.shape}")
        shape, (B, C) = x.shape, (x.shape[0], x.shape[-1])
        residual = x
        h = x.reshape(B, -1, C)
        if self.norm_num_groups is not None:
            h = group_norm(h, self.norm_num_groups, self.eps, name="group_norm", **kw)
        context = h if encoder_hidden_states is None else jnp.asarray(encoder_hidden_states,
                                                                      self.dtype)
        inner = self.heads * self.dim_head
        proj = dict(use_bias=self.bias, **kw)
        q = linear(inner, name="to_q", axes=("embed", "heads"), **proj)(h)
        k = linear(inner, name="to_k", axes=(None, "heads"), **proj)(context)
        v = linear(inner, name="to_v", axes=(None, "heads"), **proj)(context)
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.dim_head)
        out = attention(split(q), split(k), split(v), mask=mask,
                        implementation=self.implementation)  # (B, S, heads, dim_head)
        out = out.reshape(B, -1, inner).astype(self.dtype)
        out = linear(C, name="to_out.0", use_bias=self.out_bias, axes=("heads", "embed"),
                     **kw)(out)
        out = nn.Dropout(self.dropout, deterministic=not train)(out).reshape(shape)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor


__all__ = ["ACTIVATIONS", "Attention", "Downsample2D", "ResnetBlock2D", "TimestepEmbedding",
           "Timesteps", "Upsample2D", "activation", "conv2d", "get_timestep_embedding",
           "group_norm", "linear"]
