"""Helpers shared by the tests that run `jaxdiff` in subprocesses (or, where nothing is killed, in
this process: tests/_cli.py `here`, `nan_at`) and damage, kill or poison its runs
(test_checkpoint, test_preemption, test_nonfinite, test_oom, test_rundir). The `cli_env` fixture
(tests/conftest.py) gives those subprocesses one compilation cache per test module."""

import contextlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxdiff import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESC = {"model": {"name": "toy", "width": 64}}  # a run description for Checkpointer tests
TINY = [  # tests/test_train.py's small digits run
    "--config=configs/digits.py", "--config.model.channels=8", "--config.model.channel_mult=(1,)",
    "--config.model.attn_resolutions=()", "--config.model.norm_groups=4",
    "--config.data.batch_size=16", "--config.optim.warmup_steps=1",
    "--config.train.sample_every=0", "--config.train.num_samples=10", "--config.sampler.steps=4",
]
# a tiny toy2d run (a 1-block MLP of width 16 on 2-D points): the runs that test what the loop
# and the CLI do around the train step (test_rundir, test_nonfinite). optim.schedule=constant:
# the train step does not depend on train.steps, so runs of any length compile one program,
# kept in the module's cache (cli_env)
TOY = ["--config=configs/toy2d.py", "--config.model.width=16", "--config.model.depth=1",
       "--config.data.batch_size=32", "--config.optim.warmup_steps=1",
       "--config.optim.schedule=constant", "--config.train.log_every=2",
       "--config.train.sample_every=0", "--config.train.num_samples=16",
       "--config.sampler.steps=2"]
# `python -c INJECT.format(at=k, extra=...)`: the CLI with batch x := NaN at step k (0: never),
# after running `extra` (e.g. a further monkeypatch); `nan_at` below does it in this process
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


def nan_at(monkeypatch, at):
    """INJECT in this process, for `jaxdiff train` run here (tests/_cli.py `here`): the CLI's
    train step with batch x := NaN at step `at` (1-based), through pytest's `monkeypatch`."""
    make = train.make_train_step

    def make_bad(*args, **kwargs):
        step = make(*args, **kwargs)
        return lambda s, b: step(s, dict(b, x=jnp.where(s.step + 1 == at, jnp.nan, b["x"])))

    monkeypatch.setattr(train, "make_train_step", make_bad)


def state(step, n=64):
    """A small TrainState whose arrays encode `step` (Adam moments as the optimizer state)."""
    tx = optax.adam(1e-3)
    params = {"w": jnp.arange(n, dtype=jnp.float32) * step, "b": jnp.full((2, 3), float(step))}
    return train.TrainState(step=jnp.asarray(step, jnp.int32), params=params, ema_params=(params,),
                            opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)))


def cached_env(cache_dir):
    """Subprocess environment with a persistent compilation cache in `cache_dir`: after the
    first run, later runs of the same program skip the compile (and compute bit-identical
    results)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def cli(env, *args, code=None, timeout=300):
    """`python -m jaxdiff.cli ARGS` (or `python -c code ARGS`) to completion, output captured."""
    head = ["-c", code] if code else ["-m", "jaxdiff.cli"]
    return subprocess.run([sys.executable, *head, *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)


def start(env, *args, stderr=subprocess.DEVNULL):
    """`python -m jaxdiff.cli ARGS` started in the background (stdout discarded)."""
    return subprocess.Popen([sys.executable, "-m", "jaxdiff.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def kill(proc):
    """SIGKILL `proc` and reap it; returns its exit status (-9)."""
    proc.kill()
    proc.communicate()
    return proc.returncode


def steps(workdir):
    """The committed checkpoint steps in `workdir`, ascending ([] without any)."""
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def read_all(workdir):
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


def final(workdir):
    """(last step, (train state, data state)) of the latest checkpoint in `workdir`."""
    step = steps(workdir)[-1]
    return step, read_all(workdir)[step]


def same(a, b):
    """Bit-identical trees of the same structure (state dict keys included)."""
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and jax.tree.all(jax.tree.map(np.array_equal, a, b)))


def logged_once(workdir, logged):
    """metrics.jsonl and the TensorBoard event files each hold every step of `logged` once."""
    rows = [json.loads(r)["step"] for r in open(os.path.join(workdir, "metrics.jsonl"))]
    assert rows == logged, rows
    from jaxdiff.train.logger import event_step, read_records

    tb = os.path.join(workdir, "tb")
    events = [event_step(d) for n in sorted(os.listdir(tb))
              for _, d in read_records(os.path.join(tb, n))[1:]]  # after file_version
    tags = len(events) // max(len(logged), 1)
    assert events == [s for s in logged for _ in range(tags)], events


@contextlib.contextmanager
def compilation_cache(cache_dir):
    """JAX's persistent compilation cache in `cache_dir`, in this process, for the duration: a
    program compiled again (the same train step rebuilt by a later run or a resume: a new
    closure, so a new jit, but the same XLA program) is read back instead of compiled, and
    computes bit-identically. Off again afterwards, as the other test modules expect."""
    try:  # private: a JAX without it runs the module uncached, slower but the same
        from jax._src.compilation_cache import reset_cache
    except ImportError:
        yield
        return
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {n: getattr(jax.config, n) for n in names}
    for name, value in zip(names, (str(cache_dir), 0.0, 0)):
        jax.config.update(name, value)
    reset_cache()
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        reset_cache()
