"""Noise processes x_t = alpha(t) * x0 + sigma(t) * eps.

Every process exposes the same small interface, in its own time variable `t`:

- `alpha(t)`, `sigma(t)`: the signal and noise scales;
- `ve_sigma(t)` = sigma/alpha, the variance-exploding noise level (written sigma-tilde in the
  docs), and its inverse `t_of(ve_sigma)`;
- `cond(t)`: the value the network is conditioned on (training timestep, continuous t, c_noise),
  and its inverse `t_of_cond(c)`;
- `t_min`, `t_max`: the range of t a sampler may visit, and `prior_scale(ve_sigma)`: the factor
  that turns standard normal noise into the VE-view state x/alpha at the first noise level.

References: DDPM (Ho et al. 2020) and diffusers' beta schedules for `DiscreteVP`; score_sde
(Song et al. 2021, App. B) for continuous VP/VE; iDDPM (Nichol & Dhariwal 2021) for the cosine
schedule in DPM-Solver's continuous form (Lu et al. 2022, App. D); EDM (Karras et al. 2022,
Table 1); rectified flow (Liu et al. 2022) / SD3 (Esser et al. 2024).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def pytree_dataclass(data=()):
    """Frozen dataclass registered as a pytree: `data` fields are leaves, the rest are static."""

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        fields = [f.name for f in dataclasses.fields(cls)]
        return jax.tree_util.register_dataclass(
            cls, data_fields=list(data), meta_fields=[f for f in fields if f not in data]
        )

    return wrap


def _f(x):
    """Array in the working float dtype (float32, or float64 when x64 is enabled)."""
    return jnp.asarray(x, dtype=jnp.result_type(float))


def short_repr(value, limit=80):
    """repr(value) on one line, cut to `limit` characters: an error names a bad value without
    printing a whole array."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def concrete_float(value):
    """value as a float when it is a concrete Python or numpy number, else None.

    Processes and guidance objects are pytrees: built under jit, by a gradient or by jax's tree
    utilities, their fields hold tracers, jax arrays or placeholders, which are left unchecked."""
    if isinstance(value, (int, float, np.number)):
        return float(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "biuf":
        return float(value)
    return None


def check_values(where, rule, ok, *, finite=True, **values):
    """Raises a one-line ValueError naming `where(values)` and the allowed `rule` unless
    ok(*values) holds (and the values are finite when asked); skipped when any value is not a
    concrete number (see `concrete_float`). NaN fails every comparison, so it is refused too."""
    nums = [concrete_float(v) for v in values.values()]
    if any(n is None for n in nums):
        return
    if (not finite or all(map(math.isfinite, nums))) and ok(*nums):
        return
    got = ", ".join(f"{k}={short_repr(v)}" for k, v in values.items())
    raise ValueError(f"{where}({got}) is invalid; allowed: {rule}{' (finite)' if finite else ''}")


class Process:
    """Shared derived quantities; subclasses define alpha, sigma, ve_sigma, t_of, cond."""

    def lam(self, t):
        """Half log-SNR, lambda = log(alpha/sigma) = -log(ve_sigma)."""
        return -jnp.log(self.ve_sigma(t))

    @property
    def sigma_min(self):
        """Smallest VE noise level the process reaches (at t_min)."""
        return self.ve_sigma(_f(self.t_min))

    @property
    def sigma_max(self):
        """Largest VE noise level the process reaches (at t_max)."""
        return self.ve_sigma(_f(self.t_max))

    def prior_scale(self, ve_sigma):
        """x/alpha = prior_scale * noise at the start: variance-preserving families start at
        x = noise (diffusers' init_noise_sigma = sqrt(1 + ve_sigma^2))."""
        return jnp.sqrt(1.0 + jnp.square(ve_sigma))


def _check_betas(where, beta_start, beta_end):
    """Betas are per-step noise variances: beta >= 1 zeroes alphas_cumprod, beta_end < beta_start
    runs the schedule backwards, and beta_start = 0 puts a noise-free level (log 0) in the grid."""
    check_values(where, "0 < beta_start <= beta_end < 1", lambda a, b: 0 < a <= b < 1,
                 beta_start=beta_start, beta_end=beta_end)


def _check_alphas_cumprod(abar):
    """ve_sigma = sqrt((1 - abar) / abar) must rise from a level > 0 for the log interpolation
    and `t_of`: 0 < abar < 1, strictly decreasing. Only numpy values are checked (the field is a
    pytree leaf: see `concrete_float`)."""
    if not isinstance(abar, (np.ndarray, list, tuple)):
        return
    a = np.asarray(abar, np.float64)
    if a.ndim != 1 or a.shape[0] < 2:
        raise ValueError(
            f"DiscreteVP alphas_cumprod has shape {a.shape}; allowed: 1-D with >= 2 entries"
        )
    bad = ~(np.isfinite(a) & (a > 0) & (a < 1))
    bad[1:] |= ~(np.diff(a) < 0)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(
            f"DiscreteVP alphas_cumprod[{k}]={a[k]:g} is invalid; allowed: 0 < alphas_cumprod < 1, "
            "strictly decreasing (betas in (0, 1))"
        )


@pytree_dataclass(data=("alphas_cumprod",))
class DiscreteVP(Process):
    """DDPM-style process over integer training timesteps 0..T-1, from alphas_cumprod.

    Between training timesteps log(ve_sigma) is interpolated linearly (`interpolation="log"`, as
    DPM-Solver and diffusers' `_sigma_to_t` do) or ve_sigma itself (`"linear"`, as diffusers'
    Euler/Heun/LMS schedulers do for fractional timesteps). The network is called with the
    (possibly fractional) timestep.
    """

    alphas_cumprod: np.ndarray
    interpolation: str = "log"

    def __post_init__(self):
        if self.interpolation not in ("log", "linear"):
            raise ValueError(
                f"interpolation={self.interpolation!r} is not supported; use 'log' or 'linear'"
            )
        _check_alphas_cumprod(self.alphas_cumprod)

    @classmethod
    def from_betas(cls, betas, **kw):
        return cls(alphas_cumprod=np.cumprod(1.0 - np.asarray(betas, np.float64)), **kw)

    @classmethod
    def linear(cls, beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000, **kw):
        """diffusers' `beta_schedule="linear"` (DDPM)."""
        _check_betas("DiscreteVP.linear", beta_start, beta_end)
        return cls.from_betas(np.linspace(beta_start, beta_end, num_train_timesteps), **kw)

    @classmethod
    def scaled_linear(cls, beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000, **kw):
        """diffusers' `beta_schedule="scaled_linear"` (latent diffusion / Stable Diffusion)."""
        _check_betas("DiscreteVP.scaled_linear", beta_start, beta_end)
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
        return cls.from_betas(betas, **kw)

    @classmethod
    def cosine(cls, num_train_timesteps=1000, s=0.008, max_beta=0.999, **kw):
        """diffusers' `beta_schedule="squaredcos_cap_v2"` (iDDPM cosine, betas capped)."""
        check_values("DiscreteVP.cosine", "0 < max_beta < 1, s >= 0",
                     lambda b, s: 0 < b < 1 and s >= 0, max_beta=max_beta, s=s)
        T = num_train_timesteps
        abar = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
        i = np.arange(T, dtype=np.float64)
        betas = np.minimum(1.0 - abar((i + 1) / T) / abar(i / T), max_beta)
        return cls.from_betas(betas, **kw)

    @property
    def num_train_timesteps(self):
        return int(np.shape(self.alphas_cumprod)[0])

    @property
    def t_min(self):
        return 0.0

    @property
    def t_max(self):
        return float(self.num_train_timesteps - 1)

    @property
    def train_sigmas(self):
        """ve_sigma at the integer training timesteps, increasing."""
        abar = _f(self.alphas_cumprod)
        return jnp.sqrt((1.0 - abar) / abar)

    def ve_sigma(self, t):
        grid = jnp.arange(self.num_train_timesteps, dtype=jnp.result_type(float))
        if self.interpolation == "log":
            return jnp.exp(jnp.interp(_f(t), grid, jnp.log(self.train_sigmas)))
        return jnp.interp(_f(t), grid, self.train_sigmas)

    def t_of(self, ve_sigma):
        grid = jnp.arange(self.num_train_timesteps, dtype=jnp.result_type(float))
        if self.interpolation == "log":
            return jnp.interp(jnp.log(_f(ve_sigma)), jnp.log(self.train_sigmas), grid)
        return jnp.interp(_f(ve_sigma), self.train_sigmas, grid)

    def alpha(self, t):
        return jax.lax.rsqrt(1.0 + jnp.square(self.ve_sigma(t)))

    def sigma(self, t):
        s = self.ve_sigma(t)
        return s * jax.lax.rsqrt(1.0 + jnp.square(s))

    def cond(self, t):
        return _f(t)

    def t_of_cond(self, c):
        return _f(c)


def _check_times(process, upper):
    """0 < t_min < t_max (< upper): ve_sigma(0) = 0 has no log-SNR, and t_max = `upper` is pure
    noise (alpha = 0). A `time_scale` of 0 or below would hide or reverse t from the network."""
    name = type(process).__name__
    rule = "0 < t_min < t_max" + ("" if upper is None else f" < {upper}")
    hi = math.inf if upper is None else upper
    check_values(name, rule, lambda lo, t: 0 < lo < t < hi,
                 t_min=process.t_min, t_max=process.t_max)
    if hasattr(process, "time_scale"):
        check_values(name, "time_scale > 0", lambda c: c > 0, time_scale=process.time_scale)


class _VEView(Process):
    """Processes defined through log alpha(t); sigma = sqrt(1 - alpha^2) (variance preserving)."""

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(2.0 * self.log_alpha(t)))

    def ve_sigma(self, t):
        return jnp.sqrt(jnp.expm1(-2.0 * self.log_alpha(t)))

    def cond(self, t):
        return _f(t) * self.time_scale

    def t_of_cond(self, c):
        return _f(c) / self.time_scale


