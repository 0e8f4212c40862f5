"""The benchmark testbed (benchmarks/testbed.py): the cache (fingerprints, rebuilds, atomic
writes, killed builds), a tiny model built and loaded through it and sampled with
`jaxdiff.sample`, and the scoring function on real digits and noise. The real testbed models
are never built here (`make testbed` does that)."""

import json
import os
import runpy
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import jaxdiff
from jaxdiff.core.guidance import CFG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import testbed  # noqa: E402

TINY = dict(testbed.SPECS["digits8_unet"], steps=3, batch_size=16,  # a DiT compiles fastest
            model=dict(name="dit", patch_size=2, hidden_size=16, depth=1, num_heads=2,
                       num_classes=10),
            optim=dict(testbed.SPECS["digits8_unet"]["optim"], warmup_steps=1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("testbed"))
    return root, testbed.load("tiny", root=root, spec=TINY, log=False)


def test_digits8_unet_is_the_demo_config():
    c = runpy.run_path(os.path.join(ROOT, "configs", "digits.py"))["get_config"]()
    s = json.loads(json.dumps(testbed.SPECS["digits8_unet"]))
    demo = json.loads(json.dumps(c.to_dict()))
    assert s["model"] == {k: v for k, v in demo["model"].items() if k != "remat"}
    assert (s["process"], s["loss"], s["data"]) == (demo["process"], demo["loss"],
                                                     demo["data"]["name"])
    assert s["optim"] == {k: v for k, v in demo["optim"].items() if k != "ema_decays"}
    assert [s["ema_decay"]] == demo["optim"]["ema_decays"]
    assert (s["batch_size"], s["steps"], s["seed"]) == (demo["data"]["batch_size"],
                                                        demo["train"]["steps"],
                                                        demo["train"]["seed"])
    assert {k: s["sampler"][k] for k in ("name", "steps", "schedule", "guidance")} == {
        k: demo["sampler"][k] for k in ("name", "steps", "schedule", "guidance")}


def test_fingerprint_follows_settings_and_sources(tmp_path, monkeypatch):
    src = tmp_path / "model.py"
    src.write_text("x = 1\n")
    monkeypatch.setattr(testbed, "SOURCES", testbed.SOURCES + (str(src),))
    fp = testbed.fingerprint(TINY)
    assert fp == testbed.fingerprint(json.loads(json.dumps(TINY)))  # tuples and lists alike
    assert fp != testbed.fingerprint(dict(TINY, seed=1))
    src.write_text("x = 2\n")
    assert fp != testbed.fingerprint(TINY)
    for name in ("train/step.py", "core/losses.py", "core/process.py", "models/unet.py",
                 "models/dit.py"):
        assert any(p.endswith(os.path.join("jaxdiff", name)) for p in testbed.SOURCES), name
    assert os.path.abspath(testbed.__file__) in testbed.SOURCES


def _counting_make(calls, payload="ok"):
    def make(tmp):
        calls.append(tmp)
        with open(os.path.join(tmp, "data.txt"), "w") as f:
            f.write(payload)
        return dict(payload=payload)
    return make


def test_cache_builds_once_and_rebuilds_on_mismatch(tmp_path):
    calls, root = [], str(tmp_path)
    folder, meta, built = testbed.cached(root, "m", "fp1", _counting_make(calls, "a"))
    assert built and meta == dict(payload="a", fingerprint="fp1") and len(calls) == 1
    _, _, built = testbed.cached(root, "m", "fp1", _counting_make(calls, "b"))
    assert not built and len(calls) == 1  # a hit: nothing made
    folder, meta, built = testbed.cached(root, "m", "fp2", _counting_make(calls, "b"))
    assert built and len(calls) == 2 and meta["fingerprint"] == "fp2"
    assert open(os.path.join(folder, "data.txt")).read() == "b"
    assert sorted(os.listdir(root)) == [".m.lock", "m"]  # no temporary or old folder left


def test_failed_build_leaves_no_cache_and_resumes(tmp_path):
    """A build that fails keeps the old cache in place and leaves only its work folder, which
    the next build with the same fingerprint goes on in and one with another removes."""
    calls, root = [], str(tmp_path)
    testbed.cached(root, "m", "fp1", _counting_make(calls, "a"))

    def broken(tmp):
        _counting_make(calls, "half")(tmp)
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        testbed.cached(root, "m", "fp2", broken)
    assert sorted(os.listdir(root)) == [".m.lock", ".tmp-m-fp2", "m"]
    assert json.load(open(os.path.join(root, "m", "meta.json")))["fingerprint"] == "fp1"

    def resume(tmp):
        assert open(os.path.join(tmp, "data.txt")).read() == "half"  # the interrupted work
        return _counting_make(calls, "b")(tmp)

    folder, meta, built = testbed.cached(root, "m", "fp2", resume)
    assert built and meta["payload"] == "b" and sorted(os.listdir(root)) == [".m.lock", "m"]
    with pytest.raises(RuntimeError):
        testbed.cached(root, "n", "fp1", broken)
    testbed.cached(root, "n", "fp3", _counting_make(calls))  # another fingerprint: starts over
    assert sorted(os.listdir(root)) == [".m.lock", ".n.lock", "m", "n"]


def test_killed_build_is_ignored_and_resumed(tmp_path):
    """A build SIGKILLed after writing everything but the rename: its work folder (with a
    matching meta.json) never loads; the next build goes on in it and renames it into place."""
    script = textwrap.dedent(f"""
        import json, os, signal, sys
        sys.path.insert(0, {os.path.join(ROOT, "benchmarks")!r})
        import testbed
        def make(tmp):
            json.dump(dict(fingerprint="fp"), open(os.path.join(tmp, "meta.json"), "w"))
            os.kill(os.getpid(), signal.SIGKILL)
        testbed.cached({str(tmp_path)!r}, "m", "fp", make)
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == -9
    assert sorted(os.listdir(tmp_path)) == [".m.lock", ".tmp-m-fp"]
    with pytest.raises(FileNotFoundError, match="not built"):
        testbed.load("m", root=str(tmp_path), spec=TINY, build=False)
    calls = []
    _, _, built = testbed.cached(str(tmp_path), "m", "fp", _counting_make(calls))
    assert built and calls == [str(tmp_path / ".tmp-m-fp")]
    assert sorted(os.listdir(tmp_path)) == [".m.lock", "m"]


def test_interrupted_training_is_not_cached(tmp_path, monkeypatch):
    """jaxdiff.train.train returns early on SIGTERM (after a checkpoint): no cache is made."""
    monkeypatch.setattr(testbed.train_lib, "train", lambda state, *a, **k: state)  # at step 0
    with pytest.raises(RuntimeError, match="stopped at step 0 of 3"):
        testbed.load("tiny", root=str(tmp_path), spec=TINY, log=False)
    assert not os.path.exists(tmp_path / "tiny")


def test_load_gives_a_network_that_jaxdiff_sample_takes(tiny):
    root, tb = tiny
    assert tb.meta["built_now"] and tb.shape == (8, 8, 1) and tb.num_classes == 10
    again = testbed.load("tiny", root=root, spec=TINY, log=False)
    assert not again.meta["built_now"] and again.meta["fingerprint"] == tb.meta["fingerprint"]
    for a, b in zip(jax.tree.leaves(tb.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(a, b)
    y = np.arange(4, dtype=np.int32)
    noise = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    x = jaxdiff.sample(tb.model_fn, noise, process=tb.process, prediction=tb.prediction,
                       sampler="dpmpp_2m", steps=3,
                       guidance=CFG(scale=2.0, y=y, y_null=np.full(4, 10, np.int32)))
    assert x.shape == (4, 8, 8, 1) and np.all(np.isfinite(x))
    x2, labels = testbed.sample(again, num=4, steps=3)
    np.testing.assert_allclose(x2, x, atol=1e-5)  # same noise, labels and guidance
    assert list(labels) == [0, 1, 2, 3]


def test_a_changed_spec_rebuilds_through_load(tiny, monkeypatch):
    """load() rebuilds on another spec and loads what the new build trained (training itself
    is stubbed out: the tiny build above already trained through jaxdiff.train)."""
    root, tb = tiny
    trained = jax.tree.map(lambda p: np.asarray(p) + 1.0, tb.params)
    monkeypatch.setattr(testbed, "train_model", lambda spec, workdir, log: trained)
    other = testbed.load("tiny", root=root, spec=dict(TINY, seed=1), log=False)
    assert other.meta["built_now"] and other.meta["fingerprint"] != tb.meta["fingerprint"]
    assert other.settings["seed"] == 1 and other.meta["settings"]["seed"] == 1
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(other.params)):
        np.testing.assert_array_equal(a, b)
    assert sorted(n for n in os.listdir(root) if not n.startswith(".")) == ["tiny"]
    with pytest.raises(FileNotFoundError, match="not built"):  # the seed-0 build is gone now
        testbed.load("tiny", root=root, spec=TINY, build=False)
    kept = testbed.load("tiny", root=root, spec=dict(TINY, seed=1), build=False)
    assert not kept.meta["built_now"] and kept.meta["fingerprint"] == other.meta["fingerprint"]


def _real(name, split, num):
    from jaxdiff import data
    it = data.build(name, split, batch_size=num, shuffle=False, num_epochs=1)
    batch = next(it)
    return batch["x"], batch["label"]


@pytest.mark.parametrize("resolution", [8, 16])
def test_score_real_digits_and_noise(tmp_path, resolution):
    name = "digits" if resolution == 8 else "digits16"
    x, y = _real(name, "train", 500)
    real = testbed.score(x, y, resolution=resolution, root=str(tmp_path))
    assert real["agreement"] > 0.95 and all(a > 0.85 for a in real["per_class"])
    assert real["fd"] < 3.0 and abs(real["fd"] - real["fd_real"]) < 1.5
    noise = np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32)
    fake = testbed.score(noise, y, resolution=resolution, root=str(tmp_path))
    assert fake["agreement"] < 0.3 and fake["fd"] > 10 * real["fd"]
    xt, yt = _real(name, "test", 200)
    assert testbed.score(xt, yt, resolution=resolution, root=str(tmp_path))["fd"] < 1e-3
    with pytest.raises(ValueError, match="resolution"):
        testbed.score(x, y, resolution=24 - resolution, root=str(tmp_path))


def test_score_per_class_marks_absent_classes(tmp_path):
    x, y = _real("digits", "test", 200)
    keep = y < 5
    out = testbed.score(x[keep], y[keep], resolution=8, root=str(tmp_path))
    assert out["per_class"][5:] == [None] * 5 and all(a > 0.8 for a in out["per_class"][:5])


def test_changed_sources_keep_the_cache_when_training_computes_the_same(tiny, tmp_path,
                                                                        monkeypatch):
    """A source edit that leaves training's first updates bit-identical (the probe) keeps the
    cache under the new fingerprint; one that changes them (a patched probe) rebuilds."""
    root, _ = tiny
    with open(os.path.join(root, "tiny", "meta.json")) as f:
        spec = json.load(f)["settings"]  # TINY, or what another test built there since
    tb = testbed.load("tiny", root=root, spec=spec, build=False, log=False)
    assert tb.meta["probe"] == testbed.probe(spec)  # deterministic
    extra = tmp_path / "refactored.py"
    extra.write_text("x = 1\n")
    monkeypatch.setattr(testbed, "SOURCES", testbed.SOURCES + (str(extra),))
    kept = testbed.load("tiny", root=root, spec=spec, build=False, log=False)
    assert kept.meta["fingerprint"] != tb.meta["fingerprint"]
    assert kept.meta["sources_changed_from"] == tb.meta["fingerprint"]
    for a, b in zip(jax.tree.leaves(tb.params), jax.tree.leaves(kept.params)):
        np.testing.assert_array_equal(a, b)
    extra.write_text("x = 2\n")  # another edit, and now training computes something else
    monkeypatch.setattr(testbed, "probe", lambda spec: "different")
    with pytest.raises(FileNotFoundError, match="not built"):
        testbed.load("tiny", root=root, spec=spec, build=False, log=False)
