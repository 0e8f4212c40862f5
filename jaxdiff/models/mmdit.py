"""MMDiT, the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al. 2024, "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis"), as diffusers'
`SD3Transformer2DModel` builds it.

Image latents are cut into p×p patches (a stride-p convolution) plus a fixed 2-D sin-cos table;
the text tokens are projected to the same width. Each joint block keeps two streams (image and
text) with their own adaLN-Zero modulation, projections and MLPs, and lets them attend jointly:
one softmax over the concatenated [image, text] tokens (Sec. 4 of the paper). The conditioning
vector is the timestep embedding plus a projection of the pooled text embedding. The last block
only updates the image stream (`context_pre_only`); an adaptive LayerNorm and a linear map give
the p·p·C values per patch. SD3.5 adds RMS q/k normalisation (`qk_norm="rms_norm"`) and, in the
blocks listed in `dual_attention_layers`, a second self-attention over the image tokens alone.

The parameter tree mirrors the diffusers state_dict: joining a Flax path with "." gives the
PyTorch key up to the leaf name (`kernel` <-> `weight`, transposed; `scale` <-> `weight`), e.g.
`transformer_blocks.0.attn.to_q.kernel` <-> `transformer_blocks.0.attn.to_q.weight`, so
`jaxdiff.interop.sd3` loads and writes diffusers folders without a rename table. diffusers' one
buffer, the position table `pos_embed.pos_embed`, is not a parameter here: it is recomputed (only
the crop the latent grid needs) and checked against the folder on load.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.dit import unpatchify
from jaxdiff.models.layers import attention, dense, modulate, zeros

QK_NORMS = (None, "rms_norm")
FREQUENCY_SIZE = 256  # channels of the sinusoidal timestep features (diffusers' Timesteps(256))
EPS = 1e-6  # every LayerNorm and RMSNorm of the model


def sincos_1d(dim, pos):
    """(len(pos), dim) features [sin(pos·ω), cos(pos·ω)], ω_i = 10000^(-i/(dim/2)), computed in
    float64 and rounded to float32 as diffusers' `get_1d_sincos_pos_embed_from_grid` does."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    out = np.asarray(pos, np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def grid_positions(max_size, base_size):
    """The max_size positions along one axis of diffusers' table: i / (max_size / base_size) in
    float32 (a table wider than the training grid is squeezed to its extent)."""
    return np.arange(max_size, dtype=np.float32) / np.float32(max_size / base_size)


def crop_offsets(max_size, height, width):
    """(top, left) of the centred height×width crop of the max_size×max_size table."""
    return (max_size - height) // 2, (max_size - width) // 2


