"""The `jaxdiff` command: reads a config, wires the library together, no math here.

    jaxdiff train  --config configs/digits.py --workdir runs/digits [--config.optim.lr=1e-3]
    jaxdiff sample --workdir runs/digits --sampler dpmpp_2m --steps 20 --num 64 --seed 0
                   [--class 3 --guidance 2.0] --out grid.png
    jaxdiff eval   --workdir runs/digits --metrics fd,pr,nll --sampler heun --steps 18
                   --num 1000 [--features inception --inception_weights pt_inception.pth]
                   [--out report.json]
    jaxdiff eval sweep --workdir runs/digits --samplers ddim,heun,dpmpp_2m --steps 5,10,20,50
                   --num 1000 [--out runs/digits/eval/sweep]      (writes .md, .png, .json)
    jaxdiff plot   --workdir runs/digits [--out curves.png]
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

FLAGS = flags.FLAGS
NUM = {"sample": 64, "eval": 1000}  # default --num per command
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, samples.")
flags.DEFINE_string("sampler", None, "sample/eval: sampler name (default: the config's).")
flags.DEFINE_string("steps", None, "sample/eval: number of sampler steps (default: the "
                    "config's); eval sweep: a list, e.g. 5,10,20,50.")
flags.DEFINE_integer("num", None, f"sample: number of samples (default {NUM['sample']}); eval: "
                     f"samples for fd/pr and at most this many test examples for nll (default "
                     f"{NUM['eval']}).")
flags.DEFINE_integer("seed", 0, "sample/eval: noise seed (eval nll: of the dequantization "
                     "noise and divergence probes).")
flags.DEFINE_integer("class", None, "sample: class label for every sample (default: cycle).")
flags.DEFINE_float("guidance", None, "sample/eval: classifier-free guidance scale (1 = none; "
                   "default: the config's).")
flags.DEFINE_string("out", None, "sample: output PNG (an .npz with the arrays goes beside it); "
                    "eval: the JSON report; eval sweep: path prefix of .md/.png/.json; plot: PNG.")
flags.DEFINE_string("metrics", None, "eval: comma-separated, from fd, pr, nll (default fd,pr).")
flags.DEFINE_string("samplers", None, "eval sweep: comma-separated sampler names.")
flags.DEFINE_string("features", None, "eval: features for fd/pr: digits (default for the digits "
                    "datasets), raw (the data itself; default for 2-D toy sets) or inception "
                    "(default otherwise; needs --inception_weights).")
flags.DEFINE_string("inception_weights", None, "eval: FID Inception-v3 weights, .pth or .npz.")
flags.DEFINE_string("split", "test", "eval: the real data split to compare with.")
flags.DEFINE_string("divergence", "auto", "eval nll: exact, hutchinson, or auto (exact for "
                    "data of at most 16 dimensions).")
flags.DEFINE_bool("distributed", False, "Join a multi-host run: jax.distributed.initialize() "
                  "finds its peers on TPU pods and SLURM clusters.")

COMMANDS = ("train", "sample", "eval", "plot")
METRICS = ("fd", "pr", "nll")


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        got = repr(argv[1]) if len(argv) > 1 else "nothing"
        print(f"jaxdiff: expected a command, one of {', '.join(COMMANDS)}; got {got}",
              file=sys.stderr)
        return 2
    command = argv.pop(1)
    app.define_help_flags()
    try:
        _check_overrides(argv)
        command = _subcommand(command, FLAGS(argv)[1:])
        _check_eval_flags(command)
    except (ValueError, flags.Error) as e:
        print(f"jaxdiff {command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if FLAGS["help"].value or FLAGS["helpfull"].value:
        print(__doc__ + "\n" + FLAGS.main_module_help())
        return 0
    _run(command)
    return 0


def _flag_value(argv, name):
    """The flag's value as absl reads it: the last occurrence wins."""
    value = None
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _check_overrides(argv):
    """Names an unknown `--config.a.b=...` key and the valid keys where it went wrong."""
    keys = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
    path = _flag_value(argv, "config")
    if not keys or path is None:
        return
    if not os.path.exists(path):
        raise ValueError(f"--config={path}: no such file")
    node = _load_config(path)
    for key in keys:
        node_k, parts = node, key.split(".")
        for i, part in enumerate(parts):
            if not hasattr(node_k, "keys") or part not in node_k:
                where = ".".join(parts[:i]) or "the config"
                valid = ", ".join(sorted(node_k.keys())) if hasattr(node_k, "keys") else "none"
                raise ValueError(f"unknown config key {key!r}: valid keys in {where}: {valid}")
            node_k = node_k[part]


