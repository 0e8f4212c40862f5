"""The `jaxdiff` command's flags, and the checks that run before anything heavy is imported:
the config file (loaded once, here; absl's config flag is handed that config), its overrides,
the flags' formats, the paths to write, and the memory a batch would take.

Every check raises a one-line ValueError naming the flag, the bad value and what is allowed;
`jaxdiff.cli.main` prints it.
"""

from __future__ import annotations

import os
import time

from absl import flags
from ml_collections import ConfigDict, config_flags

FLAGS = flags.FLAGS
NUM = {"sample": 64, "eval": 1000}  # default --num per command
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, samples.")
flags.DEFINE_string("sampler", None, "sample/eval: sampler name (default: the config's).")
flags.DEFINE_string("sampler_file", None, "sample: a learned solver file (jaxdiff tune-sampler).")
flags.DEFINE_string("scheduler_config", None, "sample: a diffusers scheduler_config.json: its "
                    "sampler, noise-level grid and initial-noise scale, for --steps steps "
                    "(jaxdiff.interop.diffusers).")
flags.DEFINE_string("cache", None, "sample and eval: a feature cache, NAME[:KEY=VALUE,...], e.g. "
                    "deepcache:interval=3 (default: the config's sampler.cache, if any; none: "
                    "no cache); see jaxdiff.accel.cache.")
flags.DEFINE_string("quantized", None, "sample and eval: a quantized network of this run "
                    "(the directory jaxdiff quantize wrote), sampled instead of the EMA params.")
flags.DEFINE_string("steer", None, "sample: steer the sampler by --reward, NAME[:KEY=VALUE,...]: "
                    "smc:particles=8 (Feynman-Kac SMC), best_of_n:n=8 or "
                    "search:rounds=2,candidates=3 (noise search); see jaxdiff/cli/steer.py.")
flags.DEFINE_string("reward", None, "sample: the reward of --steer (alone: only scores the "
                    "samples): classifier:digit=D (the built-in digits classifier).")
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

METRICS = ("fd", "pr", "nll")
# the names jaxdiff.eval.quality.FEATURES and jaxdiff.core.likelihood.DIVERGENCES allow, written
# out so that the flags are checked before jax is imported (tests/test_cli_errors.py checks that
# they agree)
FEATURES = ("digits", "inception", "raw")
DIVERGENCES = ("auto", "exact", "hutchinson")
# eval sweep: a prefix; sample: .txt for a text token run (jaxdiff.cli.discrete)
OUT_EXTENSIONS = {"sample": (".png", ".txt"), "plot": (".png",), "eval": (".json",)}
MAX_SEED = 2**63 - 1  # jax.random.key takes a signed 64-bit seed; samplers use seed + 1


_LOADED = {}  # the --config text of this command line -> the config load_config_flag loaded


class _LoadedConfigParser(flags.ArgumentParser):
    """The parser of --config: hands back, locked, the config `load_config_flag` loaded from the
    same text; ml_collections' own parser (which would run the file a second time) is left only
    the texts it did not load."""

    def __init__(self, file_parser):
        self._file_parser = file_parser

    def parse(self, argument):
        config = _LOADED.get(argument)
        if config is None:
            return self._file_parser.parse(argument)
        config.lock()  # as lock_config=True does
        return config

    def flag_type(self):
        return self._file_parser.flag_type()


FLAGS["config"].parser = _LoadedConfigParser(FLAGS["config"].parser)


def first_line(error):
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[0] if lines else type(error).__name__


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


def load_config_flag(argv):
    """The config of `--config=<file>[:arg]` (None without it), loaded here so that a missing
    file, a syntax error or a failing get_config() is one line (absl's loader raises them with
    a traceback, or defers them as an error config); absl's flag then takes this config."""
    _LOADED.clear()
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
        _LOADED[text] = _load_config(path, arg)
        return _LOADED[text]
    except SyntaxError as e:
        raise ValueError(f"--config={text}: syntax error at line {e.lineno}: {e.msg}") from None
    except _NoGetConfig:
        raise ValueError(f"--config={text} has no get_config(); expected {allowed}") from None
    except Exception as e:  # the config file's own code failed: name it and the error
        raise ValueError(f"--config={text}: loading it failed: {type(e).__name__}: "
                         f"{first_line(e)}") from None


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


def check_overrides(argv, config):
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


def subcommand(command, rest):
    """'eval' + positional 'sweep' -> 'eval sweep'; other positionals are refused."""
    if command == "eval" and rest[:1] == ["sweep"]:
        command, rest = "eval sweep", rest[1:]
    if rest and command != "train" and command != "sample":
        hint = " (its one sub-command is sweep)" if command == "eval" else ""
        raise ValueError(f"unexpected argument {rest[0]!r}: {command} takes flags only{hint}")
    return command


