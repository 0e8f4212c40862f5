"""Config sections to library objects: the only place that reads config keys.

Two kinds of run besides the diffusion models: an autoencoder run (`model.name =
"autoencoder_kl"`, `is_autoencoder`: a KL-regularised `AutoencoderKL` trained on the images,
sections model, loss {reconstruction, kl_weight}, optim, data, train, mesh), and a latent run
(`data.latents = <the autoencoder run's workdir>`): a diffusion model trained on the latents of
`data.name`'s images (`latents`, cached in `<workdir>/latents/<split>.npz`), whose samples are
decoded by the autoencoder (`decoder`).

A token run (`is_discrete`: process.name in DISCRETE_PROCESSES) trains a `TokenTransformer` on a
token dataset (`jaxdiff.data.tokens`): masked or uniform-noise discrete diffusion
(`discrete_process`), or the autoregressive baseline (process.name='autoregressive', no process:
the same network with a causal mask); see `jaxdiff.cli.discrete`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from jaxdiff import data as data_lib
from jaxdiff import models
from jaxdiff import train as train_lib
from jaxdiff.core.process import PROCESSES, DiscreteVP
from jaxdiff.data import latents as latents_lib
from jaxdiff.train import parallel

AUTOENCODER = "autoencoder_kl"  # model.name of an autoencoder run
LATENTS_DIR = "latents"  # under the autoencoder run's workdir: <split>.npz

BETA_SCHEDULES = {"linear": DiscreteVP.linear, "scaled_linear": DiscreteVP.scaled_linear,
                  "cosine": DiscreteVP.cosine}


DISCRETE_PROCESSES = ("masked", "uniform", "autoregressive")  # token runs' process.name
TOKEN_MODEL = "token_transformer"


def is_discrete(cfg):
    """Whether `cfg` is a token run (process.name masked, uniform or autoregressive)."""
    p = cfg.get("process")
    return hasattr(p, "get") and p.get("name") in DISCRETE_PROCESSES


def discrete_process(cfg):
    """A token run's process over the dataset's vocabulary: `MaskedProcess` or `UniformProcess`
    with process.schedule; None for the autoregressive baseline (which takes no fields)."""
    from jaxdiff.discrete.process import MaskedProcess, UniformProcess

    kw = dict(cfg.process)
    name = kw.pop("name")
    if name == "autoregressive":
        if kw:
            raise ValueError(f"process.{sorted(kw)[0]} is not a setting of process.name="
                             "'autoregressive'; it takes none")
        return None
    unknown = sorted(set(kw) - {"schedule"})
    if unknown:
        raise ValueError(f"process.{unknown[0]} is not a setting of process.name={name!r}; "
                         "allowed: schedule")
    from jaxdiff.discrete.process import SCHEDULES

    schedule = kw.get("schedule", "linear")
    if schedule not in SCHEDULES:
        raise ValueError(f"process.schedule={schedule!r} is unknown; allowed: "
                         f"{', '.join(SCHEDULES)}")
    cls = MaskedProcess if name == "masked" else UniformProcess
    return cls(data_info(cfg)["vocab_size"], **kw)


def process(cfg):
    """config.process: {name, **fields}; discrete_vp takes beta_schedule + its arguments; a
    token run's process is `discrete_process`'s."""
    if is_discrete(cfg):
        return discrete_process(cfg)
    kw = dict(cfg.process)
    name = kw.pop("name")
    if name not in PROCESSES:
        raise ValueError(f"process.name={name!r} is unknown; allowed: {', '.join(PROCESSES)}")
    if name == "discrete_vp":
        schedule = kw.pop("beta_schedule", "linear")
        if schedule not in BETA_SCHEDULES:
            raise ValueError(f"process.beta_schedule={schedule!r} is unknown; allowed: "
                             f"{', '.join(BETA_SCHEDULES)}")
        return BETA_SCHEDULES[schedule](**kw)
    return PROCESSES[name](**kw)


def data_info(cfg):
    """{shape, num_classes} of one training example: `data.name`'s images, or with
    `data.latents` their latents (shape (h, w, latent_channels); `image_shape` the images')."""
    info = data_lib.info(cfg.data.name, data_dir=cfg.data.data_dir)
    vae = cfg.data.get("latents")
    if not vae:
        return info
    run = autoencoder_run(vae)
    autoencoder_step(vae)  # a run without a checkpoint is refused here, before its shapes
    try:
        shape = latent_shape(run.model, tuple(info["shape"]))
    except (ValueError, TypeError) as e:
        raise ValueError(f"data.latents={vae}: its autoencoder cannot encode the "
                         f"{tuple(info['shape'])} images of data.name={cfg.data.name!r} "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return dict(info, shape=shape, image_shape=tuple(info["shape"]))


def is_autoencoder(cfg):
    """Whether `cfg` trains an autoencoder (model.name='autoencoder_kl'), not a diffusion model."""
    return cfg.model.get("name") == AUTOENCODER


def model(cfg, info=None):
    """config.model: {name, **architecture}; the image size comes from the dataset (`info`:
    its `data_info`, read from the config when None)."""
    kw = dict(cfg.model)
    name = kw.pop("name")
    if name == AUTOENCODER:
        return autoencoder_model(kw)
    info = data_info(cfg) if info is None else info
    if info.get("tokens") or name == TOKEN_MODEL:
        return token_model(cfg, info)
    shape = info["shape"]
    checks = hasattr(models.MODELS.get(name), "check_image_size")  # the MLP takes vectors
    image_size = tuple(shape[:2]) if len(shape) == 3 and checks else None
    return models.build(name, image_size=image_size, **kw)


def token_model(cfg, info):
    """A token run's `TokenTransformer`: vocabulary and length from the dataset, causal for the
    autoregressive baseline, time-conditioned for the uniform process (masked models are
    time-agnostic)."""
    kw = dict(cfg.model)
    name = kw.pop("name")
    if not info.get("tokens"):
        raise ValueError(f"model.name={name!r} takes token data; data.name={cfg.data.name!r} "
                         "holds images or vectors")
    if name != TOKEN_MODEL:
        raise ValueError(f"model.name={name!r} cannot take the tokens of data.name="
                         f"{cfg.data.name!r}; allowed: {TOKEN_MODEL!r}")
    if not is_discrete(cfg):
        raise ValueError(f"process.name={cfg.process.name!r} does not apply to the tokens of "
                         f"data.name={cfg.data.name!r}; allowed: {', '.join(DISCRETE_PROCESSES)}")
    derived = sorted({"vocab_size", "seq_len", "causal", "time_conditioning"} & set(kw))
    if derived:
        raise ValueError(f"model.{derived[0]} is set by the run (vocab_size and seq_len by the "
                         "data, causal and time_conditioning by process.name); remove it")
    kind = cfg.process.name
    return models.build(name, vocab_size=int(info["vocab_size"]), seq_len=int(info["shape"][0]),
                        causal=kind == "autoregressive", time_conditioning=kind == "uniform",
                        **kw)


def dataset(cfg, seed):
    """This process's share of the data: `data.batch_size` is the global batch, split evenly
    over the processes."""
    d, n = cfg.data, jax.process_count()
    if d.batch_size % n:
        raise ValueError(f"data.batch_size={d.batch_size} (the global batch) is not divisible by "
                         f"the {n} processes")
    if d.get("latents"):
        lat = latents(cfg, "train")
        return latents_lib.build(latents_lib.to_latent(lat["z"], lat["scale"], lat["shift"]),
                                 lat["label"], batch_size=d.batch_size // n, seed=seed,
                                 process_index=jax.process_index(), process_count=n)
    return data_lib.build(d.name, "train", batch_size=d.batch_size // n, seed=seed,
                          random_flip=d.random_flip, data_dir=d.data_dir,
                          process_index=jax.process_index(), process_count=jax.process_count())


def mesh(cfg):
    """config.mesh: {data, fsdp, tensor} sizes over all devices, one of them may be -1."""
    unknown = sorted(set(cfg.mesh) - set(parallel.AXES))
    if unknown:
        raise ValueError(f"mesh.{unknown[0]} is not a mesh axis; allowed: "
                         f"{', '.join(parallel.AXES)}")
    return parallel.make_mesh(**dict(cfg.mesh))


def optimizer(cfg):
    o = cfg.optim
    return train_lib.make_optimizer(lr=o.lr, total_steps=cfg.train.steps,
                                    warmup_steps=o.warmup_steps, schedule=o.schedule,
                                    weight_decay=o.weight_decay, grad_clip=o.grad_clip)


def autoencoder_loss(cfg):
    """loss: {reconstruction, kl_weight} of an autoencoder run, as `autoencoder_objective`
    takes them."""
    return dict(reconstruction=cfg.loss.reconstruction, kl_weight=float(cfg.loss.kl_weight))


def loss_options(cfg):
    return dict(weighting=cfg.loss.weighting, time_sampling=cfg.loss.time_sampling)


# Model fields that change how the network computes, not its parameters: a run may resume with
# other values (e.g. remat switched on after running out of memory).
COMPUTE_ONLY = ("remat", "dtype", "attention_impl")


def description(cfg):
    """What a checkpoint must match to be resumed or sampled from (an autoencoder run has no
    process; a latent run names its autoencoder run)."""
    model = {k: v for k, v in cfg.model.items() if k not in COMPUTE_ONLY}
    out = {"model": model, "data": cfg.data.name, "process": dict(cfg.get("process") or {})}
    if cfg.data.get("latents"):
        out["latents"] = os.path.abspath(cfg.data.latents)
    return out


# AutoencoderKL config keys that a run does not take: the latents' scale and shift come from
# the data (`latents`), not from the model's config
AUTOENCODER_DERIVED = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


def autoencoder_model(fields):
    """The train state's `AutoencoderKL` (`jaxdiff.train.step.TrainedAutoencoder`) from a model
    section's fields (diffusers' config names, `jaxdiff.interop.autoencoder_kl.from_config`;
    `dtype` and `attention_impl` as compute settings)."""
    from jaxdiff.interop import autoencoder_kl
    from jaxdiff.models.autoencoder_kl import AutoencoderKL
    from jaxdiff.train.step import TrainedAutoencoder

    kw = dict(fields)
    kw.pop("name", None)
    derived = [k for k in AUTOENCODER_DERIVED if k in kw]
    if derived:
        raise ValueError(f"model.{derived[0]} is not a setting of an autoencoder run: the "
                         "latents' scale and shift are computed from the encoded data by the "
                         "latent run (data.latents)")
    dtype, impl = kw.pop("dtype", None), kw.pop("attention_impl", None)
    vae = autoencoder_kl.from_config(kw, dtype=None if dtype is None else jnp.dtype(dtype),
                                     attention_impl=impl)
    names = [f.name for f in dataclasses.fields(AutoencoderKL) if f.name not in ("parent", "name")]
    return TrainedAutoencoder(**{n: getattr(vae, n) for n in names})


@functools.lru_cache(maxsize=16)
def _latent_shape(model_json, image_shape):
    vae = autoencoder_model(json.loads(model_json))
    x = jax.ShapeDtypeStruct((1,) + image_shape, np.float32)
    out = jax.eval_shape(lambda x: vae.init_with_output(jax.random.key(0), x,
                                                        method="encode")[0].mean, x)
    return tuple(int(d) for d in out.shape[1:])


def latent_shape(model_section, image_shape):
    """(h, w, c): the latents an autoencoder (its model section) makes of images of
    `image_shape` (traced, not computed)."""
    return _latent_shape(json.dumps(dict(model_section), sort_keys=True, default=list),
                         tuple(image_shape))


def autoencoder_run(workdir, what="data.latents"):
    """The config of the autoencoder run in `workdir` (its config.json); ValueError (one line,
    naming the key `what`) when there is no run there or it is not an autoencoder's."""
    if not isinstance(workdir, str) or not workdir:
        raise ValueError(f"{what}={workdir!r} must be the --workdir of an autoencoder run")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{what}={workdir}: no jaxdiff run there ({path} is missing); train the "
                         "autoencoder first: jaxdiff train --config configs/digits_vae.py "
                         f"--workdir {workdir}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}={workdir}: {path} is unreadable ({type(e).__name__}); it "
                         "should hold the run's config as jaxdiff train wrote it") from None
    model_section = config.get("model") if isinstance(config, dict) else None
    name = model_section.get("name") if isinstance(model_section, dict) else None
    if name != AUTOENCODER:
        raise ValueError(f"{what}={workdir} is a run of model.name={name!r}, not an autoencoder "
                         f"run (model.name={AUTOENCODER!r}, e.g. configs/digits_vae.py)")
    return ConfigDict(config)


def autoencoder_step(workdir, what="data.latents"):
    """The latest checkpoint step of the autoencoder run in `workdir`; ValueError (one line)
    when it has none. Lists the checkpoint directory only (creates nothing there)."""
    directory = os.path.join(workdir, "checkpoints")
    steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
        directory) else []
    if not steps:  # orbax names a step's directory by its number once it is committed
        raise ValueError(f"{what}={workdir} has no checkpoint yet ({directory}); train the "
                         "autoencoder first")
    return steps[-1]


