"""Checks a whole config before anything is written or trained.

Every setting that would otherwise fail late (at the first sampling, inside Flax) or train
silently wrong becomes one ValueError line naming the key, the bad value and what is allowed,
e.g. `optim.lr=-0.001 must be a finite number > 0`. The checks are cheap: the model is traced
with `jax.eval_shape` (no parameter is allocated) and sampling is traced up to the first network
call. Checks that depend on the machine (mesh sizes against the devices, the batch against the
processes) stay where the run builds its mesh and data.

An autoencoder run (model.name='autoencoder_kl') has the sections AUTOENCODER_SECTIONS and the
loss keys AUTOENCODER_LOSS; a latent run (data.latents) must name the workdir of a trained
autoencoder run on images of the same shape (`_check_latents`). A token run
(`build.is_discrete`: process.name masked, uniform or autoregressive) has the loss keys
DISCRETE_LOSS and the sampler keys DISCRETE_SAMPLER, a `jaxdiff.discrete` sampler (or
'autoregressive' for the autoregressive baseline) and a token dataset (`_check_discrete`).
"""

from __future__ import annotations

import inspect
import math
import numbers
import os

import jax
import numpy as np

from jaxdiff import data as data_lib
from jaxdiff import samplers
from jaxdiff import train as train_lib
from jaxdiff.cli import build
from jaxdiff.core import losses, schedules
from jaxdiff.core.denoiser import PREDICTIONS
from jaxdiff.core.guidance import CFG
from jaxdiff.train import parallel
from jaxdiff.train.loop import check_loop
from jaxdiff.train.step import RECONSTRUCTIONS

SECTIONS = ("model", "process", "loss", "sampler", "optim", "data", "train", "mesh", "distill",
            "teacher")
KEYS = {  # the sections with a fixed set of keys (model and process fields depend on the name)
    "loss": ("prediction", "weighting", "time_sampling", "p_uncond"),
    "sampler": ("name", "steps", "schedule", "guidance", "options", "cache"),
    "optim": ("lr", "warmup_steps", "schedule", "weight_decay", "grad_clip", "ema_decays"),
    "data": ("name", "batch_size", "random_flip", "data_dir", "latent_shape", "latents"),
    "train": ("steps", "seed", "log_every", "ckpt_every", "keep", "sample_every", "num_samples",
              "skip_nonfinite"),
    "mesh": tuple(parallel.AXES),
}
# distill, teacher: a student's (jaxdiff.distill); data.latents: a latent run's; loss.estimator:
# a token run's
OPTIONAL = {"data.latent_shape", "data.latents", "train.skip_nonfinite", "mesh.data",
            "mesh.fsdp", "mesh.tensor", "sampler.cache", "distill", "teacher", "loss.estimator"}
# an autoencoder run (build.is_autoencoder): no process or sampler, its own loss keys
AUTOENCODER_SECTIONS = ("model", "loss", "optim", "data", "train", "mesh")
AUTOENCODER_LOSS = ("reconstruction", "kl_weight")
# a token run (build.is_discrete): its loss and sampler keys
DISCRETE_LOSS = ("p_uncond", "estimator")
DISCRETE_SAMPLER = ("name", "steps", "guidance", "options")
LOOP_KEYS = {"total_steps": "train.steps", "log_every": "train.log_every",  # check_loop's names
             "ckpt_every": "train.ckpt_every", "keep": "train.keep",
             "sample_every": "train.sample_every"}
LR_SCHEDULES = ("cosine", "constant")  # jaxdiff.train.make_optimizer
# model keys that decide whether a model can take the data's shape, named in that error
SHAPE_KEYS = ("preset", "channels", "channel_mult", "attn_resolutions", "norm_groups",
              "num_heads", "patch_size", "hidden_size", "width")


def check_config(config):
    """Raises ValueError (one line, naming the key, the bad value and what is allowed) for any
    setting that would fail or silently misbehave later in training or sampling."""
    autoencoder = _is_autoencoder(config)
    discrete = build.is_discrete(config)
    _check_structure(config, autoencoder, discrete)
    _check_values(config, discrete)
    _check_loop(config)
    _check_optim(config)
    _check_mesh(config)
    _check_latents(config, autoencoder)
    info = _check_data(config)
    if discrete or info.get("tokens"):
        _check_discrete(config, info)
        return
    if autoencoder:
        _check_autoencoder(config, info["shape"])
        return
    process = _check_process(config)
    _check_classes(config, info)
    _check_sampler(config, process, info["shape"])
    _check_model(config, info["shape"])
    _check_cache(config)
    _check_distill(config)


