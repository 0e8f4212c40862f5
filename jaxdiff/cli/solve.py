"""`jaxdiff solve`: a trained run's EMA network as the prior of an inverse problem
y = A(x0) + sigma_y n, solved training-free (`jaxdiff.inverse`: DPS, PiGDM, DDNM, RED-Diff,
DDS) on measurements or on clean images it measures first.

    jaxdiff solve --workdir RUN --task TASK --input FILE.npz [--solver NAME[:KEY=VALUE,...]]
                  [--steps 100] [--sigma_y 0.0] [--seed 0] [--class K] [--out DIR]

Tasks: inpaint:box, inpaint:half[-left|-right|-top|-bottom], inpaint:random[=KEEP] (its mask
drawn from --seed), sr:FACTOR, blur[:std=STD], gray, saturate[=GAIN]:<task> (nonlinear).
Solvers (default ddnm) and their options (`jaxdiff.inverse.solvers`): dps:zeta,eta;
pigdm:scale,eta,data_std (data_std defaults to an EDM run's process.sigma_data); ddnm:eta;
reddiff:lam,lr,obs_weight; dds:cg_steps,gamma,eta; e.g. --solver dps:zeta=0.5,eta=1.0. ddnm and
pigdm need a pseudo-inverse and dds an adjoint: a linear task (not saturate).

--input: an .npz holding y (N, *y_shape): measurements of this task on the run's images, or x
(N, H, W, C): clean images in the data's range [-1, 1], measured here with the task and
--sigma_y (noise drawn from --seed); with both, x is the truth y was measured from. Optional
labels (N,) for class-conditional models (--class K: K for all; neither: the null label, the
model's unconditional pass; no CFG). --sigma_y is the measurement noise the solver assumes
(and adds when it measures x).

Writes DIR (default RUN/solve/<task>-<solver>; replaced atomically): restorations.npz (x, y,
truth and labels when known), grid.png (rows: the measurement, shown as y or as A^+ y / A^T y
in image space, the restoration, the truth), report.json (task, operator, solver, options,
steps, nfe, sigma_y, psnr (dB, data range 2) when the truth is known, classifier_agreement
where the dataset has a built-in classifier and labels are given, wall_s), and prints one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid

from jaxdiff.cli.steer import parse_spec

USAGE = __doc__.split("\n\n")[1]
EXAMPLE = ("example:\n  jaxdiff solve --workdir runs/digits --task inpaint:box --input x.npz "
           "--solver ddnm --steps 100\n  jaxdiff solve --workdir runs/digits --task sr:2 "
           "--input y.npz --solver dps:zeta=0.5 --sigma_y 0.05 --out restored")
TASK_FORMS = ("inpaint:box", "inpaint:half[-left|-right|-top|-bottom]", "inpaint:random[=KEEP]",
              "sr:FACTOR", "blur[:std=STD]", "gray", "saturate[=GAIN]:<task>")  # = operators.TASKS
_NUM = r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
_TASK = re.compile(rf"(saturate(={_NUM})?:)?(inpaint:(box|half(-(left|right|top|bottom))?|"
                   rf"random(={_NUM})?)|sr:\d+|blur(:std={_NUM})?|gray)")
# what a solver needs of the operator (the rest take any differentiable A)
NEEDS = {"ddnm": "a pseudo-inverse A^+", "pigdm": "a pseudo-inverse A^+ (its Gram solve)",
         "dds": "an adjoint A^T (conjugate gradients)"}
DEFAULT_SOLVER = "ddnm"
GRID_COLUMNS = 16  # at most this many examples in grid.png
PIXEL_RANGE = 2.0  # the data's range [-1, 1], for PSNR


class _UsageError(Exception):
    """A bad flag (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def parser():
    ap = _Parser(prog="jaxdiff solve",
                 usage="jaxdiff solve --workdir RUN --task TASK --input FILE.npz [flags]",
                 description="solve an inverse problem y = A(x0) + noise with a trained run as "
                             "the prior (jaxdiff.inverse: dps, pigdm, ddnm, reddiff, dds)",
                 epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", metavar="RUN", required=True, help="a trained run")
    ap.add_argument("--task", metavar="TASK", required=True,
                    help="the measurement: " + ", ".join(TASK_FORMS))
    ap.add_argument("--input", metavar="FILE.npz", required=True,
                    help="y (measurements) and/or x (clean images in [-1, 1]); labels optional")
    ap.add_argument("--solver", metavar="NAME[:KEY=VALUE,...]", default=DEFAULT_SOLVER,
                    help="dps, pigdm, ddnm, reddiff or dds, with options, e.g. dps:zeta=0.5 "
                         f"(default {DEFAULT_SOLVER}); options: dps:zeta,eta; "
                         "pigdm:scale,eta,data_std; ddnm:eta; reddiff:lam,lr,obs_weight; "
                         "dds:cg_steps,gamma,eta")
    ap.add_argument("--steps", metavar="N", type=int, default=100,
                    help="solver steps, one network call each (default 100)")
    ap.add_argument("--sigma_y", metavar="S", type=float, default=0.0,
                    help="measurement noise std in the data's range (default 0)")
    ap.add_argument("--seed", metavar="N", type=int, default=0,
                    help="seed of the solver's noise, x's measurement noise, a random mask")
    ap.add_argument("--class", dest="label", metavar="K", type=int, default=None,
                    help="class-conditional models: class K for every example")
    ap.add_argument("--out", metavar="DIR", default=None,
                    help="the directory to write (default RUN/solve/<task>-<solver>)")
    return ap


def main(argv):
    """argv: the arguments after `solve`. Returns the exit status: 2 for bad flags and paths,
    1 for what the run, the input or the task refuse."""
    try:
        args = parser().parse_args(argv)
        check_flags(args)
    except _UsageError as e:
        print(f"jaxdiff solve: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax reports every restore at INFO
    try:
        solve(args)
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"jaxdiff solve: error: {_first_line(e)}", file=sys.stderr)
        return 1
    return 0


def _first_line(e):
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def task_dirname(task, solver):
    """'inpaint:random=0.5', 'ddnm' -> 'inpaint_random-0.5-ddnm': a file-name-safe name."""
    safe = re.sub(r"[^A-Za-z0-9.+-]+", "_", task.replace("=", "-")).strip("_")
    return f"{safe}-{solver}"


def check_flags(args):
    """The flags' formats and ranges and the paths (_UsageError: exit 2): a task of a known form,
    a known solver with known options in their ranges (`jaxdiff.inverse` checks them), --steps,
    --sigma_y, --seed, --class, the input file and the output directory."""
    if not _TASK.fullmatch(args.task.strip()):
        raise _UsageError(f"--task={args.task} is unknown; allowed: {', '.join(TASK_FORMS)}")
    args.solver_name, args.options = parse_solver(args.solver)
    if args.steps < 1:
        raise _UsageError(f"--steps={args.steps} must be a positive number of steps")
    if not (math.isfinite(args.sigma_y) and args.sigma_y >= 0):
        raise _UsageError(f"--sigma_y={args.sigma_y} must be a finite number >= 0")
    if not 0 <= args.seed < 2**63 - 1:
        raise _UsageError(f"--seed={args.seed} must be an integer in [0, 2**63 - 1)")
    if args.label is not None and args.label < 0:
        raise _UsageError(f"--class={args.label} must be a class index >= 0")
    if not os.path.isfile(args.input):
        what = "is a directory" if os.path.isdir(args.input) else "no such file"
        raise _UsageError(f"--input={args.input}: {what}; expected an .npz holding y "
                          "(measurements) or x (clean images)")
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        raise _UsageError(f"--workdir={args.workdir} is a file; expected a trained run")
    out = args.out or os.path.join(args.workdir, "solve",
                                   task_dirname(args.task, args.solver_name))
    if os.path.exists(out) and not os.path.isdir(out):
        raise _UsageError(f"--out={out} is a file; expected a directory to write")
    probe = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise _UsageError(f"--out={out}: {probe} is not a writable directory")
    args.out_dir = out


def parse_solver(text):
    """--solver NAME[:KEY=VALUE,...] -> (name, options given), checked by the solver's own
    constructor (imports jax)."""
    import numpy as np

    from jaxdiff.inverse import Inpaint
    from jaxdiff.inverse.solvers import SOLVERS

    kinds = {}
    for name, cls in SOLVERS.items():
        table = {}
        for f in dataclasses.fields(cls):
            if f.name in ("operator", "y"):
                continue
            int_valued = isinstance(f.default, int) and not isinstance(f.default, bool)
            table[f.name] = (int if int_valued else float, f.default, None,
                             "an integer" if int_valued else "a number")
        kinds[name] = table
    try:
        name, given = parse_spec(text, "--solver", kinds, defaults=False)
    except ValueError as e:
        raise _UsageError(_first_line(e)) from None
    try:  # the solver's own range checks, on a stand-in operator
        SOLVERS[name](Inpaint(np.ones((1, 1), np.float32)), np.zeros((1, 1, 1, 1)), **given)
    except (ValueError, TypeError) as e:
        raise _UsageError(f"--solver={text}: {_first_line(e)}") from None
    return name, given


def _run_config(workdir):
    from ml_collections import ConfigDict

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"no trained run in {workdir} ({path} is missing); train first with: "
                         "jaxdiff train --config ... --workdir ...")
    try:
        with open(path, encoding="utf-8") as f:
            config = ConfigDict(json.load(f))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({_first_line(e)})") from None
    data = config.get("data") or {}
    if data.get("latents") or (config.get("model") or {}).get("name") == "autoencoder_kl":
        raise ValueError(f"{workdir} is a latent or autoencoder run: the tasks measure pixels; "
                         "solve with a pixel-space run")
    return config


def _dims(shape):
    return "(" + ", ".join(map(str, shape)) + ")"


def read_input(path, op, shape, num_classes, label):
    """(y or None, x or None, labels or None) of the --input npz, checked against the task's
    operator `op` and the run's per-example `shape`; labels: the npz's, or --class for all."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"--input={path} is not a readable .npz ({_first_line(e)})") from None
    if "y" not in arrays and "x" not in arrays:
        raise ValueError(f"--input={path} holds neither y (measurements) nor x (clean images); "
                         f"it has: {', '.join(arrays) or 'nothing'}")
    x = arrays.get("x")
    if x is not None:
        x = np.asarray(x, np.float32)
        if x.ndim != len(shape) + 1 or x.shape[1:] != shape or not len(x):
            raise ValueError(f"--input={path}: x has shape {_dims(x.shape)}; this run's images "
                             f"are {_dims(shape)}: allowed (N, {', '.join(map(str, shape))})")
    y = arrays.get("y")
    if y is not None:
        y = np.asarray(y, np.float32)
        want = tuple(op.output_shape(shape))
        if y.ndim != len(want) + 1 or y.shape[1:] != want or not len(y):
            raise ValueError(f"--input={path}: y has shape {_dims(y.shape)}; the task {op.name} "
                             f"on this run's {_dims(shape)} images measures "
                             f"(N, {', '.join(map(str, want))})")
        if x is not None and len(x) != len(y):
            raise ValueError(f"--input={path}: x has {len(x)} examples and y {len(y)}; allowed: "
                             "as many")
    n = len(y if y is not None else x)
    for name, a in (("x", x), ("y", y)):
        if a is not None and not np.all(np.isfinite(a)):
            raise ValueError(f"--input={path}: {name} holds non-finite values (NaN or inf)")
    labels = arrays.get("labels")
    if label is not None or labels is not None:
        if not num_classes:
            what = f"--class={label}" if label is not None else f"--input={path} has labels"
            raise ValueError(f"{what}: this model is unconditional (model.num_classes=0); "
                             "labels need a class-conditional model")
        if label is not None:
            if label >= num_classes:
                raise ValueError(f"--class={label} is not a class of this model; allowed: "
                                 f"0..{num_classes - 1}")
            labels = np.full(n, label, np.int32)
        labels = np.asarray(labels)
        if (labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer)
                or labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"--input={path}: labels must be ({n},) integers in "
                             f"0..{num_classes - 1}; got shape {_dims(labels.shape)} of "
                             f"{labels.dtype}")
        labels = labels.astype(np.int32)
    return y, x, labels


def shown(op, y, shape):
    """The measurement y in image space, for the grid: y itself where shapes match, else A^+ y
    (A^T y for an operator without one; a nonlinear operator's inner linear one)."""
    if tuple(y.shape[1:]) == tuple(shape):
        return y
    if getattr(op, "has_pinv", False):
        return op.pinv(y)
    if getattr(op, "linear", False):
        return op.adjoint(y)
    inner = getattr(op, "inner", None)
    return shown(inner, y, shape) if inner is not None else None


def psnr(x, truth):
    """Per-example PSNR in dB of x against truth, both clipped to the data's range [-1, 1]."""
    import numpy as np

    err = np.mean((np.clip(x, -1, 1) - np.clip(truth, -1, 1)) ** 2,
                  axis=tuple(range(1, x.ndim)))
    return 10 * np.log10(PIXEL_RANGE**2 / np.maximum(err, 1e-20))


def solve(args):
    """Restores the run, solves, writes args.out_dir; returns the report."""
    config = _run_config(args.workdir)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff import inverse
    from jaxdiff import train as train_lib
    from jaxdiff.cli import build, commands
    from jaxdiff.cli.steer import counted
    from jaxdiff.core.guidance import Conditioning
    from jaxdiff.eval import images, quality
    from jaxdiff.train import parallel

    shape = tuple(build.data_info(config)["shape"])
    if len(shape) != 3:
        raise ValueError(f"jaxdiff solve takes image runs (H, W, C); this run's data "
                         f"{config.data.name!r} has per-example shape {_dims(shape)}")
    key = jax.random.key(args.seed)
    try:
        op = inverse.parse_task(args.task.strip(), shape[:2], shape[2],
                                key=jax.random.fold_in(key, 0), sigma_y=args.sigma_y)
    except ValueError as e:
        raise ValueError(f"--task={args.task}: {_first_line(e)}") from None
    name = args.solver_name
    if name in NEEDS and not (op.linear and (op.has_pinv or name == "dds")):
        allowed = ", ".join(s for s in inverse.SOLVERS if s not in NEEDS)
        raise ValueError(f"--solver={name} needs {NEEDS[name]}, a linear task; --task="
                         f"{args.task} ({op.name}) is nonlinear; allowed with it: {allowed}")
    K = commands.classes(config)
    y, truth, labels = read_input(args.input, op, shape, K, args.label)
    measured = y is None
    if measured:
        y = np.asarray(op.measure(jax.random.fold_in(key, 1), jnp.asarray(truth)))
    options = dict(args.options)
    process = build.process(config)
    if name == "pigdm" and "data_std" not in options and hasattr(process, "sigma_data"):
        options["data_std"] = float(process.sigma_data)
    mesh = parallel.make_mesh()
    model, process, params, step = commands.restore(config, args.workdir, mesh)
    guidance = None
    if K:
        cond = jnp.asarray(np.full(len(y), K, np.int32) if labels is None else labels)
        if "distill" in config:  # a student's one-pass conditioning
            from jaxdiff.cli.distill_stages import conditioning

            guidance = conditioning(config, cond)
        else:
            guidance = Conditioning((cond,))
    t0 = time.time()
    x, calls = inverse.solve(counted(train_lib.network(model, params)), jnp.asarray(y), op,
                             solver=name, process=process, prediction=config.loss.prediction,
                             steps=args.steps, key=jax.random.fold_in(key, 2),
                             schedule=config.sampler.schedule, guidance=guidance, **options)
    x = np.asarray(jax.device_get(x))
    wall = time.time() - t0
    if not np.all(np.isfinite(x)):
        raise FloatingPointError(f"--solver={args.solver}: the restorations hold non-finite "
                                 "values; try fewer or smaller steps (e.g. a smaller zeta / lr)")
    used = {f.name: f.default for f in dataclasses.fields(inverse.SOLVERS[name])
            if f.name not in ("operator", "y")}
    used.update(options)  # every option the solver ran with, defaults included
    report = {"task": args.task, "operator": op.name, "solver": name, "options": used,
              "steps": args.steps, "nfe": int(calls), "sigma_y": args.sigma_y,
              "num": int(len(x)), "seed": args.seed, "input": os.path.abspath(args.input),
              "measured_here": measured, "step": step}
    if truth is not None:
        per = psnr(x, truth)
        report.update(psnr=float(np.mean(per)), psnr_per_example=[round(float(p), 3)
                                                                   for p in per])
    agreement = quality.classifier_agreement_fn(config.data.name)
    if agreement is not None and labels is not None:
        report["classifier_agreement"] = float(agreement(x, labels)[0])
    report["wall_s"] = round(wall, 2)
    arrays = dict(x=x, y=y, **({} if truth is None else {"truth": truth}),
                  **({} if labels is None else {"labels": labels}))
    view = shown(op, jnp.asarray(y), shape)
    cols = min(len(x), GRID_COLUMNS)
    rows = [np.asarray(r)[:cols] for r in (view, x, truth) if r is not None]
    _write_dir(args.out_dir, arrays, report, lambda p: images.save_grid(
        p, np.concatenate(rows), cols=cols, scale=4))
    bits = [f"PSNR {report['psnr']:.2f} dB" if "psnr" in report else None,
            f"classifier agreement {report['classifier_agreement']:.3g}"
            if "classifier_agreement" in report else None]
    extra = "".join(f", {b}" for b in bits if b)
    print(f"solve {args.task} with {name}: {len(x)} restorations, {args.steps} steps "
          f"({report['nfe']} NFE each){extra}, {wall:.1f} s; wrote {args.out_dir} "
          f"(step {step})")
    return report


def _write_dir(directory, arrays, report, grid):
    """restorations.npz, grid.png (`grid(path)`) and report.json into a temporary directory
    beside `directory`, renamed to it when complete (one already there is renamed aside first
    and removed after)."""
    import numpy as np

    directory = os.path.abspath(directory)
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 -> what a new directory gets
    old = None
    try:
        np.savez(os.path.join(tmp, "restorations.npz"), **arrays)
        grid(os.path.join(tmp, "grid.png"))
        with open(os.path.join(tmp, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        if os.path.exists(directory):
            old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
            os.rename(directory, old)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
