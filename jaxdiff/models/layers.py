"""Blocks shared by the UNet and the DiT.

- Sinusoidal timestep features (Vaswani et al. 2017, Sec. 3.5) in the cos-then-sin order of
  GLIDE/ADM (Dhariwal & Nichol 2021) that the DiT checkpoints expect (Peebles & Xie 2023), followed
  by a two-layer MLP.
- Class-label embedding with one extra "null" row for classifier-free guidance (Ho & Salimans
  2022): label K of a K-class model means "no label". The model never drops labels itself.
- Softmax attention (Vaswani et al. 2017, Eq. 1) behind one `implementation` switch, and a
  multi-head attention module with timm's ViT names (`qkv`, `proj`) as used by DiT.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); they are metadata only
and mean nothing until a mesh and rules are set, so everything runs on a plain CPU.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxdiff.kernels.attention import MAX_HEAD_DIM, flash_attention
from jaxdiff.models import partitioning

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")

# A model's `remat` setting -> the `jax.checkpoint` policy of its rematerialised blocks (what the
# backward pass keeps instead of recomputing). "none"/False: no remat; "full"/True: keep only the
# block inputs (recompute everything else, nn.remat's default); the others are
# `jax.checkpoint_policies` of that name, e.g. "dots_saveable" keeps matmul outputs.
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def remat_policy(remat):
    """(rematerialise?, policy) of a model's `remat` setting: False/True, or a name of
    `REMAT_POLICIES` (True == "full", False == "none"). One-line ValueError otherwise."""
    if isinstance(remat, (bool, np.bool_)):
        return bool(remat), None
    if isinstance(remat, str) and remat in REMAT_POLICIES:
        return remat != "none", REMAT_POLICIES[remat]
    raise ValueError(f"remat={remat!r} is not a remat policy; allowed: False, True, "
                     f"{', '.join(REMAT_POLICIES)}")


def maybe_remat(module, remat, **kwargs):
    """`module` (a Flax module class) wrapped in `nn.remat` with the policy of `remat`
    (`remat_policy`; kwargs such as static_argnums go to nn.remat), or unchanged for no remat."""
    on, policy = remat_policy(remat)
    if not on:
        return module
    return nn.remat(module, policy=policy, **kwargs) if policy is not None else nn.remat(
        module, **kwargs)


xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()


def dense(features, axes, *, name, dtype, param_dtype, init=xavier_uniform):
    """nn.Dense with logical axis names `axes` = (in, out) on its kernel (and `out` on the bias)."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.with_logical_partitioning(zeros, axes[-1:]),
    )


def modulate(x, shift, scale):
    """x * (1 + scale) + shift with per-sample (B, C) shift/scale broadcast over x's middle axes."""
    expand = lambda a: a.reshape(a.shape[:1] + (1,) * (x.ndim - 2) + a.shape[-1:])
    return x * (1 + expand(scale)) + expand(shift)


def timestep_embedding(t, dim, max_period=10000.0, shift=0.0):
    """(B,) -> (B, dim) features [cos(t·f), sin(t·f)], f_i = max_period^(-i/(dim/2 - shift))
    (ADM/DiT: shift 0; diffusers' `Timesteps(downscale_freq_shift=1)`, e.g. its DiT: shift 1).

    The frequencies are constants: the float32 exponents PyTorch references compute,
    exponentiated in float64 and rounded once, so they do not depend on a backend's float32
    `exp` (one ulp in a frequency moves t·f by ~6e-5 at t = 1000)."""
    half = dim // 2
    exponent = -np.float32(np.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]  # (B, half)
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t, then Linear-SiLU-Linear (DiT's `t_embedder.mlp.0`/`.2` names)."""

    hidden_size: int
    frequency_size: int = 256
    frequency_shift: float = 0.0  # `timestep_embedding`'s shift
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t):  # (B,) -> (B, hidden_size)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init=nn.initializers.normal(0.02))
        h = timestep_embedding(t, self.frequency_size, shift=self.frequency_shift)
        h = dense(self.hidden_size, (None, "embed"), name="mlp.0", **kw)(h)
        return dense(self.hidden_size, ("embed", "embed"), name="mlp.2", **kw)(nn.silu(h))


# guided distillation's w conditioning: w (~0..10) is embedded as a timestep of w · 100
GUIDANCE_SCALE = 100.0


def check_guidance_input(model, w, batch):
    """w as (batch,) float32 for a model with guidance_embed, None otherwise; one-line
    ValueError for a w the model cannot take or a missing one."""
    name = type(model).__name__
    if not getattr(model, "guidance_embed", False):
        if w is not None:
            raise ValueError(f"a guidance scale w was given to a {name} with guidance_embed="
                             "False; build the student with guidance_embed=True")
        return None
    if w is None:
        raise ValueError(f"this {name} has guidance_embed=True and needs w= (the guidance "
                         "scale, one per sample)")
    return jnp.broadcast_to(jnp.asarray(w, jnp.float32), (batch,))


