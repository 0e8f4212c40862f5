"""UNet in the DDPM++/ADM style (Ho et al. 2020; Song et al. 2021, DDPM++; Dhariwal & Nichol 2021).

Residual blocks GroupNorm-SiLU-conv with the time (+ class) embedding applied as scale and shift
after the second GroupNorm (AdaGN, Dhariwal & Nichol 2021, Sec. 3), dropout before the last conv,
self-attention blocks at the feature resolutions in `attn_resolutions` and in the middle,
optional cross-attention to a context sequence after each self-attention (Rombach et al. 2022,
Sec. 3.3), skip connections from every encoder block to the decoder, strided-conv downsampling and
nearest-neighbour + conv upsampling. The last conv of each residual branch, the attention output
projections and the output conv are zero-initialised (ADM), so an untrained UNet outputs 0.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import (
    GUIDANCE_SCALE,
    LabelEmbedder,
    MultiHeadAttention,
    TimestepEmbedder,
    check_guidance_input,
    dense,
    maybe_remat,
    modulate,
    zeros,
)


def conv(features, kernel, *, name, dtype, param_dtype, strides=1, init=None):
    """kernel×kernel conv with 'same' padding and logical axis names on its params."""
    init = init or nn.initializers.lecun_normal()
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(init, (None, None, "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(zeros, ("conv_out",)),
        name=name,
    )


def group_norm(channels, groups, *, name, dtype, param_dtype):
    """GroupNorm with gcd(groups, channels) groups, so narrow layers still normalise."""
    return nn.GroupNorm(
        num_groups=math.gcd(groups, channels),
        epsilon=1e-6,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
        bias_init=nn.with_logical_partitioning(zeros, ("conv_out",)),
        name=name,
    )


class ResBlock(nn.Module):
    """GN-SiLU-conv, AdaGN(emb)-SiLU-dropout-conv, plus a (1×1-projected) skip."""

    out_channels: int
    dropout: float = 0.0
    groups: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    split: int = 0  # > 0: x is [h; skip] with `split` h channels, see `UNet.split_skips`

    @nn.compact
    def __call__(self, x, emb, train=False):  # x (B, H, W, C), emb (B, E) -> (B, H, W, out)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        C, out = x.shape[-1], self.out_channels
        h = nn.silu(group_norm(C, self.groups, name="norm_0", **kw)(x))
        h = self._conv(h, out, 3, "conv_0", kw)
        mod = dense(2 * out, ("embed", "conv_out"), name="emb_proj", **kw)(nn.silu(emb))
        scale, shift = jnp.split(mod, 2, axis=-1)  # (B, out) each
        h = modulate(group_norm(out, self.groups, name="norm_1", **kw)(h), shift, scale)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        h = conv(out, 3, name="conv_1", init=zeros, **kw)(h)
        if C != out:
            x = self._conv(x, out, 1, "skip", kw)
        return x + h

    def _conv(self, x, out, size, name, kw):
        """conv(x); split: the h and the skip channels each through their own slice of the
        kernel (`name`_h, `name`_skip, the bias on the first), the sum the same function."""
        if not self.split:
            return conv(out, size, name=name, **kw)(x)
        a = conv(out, size, name=f"{name}_h", **kw)(x[..., : self.split])
        b = nn.Conv(out, (size, size), padding=((size // 2,) * 2,) * 2, use_bias=False,
                    dtype=self.dtype, param_dtype=self.param_dtype, name=f"{name}_skip")
        return a + b(x[..., self.split:])


class AttnBlock(nn.Module):
    """Residual self-attention over the H·W positions, then cross-attention to `context`."""

    num_heads: int
    groups: int = 32
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):  # x (B, H, W, C), context (B, T, D_ctx)
        B, H, W, C = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mha = dict(num_heads=self.num_heads, implementation=self.attention_impl, out_init=zeros)
        h = group_norm(C, self.groups, name="norm", **kw)(x).reshape(B, H * W, C)
        x = x + MultiHeadAttention(name="attn", **mha, **kw)(h).reshape(B, H, W, C)
        if context is not None:
            h = nn.LayerNorm(epsilon=1e-6, name="norm_cross", **kw)(x).reshape(B, H * W, C)
            x = x + MultiHeadAttention(name="cross_attn", **mha, **kw)(h, context).reshape(x.shape)
        return x


class UNet(nn.Module):
    """DDPM++/ADM UNet for x (B, H, W, C) NHWC; see the module docstring.

    `__call__(x, t, y=None, *, train=False, context=None)`: t (B,) or () conditioning value,
    multiplied by `time_scale` before the sinusoidal features; y (B,) int labels in [0, K] with
    K = num_classes the classifier-free-guidance null label (y=None means all-null); context
    (B, T, context_dim) when `context_dim` is set. `attn_resolutions` are feature-map heights
    (e.g. (4,) for attention at 4×4). Returns (B, H, W, out_channels or C) float32.
    Feature caches (`jaxdiff.accel.cache`) add `skip_level` and `deep`, see `__call__`; they
    change neither the plain pass nor the parameters.
    """

    channels: int = 64
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    mid_attn: bool = True
    num_heads: int = 4
    dropout: float = 0.0
    num_classes: int = 0
    context_dim: int | None = None
    out_channels: int | None = None
    norm_groups: int = 32
    time_scale: float = 1.0
    remat: bool | str = False  # True, False or a policy name (`layers.REMAT_POLICIES`)
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # Q-Diffusion's split shortcut (Li et al. 2023, Sec. 3.3): each decoder block's first
    # convolutions take the h and the skip channels of [h; skip] as two convolutions, so that a
    # quantizer gives each its own activation range; `split_skip_params` converts a trained
    # param tree (the function is the same)
    split_skips: bool = False
    # guided distillation (Meng et al. 2023): the network also takes the guidance scale w
    # (`__call__(..., w=)`, one per sample), embedded like t and added to the time embedding
    guidance_embed: bool = False

    def check_image_size(self, height, width):
        """One-line ValueError when the image cannot be halved len(channel_mult) - 1 times."""
        factor = 2 ** (len(self.channel_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"image size {height}x{width} is not divisible by 2^(len(channel_mult)-1)={factor}"
                f" (channel_mult={tuple(self.channel_mult)})"
            )

    @nn.compact
    def __call__(self, x, t, y=None, *, train=False, context=None, skip_level=None, deep=None,
                 w=None):
        """The forward pass; with `skip_level` (DeepCache, Ma et al. 2024) it returns `(out,
        deep)`, `deep` being the input of the decoder block that takes encoder skip number
        `skip_level` (0 = conv_in's output, `num_skips() - 1` the deepest). Given `deep`, only
        the shallow branch runs: the encoder up to that skip and the decoder from that block."""
        B, H, W, C = x.shape
        self.check_image_size(H, W)
        self._check_context(context)
        self._check_skip_level(skip_level, deep)
        emb = self._embed(t, y, B, w)  # (B, 4·channels)
        h = conv(self.channels, 3, name="conv_in", **self._kw())(x.astype(self.dtype))
        skips = [h]
        stop = self.num_skips() if deep is None else skip_level + 1  # skips to compute
        for level, mult in enumerate(self.channel_mult):
            h = self._down_level(level, mult, h, emb, context, train, skips, stop)
        if deep is None:
            h = self._block(ResBlock, "mid_res_0", h.shape[-1])(h, emb, train)
            if self.mid_attn:
                h = self._block(AttnBlock, "mid_attn")(h, context)
            h = self._block(ResBlock, "mid_res_1", h.shape[-1])(h, emb, train)
        skips += [None] * (self.num_skips() - len(skips))  # not computed in a shallow pass
        cut = dict(level=skip_level, deep=deep)
        for level in reversed(range(len(self.channel_mult))):
            h = self._up_level(level, h, skips, emb, context, train, cut)
        h = nn.silu(group_norm(h.shape[-1], self.norm_groups, name="norm_out", **self._kw())(h))
        out = conv(self.out_channels or C, 3, name="conv_out", init=zeros, **self._kw())(h)
        out = out.astype(jnp.float32)
        return out if skip_level is None else (out, cut["deep"])

    def num_skips(self):
        """Encoder outputs the decoder takes: conv_in's, each block's, each downsampling's."""
        levels = len(self.channel_mult)
        return 1 + levels * self.num_res_blocks + levels - 1

    def _check_skip_level(self, skip_level, deep):
        if skip_level is None and deep is not None:
            raise ValueError("deep features were given to a UNet without skip_level")
        if skip_level is not None and not 0 <= skip_level < self.num_skips():
            raise ValueError(f"skip_level={skip_level!r} must be in [0, {self.num_skips() - 1}] "
                             f"(the UNet's encoder skips)")

    def _kw(self):
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _block(self, cls, name, *args):
        """A residual or attention block, wrapped in nn.remat with the policy of `remat`
        (`layers.maybe_remat`; train is static)."""
        if cls is ResBlock:
            cls = maybe_remat(cls, self.remat, static_argnums=(3,))
            out, split = (*args, 0)[:2]
            return cls(out, self.dropout, self.norm_groups, split=split, name=name,
                       **self._kw())
        cls = maybe_remat(cls, self.remat)
        return cls(self.num_heads, self.norm_groups, self.attention_impl, name=name, **self._kw())

    def _down_level(self, level, mult, h, emb, context, train, skips, stop):
        """num_res_blocks blocks (+ attention), then a stride-2 conv unless last, each output
        appended to `skips` while it holds fewer than `stop`."""
        for i in range(self.num_res_blocks):
            if len(skips) >= stop:
                return h
            h = self._block(ResBlock, f"down_{level}_res_{i}", self.channels * mult)(h, emb, train)
            if h.shape[1] in self.attn_resolutions:
                h = self._block(AttnBlock, f"down_{level}_attn_{i}")(h, context)
            skips.append(h)
        if level < len(self.channel_mult) - 1 and len(skips) < stop:
            h = conv(h.shape[-1], 3, strides=2, name=f"down_{level}_downsample", **self._kw())(h)
            skips.append(h)
        return h

    def _up_level(self, level, h, skips, emb, context, train, cut):
        """num_res_blocks + 1 blocks on [h, skip] (+ attention), then 2× upsampling unless first.
        Blocks whose skip is None (deeper than a shallow pass) do not run; at the block taking
        skip `cut["level"]`, its input h is recorded in `cut["deep"]`, or replaced by it."""
        out = self.channels * self.channel_mult[level]
        for i in range(self.num_res_blocks + 1):
            if len(skips) - 1 == cut["level"]:
                h = cut["deep"] if cut["deep"] is not None else h
                cut["deep"] = h
            skip = skips.pop()
            if skip is None:
                continue
            split = h.shape[-1] if self.split_skips else 0
            h = jnp.concatenate([h, skip], axis=-1)  # (B, h, w, C_h + C_skip)
            h = self._block(ResBlock, f"up_{level}_res_{i}", out, split)(h, emb, train)
            if h.shape[1] in self.attn_resolutions:
                h = self._block(AttnBlock, f"up_{level}_attn_{i}")(h, context)
        if level > 0 and skip is not None:
            h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest, (B, 2h, 2w, C)
            h = conv(out, 3, name=f"up_{level}_upsample", **self._kw())(h)
        return h

    def _embed(self, t, y, batch, w=None):
        """Time embedding (+ guidance-scale and label embeddings), (B, 4·channels)."""
        width = 4 * self.channels
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32) * self.time_scale, (batch,))
        emb = TimestepEmbedder(width, self.channels, name="time_embed", **self._kw())(t)
        w = check_guidance_input(self, w, batch)
        if w is not None:
            emb = emb + TimestepEmbedder(width, self.channels, name="guidance_embed",
                                         **self._kw())(w * GUIDANCE_SCALE)
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("labels y were given to a UNet with num_classes=0")
            return emb
        if y is None:
            y = jnp.full((batch,), self.num_classes, jnp.int32)
        return emb + LabelEmbedder(self.num_classes, width, name="label_embed", **self._kw())(y)

    def _check_context(self, context):
        if self.context_dim is None and context is not None:
            raise ValueError("context was given to a UNet with context_dim=None")
        if self.context_dim is not None and (
            context is None or context.ndim != 3 or context.shape[-1] != self.context_dim
        ):
            shape = None if context is None else tuple(context.shape)
            raise ValueError(f"context must be (B, T, {self.context_dim}), got {shape}")


