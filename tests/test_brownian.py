"""Brownian-tree noise (`jaxdiff.samplers.noise`): a path that is one function of (key, t), whose
increments add up across grids and have variance b - a, and which makes SDE samplers converge
pathwise as their steps grow (where fresh normal noise per step does not)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.core import analytic, schedules
from jaxdiff.core.denoiser import model_from_denoiser
from jaxdiff.core.process import EDM
from jaxdiff.samplers import SAMPLERS, noise

KEY = jax.random.key(11)
T_MAX = 80.0
N_PATHS = 20000  # independent paths (array elements): a variance's standard error is 1%


@jax.jit
def _paths(ts):
    """W(t) at each of `ts` for N_PATHS independent paths (one key)."""
    return jax.vmap(lambda t: noise.brownian_path(KEY, t, T_MAX, (N_PATHS,)))(ts)


def test_path_is_one_function_of_t_and_increments_add_across_grids():
    fine = jnp.asarray(schedules.karras(EDM(), 32, final_zero=False))[::-1]  # 0.002 .. 80
    w_fine = _paths(fine)
    w_coarse = _paths(fine[::2])  # the same levels, evaluated anew, as a 16-step grid
    np.testing.assert_array_equal(w_coarse, w_fine[::2])
    # W(a, c) = W(a, b) + W(b, c): the coarse increments are sums of fine ones (f32 rounding)
    coarse_inc = np.diff(np.asarray(w_coarse), axis=0)
    fine_inc = np.diff(np.asarray(w_fine), axis=0)
    np.testing.assert_allclose(coarse_inc, fine_inc[0::2] + fine_inc[1::2], atol=2e-5)
    # W(0) = 0, W(T) ~ N(0, T); another key is another path
    assert float(jnp.max(jnp.abs(_paths(jnp.zeros(1))))) == 0.0
    other = noise.brownian_path(jax.random.key(12), 1.0, T_MAX, (N_PATHS,))
    assert float(jnp.corrcoef(other, _paths(jnp.ones(1))[0])[0, 1]) < 0.05


@pytest.mark.parametrize("a,b", [(0.002, 0.0031), (0.9, 1.5), (40.0, 80.0), (0.0, 80.0),
                                 (0.37, 0.37 + 1e-5)])
def test_increments_have_variance_b_minus_a_and_are_independent(a, b):
    """Var(W(b) - W(a)) = b - a within 5 standard errors (5% at 20000 paths), down to an
    interval of 1e-5 (500 leaves wide); disjoint increments are uncorrelated."""
    c = b + (b - a) if b + (b - a) <= T_MAX else max(a - (b - a), 0.0)  # a neighbour interval
    w = np.asarray(_paths(jnp.array([a, b, c])), np.float64)
    inc, other = w[1] - w[0], w[2] - (w[1] if c > b else w[0])
    assert abs(inc.var() / (b - a) - 1) < 5 * np.sqrt(2 / N_PATHS), inc.var() / (b - a)
    assert abs(inc.mean()) < 5 * np.sqrt((b - a) / N_PATHS)
    if c != a:
        assert abs(np.corrcoef(inc, other)[0, 1]) < 5 / np.sqrt(N_PATHS)


def test_sampler_draw_is_a_unit_normal_of_the_interval_only():
    """The `noise_sampler="brownian"` draw: unit variance, the same for the same interval in
    any grid that starts at the same level, whatever the step index."""
    like = jnp.zeros((N_PATHS,))
    grid_a = jnp.array([T_MAX, 3.0, 1.0, 0.0])
    grid_b = jnp.array([T_MAX, 10.0, 3.0, 2.0, 1.0, 0.5, 0.0])
    za = noise.noise_fn("brownian", KEY, grid_a, None)(1, 3.0, 1.0, like)
    zb = noise.noise_fn("brownian", KEY, grid_b, None)(4, 3.0, 1.0, like)
    np.testing.assert_array_equal(za, zb)
    assert abs(float(jnp.var(za)) - 1) < 5 * np.sqrt(2 / N_PATHS)
    # the normal draw is the historical one: normal(fold_in(key, i))
    zn = noise.noise_fn("normal", KEY, grid_a, None)(2, 1.0, 0.0, like)
    np.testing.assert_array_equal(zn, jax.random.normal(jax.random.fold_in(KEY, 2), like.shape))


def test_unknown_noise_sampler_is_refused():
    with pytest.raises(ValueError, match="noise_sampler='pink' is unknown; allowed: 'normal'"):
        SAMPLERS["ddpm"](lambda x, s: x, jnp.zeros((1, 1)), jnp.array([1.0, 0.0]),
                         key=KEY, noise_sampler="pink")


GMM = analytic.gmm_denoiser(jnp.array([[0.5, -0.3], [-0.6, 0.4]]), jnp.array([0.2, 0.3]),
                            jnp.array([0.4, 0.6]))


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2m_sde"])
def test_sde_samples_converge_as_steps_grow_with_brownian_noise(name):
    """Median distance of each sample to its 1000-step counterpart with the same key (128
    two-dimensional samples of a Gaussian mixture, Karras grid 80 -> 0.002 -> 0, float64),
    through `jaxdiff.sample` with `noise_sampler="brownian"`: it falls with the steps (measured
    with 64 samples, two keys: dpmpp_sde 0.18-0.24, 0.06-0.09, 0.023; dpmpp_2m_sde 0.35-0.39,
    0.036-0.049, 0.0075 at 8, 32, 128 steps), one compiled program serving every step count.
    The RMS falls too but unevenly: it is dominated by the few samples that switch modes. With
    fresh normal noise per step the samples are other draws and stay ~0.7 apart."""
    process = EDM()
    model = model_from_denoiser(GMM, process, "x0")
    with jax.enable_x64(True):
        x_T = jax.random.normal(jax.random.key(0), (128, 2), jnp.float64)

        def run(steps, noise_sampler):
            return jaxdiff.sample(model, x_T, process=process, prediction="x0", sampler=name,
                                  steps=steps, key=KEY, capacity=1000,
                                  noise_sampler=noise_sampler)

        def distance(a, b):
            return float(jnp.median(jnp.sqrt(jnp.sum((a - b) ** 2, axis=-1))))

        traces = jaxdiff.sampling.trace_count(name)
        ref = run(1000, "brownian")
        errors = [distance(run(n, "brownian"), ref) for n in (8, 32, 128)]
        assert jaxdiff.sampling.trace_count(name) == traces + 1
        assert errors[0] > errors[1] > errors[2] and errors[2] < 0.2 * errors[0], errors
        if name == "dpmpp_2m_sde":
            err_normal = distance(run(128, "normal"), run(1000, "normal"))
            assert err_normal > 10 * errors[2], (err_normal, errors)
