"""`jaxdiff plan` (jaxdiff/train/plan.py, jaxdiff/cli/plan.py) and the models' remat policies:
the state's bytes per device are the arrays' (split by FSDP), the planned total of a tiny
config is within a tolerance of what the step takes when it runs, the batch search brackets
the limit, and bad input is one line, exit 2."""

import contextlib
import importlib.util
import io
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from jaxdiff import models
from jaxdiff.cli import main
from jaxdiff.models import layers
from jaxdiff.models.partitioning import AXES
from jaxdiff.train import init_state, make_optimizer
from jaxdiff.train import plan as plan_lib
from jaxdiff.train.state import abstract_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIT = dict(image_size=(8, 8), patch_size=2, hidden_size=32, depth=2, num_heads=2)
SHAPE = (8, 8, 3)


def _tx():
    return make_optimizer(lr=1e-3, total_steps=10, warmup_steps=0, schedule="constant",
                          weight_decay=0.0, grad_clip=1.0)[0]


def _mesh(data=1, fsdp=1, tensor=1):
    return AbstractMesh((data, fsdp, tensor), AXES, axis_types=(AxisType.Auto,) * 3)


def _plan(*args):
    """`jaxdiff plan ARGS` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["jaxdiff", "plan", *args])
    return code, out.getvalue(), err.getvalue()


# --- remat policies -------------------------------------------------------------------------

def test_remat_policy_names():
    assert layers.remat_policy(False) == (False, None)
    assert layers.remat_policy(True) == (True, None) == layers.remat_policy("full")
    assert layers.remat_policy("none") == (False, None)
    on, policy = layers.remat_policy("dots_saveable")
    assert on and policy is jax.checkpoint_policies.dots_saveable
    with pytest.raises(ValueError) as e:
        layers.remat_policy("dots")
    msg = str(e.value)
    assert "\n" not in msg and "'dots'" in msg and "dots_saveable" in msg and "True" in msg


@pytest.mark.parametrize("name", ["dit", "unet"])
def test_a_bad_remat_is_one_line_at_init(name):
    kw = TINY_DIT if name == "dit" else dict(image_size=(8, 8), channels=8, channel_mult=(1,),
                                             num_res_blocks=1, attn_resolutions=(),
                                             norm_groups=4)
    model = models.build(name, remat="sometimes", **kw)
    with pytest.raises(ValueError, match=r"remat='sometimes' is not a remat policy; allowed: "
                                         r"False, True, none, full, dots_saveable"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + SHAPE),
                                          jnp.zeros((1,))))


def test_remat_policies_keep_the_numerics():
    model = models.build("dit", **TINY_DIT)
    x = jax.random.normal(jax.random.key(1), (2,) + SHAPE)
    t = jnp.array([0.3, 0.7])
    v = model.init(jax.random.key(0), x, t)

    def value_and_grad(m):
        loss = lambda p: jnp.mean(jnp.square(m.apply(p, x, t, train=True)))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(v)

    l0, g0 = value_and_grad(model)
    for remat in ("none", "full", "dots_saveable", "nothing_saveable"):
        l1, g1 = value_and_grad(model.clone(remat=remat))
        np.testing.assert_allclose(l1, l0, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g0)


# --- the state's bytes ----------------------------------------------------------------------

def test_state_bytes_are_the_arrays_bytes():
    """One device: params, optimizer state and EMA per device are the initialised arrays'
    bytes; params = 4 bytes × the parameter count, AdamW's moments twice that."""
    model, tx = models.build("dit", **TINY_DIT), _tx()
    kw = dict(x_shape=SHAPE, num_classes=0, ema_decays=(0.9, 0.99))
    planned = plan_lib.state_bytes(abstract_state(model, tx, mesh=_mesh(), **kw))
    state = init_state(model, tx, seed=0, **kw)
    nbytes = lambda t: sum(np.asarray(a).nbytes for a in jax.tree.leaves(t))  # noqa: E731
    count = sum(a.size for a in jax.tree.leaves(state.params))
    assert planned["params"] == nbytes(state.params) == 4 * count
    assert planned["ema"] == nbytes(state.ema_params) == 2 * 4 * count
    assert planned["opt_state"] == nbytes(state.opt_state)
    assert 2 * 4 * count <= planned["opt_state"] <= 2 * 4 * count + 64  # mu, nu + counters


def test_fsdp_divides_the_parameter_bytes():
    model, tx = models.build("dit", **dict(TINY_DIT, hidden_size=64)), _tx()
    kw = dict(x_shape=SHAPE, num_classes=0, ema_decays=(0.9,))
    data = plan_lib.state_bytes(abstract_state(model, tx, mesh=_mesh(data=4), **kw))
    fsdp = plan_lib.state_bytes(abstract_state(model, tx, mesh=_mesh(fsdp=4), **kw))
    for part in ("params", "opt_state", "ema"):  # the LayerNorm-free DiT: nearly all sharded
        assert data[part] / 4 <= fsdp[part] <= data[part] / 4 * 1.05, (part, data, fsdp)
    assert data["other"] == fsdp["other"]  # step and key: replicated


# --- the plan against a run -----------------------------------------------------------------

