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

Stateful functions (feature caches, SMC particles; the contract is in `jaxdiff.samplers.base`):
`Stateful(fn, init)` marks `fn(*args, state) -> (out, state)` -- the state is the last positional
argument -- with its initial state. Every layer takes a plain function or a `Stateful` and gives
back the same kind: `denoiser(Stateful(model_fn, init), ...)` is `Stateful(D, init)` with
`D(x_ve, ve_sigma, *args, state) -> (x0, state)`, and so are the guidance transforms. Inside, each
layer is written once, in the stateful form (`lift`); a plain function threads `NO_STATE`, a
pytree without leaves, so its traced program is exactly the stateless one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core.process import edm_c_noise, edm_sigma_of, short_repr


class _NoState:
    """The state of a plain function: a pytree without leaves (nothing in a loop carry)."""

    def __repr__(self):
        return "NO_STATE"


NO_STATE = _NoState()
jax.tree_util.register_pytree_node(_NoState, lambda s: ((), None), lambda aux, ch: NO_STATE)


@dataclasses.dataclass(frozen=True)
class Stateful:
    """`fn(*args, state) -> (out, state)` with its initial state `init` (any pytree of arrays).

    The state must keep its tree structure, shapes and dtypes from call to call (it lives in a
    loop carry). A pytree (`fn` and `init` are its children: wrap a network and its params as
    `jax.tree_util.Partial(apply, params)`), so `jaxdiff.sample` takes it as its `model_fn`."""

    fn: Callable
    init: Any

    def __call__(self, *args):
        raise TypeError(
            "a Stateful function is called as fn(*args, state) by a sampler, "
            "jaxdiff.core.denoiser, a guidance transform or jaxdiff.sample; this caller takes a "
            "plain function"
        )


jax.tree_util.register_dataclass(Stateful, data_fields=["fn", "init"], meta_fields=[])


def lift(fn):
    """(f, init): `fn` as `f(*args, state) -> (out, state)` and its initial state. A plain `fn`
    gets `NO_STATE`, which it passes through untouched; a `Stateful` is checked at trace time to
    give back a state shaped like the one it got."""
    if not isinstance(fn, Stateful):
        return (lambda *a: (fn(*a[:-1]), a[-1])), NO_STATE
    inner = fn.fn

    def checked(*a):
        out, state = inner(*a)
        _check_state(a[-1], state)
        return out, state

    return checked, fn.init


def lower(f, init):
    """The inverse of `lift`: `Stateful(f, init)`, or for `init` NO_STATE the plain function
    `lambda *args: f(*args, NO_STATE)[0]` (no op added)."""
    if init is NO_STATE:
        return lambda *a: f(*a, NO_STATE)[0]
    return Stateful(f, init)


def _check_state(before, after):
    """A state must keep its structure, shapes and dtypes (it is a loop carry and a lax.cond
    operand); say which leaf changed instead of letting the loop fail on mismatched types."""
    if jax.tree.structure(before) != jax.tree.structure(after):
        raise ValueError(
            f"a Stateful function returned a state of structure {jax.tree.structure(after)} for "
            f"one of structure {jax.tree.structure(before)}; it must keep the state's structure"
        )
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
        ta, tb = (np.shape(a), jnp.result_type(a)), (np.shape(b), jnp.result_type(b))
        if ta != tb:
            raise ValueError(
                f"a Stateful function got state{jax.tree_util.keystr(path)} of shape {ta[0]} "
                f"{ta[1].name} and returned shape {tb[0]} {tb[1].name}; a state keeps its shapes "
                "and dtypes (under CFG the model is called on [x; x], and outside a guidance "
                "interval on x alone, with the same state)"
            )

PREDICTIONS = ("eps", "x0", "v", "flow", "score", "edm")


def expand_like(s, x):
    """Per-sample scalars (shape () or (B,)) broadcast against x of shape (B, ...)."""
    s = jnp.asarray(s)
    return s.reshape(s.shape + (1,) * (x.ndim - s.ndim))


