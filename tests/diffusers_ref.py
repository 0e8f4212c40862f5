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


# --- any prediction type, any process: one toy network for the scheduler-config parity tests --


def toy_denoiser(x, s):
    """Toy x0-prediction in the VE view: the Gaussian posterior mean plus a small curved term."""
    import jax.numpy as jnp

    return MU + STD**2 / (STD**2 + s**2) * (x - MU) + 0.05 * s / (1 + s) * jnp.sin(
        x / jnp.sqrt(1 + s**2))


def toy_model(process, prediction):
    """The toy network `model_fn(x, cond)` for `process` and `prediction` (a jaxdiff model_fn;
    `call_np` runs it on numpy inputs for diffusers' loop)."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.core.denoiser import model_from_denoiser

    if prediction == "flow":  # exact for x = (1 - t) x0 + t eps also at t = 1 (alpha = 0)
        scale = process.time_scale

        def model_fn(x, c):
            t = c / scale
            a = 1 - t
            x0 = MU + a * STD**2 / (a**2 * STD**2 + t**2) * (x - a * MU)
            x0 = x0 + 0.05 * t * jnp.sin(x)
            return (x - a * x0) / t - x0

        return jax.jit(model_fn)
    return jax.jit(model_from_denoiser(toy_denoiser, process, prediction))


def call_np(model_fn, x, t):
    """model_fn on numpy float64 inputs (under x64), as a numpy array."""
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        return np.asarray(model_fn(jnp.asarray(x, jnp.float64), jnp.asarray(float(t), jnp.float64)))


def run_diffusers(scheduler, model_fn, noise, steps, noises=None, **set_timesteps_kw):
    """diffusers' loop with a jaxdiff-style `model_fn(x, t)`; returns the final sample (numpy).

    `noises`: the standard normal draws to use, in order, wherever the scheduler's module calls
    `randn_tensor` (stochastic schedulers compare with injected noise)."""
    import sys

    torch = pytest.importorskip("torch")
    module = sys.modules[type(scheduler).__module__]
    draws = iter(noises if noises is not None else ())

    def fake_randn(shape, generator=None, device=None, dtype=None, **kw):
        return torch.from_numpy(np.asarray(next(draws))).to(dtype or torch.float64)

    real = getattr(module, "randn_tensor", None)
    if real is not None:
        module.randn_tensor = fake_randn
    try:
        scheduler.set_timesteps(steps, **set_timesteps_kw)
        # diffusers keeps sigmas in float32 and takes its log-SNR steps h from them: where two
        # levels are close (beta sigmas) that alone moves the sample by ~1e-5; float64 sigmas
        # (the same float32-rounded values) leave only the algorithm to compare
        if isinstance(getattr(scheduler, "sigmas", None), torch.Tensor):
            scheduler.sigmas = scheduler.sigmas.double()
        x = torch.from_numpy(noise).double() * getattr(scheduler, "init_noise_sigma", 1.0)
        for t in scheduler.timesteps:
            scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
            x_in = scale(x, t)
            out = torch.from_numpy(call_np(model_fn, x_in.numpy(), float(t)))
            x = scheduler.step(out, t, x).prev_sample
    finally:
        if real is not None:
            module.randn_tensor = real
    return x.double().numpy()
