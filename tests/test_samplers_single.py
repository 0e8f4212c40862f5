"""Single-step samplers (DDIM, Euler, Heun, DPM-Solver-1/2/3, DPM-Solver++(2S), diffusers'
singlestep DPM-Solver++) and the adaptive `ode` solver: exact NFE, orders on a multimodal
problem, jit/vmap/traced steps, churn, NaN-free gradients, closed forms and diffusers parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.core import analytic, schedules
from jaxdiff.core.process import EDM, DiscreteVP
from jaxdiff.samplers import SAMPLERS
from tests._gauss import GAUSS, GMM, MU, STD, counting, karras_grid
from tests.diffusers_ref import diffusers_loop, eps_jax

FIXED = ["ddim", "euler", "heun", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s",
         "dpmpp_singlestep"]


def _x(shape=(3, 4), dtype=jnp.float32):
    return 80.0 * jax.random.normal(jax.random.key(0), shape, dtype)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# grid ending at 0 / at a positive level: N = 5 steps
NFE = {
    "ddim": (5, 5), "euler": (5, 5), "dpm_solver_1": (5, 5), "dpmpp_singlestep": (5, 5),
    "heun": (9, 10), "dpm_solver_2": (9, 10), "dpmpp_2s": (9, 10), "dpm_solver_3": (13, 15),
}


@pytest.mark.parametrize("name", FIXED)
def test_exact_nfe_under_jit(name):
    D, calls = counting(GAUSS)
    # traced step count on a padded grid: the conds must still skip the calls at sigma' = 0
    fn = jax.jit(lambda x, s, n: SAMPLERS[name](D, x, s, num_steps=n))
    for final_zero, expected in zip([True, False], NFE[name]):
        calls.clear()
        sig = karras_grid(5, final_zero, capacity=8)
        jax.block_until_ready(fn(_x(), sig, 5))
        jax.effects_barrier()
        assert len(calls) == expected, (final_zero, len(calls))


def test_first_order_methods_are_ddim():
    x, sig = _x(), karras_grid(7)
    ref = SAMPLERS["ddim"](GAUSS, x, sig)
    for name in ["euler", "dpm_solver_1"]:
        np.testing.assert_array_equal(SAMPLERS[name](GAUSS, x, sig), ref)
    np.testing.assert_array_equal(SAMPLERS["dpmpp_singlestep"](GAUSS, x, sig, order=1), ref)


def test_orders_on_gaussian_mixture():
    """Multimodal (nonlinear) field, reference from `ode` at tolerance 1e-10; the step counts
    share one compiled program (traced num_steps on a padded grid). On the Gaussian problem of
    test_convergence with a Karras grid DPM-Solver-3's h^3 term nearly cancels (measured slope
    4.6 over 16..64; 3.2 on a uniform-lambda grid); here it shows its order 3."""
    steps, cap = (16, 32, 64), 64
    with jax.enable_x64(True):
        x_T = _x((8, 2), jnp.float64)
        grids = [schedules.pad(schedules.karras(EDM(), n, final_zero=False), cap) for n in steps]
        tight = jax.jit(lambda x, s: SAMPLERS["ode"](GMM, x, s, num_steps=16, rtol=1e-10,
                                                      atol=1e-10))
        ref = tight(x_T, jnp.asarray(grids[0]))
        for name, order in [("heun", 2), ("dpm_solver_2", 2), ("dpm_solver_3", 3),
                            ("dpmpp_2s", 2)]:
            fn = jax.jit(lambda x, s, n, f=SAMPLERS[name]: f(GMM, x, s, num_steps=n))
            errs = [float(jnp.sqrt(jnp.mean((fn(x_T, jnp.asarray(g), n) - ref) ** 2)))
                    for g, n in zip(grids, steps)]
            slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
            assert order - 0.35 <= slope <= order + 0.8, (name, slope, errs)


def test_ode_matches_closed_form():
    """Grids ending at 0 and above 0, traced step count on a padded grid, saved levels."""
    with jax.enable_x64(True):
        x = _x(dtype=jnp.float64)
        fn = jax.jit(lambda x, s, n: SAMPLERS["ode"](GAUSS, x, s, num_steps=n, trajectory=True))
        for final_zero in [True, False]:
            grid = schedules.karras(EDM(), 5, final_zero=final_zero)
            out, traj = fn(x, jnp.asarray(schedules.pad(grid, 8)), 5)
            assert traj.shape == (9,) + x.shape
            assert _rel(out, analytic.gaussian_ode(x, grid[0], grid[-1], MU, STD)) < 2e-5
            for k in range(5):
                assert _rel(traj[k], analytic.gaussian_ode(x, grid[0], grid[k], MU, STD)) < 2e-5
            np.testing.assert_array_equal(traj[5:], jnp.broadcast_to(out, (4,) + x.shape))
            if final_zero:  # the solve reaches sigma_L, then one DDIM step: x = D(x, sigma_L)
                at_last = analytic.gaussian_ode(x, grid[0], grid[-2], MU, STD)
                assert _rel(out, GAUSS(at_last, grid[-2])) < 1e-5


DISTINCT = ["ddim", "heun", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s", "dpmpp_singlestep"]


@pytest.mark.parametrize("name", DISTINCT + ["ode"])
def test_vmap_equals_batched_run(name):
    x, sig = _x((4, 3)), karras_grid(6)
    fn = SAMPLERS[name]
    batched = jax.jit(lambda x: fn(GAUSS, x, sig))(x)
    mapped = jax.jit(jax.vmap(lambda xi: fn(GAUSS, xi, sig)))(x)
    np.testing.assert_allclose(mapped, batched, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FIXED)
def test_traced_steps_on_padded_grid(name):
    x, fn = _x(), SAMPLERS[name]
    traced = jax.jit(lambda x, s, n: fn(GAUSS, x, s, num_steps=n, trajectory=True))
    for n in [1, 5, 6]:  # one compiled program for every step count
        grid = karras_grid(n)
        ref, ref_traj = fn(GAUSS, x, grid, trajectory=True)
        out, traj = traced(x, jnp.asarray(schedules.pad(grid, 9), jnp.float32), n)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(traj[: n + 1], ref_traj, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(traj[n + 1:], jnp.broadcast_to(out, (9 - n,) + x.shape))


@pytest.mark.parametrize("name", DISTINCT)
def test_gradients_are_finite_through_the_step_to_zero(name):
    x, sig = _x((2, 3)) / 80.0, karras_grid(4)

    def loss(x, s):
        return jnp.sum(SAMPLERS[name](GAUSS, x * s[0], s) ** 2)

    gx, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, sig)
    assert bool(jnp.all(jnp.isfinite(gx))) and bool(jnp.all(jnp.isfinite(gs)))
    assert float(jnp.max(jnp.abs(gx))) > 0


def test_heun_churn_needs_a_key_and_is_reproducible():
    x, sig = _x(), karras_grid(8)
    heun = SAMPLERS["heun"]
    with pytest.raises(ValueError, match="key"):
        heun(GAUSS, x, sig, s_churn=10.0)
    fn = jax.jit(lambda x, k: heun(GAUSS, x, sig, s_churn=10.0, key=k))
    a, b = fn(x, jax.random.key(1)), fn(x, jax.random.key(1))
    c = fn(x, jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert _rel(a, c) > 1e-3
    # churn 0 with a key, or churn confined to an empty sigma range, is Alg. 1
    ref = heun(GAUSS, x, sig)
    np.testing.assert_array_equal(heun(GAUSS, x, sig, key=jax.random.key(1)), ref)
    out = heun(GAUSS, x, sig, s_churn=10.0, s_tmin=100.0, key=jax.random.key(1))
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_heun_churn_matches_edm_algorithm_2_by_hand():
    """One step of EDM Alg. 2 written out, with the same noise draw (step_key(key, 0))."""
    x, sig, key = _x(), jnp.array([10.0, 2.0]), jax.random.key(3)
    out = SAMPLERS["heun"](GAUSS, x, sig, s_churn=0.2, key=key)
    gamma = 0.2  # min(s_churn / N, sqrt(2) - 1) with N = 1
    s_hat = 10.0 * (1 + gamma)
    z = jax.random.normal(jax.random.fold_in(key, 0), x.shape)
    x_hat = x + np.sqrt(s_hat**2 - 100.0) * z
    d = (x_hat - GAUSS(x_hat, s_hat)) / s_hat
    x_e = x_hat + (2.0 - s_hat) * d
    ref = x_hat + (2.0 - s_hat) * 0.5 * (d + (x_e - GAUSS(x_e, 2.0)) / 2.0)
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_dpmpp_singlestep_rejects_bad_order():
    with pytest.raises(ValueError, match="order"):
        SAMPLERS["dpmpp_singlestep"](GAUSS, _x(), karras_grid(4), order=4)


# ---------------------------------------------------------------- diffusers parity (float64)

N_PARITY = 10


def _ours(sched, sampler, ts, noise, interpolation="log", **options):
    """jaxdiff.sample on the scheduler's alphas_cumprod, at its timesteps."""
    abar = sched.alphas_cumprod.double().numpy()
    process = DiscreteVP(alphas_cumprod=abar, interpolation=interpolation)
    grid = schedules.timesteps(process, ts)
    return np.asarray(jaxdiff.sample(
        eps_jax(jnp.asarray(abar)), noise, process=process, prediction="eps", sampler=sampler,
        steps=len(ts), schedule=grid, capacity=16, **options,
    ))


