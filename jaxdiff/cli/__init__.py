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
    jaxdiff help [COMMAND], jaxdiff COMMAND --help: that command's usage (usage.py); --helpfull
                   adds every flag

Every failure is one line on stderr naming the bad value and what is allowed, and exits
non-zero (2: the flags, the config file or the paths, checked before anything heavy is
imported; 1: what the run's config, the data or the device refuse) without writing anything.
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
flags.DEFINE_string("out", None, "sample: output .png in an existing directory (an .npz with "
                    "the arrays goes beside it); eval: the .json report; eval sweep: path prefix "
                    "of .md/.png/.json; plot: .png.")
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
HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")
OUT_EXTENSIONS = {"sample": ".png", "plot": ".png", "eval": ".json"}  # eval sweep: a prefix
RUN_SECTIONS = ("model", "process", "loss", "sampler", "data")  # what config.json must hold
MAX_SEED = 2**63 - 1  # jax.random.key takes a signed 64-bit seed; samplers use seed + 1


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    shown = _help(argv[1:])
    if shown is not None:
        return shown
    if len(argv) < 2 or argv[1] not in COMMANDS:
        _no_command(argv[1] if len(argv) > 1 else None)
        return 2
    command = argv.pop(1)
    app.define_help_flags()
    try:
        config = _load_config_flag(argv)
        _check_overrides(argv, config)
        command = _subcommand(command, FLAGS(argv)[1:])
        _check_flags(command)
    except (ValueError, flags.Error) as e:
        print(f"jaxdiff {command}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    _run(command)
    return 0


def _first_line(error):
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[0] if lines else type(error).__name__


def _no_command(got):
    """No command: the overview on stderr; an unknown one: one line, with the close match."""
    import difflib

    if got is None:
        from jaxdiff.cli import usage

        print(usage.text(), file=sys.stderr)
    close = difflib.get_close_matches(str(got), COMMANDS, n=1)
    hint = f"; did you mean {close[0]}?" if close else " (jaxdiff --help: the commands)"
    got = "nothing" if got is None else repr(got)
    print(f"jaxdiff: expected a command, one of {', '.join(COMMANDS)}; got {got}{hint}",
          file=sys.stderr)


def _help(args):
    """`jaxdiff --help`, `jaxdiff help [COMMAND]`, `jaxdiff COMMAND ... --help`: prints that
    help on stdout and returns 0 (2 for a help topic that is no command); None: no help asked.
    --helpfull adds every flag absl knows."""
    from jaxdiff.cli import usage

    args = args[:args.index("--")] if "--" in args else args
    if args[:1] == ["help"]:
        topic = " ".join(args[1:]) or None
        if topic is not None and topic not in usage.COMMAND_HELP:
            print(f"jaxdiff help: error: no command {topic!r}; allowed: "
                  f"{', '.join(usage.COMMAND_HELP)}", file=sys.stderr)
            return 2
    elif not any(a in HELP_FLAGS or a.startswith(("--help=", "--helpfull=")) for a in args):
        return None
    elif args[0] in COMMANDS:
        topic = "eval sweep" if args[0] == "eval" and "sweep" in args[1:] else args[0]
    else:
        topic = None
    print(usage.text(topic))
    if "--helpfull" in args:
        app.define_help_flags()
        print("\nall flags:\n" + FLAGS.get_help())
    return 0


def _flag_value(argv, name):
    """The flag's value as absl reads it (`--name=v`, `--name v`, one dash too): the last
    occurrence wins."""
    value = None
    for i, a in enumerate(argv):
        for dashes in ("--", "-"):
            if a.startswith(f"{dashes}{name}="):
                value = a.split("=", 1)[1]
            elif a == f"{dashes}{name}" and i + 1 < len(argv):
                value = argv[i + 1]
    return value


def _load_config_flag(argv):
    """The config of `--config=<file>[:arg]` (None without it), loaded here so that a missing
    file, a syntax error or a failing get_config() is one line (absl's loader raises them with
    a traceback, or defers them as an error config)."""
    text = _flag_value(argv, "config")
    if text is None:
        return None
    path, _, arg = text.partition(":")
    allowed = "a Python file that defines get_config(), e.g. configs/digits.py"
    if not os.path.exists(path):
        raise ValueError(f"--config={text}: no such file; expected {allowed}")
    if not os.path.isfile(path):
        raise ValueError(f"--config={text} is a directory; expected {allowed}")
    try:
        return _load_config(path, arg)
    except SyntaxError as e:
        raise ValueError(f"--config={text}: syntax error at line {e.lineno}: {e.msg}") from None
    except _NoGetConfig:
        raise ValueError(f"--config={text} has no get_config(); expected {allowed}") from None
    except Exception as e:  # the config file's own code failed: name it and the error
        raise ValueError(f"--config={text}: loading it failed: {type(e).__name__}: "
                         f"{_first_line(e)}") from None


class _NoGetConfig(Exception):
    pass


def _load_config(path, arg=""):
    import importlib.util

    spec = importlib.util.spec_from_file_location("jaxdiff_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise _NoGetConfig()
    config = module.get_config(*([arg] if arg else []))
    if not isinstance(config, ConfigDict):
        raise TypeError(f"get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def _check_overrides(argv, config):
    """Names an unknown `--config.a.b=...` key and the valid keys where it went wrong."""
    keys = [a.lstrip("-")[len("config."):].split("=")[0] for a in argv
            if a.startswith(("--config.", "-config."))]
    if config is None:
        return
    for key in keys:
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(parts[:i]) or "the config"
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
                raise ValueError(f"unknown config key {key!r}: valid keys in {where}: {valid}")
            node = node[part]


def _run(command):
    from jaxdiff.cli import commands as run  # heavy imports only once the flags are valid

    logging.set_verbosity(logging.WARNING)  # orbax reports every save at INFO
    _init_distributed()
    try:
        if command == "train":
            _train(run)
        elif command == "sample":
            _sample(run)
        else:
            _eval(command)
    except (ValueError, OSError, FloatingPointError) as e:  # OSError: permissions, disk full
        print(f"jaxdiff {command}: error: {_first_line(e)}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # device out of memory: one line naming the knobs, else re-raise
        message = _oom_message(command, e)
        if message is None:
            raise
        print(f"jaxdiff {command}: error: {message}", file=sys.stderr)
        sys.exit(1)


def _oom_message(command, error):
    """One line for an out-of-memory error (None for any other error): train names the config
    knobs that reduce memory, sample and eval name --num."""
    from jaxdiff import faults

    if command == "train":
        return faults.oom_message(error, faults.memory_hints(FLAGS.config))
    message = faults.oom_message(error, {})
    if message is None:
        return None
    num = FLAGS.num or NUM.get(command.split()[0], NUM["eval"])
    return f"{message.split('; to use less memory')[0]}; use a smaller --num (now {num})"


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


def _train(run):
    if FLAGS.config is None or FLAGS.workdir is None:
        raise ValueError("train needs --config=<file> and --workdir=<dir>")
    batch = FLAGS.config.data.get("batch_size")
    if isinstance(batch, int) and batch > 0:
        _check_memory("--config.data.batch_size", batch, FLAGS.config,
                      "a training batch", copies=TRAIN_COPIES)
    run.train(FLAGS.config, FLAGS.workdir)


def _sample(run):
    if FLAGS.workdir is None:
        raise ValueError("sample needs --workdir=<dir> of a trained run")
    config = _run_config("sample")
    _check_conditioning(config)
    num = NUM["sample"] if FLAGS.num is None else FLAGS.num
    _check_memory("--num", num, config, "the samples")
    steps = None if FLAGS.steps is None else parse_steps(FLAGS.steps, many=False)
    run.sample(config, FLAGS.workdir, out=_out("sample"), num=num, seed=FLAGS.seed,
               sampler=FLAGS.sampler, steps=steps, label=FLAGS["class"].value,
               guidance=FLAGS.guidance)


def _out(command):
    """--out, or the command's default output path in --workdir."""
    if FLAGS.out is not None or FLAGS.workdir is None:
        return FLAGS.out
    stamp = int(time.time())
    return os.path.join(FLAGS.workdir, *{
        "sample": ("samples", f"sample_{stamp}.png"), "eval": ("eval", f"eval_{stamp}.json"),
        "eval sweep": ("eval", "sweep"), "plot": ("training.png",)}[command])


def _run_config(command):
    """The config a trained run in --workdir was trained with (its config.json)."""
    if FLAGS.workdir is None:
        raise ValueError(f"{command} needs --workdir=<dir> of a trained run")
    cfg_path = os.path.join(FLAGS.workdir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no trained run in {FLAGS.workdir} ({cfg_path} is missing); "
                                "train first with: jaxdiff train --config ... --workdir ...")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({_first_line(e)}); it should hold the "
                         "run's config as jaxdiff train wrote it") from None
    missing = [k for k in RUN_SECTIONS if not isinstance(config, dict)
               or not isinstance(config.get(k), dict)]
    if missing:
        raise ValueError(f"{cfg_path} is not a jaxdiff run config: it lacks the section "
                         f"{missing[0]!r} (it needs {', '.join(RUN_SECTIONS)})")
    return ConfigDict(config)


def _check_conditioning(config):
    """--class and --guidance need a class-conditional model; --class one of its classes."""
    K = int(config.model.get("num_classes", 0) or 0)
    given = [f"--{n}={FLAGS[n].value}" for n in ("class", "guidance")
             if FLAGS[n].value is not None]
    if given and not K:
        raise ValueError(f"{given[0]}: this model is unconditional (model.num_classes=0 in "
                         f"{os.path.join(FLAGS.workdir, 'config.json')}); --class and "
                         "--guidance need a class-conditional model")
    label = FLAGS["class"].value
    if label is not None and not 0 <= label < K:
        raise ValueError(f"--class={label} is not a class of this model; allowed: 0..{K - 1}")


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


def _check_flags(command):
    """The flags' formats and the paths to write, before anything heavy is imported."""
    if command != "train" and command != "plot":
        _check_sampling_flags(command)
    if command.startswith("eval"):
        _check_eval_flags(command)
    _check_paths(command)


def _check_sampling_flags(command):
    """--num, --seed, --steps of sample and eval, in one format."""
    if FLAGS.num is not None and FLAGS.num <= 0:
        raise ValueError(f"--num={FLAGS.num} must be a positive number of samples")
    if not 0 <= FLAGS.seed < MAX_SEED:
        raise ValueError(f"--seed={FLAGS.seed} must be an integer in [0, 2**63 - 1)")
    if FLAGS.steps is not None:
        parse_steps(FLAGS.steps, many=command == "eval sweep")


def _check_eval_flags(command):
    """The eval flags' formats."""
    if FLAGS["class"].value is not None:
        raise ValueError(f"--class={FLAGS['class'].value}: {command} draws every class in "
                         "turn; --class is a flag of jaxdiff sample")
    metrics = parse_list(FLAGS.metrics or "fd,pr", METRICS, "metrics")
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


def _check_paths(command):
    """--workdir must be (or become) a directory; --out a file of the command's format in a
    directory that exists (the default output: in --workdir, created as needed); both
    writable."""
    workdir = FLAGS.workdir
    if workdir is not None and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir} is a file; expected a run directory")
    if command == "train":
        if workdir is not None:
            _check_writable("--workdir", workdir, workdir)
        return
    out, ext = FLAGS.out, OUT_EXTENSIONS.get(command)
    if out is not None:
        if ext is not None and os.path.splitext(out)[1].lower() != ext:
            raise ValueError(f"--out={out}: {command} writes {ext} files; allowed: a name "
                             f"ending in {ext}")
        if os.path.isdir(out):
            raise ValueError(f"--out={out} is a directory; expected a file name")
        _check_writable("--out", out, os.path.dirname(os.path.abspath(out)), create=False)
    elif workdir is not None and os.path.isdir(workdir):
        _check_writable("--workdir", workdir, os.path.dirname(os.path.abspath(_out(command))))


def _check_writable(flag, value, directory, create=True):
    """Refuses `directory` (where `flag`=`value` writes) if it, or the nearest part of it that
    exists, is a file or is not writable; without `create`, if it does not exist."""
    directory = os.path.abspath(directory)
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag}={value}: {probe} is a file, not a directory")
    if probe != directory and not create:
        raise ValueError(f"{flag}={value}: the directory {directory} does not exist; "
                         "create it first")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}={value}: the directory {probe} is not writable; allowed: "
                         "a directory this user may write in")


