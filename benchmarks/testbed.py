"""The shared benchmark testbed (DESIGN.md, "One testbed"): small trained digit models, built
once, cached and deterministic, and one scoring function.

    python benchmarks/testbed.py build [--only NAME]      # build or load all, sample, score
    python benchmarks/testbed.py score NAME --sampler dpmpp_2m --steps 20

In a benchmark (run as `python benchmarks/<it>.py`, so this folder is on sys.path):

    import testbed
    tb = testbed.load("digits16_dit")             # trains it first if not cached
    x, labels = testbed.sample(tb, num=500, sampler="dpmpp_2m", steps=20)
    testbed.score(x, labels, resolution=16)       # {"fd", "fd_real", "agreement", "per_class"}

`tb.model_fn(x, t, y)` goes to `jaxdiff.sample` as any network does (labels 0..9, null label
`tb.num_classes` for CFG), with `tb.process` and `tb.prediction`; `sample` above does that.

Models (`SPECS`), all class-conditional: `digits8_unet`, the demo model (configs/digits.py's
settings); on 16×16 digits a UNet and a DiT with patch 2 (EDM) and a rectified-flow DiT (flow
prediction). Each is trained through `jaxdiff.train` from explicit keyword arguments and stored
(EMA parameters) in `CACHE/<name>/` with a fingerprint: a hash of its settings, of the jaxdiff
sources that define model, process, loss, train step and data, of this file and of the
jax/flax/optax versions. A mismatch rebuilds it, unless settings and versions are the same and
a `probe` (a hash of the first two training updates, run by the build's own functions) is
unchanged: then the sources changed without changing what training computes (a refactor), and
the cache is kept under the new fingerprint. A build works in
`CACHE/.tmp-<name>-<fingerprint>/`, renamed into place when complete: a killed build never
leaves a cache that loads, and the next build resumes its training from the last checkpoint
(every 500 steps); a work folder of another fingerprint is removed.

Scoring uses the built-in digits network (`jaxdiff.eval.digits`), which reads 8×8 images and
average-pools 16×16 ones 2×2 to 8×8 first. FD_digits is measured against the 200 held-out test
digits at the samples' resolution (the reference `jaxdiff eval` uses); `fd_real` is the FD that
as many real training digits, with the samples' class balance, get against the same reference
(what a perfect model scores, mean of 5 draws). Statistics are cached as the models are.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import shutil
import sys
import time

import flax
import jax
import numpy as np
import optax

import jaxdiff
from jaxdiff import data as data_lib
from jaxdiff import models
from jaxdiff import train as train_lib
from jaxdiff.core.guidance import CFG
from jaxdiff.core.process import PROCESSES
from jaxdiff.eval import digits, metrics

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".testbed")  # git-ignored
OUT = os.path.join(HERE, "out", "testbed.json")
PROBE_STEPS = 2
_PKG = os.path.dirname(os.path.abspath(jaxdiff.__file__))
# What a trained model depends on besides its settings: any change to these rebuilds it.
SOURCES = tuple(sorted(glob.glob(os.path.join(_PKG, "models", "*.py")))) + tuple(
    os.path.join(_PKG, f) for f in (
        "core/process.py", "core/denoiser.py", "core/losses.py", "train/state.py",
        "train/step.py", "train/optimizer.py", "train/loop.py", "data/digits.py",
        "data/pipeline.py")) + (os.path.abspath(__file__),)
STATS_SOURCES = tuple(os.path.join(_PKG, f) for f in (
    "eval/digits.py", "eval/digits_features.npz", "data/digits.py", "data/pipeline.py")) + (
    os.path.abspath(__file__),)

_EDM = dict(process=dict(name="edm", sigma_data=0.5),
            loss=dict(prediction="edm", weighting="uniform", time_sampling="lognormal",
                      p_uncond=0.1))
_OPTIM = dict(lr=2e-3, warmup_steps=200, schedule="cosine", weight_decay=0.0, grad_clip=1.0)
_SAMPLER = dict(name="dpmpp_2m", steps=20, schedule=None, guidance=2.0)  # None: sample's default
# 16×16: batch 32, 1200 steps (the UNet 1000). EDM's noise levels shifted up (P_mean -0.6, not
# -1.2), where the class decides the digit: in 1500 steps at -1.2 the UNet and the DiT reached
# agreement 0.93, at -0.6 0.98-1.0.
_SMALL = dict(data="digits16", batch_size=32, steps=1200, seed=0, sampler=_SAMPLER)
_EDM16 = dict(_EDM, loss=dict(_EDM["loss"], p_mean=-0.6))
_DIT16 = dict(name="dit", patch_size=2, hidden_size=64, depth=4, num_heads=4, num_classes=10)

SPECS = {
    # configs/digits.py, field for field (tests/test_testbed.py checks it)
    "digits8_unet": dict(
        data="digits", model=dict(name="unet", channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                  attn_resolutions=(4,), norm_groups=8, dropout=0.1,
                                  num_classes=10),
        **_EDM, optim=_OPTIM, ema_decay=0.999, batch_size=64, steps=1500, seed=0,
        sampler=dict(_SAMPLER, schedule="karras")),
    # the demo UNet's widths at 8×8 and 4×4, plus a 16-channel 16×16 level
    "digits16_unet": dict(
        _SMALL, **_EDM16, model=dict(name="unet", channels=16, channel_mult=(1, 2, 4),
                                     num_res_blocks=1, attn_resolutions=(4,), norm_groups=8,
                                     dropout=0.1, num_classes=10),
        optim=_OPTIM, ema_decay=0.999, steps=1000),
    # 64 tokens of 2×2 patches; c_noise = ln(sigma)/4 scaled by 100 for the sinusoids
    "digits16_dit": dict(_SMALL, **_EDM16, model=dict(_DIT16, time_scale=100.0),
                         optim=dict(_OPTIM, warmup_steps=100), ema_decay=0.995),
    # configs/cifar10_dit.py in small: DiT, rectified flow (t·1000), logit-normal times
    "digits16_flow": dict(
        _SMALL, model=_DIT16, process=dict(name="rectified_flow", time_scale=1000.0),
        loss=dict(prediction="flow", weighting="uniform", time_sampling="logit_normal",
                  p_uncond=0.1),
        optim=dict(_OPTIM, warmup_steps=100), ema_decay=0.995),
}


@dataclasses.dataclass(frozen=True)
class Testbed:
    """A trained model: `model_fn(x, t, y)` is what `jaxdiff.sample` takes (params bound as
    data); labels 0..K-1, K = `num_classes` the classifier-free-guidance null label."""

    name: str
    params: dict  # EMA parameters
    model: object  # the Flax module
    model_fn: object
    process: object
    prediction: str
    settings: dict  # the spec it was trained from (see SPECS)
    num_classes: int
    shape: tuple  # one example, (H, W, C)
    meta: dict  # build record: fingerprint, build_s, build_cpu_s, load_avg, versions

    @property
    def resolution(self):
        return self.shape[0]

    @property
    def sampler(self):
        """The standard sampler: {name, steps, schedule, guidance}."""
        return dict(self.settings["sampler"])


def _digest(obj, sources):
    h = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode())
    for path in sources:  # a file moved away (a restructure) also changes the hash
        h.update(os.path.relpath(path, os.path.dirname(_PKG)).encode())
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:20]


def fingerprint(spec, sources=None):
    """The hash a cached model must carry: settings + sources + library versions."""
    return _digest(dict(spec=spec, versions=_versions()), SOURCES if sources is None else sources)


def _versions():
    return dict(jax=jax.__version__, flax=flax.__version__, optax=optax.__version__)


def _keep_if_same_training(folder, spec, fp, log):
    """A build whose sources changed since (another fingerprint) but whose settings, library
    versions and `probe` are the same: training computes what it computed, so the build gets
    the new fingerprint instead of a rebuild. Returns whether it did."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    if not (isinstance(meta, dict) and meta.get("probe") and meta.get("settings") == spec
            and meta.get("versions") == _versions() and meta.get("fingerprint") != fp):
        return False
    now = probe(spec)
    if now != meta["probe"]:
        log(f"testbed: {os.path.basename(folder)}: training computes something else now "
            f"(probe {now}, built with {meta['probe']}): rebuilding")
        return False
    tmp = os.path.join(folder, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(dict(meta, fingerprint=fp, sources_changed_from=meta["fingerprint"]), f,
                  indent=1)
    os.replace(tmp, os.path.join(folder, "meta.json"))
    log(f"testbed: {os.path.basename(folder)}: sources changed, training unchanged "
        f"(probe {now}): cache kept")
    return True


def _read_meta(folder, fp):
    """The folder's meta.json when it holds a complete build with fingerprint `fp`, else None."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("fingerprint") == fp else None


@contextlib.contextmanager
def _locked(root, name):
    """One writer per entry; the kernel frees the lock on a kill."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def cached(root, name, fp, make, *, log=print):
    """(folder, meta, built): `root/name` holding a build with fingerprint `fp`, made by
    `make(work) -> dict` (written as meta.json) in `root/.tmp-<name>-<fp>` and renamed into
    place when complete. An interrupted build leaves only that folder, which never loads; the
    next build with the same fingerprint goes on in it (training resumes from its checkpoint),
    one with another fingerprint removes it."""
    final = os.path.join(root, name)
    meta = _read_meta(final, fp)
    if meta is not None:
        return final, meta, False
    with _locked(root, name):
        meta = _read_meta(final, fp)  # another process may have built it meanwhile
        if meta is not None:
            return final, meta, False
        work = os.path.join(root, f".tmp-{name}-{fp}")
        for stale in glob.glob(os.path.join(root, f".tmp-{name}-*")):
            if stale != work:
                shutil.rmtree(stale, ignore_errors=True)
        log(f"testbed: building {name} (fingerprint {fp}; "
            + ("resuming an interrupted build)" if os.path.isdir(work) else
               "stale cache)" if os.path.exists(final) else "no cache)"))
        os.makedirs(work, exist_ok=True)
        meta = dict(make(work), fingerprint=fp)
        with open(os.path.join(work, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(final):  # out of the way first: rename cannot replace a folder
            os.rename(final, work + ".old")
        os.rename(work, final)
        shutil.rmtree(work + ".old", ignore_errors=True)
    return final, meta, True


def _process(spec):
    kw = dict(spec["process"])
    return PROCESSES[kw.pop("name")](**kw)


def _model(spec, shape):
    kw = dict(spec["model"])
    return models.build(kw.pop("name"), image_size=tuple(shape[:2]), **kw)


def _shape(spec):
    return tuple(data_lib.info(spec["data"])["shape"])


def _setup(spec):
    """(state, step, data): the initial train state, the train step and the batches with which
    a build trains `spec` (through `jaxdiff.train`)."""
    shape, K = _shape(spec), spec["model"].get("num_classes", 0)
    model, loss = _model(spec, shape), dict(spec["loss"])
    tx, lr_fn = train_lib.make_optimizer(total_steps=spec["steps"], **spec["optim"])
    ema = (spec["ema_decay"],)
    state = train_lib.init_state(model, tx, x_shape=shape, num_classes=K, seed=spec["seed"],
                                 ema_decays=ema)
    objective = train_lib.diffusion_objective(
        model, process=_process(spec), prediction=loss.pop("prediction"), num_classes=K,
        p_uncond=loss.pop("p_uncond"), loss_options=loss)
    step = train_lib.make_train_step(objective, tx, lr_fn, ema_decays=ema)
    data = data_lib.build(spec["data"], "train", batch_size=spec["batch_size"], seed=spec["seed"])
    return state, step, data


def train_model(spec, workdir, *, log=True):
    """Trains `spec` through `jaxdiff.train` in `workdir` (resuming there); the EMA params."""
    state, step, data = _setup(spec)
    every = max(1, min(100, spec["steps"] // 10))  # a killed build resumes from a checkpoint
    state = train_lib.train(state, step, data, workdir=workdir, total_steps=spec["steps"],
                            log_every=every, ckpt_every=5 * every, keep=1, log=log,
                            description=dict(model=spec["model"], data=spec["data"]))
    if int(state.step) != spec["steps"]:  # train() returns early on SIGTERM, checkpointed
        raise RuntimeError(f"training stopped at step {int(state.step)} of {spec['steps']}; "
                           "run the same command again to resume it")
    return jax.device_get(state.ema_params[0])


def probe(spec, steps=PROBE_STEPS):
    """What training computes, as a hash: the first `steps` batches and every parameter (and
    EMA copy) after `steps` updates from the build's initial state, by the same functions a
    build runs. Sources that change what training computes change it; a refactor does not, so
    a cache whose sources changed is kept when its probe is unchanged (see `load`)."""
    state, step, data = _setup(spec)
    h, update = hashlib.sha256(), jax.jit(step)
    for _ in range(steps):
        batch = next(data)
        for leaf in jax.tree.leaves(batch):
            h.update(np.ascontiguousarray(leaf).tobytes())
        state, _ = update(state, batch)
    for leaf in jax.tree.leaves((state.params, state.ema_params)):
        h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()[:20]


def _build_model(spec, tmp, log):
    t0, c0 = time.perf_counter(), time.process_time()
    resumed = os.path.isdir(os.path.join(tmp, "train"))  # then build_s is this session's only
    params = train_model(spec, os.path.join(tmp, "train"), log=log)
    with open(os.path.join(tmp, "params.msgpack"), "wb") as f:
        f.write(flax.serialization.msgpack_serialize(params))
    with contextlib.suppress(FileNotFoundError):  # the loss curve (none when log=False)
        os.replace(os.path.join(tmp, "train", "metrics.jsonl"), os.path.join(tmp, "metrics.jsonl"))
    shutil.rmtree(os.path.join(tmp, "train"), ignore_errors=True)  # only EMA params are kept
    return dict(settings=spec, build_s=round(time.perf_counter() - t0, 1),
                build_cpu_s=round(time.process_time() - c0, 1), load_avg=os.getloadavg()[0],
                resumed=resumed, versions=_versions(), probe=probe(spec))


def load(name, *, root=None, spec=None, build=True, log=True):
    """The trained model `name` (SPECS[name], or `spec`), built and cached on first use; with
    `build=False` a missing or stale cache raises FileNotFoundError instead."""
    if spec is None:
        if name not in SPECS:
            raise ValueError(f"testbed model {name!r} is unknown; allowed: {', '.join(SPECS)}")
        spec = SPECS[name]
    spec, root = json.loads(json.dumps(spec)), root or CACHE  # tuples -> lists, as stored
    fp = fingerprint(spec)
    say = print if log else (lambda *a: None)
    if _read_meta(os.path.join(root, name), fp) is None:
        with _locked(root, name):
            _keep_if_same_training(os.path.join(root, name), spec, fp, say)
    if not build and _read_meta(os.path.join(root, name), fp) is None:
        raise FileNotFoundError(f"testbed model {name!r} is not built (or stale) in {root}; "
                                f"build it: python benchmarks/testbed.py build --only {name}")
    folder, meta, built = cached(root, name, fp, lambda tmp: _build_model(spec, tmp, log),
                                 log=say)
    with open(os.path.join(folder, "params.msgpack"), "rb") as f:
        params = jax.tree.map(jax.numpy.asarray, flax.serialization.msgpack_restore(f.read()))
    shape = _shape(spec)
    model = _model(spec, shape)
    return Testbed(name=name, params=params, model=model,
                   model_fn=train_lib.network(model, params), process=_process(spec),
                   prediction=spec["loss"]["prediction"], settings=spec,
                   num_classes=spec["model"].get("num_classes", 0), shape=shape,
                   meta=dict(meta, built_now=built))


def sample(tb, *, num, seed=0, sampler=None, steps=None, schedule=None, guidance=None,
           **options):
    """(samples (num, H, W, C) numpy, labels): labels 0..K-1 cycled, CFG at `guidance`; the
    testbed's standard sampler where not given. Noise from key(seed), sampler key seed + 1."""
    s = tb.sampler
    labels = np.arange(num, dtype=np.int32) % tb.num_classes
    guide = CFG(scale=s["guidance"] if guidance is None else guidance, y=labels,
                y_null=np.full(num, tb.num_classes, np.int32))
    noise = jax.random.normal(jax.random.key(seed), (num, *tb.shape))
    x = jaxdiff.sample(tb.model_fn, noise, process=tb.process, prediction=tb.prediction,
                       sampler=sampler or s["name"], steps=steps or s["steps"],
                       schedule=schedule or s["schedule"], key=jax.random.key(seed + 1),
                       guidance=guide, **options)
    return np.asarray(x), labels


def _build_stats(resolution, tmp):
    out = {}
    for split in ("test", "train"):
        it = data_lib.build("digits" if resolution == 8 else f"digits{resolution}", split,
                            batch_size=1, shuffle=False, num_epochs=1, num_threads=1)
        rows = list(it)
        x = np.concatenate([r["x"] for r in rows])
        out[f"{split}_features"] = digits.features(x)
        out[f"{split}_labels"] = np.concatenate([r["label"] for r in rows])
    np.savez(os.path.join(tmp, "stats.npz"), **out)
    return dict(resolution=resolution, num_test=len(out["test_labels"]),
                num_train=len(out["train_labels"]))


def real_stats(resolution, *, root=None):
    """Digits-network features and labels of the real test and train splits at `resolution`."""
    if resolution not in (8, 16):
        raise ValueError(f"resolution={resolution} has no digits dataset; allowed: 8, 16")
    fp = _digest(dict(resolution=resolution), STATS_SOURCES)
    folder, _, _ = cached(root or CACHE, f"real{resolution}", fp,
                          lambda tmp: _build_stats(resolution, tmp), log=lambda *a: None)
    with np.load(os.path.join(folder, "stats.npz")) as z:
        return {k: z[k] for k in z.files}


def score(samples, labels, *, resolution, root=None, draws=5):
    """{fd, fd_real, agreement, per_class} of digit samples (N, R, R, 1) in [-1, 1] with their
    requested labels; per_class[k] is None where no sample asked for digit k."""
    samples, labels = np.asarray(samples), np.asarray(labels)
    if samples.shape[1:] != (resolution, resolution, 1) or len(labels) != len(samples):
        raise ValueError(f"samples {samples.shape} / labels {labels.shape} do not fit "
                         f"resolution={resolution}: expected (N, {resolution}, {resolution}, 1)"
                         " and N labels")
    stats = real_stats(resolution, root=root)
    ref = metrics.feature_stats(stats["test_features"])
    fd = metrics.frechet_distance_gaussians(*metrics.feature_stats(digits.features(samples)),
                                            *ref)
    rng, floor = np.random.default_rng(0), []
    for _ in range(draws):  # real training digits, as many per class as the samples have
        groups = [(np.flatnonzero(stats["train_labels"] == k), np.sum(labels == k))
                  for k in np.unique(labels)]
        rows = np.concatenate([rng.choice(g, n, replace=n > len(g)) for g, n in groups])
        floor.append(metrics.frechet_distance_gaussians(
            *metrics.feature_stats(stats["train_features"][rows]), *ref))
    acc, per = digits.agreement(samples, labels)
    return dict(fd=fd, fd_real=float(np.mean(floor)), agreement=acc,
                per_class=[per.get(k) for k in range(10)], num=len(samples))


# ---------------------------------------------------------------------------------- CLI


def _evaluate(tb, num, root, sampler=None, steps=None, guidance=None, seed=0):
    t0 = time.perf_counter()
    x, labels = sample(tb, num=num, seed=seed, sampler=sampler, steps=steps, guidance=guidance)
    return dict(score(x, labels, resolution=tb.resolution, root=root),
                sampler=sampler or tb.sampler["name"], steps=steps or tb.sampler["steps"],
                guidance=tb.sampler["guidance"] if guidance is None else guidance,
                sample_s=round(time.perf_counter() - t0, 1))


def _row(r):
    how = "cached" if not r["built_now"] else "resumed" if r.get("resumed") else "built"
    return (f"| {r['name']} | {r['build_s']:.0f} ({r['build_cpu_s']:.0f}) {how} | "
            f"{r['sampler']} / {r['steps']} | {r['fd']:.2f} ({r['fd_real']:.2f}) | "
            f"{r['agreement']:.3f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or load) the models, sample and score each")
    b.add_argument("--only", choices=list(SPECS), help="just this model")
    s = sub.add_parser("score", help="sample a model and score the samples")
    s.add_argument("name", choices=list(SPECS))
    s.add_argument("--sampler")
    s.add_argument("--steps", type=int)
    s.add_argument("--guidance", type=float)
    s.add_argument("--seed", type=int, default=0)
    for q in (b, s):
        q.add_argument("--num", type=int, default=500, help="samples to score")
        q.add_argument("--root", default=CACHE, help="cache folder")
    a = p.parse_args(argv)
    if a.cmd == "score":
        row = _evaluate(load(a.name, root=a.root), a.num, a.root, a.sampler, a.steps,
                        a.guidance, a.seed)
        return print(json.dumps(dict(name=a.name, **row)))
    t0, load0, rows, stats_s = time.perf_counter(), os.getloadavg()[0], [], 0.0
    for name in [a.only] if a.only else list(SPECS):
        tb = load(name, root=a.root)
        t1 = time.perf_counter()
        real_stats(tb.resolution, root=a.root)  # built on first use: a few seconds
        stats_s += time.perf_counter() - t1
        meta = {k: tb.meta.get(k) for k in ("build_s", "build_cpu_s", "built_now", "resumed",
                                            "load_avg", "fingerprint")}
        rows.append(dict(name=name, **meta, **_evaluate(tb, a.num, a.root)))
        print(f"testbed: {name}: " + json.dumps(rows[-1]), flush=True)
    print("| model | build s (cpu s) | sampler / steps | FD (real) | agreement |\n"
          "|---|---:|---|---:|---:|\n" + "\n".join(map(_row, rows)))
    report = dict(models=rows, stats_s=round(stats_s, 1), num=a.num, cpu_count=os.cpu_count(),
                  wall_s=round(time.perf_counter() - t0, 1), load_avg=[load0, os.getloadavg()[0]])
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(report, f, indent=1)
    built = sum(r["build_s"] for r in rows if r["built_now"]) + stats_s
    print(f"testbed: built in {built:.0f} s (models + stats), {report['wall_s']:.0f} s with "
          f"sampling; load average {load0:.1f} -> {report['load_avg'][1]:.1f}; wrote {OUT}")


if __name__ == "__main__":
    sys.exit(main())