def _grid(v):
    """An explicit grid: a list of >= 2 finite, strictly decreasing levels >= 0."""
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or len(v) < 2:
        return False
    if not all(_number(x) and x >= 0 for x in v):
        return False
    return all(a > b for a, b in zip(v, v[1:]))


def _check_distill(config):
    """A student's `distill` section (`jaxdiff.cli.distill_stages.check`)."""
    if "distill" in config:
        from jaxdiff.cli import distill_stages as run

        run.check(config)


def _check_loop(config):
    """The loop settings as `jaxdiff.train.loop.check_loop` takes them, the error naming the
    config key."""
    for name, key in LOOP_KEYS.items():
        try:
            check_loop(**{name: config.train[key.split(".")[1]]})
        except ValueError as e:
            raise ValueError(f"{e} (config: {key})") from None


def _is_autoencoder(config):
    model = config.get("model")
    return hasattr(model, "get") and model.get("name") == build.AUTOENCODER


def _check_structure(config, autoencoder=False, discrete=False):
    """Sections present and known; the fixed sections hold exactly their known keys (an
    autoencoder run: AUTOENCODER_SECTIONS, its loss AUTOENCODER_LOSS)."""
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ValueError(f"config section {unknown[0]!r} is unknown; allowed: "
                         f"{', '.join(SECTIONS)}")
    if autoencoder:
        extra = [s for s in config if s not in AUTOENCODER_SECTIONS]
        if extra:
            raise ValueError(f"config section {extra[0]!r} does not apply to an autoencoder run "
                             f"(model.name={build.AUTOENCODER!r}); its sections: "
                             f"{', '.join(AUTOENCODER_SECTIONS)}")
    sections = AUTOENCODER_SECTIONS if autoencoder else SECTIONS
    for section in sections:
        if section not in config and section not in OPTIONAL:
            raise ValueError(f"config section {section!r} is missing")
    for section in ("model",) if autoencoder else ("model", "process"):
        if "name" not in config[section]:
            raise ValueError(f"{section}.name is missing")
    keys_of = dict(KEYS, loss=AUTOENCODER_LOSS) if autoencoder else KEYS
    if discrete:
        keys_of = dict(KEYS, loss=DISCRETE_LOSS, sampler=DISCRETE_SAMPLER)
    for section, keys in keys_of.items():
        if section not in config:
            continue
        unknown = sorted(set(config[section]) - set(keys))
        if unknown:
            raise ValueError(f"{section}.{unknown[0]} is not a config key; allowed in "
                             f"{section}: {', '.join(keys)}")
        missing = [k for k in keys if k not in config[section]
                   and f"{section}.{k}" not in OPTIONAL]
        if missing:
            raise ValueError(f"{section}.{missing[0]} is missing (the {section} section needs "
                             f"{', '.join(k for k in keys if f'{section}.{k}' not in OPTIONAL)})")


def _number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _one_of(allowed):
    """A rule: one of the names `allowed`."""
    allowed = tuple(allowed)
    return (lambda v: isinstance(v, str) and v in allowed,
            f"is unknown; allowed: {', '.join(allowed)}")