def test_planned_total_is_near_the_measured_peak():
    """The planner's per-device total of a tiny UNet train step vs the resident-set growth of
    a fresh process running that compiled step (benchmarks/plan.py `measure`)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import plan as bench

    r = bench.measure("tiny digits UNet", ("configs/digits.py", ["--config.model.channels=16"],
                                           1, "data=1", 256, "none"))
    assert np.isfinite(r["loss"])
    assert r["plan"]["temp"] > 5 * r["plan"]["state"]  # the activations dominate: a real test
    assert abs(r["error"]) < 0.25, r


def test_batch_search_brackets_the_limit():
    """Doubling then bisection over a fake linear plan: the largest fitting batch, exactly,
    within the compile budget; none when batch 1 does not fit."""
    calls = []

    class Fake:
        def __init__(self, b, memory):
            self.batch_per_device, self.total, self.device_memory = b, 100 + 7 * b, memory

        @property
        def fits(self):
            return self.total <= self.device_memory

    def plan_at(memory):
        return lambda b: calls.append(b) or Fake(b, memory)

    best, miss, tried = plan_lib.largest_batch(plan_at(1000), 1000, start=4, max_compiles=12)
    assert best.batch_per_device == 128 and miss == 129 and len(tried) <= 10
    best, miss, _ = plan_lib.largest_batch(plan_at(50), 50, start=4)
    assert best is None and miss == 1
    _, _, tried = plan_lib.largest_batch(plan_at(10**6), 10**6, start=1, max_compiles=3)
    assert len(tried) == 3


def test_plan_command_on_fake_devices():
    """A tiny config planned for a v5e-2 topology: without libtpu one note line says so and
    the plan runs on 2 fake CPU devices (in a fresh process when JAX runs here already)."""
    code, out, err = _plan("--config", "configs/toy2d.py", "--topology", "v5e-2", "--no-search")
    assert code == 0, err
    assert "libtpu is not installed" in err and "--devices 2 --device-memory 16GiB" in err
    assert "2 cpu devices, mesh data=2,fsdp=1,tensor=1, 16 GiB per device (v5e-2)" in out
    assert "| - | 128 |" in out and "yes (" in out and "note: compiled by XLA:CPU" in out


# --- bad input: one line, exit 2 ------------------------------------------------------------

DIGITS = ("--config", "configs/digits.py")
BAD = [
    ((*DIGITS, "--devices", "8", "--mesh", "data=16"), "--mesh=data=16: mesh data=16,fsdp=1,"
     "tensor=1 does not fit 8 devices"),
    ((*DIGITS, "--devices", "8", "--mesh", "data=3,fsdp=-1"), "does not fit 8 devices"),
    ((*DIGITS, "--devices", "8", "--mesh", "pipe=8"), "'pipe' is not a mesh axis; allowed: "
     "data, fsdp, tensor"),
    ((*DIGITS, "--topology", "v9-8"), "--topology: 'v9-8' is not a known topology; allowed: "
     "KIND-COUNT with KIND one of v4, v5e"),
    ((*DIGITS, "--topology", "v4-3"), "v4 topologies count TensorCores"),
    ((*DIGITS, "--devices", "8", "--device-memory", "16gigs"), "--device-memory=16gigs: "
     "'16gigs' is not a memory size; allowed:"),
    ((*DIGITS, "--remat", "none,dots"), "--remat=none,dots: 'dots' is not a remat policy; "
     "allowed: none, full, dots_saveable"),
    ((*DIGITS, "--topology", "v5e-8", "--devices", "8"), "give --topology or --devices"),
    ((*DIGITS, "--devices", "8", "--batch", "12"), "--batch=12 (the global batch) does not "
     "split over data×fsdp = 8×1 = 8 devices"),
    (("--config", "configs/toy2d.py", "--remat", "full"), "model.name='mlp' has no remat "
     "setting"),
    (("--config", "configs/nope.py"), "--config=configs/nope.py: no such file"),
    ((*DIGITS, "--config.model.chanels=8"), "unknown config key 'model.chanels'"),
    ((*DIGITS, "--devices", "x"), "argument --devices: invalid int value: 'x'"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(b[0][2:]) for b in BAD])
def test_bad_input_is_one_line(args, message):
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        code, out, err = _plan(*args)
    finally:
        os.chdir(cwd)
    assert code == 2 and not out, (code, out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("jaxdiff plan: error: "), err
    assert message in err, err


@pytest.mark.parametrize("text,expected", [("16GiB", 16 * 2**30), ("80GB", 80 * 10**9),
                                           ("512MiB", 512 * 2**20), ("1.5 gib", 3 * 2**29),
                                           ("1000", 1000)])
def test_memory_sizes(text, expected):
    assert plan_lib.parse_bytes(text) == expected


def test_topologies_and_meshes():
    t = plan_lib.parse_topology("v5e-256")
    assert (t.devices, t.memory, t.platform) == (256, 16 * 2**30, "tpu")
    assert plan_lib.parse_topology("v4-8").devices == 4  # TensorCores: 2 per chip
    assert plan_lib.parse_topology("h100-8").memory == 81559 * 2**20
    assert plan_lib.resolve_mesh(plan_lib.parse_mesh("fsdp=8"), 64) == (8, 8, 1)
    assert plan_lib.resolve_mesh(plan_lib.parse_mesh("data=32,fsdp=8"), 256) == (32, 8, 1)
    assert plan_lib.resolve_mesh({"fsdp": -1}, 16) == (1, 16, 1)
    if importlib.util.find_spec("libtpu") is None:  # here: no TPU compiler, one line
        with pytest.raises(plan_lib.NoTpuCompiler, match="no TPU compiler here"):
            plan_lib.tpu_devices(t)