@pytree_dataclass()
class VPLinear(_VEView):
    """Continuous VP SDE with linear beta(t) (score_sde DDPM++): log alpha = -t^2 db/4 - t b0/2."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    time_scale: float = 1.0  # score_sde's DDPM++ conditions on 999 * t

    def __post_init__(self):
        # beta(t) = beta_min + t (beta_max - beta_min) is a variance rate: >= 0 for t in [0, 1]
        check_values("VPLinear", "0 <= beta_min <= beta_max, beta_max > 0",
                     lambda b0, b1: 0 <= b0 <= b1 and b1 > 0,
                     beta_min=self.beta_min, beta_max=self.beta_max)
        _check_times(self, upper=None)

    def log_alpha(self, t):
        t = _f(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def t_of(self, ve_sigma):
        b0, db = self.beta_min, self.beta_max - self.beta_min
        log1p_s2 = jnp.log1p(jnp.square(_f(ve_sigma)))  # = -2 log alpha
        return 2.0 * log1p_s2 / (b0 + jnp.sqrt(b0**2 + 2.0 * db * log1p_s2))


@pytree_dataclass()
class VPCosine(_VEView):
    """Continuous cosine VP (iDDPM), in DPM-Solver's normalisation with alpha(0) = 1."""

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946  # DPM-Solver's cap, where alpha is still representable
    time_scale: float = 1.0

    def __post_init__(self):
        check_values("VPCosine", "s >= 0", lambda s: s >= 0, s=self.s)
        _check_times(self, upper=1)  # alpha(1) = 0

    def _phase(self, t):
        return (_f(t) + self.s) / (1.0 + self.s) * (math.pi / 2)

    def log_alpha(self, t):
        c0 = math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))
        return jnp.log(jnp.cos(self._phase(t))) - c0

    def t_of(self, ve_sigma):
        log_alpha = -0.5 * jnp.log1p(jnp.square(_f(ve_sigma)))
        c0 = math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))
        return 2.0 * (1.0 + self.s) / math.pi * jnp.arccos(jnp.exp(log_alpha + c0)) - self.s


