"""The text-conditioned UNet of Stable Diffusion 1.x / 2.x / XL (Rombach et al. 2022; Podell et
al. 2023): a Flax mirror of diffusers' `UNet2DConditionModel`, NHWC.

conv_in -> down blocks (ResNet blocks, each followed by a cross-attention `Transformer2DModel` in
the `CrossAttnDownBlock2D`s, then a stride-2 conv) -> mid block (ResNet, transformer, ResNet) ->
up blocks (each ResNet takes the current features concatenated with the matching down-path
output, the last one first) -> GroupNorm -> act -> conv_out. Every ResNet block gets the
embedding of the timestep (sinusoidal features -> `time_embedding` MLP), plus optionally a class
embedding (`num_class_embeds`) and SDXL's `add_embedding` of the pooled text embedding and the
micro-conditioning time ids (`addition_embed_type="text_time"`).

The transformer (`Transformer2DModel` with `BasicTransformerBlock`s): GroupNorm -> proj_in (a
1x1 conv in SD 1.x, a Linear with `use_linear_projection` in SD 2.x/XL) -> per block:
LayerNorm -> self-attention (`attn1`), LayerNorm -> cross-attention to the text tokens
(`attn2`), LayerNorm -> GEGLU feed-forward (`ff.net.0.proj`, `ff.net.2`), each residual ->
proj_out, plus the block's input.

The module's fields are the `config.json` keys of diffusers with their defaults (the supported
subset; `jaxdiff.interop.unet_condition.from_config` refuses the rest), and its submodules carry
the state_dict names (`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`), so
`jaxdiff.interop.folders` maps every parameter to its PyTorch key without a rename table.
diffusers' naming quirk is kept: `attention_head_dim` is the number of heads per block, and a
head's width is the block's channels divided by it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.diffusers_blocks import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Timesteps,
    Upsample2D,
    activation,
    conv2d,
    group_norm,
    linear,
)

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
ADDITION_EMBED_TYPES = (None, "text_time")
TIME_SCALE_SHIFTS = ("default", "scale_shift")


def _layer_norm(x, eps, *, name, dtype, param_dtype):
    """torch.nn.LayerNorm over the last axis, in at least float32 (two-pass variance)."""
    wide = jnp.promote_types(dtype, jnp.float32)
    norm = nn.LayerNorm(epsilon=eps, dtype=wide, param_dtype=param_dtype,
                        use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               ("embed",)), name=name)
    return norm(x.astype(wide)).astype(dtype)


def _name(block_type):
    """diffusers reads "UNetResDownBlock2D" as "DownBlock2D" (and likewise for up blocks)."""
    return block_type[7:] if isinstance(block_type, str) and block_type.startswith("UNetRes") \
        else block_type


# --- the cross-attention transformer ----------------------------------------------------------


class GEGLU(nn.Module):
    """diffusers' `GEGLU`: `proj` to 2 x `features`, split in (hidden, gate) -> hidden ·
    GELU(gate) (exact, erf-based GELU; Shazeer 2020)."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = linear(2 * self.features, name="proj", axes=("embed", "mlp"), dtype=self.dtype,
                   param_dtype=self.param_dtype)(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers' `FeedForward` with `activation_fn="geglu"`: `net.0` (GEGLU to `mult` x the
    width) -> dropout (`net.1`, no parameters) -> `net.2` (Linear back to the width)."""

    mult: int = 4
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train=False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(x.shape[-1] * self.mult, name="net.0", **kw)(x)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return linear(x.shape[-1], name="net.2", axes=("mlp", "embed"), **kw)(h)


class BasicTransformerBlock(nn.Module):
    """diffusers' `BasicTransformerBlock` with `norm_type="layer_norm"`: pre-norm self-attention
    (`norm1`, `attn1`), cross-attention to the context (`norm2`, `attn2`) and GEGLU feed-forward
    (`norm3`, `ff`), each added to its input. Attention projections have no bias (diffusers'
    `attention_bias=False`) except `to_out.0`."""

    heads: int
    dim_head: int
    norm_eps: float = 1e-5
    dropout: float = 0.0
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, *, train=False):  # (B, S, D), (B, T, D_ctx) -> (B, S, D)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, dim_head=self.dim_head, dropout=self.dropout,
                    implementation=self.implementation, **kw)
        h = _layer_norm(x, self.norm_eps, name="norm1", **kw)
        x = x + Attention(name="attn1", **attn)(h, train=train)
        h = _layer_norm(x, self.norm_eps, name="norm2", **kw)
        x = x + Attention(name="attn2", **attn)(h, context, train=train)
        h = _layer_norm(x, self.norm_eps, name="norm3", **kw)
        return x + FeedForward(dropout=self.dropout, name="ff", **kw)(h, train=train)


class Transformer2DModel(nn.Module):
    """diffusers' `Transformer2DModel` on a feature map (its "continuous input" form):
    GroupNorm `norm` (eps 1e-6) -> `proj_in` -> `num_layers` `transformer_blocks` over the H·W
    tokens -> `proj_out`, plus the input. `proj_in`/`proj_out` are 1x1 convs, or Linears with
    `use_linear_projection` (the same map; only the weight layout differs)."""

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    dropout: float = 0.0
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, *, train=False):  # (B, H, W, C), (B, T, D) -> (B, H, W, C)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        B, H, W, C = x.shape
        inner = self.heads * self.dim_head
        h = group_norm(x, self.norm_num_groups, 1e-6, name="norm", **kw)
        if self.use_linear_projection:
            h = linear(inner, name="proj_in", axes=("embed", "embed"), **kw)(h.reshape(B, H * W, C))
        else:
            h = conv2d(inner, 1, padding=0, name="proj_in", **kw)(h).reshape(B, H * W, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.dim_head, dropout=self.dropout,
                                      implementation=self.implementation,
                                      name=f"transformer_blocks.{i}", **kw)(h, context,
                                                                            train=train)
        if self.use_linear_projection:
            h = linear(C, name="proj_out", axes=("embed", "embed"), **kw)(h).reshape(B, H, W, C)
        else:
            h = conv2d(C, 1, padding=0, name="proj_out", **kw)(h.reshape(B, H, W, inner))
        return h + x


# --- down, mid and up blocks ------------------------------------------------------------------


class _Resnets(nn.Module):
    """Fields every block shares (diffusers passes them from the UNet's config)."""

    out_channels: int
    transformer_layers: tuple = ()  # per ResNet: the depth of the transformer after it; () = none
    heads: int = 1
    norm_num_groups: int = 32
    eps: float = 1e-5
    act_fn: str = "silu"
    time_embedding_norm: str = "default"
    use_linear_projection: bool = False
    dropout: float = 0.0
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def resnet(self, i, temb_channels, output_scale_factor=1.0):
        return ResnetBlock2D(self.out_channels, temb_channels, groups=self.norm_num_groups,
                             eps=self.eps, non_linearity=self.act_fn, dropout=self.dropout,
                             time_embedding_norm=self.time_embedding_norm,
                             output_scale_factor=output_scale_factor, name=f"resnets.{i}",
                             dtype=self.dtype, param_dtype=self.param_dtype)

    def transformer(self, i):
        return Transformer2DModel(self.heads, self.out_channels // self.heads,
                                  num_layers=self.transformer_layers[i],
                                  norm_num_groups=self.norm_num_groups,
                                  use_linear_projection=self.use_linear_projection,
                                  dropout=self.dropout, implementation=self.implementation,
                                  name=f"attentions.{i}", dtype=self.dtype,
                                  param_dtype=self.param_dtype)


class DownBlock(_Resnets):
    """diffusers' `DownBlock2D` (no `transformer_layers`) or `CrossAttnDownBlock2D`:
    `num_layers` ResNets (`resnets.i`), each followed by a transformer (`attentions.i`) in the
    cross-attention form, then the stride-2 conv `downsamplers.0.conv`. Returns the output and
    every intermediate (the skips the up path consumes)."""

    num_layers: int = 1
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context=None, *, train=False):
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(i, temb.shape[-1])(x, temb, train=train)
            if self.transformer_layers:
                x = self.transformer(i)(x, context, train=train)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(use_conv=True, out_channels=self.out_channels,
                             padding=self.downsample_padding, name="downsamplers.0",
                             dtype=self.dtype, param_dtype=self.param_dtype)(x)
            skips.append(x)
        return x, skips


