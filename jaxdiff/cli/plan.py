"""`jaxdiff plan`: the memory a config's train step needs per device on a target mesh, from an
ahead-of-time compile (`jaxdiff.train.plan`), before renting the machines.

    jaxdiff plan --config FILE [--config.KEY=VALUE ...] [--mesh data=8,fsdp=1,tensor=1]
                 [--devices N --device-memory 16GiB | --topology v5e-256]
                 [--remat none,full,dots_saveable] [--batch B] [--no-search]
                 [--max-compiles 8] [--json FILE]

Compiles the run's train step (as `jaxdiff train` builds and jits it) for --devices fake host
CPU devices, without running it, once per --remat policy, and prints per device: params,
optimizer state, EMA, the batch, XLA's temporaries (activations, gradients) and the total, and
whether it fits --device-memory; then, per policy, the largest per-device batch that fits
(doubling, then bisection, at most --max-compiles compiles each). --batch is the global batch
(default: data.batch_size). --topology KIND-COUNT (v4, v5e, v5p, v6e TPUs; a100-40gb,
a100-80gb, h100, h200 GPUs) sets the devices and the memory per device from a table; for a TPU
it first tries libtpu's compiler (`get_topology_desc`, as MaxText's train_compile.py), and
where libtpu is not installed says so in one line and plans on fake CPU devices instead.
XLA:CPU's numbers are an estimate of what the TPU/GPU compilers do (the state's are exact).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys

USAGE = __doc__.split("\n\n")[1]
EXAMPLE = ("example:\n  jaxdiff plan --config configs/imagenet256_dit_xl2.py --topology v5e-256 "
           "--mesh data=32,fsdp=8 --remat none,full,dots_saveable\n  jaxdiff plan --config "
           "configs/digits.py --devices 8 --device-memory 16GiB --mesh data=4,fsdp=2")
CHILD = "JAXDIFF_PLAN_CHILD"  # set in the fresh process `main` starts when JAX runs already
# XLA:CPU flags of the planning process (set before JAX starts): a memory-minded schedule, as
# the TPU/GPU compilers make (XLA:CPU's default orders for concurrency and then keeps the
# activations that remat would drop alive), and no LLVM optimisation (faster compiles, the same
# buffers)
COMPILE_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",
                 "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
CAVEAT = ("note: compiled by XLA:CPU on fake devices: the state's bytes are exact; temporaries "
          "are XLA:CPU's, an estimate of what the TPU/GPU compilers allocate (they fuse, lay "
          "out and rematerialise differently)")


class _UsageError(Exception):
    """A bad flag (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def parser():
    ap = _Parser(prog="jaxdiff plan", usage="jaxdiff plan --config FILE [flags]",
                 description="per-device memory of a config's train step on a target mesh, "
                             "from an ahead-of-time compile (nothing runs)",
                 epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", metavar="FILE", required=True,
                    help="a Python file defining get_config(), e.g. configs/digits.py; "
                         "--config.KEY=VALUE overrides")
    ap.add_argument("--mesh", metavar="SIZES", default=None,
                    help="data=D,fsdp=F,tensor=T (one may be -1: the rest; default: the "
                         "config's mesh)")
    ap.add_argument("--devices", metavar="N", type=int, default=None,
                    help="devices to plan for (default: the --mesh sizes' product, else 1)")
    ap.add_argument("--device-memory", metavar="SIZE", default=None,
                    help="memory per device, e.g. 16GiB, 80GB, 512MiB")
    ap.add_argument("--topology", metavar="NAME", default=None,
                    help="KIND-COUNT, e.g. v5e-256, v4-8, h100-8: devices and memory per device")
    ap.add_argument("--remat", metavar="LIST", default=None,
                    help="remat policies to compare: none, full, dots_saveable, ... "
                         "(default: the config's model.remat)")
    ap.add_argument("--batch", metavar="B", type=int, default=None,
                    help="the global batch (default: the config's data.batch_size)")
    ap.add_argument("--no-search", action="store_true",
                    help="skip the search for the largest per-device batch that fits")
    ap.add_argument("--max-compiles", metavar="N", type=int, default=8,
                    help="compiles per remat policy in that search (default 8)")
    ap.add_argument("--json", metavar="FILE", default=None, help="also write the plans as JSON")
    return ap


def main(argv):
    """argv: the arguments after `plan`. Returns the exit status: 2 for bad flags, 1 for what
    the config or the compile refuse."""
    overrides = [a for a in argv if a.startswith("--config.")]
    try:
        args = parser().parse_args([a for a in argv if not a.startswith("--config.")])
        config = _config(args, overrides)
        target = _target(args, config)
    except (_UsageError, ValueError) as e:
        print(f"jaxdiff plan: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code
    try:
        devices, note = _devices(target)
        if devices is None:  # JAX runs here with too few CPU devices: a fresh process plans
            return _rerun(argv)
        if note:
            print(f"jaxdiff plan: {note}", file=sys.stderr)
        plan(config, args, target, devices)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"jaxdiff plan: error: {_first_line(e)}", file=sys.stderr)
        return 1
    return 0


def _first_line(e):
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _config(args, overrides):
    """The config file with the --config.KEY=VALUE overrides (values read as Python literals,
    else strings); one line for a missing file or an unknown key."""
    from jaxdiff.cli.flags import check_overrides, load_config_flag

    config = load_config_flag([f"--config={args.config}"])
    check_overrides(overrides, config)
    for a in overrides:
        key, eq, raw = a[len("--config."):].partition("=")
        if not eq:
            raise ValueError(f"{a} needs a value (--config.KEY=VALUE)")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, name = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        if isinstance(value, list) and isinstance(node[name], tuple):
            value = tuple(value)
        try:
            node[name] = value
        except (TypeError, ValueError) as e:
            raise ValueError(f"{a}: {_first_line(e)}") from None
    return config


def _target(args, config):
    """What to plan for, the flags checked (ValueError, one line: exit 2): {devices, memory,
    topology, mesh (data, fsdp, tensor), batch (global), remat (policy names)}."""
    from jaxdiff.train import plan as plan_lib

    if args.topology is not None and args.devices is not None:
        raise ValueError(f"--topology={args.topology} sets the devices; give --topology or "
                         "--devices, not both")
    if args.devices is not None and args.devices < 1:
        raise ValueError(f"--devices={args.devices} must be an integer >= 1")
    if args.max_compiles < 1:
        raise ValueError(f"--max-compiles={args.max_compiles} must be an integer >= 1")
    try:
        memory = None if args.device_memory is None else plan_lib.parse_bytes(args.device_memory)
    except ValueError as e:
        raise ValueError(f"--device-memory={args.device_memory}: {_first_line(e)}") from None
    topology = None
    if args.topology is not None:
        try:
            topology = plan_lib.parse_topology(args.topology)
        except ValueError as e:
            raise ValueError(f"--topology: {_first_line(e)}") from None
        memory = topology.memory if memory is None else memory
    try:
        sizes = (plan_lib.parse_mesh(args.mesh) if args.mesh is not None
                 else dict(config.get("mesh") or {}))
    except ValueError as e:
        raise ValueError(f"--mesh={args.mesh}: {_first_line(e)}") from None
    devices = (topology.devices if topology else args.devices if args.devices is not None
               else _product(sizes))
    try:
        mesh = plan_lib.resolve_mesh(sizes, devices)
    except ValueError as e:
        what = f"--mesh={args.mesh}" if args.mesh is not None else "the config's mesh"
        raise ValueError(f"{what}: {_first_line(e)}") from None
    batch = args.batch if args.batch is not None else config.data.get("batch_size")
    dp = mesh[0] * mesh[1]
    if not isinstance(batch, int) or batch < 1 or batch % dp:
        flag = "--batch" if args.batch is not None else "data.batch_size"
        raise ValueError(f"{flag}={batch} (the global batch) does not split over data×fsdp = "
                         f"{mesh[0]}×{mesh[1]} = {dp} devices; allowed: a multiple of {dp}")
    return dict(devices=devices, memory=memory, topology=topology, mesh=mesh, batch=batch,
                remat=_remat_policies(args.remat, config))


def _product(sizes):
    values = [v for v in sizes.values() if v != -1]
    return max(1, int(__import__("math").prod(values))) if -1 not in sizes.values() else 1


def _remat_policies(text, config):
    """The policy names of --remat (default: the config's model.remat), checked against
    `layers.REMAT_POLICIES` and the model: policies other than none/full need a model whose
    remat field takes names."""
    from jaxdiff import models
    from jaxdiff.models.layers import REMAT_POLICIES

    cls = models.MODELS.get(config.model.get("name"))
    field = getattr(cls, "__dataclass_fields__", {}).get("remat")
    if text is None:
        value = config.model.get("remat", False)
        return ["full" if value is True else "none" if value is False else str(value)] if (
            field is not None) else ["-"]
    names = [n.strip() for n in text.split(",")]
    aliases = {"true": "full", "false": "none"}
    names = [aliases.get(n.lower(), n) for n in names]
    bad = [n for n in names if n not in REMAT_POLICIES]
    if bad or not names:
        raise ValueError(f"--remat={text}: {bad[0] if bad else text!r} is not a remat policy; "
                         f"allowed: {', '.join(REMAT_POLICIES)} (comma-separated)")
    if field is None:
        raise ValueError(f"--remat={text}: model.name={config.model.get('name')!r} has no remat "
                         "setting; allowed: no --remat")
    if "str" not in str(field.type) and set(names) - {"none", "full"}:
        raise ValueError(f"--remat={text}: model.name={config.model.name!r} takes remat True "
                         "or False only; allowed: none, full")
    return list(dict.fromkeys(names))


def _devices(target):
    """(the devices to compile for, a note or None); (None, None) when this process runs JAX
    with too few CPU devices already (`_rerun`). A TPU topology uses libtpu's compiler where
    it is installed, else fake CPU devices with the topology's size and memory."""
    from jaxdiff.train import plan as plan_lib

    topology, n = target["topology"], target["devices"]
    note = None
    if topology is not None and topology.platform == "tpu":
        try:
            return plan_lib.tpu_devices(topology), None
        except plan_lib.NoTpuCompiler as e:
            note = (f"--topology={topology.name}: {e}; libtpu is not installed (pip install "
                    f"'jax[tpu]' for TPU compiles), so this plans --devices {n} --device-memory "
                    f"{plan_lib.format_bytes(target['memory']).replace(' ', '')} on fake CPU "
                    "devices")
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():  # XLA reads them when JAX starts
        os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))
    if not plan_lib.use_cpu_devices(n):
        if os.environ.get(CHILD):
            raise RuntimeError(f"could not make {n} CPU devices in a fresh process")
        return None, None
    return plan_lib.cpu_devices(n), note


