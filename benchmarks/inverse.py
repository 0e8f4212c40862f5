"""Inverse problems on a trained prior: every solver of `jaxdiff.inverse` (and FK/SMC with the
measurement's likelihood as its reward) against an exact posterior, and on digits.

    python benchmarks/inverse.py                 # both parts (~40 min on 2 CPU cores)
    python benchmarks/inverse.py --part gmm      # exact-posterior benchmark only (~10 min)
    python benchmarks/inverse.py --quick         # a smoke run (seconds, own cache files)

Part 1, exact posterior (`_inverse_gmm.py`): a 2-D Gaussian-mixture prior with its exact
denoiser, y = x1 + 0.5 x2 + 0.3 n observed at y = 0, whose posterior is a two-mode mixture in
closed form. Errors of 2000 samples per solver and NFE: posterior-mean error, mixture-weight
error, sliced Wasserstein distance (SW) to 20000 exact samples, against the noise floor (SW of
2000 exact samples). SMC draws one sample per independent run of k particles.

Part 2, digits: the testbed's `digits8_unet` as an unconditional prior (its null label) on the
first 100 held-out test digits (8x8, the data's native size; the 16x16 set is an upsampled copy
on which x2 super-resolution would be an identity problem), tasks inpaint:half (right half
missing), inpaint:box, sr:2 and blur (5x5, std 1), sigma_y in {0, 0.05}: PSNR to the truth and
the share of restorations the built-in digits classifier reads as the true digit, against NFE.

Rows are cached in benchmarks/out/inverse/ (a rerun resumes); tables go to tables.md there,
plots to benchmarks/inverse.png and benchmarks/inverse_digits.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out", "inverse")

GMM_SOLVERS = [("dps", {"zeta": 0.25}), ("dps", {"zeta": 1.0}), ("pigdm", {}), ("ddnm", {}),
               ("dds", {}), ("reddiff", {})]
GMM_STEPS = [10, 25, 50, 100, 200]
SMC_PARTICLES = [1, 4, 16, 64, 256]
SMC_STEPS = 100
SMC_SAMPLERS = ["ddpm", "dpmpp_2m_sde"]
DIGIT_TASKS = ["inpaint:half", "sr:2", "inpaint:box", "blur"]
DIGIT_SIGMAS = [0.0, 0.05]
DIGIT_SOLVERS = [("dps", {"zeta": 1.0}), ("pigdm", {"data_std": 0.5}), ("ddnm", {}), ("dds", {}),
                 ("reddiff", {})]
DIGIT_STEPS = [10, 30, 100]


class Rows:
    """A JSON file of result rows keyed by name: a killed run resumes where it stopped."""

    def __init__(self, path):
        self.path = path
        self.rows = json.load(open(path)) if os.path.exists(path) else {}

    def get(self, key, make):
        if key not in self.rows:
            self.rows[key] = make()
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.rows, f, indent=1)
            os.replace(tmp, self.path)  # atomic: a kill never leaves half a file
        return self.rows[key]


def label(name, options):
    return name + "".join(f" {k}={v}" for k, v in sorted(options.items()))


def gmm_part(rows, quick):
    import _inverse_gmm as g

    n = 200 if quick else 2000
    ref = g.exact_samples(2000 if quick else g.REFERENCE, 1)
    floor = rows.get(f"gmm floor20 n={n}", lambda: g.floor(n, ref, draws=5 if quick else 20))
    out = []
    for name, options in GMM_SOLVERS[: 2 if quick else None]:
        for steps in GMM_STEPS[:1] if quick else GMM_STEPS:
            def make(name=name, options=options, steps=steps):
                t0 = time.perf_counter()
                x = g.run_solver(name, steps, n, **options)
                return dict(g.errors(x, ref), nfe=steps, s=round(time.perf_counter() - t0, 1))
            out.append((label(name, options), rows.get(
                f"gmm {label(name, options)} steps={steps} n={n}", make)))
    steps = 10 if quick else SMC_STEPS
    for sampler in SMC_SAMPLERS[:1] if quick else SMC_SAMPLERS:
        for k in SMC_PARTICLES[:2] if quick else SMC_PARTICLES:
            def make(k=k, sampler=sampler):
                t0 = time.perf_counter()
                x = g.run_smc(k, steps, n, sampler=sampler)
                return dict(g.errors(x, ref), nfe=steps * k,
                            s=round(time.perf_counter() - t0, 1))
            tag = "" if sampler == "ddpm" else f" sampler={sampler}"
            out.append((f"smc{tag} k={k}", rows.get(f"gmm smc k={k} steps={steps} n={n}{tag}",
                                                     make)))
    return out, floor, n


def prior_errors(rows, quick):
    """SW of each SMC base sampler's unsteered draws to the exact PRIOR, and the floor: the
    sampler's own discretisation error, which SMC inherits (it targets the tilt of what the
    sampler draws)."""
    import _inverse_gmm as g

    from jaxdiff.eval import metrics

    n, steps = (200, 10) if quick else (2000, SMC_STEPS)
    ref = g.exact_prior(2000 if quick else g.REFERENCE, 1)
    out = {"floor": rows.get(f"gmm prior floor n={n}", lambda: float(np.mean(
        [metrics.sliced_wasserstein(g.exact_prior(n, 100 + i), ref) for i in range(5)])))}
    for sampler in SMC_SAMPLERS:
        out[sampler] = rows.get(f"gmm prior {sampler} steps={steps} n={n}", lambda s=sampler: float(
            metrics.sliced_wasserstein(g.run_prior(s, steps, n), ref)))
    return out


def gmm_table(out, floor, n):
    lines = [f"SW noise floor ({n} exact samples against the reference, 20 draws): mean "
             f"{floor['mean']:.4f}, sd {floor['sd']:.4f}, range {floor['min']:.4f}.."
             f"{floor['max']:.4f}", "",
             "| method | NFE / sample | posterior-mean error | weight TV | SW | SW / floor |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in out:
        lines.append(f"| {name} | {r['nfe']} | {r['mean_err']:.3f} | {r['weight_tv']:.3f} | "
                     f"{r['sw']:.4f} | {r['sw'] / floor['mean']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="all", choices=("gmm", "digits", "all"))
    ap.add_argument("--quick", action="store_true", help="a smoke run with its own cache files")
    args = ap.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    tables = []
    if args.part in ("gmm", "all"):
        rows = Rows(os.path.join(OUT, f"gmm{suffix}.json"))
        out, floor, n = gmm_part(rows, args.quick)
        prior = prior_errors(rows, args.quick)
        tables.append("## Exact posterior (2-D mixture)\n\n" + gmm_table(out, floor, n) + (
            "\n\nSMC's base samplers against the exact prior (no reward), SW: " + ", ".join(
                f"{k} {v:.4f}" for k, v in prior.items())))
        if not args.quick:
            import _inverse_plots
            _inverse_plots.gmm_figure(out, floor, os.path.join(HERE, "inverse.png"))
    if args.part in ("digits", "all"):
        import _inverse_digits as d

        rows = Rows(os.path.join(OUT, f"digits{suffix}.json"))
        out = d.run(rows, args.quick, DIGIT_TASKS, DIGIT_SIGMAS, DIGIT_SOLVERS, DIGIT_STEPS)
        tables.append("## Digits restoration\n\n" + d.table(out))
        if not args.quick:
            d.figure(out, rows, os.path.join(HERE, "inverse_digits.png"))
    text = "\n\n".join(tables)
    print(text)
    with open(os.path.join(OUT, f"tables{suffix}.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
