"""Faults during training: preemption, non-finite steps, device out-of-memory.

- `PreemptionGuard`: SIGTERM (a preemption notice) or Ctrl-C asks the loop to stop; the loop
  finishes the step, saves a checkpoint and returns, and the same command resumes. A second
  signal stops at once, the default way. On several hosts, JAX's preemption service is the
  mechanism (`jax.distributed.initialize()` starts it; it catches SIGTERM and makes every host
  stop at the same step, see `jax.experimental.multihost_utils.reached_preemption_sync_point`);
  the guard defers to it there and installs no handler.
- `check_finite`: the one-line error for a NaN/Inf metric, naming the step and the last good
  checkpoint; called before every save, so a non-finite state is never written.
- `skip_nonfinite` / `with_skip_nonfinite`: a jittable guard that keeps the previous params and
  optimizer state when the loss, the gradients or the new params are not finite (the step
  still advances; metric `skipped` = 1), for `--config.train.skip_nonfinite=True`.
- `oom_message`: turns XLA's RESOURCE_EXHAUSTED into one line naming the config knobs that
  reduce memory.
- `check_loop`: the loop's own settings (steps, intervals, keep) as one-line errors.
"""

from __future__ import annotations

import os
import signal
import socket
import threading

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

PROTECTED = ("loss", "grad_norm")  # metrics whose non-finite values skip_nonfinite handles


class PreemptionGuard:
    """Context manager: the given signals set `requested` instead of ending the process.

        with PreemptionGuard() as guard:
            while step < total:
                ...one step...
                if guard.should_stop(step):
                    save(step); break

    On one host it installs Python handlers (main thread only; elsewhere it does nothing) and
    restores the previous ones on exit. A second signal ends the process at once, even while
    the main thread is blocked in native code (a compile, a hung collective), where Python
    handlers cannot run: a watchdog thread sees the signal through `signal.set_wakeup_fd`.
    On several hosts (`jax.process_count() > 1`) with JAX's preemption service running,
    `should_stop` asks the service, which agrees on one step for every host; there is no
    handler then (the service owns SIGTERM)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name = None
        self._previous = {}
        self._wakeup = None
        self._service = False

    def __enter__(self):
        self._service = jax.process_count() > 1 and _preemption_service()
        if not self._service and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self._wakeup = (reader, writer, old_fd)
            threading.Thread(target=self._watch, args=(reader,), daemon=True,
                             name="jaxdiff-preemption-watchdog").start()
        return self

    def __exit__(self, *exc):
        self._restore()
        return False

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._wakeup is not None:
            reader, writer, old_fd = self._wakeup
            signal.set_wakeup_fd(old_fd)
            writer.close()  # the watchdog reads end-of-file and ends
            self._wakeup = None

    def _watch(self, reader):
        """Counts this guard's signals as the C-level handler reports them; exits on the 2nd."""
        seen = 0
        with reader:
            while data := _recv(reader):
                seen += sum(1 for signum in data if signum in self.signals)
                if seen >= 2:
                    os.write(2, b"second stop signal: exiting now, without saving\n")
                    os._exit(128 + next(s for s in data if s in self.signals))

    def _handle(self, signum, frame):
        if self.requested:  # the second signal: stop now, as if no guard were installed
            self._restore()
            signal.raise_signal(signum)
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logging.warning("%s received: finishing this step, saving a checkpoint, then stopping "
                        "(send it again to stop at once)", self.signal_name)

    def should_stop(self, step):
        """Whether to save and stop after `step`. Call it once per step, on every host."""
        if self._service:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(int(step)):
                self.requested, self.signal_name = True, "preemption notice"
        return self.requested

    def report(self, step, ckpt):
        """Logs (and returns) the line for a stop: what was saved and how to resume."""
        message = (f"stopped at step {step} on {self.signal_name or 'request'}; checkpoint "
                   f"step {ckpt.latest_step()} is in {ckpt.directory}; rerun the same command "
                   "to resume")
        logging.warning(message)
        return message


def _recv(sock):
    try:
        return sock.recv(64)
    except OSError:
        return b""


def _preemption_service():
    try:
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


def _finite(x):
    return jnp.all(jnp.isfinite(x))