@functools.lru_cache(maxsize=4)
def _restore_autoencoder(workdir, step):
    from jaxdiff.train.checkpoint import Checkpointer

    cfg = autoencoder_run(workdir)
    vae = model(cfg)
    tx, _ = optimizer(cfg)
    # over every device (replicated, as the sampling of a run restores its params), so that
    # every process holds the params whole
    template = train_lib.abstract_state(vae, tx, x_shape=data_info(cfg)["shape"], num_classes=0,
                                        ema_decays=tuple(cfg.optim.ema_decays),
                                        mesh=parallel.make_mesh())
    ckpt = Checkpointer(workdir)
    try:
        state, _ = ckpt.restore(template, description(cfg), step=step)
    finally:
        ckpt.close()
    params = state.ema_params[0]
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode").mean)
    return vae, params, functools.partial(encode, params)


def encoder(workdir, what="data.latents"):
    """images -> latents (the posterior means, unscaled) under the EMA params of the latest
    checkpoint of the autoencoder run in `workdir`: one compiled program per checkpoint."""
    autoencoder_run(workdir, what)
    return _restore_autoencoder(os.path.abspath(workdir), autoencoder_step(workdir, what))[2]


def autoencoder(workdir, what="data.latents"):
    """(AutoencoderKL, its EMA params, step) of the latest checkpoint of the autoencoder run in
    `workdir` (kept in memory per checkpoint)."""
    autoencoder_run(workdir, what)
    step = autoencoder_step(workdir, what)
    vae, params, _ = _restore_autoencoder(os.path.abspath(workdir), step)
    return vae, params, step


