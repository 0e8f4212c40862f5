"""Few-step students of the testbed models (issue 15): quality against sampling steps for each
distillation method, against the teacher at the same steps and at 50 steps, and what each cost.

Teachers: `digits16_unet` (EDM, class-conditional, CFG 2.0) for progressive, guided, consistency
distillation (cd) and consistency training (ct); `digits16_flow` (rectified flow) for reflow.
Each method runs through `jaxdiff.cli.distill_stages.distill` (the code `jaxdiff distill` runs) in
OUT/distillation/<method>/, from the teacher's EMA params, with the settings of `PLANS`.
- quality: FD_digits and classifier agreement of `NUM` samples from noise seed 0
  (`testbed.score`), labels cycled: every progressive round's student at its own steps; the
  consistency models and the reflowed flow at 1, 2, 4 and 8 steps; the guided student at 4
  steps for w in 1..4 against the CFG teacher at w (dpmpp_2m, 50 steps);
- the teacher: DDIM and dpmpp_2m at 1, 2, 4, 8, 16 steps and dpmpp_2m at 50, under CFG 2
  (two network calls per step: NFE = 2 x steps);
- cost: wall time of each stage (2-core CPU, as run) and the teacher's network evaluations
  during training (per training example: PD's two DDIM steps, CD's Heun step, x 2 under CFG).

    PYTHONPATH=$PWD/benchmarks python benchmarks/distillation.py [--only progressive,cd]
        [--out benchmarks/out]

Trained students stay in OUT/distillation/ (a killed run resumes), scored rows are cached in
OUT/distillation/rows.json. Writes OUT/distillation.md (tables), .json and .png (FD against
steps; the README's figure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import _timing
import jax
import jax.numpy as jnp
import numpy as np
import testbed
from ml_collections import ConfigDict

import jaxdiff
from jaxdiff import train as train_lib
from jaxdiff.cli import build
from jaxdiff.cli import distill_stages as run
from jaxdiff.distill import consistency_grid, teacher_record
from jaxdiff.train.checkpoint import Checkpointer

NUM, SEED = 500, 0
STEPS = (1, 2, 4, 8)
TEACHER_STEPS = (1, 2, 4, 8, 16)
GUIDANCES = (1.0, 2.0, 3.0, 4.0)
HERE = os.path.dirname(os.path.abspath(__file__))
log = _timing.progress

# method -> (teacher, distill settings, train / optim overrides); train.steps is per stage
PLANS = {
    "progressive": ("digits16_unet", dict(teacher_steps=64, student_steps=1),
                    dict(steps=400, lr=5e-4, warmup_steps=20)),
    "guided": ("digits16_unet", dict(teacher_steps=64, student_steps=4),
               dict(steps=400, lr=5e-4, warmup_steps=20)),
    "cd": ("digits16_unet", dict(levels=18, ode="heun"), dict(steps=800, lr=2e-4,
                                                              warmup_steps=20)),
    "ct": ("digits16_unet", dict(s0=10, s1=160), dict(steps=1500, lr=1e-3, warmup_steps=100)),
    "reflow": ("digits16_flow", dict(student_steps=4, pairs=2048, pair_steps=16,
                                     pair_sampler="heun"),
               dict(steps=600, lr=5e-4, warmup_steps=20)),
}


def teacher_config(tb):
    """A testbed model's settings as a `jaxdiff train` run config (what its config.json
    would hold)."""
    s = tb.settings
    o = dict(s["optim"])
    sampler = dict(s["sampler"], options={}, cache=None)
    return dict(
        model=dict(s["model"]), process=dict(s["process"]),
        # the UNet's training-time p_mean shift is no run-config key (the students' losses
        # draw their own levels)
        loss={k: v for k, v in s["loss"].items() if k != "p_mean"},
        sampler=sampler,
        optim=dict(o, ema_decays=[s["ema_decay"]]),
        data=dict(name=s["data"], batch_size=s["batch_size"], random_flip=False, data_dir=None),
        train=dict(steps=s["steps"], seed=s["seed"], log_every=50, ckpt_every=100, keep=1,
                   sample_every=0, num_samples=10, skip_nonfinite=False),
        mesh=dict(data=-1, fsdp=1, tensor=1))


def plan_config(method, tb):
    name, settings, train = PLANS[method]
    cfg = run.student_config(teacher_config(tb), method, **settings)
    cfg.train.steps = train["steps"]
    cfg.optim.lr = train["lr"]
    cfg.optim.warmup_steps = train["warmup_steps"]
    return cfg


def distil(method, tb, out):
    """Trains (or resumes) the method's student; {stage: wall_s} of the stages run now."""
    cfg = plan_config(method, tb)
    record = teacher_record(os.path.join(testbed.CACHE, tb.name), tb.settings["steps"],
                            tb.params)
    workdir = os.path.join(out, method)
    times = _read(os.path.join(workdir, "times.json")) or {}
    t0 = time.perf_counter()
    run.distill(cfg, workdir, teacher_params=tb.params, record=record, log=False,
                on_stage=lambda name, s: times.setdefault(name, round(s, 1)))
    _write(os.path.join(workdir, "times.json"), times)
    log(f"distillation: {method} done in {time.perf_counter() - t0:.0f} s")
    return workdir


