"""Tables and figures of evaluation results: quality-vs-NFE sweeps and training curves.

Figures use matplotlib (imported on first use, Agg backend, no display needed).
"""

from __future__ import annotations

import json
import math
import os
import warnings

from jaxdiff.eval import images

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


def plot_sweep(rows, path, *, metric="fd", title=None, real=None):
    """`metric` against NFE (log axis), one line per sampler, written to `path` (PNG); `real`,
    (value, spread) of real data at the same sample count (e.g. `fd_real`, `fd_real_std`), is
    drawn as a dashed line in a band of ± spread."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r["nfe"], r[metric]) for r in rows if r["sampler"] == sampler)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sampler)
    if real is not None:
        value, spread = real
        ax.axhline(value, color="k", linestyle="--", linewidth=1,
                   label="real data, same count ± spread")
        ax.axhspan(max(value - spread, value / 2), value + spread, color="k", alpha=0.1,
                   linewidth=0)
    ax.set_xscale("log")
    if metric == "fd" and all(r[metric] > 0 for r in rows):
        ax.set_yscale("log")
    ax.set_xlabel("NFE (model evaluations per sample)")
    ax.set_ylabel(METRIC_NAMES.get(metric, metric))
    ax.set_title(title or f"{METRIC_NAMES.get(metric, metric)} vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def read_metrics_log(path, *, warn=None):
    """Rows of a run's metrics.jsonl by step; a resumed run's repeated steps keep the last.

    Damaged lines (a half-written last line after a kill, garbled bytes: anything but a JSON
    object of numbers with an integer "step") are skipped, and `warn` (default:
    `warnings.warn`) gets one line naming them; with no readable row left, a ValueError names
    the file and the first damaged line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no training log {path}")
    by_step, damaged = {}, []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                row, why = _metrics_row(line)
                if row is None:
                    damaged.append((number, why))
                else:
                    by_step[int(row["step"])] = row
    if damaged and not by_step:
        number, why = damaged[0]
        raise ValueError(f"{path}, line {number}: {why}; the log holds no readable step")
    if not by_step:
        raise ValueError(f"{path} holds no logged steps yet")
    if damaged:
        lines = ", ".join(str(n) for n, _ in damaged[:5]) + (", ..." if len(damaged) > 5 else "")
        s = "s" if len(damaged) > 1 else ""
        message = (f"{path}: skipped {len(damaged)} damaged line{s} ({lines}; first: "
                   f"{damaged[0][1]})")
        (warn or warnings.warn)(message)
    return [by_step[s] for s in sorted(by_step)]


def _metrics_row(line):
    """(row, None) for a line of metrics.jsonl, or (None, why it is no row). A line that a
    killed run left half-written and a resumed run appended to keeps the appended row."""
    row, why = _parse_row(line)
    start = line.rfind('{"step"')
    if row is None and start > 0:
        tail, _ = _parse_row(line[start:])
        if tail is not None:
            return tail, None
    return row, why


def _parse_row(text):
    try:
        row = json.loads(text)
    except ValueError as e:
        return None, f"not JSON ({e})"
    if not isinstance(row, dict) or "step" not in row:
        return None, "not a JSON object with a step"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row.values()):
        return None, "not all values are numbers"
    if not math.isfinite(row["step"]) or row["step"] != int(row["step"]):
        return None, f"step {row['step']} is not an integer"
    return row, None


def plot_training(rows, path, *, title=None):
    """One panel per logged scalar (loss, grad_norm, lr, ...) against step, to `path` (PNG)."""
    plt = _pyplot()
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "step"))
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
