"""Multi-controller training on one machine: launch/local.sh runs N jaxdiff processes that
join with jax.distributed (CPU collectives over gloo)."""

import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["train", "--config=configs/toy2d.py", "--config.model.width=32",
        "--config.model.depth=1", "--config.data.batch_size=32", "--config.optim.warmup_steps=1",
        "--config.train.log_every=3", "--config.train.ckpt_every=3",
        "--config.train.sample_every=0", "--config.train.num_samples=16",
        "--config.sampler.steps=2"]


def _run(processes, devices, workdir, steps):
    env = dict(os.environ, JAXDIFF_LOCAL_DEVICES=str(devices), PYTHON=sys.executable)
    out = subprocess.run(["bash", "launch/local.sh", str(processes), *ARGS,
                          f"--config.train.steps={steps}", f"--workdir={workdir}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _params(workdir):
    """Params and EMA params of the latest checkpoint, read onto this process's one device."""
    step = ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).latest_step()
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    reader = ocp.StandardCheckpointer()
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          reader.metadata(path).item_metadata)
    state = reader.restore(path, target)
    return step, jax.tree.map(np.asarray, (state["params"], state["ema_params"]))


def _close(a, b):
    return jax.tree.all(jax.tree.map(lambda x, y: np.allclose(x, y, rtol=1e-5, atol=1e-6), a, b))


def test_two_processes_equal_one_and_checkpoints_move_between_them(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    _run(2, 4, two, steps=6)  # 2 processes x 4 devices
    _run(1, 8, one, steps=6)  # 1 process x 8 devices
    (s2, p2), (s1, p1) = _params(two), _params(one)
    assert s1 == s2 == 6 and _close(p1, p2), "2 x 4 devices differs from 1 x 8"
    lines = open(two / "metrics.jsonl").read().splitlines()
    assert len(lines) == 2, "only process 0 writes the logs"
    # topology change: the 2-process checkpoint continues in 1 process as an 8-step 1-process run
    _run(1, 8, two, steps=9)
    _run(1, 8, one, steps=9)
    (s2, p2), (s1, p1) = _params(two), _params(one)
    assert s1 == s2 == 9 and _close(p1, p2)
