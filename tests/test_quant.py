"""Post-training quantization (`jaxdiff.accel.quant`, on qwix): error bounds per scheme, ordered
by bit width; per-timestep scales selected by the step's noise level inside jit (a network whose
activation range grows with t); sensitive layers stay in full precision; the recorder stores
what the sampler fed the network; bad settings give one-line errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("qwix")

import jaxdiff  # noqa: E402
from jaxdiff.accel import quant  # noqa: E402
from jaxdiff.core.guidance import CFG  # noqa: E402
from jaxdiff.models import DiT  # noqa: E402

DIT = DiT(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)
X = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
T = jnp.linspace(-1.0, 1.0, 4)
Y = jnp.array([0, 1, 2, 0])


def _variables(model, *inputs, seed=1):
    """Host-drawn parameters (a fresh init outputs zeros through the adaLN-zero layers)."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


VARS = _variables(DIT, X, T, Y)
INPUTS = (np.asarray(X)[None], np.asarray(T)[None], (np.asarray(Y)[None],))  # one "call"


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_forward_error_per_scheme_is_bounded_and_ordered_by_bits():
    ref = DIT.apply(VARS, X, T, Y)
    err = {s: _rel(jax.jit(quant.quantize(DIT, VARS, s, inputs=INPUTS, keep=None).model_fn)(
        X, T, Y), ref) for s in ("w8a8", "w8a16", "w4a16", "w4a8", "fp8", "bf16")}
    # 8-bit: ~1 % per layer (step absmax/127 on ~Gaussian weights), over the 2 blocks' layers
    assert 1e-3 < err["w8a16"] < 0.05 and err["w8a8"] < 0.06 and err["bf16"] < 0.03, err
    assert err["w4a16"] < 0.4 and err["fp8"] < 0.2, err
    # 4 bits: a 127/7 times coarser step; activations at 8 bits add little to int4 weights
    assert 5 < err["w4a16"] / err["w8a16"] < 25, err
    assert err["w8a16"] <= err["w8a8"] and err["w4a8"] < 1.2 * err["w4a16"], err


class Ramp(nn.Module):
    """A network whose activation range grows with t: fc sees x · exp(3t)."""

    @nn.compact
    def __call__(self, x, t):
        return nn.Dense(4, name="fc")(x * jnp.exp(3.0 * t)[:, None])


