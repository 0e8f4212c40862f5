"""Pallas flash attention (interpret mode on CPU) against the plain-jnp reference: outputs and
gradients over head dims 64/72/128, lengths that are not block multiples, masks with a fully
masked row, custom blocks, bad input; the TPU variant under the TPU interpreter with race
detection; GPU/TPU lowering; the models' implementation="pallas" switch, also under a mesh.

The mesh case needs eight host devices, which JAX creates only at start-up: one subprocess runs
this file as a script (XLA_FLAGS as in tests/test_parallel.py) and prints JSON.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff.kernels.attention import attention_reference, flash_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {"float32": 1e-5, "bfloat16": 1e-2}  # max |error| relative to the reference's max |value|


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _inputs(B, S, T, H, D, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, S, H, D), dtype)
    k, v = (jax.random.normal(key, (B, T, H, D), dtype) for key in ks[1:3])
    mask = jax.random.uniform(ks[3], (B, T)) < 0.6
    return q, k, v, mask.at[-1].set(False), jax.random.normal(ks[4], q.shape, dtype)


@jax.jit
def _ref_vjp(q, k, v, mask, g):
    out, vjp = jax.vjp(lambda *a: attention_reference(*a, mask), q, k, v)
    return (out, *vjp(g))


def _kernel_vjp(q, k, v, mask, g, **kw):
    def fn(q, k, v, mask, g):
        out, vjp = jax.vjp(lambda *a: flash_attention(*a, mask, **kw), q, k, v)
        return (out, *vjp(g))

    return jax.jit(fn)(q, k, v, mask, g)


CASES = [  # dtype, head dim, S, T, (block_q, block_k), masked
    ("float32", 64, 77, 77, None, False),
    ("float32", 72, 257, 77, None, True),
    ("bfloat16", 128, 77, 257, (32, 16), True),
    ("bfloat16", 72, 33, 77, (16, 32), False),
]


@pytest.mark.parametrize("dtype,D,S,T,blocks,masked", CASES, ids=lambda c: str(c))
def test_forward_and_gradients_match_reference(dtype, D, S, T, blocks, masked):
    """(B, H) = (2, 2); with a mask, batch row 1 sees no key at all. Measured rel errors:
    f32 <= 9.4e-7, bf16 <= 4.9e-3 (against float32 truth the kernel's bf16 error equals XLA's)."""
    q, k, v, mask, g = _inputs(2, S, T, 2, D, jnp.dtype(dtype))
    mask = mask if masked else None
    bq, bk = blocks or (None, None)
    got = _kernel_vjp(q, k, v, mask, g, block_q=bq, block_k=bk)
    want = _ref_vjp(q, k, v, mask, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _rel(a, b) < TOL[dtype], (name, _rel(a, b))
    if masked:  # no visible key: output and every gradient exactly 0, never NaN
        for a in got:
            assert not np.isnan(np.asarray(a, np.float32)).any()
            assert float(jnp.abs(a[-1].astype(jnp.float32)).max()) == 0.0


def test_long_sequence_1025():
    """One head, 1025 tokens (17 key blocks of 64, 9 query blocks of 128), bf16 D=64.
    Measured rel errors <= 6.8e-3."""
    q, k, v, _, g = _inputs(1, 1025, 1025, 1, 64, jnp.bfloat16, seed=1)
    got, want = _kernel_vjp(q, k, v, None, g), _ref_vjp(q, k, v, None, g)
    assert max(_rel(a, b) for a, b in zip(got, want)) < TOL["bfloat16"]


def test_masked_keys_are_ignored_and_scale():
    """Values behind masked keys do not matter (batch rows 2, 3 repeat rows 0, 1 with those
    values moved by 100); an explicit scale equals the reference with that scale."""
    q, k, v, mask, _ = _inputs(2, 20, 24, 2, 16, jnp.float32, seed=2)
    mask = mask.at[-1, :3].set(True)
    far = v + 100.0 * (~mask)[:, :, None, None]
    twice = lambda a, b: jnp.concatenate([a, b])  # noqa: E731
    out = flash_attention(twice(q, q), twice(k, k), twice(v, far), twice(mask, mask))
    assert _rel(out[2:], out[:2]) < 1e-6
    assert _rel(out[:2], attention_reference(q, k, v, mask)) < 1e-5
    scaled = flash_attention(q, k, v, scale=0.3)
    assert _rel(scaled, attention_reference(q, k, v, scale=0.3)) < 1e-5
    assert _rel(scaled, attention_reference(q, k, v)) > 0.01  # 0.3 is not the default 1/4


def test_tpu_variant_under_tpu_interpreter_has_no_races(monkeypatch):
    """The Mosaic-TPU layout run by the TPU interpreter on 2 simulated cores with race detection:
    forward, dQ and dK/dV kernels (2 query and 2 key blocks of 128, all grid axes "parallel")."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    states = []

    class Recorded(tpu_interpret.RaceDetectionState):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            states.append(self)

    monkeypatch.setattr(tpu_interpret, "RaceDetectionState", Recorded)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    q, k, v, mask, g = _inputs(1, 129, 130, 1, 32, jnp.float32, seed=3)
    mask = mask.at[-1].set(True).at[-1, 100:].set(False)
    got = _kernel_vjp(q, k, v, mask, g, backend="tpu", interpret=params)
    assert max(_rel(a, b) for a, b in zip(got, _ref_vjp(q, k, v, mask, g))) < 1e-5
    assert len(states) == 3 and not any(s.races_found for s in states)  # fwd, dq, dkv
    # the detector is live: two parallel grid steps writing one output block are a race
    racy = pl.pallas_call(_copy_kernel, grid=(2,), interpret=params,
                          in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
                          out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
                          out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                          compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)))
    jax.block_until_ready(racy(jnp.ones((16, 128))))
    assert states[-1].races_found


