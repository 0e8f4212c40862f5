"""`jaxdiff quantize`: post-training quantization (`jaxdiff.accel.quant`, on qwix) of a trained
run's EMA network, written as a quantized checkpoint (`jaxdiff.accel.quant_ckpt`).

    jaxdiff quantize --workdir RUN --scheme w8a8 [--calibration dynamic|static|timestep]
                     [--groups 4] [--calib 256] [--keep default|none] [--keep_weights fp32|int8]
                     [--act_range 2.0] [--split] [--lowrank R [--smooth 0.5]] [--seed 1000]
                     [--out DIR]

Schemes: w8a8, w4a8, w4a16, w8a16, fp8, w4a4, bf16. Calibration: dynamic (the default: activation
scales computed at every call, nothing sampled), static (one scale per op) or timestep (--groups
sets of scales, default 4, each from the calls of neighbouring noise levels, selected by the
noise level while sampling). static and timestep sample --calib draws (default 256) as
`jaxdiff sample` does (the run's sampler, steps, schedule and guidance; class-conditional
models: classes cycled, under CFG the network sees the 2N rows of [x; x]) from noise seed
--seed (default 1000, apart from sampling's default 0), and record every network call. --keep
default keeps the sensitive layers (time / label / patch embeddings, first and last layers,
modulation projections) in float (--keep_weights int8: their dense weights in int8); none
quantizes them too. --split (UNet): Q-Diffusion's split shortcut. --lowrank R: SVDQuant's
float rank-R branch on every quantized dense layer after SmoothQuant smoothing (migration
strength --smooth; dynamic activation scales; records --calib draws for the smoothing
statistics). Default --out: RUN/quantized/<scheme>-<calibration>[<groups>][-svd<R>]; an
existing one is replaced atomically. Then:

    jaxdiff sample --workdir RUN --quantized DIR    (and jaxdiff eval --quantized DIR)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

USAGE = __doc__.split("\n\n")[1]
EXAMPLE = ("example:\n  jaxdiff quantize --workdir runs/digits --scheme w8a8 --calibration "
           "timestep --groups 4 --calib 256\n  jaxdiff sample --workdir runs/digits --quantized "
           "runs/digits/quantized/w8a8-timestep4")
KEEP = ("default", "none")
TIMESTEP_GROUPS = 4  # --groups' default under --calibration timestep


class _UsageError(Exception):
    """A bad flag (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def parser():
    ap = _Parser(prog="jaxdiff quantize",
                 usage="jaxdiff quantize --workdir RUN --scheme NAME [flags]",
                 description="post-training quantization of a trained run's EMA network into "
                             "a quantized checkpoint (jaxdiff.accel.quant, on qwix)",
                 epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", metavar="RUN", required=True, help="a trained run")
    ap.add_argument("--scheme", metavar="NAME", required=True,
                    help="w8a8, w4a8, w4a16, w8a16, fp8, w4a4 or bf16")
    ap.add_argument("--calibration", metavar="NAME", default="dynamic",
                    help="dynamic (default), static or timestep")
    ap.add_argument("--groups", metavar="G", type=int, default=None,
                    help=f"timestep: noise-level groups (default {TIMESTEP_GROUPS})")
    ap.add_argument("--calib", metavar="N", type=int, default=256,
                    help="static, timestep: calibration draws (default 256)")
    ap.add_argument("--keep", metavar="WHICH", default="default",
                    help="default: sensitive layers stay in float; none: quantize them too")
    ap.add_argument("--keep_weights", metavar="PREC", default="fp32",
                    help="fp32: the kept layers stay float; int8: their dense weights int8 "
                         "(weight-only), so a 4-bit scheme shrinks the whole model")
    ap.add_argument("--act_range", metavar="R", type=float, default=None,
                    help="static, timestep: activation range = R x the calibration rows' mean "
                         "absmax (default: quant.ACT_RANGE, 2; 1 is qwix's own, which clips)")
    ap.add_argument("--lowrank", metavar="R", type=int, default=0,
                    help="SVDQuant: a float rank-R branch on each quantized dense layer, after "
                         "smoothing its input (dynamic calibration; default 0: none)")
    ap.add_argument("--smooth", metavar="A", type=float, default=0.5,
                    help="--lowrank: SmoothQuant's migration strength in [0, 1] (default 0.5)")
    ap.add_argument("--split", action="store_true",
                    help="UNet: Q-Diffusion's split shortcut (the decoder's [h; skip] inputs "
                         "get two activation scales)")
    ap.add_argument("--seed", metavar="N", type=int, default=1000,
                    help="noise seed of the calibration draws (default 1000)")
    ap.add_argument("--out", metavar="DIR", default=None,
                    help="the directory to write (default RUN/quantized/<scheme>-<calibration>"
                         "[<groups>])")
    return ap


def main(argv):
    """argv: the arguments after `quantize`. Returns the exit status: 2 for bad flags, 1 for
    what the run or the settings refuse."""
    try:
        args = parser().parse_args(argv)
        check_flags(args)
    except _UsageError as e:
        print(f"jaxdiff quantize: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax reports every save at INFO
    try:
        quantize(args)
    except (ValueError, OSError) as e:
        print(f"jaxdiff quantize: error: {_first_line(e)}", file=sys.stderr)
        return 1
    return 0


def _first_line(e):
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def check_flags(args):
    """The flags' names and ranges (_UsageError: exit 2); their combinations are checked by
    `quant.check_scheme` in `quantize` (exit 1)."""
    from jaxdiff.accel import quant

    for flag, check in (("scheme", lambda: quant.check_scheme(args.scheme)),
                        ("calibration", lambda: quant.check_scheme("w8a8", args.calibration))):
        try:
            check()
        except ValueError as e:
            raise _UsageError(f"--{flag}={getattr(args, flag)}: {_first_line(e)}") from None
    if args.groups is not None and args.groups < 1:
        raise _UsageError(f"--groups={args.groups} must be an integer >= 1")
    if args.calib < 1:
        raise _UsageError(f"--calib={args.calib} must be a positive number of draws")
    if args.keep not in KEEP:
        raise _UsageError(f"--keep={args.keep} is unknown; allowed: {', '.join(KEEP)}")
    if args.keep_weights not in ("fp32", "int8"):
        raise _UsageError(f"--keep_weights={args.keep_weights} is unknown; allowed: fp32, int8")
    if args.act_range is not None and not (math.isfinite(args.act_range)
                                           and args.act_range > 0):
        raise _UsageError(f"--act_range={args.act_range} must be a finite number > 0")
    if args.lowrank < 0:
        raise _UsageError(f"--lowrank={args.lowrank} must be an integer >= 0 (0: none)")
    if not 0 <= args.smooth <= 1:
        raise _UsageError(f"--smooth={args.smooth} must be in [0, 1]")
    if not 0 <= args.seed < 2**63 - 1:
        raise _UsageError(f"--seed={args.seed} must be an integer in [0, 2**63 - 1)")
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        raise _UsageError(f"--workdir={args.workdir} is a file; expected a trained run")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise _UsageError(f"--out={args.out} is a file; expected a directory to write")


def _run_config(workdir):
    from ml_collections import ConfigDict

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"no trained run in {workdir} ({path} is missing); train first with: "
                         "jaxdiff train --config ... --workdir ...")
    try:
        with open(path, encoding="utf-8") as f:
            return ConfigDict(json.load(f))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({_first_line(e)})") from None


def _bytes(n):
    return f"{n / 1e6:.3g} MB" if n >= 1e6 else f"{n / 1e3:.3g} kB"


def quantize(args):
    """Restores the run's EMA params, calibrates, quantizes, writes the checkpoint; returns its
    directory."""
    config = _run_config(args.workdir)
    groups = args.groups if args.groups is not None else (
        TIMESTEP_GROUPS if args.calibration == "timestep" else 1)
    from jaxdiff.accel import quant

    quant.check_scheme(args.scheme, args.calibration, groups)  # combinations: exit 1
    if args.lowrank:
        quant.check_lowrank(args.scheme, args.calibration, args.lowrank, args.smooth)
    import numpy as np

    from jaxdiff.accel import quant_ckpt
    from jaxdiff.cli import build, commands
    from jaxdiff.train import parallel

    keep = quant.KEEP if args.keep == "default" else None
    mesh = parallel.make_mesh()
    model, process, params, step = commands.restore(config, args.workdir, mesh)
    shape = tuple(build.data_info(config)["shape"])
    K = commands.classes(config)
    example = (np.zeros((1,) + shape, np.float32), np.zeros(1, np.float32),
               *((np.zeros(1, np.int32),) if K else ()))
    s = config.sampler
    if args.calibration == "dynamic" and not args.lowrank:  # no statistics: one input (shapes)
        inputs, calls = (example[0][None], example[1][None], tuple(a[None] for a in example[2:])), 0
    else:
        inputs = _record(config, model, process, params, mesh, num=args.calib, seed=args.seed,
                         calibration=args.calibration, shape=shape)
        calls = len(inputs[0])
        guidance = f", guidance {s.guidance}" if K else ""
        print(f"calibration: {args.calib} draws x {calls} network calls ({s.name}, {s.steps} "
              f"steps{guidance}; seed {args.seed})")
    act_range = quant.ACT_RANGE if args.act_range is None else args.act_range
    q = quant.quantize(model, {"params": params}, args.scheme, calibration=args.calibration,
                       inputs=inputs, groups=groups, keep=keep,
                       keep_weights=args.keep_weights, split=args.split,
                       act_range=act_range, lowrank=args.lowrank, smooth=args.smooth)
    name = commands.quantized_name(args.scheme, args.calibration, groups, args.lowrank)
    out = args.out or os.path.join(args.workdir, "quantized", name)
    float_bytes = quant.param_bytes(params)
    meta = {"run": os.path.abspath(args.workdir), "step": step,
            "model": build.description(config)["model"], "data": config.data.name,
            "float_param_bytes": float_bytes, "calibration_draws": args.calib if calls else 0,
            "calibration_calls": calls, "calibration_seed": args.seed if calls else None,
            "sampler": {"name": s.name, "steps": s.steps, "schedule": s.schedule,
                        "guidance": s.get("guidance")}}
    info = quant_ckpt.save_quantized(out, q, example=example, meta=meta, keep=keep,
                                     keep_weights=args.keep_weights, act_range=act_range)
    disk = quant_ckpt.disk_bytes(out)
    qbytes = info["param_bytes"]
    print(f"parameters: {_bytes(float_bytes)} float32 -> {_bytes(qbytes)} {name} "
          f"({float_bytes / qbytes:.2f}x smaller; keep: {args.keep}); on disk {_bytes(disk)}")
    print(f"wrote {out} (step {step}); sample with: jaxdiff sample --workdir {args.workdir} "
          f"--quantized {out}")
    return out


def _record(config, model, process, params, mesh, *, num, seed, calibration, shape):
    """The calibration inputs: every network call of `num` draws sampled as `jaxdiff sample`
    samples (`commands.draw_with_cost`, no feature cache), `quant.recorded`'s (xs, ts, args)."""
    import jax

    from jaxdiff.accel import quant
    from jaxdiff.cli import commands
    from jaxdiff.eval import quality

    s = config.sampler
    calls = quality.count_nfe(process, config.loss.prediction, sampler=s.name, steps=s.steps,
                              shape=shape, schedule=s.schedule, options=s.options)
    if calls is None:
        raise ValueError(f"--calibration={calibration} records the sampler's network calls; "
                         f"the run's sampler {s.name!r} is adaptive (no fixed grid); allowed: "
                         "--calibration=dynamic")

    def wrap(net, *ex):
        return quant.record_calls(net, *ex, capacity=calls)

    _, _, state = commands.draw_with_cost(config, model, process, params, num=num, seed=seed,
                                          mesh=mesh, cache="none", wrap=wrap)
    return quant.recorded(jax.device_get(state))
