"""Learned few-step solvers against the best fixed sampler on the testbed digits models
(issue 12, item 4): FD_digits at NFE 4, 5, 6, 8.

For each model (default `digits16_unet`, EDM, and `digits16_flow`, rectified flow) and NFE:
- learned: `jaxdiff.core.solver_fit.fit_solver` on the model as `jaxdiff tune-sampler` fits a
  trained run (`jaxdiff.cli.tune.tune`): the CFG denoiser at the testbed's guidance, calibration
  draws from other noise seeds than the scored ones (classes cycled), reference end points from
  a fine dpmpp_3m run on the model's standard schedule, initial grid = that schedule at the NFE,
  sigma_floor = the fine grid's last positive level; the fitted solver is sampled through
  `jaxdiff.sample(..., sampler="learned", sampler_file=solver)`;
- init: the fit's own starting point (the base exponential-integrator table on the initial grid,
  `ei_coefficients`), sampled the same way;
- fixed: each candidate of `FIXED` on each schedule of `SCHEDULES`, with the most steps whose
  NFE fits the budget; NFE are counted at run time (a `Stateful` network that counts its calls;
  under CFG one call evaluates [x; x]), so a single-step second-order sampler gets half the steps;
  best fixed = lowest FD per (model, NFE);
- standard: the testbed's standard sampler (dpmpp_2m, 20 steps), as context.
Every row scores 500 samples from noise seed 0 with `testbed.score` (the testbed's own scores).

    PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/solvers_testbed.py \
        [--models digits16_unet digits16_flow] [--nfes 4 5 6 8] [--refit] [--out benchmarks/out]

Fitted solvers and scored rows are cached (JSON, written atomically) in OUT/solvers_testbed/, so
a rerun resumes where it stopped; `--refit` redoes the fits (and so the learned rows) only.
Writes OUT/solvers_testbed.md (table), .json (every row) and .png (FD vs NFE).

The fit's settings are the keyword arguments in `FIT` (passed as they are: `fit_solver` is
growing options); the calibration set's in `CAL`. A fit backpropagates through the network at
every step, so both are sized for a 2-core CPU: 2 models x 4 NFE took 28.5 minutes with the
CPU shared (load average 3-5), fits ~40 % of it; the fits had not converged (best iteration
= the last in all 8).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
import time

import _timing
import jax
import jax.numpy as jnp
import numpy as np
import testbed

import jaxdiff
from jaxdiff.core import schedules, solver_fit
from jaxdiff.core.denoiser import Stateful
from jaxdiff.core.denoiser import denoiser as make_denoiser
from jaxdiff.core.guidance import CFG
from jaxdiff.core.guidance import cfg as cfg_guidance
from jaxdiff.sampling import default_schedule

# keyword arguments of fit_solver (besides the calibration set, the grid and sigma_floor)
# Sized for a loaded 2-core CPU: one fit at NFE 6 with batch 32 took ~75 s to compile and
# ~3.5 s an iteration (load average ~5); 20 iterations took the validation RMSE 0.76 -> 0.35.
FIT = dict(order=2, iters=24, batch=16, learning_rate=0.02, loss="huber", eval_every=4,
           patience=3, seed=0)
# calibration: `num` draws from noise key(seed) (the scored samples use key(0)), classes cycled;
# references by `ref_sampler` with `ref_steps` steps on the model's standard schedule
CAL = dict(num=192, seed=100, ref_sampler="dpmpp_3m", ref_steps=32)
# where the learned grid ends: "zero" (the standard n-step grid, last call a denoising step) or
# "sigma_min" (the standard (n+1)-step grid without its final 0: n calls, no call at the end)
END = "sigma_min"
NUM, SEED = 500, 0  # scored samples: as the testbed scores
MODELS = ("digits16_unet", "digits16_flow")
NFES = (4, 5, 6, 8)
FIXED = [  # (label, sampler, options, on every schedule of SCHEDULES or the standard one only)
    ("dpmpp_2m", "dpmpp_2m", {}, False),
    ("dpmpp_3m", "dpmpp_3m", {}, True),
    ("unipc-bh2-3", "unipc", {"order": 3, "variant": "bh2"}, True),
    ("ipndm", "ipndm", {}, False),
]
# schedules per process type; the first is the model's standard one (jaxdiff.sample's default)
SCHEDULES = {"EDM": ("karras", "logsnr"), "RectifiedFlow": ("logsnr", "time_uniform")}

HERE = os.path.dirname(os.path.abspath(__file__))
with open(solver_fit.__file__, "rb") as _f:  # recorded with each fit (see cached_solver)
    FIT_CODE = hashlib.sha256(_f.read()).hexdigest()[:12]
T0 = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def _hash(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]





# --- sampling and scoring ----------------------------------------------------------------------


def _counted(model_fn, x, t, y, calls):
    """The network, counting its calls (the Stateful state): NFE measured, not assumed."""
    return model_fn(x, t, y), calls + 1


class Model:
    """A testbed model with what every row needs: the scored noise and labels, the guidance,
    the counting network and the standard schedule."""

    def __init__(self, name):
        try:
            self.tb = tb = testbed.load(name, build=False, log=False)
        except FileNotFoundError as e:
            sys.exit(f"solvers_testbed: {e}\n(this benchmark never trains: the cached testbed "
                     "model is missing or stale)")
        self.name, self.process, self.fingerprint = name, tb.process, tb.meta["fingerprint"]
        self.kind = type(tb.process).__name__
        std = tb.sampler
        self.standard = dict(std, schedule=std["schedule"] or default_schedule(tb.process))
        self.guidance = float(std["guidance"])
        self.schedules = SCHEDULES.get(self.kind, (self.standard["schedule"],))
        if self.schedules[0] != self.standard["schedule"]:
            self.schedules = (self.standard["schedule"],) + tuple(
                s for s in self.schedules if s != self.standard["schedule"])
        K = tb.num_classes
        self.labels = np.arange(NUM, dtype=np.int32) % K  # as testbed.sample
        self.cfg = CFG(scale=self.guidance, y=self.labels, y_null=np.full(NUM, K, np.int32))
        self.noise = jax.random.normal(jax.random.key(SEED), (NUM, *tb.shape))
        self.counting = Stateful(jax.tree_util.Partial(_counted, tb.model_fn),
                                 jnp.zeros((), jnp.int32))

    def sample(self, sampler, steps=None, schedule=None, solver=None, **options):
        """(samples, counted NFE, seconds) of one 500-sample run from noise seed 0."""
        t0 = time.perf_counter()
        extra = dict(sampler_file=solver) if solver is not None else dict(steps=steps,
                                                                          schedule=schedule)
        x, calls = jaxdiff.sample(self.counting, self.noise, process=self.process,
                                  prediction=self.tb.prediction, sampler=sampler,
                                  guidance=self.cfg, key=jax.random.key(SEED + 1), **extra,
                                  **options)
        x = np.asarray(x)
        return x, int(calls), time.perf_counter() - t0

    def score(self, x):
        s = testbed.score(x, self.labels, resolution=self.tb.resolution)
        return dict(fd=float(s["fd"]), fd_real=float(s["fd_real"]),
                    agreement=float(s["agreement"]))


def fixed_row(m, label, sampler, options, schedule, budget):
    """The most steps whose counted NFE fits `budget` (from steps = budget down)."""
    steps, tried = budget, []
    while True:
        x, nfe, secs = m.sample(sampler, steps=steps, schedule=schedule, **options)
        tried.append((steps, nfe))
        if nfe <= budget or steps == 1:
            break
        steps = max(1, min(steps - 1, steps * budget // nfe))
    return dict(kind="fixed", label=label, sampler=sampler, options=options, schedule=schedule,
                budget=budget, steps=steps, nfe=nfe, tried=tried, sample_s=round(secs, 1),
                **m.score(x))


def solver_row(m, kind, solver, budget):
    x, nfe, secs = m.sample("learned", solver=solver)
    return dict(kind=kind, label=kind, sampler="learned", schedule=m.standard["schedule"],
                budget=budget, steps=int(solver["nfe"]), nfe=nfe, sample_s=round(secs, 1),
                **m.score(x))


def cached_row(path, make, what):
    row = _timing.load_json(path)
    if row is not None:
        log(f"  {what}: cached FD {row['fd']:.3f} (agreement {row['agreement']:.3f})")
        return row
    t0 = time.perf_counter()
    row = make()
    row["row_s"] = round(time.perf_counter() - t0, 1)
    _timing.save_json(path, row)
    log(f"  {what}: FD {row['fd']:.3f} (agreement {row['agreement']:.3f}), NFE {row['nfe']}, "
        f"{row['row_s']:.1f} s")
    return row


# --- fitting -----------------------------------------------------------------------------------


class Calibration:
    """The calibration set of `tune`, from a testbed model: draws at the grid's first level (VE
    view), their labels and their reference end points (built on first use)."""

    def __init__(self, m):
        self.m, self._data = m, None
        tb, K = m.tb, m.tb.num_classes
        D = make_denoiser(tb.model_fn, tb.process, tb.prediction)
        scale = m.guidance

        def Dc(x, sigma, y):  # one function per model: fit_solver's programs are cached on it
            return cfg_guidance(D, scale, y, jnp.full_like(y, K))(x, sigma)

        self.denoiser = Dc
        self.fine = np.asarray(schedules.get(m.standard["schedule"])(tb.process,
                                                                     CAL["ref_steps"]))

    def data(self):
        if self._data is None:
            m, t0 = self.m, time.perf_counter()
            n, K = CAL["num"], m.tb.num_classes
            noise = jax.random.normal(jax.random.key(CAL["seed"]), (n, *m.tb.shape), jnp.float32)
            labels = jnp.arange(n, dtype=jnp.int32) % K
            # the reference through jaxdiff.sample: the same CFG network, ends in data space (at
            # sigma = 0, where the VE view and the process's scaling agree)
            guide = CFG(scale=m.guidance, y=labels, y_null=jnp.full(n, K, jnp.int32))
            ref = jaxdiff.sample(m.tb.model_fn, noise, process=m.process,
                                 prediction=m.tb.prediction, sampler=CAL["ref_sampler"],
                                 steps=CAL["ref_steps"], schedule=m.standard["schedule"],
                                 guidance=guide)
            x = noise * m.process.prior_scale(jnp.asarray(self.fine[0])).astype(noise.dtype)
            self._data = (x, jnp.asarray(ref), labels)
            log(f"  calibration: {n} draws, references by {CAL['ref_sampler']} "
                f"{CAL['ref_steps']} steps ({m.standard['schedule']}) in "
                f"{time.perf_counter() - t0:.1f} s")
        return self._data

    def init_grid(self, nfe):
        steps = nfe + 1 if END == "sigma_min" else nfe
        grid = np.asarray(schedules.get(self.m.standard["schedule"])(self.m.process, steps),
                          np.float64)
        if END == "sigma_min" and grid[-1] == 0:
            grid = grid[:-1]
        if not np.isclose(grid[0], self.fine[0], rtol=1e-6):
            raise ValueError(f"the {nfe}-step grid starts at {grid[0]:g}, the reference's at "
                             f"{self.fine[0]:g}")
        return grid

    def fit(self, nfe):
        """A solver dict (`solver_dict`'s content) fitted at `nfe`."""
        x, ref, labels = self.data()
        init = self.init_grid(nfe)
        floor = float(self.fine[-2]) if init[-1] == 0 else None
        t0 = time.perf_counter()
        extra = dict(process=self.m.process) if "process" in _fit_params() else {}
        out = solver_fit.fit_solver(self.denoiser, x, ref, init, sigma_floor=floor,
                                    cond_cal=(labels,), **extra, **FIT)
        fit_s = time.perf_counter() - t0
        if isinstance(out, dict):  # the solver dict (solver_dict's content)
            solver, info = dict(out), dict(out.get("fit") or {})
        else:  # older form: (sigmas, coefficients, info)
            *tables, info = out
            solver, info = solver_fit.solver_dict(*tables, self.m.process), dict(info)
        history = info.pop("history", None)
        info.update(model=self.m.name, init=self.m.standard["schedule"],
                    guidance=self.m.guidance, sigma_floor=floor, fit_s=round(fit_s, 1),
                    reference=f"{CAL['ref_sampler']}, {CAL['ref_steps']} steps",
                    fit_options=FIT, solver_fit_code=FIT_CODE,
                    history_first_last=(history[0], history[-1]) if history else None)
        solver["fit"] = info
        solver = json.loads(json.dumps(solver, default=_timing._jsonable))  # JSON-ready, as stored
        solver_fit.load_solver(solver)  # validates
        return solver

    def init_solver(self, nfe):
        """The fit's starting point: the base table (and base corrector when the fit has one)
        on the initial grid."""
        init = self.init_grid(nfe)
        order = FIT.get("order", _fit_params()["order"].default)
        table = solver_fit.ei_coefficients(init, order)
        corr = None
        if "corrector" in _fit_params() and FIT.get("corrector",
                                                    _fit_params()["corrector"].default):
            corr = solver_fit.corrector_coefficients(init, order)
        extra = dict(corrector=corr) if corr is not None else {}
        return json.loads(json.dumps(solver_fit.solver_dict(init, table, self.m.process,
                                                            **extra), default=_timing._jsonable))


def _fit_params():
    return inspect.signature(solver_fit.fit_solver).parameters


def cached_solver(path, key, cal, nfe, refit):
    """The solver at `path` if it was fitted with these settings (and still loads), else a fit."""
    stored = None if refit else _timing.load_json(path)
    if stored is not None and stored.get("key") == key:
        try:
            solver_fit.load_solver(stored["solver"])
            info = stored["solver"].get("fit") or {}
            log(f"  fit NFE {nfe}: cached (validation RMSE {_rmse_text(info)})")
            if info.get("solver_fit_code") != FIT_CODE:
                log(f"  fit NFE {nfe}: fitted by another version of {solver_fit.__file__} "
                    "(--refit to redo the fits)")
            return stored["solver"]
        except ValueError as e:  # the solver format moved on: fit again
            log(f"  fit NFE {nfe}: cached solver no longer loads ({e}); refitting")
    log(f"  fit NFE {nfe}: fitting ({json.dumps(FIT)})")
    solver = cal.fit(nfe)
    _timing.save_json(path, dict(key=key, solver=solver))
    info = solver.get("fit") or {}
    log(f"  fit NFE {nfe}: {info.get('fit_s', float('nan')):.1f} s, {info.get('iterations')} "
        f"iterations (best {info.get('best_iteration')}), validation RMSE {_rmse_text(info)}")
    return solver


def _rmse_text(info):
    a, b = info.get("initial_validation_rmse"), info.get("validation_rmse")
    return f"{a:.4g} -> {b:.4g}" if a is not None and b is not None else "?"


# --- report ------------------------------------------------------------------------------------


def summarize(results, nfes):
    """Per (model, NFE): learned, init, best fixed rows; per model: the standard row."""
    table = []
    for name, res in results.items():
        for n in nfes:
            fixed = [r for r in res["fixed"] if r["budget"] == n and np.isfinite(r["fd"])]
            best = min(fixed, key=lambda r: r["fd"]) if fixed else None
            learned, init = res["learned"].get(n), res["init"].get(n)
            table.append(dict(model=name, nfe=n, learned=learned, init=init, best_fixed=best,
                              ratio=(learned["fd"] / best["fd"]) if learned and best else None,
                              fit=res["fits"].get(n), standard=res["standard"]))
    return table


def _cell(r, which=False):
    if r is None:
        return "-"
    s = f"{r['fd']:.2f} ({r['agreement']:.3f}"
    if which:
        s += f", {r['label']} / {r['schedule']}"
        if r["steps"] != r["budget"]:
            s += f", {r['steps']} steps"
    return s + ")"


def markdown(table, results, elapsed):
    lines = ["## Learned few-step solver vs the best fixed sampler (testbed digits models)", "",
             f"FD_digits of {NUM} samples (noise seed 0, CFG at the testbed's guidance), "
             "agreement in brackets; NFE counted at run time. Best fixed over "
             + ", ".join(lbl for lbl, *_ in FIXED) + " on "
             + "; ".join(f"{k}: {', '.join(v)}" for k, v in SCHEDULES.items())
             + ". Ratio = learned FD / best fixed FD (< 1: the learned solver wins).", "",
             "| model | NFE | learned FD (agreement) | best fixed FD (agreement, which) | ratio |",
             "|---|---:|---|---|---:|"]
    for r in table:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        lines.append(f"| {r['model']} | {r['nfe']} | {_cell(r['learned'])} | "
                     f"{_cell(r['best_fixed'], True)} | {ratio} |")
    lines += ["", "Context: the fit's own starting point (init: the base exponential-integrator "
              "table, order " f"{FIT.get('order', 3)}, on the standard schedule), the fit's "
              "validation RMSE to the reference (before -> after) and the standard 20-step "
              "sampler.", "",
              "| model | NFE | init FD (agreement) | learned FD | val RMSE init -> learned | "
              "fit s (iters, best) | standard 20-step FD | real-data FD |",
              "|---|---:|---|---:|---|---|---:|---:|"]
    for r in table:
        f = (r["fit"] or {})
        fit = (f"{f.get('fit_s', float('nan')):.0f} ({f.get('iterations')}, "
               f"{f.get('best_iteration')})") if f else "-"
        std = r["standard"]
        lines.append(f"| {r['model']} | {r['nfe']} | {_cell(r['init'])} | "
                     f"{r['learned']['fd']:.2f} | {_rmse_text(f)} | {fit} | "
                     f"{std['fd']:.2f} ({std['label']} / {std['schedule']}, {std['steps']}) | "
                     f"{std['fd_real']:.2f} |" if r["learned"] else f"| {r['model']} | "
                     f"{r['nfe']} | - | - | - | - | - | - |")
    lines += ["", "All fixed rows (FD):", ""]
    for name, res in results.items():
        nfes = sorted({r["budget"] for r in res["fixed"]})
        lines += [f"{name}:", "", "| sampler / schedule | " + " | ".join(
            f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
        keys = sorted({(r["label"], r["schedule"]) for r in res["fixed"]},
                      key=lambda k: ([lbl for lbl, *_ in FIXED].index(k[0])
                                     if k[0] in [lbl for lbl, *_ in FIXED] else 99, k[1]))
        for k in keys:
            cells = []
            for n in nfes:
                r = [x for x in res["fixed"] if (x["label"], x["schedule"]) == k
                     and x["budget"] == n]
                cells.append(f"{r[0]['fd']:.2f}" if r else "")
            lines.append(f"| {k[0]} / {k[1]} | " + " | ".join(cells) + " |")
        lines.append("")
    spent = compute_seconds(results)
    lines.append(f"Fit settings: FIT = {json.dumps(FIT)}; CAL = {json.dumps(CAL)}. "
                 f"Time the results took when computed: {spent['fits']:.0f} s of fits, "
                 f"{spent['rows']:.0f} s of sampling and scoring (compilation included; "
                 f"calibration references outside them); this invocation: {elapsed:.0f} s.")
    return "\n".join(lines) + "\n"


def compute_seconds(results):
    """Seconds the cached results took when they were computed: fits and rows."""
    fits = sum((f or {}).get("fit_s", 0.0) for res in results.values()
               for f in res["fits"].values())
    rows = sum(r.get("row_s", 0.0) for res in results.values()
               for r in [*res["fixed"], *res["learned"].values(), *res["init"].values(),
                         res["standard"]] if r)
    return dict(fits=round(fits, 1), rows=round(rows, 1))


def plot(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in table))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, name in zip(axes[0], models):
        rows = [r for r in table if r["model"] == name]
        nfes = [r["nfe"] for r in rows]

        def series(key, rows=rows):
            return [r[key]["fd"] if r[key] else np.nan for r in rows]

        ax.plot(nfes, series("learned"), "o-", lw=2, color="C2", label="learned solver")
        ax.plot(nfes, series("best_fixed"), "s-", lw=2, color="C0", label="best fixed sampler")
        ax.plot(nfes, series("init"), "^--", lw=1, color="C1", label="learned: starting table")
        for r in rows:
            if r["best_fixed"]:
                ax.annotate(r["best_fixed"]["label"] + "\n" + r["best_fixed"]["schedule"],
                            (r["nfe"], r["best_fixed"]["fd"]), fontsize=6, color="C0",
                            textcoords="offset points", xytext=(3, 4))
        std = rows[0]["standard"]
        ax.axhline(std["fd"], color="gray", ls=":", label=f"standard ({std['steps']} steps)")
        ax.axhline(std["fd_real"], color="k", ls=":", lw=0.8, label="real data")
        ax.set_yscale("log")
        ax.set_xticks(nfes)
        ax.set_xlabel("NFE")
        ax.set_ylabel("FD_digits (500 samples)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------


def solver_key(m, nfe):
    """What a cached fit must match: the model, the fit's and calibration's settings."""
    return _hash(dict(fingerprint=m.fingerprint, fit=FIT, cal=CAL, nfe=nfe,
                      **({"end": END} if END != "zero" else {}),
                      init=m.standard["schedule"], guidance=m.guidance))


def run_model(name, nfes, refit, cache, skip_fixed=False):
    m = Model(name)
    cal = Calibration(m)
    log(f"{name}: {m.kind}, prediction {m.tb.prediction}, standard {m.standard}, "
        f"schedules {m.schedules}")
    folder = os.path.join(cache, name)
    res = dict(fixed=[], learned={}, init={}, fits={}, standard=None)
    for n in nfes:
        solver = cached_solver(os.path.join(folder, f"solver_nfe{n}.json"), solver_key(m, n),
                               cal, n, refit)
        res["fits"][n] = {k: v for k, v in (solver.get("fit") or {}).items()
                          if k != "fit_options"}
        res["learned"][n] = cached_row(
            os.path.join(folder, f"row_learned_nfe{n}_{_hash([m.fingerprint, solver])}.json"),
            lambda: solver_row(m, "learned", solver, n), f"learned NFE {n}")
        init = cal.init_solver(n)
        res["init"][n] = cached_row(
            os.path.join(folder, f"row_init_nfe{n}_{_hash([m.fingerprint, init])}.json"),
            lambda: solver_row(m, "init", init, n), f"init table NFE {n}")
    std = m.standard
    res["standard"] = cached_row(
        os.path.join(folder, f"row_standard_{_hash([m.fingerprint, std])}.json"),
        lambda: dict(fixed_row(m, std["name"], std["name"], {}, std["schedule"], std["steps"]),
                     kind="standard"),
        f"standard {std['name']} / {std['schedule']} / {std['steps']} steps")
    if skip_fixed:
        return res
    for label, sampler, options, every in FIXED:
        for schedule in m.schedules if every else m.schedules[:1]:
            for n in nfes:
                key = _hash([m.fingerprint, sampler, options, schedule, n, m.guidance])
                path = os.path.join(folder, f"row_{label}_{schedule}_nfe{n}_{key}.json")
                res["fixed"].append(cached_row(
                    path, lambda: fixed_row(m, label, sampler, options, schedule, n),
                    f"{label} / {schedule} NFE {n}"))
    return res


def main(argv=None):
    global END
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(testbed.SPECS))
    ap.add_argument("--nfes", nargs="+", type=int, default=list(NFES))
    ap.add_argument("--refit", action="store_true", help="redo the fits (cached rows stay)")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--skip-fixed", action="store_true", help="fits and learned rows only")
    ap.add_argument("--order", type=int, default=FIT["order"], help="the fit's order")
    ap.add_argument("--no-corrector", action="store_true", help="fit no corrector table")
    ap.add_argument("--end", choices=("zero", "sigma_min"), default=END,
                    help="where the learned grid ends (see END)")
    a = ap.parse_args(argv)
    END = a.end
    FIT["order"] = a.order
    if a.no_corrector:
        FIT["corrector"] = False
    if min(a.nfes) < 2:
        ap.error("--nfes must be >= 2")
    cache = os.path.join(a.out, "solvers_testbed")
    load0 = os.getloadavg()[0]
    results = {}
    for name in a.models:
        results[name] = run_model(name, sorted(a.nfes), a.refit, cache, a.skip_fixed)
    elapsed = time.perf_counter() - T0
    table = summarize(results, sorted(a.nfes))
    text = markdown(table, results, elapsed)
    print(text)
    base = os.path.join(a.out, "solvers_testbed")
    with open(base + ".md.tmp", "w") as f:
        f.write(text)
    os.replace(base + ".md.tmp", base + ".md")
    _timing.save_json(base + ".json", dict(table=table, results=results, fit=FIT, cal=CAL,
                                           fixed=FIXED, schedules=SCHEDULES, num=NUM, seed=SEED,
                                           wall_s=round(elapsed, 1),
                                           computed_s=compute_seconds(results),
                                           cpu_count=os.cpu_count(),
                                           load_avg=[load0, os.getloadavg()[0]]))
    plot(table, base + ".png")
    log(f"wrote {base}.md, .json, .png")


if __name__ == "__main__":
    sys.exit(main())