# A lower bound on what sampling holds at once: the noise, the current sample, the denoised
# estimate and a history/derivative term, each a float32 batch (the network's activations
# come on top). Training holds the batch, its noisy copy, the target and the gradient signal.
SAMPLE_COPIES = 4
TRAIN_COPIES = 4


def _check_memory(flag, count, config, what, copies=SAMPLE_COPIES):
    """Refuses a batch of `count` examples (`flag`=`count`) whose float32 copies alone exceed
    the memory available, instead of letting XLA abort the process."""
    import math

    from jaxdiff.cli import build

    shape = build.data_info(config)["shape"]
    if any(d is None for d in shape):
        return
    need = count * math.prod(shape) * 4 * copies
    limit, where = _memory_limit()
    if limit is not None and need > limit:
        dims = "×".join(str(d) for d in shape)
        raise ValueError(f"{flag}={count}: {what} would take at least {_gib(need)} ({count} × "
                         f"{dims} float32 × {copies} copies), more than the {_gib(limit)} "
                         f"available on {where}; use a smaller {flag}")


def _gib(n):
    return f"{n / 2**30:.3g} GiB"


def _memory_limit():
    """(bytes, where) the arrays may take: the accelerators' memory (`bytes_limit` of every
    device together), else the host's available memory; (None, None) when unknown."""
    import jax

    devices = jax.devices()
    try:
        stats = devices[0].memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        stats = {}
    if stats.get("bytes_limit"):
        return (stats["bytes_limit"] * len(devices),
                f"{len(devices)} {devices[0].platform} device(s)")
    return _host_available(), "this host"


