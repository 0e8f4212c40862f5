"""Meshes: data/FSDP/tensor-parallel training equals one device, sharded sampling equals
unsharded, checkpoints move between meshes, clear errors.

The suite runs with one CPU device; these cases need eight, which JAX creates only at start-up
(`--xla_force_host_platform_device_count=8`). So one subprocess runs this file as a script, does
every case with the fewest compiles and prints JSON; the tests below check its numbers.
"""

import json
import os
import subprocess
import sys

import pytest

from tests._cli import fast_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(8, 1, 1), (4, 2, 1), (2, 2, 2)]
TOL = 1e-5  # float32, relative to each array's largest entry


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = fast_compile(dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
                            JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
    workdir = tmp_path_factory.mktemp("parallel")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), str(workdir)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_mesh_construction_and_errors(results):
    m = results["mesh"]
    assert m["default"] == [8, 1, 1] and m["fsdp2"] == [4, 2, 1] and m["all"] == [2, 2, 2]
    assert m["sub"] == [1, 1, 1]
    assert "mesh sizes data=3, fsdp=1, tensor=1 do not fit the 8 devices" in m["err_divide"]
    assert "at most one axis may be -1" in m["err_two_rest"]
    assert "mesh.fsdp=0 is not a mesh size" in m["err_zero"]
    assert "mesh sizes data=2, fsdp=2, tensor=1 do not fit the 8 devices" in m["err_small"]


