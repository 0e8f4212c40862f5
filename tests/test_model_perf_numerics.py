"""The CPU performance rewrites of the DiT / UNet / attention code (issue 19) keep the numbers.

`tests/data/model_perf_numerics.npz` holds outputs computed by the model code *before* those
rewrites: for small DiT and UNet configurations with fixed, non-trivial parameters (every leaf
drawn from a seeded normal, so the zero-initialised adaLN / output layers do not hide anything)
and fixed inputs, the forward output, the gradient of a fixed linear functional of the output
with respect to the input, and one fixed random projection of each parameter's gradient. The
tests recompute them with the current code and compare within float32 tolerance. A reference
attention written out in plain numpy checks the attention path on its own.

Regenerate (only with the model code of before the rewrite):
    python tests/test_model_perf_numerics.py
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import models
from jaxdiff.models.layers import MultiHeadAttention, attention

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                    "model_perf_numerics.npz")

CASES = {
    "dit": dict(
        model=dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, num_classes=10,
                   learn_sigma=True),
        x=(2, 8, 8, 4), labels=True),
    "dit_diffusers": dict(  # the diffusers-compatible variant (frequency shift, MLP eps)
        model=dict(depth=1, hidden_size=32, num_heads=2, patch_size=2, num_classes=0,
                   frequency_shift=1.0, mlp_norm_eps=1e-5),
        x=(3, 4, 4, 4), labels=False),
    "unet": dict(
        model=dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                   num_heads=2, norm_groups=4),
        x=(2, 8, 8, 3), labels=False),
    "unet_cross": dict(
        model=dict(channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(4,),
                   num_heads=2, norm_groups=4, context_dim=6),
        x=(2, 4, 4, 3), labels=False, context=(2, 5, 6)),
}


def _family(name):
    return "dit" if name.startswith("dit") else "unet"


def _randomised(params, seed):
    """Every leaf replaced by seeded normal values (scale 0.2), in the tree's path order."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    new = [jnp.asarray(0.2 * rng.standard_normal(np.shape(p)), jnp.float32) for p in leaves]
    return jax.tree_util.tree_unflatten(treedef, new)


def compute(name):
    """{key: array} for case `name` with the current model code."""
    case = CASES[name]
    model = models.build(_family(name), **case["model"])
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(case["x"]), jnp.float32)
    B = case["x"][0]
    t = jnp.asarray(rng.uniform(0, 1000, B), jnp.float32)
    kw = {}
    if case["labels"]:
        kw["y"] = jnp.asarray(rng.integers(0, case["model"]["num_classes"] + 1, B), jnp.int32)
    if "context" in case:
        kw["context"] = jnp.asarray(rng.standard_normal(case["context"]), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, **kw))["params"]
    params = _randomised(jax.tree.map(jnp.zeros_like, params), 2)
    out = model.apply({"params": params}, x, t, **kw)
    w = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)

    def loss(p, x):
        return jnp.sum(model.apply({"params": p}, x, t, **kw) * w)

    gp, gx = jax.grad(loss, argnums=(0, 1))(params, x)
    prng = np.random.default_rng(3)
    proj = [float(jnp.sum(g * jnp.asarray(prng.standard_normal(np.shape(g)), jnp.float32)))
            for g in jax.tree_util.tree_leaves(gp)]
    return {"out": np.asarray(out), "grad_x": np.asarray(gx),
            "grad_params_proj": np.asarray(proj, np.float64)}


def _reference():
    with np.load(DATA) as f:
        return {k: f[k] for k in f.files}


def _close(got, want, rtol=2e-4):
    """Within rtol of want's scale (max abs), elementwise."""
    scale = max(float(np.max(np.abs(want))), 1e-6)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients_match_before(name):
    ref = _reference()
    got = compute(name)
    for key, value in got.items():
        _close(value, ref[f"{name}/{key}"])


def _numpy_attention(q, k, v, mask=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhst,bthd->bshd", p, v)


@pytest.mark.parametrize("shape", [(2, 16, 16, 3, 8), (1, 7, 5, 2, 4)])
def test_xla_attention_matches_numpy(shape):
    B, S, T, H, D = shape
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, S, H, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, T, H, D)).astype(np.float32) for _ in range(2))
    got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), implementation="xla")
    np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v), atol=2e-5)
    mask = rng.random((B, 1, S, T)) < 0.7
    mask[..., 0] = True
    got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=jnp.asarray(mask),
                    implementation="xla")
    np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, mask), atol=2e-5)


def _autodiff_attention(q, k, v, mask=None):
    """The pre-rewrite XLA attention (batch-first einsums, autodiff through jax.nn.softmax)."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=acc) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(acc).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
    return jnp.einsum("bhst,bthd->bshd", weights.astype(v.dtype), v)


@pytest.mark.parametrize("masked", [False, True])
def test_xla_attention_derivatives_match_autodiff(masked):
    """The custom derivative rule: reverse mode, forward mode and a second derivative equal plain
    autodiff of the reference, with a key-padding mask and a query row that sees no key."""
    B, S, T, H, D = 2, 6, 5, 2, 4
    rng = np.random.default_rng(7)
    q, k, v, g, tq, tk, tv = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in
                              [(B, S, H, D), (B, T, H, D), (B, T, H, D), (B, S, H, D),
                               (B, S, H, D), (B, T, H, D), (B, T, H, D)])
    mask = None
    if masked:
        m = rng.random((B, H, S, T)) < 0.6
        m[..., 0] = True
        m[1, 0, 2, :] = False  # a query that may attend to no key
        mask = jnp.asarray(m)
    new = lambda *a: attention(*a, mask=mask, implementation="xla")  # noqa: E731
    ref = lambda *a: _autodiff_attention(*a, mask=mask)  # noqa: E731
    for a, b in zip(jax.vjp(new, q, k, v)[1](g), jax.vjp(ref, q, k, v)[1](g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    for a, b in zip(jax.jvp(new, (q, k, v), (tq, tk, tv)), jax.jvp(ref, (q, k, v), (tq, tk, tv))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # a second derivative: the gradient of a gradient norm
    second = lambda f: jax.grad(  # noqa: E731
        lambda q: jnp.sum(jax.grad(lambda q: jnp.sum(f(q, k, v) * g))(q) ** 2))(q)
    np.testing.assert_allclose(np.asarray(second(new)), np.asarray(second(ref)), atol=1e-4)


def test_multihead_attention_matches_numpy():
    """Self-attention through the module: qkv projection, heads, attention, output projection."""
    B, S, D, H = 2, 12, 16, 4
    rng = np.random.default_rng(4)
    x = rng.standard_normal((B, S, D)).astype(np.float32)
    mha = MultiHeadAttention(H, "xla")
    params = _randomised(mha.init(jax.random.key(0), jnp.asarray(x))["params"], 5)
    got = np.asarray(mha.apply({"params": params}, jnp.asarray(x)))
    p = jax.tree.map(np.asarray, nn.unbox(params))
    qkv = x @ p["qkv"]["kernel"] + p["qkv"]["bias"]
    qkv = qkv.reshape(B, S, 3, H, D // H)
    o = _numpy_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(B, S, D)
    want = o @ p["proj"]["kernel"] + p["proj"]["bias"]
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


if __name__ == "__main__":  # regenerate the stored outputs (with the pre-rewrite code only)
    data = {f"{name}/{k}": v for name in CASES for k, v in compute(name).items()}
    os.makedirs(os.path.dirname(DATA), exist_ok=True)
    np.savez_compressed(DATA, **data)
    print(DATA, os.path.getsize(DATA), "bytes")