class MidBlock(_Resnets):
    """diffusers' `UNetMidBlock2DCrossAttn` (ResNet, transformer, ResNet) or, without
    `transformer_layers`, `UNetMidBlock2D` as `UNet2DConditionModel` builds it (one ResNet).
    The ResNets divide by `output_scale_factor` (the config's `mid_block_scale_factor`)."""

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x, temb, context=None, *, train=False):
        x = self.resnet(0, temb.shape[-1], self.output_scale_factor)(x, temb, train=train)
        for i in range(len(self.transformer_layers)):
            x = self.transformer(i)(x, context, train=train)
            x = self.resnet(i + 1, temb.shape[-1], self.output_scale_factor)(x, temb, train=train)
        return x


class UpBlock(_Resnets):
    """diffusers' `UpBlock2D` (no `transformer_layers`) or `CrossAttnUpBlock2D`: each of the
    `num_layers` ResNets takes [x, the last remaining skip] concatenated on channels (skips are
    consumed from the end), each followed by a transformer in the cross-attention form; then
    nearest x2 (or to `upsample_size`) and the conv `upsamplers.0.conv`."""

    num_layers: int = 1
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context=None, upsample_size=None, *, train=False):
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = self.resnet(i, temb.shape[-1])(x, temb, train=train)
            if self.transformer_layers:
                x = self.transformer(i)(x, context, train=train)
        if self.add_upsample:
            x = Upsample2D(use_conv=True, out_channels=self.out_channels, name="upsamplers.0",
                           dtype=self.dtype, param_dtype=self.param_dtype)(x, upsample_size)
        return x


