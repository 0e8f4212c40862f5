"""Denoising training losses: one weighted regression for every process and prediction target.

A training example draws t, eps ~ N(0, I) and x_t = alpha(t) x0 + sigma(t) eps, and regresses
the raw network output on the output that would reproduce x0 at x_t (DDPM, Ho et al. 2020,
Eq. 14; Kingma et al. 2021 "Variational Diffusion Models" (VDM), Sec. 3):

  eps   eps                      x0     x0
  v     alpha eps - sigma x0     flow   alpha' x0 + sigma' eps   (= eps - x0 for rectified flow)
  score -eps / sigma             edm    F = (x0 - c_skip x_ve) / c_out  (EDM, Karras et al. 2022,
                                        Eq. 8), the network fed c_in x_ve and c_noise
Targets come from `jaxdiff.core.denoiser.from_x0` (the inverse adapter), so training and sampling
use one set of formulas.

Every weighting is a per-sample weight on the output-space MSE. The output maps to the x0
estimate affinely, x0_hat = A x_t + g out, so an x0-space squared error weighted by w_x0 is an
output-space one weighted by w_x0 g^2; the gain g is read off the adapter (`to_x0`, or c_out for
edm): g^2 = 1/SNR (eps), 1 (x0), sigma^2/(alpha^2+sigma^2)^2 (v; = 1/(SNR+1) when VP),
sigma^4/alpha^2 (score), sigma^2/(sigma' alpha - sigma alpha')^2 (flow; = t^2 for rectified
flow), c_out^2 (edm); SNR = alpha^2/sigma^2 = 1/ve_sigma^2.

  uniform     weight 1 on the output MSE: DDPM's L_simple (eps), the flow-matching /
              rectified-flow loss (flow; Lipman et al. 2023, Liu et al. 2022).
  min_snr     w_x0 = min(SNR, gamma) (Hang et al. 2023, Sec. 3.4): min(SNR, gamma)/SNR for eps,
              min(SNR, gamma)/(SNR+1) for v on VP processes, min(SNR, gamma) for x0.
  edm         w_x0 = lambda(sigma) = (sigma^2 + sigma_d^2)/(sigma sigma_d)^2 on the D-space error
              (EDM Eq. 8, Table 1, sigma = ve_sigma); c_out^2 lambda = 1 for the edm target.
  likelihood  w_x0 = -1/2 dSNR/dt (t_max - t_min), i.e. -dlambda/dt (t_max - t_min) on the eps
              error with lambda = log(alpha/sigma) (VDM Eq. 17; = g(t)^2/2 on the score error,
              Song et al. 2021 "Maximum likelihood training of score-based diffusion models",
              Thm. 1, since g^2/sigma^2 = -dlog SNR/dt for VP SDEs). With uniform t the loss
              is then an unbiased estimate of the diffusion term of the negative ELBO in nats per
              dimension, integrated over [t_min, t_max]. dlambda/dt comes from `jax.jvp`; for
              `DiscreteVP` it is the slope of the interpolated log SNR (one-step finite
              difference), the continuous-time limit of the discrete ELBO (VDM Eq. 13).
              With another time density p(t) the effective weighting becomes w(t) p(t) (Kingma &
              Gao 2023), no longer the ELBO.
  noise       w_x0 = SNR: the error of the implied noise eps, whatever the prediction (uniform
              for eps). SiT's score loss ||sigma s + eps||^2 (Ma et al. 2024, "SiT", the score
              and noise models' unweighted loss) is `prediction="score", weighting="noise"`.
  velocity    w_x0 = c^2, c = (sigma' alpha - sigma alpha') / sigma: the error of the implied
              velocity v = alpha' x0 + sigma' eps = (sigma'/sigma) x - c x0 (uniform for flow):
              SiT's "velocity" weighting of its score and noise losses. SiT's "likelihood"
              weighting is `likelihood` above (g^2/2 on the score error, times t_max - t_min).

Time sampling: "uniform" (DDPM: integer timesteps for `DiscreteVP`), "logit_normal" (SD3,
Esser et al. 2024, Sec. 3.1: t = sigmoid(u), u ~ N(m, s^2), mapped affinely onto [t_min, t_max]),
"lognormal" (EDM Table 1: ln ve_sigma ~ N(P_mean, P_std^2), t = t_of(ve_sigma) clipped to the
process range). `DiscreteVP` times are rounded to its integer training timesteps.

All functions are jittable and vmappable with `process`, `prediction`, `weighting` and
`time_sampling` static (closed over or `static_argnames`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.core.denoiser import check_prediction, edm_coefficients, expand_like, from_x0, to_x0
from jaxdiff.core.process import DiscreteVP

WEIGHTINGS = ("uniform", "min_snr", "edm", "likelihood", "noise", "velocity")
TIME_SAMPLINGS = ("uniform", "logit_normal", "lognormal")


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is unknown; allowed: {', '.join(allowed)}")


def sample_time(
    key, n, process, time_sampling="uniform", *, logit_mean=0.0, logit_std=1.0, p_mean=-1.2,
    p_std=1.2,
):
    """n training times in the process's own variable t (see the module docstring)."""
    _check("time_sampling", time_sampling, TIME_SAMPLINGS)
    dtype = jnp.result_type(float)
    lo, hi = process.t_min, process.t_max
    discrete = isinstance(process, DiscreteVP)
    if time_sampling == "uniform":
        if discrete:  # DDPM Alg. 1: t ~ Uniform({0, ..., T-1})
            return jax.random.randint(key, (n,), 0, process.num_train_timesteps).astype(dtype)
        return jax.random.uniform(key, (n,), dtype, lo, hi)
    z = jax.random.normal(key, (n,), dtype)
    if time_sampling == "logit_normal":
        t = lo + (hi - lo) * jax.nn.sigmoid(logit_mean + logit_std * z)
    else:
        t = jnp.clip(process.t_of(jnp.exp(p_mean + p_std * z)), lo, hi)
    return jnp.round(t) if discrete else t


