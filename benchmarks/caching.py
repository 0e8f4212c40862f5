"""Feature caches on the testbed digits models (issue 13): speed, quality, and the honest
baseline of sampling with fewer steps at the same wall time.

For `digits16_unet` (DeepCache) and `digits16_dit` (first-block cache, TaylorSeer, Δ-DiT), with
the testbed's standard sampler (dpmpp_2m: one network call per step, on the model's default
schedule) and guidance (CFG 2.0, one call on [x; x]):
- every cache setting of `CACHES` at 10, 20 and 50 steps, and the uncached model at those steps
  and at the step counts of `BASE_STEPS` (the fewer-steps baseline);
- quality: FD_digits and classifier agreement of `NUM` samples from noise seed 0
  (`testbed.score`), with the full passes the cache ran (its state) and its full-network
  equivalents (XLA's FLOPs of what ran ÷ FLOPs of as many full passes, `branch_flops`);
- speed: every run again on `TIME_NUM` samples, all runs interleaved (round r times every run
  once), `--repeats` rounds after a 2-step warm-up run each (compilation excluded), median wall
  time;
  speedup = the uncached run at the same steps ÷ the cached run, from the same rounds;
- fidelity: the RMS distance of each run's samples to the uncached samples at the most steps
  (same noise; FD of this small testbed saturates by ~8 steps, the distance does not);
- equal wall time: the uncached FD (and distance) at the cache's wall time, interpolated (linear
  in log time) on the fewer-steps curve; a cache "beats fewer steps" when its value is lower.
DeepCache's non-uniform schedule (`deepcache-nu`) has as many full passes as interval 3, placed
by `full_calls_from_changes` on the deep feature's change profile, measured (`feature_changes`)
along the uncached trajectory at the same steps (its cost is not counted: it is done once per
model and step count). Δ-DiT's boundary is half the steps (rear blocks cached in the first half).

    PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/caching.py [--models ...] [--repeats 3]
        [--out benchmarks/out] [--quick]

Scored rows and timings are cached (JSON, written atomically) in OUT/caching/, so a rerun
resumes; delete the folder to redo everything. Writes OUT/caching.md (tables), caching.json
(every row) and caching.png (FD against wall time, caches and fewer steps on one figure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import _timing
import jax
import jax.numpy as jnp
import numpy as np
import testbed

import jaxdiff
from jaxdiff.accel import cache as cache_lib
from jaxdiff.core.guidance import CFG

STEPS = (10, 20, 50)
BASE_STEPS = (3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50)
NUM, SEED = 500, 0  # scored samples: as the testbed scores
TIME_NUM = 128  # timed samples (256 rows under CFG)
CACHES = {  # model -> [(label, cache name, settings)]; "nu": the non-uniform DeepCache schedule
    "digits16_unet": [
        ("deepcache i=2", "deepcache", dict(interval=2)),
        ("deepcache i=3", "deepcache", dict(interval=3)),
        ("deepcache i=5", "deepcache", dict(interval=5)),
        ("deepcache i=3 skip=1", "deepcache", dict(interval=3, skip_level=1)),
        ("deepcache-nu 1/3", "deepcache", dict(nonuniform=3)),
    ],
    "digits16_dit": [
        ("fbcache 0.05", "fbcache", dict(threshold=0.05)),
        ("fbcache 0.1", "fbcache", dict(threshold=0.1)),
        ("fbcache 0.2", "fbcache", dict(threshold=0.2)),
        ("taylorseer i=2 o=2", "taylorseer", dict(interval=2, order=2)),
        ("taylorseer i=3 o=2", "taylorseer", dict(interval=3, order=2)),
        ("taylorseer i=4 o=2", "taylorseer", dict(interval=4, order=2)),
        ("taylorseer i=3 o=1", "taylorseer", dict(interval=3, order=1)),
        ("delta_dit i=2", "delta_dit", dict(interval=2, blocks=1)),
        ("delta_dit i=3", "delta_dit", dict(interval=3, blocks=1)),
    ],
}
QUICK = dict(steps=(4,), base_steps=(2, 4), num=40, time_num=8)

HERE = os.path.dirname(os.path.abspath(__file__))
log = _timing.progress




class Model:
    """A testbed model with its standard sampler and guidance, sampling `num` draws."""

    def __init__(self, name):
        try:
            self.tb = tb = testbed.load(name, build=False, log=False)
        except FileNotFoundError as e:
            sys.exit(f"caching: {e}\n(this benchmark never trains: the cached testbed model is "
                     "missing or stale)")
        self.name, self.std = name, tb.sampler
        self.variables = {"params": tb.params}

    def inputs(self, num):
        labels = np.arange(num, dtype=np.int32) % self.tb.num_classes
        guide = CFG(scale=self.std["guidance"], y=labels,
                    y_null=np.full(num, self.tb.num_classes, np.int32))
        noise = jax.random.normal(jax.random.key(SEED), (num, *self.tb.shape))
        example = (jnp.zeros((2 * num, *self.tb.shape)), jnp.zeros((2 * num,)),
                   jnp.zeros((2 * num,), jnp.int32))
        return labels, guide, noise, example

    def sample(self, model_fn, num, steps):
        """(samples, final state or None), blocking until done."""
        _, guide, noise, _ = self.inputs(num)
        out = jaxdiff.sample(model_fn, noise, process=self.tb.process,
                             prediction=self.tb.prediction, sampler=self.std["name"],
                             steps=steps, schedule=self.std["schedule"], guidance=guide)
        out = jax.block_until_ready(out)
        return out if isinstance(out, tuple) else (out, None)

    def network(self, run, num):
        """The model_fn of a run {cache, settings, steps} for `num` samples."""
        if run["cache"] is None:
            return self.tb.model_fn
        *_, example = self.inputs(num)
        return cache_lib.make_cache(run["cache"], self.tb.model, self.variables, *example,
                                    **run["resolved"])


def resolve(model, run, num_profile):
    """The run's make_cache settings: the non-uniform schedule from the feature-change profile
    of the uncached trajectory at the run's steps, Δ-DiT's boundary at half the steps."""
    s, steps = dict(run["settings"]), run["steps"]
    if "nonuniform" in s:
        *_, example = model.inputs(num_profile)
        prof = cache_lib.feature_changes(model.tb.model, model.variables, *example,
                                         skip_level=s.pop("skip_level", 0))
        _, state = model.sample(prof, num_profile, steps)
        change = np.asarray(state["change"][: int(state["calls"])])
        s = dict(full_calls=cache_lib.full_calls_from_changes(
            change, math.ceil(len(change) / s.pop("nonuniform"))), **s)
        run["profile"] = [round(float(c), 5) for c in change]
    if run["cache"] == "delta_dit":
        s.setdefault("boundary", steps // 2)
    return s


def runs_for(name, steps, base_steps):
    rows = [dict(model=name, label=f"full {n}", cache=None, settings={}, steps=n)
            for n in sorted(set(base_steps) | set(steps))]
    rows += [dict(model=name, label=f"{label} @{n}", cache=c, settings=s, steps=n)
             for n in steps for label, c, s in CACHES[name]]
    for r in rows:
        r["key"] = json.dumps([r["label"], r["settings"], NUM], sort_keys=True)
    return rows


def score_runs(model, runs, folder, num, time_num):
    """FD / agreement / full passes of every run (cached in folder/scores.json)."""
    path = os.path.join(folder, f"scores_{model.name}.json")
    done, ref = _timing.load_json(path) or {}, None
    ref_path = os.path.join(folder, f"reference_{model.name}_{num}.npy")
    # the reference first: the uncached run with the most steps
    top = max((r for r in runs if r["cache"] is None), key=lambda r: r["steps"])
    for r in [top] + [r for r in runs if r is not top]:
        if r["key"] in done and "dev" in done[r["key"]]:
            r.update(done[r["key"]])
            continue
        t0 = time.perf_counter()
        r["resolved"] = resolve(model, r, time_num) if r["cache"] else {}
        x, state = model.sample(model.network(r, num), num, r["steps"])
        x = np.asarray(x)
        if r is top:
            os.makedirs(folder, exist_ok=True)
            np.save(ref_path + ".tmp.npy", x)
            os.replace(ref_path + ".tmp.npy", ref_path)
        ref = np.load(ref_path) if ref is None else ref
        labels = model.inputs(num)[0]
        sc = testbed.score(x, labels, resolution=model.tb.resolution)
        r.update(dev=float(np.sqrt(np.mean((x - ref) ** 2))),
                 fd=sc["fd"], fd_real=sc["fd_real"], agreement=sc["agreement"],
                 calls=r["steps"] if state is None else int(state["calls"]),
                 fulls=r["steps"] if state is None else int(state["fulls"]))
        if r["cache"]:
            *_, example = model.inputs(time_num)
            full, skipped = cache_lib.branch_flops(model.network(r, time_num), *example)
            r.update(flops_full=full, flops_skipped=skipped,
                     fne=cache_lib.full_network_equivalents(r["fulls"], r["calls"], full,
                                                            skipped))
        else:
            r["fne"] = 1.0
        keep = ("resolved", "profile", "dev", "fd", "fd_real", "agreement", "calls", "fulls",
                "fne", "flops_full", "flops_skipped")
        done[r["key"]] = {k: r[k] for k in keep if k in r}
        _timing.save_json(path, done)
        log(f"{model.name} {r['label']}: FD {r['fd']:.2f}, dev {r['dev']:.4f}, agreement "
            f"{r['agreement']:.3f}, {r['fulls']}/{r['calls']} full, FNE {r['fne']:.2f} "
            f"({time.perf_counter() - t0:.0f} s)")


def time_runs(model, runs, folder, num, repeats):
    """Median wall time of every run on `num` samples, all runs interleaved (cached in
    folder/times.json with the machine)."""
    path = os.path.join(folder, f"times_{model.name}.json")
    keys = [r["key"] for r in runs]
    done = _timing.load_json(path)
    if not (done and done.get("repeats") == repeats and done.get("num") == num
            and set(keys) <= set(done["seconds"])):
        fns = {}
        for r in runs:
            net = model.network(r, num)
            fns[r["key"]] = (lambda net=net, steps=r["steps"]: model.sample(net, num, steps))
        log(f"{model.name}: timing {len(fns)} runs x {repeats} rounds on {num} samples")
        for r in runs:  # compiles (the step count is data to the compiled program)
            model.sample(model.network(r, num), num, 2)
        seconds = _timing.interleaved(fns, repeats=repeats, warmup=0)
        done = dict(repeats=repeats, num=num, machine=_timing.machine(), seconds=seconds)
        _timing.save_json(path, done)
    for r in runs:
        r["wall_s"] = statistics.median(done["seconds"][r["key"]])
    return done["machine"]


def compare(runs):
    """Speedup against the uncached run at the same steps, FD change, and the fewer-steps
    baseline's FD and deviation at the same wall time."""
    full = {r["steps"]: r for r in runs if r["cache"] is None}
    for r in runs:
        ref = full[r["steps"]]
        r["speedup"] = ref["wall_s"] / r["wall_s"]
        r["fd_change"] = r["fd"] / ref["fd"] - 1
        for metric in ("fd", "dev"):
            if metric not in r:
                continue
            curve = sorted((b["wall_s"], b[metric]) for b in full.values())
            at = r[f"{metric}_equal_time"] = equal_time(curve, r["wall_s"])
            r[f"beats_on_{metric}"] = (None if at is None or r["cache"] is None
                                       else r[metric] < at)


