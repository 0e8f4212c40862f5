"""Stochastic samplers: DDPM ancestral, Euler ancestral, DPM-Solver++(2M/3M) SDE, reverse-SDE
Euler-Maruyama and predictor-corrector (two-stage ancestral ones: `ancestral`).

All work in the VE view x = x0 + sigma * eps (see `jaxdiff.core.denoiser`), where going up from
sigma' to sigma > sigma' adds independent noise: x_sigma = x_sigma' + sqrt(sigma^2 - sigma'^2) xi.
Every step has the same shape, `_move`: x' = D + c (x - D) + std * z, with z standard normal;
the samplers differ in c and std.

Randomness: step i draws z from `base.step_key(key, i)` (pc's j-th corrector step draws from
`fold_in(step_key(key, i), j + 1)`), so one key fixes the samples whatever the grid's padding or
the compilation. `noise_sampler="brownian"` draws each step's z from one Brownian path instead
(`jaxdiff.samplers.noise`; pc's Langevin corrections, at a fixed level, keep normal draws).
A step to sigma' = 0 adds no noise and returns the denoiser's output D (the posterior mean,
score_sde's `denoise=True`); the denoiser is never called at sigma = 0.

References: Ho et al. 2020 (DDPM); k-diffusion (Crowson) and diffusers (Euler ancestral);
Lu et al. 2022b and diffusers `sde-dpmsolver++` (DPM-Solver++(2M) SDE); Song et al. 2021
(score_sde: reverse SDE, reverse diffusion, predictor-corrector with Langevin corrector).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.samplers.base import NO_STATE, lift, num_steps_of, run, step_key
from jaxdiff.samplers.multistep import step_order
from jaxdiff.samplers.noise import noise_fn


def _noise(key, x):
    return jax.random.normal(key, x.shape, x.dtype)


def _move(x, x0, c, std, z):
    """x' = D + c (x - D) + std z: a deterministic move toward D, then fresh Gaussian noise."""
    return (x0 + c * (x - x0) + std * z).astype(x.dtype)


