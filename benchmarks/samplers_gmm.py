"""Sampler accuracy on a Gaussian mixture with a closed-form denoiser.

Problem: x0 ~ a mixture of 16 isotropic Gaussians in 8 dimensions (means in [-1, 1]^8, std 0.1,
random weights), a DDPM process (`DiscreteVP.linear`, 1000 steps), an eps-prediction "network"
that is the exact mixture denoiser. Every method starts from the same noise at the largest
training noise level and is scored by the RMS distance of its output to a tight-tolerance
(rtol = atol = 1e-10, float64) probability-flow ODE solution from that noise down to the smallest
trained noise level, followed by the final denoising step D(x, sigma_min) that ends every
sampler's trajectory on a discrete process.

Rows: jaxdiff sampler x schedule; jaxdiff samplers on a schedule fitted to this model and step
count (`jaxdiff.core.schedule_opt`, fitted on separate calibration noise); diffusers' schedulers
(when installed) run through their own loop with the same model function. NFE are counted, not
assumed: each method's model calls are counted at run time.

    python benchmarks/samplers_gmm.py [--quick] [--out benchmarks/out]

Writes samplers_gmm.md (table), samplers_gmm.json and samplers_gmm.png (error vs NFE).
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

from jaxdiff.core import analytic, schedules  # noqa: E402
from jaxdiff.core.denoiser import denoiser, model_from_denoiser  # noqa: E402
from jaxdiff.core.process import DiscreteVP  # noqa: E402
from jaxdiff.core.schedule_opt import optimize_schedule  # noqa: E402
from jaxdiff.samplers import SAMPLERS  # noqa: E402

NFES = (3, 5, 7, 10, 20, 50)
CAPACITY = 64
OURS = [  # (label, sampler, options)
    ("ddim", "ddim", {}),
    ("heun", "heun", {}),
    ("dpm_solver_3", "dpm_solver_3", {}),
    ("dpmpp_2s", "dpmpp_2s", {}),
    ("dpmpp_2m", "dpmpp_2m", {}),
    ("dpmpp_3m", "dpmpp_3m", {}),
    ("dpmpp_3m-exact", "dpmpp_3m", {"exact_phi3": True}),
    ("unipc-bh1-2", "unipc", {"order": 2, "variant": "bh1"}),
    ("unipc-bh1-3", "unipc", {"order": 3, "variant": "bh1"}),
    ("unipc-bh2-3", "unipc", {"order": 3, "variant": "bh2"}),
    ("deis-3", "deis", {"order": 3}),
    ("ipndm", "ipndm", {}),
    ("lms-4", "lms", {"order": 4}),
]
SCHEDULES = ("trailing", "logsnr", "karras", "time_uniform", "time_quadratic")
OPTIMIZED = ("unipc-bh1-3", "unipc-bh2-3", "ipndm", "dpmpp_3m-exact", "deis-3")


def problem(seed=0, dim=8, modes=16):
    rng = np.random.default_rng(seed)
    means = rng.uniform(-1, 1, (modes, dim))
    weights = rng.uniform(0.5, 1.5, modes)
    D = analytic.gmm_denoiser(means, np.full(modes, 0.1), weights)
    process = DiscreteVP.linear()
    model = model_from_denoiser(D, process, "eps")
    return process, model


def counting(D):
    """Wraps a denoiser so that each executed call adds to a host-side counter."""
    calls = [0]

    def bump():
        calls[0] += 1

    def Dc(x, sigma, *args):
        jax.debug.callback(bump)
        return D(x, sigma, *args)

    return Dc, calls


def reference(D, x_T, sigma_max):
    """Tight ODE solve down to the smallest trained level, then the final denoising step that
    every sampler on this discrete process also ends with (the model is not defined below it)."""
    grid = jnp.array([sigma_max, float(PROCESS.sigma_min), 0.0])
    return SAMPLERS["ode"](D, x_T, grid, rtol=1e-10, atol=1e-10, max_steps=100_000)


def ours_table(D, x_T, x_ref, nfes):
    """Best error per (sampler, schedule) at each NFE budget, NFE counted at run time."""
    process = PROCESS
    rows, best_grids = {}, {}
    for label, name, opts in OURS:
        Dc, calls = counting(D)
        run = jax.jit(lambda x, s, n, name=name, opts=opts: SAMPLERS[name](
            Dc, x, s, num_steps=n, **opts))
        for sched in SCHEDULES:
            errs = {}
            for nfe in nfes:
                for steps in range(nfe, 0, -1):  # the most steps whose counted NFE fits
                    grid = schedules.get(sched)(process, steps)
                    calls[0] = 0
                    x = run(x_T, jnp.asarray(schedules.pad(grid, CAPACITY)), steps)
                    x.block_until_ready()
                    if calls[0] <= nfe:
                        errs[nfe] = (rmse(x, x_ref), calls[0], steps)
                        if errs[nfe][0] < best_grids.get((label, nfe), (np.inf,))[0]:
                            best_grids[(label, nfe)] = (errs[nfe][0], grid, steps)
                        break
            rows[f"{label} + {sched}"] = errs
    return rows, best_grids


def optimized_table(D, x_cal, ref_cal, x_T, x_ref, best_grids, nfes, iters):
    """Fits schedules on calibration draws from two starts (the sampler's best fixed schedule
    and `trailing`), keeps the fit with the lower calibration loss, scores it on the test draws."""
    rows, grids = {}, {}
    floor = float(PROCESS.sigma_min)
    for label, name, opts in OURS:
        if label not in OPTIMIZED:
            continue
        errs = {}
        for nfe in nfes:
            _, start, steps = best_grids[(label, nfe)]
            if steps < 2:
                continue
            fits = []
            for init in (start, schedules.trailing(PROCESS, steps)):
                grid, hist = optimize_schedule(SAMPLERS[name], D, x_cal, ref_cal, init,
                                               sigma_floor=floor, iters=iters,
                                               sampler_options=opts)
                fits.append((min(hist), grid))
            grid = min(fits, key=lambda f: f[0])[1]
            Dc, calls = counting(D)
            x = SAMPLERS[name](Dc, x_T, jnp.asarray(grid), **opts)
            x.block_until_ready()
            errs[nfe] = (rmse(x, x_ref), calls[0], steps)
            grids[f"{label}@{nfe}"] = grid.tolist()
        rows[f"{label} + optimized"] = errs
    return rows, grids


DIFFUSERS = [  # (label, class name, config, set_timesteps options)
    ("DDIM trailing", "DDIMScheduler", dict(timestep_spacing="trailing")),
    ("DDIM linspace", "DDIMScheduler", dict(timestep_spacing="linspace")),
    ("Euler trailing", "EulerDiscreteScheduler", dict(timestep_spacing="trailing")),
    ("Euler karras", "EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("Heun linspace", "HeunDiscreteScheduler", dict()),
    ("Heun karras", "HeunDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("LMS-4 karras", "LMSDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("DPM++2M trailing", "DPMSolverMultistepScheduler", dict(timestep_spacing="trailing")),
    ("DPM++2M linspace", "DPMSolverMultistepScheduler", dict()),
    ("DPM++2M karras", "DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    ("DPM++3M trailing", "DPMSolverMultistepScheduler",
     dict(solver_order=3, timestep_spacing="trailing")),
    ("DPM++3M karras", "DPMSolverMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True)),
    ("DPM++2S linspace", "DPMSolverSinglestepScheduler", dict()),
    ("DPM++3S linspace", "DPMSolverSinglestepScheduler", dict(solver_order=3)),
    ("DPM++3S karras", "DPMSolverSinglestepScheduler",
     dict(solver_order=3, use_karras_sigmas=True)),
    # bh1 gives NaN on a final step to sigma = 0 in diffusers; sigma_min is its working variant
    ("UniPC-bh1-2 trailing", "UniPCMultistepScheduler",
     dict(solver_type="bh1", timestep_spacing="trailing")),
    ("UniPC-bh1-2 trailing sigma_min", "UniPCMultistepScheduler",
     dict(solver_type="bh1", timestep_spacing="trailing", final_sigmas_type="sigma_min")),
    ("UniPC-bh2-2 trailing", "UniPCMultistepScheduler", dict(timestep_spacing="trailing")),
    ("UniPC-bh1-3 trailing", "UniPCMultistepScheduler",
     dict(solver_type="bh1", solver_order=3, timestep_spacing="trailing")),
    ("UniPC-bh1-3 trailing sigma_min", "UniPCMultistepScheduler",
     dict(solver_type="bh1", solver_order=3, timestep_spacing="trailing",
          final_sigmas_type="sigma_min")),
    ("UniPC-bh2-3 trailing", "UniPCMultistepScheduler",
     dict(solver_order=3, timestep_spacing="trailing")),
    ("UniPC-bh2-3 karras", "UniPCMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True)),
    ("DEIS-3 trailing", "DEISMultistepScheduler", dict(timestep_spacing="trailing")),
    ("DEIS-3 karras", "DEISMultistepScheduler", dict(use_karras_sigmas=True)),
]


def diffusers_table(model, noise, x_ref, nfes):
    try:
        import diffusers
        import torch
    except ImportError:
        print("diffusers/torch not installed: skipping the diffusers rows")
        return {}
    model_np = jax.jit(model)
    rows = {}
    for label, cls, cfg in DIFFUSERS:
        errs = {}
        for nfe in nfes:
            for steps in range(nfe, 0, -1):
                sched = getattr(diffusers, cls)(beta_schedule="linear", **cfg)
                sched.set_timesteps(steps)
                if float(sched.timesteps[0]) < 998:  # must start where the reference starts
                    break
                x = torch.from_numpy(np.array(noise)) * sched.init_noise_sigma
                calls = 0
                for t in sched.timesteps:
                    x_in = sched.scale_model_input(x, t)
                    out = np.asarray(model_np(jnp.asarray(x_in.numpy()), float(t)))
                    calls += 1
                    x = sched.step(torch.from_numpy(out), t, x).prev_sample
                if calls <= nfe:
                    errs[nfe] = (rmse(x.numpy(), x_ref), calls, steps)
                    break
        rows[f"diffusers {label}"] = errs
    return rows


def rmse(x, ref):
    return float(np.sqrt(np.mean(np.square(np.asarray(x) - np.asarray(ref)))))


def _best(rows, nfe):
    """Lowest finite error at this NFE, and its method (NaN rows, e.g. diverged, never win)."""
    cands = [(v[nfe][0], k) for k, v in rows.items() if nfe in v and np.isfinite(v[nfe][0])]
    return min(cands) if cands else (np.nan, "-")


def markdown(rows, nfes):
    lines = ["| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for k, v in rows.items():
        cells = [f"{v[n][0]:.2e}" if n in v else "" for n in nfes]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows, nfes):
    ours = {k: v for k, v in rows.items() if not k.startswith("diffusers")}
    theirs = {k: v for k, v in rows.items() if k.startswith("diffusers")}
    out = ["| NFE | jaxdiff best | error | diffusers best | error | ratio |",
           "|---|---|---|---|---|---|"]
    for n in nfes:
        eo, ko = _best(ours, n)
        et, kt = _best(theirs, n)
        out.append(f"| {n} | {ko} | {eo:.2e} | {kt} | {et:.2e} | {eo / et:.3f} |")
    return "\n".join(out)


def _envelope(rows, nfes):
    """Best finite error per NFE over a set of rows."""
    return [min((v[n][0] for v in rows.values() if n in v and np.isfinite(v[n][0])),
                default=np.nan) for n in nfes]


def plot(rows, nfes, path):
    """Best error per NFE of: each jaxdiff sampler (over fixed schedules), each fitted-schedule
    sampler, each diffusers scheduler family (over its configs), and the three envelopes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for k, v in rows.items():
        if k.startswith("diffusers"):
            name, kind = k.split()[1], "diffusers"
        elif k.endswith("optimized"):
            name, kind = k.split(" + ")[0], "optimized"
        else:
            name, kind = k.split(" + ")[0], "fixed"
        groups.setdefault(kind, {}).setdefault(name, {})[k] = v
    fig, ax = plt.subplots(figsize=(9, 6))
    styles = {"fixed": ":", "optimized": "-", "diffusers": "--"}
    for kind, families in groups.items():
        for name, sub in families.items():
            ax.loglog(nfes, _envelope(sub, nfes), styles[kind], lw=0.8, alpha=0.5)
        merged = {k: v for sub in families.values() for k, v in sub.items()}
        label = {"fixed": "jaxdiff, fixed schedules (best)", "diffusers": "diffusers (best)",
                 "optimized": "jaxdiff, fitted schedule (best)"}[kind]
        color = {"fixed": "C0", "optimized": "C2", "diffusers": "C3"}[kind]
        ax.loglog(nfes, _envelope(merged, nfes), styles[kind], lw=2.5, marker="o", label=label,
                  color=color)
    ax.set_xlabel("NFE")
    ax.set_ylabel("RMS error vs reference ODE solution")
    ax.set_title("8-D Gaussian mixture, DDPM linear process (thin: one line per method family)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


PROCESS = None


def main():
    global PROCESS
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--quick", action="store_true", help="fewer draws, NFE and iterations")
    ap.add_argument("--iters", type=int, default=400)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    nfes = (5, 10) if args.quick else NFES
    n_test, n_cal = (64, 64) if args.quick else (512, 256)
    iters = 60 if args.quick else args.iters
    t0 = time.time()
    PROCESS, model = problem()
    D = denoiser(model, PROCESS, "eps")
    s_max = float(PROCESS.sigma_max)
    scale = float(PROCESS.prior_scale(s_max))
    noise = jax.random.normal(jax.random.key(0), (n_test, 8), jnp.float64)
    noise_cal = jax.random.normal(jax.random.key(1), (n_cal, 8), jnp.float64)
    x_ref, ref_cal = reference(D, noise * scale, s_max), reference(D, noise_cal * scale, s_max)
    rows, best_grids = ours_table(D, noise * scale, x_ref, nfes)
    opt_rows, grids = optimized_table(D, noise_cal * scale, ref_cal, noise * scale, x_ref,
                                      best_grids, [n for n in nfes if n <= 20], iters)
    rows.update(opt_rows)
    rows.update(diffusers_table(model, noise, x_ref, nfes))
    text = (f"## Sampler error on an 8-D Gaussian mixture (RMS vs reference, {n_test} draws)\n\n"
            + summary(rows, nfes) + "\n\n" + markdown(rows, nfes) + "\n")
    print(text)
    print(f"total time {time.time() - t0:.0f} s")
    with open(os.path.join(args.out, "samplers_gmm.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "samplers_gmm.json"), "w") as f:
        json.dump({"rows": rows, "optimized_grids": grids}, f, indent=1)
    plot(rows, nfes, os.path.join(args.out, "samplers_gmm.png"))


if __name__ == "__main__":
    main()