def _copy_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...]


@pytest.mark.parametrize("backend,platform,target", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
def test_lowers_for_gpu_and_tpu(backend, platform, target):
    """Forward + backward lower to three Triton (GPU) or Mosaic (TPU) kernels, bf16, D=72."""
    x = jax.ShapeDtypeStruct((2, 1025, 4, 72), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((2, 1025), jnp.bool_)

    def fwd_bwd(q, k, v, mask):
        attn = lambda *a: flash_attention(*a, mask, backend=backend, interpret=False)  # noqa: E731
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(out)

    text = jax.jit(fwd_bwd).trace(x, x, x, mask).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(target) == 3


@pytest.mark.parametrize("kwargs,message", [
    (dict(q=(2, 8, 16)), r"q must have rank 4 \(B, S, H, D\), got shape \(2, 8, 16\)"),
    (dict(v=(1, 9, 2, 16)), "k and v must have the same shape"),
    (dict(k=(1, 8, 2, 32), v=(1, 8, 2, 32)), "must agree in batch, heads and head dim"),
    (dict(q=(1, 8, 2, 300), k=(1, 8, 2, 300), v=(1, 8, 2, 300)), "head dim at most 256"),
    (dict(dtype_k=jnp.bfloat16), "must be one of float32, bfloat16, float16, all the same"),
    (dict(mask=np.ones((1, 7), bool)), r"mask must be a boolean key-padding mask of shape"),
    (dict(mask=np.ones((1, 8), np.float32)), r"got float32\[1, 8\]"),
    (dict(block_q=48), "block_q=48 is not a valid block size for backend 'gpu'; allowed: a po"),
    (dict(block_k=8), "block_k=8 is not a valid block size"),
    (dict(block_k=64, backend="tpu"), "block_k=64 .* backend 'tpu'; allowed: a multiple of 128"),
    (dict(backend="cuda"), "backend='cuda' is unknown; allowed: gpu, tpu or None"),
])
def test_bad_input(kwargs, message):
    kw = dict(kwargs)
    shapes = {n: kw.pop(n, (1, 8, 2, 16)) for n in ("q", "k", "v")}
    q, k, v = (jnp.zeros(shapes[n], kw.pop(f"dtype_{n}", jnp.float32)) for n in ("q", "k", "v"))
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, kw.pop("mask", None), **kw)


def _random_params(model, *args):
    """N(0, 0.2²) parameters in `model`'s tree, drawn on the host (flax init compiles one
    generator per parameter, slow on CPU)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
    return jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype), shapes)


def test_models_pallas_equals_xla():
    """DiT (1 block, 2 heads of 16, 16 tokens; random parameters, as its zero-initialised
    output layers would make everything 0) and cross-attention with a (B, 1, 1, T) key mask:
    implementation="pallas" equals "xla" in output and parameter gradients."""
    from jaxdiff.models import DiT
    from jaxdiff.models.layers import MultiHeadAttention

    x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 1)), jnp.array([10.0, 500.0])
    dit = {impl: DiT(patch_size=2, hidden_size=32, depth=1, num_heads=2, attention_impl=impl)
           for impl in ("xla", "pallas")}
    params = _random_params(dit["xla"], x, t)
    grad = {i: jax.jit(jax.value_and_grad(lambda p, m=m: (m.apply(p, x, t) ** 2).sum()))(params)
            for i, m in dit.items()}
    assert _rel(grad["pallas"][0], grad["xla"][0]) < 1e-5
    for a, b in zip(jax.tree.leaves(grad["pallas"][1]), jax.tree.leaves(grad["xla"][1])):
        assert _rel(a, b) < 1e-4
    h, ctx = jax.random.normal(jax.random.key(2), (2, 12, 32)), jnp.ones((2, 9, 24))
    ctx = ctx * jnp.arange(24.0) / 24
    mask = (jnp.arange(9) < jnp.array([[5], [9]]))[:, None, None, :]  # (B, 1, 1, T)
    mha = {i: MultiHeadAttention(4, i) for i in ("xla", "pallas")}
    p = _random_params(mha["xla"], h, ctx, mask)
    out = {i: m.apply(p, h, ctx, mask) for i, m in mha.items()}
    assert _rel(out["pallas"], out["xla"]) < 1e-5


def test_pallas_switch_rejects_pair_masks():
    from jaxdiff.models import attention

    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"takes only key-padding masks.*got mask shape \(1, 1, 4"):
        attention(q, q, q, mask=jnp.ones((1, 1, 4, 4), bool), implementation="pallas")


@pytest.fixture(scope="module")
def mesh_results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_shard_map_on_a_mesh_equals_xla(mesh_results):
    """On a (2, 2, 2) mesh of 8 CPU devices, batch 4 over data×fsdp, 4 heads over tensor: the
    kernel runs per shard (local q (1, 40, 2, 16)) and matches XLA in output and gradients."""
    r = mesh_results
    assert r["shard_map"] and r["local_q"] == [1, 40, 2, 16]
    assert r["out_rel"] < 1e-5 and r["grad_rel"] < 1e-5, r
    assert r["unsharded_rel"] < 1e-5 and not r["unsharded_shard_map"], r  # no mesh: plain call


def _mesh_script():
    """Runs in the subprocess: pallas vs xla attention inside a jit under the model mesh."""
    from jaxdiff.models import attention
    from jaxdiff.train import parallel

    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    q, k, v, mask, g = _inputs(4, 40, 33, 4, 16, jnp.float32, seed=4)
    mask = mask.at[-1].set(True)[:, None, None, :]
    sharding = NamedSharding(mesh, P(parallel.BATCH_AXES, None, "tensor", None))
    q, k, v, g = (jax.device_put(x, sharding) for x in (q, k, v, g))

    def loss(impl, q, k, v):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jnp.vdot(attention(q, k, v, mask=mask, implementation=impl), g)

    res = {}
    for impl in ("pallas", "xla"):
        res[impl] = jax.jit(jax.value_and_grad(lambda *a, i=impl: loss(i, *a), (0, 1, 2)))(q, k, v)
    jaxpr = jax.make_jaxpr(lambda *a: loss("pallas", *a))(q, k, v)
    inner = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
    plain = jax.make_jaxpr(lambda *a: attention(*a, mask=mask, implementation="pallas"))(q, k, v)
    unsharded = attention(q, k, v, mask=mask, implementation="pallas")
    return {
        "shard_map": len(inner) == 1,
        "local_q": list(inner[0].params["jaxpr"].invars[0].aval.shape) if inner else None,
        "out_rel": _rel(res["pallas"][0], res["xla"][0]),
        "grad_rel": max(_rel(a, b) for a, b in zip(res["pallas"][1], res["xla"][1])),
        "unsharded_rel": _rel(unsharded, attention(q, k, v, mask=mask, implementation="xla")),
        "unsharded_shard_map": "shard_map" in str(plain),
    }


if __name__ == "__main__":
    print(json.dumps(_mesh_script()))