def ancestral_sigmas(sigma, sigma_next, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion `get_ancestral_step`):
    sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)),
    sigma_down = sqrt(sigma'^2 - sigma_up^2). Going down to sigma_down and adding sigma_up noise
    lands at noise level sigma' again."""
    up = jnp.minimum(sigma_next, eta * sigma_next * jnp.sqrt(1.0 - jnp.square(sigma_next / sigma)))
    down = jnp.sqrt(jnp.maximum(jnp.square(sigma_next) - jnp.square(up), 0.0))
    return down, up


def ddpm(denoiser, x, sigmas, *, key, num_steps=None, trajectory=False, noise_sampler="normal"):
    """Ancestral DDPM sampling (Ho et al. 2020, Alg. 2), 1 NFE per step.

    Each step draws from the forward process's posterior q(x' | x, x0 = D) (Ho et al. Eqs. 6-7),
    here for any pair sigma > sigma' in the VE view, where x = x' + sqrt(sigma^2 - sigma'^2) xi:
      mean = D + (sigma'^2 / sigma^2) (x - D),  var = sigma'^2 (sigma^2 - sigma'^2) / sigma^2.
    With alpha = 1/sqrt(1 + sigma^2), alpha' x' has exactly DDPM's posterior mean (Eq. 7) and
    variance beta-tilde = (1 - abar') / (1 - abar) (1 - abar / abar') (diffusers' DDPMScheduler,
    variance_type="fixed_small"), also between non-consecutive timesteps. The same move as
    `euler_ancestral` with eta = 1. The step to sigma' = 0 returns D without noise.
    `noise_sampler`: "normal" (default) or "brownian" (`jaxdiff.samplers.noise`).
    """
    denoiser, state = lift(denoiser)
    draw = noise_fn(noise_sampler, key, sigmas, num_steps)

    def step(i, x, carry, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        r2 = jnp.square(s_next / s)
        x0, state = denoiser(x, s, state)
        x = _move(x, x0, r2, s_next * jnp.sqrt(1.0 - r2), draw(i, s, s_next, x))
        return x, carry, state

    return run(step, x, sigmas, (), state, num_steps=num_steps, trajectory=trajectory)


def euler_ancestral(
    denoiser, x, sigmas, *, key, num_steps=None, trajectory=False, eta=1.0, s_noise=1.0,
    noise_sampler="normal",
):
    """Euler ancestral (k-diffusion `sample_euler_ancestral`; diffusers'
    EulerAncestralDiscreteScheduler is eta = 1), 1 NFE per step.

    Euler (DDIM, Song et al. 2021 Eq. 12 in the VE view) from sigma down to sigma_down, then
    s_noise * sigma_up fresh noise (see `ancestral_sigmas`). eta = 0 is DDIM; eta = 1 is `ddpm`.
    `noise_sampler`: "normal" (default) or "brownian" (`jaxdiff.samplers.noise`).
    """
    denoiser, state = lift(denoiser)
    draw = noise_fn(noise_sampler, key, sigmas, num_steps)

    def step(i, x, carry, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        down, up = ancestral_sigmas(s, s_next, eta)
        x0, state = denoiser(x, s, state)
        x = _move(x, x0, down / s, s_noise * up, draw(i, s, s_next, x))
        return x, carry, state

    return run(step, x, sigmas, (), state, num_steps=num_steps, trajectory=trajectory)


SOLVER_TYPES = ("midpoint", "heun")


def dpmpp_2m_sde(
    denoiser,
    x,
    sigmas,
    *,
    key,
    num_steps=None,
    trajectory=False,
    eta=1.0,
    s_noise=1.0,
    lower_order_final=True,
    solver_type="midpoint",
    noise_sampler="normal",
):
    """DPM-Solver++(2M) SDE: the multistep data-prediction solver of Lu et al. 2022b (Alg. 2)
    applied to the reverse SDE, as diffusers' `sde-dpmsolver++` (solver_order=2) and
    k-diffusion's `sample_dpmpp_2m_sde` implement it; 1 NFE per step.

    With h = log(sigma / sigma'), r = h_prev / h, D1 = (D - D_prev) / r, c = e^{-(1+eta) h}:
      x' = c x + (1 - c) D + w D1 + s_noise sigma' sqrt(1 - e^{-2 eta h}) z,
    w = (1 - c)/2 for `solver_type="midpoint"` (the default), w = 1 - (1 - c)/((1 + eta) h)
    for "heun" (k-diffusion's and diffusers' `solver_type="heun"`). eta = 1 is diffusers' SDE
    solver; eta = 0 is DPM-Solver++(2M). The first step is first order (D1 = 0); with
    `lower_order_final`, so is the last one of a run of fewer than 15 steps (diffusers' rule,
    `multistep.step_order`; k-diffusion never lowers it: pass False); a step to sigma' = 0
    returns D. `noise_sampler`: "normal" (default) or "brownian" (k-diffusion's default;
    `jaxdiff.samplers.noise`).
    """
    if solver_type not in SOLVER_TYPES:
        raise ValueError(
            f"solver_type={solver_type!r} is unknown; allowed: {', '.join(SOLVER_TYPES)}")
    n = num_steps_of(sigmas, num_steps)
    denoiser, state = lift(denoiser)
    draw = noise_fn(noise_sampler, key, sigmas, num_steps)

    def step(i, x, carry, state):
        x0_prev, h_prev = carry
        s, s_next = sigmas[i], sigmas[i + 1]
        h = jnp.log(s / jnp.where(s_next > 0, s_next, s))  # 0 on the step to 0 (result unused)
        x0, state = denoiser(x, s, state)
        first = step_order(i, n, 2, lower_order_final, sigma_next=s_next) == 1
        d1 = jnp.where(first, 0.0, h / jnp.where(first, 1.0, h_prev)) * (x0 - x0_prev)
        std = s_noise * s_next * jnp.sqrt(-jnp.expm1(-2.0 * eta * h))
        c = jnp.exp(-(1.0 + eta) * h)  # (sigma'/sigma) e^{-eta h}
        z = draw(i, s, s_next, x)
        if solver_type == "midpoint":
            x_next = _move(x, x0 + 0.5 * d1, c, std, z)
        else:
            hh = (1.0 + eta) * jnp.where(h > 0, h, 1.0)
            w = 1.0 + jnp.expm1(-hh) / hh
            x_next = _move(x, x0, c, std, z) + (w * d1).astype(x.dtype)
        return jnp.where(s_next > 0, x_next, x0).astype(x.dtype), (x0, h), state

    carry = (jnp.zeros_like(x), jnp.ones((), sigmas.dtype))
    return run(step, x, sigmas, carry, state, num_steps=num_steps, trajectory=trajectory)


def dpmpp_3m_sde(
    denoiser,
    x,
    sigmas,
    *,
    key,
    num_steps=None,
    trajectory=False,
    eta=1.0,
    s_noise=1.0,
    lower_order_final=True,
    solver_type="heun",
    diffusers_d2=False,
    noise_sampler="normal",
):
    """DPM-Solver++(3M) SDE (k-diffusion's `sample_dpmpp_3m_sde`): the third-order multistep
    data-prediction solver of Lu et al. 2022b (`multistep.dpmpp_3m`) on the reverse SDE of
    `dpmpp_2m_sde`; 1 NFE per step.

    With hh = (1 + eta) h, phi_2 = 1 + expm1(-hh)/hh, phi_3 = phi_2/hh - 1/2 and the divided
    differences D1, D2 of the last three outputs (as `dpmpp_3m`, with r0 = h_1/h, r1 = h_2/h):
      x' = e^{-hh} x + (1 - e^{-hh}) D + phi_2 D1 - phi_3 D2
           + s_noise sigma' sqrt(1 - e^{-2 eta h}) z.
    Orders warm up 1, 2, 3; an order-2 step adds w D1 (D1 = (D - D_prev)/r0) with w as
    `dpmpp_2m_sde`'s `solver_type` ("heun", w = phi_2: k-diffusion's). With `lower_order_final`
    a run of fewer than 15 steps ends with orders 2, 1 (diffusers' rule; k-diffusion: pass
    False); a step to sigma' = 0 returns D. `noise_sampler`: "normal" (default) or "brownian"
    (k-diffusion's default; `jaxdiff.samplers.noise`).

    diffusers' `sde-dpmsolver++` with solver_order=3 (0.42) is `solver_type="midpoint",
    diffusers_d2=True` at eta = 1: its D2 weight is -phi_2/hh - 1/2, which tends to -1 as
    h -> 0 where the consistent -phi_3 tends to 0, so its third-order steps carry an O(h^2)
    local error (on the tests' toy network the two variants' samples differ by 0.23 relative
    at 10 steps); use it to reproduce diffusers only.
    """
    if solver_type not in SOLVER_TYPES:
        raise ValueError(
            f"solver_type={solver_type!r} is unknown; allowed: {', '.join(SOLVER_TYPES)}")
    n = num_steps_of(sigmas, num_steps)
    denoiser, state = lift(denoiser)
    draw = noise_fn(noise_sampler, key, sigmas, num_steps)

    def step(i, x, carry, state):
        x1, x2, h1, h2 = carry  # D and h of the two previous steps
        s, s_next = sigmas[i], sigmas[i + 1]
        h = jnp.log(s / jnp.where(s_next > 0, s_next, s / jnp.e))  # 1 on the step to 0 (unused)
        x0, state = denoiser(x, s, state)
        p = step_order(i, n, 3, lower_order_final, sigma_next=s_next)
        hh = (1.0 + eta) * h
        phi2 = 1.0 + jnp.expm1(-hh) / hh
        phi3 = phi2 / hh - 0.5
        r0, r1 = h1 / h, h2 / h
        d10, d11 = (x0 - x1) / r0.astype(x.dtype), (x1 - x2) / r1.astype(x.dtype)
        d1 = jnp.where(p == 3, d10 + (d10 - d11) * (r0 / (r0 + r1)).astype(x.dtype), d10)
        d2 = (d10 - d11) / (r0 + r1).astype(x.dtype)
        w_order2 = phi2 if solver_type == "heun" else 0.5 * -jnp.expm1(-hh)
        w1 = jnp.where(p == 3, phi2, jnp.where(p == 2, w_order2, 0.0)).astype(x.dtype)
        w2 = jnp.where(p == 3, -phi3 - (1.0 if diffusers_d2 else 0.0), 0.0).astype(x.dtype)
        std = s_noise * s_next * jnp.sqrt(-jnp.expm1(-2.0 * eta * h))
        x_next = _move(x, x0, jnp.exp(-hh), std, draw(i, s, s_next, x)) + w1 * d1 + w2 * d2
        return jnp.where(s_next > 0, x_next, x0).astype(x.dtype), (x0, x1, h, h1), state

    ones = jnp.ones((), sigmas.dtype)
    carry = (jnp.zeros_like(x), jnp.zeros_like(x), ones, ones)
    return run(step, x, sigmas, carry, state, num_steps=num_steps, trajectory=trajectory)


def _sde_predictor(predictor, x, x0, s, s_next, z):
    """One predictor move of the reverse VE SDE from s to s_next; D at s_next = 0.

    The VE SDE dx = sqrt(d sigma^2 / dt) dw (Song et al. 2021, Eq. 9) reverses (their Eq. 6) to
    dx = -(d sigma^2 / dt) score dt + sqrt(d sigma^2 / dt) dw-bar, score = (D - x) / sigma^2.
    `euler_maruyama` takes t = sigma (EDM's time for the VE view) with coefficients frozen at the
    step's start: x' = x + 2 sigma (sigma - sigma') score + sqrt(2 sigma (sigma - sigma')) z.
    `reverse_diffusion` (Song et al. 2021, App. E; score_sde's ReverseDiffusionPredictor)
    reverses the discretised forward step x = x' + sqrt(sigma^2 - sigma'^2) xi:
    x' = x + (sigma^2 - sigma'^2) score + sqrt(sigma^2 - sigma'^2) z (DDPM's mean, more noise).
    On score_sde's own VE grid, reverse diffusion is its predictor exactly and EM agrees with its
    EulerMaruyamaPredictor to first order in the step."""
    r = s_next / s
    if predictor == "euler_maruyama":
        c, std = 2.0 * r - 1.0, jnp.sqrt(2.0 * s * (s - s_next))
    else:
        c, std = jnp.square(r), jnp.sqrt(jnp.square(s) - jnp.square(s_next))
    return jnp.where(s_next > 0, _move(x, x0, c, std, z), x0).astype(x.dtype)


PREDICTORS = ("reverse_diffusion", "euler_maruyama")


def em(denoiser, x, sigmas, *, key, num_steps=None, trajectory=False, noise_sampler="normal"):
    """Euler-Maruyama for the reverse-time VE SDE (Song et al. 2021, Eq. 6; score_sde's
    EulerMaruyamaPredictor), 1 NFE per step; see `_sde_predictor` for the discretisation.

    Weak order 1; needs far more steps than the ODE samplers (on Gaussian data, 1000 steps for
    a ~0.5% variance error). `noise_sampler`: "normal" (default) or "brownian"
    (`jaxdiff.samplers.noise`)."""
    denoiser, state = lift(denoiser)
    draw = noise_fn(noise_sampler, key, sigmas, num_steps)

    def step(i, x, carry, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        z = draw(i, s, s_next, x)
        x0, state = denoiser(x, s, state)
        return _sde_predictor("euler_maruyama", x, x0, s, s_next, z), carry, state

    return run(step, x, sigmas, (), state, num_steps=num_steps, trajectory=trajectory)


STEP_NORMS = ("batch", "sample")


def langevin_step(denoiser, x, sigma, key, snr, step_norm="batch"):
    """One Langevin corrector step at noise level sigma (Song et al. 2021, App. G, corrector for
    VE; score_sde's LangevinCorrector with alpha = 1): x + eps score + sqrt(2 eps) z with
    eps = 2 (snr ||z|| / ||score||)^2, norms over all axes but the first.

    `step_norm="batch"` averages both norms over the batch, as score_sde does: one step size
    for all samples. `"sample"` keeps each sample independent of its batch, but the norms then
    concentrate only in high dimension d: for Gaussian data the noise-dependent step inflates
    the variance a step adds by about (d + 2)/(d - 2) -- fine for images, not for a few dims.
    A `Stateful` denoiser gives `(x, state)`, from its initial state."""
    denoiser, state = lift(denoiser)
    x, state = _langevin(denoiser, x, sigma, state, key, snr, step_norm)
    return x if state is NO_STATE else (x, state)


def _langevin(denoiser, x, sigma, state, key, snr, step_norm):
    """`langevin_step` for a lifted denoiser: (x, state)."""
    x0, state = denoiser(x, sigma, state)
    score = (x0 - x) / jnp.square(sigma)
    z = _noise(key, x)
    axes = tuple(range(1, x.ndim))
    z_norm = jnp.sqrt(jnp.sum(jnp.square(z), axis=axes, keepdims=True))
    s_norm = jnp.sqrt(jnp.sum(jnp.square(score), axis=axes, keepdims=True))
    if step_norm == "batch":
        z_norm, s_norm = jnp.mean(z_norm, axis=0), jnp.mean(s_norm, axis=0)
    eps = 2.0 * jnp.square(snr * z_norm / jnp.maximum(s_norm, jnp.finfo(x.dtype).tiny))
    return (x + eps * score + jnp.sqrt(2.0 * eps) * z).astype(x.dtype), state


def pc(
    denoiser,
    x,
    sigmas,
    *,
    key,
    num_steps=None,
    trajectory=False,
    predictor="reverse_diffusion",
    n_corrector=1,
    snr=0.16,
    step_norm="batch",
    noise_sampler="normal",
):
    """Predictor-corrector sampling (Song et al. 2021, Sec. 4.2 and App. G, Alg. 2 for VE),
    1 + n_corrector NFE per step (default 2).

    As in score_sde's `pc_sampler`, each step first runs `n_corrector` Langevin steps at the
    current level (`langevin_step`, target snr 0.16 as in score_sde's VE configs), then one
    predictor step to the next level (`reverse_diffusion`, score_sde's VE default, or
    `euler_maruyama`; see `_sde_predictor`); the step to sigma' = 0 returns D. `step_norm`:
    see `langevin_step`. `noise_sampler`: the predictor's noise, "normal" (default) or
    "brownian" (`jaxdiff.samplers.noise`); the Langevin corrections draw normal noise."""
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor={predictor!r} is unknown; allowed: {', '.join(PREDICTORS)}")
    if step_norm not in STEP_NORMS:
        raise ValueError(f"step_norm={step_norm!r} is unknown; allowed: {', '.join(STEP_NORMS)}")
    denoiser, state = lift(denoiser)
    draw = noise_fn(noise_sampler, key, sigmas, num_steps)

    def step(i, x, carry, state):
        s, s_next, k = sigmas[i], sigmas[i + 1], step_key(key, i)

        def correct(j, loop):
            x, state = loop
            return _langevin(denoiser, x, s, state, jax.random.fold_in(k, j + 1), snr, step_norm)

        x, state = jax.lax.fori_loop(0, n_corrector, correct, (x, state))
        x0, state = denoiser(x, s, state)
        return _sde_predictor(predictor, x, x0, s, s_next, draw(i, s, s_next, x)), carry, state

    return run(step, x, sigmas, (), state, num_steps=num_steps, trajectory=trajectory)


SAMPLERS = {
    "ddpm": ddpm,
    "euler_ancestral": euler_ancestral,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "em": em,
    "pc": pc,
}
