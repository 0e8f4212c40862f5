"""Guidance: transforms from a denoiser to a denoiser, `D(x, sigma, *args) -> D'(x, sigma)`.

Guidance never lives inside a model. Each method is a plain function that takes any denoiser (a
trained network through `jaxdiff.core.denoiser`, or a closed form from `jaxdiff.core.analytic`) and
returns a new one. The frozen dataclasses at the end (`CFG`, `AdaptiveCFG`, `Autoguidance`,
`ClassifierGuidance`, `DynamicThreshold`, `Chain`) hold the same parameters as pytrees and call the
functions; `jaxdiff.sample(..., guidance=CFG(scale, y, y_null))` applies them inside its compiled
program. Scales, noise levels and label arrays are pytree leaves, so changing them reuses the
compiled program; choices (strings) are static.

Stateful denoisers (`jaxdiff.core.denoiser.Stateful`): every transform takes a plain or a stateful
denoiser, `D(x, sigma, *args, state) -> (x0, state)`, and returns the same kind, passing the state
through each model call once: CFG's batched call on [x; x] (batch 2B) and, outside a guidance
interval or past adaptive guidance's stop, the conditional call on x (batch B). Both branches must
give back the same shapes: a cache of 2B rows updates its first B (conditional) rows there.

Methods and sources:
  cfg                  classifier-free guidance, Ho & Salimans 2022, Eq. 6 (w shifted by 1):
                       D' = D_u + w (D_c - D_u); optional CFG-rescale, Lin et al. 2024, Eq. 15-16.
  guidance_interval    guidance only for sigma in (sigma_lo, sigma_hi], Kynkaanniemi et al. 2024.
  adaptive_cfg         Castillo et al. 2023 (Adaptive Guidance), as a calibrated noise level.
  autoguidance         Karras et al. 2024, Eq. 1: D' = D_weak + w (D_main - D_weak).
  classifier_guidance  Dhariwal & Nichol 2021, Alg. 1 / Sec. 4.1, score shift by w grad log p(y|x).
  dynamic_threshold    Imagen, Saharia et al. 2022, Sec. 2.3 (diffusers' `_threshold_sample`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core.denoiser import (
    NO_STATE,
    Stateful,
    check_prediction,
    ddim_step,
    expand_like,
    lift,
    lower,
)
from jaxdiff.core.denoiser import denoiser as make_denoiser
from jaxdiff.core.process import check_values, concrete_float, pytree_dataclass, short_repr


def _cond_uncond(D, x, sigma, y, y_null, state=NO_STATE):
    """D(x, sigma, y) and D(x, sigma, y_null) from ONE network call on the batch [x; x], and the
    state that call returns (D lifted: `jaxdiff.core.denoiser.lift`).

    `y` is an array (or pytree of arrays) with x's batch size; `y_null` has y's structure with
    leaves that broadcast to y's (e.g. one null class index). A per-sample sigma of shape (B,)
    is concatenated too."""
    b = x.shape[0]
    sigma = jnp.asarray(sigma)
    sigma2 = jnp.concatenate([sigma, sigma]) if sigma.ndim else sigma

    def stack(c, u):
        c = jnp.asarray(c)
        return jnp.concatenate([c, jnp.broadcast_to(jnp.asarray(u, c.dtype), c.shape)])

    out, state = D(jnp.concatenate([x, x]), sigma2, jax.tree.map(stack, y, y_null), state)
    return out[:b], out[b:], state


def _bind(D, *args):
    """The denoiser D(x, sigma, *args) with its extra arguments fixed (stateful or not)."""
    fn, init = lift(D)
    return lower(lambda x, sigma, state: fn(x, sigma, *args, state), init)


def cfg(D, scale, y, y_null, rescale=0.0):
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6), D' = D_u + w (D_c - D_u).

    Our w is 1 + w of the paper's Eq. 6, (1 + w) eps_c - w eps_u (the diffusers/EDM2 convention:
    w = 1 is no guidance).
    One batched call gives the conditional D_c = D(x, sigma, y) and unconditional
    D_u = D(x, sigma, y_null) predictions. Linear mixing commutes with the affine maps between
    x0, eps, v and score, so mixing denoiser outputs equals mixing eps- or v-predictions.
    `rescale` (phi) is CFG-rescale, applied here in the x0 (denoiser) space; see `cfg_rescale`.
    w = 1 gives the conditional denoiser, w = 0 the unconditional one."""
    fn, init = lift(D)

    def guided(x, sigma, state):
        d_c, d_u, state = _cond_uncond(fn, x, sigma, y, y_null, state)
        w = jnp.asarray(scale, x.dtype)
        return cfg_rescale(d_u + w * (d_c - d_u), d_c, rescale), state

    return lower(guided, init)


