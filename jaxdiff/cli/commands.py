"""`jaxdiff train` and `jaxdiff sample`: config in, library calls, files out."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff import images
from jaxdiff import train as train_lib
from jaxdiff.checkpoint import Checkpointer, CheckpointError, abstract
from jaxdiff.cli import build
from jaxdiff.guidance import CFG


def train(config, workdir):
    """Trains from `config`, resuming from `workdir`; ends with samples and a short report."""
    t_start = time.time()
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, "config.json"), config.to_dict())
    model, process, info = build.model(config), build.process(config), build.data_info(config)
    tx, lr_fn = build.optimizer(config)
    c = config.train
    state = train_lib.init_state(model, tx, x_shape=info["shape"], num_classes=_classes(config),
                                 seed=c.seed, ema_decays=tuple(config.optim.ema_decays))
    step = train_lib.make_train_step(model, tx, lr_fn, process=process,
                                     prediction=config.loss.prediction,
                                     ema_decays=tuple(config.optim.ema_decays),
                                     num_classes=_classes(config), p_uncond=config.loss.p_uncond,
                                     loss_options=build.loss_options(config))

    def sample_fn(state, step):
        x, labels = draw(config, model, process, state.ema_params[0], num=c.num_samples, seed=0)
        _save_samples(os.path.join(workdir, "samples", f"step_{step:07d}.png"), x,
                      cols=_classes(config) or None)
        if step == c.steps:
            _report(config, workdir, x, labels, step, t_start)

    train_lib.train(state, step, build.dataset(config, c.seed), workdir=workdir,
                    total_steps=c.steps, log_every=c.log_every, ckpt_every=c.ckpt_every,
                    keep=c.keep, sample_every=c.sample_every, sample_fn=sample_fn,
                    description=build.description(config))


def draw(config, model, process, params, *, num, seed, sampler=None, steps=None, label=None,
         guidance=None):
    """num samples from `params`; class-conditional models get labels 0..K-1 cycled (or
    `label`) with classifier-free guidance at `guidance` (default: the config's)."""
    s = config.sampler
    info = build.data_info(config)
    noise = jax.random.normal(jax.random.key(seed), (num,) + tuple(info["shape"]))
    net = train_lib.network(model, params)
    K = _classes(config)
    labels = None
    guide = None
    if K:
        if label is not None and not 0 <= label < K:
            raise ValueError(f"--class={label} is not a class of this model; allowed: 0..{K - 1}")
        labels = jnp.full((num,), label) if label is not None else jnp.arange(num) % K
        guide = CFG(scale=s.guidance if guidance is None else guidance, y=labels,
                    y_null=jnp.full((num,), K))
    x = jaxdiff.sample(net, noise, process=process, prediction=config.loss.prediction,
                       sampler=sampler or s.name, steps=steps or s.steps, schedule=s.schedule,
                       key=jax.random.key(seed + 1), guidance=guide, **dict(s.options))
    return np.asarray(x), None if labels is None else np.asarray(labels)


def sample(config, workdir, *, out, num, seed, sampler=None, steps=None, label=None,
           guidance=None):
    """Loads the EMA params of the latest checkpoint and writes `out` (PNG) and `.npz`."""
    model, process = build.model(config), build.process(config)
    tx, _ = build.optimizer(config)
    ckpt = Checkpointer(workdir)
    if ckpt.latest_step() is None:
        raise CheckpointError(f"no checkpoint in {ckpt.directory}; train first with "
                              f"jaxdiff train --config ... --workdir {workdir}")
    template = jax.eval_shape(lambda: train_lib.init_state(
        model, tx, x_shape=build.data_info(config)["shape"], num_classes=_classes(config),
        seed=0, ema_decays=tuple(config.optim.ema_decays)))
    state, _ = ckpt.restore(abstract(template), build.description(config))
    ckpt.close()
    x, labels = draw(config, model, process, state.ema_params[0], num=num, seed=seed,
                     sampler=sampler, steps=steps, label=label, guidance=guidance)
    _save_samples(out, x)
    np.savez(os.path.splitext(out)[0] + ".npz", samples=x,
             labels=np.zeros(0) if labels is None else labels)
    print(f"wrote {out} ({num} samples, step {int(state.step)})")


def _save_samples(path, x, cols=None):
    if x.ndim == 2:  # vectors: a scatter plot of the first two coordinates
        images.save_scatter(path, x)
    else:
        images.save_grid(path, x, cols=cols, scale=4)


def _classes(config):
    return int(config.model.get("num_classes", 0) or 0)


def _report(config, workdir, x, labels, step, t_start):
    """report.json + a printed summary: time, and for digits the classifier agreement."""
    report = {"step": step, "train_wall_s": round(time.time() - t_start, 1),
              "num_samples": len(x), "sampler": config.sampler.name,
              "sampler_steps": config.sampler.steps, "guidance": config.sampler.guidance}
    if config.data.name.startswith("digits") and labels is not None:
        from jaxdiff.eval import digits

        acc, per_class = digits.agreement(x, labels)
        report.update(classifier_agreement=acc, per_class=per_class)
    _write_json(os.path.join(workdir, "report.json"), report)
    print("report: " + json.dumps(report))


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
