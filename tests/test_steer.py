"""SMC / FK steering and noise search (jaxdiff.steer): resampling, weights, the unbiased
normalising constant, convergence to a reward-tilted target, reproducibility, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import steer
from jaxdiff.core import analytic
from jaxdiff.core.denoiser import model_from_denoiser
from jaxdiff.core.guidance import Chain, Conditioning
from jaxdiff.core.process import EDM

PROCESS = EDM()
MEAN, STD = 0.5, 0.8
NET = model_from_denoiser(analytic.gaussian_denoiser(MEAN, STD), PROCESS, "x0")
A_CENTER, TAU = 1.5, 0.5


def gauss_reward(x0, sigma):
    return -jnp.sum((x0 - A_CENTER) ** 2, -1) / (2 * TAU**2)


def run(fk, rows, dim=1, sampler="ddpm", steps=20, net=NET, seed=0):
    noise = jax.random.normal(jax.random.key(seed), (rows, dim))
    return jaxdiff.sample(net, noise, process=PROCESS, prediction="x0", sampler=sampler,
                          steps=steps, key=jax.random.key(1), guidance=fk)


def ddpm_output_variance(steps=20):
    """Variance of what `ddpm` with the exact Gaussian denoiser draws (a linear Gaussian chain:
    x' = c x + noise), from the same grid jaxdiff.sample uses."""
    sig = np.asarray(jaxdiff.sampling._padded_grid(PROCESS, None, steps, None))[: steps + 1]
    v = float(PROCESS.prior_scale(sig[0])) ** 2  # x = prior_scale * noise at the start
    for s, s2 in zip(sig[:-1], sig[1:]):
        k = STD**2 / (STD**2 + s**2)
        r2 = (s2 / s) ** 2
        c = k + r2 * (1 - k)
        v = c**2 * v + s2**2 * (1 - r2)
    return v


def test_resampling_schemes():
    w = jnp.array([0.5, 0.25, 0.125, 0.125])
    counts = np.bincount(np.asarray(steer.systematic(jax.random.key(0), jnp.log(w))), minlength=4)
    assert np.all(np.abs(counts - 4 * np.asarray(w)) < 1)  # floor or ceil of k w
    draws = jax.vmap(steer.multinomial, (0, None))(jax.random.split(jax.random.key(1), 4000),
                                                  jnp.log(w))
    freq = np.bincount(np.asarray(draws).ravel(), minlength=4) / draws.size
    np.testing.assert_allclose(freq, w, atol=0.01)
    assert float(steer.ess(jnp.log(w))) == pytest.approx(1 / float(jnp.sum(w**2)), rel=1e-5)
    assert float(steer.ess(jnp.zeros(8))) == pytest.approx(8.0)


@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_normalising_constant_is_unbiased(threshold):
    """E[Z-hat] = E_p[exp(r(x0))], in closed form for the sampler's Gaussian output."""
    groups, k = 3000, 4
    fk = steer.FK(gauss_reward, particles=k, groups=groups, key=jax.random.key(3),
                  ess_threshold=threshold)
    _, state = run(fk, groups * k)
    z_hat = np.exp(np.asarray(steer.log_evidence(state)))
    v, m = ddpm_output_variance(), MEAN
    # the chain is linear around the mean, so x0 ~ N(MEAN, v); Z = E exp(-(x0 - a)^2 / 2 tau^2)
    z = np.sqrt(TAU**2 / (TAU**2 + v)) * np.exp(-(m - A_CENTER) ** 2 / (2 * (TAU**2 + v)))
    assert abs(z_hat.mean() - z) < 4 * z_hat.std() / np.sqrt(groups)
    assert int(state.resamples.sum()) > 0


def test_particles_converge_to_the_tilted_target():
    """p(x0) exp(r(x0)) for the Gaussian sampler output and Gaussian reward is Gaussian."""
    groups, k = 400, 64
    fk = steer.FK(gauss_reward, particles=k, groups=groups, key=jax.random.key(3))
    x, state = run(fk, groups * k)
    picked = np.asarray(steer.select(x, state, jax.random.key(5)))[:, 0]
    v = ddpm_output_variance()
    mean = (MEAN * TAU**2 + A_CENTER * v) / (v + TAU**2)
    var = v * TAU**2 / (v + TAU**2)
    assert abs(picked.mean() - mean) < 4 * np.sqrt(var / groups) + 0.02
    assert abs(picked.var() - var) < 0.3 * var
    # without steering the mean is the prior's, far away
    assert abs(mean - MEAN) > 10 * np.sqrt(var / groups)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun", "dpm_fast"])
def test_resampling_gathers_the_sampler_history(sampler):
    """A reward that gives one particle all the weight: after the first resampling every
    particle of a group is its copy, and a deterministic sampler keeps them identical only if
    its history (multistep) was gathered with x."""
    k = 8
    fk = steer.FK(lambda x0, s: 100.0 * x0[:, 0], particles=k, groups=2,
                  key=jax.random.key(3), ess_threshold=1.0)
    x, state = run(fk, 2 * k, dim=3, sampler=sampler, steps=10)
    assert float(np.ptp(np.asarray(x).reshape(2, k, 3), axis=1).max()) == 0.0
    assert int(state.resamples.min()) >= 1


def test_potentials_and_composition_with_conditioning():
    """max and sum potentials run; FK goes last in a Chain after bound network arguments."""
    net = model_from_denoiser(lambda x, s, y: analytic.gaussian_denoiser(MEAN, STD)(x, s) + 0 * y,
                              PROCESS, "x0")
    for potential in ("max", "sum"):
        fk = steer.FK(gauss_reward, particles=4, groups=2, key=jax.random.key(0),
                      potential=potential)
        x, state = run(Chain((Conditioning((jnp.zeros((8, 1)),)), fk)), 8, net=net)
        assert x.shape == (8, 1) and int(state.steps) == 20


def test_reproducible_from_a_key():
    fk = steer.FK(gauss_reward, particles=4, groups=2, key=jax.random.key(3))
    a, b = run(fk, 8)[0], run(fk, 8)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = run(steer.FK(gauss_reward, particles=4, groups=2, key=jax.random.key(4)), 8)[0]
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_adaptive_sampler_is_refused():
    fk = steer.FK(gauss_reward, particles=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="no fixed steps"):
        run(fk, 2, sampler="dpm_adaptive")


@pytest.mark.parametrize("kwargs,match", [
    (dict(particles=0), "particles=0"), (dict(groups=-1), "groups=-1"),
    (dict(potential="min"), "potential='min'"), (dict(ess_threshold=1.5), "ess_threshold"),
    (dict(resampling="residual"), "resampling='residual'"), (dict(key=None), "key"),
])
def test_bad_settings_are_refused_in_one_line(kwargs, match):
    args = {**dict(reward=gauss_reward, particles=4, key=jax.random.key(0)), **kwargs}
    with pytest.raises(ValueError, match=match) as e:
        steer.FK(**args)
    assert "\n" not in str(e.value)


def test_noise_batch_must_match_the_particles():
    fk = steer.FK(gauss_reward, particles=4, groups=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="8 rows but the noise has batch 6"):
        run(fk, 6)


def test_best_of_n_and_zero_order_search_raise_the_reward():
    """Noise search over a deterministic sampler: both beat one sample's mean reward, the
    search's pivot never gets worse, and costs are counted."""
    def generate(noise):
        return jaxdiff.sample(NET, noise, process=PROCESS, prediction="x0", sampler="ddim",
                              steps=8)

    def reward(x):
        return gauss_reward(x, 0.0)

    one = float(reward(generate(jax.random.normal(jax.random.key(9), (256, 1)))).mean())
    _, s_bon, info = steer.best_of_n(generate, reward, jax.random.key(1), (1,), n=8, groups=64)
    assert info["cost"] == 512 and float(s_bon.mean()) > one + 1.0
    _, s_zo, info = steer.zero_order_search(generate, reward, jax.random.key(2), (1,), rounds=3,
                                            candidates=3, radius=0.5, groups=64)
    hist = np.asarray(info["history"])
    assert info["cost"] == 64 * 10 and np.all(np.diff(hist, axis=0) >= 0)
    assert float(s_zo.mean()) > one + 1.0
    with pytest.raises(ValueError, match="radius"):
        steer.zero_order_search(generate, reward, jax.random.key(2), (1,), rounds=1,
                                candidates=2, radius=0.0)
    with pytest.raises(ValueError, match="n=0"):
        steer.best_of_n(generate, reward, jax.random.key(1), (1,), n=0)


def test_smc_recovers_the_weights_of_a_mixture_posterior():
    """An inverse problem as a reward (the measurement's log-likelihood): SMC's draws split
    between the posterior's two modes as the closed form says, where the unsteered sampler
    follows the prior's weights."""
    means, stds, weights = np.array([[-1.0], [1.0]]), np.array([0.3, 0.3]), np.array([0.8, 0.2])
    a, y, sigma_y = np.array([[1.0]]), np.array([0.3]), 0.6
    w_post = np.asarray(analytic.gmm_posterior(means, stds, weights, a, y, sigma_y)[0])
    net = model_from_denoiser(analytic.gmm_denoiser(means, stds, weights), PROCESS, "x0")

    def likelihood(x0, sigma):  # widened by x0's spread at noise level sigma (exact at 0)
        var = sigma_y**2 + jnp.square(sigma) / (jnp.square(sigma) + 1.0)
        return -0.5 * jnp.sum(jnp.square(x0 - y[0]), -1) / var - 0.5 * jnp.log(var)

    groups = 400
    fk = steer.FK(likelihood, particles=16, groups=groups, key=jax.random.key(3))
    # SMC targets the tilt of what the sampler draws: 100 dpmpp_2m_sde steps sample this prior
    # closely enough (its weight 0.201, mode std 0.305) for the tilt to be the exact posterior's
    # (at 20 steps: 0.189 and 0.349, whose tilt has weight 0.43 where the posterior has 0.49)
    x, state = run(fk, groups * 16, net=net, steps=100, sampler="dpmpp_2m_sde")
    share = float(np.mean(np.asarray(steer.select(x, state, jax.random.key(4)))[:, 0] > 0))
    assert abs(share - w_post[1]) < 4 * np.sqrt(w_post[1] * w_post[0] / groups) + 0.02
    assert abs(w_post[1] - weights[1]) > 0.15  # the measurement moved the weights
