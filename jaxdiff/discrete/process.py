"""Discrete diffusion processes on token sequences: masked (absorbing) and uniform noise.

Tokens are int32 (B, L) over the clean vocabulary {0..V-1}; the masked process writes the mask
id V. A denoiser is `denoiser(xt, t) -> logits`, xt int32 (B, L), t float32 (B,) in [0, 1],
logits float32 (B, L, V) over the clean tokens only.

Both processes share the schedule alpha(t), the probability that a token still carries its
clean value (masked) or has not been resampled (uniform):

  linear   alpha = 1 - t                                    (MDLM, Sahoo et al. 2024)
  cosine   alpha = 1 - cos(pi/2 (1 - t)) = 2 sin^2(pi (1 - t) / 4),
           1 - alpha = sin(pi t / 2)                        (MD4, Shi et al. 2024, Table 1)

with alpha(0) = 1 and alpha(1) = 0. The masking probability 1 - alpha and alpha itself are each
computed in a form without cancellation near its small end, so 1 - alpha(t) keeps full relative
precision for t near 0 and alpha(t) for t near 1. The masked NELBO weight
-alpha'/(1 - alpha) is 1/t (linear) and (pi/2) cot(pi t/2) = (pi/2) tan(pi/2 (1 - t)) (cosine,
MD4's Table 1).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.token_transformer import check_tokens

SCHEDULES = ("linear", "cosine")
ESTIMATORS = ("count", "time")  # MaskedProcess's (the first is the default); UniformProcess: time
LN2 = math.log(2.0)


def _float(t):
    """t as a float array of at least float32 precision."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        return t.astype(jnp.float32)
    return t.astype(jnp.promote_types(t.dtype, jnp.float32))


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class _Scheduled:
    vocab_size: int
    schedule: str = "linear"

    def __post_init__(self):
        v = self.vocab_size
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; allowed: {SCHEDULES}")

    def alpha(self, t):
        """alpha(t): probability that a token is still clean (module docstring)."""
        t = _float(t)
        if self.schedule == "linear":
            return 1.0 - t
        return 2.0 * jnp.square(jnp.sin(0.25 * math.pi * (1.0 - t)))

    def mask_prob(self, t):
        """1 - alpha(t), with full relative precision near t = 0."""
        t = _float(t)
        if self.schedule == "linear":
            return t
        return jnp.sin(0.5 * math.pi * t)

    def dalpha(self, t):
        """alpha'(t), analytic."""
        t = _float(t)
        if self.schedule == "linear":
            return -jnp.ones_like(t)
        return -0.5 * math.pi * jnp.cos(0.5 * math.pi * t)

    def t_of_mask_prob(self, m):
        """The inverse of `mask_prob`: the t with 1 - alpha(t) = m, m in [0, 1]."""
        m = jnp.clip(_float(m), 0.0, 1.0)
        if self.schedule == "linear":
            return m
        return jnp.arcsin(m) * (2.0 / math.pi)

    def weight(self, t):
        """-alpha'(t) / (1 - alpha(t)): the masked NELBO's weight (MDLM eq. 10)."""
        return -self.dalpha(t) / self.mask_prob(t)

    def _times(self, key, batch, t_min, antithetic):
        """t on [t_min, 1): uniform, or antithetic/low-discrepancy over the batch as in MDLM
        (t_b = (u + b/B) mod 1)."""
        if antithetic:
            u = jnp.mod(jax.random.uniform(key, ()) + jnp.arange(batch) / batch, 1.0)
        else:
            u = jax.random.uniform(key, (batch,))
        return t_min + (1.0 - t_min) * u

    def _values(self, denoiser, x0, key, num_samples, estimator, t_min):
        keys = jax.random.split(key, num_samples)
        if estimator == "time":
            fn = lambda k: self._time_values(denoiser, x0, k, t_min, False)
        else:
            fn = lambda k: self._count_values(denoiser, x0, k)
        return jax.lax.map(fn, keys)  # (S, B)

    def _check_estimate(self, x0, num_samples, estimator, t_min, what="x0"):
        allowed = self.ESTIMATORS
        if estimator not in allowed:
            raise ValueError(f"estimator={estimator!r} is unknown for {type(self).__name__}; "
                             f"allowed: {', '.join(allowed)}")
        _check_int("num_samples", num_samples)
        _check_t_min(t_min)
        if np.ndim(x0) != 2:
            raise ValueError(f"{what} must be (B, L) tokens, got shape {np.shape(x0)}")
        check_tokens(x0, self.vocab_size, allow_mask=False, what=what)

    def nelbo(self, denoiser, x0, key, *, num_samples=16, estimator=None, t_min=1e-5):
        """Monte-Carlo NELBO per sequence (nats): (mean (B,), standard error (B,)) over
        `num_samples` independent draws (NaN error for one draw). "time": the MDLM estimator on
        [t_min, 1); "count": the time-agnostic form (lower variance); both estimate the same
        NELBO for a time-agnostic denoiser. Default: the process's first of `ESTIMATORS`."""
        estimator = estimator or self.ESTIMATORS[0]
        self._check_estimate(x0, num_samples, estimator, t_min)
        x0 = jnp.asarray(x0, jnp.int32)
        run = jax.jit(lambda x, k: self._values(denoiser, x, k, num_samples, estimator, t_min))
        vals = run(x0, key)
        se = jnp.std(vals, axis=0, ddof=1) / math.sqrt(num_samples) if num_samples > 1 else \
            jnp.full(vals.shape[1:], jnp.nan)
        return jnp.mean(vals, axis=0), se

    def bits_per_token(self, denoiser, tokens, key, *, batch_size=64, num_samples=1,
                       estimator=None, t_min=1e-5):
        """Dataset bits per token: (mean NELBO / (L ln 2), its standard error) over the (N, L)
        `tokens`, in batches (one compiled batch function; the last batch is padded). The error
        is that of the mean over sequences of each sequence's mean over samples (so it includes
        both the data's and the estimator's spread); with one sequence, over its samples."""
        estimator = estimator or self.ESTIMATORS[0]
        self._check_estimate(tokens, num_samples, estimator, t_min, what="tokens")
        _check_int("batch_size", batch_size)
        tokens = np.asarray(tokens, np.int32)
        N, L = tokens.shape
        if N == 0:
            raise ValueError("tokens must hold at least one sequence, got 0")
        run = jax.jit(lambda x, k: self._values(denoiser, x, k, num_samples, estimator, t_min))
        out = []
        for i, start in enumerate(range(0, N, batch_size)):
            chunk = tokens[start:start + batch_size]
            n = chunk.shape[0]
            if n < batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, 0)])
            out.append(np.asarray(run(jnp.asarray(chunk), jax.random.fold_in(key, i)))[:, :n])
        vals = np.concatenate(out, axis=1).astype(np.float64) / (L * LN2)  # (S, N)
        per_seq = vals.mean(axis=0)
        if N > 1:
            se = per_seq.std(ddof=1) / math.sqrt(N)
        else:
            se = vals.std(ddof=1) / math.sqrt(vals.size) if vals.size > 1 else float("nan")
        return float(per_seq.mean()), float(se)