def skip_nonfinite(old, new, metrics):
    """(state, metrics): `new`, or `old` with `new`'s step when the update is not finite.

    Not finite: the loss, the gradient norm or any new parameter is NaN/Inf (each parameter is
    tested itself, so huge but finite parameters do not count). Everything in the state but
    `step` comes from `old` then: params, EMA params, optimizer state. Jittable; adds metric
    `skipped` (1.0 for a skipped update)."""
    ok = jnp.logical_and(_finite(metrics["loss"]), _finite(metrics["grad_norm"]))
    ok = jnp.logical_and(ok, jax.tree.reduce(jnp.logical_and,
                                             jax.tree.map(_finite, new.params), True))
    state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    state = state.replace(step=new.step)
    return state, {**metrics, "skipped": 1.0 - ok.astype(jnp.float32)}


def with_skip_nonfinite(train_step):
    """`train_step(state, batch) -> (state, metrics)` with `skip_nonfinite` applied."""

    def step(state, batch):
        new, metrics = train_step(state, batch)
        return skip_nonfinite(state, new, metrics)

    return step


def check_finite(metrics, step, ckpt=None):
    """Raises FloatingPointError (one line) when a fetched metric is NaN/Inf.

    The message names the step and the last good checkpoint. Metrics of a step guarded by
    `skip_nonfinite` (they carry `skipped`) may have a non-finite loss or gradient norm: the
    update was skipped and the state is intact, so those do not raise."""
    guarded = "skipped" in metrics
    bad = [k for k, v in metrics.items()
           if not np.all(np.isfinite(v)) and not (guarded and k in PROTECTED)]
    if not bad:
        return
    bad.sort(key=lambda k: (PROTECTED.index(k) if k in PROTECTED else len(PROTECTED), k))
    last = ckpt.latest_step() if ckpt is not None else None
    where = (f"the last good checkpoint is step {last} in {ckpt.directory} (untouched)"
             if last is not None else "no checkpoint was written yet")
    # a resume may not change the lr (jaxdiff.train.rundir): a lower one goes on from a copy
    lower = ("lower --config.optim.lr" if last is None else "lower --config.optim.lr in a "
             f"fresh --workdir holding a copy of {ckpt.directory}")
    raise FloatingPointError(
        f"non-finite {', '.join(bad)} at step {step}; {where}; {lower}, or set "
        "--config.train.skip_nonfinite=True to skip such updates"
    )


LOOP_KEYS = {"total_steps": "train.steps", "log_every": "train.log_every",
             "ckpt_every": "train.ckpt_every", "keep": "train.keep",
             "sample_every": "train.sample_every"}


def check_loop(**settings):
    """ValueError (one line) unless each loop setting is an integer >= 1 (`sample_every`: >= 0,
    0 = never), e.g. check_loop(total_steps=1000, log_every=100, ckpt_every=500, keep=3)."""
    for name, value in settings.items():
        low = 0 if name == "sample_every" else 1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            where = f" (config: {LOOP_KEYS[name]})" if name in LOOP_KEYS else ""
            raise ValueError(f"{name}={value!r} must be an integer >= {low}{where}")


OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM when allocating",
               "Resource exhausted")
MEMORY_KNOBS = {  # config key -> how to use it to save memory
    "data.batch_size": "a smaller --config.data.batch_size",
    "model.remat": "--config.model.remat=True (recompute activations in the backward pass)",
    "mesh.fsdp": "--config.mesh.fsdp=N (shard params and optimizer state over N devices)",
}


def is_oom(exc):
    """Whether `exc` is an out-of-memory error from XLA (any device) or from the host."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(m in text for m in OOM_MARKERS)


def oom_message(exc, hints=None):
    """One line for an out-of-memory error naming the knobs that reduce memory, else None.

    hints: the config's current values of the knobs (`memory_hints(config)`), e.g.
    {"data.batch_size": 64, "mesh.fsdp": 1}: the message then names only the knobs this config
    has, with their values; without hints it names them all."""
    if not is_oom(exc):
        return None
    hints = dict(hints or {})
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if any(m in ln for m in OOM_MARKERS)),
                  lines[0] if lines else type(exc).__name__)
    keys = [k for k in MEMORY_KNOBS if k in hints] or list(MEMORY_KNOBS)
    knobs = [MEMORY_KNOBS[k] + (f" [now {hints[k]}]" if k in hints else "") for k in keys]
    return (f"out of memory on {_device_kind()}: {detail[:300].rstrip('.')}; to use less memory: "
            f"{'; '.join(knobs)}")


def _device_kind():
    try:
        d = jax.devices()[0]
        return f"{len(jax.devices())} {d.platform} device(s) ({d.device_kind})"
    except RuntimeError:
        return "the device"


def memory_hints(config):
    """The current values of the memory knobs in a config, for `oom_message` ({} if none)."""
    hints = {}
    for key in MEMORY_KNOBS:
        node = config
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is not None:
            hints[key] = node
    return hints
