"""The run directory is never damaged: one trainer per workdir (a lock), a refused `jaxdiff
train` (bad config, another architecture, changed settings) changes no file, a resumed run logs
each step once, and a checkpoint that cannot be written is one line, not a traceback."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxdiff.train import rundir
from jaxdiff.train.checkpoint import Checkpointer
from tests._cli import here
from tests._cli import train_here as _train_here
from tests._runs import ROOT, TOY, cli, kill, logged_once, nan_at, start, steps

# HOLD and TRY load jaxdiff/train/rundir.py alone (it imports only the standard library, and
# jax in lock()): the same lock code without importing all of jaxdiff in each process
LOAD = """import importlib.util
spec = importlib.util.spec_from_file_location("rundir", "jaxdiff/train/rundir.py")
rundir = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rundir)
"""
HOLD = LOAD + """import sys, time
with rundir.lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""
TRY = LOAD + """import sys
try:
    with rundir.lock(sys.argv[1]):
        print("locked")
except rundir.WorkdirBusy as e:
    print(e)
"""


def _py(code, *args, **kw):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, **kw)


def test_lock_refuses_another_process_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    with rundir.lock(workdir):
        with rundir.lock(workdir):  # re-entrant within a process
            assert rundir.held(workdir)
        assert rundir.held(workdir) and (workdir / ".lock").exists()
        out = _py(TRY, workdir).communicate(timeout=60)[0].strip()
        assert out.startswith(f"{workdir} is in use by another jaxdiff train (pid "
                              f"{os.getpid()} on host {socket.gethostname()}, since "), out
        assert out.endswith(f"; lock {workdir / '.lock'}); wait for it to end or stop it, or use "
                            "another work directory"), out
        with rundir.local_lock(workdir) as mine:
            assert mine  # held here already
    assert not rundir.held(workdir) and not workdir.exists()  # created here, left empty
    assert _py(TRY, workdir).communicate(timeout=60)[0].strip() == "locked"


def test_lock_of_a_killed_holder_is_free_at_once(tmp_path):
    holder = _py(HOLD, tmp_path)
    assert holder.stdout.readline().strip() == "locked"
    assert "in use by another jaxdiff train" in _py(TRY, tmp_path).communicate(timeout=60)[0]
    with rundir.local_lock(tmp_path) as mine:
        assert not mine
    assert kill(holder) == -signal.SIGKILL
    assert (tmp_path / ".lock").exists()  # left behind, but the kernel released the lock
    assert _py(TRY, tmp_path).communicate(timeout=60)[0].strip() == "locked"


def test_a_refused_run_leaves_no_new_workdir(tmp_path):
    with pytest.raises(RuntimeError):
        with rundir.lock(tmp_path / "new"):
            raise RuntimeError("refused")
    assert not (tmp_path / "new").exists()


def test_changed_settings():
    saved = {"optim": {"lr": 1e-3, "ema_decays": [0.999]}, "train": {"steps": 10, "seed": 0},
             "model": {"width": 16, "remat": False}, "sampler": {"name": "heun"}}
    wanted = {"optim": {"lr": 5e-4, "ema_decays": (0.999,)}, "train": {"steps": 20, "seed": 1},
              "model": {"width": 16, "remat": True}, "sampler": {"name": "euler"},
              "eval": {"new": 1}}
    may = ("train.steps", "model.remat", "sampler")
    assert rundir.changed_settings(saved, wanted, may) == ["optim.lr: 0.001 -> 0.0005",
                                                           "train.seed: 0 -> 1"]


def _hashes(workdir):
    """{relative path: sha256} of every file under `workdir`."""
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished(cli_env, tmp_path_factory):
    """A finished tiny run (4 steps, checkpoints 2 and 4); the refused runs must not touch it."""
    workdir = tmp_path_factory.mktemp("run")
    done = cli(cli_env, "train", *TOY, "--config.train.steps=4", "--config.train.ckpt_every=2",
               f"--workdir={workdir}")
    assert done.returncode == 0, done.stderr[-2000:]
    return workdir


@pytest.mark.parametrize("args,message", [
    (["--config.model.width=32"], "holds a checkpoint (step 4) of another architecture"),
    (["--config.model.name=resnet"], "model.name='resnet' is unknown"),
    (["--config.process.name=rectified_flw"], "rectified_flw"),
    (["--config.optim.lr=0.0005"], "holds step 4 of a run with other settings (optim.lr: "
                                   "0.001 -> 0.0005); resume it with its settings"),
    (["--config.optim.ema_decays=(0.9,0.99)"], "step 4 does not fit this run's train state"),
])
def test_refused_train_changes_no_file(capfd, finished, args, message):
    workdir = finished
    before = _hashes(workdir)
    code, err = _train_here(capfd, *TOY, "--config.train.steps=8", *args, f"--workdir={workdir}")
    assert code != 0 and "Traceback" not in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert _hashes(workdir) == before


def test_refused_runs_leave_it_sampleable(capfd, finished, tmp_path):
    """After the refused runs above (each left every file as it was) the run samples its step 4
    (in this process: sample only reads the run)."""
    code, err, out = here(capfd, "sample", f"--workdir={finished}", "--num=4", "--steps=2",
                          f"--out={tmp_path / 'sample.png'}", stdout=True)
    assert code == 0 and "step 4" in out, err[-2000:]