# --- the UNet ---------------------------------------------------------------------------------


def _per_block(value, n, key, unit="down block"):
    """A config value given once or per down block (or per `unit`), as an n-tuple."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet2DConditionModel {key}={list(value)!r} has {len(value)} "
                             f"entries; allowed: one per {unit} ({n}) or a single value")
        return tuple(value)
    return (value,) * n


def _per_layer(value, n, key):
    """A transformer depth given once or per layer of a block, as an n-tuple of ints."""
    depths = _per_block(value, n, key, "layer of the block")
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in depths):
        raise ValueError(f"UNet2DConditionModel {key}={value!r}: transformer depths must be "
                         "positive integers")
    return depths


class UNet2DConditionModel(nn.Module):
    """diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x/2.x/XL), NHWC.

    `model.apply({"params": params}, sample, timestep, encoder_hidden_states,
    added_cond_kwargs=None, class_labels=None, timestep_cond=None)`:
      sample (B, H, W, in_channels); timestep a scalar, (1,) or (B,) (diffusion step, e.g.
      0..999); encoder_hidden_states (B, T, cross_attention_dim) (the text encoder's tokens);
      added_cond_kwargs {"text_embeds": (B, P), "time_ids": (B, 6)} for SDXL
      (`addition_embed_type="text_time"`); class_labels (B,) ints with `num_class_embeds`;
      timestep_cond (B, time_cond_proj_dim) with `time_cond_proj_dim` (LCM).
    Returns (B, H, W, out_channels), float32 (or wider when `dtype` is). `train=True` turns
    on dropout (the config's `dropout`; needs a "dropout" rng when it is not 0).

    Fields: the diffusers config keys the supported architectures use, with diffusers'
    defaults; `dtype` (compute), `param_dtype`, `implementation` (see
    `jaxdiff.models.layers.attention`).
    """

    sample_size: Any = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                               "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                             "CrossAttnUpBlock2D")
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: Any = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: Any = 1280
    transformer_layers_per_block: Any = 1
    reverse_transformer_layers_per_block: Any = None
    attention_head_dim: Any = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    num_class_embeds: int | None = None
    class_embeddings_concat: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    resnet_time_scale_shift: str = "default"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def plan(self):
        """The per-block layout diffusers derives from the config: a dict with `heads`,
        `cross_dims`, `layers` (per down block), `down_depths` / `up_depths` (per block, the
        transformer depth after each ResNet; () for blocks without attention), `mid_depths`.
        One-line ValueError for an inconsistent config."""
        down = tuple(_name(t) for t in self.down_block_types)
        up = tuple(_name(t) for t in self.up_block_types)
        n, channels = len(down), tuple(self.block_out_channels)
        for key, types, allowed in (("down_block_types", down, DOWN_BLOCKS),
                                    ("up_block_types", up, UP_BLOCKS)):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"UNet2DConditionModel {key} entry {bad[0]!r} is not supported; "
                                 f"allowed: {', '.join(allowed)}")
        if _name(self.mid_block_type) not in MID_BLOCKS:
            raise ValueError(f"UNet2DConditionModel mid_block_type={self.mid_block_type!r} is not "
                             f"supported; allowed: {', '.join(map(str, MID_BLOCKS))}")
        if n == 0 or len(up) != n or len(channels) != n:
            raise ValueError(f"UNet2DConditionModel needs as many down_block_types ({n}), "
                             f"up_block_types ({len(up)}) and block_out_channels "
                             f"({len(channels)}), at least one")
        heads = _per_block(self.attention_head_dim, n, "attention_head_dim")
        cross_dims = _per_block(self.cross_attention_dim, n, "cross_attention_dim")
        layers = _per_block(self.layers_per_block, n, "layers_per_block")
        for c, h in zip(channels, heads):
            if not isinstance(h, int) or h < 1 or c % h:
                raise ValueError(f"UNet2DConditionModel block_out_channels {c} is not divisible "
                                 f"into attention_head_dim={h} heads (diffusers' name for the "
                                 "number of heads)")
        for c in channels:
            if c % self.norm_num_groups:
                raise ValueError(f"UNet2DConditionModel block_out_channels {c} is not divisible "
                                 f"by norm_num_groups={self.norm_num_groups}")
        depths = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        down_depths = tuple(_per_layer(d, layers[i], "transformer_layers_per_block")
                            if down[i] == "CrossAttnDownBlock2D" else ()
                            for i, d in enumerate(depths))
        if self.reverse_transformer_layers_per_block is None:
            if any(isinstance(d, (list, tuple)) for d in depths):
                raise ValueError("UNet2DConditionModel transformer_layers_per_block given per "
                                 "layer needs reverse_transformer_layers_per_block (as diffusers)")
            reverse = depths[::-1]
        else:
            reverse = _per_block(self.reverse_transformer_layers_per_block, n,
                                 "reverse_transformer_layers_per_block")
        up_depths = tuple(_per_layer(d, layers[::-1][i] + 1,
                                     "reverse_transformer_layers_per_block")
                          if up[i] == "CrossAttnUpBlock2D" else ()
                          for i, d in enumerate(reverse))
        mid = depths[-1][0] if isinstance(depths[-1], (list, tuple)) else depths[-1]
        mid_depths = (mid,) if _name(self.mid_block_type) == "UNetMidBlock2DCrossAttn" else ()
        return dict(heads=heads, cross_dims=cross_dims, layers=layers, down_depths=down_depths,
                    up_depths=up_depths, mid_depths=mid_depths)

    @nn.compact
    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None,
                 class_labels=None, timestep_cond=None, *, train=False):
        plan = self.plan()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.asarray(sample, self.dtype)
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"sample must be (B, H, W, {self.in_channels}) NHWC, got shape "
                             f"{x.shape}")
        B = x.shape[0]
        context = self._context(encoder_hidden_states, B, plan)
        channels = tuple(self.block_out_channels)

        # 1. the embedding every ResNet gets
        temb = self._time_embedding(timestep, timestep_cond, B, kw)
        if self.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError(f"this UNet has num_class_embeds={self.num_class_embeds} and "
                                 "needs class_labels (B,)")
            table = nn.Embed(self.num_class_embeds, temb.shape[-1], name="class_embedding", **kw)
            class_emb = table(jnp.broadcast_to(jnp.asarray(class_labels), (B,)))
            temb = (jnp.concatenate([temb, class_emb], axis=-1) if self.class_embeddings_concat
                    else temb + class_emb)
        if self.addition_embed_type == "text_time":
            temb = temb + self._text_time_embedding(added_cond_kwargs, B, kw)
        if self.time_embedding_act_fn is not None:
            temb = activation(self.time_embedding_act_fn)(temb)

        # 2. down path
        if self.center_input_sample:
            x = 2 * x - 1.0
        x = conv2d(channels[0], self.conv_in_kernel, name="conv_in", **kw)(x)
        block = dict(norm_num_groups=self.norm_num_groups, eps=self.norm_eps, act_fn=self.act_fn,
                     time_embedding_norm=self.resnet_time_scale_shift,
                     use_linear_projection=self.use_linear_projection, dropout=self.dropout,
                     implementation=self.implementation, **kw)
        skips = [x]
        for i in range(len(channels)):
            x, out = DownBlock(channels[i], plan["down_depths"][i], plan["heads"][i],
                               num_layers=plan["layers"][i], add_downsample=i < len(channels) - 1,
                               downsample_padding=self.downsample_padding,
                               name=f"down_blocks.{i}", **block)(x, temb, context, train=train)
            skips += out

        # 3. middle
        if self.mid_block_type is not None:
            x = MidBlock(channels[-1], plan["mid_depths"], plan["heads"][-1],
                         output_scale_factor=self.mid_block_scale_factor, name="mid_block",
                         **block)(x, temb, context, train=train)

        # 4. up path: sizes not divisible by the total downsampling get explicit output sizes
        ragged = any(s % 2 ** (len(channels) - 1) for s in sample.shape[1:3])
        up_channels, up_heads = channels[::-1], plan["heads"][::-1]
        for i in range(len(channels)):
            n = plan["layers"][::-1][i] + 1
            mine, skips = skips[-n:], skips[:-n]
            last = i == len(channels) - 1
            size = skips[-1].shape[1:3] if ragged and not last else None
            x = UpBlock(up_channels[i], plan["up_depths"][i], up_heads[i], num_layers=n,
                        add_upsample=not last, name=f"up_blocks.{i}", **block)(
                x, mine, temb, context, size, train=train)

        # 5. out
        x = group_norm(x, self.norm_num_groups, self.norm_eps, name="conv_norm_out", **kw)
        x = activation(self.act_fn)(x)
        x = conv2d(self.out_channels, self.conv_out_kernel, name="conv_out", **kw)(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))

    def _context(self, encoder_hidden_states, batch, plan):
        """The text tokens (B, T, D) as the compute dtype, checked against the cross-attention
        width of the blocks that attend to them."""
        uses = [d for d, depth in zip(plan["cross_dims"], plan["down_depths"]) if depth]
        uses += [d for d, depth in zip(plan["cross_dims"][::-1], plan["up_depths"]) if depth]
        uses += [plan["cross_dims"][-1]] if plan["mid_depths"] else []
        if encoder_hidden_states is None:
            if uses:
                raise ValueError("this UNet has cross-attention blocks and needs "
                                 "encoder_hidden_states (B, T, D)")
            return None
        context = jnp.asarray(encoder_hidden_states, self.dtype)
        if context.ndim != 3 or context.shape[0] not in (1, batch):
            raise ValueError(f"encoder_hidden_states must be (B={batch}, T, D), got shape "
                             f"{context.shape}")
        bad = [d for d in uses if d != context.shape[-1]]
        if bad:
            raise ValueError(f"encoder_hidden_states width {context.shape[-1]} differs from the "
                             f"UNet's cross_attention_dim {bad[0]}")
        return jnp.broadcast_to(context, (batch,) + context.shape[1:])

    def _time_embedding(self, timestep, timestep_cond, batch, kw):
        """Sinusoidal features of the timestep (float32, as diffusers) -> `time_embedding`."""
        t = jnp.asarray(timestep)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"timestep must be a scalar or (B={batch},), got shape {t.shape}")
        t = jnp.broadcast_to(t.reshape(-1), (batch,))
        width = self.block_out_channels[0]
        features = Timesteps(width, self.flip_sin_to_cos, self.freq_shift)(t)
        embed = TimestepEmbedding(self.time_embedding_dim or 4 * width, act_fn=self.act_fn,
                                  post_act_fn=self.timestep_post_act,
                                  cond_proj_dim=self.time_cond_proj_dim, name="time_embedding",
                                  **kw)
        if timestep_cond is not None and self.time_cond_proj_dim is None:
            raise ValueError("timestep_cond was given but this UNet has no time_cond_proj_dim")
        if timestep_cond is not None:
            timestep_cond = jnp.asarray(timestep_cond, self.dtype)
            if timestep_cond.shape != (batch, self.time_cond_proj_dim):
                raise ValueError(f"timestep_cond must be (B={batch}, {self.time_cond_proj_dim}), "
                                 f"got shape {timestep_cond.shape}")
        return embed(features.astype(self.dtype), timestep_cond)

    def _text_time_embedding(self, added_cond_kwargs, batch, kw):
        """SDXL's `add_embedding` of [pooled text embedding, sinusoidal features of each time
        id (`add_time_proj`)] (original size, crop corner, target size)."""
        missing = [k for k in ("text_embeds", "time_ids") if k not in (added_cond_kwargs or {})]
        if missing:
            raise ValueError("this UNet has addition_embed_type='text_time' and needs "
                             f"added_cond_kwargs with {' and '.join(missing)}")
        text = jnp.asarray(added_cond_kwargs["text_embeds"], self.dtype)
        ids = jnp.asarray(added_cond_kwargs["time_ids"])
        if text.ndim != 2 or ids.ndim != 2 or text.shape[0] != batch or ids.shape[0] != batch:
            raise ValueError(f"added_cond_kwargs text_embeds must be (B={batch}, P) and time_ids "
                             f"(B, N), got {text.shape} and {ids.shape}")
        width = text.shape[-1] + ids.shape[-1] * self.addition_time_embed_dim
        if width != self.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds {text.shape} and time_ids {ids.shape} give {width} features "
                f"(P + N x addition_time_embed_dim={self.addition_time_embed_dim}); this UNet's "
                f"projection_class_embeddings_input_dim is "
                f"{self.projection_class_embeddings_input_dim}")
        features = Timesteps(self.addition_time_embed_dim, self.flip_sin_to_cos,
                             self.freq_shift)(ids.reshape(-1)).reshape(batch, -1)
        add = jnp.concatenate([text, features.astype(self.dtype)], axis=-1)
        return TimestepEmbedding(self.time_embedding_dim or 4 * self.block_out_channels[0],
                                 name="add_embedding", **kw)(add)


__all__ = ["BasicTransformerBlock", "DownBlock", "FeedForward", "GEGLU", "MidBlock",
           "Transformer2DModel", "UNet2DConditionModel", "UpBlock"]