def xla_flags(flags):
    """`flags` (XLA_FLAGS) with the planning flags (`COMPILE_FLAGS`) it lacks."""
    have = {f.split("=")[0] for f in flags.split()}
    return " ".join([*flags.split(), *(f for f in COMPILE_FLAGS if f.split("=")[0] not in have)])


def _rerun(argv):
    """`jaxdiff plan ARGV` in a fresh process (JAX runs here with too few CPU devices and
    cannot add more once started); its output is passed on. Returns its exit status."""
    env = dict(os.environ, **{CHILD: "1"})
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = xla_flags(" ".join(f for f in flags
                                          if "host_platform_device_count" not in f))
    out = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "plan", *argv], env=env,
                         capture_output=True, text=True)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    return out.returncode


def plan(config, args, target, devices):
    """Compiles and prints the plans (and writes --json); returns {plans, largest}."""
    import jax
    from jax.sharding import AxisType

    from jaxdiff.cli import build, commands
    from jaxdiff.models.partitioning import AXES
    from jaxdiff.train import plan as plan_lib

    mesh = jax.make_mesh(target["mesh"], AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)
    platform = devices[0].platform
    memory, dp = target["memory"], target["mesh"][0] * target["mesh"][1]
    info = _data_info(config)
    kind = "int32" if build.is_discrete(config) else "float32"
    tx, lr_fn = build.optimizer(config)
    process = None if build.is_autoencoder(config) else build.process(config)
    where = (f"{target['devices']} {platform} devices, mesh "
             + ",".join(f"{k}={v}" for k, v in zip(AXES, target["mesh"]))
             + (f", {plan_lib.format_bytes(memory)} per device" if memory else "")
             + (f" ({target['topology'].name})" if target["topology"] else ""))
    print(f"jaxdiff plan: {args.config}, global batch {target['batch']}, on {where}",
          flush=True)

    plans, largest = [], {}
    for policy in target["remat"]:
        model = build.model(config, info)
        if policy != "-":  # True/False for none/full: the same for a model taking only bools
            model = model.clone(remat={"none": False, "full": True}.get(policy, policy))
        step = commands.build_train_step(config, model, tx, lr_fn, process)

        def plan_at(per_device, model=model, step=step, policy=policy):
            return plan_lib.plan_step(model, tx, step, mesh=mesh, x_shape=info["shape"],
                                      num_classes=commands.classes(config),
                                      ema_decays=config.optim.ema_decays,
                                      global_batch=per_device * dp, x_dtype=kind,
                                      device_memory=memory, remat=policy, platform=platform)

        p = plan_at(target["batch"] // dp)
        plans.append(p)
        print(f"  remat={policy}: {plan_lib.format_bytes(p.total)} per device "
              f"(compiled in {p.compile_s:.0f} s)", file=sys.stderr, flush=True)
        if memory and not args.no_search:
            best, miss, tried = plan_lib.largest_batch(
                lambda b: p if b == p.batch_per_device else plan_at(b), memory,
                start=p.batch_per_device, max_compiles=args.max_compiles)
            largest[policy] = dict(batch_per_device=best and best.batch_per_device,
                                   global_batch=best and best.batch_per_device * dp,
                                   total=best and best.total, first_miss=miss,
                                   compiles=len(tried))
    print(plan_lib.table(plans))
    for policy, r in largest.items():
        print(f"remat={policy}: {_largest_line(r, memory, args.max_compiles)}")
    if platform == "cpu":
        print(CAVEAT)
    out = {"config": args.config, "devices": target["devices"],
           "mesh": dict(zip(AXES, target["mesh"])), "device_memory": memory,
           "topology": target["topology"] and target["topology"].name, "compiler": platform,
           "plans": [p.to_dict() for p in plans], "largest": largest}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def _largest_line(r, memory, max_compiles):
    """What the batch search found, in words."""
    from jaxdiff.train.plan import format_bytes

    best, miss, memory = r["batch_per_device"], r["first_miss"], format_bytes(memory)
    if best is None:
        return (f"even batch 1 per device does not fit {memory}" if miss == 1 else
                f"no batch per device down to {miss} fits {memory} (--max-compiles="
                f"{max_compiles} reached)")
    found = (f"{best} per device (global {r['global_batch']}, "
             f"{format_bytes(r['total'])} per device)")
    if miss is None:
        return f"largest batch that fits {memory}: at least {found}; --max-compiles for more"
    if miss == best + 1:
        return f"largest batch that fits {memory}: {found}, {r['compiles']} compiles"
    return (f"largest batch that fits {memory}: {found}, {miss} does not; between them not "
            f"searched (--max-compiles={max_compiles})")


def _data_info(config):
    """{shape, num_classes} of one training example: `build.data_info`, or for a config that
    records its latents' shape without a dataset to read (`data.latent_shape`, e.g.
    configs/imagenet256_dit_xl2.py) that shape."""
    from jaxdiff.cli import build, commands

    shape = config.data.get("latent_shape")
    if shape is not None and not config.data.get("latents"):
        return {"shape": tuple(shape), "num_classes": commands.classes(config)}
    return build.data_info(config)
