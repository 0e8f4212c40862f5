"""The `jaxdiff` command: reads a config, wires the library together, no math here.

    jaxdiff train  --config configs/digits.py --workdir runs/digits [--config.optim.lr=1e-3]
    jaxdiff sample --workdir runs/digits --sampler dpmpp_2m --steps 20 --num 64 --seed 0
                   [--class 3 --guidance 2.0] --out grid.png
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, samples.")
flags.DEFINE_string("sampler", None, "sample: sampler name (default: the config's).")
flags.DEFINE_integer("steps", None, "sample: number of sampler steps (default: the config's).")
flags.DEFINE_integer("num", 64, "sample: number of samples.")
flags.DEFINE_integer("seed", 0, "sample: noise seed.")
flags.DEFINE_integer("class", None, "sample: class label for every sample (default: cycle).")
flags.DEFINE_float("guidance", None, "sample: classifier-free guidance scale (1 = none).")
flags.DEFINE_string("out", None, "sample: output PNG (an .npz with the arrays goes beside it).")
flags.DEFINE_bool("distributed", False, "Join a multi-host run: jax.distributed.initialize() "
                  "finds its peers on TPU pods and SLURM clusters.")

COMMANDS = ("train", "sample")


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
        FLAGS(argv)
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
        else:
            _sample(run)
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
    if FLAGS.num <= 0:
        raise ValueError(f"--num={FLAGS.num} must be a positive number of samples")
    cfg_path = os.path.join(FLAGS.workdir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no trained run in {FLAGS.workdir} ({cfg_path} is missing); "
                                "train first with: jaxdiff train --config ... --workdir ...")
    with open(cfg_path) as f:
        config = ConfigDict(json.load(f))
    out = FLAGS.out or os.path.join(FLAGS.workdir, "samples", f"sample_{int(time.time())}.png")
    run.sample(config, FLAGS.workdir, out=out, num=FLAGS.num, seed=FLAGS.seed,
               sampler=FLAGS.sampler, steps=FLAGS.steps, label=FLAGS["class"].value,
               guidance=FLAGS.guidance)


if __name__ == "__main__":
    sys.exit(main())
