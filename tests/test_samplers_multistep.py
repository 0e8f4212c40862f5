"""Multistep samplers (DPM-Solver++ 2M/3M, DEIS, iPNDM, LMS, UniPC).

- The loop contract: vmap equals the batched run, a padded grid with a traced `num_steps` equals
  the unpadded run, `jaxdiff.sample` serves 5, 12 and 20 steps (both `lower_order_final`
  regimes) with one program, and a float32 run to sigma = 0 has finite values and gradients.
- Convergence where the shared test (tests/test_convergence.py, 16..64 steps) is pre-asymptotic
  or cannot tell order 2 from 3: the same Gaussian set-up at 64..256 steps.
- Parity with diffusers' schedulers (float64), final samples to 1e-5 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import sampling
from jaxdiff.core import analytic, schedules
from jaxdiff.core.denoiser import denoiser as make_denoiser
from jaxdiff.core.denoiser import model_from_denoiser
from jaxdiff.core.process import EDM, DiscreteVP
from jaxdiff.samplers import SAMPLERS

# Two-component mixture in 3 dims: a nonlinear denoiser, so the history really matters.
D_GMM = analytic.gmm_denoiser([[0.5, -0.3, 0.2], [-0.4, 0.6, -0.1]], [0.3, 0.5], [0.4, 0.6])

VARIANTS = [
    ("dpmpp_2m", {}),
    ("dpmpp_3m", {}),
    ("deis", {}),
    ("ipndm", {}),
    ("lms", {}),
    ("unipc", {"order": 3}),
    ("unipc", {"variant": "bh1", "corrector": False, "lower_order_final": False}),
]
IDS = [f"{n}{o or ''}" for n, o in VARIANTS]


def _x(shape=(4, 3), dtype=jnp.float32):
    return 80.0 * jax.random.normal(jax.random.key(1), shape, dtype)


@pytest.mark.parametrize("name,options", VARIANTS, ids=IDS)
def test_padded_traced_and_vmap_equal_plain_run(name, options):
    fn = SAMPLERS[name]
    grid = jnp.asarray(schedules.karras(EDM(), 6), jnp.float32)  # ends at 0
    padded = jnp.asarray(schedules.pad(grid, 10), jnp.float32)
    x = _x()
    ref, traj_ref = jax.jit(lambda x, s: fn(D_GMM, x, s, trajectory=True, **options))(x, grid)
    assert np.all(np.isfinite(traj_ref))
    run = jax.jit(lambda x, s, n: fn(D_GMM, x, s, num_steps=n, trajectory=True, **options))
    out, traj = run(x, padded, jnp.int32(6))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(traj[:7], traj_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(traj[7:], jnp.broadcast_to(out, traj[7:].shape))
    one = lambda xi: fn(D_GMM, xi[None], padded, num_steps=6, **options)[0]  # noqa: E731
    np.testing.assert_allclose(jax.jit(jax.vmap(one))(x), ref, rtol=1e-5, atol=1e-5)


# Reverse-mode compiles are the slow part of this file: DEIS (log-grid Lagrange weights) and
# UniPC (linear solves) cover the shared guards (`ratio`, `past_sigmas`).
@pytest.mark.parametrize("name,options", [VARIANTS[2], VARIANTS[5]], ids=[IDS[2], IDS[5]])
def test_float32_to_zero_has_finite_gradients(name, options):
    fn = SAMPLERS[name]
    grid = jnp.asarray(schedules.karras(EDM(), 5), jnp.float32)
    loss = lambda x, s: jnp.sum(fn(D_GMM, x, s, **options) ** 2)  # noqa: E731
    gx, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(_x(), grid)
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gs))
    assert np.abs(gx).max() > 0


def test_sample_serves_both_lower_order_final_regimes_with_one_program():
    process = EDM()
    model = model_from_denoiser(D_GMM, process, "x0")
    noise = jax.random.normal(jax.random.key(2), (4, 3))
    D = make_denoiser(model, process, "x0")
    counts = []
    for steps in (5, 12, 20):  # n < 15 lowers the last steps' order, n = 20 does not
        x = jaxdiff.sample(model, noise, process=process, prediction="x0", sampler="dpmpp_3m",
                           steps=steps, capacity=32)
        counts.append(sampling.trace_count())
    grid = jnp.asarray(schedules.karras(process, 20), jnp.float32)
    ref = SAMPLERS["dpmpp_3m"](D, noise * grid[0], grid)  # its own, unpadded program
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)
    assert counts[0] == counts[-1]


MU, STD = 0.3, 0.6


def test_ipndm_is_adams_bashforth_on_uniform_grids():
    """iPNDM's fixed weights are LMS's variable-step weights on a uniform grid (so it is fourth
    order there); on the Karras grid they are not, which is why it measures second order."""
    with jax.enable_x64(True):
        D, x = analytic.gaussian_denoiser(MU, STD), _x((3, 4), jnp.float64) / 40
        both = jax.jit(lambda x, s: (SAMPLERS["ipndm"](D, x, s), SAMPLERS["lms"](D, x, s)))
        a, b = both(x, jnp.linspace(2.0, 0.05, 13))
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        a, b = both(x, jnp.asarray(schedules.karras(EDM(), 12, sigma_max=2.0, final_zero=False)))
        assert np.abs(a - b).max() > 1e-6


# --- diffusers parity -------------------------------------------------------------------------

NOISE = np.random.RandomState(0).randn(2, 3)
_MODELS = {}


def _model(abar):
    """One toy network object per alphas_cumprod, so that `jaxdiff.sample` reuses its program."""
    from tests.diffusers_ref import eps_jax

    key = abar.tobytes()
    if key not in _MODELS:
        _MODELS[key] = eps_jax(jnp.asarray(abar))
    return _MODELS[key]


def _parity(scheduler, sampler, steps, options, lms=False):
    """Max relative difference of the final samples of diffusers' loop and `jaxdiff.sample`."""
    from tests.diffusers_ref import diffusers_loop

    ref, ts = diffusers_loop(scheduler, NOISE, steps)
    abar = scheduler.alphas_cumprod.double().numpy()
    with jax.enable_x64(True):
        if lms:  # its own sigmas (fractional timesteps, ve_sigma interpolated linearly)
            process = DiscreteVP(alphas_cumprod=abar, interpolation="linear")
            grid = scheduler.sigmas.double().numpy()
            noise = NOISE * grid[0] / np.sqrt(1 + grid[0] ** 2)  # LMS starts at x = sigma * noise
        else:
            process = DiscreteVP(alphas_cumprod=abar)
            zero = float(scheduler.sigmas[-1]) == 0  # else the last level is sigma(t = 0)
            ts = ts if zero else np.append(ts, 0)
            grid, noise = schedules.timesteps(process, ts, final_zero=zero), NOISE
        x = jaxdiff.sample(_model(abar), noise, process=process, prediction="eps",
                           sampler=sampler, steps=steps, schedule=grid, **options)
    return np.abs(np.asarray(x) - ref).max() / np.abs(ref).max()


