"""Token runs (`build.is_discrete`: process.name masked, uniform or autoregressive): their train
step, samples and report, for `jaxdiff train` and `jaxdiff sample`.

A token run trains a `TokenTransformer` on a token dataset (`digits_tokens`: 8x8 digits as 64
grey-level tokens; `shakespeare_chars`: characters of Shakespeare's plays): masked diffusion
(MDLM/MD4's NELBO), the uniform-noise process, or the autoregressive baseline (a causal mask on
the same blocks). Its samples come from `jaxdiff.discrete`'s samplers (`sampler.name`), or one
token per call for the autoregressive model. Digits samples are written as images and scored as
the continuous digits models are (classifier agreement, FD); text samples are written as text.
Every report has the held-out bits per token with its standard error (`bits_per_token`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import discrete
from jaxdiff.cli import build
from jaxdiff.data import tokens as discrete_data
from jaxdiff.data.tokens import tokens_to_images
from jaxdiff.discrete import objectives

AUTOREGRESSIVE = "autoregressive"
DIGITS_TOKENS = "digits_tokens"
REPORT_SEQUENCES = 512  # held-out sequences behind a report's bits per token
REPORT_SAMPLES = 2  # NELBO draws per sequence (masked/uniform; the AR likelihood is exact)


def train_objective(config, model, process):
    K, p = _classes(config), float(config.loss.p_uncond)
    if process is None:
        return objectives.autoregressive_objective(model, num_classes=K, p_uncond=p)
    return objectives.diffusion_objective(model, process, num_classes=K, p_uncond=p,
                                          estimator=config.loss.get("estimator") or "time")


def _classes(config):
    return int(config.model.get("num_classes", 0) or 0)


def labels_for(config, num, label=None):
    """Labels 0..K-1 cycled (or all `label`) for a class-conditional model, else None."""
    K = _classes(config)
    if not K:
        if label is not None:
            raise ValueError(f"--label={label} needs a class-conditional model "
                             "(model.num_classes=0 here)")
        return None
    if label is not None and not 0 <= label < K:
        raise ValueError(f"--label={label} is not a class; allowed: 0..{K - 1}")
    return (np.full(num, label) if label is not None else np.arange(num) % K).astype(np.int32)


def guided_denoiser(model, params, y, guidance, num_classes):
    """`denoiser(xt, t) -> logits` with classifier-free guidance in log-probability space:
    log p_u + w (log p_c - log p_u) (w = 1: the conditional model alone)."""
    if y is None or guidance == 1:
        return objectives.denoiser_of(model, params, None if y is None else jnp.asarray(y))
    y = jnp.asarray(y)
    null = jnp.full_like(y, num_classes)

    def denoiser(xt, t):
        both = model.apply({"params": params}, jnp.concatenate([xt, xt]),
                           jnp.concatenate([t, t]), jnp.concatenate([y, null]))
        cond, uncond = jnp.split(jax.nn.log_softmax(both, axis=-1), 2)
        return uncond + guidance * (cond - uncond)

    return denoiser


def draw_tokens(config, model, process, params, *, num, seed, sampler=None, steps=None,
                label=None, guidance=None):
    """(tokens int32 (num, L), labels or None, nfe): `num` samples of a token run from key(seed)
    with the config's sampler (or `sampler`, `steps`)."""
    length = int(build.data_info(config)["shape"][0])
    y = labels_for(config, num, label)
    key = jax.random.key(seed)
    s = config.sampler
    options = dict(s.options)
    if process is None:  # the autoregressive baseline: one token per network call
        run = jax.jit(lambda p, k: objectives.autoregressive_sample(
            model, p, k, batch=num, length=length, y=None if y is None else jnp.asarray(y),
            **options))
        return np.asarray(run(params, key)), y, length
    g = float(s.guidance if guidance is None else guidance)
    name, n = sampler or s.name, steps or s.steps

    def run(p, k):
        den = guided_denoiser(model, p, y, g, _classes(config))
        return discrete.sample(den, process, k, sampler=name, batch=num, length=length,
                               steps=n, **options)

    tokens, nfe = jax.jit(run)(params, key)
    return np.asarray(tokens), y, int(nfe)


