"""Training objectives of token models for `jaxdiff.train.make_train_step`, and the
autoregressive baseline's likelihood and sampler.

`diffusion_objective` trains a denoiser network under a discrete process's continuous-time
NELBO (`MaskedProcess.loss`, `UniformProcess.loss`); `autoregressive_objective` trains a causal
network by next-token cross-entropy. Both report nats per token as the loss and bits per token
(`bpt`) as a metric, so the two kinds of model are compared in the same unit. Batches are
{"x": int32 (B, L) tokens, "label": int32 (B,)}; a class-conditional network (num_classes > 0)
sees the null label `num_classes` with probability `p_uncond` (classifier-free guidance
training).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdiff.discrete.samplers import sample_categorical

LN2 = math.log(2.0)


def _labels(batch, key, num_classes, p_uncond):
    if not num_classes:
        return None
    drop = jax.random.uniform(key, batch["label"].shape) < p_uncond
    return jnp.where(drop, num_classes, batch["label"])


def denoiser_of(model, params, y=None):
    """`denoiser(xt, t) -> logits` of a token network (`jaxdiff.discrete`'s contract) with its
    params and labels bound."""
    return lambda xt, t: model.apply({"params": params}, xt, t, y)


def diffusion_objective(model, process, *, num_classes=0, p_uncond=0.1, estimator="time"):
    """The process's NELBO per token (nats) of `model` (a `TokenTransformer` taking masks), by
    `process.loss`'s `estimator` ("time", or for a masked process "count")."""

    def objective(params, batch, key, frozen=None):
        k_loss, k_label = jax.random.split(key)
        y = _labels(batch, k_label, num_classes, p_uncond)
        x0 = batch["x"]
        nelbo = process.loss(denoiser_of(model, params, y), x0, k_loss,
                             estimator=estimator)  # (B,) nats
        loss = jnp.mean(nelbo) / x0.shape[-1]
        return loss, {"bpt": loss / LN2}

    return objective


def log_likelihood(model, params, x, y=None):
    """log p(x) (nats, (B,)) of tokens x under a causal network: Σ_i log p(x_i | x_<i)."""
    logp = jax.nn.log_softmax(model.apply({"params": params}, x, None, y), axis=-1)
    return jnp.take_along_axis(logp, x[..., None], axis=-1)[..., 0].sum(-1)


def autoregressive_objective(model, *, num_classes=0, p_uncond=0.1):
    """Next-token cross-entropy per token (nats) of a causal `model`."""

    def objective(params, batch, key, frozen=None):
        y = _labels(batch, key, num_classes, p_uncond)
        x = batch["x"]
        loss = -jnp.mean(log_likelihood(model, params, x, y)) / x.shape[-1]
        return loss, {"bpt": loss / LN2}

    return objective


def autoregressive_sample(model, params, key, *, batch, length, y=None, gumbel="exact",
                          temperature=1.0):
    """Ancestral sampling of a causal network, one token per network call (L calls on the full
    length: the causal mask makes position i's logits independent of positions >= i, so the
    unfilled positions' placeholder ids do not matter). Returns int32 (batch, length)."""
    if length > model.seq_len:
        raise ValueError(f"length={length} is longer than the model's seq_len={model.seq_len}")

    def step(i, carry):
        x, key = carry
        key, sub = jax.random.split(key)
        logits = model.apply({"params": params}, x, None, y)[:, i]
        tok = sample_categorical(sub, logits / temperature, gumbel=gumbel)
        return x.at[:, i].set(tok.astype(jnp.int32)), key

    x0 = jnp.zeros((batch, length), jnp.int32)
    x, _ = jax.lax.fori_loop(0, length, step, (x0, key))
    return x