def _check_labels(y, rows):
    """Eager check of concrete labels; under jit an invalid label yields NaN outputs instead."""
    if not jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer):
        raise ValueError(f"class labels must be integers, got dtype {jnp.asarray(y).dtype}")
    try:
        values = np.asarray(y)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if values.size and (values.min() < 0 or values.max() >= rows):
        raise ValueError(
            f"class labels must lie in [0, {rows - 1}] ({rows} embedding rows), "
            f"got values in [{values.min()}, {values.max()}]"
        )


class LabelEmbedder(nn.Module):
    """Class-label embedding table with `num_classes + null_label` rows (row K = the CFG null)."""

    num_classes: int
    features: int
    null_label: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y):  # (B,) int -> (B, features)
        rows = self.num_classes + int(self.null_label)
        _check_labels(y, rows)
        table = nn.Embed(
            rows,
            self.features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            name="embedding_table",
        )
        # an out-of-range index makes jnp.take fill with NaN, so a bad label cannot pass silently
        return table(jnp.where((y >= 0) & (y < rows), y, rows))


def default_implementation(q, mask=None):
    """The attention kernel for this backend and input.

    GPU: cuDNN's fused attention for bf16/f16 with head dims that are multiples of 8 up to 128
    (its supported range); GPU otherwise, and TPU: the Pallas flash-attention kernel when the mask
    is absent or a key-padding mask and the head dim is at most `MAX_HEAD_DIM`; else (and always
    on CPU, where Pallas only interprets) plain XLA.
    """
    backend, dim = jax.default_backend(), q.shape[-1]
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    if backend == "gpu" and half and dim % 8 == 0 and dim <= 128:
        return "cudnn"
    if backend in ("gpu", "tpu") and dim <= MAX_HEAD_DIM and _is_key_padding(mask):
        return "pallas"
    return "xla"


def attention(q, k, v, *, mask=None, implementation=None):
    """softmax(q kᵀ / √D) v for q (B, S, H, D), k and v (B, T, H, D) -> (B, S, H, D).

    mask: optional boolean, broadcastable to (B, H, S, T); True where a query may attend.
      "pallas" takes only key-padding masks, broadcastable from (B, 1, 1, T).
    implementation: "xla" (plain jnp), "cudnn" (jax.nn.dot_product_attention), "pallas"
      (`jaxdiff.kernels.attention.flash_attention`); None picks per backend
      (`default_implementation`). A query that may attend to no key gets 0 (xla and pallas).
    """
    implementation = implementation or default_implementation(q, mask)
    if implementation == "xla":
        return _xla_attention(q, k, v, mask)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    if implementation == "pallas":
        return _pallas_attention(q, k, v, mask)
    raise ValueError(
        f"attention implementation={implementation!r} is unknown; allowed: "
        f"{', '.join(IMPLEMENTATIONS)} or None"
    )


def _is_key_padding(mask):
    """True for no mask or one broadcastable from (B, 1, 1, T): it hides keys, not pairs."""
    shape = np.shape(mask)
    return mask is None or (len(shape) <= 4 and ((1, 1, 1) + shape)[-3:-1] == (1, 1))


def _pallas_attention(q, k, v, mask):
    """The Pallas kernel. Under an abstract mesh with the model axes (`partitioning.AXES`, set by
    `jax.sharding.use_abstract_mesh` as in `parallel.jit_train_step`) it runs per shard inside
    `jax.shard_map`: batch over data×fsdp, heads over tensor (each where it divides)."""
    if not _is_key_padding(mask):
        raise ValueError(
            f"attention implementation='pallas' takes only key-padding masks, broadcastable from "
            f"(B, 1, 1, T); got mask shape {np.shape(mask)}; use 'xla' or 'cudnn' for this mask"
        )
    (B, T), args = (q.shape[0], k.shape[1]), (q, k, v)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)[:, 0, 0, :]  # (B | 1, T | 1)
        args += (jnp.broadcast_to(mask, (B, T)),)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes or not set(partitioning.AXES) <= set(mesh.axis_names):
        return flash_attention(*args)
    spec = partitioning.mesh_spec(("batch", None, "heads", None), q.shape, mesh)
    if all(axis is None for axis in spec):
        return flash_attention(*args)
    in_specs = (spec,) * 3 + ((P(spec[0], None),) if mask is not None else ())
    sharded = jax.shard_map(flash_attention, mesh=mesh, in_specs=in_specs,
                            out_specs=spec, check_vma=False)
    return sharded(*args)