def ddim_step(x, x0, s, s_next):
    """x' = x0 + (sigma'/sigma)(x - x0): the DDIM step (eta = 0, Song et al. 2021, Eq. 12) from
    noise level s to s_next in the VE view, which is also Euler's and DPM-Solver-1's."""
    return x0 + (s_next / s) * (x - x0)


def edm_coefficients(ve_sigma, sigma_data):
    """EDM preconditioning (c_skip, c_out, c_in, c_noise) at noise level ve_sigma."""
    s2, d2 = jnp.square(ve_sigma), sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = ve_sigma * sigma_data * jax.lax.rsqrt(s2 + d2)
    c_in = jax.lax.rsqrt(s2 + d2)
    c_noise = edm_c_noise(ve_sigma)
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


def _time_derivatives(process, t, x):
    """(alpha'(t), sigma'(t)) broadcast against x: the flow velocity is u = alpha' x0 + sigma' eps.
    Forward-mode, so t may be a scalar or one time per sample."""
    _, da = jax.jvp(process.alpha, (t,), (jnp.ones_like(t),))
    _, ds = jax.jvp(process.sigma, (t,), (jnp.ones_like(t),))
    return expand_like(da, x), expand_like(ds, x)


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
        da, ds = _time_derivatives(process, t, x)
        return (ds * x - s * out) / (ds * a - s * da)
    raise ValueError(
        f"prediction={prediction!r} has no x0 conversion; allowed: eps, x0, v, score, flow"
    )


def denoiser(model_fn, process, prediction):
    """D(x_ve, ve_sigma, *args) for `model_fn(x, cond, *args)`; ve_sigma is a scalar or one value
    per sample, `args` (class labels, text embeddings...) pass through to the network.

    For `Stateful(model_fn, init)` with `model_fn(x, cond, *args, state) -> (out, state)`, it is
    `Stateful(D, init)` with `D(x_ve, ve_sigma, *args, state) -> (x0, state)`: one network call
    per denoiser call, the state passed through it."""
    check_prediction(prediction, process)
    model, init = lift(model_fn)

    def D(x_ve, ve_sigma, *args_state):
        *args, state = args_state
        ve_sigma = jnp.asarray(ve_sigma, x_ve.dtype)
        if prediction == "edm":
            c_skip, c_out, c_in, c_noise = edm_coefficients(ve_sigma, process.sigma_data)
            out, state = model(expand_like(c_in, x_ve) * x_ve, c_noise, *args, state)
            _check_shape(out, x_ve)
            return expand_like(c_skip, x_ve) * x_ve + expand_like(c_out, x_ve) * out, state
        t = process.t_of(ve_sigma)
        x = expand_like(process.alpha(t), x_ve) * x_ve
        out, state = model(x, process.cond(t), *args, state)
        _check_shape(out, x_ve)
        return to_x0(out, x, t, process, prediction).astype(x_ve.dtype), state

    return lower(D, init)


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
        da, ds = _time_derivatives(process, t, x)
        return da * x0 + ds * eps
    raise ValueError(f"prediction={prediction!r} has no inverse; allowed: eps, x0, v, score, flow")


def model_from_denoiser(D, process, prediction):
    """A raw `model_fn(x, cond, *args)` whose adapter gives back D: wraps a closed-form
    denoiser (see `jaxdiff.core.analytic`) as if it were a trained network of any prediction type.
    A `Stateful` D gives a `Stateful` model_fn with the same state."""
    check_prediction(prediction, process)
    D, init = lift(D)

    def model_fn(x, cond, *args_state):
        *args, state = args_state
        if prediction == "edm":
            ve_sigma = edm_sigma_of(jnp.asarray(cond))
            c_skip, c_out, c_in, _ = edm_coefficients(ve_sigma, process.sigma_data)
            x_ve = x / expand_like(c_in, x)
            x0, state = D(x_ve, ve_sigma, *args, state)
            return (x0 - expand_like(c_skip, x) * x_ve) / expand_like(c_out, x), state
        t = process.t_of_cond(cond)
        x_ve = x / expand_like(process.alpha(t), x)
        x0, state = D(x_ve, process.ve_sigma(t), *args, state)
        return from_x0(x0, x, t, process, prediction), state

    return lower(model_fn, init)
