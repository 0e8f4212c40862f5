"""Measurement operators (jaxdiff.inverse.operators): adjoints, pseudo-inverses and PiGDM's
A^T (r2 A A^T + s2 I)^+ against dense matrices built from `forward`, noise, errors, task strings.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.inverse import (
    Blur,
    ChannelMix,
    Downsample,
    Inpaint,
    Matrix,
    Saturate,
    box_mask,
    gaussian_kernel,
    grayscale,
    half_mask,
    parse_task,
    random_mask,
)

KEY = jax.random.PRNGKey(0)
MIX = np.array([[0.5, -1.0, 2.0], [1.0, 1.0, 0.0]])


def _linear_ops():
    """(id, operator, per-sample x shape) for every linear operator."""
    return [
        ("inpaint-box", Inpaint(box_mask((4, 4))), (4, 4, 1)),
        ("inpaint-random", Inpaint(random_mask(KEY, (4, 4), 0.5)), (4, 4, 2)),
        ("inpaint-half-hwc", Inpaint(np.stack([half_mask((4, 4)), box_mask((4, 4))], -1)),
         (4, 4, 2)),
        ("down2", Downsample(2), (4, 4, 2)),
        ("down4", Downsample(4), (8, 8, 1)),
        ("blur-truncated", Blur(gaussian_kernel(5, 1.0)), (8, 8, 1)),
        ("blur-asym", Blur(np.array([[0, 0.1, 0], [0.2, 0.5, 0.05], [0, 0.15, 0]])), (4, 4, 1)),
        ("mix", ChannelMix(MIX), (2, 2, 3)),
        ("gray", grayscale(3), (4, 4, 3)),
        ("matrix", Matrix(np.asarray(jax.random.normal(KEY, (3, 5)))), (5,)),
        ("matrix-tall-rank2", Matrix(np.outer([1.0, 2.0, 0.5, -1.0], [1.0, 0.0, 2.0])
                                     + np.outer([0.0, 1.0, 1.0, 3.0], [0.5, 1.0, 0.0])), (3,)),
    ]


LINEAR = _linear_ops()
IDS = [name for name, _, _ in LINEAR]


@pytest.fixture(autouse=True)
def x64():
    """Every test in float64, so that identities hold to ~1e-12."""
    with jax.enable_x64(True):
        yield


def _one_line(excinfo):
    """The error message is a single line."""
    assert "\n" not in str(excinfo.value), str(excinfo.value)


@jax.jit
def _algebra(op, x, y):
    """What the linear-algebra tests compare, flattened per sample, in one compiled program per
    operator (eager calls compile each primitive alone); `dense_t` is A^T: forward on the basis."""
    n = math.prod(x.shape[1:])
    flat = lambda v: v.reshape(v.shape[0], -1)
    pinv = op.pinv
    out = dict(ax=op(x), aty=op.adjoint(y), transposed=jax.linear_transpose(op.forward, x)(y)[0],
               dense_t=op(jnp.eye(n, dtype=x.dtype).reshape(n, *x.shape[1:])),
               pinv=pinv(y), pinv_a_pinv=pinv(op(pinv(y))), a_pinv_ax=op(pinv(op(x))),
               gram=op.gram_solve(y, 0.7, 0.3), gram_r2=op.gram_solve(y, 2.0, 0.0),
               gram_s2=op.gram_solve(y, 0.0, 0.5))
    return {k: flat(v) for k, v in out.items()}


@functools.cache
def _results(name):
    """(x, y, `_algebra`'s arrays as float64 numpy, dense A) for the operator `name`."""
    _, op, x_shape = LINEAR[IDS.index(name)]
    with jax.enable_x64(True):
        kx, ky = jax.random.split(jax.random.PRNGKey(1))
        x = jax.random.normal(kx, (2, *x_shape))
        y = jax.random.normal(ky, (2, *op.output_shape(x_shape)))
        res = {k: np.asarray(v) for k, v in _algebra(op, x, y).items()}
    return np.asarray(x).reshape(2, -1), np.asarray(y).reshape(2, -1), res, res["dense_t"].T


@pytest.mark.parametrize("name", IDS)
def test_adjoint_is_the_transpose(name):
    x, y, r, a = _results(name)
    np.testing.assert_allclose(np.vdot(r["ax"], y), np.vdot(x, r["aty"]), rtol=1e-12)
    np.testing.assert_allclose(r["aty"], r["transposed"], atol=1e-12)
    np.testing.assert_allclose(r["ax"], x @ a.T, atol=1e-12)
    np.testing.assert_allclose(r["aty"], y @ a, atol=1e-12)


@pytest.mark.parametrize("name", IDS)
def test_pinv_matches_numpy_and_penrose(name):
    x, y, r, a = _results(name)
    op = LINEAR[IDS.index(name)][1]
    np.testing.assert_allclose(r["pinv"], y @ np.linalg.pinv(a, getattr(op, "rcond", 1e-10)).T,
                               atol=1e-9)
    # A^+ A A^+ = A^+ always; A A^+ A = A unless singular values are cut (blur-truncated).
    np.testing.assert_allclose(r["pinv_a_pinv"], r["pinv"], atol=1e-9)
    if name != "blur-truncated":
        np.testing.assert_allclose(r["a_pinv_ax"], r["ax"], atol=1e-9)


def test_truncated_blur_drops_small_frequencies():
    x, _, r, a = _results("blur-truncated")
    s = np.linalg.svd(a, compute_uv=False)
    assert 0 < (s <= 1e-3 * s.max()).sum() < s.size  # 8x8 corner frequencies fall under rcond
    # A A^+ A is A with those frequencies removed: numpy's truncated pseudo-inverse agrees.
    assert np.abs(r["a_pinv_ax"] - r["ax"]).max() > 1e-6
    proj = a @ np.linalg.pinv(a, rcond=1e-3)
    np.testing.assert_allclose(r["a_pinv_ax"], x @ (proj @ a).T, atol=1e-9)


@pytest.mark.parametrize("name", IDS)
def test_gram_solve_dense_and_pinv_limit(name):
    _, y, r, a = _results(name)
    want = y @ np.linalg.inv(0.7 * a @ a.T + 0.3 * np.eye(a.shape[0])).T @ a
    np.testing.assert_allclose(r["gram"], want, atol=1e-9)
    np.testing.assert_allclose(r["gram_r2"], r["pinv"] / 2.0, atol=1e-9)
    np.testing.assert_allclose(r["gram_s2"], r["aty"] / 0.5, atol=1e-12)


def test_traced_scalars():
    op, x = Blur(gaussian_kernel(5, 1.0), sigma_y=0.1), jax.random.normal(KEY, (2, 8, 8, 1))
    gram = jax.jit(lambda op, y, r2, s2: op.gram_solve(y, r2, s2))
    for r2, s2 in [(0.4, 0.1), (2.0, 0.0)]:
        np.testing.assert_allclose(gram(op, x, r2, s2), op.gram_solve(x, r2, s2), atol=1e-12)
    measure = jax.jit(lambda op, x: op.measure(KEY, x))
    np.testing.assert_allclose(measure(op, x), op.measure(KEY, x), atol=1e-12)


def test_forward_values():
    x = jax.random.normal(KEY, (2, 8, 8, 3))
    blocks = np.asarray(x).reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(Downsample(2)(x), blocks, atol=1e-12)
    k = np.array([[0.0, 0.3, 0.0], [0.1, 0.2, 0.0], [0.0, 0.0, 0.4]])
    # Periodic convolution y[i, j] = sum_ab k[a, b] x[i - a + 1, j - b + 1]: an asymmetric kernel
    # pins its orientation and centring.
    conv = sum(k[a, b] * np.roll(x, (a - 1, b - 1), axis=(1, 2))
               for a in range(3) for b in range(3))
    np.testing.assert_allclose(Blur(k)(x), conv, atol=1e-12)
    np.testing.assert_allclose(grayscale(3)(x)[..., 0], np.asarray(x).mean(-1), atol=1e-12)
    np.testing.assert_allclose(ChannelMix(MIX)(x), np.asarray(x) @ MIX.T, atol=1e-12)
    assert Matrix(MIX).A is MIX and Matrix(MIX).output_shape((3,)) == (2,)
    m = box_mask((8, 8))
    np.testing.assert_allclose(Inpaint(m)(x), np.asarray(x) * m[..., None], atol=0)


def test_saturate():
    op = Saturate(Downsample(2), gain=2.0)
    x = 2.0 * jax.random.normal(KEY, (2, 4, 4, 1))
    z = Downsample(2)(x)
    np.testing.assert_allclose(op(x), np.tanh(2.0 * z) / 2.0, atol=1e-12)
    assert float(jnp.max(jnp.abs(op(100.0 * x)))) <= 0.5
    assert not op.linear and not op.has_pinv and op.name == "saturate downsample x2 gain 2.0"
    grad = jax.grad(lambda x: jnp.sum(jax.jit(lambda op, x: op(x))(op, x)))(x)
    want = Downsample(2).adjoint(1.0 - jnp.tanh(2.0 * z) ** 2)
    assert bool(jnp.all(jnp.isfinite(grad)))
    np.testing.assert_allclose(grad, want, atol=1e-12)
    for call, match in [(lambda: op.adjoint(z), "nonlinear: it has no adjoint; use its vjp"),
                        (lambda: op.pinv(z), "no pseudo-inverse.*DDNM, PiGDM"),
                        (lambda: op.gram_solve(z, 1.0, 0.0), "no pseudo-inverse")]:
        with pytest.raises(ValueError, match=match) as excinfo:
            call()
        _one_line(excinfo)


def test_measure_noise_level_and_key():
    op = Inpaint(np.ones((50, 50)), sigma_y=0.2)
    x = jnp.zeros((2, 50, 50, 2))
    y = op.measure(KEY, x)
    assert abs(float(jnp.std(y)) / 0.2 - 1.0) < 0.03 and abs(float(jnp.mean(y))) < 0.01
    np.testing.assert_array_equal(y, op.measure(KEY, x))
    assert not np.allclose(y, op.measure(jax.random.PRNGKey(1), x))
    x = jax.random.normal(KEY, (2, 8, 8, 3))
    np.testing.assert_array_equal(Downsample(2).measure(KEY, x), Downsample(2)(x))


def test_masks():
    m = box_mask((8, 8))
    assert m.shape == (8, 8) and m.sum() == 48 and not m[2:6, 2:6].any()
    assert box_mask((8, 8), (0, 1, 2, 3)).sum() == 64 - 6
    assert not half_mask((8, 8))[:, 4:].any() and half_mask((8, 8))[:, :4].all()
    assert not half_mask((6, 8), "top")[:3].any() and half_mask((6, 8), "top")[3:].all()
    assert half_mask((5, 5), "left").sum() == 15 and half_mask((5, 5), "bottom")[2].all()
    r = np.asarray(random_mask(KEY, (8, 8), 0.25))
    assert r.sum() == 16 and set(np.unique(r)) == {0.0, 1.0}
    np.testing.assert_array_equal(r, random_mask(KEY, (8, 8), 0.25))
    k = gaussian_kernel(5, 1.0)
    assert abs(k.sum() - 1.0) < 1e-6 and k.argmax() == 12
    np.testing.assert_allclose(k, k.T)
    np.testing.assert_allclose(k[2, 3] / k[2, 2], np.exp(-0.5), rtol=1e-6)


def _bad_inputs():
    """(call, regex its one-line ValueError must match)."""
    x = jnp.zeros((2, 8, 8, 3))
    return [
        (lambda: Downsample(2).check((8, 8, 3), jnp.zeros((2, 8, 8, 3))),
         r"downsample x2 measurement y has shape \(2, 8, 8, 3\).*allowed: \(B, 4, 4, 3\)"),
        (lambda: Matrix(np.ones((3, 5))).check((5,), jnp.zeros((3,))), r"allowed: \(B, 3\)"),
        (lambda: grayscale(3).adjoint(x), r"allowed: \(B, 8, 8, 1\)"),
        (lambda: Inpaint(np.ones((4, 4))).forward(x), r"mask has shape \(4, 4\) but x has shape"),
        (lambda: Inpaint(np.ones((8, 8, 2)))(x), r"mask has shape \(8, 8, 2\)"),
        (lambda: Inpaint(np.full((8, 8), 0.5)), "mask has the value 0.5; allowed: 0"),
        (lambda: Inpaint(np.ones((8, 8)), sigma_y=-0.1), r"sigma_y=-0.1.*allowed: sigma_y >= 0"),
        (lambda: Blur(gaussian_kernel(3, 1.0), sigma_y=float("nan")), "sigma_y=nan"),
        (lambda: Downsample(3).forward(x), "8x8 is not divisible by factor=3"),
        (lambda: Downsample(2).forward(jnp.zeros((2, 8, 8))), r"takes images .*\(H, W, C\)"),
        (lambda: Downsample(0), "Downsample factor=0 is invalid"),
        (lambda: Blur(np.ones((4, 4)) / 16)(x), r"kernel has shape \(4, 4\).*k odd"),
        (lambda: Blur(gaussian_kernel(9, 1.0))(x), r"\(9, 9\) for images 8x8"),
        (lambda: Matrix(np.ones((3, 5)))(jnp.zeros((2, 4))), r"allowed: \(5,\)"),
        (lambda: ChannelMix(MIX)(jnp.zeros((2, 4, 4, 2))), r"allowed: \(H, W, 3\)"),
        (lambda: Downsample(2).gram_solve(jnp.zeros((2, 4, 4, 3)), 0.0, 0.0), "r2 \\+ s2 > 0"),
        (lambda: Saturate(Saturate(Downsample(2))), "allowed: a linear operator"),
        (lambda: Saturate(Downsample(2), gain=0.0), "gain=0.0"),
        (lambda: parse_task("deblur", (8, 8), 3), "Unknown inverse task 'deblur'; allowed:"),
        (lambda: parse_task("inpaint=2:box", (8, 8), 3), "Unknown inverse task"),
        (lambda: parse_task("sr:two", (8, 8), 3), "bad number 'two'"),
        (lambda: parse_task("sr:3", (8, 8), 3), "not divisible by factor=3"),
        (lambda: parse_task("gray", (8, 8), 1), r"allowed: \(H, W, 3\)"),
        (lambda: parse_task("inpaint:random", (8, 8), 3), "key=PRNGKey"),
        (lambda: parse_task("blur:std=-1", (8, 8), 3), "std=-1.0"),
        (lambda: half_mask((8, 8), "middle"), "side='middle' is unknown; allowed: left, right"),
        (lambda: parse_task("inpaint:half-middle", (8, 8), 3), "side='middle'"),
        (lambda: random_mask(KEY, (8, 8), 0.0), r"keep=0.0.*0 < keep <= 1"),
        (lambda: parse_task("inpaint:random=1.5", (8, 8), 3, key=KEY), "keep=1.5"),
        (lambda: box_mask((8, 8), (6, 6, 4, 4)), r"box=\(6, 6, 4, 4\) does not fit"),
        (lambda: box_mask((8, 8), (1, 2)), "does not fit"),
        (lambda: box_mask((8, 0)), "size=0 is invalid"),
        (lambda: gaussian_kernel(4, 1.0), "size=4 is invalid; allowed: an odd integer"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_inputs_one_line_errors(case):
    call, match = _bad_inputs()[case]
    with pytest.raises(ValueError, match=match) as excinfo:
        call()
    _one_line(excinfo)


def test_parse_task_round_trip():
    def parse(task, size=(8, 8), channels=3, **kw):
        return parse_task(task, size, channels, key=KEY, **kw)

    op = parse("inpaint:box", sigma_y=0.05)
    assert isinstance(op, Inpaint) and op.sigma_y == 0.05
    np.testing.assert_array_equal(op.mask, box_mask((8, 8)))
    np.testing.assert_array_equal(parse("inpaint:half").mask, half_mask((8, 8), "right"))
    for side in ("left", "right", "top", "bottom"):
        np.testing.assert_array_equal(parse(f"inpaint:half-{side}").mask, half_mask((8, 8), side))
    assert float(np.mean(parse("inpaint:random").mask)) == round(0.3 * 64) / 64
    assert float(np.mean(parse("inpaint:random=0.5").mask)) == 0.5
    assert [parse(f"sr:{f}").factor for f in (1, 2, 4)] == [1, 2, 4]
    blur = parse("blur")
    assert isinstance(blur, Blur) and blur.name == "blur 5x5 std 1.0"
    np.testing.assert_array_equal(blur.kernel, gaussian_kernel(5, 1.0))
    assert parse("blur:std=2.0", size=(16, 16)).kernel.shape == (9, 9)
    gray = parse("gray")
    assert isinstance(gray, ChannelMix) and gray.name == "grayscale"
    np.testing.assert_allclose(gray.matrix, [[1 / 3] * 3])
    sat = parse("saturate:sr:2", sigma_y=0.1)
    assert isinstance(sat, Saturate) and sat.gain == 1.0 and sat.sigma_y == 0.1
    assert isinstance(sat.inner, Downsample) and sat.inner.factor == 2 and sat.inner.sigma_y == 0
    sat = parse("saturate=2.5:inpaint:box")
    assert sat.gain == 2.5 and isinstance(sat.inner, Inpaint)
    assert sat.output_shape((8, 8, 3)) == (8, 8, 3)
