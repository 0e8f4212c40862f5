"""Blockwise ("flash") softmax attention as Pallas kernels, forward and backward.

FlashAttention-2 (Dao 2023, Alg. 1 forward, Alg. 2 backward; Dao et al. 2022, Sec. 3.1): queries
are split into blocks of `block_q` rows, keys into blocks of `block_k`; each query block streams
over the key blocks keeping a running row maximum m, normaliser l and unnormalised output
(online softmax, Milakov & Gimelshein 2018), so the S x T score matrix never exists in memory.
The forward saves the per-row log-sum-exp; the backward recomputes P = exp(S - lse) block by block
in two kernels (dQ over key blocks; dK, dV over query blocks), with delta = rowsum(dO * O).

Scores are kept in base 2 (scale * log2(e) folded into one multiply, `exp2`), accumulators and
statistics in float32, matmul inputs in the input dtype (bf16 on the tensor cores).

Masks: an optional key-padding mask (B, T), True = attend. Keys added to pad T to a block
multiple are masked the same way; query rows added to pad S are computed and dropped. A query row
that sees no key at all gets output 0 and zero gradients (never NaN): its stored lse is +1e30, so
every recomputed probability underflows to 0.

Backends: "gpu" is written for the Pallas Triton lowering (layout (B, S, H, D) read in place,
power-of-two tiles, head dim zero-padded to a power of two); "tpu" for Mosaic TPU (layout
(B, H, S, D), tiles multiple of 128). Either runs on CPU in interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

BACKENDS = ("gpu", "tpu")
DEFAULT_BLOCKS = {"gpu": (128, 64), "tpu": (128, 128)}  # (block_q, block_k)
MAX_HEAD_DIM = 256
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
NEG = -1e30  # score of a masked key: exp2(NEG - m) == 0 for any real row maximum m
EMPTY_LSE = 1e30  # lse of a row without visible keys: exp2(s - EMPTY_LSE) == 0
LOG2E = math.log2(math.e)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static kernel settings (hashable: a custom_vjp non-differentiable argument)."""

    backend: str
    block_q: int
    block_k: int
    scale: float
    interpret: Any