@pytest.mark.parametrize("model,mesh", [("mlp", m) for m in MESHES] + [("dit", (2, 2, 2))],
                         ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_training_on_a_mesh_equals_one_device(results, model, mesh):
    """3 steps (init, loss, grads, AdamW, EMA) of a class-conditional MLP (width 16) and DiT
    (width 16, 2 heads); on (4, 2, 1) through `train.train`. Measured: loss rel <= 1.2e-7,
    state rel <= 8.3e-7 (MLP) and 9.3e-7 (DiT)."""
    r = results["train"][model]["x".join(map(str, mesh))]
    assert r["init_diff"] == 0.0  # created sharded, yet the very same initial values
    assert r["loss_rel"] < TOL, r  # the 3 losses
    assert r["params_rel"] < TOL, r  # params, EMA params, Adam moments after 3 steps


def test_params_and_optimizer_state_are_sharded(results):
    s = results["specs"]  # MLP on (2, 2, 2): kernel ("embed", "mlp") of shape (16, 32)
    assert s["fc1_spec"] == ["fsdp", "tensor"] and s["fc1_shard"] == [8, 16]
    assert s["mu_spec"] == s["fc1_spec"]  # Adam's first moment follows its parameter
    assert s["ema_spec"] == s["fc1_spec"]
    assert s["mlp2_spec"] == ["fsdp", None]  # ("embed", "embed"): fsdp once, then whole
    assert s["vocab_spec"] == [None, "fsdp"]  # label table (4, 16): 4 rows stay whole
    assert s["dit_qkv_spec"] == ["fsdp", "tensor"]  # DiT attention: heads over tensor
    assert s["step_spec"] == []  # the step is replicated


@pytest.mark.parametrize("sampler", ["heun", "euler_ancestral"])
def test_sharded_sampling_equals_unsharded(results, sampler):
    r = results["sample"][sampler]
    assert r["shape"] == [10, 2] and r["labels"] == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    # 10 samples padded to 16 over 8 devices vs plain jaxdiff.sample of 10 on one device
    assert r["sharded_vs_plain_sample"] < TOL
    assert r["prefix"] < TOL  # sample i does not depend on how many are drawn


def test_checkpoint_moves_between_meshes(results):
    c = results["checkpoint"]  # written by train(..., mesh=(4, 2, 1)) after 3 steps
    assert c["to_421"] == c["to_222"] == c["to_1"] == 0.0  # bit for bit, on every layout
    assert c["to_222_spec"] == ["fsdp", "tensor"] and c["to_222_devices"] == 8
    assert c["to_1_devices"] == 1


def test_batch_not_divisible_by_data_fsdp(results):
    assert results["errors"]["batch"] == (
        "global batch size 12 is not divisible by data×fsdp = 4×2 = 8 devices")


def test_cli_train_and_sample_on_a_mesh(results):
    c = results["cli"]  # jaxdiff train with mesh.fsdp=2 on 8 devices, then jaxdiff sample
    assert c["step"] == 2 and c["samples"] == [6, 2] and c["finite"]
    assert "global batch size 12 is not divisible by data×fsdp = 4×2 = 8" in c["bad_batch"]
    assert "mesh.pipeline is not a config key; allowed in mesh: data, fsdp, tensor" in c["bad_axis"]


# ---------------------------------------------------------------- the subprocess (8 devices)


def _rel(a, b):
    """max |a - b| over all leaves relative to max |b| over all leaves (trees of equal shape)."""
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(la) == len(lb)
    la, lb = (np.concatenate([np.ravel(x).astype(np.float64) for x in t]) for t in (la, lb))
    return float(np.max(np.abs(la - lb)) / max(np.max(np.abs(lb)), 1e-30))


def _state_rel(a, b):
    """The worst `_rel` of params, EMA params and optimizer state (each to its own scale)."""
    return max(_rel(getattr(a, f), getattr(b, f)) for f in
               ("step", "params", "ema_params", "opt_state", "rng"))


def _spec(a):
    return [x if x is None or isinstance(x, str) else list(x) for x in a.sharding.spec]


class _Batches:
    """A checkpointable iterator over a fixed list of batches (the train loop's `data`)."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def __next__(self):
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def _setup(name):
    import numpy as np

    from jaxdiff import models, train
    from jaxdiff.core.process import EDM

    model, shape = {"mlp": (models.build("mlp", width=16, depth=2, num_classes=3), (2,)),
                    "dit": (models.build("dit", depth=1, hidden_size=16, num_heads=2,
                                         num_classes=3), (8, 8, 1))}[name]
    tx, lr_fn = train.make_optimizer(lr=1e-2, total_steps=10, warmup_steps=0)
    kw = dict(x_shape=shape, num_classes=3, seed=0, ema_decays=(0.5,))
    step = train.make_train_step(
        train.diffusion_objective(model, process=EDM(), prediction="edm", num_classes=3),
        tx, lr_fn, ema_decays=(0.5,))
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((16,) + shape).astype(np.float32),
                "label": rng.integers(0, 3, 16).astype(np.int32)} for _ in range(3)]
    return dict(model=model, tx=tx, kw=kw, step=step, batches=batches)


def _steps(setup, mesh):
    """(initial state, losses, final state), all on the host, of 3 steps on `mesh`."""
    import jax

    from jaxdiff import train
    from jaxdiff.train import parallel

    state = train.init_state(setup["model"], setup["tx"], mesh=mesh, **setup["kw"])
    init = jax.device_get(state)
    fn = parallel.jit_train_step(setup["step"], parallel.shardings_of(state), mesh)
    losses = []
    for batch in setup["batches"]:
        state, metrics = fn(state, parallel.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return init, losses, state


def _loop(setup, workdir):
    """(initial state, losses, final state) of 3 steps of `train.train` on mesh (4, 2, 1)."""
    import jax

    from jaxdiff import train
    from jaxdiff.train import parallel

    mesh = parallel.make_mesh(4, 2, 1)
    state = train.init_state(setup["model"], setup["tx"], mesh=mesh, **setup["kw"])
    init = jax.device_get(state)
    final = train.train(state, setup["step"], _Batches(setup["batches"]), workdir=workdir,
                        total_steps=3, log_every=1, ckpt_every=3, mesh=mesh)
    losses = [json.loads(r)["loss"] for r in open(os.path.join(workdir, "metrics.jsonl"))]
    return init, losses, final


def _train_cases(mesh1, workdir):
    """MLP on every mesh ((4, 2, 1) through the train loop, which also writes the checkpoint of
    `_checkpoint_case`), the DiT on (2, 2, 2) only, each against 3 steps on one device."""
    import jax

    from jaxdiff.train import parallel

    out, specs, keep = {"mlp": {}, "dit": {}}, {}, {}
    for name, meshes in (("mlp", MESHES), ("dit", [(2, 2, 2)])):
        setup = _setup(name)
        init1, losses1, final1 = _steps(setup, mesh1)
        for shape in meshes:
            if name == "mlp" and shape == (4, 2, 1):
                init, losses, final = _loop(setup, workdir)
                keep["loop_final"] = jax.device_get(final)
            else:
                init, losses, final = _steps(setup, parallel.make_mesh(*shape))
            out[name]["x".join(map(str, shape))] = dict(
                init_diff=_state_rel(init, init1), loss_rel=_rel(losses, losses1),
                params_rel=_state_rel(final, final1), losses=losses)
        kernel = lambda t: t["blocks.0"]["fc1"]["kernel"]  # noqa: E731
        if name == "mlp":  # `final` is on (2, 2, 2)
            p = final.params
            specs.update(fc1_spec=_spec(kernel(p)),
                         fc1_shard=list(kernel(p).addressable_shards[0].data.shape),
                         mu_spec=_spec(kernel(final.opt_state[1][0].mu)),
                         ema_spec=_spec(kernel(final.ema_params[0])),
                         mlp2_spec=_spec(p["t_embedder"]["mlp.2"]["kernel"]),
                         vocab_spec=_spec(p["y_embedder"]["embedding_table"]["embedding"]),
                         step_spec=_spec(final.step))
            keep.update(setup=setup, final1=jax.device_get(final1))
        else:
            specs["dit_qkv_spec"] = _spec(final.params["blocks.0"]["attn"]["qkv"]["kernel"])
    return out, specs, keep


def _sample_cases(params):
    import jax
    import jax.numpy as jnp

    import jaxdiff
    from jaxdiff import train
    from jaxdiff.cli import build, commands
    from jaxdiff.core.guidance import CFG
    from jaxdiff.train import parallel

    config = _toy_config()
    config.sampler.guidance = 2.0
    model, process = build.model(config), build.process(config)
    mesh8 = parallel.make_mesh()
    out = {}
    for sampler in ("heun", "euler_ancestral"):
        kw = dict(num=10, seed=0, sampler=sampler)
        x8, labels = commands.draw(config, model, process, params, mesh=mesh8, **kw)
        longer, _ = commands.draw(config, model, process, params, mesh=mesh8, **{**kw, "num": 13})
        noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(0), i),
                                                     (2,)))(jnp.arange(10))
        y = jnp.arange(10) % 3
        plain = jaxdiff.sample(train.network(model, params), noise, process=process,
                               prediction="flow", sampler=sampler, steps=config.sampler.steps,
                               schedule=config.sampler.schedule, key=jax.random.key(1),
                               guidance=CFG(scale=2.0, y=y, y_null=jnp.full(10, 3)))
        out[sampler] = dict(shape=list(x8.shape), labels=labels.tolist(),
                            sharded_vs_plain_sample=_rel(x8, plain),
                            prefix=_rel(longer[:10], x8))
    return out


def _toy_config():
    import runpy

    config = runpy.run_path(os.path.join(ROOT, "configs", "toy2d.py"))["get_config"]()
    config.model.update(width=16, depth=2, num_classes=3)
    config.sampler.steps = 4
    config.optim.warmup_steps = 0
    config.data.batch_size = 16
    config.train.update(steps=2, log_every=1, ckpt_every=2, sample_every=0, num_samples=6)
    return config


def _checkpoint_case(setup, saved, workdir):
    """The checkpoint `_loop` wrote on mesh (4, 2, 1) (its final state `saved`), restored onto
    (4, 2, 1), (2, 2, 2) and one device."""
    import jax

    from jaxdiff import train
    from jaxdiff.train import parallel
    from jaxdiff.train.checkpoint import Checkpointer

    ckpt, out = Checkpointer(workdir), {}
    kw = {k: v for k, v in setup["kw"].items() if k != "seed"}
    for key, target in [("to_421", parallel.make_mesh(4, 2, 1)),
                        ("to_222", parallel.make_mesh(2, 2, 2)),
                        ("to_1", parallel.make_mesh(devices=jax.devices()[:1]))]:
        abstract = train.abstract_state(setup["model"], setup["tx"], mesh=target, **kw)
        restored, _ = ckpt.restore(abstract, {})
        out[key] = _state_rel(restored, saved)
        kernel = restored.params["blocks.0"]["fc1"]["kernel"]
        out[key + "_spec"], out[key + "_devices"] = _spec(kernel), len(kernel.sharding.device_set)
    ckpt.close()
    return out


def _cli_case(workdir):
    import numpy as np

    from jaxdiff.cli import commands

    config = _toy_config()
    config.mesh.fsdp = 2
    config.model.num_classes = 2  # the CLI checks it against the data: moons has two classes
    commands.train(config, os.path.join(workdir, "cli"))
    out = os.path.join(workdir, "grid.png")
    commands.sample(config, os.path.join(workdir, "cli"), out=out, num=6, seed=0)
    x = np.load(os.path.join(workdir, "grid.npz"))["samples"]
    step = json.load(open(os.path.join(workdir, "cli", "report.json")))["step"]
    res = dict(step=step, samples=list(x.shape), finite=bool(np.isfinite(x).all()))
    for key, change in [("bad_batch", ("data", "batch_size", 12)),
                        ("bad_axis", ("mesh", "pipeline", 2))]:
        bad = _toy_config()
        bad.mesh.fsdp, bad.model.num_classes = 2, 2
        getattr(bad, change[0])[change[1]] = change[2]
        res[key] = _error(lambda: commands.train(bad, os.path.join(workdir, key)))
    return res


def _error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _mesh_cases():
    import jax

    from jaxdiff.train import parallel

    shape = lambda m: [m.shape[a] for a in parallel.AXES]  # noqa: E731
    return dict(default=shape(parallel.make_mesh()), fsdp2=shape(parallel.make_mesh(fsdp=2)),
                all=shape(parallel.make_mesh(2, 2, -1)),
                sub=shape(parallel.make_mesh(devices=jax.devices()[:1])),
                err_divide=_error(lambda: parallel.make_mesh(data=3)),
                err_two_rest=_error(lambda: parallel.make_mesh(data=-1, fsdp=-1)),
                err_zero=_error(lambda: parallel.make_mesh(fsdp=0)),
                err_small=_error(lambda: parallel.make_mesh(2, 2, 1)))


def _main(workdir):
    import jax
    import numpy as np

    from jaxdiff.train import parallel

    assert jax.device_count() == 8, jax.devices()
    mesh1 = parallel.make_mesh(devices=jax.devices()[:1])
    loop_dir = os.path.join(workdir, "loop")
    train_out, specs, keep = _train_cases(mesh1, loop_dir)
    batch = {"x": np.zeros((12, 2), np.float32)}
    results = dict(mesh=_mesh_cases(), train=train_out, specs=specs,
                   sample=_sample_cases(keep["final1"].params),
                   checkpoint=_checkpoint_case(keep["setup"], keep["loop_final"], loop_dir),
                   errors=dict(batch=_error(lambda: parallel.shard_batch(
                       batch, parallel.make_mesh(4, 2, 1)))),
                   cli=_cli_case(workdir))
    print(json.dumps(results))


if __name__ == "__main__":
    _main(sys.argv[1])