def pos_embed_axes(dim, max_size, base_size, height, width):
    """The two separable halves of the cropped table: (width, dim/2) features of the column
    (first half of the channels) and (height, dim/2) features of the row (second half)."""
    pos = grid_positions(max_size, base_size)
    top, left = crop_offsets(max_size, height, width)
    return sincos_1d(dim // 2, pos[left:left + width]), sincos_1d(dim // 2, pos[top:top + height])


def pos_embed_table(dim, max_size, base_size):
    """(max_size², dim) float32: diffusers' stored `pos_embed` buffer (rows, then columns)."""
    cols, rows = pos_embed_axes(dim, max_size, base_size, max_size, max_size)
    n = max_size
    return np.concatenate([np.broadcast_to(cols[None], (n, n, dim // 2)),
                           np.broadcast_to(rows[:, None], (n, n, dim // 2))],
                          axis=-1).reshape(n * n, dim)


def timestep_features(t, dim=FREQUENCY_SIZE, max_period=10000.0):
    """(B,) -> (B, dim) float32 [cos(t·f), sin(t·f)], f_i = max_period^(-i/(dim/2)) (diffusers'
    `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`, always in float32)."""
    half = dim // 2
    freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def layer_norm(x, eps=EPS):
    """LayerNorm without affine parameters, its statistics in (at least) float32."""
    y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = y - y.mean(-1, keepdims=True)
    return (y * jax.lax.rsqrt((y * y).mean(-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) · weight over the last axis (Zhang & Sennrich 2019), in (at least) float32;
    diffusers' `RMSNorm(dim, eps)` with its `weight` (here `scale`)."""

    eps: float = EPS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)),
                           (x.shape[-1],), self.param_dtype)
        y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        y = y * jax.lax.rsqrt((y * y).mean(-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


class PatchEmbed(nn.Module):
    """(B, H, W, C) -> (B, H/p · W/p, D): the stride-p convolution `proj`, tokens in row-major
    patch order, plus the centred crop of the fixed max_size² sin-cos table (diffusers'
    `PatchEmbed` with `pos_embed_max_size`, `cropped_pos_embed`)."""

    patch_size: int
    embed_dim: int
    pos_embed_max_size: int
    base_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        p, D = self.patch_size, self.embed_dim
        init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", (0, 1, 2), -1)
        axes = (None, None, "conv_in", "embed")
        h = nn.Conv(D, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=nn.with_logical_partitioning(init, axes),
                    bias_init=nn.with_logical_partitioning(zeros, ("embed",)), name="proj")(x)
        B, gh, gw, _ = h.shape
        cols, rows = pos_embed_axes(D, self.pos_embed_max_size, self.base_size, gh, gw)
        table = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cols)[None], (gh, gw, D // 2)),
                                 jnp.broadcast_to(jnp.asarray(rows)[:, None], (gh, gw, D // 2))],
                                axis=-1)
        return (h + table.astype(h.dtype)).reshape(B, gh * gw, D)


class MLP2(nn.Module):
    """Linear - SiLU - Linear with diffusers' `linear_1`/`linear_2` names (`TimestepEmbedding`,
    `PixArtAlphaTextProjection(act_fn="silu")`)."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  init=nn.initializers.normal(0.02))
        h = dense(self.features, (None, "embed"), name="linear_1", **kw)(x)
        return dense(self.features, ("embed", "embed"), name="linear_2", **kw)(nn.silu(h))


class AdaLayerNorm(nn.Module):
    """`linear(silu(c))` split into `chunks` (B, D) pieces: adaLN-Zero's (shift, scale, gate)
    triples (`AdaLayerNormZero`: 6, `SD35AdaLayerNormZeroX`: 9) or the (scale, shift) pair of
    `AdaLayerNormContinuous` (2). Zero-initialised, so a fresh block is the identity."""

    chunks: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, c, width):
        mod = dense(self.chunks * width, ("embed", "mlp"), name="linear", init=zeros,
                    dtype=self.dtype, param_dtype=self.param_dtype)
        return jnp.split(mod(nn.silu(c)), self.chunks, axis=-1)


class JointAttention(nn.Module):
    """diffusers' `Attention` run by `JointAttnProcessor2_0`: q/k/v of the image tokens
    (`to_q`, `to_k`, `to_v`) and, with a context, of the text tokens (`add_q_proj`, ...), each
    head optionally RMS-normalised (`norm_q`, `norm_k`, `norm_added_q`, `norm_added_k`), one
    softmax over [image, text] keys, then `to_out.0` for the image part and `to_add_out` for the
    text part (absent when `context_pre_only`: the last block drops the text output).
    Returns (image output, text output or None)."""

    num_heads: int
    head_dim: int
    qk_norm: str | None = None
    context_pre_only: bool = False
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):  # x (B, S, D), context (B, T, D)
        B, S, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def project(h, prefix, suffix, norm_prefix):
            out = []
            for name in ("q", "k", "v"):
                y = dense(H * Dh, ("embed", "heads"), name=f"{prefix}{name}{suffix}", **kw)(h)
                y = y.reshape(h.shape[0], h.shape[1], H, Dh)
                if self.qk_norm == "rms_norm" and name != "v":
                    y = RMSNorm(name=f"{norm_prefix}{name}", **kw)(y)
                out.append(y)
            return out

        q, k, v = project(x, "to_", "", "norm_")
        if context is not None:
            cq, ck, cv = project(context, "add_", "_proj", "norm_added_")
            q, k, v = (jnp.concatenate([a, b], axis=1) for a, b in ((q, cq), (k, ck), (v, cv)))
        out = attention(q, k, v, implementation=self.implementation)  # (B, S [+ T], H, Dh)
        out = out.reshape(B, out.shape[1], H * Dh)
        image = dense(D, ("heads", "embed"), name="to_out.0", **kw)(out[:, :S])
        if context is None or self.context_pre_only:
            return image, None
        return image, dense(D, ("heads", "embed"), name="to_add_out", **kw)(out[:, S:])


class JointTransformerBlock(nn.Module):
    """diffusers' `JointTransformerBlock`: adaLN-Zero modulation of each stream (`norm1`,
    `norm1_context`), joint attention (`attn`), optionally a second image self-attention
    (`attn2`, SD3.5's dual attention, its own shift/scale/gate from `norm1`'s extra 3 chunks),
    then per-stream LayerNorm (`norm2`, `norm2_context`) and GELU MLPs (`ff`, `ff_context`).
    With `context_pre_only` (the last block) the text stream is only read: `norm1_context` is an
    adaptive (scale, shift) LayerNorm and the block returns None for it."""

    num_heads: int
    head_dim: int
    context_pre_only: bool = False
    qk_norm: str | None = None
    dual_attention: bool = False
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, c):  # x (B, S, D), context (B, T, D), c (B, D)
        D = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mods = AdaLayerNorm(9 if self.dual_attention else 6, name="norm1", **kw)(c, D)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        normed = layer_norm(x)
        h = modulate(normed, shift, scale)
        if self.context_pre_only:
            c_scale, c_shift = AdaLayerNorm(2, name="norm1_context", **kw)(c, D)
            ch = modulate(layer_norm(context), c_shift, c_scale)
        else:
            cmods = AdaLayerNorm(6, name="norm1_context", **kw)(c, D)
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = cmods
            ch = modulate(layer_norm(context), c_shift, c_scale)
        attn = JointAttention(self.num_heads, self.head_dim, self.qk_norm, self.context_pre_only,
                              self.attention_impl, name="attn", **kw)
        out, c_out = attn(h, ch)
        x = x + gate[:, None] * out
        if self.dual_attention:
            shift2, scale2, gate2 = mods[6:]
            attn2 = JointAttention(self.num_heads, self.head_dim, self.qk_norm, False,
                                   self.attention_impl, name="attn2", **kw)
            x = x + gate2[:, None] * attn2(modulate(normed, shift2, scale2))[0]
        x = x + gate_mlp[:, None] * _ff(x, shift_mlp, scale_mlp, "ff", kw)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if self.context_pre_only:
            return x, None
        context = context + c_gate[:, None] * c_out
        context = context + c_gate_mlp[:, None] * _ff(context, c_shift_mlp, c_scale_mlp,
                                                       "ff_context", kw)
        return x, nn.with_logical_constraint(context, ("batch", "length", "embed"))


def _ff(x, shift, scale, name, kw):
    """FeedForward on the modulated LayerNorm of x, its first layer named `<name>.net.0.proj`."""
    return _FF(name=name, **kw)(modulate(layer_norm(x), shift, scale))


class _FF(nn.Module):
    """diffusers' `FeedForward` names: `net.0.proj` (D -> 4D, GELU tanh) and `net.2` (4D -> D)."""

    mult: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        D, kw = x.shape[-1], dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _Proj(self.mult * D, name="net.0", **kw)(x)
        return dense(D, ("mlp", "embed"), name="net.2", **kw)(nn.gelu(h, approximate=True))


class _Proj(nn.Module):
    """diffusers' `GELU` module's linear layer, `proj` (the activation is applied outside)."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return dense(self.features, ("embed", "mlp"), name="proj", dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)


class MMDiT(nn.Module):
    """Stable Diffusion 3's MMDiT, diffusers' `SD3Transformer2DModel` (same fields and names).

    `__call__(hidden_states, encoder_hidden_states, pooled_projections, timestep)`:
    hidden_states (B, H, W, in_channels) NHWC latents, H and W multiples of `patch_size` with at
    most `pos_embed_max_size` patches each way; encoder_hidden_states (B, T, joint_attention_dim)
    text tokens; pooled_projections (B, pooled_projection_dim); timestep (B,) or () in diffusers'
    scale (SD3: 1000·σ). Returns (B, H, W, out_channels) in float32 (float64 when `dtype` is):
    the velocity prediction of the rectified-flow checkpoints.
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple = ()
    qk_norm: str | None = None
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def inner_dim(self):
        return self.num_attention_heads * self.attention_head_dim

    def check_inputs(self, hidden_states, encoder_hidden_states, pooled_projections):
        """One-line ValueError for inputs of the wrong shape for this model."""
        x, ctx, pooled = (np.shape(a) for a in (hidden_states, encoder_hidden_states,
                                                 pooled_projections))
        p, n = self.patch_size, self.pos_embed_max_size
        if len(x) != 4 or x[-1] != self.in_channels:
            raise ValueError(f"hidden_states must be (B, H, W, {self.in_channels}) NHWC, got {x}")
        if x[1] % p or x[2] % p:
            raise ValueError(f"latent size {x[1]}x{x[2]} is not divisible by patch_size={p}")
        if x[1] // p > n or x[2] // p > n:
            raise ValueError(f"latent size {x[1]}x{x[2]} has more than pos_embed_max_size={n} "
                             f"patches of {p} along a side (at most {n * p}x{n * p})")
        if len(ctx) != 3 or ctx[0] != x[0] or ctx[-1] != self.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states must be ({x[0]}, T, "
                             f"{self.joint_attention_dim}), got {ctx}")
        if pooled != (x[0], self.pooled_projection_dim):
            raise ValueError(f"pooled_projections must be ({x[0]}, "
                             f"{self.pooled_projection_dim}), got {pooled}")

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        self.check_inputs(hidden_states, encoder_hidden_states, pooled_projections)
        B, H, W, _ = hidden_states.shape
        p, D = self.patch_size, self.inner_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = PatchEmbed(p, D, self.pos_embed_max_size, self.sample_size // p, name="pos_embed",
                       **kw)(hidden_states.astype(self.dtype))  # (B, S, D)
        c = _TimeTextEmbed(D, name="time_text_embed", **kw)(
            jnp.broadcast_to(timestep, (B,)), pooled_projections.astype(self.dtype))  # (B, D)
        context = dense(self.caption_projection_dim, (None, "embed"), name="context_embedder",
                        **kw)(encoder_hidden_states.astype(self.dtype))  # (B, T, D)
        for i in range(self.num_layers):
            block = JointTransformerBlock(
                self.num_attention_heads, self.attention_head_dim,
                context_pre_only=i == self.num_layers - 1, qk_norm=self.qk_norm,
                dual_attention=i in self.dual_attention_layers,
                attention_impl=self.attention_impl, name=f"transformer_blocks.{i}", **kw)
            x, context = block(x, context, c)
        scale, shift = AdaLayerNorm(2, name="norm_out", **kw)(c, D)
        x = modulate(layer_norm(x), shift, scale)
        x = dense(p * p * self.out_channels, ("embed", None), name="proj_out", init=zeros,
                  **kw)(x)
        out = unpatchify(x, H // p, W // p, p)
        return out.astype(jnp.promote_types(self.dtype, jnp.float32))


class _TimeTextEmbed(nn.Module):
    """diffusers' `CombinedTimestepTextProjEmbeddings`: `timestep_embedder` of the sinusoidal
    timestep features plus `text_embedder` of the pooled text embedding."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t, pooled):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = MLP2(self.features, name="timestep_embedder", **kw)(
            timestep_features(t).astype(self.dtype))
        return emb + MLP2(self.features, name="text_embedder", **kw)(pooled)
