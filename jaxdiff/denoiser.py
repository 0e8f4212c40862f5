"""Adapters from a raw network to a denoiser D(x_ve, ve_sigma) -> x0-hat.

A sampler only ever sees a denoiser in the variance-exploding view x_ve = x/alpha = x0 +
ve_sigma * eps (Karras et al. 2022, Sec. 2; k-diffusion). `denoiser(model_fn, process,
prediction)` turns `model_fn(x, cond)` -- x in the process's own scaling, cond its conditioning
value -- into that denoiser for every prediction target:

  eps   x0 = (x - sigma * eps) / alpha                    (DDPM)
  x0    x0 = out
  v     x0 = (alpha * x - sigma * v) / (alpha^2 + sigma^2)
        (Salimans & Ho 2022, v = alpha eps - sigma x0)
  flow  x0 = (sigma' x - sigma u) / (sigma' alpha - sigma alpha'),  u = alpha' x0 + sigma' eps
        (flow matching; for alpha = 1 - t, sigma = t this is x0 = x - t u)
  score x0 = (x + sigma^2 * score) / alpha
  edm   D = c_skip x_ve + c_out F(c_in x_ve, c_noise)      (EDM Table 1, sigma_data from process)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.process import short_repr

PREDICTIONS = ("eps", "x0", "v", "flow", "score", "edm")


def expand_like(s, x):
    """Per-sample scalars (shape () or (B,)) broadcast against x of shape (B, ...)."""
    s = jnp.asarray(s)
    return s.reshape(s.shape + (1,) * (x.ndim - s.ndim))


def edm_coefficients(ve_sigma, sigma_data):
    """EDM preconditioning (c_skip, c_out, c_in, c_noise) at noise level ve_sigma."""
    s2, d2 = jnp.square(ve_sigma), sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = ve_sigma * sigma_data * jax.lax.rsqrt(s2 + d2)
    c_in = jax.lax.rsqrt(s2 + d2)
    c_noise = 0.25 * jnp.log(ve_sigma)
    return c_skip, c_out, c_in, c_noise


def check_prediction(prediction, process=None):
    """Refuses an unknown prediction, or one the process cannot use: "edm" preconditioning is
    built on the data's std `sigma_data`, which only EDM-like processes carry (the other
    predictions are affine in x0 for any alpha, sigma)."""
    if not isinstance(prediction, str) or prediction not in PREDICTIONS:
        raise ValueError(
            f"prediction={short_repr(prediction)} is unknown; allowed: {', '.join(PREDICTIONS)}"
        )
    if prediction == "edm" and process is not None and not hasattr(process, "sigma_data"):
        raise ValueError(
            f"prediction='edm' needs a process with sigma_data (EDM), got "
            f"{type(process).__name__}; use EDM(...) or one of eps, x0, v, flow, score"
        )


def to_x0(out, x, t, process, prediction):
    """x0 implied by the network output `out` at state x (process scaling) and time t."""
    a, s = expand_like(process.alpha(t), x), expand_like(process.sigma(t), x)
    if prediction == "eps":
        return (x - s * out) / a
    if prediction == "x0":
        return out
    if prediction == "v":
        return (a * x - s * out) / (jnp.square(a) + jnp.square(s))
    if prediction == "score":
        return (x + jnp.square(s) * out) / a
    if prediction == "flow":
        _, da = jax.jvp(process.alpha, (t,), (jnp.ones_like(t),))
        _, ds = jax.jvp(process.sigma, (t,), (jnp.ones_like(t),))
        da, ds = expand_like(da, x), expand_like(ds, x)
        return (ds * x - s * out) / (ds * a - s * da)
    raise ValueError(
        f"prediction={prediction!r} has no x0 conversion; allowed: eps, x0, v, score, flow"
    )


def denoiser(model_fn, process, prediction):
    """D(x_ve, ve_sigma, *args) for `model_fn(x, cond, *args)`; ve_sigma is a scalar or one value
    per sample, `args` (class labels, text embeddings...) pass through to the network."""
    check_prediction(prediction, process)

    def D(x_ve, ve_sigma, *args):
        ve_sigma = jnp.asarray(ve_sigma, x_ve.dtype)
        if prediction == "edm":
            c_skip, c_out, c_in, c_noise = edm_coefficients(ve_sigma, process.sigma_data)
            out = model_fn(expand_like(c_in, x_ve) * x_ve, c_noise, *args)
            _check_shape(out, x_ve)
            return expand_like(c_skip, x_ve) * x_ve + expand_like(c_out, x_ve) * out
        t = process.t_of(ve_sigma)
        x = expand_like(process.alpha(t), x_ve) * x_ve
        out = model_fn(x, process.cond(t), *args)
        _check_shape(out, x_ve)
        return to_x0(out, x, t, process, prediction).astype(x_ve.dtype)

    return D


def _check_shape(out, x):
    if out.shape != x.shape:
        raise ValueError(
            f"model output shape {out.shape} does not match the sample shape {x.shape}; "
            "model_fn(x, t) must return an array shaped like x"
        )


def from_x0(x0, x, t, process, prediction):
    """The network output that `to_x0` maps back to x0 (the inverse adapter)."""
    a, s = expand_like(process.alpha(t), x), expand_like(process.sigma(t), x)
    eps = (x - a * x0) / s
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return a * eps - s * x0
    if prediction == "score":
        return -eps / s
    if prediction == "flow":
        _, da = jax.jvp(process.alpha, (t,), (jnp.ones_like(t),))
        _, ds = jax.jvp(process.sigma, (t,), (jnp.ones_like(t),))
        return expand_like(da, x) * x0 + expand_like(ds, x) * eps
    raise ValueError(f"prediction={prediction!r} has no inverse; allowed: eps, x0, v, score, flow")


def model_from_denoiser(D, process, prediction):
    """A raw `model_fn(x, cond, *args)` whose adapter gives back D: wraps a closed-form
    denoiser (see `jaxdiff.analytic`) as if it were a trained network of any prediction type."""
    check_prediction(prediction, process)

    def model_fn(x, cond, *args):
        if prediction == "edm":
            ve_sigma = jnp.exp(4.0 * jnp.asarray(cond))
            c_skip, c_out, c_in, _ = edm_coefficients(ve_sigma, process.sigma_data)
            x_ve = x / expand_like(c_in, x)
            x0 = D(x_ve, ve_sigma, *args)
            return (x0 - expand_like(c_skip, x) * x_ve) / expand_like(c_out, x)
        t = process.t_of_cond(cond)
        x_ve = x / expand_like(process.alpha(t), x)
        return from_x0(D(x_ve, process.ve_sigma(t), *args), x, t, process, prediction)

    return model_fn
