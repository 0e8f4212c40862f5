"""Feature caches: training-free acceleration by reusing a network's features between calls.

- DeepCache (Ma et al. 2024, Sec. 3.2): a full UNet pass every `interval` calls caches the input
  of the decoder block at a skip level; the calls in between run only the shallow branch (the
  encoder down to that skip, the decoder from it) on the cached deep feature.
- First-block cache (FORA, Selvaraju et al. 2024; FBCache, ParaAttention): a DiT runs its first
  block every call; only when that block's output changed by a relative L1 distance of at least
  `threshold` since the last full pass do the remaining blocks run, else their cached residual
  (tokens after the last block minus tokens after the first) is added.
- Δ-DiT (Chen et al. 2024): between full passes, the deviation of the rear blocks is reused
  early in sampling and that of the front blocks late.
- TaylorSeer (Liu et al. 2025): a full DiT pass every `interval` calls stores the tokens after the
  last block; in between they are extrapolated in the call index from the last `order + 1` full
  values, and only the final layer runs.

The contract (on top of `jaxdiff.samplers.base`'s stateful denoisers). `make_cache(name, model,
params, x, t, *args, **settings)` returns `Stateful(fn, init)` with `fn(x, t, *args, state) ->
(out, state)`, a drop-in `model_fn` for `jaxdiff.sample` and every sampler:

- The state (a dict of arrays: `calls`, `fulls` = full passes so far, and the cached features)
  starts from `init` at every sampling call, so nothing leaks from one call to the next.
- The decision is a scalar predicate of the state (never of one sample): under CFG the model is
  called once on [x; x] and cond and uncond share it. The skip is a `lax.cond`, so a skipped
  branch's compute does not run in the compiled program.
- Features are cached for the rows of the example `x` (under CFG give it 2B rows); a call on fewer
  rows (outside a guidance interval, on x alone) reads and updates the leading rows.
- Calls are counted, not sampler steps: an interval of N is N model calls (one step of a
  one-call-per-step sampler such as dpmpp_2m or ddim, half a step of heun).
- Numeric settings are data (`interval`, `threshold`, the values of `full_calls`): changing them
  reuses the compiled program; the skip level, the order and len(full_calls) are structure.
- Cost: `state["fulls"]` of `state["calls"]` calls ran the full branch; `branch_flops` gives
  XLA's FLOP counts of the full and the skipping branch, and `full_network_equivalents` the
  ratio of what ran to as many full passes.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core.denoiser import Stateful
from jaxdiff.models.dit import DiT
from jaxdiff.models.unet import UNet

# name -> (model class, {setting: default}): values from the papers' experiments, checked on
# the testbed (benchmarks/caching.py, RESULTS.md "Feature caches"): TaylorSeer at interval 3
# (2.9x at 50 steps, FD unchanged; interval 4 drifts at 10-20 steps); DeepCache gains most
# from a non-uniform `full_calls` schedule (`full_calls_from_changes`)
CACHES = {
    "deepcache": (UNet, dict(interval=3, skip_level=0, full_calls=None)),
    "fbcache": (DiT, dict(threshold=0.08)),
    "taylorseer": (DiT, dict(interval=3, order=2)),
    "delta_dit": (DiT, dict(interval=2, boundary=10, blocks=1)),
}


def make_cache(name, model, params, x, t, *args, **settings):
    """The cache `name` (see `CACHES`) around `model.apply(params, x, t, *args)` as a `Stateful`
    model_fn. `x`, `t`, `args`: an input as the model will get it (only shapes matter)."""
    check_cache(name, model, settings)
    s = {**CACHES[name][1], **settings}
    if name == "deepcache":
        func = DeepCache(model, s["skip_level"])
        data = dict(interval=jnp.asarray(s["interval"], jnp.int32))
        if s["full_calls"] is not None:
            data = dict(full_calls=jnp.asarray(s["full_calls"], jnp.int32))
    elif name == "fbcache":
        func = FirstBlockCache(model)
        data = dict(threshold=jnp.asarray(s["threshold"], jnp.float32))
    elif name == "taylorseer":
        func = TaylorSeer(model, s["order"])
        data = dict(interval=jnp.asarray(s["interval"], jnp.int32))
    else:
        func = DeltaDiT(model, s["blocks"])
        data = dict(interval=jnp.asarray(s["interval"], jnp.int32),
                    boundary=jnp.asarray(s["boundary"], jnp.int32))
    fn = jax.tree_util.Partial(func, params, data)
    return Stateful(fn, func.init(params, x, t, *args))


def branch_flops(stateful, x, t, *args):
    """(full, skipped): XLA's cost-analysis FLOPs of one call of a `make_cache` cache's full
    branch and of its skipping branch, on inputs shaped like x, t, args."""
    func, (params, _) = stateful.fn.func, stateful.fn.args
    full, skipped = func.branches(params, stateful.init, x, t, *args)
    return _flops(full), _flops(skipped)


def _flops(fn):
    cost = jax.jit(fn).lower().compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def full_network_equivalents(fulls, calls, flops_full, flops_skipped):
    """FLOPs of what ran (`fulls` full calls of `calls`) over FLOPs of `calls` full passes."""
    return (fulls * flops_full + (calls - fulls) * flops_skipped) / (calls * flops_full)


def check_cache(name, model, settings):
    """One-line ValueError for an unknown cache or setting, a cache for another backbone, or a
    setting out of range."""
    if name not in CACHES:
        raise ValueError(f"cache {name!r} is unknown; allowed: {', '.join(CACHES)}")
    cls, defaults = CACHES[name]
    if not isinstance(model, cls):
        fits = [n for n, (c, _) in CACHES.items() if isinstance(model, c)]
        raise ValueError(f"cache {name!r} is for a {cls.__name__}, got a {type(model).__name__}; "
                         f"allowed for it: {', '.join(fits) or 'none'}")
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"cache {name!r} has no setting {unknown[0]!r}; allowed: "
                         f"{', '.join(defaults)}")
    s = {**defaults, **settings}
    for key in ("interval", "order", "skip_level", "boundary", "blocks"):
        low = 1 if key in ("interval", "blocks") else 0
        if key in s and not (_is_int(s[key]) and s[key] >= low):
            raise ValueError(f"cache {name!r} {key}={s[key]!r} must be an integer >= {low}")
    if "skip_level" in s and s["skip_level"] >= model.num_skips():
        raise ValueError(f"cache {name!r} skip_level={s['skip_level']!r} must be at most "
                         f"{model.num_skips() - 1} (the UNet's encoder skips)")
    if "blocks" in s and 2 * s["blocks"] > model.depth:
        raise ValueError(f"cache {name!r} blocks={s['blocks']!r} must be at most depth / 2 = "
                         f"{model.depth // 2} (front and rear blocks are disjoint)")
    calls = s.get("full_calls")
    if calls is not None and (0 not in calls or not all(_is_int(c) and c >= 0 for c in calls)):
        raise ValueError(f"cache {name!r} full_calls={calls!r} must be call indices >= 0 that "
                         "include 0 (the first call fills the cache)")
    threshold = s.get("threshold", 0)
    if not (isinstance(threshold, (int, float, np.number)) and threshold >= 0):
        raise ValueError(f"cache {name!r} threshold={s['threshold']!r} must be a number >= 0")


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# --- state helpers ------------------------------------------------------------------------------

def _zeros(shape_dtype):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape_dtype)


def _counters():
    return dict(calls=jnp.zeros((), jnp.int32), fulls=jnp.zeros((), jnp.int32))


def _rows(cached, b):
    """The leading b rows of a cached feature (a call on fewer rows than the cache holds)."""
    if b > cached.shape[0]:
        raise ValueError(f"the cache holds features for {cached.shape[0]} rows and was called on "
                         f"{b}; make it with an x of {b} rows (under CFG: 2B, [x; x])")
    return cached[:b]


def _put(cached, new):
    return cached.at[: new.shape[0]].set(new.astype(cached.dtype))


def _count(state, full):
    return dict(state, calls=state["calls"] + 1, fulls=state["fulls"] + full.astype(jnp.int32))


# --- DeepCache ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DeepCache:
    """DeepCache (Ma et al. 2024) on a `UNet`: a full pass when calls % interval == 0 (uniform),
    or when the call index is in `full_calls` (a non-uniform schedule)."""

    model: Any
    skip_level: int = 0

    def full(self, params, x, t, *args):
        """(out, deep): the whole network, and the deep feature at the skip level."""
        return self.model.apply(params, x, t, *args, skip_level=self.skip_level)

    def shallow(self, params, deep, x, t, *args):
        """The output from the shallow branch on a cached deep feature."""
        return self.model.apply(params, x, t, *args, skip_level=self.skip_level, deep=deep)[0]

    def init(self, params, x, t, *args):
        deep = jax.eval_shape(self.full, params, x, t, *args)[1]
        return dict(_counters(), deep=_zeros(deep))

    def __call__(self, params, settings, x, t, *args_state):
        *args, state = args_state
        cached = _rows(state["deep"], x.shape[0])
        calls = state["calls"]
        if "full_calls" in settings:
            full = jnp.any(settings["full_calls"] == calls)
        else:
            full = calls % settings["interval"] == 0
        out, deep = jax.lax.cond(full, lambda: self.full(params, x, t, *args),
                                 lambda: (self.shallow(params, cached, x, t, *args), cached))
        return out, _count(dict(state, deep=_put(state["deep"], deep)), full)

    def branches(self, params, init, x, t, *args):
        deep = _rows(init["deep"], x.shape[0])
        return (lambda: self.full(params, x, t, *args)[0],
                lambda: self.shallow(params, deep, x, t, *args))


def feature_changes(model, params, x, t, *args, skip_level=0, capacity=256):
    """A `Stateful` full network that records how fast DeepCache's deep feature moves: sampled
    with it (as the run will sample, e.g. under the same CFG), `state["change"][i]` is the
    relative L1 change of the feature at the skip level from call i - 1 to call i (0 at call 0),
    for the first `state["calls"]` of `capacity` entries. Give it to `full_calls_from_changes`."""
    func = DeepCache(model, skip_level)
    deep = func.init(params, x, t, *args)["deep"]
    init = dict(calls=jnp.zeros((), jnp.int32), deep=deep,
                change=jnp.zeros((capacity,), jnp.float32))

    def fn(params, x, t, *args_state):
        *args, state = args_state
        out, new = func.full(params, x, t, *args)
        old = _rows(state["deep"], x.shape[0])
        change = jnp.mean(jnp.abs(new - old)) / jnp.maximum(jnp.mean(jnp.abs(old)), 1e-30)
        change = jnp.where(state["calls"] == 0, 0.0, change).astype(jnp.float32)
        return out, dict(calls=state["calls"] + 1, deep=_put(state["deep"], new),
                         change=state["change"].at[state["calls"]].set(change))

    return Stateful(jax.tree_util.Partial(fn, params), init)


def full_calls_from_changes(change, num_full):
    """A non-uniform DeepCache schedule: `num_full` call indices (0 first) that split the
    cumulative feature change (`feature_changes`, one entry per call) into equal parts, so full
    passes are denser where the features move fast."""
    change = np.asarray(change, np.float64)
    if not (_is_int(num_full) and 1 <= num_full <= len(change)):
        raise ValueError(f"num_full={num_full!r} must be an integer in 1..{len(change)} (the "
                         "number of calls)")
    cum = np.cumsum(change)  # cum[i]: change accumulated up to call i
    calls = {0}
    for k in range(1, num_full):
        calls.add(int(np.searchsorted(cum, k * cum[-1] / num_full)))
    i = 1  # ties (a jump worth several parts) take the next free calls
    while len(calls) < num_full:
        calls.add(i) if i not in calls else None
        i += 1
    return sorted(calls)


# --- DiT caches ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _DiTStages:
    """A DiT split for caches: runs of blocks (tokens in, tokens out) and the final layer."""

    model: Any

    def tokens(self, params, x, t, *args, blocks, hidden=None):
        return self.model.apply(params, x, t, *args, blocks=blocks, hidden=hidden, tokens=True)

    def head(self, params, h, x, t, *args):
        depth = self.model.depth
        return self.model.apply(params, x, t, *args, blocks=(depth, depth), hidden=h)


@dataclasses.dataclass(frozen=True)
class FirstBlockCache(_DiTStages):
    """First-block cache (FORA / FBCache): the rest of the blocks run when the first block's
    output moved by a relative L1 distance >= threshold since the last full pass."""

    def init(self, params, x, t, *args):
        h = _zeros(jax.eval_shape(lambda: self.tokens(params, x, t, *args, blocks=(0, 1))))
        return dict(_counters(), first=h, residual=h)

    def __call__(self, params, settings, x, t, *args_state):
        *args, state = args_state
        b = x.shape[0]
        first, residual = _rows(state["first"], b), _rows(state["residual"], b)
        h1 = self.tokens(params, x, t, *args, blocks=(0, 1))  # (B, T, D)
        change = jnp.mean(jnp.abs(h1 - first)) / jnp.mean(jnp.abs(first))
        # the first call, and a NaN change (0/0), recompute too
        full = (state["calls"] == 0) | ~(change < settings["threshold"])

        def rest():  # the full pass's own tokens, so that a full call is the uncached model's
            h = self.tokens(params, x, t, *args, blocks=(1, self.model.depth), hidden=h1)
            return h, h - h1, h1

        def reuse():
            return h1 + residual, residual, first

        h, residual, first = jax.lax.cond(full, rest, reuse)
        out = self.head(params, h, x, t, *args)
        new = dict(state, first=_put(state["first"], first),
                   residual=_put(state["residual"], residual))
        return out, _count(new, full)

    def branches(self, params, init, x, t, *args):
        residual = _rows(init["residual"], x.shape[0])

        def full():
            h1 = self.tokens(params, x, t, *args, blocks=(0, 1))
            h = self.tokens(params, x, t, *args, blocks=(1, self.model.depth), hidden=h1)
            return self.head(params, h, x, t, *args)

        def skipped():
            h1 = self.tokens(params, x, t, *args, blocks=(0, 1))
            return self.head(params, h1 + residual, x, t, *args)

        return full, skipped


@dataclasses.dataclass(frozen=True)
class TaylorSeer(_DiTStages):
    """TaylorSeer (Liu et al. 2025): the tokens after the last block, computed every `interval`
    calls and extrapolated in between from the last order + 1 full values."""

    order: int = 2

    def init(self, params, x, t, *args):
        h = jax.eval_shape(lambda: self.tokens(params, x, t, *args, blocks=None))
        history = jax.ShapeDtypeStruct((self.order + 1,) + h.shape, h.dtype)
        return dict(_counters(), history=_zeros(history), last=jnp.zeros((), jnp.int32))

    def __call__(self, params, settings, x, t, *args_state):
        *args, state = args_state
        b, interval = x.shape[0], settings["interval"]
        _rows(state["history"][0], b)  # checks the row count
        history = state["history"][:, :b]  # (order + 1, B, T, D), newest first

        def compute():
            h = self.tokens(params, x, t, *args, blocks=None)
            return jnp.concatenate([h[None], history[:-1]]), state["calls"], h

        def predict():
            m = (state["calls"] - state["last"]) / interval  # spacings past the last full pass
            return history, state["last"], newton_extrapolate(history, state["fulls"], m)

        full = state["calls"] % interval == 0
        history, last, h = jax.lax.cond(full, compute, predict)
        out = self.head(params, h, x, t, *args)
        new = dict(state, history=state["history"].at[:, :b].set(history), last=last)
        return out, _count(new, full)

    def branches(self, params, init, x, t, *args):
        history = init["history"][:, : x.shape[0]]
        h = lambda: self.tokens(params, x, t, *args, blocks=None)
        h_hat = lambda: newton_extrapolate(history, self.order + 1, 0.5)
        return (lambda: self.head(params, h(), x, t, *args),
                lambda: self.head(params, h_hat(), x, t, *args))


@dataclasses.dataclass(frozen=True)
class DeltaDiT(_DiTStages):
    """Δ-DiT (Chen et al. 2024): a full pass every `interval` calls stores the deviation (output
    minus input) of the first and of the last `blocks` blocks; in between, before call
    `boundary` the rear blocks are replaced by their cached deviation (the outline is set early),
    from it on the front blocks (details are refined late)."""

    blocks: int = 1

    def init(self, params, x, t, *args):
        h = _zeros(jax.eval_shape(lambda: self.tokens(params, x, t, *args, blocks=(0, 0))))
        return dict(_counters(), front=h, rear=h)

    def __call__(self, params, settings, x, t, *args_state):
        *args, state = args_state
        b, k, depth = x.shape[0], self.blocks, self.model.depth
        front, rear = _rows(state["front"], b), _rows(state["rear"], b)
        run = partial(self.tokens, params, x, t, *args)

        def full():
            h_front = run(blocks=(0, k))
            h_mid = run(blocks=(k, depth - k), hidden=h_front)
            h = run(blocks=(depth - k, depth), hidden=h_mid)
            return h, h_front - run(blocks=(0, 0)), h - h_mid

        def rear_cached():  # early: the front and middle blocks run, the rear ones are cached
            return run(blocks=(0, depth - k)) + rear, front, rear

        def front_cached():  # late: from the cached front deviation, the other blocks run
            return run(blocks=(k, depth), hidden=run(blocks=(0, 0)) + front), front, rear

        calls = state["calls"]
        full_call = calls % settings["interval"] == 0
        branch = jnp.where(full_call, 0, jnp.where(calls < settings["boundary"], 1, 2))
        h, front, rear = jax.lax.switch(branch, (full, rear_cached, front_cached))
        out = self.head(params, h, x, t, *args)
        new = dict(state, front=_put(state["front"], front), rear=_put(state["rear"], rear))
        return out, _count(new, full_call)

    def branches(self, params, init, x, t, *args):
        return (lambda: self.model.apply(params, x, t, *args),
                lambda: self.head(params, self.tokens(params, x, t, *args,
                                                      blocks=(0, self.model.depth - self.blocks)),
                                  x, t, *args))


def newton_extrapolate(history, count, m):
    """The polynomial through the last `count` (at most len(history)) values, history[0] the
    newest, at equally spaced points, evaluated m spacings past history[0]: Newton's backward
    difference form, sum_i binom(m + i - 1, i) nabla^i f. TaylorSeer's Taylor series with finite
    differences for derivatives agrees to first order; this form is exact on polynomials of
    degree len(history) - 1."""
    k = history.shape[0] - 1
    out, diff, coef = history[0], history, 1.0
    for i in range(1, k + 1):
        diff = diff[:-1] - diff[1:]  # nabla^i f at the newest points
        coef = coef * (m + i - 1) / i
        out = out + jnp.where(i < count, coef, 0.0).astype(out.dtype) * diff[0]
    return out


__all__ = ["CACHES", "DeepCache", "DeltaDiT", "FirstBlockCache", "TaylorSeer", "branch_flops",
           "check_cache", "feature_changes", "full_calls_from_changes", "full_network_equivalents",
           "make_cache", "newton_extrapolate"]


# --- specs: a cache as a string (`jaxdiff sample --cache`, config `sampler.cache`) --------------

LIST_SEP = "/"  # separates the call indices of a list setting: full_calls=0/1/2/4/8
LIST_SETTINGS = ("full_calls",)  # settings that are lists (a single index is a list of one)
SPEC_FORMAT = "NAME[:KEY=VALUE,...], e.g. deepcache:interval=3,skip_level=1"


def parse_cache(spec):
    """A cache spec `NAME[:KEY=VALUE,...]` -> (name, settings), or None for None, "" or "none".

    Values are integers, else floats; a list setting (`full_calls`) is call indices joined by
    "/" (`deepcache:full_calls=0/1/2/4/8` -> [0, 1, 2, 4, 8]). An unknown name or setting, or a
    malformed item, is a one-line ValueError naming it and what is allowed; whether the settings
    are in range and the cache fits the model is `check_cache`'s (it needs the model)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return None
    if not isinstance(spec, str):
        raise ValueError(f"cache {spec!r} is not a cache spec; allowed: None or a string "
                         f"{SPEC_FORMAT}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in CACHES:
        raise ValueError(f"cache {name!r} is unknown; allowed: {', '.join(CACHES)}")
    defaults, settings = CACHES[name][1], {}
    for item in rest.split(",") if rest.strip() else ():
        key, eq, text = (s.strip() for s in item.partition("="))
        if not eq or not key or not text:
            raise ValueError(f"cache spec {spec!r}: item {item.strip()!r} is not KEY=VALUE; "
                             f"allowed: {SPEC_FORMAT}")
        if key not in defaults:
            raise ValueError(f"cache {name!r} has no setting {key!r}; allowed: "
                             f"{', '.join(defaults)}")
        if key in settings:
            raise ValueError(f"cache spec {spec!r}: setting {key!r} is given twice")
        settings[key] = _parse_value(spec, key, text)
    return name, settings


def _parse_value(spec, key, text):
    if key in LIST_SETTINGS or LIST_SEP in text:
        parts = [p.strip() for p in text.split(LIST_SEP)]
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"cache spec {spec!r}: {key}={text!r} is not a list of call "
                             f"indices; allowed: integers joined by {LIST_SEP!r}, e.g. "
                             f"{key}=0{LIST_SEP}1{LIST_SEP}2{LIST_SEP}4") from None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise ValueError(f"cache spec {spec!r}: {key}={text!r} is not a number; allowed: an "
                     f"integer or a number (lists: integers joined by {LIST_SEP!r})")


