"""The `jaxdiff` command: reads a config, wires the library together, no math here.

    jaxdiff train  --config configs/digits.py --workdir runs/digits [--config.optim.lr=1e-3]
    jaxdiff sample --workdir runs/digits --sampler dpmpp_2m --steps 20 --num 64 --seed 0
                   [--class 3 --guidance 2.0] --out grid.png
                   [--sampler_file solver.json | --scheduler_config scheduler_config.json]
                   [--cache deepcache:interval=3]      (a feature cache, jaxdiff.accel.cache)
                   [--quantized DIR]                   (a jaxdiff quantize network)
                   [--steer smc:particles=8 | best_of_n:n=8 | search:rounds=2,candidates=3]
                   [--reward classifier:digit=3]       (steered by a reward; cli/steer.py)
    jaxdiff eval   --workdir runs/digits --metrics fd,pr,nll --sampler heun --steps 18
                   --num 1000 [--features inception --inception_weights pt_inception.pth]
                   [--cache deepcache:interval=3 | --quantized DIR] [--out report.json]
    jaxdiff eval sweep --workdir runs/digits --samplers ddim,heun,dpmpp_2m --steps 5,10,20,50
                   --num 1000 [--cache ... | --quantized DIR]
                   [--out runs/digits/eval/sweep]  (.md, .png, .json)
    jaxdiff quantize --workdir runs/digits --scheme w8a8 [--calibration timestep --groups 4]
                   [--calib 256] [--keep default|none] [--out DIR]
                   (post-training quantization, jaxdiff.accel.quant; cli/quantize.py; default
                   DIR: runs/digits/quantized/<scheme>-<calibration>[<groups>])
    jaxdiff distill --teacher runs/digits --method progressive|guided|cd|ct|reflow
                   --workdir runs/digits-pd [--config.distill.KEY=VALUE ...]
                   (a few-step student, jaxdiff.distill; cli/distill.py)
    jaxdiff tune-sampler --workdir runs/digits --nfe 5  (a learned solver; cli/tune.py)
    jaxdiff solve  --workdir runs/digits --task inpaint:box --input x.npz [--solver ddnm]
                   [--steps 100] [--sigma_y 0.05] [--class 3] [--out DIR]
                   (an inverse problem with the run as prior, jaxdiff.inverse; cli/solve.py;
                   default DIR: runs/digits/solve/<task>-<solver>)
    jaxdiff generate --model PATH --prompt "..." [--steps 25] [--guidance 7.5] [--out img.png]
                   (a pretrained diffusers pipeline folder, jaxdiff.pipelines; cli/generate.py)
    jaxdiff plan   --config configs/imagenet256_dit_xl2.py --topology v5e-256
                   [--mesh data=32,fsdp=8] [--remat none,full,dots_saveable] [--batch 256]
                   (memory per device from an ahead-of-time compile, jaxdiff.train.plan;
                   cli/plan.py; or --devices N --device-memory 16GiB)
    jaxdiff plot   --workdir runs/digits [--out curves.png]
    jaxdiff help [COMMAND], jaxdiff COMMAND --help: that command's usage (usage.py); --helpfull
                   adds every flag

On a CPU host a command that computes restarts itself once with glibc malloc settings that keep
XLA's freed step buffers in the process (cli/hostmalloc.py; JAXDIFF_HOST_MALLOC=system opts out).

Every failure is one line on stderr naming the bad value and what is allowed, and exits
non-zero (2: the flags, the config file or the paths, checked before anything heavy is
imported; 1: what the run's config, the data or the device refuse) without writing anything.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, logging
from absl.flags import Error as FlagsError
from ml_collections import ConfigDict

from jaxdiff.cli.flags import (
    FLAGS,
    METRICS,
    NUM,
    TRAIN_COPIES,
    check_flags,
    check_memory,
    check_overrides,
    first_line,
    load_config_flag,
    out_path,
    parse_list,
    parse_steps,
    subcommand,
)

COMMANDS = ("train", "sample", "eval", "plot")
HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")
# the commands that run XLA steps (the others stay one process: help, plan, plot, errors)
COMPUTE_COMMANDS = ("train", "sample", "eval", "distill", "quantize", "solve", "tune-sampler",
                    "generate")
RUN_SECTIONS = ("model", "process", "loss", "sampler", "data")  # what config.json must hold


def entry():
    """The `jaxdiff` console command (and `python -m jaxdiff.cli`): a run that computes restarts
    once with the host malloc settings (cli/hostmalloc.py), then `main`. Only here: `main()`
    called in-process (tests, notebooks) never replaces its caller's process."""
    if sys.argv[1:2] and sys.argv[1] in COMPUTE_COMMANDS and not set(sys.argv) & set(HELP_FLAGS):
        from jaxdiff.cli import hostmalloc

        try:
            hostmalloc.reexec(["-m", "jaxdiff.cli", *sys.argv[1:]])
        except ValueError as e:
            print(f"jaxdiff: error: {first_line(e)}", file=sys.stderr)
            return 2
    return main()


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if argv[1:2] == ["tune-sampler"]:  # its own argparse flags (cli/tune.py)
        from jaxdiff.cli import tune
        return tune.main(argv[2:])
    if argv[1:2] == ["distill"]:  # its own argparse flags (cli/distill.py)
        from jaxdiff.cli import distill
        return distill.main(argv[2:])
    if argv[1:2] == ["quantize"]:  # its own argparse flags (cli/quantize.py)
        from jaxdiff.cli import quantize
        return quantize.main(argv[2:])
    if argv[1:2] == ["solve"]:  # its own argparse flags (cli/solve.py)
        from jaxdiff.cli import solve
        return solve.main(argv[2:])
    if argv[1:2] == ["plan"]:  # its own argparse flags (cli/plan.py)
        from jaxdiff.cli import plan
        return plan.main(argv[2:])
    if argv[1:2] == ["generate"]:  # its own argparse flags (cli/generate.py)
        from jaxdiff.cli import generate
        return generate.main(argv[2:])
    shown = _help(argv[1:])
    if shown is not None:
        return shown
    if len(argv) < 2 or argv[1] not in COMMANDS:
        _no_command(argv[1] if len(argv) > 1 else None)
        return 2
    command = argv.pop(1)
    app.define_help_flags()
    try:
        config = load_config_flag(argv)
        check_overrides(argv, config)
        command = subcommand(command, FLAGS(argv)[1:])
        check_flags(command)
    except (ValueError, FlagsError) as e:
        print(f"jaxdiff {command}: error: {first_line(e)}", file=sys.stderr)
        return 2
    _run(command)
    return 0


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
        from jaxdiff.cli import hints  # the library's advice, as flags

        print(f"jaxdiff {command}: error: {hints.flag_words(first_line(e))}", file=sys.stderr)
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
    from jaxdiff.cli import hints
    from jaxdiff.train.oom import oom_message

    if command == "train":
        return oom_message(error, hints.memory_hints(FLAGS.config))
    message = oom_message(error)
    if message is None:
        return None
    num = FLAGS.num or NUM.get(command.split()[0], NUM["eval"])
    return f"{message}; use a smaller --num (now {num})"


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
        check_memory("--config.data.batch_size", batch, FLAGS.config,
                      "a training batch", copies=TRAIN_COPIES)
    run.train(FLAGS.config, FLAGS.workdir)


