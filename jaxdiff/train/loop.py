"""The training loop: `train` runs a jitted train step with logging, periodic checkpoints
(train state + data-iterator state, resumed automatically from `workdir`), periodic sample
grids and preemption handling, in a locked workdir. Given a mesh (`jaxdiff.train.parallel`), the
step is jitted with explicit in/out shardings and a checkpoint written on any mesh restores into
the current one. Library functions take explicit keyword arguments; only `jaxdiff.cli` reads
configs.

The step is lowered and compiled ahead of time on its first batch, once, and that executable
runs every step; XLA's cost analysis of it gives the FLOPs per step, and each log row adds
`flops_per_step` (summed over the devices), `tflops_per_s` (achieved, over the steps since the
previous row) and `mfu` (fraction of the devices' peak, `jaxdiff.train.mfu`; absent when the
peak is unknown). Without a cost analysis the rows simply lack these fields.
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import numpy as np

from jaxdiff.train import mfu, parallel, rundir
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
            logging = log and jax.process_index() == 0
            if logging:  # on CPU: time a GEMM now, not inside a logged interval
                step_fn.measure_peak()
            logger = MetricsLog(workdir, total_steps, enabled=logging,
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
    """(step, batch placement): the step is plain jit without a mesh, else jit with explicit
    shardings, run through `AheadOfTime` (compiled once, FLOPs known). `frozen` (what the
    objective reads but does not train) is passed to every step as data, replicated on the
    mesh."""
    if mesh is None:
        jitted, put = jax.jit(train_step, donate_argnums=0), lambda batch: batch
        devices = [jax.devices()[0]]
    else:
        jitted = parallel.jit_train_step(train_step, parallel.shardings_of(state), mesh, rules,
                                         with_frozen=frozen is not None)
        put = functools.partial(parallel.shard_batch, mesh=mesh)
        devices = list(mesh.devices.flat)
    extra = () if frozen is None else (frozen,)
    return AheadOfTime(jitted, extra, devices), put


class AheadOfTime:
    """`step(state, batch)` of a jitted train step `jitted(state, batch, *extra)`: the first
    call lowers and compiles it for its arguments (the one compilation; donation and shardings
    are the jitted function's) and reads the FLOPs from the compiled program; every call runs
    that executable. Arguments of other types or shapes (which plain jit would compile anew
    for) fall back to `jitted` from then on.

    flops: FLOPs of one step summed over its `devices` (XLA's per-device figure × the device
    count), None without a cost analysis. dtype: the matmul precision ("bf16" or "f32") the
    peak is taken for."""

    def __init__(self, jitted, extra=(), devices=None):
        self.jitted, self.extra = jitted, tuple(extra)
        self.devices = list(devices) if devices else [jax.devices()[0]]
        self.run, self.flops, self.dtype = None, None, "f32"

    def __call__(self, state, batch):
        args = (state, batch, *self.extra)
        if self.run is None:
            lowered = self.jitted.lower(*args)
            self.run = lowered.compile()
            per_device = mfu.step_flops(self.run)
            self.flops = None if per_device is None else per_device * len(self.devices)
            self.dtype = mfu.matmul_dtype(lowered)
        if self.run is self.jitted:
            return self.jitted(*args)
        try:
            return self.run(*args)
        except TypeError:  # checked before running (nothing donated): new argument types
            self.run = self.jitted
            return self.jitted(*args)

    def measure_peak(self):
        """Measures the CPU's GEMM rate ahead of the steps (cached; a table lookup elsewhere)."""
        try:
            mfu.peak_flops(self.devices[0])
        except Exception:
            pass

    def utilization(self, steps_per_s):
        """{flops_per_step, tflops_per_s, mfu} at `steps_per_s` (mfu only with a known peak;
        {} without FLOPs)."""
        if not self.flops:
            return {}
        try:
            peak = mfu.peak_flops(self.devices[0], self.dtype)
        except Exception:
            peak = None
        achieved, fraction = mfu.throughput(self.flops, steps_per_s, len(self.devices), peak)
        out = {"flops_per_step": self.flops, "tflops_per_s": achieved / 1e12}
        if fraction is not None:
            out["mfu"] = fraction
        return out


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
            dt = max(time.perf_counter() - t0, 1e-9)
            metrics["img_per_s"] = (step - n0) * len(batch["x"]) / dt
            if isinstance(step_fn, AheadOfTime):
                metrics.update(step_fn.utilization((step - n0) / dt))
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
