"""Samplers of masked diffusion models (`MaskedProcess`), all jittable (lax loops, static
shapes): ancestral (MDLM/MD4), first-hitting (Zheng et al. 2024), confidence decoding
(MaskGIT, Chang et al. 2022; LLaDA, Nie et al. 2025) and semi-autoregressive block decoding.

Each takes `denoiser(xt, t) -> logits` (B, L, V) over the clean tokens, a `MaskedProcess`, a
key and the shape, optionally `x_init` (B, L) with some positions given and the others the mask
id (never changed), and returns (tokens int32 (B, L), nfe), nfe the number of model calls made.

Categorical draws use Gumbel-max (`sample_categorical`). Zheng et al. 2024 showed that the
float32 Gumbel g = -log(-log u) is truncated: jax's float32 uniform u has 23 random mantissa
bits, so u <= 1 - 2^-23 and g <= -log(-log(1 - 2^-23)) = 15.942385 (measured); tokens needing a
larger Gumbel lose probability (roughly those below 1e-7 of the top token), which lowers the
effective temperature. The default "exact" noise is the exponential race argmax(logits - log E)
with E ~ Exp(1) from 64 random bits (`gumbel_noise`), whose cap is 65 ln 2 = 45.05.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdiff.discrete.process import MaskedProcess, UniformProcess, _check_int, check_tokens

GUMBELS = ("exact", "float32", "float64")
CONFIDENCES = ("max_prob", "sampled_prob", "margin", "neg_entropy", "random")
F32_GUMBEL_CAP = 15.942385  # -log(-log(1 - 2**-23)) in float32


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {allowed}")


def _check_temperature(temperature):
    if not isinstance(temperature, (int, float, np.floating)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")


def _x64_enabled():
    return jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.dtype(jnp.float64)


def _unit_from_words(hi, lo):
    """(hi 2^32 + lo + 1/2) 2^-64 in float32: a uniform on (0, 1) with 64-bit resolution, whose
    float32 value keeps full relative precision however small it is."""
    return (hi.astype(jnp.float32) * 2.0**-32
            + (lo.astype(jnp.float32) + 0.5) * 2.0**-64)


def exponential_from_words(hi, lo):
    """E ~ Exp(1) from two uint32 words (the W of `_unit_from_words`): E = -log1p(-W) for
    W < 1/2, and -log(1 - W) with 1 - W formed exactly from the complemented words otherwise,
    so E has float32 relative precision over its whole range [2^-65, 45.05]."""
    small = hi < jnp.uint32(2**31)
    e_small = -jnp.log1p(-_unit_from_words(hi, lo))
    e_large = -jnp.log(_unit_from_words(~hi, ~lo))
    return jnp.where(small, e_small, e_large)


def gumbel_noise(key, shape, gumbel="exact"):
    """Gumbel(0, 1) noise of `shape`.

    "float32": -log(-log u), u = jax.random.uniform float32 (cap 15.94; the inaccurate path of
    Zheng et al. 2024). "float64": the same in float64 (needs jax_enable_x64; cap 52 ln 2 =
    36.04). "exact": -log E with E from `exponential_from_words` (cap 45.05), in float32.
    "exact" serves as well as float64 here: what matters for a Gumbel-max draw is the noise's
    tail P(g > x) = 1 - exp(-e^-x), i.e. the relative accuracy of small E; it is exact to
    float32 relative precision down to E = 2^-65 (float64's u reaches 2^-52), and a relative
    error of 1e-7 in g moves probabilities by no more than float32 logits already do."""
    _check_choice("gumbel", gumbel, GUMBELS)
    if gumbel == "float32":
        u = jax.random.uniform(key, shape, jnp.float32)
        return -jnp.log(-jnp.log(u))
    if gumbel == "float64":
        if not _x64_enabled():
            raise ValueError('gumbel="float64" needs jax_enable_x64; enable it or use "exact"')
        u = jax.random.uniform(key, shape, jnp.float64)
        return -jnp.log(-jnp.log(u))
    words = jax.random.bits(key, (2, *shape), jnp.uint32)
    return -jnp.log(exponential_from_words(words[0], words[1]))


def sample_categorical(key, logits, *, gumbel="exact", temperature=1.0):
    """Draws ids ~ softmax(logits / temperature) over the last axis by Gumbel-max (int32, the
    logits' leading shape); temperature 0 is argmax."""
    _check_choice("gumbel", gumbel, GUMBELS)
    _check_temperature(temperature)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    g = gumbel_noise(key, logits.shape, gumbel)
    z = logits.astype(g.dtype) / temperature + g
    return jnp.argmax(z, axis=-1).astype(jnp.int32)


def _init(process, batch, length, x_init):
    if not isinstance(process, MaskedProcess):
        raise ValueError(f"process must be a MaskedProcess, got {type(process).__name__}")
    _check_int("batch", batch)
    _check_int("length", length)
    if x_init is None:
        return jnp.full((batch, length), process.mask_id, jnp.int32)
    if tuple(np.shape(x_init)) != (batch, length):
        raise ValueError(f"x_init must have shape ({batch}, {length}), got {np.shape(x_init)}")
    check_tokens(x_init, process.vocab_size, allow_mask=True, what="x_init")
    return jnp.asarray(x_init, jnp.int32)


def _logits(denoiser, x, t):
    return denoiser(x, t).astype(jnp.float32)


def ancestral(denoiser, process, key, *, batch, length, steps, gumbel="exact", temperature=1.0,
              x_init=None, cache=True):
    """Ancestral sampling of MDLM/MD4 on the grid t_i = 1 - i/steps. From t to s each masked
    token stays masked with probability q_stay = (1 - alpha(s)) / (1 - alpha(t)), else takes
    token v with probability (1 - q_stay) p(x0 = v | xt): one Gumbel-max draw per position over
    these V + 1 outcomes, as MDLM's sampler does (so with `gumbel="float32"` the truncation of
    Zheng et al. 2024 acts on the small per-step probabilities (1 - q_stay) p_v, and more steps
    lower the temperature more). The last step (s = 0) fills every mask. With `cache` (MDLM
    Sec. 4.2) the logits of a step that changed no token are reused (exact for a time-agnostic
    model); nfe counts the calls made. `temperature` scales the token logits only."""
    _check_int("steps", steps)
    _check_choice("gumbel", gumbel, GUMBELS)
    _check_temperature(temperature)
    x = _init(process, batch, length, x_init)
    mask_id = process.mask_id

    def step(i, carry):
        x, logits, stale, nfe, key = carry
        # (i + 1) / steps may round above 1 (1000 * float32(1/1000) > 1): clip, and end at 0
        t = jnp.clip(1.0 - i / steps, 0.0, 1.0)
        s = jnp.where(i + 1 >= steps, 0.0, jnp.clip(1.0 - (i + 1) / steps, 0.0, 1.0))
        tb = jnp.full((batch,), t, jnp.float32)
        if cache:
            logits = lax.cond(stale, lambda: _logits(denoiser, x, tb), lambda: logits)
            nfe = nfe + stale.astype(jnp.int32)
        else:
            logits = _logits(denoiser, x, tb)
            nfe = nfe + 1
        q_stay = process.mask_prob(s) / process.mask_prob(t)
        if temperature == 0:  # greedy tokens; whether to unmask stays random
            g = gumbel_noise(key, x.shape + (2,), gumbel)
            unmask_now = jnp.log1p(-q_stay) + g[..., 0] > jnp.log(q_stay) + g[..., 1]
            drawn = jnp.where(unmask_now, jnp.argmax(logits, axis=-1), mask_id)
        else:
            log_tok = jax.nn.log_softmax(logits / temperature, axis=-1)
            stay = jnp.broadcast_to(jnp.log(q_stay), x.shape)[..., None]
            outcomes = jnp.concatenate([log_tok + jnp.log1p(-q_stay), stay], axis=-1)
            drawn = sample_categorical(jax.random.fold_in(key, 1), outcomes, gumbel=gumbel)
        key = jax.random.fold_in(key, 2)
        unmask = (x == mask_id) & (drawn != process.vocab_size)
        return jnp.where(unmask, drawn, x).astype(jnp.int32), logits, jnp.any(unmask), nfe, key

    logits0 = jnp.zeros((batch, length, process.vocab_size), jnp.float32)
    carry = (x, logits0, jnp.array(True), jnp.array(0, jnp.int32), key)
    x, _, _, nfe, _ = lax.fori_loop(0, steps, step, carry)
    return x, nfe


def uniform_ancestral(denoiser, process, key, *, batch, length, steps, gumbel="exact",
                      temperature=1.0):
    """Ancestral sampling of the uniform-noise process (D3PM, Austin et al. 2021; UDLM): from
    uniformly random tokens at t = 1, each step t -> s draws every token from
    p(x_s = j | x_t = i) = sum_x0 p(x0 | x_t) q(x_t = i | x_s = j) q(x_s = j | x0) / q(x_t = i | x0)
    ∝ [a_ts [i = j] + (1 - a_ts)/V] [alpha(s) w_j + (1 - alpha(s)) sum(w)/V],
    w = p(x0 | x_t) / q(x_t = i | x0), a_ts = alpha(t)/alpha(s); the last step (s = 0) draws
    x0. nfe = steps."""
    if not isinstance(process, UniformProcess):
        raise ValueError(f"process must be a UniformProcess, got {type(process).__name__}")
    _check_int("batch", batch)
    _check_int("length", length)
    _check_int("steps", steps)
    _check_choice("gumbel", gumbel, GUMBELS)
    _check_temperature(temperature)
    V = process.vocab_size
    key, k0 = jax.random.split(key)
    x = jax.random.randint(k0, (batch, length), 0, V, jnp.int32)

    def step(i, carry):
        x, key = carry
        key, sub = jax.random.split(key)
        t = 1.0 - i / steps
        s = 1.0 - (i + 1) / steps
        p = jax.nn.softmax(_logits(denoiser, x, jnp.full((batch,), t, jnp.float32))
                           / max(temperature, 1e-30), axis=-1)
        a_s, a_t = process.alpha(s), process.alpha(t)
        a_ts = a_t / jnp.maximum(a_s, 1e-30)
        onehot = jax.nn.one_hot(x, V, dtype=p.dtype)
        w = p / (a_t * onehot + (1.0 - a_t) / V)  # p(x0 | x_t) / q(x_t | x0)
        prior = a_s * w + (1.0 - a_s) / V * jnp.sum(w, axis=-1, keepdims=True)
        like = (1.0 - a_ts) / V + a_ts * onehot  # q(x_t | x_s)
        probs = prior * like
        drawn = sample_categorical(sub, jnp.log(jnp.maximum(probs, 1e-38)), gumbel=gumbel)
        return drawn.astype(jnp.int32), key

    x, _ = lax.fori_loop(0, steps, step, (x, key))
    return x, jnp.array(steps, jnp.int32)


def first_hitting(denoiser, process, key, *, batch, length, gumbel="exact", temperature=1.0,
                  x_init=None):
    """First-hitting sampler (Zheng et al. 2024, Alg. 1): one event per masked token, each
    unmasking a uniformly chosen masked position with a token from the model's conditional.
    With n masked at time t the next event is at t' = alpha^-1(1 - u^(1/n) (1 - alpha(t))),
    u ~ U(0, 1], passed to the model as its t. nfe = the number of masks (L by default)."""
    _check_choice("gumbel", gumbel, GUMBELS)
    _check_temperature(temperature)
    x = _init(process, batch, length, x_init)
    mask_id = process.mask_id
    rows = jnp.arange(batch)

    def cond(carry):
        return jnp.any(carry[0] == mask_id)

    def body(carry):
        x, m, nfe, key = carry
        key, k_time, k_pos, k_tok = jax.random.split(key, 4)
        masked = x == mask_id
        n = jnp.sum(masked, axis=1)
        u = 1.0 - jax.random.uniform(k_time, (batch,))  # (0, 1]
        m = jnp.where(n > 0, m * jnp.exp(jnp.log(u) / jnp.maximum(n, 1)), m)
        logits = _logits(denoiser, x, process.t_of_mask_prob(m))
        score = jnp.where(masked, jax.random.uniform(k_pos, x.shape), -1.0)
        pos = jnp.argmax(score, axis=1)
        tok = sample_categorical(k_tok, logits[rows, pos], gumbel=gumbel,
                                 temperature=temperature)
        tok = jnp.where(n > 0, tok, x[rows, pos])
        return x.at[rows, pos].set(tok), m, nfe + 1, key

    carry = (x, jnp.ones((batch,), jnp.float32), jnp.array(0, jnp.int32), key)
    x, _, nfe, _ = lax.while_loop(cond, body, carry)
    return x, nfe


def _confidence(logits, tok, by, key):
    if by == "random":
        return jax.random.uniform(key, tok.shape)
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    if by == "max_prob":
        return jnp.max(p, axis=-1)
    if by == "sampled_prob":
        return jnp.take_along_axis(p, tok[..., None], axis=-1)[..., 0]
    if by == "margin":
        top2 = lax.top_k(p, 2)[0] if p.shape[-1] > 1 else jnp.concatenate([p, 0 * p], -1)
        return top2[..., 0] - top2[..., 1]
    return jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)  # neg_entropy


def _decode(denoiser, process, key, x, *, block_size, steps_per_block, gumbel, temperature,
            by):
    """Rounds of parallel decoding, blocks left to right: each round samples candidates at every
    masked position and commits the ceil(remaining / rounds left) most confident ones of the
    current block (so a block's masks are split evenly over its rounds)."""
    batch, length = x.shape
    mask_id = process.mask_id
    block_of = jnp.arange(length) // block_size

    def body(r, carry):
        x, nfe, key = carry
        key, k_tok, k_conf = jax.random.split(key, 3)
        j, i = r // steps_per_block, r % steps_per_block
        masked = x == mask_id
        eligible = masked & (block_of == j)[None, :]
        remaining = jnp.sum(eligible, axis=1)
        rounds_left = steps_per_block - i
        k = (remaining + rounds_left - 1) // rounds_left
        todo = jnp.any(eligible)

        def commit(x):
            t = process.t_of_mask_prob(jnp.mean(masked, axis=1, dtype=jnp.float32))
            logits = _logits(denoiser, x, t)
            tok = sample_categorical(k_tok, logits, gumbel=gumbel, temperature=temperature)
            conf = jnp.where(eligible, _confidence(logits, tok, by, k_conf), -jnp.inf)
            rank = jnp.argsort(jnp.argsort(-conf, axis=1, stable=True), axis=1)
            return jnp.where(eligible & (rank < k[:, None]), tok, x)

        x = lax.cond(todo, commit, lambda x: x, x)
        return x, nfe + todo.astype(jnp.int32), key

    rounds = (length // block_size) * steps_per_block
    x, nfe, _ = lax.fori_loop(0, rounds, body, (x, jnp.array(0, jnp.int32), key))
    return x, nfe


def confidence_decoding(denoiser, process, key, *, batch, length, steps, gumbel="exact",
                        temperature=1.0, by="max_prob", x_init=None):
    """MaskGIT/LLaDA-style parallel decoding: `steps` rounds, each sampling candidate tokens at
    all masked positions and committing the most confident ones (an even split of the masks
    over the rounds), the rest staying masked. `by`: "max_prob" (max_v p), "sampled_prob"
    (p of the candidate, MaskGIT), "margin" (top-1 minus top-2 probability), "neg_entropy", or
    "random" (LLaDA's random remasking). The model gets the t whose masking probability is the
    fraction still masked."""
    _check_int("steps", steps)
    _check_choice("gumbel", gumbel, GUMBELS)
    _check_choice("by", by, CONFIDENCES)
    _check_temperature(temperature)
    x = _init(process, batch, length, x_init)
    return _decode(denoiser, process, key, x, block_size=length, steps_per_block=steps,
                   gumbel=gumbel, temperature=temperature, by=by)


def block_decoding(denoiser, process, key, *, batch, length, block_size, steps_per_block,
                   gumbel="exact", temperature=1.0, by="max_prob", x_init=None):
    """Semi-autoregressive decoding (as in Block Diffusion, Arriola et al. 2025, and LLaDA's
    semi-AR mode): blocks of `block_size` left to right, each decoded by `steps_per_block`
    rounds of confidence decoding while later blocks stay masked and earlier ones fixed. With
    by="random" and steps_per_block == block_size each round unmasks one uniformly chosen
    position: first-hitting within the block."""
    _check_int("length", length)
    _check_int("block_size", block_size)
    _check_int("steps_per_block", steps_per_block)
    if length % block_size:
        raise ValueError(f"length {length} is not divisible by block_size {block_size}")
    _check_choice("gumbel", gumbel, GUMBELS)
    _check_choice("by", by, CONFIDENCES)
    _check_temperature(temperature)
    x = _init(process, batch, length, x_init)
    return _decode(denoiser, process, key, x, block_size=block_size,
                   steps_per_block=steps_per_block, gumbel=gumbel, temperature=temperature,
                   by=by)
