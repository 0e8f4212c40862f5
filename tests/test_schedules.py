"""Schedules: diffusers' timestep spacings, closed-form grids, bad input."""

import jax
import numpy as np
import pytest

from jaxdiff.core import schedules
from jaxdiff.core.process import EDM, DiscreteVP, RectifiedFlow, VPLinear


def _train_sigmas(p):
    return np.sqrt((1 - p.alphas_cumprod) / p.alphas_cumprod)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("n", [4, 10, 25])
def test_discrete_spacings_match_diffusers_ddim(spacing, n):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(timestep_spacing=spacing)
    sched.set_timesteps(n)
    p = DiscreteVP.linear()
    with jax.enable_x64(True):
        grid = schedules.get(spacing)(p, n)
    np.testing.assert_allclose(grid[:-1], _train_sigmas(p)[sched.timesteps.numpy()], rtol=1e-10)
    assert grid[-1] == 0.0 and len(grid) == n + 1


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_discrete_spacings_match_diffusers_euler(spacing):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.EulerDiscreteScheduler(timestep_spacing=spacing)
    sched.set_timesteps(7)
    # Euler interpolates sigma linearly; its float32 alphas_cumprod defines the process here
    p = DiscreteVP(sched.alphas_cumprod.double().numpy(), interpolation="linear")
    with jax.enable_x64(True):
        grid = schedules.get(spacing)(p, 7, **({"round": False} if spacing == "linspace" else {}))
    np.testing.assert_allclose(grid, sched.sigmas.double().numpy(), rtol=2e-6)


def test_karras_and_logsnr_closed_forms():
    g = schedules.karras(EDM(), 5)
    u = np.linspace(0, 1, 5)
    ref = (80 ** (1 / 7) + u * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(g, np.append(ref, 0), rtol=1e-6)
    lam = -np.log(schedules.logsnr(VPLinear(), 6)[:-1])
    np.testing.assert_allclose(np.diff(lam), np.full(5, lam[1] - lam[0]), rtol=1e-5)
    g = schedules.karras(EDM(), 5, final_zero=False)
    assert len(g) == 6 and g[-1] == pytest.approx(0.002)


def test_time_schedules():
    p = VPLinear()
    with jax.enable_x64(True):
        g = schedules.time_uniform(p, 4)
        np.testing.assert_allclose(p.t_of(g[:-1]), np.linspace(1.0, 1e-3, 4), rtol=1e-9)
        g = schedules.time_quadratic(p, 4)
        np.testing.assert_allclose(np.sqrt(p.t_of(g[:-1])), np.linspace(1, 1e-3**0.5, 4),
                                   rtol=1e-9)


def test_shift_matches_sd3_formula_and_diffusers():
    """SD3 shift s t / (1 + (s - 1) t) in flow time is ve_sigma * s."""
    p = RectifiedFlow()
    with jax.enable_x64(True):
        base = schedules.time_uniform(p, 8)
        shifted = schedules.shift(p, 8, shift=3.0)
    t = p.t_of(base[1:-1])
    t_shift = 3 * t / (1 + 2 * t)
    np.testing.assert_allclose(p.t_of(shifted[1:-1]), t_shift, rtol=1e-6)
    diffusers = pytest.importorskip("diffusers")
    fm = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    fm.set_timesteps(8)
    # diffusers' unshifted base times: linspace(1, sigma_min, n); skip t = 1 (ve_sigma = inf)
    base = np.linspace(1.0, float(fm.sigma_min), 8)[1:]
    ours = p.t_of(schedules.array(np.append(base / (1 - base), 0.0))[:-1] * 3.0)
    np.testing.assert_allclose(ours, fm.sigmas.double().numpy()[1:-1], rtol=1e-5)


def test_ays_tables_and_interpolation():
    # the published "10-step" tables hold 11 levels: 10 steps ending at sigma_min
    g = schedules.ays(EDM(), 10, final_zero=False)
    np.testing.assert_allclose(g, schedules.AYS_TABLES["sd15"])
    np.testing.assert_allclose(schedules.ays(EDM(), 11)[:-1], schedules.AYS_TABLES["sd15"])
    g5 = schedules.ays(EDM(), 4, final_zero=False)
    t = np.log(schedules.AYS_TABLES["sd15"])
    np.testing.assert_allclose(np.log(g5[[0, 2, 4]]), t[[0, 5, 10]], rtol=1e-12)
    with pytest.raises(ValueError, match="ays model='sd3' is unknown"):
        schedules.ays(EDM(), 5, model="sd3")


def test_pad_and_array():
    g = schedules.pad(schedules.karras(EDM(), 3), 6)
    assert len(g) == 7 and np.all(g[3:] == 0)
    with pytest.raises(ValueError, match="steps=3 exceeds capacity=2"):
        schedules.pad(schedules.karras(EDM(), 3), 2)
    with pytest.raises(ValueError, match="strictly decreasing"):
        schedules.array([1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        schedules.array([1.0, -0.5])


def test_bad_schedule_input():
    with pytest.raises(ValueError, match="schedule='cosine' is unknown; allowed: trailing"):
        schedules.get("cosine")
    with pytest.raises(ValueError, match="steps=0 must be an integer >= 1"):
        schedules.karras(EDM(), 0)
    with pytest.raises(ValueError, match="'trailing' is a timestep spacing for DiscreteVP"):
        schedules.trailing(EDM(), 5)
    with pytest.raises(ValueError, match="need 0 < sigma_min < sigma_max"):
        schedules.karras(EDM(), 5, sigma_min=10.0, sigma_max=1.0)
