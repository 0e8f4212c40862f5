"""Fused solver-step kernel (`jaxdiff.kernels.solver_step`) in Pallas interpret mode on CPU:
kernel vs reference, TPU interpret mode with race detection, gradients, GPU/TPU lowering without
a device, and the samplers with `use_kernel=True` against their jnp path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

import jaxdiff
from jaxdiff.core import analytic
from jaxdiff.core.denoiser import model_from_denoiser
from jaxdiff.core.process import EDM
from jaxdiff.kernels.solver_step import solver_step, solver_step_reference
from jaxdiff.samplers import SAMPLERS

TOL = {jnp.float32: 1e-6, jnp.bfloat16: 1e-2}


def _inputs(shape, k, dtype, seed=0):
    kx, kd, kb = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
    ds = jax.random.normal(kd, (k,) + shape, jnp.float32).astype(dtype)
    b = jax.random.uniform(kb, (k,), jnp.float32, -1.0, 1.0)
    return jnp.float32(0.8), x, b, ds


def _assert_close(out, ref, tol):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    scale = np.max(np.abs(ref))
    assert np.max(np.abs(out - ref)) <= tol * scale, np.max(np.abs(out - ref)) / scale


# (shape, k): lane-aligned, not a multiple of 128 lanes, rows padded to a block, several blocks
@pytest.mark.parametrize("shape,k", [((2, 3, 8, 8), 2), ((5, 7), 1), ((3, 1280), 3),
                                     ((4, 4096), 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_reference(shape, k, dtype):
    a, x, b, ds = _inputs(shape, k, dtype)
    out = solver_step(a, x, b, ds)
    assert out.shape == x.shape and out.dtype == x.dtype
    ref = solver_step_reference(a, x, b, ds)
    _assert_close(out, ref, TOL[dtype])
    # and the math itself, in float64
    exact = 0.8 * np.asarray(x, np.float64) + np.tensordot(
        np.asarray(b, np.float64), np.asarray(ds, np.float64), axes=1)
    _assert_close(out, exact, TOL[dtype])


def test_terms_as_list_of_stacks_equal_one_stack():
    a, x, b, ds = _inputs((2, 3, 8, 8), 3, jnp.float32)
    stacked = solver_step(a, x, b, ds)
    split = solver_step(a, x, b, [ds[:2], ds[2]])
    np.testing.assert_array_equal(np.asarray(split), np.asarray(stacked))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_interpret_mode_without_races(dtype):
    """The TPU kernel (scalar prefetch, SMEM coefficients) in TPU interpret mode, several blocks
    and a partial last block (30 rows of 128 lanes in blocks of 16)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret

    a, x, b, ds = _inputs((3, 1280), 3, dtype)
    params = pltpu.InterpretParams(detect_races=True)
    out = solver_step(a, x, b, ds, interpret=params, block=16)
    _assert_close(out, solver_step_reference(a, x, b, ds), TOL[dtype])
    assert tpu_interpret.races is not None and not tpu_interpret.races.races_found


def _grads(fn, a, x, b, ds):
    weights = jnp.arange(x.size).reshape(x.shape)
    loss = lambda a, x, b, ds: jnp.sum(jnp.sin(fn(a, x, b, ds)) * weights)
    return jax.grad(loss, argnums=(0, 1, 2, 3))(a, x, b, ds)


def test_gradients_and_jvp_match_reference():
    a, x, b, ds = _inputs((2, 3, 8, 8), 3, jnp.float32)
    for g, r in zip(_grads(solver_step, a, x, b, ds), _grads(solver_step_reference, a, x, b, ds)):
        _assert_close(g, r, 1e-5)
    tangents = (jnp.float32(0.3), -x, b[::-1], ds * 0.5)
    _, t = jax.jvp(solver_step, (a, x, b, ds), tangents)
    _, t_ref = jax.jvp(solver_step_reference, (a, x, b, ds), tangents)
    _assert_close(t, t_ref, 1e-6)


def test_vmap_with_batched_coefficients():
    a, x, b, ds = _inputs((4, 3, 8, 8), 2, jnp.float32)
    a_batch = jnp.linspace(0.5, 1.0, 4)
    fn = lambda f: jax.vmap(f, in_axes=(0, 0, None, 1))(a_batch, x, b, ds)
    _assert_close(fn(solver_step), fn(solver_step_reference), 1e-6)