def cfg_rescale(x0_cfg, x0_cond, phi):
    """CFG-rescale (Lin et al. 2024, "Common diffusion noise schedules and sample steps are
    flawed", Eq. 15-16): scale the guided prediction to the per-sample std of the conditional
    one, x_rescaled = x_cfg std(x_pos) / std(x_cfg), then blend phi x_rescaled + (1 - phi) x_cfg.

    The paper (and diffusers' `rescale_noise_cfg`) applies it to the network's output (v or eps);
    a denoiser transform sees only x0-hat, so here it acts on x0-hat. The results differ, since
    std is not preserved by the affine maps between the parameterizations."""
    axes = tuple(range(1, x0_cfg.ndim))
    std_c = jnp.std(x0_cond, axis=axes, keepdims=True)
    std_g = jnp.std(x0_cfg, axis=axes, keepdims=True)
    rescaled = x0_cfg * (std_c / jnp.where(std_g > 0, std_g, 1.0))
    phi = jnp.asarray(phi, x0_cfg.dtype)
    return phi * rescaled + (1.0 - phi) * x0_cfg


def guidance_interval(D_guided, D_plain, sigma_lo, sigma_hi):
    """D_guided for sigma in (sigma_lo, sigma_hi], D_plain elsewhere (Kynkaanniemi et al. 2024,
    "Applying guidance in a limited interval improves sample and distribution quality").

    For CFG, D_plain is the conditional denoiser (guidance weight 1 outside the interval). With a
    scalar sigma (what samplers pass) a `lax.cond` runs only the chosen branch, so the skipped
    unconditional pass costs nothing; under `vmap`, or with a per-sample sigma of shape (B,),
    both branches run and the result is selected per sample.

    Stateful: the two denoisers share one state (two uses of one network; D_guided's initial
    state is used), which the branch taken passes through; when both run, it goes through
    D_guided, then D_plain."""
    guided_fn, init = lift(D_guided)
    plain_fn, plain_init = lift(D_plain)
    init = plain_init if init is NO_STATE else init

    def D(x, sigma, *args_state):
        *args, state = args_state
        sigma = jnp.asarray(sigma, x.dtype)
        inside = (sigma > sigma_lo) & (sigma <= sigma_hi)
        if sigma.ndim == 0:
            return jax.lax.cond(inside, guided_fn, plain_fn, x, sigma, *args, state)
        guided, state = guided_fn(x, sigma, *args, state)
        plain, state = plain_fn(x, sigma, *args, state)
        return jnp.where(expand_like(inside, x), guided, plain), state

    return lower(D, init)


def adaptive_cfg(D, scale, y, y_null, sigma_stop, rescale=0.0):
    """Adaptive guidance (Castillo et al. 2023): CFG while sigma > sigma_stop, then the
    conditional pass alone (1 NFE instead of 2).

    The paper's policy stops guiding, online and per sample, once the conditional and
    unconditional predictions agree (their cosine similarity passes a threshold). A plain denoiser
    carries no state between steps (a `Stateful` one could carry that decision; not done here),
    so here the switch is a fixed noise level, found offline by `calibrate_adaptive` on a few
    draws; the policy is the paper's, the online per-sample decision is replaced by this
    calibrated one."""
    return guidance_interval(cfg(D, scale, y, y_null, rescale), _bind(D, y), sigma_stop, jnp.inf)