@pytree_dataclass()
class VE(Process):
    """Variance-exploding SDE (score_sde NCSN++): sigma(t) = sigma_lo * (sigma_hi/sigma_lo)^t.

    The network is conditioned on sigma itself."""

    sigma_lo: float = 0.01
    sigma_hi: float = 50.0
    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self):
        check_values("VE", "0 < sigma_lo < sigma_hi", lambda lo, hi: 0 < lo < hi,
                     sigma_lo=self.sigma_lo, sigma_hi=self.sigma_hi)
        check_values("VE", "0 <= t_min < t_max", lambda lo, hi: 0 <= lo < hi,
                     t_min=self.t_min, t_max=self.t_max)

    def alpha(self, t):
        return jnp.ones_like(_f(t))

    def sigma(self, t):
        return self.sigma_lo * (self.sigma_hi / self.sigma_lo) ** _f(t)

    def ve_sigma(self, t):
        return self.sigma(t)

    def t_of(self, ve_sigma):
        return jnp.log(_f(ve_sigma) / self.sigma_lo) / math.log(self.sigma_hi / self.sigma_lo)

    def cond(self, t):
        return self.sigma(t)

    def t_of_cond(self, c):
        return self.t_of(c)

    def prior_scale(self, ve_sigma):
        return ve_sigma