SPACINGS = ["trailing", "linspace"]  # linspace: the schedulers' default


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [8, 20])  # below / above diffusers' lower_order_final cut
@pytest.mark.parametrize("order", [2, 3])
def test_parity_dpmsolver_multistep(order, steps, spacing):
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=order, timestep_spacing=spacing
    )
    err = _parity(s, f"dpmpp_{order}m", steps, {})
    assert err <= 1e-5, err


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_parity_unipc(variant, order, steps, spacing):
    diffusers = pytest.importorskip("diffusers")
    # diffusers' bh1 returns NaN on a final step to sigma = 0 (B(h) = -inf times a zero
    # residual), so bh1 is compared on its `sigma_min` grid.
    final = "sigma_min" if variant == "bh1" else "zero"
    s = diffusers.UniPCMultistepScheduler(
        solver_order=order, solver_type=variant, timestep_spacing=spacing, final_sigmas_type=final
    )
    err = _parity(s, "unipc", steps, {"order": order, "variant": variant})
    assert err <= 1e-5, err


@pytest.mark.parametrize("order,steps", [(2, 8), (3, 20)])
def test_parity_unipc_without_corrector(order, steps):
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.UniPCMultistepScheduler(
        solver_order=order, timestep_spacing="trailing", disable_corrector=list(range(steps))
    )
    err = _parity(s, "unipc", steps, {"order": order, "corrector": False})
    assert err <= 1e-5, err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 on diffusers' DEIS code
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("order", [2, 3])
def test_parity_deis(order, steps, spacing):
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DEISMultistepScheduler(solver_order=order, timestep_spacing=spacing)
    err = _parity(s, "deis", steps, {"order": order})
    assert err <= 1e-5, err


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [8, 20])
def test_parity_lms(steps, spacing):
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.LMSDiscreteScheduler(timestep_spacing=spacing)
    err = _parity(s, "lms", steps, {}, lms=True)
    assert err <= 1e-5, err
