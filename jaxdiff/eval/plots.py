"""Tables and figures of evaluation results: quality-vs-NFE sweeps and training curves.

Figures use matplotlib (imported on first use, Agg backend, no display needed).
"""

from __future__ import annotations

import json
import math
import os

from jaxdiff import images

METRIC_NAMES = {"fd": "FD", "precision": "precision", "recall": "recall", "bpd": "bits/dim"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sweep_markdown(rows, *, metric="fd"):
    """A markdown table, one row per sampler, one column per step count, cells `metric (NFE)`.

    rows: dicts with keys sampler, steps, nfe and `metric`, as the sweep writes them."""
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    steps = sorted({r["steps"] for r in rows})
    cell = {(r["sampler"], r["steps"]): r for r in rows}
    name = METRIC_NAMES.get(metric, metric)
    lines = ["| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    for sampler in samplers:
        cells = []
        for s in steps:
            r = cell.get((sampler, s))
            cells.append("" if r is None else f"{r[metric]:.3g} ({r['nfe']})")
        lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nCells: {name} (NFE, model evaluations per sample).\n"


def plot_sweep(rows, path, *, metric="fd", title=None, floor=None):
    """`metric` against NFE (log axis), one line per sampler, written to `path` (PNG); `floor`
    (e.g. the FD of real data to real data) is drawn as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r["nfe"], r[metric]) for r in rows if r["sampler"] == sampler)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sampler)
    if floor is not None:
        ax.axhline(floor, color="k", linestyle="--", linewidth=1, label="real data")
    ax.set_xscale("log")
    if metric == "fd" and all(r[metric] > 0 for r in rows):
        ax.set_yscale("log")
    ax.set_xlabel("NFE (model evaluations per sample)")
    ax.set_ylabel(METRIC_NAMES.get(metric, metric))
    ax.set_title(title or f"{METRIC_NAMES.get(metric, metric)} vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def read_metrics_log(path):
    """Rows of a run's metrics.jsonl by step; a resumed run's repeated steps keep the last."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no training log {path}; train first with "
                                "jaxdiff train --config ... --workdir ...")
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_step[int(row["step"])] = row
    if not by_step:
        raise ValueError(f"{path} holds no logged steps yet")
    return [by_step[s] for s in sorted(by_step)]


def plot_training(rows, path, *, title=None):
    """One panel per logged scalar (loss, grad_norm, lr, ...) against step, to `path` (PNG)."""
    plt = _pyplot()
    keys = [k for k in rows[0] if k != "step"]
    cols = min(2, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3 * nrows), dpi=100, squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes.flat, keys):
        ax.plot(steps, [r.get(key, math.nan) for r in rows])
        ax.set_title(key)
        ax.set_xlabel("step")
        if key == "loss" and all(r.get(key, 1) > 0 for r in rows):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    _save(fig, path)


def _save(fig, path):
    fig.tight_layout()
    images.write_atomically(path, fig.savefig)
    import matplotlib.pyplot as plt

    plt.close(fig)