def students(workdir):
    """[(stage folder, its config)] of a finished distillation, in order."""
    cfg = ConfigDict(_read(os.path.join(workdir, "config.json")))
    plan = run.stages(cfg, build.process(cfg))
    out = []
    for i, (name, kind, _) in enumerate(plan):
        if kind == "pairs":
            continue
        folder = run.stage_dir(workdir, i, name, len(plan))
        out.append((name, folder, ConfigDict(_read(os.path.join(folder, "config.json")))))
    return out


def restore(folder, cfg):
    model = build.model(cfg)
    tx, _ = build.optimizer(cfg)
    shape = tuple(build.data_info(cfg)["shape"])
    template = train_lib.abstract_state(model, tx, x_shape=shape, num_classes=10,
                                        ema_decays=tuple(cfg.optim.ema_decays))
    ckpt = Checkpointer(folder)
    try:
        state, _ = ckpt.restore(template, build.description(cfg))
    finally:
        ckpt.close()
    return model, state.ema_params[0]


def sample_student(cfg, model, params, *, grid=None, steps=None, guidance=None):
    """NUM samples of a student with its sampler (or `grid`), labels cycled, one pass per
    step."""
    s = cfg.sampler
    labels = np.arange(NUM, dtype=np.int32) % 10
    cond = run.conditioning(cfg, jnp.asarray(labels), guidance)
    noise = jax.random.normal(jax.random.key(SEED), (NUM, *build.data_info(cfg)["shape"]))
    x = jaxdiff.sample(train_lib.network(model, params), noise, process=build.process(cfg),
                       prediction=cfg.loss.prediction, sampler=s.name,
                       schedule=list(s.schedule) if grid is None else grid,
                       steps=s.steps if grid is None else len(grid) - 1,
                       key=jax.random.key(SEED + 1), guidance=cond, **dict(s.options))
    return np.asarray(x), labels


def score(x, labels, **row):
    r = testbed.score(x, labels, resolution=16)
    return dict(row, fd=round(float(r["fd"]), 3), agreement=round(float(r["agreement"]), 3))


def teacher_rows(tb, cached):
    rows = []
    for sampler in ("ddim", "dpmpp_2m"):
        for n in TEACHER_STEPS + ((50,) if sampler == "dpmpp_2m" else ()):
            key = f"teacher/{tb.name}/{sampler}/{n}/2.0"
            if key not in cached:
                x, labels = testbed.sample(tb, num=NUM, seed=SEED, sampler=sampler, steps=n)
                cached[key] = score(x, labels, method="teacher", model=tb.name, sampler=sampler,
                                    steps=n, nfe=2 * n, guidance=2.0)
            rows.append(cached[key])
    return rows


