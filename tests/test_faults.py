"""Faults: damaged checkpoints, preemption signals, non-finite steps, out-of-memory, and (once
the loop is wired to `jaxdiff.train.faults`) SIGTERM / kill -9 / NaN runs of the CLI end to end."""

import glob
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxdiff import train
from jaxdiff.train import faults
from jaxdiff.train.checkpoint import Checkpointer, CheckpointError, abstract

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERCOMMIT = "/proc/sys/vm/overcommit_memory"  # "1": huge allocations succeed, then thrash
OVERCOMMIT_ALWAYS = not os.path.exists(OVERCOMMIT) or open(OVERCOMMIT).read().strip() == "1"


def _state(step, n=64):
    tx = optax.adam(1e-3)
    params = {"w": jnp.arange(n, dtype=jnp.float32) * step, "b": jnp.full((2, 3), float(step))}
    return train.TrainState(step=jnp.asarray(step, jnp.int32), params=params, ema_params=(params,),
                            opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)))


DESC = {"model": {"name": "toy", "width": 64}}
DAMAGE = {  # how a step directory gets damaged after it was committed
    "truncated array data": lambda d: [os.truncate(f, os.path.getsize(f) // 2) for f in
                                       glob.glob(f"{d}/state/**/d/*", recursive=True)],
    "missing commit marker": lambda d: os.remove(f"{d}/commit_success.txt"),
    "truncated _METADATA": lambda d: os.truncate(f"{d}/state/_METADATA", 40),
    "corrupt run description": lambda d: open(f"{d}/run/metadata", "w").write("{\"mod"),
    "deleted state": lambda d: shutil.rmtree(f"{d}/state"),
}


def _saved(workdir, steps):
    ckpt = Checkpointer(workdir, keep=10)
    for s in steps:
        ckpt.save(s, _state(s), {"next_index": s}, DESC)
    ckpt.close()


def test_damaged_latest_checkpoints_fall_back_with_warnings(tmp_path, caplog):
    _saved(tmp_path, range(1, 7))
    for step, how in zip(range(6, 1, -1), DAMAGE.values()):  # steps 6..2 each damaged one way
        how(tmp_path / "checkpoints" / str(step))
    ckpt = Checkpointer(tmp_path)
    with caplog.at_level(logging.WARNING):
        state, data = ckpt.restore(abstract(_state(0)), DESC)
    assert int(state.step) == 1 and data == {"next_index": 1}
    np.testing.assert_array_equal(state.params["w"], _state(1).params["w"])
    warned = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
    assert len(warned) == 5, warned
    d = ckpt.directory
    assert warned[0].startswith(f"checkpoint {d}/6 is unreadable (")
    assert warned[0].endswith("; restoring step 5 instead") and "no commit marker" in warned[1]
    assert ckpt.latest_step() == 1  # the damaged ones no longer count
    # the run goes on from step 1: its first save sets the damaged steps aside, step 2 is new
    ckpt.save(2, _state(2), {"next_index": 2}, DESC)
    ckpt.close()
    names = sorted(os.listdir(d))
    assert {"2.unreadable", "6.unreadable"} <= set(names) and "3" not in names
    ckpt = Checkpointer(tmp_path)
    assert int(ckpt.restore(abstract(_state(0)), DESC)[0].step) == 2
    ckpt.close()


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    _saved(tmp_path, [1, 2])
    DAMAGE["truncated array data"](tmp_path / "checkpoints" / "2")
    DAMAGE["missing commit marker"](tmp_path / "checkpoints" / "1")
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError) as e:
        ckpt.restore(abstract(_state(0)), DESC)
    msg = str(e.value)
    assert msg.startswith(f"no readable checkpoint in {tmp_path / 'checkpoints'} (step 2: ")
    assert "; step 1: no commit marker" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match="no readable checkpoint"):  # an explicit step too
        ckpt.restore(abstract(_state(0)), DESC, step=2)
    ckpt.close()


def test_another_run_is_refused_not_skipped(tmp_path):
    _saved(tmp_path, [1, 2])
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds a checkpoint \(step 2\) of another arch"):
        ckpt.restore(abstract(_state(0)), {"model": {"name": "toy", "width": 32}})
    with pytest.raises(CheckpointError, match=r"step 2 does not fit this run's train state "
                                              r"\(params/w has shape \(64,\) in the checkpoint, "
                                              r"\(32,\) in this run \(and 3 more\)\)"):
        ckpt.restore(abstract(_state(0, n=32)), DESC)
    assert ckpt.unreadable == {}
    ckpt.close()


