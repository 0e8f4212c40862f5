"""Sampling schedules: decreasing grids of VE noise levels (ve_sigma), usually ending at 0.

Every schedule is `schedule(process, n, **options) -> sigmas` of shape (n + 1,): n noise levels
from the process's largest to its smallest, then 0 (`final_zero=False` replaces the step to 0
by one more level). Schedules run eagerly; the grid is data to the compiled sampler.

- `trailing`, `leading`, `linspace`: diffusers' `timestep_spacing` for discrete processes, in
  the DDIM/Euler form (DPMSolverMultistep uses n + 1 points for linspace/leading; pass its
  timesteps to `timesteps()` for exact equality).
- `time_uniform`, `time_quadratic`, `logsnr` (uniform lambda; = k-diffusion's `exponential`):
  DPM-Solver (Lu et al. 2022, Sec. 3.3 and App. D.1).
- `karras` (Karras et al. 2022, Eq. 5, rho = 7), `shift` (SD3, Esser et al. 2024: sigma' =
  s sigma / (1 + (s-1) sigma) in flow time, which is ve_sigma' = s * ve_sigma), `ays` (Align Your
  Steps, Sabour et al. 2024: published 10-step tables, log-linearly interpolated to n).
- `timesteps(process, ts)` and `array(sigmas)` for custom grids; `pad` to a fixed capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core.process import DiscreteVP, short_repr


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def _check_n(n):
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"steps={n!r} must be an integer >= 1")


def _finish(levels, final_zero):
    """levels: decreasing noise levels; appends the final 0 when asked."""
    levels = _f64(levels)
    return np.append(levels, 0.0) if final_zero else levels


def _t_grid(process, n, final_zero, warp=lambda u: u):
    """n (or n+1) times from t_max to t_min, spaced uniformly in warp(t)."""
    m = n if final_zero else n + 1
    lo, hi = warp(process.t_min), warp(process.t_max)
    return np.linspace(hi, lo, m)


def _sigma_of_t(process, t):
    return _f64(process.ve_sigma(np.asarray(t)))


def time_uniform(process, n, *, final_zero=True):
    """Uniform in the process's time t."""
    _check_n(n)
    return _finish(_sigma_of_t(process, _t_grid(process, n, final_zero)), final_zero)


def time_quadratic(process, n, *, final_zero=True):
    """Uniform in sqrt(t): denser near t_min (DPM-Solver's `time_quadratic`)."""
    _check_n(n)
    t = _t_grid(process, n, final_zero, np.sqrt) ** 2
    return _finish(_sigma_of_t(process, t), final_zero)


def logsnr(process, n, *, sigma_min=None, sigma_max=None, final_zero=True):
    """Uniform in lambda = -log(ve_sigma) (DPM-Solver's `logSNR`, k-diffusion's exponential)."""
    _check_n(n)
    lo, hi = _range(process, sigma_min, sigma_max)
    m = n if final_zero else n + 1
    return _finish(np.exp(np.linspace(np.log(hi), np.log(lo), m)), final_zero)


exponential = logsnr


