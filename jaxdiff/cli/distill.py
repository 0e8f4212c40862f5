"""`jaxdiff distill`: a trained run (the teacher) into a few-step student run
(`jaxdiff.cli.distill_stages`), stage by stage through the normal training loop.

    jaxdiff distill --teacher RUN --method progressive|guided|cd|ct|reflow --workdir DIR
                    [--config.distill.KEY=VALUE] [--config.train.steps=N] [--config.KEY=VALUE]

The student's config is the teacher's config.json plus a `distill` section
(distill_stages.DEFAULTS: teacher_steps, student_steps, guidance, guidance_range, levels,
ode, distance, s0, s1, init, pairs, pair_sampler, pair_steps, sigma_min) and the teacher's
record (run, step, sha256 of its params). train.steps is the length of each stage (each
progressive round, guided stage 1, the consistency run, reflow). The same command again resumes
after a kill; then:

    jaxdiff sample --workdir DIR [--guidance W (guided students)]    (and jaxdiff eval)
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys

EXAMPLE = ("example:\n  jaxdiff distill --teacher runs/digits --method progressive --workdir "
           "runs/digits-pd \\\n      --config.distill.teacher_steps=32 "
           "--config.distill.student_steps=4 --config.train.steps=600\n"
           "  jaxdiff sample --workdir runs/digits-pd --out pd4.png")
METHODS = ("progressive", "guided", "cd", "ct", "reflow")


class _UsageError(Exception):
    """A bad flag (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def parser():
    ap = _Parser(prog="jaxdiff distill",
                 usage="jaxdiff distill --teacher RUN --method NAME --workdir DIR "
                       "[--config.KEY=VALUE ...]",
                 description="distil a trained run into a few-step student (jaxdiff.distill)",
                 epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", metavar="RUN", required=True, help="a trained run")
    ap.add_argument("--method", metavar="NAME", required=True, help=", ".join(METHODS))
    ap.add_argument("--workdir", metavar="DIR", required=True, help="the student's run")
    return ap


def parse(argv):
    """(args, overrides [(dotted key, raw value)]) or _UsageError."""
    flags, overrides, rest = [], [], list(argv)
    while rest:
        a = rest.pop(0)
        if a.startswith("--config."):
            key, eq, value = a[len("--config."):].partition("=")
            if not eq:
                if not rest:
                    raise _UsageError(f"{a} needs a value (--config.KEY=VALUE)")
                value = rest.pop(0)
            overrides.append((key, value))
        else:
            flags.append(a)
    args = parser().parse_args(flags)
    if args.method not in METHODS:
        raise _UsageError(f"--method={args.method} is unknown; allowed: {', '.join(METHODS)}")
    if os.path.realpath(args.teacher) == os.path.realpath(args.workdir):
        raise _UsageError(f"--workdir={args.workdir} is the teacher's run; give the student "
                          "its own directory")
    return args, overrides


def main(argv):
    """argv: the arguments after `distill`. Exit status: 2 bad flags, 1 refused, 0 done."""
    try:
        args, overrides = parse(argv)
    except _UsageError as e:
        print(f"jaxdiff distill: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    try:
        distill(args, overrides)
    except (ValueError, OSError, TypeError, KeyError) as e:
        print(f"jaxdiff distill: error: {_first_line(e)}", file=sys.stderr)
        return 1
    return 0


def _first_line(e):
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def teacher_config(run):
    """The teacher run's config.json as a dict; one line when there is none."""
    path = os.path.join(run, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--teacher={run} is not a trained run ({path} is missing); train it "
                         "first: jaxdiff train --config ... --workdir " + run) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({_first_line(e)})") from None
    if not isinstance(config, dict) or "distill" in config:
        raise ValueError(f"--teacher={run} is a distilled student or no run config; distil "
                         "from a run jaxdiff train wrote")
    return config


def apply_overrides(config, overrides):
    """--config.KEY=VALUE onto the ConfigDict (values read as Python literals, else strings);
    one line for a key that does not exist or a value of the wrong type."""
    for key, raw in overrides:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, name = key.split(".")
        node = config
        for p in parents:
            if p not in node:
                raise ValueError(f"--config.{key}: no section {p!r} in the student's config")
            node = node[p]
        if name not in node:
            raise ValueError(f"--config.{key} is not a config key; allowed in "
                             f"{'.'.join(parents) or 'the config'}: {', '.join(node)}")
        try:
            if isinstance(value, list):
                value = tuple(value) if isinstance(node[name], tuple) else value
            node[name] = value
        except (TypeError, ValueError) as e:
            raise ValueError(f"--config.{key}={raw}: {_first_line(e)}") from None


def distill(args, overrides):
    from jaxdiff.cli import build, commands
    from jaxdiff.cli import distill_stages as run
    from jaxdiff.distill import teacher_record

    tcfg = teacher_config(args.teacher)
    config = run.student_config(tcfg, args.method)
    apply_overrides(config, overrides)
    run.check(config)
    from ml_collections import ConfigDict

    teacher = ConfigDict(tcfg)
    _, _, params, step = commands.restore(teacher, args.teacher, build.mesh(teacher))
    record = teacher_record(args.teacher, step, params)
    print(f"jaxdiff distill: {args.method} from {args.teacher} step {step} "
          f"(params sha256 {record['params_sha256'][:12]}) into {args.workdir}",
          file=sys.stderr, flush=True)
    run.distill(config, args.workdir, teacher_params=params, record=record)
    s = config.sampler
    print(f"jaxdiff distill: done; the student samples with {s.name} at {s.steps} steps: "
          f"jaxdiff sample --workdir {args.workdir}")