def _dot(a, b, dims):
    """a, b contracted by `dims` with a float32 result; float32 inputs at full precision."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _kv_slice(j, size):
    return pl.ds(pl.multiple_of(j * size, size), size)


def _probs(q, k, valid, lse, cfg):
    """Recomputed softmax weights exp(S - lse) of a (bq, bk) tile, in base 2."""
    s = _dot(q, k, _NT) * (cfg.scale * LOG2E)
    if valid is not None:
        s = jnp.where(valid, s, NEG)
    return jnp.exp2(s - lse)


def _fwd_kernel(*refs, cfg, has_mask):
    """One query block against all key blocks (Alg. 1, lines 5-12)."""
    q_ref, k_ref, v_ref, *mask_ref, o_ref, lse_ref = refs
    q = q_ref[...]  # (bq, D)
    bk = cfg.block_k

    def body(j, carry):
        m, l, acc = carry
        sl = _kv_slice(j, bk)
        s = _dot(q, k_ref[sl, :], _NT) * (cfg.scale * LOG2E)  # (bq, bk)
        valid = mask_ref[0][pl.ds(j, 1), :] > 0 if has_mask else None  # (1, bk)
        if has_mask:
            s = jnp.where(valid, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp2(s - m_new)
        if has_mask:  # a row masked so far has m_new == NEG, where exp2(s - m_new) would be 1
            p = jnp.where(valid, p, 0.0)
        alpha = jnp.exp2(m - m_new)
        v = v_ref[sl, :]
        acc = alpha * acc + _dot(p.astype(v.dtype), v, _NN)
        return m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True), acc

    rows = (q.shape[0], 1)
    init = (jnp.full(rows, NEG, jnp.float32), jnp.zeros(rows, jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, l, acc = lax.fori_loop(0, k_ref.shape[0] // bk, body, init)
    empty = l == 0.0
    l = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, EMPTY_LSE, m + jnp.log2(l))


def _dq_kernel(*refs, cfg, has_mask):
    """dQ of one query block: sum over key blocks of dS K (Alg. 2, line 21)."""
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *mask_ref, dq_ref = refs
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    bk = cfg.block_k

    def body(j, dq):
        sl = _kv_slice(j, bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        p = _probs(q, k, mask_ref[0][pl.ds(j, 1), :] > 0 if has_mask else None, lse, cfg)
        ds = p * (_dot(do, v, _NT) - delta)  # (bq, bk)
        return dq + _dot(ds.astype(k.dtype), k, _NN)

    dq = lax.fori_loop(0, k_ref.shape[0] // bk, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg, has_mask):
    """dK, dV of one key block: sums over query blocks of dSᵀQ and PᵀdO (Alg. 2, 16-22)."""
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *mask_ref, dk_ref, dv_ref = refs
    k, v = k_ref[...], v_ref[...]  # (bk, D)
    valid = mask_ref[0][...] > 0 if has_mask else None  # (1, bk)
    bq = cfg.block_q

    def body(i, carry):
        dk, dv = carry
        sl = _kv_slice(i, bq)
        q, do = q_ref[sl, :], do_ref[sl, :]
        p = _probs(q, k, valid, lse_ref[sl, :], cfg)  # (bq, bk)
        ds = p * (_dot(do, v, _NT) - delta_ref[sl, :])
        dv = dv + _dot(p.astype(do.dtype), do, _TN)
        return dk + _dot(ds.astype(q.dtype), q, _TN), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, q_ref.shape[0] // bq, body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


class _Layout:
    """Grid and BlockSpecs for arrays in kernel layout: (B, S, H, D) on "gpu" with the grid
    (blocks, B, H) (neighbouring programs share K/V in L2), (B, H, S, D) on "tpu" with the grid
    (B, H, blocks) (consecutive steps reuse the K/V block already in VMEM)."""

    def __init__(self, cfg, batch, heads, blocks, head_dim):
        self.gpu, self.d = cfg.backend == "gpu", head_dim
        self.grid = (blocks, batch, heads) if self.gpu else (batch, heads, blocks)

    def spec(self, block, index):  # index(b, h, i) -> block indices, i = this program's block
        if self.gpu:
            return pl.BlockSpec(block, lambda i, b, h: index(b, h, i))
        return pl.BlockSpec(block, index)

    def rows(self, size, whole=False):  # block i of `size` rows (or all rows) of q, k, v, o
        block = (None, size, None, self.d) if self.gpu else (None, None, size, self.d)
        at = lambda i: 0 if whole else i  # noqa: E731
        if self.gpu:
            return self.spec(block, lambda b, h, i: (b, at(i), h, 0))
        return self.spec(block, lambda b, h, i: (b, h, at(i), 0))

    def stats(self, size, whole=False):  # (B, H, S, 1) float32 lse / delta
        return self.spec((None, None, size, 1), lambda b, h, i: (b, h, 0 if whole else i, 0))

    # the float32 key mask, (B, T / bk, bk) to loop over (row j: key block j; a dynamic index
    # on sublanes, not lanes, for Mosaic) or (B, 1, T) for one key block per program
    def key_rows(self, rows, bk):
        return self.spec((None, rows, bk), lambda b, h, i: (b, 0, 0))

    def key_block(self, bk):
        return self.spec((None, 1, bk), lambda b, h, i: (b, 0, i))


def _dims(q, k, cfg):
    """(B, H, S, T, D) of kernel-layout q (B, S, H, D | B, H, S, D) and k."""
    if cfg.backend == "gpu":
        return q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.shape[3]
    return q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3]


def _call(kernel, cfg, lay, name, *, in_specs, mask, out_specs, out_shape, stages=2):
    """pallas_call of `kernel`; mask = (key mask or None, its BlockSpec), appended last."""
    keymask, mask_spec = mask
    if cfg.backend == "gpu":  # untuned Triton settings, FlashAttention-2's usual ones
        params = pltriton.CompilerParams(num_warps=4 if lay.d <= 64 else 8, num_stages=stages)
    else:
        params = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
    call = pl.pallas_call(
        functools.partial(kernel, cfg=cfg, has_mask=keymask is not None),
        grid=lay.grid,
        in_specs=in_specs + ([] if keymask is None else [mask_spec]),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=params,
        interpret=cfg.interpret,
        name=name,
    )
    return lambda *args: call(*args, *([] if keymask is None else [keymask]))


def _key_rows(keymask, bk):
    return None if keymask is None else keymask.reshape(keymask.shape[0], -1, bk)


def _forward(q, k, v, keymask, cfg):
    """(o, lse) for padded kernel-layout inputs; lse (B, H, S, 1) float32, base 2."""
    B, H, S, T, D = _dims(q, k, cfg)
    bq, bk = cfg.block_q, cfg.block_k
    lay = _Layout(cfg, B, H, S // bq, D)  # one program per query block
    kv = lay.rows(T, whole=True)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, S, 1), jnp.float32)]
    call = _call(_fwd_kernel, cfg, lay, "flash_attention_fwd", in_specs=[lay.rows(bq), kv, kv],
                 mask=(_key_rows(keymask, bk), lay.key_rows(T // bk, bk)),
                 out_specs=[lay.rows(bq), lay.stats(bq)], out_shape=out_shape, stages=3)
    return call(q, k, v)


def _backward(cfg, res, do):
    """(dq, dk, dv, None) from the saved inputs, output and lse; the mask gets no gradient."""
    q, k, v, keymask, o, lse = res
    B, H, S, T, D = _dims(q, k, cfg)
    bq, bk = cfg.block_q, cfg.block_k
    eq = "bshd,bshd->bhs" if cfg.backend == "gpu" else "bhsd,bhsd->bhs"
    delta = jnp.einsum(eq, o.astype(jnp.float32), do.astype(jnp.float32))[..., None]
    args = (q, k, v, do, lse, delta)
    lay = _Layout(cfg, B, H, S // bq, D)  # one program per query block
    kv, st = lay.rows(T, whole=True), lay.stats(bq)
    dq = _call(_dq_kernel, cfg, lay, "flash_attention_dq",
               in_specs=[lay.rows(bq), kv, kv, lay.rows(bq), st, st],
               mask=(_key_rows(keymask, bk), lay.key_rows(T // bk, bk)),
               out_specs=lay.rows(bq), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype))
    lay = _Layout(cfg, B, H, T // bk, D)  # one program per key block
    qs, st = lay.rows(S, whole=True), lay.stats(S, whole=True)
    dkv = _call(_dkv_kernel, cfg, lay, "flash_attention_dkv",
                in_specs=[qs, lay.rows(bk), lay.rows(bk), qs, st, st],
                mask=(keymask, lay.key_block(bk)), out_specs=[lay.rows(bk)] * 2,
                out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2)
    return dq(*args), *dkv(*args), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, keymask, cfg):
    return _forward(q, k, v, keymask, cfg)[0]


def _flash_fwd(q, k, v, keymask, cfg):
    o, lse = _forward(q, k, v, keymask, cfg)
    return o, (q, k, v, keymask, o, lse)


_flash.defvjp(_flash_fwd, _backward)


def _check_inputs(q, k, v, mask):
    """One-line ValueErrors for shapes and dtypes the kernel does not take."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name} must have rank 4 (B, S, H, D), got shape {jnp.shape(x)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, T, H, D), got {k.shape} and "
                         f"{v.shape}")
    (B, S, H, D), T = q.shape, k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, H, D):
        raise ValueError(f"q {q.shape} and k {k.shape} must agree in batch, heads and head dim "
                         "(B, ·, H, D)")
    if not 0 < D <= MAX_HEAD_DIM or S == 0 or T == 0:
        raise ValueError(f"head dim {D} and lengths S={S}, T={T} must be positive, head dim "
                         f"at most {MAX_HEAD_DIM}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in DTYPES:
        raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} must be one of "
                         "float32, bfloat16, float16, all the same")
    if mask is not None and (jnp.shape(mask) != (B, T) or jnp.asarray(mask).dtype != jnp.bool_):
        raise ValueError(f"mask must be a boolean key-padding mask of shape (B, T) = {(B, T)}, "
                         f"got {jnp.asarray(mask).dtype}{list(jnp.shape(mask))}")