def check_flags(command):
    """The flags' formats and the paths to write, before anything heavy is imported."""
    from jaxdiff.cli import steer  # its specs: plain Python

    steer.check_flags(FLAGS, command)
    if command != "train" and command != "plot":
        _check_sampling_flags(command)
    elif FLAGS.cache is not None:
        where = ("; training-time samples take the config's: --config.sampler.cache="
                 f"{FLAGS.cache}" if command == "train" else "")
        raise ValueError(f"--cache={FLAGS.cache}: it is a flag of jaxdiff sample and eval, not "
                         f"of jaxdiff {command}{where}")
    if FLAGS.scheduler_config is not None:
        _check_scheduler_config(command)
    if FLAGS.quantized is not None:
        _check_quantized(command)
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
    if FLAGS.cache is not None:
        parse_cache_flag(FLAGS.cache)


def parse_cache_flag(text):
    """--cache: `jaxdiff.accel.cache.parse_cache`'s (name, settings), or None for "none"; its
    error names the flag. (Imports jax, only when the flag is given.)"""
    from jaxdiff.accel.cache import parse_cache

    try:
        return parse_cache(text)
    except ValueError as e:
        raise ValueError(f"--cache={text}: {first_line(e)}") from None


def _check_scheduler_config(command):
    """--scheduler_config: a file, for sample, which it gives the sampler (no --sampler or
    --sampler_file besides)."""
    path = FLAGS.scheduler_config
    if command != "sample":
        raise ValueError(f"--scheduler_config={path}: it is a flag of jaxdiff sample, not of "
                         f"jaxdiff {command}")
    for other in ("sampler_file", "sampler"):
        if FLAGS[other].value is not None:
            raise ValueError(f"--scheduler_config={path} and --{other}={FLAGS[other].value} "
                             "both choose the sampler; give one of them")
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "no such file"
        raise ValueError(f"--scheduler_config={path}: {what}; expected a diffusers "
                         "scheduler_config.json")


def _check_quantized(command):
    """--quantized: a directory holding quant.json, for sample and eval, without a cache."""
    path = FLAGS.quantized
    if command not in ("sample", "eval", "eval sweep"):
        raise ValueError(f"--quantized={path}: it is a flag of jaxdiff sample and eval, not of "
                         f"jaxdiff {command}")
    if FLAGS.cache is not None and FLAGS.cache.strip().lower() not in ("", "none"):
        raise ValueError(f"--quantized={path} and --cache={FLAGS.cache}: a feature cache runs "
                         "the float network; give one of them")
    if not os.path.isdir(path):
        what = "is a file" if os.path.exists(path) else "no such directory"
        raise ValueError(f"--quantized={path}: {what}; expected a directory written by "
                         "jaxdiff quantize")
    if not os.path.isfile(os.path.join(path, "quant.json")):
        raise ValueError(f"--quantized={path} is not a quantized checkpoint (no quant.json); "
                         "make one with jaxdiff quantize --workdir RUN --scheme w8a8")


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
        parse_list(FLAGS.features, FEATURES, "features")
    parse_list(FLAGS.divergence, DIVERGENCES, "divergence")


def out_path(command):
    """--out, or the command's default output path in --workdir."""
    if FLAGS.out is not None or FLAGS.workdir is None:
        return FLAGS.out
    stamp = int(time.time())
    return os.path.join(FLAGS.workdir, *{
        "sample": ("samples", f"sample_{stamp}.png"), "eval": ("eval", f"eval_{stamp}.json"),
        "eval sweep": ("eval", "sweep"), "plot": ("training.png",)}[command])


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
    out, exts = FLAGS.out, OUT_EXTENSIONS.get(command)
    if out is not None:
        if exts is not None and os.path.splitext(out)[1].lower() not in exts:
            raise ValueError(f"--out={out}: {command} writes {' or '.join(exts)} files; "
                             f"allowed: a name ending in {' or '.join(exts)}")
        if os.path.isdir(out):
            raise ValueError(f"--out={out} is a directory; expected a file name")
        _check_writable("--out", out, os.path.dirname(os.path.abspath(out)), create=False)
    elif workdir is not None and os.path.isdir(workdir):
        _check_writable("--workdir", workdir, os.path.dirname(os.path.abspath(out_path(command))))


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


def check_memory(flag, count, config, what, copies=SAMPLE_COPIES):
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
