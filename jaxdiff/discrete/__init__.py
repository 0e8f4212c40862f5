"""Discrete diffusion over tokens: masked (absorbing-state) and uniform-noise processes, their
NELBOs and likelihood estimates (`process.py`), samplers (`samplers.py`) and training
objectives, with the autoregressive baseline (`objectives.py`). The token datasets are
`jaxdiff.data.tokens` (digits as grey-level tokens, Shakespeare's characters).

The contract, stated once (every function here follows it):

- Tokens are int32 (B, L) over a clean vocabulary {0..V-1}; the masked process writes the mask
  id V, so a network's input vocabulary is V + 1.
- A denoiser is `denoiser(xt, t) -> logits`: xt int32 (B, L), t float32 (B,) in [0, 1], logits
  float32 (B, L, V) over the clean tokens only (the mask token has probability 0: MDLM's SUBS
  rule by construction). Masked models may ignore t (they are time-agnostic: Ou et al. 2024).
  Labels and guidance are bound by the caller (`objectives.denoiser_of`).
- A sampler is `sampler(denoiser, process, key, *, batch, length, ...) -> (tokens, nfe)`, jittable
  (lax loops, static shapes), nfe the network calls made; `x_init` fixes given positions.
  Categorical draws are Gumbel-max with exact 64-bit-resolution noise by default, `gumbel=
  "float32"` reproducing the truncated noise of Zheng et al. 2024.

`sample(denoiser, process, key, sampler=NAME, batch=, length=, steps=, **options)` runs any of
`SAMPLERS` with one signature (`jaxdiff train` / `jaxdiff sample` use it); for a
`UniformProcess`, "ancestral" is `uniform_ancestral`.
"""

from __future__ import annotations

import inspect

from jaxdiff.discrete import objectives
from jaxdiff.discrete.process import MaskedProcess, UniformProcess
from jaxdiff.discrete.samplers import (
    ancestral,
    block_decoding,
    confidence_decoding,
    first_hitting,
    sample_categorical,
    uniform_ancestral,
)

SAMPLERS = {"first_hitting": first_hitting, "ancestral": ancestral,
            "confidence": confidence_decoding, "block": block_decoding}
_FIXED = ("batch", "length", "x_init")  # given by `sample` itself, not options


def sampler_options(name):
    """The options (keyword arguments besides batch, length and steps) sampler `name` takes."""
    params = inspect.signature(SAMPLERS[name]).parameters
    return tuple(p for p, v in params.items()
                 if v.kind is v.KEYWORD_ONLY and p not in _FIXED + ("steps",))


def _arguments(sampler, length, steps, options):
    """The sampler's keyword arguments from the shared `steps`: ancestral and confidence take
    it as their number of steps; block decoding splits it over its blocks (steps_per_block =
    steps / number of blocks); first-hitting takes none (one step per token)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is unknown; allowed: {', '.join(SAMPLERS)}")
    allowed = sampler_options(sampler)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not an option of sampler {sampler!r}; allowed: "
                         f"{', '.join(allowed)}")
    kw = dict(options)
    if sampler in ("ancestral", "confidence"):
        kw["steps"] = steps
    elif sampler == "block":
        block = kw.get("block_size")
        if block is None:
            raise ValueError("sampler 'block' needs the option block_size")
        if length % block:
            raise ValueError(f"length {length} is not divisible by block_size {block}")
        blocks = length // block
        if kw.get("steps_per_block") is None:
            if steps % blocks:
                raise ValueError(f"steps={steps} is not a multiple of the {blocks} blocks of "
                                 f"{block} tokens (steps are split evenly over the blocks)")
            kw["steps_per_block"] = steps // blocks
    return kw


def check_sample(process, *, sampler, length, steps, **options):
    """One-line ValueError for settings `sample` would refuse (without running anything)."""
    _check_pair(process, sampler)
    _arguments(sampler, length, steps, options)


def _check_pair(process, sampler):
    if isinstance(process, UniformProcess) and sampler != "ancestral":
        raise ValueError(f"sampler {sampler!r} needs a MaskedProcess; the uniform-noise process "
                         "samples with 'ancestral' (`uniform_ancestral`)")


def sample(denoiser, process, key, *, sampler, batch, length, steps, x_init=None, **options):
    """(tokens int32 (batch, length), nfe) from sampler `sampler` (a key of `SAMPLERS`)."""
    _check_pair(process, sampler)
    kw = _arguments(sampler, length, steps, options)
    if isinstance(process, UniformProcess):
        if x_init is not None or "cache" in kw:
            raise ValueError("the uniform-noise sampler takes no x_init and no cache")
        return uniform_ancestral(denoiser, process, key, batch=batch, length=length, **kw)
    return SAMPLERS[sampler](denoiser, process, key, batch=batch, length=length, x_init=x_init,
                             **kw)


__all__ = ["MaskedProcess", "SAMPLERS", "UniformProcess", "ancestral", "block_decoding",
           "check_sample", "confidence_decoding", "first_hitting", "objectives",
           "sample", "sample_categorical", "sampler_options", "uniform_ancestral"]
