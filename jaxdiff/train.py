"""Training: a pure, jitted train step and the loop around it.

`TrainState` is data only (step, params, EMA params, optimizer state, PRNG key). The step is
`train_step(state, batch) -> (state, metrics)`, jitted with the state donated; its randomness
is `fold_in(rng, step)`, so a resumed run draws exactly the numbers an uninterrupted one would.
`train` runs it with logging, periodic checkpoints (train state + data-iterator state, resumed
automatically from `workdir`) and periodic sample grids. Given a mesh (`jaxdiff.parallel`),
the state is created already sharded, the step is jitted with explicit in/out shardings, and a
checkpoint written on any mesh restores into the current one. Library functions take explicit
keyword arguments; only `jaxdiff.cli` reads configs.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxdiff import faults, parallel
from jaxdiff.checkpoint import Checkpointer, abstract
from jaxdiff.core import losses
from jaxdiff.logger import MetricsLog


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: tuple  # one parameter tree per EMA decay
    opt_state: Any
    rng: jax.Array  # raw uint32 key data


def make_optimizer(*, lr, total_steps, warmup_steps=0, schedule="cosine", weight_decay=0.0,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0):
    """AdamW with linear warmup then cosine decay (to 0) or constant; global-norm clipping."""
    if not 0 <= warmup_steps < max(total_steps, 1):
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps})")
    if schedule == "cosine":
        lr_fn = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, 1))
    elif schedule == "constant":
        lr_fn = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
            [warmup_steps])
    else:
        raise ValueError(f"lr schedule={schedule!r} is unknown; allowed: cosine, constant")
    clip = optax.clip_by_global_norm(grad_clip) if grad_clip else optax.identity()
    return optax.chain(clip, optax.adamw(lr_fn, b1, b2, eps, weight_decay=weight_decay)), lr_fn


@dataclasses.dataclass(frozen=True)
class ModelApply:
    """`model_fn(x, t, *labels)` over a Flax module, params first: `Partial(ModelApply(m), p)`
    is what `jaxdiff.sample` takes, with the params as data (new params do not recompile)."""

    model: Any
    train: bool = False

    def __call__(self, params, x, t, *args, rngs=None):
        y = args[0] if args else None
        return self.model.apply({"params": params}, x, t, y, train=self.train, rngs=rngs)


def network(model, params):
    """The sampling-time network: `model_fn(x, t, *labels)` with `params` bound as data."""
    return jax.tree_util.Partial(ModelApply(model), params)


def init_state(model, tx, *, x_shape, num_classes, seed, ema_decays, mesh=None,
               rules=parallel.LOGICAL_RULES):
    """A fresh TrainState; wrap in `jax.eval_shape` for the abstract one (no allocation).

    With `mesh`, the state is created already sharded (params, EMA and optimizer moments by the
    models' logical axis names and `rules`; see `jaxdiff.parallel`): one jitted init whose
    outputs land in their shards, so no device or host ever holds the whole state."""
    init = functools.partial(_init_state, model, tx, x_shape=x_shape, num_classes=num_classes,
                             seed=seed, ema_decays=ema_decays)
    if mesh is None:
        return init()
    shardings = state_shardings(model, tx, mesh, x_shape=x_shape, num_classes=num_classes,
                                ema_decays=ema_decays, rules=rules)
    return parallel.create_sharded(init, shardings)


def state_shardings(model, tx, mesh, *, x_shape, num_classes, ema_decays,
                    rules=parallel.LOGICAL_RULES):
    """The NamedSharding of every leaf of this model's TrainState on `mesh` (no allocation)."""
    abstract = jax.eval_shape(functools.partial(
        _init_state, model, tx, x_shape=x_shape, num_classes=num_classes, seed=0,
        ema_decays=ema_decays))
    boxed = jax.eval_shape(lambda: _variables(model, x_shape, num_classes,
                                              jax.random.PRNGKey(0)))
    return parallel.state_shardings(abstract, parallel.param_specs(boxed), tx, mesh, rules)


def abstract_state(model, tx, *, x_shape, num_classes, ema_decays, mesh=None,
                   rules=parallel.LOGICAL_RULES):
    """ShapeDtypeStructs of the TrainState (with `.sharding` on `mesh`): a restore target."""
    kw = dict(x_shape=x_shape, num_classes=num_classes, ema_decays=ema_decays)
    abstract = jax.eval_shape(lambda: _init_state(model, tx, seed=0, **kw))
    if mesh is None:
        return abstract
    shardings = state_shardings(model, tx, mesh, rules=rules, **kw)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def _variables(model, x_shape, num_classes, key):
    """The model's variables, boxed with logical axis names."""
    x = jnp.zeros((1,) + tuple(x_shape), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if num_classes else None
    return model.init({"params": key}, x, jnp.zeros((1,)), y)


def _init_state(model, tx, *, x_shape, num_classes, seed, ema_decays):
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    # the models box params with logical axis names; the state holds plain arrays
    params = flax.linen.unbox(_variables(model, x_shape, num_classes, init_key))["params"]
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                      ema_params=tuple(jax.tree.map(jnp.copy, params) for _ in ema_decays),
                      opt_state=tx.init(params),
                      rng=rng)


def make_train_step(model, tx, lr_fn, *, process, prediction, ema_decays, num_classes=0,
                    p_uncond=0.1, loss_options=None):
    """The pure step `(state, batch) -> (state, metrics)`; batch = {"x", "label"}.

    Labels are replaced by the null label `num_classes` with probability `p_uncond` (CFG
    training). EMA decay d is warmed up as min(d, (1 + step) / (10 + step))."""
    apply = ModelApply(model, train=True)
    loss_options = dict(loss_options or {})

    def train_step(state, batch):
        key = jax.random.fold_in(state.rng, state.step)
        k_loss, k_drop, k_label = jax.random.split(key, 3)
        args = ()
        if num_classes:
            drop = jax.random.uniform(k_label, batch["label"].shape) < p_uncond
            args = (jnp.where(drop, num_classes, batch["label"]),)

        def loss_fn(params):
            net = lambda x, t, *a: apply(params, x, t, *a, rngs={"dropout": k_drop})  # noqa: E731
            return losses.diffusion_loss(net, batch["x"], k_loss, process=process,
                                         prediction=prediction, args=args, **loss_options)

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        warm = (1.0 + state.step) / (10.0 + state.step)
        ema = tuple(_ema(e, params, jnp.minimum(d, warm)) for d, e in zip(ema_decays,
                                                                          state.ema_params))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state.step)}
        new = state.replace(step=state.step + 1, params=params, ema_params=ema,
                            opt_state=opt_state)
        return new, metrics

    return train_step


