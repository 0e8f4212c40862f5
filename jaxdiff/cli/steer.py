"""`NAME[:KEY=VALUE,...]` specs of the command line (`--steer`, `--reward`, `jaxdiff solve
--solver`), and `jaxdiff sample --steer/--reward`: a trained run's sampler steered by a reward
(`jaxdiff.steer`), or only scored by it.

    jaxdiff sample --workdir RUN --steer smc:particles=8 --reward classifier:digit=3 --num 8
    jaxdiff sample --workdir RUN --steer best_of_n:n=8 --reward classifier:digit=3
    jaxdiff sample --workdir RUN --steer search:rounds=2,candidates=3 --reward classifier:digit=3
    jaxdiff sample --workdir RUN --reward classifier:digit=3      (no steering: the baseline)

Steering (defaults in brackets):
  smc        Feynman-Kac steering (`jaxdiff.steer.FK`): particles [4] per returned sample, the
             tilt's lam [1.0], potential diff|max|sum [diff], ess_threshold [0.5], resampling
             systematic|multinomial [systematic]. The noise batch is num * particles rows; one
             particle per group is drawn by the final weights (`select` with a key). Sampler:
             --sampler, else the run's sampler when it is stochastic, else euler_ancestral; a
             deterministic sampler given by --sampler only reweights and duplicates particles
             (no new diversity after a resampling).
  best_of_n  n [4] samples per returned one, the best by the reward (`best_of_n`).
  search     zero-order noise search (`zero_order_search`): rounds [2] of candidates [3]
             neighbours at radius [0.5] around the best noise so far.
best_of_n and search use --sampler or the run's sampler. Every kind needs a fixed-grid sampler
(not dpm_adaptive or ode).

Rewards: classifier:digit=D, log p(D | x0) under the built-in digits classifier
(`jaxdiff.eval.digits.log_prob`), for runs on the digits datasets only. With a reward the
model is sampled unconditionally (the null label, no CFG) unless --class K is given (then CFG
at --guidance, else the run's scale, as `jaxdiff sample` does).

The module's top imports nothing heavy: the flag checks parse the specs before jax is loaded.
"""

from __future__ import annotations

import math
import os
import sys

POTENTIALS = ("diff", "max", "sum")  # jaxdiff.steer.POTENTIALS (tests/test_solve_cli.py checks)
RESAMPLING = ("systematic", "multinomial")  # jaxdiff.steer.RESAMPLING
ADAPTIVE = ("dpm_adaptive", "ode")  # samplers without a fixed grid: no steering
SMC_SAMPLER = "euler_ancestral"  # --steer smc's sampler when the run's is deterministic


def _count(v):
    return v >= 1