RULES = {  # key: (test, what is allowed); a key missing from the config is not checked here
    "optim.lr": (lambda v: _number(v) and v > 0, "must be a finite number > 0"),
    "optim.weight_decay": (lambda v: _number(v) and v >= 0, "must be a finite number >= 0"),
    "optim.grad_clip": (lambda v: v is None or (_number(v) and v >= 0),
                        "must be a finite number >= 0 (0 or None: no clipping)"),
    "optim.schedule": _one_of(LR_SCHEDULES),
    "loss.prediction": _one_of(PREDICTIONS),
    "loss.weighting": _one_of(losses.WEIGHTINGS),
    "loss.time_sampling": _one_of(losses.TIME_SAMPLINGS),
    "loss.p_uncond": (lambda v: _number(v) and 0 <= v <= 1, "must be a probability in [0, 1]"),
    "loss.reconstruction": _one_of(RECONSTRUCTIONS),  # an autoencoder run's
    "loss.kl_weight": (lambda v: _number(v) and v >= 0, "must be a finite number >= 0"),
    "train.seed": (lambda v: _integer(v) and 0 <= v < 2**32, "must be an integer in [0, 2**32)"),
    "train.num_samples": (lambda v: _integer(v) and v >= 1, "must be an integer >= 1"),
    "train.skip_nonfinite": (lambda v: isinstance(v, bool), "must be True or False"),
    "data.random_flip": (lambda v: isinstance(v, bool), "must be True or False"),
    "sampler.name": _one_of(sorted(samplers.SAMPLERS)),
    "sampler.steps": (lambda v: _integer(v) and v >= 1, "must be an integer >= 1"),
    "sampler.schedule": (lambda v: v is None or (isinstance(v, str) and v in schedules.SCHEDULES)
                         or _grid(v),
                         f"is unknown; allowed: None (the process's default), one of "
                         f"{', '.join(schedules.SCHEDULES)}, or a list of decreasing noise "
                         "levels"),
    "sampler.guidance": (lambda v: _number(v) and v >= 0,
                         "must be a finite number >= 0 (1 = no guidance)"),
    "sampler.options": (lambda v: hasattr(v, "keys"), "must be a dict of sampler options"),
    "model.num_classes": (lambda v: _integer(v) and v >= 0,
                          "must be an integer >= 0 (0 = unconditional)"),
}


def _check_values(config, discrete=False):
    """The single-key rules of `RULES` (a token run's sampler.name: `_check_discrete`)."""
    for key, (ok, allowed) in RULES.items():
        if discrete and key == "sampler.name":
            continue
        section, name = key.split(".")
        if section in config and name in config[section]:
            value = config[section][name]
            if not ok(value):
                raise ValueError(f"{key}={value!r} {allowed}")


def _check_optim(config):
    """Warmup inside the run and EMA decays; then the optimizer builds as the run builds it."""
    o, steps = config.optim, config.train.steps
    if not (_integer(o.warmup_steps) and 0 <= o.warmup_steps < steps):
        raise ValueError(f"optim.warmup_steps={o.warmup_steps!r} must be in [0, total_steps="
                         f"{steps}) (an integer below train.steps)")
    decays = o.ema_decays
    if (isinstance(decays, str) or not hasattr(decays, "__len__") or not decays
            or not all(_number(d) and 0 <= d < 1 for d in decays)):
        shown = tuple(decays) if isinstance(decays, list) else decays
        raise ValueError(f"optim.ema_decays={shown!r} must be a non-empty list of EMA decays, "
                         "each in [0, 1)")
    build.optimizer(config)


def _check_mesh(config):
    """Mesh sizes as `jaxdiff.train.parallel.make_mesh` takes them; whether they fit the devices is
    checked where the run builds its mesh (it depends on the machine)."""
    sizes = dict(config.mesh)  # a required section (_check_structure); its keys are optional
    for name, size in sizes.items():
        if not _integer(size) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{name}={size!r} is not a mesh size; allowed: an integer >= 1 "
                             "or -1 (the rest of the devices)")
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh {sizes}: at most one axis may be -1 (the rest)")


def _check_data(config):
    """The dataset's info (known name, fixed example shape); random flips only for images."""
    d = config.data
    if not (_integer(d.batch_size) and d.batch_size >= 1):
        raise ValueError(f"data.batch_size must be positive, got {d.batch_size!r} (the global "
                         "batch: an integer >= 1)")
    try:
        info = build.data_info(config)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"data.name={d.name!r}: {_line(e)}") from None
    shape = tuple(info["shape"])
    if any(s is None for s in shape):
        raise ValueError(f"data.name={d.name!r} has images of varying size (shape {shape}); "
                         "training needs a dataset of one image size")
    if d.random_flip and len(shape) != 3:
        raise ValueError(f"data.random_flip=True does not apply to {d.name!r}: its examples are "
                         f"vectors of shape {shape}, not images; allowed: False")
    try:
        data_lib.check_random_flip(d.name, d.random_flip)
    except ValueError as e:
        raise ValueError(f"data.{_line(e)}") from None
    return dict(info, shape=shape)