def test_second_trainer_is_refused_and_the_first_goes_on(capfd, cli_env, tmp_path):
    args = ["train", *TOY, "--config.train.steps=100000", "--config.train.ckpt_every=50",
            "--config.train.log_every=50", f"--workdir={tmp_path}"]
    first = start(cli_env, *args, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (tmp_path / "checkpoints" / "50").exists():  # locked, and saving
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
        time.sleep(0.1)
    holder = json.load(open(tmp_path / ".lock"))
    assert holder["pid"] == first.pid
    config = (tmp_path / "config.json").read_text()
    code, err = _train_here(capfd, *args[1:-1], "--config.optim.lr=0.01", f"--workdir={tmp_path}")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"jaxdiff train: error: {tmp_path} is in use by another jaxdiff "
                               f"train (pid {first.pid} on host {socket.gethostname()}, since ")
    assert first.poll() is None, "the first trainer stopped"
    first.send_signal(signal.SIGTERM)  # it saves and stops (exit 0)
    err = first.communicate(timeout=120)[1]
    assert first.returncode == 0, err[-2000:]
    assert (tmp_path / "config.json").read_text() == config  # the first run's, lr 1e-3
    assert not (tmp_path / ".lock").exists()
    ckpt = Checkpointer(tmp_path)
    saved = ckpt.all_steps()
    assert saved and all(ckpt.description(s)["model"]["width"] == 16 for s in saved)
    assert all((tmp_path / "checkpoints" / str(s) / "commit_success.txt").exists() for s in saved)
    ckpt.close()
    rows = [json.loads(r)["step"] for r in open(tmp_path / "metrics.jsonl")]
    assert rows == sorted(set(rows)), "one writer: each step once"


def test_resumed_run_logs_each_step_once(capfd, monkeypatch, cli_env, tmp_path):
    """Stopped at step 7 (a NaN; in this process, tests/_runs.py `nan_at`) after logging steps
    5 and 6 past checkpoint 4; the resumed run (a fresh process) logs 5..10 again, and
    metrics.jsonl and TensorBoard hold each step once."""
    args = ["train", *TOY, "--config.train.steps=10", "--config.train.ckpt_every=4",
            "--config.train.log_every=1", f"--workdir={tmp_path}"]
    with monkeypatch.context() as patch:
        nan_at(patch, 7)
        code, err = here(capfd, *args)
    assert code == 1 and "non-finite loss" in err, err[-2000:]
    assert steps(tmp_path) == [4] and len(open(tmp_path / "metrics.jsonl").readlines()) == 6
    time.sleep(1)  # the resumed segment's event file sorts after the first
    out = cli(cli_env, *args)
    assert out.returncode == 0, out.stderr[-2000:]
    logged_once(tmp_path, list(range(1, 11)))


SAVE_FAILS = """import os, sys
from tests._runs import DESC, state as _state
from jaxdiff.train.checkpoint import Checkpointer, CheckpointError
ckpt = Checkpointer(sys.argv[1])
ckpt.save(1, _state(1), {}, DESC)
ckpt.wait()
os.rename(ckpt.directory, ckpt.directory + ".moved")  # then the directory is a file
open(ckpt.directory, "w").close()
try:
    ckpt.save(2, _state(2), {}, DESC)
    ckpt.wait()
except CheckpointError as e:
    print(e)
ckpt.close()  # quietly: the failure was reported
ckpt = Checkpointer(sys.argv[1])  # a file named checkpoints: the first save fails
try:
    ckpt.save(1, _state(1), {}, DESC)
except CheckpointError as e:
    print(e)
ckpt.close()
"""


def test_failed_save_is_one_checkpoint_error(tmp_path):
    out = subprocess.run([sys.executable, "-c", SAVE_FAILS, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    d = tmp_path / "checkpoints"
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and out.stderr == "", out.stdout + out.stderr[-3000:]
    assert lines[0].startswith(f"could not save checkpoint step 2 in {d} (NotADirectoryError: "
                               f"[Errno 20] Not a directory: '{d}/2.orbax-checkpoint-tmp"), lines
    assert lines[0].endswith("); check that it is writable and has free space")
    assert lines[1].startswith(f"could not save checkpoint step 1 in {d} (NotADirectoryError: ")


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's /sys")
def test_unwritable_checkpoints_are_one_line(cli_env, tmp_path):
    """checkpoints/ -> /sys, where no one (root included) can make a directory: the first
    save fails; the CLI prints one line naming the directory and the OS error, no traceback."""
    try:
        os.mkdir("/sys/jaxdiff_test")
        os.rmdir("/sys/jaxdiff_test")
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    os.symlink("/sys", tmp_path / "checkpoints")
    out = cli(cli_env, "train", *TOY, "--config.train.steps=4", "--config.train.ckpt_every=2",
              f"--workdir={tmp_path}")
    assert out.returncode == 1, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith(f"jaxdiff train: error: could not save checkpoint step 2 in "
                                f"{tmp_path / 'checkpoints'} (") and "Error: [Errno " in lines[-1]
    others = [ln for ln in lines[:-1] if not ln.startswith(("jaxdiff train: process", "step "))]
    assert others == [], out.stderr[-3000:]