def calibrate_adaptive(D, x, sigmas, y, y_null, scale, threshold=0.99):
    """Noise level at which adaptive guidance may stop guiding (Castillo et al. 2023).

    Runs CFG sampling from x (the VE-view state at sigmas[0]) with DDIM (eta = 0, Song et al.
    2021, Eq. 12) over the decreasing grid `sigmas`, recording at every step the cosine
    similarity of D_c and D_u (flattened per sample, minimum over the batch: every calibration
    draw must agree). Similarity is measured in the x0 (denoiser) space; the paper measures it on
    the network's predictions. Returns (sigma_stop, similarity): sigma_stop is the first grid
    level whose similarity is >= threshold (0 when none is, i.e. always guide), similarity has
    one entry per step. Pass sigma_stop to `adaptive_cfg` / `AdaptiveCFG`."""
    _check_range("threshold", threshold, -1.0, 1.0)
    sigmas = jnp.asarray(sigmas, x.dtype)
    fn, state = lift(D)  # a stateful D's state is threaded through the run, then dropped

    def step(carry, i):
        x, state = carry
        s, s_next = sigmas[i], sigmas[i + 1]
        d_c, d_u, state = _cond_uncond(fn, x, s, y, y_null, state)
        x0 = d_u + jnp.asarray(scale, x.dtype) * (d_c - d_u)
        return (ddim_step(x, x0, s, s_next), state), jnp.min(_cosine(d_c, d_u))

    _, similarity = jax.lax.scan(step, (x, state), jnp.arange(sigmas.shape[0] - 1))
    agree = similarity >= threshold
    sigma_stop = jnp.where(jnp.any(agree), sigmas[jnp.argmax(agree)], 0.0)
    return sigma_stop, similarity


def _cosine(a, b):
    """Per-sample cosine similarity of two batches."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    norm = jnp.linalg.norm(a, axis=1) * jnp.linalg.norm(b, axis=1)
    return jnp.sum(a * b, axis=1) / jnp.maximum(norm, jnp.finfo(a.dtype).tiny)


def autoguidance(D_main, D_weak, scale):
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself",
    Eq. 1): D' = D_weak + w (D_main - D_weak), both denoisers called with the same arguments.

    Stateful: the state of the one stateful denoiser passes through both calls (the plain one
    leaves it untouched); when both are stateful it is the pair (weak's, main's)."""
    weak_fn, weak_init = lift(D_weak)
    main_fn, main_init = lift(D_main)
    both = weak_init is not NO_STATE and main_init is not NO_STATE

    def D(x, sigma, *args_state):
        *args, state = args_state
        s_w, s_m = state if both else (state, None)
        d_w, s_w = weak_fn(x, sigma, *args, s_w)
        d_m, s_m = main_fn(x, sigma, *args, s_m if both else s_w)
        return d_w + jnp.asarray(scale, x.dtype) * (d_m - d_w), (s_w, s_m) if both else s_m

    init = (weak_init, main_init) if both else (main_init if weak_init is NO_STATE else weak_init)
    return lower(D, init)


def classifier_guidance(D, log_prob_fn, scale):
    """Classifier guidance (Dhariwal & Nichol 2021, Sec. 4.1), in the VE view.

    `log_prob_fn(x, sigma)` returns the per-sample log p(y | x) of a noise-aware classifier on the
    VE-view state x = x0 + sigma eps. The guided score is score + w grad_x log p(y | x); with
    score = (D - x) / sigma^2 (Tweedie) the guided denoiser is x + sigma^2 (guided score), i.e.
    D' = D + w sigma^2 grad_x log p(y | x)."""
    grad = jax.grad(lambda x, sigma: jnp.sum(log_prob_fn(x, sigma)))
    fn, init = lift(D)

    def guided(x, sigma, *args_state):
        s2 = jnp.square(expand_like(jnp.asarray(sigma, x.dtype), x))
        x0, state = fn(x, sigma, *args_state)
        return x0 + jnp.asarray(scale, x.dtype) * s2 * grad(x, sigma), state

    return lower(guided, init)


def dynamic_threshold(D, percentile=0.995, max_value=1.0):
    """Dynamic thresholding (Imagen, Saharia et al. 2022, Sec. 2.3), with the semantics of
    diffusers' `_threshold_sample`: per sample s = clip(quantile(|x0|, percentile), 1, max_value),
    then x0 <- clip(x0, -s, s) / s. For data scaled to [-1, 1]."""
    _check_range("percentile", percentile, 0.0, 1.0)
    fn, init = lift(D)

    def thresholded(x, sigma, *args_state):
        x0, state = fn(x, sigma, *args_state)
        q = jnp.quantile(jnp.abs(x0.reshape(x0.shape[0], -1)), percentile, axis=1)
        s = expand_like(jnp.clip(q, 1.0, max_value), x0).astype(x0.dtype)
        return jnp.clip(x0, -s, s) / s, state

    return lower(thresholded, init)


def _check_range(name, value, lo, hi):
    if isinstance(value, (int, float)) and not lo <= value <= hi:
        raise ValueError(f"{name}={value!r} is out of range; allowed: {lo} <= {name} <= {hi}")