def _ema(ema, params, decay):
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def train(state, train_step, data, *, workdir, total_steps, log_every=100, ckpt_every=1000,
          keep=3, sample_every=0, sample_fn=None, description=None, log=True, mesh=None,
          rules=parallel.LOGICAL_RULES):
    """Runs `train_step` to `total_steps`, resuming from the latest checkpoint in `workdir`.

    data: an iterator of batches with `get_state()`/`set_state()` (a grain iterator), saved
    with each checkpoint. sample_fn(state, step): called every `sample_every` steps and at the
    end (e.g. writes a sample grid). description: JSON-able dict saved with checkpoints;
    its "model" entry guards against resuming another architecture. mesh: when given, `state`
    is sharded on it (`init_state(..., mesh=mesh)`), `data` yields this process's part of each
    global batch, and the step is jitted with explicit shardings (`parallel.jit_train_step`);
    a checkpoint written on any mesh is restored into `state`'s shardings. Returns the final
    state."""
    faults.check_loop(total_steps=total_steps, log_every=log_every, ckpt_every=ckpt_every,
                      keep=keep, sample_every=sample_every)
    description = dict(description or {})
    ckpt = Checkpointer(workdir, keep=keep)
    state = _resume(ckpt, state, data, description)
    if mesh is None:
        step_fn, put = jax.jit(train_step, donate_argnums=0), lambda batch: batch
    else:
        step_fn = parallel.jit_train_step(train_step, parallel.shardings_of(state), mesh, rules)
        put = functools.partial(parallel.shard_batch, mesh=mesh)
    logger = MetricsLog(workdir, total_steps, enabled=log and jax.process_index() == 0)
    if log:  # one line per process: what joined the run
        print(f"jaxdiff train: process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} of {jax.device_count()} devices"
              + (f", mesh {dict(mesh.shape)}" if mesh is not None else "")
              + f", from step {int(state.step)}", file=sys.stderr, flush=True)
    try:
        with faults.PreemptionGuard() as preempt:  # SIGTERM/Ctrl-C: save, stop, exit 0
            state = _loop(state, step_fn, put, data, ckpt, logger, total_steps, log_every,
                          ckpt_every, sample_every, sample_fn, description, preempt)
    finally:
        logger.close()
        ckpt.close()
    return state


def _resume(ckpt, state, data, description):
    # abstract() keeps each array's sharding: orbax reads the saved arrays into this layout
    restored = ckpt.restore(abstract(state), description)
    if restored is None:
        return state
    state, data_state = restored
    if data_state:
        data.set_state(data_state)
    return state


def _loop(state, step_fn, put, data, ckpt, logger, total_steps, log_every, ckpt_every,
          sample_every, sample_fn, description, preempt=None):
    step = int(state.step)
    t0, n0 = time.perf_counter(), step
    if step >= total_steps and sample_fn is not None:  # a finished run: redo the final samples
        sample_fn(state, step)
    while step < total_steps:
        batch = put(next(data))
        state, metrics = step_fn(state, batch)
        step += 1
        if step % log_every == 0 or step == total_steps:
            metrics = jax.device_get(metrics)
            faults.check_finite(metrics, step, ckpt)
            dt = time.perf_counter() - t0
            metrics["img_per_s"] = (step - n0) * len(batch["x"]) / max(dt, 1e-9)
            logger.write(step, metrics)
            t0, n0 = time.perf_counter(), step
        stop = preempt is not None and preempt.should_stop(step)
        if stop or step % ckpt_every == 0 or step == total_steps:
            faults.check_finite(jax.device_get(metrics), step, ckpt)  # never save a NaN state
            ckpt.save(step, state, data.get_state(), description)
        if stop:
            preempt.report(step, ckpt)
            break
        if sample_fn is not None and (step == total_steps or sample_every and
                                      step % sample_every == 0):
            sample_fn(state, step)
    return state