def _check_latents(config, autoencoder):
    """data.latents (optional; None: train on the images): the workdir of a trained autoencoder
    run whose images have data.name's shape, and whose latents file, if any, it encoded at its
    latest checkpoint."""
    d = config.data
    vae = d.get("latents")
    if vae is None:
        return
    if not isinstance(vae, str) or not vae:
        raise ValueError(f"data.latents={vae!r} must be the --workdir of an autoencoder run "
                         "(or None: train on the images)")
    if autoencoder:
        raise ValueError(f"data.latents={vae}: an autoencoder run trains on images; allowed: "
                         "None")
    vae_config = build.autoencoder_run(vae)
    step = build.autoencoder_step(vae)
    try:
        shape = tuple(data_lib.info(d.name, data_dir=d.data_dir)["shape"])
        vae_shape = tuple(data_lib.info(vae_config.data.name,
                                        data_dir=vae_config.data.get("data_dir"))["shape"])
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"data.latents={vae} with data.name={d.name!r}: {_line(e)}") from None
    if shape != vae_shape:
        raise ValueError(f"data.latents={vae} encodes images of shape {vae_shape} "
                         f"({vae_config.data.name!r}), not the {shape} of data.name={d.name!r}")
    if d.random_flip:
        raise ValueError(f"data.random_flip=True does not apply to latents (data.latents={vae}); "
                         "allowed: False")
    path = build.latents_path(config, "train")
    if os.path.exists(path):
        try:
            with np.load(path) as f:
                made = int(f["vae_step"])
        except (OSError, ValueError, KeyError):
            raise ValueError(f"data.latents={vae}: {path} is unreadable; delete it to encode "
                             "the data anew") from None
        if made != step:
            raise ValueError(f"data.latents={vae}: its latents ({path}) were encoded at step "
                             f"{made} of the autoencoder, which is now at step {step}; delete "
                             f"{os.path.dirname(path)} to encode them anew")


def _check_discrete(config, info):
    """A token run: a token dataset, the process and model as the run builds them (init traced),
    and a sampler of `jaxdiff.discrete` with its options ('autoregressive' for the baseline)."""
    from jaxdiff import discrete

    name, p = config.data.name, config.process.name
    if not info.get("tokens"):
        raise ValueError(f"process.name={p!r} is a token process; data.name={name!r} holds "
                         "images or vectors; allowed: a token dataset "
                         f"({', '.join(data_lib.TOKENS)})")
    if not build.is_discrete(config):
        raise ValueError(f"process.name={p!r} does not apply to the tokens of data.name="
                         f"{name!r}; allowed: {', '.join(build.DISCRETE_PROCESSES)}")
    _check_classes(config, info)
    try:
        process = build.process(config)
    except (ValueError, TypeError) as e:
        line = _line(e)
        raise ValueError(line if line.startswith("process.") else
                         f"process (name={p!r}): {line}") from None
    try:
        model = build.model(config)
        tx, _ = build.optimizer(config)
        train_lib.abstract_state(model, tx, x_shape=tuple(info["shape"]),
                                 num_classes=_classes(config), ema_decays=(0.0,))
    except (ValueError, TypeError) as e:
        line = _line(e)
        raise ValueError(line if line.startswith("model.") else
                         f"model (name={config.model.name!r}): {line}") from None
    est = config.loss.get("estimator")
    allowed = () if process is None else process.ESTIMATORS
    if est is not None and est not in allowed:
        raise ValueError(f"loss.estimator={est!r} does not apply to process.name={p!r}; "
                         f"allowed: {', '.join(allowed) or 'None (the exact likelihood)'}")
    s = config.sampler
    if process is None:
        if s.name != "autoregressive":
            raise ValueError(f"sampler.name={s.name!r}: process.name='autoregressive' samples "
                             "one token per call; allowed: 'autoregressive'")
        allowed = ("gumbel", "temperature")
    else:
        if s.name not in discrete.SAMPLERS:
            raise ValueError(f"sampler.name={s.name!r} is unknown for process.name={p!r}; "
                             f"allowed: {', '.join(discrete.SAMPLERS)}")
        allowed = discrete.sampler_options(s.name)
    unknown = sorted(set(s.options) - set(allowed))
    if unknown:
        raise ValueError(f"sampler.options.{unknown[0]} is not an option of sampler "
                         f"{s.name!r}; allowed: {', '.join(allowed) or 'none'}")
    if process is not None:
        try:
            discrete.check_sample(process, sampler=s.name, length=int(info["shape"][0]),
                                  steps=s.steps, **dict(s.options))
        except (ValueError, TypeError) as e:
            raise ValueError(f"sampler.name={s.name!r} with sampler.steps={s.steps!r} and "
                             f"sampler.options={dict(s.options)!r}: {_line(e)}") from None


