"""MFU: FLOPs per step from XLA's cost analysis (2·M·N·K per matmul), the peak table, the
achieved-rate arithmetic, and the train loop logging flops_per_step / tflops_per_s / mfu with
the step compiled once."""

import functools
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import models, train
from jaxdiff.core.process import RectifiedFlow
from jaxdiff.train import mfu
from jaxdiff.train.logger import MetricsLog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def test_matmul_chain_flops_are_2mnk():
    M, K, N, P = 8, 16, 32, 4
    a, b, c = jnp.ones((M, K)), jnp.ones((K, N)), jnp.ones((N, P))
    flops = mfu.step_flops(_compiled(lambda a, b, c: (a @ b) @ c, a, b, c))
    assert flops == 2 * M * K * N + 2 * M * N * P == 10240


def test_dense_stack_forward_backward_flops():
    """Dense layers without bias, forward and backward (gradients of the weights): each layer's
    forward matmul, its weight gradient and (but for the first layer) its input gradient."""
    B, D, H, O = 8, 16, 32, 4
    model = nn.Sequential([nn.Dense(H, use_bias=False), nn.Dense(O, use_bias=False)])
    x, ct = jnp.ones((B, D)), jnp.ones((B, O))
    params = model.init(jax.random.key(0), x)

    def forward_backward(params, x, ct):
        y, vjp = jax.vjp(lambda p: model.apply(p, x), params)
        return y, vjp(ct)[0]

    flops = mfu.step_flops(_compiled(forward_backward, params, x, ct))
    layer1, layer2 = 2 * B * D * H, 2 * B * H * O
    assert flops == 2 * layer1 + 3 * layer2 == 22528


def test_peak_table():
    T = 1e12
    assert mfu.table_peak("TPU v4") == 275 * T
    assert mfu.table_peak("TPU v5 lite") == mfu.table_peak("TPU v5e") == 197 * T
    assert mfu.table_peak("TPU v5") == mfu.table_peak("TPU v5p") == 459 * T
    assert mfu.table_peak("TPU v6 lite") == mfu.table_peak("TPU v6e", "f32") == 918 * T
    assert mfu.table_peak("NVIDIA A100-SXM4-80GB") == 312 * T
    assert mfu.table_peak("NVIDIA A100-SXM4-40GB", "f32") == 156 * T  # TF32 dense
    assert mfu.table_peak("NVIDIA H100 80GB HBM3") == 989.4 * T
    assert mfu.table_peak("NVIDIA H100 80GB HBM3", "float32") == 494.7 * T
    assert mfu.table_peak("NVIDIA H200", "bfloat16") == 989.4 * T
    for unknown in ("TPU v3", "TPU v4 lite", "NVIDIA H100 PCIe", "NVIDIA GeForce RTX 4090",
                    "cpu", ""):
        assert mfu.table_peak(unknown) is None, unknown
    with pytest.raises(ValueError, match="int8"):
        mfu.table_peak("TPU v4", "int8")


def test_cpu_peak_is_a_measured_gemm_rate_cached_once():
    cpu = jax.devices("cpu")[0]
    rate = mfu.peak_flops(cpu, "bf16")
    assert 1e8 < rate < 1e15 and mfu.peak_flops(cpu, "f32") == rate
    assert mfu.cpu_gemm_rate.cache_info().currsize == 1


def test_throughput_math():
    assert mfu.throughput(1e12, 2.0, devices=4, peak=1e12) == (2e12, 0.5)
    assert mfu.throughput(3e9, 10.0) == (3e10, None)
    achieved, fraction = mfu.throughput(5e11, 4.0, devices=2, peak=100e12)
    assert achieved == 2e12 and fraction == pytest.approx(0.01)


@pytest.mark.parametrize("cost, want", [
    ({"flops": 12.0, "bytes accessed": 3.0}, 12.0),  # jax >= 0.4.30: a dict
    ([{"flops": 7.0}], 7.0),  # older: a list with one dict per program
    ([{"bytes accessed": 1.0}, {"flops": 5.0}], 5.0),
    ([], None), (None, None), ({"bytes accessed": 1.0}, None),
    ({"flops": -1.0}, None), ({"flops": float("nan")}, None), ({"flops": "x"}, None),
])
def test_cost_flops_shapes(cost, want):
    assert mfu.cost_flops(cost) == want


def test_step_flops_without_cost_analysis():
    class NoCost:
        def cost_analysis(self):
            raise NotImplementedError

    assert mfu.step_flops(NoCost()) is None


def test_matmul_dtype():
    def lowered(dtype):
        return jax.jit(jnp.matmul).lower(jnp.ones((4, 8), dtype), jnp.ones((8, 2), dtype))

    assert mfu.matmul_dtype(lowered(jnp.bfloat16)) == "bf16"
    assert mfu.matmul_dtype(lowered(jnp.float32)) == "f32"


