"""A transformer over token ids on the DiT blocks: the denoiser of masked (absorbing-state)
diffusion (MDLM, Sahoo et al. 2024; MD4, Shi et al. 2024) and, with `causal=True`, the
autoregressive baseline of the same size that such models are compared against.

The sequence the blocks see is one condition token (a learned start token, or the class label's
embedding for a class-conditional model, row `num_classes` being the classifier-free-guidance
null label) followed by the L token embeddings, with learned, sin-cos or rotary position
embeddings (`pos_embed`). The blocks are
`dit.DiTBlock` (adaLN-Zero); masked models are time-agnostic (Ou et al. 2024: the ideal denoiser
does not depend on t), so by default the adaLN input is the time embedder's output at t = 0, a
learned constant (MDLM's choice; `adaln_input="zero"` feeds zeros instead, which leaves the
adaLN-Zero gates learning through their biases alone); `time_conditioning=True` feeds the time
embedding of t as in DiT (needed by the uniform-noise process). The output is logits over the V
clean tokens only, so the SUBS rule "the mask token has probability 0" holds by construction
(`jaxdiff.discrete.process`).

Outputs line up with inputs for both kinds: `logits[:, i]` is the model's distribution of token
i, given the unmasked tokens (bidirectional) or given tokens 0..i-1 (causal: position i reads the
condition token and x_0..x_{i-1}).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.dit import DiTBlock, FinalLayer
from jaxdiff.models.layers import LabelEmbedder, TimestepEmbedder, maybe_remat, rope_tables

_SIZES = {"tiny": (4, 128, 4), "S": (6, 256, 4), "M": (8, 384, 6), "L": (12, 768, 12)}
TOKEN_PRESETS = {k: dict(depth=d, hidden_size=w, num_heads=h) for k, (d, w, h) in _SIZES.items()}


def check_tokens(x, vocab_size, *, allow_mask, seq_len=None, what="tokens"):
    """One-line ValueError if `x` is not integer ids, is longer than `seq_len`, or holds an id
    outside [0, V) ([0, V] with `allow_mask`, V being the mask id). Values are checked only
    when concrete (under tracing they are unknown)."""
    dtype = getattr(x, "dtype", None) or np.asarray(x).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{what} must be integer token ids, got dtype {dtype}")
    if seq_len is not None and np.shape(x)[-1] > seq_len:
        raise ValueError(f"{what} have length {np.shape(x)[-1]}, longer than the model's "
                         f"seq_len={seq_len}")
    try:
        a = np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if a.size == 0:
        return
    if not allow_mask and np.any(a == vocab_size):
        raise ValueError(f"{what}: mask id {vocab_size} is not allowed here (ids must be in "
                         f"[0, {vocab_size}))")
    hi = vocab_size if allow_mask else vocab_size - 1
    bad = a[(a < 0) | (a > hi)]
    if bad.size:
        allowed = (f"[0, {vocab_size}] ({vocab_size} = mask id)" if allow_mask
                   else f"[0, {vocab_size})")
        raise ValueError(f"{what}: id {int(bad.flat[0])} is outside {allowed} for vocab_size "
                         f"{vocab_size}")


def sincos_pos_embed_1d(dim, length):
    """(length, dim) fixed features [sin(p w_i), cos(p w_i)], w_i = 10000^(-2i/dim)."""
    if dim % 2:
        raise ValueError(f"hidden_size={dim} must be even for the sin-cos position embedding")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    out = np.arange(length, dtype=np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


class TokenTransformer(nn.Module):
    """`__call__(x, t=None, y=None, *, train=False)`: x int (B, L) ids in [0, V] (V = the mask
    id; a causal model takes no masks), L <= seq_len; t (B,) or () in [0, 1], read only with
    `time_conditioning`; y (B,) labels in [0, K] (K = null) for a class-conditional model.
    Returns float32 logits (B, L, V). Presets: `TOKEN_PRESETS`."""

    vocab_size: int  # V clean tokens; the input embedding has V + 1 rows (the mask id V)
    seq_len: int
    hidden_size: int = 256
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 0
    class_dropout_prob: float = 0.1
    causal: bool = False
    time_conditioning: bool = False
    # the adaLN input of a time-agnostic model: "constant" (the time embedder at t = 0, a learned
    # vector, as MDLM) or "zero" (the modulations are then learned biases alone)
    adaln_input: str = "constant"
    # "learned" (a table added to the input, init N(0, 0.02)), "sincos" (fixed 1-D sin-cos
    # features added to the input, amplitude 1, as DiT's 2-D ones) or "rope" (rotary embeddings
    # of queries and keys in every block, RoFormer; MDLM's choice): relative positions
    pos_embed: str = "learned"
    rope_base: float = 10000.0
    remat: bool | str = False  # True, False or a policy name (`layers.REMAT_POLICIES`)
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t=None, y=None, *, train=False):
        del train  # no dropout
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
            x = jnp.asarray(x).astype(jnp.int32)  # init_state's zeros
        check_tokens(x, self.vocab_size, allow_mask=not self.causal, seq_len=self.seq_len)
        B, L = x.shape
        D = self.hidden_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed = lambda rows, name: nn.Embed(  # noqa: E731
            rows, D, name=name, **kw,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("vocab", "embed")))
        h = embed(self.vocab_size + 1, "token_embedder")(x)  # (B, L, D)
        h = jnp.concatenate([self._condition(y, B)[:, None].astype(h.dtype), h], axis=1)
        rope = None
        if self.pos_embed == "sincos":
            pos = sincos_pos_embed_1d(D, self.seq_len + 1)
        elif self.pos_embed == "learned":
            pos = self.param("pos_embed", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (None, "embed")), (self.seq_len + 1, D),
                self.param_dtype)
        elif self.pos_embed == "rope":
            pos, rope = None, rope_tables(L + 1, D // self.num_heads, self.rope_base)
        else:
            raise ValueError(f"pos_embed={self.pos_embed!r} is unknown; allowed: learned, "
                             "sincos, rope")
        if pos is not None:
            h = h + jnp.asarray(pos[:L + 1], self.dtype)[None]
        # adaLN input: the time embedding, or (time-agnostic) the same embedder at t = 0, a
        # learned constant as in MDLM; with c = 0 ("zero") the adaLN-Zero gates learn through
        # their biases alone, D times slower than through the weights (Shakespeare, 1200 steps:
        # 4.48 bits/char with "zero", 3.56 with "constant"; the digits, 2000 steps: 1.92 vs
        # 2.06 bits/token, so configs/digits_tokens.py keeps "zero")
        if self.adaln_input not in ("constant", "zero"):
            raise ValueError(f"adaln_input={self.adaln_input!r} is unknown; allowed: constant, "
                             "zero")
        if self.time_conditioning or self.adaln_input == "constant":
            tt = t if (self.time_conditioning and t is not None) else 0.0
            tt = jnp.broadcast_to(jnp.asarray(tt, jnp.float32), (B,))
            c = TimestepEmbedder(D, name="t_embedder", **kw)(tt * 1000.0)
        else:
            c = jnp.zeros((B, D), self.dtype)
        mask = jnp.tril(jnp.ones((L + 1, L + 1), bool))[None, None] if self.causal else None
        block = maybe_remat(DiTBlock, self.remat)
        for i in range(self.depth):
            h = block(self.num_heads, self.mlp_ratio, self.attention_impl, name=f"blocks.{i}",
                      **kw)(h, c, mask, rope)
        logits = FinalLayer(1, self.vocab_size, name="final_layer", **kw)(h, c)  # (B, L+1, V)
        logits = logits[:, :L] if self.causal else logits[:, 1:]
        return logits.astype(jnp.float32)

    def _condition(self, y, batch):
        """(B, D): the class label's embedding, or a learned start token."""
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("labels y were given to a TokenTransformer with num_classes=0")
            start = self.param("start_token", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("embed",)), (self.hidden_size,),
                self.param_dtype)
            return jnp.broadcast_to(start, (batch, self.hidden_size))
        null = self.class_dropout_prob > 0
        if y is None:
            if not null:
                raise ValueError("y=None needs the null label (class_dropout_prob > 0)")
            y = jnp.full((batch,), self.num_classes, jnp.int32)
        return LabelEmbedder(self.num_classes, self.hidden_size, null, name="y_embedder",
                             dtype=self.dtype, param_dtype=self.param_dtype)(y)