def _start_scale(sched):
    """diffusers' Euler/Heun start linspace/trailing grids at x_T = sigma_max * noise (VE view)
    where jaxdiff (and their leading spacing) start at sqrt(1 + sigma_max^2) * noise."""
    smax = float(sched.sigmas.max())
    return float(sched.init_noise_sigma) / np.sqrt(1.0 + smax**2)


@pytest.fixture
def parity():
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("torch")
    with jax.enable_x64(True):
        yield diffusers, diffusers_loop, np.random.default_rng(0).standard_normal((2, 3, 4))


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_parity_euler(parity, spacing):
    diffusers, loop, noise = parity
    sched = diffusers.EulerDiscreteScheduler(timestep_spacing=spacing)
    ref, ts = loop(sched, noise, N_PARITY)
    # linspace has fractional timesteps, where Euler interpolates sigma itself linearly
    interp = "linear" if spacing == "linspace" else "log"
    out = _ours(sched, "euler", ts, noise * _start_scale(sched), interp)
    assert _rel(out, ref) < 1e-5


def test_parity_heun(parity):
    diffusers, loop, noise = parity
    sched = diffusers.HeunDiscreteScheduler()  # linspace: fractional timesteps, linear sigma
    ref, ts = loop(sched, noise, N_PARITY)
    ts = ts[0::2]  # diffusers lists t_1 .. t_{N-1} twice (Euler stage, then correction)
    out = _ours(sched, "heun", ts, noise * _start_scale(sched), "linear")
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("order,n", [(2, 10), (2, 11), (3, 9), (3, 10), (3, 11)])
def test_parity_dpm_solver_singlestep(parity, order, n):
    """Every residue of n mod order: diffusers' order list ends differently for each."""
    diffusers, loop, noise = parity
    sched = diffusers.DPMSolverSinglestepScheduler(solver_order=order)
    ref, ts = loop(sched, noise, n)
    out = _ours(sched, "dpmpp_singlestep", ts, noise, order=order)
    assert _rel(out, ref) < 1e-5


def test_parity_ddim_trailing(parity):
    diffusers, loop, noise = parity
    # N divides 1000: DDIM steps to t - 1000 // N, which is the next listed timestep only then
    sched = diffusers.DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    ref, ts = loop(sched, noise, N_PARITY)
    assert _rel(_ours(sched, "ddim", ts, noise), ref) < 1e-5