def bits_per_token(config, model, process, params, split, *, num=REPORT_SEQUENCES, seed=0,
                   samples=REPORT_SAMPLES):
    """(mean, standard error) of the held-out bits per token of the first `num` sequences of
    `split`, under the unconditional model (a class-conditional network gets the null label):
    the NELBO of a diffusion model (`samples` draws each, the process's default
    estimator: masked "count", uniform "time"), the exact -log2 p(x) of the autoregressive one."""
    x, _ = discrete_data.dataset_arrays(config.data.name, split)
    x = x[:num]
    if process is None:
        nll = jax.jit(lambda p, x: -objectives.log_likelihood(model, p, x))
        per_seq = np.concatenate([np.asarray(nll(params, x[i:i + 64]))
                                  for i in range(0, len(x), 64)])
        bits = per_seq / (x.shape[1] * math.log(2))
        return float(bits.mean()), float(bits.std(ddof=1) / math.sqrt(len(bits)))
    return process.bits_per_token(objectives.denoiser_of(model, params), x,
                                  jax.random.key(seed), batch_size=64,
                                  num_samples=samples)


def sample_extension(config):
    """What `jaxdiff sample` writes for a run: ".txt" for a text token run, else ".png"."""
    text = build.is_discrete(config) and config.data.name != DIGITS_TOKENS
    return ".txt" if text else ".png"


def save_samples(config, path, tokens, labels):
    """Digits: a PNG grid (K columns for a class-conditional model); text: a .txt file, one
    sample per paragraph."""
    from jaxdiff.cli import commands

    if config.data.name == DIGITS_TOKENS:
        commands._save_samples(path + ".png", tokens_to_images(tokens), cols=_classes(config)
                               or None)
        return
    if jax.process_index() != 0:
        return
    vocab = discrete_data.vocab(config.data.name)
    text = "\n\n".join(f"--- sample {i} ---\n{vocab.decode(t)}" for i, t in enumerate(tokens))
    from jaxdiff.eval import images

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")

    os.makedirs(os.path.dirname(path), exist_ok=True)
    images.write_atomically(path + ".txt", write)


def unigram_entropy(tokens, vocab_size):
    """Entropy (bits) of the empirical token frequencies of samples: a sampler that lowers the
    temperature (float32 Gumbel) lowers it."""
    p = np.bincount(np.asarray(tokens).ravel(), minlength=vocab_size) / np.size(tokens)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def sample_fn(config, model, process, workdir, t_start):
    """A token run's sample_fn: train.num_samples samples every sample_every steps and at the
    end; at the last step the report (`report`)."""
    c = config.train

    def fn(state, step):
        params = state.ema_params[0]
        tokens, y, nfe = draw_tokens(config, model, process, params, num=c.num_samples, seed=0)
        save_samples(config, os.path.join(workdir, "samples", f"step_{step:07d}"), tokens, y)
        if step == c.steps:
            report(config, workdir, model, process, params, tokens, y, nfe, step, t_start)

    return fn


def report(config, workdir, model, process, params, tokens, labels, nfe, step, t_start):
    """report.json: held-out bits per token (± standard error), the samples' unigram entropy
    and NFE; digits also classifier agreement and FD as the continuous digits runs."""
    from jaxdiff.cli import commands

    info = build.data_info(config)
    split = discrete_data.HELD_OUT[config.data.name]
    bpt, se = bits_per_token(config, model, process, params, split)
    held_out = len(discrete_data.dataset_arrays(config.data.name, split)[0])
    out = {"step": step, "train_wall_s": round(time.time() - t_start, 1),
           "num_samples": len(tokens), "process": config.process.name,
           "sampler": AUTOREGRESSIVE if process is None else config.sampler.name,
           "sampler_steps": None if process is None else config.sampler.steps, "nfe": nfe,
           "bits_per_token": bpt, "bits_per_token_se": se, "bits_per_token_split": split,
           "bits_per_token_sequences": min(REPORT_SEQUENCES, held_out),
           "sample_unigram_entropy_bits": unigram_entropy(tokens, info["vocab_size"])}
    if config.data.name == DIGITS_TOKENS:
        as_digits = copy.deepcopy(config)
        with as_digits.unlocked():
            as_digits.data.name = "digits"
        x = tokens_to_images(tokens)
        from jaxdiff.eval import quality

        acc = quality.classifier_agreement_fn("digits")
        if acc is not None and labels is not None:
            out["classifier_agreement"], out["per_class"] = acc(x, labels)
        out.update(commands._fd(as_digits, x))
    commands.write_json(os.path.join(workdir, "report.json"), out)
    if jax.process_index() == 0:
        print("report: " + json.dumps(out))
