"""Two-stage stochastic samplers (k-diffusion's): DPM-2 ancestral, DPM-Solver++(2S) ancestral
and DPM-Solver++ SDE.

Each step calls the denoiser at sigma and once more at an intermediate level, then lands at
sigma' with fresh noise, so 2 NFE per step; a step to sigma' = 0 (or whose deterministic target
sigma_down is 0) is one Euler step, x' = D, with 1 NFE (a `lax.cond`: the second call is then
really skipped, and a stateful denoiser's state passes through both branches). Everything is
in the VE view x = x0 + sigma * eps. Noise: see `jaxdiff.samplers.noise` (`noise_sampler`):
the draw that lands at sigma' is draw 0 of the step, `dpmpp_sde`'s intermediate one draw 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.core.denoiser import ddim_step
from jaxdiff.samplers.base import lift, run
from jaxdiff.samplers.noise import noise_fn
from jaxdiff.samplers.stochastic import ancestral_sigmas


def _positive(s, fallback):
    return jnp.where(s > 0, s, fallback)


def _two_stage(denoiser, x, sigmas, key, eta, s_noise, noise_sampler, update, num_steps,
               trajectory):
    """An ancestral step: D at sigma, `update(denoiser, x, x0, s, down, state) -> (x, state)`
    from sigma to sigma_down > 0 (else x' = D), then s_noise sigma_up noise when sigma' > 0;
    `denoiser` is the lifted one (`base.lift`)."""
    denoiser, state = lift(denoiser)
    draw = noise_fn(noise_sampler, key, sigmas, num_steps)

    def step(i, x, carry, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        down, up = ancestral_sigmas(s, s_next, eta)
        x0, state = denoiser(x, s, state)
        x, state = jax.lax.cond(
            down > 0,
            lambda: update(denoiser, x, x0, s, _positive(down, 0.5 * s), state),
            lambda: (x0.astype(x.dtype), state),
        )
        z = draw(i, s, s_next, x)
        x = x + jnp.where(s_next > 0, s_noise * up, 0.0).astype(x.dtype) * z
        return x, carry, state

    return run(step, x, sigmas, (), state, num_steps=num_steps, trajectory=trajectory)


def dpm_2_ancestral(denoiser, x, sigmas, *, key, num_steps=None, trajectory=False, eta=1.0,
                    s_noise=1.0, noise_sampler="normal"):
    """DPM-2 ancestral (k-diffusion's `sample_dpm_2_ancestral`; diffusers'
    `KDPM2AncestralDiscreteScheduler`): the ancestral split of `stochastic.euler_ancestral`
    (sigma_down, sigma_up, `stochastic.ancestral_sigmas`) with a DPM-Solver-2 step (Lu et al.
    2022a, Alg. 1, r1 = 1/2; Karras et al. 2022's Alg. 2 form) from sigma to sigma_down:
    the midpoint sigma_mid = sqrt(sigma sigma_down), u = x + (sigma_mid - sigma) d(x, sigma),
    x' = x + (sigma_down - sigma) d(u, sigma_mid), then s_noise sigma_up z. 2 NFE per step,
    1 on a step to sigma' = 0 (x' = D). eta = 0 is `dpm_2`.

    k-diffusion adds no noise when sigma_down = 0 < sigma' (possible only for eta > 1); here the
    noise lands at sigma' whatever eta. `noise_sampler`: "normal" (default) or "brownian"."""

    def update(denoiser, x, x0, s, down, state):
        mid = jnp.sqrt(s * down)
        u = x + ((mid - s) / s).astype(x.dtype) * (x - x0)
        x0_mid, state = denoiser(u, mid, state)
        return (x + ((down - s) / mid).astype(x.dtype) * (u - x0_mid)).astype(x.dtype), state

    return _two_stage(denoiser, x, sigmas, key, eta, s_noise, noise_sampler, update, num_steps,
                      trajectory)


def dpmpp_2s_ancestral(denoiser, x, sigmas, *, key, num_steps=None, trajectory=False, eta=1.0,
                       s_noise=1.0, r=0.5, noise_sampler="normal"):
    """DPM-Solver++(2S) ancestral (k-diffusion's `sample_dpmpp_2s_ancestral`; diffusers has no
    counterpart): the ancestral
    split of `stochastic.euler_ancestral` with a DPM-Solver++(2S) step (Lu et al. 2022b, Alg. 1,
    data prediction, `single.dpmpp_2s`) from sigma to sigma_down:
    u = DDIM step to sigma_r = sigma (sigma_down/sigma)^r,
    D_r = (1 - 1/(2r)) D + D(u, sigma_r)/(2r), x' = DDIM step with D_r to sigma_down, then
    s_noise sigma_up z. 2 NFE per step, 1 on a step to sigma' = 0. eta = 0 is `dpmpp_2s`;
    k-diffusion's is r = 1/2.
    `noise_sampler`: "normal" (default) or "brownian"."""

    def update(denoiser, x, x0, s, down, state):
        s_r = s * (down / s) ** r
        x0_r, state = denoiser(ddim_step(x, x0, s, s_r).astype(x.dtype), s_r, state)
        d = (1.0 - 0.5 / r) * x0 + (0.5 / r) * x0_r
        return ddim_step(x, d, s, down).astype(x.dtype), state

    return _two_stage(denoiser, x, sigmas, key, eta, s_noise, noise_sampler, update, num_steps,
                      trajectory)


def dpmpp_sde(denoiser, x, sigmas, *, key, num_steps=None, trajectory=False, eta=1.0,
              s_noise=1.0, r=0.5, noise_sampler="normal"):
    """DPM-Solver++ SDE (k-diffusion's `sample_dpmpp_sde`, which diffusers' `DPMSolverSDEScheduler`
    ports): DPM-Solver++(2S) (Lu et al. 2022b,
    Alg. 1) with an ancestral split at both stages, 2 NFE per step (1 on a step to sigma' = 0,
    x' = D). With sigma_r = sigma (sigma'/sigma)^r and (down, up) = `ancestral_sigmas`:

      stage: u = DDIM(x, D, sigma -> down(sigma, sigma_r)) + s_noise up(sigma, sigma_r) z_1,
      step:  D_r = (1 - 1/(2r)) D + D(u, sigma_r)/(2r),
             x' = DDIM(x, D_r, sigma -> down(sigma, sigma')) + s_noise up(sigma, sigma') z_0,

    z_1 the noise over [sigma_r, sigma] (draw 1) and z_0 over [sigma', sigma] (draw 0). With
    Brownian noise (`noise_sampler="brownian"`, k-diffusion's default: it was designed for it)
    the two draws are correlated as the path's increments are and the samples converge as the
    steps grow; "normal" (the default here, as for every sampler) draws them independently.
    eta = 0 is `dpmpp_2s`."""
    denoiser, state = lift(denoiser)
    draw = noise_fn(noise_sampler, key, sigmas, num_steps)

    def update(i, x, x0, s, t, state):
        s_r = s * (t / s) ** r
        down, up = ancestral_sigmas(s, s_r, eta)
        u = ddim_step(x, x0, s, down) + (s_noise * up).astype(x.dtype) * draw(i, s, s_r, x, 1)
        x0_r, state = denoiser(u.astype(x.dtype), s_r, state)
        d = (1.0 - 0.5 / r) * x0 + (0.5 / r) * x0_r
        down, up = ancestral_sigmas(s, t, eta)
        x = ddim_step(x, d, s, down) + (s_noise * up).astype(x.dtype) * draw(i, s, t, x)
        return x.astype(x0.dtype), state

    def step(i, x, carry, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0, state = denoiser(x, s, state)
        x, state = jax.lax.cond(
            s_next > 0,
            lambda: update(i, x, x0, s, _positive(s_next, 0.5 * s), state),
            lambda: (x0.astype(x.dtype), state),
        )
        return x, carry, state

    return run(step, x, sigmas, (), state, num_steps=num_steps, trajectory=trajectory)


SAMPLERS = {
    "dpm_2_ancestral": dpm_2_ancestral,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_sde": dpmpp_sde,
}
