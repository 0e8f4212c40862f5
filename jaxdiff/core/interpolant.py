"""Stochastic interpolants x_t = alpha(t) x0 + sigma(t) eps on t in [0, 1], data at t = 0.

Albergo, Boffi & Vanden-Eijnden 2023 ("Stochastic Interpolants: A Unifying Framework for Flows
and Diffusions") build a generative process from any pair alpha, sigma with alpha(0) = sigma(1) = 1
and alpha(1) = sigma(0) = 0; SiT (Ma et al. 2024, Sec. 3) trains transformers on two of them:

  Linear  alpha = 1 - t,         sigma = t            (rectified flow's path)
  GVP     alpha = cos(pi t / 2), sigma = sin(pi t / 2) (generalised variance preserving,
                                                       alpha^2 + sigma^2 = 1)

SiT counts time the other way (t = 0 noise, t = 1 data, x_t = t x_data + (1 - t) noise for
Linear): its t is 1 - t here, and its velocity is minus the one here. Both classes are
`jaxdiff.core.process` processes, so every sampler, schedule, loss and adapter takes them.

Model parametrisations (`prediction` in `jaxdiff.core.denoiser` and `jaxdiff.core.losses`):
velocity v = E[alpha' x0 + sigma' eps | x_t] is `"flow"`, noise E[eps | x_t] is `"eps"`, score
grad log p_t = -E[eps | x_t] / sigma is `"score"`. The velocity and the score determine each other
(`score_from_velocity`, `velocity_from_score`):

  v(x, t) = (alpha'/alpha) x - (g^2(t) / 2) s(x, t),  g^2/2 = sigma sigma' - (alpha'/alpha) sigma^2,

and g^2 = `sbdm_diffusion(t)` is the diffusion coefficient of the score-based diffusion model with
these marginals (SiT's "SBDM" choice of w(t)); -d log(alpha/sigma)/dt = g^2 / (2 sigma^2).

SiT's losses, as `jaxdiff.core.losses.diffusion_loss` options: the velocity loss is
`prediction="flow", weighting="uniform"`; the score loss ||sigma s + eps||^2 is
`prediction="score", weighting="noise"`, the noise loss `prediction="eps", weighting="uniform"`;
SiT's "velocity" and "likelihood" weightings of both are `weighting="velocity"` and
`"likelihood"` (the latter times the constant t_max - t_min).

Sampling with a diffusion coefficient chosen at sampling time (the reverse SDE
dx = [v - w s / 2] dt + sqrt(w) dW, t from 1 to 0): `jaxdiff.samplers.interpolant`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jaxdiff.core.process import Process, _check_times, _f, pytree_dataclass


class Interpolant(Process):
    """Shared parts of the interpolants: time t in [t_min, t_max] inside (0, 1), the network
    conditioned on `time_scale * t`, and the start x = noise (x_ve = noise / alpha(t_max)).

    Subclasses define alpha, sigma, their derivatives d_alpha, d_sigma, ve_sigma = sigma/alpha
    and its inverse t_of."""

    def __post_init__(self):
        _check_times(self, upper=1)  # alpha(1) = 0: the VE view x/alpha is infinite at t = 1

    def cond(self, t):
        return _f(t) * self.time_scale

    def t_of_cond(self, c):
        return _f(c) / self.time_scale

    def prior_scale(self, ve_sigma):
        """x = noise at the first level, whatever alpha^2 + sigma^2 there: x_ve = noise / alpha."""
        return 1.0 / self.alpha(self.t_of(ve_sigma))

    def velocity(self, x0, eps, t):
        """The conditional velocity d x_t / dt = alpha'(t) x0 + sigma'(t) eps (the flow target)."""
        return self.d_alpha(t) * x0 + self.d_sigma(t) * eps

    def sbdm_diffusion(self, t):
        """g^2(t) = 2 (sigma sigma' - (alpha'/alpha) sigma^2): the squared diffusion coefficient
        of the forward SDE dx = (alpha'/alpha) x dt + g dW with these marginals."""
        a, s = self.alpha(t), self.sigma(t)
        return 2.0 * (s * self.d_sigma(t) - self.d_alpha(t) / a * jnp.square(s))

    def score_from_velocity(self, v, x, t):
        """s = ((alpha'/alpha) x - v) / (g^2 / 2), x in the process scaling (SiT's
        `get_score_from_velocity`); t a scalar or broadcastable against x."""
        ratio = self.d_alpha(t) / self.alpha(t)
        return (ratio * x - v) / (0.5 * self.sbdm_diffusion(t))

    def velocity_from_score(self, score, x, t):
        """v = (alpha'/alpha) x - (g^2 / 2) s, the inverse of `score_from_velocity`."""
        ratio = self.d_alpha(t) / self.alpha(t)
        return ratio * x - 0.5 * self.sbdm_diffusion(t) * score


@pytree_dataclass()
class LinearInterpolant(Interpolant):
    """SiT's Linear path: alpha = 1 - t, sigma = t (the same marginals as `RectifiedFlow`).

    t_max < 1 for the VE view (alpha > 0), t_min > 0 for log-SNR grids; `time_scale=1000` conditions
    on 1000 t as SD3 and DiT-style embeddings expect."""

    t_min: float = 1e-4
    t_max: float = 1.0 - 1e-4
    time_scale: float = 1.0

    def alpha(self, t):
        return 1.0 - _f(t)

    def sigma(self, t):
        return _f(t)

    def d_alpha(self, t):
        return -jnp.ones_like(_f(t))

    def d_sigma(self, t):
        return jnp.ones_like(_f(t))

    def ve_sigma(self, t):
        t = _f(t)
        return t / (1.0 - t)

    def t_of(self, ve_sigma):
        s = _f(ve_sigma)
        return s / (1.0 + s)


@pytree_dataclass()
class GVPInterpolant(Interpolant):
    """SiT's GVP path: alpha = cos(pi t / 2), sigma = sin(pi t / 2) (alpha^2 + sigma^2 = 1, so
    ve_sigma = tan(pi t / 2): iDDPM's cosine schedule without its offset s)."""

    t_min: float = 1e-4
    t_max: float = 1.0 - 1e-4
    time_scale: float = 1.0

    def alpha(self, t):
        return jnp.cos(0.5 * math.pi * _f(t))

    def sigma(self, t):
        return jnp.sin(0.5 * math.pi * _f(t))

    def d_alpha(self, t):
        return -0.5 * math.pi * jnp.sin(0.5 * math.pi * _f(t))

    def d_sigma(self, t):
        return 0.5 * math.pi * jnp.cos(0.5 * math.pi * _f(t))

    def ve_sigma(self, t):
        return jnp.tan(0.5 * math.pi * _f(t))

    def t_of(self, ve_sigma):
        return jnp.arctan(_f(ve_sigma)) * (2.0 / math.pi)


INTERPOLANTS = {"interpolant_linear": LinearInterpolant, "interpolant_gvp": GVPInterpolant}
