"""Models: UNet and DiT shapes, conditioning, dtypes, remat, attention, presets. The DiT weight
layout against the facebookresearch/DiT reference is checked in test_interop.py."""

from functools import partial

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import DIT_PRESETS, DiT, UNet, attention, build
from jaxdiff.models.layers import LabelEmbedder

UNET_TINY = dict(
    channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_heads=2
)
DIT_TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2)
K = 10  # classes
KEY = jax.random.key(0)
# flax init compiles one threefry per parameter, slow on CPU; the cheap RBG generator keeps the
# few real initialisations short, and everything else uses host-drawn parameters (_params)
FAST_KEY = jax.random.key(0, impl="unsafe_rbg")
TINY = {"unet": UNet(num_classes=K, **UNET_TINY), "dit": DiT(num_classes=K, **DIT_TINY)}


def _inputs(shape=(2, 8, 8, 1), seed=0):
    x = jax.random.normal(jax.random.key(seed), shape)
    return x, jnp.linspace(10.0, 900.0, shape[0]), jnp.arange(shape[0], dtype=jnp.int32) % K


def _shapes(model, x, t, y=None, **kw):
    return jax.eval_shape(partial(model.init, **kw), KEY, x, t, y)


def _params(model, x, t, y=None, seed=1, **kw):
    """Random parameters in the model's tree, drawn on the host: every layer, zero-initialised
    ones included, is active, so the conditioning paths show in the output."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name, shape = path[-1].key, s.shape
        std = 1 / np.sqrt(np.prod(shape[:-1])) if name == "kernel" else 0.1
        return (float(name == "scale") + std * rng.normal(size=shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(_shapes(model, x, t, y, **kw)))


def _tiny(name):
    """TINY[name], its inputs and host-drawn parameters."""
    x, t, y = _inputs()
    return TINY[name], x, t, y, _params(TINY[name], x, t, y)


@partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, v, x, t, y=None, context=None, train=False, rng=None):
    kw = {} if context is None else dict(context=context)
    rngs = {} if rng is None else {"dropout": rng}
    return model.apply(v, x, t, y, train=train, rngs=rngs, **kw)


@pytest.mark.parametrize(
    "shape, kw",
    [
        ((2, 8, 8, 1), dict(num_classes=K)),
        ((2, 16, 16, 1), dict(channel_mult=(1, 2, 2), attn_resolutions=(8, 4))),
        ((1, 32, 32, 3), dict(channel_mult=(1, 2, 2), attn_resolutions=(8,))),
        ((2, 8, 8, 1), dict(context_dim=12)),
    ],
)
def test_unet_shapes(shape, kw):
    model = UNet(**{**UNET_TINY, **kw})
    x, t, y = _inputs(shape)
    y = y if "num_classes" in kw else None
    context = jnp.ones((shape[0], 5, 12)) if "context_dim" in kw else None
    v = _params(model, x, t, y, context=context)
    out = _apply(model, v, x, t, y, context)
    assert out.shape == shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(out)) and np.abs(out).max() > 1e-2
    if context is not None:  # the context is used
        assert np.abs(_apply(model, v, x, t, y, -context) - out).max() > 1e-3


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_initial_output_is_zero(name):
    """ADM zero-initialises the output conv; DiT's adaLN-Zero and final layer start at zero.
    (DiT with learn_sigma: 2C output channels.)"""
    unet = UNet(num_classes=K, **{**UNET_TINY, "channel_mult": (1,)})  # one level: short compile
    model = TINY["dit"].clone(learn_sigma=True) if name == "dit" else unet
    x, t, y = _inputs()
    v = nn.unbox(jax.jit(model.init)(FAST_KEY, x, t, y))
    out = _apply(model, v, x, t, y)
    assert out.shape == x.shape[:3] + (2 if name == "dit" else 1,)
    assert np.all(np.asarray(out) == 0)


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_conditioning_changes_output(name):
    model, x, t, y, v = _tiny(name)
    out = _apply(model, v, x, t, y)
    assert out.shape == x.shape and out.dtype == jnp.float32 and np.all(np.isfinite(out))
    diff = lambda a: float(np.abs(a - out).max())
    assert diff(_apply(model, v, x, t + 50.0, y)) > 1e-3
    assert diff(_apply(model, v, x, t, (y + 1) % K)) > 1e-3
    # EDM's c_noise can be negative; a scalar t is broadcast over the batch
    assert diff(_apply(model, v, x, -0.5 * jnp.ones(2), y)) > 1e-3
    np.testing.assert_allclose(
        _apply(model, v, x, 7.0, y), _apply(model, v, x, jnp.full(2, 7.0), y)
    )
    null = _apply(model, v, x, t, jnp.full(2, K, jnp.int32))
    np.testing.assert_allclose(_apply(model, v, x, t, None), null)  # y=None is the null label


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_null_label_row_and_invalid_labels(name):
    model, x, t, y, v = _tiny(name)
    table = v["params"]["y_embedder" if name == "dit" else "label_embed"]["embedding_table"]
    assert table["embedding"].shape[0] == K + 1
    # under jit the labels are not concrete: the bad sample comes out NaN instead
    out = _apply(model, v, x, t, jnp.array([K, K + 1]))
    assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1]))
    if name == "dit":  # the reference adds the null row only when class_dropout_prob > 0
        v = nn.unbox(_shapes(model.clone(class_dropout_prob=0.0), x, t, y))
        assert v["params"]["y_embedder"]["embedding_table"]["embedding"].shape == (K, 32)


def test_label_embedder_rejects_concrete_bad_labels():
    emb = LabelEmbedder(K, 8)
    v = nn.unbox(emb.init(KEY, jnp.array([0, K])))
    assert v["params"]["embedding_table"]["embedding"].shape == (K + 1, 8)
    for bad in (K + 1, -1):
        with pytest.raises(ValueError, match="class labels must lie in"):
            emb.apply(v, jnp.array([0, bad]))
    with pytest.raises(ValueError, match="integers"):
        emb.apply(v, jnp.array([0.0, 1.0]))


def test_unet_dropout_only_in_training():
    model = UNet(dropout=0.5, **{**UNET_TINY, "channel_mult": (1,), "attn_resolutions": ()})
    x, t, _ = _inputs()
    v = _params(model, x, t)
    ev = _apply(model, v, x, t)
    np.testing.assert_array_equal(ev, _apply(model, v, x, t, train=False))
    tr1 = _apply(model, v, x, t, train=True, rng=jax.random.key(1))
    tr2 = _apply(model, v, x, t, train=True, rng=jax.random.key(2))
    assert np.abs(tr1 - ev).max() > 1e-3 and np.abs(tr1 - tr2).max() > 1e-3
    with pytest.raises(flax.errors.InvalidRngError):
        _apply(model, v, x, t, train=True)


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_bf16_compute_close_to_f32(name):
    model, x, t, y, v = _tiny(name)
    ref = _apply(model, v, x, t, y)
    out = _apply(model.clone(dtype=jnp.bfloat16), v, x, t, y)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < 3e-2, rel
    leaves = jax.tree_util.tree_leaves(_shapes(model.clone(dtype=jnp.bfloat16), x, t, y))
    assert all(a.dtype == jnp.float32 for a in leaves)  # param_dtype stays float32


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_remat_same_output_and_grads(name):
    # one UNet level keeps the compile short; it still has res and attention blocks to remat
    model = TINY[name]
    model = model.clone(channel_mult=(1,), attn_resolutions=(8,)) if name == "unet" else model
    x, t, y = _inputs()
    v = _params(model, x, t, y)

    def value_and_grad(m):
        loss = lambda p: jnp.mean(jnp.square(m.apply(p, x, t, y, train=True)))
        return jax.jit(jax.value_and_grad(loss))(v)

    (l0, g0), (l1, g1) = value_and_grad(model), value_and_grad(model.clone(remat=True))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g0)


def _softmax_attention(q, k, v, mask=None):
    """softmax(QKᵀ/√d)V written out in numpy, layout (B, S, H, D)."""
    logits = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhst,bthd->bshd", w / w.sum(-1, keepdims=True), v)


def test_attention_xla_matches_softmax_and_mask():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, s, 3, 8)).astype(np.float32) for s in (5, 7, 7))
    np.testing.assert_allclose(
        attention(q, k, v, implementation="xla"), _softmax_attention(q, k, v), atol=1e-5
    )
    mask = rng.random((2, 1, 5, 7)) < 0.5
    mask[..., 0] = True  # every query sees at least one key
    out = attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(out, _softmax_attention(q, k, v, mask), atol=1e-5)
    key_mask = np.broadcast_to(np.arange(7) < 4, (2, 1, 5, 7))  # the last 3 keys are hidden
    v2 = v.copy()
    v2[:, 4:] += 100.0
    np.testing.assert_allclose(
        attention(q, k, v2, mask=key_mask), attention(q, k, v, mask=key_mask), atol=1e-5
    )


def test_attention_switch_errors():
    q = jax.random.normal(KEY, (1, 4, 2, 8))
    pallas, xla = (attention(q, q, 2 * q, implementation=i) for i in ("pallas", "xla"))
    assert float(jnp.abs(pallas - xla).max()) < 1e-5  # the Pallas kernel, interpreted on CPU
    with pytest.raises(ValueError, match="allowed: xla, cudnn, pallas"):
        attention(q, q, q, implementation="flash")


def test_attention_key_padding_mask_agrees_across_implementations():
    q = jax.random.normal(KEY, (2, 4, 2, 8))
    mask = jnp.array([[True, True, False, True], [False] * 4])[:, None, None, :]  # (B, 1, 1, T)
    xla, pallas = (attention(q, q, 2 * q, mask=mask, implementation=i) for i in ("xla", "pallas"))
    assert float(jnp.abs(pallas - xla).max()) < 1e-5
    assert float(jnp.abs(xla[1]).max()) == 0.0  # a query that sees no key gets 0
    keys = jnp.array([0, 1, 3])  # masking key 2 == dropping it
    kept = attention(q, q[:, keys], 2 * q[:, keys], implementation="xla")
    assert float(jnp.abs(xla[0] - kept[0]).max()) < 1e-5


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_attention_cudnn_matches_xla():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 64, 4, 64), jnp.bfloat16) for i in range(3))
    ref = attention(q, k, v, implementation="xla").astype(jnp.float32)
    out = attention(q, k, v, implementation="cudnn").astype(jnp.float32)
    assert float(jnp.abs(out - ref).max()) < 2e-2


def test_presets_and_reference_parameter_count():
    assert len(DIT_PRESETS) == 12
    assert DIT_PRESETS["DiT-XL/2"] == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    model = build("dit", preset="DiT-XL/2", num_classes=1000, learn_sigma=True)
    x, t, y = jnp.ones((1, 32, 32, 4)), jnp.ones(1), jnp.ones(1, jnp.int32)
    shapes = jax.eval_shape(model.init, KEY, x, t, y)
    count = sum(a.size for a in jax.tree_util.tree_leaves(nn.unbox(shapes)))
    assert count + 256 * 1152 == 675_129_632  # the reference's count includes its pos_embed


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: build("unet", image_size=12), "12x12 is not divisible by 2"),
        (lambda: build("dit", preset="DiT-S/4", image_size=30), "30x30 is not divisible by patch"),
        (lambda: build("dit", preset="DiT-Q/2"), "allowed: DiT-S/2"),
        (lambda: build("unet", preset="DiT-S/2"), "UNet has no presets"),
        (lambda: build("vit"), "allowed: unet, dit"),
        (lambda: build("unet", width=3), "no field"),
        (lambda: _shapes(UNet(channel_mult=(1, 2, 2)), jnp.ones((1, 6, 6, 1)), jnp.ones(1)), "6x6"),
        (lambda: _shapes(DiT(**DIT_TINY), jnp.ones((1, 7, 8, 1)), jnp.ones(1)), "7x8"),
        (
            lambda: _shapes(UNet(**UNET_TINY), *_inputs()[:2], context=jnp.ones((2, 3, 4))),
            "context_dim=None",
        ),
        (lambda: _shapes(UNet(**UNET_TINY), *_inputs()), "num_classes=0"),
    ],
)
def test_one_line_value_errors(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