def test_first_save_removes_killed_saves(tmp_path):
    _saved(tmp_path, [1])
    stale = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp"
    (stale / "state").mkdir(parents=True)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 1  # an uncommitted save is not a checkpoint
    ckpt.save(3, _state(3), {}, DESC)
    ckpt.close()
    assert not stale.exists() and sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "3"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_guard_sets_flag_and_restores_handlers(sig):
    before = signal.getsignal(sig)
    with faults.PreemptionGuard() as guard:
        assert not guard.should_stop(0)
        os.kill(os.getpid(), sig)
        for _ in range(100):  # the handler runs in the main thread, between bytecodes
            time.sleep(0 if guard.requested else 0.01)
        assert guard.requested and guard.should_stop(1) and guard.signal_name == sig.name
    assert signal.getsignal(sig) is before


def test_second_signal_stops_at_once_even_in_native_code(tmp_path):
    """The first SIGTERM only asks; the second ends the process although its main thread is
    blocked in C (system() retries waitpid, so no Python handler can run there)."""
    code = ("import ctypes, sys\nfrom jaxdiff.train.faults import PreemptionGuard\n"
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


def _toy_step(tx):
    def step(state, batch):
        loss, grads = jax.value_and_grad(lambda p: jnp.sum(p["w"] * batch["x"]))(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": jnp.float32(0.1)}
        return state.replace(step=state.step + 1, params=params, ema_params=(params,),
                             opt_state=opt_state), metrics
    return step


def test_skip_nonfinite_keeps_state_and_advances_step():
    state = _state(1, n=4)  # Adam moments, as _toy_step's optimizer
    step = jax.jit(faults.with_skip_nonfinite(_toy_step(optax.adam(1e-3))))
    good, m = step(state, {"x": jnp.ones(4)})
    assert int(good.step) == 2 and float(m["skipped"]) == 0.0
    assert not np.array_equal(good.params["w"], state.params["w"])
    bad, m = step(good, {"x": jnp.array([1.0, jnp.nan, 1.0, 1.0])})
    assert int(bad.step) == 3 and float(m["skipped"]) == 1.0 and np.isnan(m["loss"])
    for a, b in zip(jax.tree.leaves(bad.replace(step=good.step)), jax.tree.leaves(good)):
        np.testing.assert_array_equal(a, b)  # params, EMA, optimizer state (count too) kept
    huge = good.replace(params={**good.params, "w": jnp.full(4, 1e30)})  # finite; norm is not
    out, m = jax.jit(faults.skip_nonfinite)(good, huge, {"loss": 1.0, "grad_norm": 1.0})
    assert float(m["skipped"]) == 0.0 and out.params["w"][0] == np.float32(1e30)


def test_check_finite_names_step_and_last_good_checkpoint(tmp_path):
    faults.check_finite({"loss": np.float32(1.0)}, 3)
    with pytest.raises(FloatingPointError) as e:
        faults.check_finite({"loss": np.float32(np.nan), "lr": 1.0}, 7)
    assert str(e.value).startswith("non-finite loss at step 7; no checkpoint was written yet;")
    _saved(tmp_path, [4])
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(FloatingPointError) as e:
        faults.check_finite({"loss": np.inf, "grad_norm": np.nan}, 9, ckpt)
    assert str(e.value).startswith(
        f"non-finite loss, grad_norm at step 9; the last good checkpoint is step 4 in "
        f"{tmp_path / 'checkpoints'} (untouched); lower --config.optim.lr in a fresh --workdir "
        f"holding a copy of {tmp_path / 'checkpoints'}, or set "
        "--config.train.skip_nonfinite=True")
    faults.check_finite({"loss": np.nan, "grad_norm": np.nan, "skipped": 1.0}, 9)  # guarded
    ckpt.close()
    with pytest.raises(FloatingPointError, match="non-finite lr at step 9"):
        faults.check_finite({"loss": np.nan, "lr": np.nan, "skipped": 1.0}, 9)


class XlaRuntimeError(RuntimeError):
    """Stands in for jaxlib's error type (the name and text are what matter)."""


def test_oom_message_names_the_memory_knobs():
    exc = XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                          "8589934592 bytes.\nBufferAssignment OOM Debugging.\n...")
    msg = faults.oom_message(exc, {"data.batch_size": 256, "mesh.fsdp": 1, "model.remat": False})
    assert "\n" not in msg and "Out of memory while trying to allocate 8589934592 bytes" in msg
    for knob in ("--config.data.batch_size [now 256]", "--config.model.remat=True",
                 "[now False]", "--config.mesh.fsdp=N", "[now 1]"):
        assert knob in msg, msg
    assert "--config.model.remat" in faults.oom_message(MemoryError())  # no hints: every knob
    assert faults.oom_message(XlaRuntimeError("INVALID_ARGUMENT: bad shapes")) is None
    assert faults.oom_message(ValueError("Out of memory")) is None  # not a runtime error
    from ml_collections import ConfigDict

    config = ConfigDict({"data": {"batch_size": 64}, "mesh": {"data": -1, "fsdp": 2}})
    assert faults.memory_hints(config) == {"data.batch_size": 64, "mesh.fsdp": 2}
    if not OVERCOMMIT_ALWAYS:  # a real XLA error: 4 TiB fails at once
        with pytest.raises(Exception) as e:
            jnp.ones((2**40,), jnp.float32).block_until_ready()
        msg = faults.oom_message(e.value, {"data.batch_size": 64})
        assert msg.startswith("out of memory on ") and "RESOURCE_EXHAUSTED" in msg


def _wired():
    from jaxdiff.cli import commands

    config = open(os.path.join(ROOT, "configs", "digits.py")).read()
    return hasattr(train, "faults") and hasattr(commands, "faults") and "skip_nonfinite" in config


WIRED = _wired()
e2e = pytest.mark.skipif(not WIRED, reason="train loop not yet wired to jaxdiff.train.faults")
TINY = [  # tests/test_train.py's small digits run
    "--config=configs/digits.py", "--config.model.channels=8", "--config.model.channel_mult=(1,)",
    "--config.model.attn_resolutions=()", "--config.model.norm_groups=4",
    "--config.data.batch_size=16", "--config.optim.warmup_steps=1",
    "--config.train.sample_every=0", "--config.train.num_samples=10", "--config.sampler.steps=4",
]
STEPS = 24
RUN = TINY + [f"--config.train.steps={STEPS}", "--config.train.log_every=4"]
INJECT = """import sys
import jax.numpy as jnp
from jaxdiff import train
make = train.make_train_step
def make_bad(*args, **kwargs):  # batch x := NaN at step {at} (1-based)
    step = make(*args, **kwargs)
    return lambda s, b: step(s, dict(b, x=jnp.where(s.step + 1 == {at}, jnp.nan, b["x"])))
train.make_train_step = make_bad
{extra}
from jaxdiff.cli import main
sys.exit(main(["jaxdiff"] + sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment sharing a persistent compilation cache: after the first run,
    later runs of the same program skip the compile (and compute bit-identical results)."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _cli(env, *args, code=None, timeout=300):
    head = ["-c", code] if code else ["-m", "jaxdiff.cli"]
    return subprocess.run([sys.executable, *head, *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)


def _start(env, *args, stderr=subprocess.DEVNULL):
    return subprocess.Popen([sys.executable, "-m", "jaxdiff.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _wait_for_step(proc, workdir, above, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if _steps(workdir) and _steps(workdir)[-1] > above:
            return
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended (rc {proc.returncode}) before step {above + 1}"
    assert time.time() < deadline, f"no checkpoint after step {above} in {timeout} s"


def _read_all(workdir):
    """{step: (train state, data-iterator state)} of every committed checkpoint, each read whole
    by orbax: everything that defines the run (step, params, EMA params, optimizer state, PRNG
    key, the data position)."""
    mngr, out = ocp.CheckpointManager(os.path.join(workdir, "checkpoints")), {}
    for step in mngr.all_steps():
        assert os.path.exists(os.path.join(mngr.directory, str(step), "commit_success.txt"))
        got = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore(),
            run=ocp.args.JsonRestore()))
        assert int(got["state"]["step"]) == step
        out[step] = (jax.tree.map(np.asarray, got["state"]), got["data"])
    mngr.close()
    return out


def _final(workdir):
    step = _steps(workdir)[-1]
    return step, _read_all(workdir)[step]


def _same(a, b):
    """Bit-identical trees of the same structure (state dict keys included)."""
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and jax.tree.all(jax.tree.map(np.array_equal, a, b)))


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


def _logged_once(workdir, steps):
    """metrics.jsonl and the TensorBoard event files each hold every logged step once."""
    rows = [json.loads(r)["step"] for r in open(os.path.join(workdir, "metrics.jsonl"))]
    assert rows == steps, rows
    from jaxdiff.train.logger import event_step, read_records

    tb = os.path.join(workdir, "tb")
    events = [event_step(d) for n in sorted(os.listdir(tb))
              for _, d in read_records(os.path.join(tb, n))[1:]]  # after file_version
    tags = len(events) // max(len(steps), 1)
    assert events == [s for s in steps for _ in range(tags)], events


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """Final (train state, data state) of an uninterrupted run."""
    workdir = tmp_path_factory.mktemp("whole")
    out = _cli(env, "train", *RUN, "--config.train.ckpt_every=8", f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr[-2000:]
    step, final = _final(workdir)
    assert step == STEPS
    _logged_once(workdir, list(range(4, STEPS + 1, 4)))
    return final


@e2e
def test_sigterm_saves_stops_and_resumes_identically(env, reference, tmp_path):
    args = ["train", *RUN, "--config.train.ckpt_every=4", f"--workdir={tmp_path}"]
    proc = _start(env, *args, stderr=subprocess.PIPE)
    _wait_for_step(proc, tmp_path, 3)  # the loop is running
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = _steps(tmp_path)[-1]
    assert 4 <= stopped < STEPS, "stopped too late to test a resume"
    assert (f"stopped at step {stopped} on SIGTERM; checkpoint step {stopped} is in "
            f"{tmp_path / 'checkpoints'}; rerun the same command to resume") in err
    resumed = _cli(env, *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    step, params = _final(tmp_path)
    assert step == STEPS and _same(params, reference), "resumed run differs"


@e2e
def test_random_kills_resume_bit_identically(env, reference, tmp_path):
    """SIGKILL at random moments (in steps, saves and deletions alike: a checkpoint every
    step); every committed checkpoint stays readable; the resumed run ends identical."""
    args = ["train", *RUN, "--config.train.ckpt_every=1", f"--workdir={tmp_path}"]
    rng, kills = random.Random(0), 0
    while kills < 5 and (_steps(tmp_path) or [0])[-1] < STEPS - 6:
        proc = _start(env, *args)
        _wait_for_step(proc, tmp_path, (_steps(tmp_path) or [0])[-1])  # progress, then kill
        time.sleep(rng.uniform(0.0, 0.8))
        proc.kill()
        proc.communicate()
        kills += 1
        assert _read_all(tmp_path), "no checkpoint"  # and every listed one restores
    assert kills >= 5, f"only {kills} kills before the run got near its end"
    final = _cli(env, *args)
    assert final.returncode == 0, final.stderr[-2000:]
    step, (state, data_state) = _final(tmp_path)
    assert step == STEPS and _same(state, reference[0]), "resumed run differs"
    assert data_state == reference[1]  # the data position too: the next batch is the same
    assert _same(_next_batch(data_state), _next_batch(skip=STEPS))  # batch STEPS + 1
    _logged_once(tmp_path, list(range(4, STEPS + 1, 4)))


@e2e
def test_nonfinite_loss_stops_with_one_line_and_keeps_checkpoints(env, tmp_path):
    args = ["train", *TINY, "--config.train.steps=8", "--config.train.ckpt_every=2",
            "--config.train.log_every=5", f"--workdir={tmp_path}"]
    out = _cli(env, *args, code=INJECT.format(at=4, extra=""))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert lines == [
        f"jaxdiff train: error: non-finite loss, grad_norm at step 4; the last good checkpoint "
        f"is step 2 in {tmp_path / 'checkpoints'} (untouched); lower --config.optim.lr in a "
        f"fresh --workdir holding a copy of {tmp_path / 'checkpoints'}, or set "
        "--config.train.skip_nonfinite=True to skip such updates"], out.stderr[-2000:]
    saved = _read_all(tmp_path)  # step 4 (NaN params) was never written
    assert list(saved) == [2] and all(np.isfinite(x).all() for x in jax.tree.leaves(saved[2]))


@e2e
def test_skip_nonfinite_finishes_the_run(env, tmp_path):
    args = ["train", *TINY, "--config.train.steps=6", "--config.train.ckpt_every=3",
            "--config.train.log_every=1", "--config.train.skip_nonfinite=True",
            f"--workdir={tmp_path}"]
    out = _cli(env, *args, code=INJECT.format(at=4, extra=""))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["step"]: r for r in map(json.loads, open(tmp_path / "metrics.jsonl"))}
    assert [rows[s]["skipped"] for s in range(1, 7)] == [0, 0, 0, 1, 0, 0]
    assert np.isnan(rows[4]["loss"]) and np.isfinite(rows[5]["loss"])
    step, params = _final(tmp_path)
    assert step == 6 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@e2e
@pytest.mark.skipif(OVERCOMMIT_ALWAYS, reason="a 4 TiB allocation would not fail at once")
def test_out_of_memory_is_one_line_with_knobs(env, tmp_path):
    oom = ("import jax.numpy as jnp\n"
           "train.train = lambda *a, **k: jnp.ones((2**40,), jnp.float32).block_until_ready()")
    out = _cli(env, "train", *TINY, "--config.train.steps=2", f"--workdir={tmp_path}",
               code=INJECT.format(at=0, extra=oom))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("jaxdiff train: error: out of memory on ")
    assert "a smaller --config.data.batch_size [now 16]" in line and "mesh.fsdp=N" in line


def test_output_files_are_replaced_whole_or_not_at_all(tmp_path):
    from jaxdiff.eval import images

    path = str(tmp_path / "out" / "report.json")
    images.write_atomically(path, lambda tmp: open(tmp, "w").write("old"))

    def crash(tmp):  # dies half-way through writing the new version
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        images.write_atomically(path, crash)
    assert open(path).read() == "old"  # the previous file is intact
    images.write_atomically(path, lambda tmp: open(tmp, "w").write("new"))
    assert open(path).read() == "new"