# kind -> {setting: (type, default (None: required), check, what is allowed)}
STEER = {
    "smc": {"particles": (int, 4, _count, "an integer >= 1"),
            "lam": (float, 1.0, math.isfinite, "a finite number"),
            "potential": (str, "diff", POTENTIALS.__contains__, ", ".join(POTENTIALS)),
            "ess_threshold": (float, 0.5, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
            "resampling": (str, "systematic", RESAMPLING.__contains__, ", ".join(RESAMPLING))},
    "best_of_n": {"n": (int, 4, _count, "an integer >= 1")},
    "search": {"rounds": (int, 2, _count, "an integer >= 1"),
               "candidates": (int, 3, _count, "an integer >= 1"),
               "radius": (float, 0.5, lambda v: 0 < v <= 1, "a number in (0, 1]")},
}
REWARDS = {"classifier": {"digit": (int, None, lambda v: 0 <= v <= 9, "an integer 0..9")}}
REWARD_FORMS = "classifier:digit=D"


def parse_spec(text, flag, kinds, forms=None, defaults=True):
    """`NAME[:KEY=VALUE,...]` -> (NAME, {KEY: value}) with every setting of `kinds[NAME]`
    (`defaults`: those not given filled in), each converted to its type and checked; a one-line
    ValueError naming `flag` otherwise. `forms`: the allowed forms, for the errors."""
    text = str(text)
    where = f"{flag}={text}"
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in kinds:
        allowed = forms or ", ".join(kinds)
        raise ValueError(f"{where}: unknown kind {name!r}; allowed: {allowed}")
    table, got = kinds[name], {}
    for item in (rest.split(",") if rest.strip() else ()):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ValueError(f"{where}: {item.strip()!r} is not KEY=VALUE; expected "
                             f"{name}:KEY=VALUE,... with KEY one of {', '.join(table) or 'none'}")
        if key not in table:
            raise ValueError(f"{where}: {name} has no setting {key!r}; allowed: "
                             f"{', '.join(table) or 'none'}")
        if key in got:
            raise ValueError(f"{where}: {key} is given twice")
        kind, _, check, rule = table[key]
        try:
            v = kind(value)
        except ValueError:
            v = None
        if v is None or (kind is float and not math.isfinite(v)) or (
                check is not None and not check(v)):
            raise ValueError(f"{where}: {key}={value} is invalid; allowed: {rule}")
        got[key] = v
    for key, (_, default, _, rule) in table.items():
        if key not in got and defaults:
            if default is None:
                raise ValueError(f"{where}: {name} needs {key}= ({rule}), e.g. "
                                 f"{forms or name + ':' + key + '=1'}")
            got[key] = default
    return name, got


def parse_steer(text):
    return parse_spec(text, "--steer", STEER)


def parse_reward(text):
    return parse_spec(text, "--reward", REWARDS, REWARD_FORMS)


def batch_factor(steer):
    """Rows sampled at once per returned sample under the --steer spec (None: 1)."""
    if steer is None:
        return 1
    kind, settings = parse_steer(steer)
    return settings[{"smc": "particles", "best_of_n": "n", "search": "candidates"}[kind]]


def check_flags(flags, command):
    """--steer and --reward of `jaxdiff sample` (before jax is imported): their specs, what
    they combine with, and a fixed-grid --sampler."""
    steer, reward = flags.steer, flags.reward
    given = [f"--{n}={flags[n].value}" for n in ("steer", "reward") if flags[n].value is not None]
    if not given:
        return
    if command != "sample":
        raise ValueError(f"{given[0]}: it is a flag of jaxdiff sample, not of jaxdiff {command}")
    if steer is not None and reward is None:
        raise ValueError(f"--steer={steer} needs --reward, e.g. --reward={REWARD_FORMS}")
    if steer is not None:
        parse_steer(steer)
    parse_reward(reward)
    for other in ("cache", "quantized", "sampler_file", "scheduler_config"):
        value = flags[other].value
        if value is not None and not (other == "cache" and value.strip().lower() == "none"):
            raise ValueError(f"{given[0]} and --{other}={value}: steering and rewards sample the "
                             f"run's float network with its own sampler; give one of them")
    if flags.sampler in ADAPTIVE:
        raise ValueError(f"--sampler={flags.sampler} is adaptive (no fixed grid); {given[0]} "
                         "needs a fixed-grid sampler, e.g. euler_ancestral, ddpm, dpmpp_2m")


# --- jaxdiff sample --steer / --reward -------------------------------------------------------

def _counting(net, x, t, *args_state):
    """A network call that counts itself: (net(x, t, *args), count + 1)."""
    *args, count = args_state
    return net(x, t, *args), count + 1


def counted(net):
    """`net` as a `Stateful` network whose state counts its calls (no copy of the network)."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.core.denoiser import Stateful

    return Stateful(jax.tree_util.Partial(_counting, net), jnp.zeros((), jnp.int32))


def is_stochastic(sampler):
    """Whether the sampler named `sampler` draws noise (needs a key)."""
    import inspect

    from jaxdiff import samplers

    params = inspect.signature(samplers.get(sampler)).parameters
    return "key" in params and params["key"].default is inspect.Parameter.empty


def guidance_for(config, n, label, scale):
    """How the network takes labels for a batch of `n`: None (unconditional model), the null
    label bound (label None: the model's unconditional pass), or label `label` under CFG at
    `scale` (else the run's); a distilled student its one-pass conditioning."""
    import jax.numpy as jnp

    from jaxdiff.cli import commands
    from jaxdiff.core.guidance import CFG, Conditioning

    K = commands.classes(config)
    if not K:
        return None
    y = jnp.full(n, K if label is None else label, jnp.int32)
    if "distill" in config:
        from jaxdiff.cli.distill_stages import conditioning

        return conditioning(config, y, scale)
    if label is None:
        return Conditioning((y,))
    return CFG(scale=config.sampler.guidance if scale is None else scale, y=y,
               y_null=jnp.full(n, K, jnp.int32))


def classifier_reward(config, digit, flag):
    """`reward(x0, sigma) -> (B,)`: log p(digit | x0) under the dataset's built-in classifier;
    refused in one line where the dataset has none (`quality.classifier_agreement_fn`)."""
    from jaxdiff.data import DIGITS
    from jaxdiff.eval import quality

    if quality.classifier_agreement_fn(config.data.name) is None:
        raise ValueError(f"{flag}: the dataset {config.data.name!r} of this run has no built-in "
                         f"classifier; allowed: runs on {', '.join(DIGITS)}")
    import jax
    import jax.numpy as jnp

    from jaxdiff.eval import digits

    # the classifier's params loaded here, outside any trace, and bound as data
    return jax.tree_util.Partial(_log_prob, digits.load()[0], jnp.asarray(digit, jnp.int32))


def _log_prob(params, digit, x0, sigma=None):
    """log p(digit | x0) per sample under the built-in digits classifier with `params`."""
    import jax.numpy as jnp

    from jaxdiff.eval import digits

    return digits.log_prob(x0, jnp.full(x0.shape[0], digit, jnp.int32), params)


def sample(config, workdir, *, out, num, seed, sampler=None, steps=None, label=None,
           guidance=None, steer=None, reward):
    """`jaxdiff sample --steer/--reward`: `num` samples of the run's EMA network steered by
    `steer` (a spec, None: not steered) toward `reward`; writes `out` (PNG) and its .npz
    (samples, labels, rewards) and prints one line: the network evaluations per returned
    sample (a CFG call counts 2) and the samples' mean reward and classifier agreement.

    The noise is `jaxdiff sample`'s: row i from fold_in(key(seed), i), the sampler's key
    key(seed + 1); smc's groups take rows g * particles .. (g + 1) * particles - 1."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxdiff
    from jaxdiff import steer as steer_lib
    from jaxdiff import train as train_lib
    from jaxdiff.cli import build, commands
    from jaxdiff.core.guidance import CFG, Chain
    from jaxdiff.eval import digits
    from jaxdiff.train import parallel

    kind, settings = parse_steer(steer) if steer is not None else (None, {})
    _, rsettings = parse_reward(reward)
    digit = rsettings["digit"]
    score = classifier_reward(config, digit, f"--reward={reward}")
    K = commands.classes(config)
    if label is not None and not 0 <= label < K:
        raise ValueError(f"--class={label} is not a class of this model; allowed: 0..{K - 1}")
    s = config.sampler
    name = sampler or s.name
    if sampler is None and kind == "smc" and not is_stochastic(name):
        name = SMC_SAMPLER
    if name in ADAPTIVE:
        raise ValueError(f"the run's sampler {name!r} is adaptive (no fixed grid); steering "
                         "needs a fixed-grid one: pass --sampler, e.g. euler_ancestral or dpmpp_2m")
    options = dict(s.options) if name == s.name else {}
    steps = steps or s.steps
    shape = tuple(build.data_info(config)["shape"])
    mesh = parallel.make_mesh()
    t0 = time.time()
    model, process, params, step = commands.restore(config, workdir, mesh)
    net = counted(train_lib.network(model, params))
    run = dict(process=process, prediction=config.loss.prediction, sampler=name, steps=steps,
               schedule=s.schedule, key=jax.random.key(seed + 1), **options)
    rows = []  # (network calls, rows a call evaluates) of every sampling run

    def noise(n):
        draw = lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(seed), i),  # noqa
                                           shape)
        return jax.vmap(draw)(jnp.arange(n))

    def cost(calls, n, guide):
        inner = guide.steps[0] if isinstance(guide, Chain) else guide
        rows.append((int(calls), n * (2 if isinstance(inner, CFG) else 1)))

    def generate(z):
        guide = guidance_for(config, z.shape[0], label, guidance)
        x, calls = jaxdiff.sample(net, z, guidance=guide, **run)
        cost(calls, z.shape[0], guide)
        return x

    def scores(x):
        return score(x, 0.0)

    described = [name if is_stochastic(name) or kind != "smc" else
                 f"{name}, deterministic: resampling only duplicates particles",
                 f"{steps} steps", "unconditional" if label is None else f"class {label}"]
    if kind == "smc":
        k = settings["particles"]
        fk = steer_lib.FK(score, particles=k, groups=num, lam=settings["lam"],
                          potential=settings["potential"],
                          ess_threshold=settings["ess_threshold"],
                          resampling=settings["resampling"],
                          key=jax.random.fold_in(jax.random.key(seed + 1), 1))
        guide = guidance_for(config, num * k, label, guidance)
        x, state = jaxdiff.sample(net, noise(num * k), guidance=fk if guide is None
                                  else Chain((guide, fk)), **run)
        cost(state.inner, num * k, guide)
        x = steer_lib.select(x, state, jax.random.fold_in(jax.random.key(seed + 1), 2))
        resamples = float(np.mean(np.asarray(state.resamples)))
        described.append(f"{resamples:.3g} resamplings per group")
    elif kind == "best_of_n":
        x, _, _ = steer_lib.best_of_n(generate, scores, jax.random.key(seed), shape,
                                      n=settings["n"], groups=num)
    elif kind == "search":
        x, _, _ = steer_lib.zero_order_search(
            generate, scores, jax.random.key(seed), shape, rounds=settings["rounds"],
            candidates=settings["candidates"], radius=settings["radius"], groups=num)
    else:
        x = generate(noise(num))
    x = np.asarray(jax.device_get(x))
    r = np.asarray(scores(jnp.asarray(x)))
    agree, _ = digits.agreement(x, np.full(num, digit))
    nfe = sum(c * n for c, n in rows) / num
    what = "no steering" if kind is None else f"steer {steer.strip()}"
    labels = None if label is None else np.full(num, label, np.int32)  # none: unconditional
    commands._save_samples(out, x)
    if jax.process_index() == 0:
        np.savez(os.path.splitext(out)[0] + ".npz", samples=x, rewards=r,
                 labels=np.zeros(0) if labels is None else labels)
        print(f"{what}: {num} samples, {nfe:.4g} NFE per sample ({', '.join(described)}); "
              f"reward {reward.strip()}: mean log p {float(r.mean()):.4g}, classifier "
              f"agreement {agree:.3g}")
        print(f"wrote {out} ({num} samples, step {step}, {time.time() - t0:.1f} s)")
        sys.stdout.flush()
    return x, r
