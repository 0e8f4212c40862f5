"""Multi-controller training on one machine: launch/local.sh runs N jaxdiff processes that
join with jax.distributed (CPU collectives over gloo)."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import _runs
from tests._cli import fast_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a constant learning rate: a run resumed to more steps equals one run to those steps, so one
# reference run serves every comparison below
ARGS = ["train", "--config=configs/toy2d.py", "--config.model.width=32",
        "--config.model.depth=1", "--config.data.batch_size=32", "--config.optim.warmup_steps=1",
        "--config.optim.schedule=constant", "--config.train.log_every=3",
        "--config.train.ckpt_every=3", "--config.train.sample_every=0",
        "--config.train.num_samples=16", "--config.sampler.steps=2"]


@pytest.fixture(scope="module")
def cli_env(cli_env):
    """tests/conftest.py's environment (a compilation cache for this module), compiling fast."""
    return fast_compile(cli_env)


def _run(env, processes, devices, workdir, steps, extra=()):
    env = dict(env, JAXDIFF_LOCAL_DEVICES=str(devices), PYTHON=sys.executable)
    out = subprocess.run(["bash", "launch/local.sh", str(processes), *ARGS, *extra,
                          f"--config.train.steps={steps}", f"--workdir={workdir}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _params(workdir, step=None):
    """(step, (params, EMA params)) of checkpoint `step` (default: the latest), read onto this
    process's one device."""
    step = ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).latest_step() if (
        step is None) else step
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    reader = ocp.StandardCheckpointer()
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          reader.metadata(path).item_metadata)
    state = reader.restore(path, target)
    return step, jax.tree.map(np.asarray, (state["params"], state["ema_params"]))


def _close(a, b):
    return jax.tree.all(jax.tree.map(lambda x, y: np.allclose(x, y, rtol=1e-5, atol=1e-6), a, b))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cli_env):
    """`reference(step)`: (params, EMA params) after `step` steps of one uninterrupted run in one
    process on 4 devices, which keeps a checkpoint of every third step: every run below ends at
    a multiple of 3. Run at first to `step` + 3 (at least 12 steps): the test asks for `end`
    and then `end` + 3, which one process start serves; resumed further on demand."""
    workdir = tmp_path_factory.mktemp("reference")
    every = ["--config.train.keep=1000"]  # ARGS: a checkpoint every 3 steps

    def at(step):
        if step > max(_runs.steps(workdir), default=0):
            _run(cli_env, 1, 4, workdir, steps=max(step + 3, 12), extra=every)
        got, params = _params(workdir, step)
        assert got == step
        return params

    return at


FAKE_SRUN = """#!/usr/bin/env bash
# Stands in for SLURM's srun: starts SLURM_NTASKS copies of the command with their ranks.
while [[ $1 == -* ]]; do shift; done  # srun's own options
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" & pids+=($!); done
s=0; for p in "${pids[@]}"; do wait "$p" || s=$?; done; exit $s
"""


def _slurm(tmp_path, cli_env, workdir, steps):
    """launch/slurm.sbatch under stand-ins for srun and scontrol (2 tasks x 2 devices): the
    coordinator is the job's first node, the ranks come from SLURM's environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'localhost\\nnode-b\\n'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = fast_compile(dict(cli_env, PATH=f"{bin_dir}:{os.environ['PATH']}",
                            PYTHON=sys.executable, SLURM_JOB_NODELIST="localhost,node-b",
                            SLURM_NTASKS="2", SLURM_NNODES="2", SLURM_JOB_ID=str(os.getpid()),
                            XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    out = subprocess.run(["bash", "launch/slurm.sbatch", *ARGS, f"--config.train.steps={steps}",
                          f"--workdir={workdir}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 node(s), coordinator localhost:" in out.stderr
    for rank in (0, 1):
        assert f"jaxdiff train: process {rank} of 2, 2 of 4 devices" in out.stderr
    return out


def test_launch_scripts_parse_and_tpu_script_targets_every_worker():
    for script in ("local.sh", "slurm.sbatch", "tpu_pod.sh"):
        check = subprocess.run(["bash", "-n", f"launch/{script}"], cwd=ROOT,
                               capture_output=True, text=True)
        assert check.returncode == 0, (script, check.stderr)
    env = dict(os.environ, DRY_RUN="1", TPU_NAME="pod", TPU_ZONE="zone-a")
    out = subprocess.run(["bash", "launch/tpu_pod.sh", "train", "--config", "configs/digits.py",
                          "--workdir", "/mnt/shared/run"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("gcloud compute tpus tpu-vm ssh pod --worker=all ")
    assert "jaxdiff\\ train\\ --distributed\\ --config\\ configs/digits.py" in out.stdout
    assert "--zone=zone-a" in out.stdout
    bad = subprocess.run(["bash", "launch/tpu_pod.sh", "train2"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "allowed: create, install, train" in bad.stderr


def test_two_processes_stop_together_resume_and_move_between_topologies(tmp_path, cli_env,
                                                                         reference):
    """One run through every multi-process path: 2 processes x 2 devices (launch/local.sh)
    train as one, only process 0 writing the logs; a preemption notice reaching both: they
    agree on one step (JAX's preemption service), save it together and exit 0; the run resumed
    by launch/slurm.sbatch (a requeued job, 2 tasks x 2 devices) equals one uninterrupted
    process on 4 devices; and then its checkpoint continues in 1 process on 8 devices."""
    import json
    import signal
    import time

    env = dict(cli_env, JAXDIFF_LOCAL_DEVICES="2", PYTHON=sys.executable)
    run = tmp_path / "run"
    proc = subprocess.Popen(["bash", "launch/local.sh", "2", *ARGS, "--config.train.log_every=1",
                             "--config.train.steps=100000", f"--workdir={run}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which passes it to every process
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stops = re.findall(r"stopped at step (\d+)", err)
    assert len(stops) == 2 and stops[0] == stops[1], err[-3000:]
    step = int(stops[0])
    assert _params(run)[0] == step
    # resume to the next multiple of 3 (a step the reference keeps) in 2 processes started as
    # launch/slurm.sbatch starts them (`_slurm`: the two tasks join and train together),
    # against the one process that never stopped
    end = step + 3 - step % 3
    _slurm(tmp_path, cli_env, run, steps=end)
    s2, p2 = _params(run)
    assert s2 == end and _close(reference(end), p2), "2 x 2 devices differs from 1 x 4"
    rows = [json.loads(r)["step"] for r in metrics.read_text().splitlines()]
    assert rows == [*range(1, step + 1), end], "only process 0 writes the logs, each step once"
    # topology change: the 2-process checkpoint on 4 devices continues in 1 process on 8
    _run(cli_env, 1, 8, run, steps=end + 3)
    s2, p2 = _params(run)
    assert s2 == end + 3 and _close(reference(end + 3), p2)
