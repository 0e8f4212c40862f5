"""Config sections to library objects: the only place that reads config keys."""

from __future__ import annotations

import jax

from jaxdiff import data as data_lib
from jaxdiff import models
from jaxdiff import train as train_lib
from jaxdiff.core.process import PROCESSES, DiscreteVP
from jaxdiff.train import parallel

BETA_SCHEDULES = {"linear": DiscreteVP.linear, "scaled_linear": DiscreteVP.scaled_linear,
                  "cosine": DiscreteVP.cosine}


def process(cfg):
    """config.process: {name, **fields}; discrete_vp takes beta_schedule + its arguments."""
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
    return data_lib.info(cfg.data.name, data_dir=cfg.data.data_dir)


def model(cfg):
    """config.model: {name, **architecture}; the image size comes from the dataset."""
    kw = dict(cfg.model)
    name = kw.pop("name")
    shape = data_info(cfg)["shape"]
    checks = hasattr(models.MODELS.get(name), "check_image_size")  # the MLP takes vectors
    image_size = tuple(shape[:2]) if len(shape) == 3 and checks else None
    return models.build(name, image_size=image_size, **kw)


def dataset(cfg, seed):
    """This process's share of the data: `data.batch_size` is the global batch, split evenly
    over the processes."""
    d, n = cfg.data, jax.process_count()
    if d.batch_size % n:
        raise ValueError(f"data.batch_size={d.batch_size} (the global batch) is not divisible by "
                         f"the {n} processes")
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


def loss_options(cfg):
    return dict(weighting=cfg.loss.weighting, time_sampling=cfg.loss.time_sampling)


# Model fields that change how the network computes, not its parameters: a run may resume with
# other values (e.g. remat switched on after running out of memory).
COMPUTE_ONLY = ("remat", "dtype", "attention_impl")


def description(cfg):
    """What a checkpoint must match to be resumed or sampled from."""
    model = {k: v for k, v in cfg.model.items() if k not in COMPUTE_ONLY}
    return {"model": model, "data": cfg.data.name, "process": dict(cfg.process)}