def _pow2(n):
    """The smallest power of two >= n, at least 16 (the smallest Triton matmul side)."""
    return 2 ** max(4, (n - 1).bit_length())


def _settings(backend, block_q, block_k, interpret, S, T):
    """(backend, block_q, block_k, interpret) with per-backend defaults, checked."""
    backend = backend or (jax.default_backend() if jax.default_backend() in BACKENDS else "gpu")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; allowed: gpu, tpu or None")
    blocks = []
    for name, size, length, default in zip(("block_q", "block_k"), (block_q, block_k), (S, T),
                                           DEFAULT_BLOCKS[backend]):
        size = default if size is None else size
        gpu_ok = backend == "gpu" and size >= 16 and size & (size - 1) == 0
        if not isinstance(size, int) or not (gpu_ok or backend == "tpu" and size % 128 == 0):
            allowed = "a power of two >= 16" if backend == "gpu" else "a multiple of 128"
            raise ValueError(f"{name}={size!r} is not a valid block size for backend "
                             f"{backend!r}; allowed: {allowed}")
        fit = _pow2(length) if backend == "gpu" else -(-length // 128) * 128
        blocks.append(min(size, fit))  # no block larger than the (rounded-up) sequence
    if interpret is None:
        interpret = jax.default_backend() != backend
    return backend, blocks[0], blocks[1], interpret


def _to_kernel(x, length, head_dim, backend):
    """(B, L, H, D) -> zero-padded to `length` rows and `head_dim`, in the backend's layout."""
    pads = ((0, 0), (0, length - x.shape[1]), (0, 0), (0, head_dim - x.shape[3]))
    x = jnp.pad(x, pads) if any(p for _, p in pads) else x
    return x if backend == "gpu" else x.transpose(0, 2, 1, 3)


def flash_attention(q, k, v, mask=None, *, scale=None, block_q=None, block_k=None,
                    interpret=None, backend=None):
    """softmax(q kᵀ · scale) v for q (B, S, H, D), k and v (B, T, H, D) -> (B, S, H, D), q.dtype.

    mask: optional boolean (B, T), True where a key may be attended; rows with no visible key
      give 0. scale: default 1/√D. block_q, block_k: tile sizes (defaults `DEFAULT_BLOCKS`,
      clipped to the sequence). backend: "gpu" (Triton) or "tpu" (Mosaic) kernel; None = the
      default backend, or "gpu" on CPU. interpret: None = interpret unless running on `backend`'s
      own platform; True, or a `pltpu.InterpretParams` for the TPU interpreter.
    Differentiable in q, k, v (Pallas backward kernels).
    """
    _check_inputs(q, k, v, mask)
    (B, S, _, D), T = q.shape, k.shape[1]
    backend, bq, bk, interpret = _settings(backend, block_q, block_k, interpret, S, T)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cfg = _Config(backend, bq, bk, scale, interpret)
    S_pad, T_pad = -(-S // bq) * bq, -(-T // bk) * bk
    d_pad = _pow2(D) if backend == "gpu" else D  # Triton tiles have power-of-two sides
    keymask = None
    if mask is not None or T_pad != T:
        keymask = jnp.ones((B, T), bool) if mask is None else mask
        keymask = jnp.pad(keymask.astype(jnp.float32), ((0, 0), (0, T_pad - T)))[:, None]
    q_, k_, v_ = (_to_kernel(x, n, d_pad, backend) for x, n in ((q, S_pad), (k, T_pad), (v, T_pad)))
    out = _flash(q_, k_, v_, keymask, cfg)
    out = out if backend == "gpu" else out.transpose(0, 2, 1, 3)
    return out[:, :S, :, :D]


def attention_reference(q, k, v, mask=None, *, scale=None):
    """Plain-jnp softmax(q kᵀ · scale) v with a float32 softmax; same layouts and mask as
    `flash_attention`, rows with no visible key give 0."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32,
                        precision=lax.Precision.HIGHEST) * scale
    if mask is not None:
        visible = jnp.asarray(mask)[:, None, None, :]  # (B, 1, 1, T)
        logits = jnp.where(visible, logits, NEG)
    weights = jax.nn.softmax(logits, axis=-1)  # (B, H, S, T)
    if mask is not None:  # a row with every key masked would otherwise average all of v
        weights = jnp.where(visible, weights, 0.0)
    out = jnp.einsum("bhst,bthd->bshd", weights, v.astype(jnp.float32),
                     precision=lax.Precision.HIGHEST)
    return out.astype(q.dtype)
