"""CLIP's text encoder (Radford et al. 2021) as the text conditioning of Stable Diffusion.

A pre-norm causal transformer over byte-level BPE tokens: token + learned position embeddings,
`num_hidden_layers` blocks (LayerNorm -> causal self-attention -> residual, LayerNorm -> MLP ->
residual), a final LayerNorm, and a pooled vector read at the end-of-text token (optionally
projected by `text_projection`, as SDXL's second encoder does).

The module tree mirrors the state_dict of transformers' `CLIPTextModel` /
`CLIPTextModelWithProjection` as the hub checkpoints store it (`text_model.embeddings.
token_embedding`, `text_model.encoder.layers.N.self_attn.q_proj`, ..., `text_projection`), so
`jaxdiff.interop.folders` maps every parameter to its PyTorch key by name alone
(`jaxdiff.interop.clip` loads and exports folders).

Stable Diffusion 1.x conditions on `last_hidden_state`; SD 2.x's folders already drop the last
block (their config has one layer fewer than OpenCLIP's); SDXL conditions on the penultimate
block's output without the final LayerNorm: `hidden_states[-2]` with `output_hidden_states=True`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import attention, dense

ones = nn.initializers.ones_init()
zeros = nn.initializers.zeros_init()


def quick_gelu(x):
    """x·σ(1.702·x): the sigmoid approximation of GELU that OpenAI's CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}
# transformers' CLIPTextModel before PR #24773 stored eos_token_id=2 and pools at argmax(ids)
LEGACY_EOS_TOKEN_ID = 2


@flax.struct.dataclass
class CLIPTextOutput:
    """What the text encoder returns (a pytree, so it passes through `jax.jit`).

    last_hidden_state: (B, S, D) after the final LayerNorm.
    pooler_output: (B, D), last_hidden_state at each sequence's end-of-text token.
    hidden_states: with `output_hidden_states=True`, the embeddings then every block's output
      (num_hidden_layers + 1 arrays of (B, S, D), none with the final LayerNorm); else None.
    text_embeds: (B, projection_dim) = text_projection(pooler_output) for
      `CLIPTextModelWithProjection`; None for `CLIPTextModel`.
    """

    last_hidden_state: Any
    pooler_output: Any
    hidden_states: Any = None
    text_embeds: Any = None


def layer_norm(eps, name, dtype, param_dtype):
    """LayerNorm computed in float32 at least (float64 stays), scale/bias on `embed`."""
    return nn.LayerNorm(
        epsilon=eps, dtype=jnp.promote_types(dtype, jnp.float32), param_dtype=param_dtype,
        name=name,
        scale_init=nn.with_logical_partitioning(ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(zeros, ("embed",)))


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate `q_proj`/`k_proj`/`v_proj`/`out_proj` (biases on
    all four), through `jaxdiff.models.layers.attention`."""

    num_heads: int
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):  # x (B, S, D), mask boolean broadcastable to (B, H, S, S)
        B, S, D = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads = lambda a: a.reshape(B, S, self.num_heads, D // self.num_heads)
        q = heads(dense(D, ("embed", "heads"), name="q_proj", **kw)(x))
        k = heads(dense(D, ("embed", "heads"), name="k_proj", **kw)(x))
        v = heads(dense(D, ("embed", "heads"), name="v_proj", **kw)(x))
        out = attention(q, k, v, mask=mask, implementation=self.implementation)
        return dense(D, ("heads", "embed"), name="out_proj", **kw)(out.reshape(B, S, D))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    intermediate_size: int
    hidden_act: str = "quick_gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
        h = ACTIVATIONS[self.hidden_act](h)
        return dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    """One pre-norm block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name, a: layer_norm(self.layer_norm_eps, name, self.dtype,
                                          self.param_dtype)(a).astype(self.dtype)
        h = CLIPAttention(self.num_heads, self.implementation, name="self_attn", **kw)(
            norm("layer_norm1", x), mask)
        x = x + h
        mlp = CLIPMLP(self.intermediate_size, self.hidden_act, name="mlp", **kw)
        return x + mlp(norm("layer_norm2", x))


class CLIPEncoder(nn.Module):
    """The stack of blocks (`layers.0` ... `layers.{N-1}`); returns every block's output."""

    num_hidden_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        outputs = []
        for i in range(self.num_hidden_layers):
            x = CLIPEncoderLayer(self.num_heads, self.intermediate_size, self.hidden_act,
                                 self.layer_norm_eps, self.implementation, self.dtype,
                                 self.param_dtype, name=f"layers.{i}")(x, mask)
            outputs.append(x)
        return outputs


class CLIPTextEmbeddings(nn.Module):
    """token_embedding(ids) + position_embedding(0 .. S-1)."""

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.normal(0.02)
        tokens = nn.Embed(self.vocab_size, self.hidden_size, name="token_embedding",
                          embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
                          **kw)
        positions = nn.Embed(self.max_position_embeddings, self.hidden_size,
                             name="position_embedding",
                             embedding_init=nn.with_logical_partitioning(init, ("length", "embed")),
                             **kw)
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[-1]))[None]