def split_arrays(name, split, data_dir=None):
    """(images, labels) of a whole dataset split, in file order, as numpy."""
    from jaxdiff.eval import quality

    return quality.real_data(name, split, data_dir=data_dir)


def latents_path(cfg, split):
    return os.path.join(cfg.data.latents, LATENTS_DIR, f"{split}.npz")


def latents(cfg, split):
    """The latents of `data.name`'s `split` under the autoencoder run `data.latents`: {z (the
    posterior means, unscaled), label, scale, shift (of the train split: the model trains on
    (z - shift) * scale), vae_step, data, split, vae_params_sha256}. Encoded with the run's EMA
    params on first use into `<data.latents>/latents/<split>.npz` (atomically) and read from
    there after; refused (one line) once the autoencoder has a newer checkpoint than the one
    that encoded them."""
    from jaxdiff.distill.teacher import params_digest

    d = cfg.data
    step = autoencoder_step(d.latents)

    def make():
        _, params, _ = autoencoder(d.latents)
        images, labels = split_arrays(d.name, split, d.data_dir)
        z = latents_lib.in_batches(encoder(d.latents), images)
        if split == "train":
            scale, shift = latents_lib.scale_shift(z)
        else:
            train = latents(cfg, "train")
            scale, shift = train["scale"], train["shift"]
        return dict(z=z, label=labels, scale=scale, shift=shift, split=split,
                    vae_params_sha256=params_digest(params))

    return latents_lib.cached(latents_path(cfg, split), make,
                              expect=dict(vae_step=step, data=d.name))


DECODE_BATCH = 256  # latents per call of the decoder


@functools.lru_cache(maxsize=4)
def _decoder(workdir, step, scale, shift):
    vae, params, _ = _restore_autoencoder(workdir, step)
    vae = vae.clone(scaling_factor=scale, shift_factor=shift)
    run = jax.jit(lambda p, z: vae.apply({"params": p}, z,
                                         method=lambda m, z: m.decode(m.from_latent(z))))
    return lambda z: latents_lib.in_batches(functools.partial(run, params), z,
                                            batch=DECODE_BATCH)


def decoder(cfg):
    """latents -> images of a latent run: the model's latents (as it trains on them) through
    `from_latent` (the train split's scale and shift) and the autoencoder's decoder, in
    batches; numpy in and out."""
    lat = latents(cfg, "train")
    return _decoder(os.path.abspath(cfg.data.latents), int(lat["vae_step"]),
                    float(lat["scale"]), float(lat["shift"]))