def edm_c_noise(ve_sigma):
    """EDM's network conditioning c_noise = ln(sigma)/4 (Karras et al. 2022, Table 1)."""
    return 0.25 * jnp.log(ve_sigma)


def edm_sigma_of(c_noise):
    """The noise level whose `edm_c_noise` is c_noise: sigma = exp(4 c_noise)."""
    return jnp.exp(4.0 * c_noise)


@pytree_dataclass()
class EDM(Process):
    """EDM (Karras et al. 2022): t = sigma, alpha = 1; the network sees c_noise = ln(sigma)/4.

    Use it with `prediction="edm"` for the c_skip/c_out/c_in preconditioning."""

    sigma_data: float = 0.5
    t_min: float = 0.002
    t_max: float = 80.0

    def __post_init__(self):
        check_values("EDM", "sigma_data > 0", lambda d: d > 0, sigma_data=self.sigma_data)
        _check_times(self, upper=None)

    def alpha(self, t):
        return jnp.ones_like(_f(t))

    def sigma(self, t):
        return _f(t)

    def ve_sigma(self, t):
        return _f(t)

    def t_of(self, ve_sigma):
        return _f(ve_sigma)

    def cond(self, t):
        return edm_c_noise(_f(t))

    def t_of_cond(self, c):
        return edm_sigma_of(_f(c))

    def prior_scale(self, ve_sigma):
        return ve_sigma


@pytree_dataclass()
class RectifiedFlow(Process):
    """Rectified flow / flow matching: alpha = 1 - t, sigma = t (SD3, Flux).

    The VE view needs alpha > 0, so sampling starts at `t_max` slightly below 1; the default
    1 - 1e-4 leaves a 1e-4 share of signal in the starting point. `time_scale=1000` gives SD3's
    conditioning."""

    t_min: float = 1e-4
    t_max: float = 1.0 - 1e-4
    time_scale: float = 1.0

    def __post_init__(self):
        _check_times(self, upper=1)  # alpha(1) = 0: the VE view x/alpha is infinite

    def alpha(self, t):
        return 1.0 - _f(t)

    def sigma(self, t):
        return _f(t)

    def ve_sigma(self, t):
        t = _f(t)
        return t / (1.0 - t)

    def t_of(self, ve_sigma):
        s = _f(ve_sigma)
        return s / (1.0 + s)

    def cond(self, t):
        return _f(t) * self.time_scale

    def t_of_cond(self, c):
        return _f(c) / self.time_scale

    def prior_scale(self, ve_sigma):
        return 1.0 + ve_sigma  # x = noise at the start, so x/alpha = noise * (1 + ve_sigma)


PROCESSES = {
    "discrete_vp": DiscreteVP,
    "vp_linear": VPLinear,
    "vp_cosine": VPCosine,
    "ve": VE,
    "edm": EDM,
    "rectified_flow": RectifiedFlow,
}

# The stochastic interpolants (SiT's Linear and GVP paths) build on this module, so they come last.
from jaxdiff.core.interpolant import INTERPOLANTS  # noqa: E402

PROCESSES.update(INTERPOLANTS)


_INTERFACE = ("alpha", "sigma", "ve_sigma", "t_of", "cond", "t_min", "t_max", "prior_scale")


def check_process(process):
    """A TypeError for what is no process (e.g. the name "edm"); a user's own class passes when it
    has the interface of the module docstring."""
    if isinstance(process, Process) or all(hasattr(process, a) for a in _INTERFACE):
        return
    names = ", ".join(cls.__name__ for cls in PROCESSES.values())
    raise TypeError(
        f"process={short_repr(process)} is not a process; allowed: an instance of {names} "
        "(jaxdiff.core.process), e.g. process=jaxdiff.EDM()"
    )