def equal_time(curve, wall):
    """The value of the fewer-steps curve [(wall, value)] at `wall` (linear in log wall time),
    None outside it."""
    for (t0, f0), (t1, f1) in zip(curve, curve[1:]):
        if t0 <= wall <= t1:
            u = 0.0 if t1 == t0 else math.log(wall / t0) / math.log(t1 / t0)
            return f0 + u * (f1 - f0)
    return None


def _opt(v, fmt):
    return "-" if v is None else {True: "yes", False: "no"}[v] if isinstance(v, bool) else (
        format(v, fmt))


def report(all_runs, machine, path_md, path_png, args):
    lines = ["# Feature caches on the testbed (`benchmarks/caching.py`)", "",
             f"{NUM} scored samples (noise seed {SEED}), wall time: median of {args.repeats} "
             f"interleaved rounds on {args.time_num} samples (CFG: {2 * args.time_num} rows); "
             f"machine: {machine['cpu']}, {machine['cores']} cores, jax {machine['jax']} "
             f"({machine['jax_backend']}), load {machine['load_avg_1_5_15']}. FNE: full-network "
             "equivalents (XLA FLOPs). dev: RMS distance (data in [-1, 1]) to the uncached "
             "samples at the most steps, same noise. 'Same time': the uncached fewer-steps "
             "curve interpolated at the run's wall time.", ""]
    for name in dict.fromkeys(r["model"] for r in all_runs):
        runs = [r for r in all_runs if r["model"] == name]
        lines += [f"## {name}", "", _timing.table(
            ["run", "full / calls", "FNE", "wall s", "speedup", "FD", "FD vs full", "agreement",
             "dev", "same time: FD", "dev", "beats it on FD", "on dev"],
            [[r["label"], f"{r['fulls']}/{r['calls']}", f"{r['fne']:.2f}", f"{r['wall_s']:.2f}",
              f"{r['speedup']:.2f}x", f"{r['fd']:.2f}", f"{100 * r['fd_change']:+.1f}%",
              f"{r['agreement']:.3f}", f"{r['dev']:.4f}", _opt(r["fd_equal_time"], ".2f"),
              _opt(r["dev_equal_time"], ".4f"), _opt(r["beats_on_fd"], ""),
              _opt(r["beats_on_dev"], "")]
             for r in runs]), ""]
        lines += [f"FD of real digits (as many, the floor): {runs[0]['fd_real']:.2f}", ""]
    with open(path_md, "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(all_runs, path_png)


def plot(all_runs, path):
    from jaxdiff.eval.plots import _pyplot

    plt = _pyplot()
    names = list(dict.fromkeys(r["model"] for r in all_runs))
    fig, axes = plt.subplots(2, len(names), figsize=(6.5 * len(names), 9), squeeze=False)
    markers = {"deepcache": "o", "fbcache": "s", "taylorseer": "^", "delta_dit": "D"}
    for col, name in enumerate(names):
        runs = [r for r in all_runs if r["model"] == name]
        base = sorted((r for r in runs if r["cache"] is None), key=lambda r: r["wall_s"])
        for row, (metric, ylabel) in enumerate((
                ("fd", "FD_digits (lower is better)"),
                ("dev", "RMS distance to the uncached samples at the most steps"))):
            ax = axes[row][col]
            line = [r for r in base if r[metric] > 0]  # (the reference's own distance is 0)
            ax.plot([r["wall_s"] for r in line], [r[metric] for r in line], "k.-",
                    label="no cache, fewer steps")
            for r in line:
                ax.annotate(str(r["steps"]), (r["wall_s"], r[metric]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
            labels = dict.fromkeys(r["label"].rsplit(" @", 1)[0] for r in runs if r["cache"])
            for label in labels:
                pts = [r for r in runs if r["cache"] and r["label"].rsplit(" @", 1)[0] == label]
                ax.plot([r["wall_s"] for r in pts], [r[metric] for r in pts],
                        markers[pts[0]["cache"]] + "--", ms=5, lw=0.8, alpha=0.85,
                        label=f"{label} (@{'/'.join(str(r['steps']) for r in pts)})")
            ax.set_xscale("log")
            ax.set_yscale("log")
            if metric == "fd":
                ax.axhline(runs[0]["fd_real"], color="grey", lw=0.6, ls=":")
            ax.set_xlabel("wall time (s, median)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{name}: caches vs fewer steps")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(CACHES), choices=list(CACHES))
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (after a warm-up)")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats={args.repeats} must be >= 1")
    global NUM
    steps, base_steps, time_num = STEPS, BASE_STEPS, TIME_NUM
    if args.quick:
        steps, base_steps, NUM, time_num = (QUICK["steps"], QUICK["base_steps"], QUICK["num"],
                                            QUICK["time_num"])
    args.time_num = time_num
    name = "caching_quick" if args.quick else "caching"
    folder = os.path.join(args.out, name)
    all_runs, machine = [], None
    for m in args.models:
        model = Model(m)
        runs = runs_for(m, steps, base_steps)
        score_runs(model, runs, folder, NUM, time_num)
        machine = time_runs(model, runs, folder, time_num, args.repeats)
        compare(runs)
        all_runs += runs
        report(all_runs, machine, os.path.join(args.out, f"{name}.md"),
               os.path.join(args.out, f"{name}.png"), args)
    _timing.save_json(os.path.join(args.out, f"{name}.json"), dict(machine=machine, runs=all_runs))
    with open(os.path.join(args.out, f"{name}.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