def karras(process, n, *, rho=7.0, sigma_min=None, sigma_max=None, final_zero=True):
    """Karras et al. 2022, Eq. 5: uniform in ve_sigma^(1/rho)."""
    _check_n(n)
    if not 0 < rho < np.inf:  # rho = 0 divides by zero: a NaN grid
        raise ValueError(f"rho={short_repr(rho)} must be a finite number > 0 (Karras: 7)")
    lo, hi = _range(process, sigma_min, sigma_max)
    m = n if final_zero else n + 1
    u = np.linspace(0.0, 1.0, m)
    return _finish((hi ** (1 / rho) + u * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho, final_zero)


def shift(process, n, *, shift=3.0, base="time_uniform", final_zero=True):
    """SD3's resolution shift applied to a base schedule: ve_sigma' = shift * ve_sigma, kept
    inside the process's range."""
    _check_n(n)
    if not 0 < shift < np.inf:
        raise ValueError(f"shift={short_repr(shift)} must be a finite number > 0")
    grid = get(base)(process, n, final_zero=final_zero)
    lo, hi = _range(process, None, None)
    out = np.where(grid > 0, np.clip(grid * shift, lo, hi), 0.0)
    if np.any(np.diff(out[out > 0]) >= 0):  # clipping repeated a level: zero-length steps
        raise ValueError(
            f"shift={shift:g} moves levels of the {n}-step grid outside {type(process).__name__}'s "
            f"range [{lo:g}, {hi:g}] (ve_sigma * shift), repeating them; use a smaller shift, "
            "fewer steps, or a RectifiedFlow process"
        )
    return out


# Align Your Steps 10-step noise levels (ve_sigma), from the AYS project page, per model family.
AYS_TABLES = {
    "sd15": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
    "svd": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}


def ays(process, n, *, model="sd15", final_zero=True):
    """Align Your Steps table for `model`, log-linearly interpolated (AYS how-to). A table holds
    11 levels: `ays(p, 10, final_zero=False)` is the published 10-step schedule."""
    _check_n(n)
    if model not in AYS_TABLES:
        raise ValueError(f"ays model={model!r} is unknown; allowed: {', '.join(AYS_TABLES)}")
    table = np.log(_f64(AYS_TABLES[model])[::-1])  # increasing
    m = n if final_zero else n + 1
    levels = np.exp(np.interp(np.linspace(0, 1, m), np.linspace(0, 1, len(table)), table))[::-1]
    return _finish(levels, final_zero)


def timesteps(process, ts, *, final_zero=True):
    """Grid at explicit (decreasing) process times, e.g. a discrete model's training timesteps."""
    ts = _f64(ts)
    if ts.ndim != 1 or len(ts) < 1:
        raise ValueError(f"timesteps must be a strictly decreasing 1-D list, got shape {ts.shape}")
    bad = ~np.isfinite(ts)
    bad[1:] |= ~(np.diff(ts) < 0)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(
            f"timesteps must be a strictly decreasing 1-D list, got {short_repr(ts.tolist())} "
            f"(first bad: timesteps[{k}]={ts[k]:g})"
        )
    if isinstance(process, DiscreteVP) and not 0 <= ts[-1] <= ts[0] <= process.t_max:
        # outside the training timesteps the interpolation clamps: repeated noise levels
        raise ValueError(
            f"timesteps run from {ts[0]:g} to {ts[-1]:g}; allowed: within the DiscreteVP's "
            f"training timesteps 0..{process.t_max:g}"
        )
    return _finish(_sigma_of_t(process, ts), final_zero)


def _discrete(process, name, n=None):
    """The process's number of training timesteps T; a spacing of integer timesteps holds at
    most T distinct ones, so n > T steps (when `n` is given) would repeat levels."""
    if not isinstance(process, DiscreteVP):
        raise ValueError(
            f"schedule {name!r} is a timestep spacing for DiscreteVP processes, not "
            f"{type(process).__name__}; use karras, logsnr, time_uniform or time_quadratic"
        )
    T = process.num_train_timesteps
    if n is not None and n > T:
        raise ValueError(
            f"steps={n} exceeds the {T} training timesteps of the DiscreteVP; schedule {name!r} "
            f"would repeat timesteps (allowed: steps <= {T}, or linspace with round=False)"
        )
    return T


def trailing(process, n, *, final_zero=True):
    """diffusers' `timestep_spacing="trailing"`: round(arange(T, 0, -T/n)) - 1."""
    _check_n(n)
    T = _discrete(process, "trailing", n)
    return timesteps(process, np.round(np.arange(T, 0, -T / n)) - 1, final_zero=final_zero)


def leading(process, n, *, steps_offset=0, final_zero=True):
    """diffusers' `timestep_spacing="leading"` (DDIM/Euler form): arange(n) * (T // n)."""
    _check_n(n)
    T = _discrete(process, "leading", n)
    ts = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    return timesteps(process, ts, final_zero=final_zero)


def linspace(process, n, *, round=True, final_zero=True):
    """diffusers' `timestep_spacing="linspace"`: linspace(0, T-1, n), rounded as DDIM does
    (`round=False` keeps Euler's fractional timesteps)."""
    _check_n(n)
    T = _discrete(process, "linspace", n if round else None)
    ts = np.linspace(0, T - 1, n)[::-1]
    return timesteps(process, ts.round() if round else ts, final_zero=final_zero)


def array(sigmas):
    """A custom grid, validated: 1-D, finite, >= 0, strictly decreasing."""
    sigmas = _f64(sigmas)
    check_sigmas(sigmas)
    return sigmas


def pad(sigmas, capacity):
    """Pads a grid of n + 1 levels to capacity + 1 by repeating its last level."""
    sigmas = _f64(sigmas)
    n = len(sigmas) - 1
    if n > capacity:
        raise ValueError(f"steps={n} exceeds capacity={capacity}; pass a larger capacity")
    return np.concatenate([sigmas, np.full(capacity - n, sigmas[-1])])


def _range(process, sigma_min, sigma_max):
    lo = float(process.sigma_min) if sigma_min is None else float(sigma_min)
    hi = float(process.sigma_max) if sigma_max is None else float(sigma_max)
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={lo:g}, sigma_max={hi:g}")
    return lo, hi


SCHEDULES = {
    "trailing": trailing,
    "leading": leading,
    "linspace": linspace,
    "time_uniform": time_uniform,
    "time_quadratic": time_quadratic,
    "logsnr": logsnr,
    "exponential": exponential,
    "karras": karras,
    "shift": shift,
    "ays": ays,
}


def get(name):
    """The schedule function called `name`."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is unknown; allowed: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]

def check_sigmas(sigmas):
    """Rejects a grid that is not 1-D or, when its values are known, not strictly decreasing.

    Trailing padding (repeats of the last value, e.g. zeros) is allowed."""
    if jnp.ndim(sigmas) != 1 or sigmas.shape[0] < 2:
        raise ValueError(
            f"sigmas must be a 1-D grid of at least 2 noise levels, got shape {jnp.shape(sigmas)}"
        )
    if isinstance(sigmas, jax.core.Tracer):
        return
    s = np.asarray(sigmas, np.float64)
    bad = ~(np.isfinite(s) & (s >= 0))
    if bad.any():  # name the first bad level only: a grid may hold a million of them
        k = int(np.argmax(bad))
        raise ValueError(f"sigmas must be finite and >= 0, got sigmas[{k}]={s[k]:g}")
    d = np.diff(s)
    end = len(s) - 1
    while end > 0 and s[end] == s[end - 1]:  # allow padding with repeats of the last value
        end -= 1
    if np.any(d[:end] >= 0):
        k = int(np.argmax(d[:end] >= 0))
        raise ValueError(
            f"sigmas must be strictly decreasing; "
            f"sigmas[{k}]={s[k]:g} <= sigmas[{k + 1}]={s[k + 1]:g}"
        )