def _xla_attention(q, k, v, mask):
    """Plain attention; logits and softmax in float32 at least (float64 inputs: float64).

    Computed heads-first, (B, H, S, D), with its own derivative rule (`_softmax_attention`)."""
    if mask is not None:
        mask = jnp.asarray(mask, bool)
    heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # (B, S, H, D) <-> (B, H, S, D)
    return heads_first(_softmax_attention(heads_first(q), heads_first(k), heads_first(v), mask))


def _attention_forward(q, k, v, mask):
    """(weights P (B, H, S, T) in float32 at least, output P v (B, H, S, D)), heads-first."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bhsd,bhtd->bhst", q, k, preferred_element_type=acc) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(acc).min)
    weights = jax.nn.softmax(logits, axis=-1)  # (B, H, S, T)
    if mask is not None:  # a query that may attend to no key gets 0, as in the Pallas kernel
        weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
    return weights, jnp.einsum("bhst,bhtd->bhsd", weights.astype(v.dtype), v)


@jax.custom_jvp
def _softmax_attention(q, k, v, mask):
    """softmax(q kᵀ / √D) v heads-first; `mask` None or boolean, broadcastable to (B, H, S, T)."""
    return _attention_forward(q, k, v, mask)[1]


@_softmax_attention.defjvp
def _softmax_attention_jvp(primals, tangents):
    """do = (P ∘ dL) v - o · rowsum(P ∘ dL) + P dv, dL = (dq kᵀ + q dkᵀ) / √D: the same
    derivative as autodiff's, written so that its transpose (the backward pass) takes the softmax
    correction from rowsum(dO ∘ O) over D instead of rowsum(dP ∘ P) over the T keys, and never
    differentiates through the masking. Forward mode and higher orders work as usual."""
    (q, k, v, mask), (dq, dk, dv, _) = primals, tangents
    weights, out = _attention_forward(q, k, v, mask)
    scale = 1.0 / np.sqrt(q.shape[-1])
    acc = weights.dtype
    dlogits = (jnp.einsum("bhsd,bhtd->bhst", dq, k, preferred_element_type=acc)
               + jnp.einsum("bhsd,bhtd->bhst", q, dk, preferred_element_type=acc)) * scale
    pdl = weights * dlogits  # 0 wherever the weight is 0 (masked keys, rows without keys)
    dout = (jnp.einsum("bhst,bhtd->bhsd", pdl.astype(v.dtype), v)
            - out * jnp.sum(pdl, axis=-1, keepdims=True).astype(out.dtype)
            + jnp.einsum("bhst,bhtd->bhsd", weights.astype(v.dtype), dv))
    return out, dout


def rope_tables(length, head_dim, base=10000.0):
    """Rotary position tables (Su et al. 2021, RoFormer): (cos, sin), each (length, head_dim / 2)
    float32, of the angles p·θ_i with θ_i = base^(-2i / head_dim) for positions p = 0..length-1."""
    if head_dim % 2:
        raise ValueError(f"head dimension {head_dim} must be even for rotary embeddings")
    theta = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(length, dtype=np.float64)[:, None] * theta[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x, cos, sin):
    """x (B, S, H, D) with the pairs (x_i, x_{i + D/2}) rotated by the angles of `rope_tables`
    ((S, D/2) each; the "rotate-half" layout of GPT-NeoX), computed in float32 at least, so that
    q·k depends on the positions only through their difference."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    x1, x2 = jnp.split(x.astype(acc), 2, axis=-1)
    cos, sin = (jnp.asarray(a, acc)[None, :, None, :] for a in (cos, sin))
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017) with timm's names: fused `qkv` for
    self-attention, `q` and `kv` for cross-attention to a context, output projection `proj`.
    `rope` = `rope_tables(S, D / num_heads)` rotates queries and keys of self-attention."""

    num_heads: int
    implementation: str | None = None
    out_init: Any = xavier_uniform
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, mask=None, rope=None):  # x (B,S,D), context (B,T,D_ctx)
        B, S, D = x.shape
        if D % self.num_heads:
            raise ValueError(f"width {D} is not divisible by num_heads={self.num_heads}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda a, n: a.reshape(a.shape[:2] + (n, self.num_heads, D // self.num_heads))
        if context is None:
            qkv = split(dense(3 * D, ("embed", "heads"), name="qkv", **kw)(x), 3)  # (B,S,3,H,Dh)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = split(dense(D, ("embed", "heads"), name="q", **kw)(x), 1)[:, :, 0]
            kv = split(dense(2 * D, (None, "heads"), name="kv", **kw)(context), 2)  # (B,T,2,H,Dh)
            k, v = kv[:, :, 0], kv[:, :, 1]
        if rope is not None:
            if context is not None:
                raise ValueError("rotary embeddings (rope) apply to self-attention only")
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, mask=mask, implementation=self.implementation)  # (B, S, H, Dh)
        proj = dense(D, ("heads", "embed"), name="proj", init=self.out_init, **kw)
        return proj(out.reshape(B, S, D))