def _x0_gain(t, process, prediction):
    """g = d x0_hat / d out of the prediction adapter at time t (per sample)."""
    if prediction == "edm":
        return edm_coefficients(process.ve_sigma(t), process.sigma_data)[1]
    return to_x0(jnp.ones_like(t), jnp.zeros_like(t), t, process, prediction)


def loss_weight(t, process, prediction, weighting="uniform", *, min_snr_gamma=5.0, sigma_data=None):
    """Per-sample weight on the network-output MSE at times t (see the module docstring).

    `sigma_data` (edm weighting) defaults to the process's own, else EDM's 0.5."""
    check_prediction(prediction)
    _check("weighting", weighting, WEIGHTINGS)
    t = jnp.asarray(t, jnp.result_type(float))
    if weighting == "uniform":
        return jnp.ones_like(t)
    ve = process.ve_sigma(t)
    snr = 1.0 / jnp.square(ve)
    if weighting == "min_snr":
        w_x0 = jnp.minimum(snr, min_snr_gamma)
    elif weighting == "edm":
        sd = getattr(process, "sigma_data", 0.5) if sigma_data is None else sigma_data
        w_x0 = (jnp.square(ve) + sd**2) / jnp.square(ve * sd)
    elif weighting == "noise":
        w_x0 = snr
    elif weighting == "velocity":
        (a, s), (da, ds) = jax.jvp(lambda t: (process.alpha(t), process.sigma(t)), (t,),
                                   (jnp.ones_like(t),))
        w_x0 = jnp.square((ds * a - s * da) / s)
    else:
        _, dlam = jax.jvp(process.lam, (t,), (jnp.ones_like(t),))
        w_x0 = -dlam * snr * (process.t_max - process.t_min)
    return w_x0 * jnp.square(_x0_gain(t, process, prediction))


def _output_and_target(model_fn, x0, x, t, process, prediction, args):
    """Network output (cast to x0's float dtype) and its regression target at state x."""
    if prediction == "edm":
        if not hasattr(process, "sigma_data"):
            raise ValueError(f"prediction='edm' needs a process with sigma_data, got {process}")
        x_ve = x / expand_like(process.alpha(t), x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(process.ve_sigma(t), process.sigma_data)
        out = model_fn(expand_like(c_in, x) * x_ve, c_noise, *args)  # as denoiser() calls it
        target = (x0 - expand_like(c_skip, x) * x_ve) / expand_like(c_out, x)
    else:
        out = model_fn(x, process.cond(t), *args)
        target = from_x0(x0, x, t, process, prediction)
    if out.shape != x.shape:
        raise ValueError(f"model output shape {out.shape} does not match x0's shape {x.shape}")
    return out.astype(x0.dtype), target


def diffusion_loss(
    model_fn, x0, key, *, process, prediction, weighting="uniform", time_sampling="uniform",
    args=(), min_snr_gamma=5.0, logit_mean=0.0, logit_std=1.0, p_mean=-1.2, p_std=1.2,
    sigma_data=None, eps=None,
):
    """Weighted denoising loss of `model_fn(x, cond, *args)` on a batch x0 of shape (B, ...).
    eps: the noise paired with each x0 (reflow's coupling); None draws it from `key`.

    Returns (batch-mean loss, aux) with per-sample aux arrays: `t`, `sigma` (the VE noise level
    ve_sigma, comparable across processes), `weight`, `mse` (unweighted output-space MSE) and
    `loss` (weight * mse). Options are described in the module docstring."""
    check_prediction(prediction)
    _check("weighting", weighting, WEIGHTINGS)
    dtype = jnp.result_type(float)
    x0 = jnp.asarray(x0, dtype)
    key_t, key_eps = jax.random.split(key)
    t = sample_time(
        key_t, x0.shape[0], process, time_sampling, logit_mean=logit_mean, logit_std=logit_std,
        p_mean=p_mean, p_std=p_std,
    )
    eps = (jax.random.normal(key_eps, x0.shape, dtype) if eps is None
           else jnp.asarray(eps, dtype))
    x = expand_like(process.alpha(t), x0) * x0 + expand_like(process.sigma(t), x0) * eps
    out, target = _output_and_target(model_fn, x0, x, t, process, prediction, args)
    mse = jnp.mean(jnp.square(out - target), axis=tuple(range(1, x0.ndim)))
    weight = loss_weight(
        t, process, prediction, weighting, min_snr_gamma=min_snr_gamma, sigma_data=sigma_data
    )
    loss = weight * mse
    aux = dict(t=t, sigma=process.ve_sigma(t), weight=weight, mse=mse, loss=loss)
    return jnp.mean(loss), aux
