"""Fused linear multistep update x' = a x + sum_i b_i D_i in one pass over memory.

Every exponential-integrator and Adams-type sampler ends its step with such a combination of the
state and a short history of model values: DDIM (Song et al. 2021, Eq. 12), DPM-Solver++(2M/3M)
(Lu et al. 2022b, Alg. 2), UniPC (Zhao et al. 2023, Sec. 3), DEIS (Zhang & Chen 2023, Sec. 4),
iPNDM and LMS, each with its own per-step scalar coefficients. The update is memory bound: it
reads k + 1 arrays and writes one, so the kernel streams them block by block, reads the k + 1
coefficients as scalars (SMEM through scalar prefetch on TPU, a tiny array on GPU), accumulates
in float32 and writes over `x` (`input_output_aliases`).

Layout: the arrays are viewed as (rows, 128) -- lanes of 128, padded only when the size is not
a multiple of 128. TPU (Mosaic) takes row blocks that are multiples of 8 (the (8, 128) tile) or
the whole array, with a masked partial last block; GPU (Triton) needs power-of-two blocks and
does not mask, so its row block divides the row count (rows are padded in the rare case where
no large enough power of two divides it). Off accelerators it runs in Pallas interpret mode.

The update is linear in (a, b) and in (x, D), so its derivative is a closed form: `solver_step`
is a `jax.custom_jvp` whose tangent is the same combination in plain jnp, which JAX transposes
for reverse mode (gradients through samplers with `use_kernel=True`, `jaxdiff.core.schedule_opt`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

LANES = 128
BACKENDS = ("gpu", "tpu", "interpret")
_DEFAULT_ROWS = {"gpu": 32, "tpu": 512, "interpret": 32}  # rows of 128 lanes per grid step


class _Config(NamedTuple):
    """Static lowering choices; hashable so that it can be a non-differentiable argument."""

    backend: str  # "gpu", "tpu" or "interpret" (the GPU kernel in generic interpret mode)
    interpret: Any  # False, True or a `pltpu.InterpretParams`
    block: int  # rows of 128 lanes per grid step (an upper bound on GPU)


def compute_dtype(dtype):
    """float32 for bf16/f16/f32 inputs, float64 for float64 (when x64 is enabled)."""
    return jnp.promote_types(dtype, jnp.float32)


def solver_step_reference(a, x, b, ds):
    """a x + sum_i b_i ds_i in plain jnp, accumulated in float32 (or x's wider float type);
    `ds` as in `solver_step`. Returns x's dtype."""
    x, stacks = _check(x, b, ds)
    ct = compute_dtype(x.dtype)
    coef = jnp.concatenate([jnp.reshape(a, (1,)), jnp.reshape(b, (-1,))]).astype(ct)
    return _combine(coef, x, stacks).astype(x.dtype)


def _combine(coef, x, stacks):
    """coef_0 x + sum_j coef_{j+1} d_j over the stacked terms, in coef's dtype."""
    out = coef[0] * x.astype(coef.dtype)
    j = 1
    for s in stacks:
        out = out + jnp.tensordot(coef[j : j + s.shape[0]], s.astype(coef.dtype), axes=1)
        j += s.shape[0]
    return out


def solver_step(a, x, b, ds, *, interpret=None, block=None, backend=None):
    """x' = a x + sum_i b[i] ds[i] in one fused Pallas kernel, written over x's buffer.

    Args:
      a: scalar; b: (k,) coefficients (traced values are fine; cast to float32, or float64 for
        a float64 x).
      x: any shape and float dtype; the result has x's shape and dtype.
      ds: the k terms, stacked as (k, *x.shape) (how the samplers keep their history), or a
        list/tuple of such stacks and x-shaped arrays whose term count adds up to k (no copy).
      interpret: None runs interpret mode off GPU/TPU; True forces it; a
        `pltpu.InterpretParams` runs the TPU kernel in TPU interpret mode.
      block: rows of 128 lanes per grid step, a power of two >= 8 (default per backend).
      backend: "gpu", "tpu" or "interpret"; None picks from `interpret` and the default backend.
    """
    x, stacks = _check(x, b, ds)
    cfg = _config(interpret, block, backend)
    ct = compute_dtype(x.dtype)
    coef = jnp.concatenate([jnp.reshape(a, (1,)), jnp.reshape(b, (-1,))]).astype(ct)
    return _fused(cfg, coef, x, stacks)


def _check(x, b, ds):
    """Validates shapes; returns x and the terms as a tuple of (k_i, *x.shape) stacks."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"solver_step: x.dtype={x.dtype} must be a floating dtype")
    parts = list(ds) if isinstance(ds, (list, tuple)) else [ds]
    stacks = []
    for d in parts:
        d = jnp.asarray(d)
        if d.shape == x.shape:
            d = d[None]
        if d.shape[1:] != x.shape:
            raise ValueError(
                f"solver_step: ds entry of shape {d.shape} must be {x.shape} or (k, *{x.shape})"
            )
        stacks.append(d)
    k = sum(s.shape[0] for s in stacks)
    if jnp.shape(b) != (k,):
        raise ValueError(f"solver_step: b has shape {jnp.shape(b)}; the {k} terms need ({k},)")
    return x, tuple(stacks)


def _config(interpret, block, backend):
    """Resolves the backend ("tpu" for TPU interpret params) and the block size."""
    if backend is None:
        if isinstance(interpret, pltpu.InterpretParams):
            backend = "tpu"
        elif interpret:
            backend = "interpret"
        else:
            platform = jax.default_backend()
            backend = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(
                platform, "interpret"
            )
    if backend not in BACKENDS:
        raise ValueError(f"solver_step: backend={backend!r} is unknown; allowed: {BACKENDS}")
    if interpret is None:
        interpret = backend == "interpret"
    if backend == "interpret" and not interpret:
        raise ValueError(
            f"solver_step: interpret={interpret!r} needs a GPU or TPU backend (default backend: "
            f"{jax.default_backend()}); allowed here: interpret=None, True or TPU InterpretParams"
        )
    if block is None:
        block = _DEFAULT_ROWS[backend]
    if not isinstance(block, int) or block < 8 or block & (block - 1):
        raise ValueError(f"solver_step: block={block!r} must be a power of two >= 8 (rows)")
    return _Config(backend, interpret, block)


def _layout(n, dtype, cfg):
    """(rows, padded rows, row block) for n elements viewed as rows of 128 lanes."""
    rows = -(-n // LANES)
    if cfg.backend == "tpu":  # Mosaic masks a partial last block; tiles are (32 / bytes, 128)
        br = max(cfg.block, 32 // jnp.dtype(dtype).itemsize)
        return rows, rows, rows if rows <= br else br
    divisor = rows & -rows  # largest power of two dividing rows
    if divisor >= min(cfg.block, 8):
        return rows, rows, min(divisor, cfg.block)
    br = min(cfg.block, 1 << (rows - 1).bit_length())
    return rows, -(-rows // br) * br, br


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _fused(cfg, coef, x, stacks):
    _, padded, br = _layout(x.size, x.dtype, cfg)
    pad = padded * LANES - x.size

    def as_rows(v, lead=()):
        v = v.reshape(lead + (-1,))
        if pad:
            v = jnp.pad(v, [(0, 0)] * len(lead) + [(0, pad)])
        return v.reshape(lead + (padded, LANES))

    terms = [(as_rows(s, s.shape[:1]), j) for s in stacks for j in range(s.shape[0])]
    out = _pallas(cfg, coef, as_rows(x), terms, br)
    return out.reshape(-1)[: x.size].reshape(x.shape)


@_fused.defjvp
def _fused_jvp(cfg, primals, tangents):
    coef, x, stacks = primals
    dcoef, dx, dstacks = tangents
    out = _fused(cfg, coef, x, stacks)
    dout = _combine(dcoef, x, stacks) + _combine(coef, dx, dstacks)
    return out, dout.astype(x.dtype)


def _kernel(num_terms, coef_ref, x_ref, *refs):
    """One block: o = c_0 x + sum_j c_{j+1} d_j, accumulated in the coefficients' dtype."""
    d_refs, o_ref = refs[:num_terms], refs[num_terms]
    ct = coef_ref.dtype
    acc = coef_ref[0] * x_ref[...].astype(ct)
    for j, d_ref in enumerate(d_refs):
        acc = acc + coef_ref[j + 1] * d_ref[...].astype(ct)
    o_ref[...] = acc.astype(o_ref.dtype)


def _grid_spec(cfg, coef, rows, br, terms):
    """(coefficients as passed, grid spec, compiler params) of the backend: scalar prefetch into
    SMEM on TPU, a power-of-two-long vector block elsewhere (Triton blocks are powers of two)."""
    grid, block = (-(-rows // br),), (br, LANES)
    idx = lambda i, *_: (i, 0)  # noqa: E731
    # the history is passed once per term, each view selecting its row j: no copy of the stack
    d_specs = [pl.BlockSpec((None,) + block, lambda i, *_, j=j: (j, i, 0)) for _, j in terms]
    in_specs, out_spec = [pl.BlockSpec(block, idx)] + d_specs, pl.BlockSpec(block, idx)
    if cfg.backend == "tpu":
        spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_spec
        )
        return coef, spec, pltpu.CompilerParams(dimension_semantics=("parallel",))
    width = 1 << (coef.shape[0] - 1).bit_length()
    coef = jnp.pad(coef, (0, width - coef.shape[0]))
    spec = pl.GridSpec(
        grid=grid, in_specs=[pl.BlockSpec((width,), lambda i: (0,))] + in_specs,
        out_specs=out_spec,
    )
    gpu = cfg.backend == "gpu" and not cfg.interpret
    return coef, spec, pltriton.CompilerParams(num_warps=4, num_stages=1) if gpu else None


def _pallas(cfg, coef, x2, terms, br):
    """The pallas_call over row blocks; x2 is (rows, 128), terms are ((k, rows, 128), j)."""
    rows = x2.shape[0]
    coef, grid_spec, params = _grid_spec(cfg, coef, rows, br, terms)
    # x (after the coefficients) is overwritten by x'; jax 0.10.2's TPU interpreter mis-sizes an
    # aliased output with a partial last block, so that case gets a fresh buffer there
    partial_tpu_interpret = cfg.backend == "tpu" and cfg.interpret and rows % br
    nbytes = x2.size * (2 * x2.dtype.itemsize + sum(d.dtype.itemsize for d, _ in terms))
    return pl.pallas_call(
        functools.partial(_kernel, len(terms)),
        out_shape=jax.ShapeDtypeStruct(x2.shape, x2.dtype),
        grid_spec=grid_spec,
        input_output_aliases={} if partial_tpu_interpret else {1: 0},
        interpret=cfg.interpret,
        compiler_params=params,
        cost_estimate=pl.CostEstimate(
            flops=2 * x2.size * (len(terms) + 1), transcendentals=0, bytes_accessed=nbytes
        ),
        name="solver_step",
    )(coef, x2, *[d for d, _ in terms])


def hbm_bytes(x, num_terms):
    """Bytes the update must move: read x and the terms, write x' (for bandwidth figures)."""
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize * (num_terms + 2)