def _sample(run):
    if FLAGS.workdir is None:
        raise ValueError("sample needs --workdir=<dir> of a trained run")
    config = _run_config("sample")
    _check_conditioning(config)
    num = NUM["sample"] if FLAGS.num is None else FLAGS.num
    steps = None if FLAGS.steps is None else parse_steps(FLAGS.steps, many=False)
    if FLAGS.steer is not None or FLAGS.reward is not None:  # cli/steer.py
        from jaxdiff.cli import steer

        if config.data.get("latents"):
            raise ValueError("--steer/--reward: this is a latent run (data.latents), and the "
                             "rewards score pixels; steer a pixel-space run")
        from jaxdiff.cli import build

        if build.is_discrete(config):
            raise ValueError("--steer/--reward: this is a token run (process.name="
                             f"{config.process.name!r}); steering takes continuous image runs")

        check_memory("--num", num * steer.batch_factor(FLAGS.steer), config, "the samples")
        steer.sample(config, FLAGS.workdir, out=out_path("sample"), num=num, seed=FLAGS.seed,
                     sampler=FLAGS.sampler, steps=steps, label=FLAGS["class"].value,
                     guidance=FLAGS.guidance, steer=FLAGS.steer, reward=FLAGS.reward)
        return
    check_memory("--num", num, config, "the samples")
    scheduler = None if FLAGS.scheduler_config is None else _scheduler_config()
    out = out_path("sample")
    if FLAGS.out is None:  # the default name, of the run's kind (a text token run: .txt)
        from jaxdiff.cli.discrete import sample_extension

        out = os.path.splitext(out)[0] + sample_extension(config)
    run.sample(config, FLAGS.workdir, out=out, num=num, seed=FLAGS.seed,
               sampler=FLAGS.sampler, steps=steps, label=FLAGS["class"].value,
               guidance=FLAGS.guidance, sampler_file=FLAGS.sampler_file,
               scheduler_config=scheduler, cache=FLAGS.cache, quantized=FLAGS.quantized)


def _scheduler_config():
    """--scheduler_config's JSON object (a diffusers scheduler_config.json)."""
    path = FLAGS.scheduler_config
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--scheduler_config={path} is not valid JSON ({first_line(e)}); "
                         "expected a diffusers scheduler_config.json") from None
    if not isinstance(config, dict) or "_class_name" not in config:
        raise ValueError(f"--scheduler_config={path} has no _class_name; expected a diffusers "
                         "scheduler_config.json")
    return config


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
        raise ValueError(f"{cfg_path} is not valid JSON ({first_line(e)}); it should hold the "
                         "run's config as jaxdiff train wrote it") from None
    if isinstance(config, dict) and (config.get("model") or {}).get("name") == "autoencoder_kl":
        raise ValueError(f"{FLAGS.workdir} is an autoencoder run (model.name=autoencoder_kl): "
                         f"nothing to {command}; its reconstructions are in its report.json, and "
                         "a latent diffusion run uses it as data.latents")
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


def _eval(command):
    """jaxdiff eval / eval sweep / plot, flags already checked by `_check_flags`."""
    from jaxdiff.cli import evaluate
    from jaxdiff.eval import quality
    from jaxdiff.samplers import SAMPLERS

    config = _run_config(command)
    workdir, out = FLAGS.workdir, out_path(command)
    if command == "plot":
        return evaluate.plot(workdir, out=out)
    _check_conditioning(config)
    metrics = parse_list(FLAGS.metrics or "fd,pr", METRICS, "metrics")
    if "nll" in metrics and config.data.get("latents"):
        raise ValueError("--metrics=nll: a latent run (data.latents) models latents, not "
                         "pixels; allowed: fd, pr")
    num = FLAGS.num or NUM["eval"]
    if {"fd", "pr"} & set(metrics):
        check_memory("--num", num, config, "the samples")
    common = dict(metrics=metrics, num=num, seed=FLAGS.seed, guidance=FLAGS.guidance,
                  cache=FLAGS.cache, quantized=FLAGS.quantized,
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
