"""Memory planning ahead of time: how many bytes a train step takes per device on a target mesh,
from XLA's ahead-of-time compile of the step, without running it (`jaxdiff plan`).

The step (`make_train_step`, jitted as `jaxdiff train` jits it: `parallel.jit_train_step`, the
state donated) is lowered on abstract inputs (`jax.ShapeDtypeStruct`s with their shardings) and
compiled for the mesh; nothing is allocated. Per device:

- the train state, from its abstract shardings: each leaf's shard shape × itemsize, split into
  params, optimizer state, EMA copies and the rest (step, PRNG key);
- from `compiled.memory_analysis()`: arguments (state + batch), outputs, the outputs aliased to
  donated arguments, and temporaries (activations kept for the backward pass, gradients,
  optimizer intermediates); total = arguments + outputs - aliases + temporaries, the bytes
  live at the step's peak as XLA's buffer assignment sees them (what MaxText reports too).

Without the target hardware the compile runs on fake host CPU devices (`use_cpu_devices`:
`jax_num_cpu_devices`, set before JAX starts its backends; `jaxdiff plan` also turns off
XLA:CPU's concurrency-optimised scheduler, which keeps activations alive that remat would
drop). Caveats: the state bytes are exact on any backend; the temporaries are XLA:CPU's, within
15% of the peak a CPU run measures (benchmarks/plan.py) but only an estimate for TPU/GPU:
their compilers fuse, lay out and float-normalise differently (XLA:CPU widens bf16 compute to
f32) and rematerialise under memory pressure, the models pick plain XLA attention on CPU (the
(B, heads, T, T) scores materialised) where a TPU/GPU run uses a fused kernel, and XLA:CPU's
schedule does not always realise a remat policy's savings (it does for the UNet, not for the
DiT: its remat columns on CPU are not indicative).
A TPU topology (`tpu_devices`, libtpu's `get_topology_desc`, as MaxText's train_compile.py)
compiles with the TPU compiler when libtpu is installed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp

from jaxdiff.models.partitioning import AXES
from jaxdiff.train import parallel
from jaxdiff.train.state import abstract_state

GiB, MiB = 2**30, 2**20
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
         "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
         "tib": 2**40}

# Known accelerators: memory per JAX device, and how many JAX devices one unit of a topology
# name's count is. TPU v4 / v5p names count TensorCores, two per chip (one device, megacore);
# v5e / v6e names count chips; GPU names here count GPUs. GPU sizes: nvidia-smi's totals.
DEVICE_KINDS = {
    "v4": dict(memory=32 * GiB, per_unit=0.5, platform="tpu", grid=3),
    "v5e": dict(memory=16 * GiB, per_unit=1, platform="tpu", grid=2),
    "v5p": dict(memory=95 * GiB, per_unit=0.5, platform="tpu", grid=3),
    "v6e": dict(memory=32 * GiB, per_unit=1, platform="tpu", grid=2),
    "a100-40gb": dict(memory=40960 * MiB, per_unit=1, platform="gpu"),
    "a100-80gb": dict(memory=81920 * MiB, per_unit=1, platform="gpu"),
    "h100": dict(memory=81559 * MiB, per_unit=1, platform="gpu"),
    "h200": dict(memory=143771 * MiB, per_unit=1, platform="gpu"),
}


def parse_bytes(text):
    """Bytes of a memory size: "16GiB", "80GB", "512MiB", "1.5 GiB", "1000000" (units: B, KB,
    MB, GB, TB powers of 1000, KiB, MiB, GiB, TiB powers of 1024; case ignored). One-line
    ValueError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    if not m or unit not in UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a memory size; allowed: a number > 0 with a unit, "
                         "e.g. 16GiB, 80GB, 512MiB (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * UNITS[unit])


