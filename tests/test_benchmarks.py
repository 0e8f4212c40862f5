"""Peer benchmarks (benchmarks/train_throughput.py, sampling_overhead.py, compile_time.py): each
runs with --quick (its main(), in this process), prints its table and writes JSON with the
expected content; the PyTorch peers have the architecture jaxdiff's models have (parameter
counts); the analytic DiT FLOP count agrees with XLA's."""

import json
import os
import sys

import flax
import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import _torch_peers  # noqa: E402
import train_throughput  # noqa: E402

from jaxdiff import models  # noqa: E402
from jaxdiff.train import state as train_state  # noqa: E402


def _run(script, tmp_path, *args):
    """`python benchmarks/SCRIPT.py --quick --out TMP ARGS`, run here: the script's main() with
    that command line (no interpreter start, and jax, torch and diffusers are imported already);
    (what it printed, the JSON it wrote)."""
    import contextlib
    import importlib
    import io

    module = importlib.import_module(script)
    argv, sys.argv = sys.argv, [f"benchmarks/{script}.py", "--quick", "--out", str(tmp_path),
                                *args]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            module.main()
    finally:
        sys.argv = argv
    with open(tmp_path / f"{script}.json") as f:
        return out.getvalue(), json.load(f)


def _abstract_params(model, shape, num_classes):
    return jax.eval_shape(lambda: flax.linen.unbox(
        train_state._variables(model, shape, num_classes, jax.random.key(0)))["params"])


def _jax_params(model, shape, num_classes):
    return sum(x.size for x in jax.tree.leaves(_abstract_params(model, shape, num_classes)))


def test_train_throughput_quick(tmp_path):
    out, res = _run("train_throughput", tmp_path, "--models", "dit", "--repeats", "1")
    assert "| model | B | implementation | params |" in out and "torch eager" in out
    (r,) = res["results"]
    jd, te = r["contenders"]["jaxdiff"], r["contenders"]["torch eager"]
    assert jd["params"] == te["params"] == 31728  # one block: no per-block embedder copies
    assert r["model_flops_per_step"] == 3 * 2 * train_throughput.dit_forward_flops(
        image=4, channels=4, **train_throughput.QUICK["dit"]["arch"])
    assert jd["img_per_s"] > 0 and 0 < jd["fraction_of_peak"] and jd["jaxdiff_speedup"] == 1
    assert te["jaxdiff_speedup"] == pytest.approx(te["median_s"] / jd["median_s"])
    assert set(r["matmul_peak"]["median_flops"]) == {"jax", "torch"}
    assert res["machine"]["cores"] == os.cpu_count() and len(res["load_avg_before"]) == 3


def test_sampling_overhead_quick(tmp_path):
    out, res = _run("sampling_overhead", tmp_path, "--repeats", "1")
    assert "| sampler | steps | implementation |" in out
    assert [(r["sampler"], r["steps"]) for r in res["results"]] == [
        ("ddim", 5), ("ddim", 20), ("dpmpp_2m", 5), ("dpmpp_2m", 20)]
    for r in res["results"]:
        assert r["retraces_while_timed"] == 0  # one compiled program per capacity
        rows = r["contenders"]
        assert len(rows) == 3 and all(c["per_step_s"] > 0 for c in rows.values())
        ref = [c for k, c in rows.items() if k.startswith("diffusers")]
        assert ref[0]["ratio_to_diffusers"] == 1.0
    assert [(m["sampler"], m["steps"]) for m in res["marginal"]] == [
        ("ddim", [5, 20]), ("dpmpp_2m", [5, 20])]
    assert all(len(m["per_step_s"]) == 3 for m in res["marginal"])


def test_compile_time_quick(tmp_path):
    out, res = _run("compile_time", tmp_path, "--repeats", "1")
    assert "trace+lower s" in out and "fresh compile s" in out
    assert [r["model"] for r in res["train_step"]] == ["DiT tiny"]
    assert all(r["compile_s"] > 0 for r in res["train_step"])
    assert [f["traces"] for f in res["sampler_fresh"]] == [1, 1, 1]
    # one program of capacity 1024 serves every step count: traced once, never again
    assert [s["traces"] for s in res["sampler_one_program"]] == [1, 0, 0]
    assert [s["steps"] for s in res["sampler_one_program"]] == [10, 100, 300]


def test_peer_parameter_counts():
    """diffusers' UNet2DModel as configured equals the CIFAR UNet parameter for parameter;
    diffusers' DiT has the same layers plus a copy of the t/y embedders in every block but
    the first (jaxdiff, like the reference DiT, shares one)."""
    cifar = train_throughput.FULL["unet"]
    jax_unet = models.build("unet", num_classes=0, **cifar["arch"])
    torch_unet = _torch_peers.diffusers_unet(image_size=32, in_channels=3, **cifar["arch"])
    assert _jax_params(jax_unet, (32, 32, 3), 0) == _torch_peers.param_count(torch_unet)
    arch = train_throughput.FULL["dit"]["arch"]
    jax_dit = models.build("dit", num_classes=1000, learn_sigma=False, **arch)
    torch_dit = _torch_peers.diffusers_dit(image_size=32, in_channels=4, num_classes=1000, **arch)
    D = arch["hidden_size"]
    embedders = (256 * D + D) + (D * D + D) + 1001 * D  # t-MLP and label table with null row
    assert _torch_peers.param_count(torch_dit) - _jax_params(jax_dit, (32, 32, 4), 1000) == (
        (arch["depth"] - 1) * embedders)


def test_analytic_dit_flops_match_xla():
    spec = train_throughput.QUICK["dit"]
    model = train_throughput._jax_model(spec)
    params = _abstract_params(model, (4, 4, 4), 10)
    fwd = jax.jit(lambda p, x, y: model.apply({"params": p}, x, jnp.zeros((1,)), y))
    xla = fwd.lower(params, jax.ShapeDtypeStruct((1, 4, 4, 4), jnp.float32),
                    jax.ShapeDtypeStruct((1,), jnp.int32)).cost_analysis()["flops"]
    analytic = train_throughput.dit_forward_flops(image=4, channels=4, **spec["arch"])
    assert 0.9 * xla <= analytic <= xla  # XLA also counts the elementwise work


def test_bad_models_option(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--quick", "--models", "dit,vit"])
    with pytest.raises(SystemExit) as e:
        train_throughput.main()
    assert e.value.code == 2
    assert "--models 'vit' is unknown; allowed: dit, unet" in capsys.readouterr().err


def test_kernels_benchmark_quick(tmp_path):
    """benchmarks/kernels.py, the GPU benchmark of issue 5, runs as a CPU smoke test."""
    out, res = _run("kernels", tmp_path, "--repeats", "1")
    assert "| S | D | impl |" in out and "| n | dtype | k | impl |" in out
    pallas = [r for r in res["attention"] if r["impl"] == "pallas"]
    assert pallas and all(r["fwdbwd_ms"] > 0 for r in pallas)
    assert {r["impl"] for r in res["solver_step"]} >= {"jnp", "pallas"}