def _check_autoencoder(config, shape):
    """An autoencoder run's model: built from its fields, for images (H, W, C) of C channels
    whose sides its downsampling divides (so that it reconstructs their shape), its init
    traced."""
    m, name = config.model, config.data.name
    if len(shape) != 3:
        raise ValueError(f"model.name={m.name!r} takes images (H, W, C), but data.name={name!r} "
                         f"has examples of shape {shape}")
    try:
        model = build.model(config)
    except (ValueError, TypeError) as e:
        line = _line(e)
        raise ValueError(line if line.startswith("model.") else
                         f"model (name={m.name!r}): {line}") from None
    for key in ("in_channels", "out_channels"):
        if getattr(model, key) != shape[-1]:
            raise ValueError(f"model.{key}={getattr(model, key)!r} does not match the "
                             f"{shape[-1]}-channel images of data.name={name!r}; allowed: "
                             f"{shape[-1]}")
    if "sample_size" in m and m.sample_size != shape[0]:
        raise ValueError(f"model.sample_size={m.sample_size!r} does not match the {shape[0]}x"
                         f"{shape[1]} images of data.name={name!r}; allowed: {shape[0]}")
    side = 2 ** (len(model.block_out_channels) - 1)  # one 2x downsampling per level but the last
    if shape[0] % side or shape[1] % side:
        raise ValueError(f"model.block_out_channels={tuple(model.block_out_channels)!r}: "
                         f"{len(model.block_out_channels)} levels downsample by {side}, which "
                         f"does not divide the {shape[0]}x{shape[1]} images of data.name="
                         f"{name!r}; allowed: fewer levels")
    try:
        tx, _ = build.optimizer(config)
        train_lib.abstract_state(model, tx, x_shape=shape, num_classes=0, ema_decays=(0.0,))
    except Exception as e:  # any failure here means: this model cannot take this data
        raise ValueError(f"model.name={m.name!r} (block_out_channels="
                         f"{tuple(m.get('block_out_channels', ()))!r}) cannot take data.name="
                         f"{name!r} of shape {shape}: {_line(e)}") from None


def _check_process(config):
    """The process as the run builds it, and the loss's prediction against it."""
    try:
        process = build.process(config)
    except (ValueError, TypeError) as e:
        line = _line(e)
        raise ValueError(line if line.startswith("process.") else
                         f"process (name={config.process.name!r}): {line}") from None
    if config.loss.prediction == "edm" and not hasattr(process, "sigma_data"):
        raise ValueError(f"loss.prediction='edm' needs a process with sigma_data (edm); "
                         f"process.name={config.process.name!r} has none")
    return process


def _check_classes(config, info):
    """model.num_classes against the dataset's labels, and classifier-free guidance."""
    K, name, g = _classes(config), config.data.name, config.sampler.guidance
    labels = info["num_classes"]
    if K and labels == 1:
        raise ValueError(f"model.num_classes={K} but data.name={name!r} has no labels; "
                         "allowed: 0 (unconditional)")
    if K and K != labels:
        raise ValueError(f"model.num_classes={K} does not match the {labels} classes of "
                         f"data.name={name!r}; allowed: 0 (unconditional) or {labels}")
    if not K and g != 1:
        raise ValueError(f"sampler.guidance={g!r} needs a class-conditional model "
                         "(model.num_classes=0 here); allowed: 1.0 (no guidance)")
    if K and g != 1 and config.loss.p_uncond == 0:
        raise ValueError(f"sampler.guidance={g!r} needs the unconditional model that "
                         "loss.p_uncond=0 never trains; set loss.p_uncond > 0 (e.g. 0.1) or "
                         "sampler.guidance=1.0")
    drop = config.model.get("class_dropout_prob", 0.1)  # DiT's default
    if K and config.model.name == "dit" and drop == 0:
        raise ValueError(f"model.class_dropout_prob={drop!r} leaves a class-conditional DiT "
                         "without the null label that sampling (classifier-free guidance) and "
                         "loss.p_uncond use; allowed: a value in (0, 1), e.g. 0.1")


def _classes(config):
    return int(config.model.get("num_classes", 0) or 0)


class _Reached(Exception):
    """Raised by the stand-in network: sampling was set up and reached the first model call."""


def _stand_in(x, t, *args):
    raise _Reached


