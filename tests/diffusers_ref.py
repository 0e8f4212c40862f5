"""A shared toy network and diffusers' scheduler loop, for parity tests (float64 both sides).

The toy network is the exact eps-prediction for Gaussian data plus a small nonlinear term, so
that samplers see a curved, time-dependent field. Both sides compute it from the same
alphas_cumprod, at the same (possibly fractional) timestep.
"""

import numpy as np
import pytest

MU, STD = 0.3, 0.6


def _abar(alphas_cumprod, t):
    """alphas_cumprod at a fractional timestep, by linear interpolation of ve_sigma."""
    sig = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    return 1.0 / (1.0 + np.interp(t, np.arange(len(sig)), sig) ** 2)


def eps_np(x, t, alphas_cumprod):
    """Toy eps-network on numpy arrays (float64)."""
    abar = float(_abar(np.asarray(alphas_cumprod, np.float64), float(t)))
    a, s = np.sqrt(abar), np.sqrt(1 - abar)
    gauss = s * (x - a * MU) / (abar * STD**2 + 1 - abar)
    return gauss + 0.05 * np.sin(x + t / 300.0)


def eps_jax(alphas_cumprod):
    """The same toy network as a jaxdiff `model_fn(x, t)`."""
    import jax.numpy as jnp

    sig = jnp.sqrt((1 - alphas_cumprod) / alphas_cumprod)

    def model_fn(x, t):
        s_ve = jnp.interp(t, jnp.arange(sig.shape[0], dtype=sig.dtype), sig)
        abar = 1.0 / (1.0 + s_ve**2)
        a, s = jnp.sqrt(abar), jnp.sqrt(1 - abar)
        gauss = s * (x - a * MU) / (abar * STD**2 + 1 - abar)
        return gauss + 0.05 * jnp.sin(x + t / 300.0)

    return model_fn


def diffusers_loop(scheduler, noise, steps, **set_timesteps_kw):
    """Runs diffusers' standard scheduler loop with the toy network; returns (sample, timesteps).

    noise: numpy float64 standard normal; the loop scales it by init_noise_sigma itself."""
    torch = pytest.importorskip("torch")
    scheduler.set_timesteps(steps, **set_timesteps_kw)
    abar = scheduler.alphas_cumprod.double().numpy()
    x = torch.from_numpy(noise).double() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = torch.from_numpy(eps_np(x_in.numpy(), float(t), abar))
        x = scheduler.step(out, t, x).prev_sample
    return x.numpy(), scheduler.timesteps.double().numpy()