def _check_scale(where, scale, rescale=0.0):
    """A NaN or infinite weight turns every sample into NaN; CFG-rescale phi is a blend weight."""
    check_values(where, "a finite scale (1 = no guidance)", math.isfinite, finite=False,
                 scale=scale)
    check_values(where, "0 <= rescale <= 1", lambda phi: 0 <= phi <= 1, rescale=rescale)


def _check_interval(interval):
    """CFG's interval, (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi (sigma_hi may be inf)."""
    if interval is None or not isinstance(interval, (tuple, list)):
        return  # None, a (2,) array, or a placeholder jax put in while rebuilding the pytree
    lo, hi = (concrete_float(v) for v in interval) if len(interval) == 2 else (0.0, -1.0)
    if lo is None or hi is None or 0 <= lo < hi:
        return
    raise ValueError(
        f"CFG(interval={short_repr(interval)}) is invalid; allowed: None or "
        "(sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi (sigma_hi may be inf)"
    )


def _as_partial(obj, name):
    """Stores a plain function field as a `jax.tree_util.Partial`, a valid pytree (for a
    `Stateful` field, its function)."""
    fn = getattr(obj, name)
    if isinstance(fn, Stateful):
        object.__setattr__(obj, name, Stateful(_partial(fn.fn), fn.init))
    else:
        object.__setattr__(obj, name, _partial(fn))


def _partial(fn):
    """fn as a `jax.tree_util.Partial` (a Partial, or a placeholder jax put in, unchanged)."""
    if callable(fn) and not isinstance(fn, jax.tree_util.Partial):
        return jax.tree_util.Partial(fn)
    return fn


@pytree_dataclass(data=("scale", "y", "y_null", "rescale", "interval"))
class CFG:
    """Classifier-free guidance (`cfg`) for `jaxdiff.sample`: the network is called as
    `model_fn(x, t, labels)` with labels [y; y_null]. `interval=(sigma_lo, sigma_hi)` guides only
    there and runs the conditional pass alone elsewhere (`guidance_interval`)."""

    scale: Any
    y: Any
    y_null: Any
    rescale: Any = 0.0
    interval: Any = None

    def __post_init__(self):
        _check_scale("CFG", self.scale, self.rescale)
        _check_interval(self.interval)

    def __call__(self, D):
        guided = cfg(D, self.scale, self.y, self.y_null, self.rescale)
        if self.interval is None:
            return guided
        lo, hi = self.interval
        return guidance_interval(guided, _bind(D, self.y), lo, hi)


@pytree_dataclass(data=("scale", "y", "y_null", "sigma_stop", "rescale"))
class AdaptiveCFG:
    """Adaptive guidance (`adaptive_cfg`); get `sigma_stop` from `calibrate_adaptive`."""

    scale: Any
    y: Any
    y_null: Any
    sigma_stop: Any
    rescale: Any = 0.0

    def __post_init__(self):
        _check_scale("AdaptiveCFG", self.scale, self.rescale)
        check_values("AdaptiveCFG", "sigma_stop >= 0 (inf: never guide)", lambda s: s >= 0,
                     finite=False, sigma_stop=self.sigma_stop)

    def __call__(self, D):
        return adaptive_cfg(D, self.scale, self.y, self.y_null, self.sigma_stop, self.rescale)


@pytree_dataclass(data=("weak_model_fn", "process", "scale", "y"))
class Autoguidance:
    """Autoguidance (`autoguidance`) for `jaxdiff.sample`.

    The weak model is a raw network like `sample`'s `model_fn`; wrap it with its params as
    `jax.tree_util.Partial(apply, weak_params)` so that new params reuse the compiled program.
    It becomes a denoiser through `jaxdiff.denoiser(weak_model_fn, process, prediction)`, so it may
    differ from the main model in prediction type (it must share the process's noise levels).
    `y`, when given, is passed as the label to both models. Either model may be `Stateful` (see
    `autoguidance` for the state it then has)."""

    weak_model_fn: Callable
    process: Any
    prediction: str
    scale: Any
    y: Any = None

    def __post_init__(self):
        _as_partial(self, "weak_model_fn")
        _check_scale("Autoguidance", self.scale)
        # the process field may be a placeholder when jax rebuilds the pytree
        check_prediction(self.prediction, self.process if hasattr(self.process, "t_of") else None)

    def __call__(self, D):
        D_weak = make_denoiser(self.weak_model_fn, self.process, self.prediction)
        args = () if self.y is None else (self.y,)
        return _bind(autoguidance(D, D_weak, self.scale), *args)