def format_bytes(n):
    """'1.23 GiB', '456 MiB', '12.0 KiB', '17 B'."""
    if n is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if abs(n) < 1000 * size else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named target: `name` as given, its `kind` (a `DEVICE_KINDS` key), JAX devices and
    memory per device."""

    name: str
    kind: str
    devices: int
    memory: int
    platform: str


def parse_topology(text):
    """A `Topology` of "KIND-COUNT": v5e-256 (256 chips), v4-8 (8 TensorCores = 4 chips), h100-8
    (8 GPUs), a100-80gb-16. One-line ValueError for an unknown kind or a bad count."""
    kind, _, count = str(text).lower().rpartition("-")
    allowed = ("KIND-COUNT with KIND one of " + ", ".join(DEVICE_KINDS)
               + ", e.g. v5e-256, v4-8, h100-8")
    if kind not in DEVICE_KINDS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{text!r} is not a known topology; allowed: {allowed}")
    spec = DEVICE_KINDS[kind]
    devices = int(count) * spec["per_unit"]
    if devices != int(devices) or devices < 1:
        raise ValueError(f"{text!r}: {kind} topologies count TensorCores, two per chip; "
                         f"allowed: an even count, e.g. {kind}-8")
    return Topology(str(text), kind, int(devices), spec["memory"], spec["platform"])


def parse_mesh(text):
    """{axis: size} of "data=8,fsdp=1,tensor=1" (any subset of the axes; sizes integers >= 1 or
    -1, the rest of the devices). One-line ValueError for an unknown axis or a bad size."""
    sizes = {}
    for part in str(text).split(","):
        name, eq, value = part.strip().partition("=")
        if name not in AXES:
            raise ValueError(f"{name!r} is not a mesh axis; allowed: {', '.join(AXES)} "
                             "(e.g. data=8,fsdp=1,tensor=1)")
        try:
            size = int(value)
        except ValueError:
            size = None
        if not eq or size is None or (size < 1 and size != -1):
            raise ValueError(f"{part.strip()!r}: a mesh size must be an integer >= 1 or -1 "
                             "(the rest of the devices)")
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} is given twice")
        sizes[name] = size
    return sizes


def resolve_mesh(sizes, devices):
    """(data, fsdp, tensor) of `sizes` ({axis: size}, missing axes: data -1, others 1) over
    `devices` devices. One-line ValueError when they do not multiply to the devices."""
    full = {"data": -1, "fsdp": 1, "tensor": 1}
    full.update({k: sizes[k] for k in AXES if k in sizes})
    if "data" not in sizes and -1 in (sizes.get("fsdp"), sizes.get("tensor")):
        full["data"] = 1
    text = ",".join(f"{k}={v}" for k, v in full.items())
    if list(full.values()).count(-1) > 1:
        raise ValueError(f"mesh {text}: at most one axis may be -1 (the rest)")
    known = math.prod(v for v in full.values() if v != -1)
    if devices % known or (-1 not in full.values() and known != devices):
        raise ValueError(f"mesh {text} does not fit {devices} devices: the sizes must multiply "
                         f"to {devices} (or divide it, with one axis -1 for the rest)")
    return tuple(devices // known if v == -1 else v for v in full.values())


class NoTpuCompiler(RuntimeError):
    """libtpu (the TPU compiler) is not available in this process."""


def tpu_devices(topology):
    """The devices of a TPU `Topology` as libtpu describes them (`get_topology_desc`), to
    compile for without the hardware; NoTpuCompiler (one line) when libtpu is missing."""
    from jax.experimental import topologies

    grid = _grid(topology.devices, DEVICE_KINDS[topology.kind]["grid"])
    name = f"{topology.kind}:{'x'.join(map(str, grid))}"
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # no libtpu: RuntimeError "JAX TPU support not installed"
        raise NoTpuCompiler(f"no TPU compiler here ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _grid(n, dims):
    """A near-cubic (dims=3) or near-square (dims=2) grid of n chips (powers of two first)."""
    grid = [1] * dims
    i = 0
    while n > 1 and n % 2 == 0:
        grid[i % dims] *= 2
        n //= 2
        i += 1
    grid[0] *= n
    return sorted(grid)


def use_cpu_devices(n):
    """True when this process can compile for `n` CPU devices: it has them already, or JAX has
    not started yet and is set to make them now (`jax_num_cpu_devices`, CPU only); False when
    JAX runs with fewer (start a fresh process then)."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", max(int(n), 1))
        return True
    return len(jax.devices("cpu")) >= n


def cpu_devices(n):
    """The first n host CPU devices (`use_cpu_devices` made enough)."""
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise RuntimeError(f"{n} CPU devices wanted, this process has {len(devices)}")
    return devices[:n]


def state_bytes(abstract):
    """Per-device bytes of an abstract TrainState (leaves with `.sharding`): {params, opt_state,
    ema, other (step, PRNG key)}, each leaf's shard shape × itemsize (the largest shard)."""

    def size(tree):
        return sum(_shard_bytes(a) for a in jax.tree.leaves(tree))

    return {"params": size(abstract.params), "opt_state": size(abstract.opt_state),
            "ema": size(abstract.ema_params), "other": size((abstract.step, abstract.rng))}


def _shard_bytes(a):
    shape = a.sharding.shard_shape(a.shape) if getattr(a, "sharding", None) else a.shape
    return math.prod(shape) * jnp.dtype(a.dtype).itemsize