class CLIPTextTransformer(nn.Module):
    """Embeddings, causal encoder, final LayerNorm and end-of-text pooling (transformers'
    `text_model`). Returns (last_hidden_state, pooled, [embeddings, block outputs...])."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        B, S = input_ids.shape
        h = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                               name="embeddings", **kw)(input_ids)
        # causal: token i sees tokens 0..i; a padding mask (B, S), 1 = real token, hides keys
        mask = jnp.tril(jnp.ones((S, S), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) != 0)[:, None, None, :]
        outputs = CLIPEncoder(self.num_hidden_layers, self.num_attention_heads,
                              self.intermediate_size, self.hidden_act, self.layer_norm_eps,
                              self.implementation, name="encoder", **kw)(h, mask)
        last = outputs[-1] if outputs else h
        last = layer_norm(self.layer_norm_eps, "final_layer_norm", self.dtype,
                          self.param_dtype)(last)
        last = last.astype(self.dtype)
        ids = input_ids.astype(jnp.int32)
        if self.eos_token_id == LEGACY_EOS_TOKEN_ID:  # legacy configs: EOS has the largest id
            where = jnp.argmax(ids, axis=-1)
        else:  # the first EOS (padding may repeat it)
            where = jnp.argmax((ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(B), where]
        return last, pooled, [h, *outputs]


class CLIPTextModel(nn.Module):
    """transformers' `CLIPTextModel` (fields named as in its `CLIPTextConfig`).

    `model.apply(variables, input_ids, attention_mask=None, output_hidden_states=False)` with
    input_ids (B, S) int, S <= max_position_embeddings, and an optional padding mask (B, S)
    (1 = token, 0 = padding; Stable Diffusion passes none) -> `CLIPTextOutput`, in float32 (or
    `dtype` when that is wider). A padded query that may attend to no key (left padding) gets a
    zero attention output where transformers averages over all keys; no pooled output reads it.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; allowed: "
                             f"{', '.join(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        self.text_model = CLIPTextTransformer(
            self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers,
            self.num_attention_heads, self.max_position_embeddings, self.hidden_act,
            self.layer_norm_eps, self.eos_token_id, self.implementation, self.dtype,
            self.param_dtype)

    def _check_inputs(self, input_ids, attention_mask):
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be (batch, length) integers, got shape "
                             f"{input_ids.shape} dtype {input_ids.dtype}")
        if input_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(f"input_ids has length {input_ids.shape[1]}, beyond "
                             f"max_position_embeddings={self.max_position_embeddings}")
        if attention_mask is not None and np.shape(attention_mask) != input_ids.shape:
            raise ValueError(f"attention_mask has shape {np.shape(attention_mask)}; it must be "
                             f"shaped like input_ids {input_ids.shape}")
        try:
            values = np.asarray(input_ids)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            return input_ids
        if values.size and (values.min() < 0 or values.max() >= self.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size - 1}] (vocab_size), got "
                             f"values in [{values.min()}, {values.max()}]")
        return input_ids

    def _encode(self, input_ids, attention_mask, output_hidden_states):
        input_ids = self._check_inputs(input_ids, attention_mask)
        last, pooled, hidden = self.text_model(input_ids, attention_mask)
        out = jnp.promote_types(self.dtype, jnp.float32)
        hidden = tuple(h.astype(out) for h in hidden) if output_hidden_states else None
        return last.astype(out), pooled, hidden

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False):
        last, pooled, hidden = self._encode(input_ids, attention_mask, output_hidden_states)
        out = jnp.promote_types(self.dtype, jnp.float32)
        return CLIPTextOutput(last, pooled.astype(out), hidden)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' `CLIPTextModelWithProjection`: `CLIPTextModel` plus `text_projection`, a
    bias-free linear map of the pooled vector to `projection_dim` (`text_embeds`; SDXL's second
    text encoder feeds it to the UNet's added conditioning). `pooler_output` stays unprojected.
    """

    projection_dim: int = 512

    def setup(self):
        super().setup()
        init = nn.with_logical_partitioning(nn.initializers.normal(self.hidden_size**-0.5),
                                            ("embed", None))
        self.text_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                                        param_dtype=self.param_dtype, kernel_init=init)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False):
        last, pooled, hidden = self._encode(input_ids, attention_mask, output_hidden_states)
        out = jnp.promote_types(self.dtype, jnp.float32)
        embeds = self.text_projection(pooled)
        return CLIPTextOutput(last, pooled.astype(out), hidden, embeds.astype(out))