@pytree_dataclass(data=("log_prob_fn", "scale"))
class ClassifierGuidance:
    """Classifier guidance (`classifier_guidance`); `log_prob_fn(x_ve, sigma)` is stored as a
    `jax.tree_util.Partial` (pass the classifier's params and labels as its arguments)."""

    log_prob_fn: Callable
    scale: Any

    def __post_init__(self):
        _as_partial(self, "log_prob_fn")
        _check_scale("ClassifierGuidance", self.scale)

    def __call__(self, D):
        return classifier_guidance(D, self.log_prob_fn, self.scale)


@pytree_dataclass(data=("percentile", "max_value"))
class DynamicThreshold:
    """Dynamic thresholding of x0-hat (`dynamic_threshold`); defaults are diffusers'."""

    percentile: Any = 0.995
    max_value: Any = 1.0

    def __post_init__(self):
        # s = clip(quantile, 1, max_value) is the divisor: max_value < 1 contradicts its floor of 1
        check_values("DynamicThreshold", "0 <= percentile <= 1, max_value >= 1",
                     lambda q, m: 0 <= q <= 1 and m >= 1,
                     percentile=self.percentile, max_value=self.max_value)

    def __call__(self, D):
        return dynamic_threshold(D, self.percentile, self.max_value)


@pytree_dataclass(data=("args",))
class Conditioning:
    """No guidance: the network's extra arguments bound, `model_fn(x, t, *args)` in one pass
    (e.g. labels, or labels and the guidance scale of a guidance-distilled student,
    `jaxdiff.distill`)."""

    args: tuple

    def __call__(self, D):
        return _bind(D, *self.args)


@pytree_dataclass(data=("steps",))
class Chain:
    """Applies guidance transforms in order, e.g. `Chain((CFG(...), DynamicThreshold()))`
    thresholds the guided prediction, as Imagen does."""

    steps: tuple

    def __call__(self, D):
        for g in self.steps:
            D = g(D)
        return D


def check_guidance(guidance, batch):
    """What `jaxdiff.sample` would otherwise get silently wrong: a number where a guidance object
    belongs (TypeError), or labels whose batch is not the noise's: the network would see [y; y_null]
    misaligned with [x; x]. `batch` is noise.shape[0] (None for unbatched noise)."""
    if guidance is None:
        return
    if not callable(guidance):
        scale = guidance if concrete_float(guidance) is not None else 2.0
        raise TypeError(
            f"guidance={short_repr(guidance)} is not a guidance object; pass e.g. "
            f"jaxdiff.core.guidance.CFG(scale={short_repr(scale)}, y=labels, y_null=null_labels)"
        )
    for g in guidance.steps if isinstance(guidance, Chain) else (guidance,):
        if isinstance(g, Chain):
            check_guidance(g, batch)
        elif isinstance(g, (CFG, AdaptiveCFG)) and batch is not None:
            _check_labels(type(g).__name__, g.y, g.y_null, batch)


def _check_labels(where, y, y_null, batch):
    """`_cond_uncond` stacks [y; y_null] along the batch axis: each leaf of y needs one row per
    sample, and each leaf of y_null must broadcast to its y leaf (e.g. one null class index)."""
    ys, nulls = jax.tree.leaves(y), jax.tree.leaves(y_null)
    for leaf in ys:
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch:
            raise ValueError(
                f"{where} y has shape {jnp.shape(leaf)} but the noise has batch {batch}; "
                f"allowed: y with first dimension {batch} (one label per sample)"
            )
    for leaf, null in zip(ys, nulls) if len(ys) == len(nulls) else ():
        try:
            ok = np.broadcast_shapes(jnp.shape(null), jnp.shape(leaf)) == jnp.shape(leaf)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{where} y_null has shape {jnp.shape(null)}, which does not broadcast to y's "
                f"{jnp.shape(leaf)} (batch {batch}); allowed: a shape that broadcasts to y's"
            )


__all__ = [
    "cfg", "cfg_rescale", "guidance_interval", "adaptive_cfg", "calibrate_adaptive", "autoguidance",
    "classifier_guidance", "dynamic_threshold", "CFG", "AdaptiveCFG", "Autoguidance",
    "ClassifierGuidance", "Conditioning", "DynamicThreshold", "Chain", "check_guidance",
]