def test_spmd_flops_are_per_device_and_the_loop_sums_them():
    """On 8 (CPU) devices XLA's cost analysis of the partitioned program is per device; the
    loop's `AheadOfTime.flops` is that times the device count, the global figure."""
    code = """
import json, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxdiff.train import mfu
from jaxdiff.train.loop import AheadOfTime
mesh = jax.make_mesh((8,), ("d",))
f = jax.jit(lambda w, x: (w, x @ w),
            in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("d"))))
w, x = jnp.ones((32, 16)), jnp.ones((64, 32))
step = AheadOfTime(f, (), list(mesh.devices.flat))
step(w, x)
print(json.dumps({"per_device": mfu.step_flops(f.lower(w, x).compile()), "loop": step.flops}))
"""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"per_device": 2 * 64 * 32 * 16 / 8, "loop": 2 * 64 * 32 * 16}


def test_ahead_of_time_step_runs_its_executable_and_falls_back_for_new_shapes():
    from jaxdiff.train.loop import AheadOfTime

    step = AheadOfTime(jax.jit(lambda s, b: (s + b.sum(), {"n": b.shape[0]}), donate_argnums=0))
    s, _ = step(jnp.zeros(()), np.ones((4, 2)))  # float64 numpy: converted as jit would
    s, _ = step(s, np.ones((4, 2), np.float32))
    assert step.run is not step.jitted and step.flops is not None
    s, metrics = step(s, np.ones((3, 2), np.float32))  # a new shape: plain jit from then on
    assert step.run is step.jitted and float(s) == 22.0 and metrics["n"] == 3


# ----------------------------------------------------------------------- the train loop

MODEL = models.build("mlp", width=16, depth=1, num_classes=0)


class Batches:
    def __init__(self):
        self.i = 0

    def __next__(self):
        rng = np.random.default_rng(self.i)
        self.i += 1
        return {"x": rng.standard_normal((8, 2)).astype(np.float32),
                "label": np.zeros(8, np.int32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def _setup():
    tx, lr_fn = train.make_optimizer(lr=1e-2, total_steps=4, schedule="constant")
    state = train.init_state(MODEL, tx, x_shape=(2,), num_classes=0, seed=0, ema_decays=())
    objective = train.diffusion_objective(MODEL, process=RectifiedFlow(), prediction="flow")
    return state, train.make_train_step(objective, tx, lr_fn, ema_decays=())


def test_train_logs_flops_and_compiles_the_step_once(tmp_path, capsys):
    state, step = _setup()
    traces, compiles = [], []

    @functools.wraps(step)
    def counted(*args):
        traces.append(1)
        return step(*args)

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration" and \
                "train_step" in str(kw.get("fun_name", "")):
            compiles.append(kw["fun_name"])

    reference = mfu.step_flops(_compiled(step, state, Batches().__next__()))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        train.train(state, counted, Batches(), workdir=str(tmp_path), total_steps=4,
                    log_every=2, ckpt_every=4)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(traces) == 1 and len(compiles) == 1, (traces, compiles)
    rows = [json.loads(r) for r in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["flops_per_step"] == reference > 0
        assert r["tflops_per_s"] > 0 and 0 < r["mfu"]  # CPU: against the measured GEMM rate
        # the same interval as img_per_s: achieved / flops = steps/s = img_per_s / batch
        steps_per_s = r["tflops_per_s"] * 1e12 / r["flops_per_step"]
        assert steps_per_s == pytest.approx(r["img_per_s"] / 8, rel=1e-6)
        assert r["mfu"] == pytest.approx(
            r["tflops_per_s"] * 1e12 / mfu.peak_flops(jax.devices()[0]), rel=1e-6)
    err = capsys.readouterr().err
    assert re.search(r"step 4/4 loss=\S+ \S+ steps/s \S+ TFLOP/s MFU \S+% ETA", err), err


def test_train_without_cost_analysis_logs_without_flops(tmp_path, monkeypatch):
    monkeypatch.setattr(mfu, "step_flops", lambda stage: None)
    state, step = _setup()
    final = train.train(state, step, Batches(), workdir=str(tmp_path), total_steps=2,
                        log_every=1, ckpt_every=2)
    assert int(final.step) == 2
    rows = [json.loads(r) for r in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert not {"flops_per_step", "tflops_per_s", "mfu"} & set(rows[0]) and "loss" in rows[0]


def test_progress_line_shows_tflops_and_mfu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    log = MetricsLog(str(tmp_path), total_steps=3000)
    log.write(100, {"loss": 0.5})
    log.write(200, {"loss": 0.12, "tflops_per_s": 12.34, "mfu": 0.314})
    log.close()
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"step 200/3000 loss=0\.12 [0-9.e+]+ steps/s 12\.3 TFLOP/s MFU 31% "
                        r"ETA \S+", lines[1]), lines
    assert "TFLOP/s" not in lines[0]
