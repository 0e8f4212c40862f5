"""Stochastic-interpolant SDE sampling with a diffusion coefficient chosen at sampling time
(Albergo, Boffi & Vanden-Eijnden 2023, Sec. 2.3 and Thm. 2.21; SiT, Ma et al. 2024, Sec. 3.3).

For x_t = alpha(t) x0 + sigma(t) eps with velocity v(x, t) = E[alpha' x0 + sigma' eps | x_t = x]
and score s(x, t) = grad log p_t(x) = -E[eps | x_t = x] / sigma, every w(t) >= 0 gives an SDE,
integrated backwards from t = 1 to 0 (dt < 0, W-bar a reverse-time Brownian motion),

    dx = [v(x, t) - w(t) s(x, t) / 2] dt + sqrt(w(t)) dW-bar,

whose marginals are the p_t of the interpolant. Check, with tau = 1 - t running forward: the SDE
dx = b dtau + sqrt(w) dW has Fokker-Planck d_tau q = -div(b q) + (w/2) lap q; for
b = -v + (w/2) grad log p and q = p_{1 - tau}, -div(b p) + (w/2) lap p = div(v p) = -d_t p (the
transport equation of the interpolant), so q stays p. w = 0 is the probability-flow ODE
dx/dt = v; w = g^2 (`Interpolant.sbdm_diffusion`) is the reverse SDE of the matching
score-based diffusion model (Song et al. 2021, Eq. 6).

`interpolant_sde` takes Euler-Maruyama steps of it in the process's own time t between the
grid's levels: from t to t' < t, with h = t - t' and z ~ N(0, I),

    x' = x - h [v - (w/2) s] + sqrt(w h) z,     v = alpha' D + sigma' eps, s = -eps/sigma,

where D = D(x_ve, ve_sigma) is the denoiser and eps = (x_ve - D)/ve_sigma, so any prediction
type works (`jaxdiff.core.denoiser`). Weak order 1.

Diffusion coefficients w(t) = w_scale * base(t) (`DIFFUSIONS`; t with data at 0):
  none      0: the probability-flow ODE, Euler in t (for the Linear path / rectified flow this is
            exactly `euler` = DDIM; no noise is drawn)
  sigma     sigma(t) (the form SiT's sample.py uses by default)
  sigma2    sigma(t)^2
  t         t (SiT's "linear" form, in its time 1 - t)
  constant  1
  sbdm      g^2(t) = 2 (sigma sigma' - (alpha'/alpha) sigma^2) (SiT's "SBDM")
  sin2      sin^2(pi t) (SiT's "increasing-decreasing")
  or a function t -> base(t).
SiT's code draws sqrt(2 D) dW with D = norm * form, i.e. w = 2 * norm * form: its
`diffusion_form="sigma", diffusion_norm=1` (sample.py's default) is `diffusion="sigma",
w_scale=2` here, its "SBDM" with norm n is `diffusion="sbdm", w_scale=n`.
w must stay bounded where the grid starts: sbdm grows like 2/(1 - t) for Linear (and GVP) near
t = 1, so its first explicit steps from t_max ~ 1 are unstable unless they are tiny (SiT starts
SBDM sampling at t = 1 - eps); the other choices are bounded on [0, 1].

Last step (`LAST_STEPS`, SiT's `last_step`): the final grid step is
  mean     the SDE's drift without noise, x' = x - h [v - (w/2) s] (SiT's default "Mean")
  euler    the ODE's, x' = x - h v ("Euler")
  tweedie  the posterior mean, x'_ve = D ("Tweedie"; meant for a grid ending at 0, where the
           state is then D as in `em` and `ddpm`)
  none     an ordinary Euler-Maruyama step, noise included.
SiT integrates the SDE on a uniform t grid from 1 to 0.04 and takes its last step from 0.04 to
0: that grid is `sit_schedule`; `schedule="time_uniform"` gives uniform steps to t_min and a final
short step to 0. Other grids work as for any sampler.

Randomness: step i draws z from `base.step_key(key, i)`, as `jaxdiff.samplers.stochastic` does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core.process import check_values, short_repr
from jaxdiff.samplers.base import is_last, lift, run, step_key

DIFFUSIONS = ("none", "sigma", "sigma2", "t", "constant", "sbdm", "sin2")
LAST_STEPS = ("mean", "euler", "tweedie", "none")


class _SigmaTime:
    """The VE view as a process: t = ve_sigma, alpha = 1, sigma = t (`time=None`)."""

    def alpha(self, t):
        return jnp.ones_like(t)

    def sigma(self, t):
        return t

    def t_of(self, ve_sigma):
        return ve_sigma


def _coefficients(process, t):
    """(alpha, sigma, alpha', sigma') at t, derivatives by forward-mode autodiff."""
    (a, s), (da, ds) = jax.jvp(lambda t: (process.alpha(t), process.sigma(t)), (t,),
                               (jnp.ones_like(t),))
    return a, s, da, ds


def diffusion_coefficient(process, t, diffusion="sigma", w_scale=1.0):
    """w(t) = w_scale * base(t) for the named `diffusion` (see the module docstring) on
    `process` (a `jaxdiff.core.process` process, or None for the VE view t = ve_sigma)."""
    _check(diffusion, w_scale, "none")
    process = _SigmaTime() if process is None else process
    t = jnp.asarray(t, jnp.result_type(float))
    return _w(process, t, *_coefficients(process, t), diffusion, w_scale)


def _w(process, t, a, s, da, ds, diffusion, w_scale):
    if callable(diffusion):
        base = jnp.asarray(diffusion(t))
    elif diffusion == "none":
        base = jnp.zeros_like(t)
    elif diffusion == "sigma":
        base = s
    elif diffusion == "sigma2":
        base = jnp.square(s)
    elif diffusion == "t":
        base = t
    elif diffusion == "constant":
        base = jnp.ones_like(t)
    elif diffusion == "sbdm":
        base = 2.0 * (s * ds - da / a * jnp.square(s))
    else:  # sin2
        base = jnp.square(jnp.sin(math.pi * t))
    return w_scale * base


def _check(diffusion, w_scale, last_step):
    if not callable(diffusion) and diffusion not in DIFFUSIONS:
        raise ValueError(f"diffusion={short_repr(diffusion)} is unknown; allowed: "
                         f"{', '.join(DIFFUSIONS)} or a function t -> w(t)")
    if last_step not in LAST_STEPS:
        raise ValueError(f"last_step={short_repr(last_step)} is unknown; allowed: "
                         f"{', '.join(LAST_STEPS)}")
    check_values("interpolant_sde", "w_scale >= 0", lambda w: w >= 0, w_scale=w_scale)


def interpolant_sde(denoiser, x, sigmas, *, key, num_steps=None, trajectory=False, time=None,
                    diffusion="sigma", w_scale=1.0, last_step="mean"):
    """Euler-Maruyama on the interpolant SDE dx = [v - w s/2] dt + sqrt(w) dW-bar (see the
    module docstring), 1 NFE per step.

    `time`: the process whose time t the SDE runs in (`jaxdiff.sample` passes the process for
    time="t", its default for interpolants, rectified flow and continuous VP), x = alpha(t) x_ve;
    None steps in the VE level itself (alpha = 1, t = sigma), where `diffusion="sbdm"` is
    exactly `em`'s reverse VE SDE. `diffusion`, `w_scale`: w(t) = w_scale * base(t);
    `diffusion="none"` (or w_scale = 0) is the probability-flow ODE. `last_step`: the final
    grid step (`LAST_STEPS`). `key`: step i draws its noise from `step_key(key, i)`."""
    _check(diffusion, w_scale, last_step)
    if isinstance(time, str):
        raise ValueError(f"interpolant_sde's time={time!r} must be None or a process; "
                         "jaxdiff.sample takes time='t' or 'sigma'")
    process = _SigmaTime() if time is None else time
    zero = not callable(diffusion) and (
        diffusion == "none" or (isinstance(w_scale, (int, float, np.number)) and w_scale == 0))
    denoiser, state = lift(denoiser)

    def step(i, x_ve, carry, state):
        s_ve, s_next = sigmas[i], sigmas[i + 1]
        x0, state = denoiser(x_ve, s_ve, state)
        t, t_next = process.t_of(s_ve), process.t_of(s_next)
        a, s, da, ds = _coefficients(process, t)
        h = (t - t_next).astype(x_ve.dtype)
        eps = (x_ve - x0) / s_ve
        x = a * x_ve
        v = da * x0 + ds * eps
        last = is_last(i, num_steps, sigmas)
        if zero:
            x_new = x - h * v
        else:
            w = _w(process, t, a, s, da, ds, diffusion, w_scale)
            drift = v + 0.5 * w * eps / s  # v - (w/2) score, score = -eps/sigma
            noise = jnp.sqrt(w * h) * jax.random.normal(step_key(key, i), x.shape, x.dtype)
            if last_step in ("mean", "euler"):
                noise = jnp.where(last, 0.0, noise)
            if last_step == "euler":
                drift = jnp.where(last, v, drift)
            x_new = x - h * drift + noise
        x_ve_new = x_new / process.alpha(t_next)
        if last_step == "tweedie":
            x_ve_new = jnp.where(last, x0, x_ve_new)
        return x_ve_new.astype(x_ve.dtype), carry, state

    return run(step, x, sigmas, (), state, num_steps=num_steps, trajectory=trajectory)


def sit_schedule(process, n, *, last_step_size=0.04):
    """SiT's SDE grid as VE levels: n - 1 uniform steps in t from t_max to `last_step_size`, then
    the last step to 0 (n >= 2; for n = 1 the one step from t_max to 0). Use it as
    `jaxdiff.sample(..., schedule=functools.partial(sit_schedule, last_step_size=...))`."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"steps={short_repr(n)} must be an integer >= 1")
    hi = float(process.t_max)
    check_values("sit_schedule", f"0 < last_step_size < t_max = {hi:g}",
                 lambda s: 0 < s < hi, last_step_size=last_step_size)
    t = np.append(np.linspace(hi, last_step_size, n), 0.0) if n > 1 else np.array([hi, 0.0])
    return np.asarray(process.ve_sigma(jnp.asarray(t[:-1])), np.float64).tolist() + [0.0]


SAMPLERS = {"interpolant_sde": interpolant_sde}