def _check_t_min(t_min):
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must be in [0, 1), got {t_min!r}")


@dataclasses.dataclass(frozen=True)
class MaskedProcess(_Scheduled):
    """Masked (absorbing-state) diffusion (MDLM, Sahoo et al. 2024; MD4, Shi et al. 2024): each
    token independently becomes the mask id V with probability 1 - alpha(t)."""

    ESTIMATORS = ESTIMATORS

    @property
    def mask_id(self):
        return self.vocab_size

    def corrupt(self, key, x0, t):
        """x_t ~ q(x_t | x0): mask each token independently with probability 1 - alpha(t); t is a
        scalar or one time per sequence."""
        m = jnp.reshape(self.mask_prob(t), (-1,) + (1,) * (x0.ndim - 1))
        u = jax.random.uniform(key, x0.shape, dtype=m.dtype)
        return jnp.where(u < m, self.mask_id, x0).astype(jnp.int32)

    def subs_log_probs(self, logits, xt):
        """SUBS parameterisation (MDLM Sec. 3.2): log-softmax of the logits over V at masked
        positions; an unmasked position carries its own token (log prob 0 on xt, -inf
        elsewhere). The mask itself never gets probability (the logits exclude it)."""
        logp = jax.nn.log_softmax(_float(logits), axis=-1)
        own = jnp.arange(logp.shape[-1]) == xt[..., None]
        carried = jnp.where(own, 0.0, -jnp.inf).astype(logp.dtype)
        return jnp.where((xt == self.mask_id)[..., None], logp, carried)

    def _masked_nll(self, logits, xt, x0):
        """sum over masked l of -log p(x0_l | xt), per sequence."""
        logp = jax.nn.log_softmax(_float(logits), axis=-1)
        ll = jnp.take_along_axis(logp, x0[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return -jnp.sum(jnp.where(xt == self.mask_id, ll, 0.0), axis=-1)

    def nelbo_integrand(self, logits, xt, x0, t):
        """weight(t) * sum_{masked l} -log p(x0_l | xt) (B,): NELBO = int_0^1 E_xt[.] dt."""
        return self.weight(t) * self._masked_nll(logits, xt, x0)

    def _time_values(self, denoiser, x0, key, t_min, antithetic):
        k_t, k_mask = jax.random.split(key)
        t = self._times(k_t, x0.shape[0], t_min, antithetic)
        xt = self.corrupt(k_mask, x0, t)
        return (1.0 - t_min) * self.nelbo_integrand(denoiser(xt, t), xt, x0, t)

    def _count_values(self, denoiser, x0, key, antithetic=False):
        """One sample of the time-agnostic NELBO (RADD, Ou et al. 2024):
        sum_k (1/k) E_{|M|=k}[sum_{l in M} -log p(x0_l | x_M masked)] estimated with
        k ~ U{1..L}, M uniform of size k: L/k * sum_{l in M}. A time-conditioned denoiser gets
        the t whose masking probability is k/L. `antithetic`: k stratified over the batch,
        k_b = 1 + floor(L ((u + b/B) mod 1)), as the time estimator's t."""
        B, L = x0.shape
        k_k, k_m = jax.random.split(key)
        if antithetic:
            u = jnp.mod(jax.random.uniform(k_k, ()) + jnp.arange(B) / B, 1.0)
            k = jnp.minimum(jnp.floor(u * L).astype(jnp.int32) + 1, L)
        else:
            k = jax.random.randint(k_k, (B,), 1, L + 1)
        rank = jnp.argsort(jnp.argsort(jax.random.uniform(k_m, (B, L)), axis=-1), axis=-1)
        xt = jnp.where(rank < k[:, None], self.mask_id, x0).astype(jnp.int32)
        t = self.t_of_mask_prob(k / L)
        return L / k * self._masked_nll(denoiser(xt, t), xt, x0)

    def loss(self, denoiser, x0, key, *, antithetic=True, t_min=1e-3, estimator="time"):
        """Continuous-time NELBO per sequence in nats (B,), the training loss. "time" (MDLM
        eq. 10; MD4 eq. 4): one t per sequence, antithetic over the batch, on [t_min, 1) (the
        integral over [0, t_min) is dropped; the weight 1/t has an infinite-variance estimator
        without it). "count": the same NELBO in its time-agnostic form (`_count_values`: k
        masked tokens, k stratified over the batch, weight L/k <= L), unbiased for a
        time-agnostic denoiser and of far lower variance (the 1/t tail is gone)."""
        _check_t_min(t_min)
        if estimator not in self.ESTIMATORS:
            raise ValueError(f"estimator={estimator!r} is unknown for {type(self).__name__}; "
                             f"allowed: {', '.join(self.ESTIMATORS)}")
        if estimator == "count":
            return self._count_values(denoiser, x0, key, antithetic)
        return self._time_values(denoiser, x0, key, t_min, antithetic)

def _h(d):
    """h(1 + d) with h(z) = z - 1 - log z, accurate for small |d| (series) and d > -1."""
    small = jnp.abs(d) < 1e-3
    ds = jnp.where(small, d, 0.0)
    series = ds * ds * (0.5 - ds / 3.0 + ds * ds / 4.0)
    dl = jnp.where(small, 1.0, d)
    return jnp.where(small, series, dl - jnp.log1p(dl))


@dataclasses.dataclass(frozen=True)
class UniformProcess(_Scheduled):
    """Uniform-noise discrete diffusion (D3PM-uniform, Austin et al. 2021; UDLM, Schiff et al.
    2024): q(x_t | x0) = alpha(t) onehot(x0) + (1 - alpha(t)) / V, tokens independent."""

    ESTIMATORS = ("time",)

    def marginal(self, x0, t):
        """q(x_t | x0) as probabilities (B, L, V)."""
        a = jnp.reshape(self.alpha(t), (-1,) + (1,) * x0.ndim)
        onehot = jax.nn.one_hot(x0, self.vocab_size, dtype=a.dtype)
        return a * onehot + (1.0 - a) / self.vocab_size

    def corrupt(self, key, x0, t):
        """x_t ~ q(x_t | x0): with probability 1 - alpha(t) a token is redrawn uniformly."""
        m = jnp.reshape(self.mask_prob(t), (-1,) + (1,) * (x0.ndim - 1))
        k_u, k_v = jax.random.split(key)
        resample = jax.random.uniform(k_u, x0.shape, dtype=m.dtype) < m
        noise = jax.random.randint(k_v, x0.shape, 0, self.vocab_size)
        return jnp.where(resample, noise, x0).astype(jnp.int32)

    def nelbo_integrand(self, logits, xt, x0, t):
        """The continuous-time NELBO's integrand (B,): NELBO = int_0^1 E_xt[.] dt.

        The t -> continuous limit of D3PM's KL sum (Austin et al. 2021) is the KL between the
        reverse CTMC given x0 and the model's (Campbell et al. 2022):
        (beta/V) sum_l sum_{y != x_l} [r - r~ + r~ log(r~/r)],  beta = -alpha'/alpha, where with
        c = alpha V/(1 - alpha), rho = 1 + c and x the current token,
          r(y)  = 1 + c p(y) - c p(x)/rho   (model: sum_x0 p(x0|xt) q_t(y|x0)/q_t(x|x0)),
          r~(y) = the same with p = onehot(x0) (the true reverse given x0).
        For the exact p(x0_l | xt) it equals -log p(x0) (the model's reverse path law is then
        the true one). Written as r~ h(r/r~), r - r~ = c [(p - e)(y) - (p - e)(x)/rho]."""
        t = _float(t)
        V = self.vocab_size
        logp = jax.nn.log_softmax(_float(logits), axis=-1)
        p = jnp.exp(logp)
        e = jax.nn.one_hot(x0, V, dtype=p.dtype)
        pe = jnp.where(e > 0, jnp.expm1(logp), p)  # p - onehot(x0), without cancellation
        a = jnp.reshape(self.alpha(t), (-1, 1, 1))
        m = jnp.reshape(self.mask_prob(t), (-1, 1, 1))
        c = a * V / m
        rho = 1.0 + c
        at_x = lambda z: jnp.take_along_axis(z, xt[..., None].astype(jnp.int32), axis=-1)
        diff = c * (pe - at_x(pe) / rho)  # r - r~
        r_true = jnp.where(at_x(e) > 0, 1.0 / rho, 1.0 + c * e)  # exact form of r~
        terms = r_true * _h(diff / r_true)
        others = jnp.arange(V) != xt[..., None]
        total = jnp.sum(jnp.where(others, terms, 0.0), axis=(-1, -2))
        alpha = self.alpha(t)
        beta = -self.dalpha(t) / jnp.where(alpha > 0, alpha, 1.0)
        return jnp.where(alpha > 0, beta / V * total, 0.0)  # at t = 1 nothing is left

    def _time_values(self, denoiser, x0, key, t_min, antithetic):
        k_t, k_x = jax.random.split(key)
        t = self._times(k_t, x0.shape[0], max(t_min, 1e-7), antithetic)
        xt = self.corrupt(k_x, x0, t)
        return (1.0 - t_min) * self.nelbo_integrand(denoiser(xt, t), xt, x0, t)

    def loss(self, denoiser, x0, key, *, antithetic=True, t_min=1e-3, estimator="time"):
        """Continuous-time NELBO per sequence in nats (B,) (`nelbo_integrand`), one t per
        sequence on [t_min, 1), antithetic over the batch; the denoiser conditions on t. The
        only `estimator` is "time" (the count form needs an absorbing state)."""
        _check_t_min(t_min)
        if estimator not in self.ESTIMATORS:
            raise ValueError(f"estimator={estimator!r} is unknown for {type(self).__name__}; "
                             f"allowed: {', '.join(self.ESTIMATORS)}")
        return self._time_values(denoiser, x0, key, t_min, antithetic)