def split_skip_params(params, model):
    """A trained UNet's params for `model.clone(split_skips=True)`: each decoder block's conv_0
    and skip kernels cut at the h / skip channel boundary (the same function)."""
    c = params["conv_in"]["kernel"].shape[2]
    size = 2 ** len(model.channel_mult)
    args = (jnp.zeros((1, size, size, c)), jnp.zeros((1,)),
            jnp.zeros((1,), jnp.int32) if model.num_classes else None)
    kw = {} if model.context_dim is None else dict(context=jnp.zeros((1, 1, model.context_dim)))
    split = jax.eval_shape(lambda: model.clone(split_skips=True).init(
        jax.random.key(0), *args, **kw))["params"]
    split = nn.unbox(split)
    out = dict(params)
    for block, sub in split.items():
        if not any(k.endswith("_h") for k in sub):
            continue
        new = {k: v for k, v in params[block].items() if k not in ("conv_0", "skip")}
        for name in ("conv_0", "skip"):
            if f"{name}_h" not in sub:
                continue
            kernel, bias = params[block][name]["kernel"], params[block][name]["bias"]
            c = sub[f"{name}_h"]["kernel"].shape[2]
            new[f"{name}_h"] = {"kernel": kernel[:, :, :c], "bias": bias}
            new[f"{name}_skip"] = {"kernel": kernel[:, :, c:]}
        out[block] = new
    return out
