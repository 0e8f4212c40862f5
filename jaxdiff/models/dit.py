"""Diffusion Transformer, DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Patchify (Sec. 3.2, a p×p stride-p convolution) plus a fixed 2-D sin-cos position embedding (MAE
layout), conditioning c = t-embedding + label-embedding, adaLN-Zero blocks (Sec. 3.2: shift, scale
and a gate regressed from c, the regressing layer zero-initialised so each block starts as the
identity), a zero-initialised adaptive final layer and unpatchify. With `learn_sigma` the output
has 2C channels (noise prediction and the variance interpolation of Nichol & Dhariwal 2021).

The parameter tree mirrors facebookresearch/DiT `models.py` one-to-one: joining a Flax path with
"." gives the PyTorch state_dict key up to the leaf name (`kernel` <-> `weight`, transposed;
`embedding` <-> `weight`), e.g. `blocks.3.attn.qkv.kernel` <-> `blocks.3.attn.qkv.weight`;
`jaxdiff.interop.dit_reference` does that rename. The reference's `pos_embed` buffer is not a
parameter here: it is recomputed from the image size.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

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

_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# Table 1 of the paper: depth, hidden size, heads; each with patch size 2, 4 and 8.
DIT_PRESETS = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=patch)
    for size, (depth, width, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}


def sincos_pos_embed_2d(dim, grid_h, grid_w):
    """(grid_h·grid_w, dim) fixed embedding, rows then columns (MAE/DiT `get_2d_sincos_pos_embed`:
    first half from the column index, second half from the row index, each [sin, cos])."""
    if dim % 4:
        raise ValueError(f"hidden_size={dim} must be divisible by 4 for the 2-D sin-cos embedding")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")

    def embed_1d(pos):
        out = pos.reshape(-1)[:, None] * omega[None]  # (T, dim/4)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1).astype(np.float32)


class PatchEmbed(nn.Module):
    """(B, H, W, C) -> (B, H/p · W/p, D) tokens in row-major patch order (timm's `proj` conv)."""

    patch_size: int
    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        # initialised like a Linear over the flattened patch, as in the reference
        init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", (0, 1, 2), -1)
        h = nn.Conv(
            self.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(init, (None, None, "conv_in", "embed")),
            bias_init=nn.with_logical_partitioning(zeros, ("embed",)),
            name="proj",
        )(x)  # (B, H/p, W/p, D)
        return h.reshape(h.shape[0], -1, h.shape[-1])


class Mlp(nn.Module):
    """fc1 - GELU(tanh) - fc2, timm's `Mlp` names."""

    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, T, D)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.gelu(dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x), approximate=True)
        return dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h)