def _check_sampler(config, process, shape):
    """The sampler's options, then sampling traced as the run samples, up to the first network
    call (the schedule's grid for this process and the sampler's own argument checks)."""
    s = config.sampler
    params = inspect.signature(samplers.get(s.name)).parameters
    allowed = [p for p, v in params.items() if v.kind is v.KEYWORD_ONLY and p != "key"]
    unknown = sorted(set(s.options) - set(allowed))
    if unknown:
        raise ValueError(f"sampler.options.{unknown[0]} is not an option of sampler "
                         f"{s.name!r}; allowed: {', '.join(allowed) or 'none'}")
    K = _classes(config)
    guide = None if not K else CFG(scale=s.guidance, y=np.zeros(1, np.int32),
                                   y_null=np.full(1, K, np.int32))
    try:
        _sample(config, process, shape, guide)
    except _Reached:
        return
    except (ValueError, TypeError) as e:
        raise ValueError(f"sampler.name={s.name!r} with sampler.steps={s.steps!r}, "
                         f"sampler.schedule={s.schedule!r}, sampler.options={dict(s.options)!r} "
                         f"and process.name={config.process.name!r}: {_line(e)}") from None


def _sample(config, process, shape, guidance):
    import jaxdiff

    s = config.sampler
    jaxdiff.sample(_stand_in, np.zeros((1,) + tuple(shape), np.float32), process=process,
                   prediction=config.loss.prediction, sampler=s.name, steps=s.steps,
                   schedule=s.schedule, key=jax.random.key(0), guidance=guidance,
                   **dict(s.options))


def _check_model(config, shape):
    """The model's fields, then its init traced (`jax.eval_shape`) on one example of the data."""
    from jaxdiff import models

    m = config.model
    if m.name not in models.MODELS:
        raise ValueError(f"model.name={m.name!r} is unknown; allowed: {', '.join(models.MODELS)}")
    try:
        models.build(m.name, **{k: v for k, v in m.items() if k != "name"})
    except (ValueError, TypeError) as e:
        raise ValueError(f"model (name={m.name!r}): {_line(e)}") from None
    images = len(shape) == 3
    if images == (m.name == "mlp"):
        takes = "vectors (the 2-D toy sets)" if m.name == "mlp" else "images (H, W, C)"
        raise ValueError(f"model.name={m.name!r} takes {takes}, but data.name="
                         f"{config.data.name!r} has examples of shape {shape}")
    _check_attention(config, shape)
    try:
        model = build.model(config)
        tx, _ = build.optimizer(config)
        train_lib.abstract_state(model, tx, x_shape=shape, num_classes=_classes(config),
                                 ema_decays=(0.0,))
    except Exception as e:  # any failure here means: this model cannot take this data
        keys = ", ".join(f"model.{k}={m[k]!r}" for k in SHAPE_KEYS if k in m)
        raise ValueError(f"model.name={m.name!r} ({keys}) cannot take data.name="
                         f"{config.data.name!r} of shape {shape}: {_line(e)}") from None


def _check_cache(config):
    """sampler.cache (optional; None: no cache): a spec `jaxdiff.accel.cache.parse_cache` reads,
    for this model's backbone, with settings in range, under a fixed-grid sampler."""
    from jaxdiff.accel.cache import check_cache, parse_cache

    spec = config.sampler.get("cache")
    try:
        parsed = parse_cache(spec)
        if parsed is None:
            return
        name, settings = parsed
        check_cache(name, build.model(config), settings)
    except ValueError as e:
        raise ValueError(f"sampler.cache={spec!r}: {_line(e)}") from None
    if config.sampler.name == "ode":
        raise ValueError(f"sampler.cache={spec!r} needs a fixed-grid sampler: sampler.name='ode' "
                         "(diffrax, adaptive) cannot carry a cache's state; allowed: None")


def _check_attention(config, shape):
    """UNet attention only at feature-map heights the network reaches, else it is silently off."""
    m = config.model
    if m.name != "unet" or "attn_resolutions" not in m or len(shape) != 3:
        return
    mult = tuple(m.get("channel_mult", (1,)))
    reached = [shape[0] // 2**level for level in range(len(mult))]
    missed = [r for r in m.attn_resolutions if r not in reached]
    if missed:
        raise ValueError(f"model.attn_resolutions={tuple(m.attn_resolutions)!r}: {missed[0]} is "
                         f"not a feature-map height of this UNet on {shape[0]}x{shape[1]} images "
                         f"with channel_mult={mult}; allowed: heights in {tuple(reached)}")


def _line(e):
    """The first non-empty line of an error, for a one-line message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
