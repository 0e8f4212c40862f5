"""Preemption: SIGTERM/Ctrl-C ask the loop to stop (`jaxdiff.train.preemption.PreemptionGuard`),
a second signal stops at once even in native code, and end to end a `jaxdiff train` stopped by
SIGTERM and then randomly SIGKILL-ed resumes bit-identically to an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdiff.train.preemption import PreemptionGuard
from tests._runs import ROOT, TINY, cli, final, kill, logged_once, read_all, same, start, steps

STEPS = 24  # 6 log lines (4, 8, ..., 24); a short run keeps the many restarts cheap
RUN = TINY + [f"--config.train.steps={STEPS}", "--config.train.log_every=4"]
KILLS = 3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_guard_sets_flag_and_restores_handlers(sig):
    before = signal.getsignal(sig)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(0)
        os.kill(os.getpid(), sig)
        for _ in range(100):  # the handler runs in the main thread, between bytecodes
            time.sleep(0 if guard.requested else 0.01)
        assert guard.requested and guard.should_stop(1) and guard.signal_name == sig.name
    assert signal.getsignal(sig) is before


def test_second_signal_stops_at_once_even_in_native_code(tmp_path):
    """The first SIGTERM only asks; the second ends the process although its main thread is
    blocked in C (system() retries waitpid, so no Python handler can run there)."""
    code = ("import ctypes, sys\nfrom jaxdiff.train.preemption import PreemptionGuard\n"
            "with PreemptionGuard():\n    print('ready', flush=True)\n"
            "    ctypes.CDLL(None).system(b'sleep 8')\nsys.exit(3)\n")
    err = tmp_path / "stderr"  # a file: sleep's shell may hold a pipe open
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=open(err, "w"), text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert proc.poll() is None  # one signal: still running (it would save and stop)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM and time.time() - t0 < 5
    assert "second stop signal: exiting now" in err.read_text()


def _wait_for_step(proc, workdir, above, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if steps(workdir) and steps(workdir)[-1] > above:
            return
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended (rc {proc.returncode}) before step {above + 1}"
    assert time.time() < deadline, f"no checkpoint after step {above} in {timeout} s"


def _next_batch(data_state=None, skip=0):
    """The batch TINY's digits pipeline (seed 0) draws after `data_state`, or, without one,
    after `skip` batches of a fresh iterator (an uninterrupted stream)."""
    from jaxdiff import data

    it = data.build("digits", "train", batch_size=16, seed=0)
    if data_state is not None:
        it.set_state(data_state)
    for _ in range(skip):
        next(it)
    return jax.tree.map(np.asarray, next(it))


def _reference(proc, workdir, err):
    """Final (train state, data state) of the uninterrupted run `proc` (started by `start`,
    its stderr to the file `err`)."""
    proc.wait(timeout=600)
    assert proc.returncode == 0, err.read_text()[-2000:]
    step, last = final(workdir)
    assert step == STEPS
    logged_once(workdir, list(range(4, STEPS + 1, 4)))
    return last


def test_sigterm_and_random_kills_resume_bit_identically(cli_env, tmp_path):
    """One run stopped every way, then finished: a SIGTERM first (it saves the step it stopped
    at, off the checkpoint grid of every 4th step, and exits 0), then SIGKILL at random moments
    (in steps, saves and deletions alike: a checkpoint every step); every committed checkpoint
    stays readable; the resumed run ends identical to the uninterrupted one, which runs
    alongside the kills (started once the first run compiled the train step into the module's
    cache, `cli_env`). KILLS kills (each restart costs a process start) before step STEPS - 6."""
    whole = tmp_path / "whole"  # the uninterrupted run
    run = tmp_path / "run"
    args = ["train", *RUN, "--config.train.ckpt_every=4", f"--workdir={run}"]
    proc = start(cli_env, *args, stderr=subprocess.PIPE)
    _wait_for_step(proc, run, 3)  # the loop is running
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = steps(run)[-1]
    assert 4 <= stopped < STEPS - 6, "stopped too late to test a resume"
    assert (f"stopped at step {stopped} on SIGTERM; checkpoint step {stopped} is in "
            f"{run / 'checkpoints'}; rerun the same command to resume") in err
    with open(tmp_path / "whole.err", "w") as err:  # a file: a full pipe would block it
        reference = start(cli_env, "train", *RUN, "--config.train.ckpt_every=8",
                          f"--workdir={whole}", stderr=err)
    args = ["train", *RUN, "--config.train.ckpt_every=1", f"--workdir={run}"]
    rng, kills = random.Random(0), 0
    while kills < KILLS and (steps(run) or [0])[-1] < STEPS - 6:
        proc = start(cli_env, *args)
        _wait_for_step(proc, run, (steps(run) or [0])[-1])  # progress, then kill
        time.sleep(rng.uniform(0.0, 0.8))
        kill(proc)
        kills += 1
        assert read_all(run), "no checkpoint"  # and every listed one restores
    assert kills >= KILLS, f"only {kills} kills before the run got near its end"
    last = cli(cli_env, *args)
    assert last.returncode == 0, last.stderr[-2000:]
    reference = _reference(reference, whole, tmp_path / "whole.err")
    step, (state, data_state) = final(run)
    assert step == STEPS and same(state, reference[0]), "resumed run differs"
    assert data_state == reference[1]  # the data position too: the next batch is the same
    assert same(_next_batch(data_state), _next_batch(skip=STEPS))  # batch STEPS + 1
    logged_once(run, list(range(4, STEPS + 1, 4)))