def _layer_norm(x, dtype, eps=1e-6):
    """LayerNorm without affine parameters, eps 1e-6 (the reference's norm1/norm2/norm_final)."""
    return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, dtype=dtype)(x)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie 2023, Sec. 3.2, Fig. 3)."""

    num_heads: int
    mlp_ratio: float = 4.0
    attention_impl: str | None = None
    mlp_norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c, mask=None, rope=None):  # x (B,T,D), c (B,D); mask: `attention`'s
        D = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = dense(6 * D, ("embed", "mlp"), name="adaLN_modulation.1", init=zeros, **kw)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod(nn.silu(c)), 6, axis=-1)
        attn = MultiHeadAttention(self.num_heads, self.attention_impl, name="attn", **kw)
        x = x + gate1[:, None] * attn(modulate(_layer_norm(x, self.dtype), shift1, scale1),
                                      mask=mask, rope=rope)
        mlp = Mlp(int(D * self.mlp_ratio), name="mlp", **kw)
        h = modulate(_layer_norm(x, self.dtype, self.mlp_norm_eps), shift2, scale2)
        x = x + gate2[:, None] * mlp(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class FinalLayer(nn.Module):
    """Adaptive LayerNorm then a zero-initialised linear map to p·p·C_out values per token."""

    patch_size: int
    out_channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c):  # x (B, T, D), c (B, D) -> (B, T, p·p·C_out)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init=zeros)
        mod = dense(2 * x.shape[-1], ("embed", "mlp"), name="adaLN_modulation.1", **kw)
        shift, scale = jnp.split(mod(nn.silu(c)), 2, axis=-1)
        out = self.patch_size**2 * self.out_channels
        return dense(out, ("embed", None), name="linear", **kw)(
            modulate(_layer_norm(x, self.dtype), shift, scale)
        )


def unpatchify(x, grid_h, grid_w, p):
    """(B, gh·gw, p·p·C) -> (B, gh·p, gw·p, C), the inverse of the reference's patch order."""
    B, _, n = x.shape
    x = x.reshape(B, grid_h, grid_w, p, p, n // (p * p))
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(B, grid_h * p, grid_w * p, n // (p * p))


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023); presets in `DIT_PRESETS`.

    `__call__(x, t, y=None, *, train=False)`: x (B, H, W, C); t (B,) or () conditioning value,
    multiplied by `time_scale` before the sinusoidal features; y (B,) int labels in [0, K] where
    K = num_classes is the classifier-free-guidance null label (y=None means all-null). The table
    has K + 1 rows when `class_dropout_prob > 0` (the reference's rule), else K.
    Returns (B, H, W, C or 2C) float32. DiT has no dropout: `train` is accepted for the contract.
    Feature caches (`jaxdiff.accel.cache`) run ranges of blocks with `blocks`, `hidden` and
    `tokens`, see `__call__`; they change neither the plain pass nor the parameters.
    """

    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 0
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    guidance_embed: bool = False  # guided distillation: also takes w (`__call__(..., w=)`)
    time_scale: float = 1.0
    frequency_size: int = 256
    # diffusers' DiTTransformer2DModel (jaxdiff.interop.diffusers_dit): its timestep features
    # use shift 1 (`layers.timestep_embedding`) and its MLP LayerNorm eps 1e-5
    frequency_shift: float = 0.0
    mlp_norm_eps: float = 1e-6
    remat: bool | str = False  # True, False or a policy name (`layers.REMAT_POLICIES`)
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def check_image_size(self, height, width):
        """One-line ValueError when the image does not split into whole patches."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not divisible by patch_size={p}")

    @nn.compact
    def __call__(self, x, t, y=None, *, train=False, hidden=None, blocks=None, tokens=False,
                 w=None):
        """The forward pass. For feature caches: `blocks=(start, stop)` runs only those blocks,
        on `hidden` (B, T, D), the tokens after block start - 1, when given (else on the embedded
        x); `tokens=True` returns the tokens after the last block run instead of the output."""
        B, H, W, C = x.shape
        self.check_image_size(H, W)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p, D = self.patch_size, self.hidden_size
        start, stop = self._check_blocks(blocks, hidden)
        if hidden is None:
            h = PatchEmbed(p, D, name="x_embedder", **kw)(x.astype(self.dtype))  # (B, T, D)
            h = h + jnp.asarray(sincos_pos_embed_2d(D, H // p, W // p), self.dtype)
        else:
            h = hidden.astype(self.dtype)
        c = self._conditioning(t, y, B, w)  # (B, D)
        block = maybe_remat(DiTBlock, self.remat)
        args = (self.num_heads, self.mlp_ratio, self.attention_impl, self.mlp_norm_eps)
        for i in range(start, stop):
            h = block(*args, name=f"blocks.{i}", **kw)(h, c)  # (B, T, D)
        if tokens:
            return h
        out_channels = 2 * C if self.learn_sigma else C
        h = FinalLayer(p, out_channels, name="final_layer", **kw)(h, c)  # (B, T, p·p·C_out)
        return unpatchify(h, H // p, W // p, p).astype(jnp.float32)

    def _check_blocks(self, blocks, hidden):
        """(start, stop) of the blocks to run; one-line ValueError for a bad range."""
        start, stop = (0, self.depth) if blocks is None else blocks
        if not 0 <= start <= stop <= self.depth:
            raise ValueError(f"blocks={blocks!r} must be (start, stop) with "
                             f"0 <= start <= stop <= depth={self.depth}")
        if start > 0 and hidden is None:
            raise ValueError(f"blocks={blocks!r} starts after block 0 and needs hidden tokens")
        return start, stop

    def _conditioning(self, t, y, batch, w=None):
        """c = t_embedder(t · time_scale) [+ w_embedder(w)] + y_embedder(y), (B, hidden_size)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32) * self.time_scale, (batch,))
        embedder = lambda name: TimestepEmbedder(self.hidden_size, self.frequency_size,
                                                 self.frequency_shift, name=name, **kw)
        c = embedder("t_embedder")(t)
        w = check_guidance_input(self, w, batch)
        if w is not None:
            c = c + embedder("w_embedder")(w * GUIDANCE_SCALE)
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("labels y were given to a DiT with num_classes=0")
            return c
        null = self.class_dropout_prob > 0
        if y is None:
            if not null:
                raise ValueError("y=None needs the null label (class_dropout_prob > 0)")
            y = jnp.full((batch,), self.num_classes, jnp.int32)
        emb = LabelEmbedder(self.num_classes, self.hidden_size, null, name="y_embedder", **kw)
        return c + emb(y)
