"""The digits part of `benchmarks/inverse.py`: restorations of held-out 8x8 test digits by
every solver of `jaxdiff.inverse` on the testbed's `digits8_unet` (unconditional: its null
label), scored by PSNR to the truth and by the built-in classifier reading the true digit."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

NUM = 100
SHOWN = 8  # restorations kept for the figure
MEASURE_SEED = 1
# posterior-mean estimates (mean of AVERAGE restorations) on the two headline tasks
AVERAGED_TASKS = ("inpaint:half", "sr:2")
AVERAGED_SOLVERS = [("pigdm", {"data_std": 0.5}), ("dds", {})]
AVERAGED_STEPS, AVERAGE = 30, 8


def _setup():
    import testbed

    from jaxdiff import data as data_lib

    tb = testbed.load("digits8_unet", build=False, log=False)
    it = data_lib.build("digits", "test", batch_size=1, shuffle=False, num_epochs=1,
                        num_threads=1)
    rows = list(it)
    x = np.concatenate([r["x"] for r in rows])[:NUM]
    labels = np.concatenate([r["label"] for r in rows])[:NUM]
    return tb, x, labels


def _measure(task, sigma_y, x):
    from jaxdiff import inverse

    op = inverse.parse_task(task, x.shape[1:3], x.shape[3], sigma_y=sigma_y)
    return op, op.measure(jax.random.key(MEASURE_SEED), jnp.asarray(x))


def _scores(out, x, labels):
    from jaxdiff.eval import digits

    mse = np.mean((np.clip(out, -1, 1) - x) ** 2, axis=(1, 2, 3))
    psnr = 10 * np.log10(4.0 / np.maximum(mse, 1e-12))  # data range [-1, 1]: peak-to-peak 2
    acc = float(np.mean(np.argmax(digits.logits(out), -1) == labels))
    return dict(psnr=float(psnr.mean()), acc=acc)


def _restore(tb, op, y, solver, options, steps, average=1):
    """Restorations of y; with `average` > 1 the mean of that many independent ones (the
    posterior-mean estimate, at `average` times the NFE)."""
    from jaxdiff import inverse
    from jaxdiff.core.guidance import Conditioning

    ys = jnp.repeat(y, average, axis=0)
    null = Conditioning((jnp.full(ys.shape[0], tb.num_classes, jnp.int32),))
    x = np.asarray(inverse.solve(tb.model_fn, ys, op, solver=solver, process=tb.process,
                                 prediction=tb.prediction, steps=steps, key=jax.random.key(0),
                                 guidance=null, **options))
    return x.reshape(y.shape[0], average, *x.shape[1:]).mean(1)


def run(rows, quick, tasks, sigmas, solvers, steps_list):
    """[(task, sigma_y, method, steps, row)] with row = {psnr, acc, nfe, s, shown}."""
    tb, x, labels = _setup()
    if quick:
        x, labels, tasks, sigmas = x[:8], labels[:8], tasks[:1], sigmas[:1]
        solvers, steps_list = solvers[2:3], steps_list[:1]
    out = []
    for task in tasks:
        for sigma_y in sigmas:
            op, y = _measure(task, sigma_y, x)
            base = np.asarray(op.pinv(y) if op.has_pinv else op.adjoint(y))
            out.append((task, sigma_y, "A^+ y", 0, rows.get(
                f"digits {task} {sigma_y} pinv n={len(x)}",
                lambda: dict(_scores(base, x, labels), nfe=0, s=0.0,
                             shown=base[:SHOWN].tolist()))))
            for solver, options in solvers:
                for steps in steps_list:
                    def make(solver=solver, options=options, steps=steps, op=op, y=y):
                        t0 = time.perf_counter()
                        r = _restore(tb, op, y, solver, options, steps)
                        return dict(_scores(r, x, labels), nfe=steps,
                                    s=round(time.perf_counter() - t0, 1),
                                    shown=r[:SHOWN].tolist())
                    name = solver + "".join(f" {k}={v}" for k, v in sorted(options.items()))
                    key = f"digits {task} {sigma_y} {name} steps={steps} n={len(x)}"
                    out.append((task, sigma_y, name, steps, rows.get(key, make)))
            if not quick and sigma_y == 0 and task in AVERAGED_TASKS:
                out += _averaged(rows, tb, op, y, x, labels, task)
    return out


def _averaged(rows, tb, op, y, x, labels, task):
    """The posterior-mean estimates: the mean of AVERAGE restorations of each solver in
    AVERAGED_SOLVERS at AVERAGED_STEPS steps."""
    out = []
    for solver, options in AVERAGED_SOLVERS:
        def make(solver=solver, options=options):
            t0 = time.perf_counter()
            r = _restore(tb, op, y, solver, options, AVERAGED_STEPS, AVERAGE)
            return dict(_scores(r, x, labels), nfe=AVERAGED_STEPS * AVERAGE,
                        s=round(time.perf_counter() - t0, 1), shown=r[:SHOWN].tolist())
        name = f"mean of {AVERAGE} {solver}"
        key = f"digits {task} 0.0 {name} steps={AVERAGED_STEPS} n={len(x)}"
        out.append((task, 0.0, name, AVERAGED_STEPS * AVERAGE, rows.get(key, make)))
    return out


def table(out):
    """Markdown: per task and sigma_y, each method's classifier accuracy / PSNR per NFE."""
    steps = sorted({s for *_, s, _ in out if s})
    lines = ["| task | sigma_y | method | " + " | ".join(f"NFE {s}" for s in steps) + " |",
             "|---|---:|---|" + "---:|" * len(steps)]
    seen = {}
    for task, sy, name, s, r in out:
        seen.setdefault((task, sy, name), {})[s] = r
    for (task, sy, name), by in seen.items():
        cells = ([f"{by[0]['acc']:.2f} / {by[0]['psnr']:.1f} dB"] + [""] * (len(steps) - 1)
                 if 0 in by else [f"{by[s]['acc']:.2f} / {by[s]['psnr']:.1f} dB" if s in by
                                  else "" for s in steps])
        lines.append(f"| {task} | {sy} | {name} | " + " | ".join(cells) + " |")
    return ("cells: share read as the true digit / mean PSNR; A^+ y: the measurement "
            "back-projected (no prior)\n\n" + "\n".join(lines))


def figure(out, rows, path):
    """Per task (sigma_y = 0): the truth, A^+ y, and each solver at its largest NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, x, _ = _setup()
    tasks = list(dict.fromkeys(t for t, *_ in out))
    top = max(s for *_, name, s, _ in out if not name.startswith("mean of"))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 4.2))
    for ax, task in zip(np.atleast_1d(axes), tasks):
        picks = [("truth", x[:SHOWN])] + [
            (name if s == 0 or name.startswith("mean of") else f"{name.split(' ')[0]} {s}",
             np.asarray(r["shown"]))
            for t, sy, name, s, r in out
            if t == task and sy == 0 and (s in (0, top) or name.startswith("mean of"))]
        grid = np.concatenate([np.concatenate(list(im[..., 0]), 1) for _, im in picks], 0)
        ax.imshow(np.clip(grid, -1, 1), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_yticks(np.arange(len(picks)) * x.shape[1] + x.shape[1] / 2)
        ax.set_yticklabels([n for n, _ in picks], fontsize=7)
        ax.set_xticks([])
        ax.set_title(task, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.abspath(path)