def _load_config(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("jaxdiff_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _run(command):
    from jaxdiff.cli import commands as run  # heavy imports only once the flags are valid

    logging.set_verbosity(logging.WARNING)  # orbax reports every save at INFO
    _init_distributed()
    try:
        if command == "train":
            if FLAGS.config is None or FLAGS.workdir is None:
                raise ValueError("train needs --config=<file> and --workdir=<dir>")
            run.train(FLAGS.config, FLAGS.workdir)
        elif command == "sample":
            _sample(run)
        else:
            _eval(command)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"jaxdiff {command}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # device out of memory: one line naming the knobs, else re-raise
        from jaxdiff import faults

        message = faults.oom_message(e, faults.memory_hints(FLAGS.config))
        if message is None:
            raise
        print(f"jaxdiff {command}: error: {message}", file=sys.stderr)
        sys.exit(1)


def _init_distributed():
    """Joins a multi-process run before any JAX computation. launch/local.sh sets
    JAXDIFF_COORDINATOR / JAXDIFF_NUM_PROCESSES / JAXDIFF_PROCESS_ID (CPU processes talk over
    gloo); with --distributed, jax.distributed.initialize() reads the cluster's environment."""
    import jax

    coordinator = os.environ.get("JAXDIFF_COORDINATOR")
    if coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, int(os.environ["JAXDIFF_NUM_PROCESSES"]),
                                   int(os.environ["JAXDIFF_PROCESS_ID"]))
    elif FLAGS.distributed:
        jax.distributed.initialize()


def _sample(run):
    if FLAGS.workdir is None:
        raise ValueError("sample needs --workdir=<dir> of a trained run")
    num = NUM["sample"] if FLAGS.num is None else FLAGS.num
    if num <= 0:
        raise ValueError(f"--num={num} must be a positive number of samples")
    config = _run_config("sample")
    out = FLAGS.out or os.path.join(FLAGS.workdir, "samples", f"sample_{int(time.time())}.png")
    steps = None if FLAGS.steps is None else parse_steps(FLAGS.steps, many=False)
    run.sample(config, FLAGS.workdir, out=out, num=num, seed=FLAGS.seed,
               sampler=FLAGS.sampler, steps=steps, label=FLAGS["class"].value,
               guidance=FLAGS.guidance)


def _run_config(command):
    """The config a trained run in --workdir was trained with (its config.json)."""
    if FLAGS.workdir is None:
        raise ValueError(f"{command} needs --workdir=<dir> of a trained run")
    cfg_path = os.path.join(FLAGS.workdir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no trained run in {FLAGS.workdir} ({cfg_path} is missing); "
                                "train first with: jaxdiff train --config ... --workdir ...")
    with open(cfg_path) as f:
        return ConfigDict(json.load(f))


def parse_list(text, allowed, flag):
    """'a,b' -> ('a', 'b'): non-empty, no repeats, each in `allowed` (None: any name)."""
    items = tuple(s.strip() for s in str(text).split(","))
    for item in items:
        if not item or (allowed is not None and item not in allowed):
            hint = f"; allowed: {', '.join(allowed)}" if allowed is not None else ""
            raise ValueError(f"--{flag}={text}: {item!r} is not a valid name{hint}")
    if len(set(items)) < len(items):
        raise ValueError(f"--{flag}={text}: a name is repeated")
    return items


def parse_steps(text, *, many):
    """--steps: one positive integer, or with `many` a comma-separated list of them."""
    try:
        steps = tuple(int(s) for s in str(text).split(","))
    except ValueError:
        steps = ()
    if not steps or min(steps) < 1 or (len(steps) > 1 and not many):
        what = ("a comma-separated list of positive integers, e.g. 5,10,20,50" if many
                else "a positive integer")
        raise ValueError(f"--steps={text} must be {what}")
    return steps if many else steps[0]


def _subcommand(command, rest):
    """'eval' + positional 'sweep' -> 'eval sweep'; other positionals are refused."""
    if command == "eval" and rest[:1] == ["sweep"]:
        command, rest = "eval sweep", rest[1:]
    if rest and command != "train" and command != "sample":
        hint = " (its one sub-command is sweep)" if command == "eval" else ""
        raise ValueError(f"unexpected argument {rest[0]!r}: {command} takes flags only{hint}")
    return command


def _check_eval_flags(command):
    """The eval/plot flags' formats, before anything heavy is imported."""
    if not command.startswith("eval"):
        return
    if FLAGS.num is not None and FLAGS.num <= 0:
        raise ValueError(f"--num={FLAGS.num} must be a positive number of samples")
    metrics = parse_list(FLAGS.metrics or "fd,pr", METRICS, "metrics")
    if FLAGS.steps is not None:
        parse_steps(FLAGS.steps, many=command == "eval sweep")
    if command == "eval sweep":
        if FLAGS.samplers is None:
            raise ValueError("eval sweep needs --samplers=<a,b,...>, e.g. ddim,heun,dpmpp_2m")
        parse_list(FLAGS.samplers, None, "samplers")
        if "nll" in metrics:
            raise ValueError("--metrics=nll does not depend on the sampler; the sweep takes fd "
                             "and pr (use jaxdiff eval --metrics nll)")
    if FLAGS.features is not None:
        parse_list(FLAGS.features, ("digits", "inception", "raw"), "features")
    parse_list(FLAGS.divergence, ("auto", "exact", "hutchinson"), "divergence")


def _default_features(config):
    """digits for the digits datasets, raw for the 2-D toy sets, inception for other images."""
    from jaxdiff.data import toy2d

    if config.data.name in ("digits", "digits16"):
        return "digits"
    return "raw" if config.data.name in toy2d.GENERATORS else "inception"


def _eval(command):
    """jaxdiff eval / eval sweep / plot, flags already checked by `_check_eval_flags`."""
    from jaxdiff.cli import evaluate
    from jaxdiff.samplers import SAMPLERS

    config = _run_config(command)
    workdir = FLAGS.workdir
    if command == "plot":
        return evaluate.plot(workdir, out=FLAGS.out or os.path.join(workdir, "training.png"))
    common = dict(metrics=parse_list(FLAGS.metrics or "fd,pr", METRICS, "metrics"),
                  num=FLAGS.num or NUM["eval"], seed=FLAGS.seed, guidance=FLAGS.guidance,
                  features=FLAGS.features or _default_features(config),
                  inception_weights=FLAGS.inception_weights, split=FLAGS.split)
    if command == "eval sweep":
        evaluate.sweep(config, workdir, samplers=parse_list(FLAGS.samplers, sorted(SAMPLERS),
                                                            "samplers"),
                       steps_list=parse_steps(FLAGS.steps or "5,10,20,50", many=True),
                       out=FLAGS.out or os.path.join(workdir, "eval", "sweep"), **common)
        return
    if FLAGS.sampler is not None:
        parse_list(FLAGS.sampler, sorted(SAMPLERS), "sampler")
    steps = None if FLAGS.steps is None else parse_steps(FLAGS.steps, many=False)
    out = FLAGS.out or os.path.join(workdir, "eval", f"eval_{int(time.time())}.json")
    evaluate.evaluate(config, workdir, sampler=FLAGS.sampler, steps=steps,
                      divergence=FLAGS.divergence, out=out, **common)


if __name__ == "__main__":
    sys.exit(main())