def _host_available():
    """The host's available memory: /proc/meminfo's MemAvailable, capped by a cgroup limit."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            rows = dict(line.split(":", 1) for line in f if ":" in line)
        available = int(rows["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                available = min(available, int(limit) - int(g.read().strip()))
    except (OSError, ValueError):
        pass
    return available


def _eval(command):
    """jaxdiff eval / eval sweep / plot, flags already checked by `_check_flags`."""
    from jaxdiff.cli import evaluate
    from jaxdiff.eval import quality
    from jaxdiff.samplers import SAMPLERS

    config = _run_config(command)
    workdir, out = FLAGS.workdir, _out(command)
    if command == "plot":
        return evaluate.plot(workdir, out=out)
    _check_conditioning(config)
    metrics = parse_list(FLAGS.metrics or "fd,pr", METRICS, "metrics")
    num = FLAGS.num or NUM["eval"]
    if {"fd", "pr"} & set(metrics):
        _check_memory("--num", num, config, "the samples")
    common = dict(metrics=metrics, num=num, seed=FLAGS.seed, guidance=FLAGS.guidance,
                  features=FLAGS.features or quality.default_features(config.data.name),
                  inception_weights=FLAGS.inception_weights, split=FLAGS.split)
    if command == "eval sweep":
        evaluate.sweep(config, workdir, samplers=parse_list(FLAGS.samplers, sorted(SAMPLERS),
                                                            "samplers"),
                       steps_list=parse_steps(FLAGS.steps or "5,10,20,50", many=True),
                       out=out, **common)
        return
    if FLAGS.sampler is not None:
        parse_list(FLAGS.sampler, sorted(SAMPLERS), "sampler")
    steps = None if FLAGS.steps is None else parse_steps(FLAGS.steps, many=False)
    evaluate.evaluate(config, workdir, sampler=FLAGS.sampler, steps=steps,
                      divergence=FLAGS.divergence, out=out, **common)


if __name__ == "__main__":
    sys.exit(main())
