"""Figures of `benchmarks/inverse.py`: SW to the exact posterior against NFE, and samples."""

from __future__ import annotations

import collections

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def gmm_figure(out, floor, path):
    """Left: SW against NFE per method (floor and 2x floor dashed); right: samples of the exact
    posterior, SMC at 64 particles, PiGDM and DPS at 100 steps over the prior's contours."""
    import _inverse_gmm as g

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4))
    series = collections.defaultdict(list)
    for name, r in out:
        series[name.split(" k=")[0]].append((r["nfe"], r["sw"]))
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot(*zip(*pts), "o-" if name.startswith("smc") else ".-", label=name)
    ax.axhline(floor["mean"], color="k", ls="--", lw=1, label="noise floor (mean)")
    ax.axhspan(floor["min"], floor["max"], color="gray", alpha=0.15, label="exact draws' range")
    ax.axhline(2 * floor["mean"], color="gray", ls=":", lw=1, label="2x floor")
    ax.set(xscale="log", yscale="log", xlabel="NFE per sample",
           ylabel="sliced W2 to the exact posterior")
    ax.set_title("SMC: k = 1..256 particles at 100 steps of its base sampler", fontsize=9)
    ax.legend(fontsize=7)
    _scatter(bx, g)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scatter(ax, g):
    grid = np.linspace(-3.5, 3.5, 200)
    xx, yy = np.meshgrid(grid, grid)
    pts = np.stack([xx.ravel(), yy.ravel()], -1)
    dens = sum(w * np.exp(-np.sum((pts - m) ** 2, -1) / (2 * s**2)) / s**2
               for w, m, s in zip(g.WEIGHTS, g.MEANS, g.STDS))
    ax.contour(xx, yy, dens.reshape(xx.shape), levels=6, colors="lightgray", linewidths=0.7)
    line = np.linspace(-3.5, 3.5, 2)
    ax.plot(line, (g.Y[0] - g.A[0, 0] * line) / g.A[0, 1], "k:", lw=0.8, label="A x = y")
    shown = [("exact posterior", g.exact_samples(400, 7), "k"),
             ("SMC k=64", g.run_smc(64, 100, 400, seed=3), "tab:red"),
             ("PiGDM 100", g.run_solver("pigdm", 100, 400, seed=3), "tab:green"),
             ("DPS 100 zeta=1", g.run_solver("dps", 100, 400, seed=3, zeta=1.0), "tab:blue")]
    for name, x, c in shown:
        ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.5, color=c, label=name)
    ax.set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), aspect="equal")
    ax.legend(fontsize=7, markerscale=3, loc="lower right")
    ax.set_title("400 samples each; prior contours", fontsize=9)