def test_timestep_scales_are_selected_by_the_noise_level_inside_jit():
    ramp = Ramp()
    # +-1 entries: every row's absmax is 1, so qwix's static scale (the mean over rows of each
    # row's absmax) is exact for a group of one noise level
    x = jax.random.rademacher(jax.random.key(1), (64, 8), jnp.float32)
    variables = _variables(ramp, x, jnp.zeros(64))
    levels = np.array([-1.0, -1.0, 1.0, 1.0])  # two noise levels, two calls each
    xs = np.stack([np.asarray(x)] * 4)
    inputs = (xs, np.repeat(levels[:, None], 64, axis=1), ())
    per_step = quant.quantize(ramp, variables, "w8a8", calibration="timestep", inputs=inputs,
                              groups=2, keep=None)
    static = quant.quantize(ramp, variables, "w8a8", calibration="static", inputs=inputs,
                            keep=None)
    params = per_step.params
    assert params.groups == 2 and np.allclose(params.bounds, [0.0])
    assert any(params.stacked) and not all(params.stacked)  # scales stacked, weights shared

    @jax.jit
    def run(fn, t):
        return fn(x, jnp.full(64, t))

    for t in (-1.0, 1.0):
        ref = ramp.apply(variables, x, jnp.full(64, t))
        e_step, e_static = _rel(run(per_step.model_fn, t), ref), _rel(run(static.model_fn, t), ref)
        assert e_step < 0.02, (t, e_step)
        if t < 0:  # the averaged static scale is ~10x too coarse for the small activations
            assert e_static > 3 * e_step, (t, e_static, e_step)
    picked = jax.jit(params.select)(jnp.full(64, 1.0))
    want = jax.tree.unflatten(params.treedef, [leaf[1] if s else leaf for leaf, s in
                                               zip(params.leaves, params.stacked)])
    for a, b in zip(jax.tree.leaves(picked), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_sensitive_layers_stay_in_full_precision():
    q = quant.quantize(DIT, VARS, "w8a8", inputs=INPUTS)
    for name in ("t_embedder", "y_embedder", "x_embedder", "final_layer"):
        for a, b in zip(jax.tree.leaves(q.params[name]), jax.tree.leaves(VARS["params"][name])):
            assert a.dtype == jnp.float32
            np.testing.assert_array_equal(a, b)
    mod = jax.tree.leaves(q.params["blocks.0"]["adaLN_modulation.1"])
    assert all(a.dtype == jnp.float32 for a in mod)
    fc1 = jax.tree.leaves(q.params["blocks.0"]["mlp"]["fc1"])
    assert any(a.dtype == jnp.int8 for a in fc1)
    full = quant.quantize(DIT, VARS, "w8a8", inputs=INPUTS, keep=None)
    assert quant.param_bytes(full.params) < quant.param_bytes(q.params)


def test_recorder_stores_what_the_sampler_fed_the_network():
    def net(x, t, y):
        return DIT.apply(VARS, x, t, y)

    guide = CFG(scale=2.0, y=Y, y_null=jnp.full(4, 3))
    kw = dict(process=jaxdiff.EDM(), prediction="edm", sampler="euler", steps=3, guidance=guide)
    example = (jnp.zeros((8, 8, 8, 1)), jnp.zeros(8), jnp.zeros(8, jnp.int32))
    out, state = jaxdiff.sample(quant.record_calls(net, *example, capacity=4), X, **kw)
    np.testing.assert_allclose(out, jaxdiff.sample(net, X, **kw), atol=1e-6)
    xs, ts, (ys,) = quant.recorded(state)
    assert xs.shape == (3, 8, 8, 8, 1) and ts.shape == (3, 8) and ys.shape == (3, 8)
    np.testing.assert_array_equal(ys[0], np.r_[np.asarray(Y), [3, 3, 3, 3]])  # [y; y_null]
    assert np.all(np.diff(ts[:, 0]) < 0)  # decreasing noise levels
    np.testing.assert_array_equal(xs[:, :4], xs[:, 4:])  # [x; x]
    _, state = jaxdiff.sample(quant.record_calls(net, *example, capacity=2), X, **kw)
    with pytest.raises(ValueError, match=r"holds 2 calls and the run made 3; .*capacity >= 3"):
        quant.recorded(state)


@pytest.mark.parametrize("kwargs,match", [
    (dict(scheme="w3a8"), r"scheme 'w3a8' is unknown; allowed: w8a8, w4a8"),
    (dict(scheme="w8a8", calibration="minmax"), r"calibration 'minmax' is unknown"),
    (dict(scheme="w4a16", calibration="static"), r"quantizes weights only"),
    (dict(scheme="w8a8", calibration="static", groups=2), r"groups=2 needs calibration="),
    (dict(scheme="w8a8", calibration="timestep", groups=0), r"groups=0 must be an integer"),
    (dict(scheme="w8a8", calibration="static", inputs=None), r"needs inputs="),
    (dict(scheme="w8a8", calibration="timestep", groups=3), r"groups=3 is more than the 1"),
])
def test_bad_settings_one_line_errors(kwargs, match):
    kwargs = dict(dict(inputs=INPUTS), **kwargs)
    with pytest.raises(ValueError, match=match) as err:
        quant.quantize(DIT, VARS, kwargs.pop("scheme"), **kwargs)
    assert "\n" not in str(err.value)


def test_split_shortcut_and_its_checkpoint(tmp_path):
    """Q-Diffusion's split: the decoder blocks' [h; skip] input as two convolutions (the same
    function), so that calibration gives the h and the skip channels their own scales; with int8
    kept layers and per-timestep scales it saves and loads to the same network (the split
    recorded in its architecture, keep_weights in its rules)."""
    from jaxdiff.accel import quant_ckpt
    from jaxdiff.models import UNet
    from jaxdiff.models.unet import split_skip_params

    unet = UNet(channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                mid_attn=False, norm_groups=4, num_classes=3)
    variables = _variables(unet, X, T, Y)
    split = split_skip_params(variables["params"], unet)
    ref = unet.apply(variables, X, T, Y)
    np.testing.assert_allclose(unet.clone(split_skips=True).apply({"params": split}, X, T, Y),
                               ref, atol=1e-5, rtol=0)
    assert set(split["up_0_res_0"]) >= {"conv_0_h", "conv_0_skip", "skip_h", "skip_skip"}
    xs, ts, (ys,) = INPUTS
    inputs = (np.concatenate([xs, xs]), np.concatenate([ts, ts + 1]), (np.concatenate([ys, ys]),))
    q = quant.quantize(unet, variables, "w8a8", calibration="timestep", groups=2, inputs=inputs,
                       split=True, keep_weights="int8")
    block = q.params.select(T)["up_0_res_0"]
    assert any("scale" in k for k in block["conv_0_h"]) and any(
        "scale" in k for k in block["conv_0_skip"]), block.keys()
    assert _rel(q.model_fn(X, T, Y), ref) < 0.1
    quant_ckpt.save_quantized(tmp_path / "q", q, example=(X[:1], T[:1], Y[:1]))
    back = quant_ckpt.load_quantized(tmp_path / "q", unet)
    assert back.split and back.keep_weights == "int8" and back.params.groups == 2
    np.testing.assert_array_equal(back.model_fn(X, T, Y), q.model_fn(X, T, Y))
    with pytest.raises(ValueError, match=r"split=True is the UNet's split shortcut; got a DiT"):
        quant.quantize(DIT, VARS, "w8a8", inputs=INPUTS, split=True)
    with pytest.raises(ValueError, match=r"'w4a4' quantizes activations to int4, which XLA's "
                                         r"CPU and GPU backends do not compile into a conv"):
        quant.quantize(unet, variables, "w4a4", inputs=INPUTS)


def test_kept_layers_can_hold_int8_weights():
    """keep_weights="int8": the kept dense layers (time embedding, adaLN) store int8 weights,
    so a 4-bit scheme shrinks the whole model, not only its blocks."""
    fp = quant.param_bytes(VARS["params"])
    kept = quant.quantize(DIT, VARS, "w4a16", inputs=INPUTS)
    small = quant.quantize(DIT, VARS, "w4a16", inputs=INPUTS, keep_weights="int8")
    mod = jax.tree.leaves(small.params["blocks.0"]["adaLN_modulation.1"])
    assert any(a.dtype == jnp.int8 for a in mod)
    assert fp / quant.param_bytes(small.params) > 1.5 * fp / quant.param_bytes(kept.params)
    ref = DIT.apply(VARS, X, T, Y)
    assert _rel(small.model_fn(X, T, Y), ref) < 0.4
    with pytest.raises(ValueError, match=r"keep_weights='int4' is not a precision"):
        quant.quantize(DIT, VARS, "w4a16", inputs=INPUTS, keep_weights="int4")


class Outliers(nn.Module):
    """One dense layer, for SVDQuant: fed inputs with a few large channels."""

    @nn.compact
    def __call__(self, x, t):
        return nn.Dense(16, name="fc")(x)


def test_lowrank_branch_absorbs_outliers():
    """SVDQuant at W4A4: smoothing moves the input's outlier channels into the weight and the
    float rank-r branch takes the weight's largest directions, so the 4-bit residual's error
    shrinks several-fold; the branch's leaves (L1, L2, 1/lambda) sit next to the kernel."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8, 8, 32)).astype(np.float32)  # 4 calls of 8 rows x 8 tokens
    x[..., :3] *= 25.0  # outlier input channels, as in a transformer's activations
    net, t = Outliers(), jnp.zeros(8)
    variables = _variables(net, x[0], t)
    w = rng.normal(size=(32, 16)) * 0.1 + np.outer(rng.normal(size=32), rng.normal(size=16))
    variables = {"params": {"fc": dict(variables["params"]["fc"],
                                       kernel=jnp.asarray(w, jnp.float32))}}
    inputs = (x, np.zeros((4, 8), np.float32), ())
    ref = net.apply(variables, x[1], t)
    err = {}
    for rank in (0, 4):
        q = quant.quantize(net, variables, "w4a4", inputs=inputs, keep=None, lowrank=rank)
        # (XLA:CPU compiles these int4 x int4 products inside a jit, not op by op)
        err[rank] = _rel(jax.jit(q.model_fn)(x[1], t), ref)
    assert err[4] < 0.15 * err[0] and err[0] > 0.05, err
    fc = q.params["fc"]
    assert fc["kernel_lora_a"].shape == (32, 4) and fc["kernel_lora_b"].shape == (4, 16)
    assert fc["kernel_smooth"].shape == (32,) and q.lowrank == 4
    assert fc["kernel"].array.qvalue.dtype == jnp.int4
    # the smoothing factors shrink exactly the outlier channels
    assert np.all(np.asarray(fc["kernel_smooth"][:3]) < np.min(fc["kernel_smooth"][3:])), fc
    with pytest.raises(ValueError, match=r"lowrank=17 is more than the rank of fc/kernel "
                                         r"\(32, 16\); allowed: 1..16"):
        quant.quantize(net, variables, "w4a4", inputs=inputs, keep=None, lowrank=17)
    with pytest.raises(ValueError, match=r"lowrank=4 needs inputs="):
        quant.quantize(net, variables, "w4a4", keep=None, lowrank=4)


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8", "w4a16", "w8a16", "fp8"])
def test_weight_round_trip_error_is_within_half_a_step(scheme):
    """Quantize -> dequantize of a dense kernel: integer schemes round to steps of
    absmax / (qmax + 1/2) per output channel (qwix's symmetric grid, qmax = 2^(b-1) - 1, the
    largest entry clipped to qmax), error <= half a step; e4m3 keeps 3 mantissa bits (relative
    error <= 2^-4 on normals)."""
    import qwix

    net, x = Outliers(), np.ones((2, 3, 32), np.float32)
    variables = _variables(net, x, jnp.zeros(2))
    w = np.asarray(variables["params"]["fc"]["kernel"])
    q = quant.quantize(net, variables, scheme, inputs=(x[None], np.zeros((1, 2)), ()), keep=None)
    array = q.params["fc"]["kernel"].array
    back = np.asarray(qwix.dequantize(array), np.float64)
    err = np.abs(back - w)
    weight = quant.SCHEMES[scheme][0]
    if weight.startswith("int"):
        qmax = 2 ** (int(weight[3:]) - 1) - 1
        step = np.abs(w).max(axis=0) / (qmax + 0.5)  # per output channel
        np.testing.assert_allclose(np.asarray(array.scale).ravel(), step, rtol=1e-6)
        assert np.all(err <= step / 2 * (1 + 1e-4)), (err / step).max()  # float32 rounding
        assert (err / step).max() > 0.3  # it does round
    else:
        normal = np.abs(w) > 1e-2 * np.abs(w).max(axis=0)
        assert np.all(err[normal] <= 2.0 ** -4 * np.abs(w[normal]) * (1 + 1e-5))


@pytest.mark.parametrize("scheme,calibration", [("w4a8", "static"), ("w4a16", "dynamic"),
                                                ("w8a16", "dynamic")])
def test_conv_kernels_are_stored_at_the_weight_type(scheme, calibration, monkeypatch, tmp_path):
    """qwix's convolution holds one type for weights and activations, so a w4a8 kernel runs as
    int8 on the int4 grid and a weight-only one in float: `pack_convs` stores them as their
    int4 / int8 integers and scales, the same network in fewer bytes, and the quantized
    checkpoint round-trips it."""
    from jaxdiff.accel import quant_ckpt
    from jaxdiff.models import UNet

    unet = UNet(channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                mid_attn=False, norm_groups=4, num_classes=3)
    variables = _variables(unet, X, T, Y)
    q = quant.quantize(unet, variables, scheme, inputs=INPUTS, calibration=calibration)
    weight = jnp.dtype(quant.SCHEMES[scheme][0])
    convs = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(q.params)[0]
             if leaf.ndim == 4 and "qvalue" in jax.tree_util.keystr(path)]
    assert len(convs) >= 4 and all(c.dtype == weight for c in convs), [c.dtype for c in convs]
    with monkeypatch.context() as m:
        m.setattr(quant, "pack_convs", lambda params, *a, **k: params)
        plain = quant.quantize(unet, variables, scheme, inputs=INPUTS, calibration=calibration)
    n = sum(c.size for c in convs)  # bytes per conv weight: 1 -> 1/2 (w4a8), 4 -> bits / 8
    per = (1 if scheme == "w4a8" else 4) - weight.itemsize * (0.5 if weight == jnp.int4 else 1)
    saved = quant.param_bytes(plain.params) - quant.param_bytes(q.params)
    assert 0.95 * n * per <= saved <= n * per, (saved, n * per)
    # the kernels the network computes with are the float ones rounded to the weight type's
    # grid (qwix's own int8 container held them only to within its rounding)
    import qwix
    from qwix._src.providers.ptq import WithAux

    grid = quant.conv_weight_grid(variables["params"], scheme)
    used = quant.unpack_convs(q.params)
    checked = 0
    for path, node in jax.tree_util.tree_flatten_with_path(
            used, is_leaf=lambda n: isinstance(n, WithAux))[0]:
        if isinstance(node, WithAux) and not isinstance(node.array, qwix.QArray):
            continue  # a static activation scale
        kernel = qwix.dequantize(node.array) if isinstance(node, WithAux) else node
        if kernel.ndim == 4 and "conv_in" not in str(path) and "conv_out" not in str(path):
            want = grid
            for k in path:
                want = want[k.key]
            np.testing.assert_allclose(kernel, want, rtol=1e-5, atol=1e-7)
            checked += 1
    assert checked == len(convs)
    out = q.model_fn(X, T, Y)
    assert _rel(out, plain.model_fn(X, T, Y)) < (0.1 if scheme == "w4a8" else 1e-5)
    quant_ckpt.save_quantized(tmp_path / "q", q, example=(X[:1], T[:1], Y[:1]))
    back = quant_ckpt.load_quantized(tmp_path / "q", unet)
    np.testing.assert_array_equal(back.model_fn(X, T, Y), out)
