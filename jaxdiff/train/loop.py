"""The training loop: `train` runs a jitted train step with logging, periodic checkpoints
(train state + data-iterator state, resumed automatically from `workdir`), periodic sample
grids and preemption handling, in a locked workdir. Given a mesh (`jaxdiff.train.parallel`), the
step is jitted with explicit in/out shardings and a checkpoint written on any mesh restores into
the current one. Library functions take explicit keyword arguments; only `jaxdiff.cli` reads
configs.
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import numpy as np

from jaxdiff.train import parallel, rundir
from jaxdiff.train.checkpoint import Checkpointer, abstract
from jaxdiff.train.logger import MetricsLog
from jaxdiff.train.nonfinite import check_finite
from jaxdiff.train.preemption import PreemptionGuard


def train(state, train_step, data, *, workdir, total_steps, log_every=100, ckpt_every=1000,
          keep=3, sample_every=0, sample_fn=None, description=None, log=True, mesh=None,
          rules=parallel.LOGICAL_RULES, frozen=None):
    """Runs `train_step` to `total_steps`, resuming from the latest checkpoint in `workdir`.

    data: an iterator of batches with `get_state()`/`set_state()` (a grain iterator), saved
    with each checkpoint. sample_fn(state, step): called every `sample_every` steps and at the
    end (e.g. writes a sample grid). description: JSON-able dict saved with checkpoints;
    its "model" entry guards against resuming another architecture. mesh: when given, `state`
    is sharded on it (`init_state(..., mesh=mesh)`), `data` yields this process's part of each
    global batch, and the step is jitted with explicit shardings (`parallel.jit_train_step`);
    a checkpoint written on any mesh is restored into `state`'s shardings. The workdir is
    locked throughout (`jaxdiff.train.rundir`: a second trainer there is refused). frozen: passed to
    every step as its third argument (`make_train_step`). Returns the final
    state."""
    check_loop(total_steps=total_steps, log_every=log_every, ckpt_every=ckpt_every,
               keep=keep, sample_every=sample_every)
    description = dict(description or {})
    with rundir.lock(workdir):
        ckpt = Checkpointer(workdir, keep=keep)
        try:
            state = _resume(ckpt, state, data, description)
            step_fn, put = _compiled(train_step, state, mesh, rules, frozen)
            logger = MetricsLog(workdir, total_steps, enabled=log and jax.process_index() == 0,
                                start_step=int(state.step))
            if log:
                _announce(state, mesh)
            try:
                with PreemptionGuard() as preempt:  # SIGTERM/Ctrl-C: save, stop, exit 0
                    state = _loop(state, step_fn, put, data, ckpt, logger, total_steps,
                                  log_every, ckpt_every, sample_every, sample_fn, description,
                                  preempt)
            finally:
                logger.close()
        finally:
            ckpt.close()
    return state


def check_loop(**settings):
    """ValueError (one line) unless each loop setting is an integer >= 1 (`sample_every`: >= 0,
    0 = never), e.g. check_loop(total_steps=1000, log_every=100, ckpt_every=500, keep=3)."""
    for name, value in settings.items():
        low = 0 if name == "sample_every" else 1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def _compiled(train_step, state, mesh, rules, frozen=None):
    """(jitted step, batch placement): plain jit without a mesh, else explicit shardings.
    `frozen` (what the objective reads but does not train) is passed to every step as data,
    replicated on the mesh."""
    if mesh is None:
        step_fn, put = jax.jit(train_step, donate_argnums=0), lambda batch: batch
    else:
        step_fn = parallel.jit_train_step(train_step, parallel.shardings_of(state), mesh, rules,
                                          with_frozen=frozen is not None)
        put = functools.partial(parallel.shard_batch, mesh=mesh)
    if frozen is None:
        return step_fn, put
    return (lambda state, batch: step_fn(state, batch, frozen)), put


def _announce(state, mesh):
    """One line per process: what joined the run."""
    print(f"jaxdiff train: process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} of {jax.device_count()} devices"
          + (f", mesh {dict(mesh.shape)}" if mesh is not None else "")
          + f", from step {int(state.step)}", file=sys.stderr, flush=True)


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
            check_finite(metrics, step, ckpt)
            dt = time.perf_counter() - t0
            metrics["img_per_s"] = (step - n0) * len(batch["x"]) / max(dt, 1e-9)
            logger.write(step, metrics)
            t0, n0 = time.perf_counter(), step
        stop = preempt is not None and preempt.should_stop(step)
        if stop or step % ckpt_every == 0 or step == total_steps:
            check_finite(jax.device_get(metrics), step, ckpt)  # never save a NaN state
            ckpt.save(step, state, data.get_state(), description)
        if stop:
            preempt.report(step, ckpt)
            break
        if sample_fn is not None and (step == total_steps or sample_every and
                                      step % sample_every == 0):
            sample_fn(state, step)
    return state
