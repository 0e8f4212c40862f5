"""Preemption: SIGTERM (a preemption notice) or Ctrl-C asks the training loop to stop.

`PreemptionGuard`: the loop finishes the step, saves a checkpoint and returns, and the same
command resumes. A second signal stops at once, the default way. On several hosts, JAX's
preemption service is the mechanism (`jax.distributed.initialize()` starts it; it catches
SIGTERM and makes every host stop at the same step, see
`jax.experimental.multihost_utils.reached_preemption_sync_point`); the guard defers to it there
and installs no handler.
"""

from __future__ import annotations

import os
import signal
import socket
import threading

import jax
from absl import logging


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