def format_cache(name, settings=None):
    """(name, settings) -> its spec, `parse_cache`'s inverse: 'deepcache:interval=3'."""
    items = ",".join(f"{k}={LIST_SEP.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                     for k, v in (settings or {}).items())
    return f"{name}:{items}" if items else name


def _parsed(spec):
    """A spec string, or an already parsed (name, settings), as `parse_cache` gives it."""
    return tuple(spec) if isinstance(spec, (tuple, list)) else parse_cache(spec)


def cache_for(spec, model, params, x, t, *args):
    """`make_cache` of the spec (a string, or `parse_cache`'s (name, settings)) around
    `model.apply(params, x, t, *args)`, or None for no cache (None, "", "none")."""
    parsed = _parsed(spec)
    if parsed is None:
        return None
    name, settings = parsed
    return make_cache(name, model, params, x, t, *args, **settings)


def cache_cost(state, flops):
    """{calls, fulls, full_network_equivalents} of a sampling call: `state` its final state,
    `flops` `branch_flops`'s (full, skipped)."""
    calls, fulls = _count_of(state["calls"]), _count_of(state["fulls"])
    fne = full_network_equivalents(fulls, calls, *flops) if calls else float("nan")
    return dict(calls=calls, fulls=fulls, full_network_equivalents=fne)


def describe_cost(spec, state, flops):
    """One line on what a cache saved in a sampling call: 'deepcache (interval=2): 2 of 4 calls
    full, 0.62 full-network equivalents (XLA FLOPs)'. `spec` as for `cache_for`; `state`, `flops`
    as for `cache_cost`."""
    name, settings = _parsed(spec)
    head = f"{name} ({format_cache(name, settings).partition(':')[2]})" if settings else name
    c = cache_cost(state, flops)
    return (f"{head}: {c['fulls']} of {c['calls']} calls full, "
            f"{c['full_network_equivalents']:.2f} full-network equivalents (XLA FLOPs)")


def _count_of(value):
    """A counter of the state as an int; a replicated array is read from this process's copy."""
    if hasattr(value, "addressable_data"):
        value = value.addressable_data(0)
    return int(np.asarray(value))


__all__ += ["LIST_SEP", "cache_cost", "cache_for", "describe_cost", "format_cache", "parse_cache"]
