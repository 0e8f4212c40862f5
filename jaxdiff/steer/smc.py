"""Sequential Monte Carlo steering: Feynman-Kac (FK) steering of any sampler by a reward.

FK steering (Singhal et al. 2025, "A General Framework for Inference-time Scaling and Steering
of Diffusion Models", Alg. 1) runs k particles per requested sample through the sampler's own
transitions, weights them by potentials built from a reward of their denoised estimates, and
resamples them when the weights degenerate. With the "diff" potential the potentials' product
telescopes, so the particles target

    p(x0) exp(lam r(x0)) / Z   (the model's distribution tilted by the reward)

exactly as k grows, and Z = E_p[exp(lam r(x0))] is estimated without bias (`log_evidence`).
An inverse problem y = A x0 + n is the tilt r = log N(y; A x0, sigma_y^2 I), lam = 1.

How it plugs in: `FK(...)` is a denoiser transform, passed as `guidance=` to `jaxdiff.sample`
(last in a `Chain`, e.g. after CFG or `Conditioning`); the denoiser it returns is stateful
(`jaxdiff.core.denoiser.Stateful`) with a `Particles` state. Each denoiser call scores its
estimate x0 = D(x, sigma) with `reward(x0, sigma)` (per sample; sigma is the call's noise level,
so a reward may temper itself at high noise; most ignore it). The sampler loop calls the state's
`after_step` after every step (`jaxdiff.samplers.base`): it turns the step's potential into
incremental log-weights, and where a group's effective sample size falls below
`ess_threshold * particles` it resamples that group, gathering x and the sampler's history by
the ancestors. So every fixed-grid sampler (ancestral ones keep the particles diverse) runs FK
steering in one compiled program, with no copy of any sampler.

Potentials U_t (incremental log-weight U_t - U_{t+1}; U of the first step counts whole):
  diff   U_t = lam r(x0_t)                  target p(x0) exp(lam r(x0))
  max    U_t = max over steps so far of lam r   target p exp(lam max_t r(x0_t))
  sum    U_t = sum over steps so far of lam r   target p exp(lam sum_t r(x0_t))
The step's potential is taken at its last denoiser call (for one-call samplers, at x_t).

Layout: the noise batch is `groups * particles` rows, group g in rows g k .. g k + k - 1; the
sample comes back as (x, state); `select(x, state, key)` picks one particle per group.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff.core.denoiser import lift, lower
from jaxdiff.core.process import check_values, pytree_dataclass

POTENTIALS = ("diff", "max", "sum")
RESAMPLING = ("systematic", "multinomial")


def ess(log_w):
    """Effective sample size (sum w)^2 / sum w^2 along the last axis, from log-weights."""
    return jnp.exp(2 * jax.nn.logsumexp(log_w, -1) - jax.nn.logsumexp(2 * log_w, -1))


def systematic(key, log_w):
    """k ancestor indices from k log-weights by systematic resampling (one uniform draw): index j
    appears floor(k w_j) or ceil(k w_j) times (Kitagawa 1996)."""
    k = log_w.shape[-1]
    cdf = jnp.cumsum(jax.nn.softmax(log_w))
    u = (jnp.arange(k) + jax.random.uniform(key, (), cdf.dtype)) / k
    return jnp.minimum(jnp.searchsorted(cdf, u, side="right"), k - 1).astype(jnp.int32)


def multinomial(key, log_w):
    """k ancestor indices drawn independently with probabilities softmax(log_w)."""
    return jax.random.categorical(key, log_w, shape=log_w.shape).astype(jnp.int32)


def _safe(log_w):
    """NaN -> -inf; a group whose weights are all -inf (or NaN) gets uniform weights."""
    log_w = jnp.where(jnp.isnan(log_w), -jnp.inf, log_w)
    dead = jnp.all(jnp.isneginf(log_w), axis=-1, keepdims=True)
    return jnp.where(dead, 0.0, log_w)


@pytree_dataclass(data=("inner", "log_w", "log_z", "potential", "pending", "key", "steps",
                        "resamples", "threshold"))
class Particles:
    """The FK state: the wrapped denoiser's state `inner`; per particle the log-weight since the
    last resampling, the potential U at the last step and the one the current step computed;
    per group the log normalising constant accumulated at resamplings and the resampling count;
    the key; the step count; and the ESS threshold (a fraction of `particles`)."""

    inner: Any
    log_w: Any
    log_z: Any
    potential: Any
    pending: Any
    key: Any
    steps: Any
    resamples: Any
    threshold: Any
    particles: int = 1
    scheme: str = "systematic"

    def after_step(self, i, x, carry):
        """Weights the step's potential and resamples degenerate groups (`jaxdiff.samplers.base`
        calls it after step i): returns (x, carry, state), gathered by the ancestors."""
        k = self.particles
        inc = jnp.where(self.steps == 0, self.pending, self.pending - self.potential)
        lw = _safe((self.log_w + inc).reshape(-1, k))  # (groups, k)
        g = lw.shape[0]
        do = ess(lw) < self.threshold * k  # (groups,)
        key, sub = jax.random.split(self.key)
        draw = systematic if self.scheme == "systematic" else multinomial
        anc = jax.vmap(draw)(jax.random.split(sub, g), lw)
        anc = jnp.where(do[:, None], anc, jnp.arange(k))
        rows = (jnp.arange(g)[:, None] * k + anc).reshape(-1)  # (groups * k,)
        log_z = self.log_z + jnp.where(do, jax.nn.logsumexp(lw, -1) - math.log(k), 0.0)
        gather = _gatherer(rows, x.shape)
        state = Particles(
            inner=jax.tree.map(gather, self.inner), log_w=jnp.where(do[:, None], 0.0, lw).reshape(
                -1), log_z=log_z, potential=self.pending[rows], pending=self.pending[rows],
            key=key, steps=self.steps + 1, resamples=self.resamples + do.astype(jnp.int32),
            threshold=self.threshold, particles=k, scheme=self.scheme)
        return x[rows], jax.tree.map(gather, carry), state


def _gatherer(rows, shape):
    """Gathers the leaves whose trailing dimensions are x's shape (the particles' histories,
    also stacked ones) by the ancestor rows, along their batch axis."""
    n = len(shape)

    def gather(a):
        s = jnp.shape(a)
        if len(s) >= n and tuple(s[len(s) - n:]) == tuple(shape):
            return jnp.take(a, rows, axis=len(s) - n)
        return a

    return gather


@pytree_dataclass(data=("reward", "lam", "ess_threshold", "key"))
class FK:
    """Feynman-Kac steering (module docstring) as a guidance transform for `jaxdiff.sample`.

    reward: `reward(x0, sigma) -> (B,)` log-scale scores of denoised estimates (stored as a
      `jax.tree_util.Partial`: pass a verifier's params as its arguments).
    particles: k particles per group; groups: requested samples (noise batch groups * k).
    lam: the tilt's inverse temperature; potential: "diff", "max" or "sum".
    ess_threshold: resample a group when its ESS < ess_threshold * k (1: every step unless the
      weights are equal, 0: never). The ESS is at least 1, so a group of k <= 1 / ess_threshold
      particles (2 at the default 0.5) never resamples: only its final weights act.
    resampling: "systematic" or "multinomial"; key: the resampling draws' PRNG key."""

    reward: Callable
    particles: int
    key: Any
    groups: int = 1
    lam: Any = 1.0
    potential: str = "diff"
    ess_threshold: Any = 0.5
    resampling: str = "systematic"

    def __post_init__(self):
        _check(self)
        if callable(self.reward) and not isinstance(self.reward, jax.tree_util.Partial):
            object.__setattr__(self, "reward", jax.tree_util.Partial(self.reward))

    def init(self, inner):
        """The initial `Particles` around the wrapped denoiser's state."""
        n, f = self.groups * self.particles, jnp.result_type(float)
        return Particles(
            inner=inner, log_w=jnp.zeros(n, f), log_z=jnp.zeros(self.groups, f),
            potential=jnp.zeros(n, f), pending=jnp.zeros(n, f), key=self.key,
            steps=jnp.zeros((), jnp.int32), resamples=jnp.zeros(self.groups, jnp.int32),
            threshold=jnp.asarray(self.ess_threshold, f), particles=self.particles,
            scheme=self.resampling)

    def __call__(self, D):
        fn, inner = lift(D)
        n = self.groups * self.particles

        def steered(x, sigma, *args_state):
            *args, st = args_state
            if x.shape[0] != n:
                raise ValueError(f"FK steering has groups * particles = {self.groups} * "
                                 f"{self.particles} = {n} rows but the noise has batch "
                                 f"{x.shape[0]}; allowed: noise with {n} rows")
            x0, inner_state = fn(x, sigma, *args, st.inner)
            u = (self.lam * self.reward(x0, sigma)).astype(st.pending.dtype)
            first = st.steps == 0
            if self.potential == "max":
                u = jnp.where(first, u, jnp.maximum(st.potential, u))
            elif self.potential == "sum":
                u = jnp.where(first, u, st.potential + u)
            return x0, _replace(st, inner=inner_state, pending=u)

        return lower(steered, self.init(inner))


def _replace(state, **changes):
    fields = {f: getattr(state, f) for f in state.__dataclass_fields__}
    return Particles(**{**fields, **changes})


def _check(fk):
    for name in ("particles", "groups"):
        v = getattr(fk, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"FK {name}={v!r} is invalid; allowed: an integer >= 1")
    if fk.potential not in POTENTIALS:
        raise ValueError(f"FK potential={fk.potential!r} is unknown; allowed: "
                         f"{', '.join(POTENTIALS)}")
    if fk.resampling not in RESAMPLING:
        raise ValueError(f"FK resampling={fk.resampling!r} is unknown; allowed: "
                         f"{', '.join(RESAMPLING)}")
    check_values("FK", "0 <= ess_threshold <= 1", lambda t: 0 <= t <= 1,
                 ess_threshold=fk.ess_threshold)
    check_values("FK", "a finite lam", lambda lam: True, lam=fk.lam)
    if fk.key is None or not callable(fk.reward):
        raise ValueError("FK needs reward=callable(x0, sigma) -> (B,) scores and "
                         "key=jax.random.key(...)")


def log_evidence(state):
    """(groups,) log Z-hat: the unbiased SMC estimate of E_p[exp(U)] per group (in log)."""
    lw = _safe(state.log_w.reshape(-1, state.particles))
    return state.log_z + jax.nn.logsumexp(lw, -1) - math.log(state.particles)


def weights(state):
    """(groups, k) normalised final weights of the particles."""
    return jax.nn.softmax(_safe(state.log_w.reshape(-1, state.particles)), -1)


def select(x, state, key=None):
    """One particle per group, (groups, ...): drawn by the final weights with `key`, or without
    a key the particle of highest final potential (the best reward under "diff")."""
    k = state.particles
    if key is None:
        pick = jnp.argmax(state.potential.reshape(-1, k), -1)
    else:
        lw = _safe(state.log_w.reshape(-1, k))
        pick = jax.random.categorical(key, lw, axis=-1)
    rows = jnp.arange(pick.shape[0]) * k + pick
    return x[rows]


__all__ = ["FK", "Particles", "POTENTIALS", "RESAMPLING", "ess", "systematic", "multinomial",
           "log_evidence", "weights", "select"]
