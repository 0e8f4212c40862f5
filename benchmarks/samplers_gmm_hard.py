"""Few-step samplers on a harder Gaussian mixture, with learned solvers fitted on calibration
noise and scored on other noise (issue 12, item 4).

Problem: 6 isotropic Gaussians in 16 dimensions, widths 0.05 .. 0.4 (one each), unequal weights
(0.35 .. 0.05), means 1.2 N(0, I); DDPM linear process (1000 steps); the eps "network" is the
exact mixture denoiser (`jaxdiff.core.analytic`). Reference: tight float64 ODE solve (rtol =
atol = 1e-10) to the smallest trained level, then the final denoising step; score: RMS distance
to it over the test draws -- all as in `samplers_gmm.py`, whose tables, diffusers loop and NFE
counting this script imports.

Rows: every jaxdiff sampler x schedule of samplers_gmm at NFE 4, 5, 6, 8, 10; diffusers'
schedulers through their own loop; learned solvers (`jaxdiff.core.solver_fit`: per-step
multistep predictor and corrector coefficients + grid, order 3, validation early stopping; from
three starting grids, the best on validation kept) fitted on
separate calibration noise. `--generalise` also fits, with the same settings, on the original
8-D problem and on other seeds/dimensions/betas and reports calibration vs fresh-noise error.
DPM-Solver-v3 rows (`jaxdiff.core.dpmv3_stats`): empirical model statistics from 2048 mixture
samples at 150 levels, orders 2 and 3 on the trailing and time_quadratic grids.

    python benchmarks/samplers_gmm_hard.py [--quick] [--generalise] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import samplers_gmm as base  # noqa: E402

from jaxdiff.core import analytic, schedules  # noqa: E402
from jaxdiff.core import dpmv3_stats as v3  # noqa: E402
from jaxdiff.core import solver_fit as sf  # noqa: E402
from jaxdiff.core.denoiser import denoiser, model_from_denoiser  # noqa: E402
from jaxdiff.core.process import DiscreteVP  # noqa: E402
from jaxdiff.samplers import SAMPLERS  # noqa: E402

NFES = (4, 5, 6, 8, 10)
WEIGHTS = np.array([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])
# grids the learned fits start from: "+sigma_min" ends at sigma_min (no final denoising call)
INITS = ("trailing", "logsnr", "trailing+sigma_min")
FIT = dict(order=3, loss="mse", iters=400, batch=1024, learning_rate=0.003, smooth=1e-3,
           ridge=1e-3, eval_every=10, patience=15, corrector=True)


def mixture(seed=0, dim=16, modes=6):
    """(means, widths, weights) of the hard mixture: widths 0.05..0.4 in a random order,
    weights 0.35..0.05, means 1.2 N(0, I)."""
    rng = np.random.default_rng(seed)
    means = 1.2 * rng.normal(size=(modes, dim))
    widths = rng.permutation(np.geomspace(0.05, 0.4, modes))
    return means, widths, np.resize(WEIGHTS, modes)


def mixture_samples(n, seed=0, dim=16, modes=6, draw_seed=5):
    means, widths, weights = mixture(seed, dim, modes)
    rng = np.random.default_rng(draw_seed)
    comp = rng.choice(modes, n, p=weights / weights.sum())
    return means[comp] + widths[comp, None] * rng.normal(size=(n, dim))


def hard_problem(seed=0, dim=16, modes=6, process=None):
    """The mixture of `mixture` on `process` (default DDPM linear); returns (process, eps
    model, denoiser)."""
    means, widths, weights = mixture(seed, dim, modes)
    process = process or DiscreteVP.linear()
    D = analytic.gmm_denoiser(means, widths, weights)
    model = model_from_denoiser(D, process, "eps")
    return process, model, denoiser(model, process, "eps")


def draws(process, D, n, seed, dim):
    """n standard-normal noises, their VE-view starting states and reference end points."""
    noise = jax.random.normal(jax.random.key(seed), (n, dim), jnp.float64)
    x = noise * float(process.prior_scale(process.sigma_max))
    base.PROCESS = process
    return noise, x, base.reference(D, x, float(process.sigma_max))


def fit_learned(process, D, x_cal, ref_cal, nfe, fit=None, inits=INITS, log=print):
    """Fits from each initial grid, keeps the fit with the best validation error; returns the
    solver dict and a summary."""
    fit = dict(FIT, **(fit or {}))
    best = None
    for init in inits:
        name, _, end = init.partition("+")
        grid = np.asarray(schedules.get(name)(process, nfe))
        floor = float(process.sigma_min)
        if end:  # the last step goes to sigma_min itself: nfe steps, nfe calls
            grid, floor = np.append(grid[:-1], floor), None
        t0 = time.time()
        solver = sf.fit_solver(D, x_cal, ref_cal, grid, sigma_floor=floor, process=process,
                               **fit)
        info = solver["fit"]
        log(f"  learned nfe={nfe} init={init}: val {info['initial_validation_rmse']:.3e} -> "
            f"{info['validation_rmse']:.3e} (cal {info['calibration_rmse']:.3e}, "
            f"{info['best_iteration']}/{info['iterations']} it, {time.time() - t0:.0f} s)")
        if best is None or info["validation_rmse"] < best["fit"]["validation_rmse"]:
            info.pop("history", None)
            info["init"] = init
            best = solver
    return best


def v3_rows(process, D, x0, x, ref, nfes):
    """DPM-Solver-v3 (EMS from data samples x0) per order and grid: (RMSE, NFE, steps)."""
    levels = np.geomspace(float(process.sigma_min), float(process.sigma_max), 150)
    stats = v3.ems(D, jnp.asarray(x0), levels, jax.random.key(3))
    rows = {}
    for order in (2, 3):
        for sched in ("trailing", "time_quadratic"):
            errs = {}
            for nfe in nfes:
                grid = np.asarray(schedules.get(sched)(process, nfe))
                y = SAMPLERS["dpm_v3"](D, x, jnp.asarray(grid),
                                       tables=v3.v3_tables(stats, grid, order))
                errs[nfe] = (base.rmse(y, ref), nfe, nfe)
            rows[f"dpm_v3-{order} + {sched}"] = errs
    return rows


def score_learned(solver, D, x, ref):
    corr = solver.get("corrector")
    y = sf.run_solver(D, x, jnp.asarray(solver["sigmas"]), jnp.asarray(solver["coefficients"]),
                      corrector=None if corr is None else jnp.asarray(corr))
    return base.rmse(y, ref)


def learned_rows(process, D, cal, test, nfes, fit=None, log=print):
    """Learned-solver row: (test RMSE, NFE, steps) per NFE, plus the solvers and the gap."""
    row, solvers, gaps = {}, {}, {}
    for nfe in nfes:
        solver = fit_learned(process, D, *cal, nfe, fit, log=log)
        err = score_learned(solver, D, *test)
        row[nfe] = (err, nfe, nfe)
        solvers[nfe] = solver
        gaps[nfe] = {"calibration": solver["fit"]["calibration_rmse"],
                     "validation": solver["fit"]["validation_rmse"], "test": err}
    return row, solvers, gaps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--generalise", action="store_true")
    ap.add_argument("--n-cal", type=int, default=4096)
    ap.add_argument("--n-test", type=int, default=2048)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    nfes = (5, 10) if args.quick else NFES
    fit = dict(iters=100) if args.quick else None
    process, model, D = hard_problem()
    dim = 16
    noise, x_test, ref_test = draws(process, D, args.n_test, 0, dim)
    _, x_cal, ref_cal = draws(process, D, args.n_cal, 1, dim)
    print(f"references {time.time() - t0:.0f} s")
    rows, _ = base.ours_table(D, x_test, ref_test, nfes)
    print(f"fixed samplers {time.time() - t0:.0f} s")
    row, solvers, gaps = learned_rows(process, D, (x_cal, ref_cal), (x_test, ref_test), nfes, fit)
    rows["learned (order 3 + corrector, fitted)"] = row
    print(f"learned {time.time() - t0:.0f} s")
    rows.update(v3_rows(process, D, mixture_samples(2048), x_test, ref_test, nfes))
    rows.update(base.diffusers_table(model, noise, ref_test, nfes))
    text = (f"## Sampler error on the hard 16-D mixture (RMS vs reference, {args.n_test} test "
            f"draws; learned solvers fitted on {args.n_cal} other draws)\n\n"
            + base.summary(rows, nfes) + "\n\n" + gap_table(gaps) + "\n\n"
            + base.markdown(rows, nfes) + "\n")
    out = {"rows": rows, "solvers": {str(k): v for k, v in solvers.items()}, "gaps": gaps}
    if args.generalise:
        gen_text, out["generalise"] = generalise((5, 10))
        text += "\n" + gen_text + "\n"
    print(text)
    print(f"total time {time.time() - t0:.0f} s")
    with open(os.path.join(args.out, "samplers_gmm_hard.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "samplers_gmm_hard.json"), "w") as f:
        json.dump(out, f, indent=1)
    for nfe, solver in solvers.items():
        sf.save_solver(os.path.join(args.out, f"solver_gmm_hard_nfe{nfe}.json"), solver)
    plot(rows, nfes, os.path.join(args.out, "samplers_gmm_hard.png"))


def generalise(nfes, n_cal=4096, n_test=2048, log=print):
    """The same fit settings on problems they were not tuned on: the original 8-D mixture of
    samplers_gmm.py, and the hard mixture with another seed, 8 dimensions and scaled-linear
    betas. Per problem and NFE: best fixed jaxdiff sampler, learned solver on calibration /
    validation / fresh noise."""
    problems = {}
    proc, model = base.problem()
    problems["samplers_gmm (8-D, 16 modes, std 0.1)"] = (proc, denoiser(model, proc, "eps"), 8)
    proc, _, D = hard_problem(seed=1, dim=8, process=DiscreteVP.scaled_linear())
    problems["hard, seed 1, 8-D, scaled_linear betas"] = (proc, D, 8)
    lines = ["| problem | NFE | best fixed (test) | learned cal | learned val | learned test |"
             " test / cal |", "|---|---|---|---|---|---|---|"]
    out = {}
    for name, (proc, D, dim) in problems.items():
        log(name)
        _, x_test, ref_test = draws(proc, D, n_test, 10, dim)
        _, x_cal, ref_cal = draws(proc, D, n_cal, 11, dim)
        rows, _ = base.ours_table(D, x_test, ref_test, nfes)
        row, _, gaps = learned_rows(proc, D, (x_cal, ref_cal), (x_test, ref_test), nfes, log=log)
        for n in nfes:
            fixed, label = base._best(rows, n)
            g = gaps[n]
            lines.append(f"| {name} | {n} | {fixed:.3e} ({label}) | {g['calibration']:.3e} | "
                         f"{g['validation']:.3e} | {g['test']:.3e} | "
                         f"{g['test'] / g['calibration']:.2f} |")
            out[f"{name} @ {n}"] = dict(g, fixed=fixed, fixed_label=label)
    return "### Generalisation: the same fit settings on other problems\n\n" + "\n".join(lines), out


def gap_table(gaps):
    lines = ["| NFE | calibration RMSE | validation RMSE | test RMSE (fresh noise) | test / cal |",
             "|---|---|---|---|---|"]
    for n, g in gaps.items():
        lines.append(f"| {n} | {g['calibration']:.3e} | {g['validation']:.3e} | {g['test']:.3e} |"
                     f" {g['test'] / g['calibration']:.2f} |")
    return "\n".join(lines)


def plot(rows, nfes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = {"jaxdiff fixed (best)": {}, "learned solver": {}, "diffusers (best)": {}}
    for k, v in rows.items():
        kind = ("diffusers (best)" if k.startswith("diffusers") else
                "learned solver" if k.startswith("learned") else "jaxdiff fixed (best)")
        kinds[kind][k] = v
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for (kind, sub), style in zip(kinds.items(), ("o:", "s-", "^--")):
        if sub:
            ax.semilogy(nfes, base._envelope(sub, nfes), style, lw=2, label=kind)
    ax.set_xlabel("NFE")
    ax.set_ylabel("RMS error vs reference ODE solution")
    ax.set_title("16-D, 6-component Gaussian mixture (widths 0.05-0.4), DDPM linear")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