def abstract_batch(global_batch, x_shape, mesh, x_dtype=jnp.float32):
    """The batch a train step takes, {"x": (B, *x_shape), "label": (B,) int32}, abstract and
    split over data×fsdp (as `parallel.shard_batch` puts it)."""
    sharding = parallel.batch_sharding(mesh)
    return {"x": jax.ShapeDtypeStruct((global_batch,) + tuple(x_shape), x_dtype,
                                      sharding=sharding),
            "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding)}


@dataclasses.dataclass
class MemoryPlan:
    """Per-device bytes of one compiled train step (see the module doc)."""

    remat: str
    mesh: dict
    batch_per_device: int
    global_batch: int
    params: int
    opt_state: int
    ema: int
    other_state: int
    batch: int
    arguments: int
    outputs: int
    aliases: int
    temp: int
    code: int
    total: int
    device_memory: int | None
    compile_s: float
    platform: str

    @property
    def state(self):
        return self.params + self.opt_state + self.ema + self.other_state

    @property
    def fits(self):
        return None if self.device_memory is None else self.total <= self.device_memory

    def to_dict(self):
        return dict(dataclasses.asdict(self), state=self.state, fits=self.fits)


def compile_train_step(train_step, abstract, batch, mesh):
    """The train step compiled ahead of time (`parallel.jit_train_step`: the state donated and
    in its shardings, the batch split over data×fsdp) on abstract inputs; nothing runs."""
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    return parallel.jit_train_step(train_step, shardings, mesh).lower(abstract, batch).compile()


def plan_step(model, tx, train_step, *, mesh, x_shape, num_classes, ema_decays, global_batch,
              x_dtype=jnp.float32, device_memory=None, remat="", platform="cpu"):
    """The `MemoryPlan` of `train_step` (from `make_train_step`, on `model` and `tx`) with a
    global batch of `global_batch` examples of `x_shape` on `mesh` (compiled, not run).
    ValueError (one line) when the batch does not split over data×fsdp."""
    parallel.check_batch(global_batch, mesh)
    abstract = abstract_state(model, tx, x_shape=x_shape, num_classes=num_classes,
                              ema_decays=tuple(ema_decays), mesh=mesh)
    batch = abstract_batch(global_batch, x_shape, mesh, x_dtype)
    t0 = time.perf_counter()
    compiled = compile_train_step(train_step, abstract, batch, mesh)
    return plan_of(compiled, abstract, batch, mesh, device_memory=device_memory, remat=remat,
                   platform=platform, compile_s=time.perf_counter() - t0)


def plan_of(compiled, abstract, batch, mesh, *, device_memory=None, remat="", platform="cpu",
            compile_s=0.0):
    """The `MemoryPlan` of a train step `compiled` (`compile_train_step`) for the abstract
    state and batch."""
    global_batch = batch["x"].shape[0]
    m = compiled.memory_analysis()
    s = state_bytes(abstract)
    args, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    alias, temp = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    return MemoryPlan(remat=str(remat), mesh=dict(mesh.shape), batch_per_device=global_batch // dp,
                      global_batch=global_batch, params=s["params"], opt_state=s["opt_state"],
                      ema=s["ema"], other_state=s["other"],
                      batch=sum(_shard_bytes(a) for a in jax.tree.leaves(batch)),
                      arguments=args, outputs=out, aliases=alias, temp=temp,
                      code=int(m.generated_code_size_in_bytes),
                      total=args + out - alias + temp, device_memory=device_memory,
                      compile_s=round(compile_s, 1), platform=platform)


def largest_batch(plan_at, device_memory, *, start=1, max_compiles=10, cap=2**16):
    """The largest per-device batch whose plan fits `device_memory`: `plan_at(b)` compiles for
    per-device batch b and returns its `MemoryPlan`. Doubling (or halving) from `start` to
    bracket the limit, then a linear interpolation of the totals (and its neighbour), stopping at
    a bracket of one, or after `max_compiles`
    compiles (then the bracket is returned). Returns (best plan or None when even batch 1 does
    not fit, the smallest batch known not to fit or None, {batch: plan} of every compile)."""
    tried = {}

    def fits(b):
        if b not in tried:
            tried[b] = plan_at(b)
        return tried[b].fits

    lo, hi = None, None  # largest known fit, smallest known miss
    b = max(1, int(start))
    while len(tried) < max_compiles:
        if fits(b):
            lo = b
            if b >= cap:
                break
            b = min(2 * b, cap)
        else:
            hi = b
            if b == 1:
                break
            b = max(1, b // 2)
        if lo is not None and hi is not None:
            break
    while lo is not None and hi is not None and hi - lo > 1 and len(tried) < max_compiles:
        guess = _guess(tried, lo, hi, device_memory)
        if fits(guess):  # memory is about linear in the batch: the guess is usually right,
            lo, probe = guess, guess + 1  # so its neighbour settles it
        else:
            hi, probe = guess, guess - 1
        if lo < probe < hi and len(tried) < max_compiles:
            if fits(probe):
                lo = probe
            else:
                hi = probe
    return (tried[lo] if lo is not None else None), hi, tried


def _guess(tried, lo, hi, memory):
    """The next batch in (lo, hi): where the line through the two plans' totals meets the
    memory (memory grows about linearly with the batch); bisection when it does not grow."""
    a, b = tried[lo].total, tried[hi].total
    x = lo + (memory - a) * (hi - lo) / (b - a) if b > a else (lo + hi) / 2
    return int(min(max(math.floor(x), lo + 1), hi - 1))


COLUMNS = ("remat", "batch/dev", "params", "opt state", "EMA", "batch", "temp", "out-alias",
           "total/dev", "fits")


def table(plans):
    """Markdown rows of `MemoryPlan`s (per-device bytes)."""
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for p in plans:
        fits = "-" if p.fits is None else (
            f"{'yes' if p.fits else 'NO'} ({100 * p.total / p.device_memory:.0f}%)")
        cells = (p.remat, str(p.batch_per_device), *map(format_bytes, (
            p.params, p.opt_state, p.ema, p.batch, p.temp, p.outputs - p.aliases, p.total)), fits)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)

