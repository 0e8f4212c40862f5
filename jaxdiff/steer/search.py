"""Inference-time search over a sampler's initial noise with a verifier (Ma et al. 2025,
"Inference-Time Scaling for Diffusion Models beyond Scaling Denoising Steps", Sec. 3).

Both searches take `generate(noise) -> samples` (a sampler with its network bound, e.g. a jitted
`jaxdiff.sample` call with a deterministic sampler, or a stochastic one with a fixed key) and
`reward(samples) -> (B,)` verifier scores, and work on `groups` requested samples at once (one
batch of groups * candidates rows per round). Their cost is counted in samples generated
(`cost`): multiply by the sampler's NFE for the network calls.

  best_of_n         random search: n noises per group, keep the best-scoring sample.
  zero_order_search Ma et al.'s zero-order search: start at a pivot noise, draw `candidates`
                    neighbours per round, move the pivot to the best of pivot and neighbours.
                    A neighbour is sqrt(1 - radius^2) pivot + radius z, z ~ N(0, I): it keeps
                    the N(0, I) marginal of the noise (radius 1: a fresh draw, i.e. random
                    search; the paper perturbs additively).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.core.process import check_values


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 1")


def _pick(scores, *arrays):
    """Per group (axis 0) the entry of highest score along axis 1, of scores and each array."""
    pick = jnp.argmax(scores, 1)
    g = jnp.arange(scores.shape[0])
    return scores[g, pick], *(a[g, pick] for a in arrays)


def best_of_n(generate, reward, key, shape, *, n, groups=1):
    """(samples (groups, ...), scores (groups,), info): the best of n samples per group by
    `reward`; info = {"cost": samples generated, "scores": all scores (groups, n)}."""
    _check_count("best_of_n n", n)
    _check_count("best_of_n groups", groups)
    noise = jax.random.normal(key, (groups * n, *shape), jnp.result_type(float))
    x = generate(noise)
    scores = reward(x).reshape(groups, n)
    best_s, best = _pick(scores, x.reshape(groups, n, *x.shape[1:]))
    return best, best_s, {"cost": groups * n, "scores": scores}


def zero_order_search(generate, reward, key, shape, *, rounds, candidates, radius=0.5,
                      groups=1):
    """(samples (groups, ...), scores (groups,), info): Ma et al.'s zero-order search (module
    docstring), `rounds` rounds of `candidates` neighbours; info = {"cost": samples generated,
    "history": the pivot's score at the start and after each round (rounds + 1, groups)}."""
    _check_count("zero_order_search rounds", rounds)
    _check_count("zero_order_search candidates", candidates)
    _check_count("zero_order_search groups", groups)
    check_values("zero_order_search", "0 < radius <= 1", lambda r: 0 < r <= 1, radius=radius)
    key, sub = jax.random.split(key)
    pivot = jax.random.normal(sub, (groups, *shape), jnp.result_type(float))
    best = generate(pivot)
    best_s = reward(best)
    history = [best_s]
    for _ in range(rounds):  # a few rounds, each one batched call: a Python loop is fine here
        key, sub = jax.random.split(key)
        z = jax.random.normal(sub, (groups, candidates, *shape), pivot.dtype)
        near = jnp.sqrt(1 - radius**2) * pivot[:, None] + radius * z  # (groups, c, *shape)
        x = generate(near.reshape(-1, *shape))
        scores = reward(x).reshape(groups, candidates)
        x = x.reshape(groups, candidates, *x.shape[1:])
        best_s, best, pivot = _pick(
            jnp.concatenate([best_s[:, None], scores], 1),
            jnp.concatenate([best[:, None], x], 1), jnp.concatenate([pivot[:, None], near], 1))
        history.append(best_s)
    return best, best_s, {"cost": groups * (1 + rounds * candidates),
                          "history": jnp.stack(history)}


__all__ = ["best_of_n", "zero_order_search"]