def method_rows(method, workdir, cached):
    rows = []
    plan = students(workdir)
    times = _read(os.path.join(workdir, "times.json")) or {}
    for name, folder, cfg in plan:
        model, params = restore(folder, cfg)
        if method in ("cd", "ct", "reflow"):
            grids = {n: _grid(method, cfg, n) for n in STEPS}
        else:
            grids = {cfg.sampler.steps: None}
        for n, grid in grids.items():
            key = f"{method}/{name}/{n}"
            if key not in cached:
                x, labels = sample_student(cfg, model, params, grid=grid)
                cached[key] = score(x, labels, method=method, stage=name, steps=n, nfe=n,
                                    guidance=float(cfg.sampler.guidance),
                                    train_s=times.get(name))
            rows.append(cached[key])
        if method == "guided" and (folder == workdir or name == "guided"):
            for w in GUIDANCES:  # the final student, and stage 1's (its error alone)
                key = f"guided/{name}/{cfg.sampler.steps}/w{w}"
                if key not in cached:
                    x, labels = sample_student(cfg, model, params, guidance=w)
                    cached[key] = score(x, labels, method="guided-w", stage=name,
                                        steps=cfg.sampler.steps, nfe=cfg.sampler.steps,
                                        guidance=w)
                rows.append(cached[key])
    return rows


def _grid(method, cfg, n):
    process = build.process(cfg)
    if method == "reflow":
        return [float(s) for s in run.euler_grid(process, n)]
    return [float(s) for s in consistency_grid(n, cfg.distill.sigma_min,
                                               float(process.sigma_max))]


def guided_teacher_rows(tb, cached):
    rows = []
    for w in GUIDANCES:
        key = f"teacher/{tb.name}/dpmpp_2m/50/{w}"
        if key not in cached:
            x, labels = testbed.sample(tb, num=NUM, seed=SEED, sampler="dpmpp_2m", steps=50,
                                       guidance=w)
            cached[key] = score(x, labels, method="teacher", model=tb.name, sampler="dpmpp_2m",
                                steps=50, nfe=100, guidance=w)
        rows.append(cached[key])
    return rows


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(PLANS), help="methods, comma-separated")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--score", action="store_true", help="score finished students only")
    args = ap.parse_args(argv)
    methods = [m for m in args.only.split(",") if m]
    for m in methods:
        if m not in PLANS:
            sys.exit(f"--only: {m!r} is not a method; allowed: {', '.join(PLANS)}")
    out = os.path.join(args.out, "distillation")
    rows_path = os.path.join(out, "rows.json")
    cached = _read(rows_path) or {}
    teachers = {n: testbed.load(n, build=False, log=False)
                for n in {PLANS[m][0] for m in methods}}
    for m in methods:
        if not args.score:
            distil(m, teachers[PLANS[m][0]], out)
        method_rows(m, os.path.join(out, m), cached)
        _write(rows_path, cached)
    for tb in teachers.values():
        teacher_rows(tb, cached)
        if tb.name == "digits16_unet":
            guided_teacher_rows(tb, cached)
        _write(rows_path, cached)
    report(cached, args.out)


def report(cached, out):
    rows = list(cached.values())
    lines = ["| method | stage | steps | NFE | guidance | FD | agreement | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r.get("model", ""),
                                         r.get("sampler", ""), r["guidance"], r["steps"])):
        stage = r.get("stage") or f"{r.get('model')} {r.get('sampler')}"
        lines.append(f"| {r['method']} | {stage} | {r['steps']} | {r['nfe']} | "
                     f"{r['guidance']:g} | {r['fd']:.2f} | {r['agreement']:.3f} | "
                     f"{r.get('train_s') or ''} |")
    with open(os.path.join(out, "distillation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _write(os.path.join(out, "distillation.json"), rows)
    plot(rows, os.path.join(out, "distillation.png"))
    print("\n".join(lines))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series = {}
    for r in rows:
        if r["method"] == "teacher" and r["guidance"] == 2.0 and r["steps"] <= 16:
            series.setdefault(f"teacher {r['model'].split('_')[1]} {r['sampler']}", []).append(r)
        elif r["method"] in ("progressive", "guided", "cd", "ct", "reflow"):
            series.setdefault(r["method"], []).append(r)
    for name, rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["steps"])
        style = "--" if name.startswith("teacher") else "-o"
        ax.plot([r["steps"] for r in rs], [r["fd"] for r in rs], style, label=name)
    ref = [r for r in rows if r["method"] == "teacher" and r["steps"] == 50
           and r["guidance"] == 2.0 and r["model"] == "digits16_unet"]
    if ref:
        ax.axhline(ref[0]["fd"], color="k", lw=0.8, label="UNet teacher, 50 steps")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FD_digits (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