_ALLOW = [export.DisabledSafetyCheck.custom_call(name)
          for name in ("__gpu$xla.gpu.triton", "triton_kernel_call", "tpu_custom_call")]


@pytest.mark.parametrize("backend,platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_lowers_for_gpu_and_tpu_with_x_aliased(backend, platform):
    """Triton and Mosaic lowering run without a device; the kernel call writes over x."""
    a, x, b, ds = _inputs((2, 4, 16, 16), 3, jnp.bfloat16)
    fn = jax.jit(lambda *args: solver_step(*args, backend=backend, interpret=False))
    text = export.export(fn, platforms=[platform], disabled_checks=_ALLOW)(a, x, b, ds)
    text = text.mlir_module()
    assert "output_operand_aliases" in text
    assert ("triton" in text) if backend == "gpu" else ("tpu_custom_call" in text)


@pytest.mark.parametrize("bad,match", [
    (dict(b=jnp.ones(3)), r"b has shape \(3,\)"),
    (dict(ds=jnp.ones((2, 5))), r"ds entry of shape \(2, 5\)"),
    (dict(block=12), "block=12 must be a power of two"),
    (dict(backend="cpu"), "backend='cpu' is unknown"),
    (dict(x=jnp.ones((2, 3), jnp.int32)), "must be a floating dtype"),
])
def test_bad_input(bad, match):
    args = dict(a=1.0, x=jnp.ones((2, 3)), b=jnp.ones(2), ds=jnp.ones((2, 2, 3)))
    args.update(bad)
    kw = {k: args.pop(k) for k in ("block", "backend") if k in args}
    with pytest.raises(ValueError, match=match):
        solver_step(args["a"], args["x"], args["b"], args["ds"], **kw)


# --- samplers ------------------------------------------------------------------------------

MU, STD = 0.3, 0.6
SIGMAS = jnp.asarray(np.concatenate([np.geomspace(80.0, 0.02, 7), [0.0]]), jnp.float32)


@pytest.mark.parametrize("name,options", [
    ("ddim", {}), ("dpmpp_2s", {}), ("dpmpp_2m", {}), ("dpmpp_3m", {}), ("deis", {}),
    ("ipndm", {}), ("lms", {}), ("unipc", dict(order=3, variant="bh1")),
])
def test_sampler_with_kernel_equals_jnp_path(name, options):
    den = analytic.gaussian_denoiser(MU, STD)
    x = SIGMAS[0] * jax.random.normal(jax.random.key(0), (2, 3, 8, 8))
    fn = SAMPLERS[name]
    ref = fn(den, x, SIGMAS, **options)
    out = fn(den, x, SIGMAS, use_kernel=True, **options)
    _assert_close(out, ref, 2e-6)
    assert float(jnp.max(jnp.abs(ref - MU))) > 0.1  # a real sample, not the mean


def test_sample_passes_use_kernel():
    p = EDM()
    model = model_from_denoiser(analytic.gaussian_denoiser(MU, STD), p, "edm")
    noise = jax.random.normal(jax.random.key(2), (4, 3))
    run = lambda **kw: jaxdiff.sample(model, noise, process=p, prediction="edm",
                                      sampler="dpmpp_2m", steps=6, capacity=8, **kw)
    _assert_close(run(use_kernel=True), run(), 2e-6)


def test_gradient_through_sampler_with_kernel():
    """What `jaxdiff.core.schedule_opt` differentiates: the sample w.r.t. the grid and the start."""
    den = analytic.gaussian_denoiser(MU, STD)
    x = SIGMAS[0] * jax.random.normal(jax.random.key(3), (2, 3, 4, 4))

    def loss(sigmas, x, use_kernel):
        out = SAMPLERS["dpmpp_3m"](den, x, sigmas, use_kernel=use_kernel)
        return jnp.mean(jnp.square(out - MU))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    for g, r in zip(grad(SIGMAS, x, True), grad(SIGMAS, x, False)):
        _assert_close(g, r, 1e-4)
