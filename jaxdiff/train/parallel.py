"""Meshes and shardings: data, FSDP and tensor parallelism over one `jax.make_mesh`.

The mesh has axes ("data", "fsdp", "tensor"). The models name their parameter and activation axes
logically (`nn.with_logical_partitioning`); `LOGICAL_RULES` maps those names onto mesh axes in one
place. Batches are split over data×fsdp (FSDP is data parallelism whose parameters are also
sharded, ZeRO-3 style, Rajbhandari et al. 2020); "tensor" splits attention heads and MLP hidden
units (Megatron-LM, Shoeybi et al. 2019, Sec. 3). Shardings are explicit: the train state is
created already sharded (`jax.eval_shape` for the skeleton, then `jax.jit` with `out_shardings`,
so no host ever holds the whole state) and the train step is jitted with in/out shardings. Works
the same on one CPU, one GPU, a pod slice or several processes (`jax.distributed.initialize`).

The logical axis names and their rules live with the models (`jaxdiff.models.partitioning`),
which need them at trace time to run Pallas kernels per shard; they are re-exported here.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff.models.partitioning import AXES, BATCH_AXES, LOGICAL_RULES, mesh_spec


def make_mesh(data=-1, fsdp=1, tensor=1, devices=None):
    """The ("data", "fsdp", "tensor") mesh over `devices` (default: all); one size may be -1,
    meaning all devices left over. The sizes must multiply to the number of devices."""
    devices = jax.devices() if devices is None else list(devices)
    n, sizes = len(devices), {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{name}={size!r} is not a mesh size; allowed: an integer >= 1 "
                             "or -1 (the rest of the devices)")
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh {sizes}: at most one axis may be -1 (the rest)")
    known = math.prod(s for s in sizes.values() if s != -1)
    shape = tuple(n // known if s == -1 else int(s) for s in sizes.values())
    if n % known or math.prod(shape) != n:
        raise ValueError(f"mesh sizes data={data}, fsdp={fsdp}, tensor={tensor} do not fit the "
                         f"{n} devices; the sizes must multiply to {n} (use -1 for the rest)")
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def replicated(mesh):
    """The sharding that puts a whole copy on every device of `mesh`."""
    return NamedSharding(mesh, P())


def logical_shardings(specs, abstract, mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) `abstract` whose logical
    PartitionSpecs are `specs` (e.g. `nn.get_partition_spec` of boxed model variables)."""
    return jax.tree.map(lambda s, x: NamedSharding(mesh, mesh_spec(s, x.shape, mesh, rules)),
                        specs, abstract, is_leaf=lambda s: isinstance(s, P))


def param_specs(boxed_variables):
    """Logical PartitionSpecs of the "params" collection of boxed (abstract) model variables;
    unboxed parameters (plain LayerNorm) get P(), i.e. replicated."""
    return nn.get_partition_spec(boxed_variables)["params"]


def state_shardings(abstract_state, specs, tx, mesh, rules=LOGICAL_RULES):
    """Shardings for a TrainState (step, params, ema_params, opt_state, rng): params, each EMA
    copy and every parameter-shaped part of the optimizer state follow the params' logical
    `specs`; the step, the PRNG key and optimizer scalars are replicated."""
    params = logical_shardings(specs, abstract_state.params, mesh, rules)
    rep = replicated(mesh)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, params,
                                transform_non_params=lambda _: rep)
    return abstract_state.replace(step=rep, params=params,
                                  ema_params=tuple(params for _ in abstract_state.ema_params),
                                  opt_state=opt, rng=rep)


def create_sharded(init_fn, shardings):
    """`init_fn()` computed directly into `shardings`: each device builds only its shards."""
    return jax.jit(init_fn, out_shardings=shardings)()


def shardings_of(tree):
    """The `.sharding` of every array in `tree` (a sharded state's own layout)."""
    return jax.tree.map(lambda a: a.sharding, tree)


def batch_sharding(mesh):
    """Leading (batch) axis split over data×fsdp, replicated over tensor."""
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch(global_batch, mesh):
    """Raises unless the global batch splits evenly over the data×fsdp devices."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % n:
        raise ValueError(f"global batch size {global_batch} is not divisible by data×fsdp = "
                         f"{mesh.shape['data']}×{mesh.shape['fsdp']} = {n} devices")


def shard_batch(local_batch, mesh):
    """This process's batch (a pytree of host arrays, leading axis = batch) as global arrays
    split over data×fsdp; the global batch is the concatenation over processes."""
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        check_batch(shape[0], mesh)
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(put, local_batch)


@contextlib.contextmanager
def tracing_on(mesh, rules=LOGICAL_RULES):
    """Traces under `mesh` (abstractly) and the logical-axis `rules`: the models' activation
    constraints apply and the Pallas attention kernel runs per shard (`jax.shard_map`)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


def jit_train_step(train_step, shardings, mesh, rules=LOGICAL_RULES, *, with_frozen=False):
    """`train_step(state, batch)` jitted with explicit shardings: the state in and out in
    `shardings` (donated), the batch split over data×fsdp, metrics replicated. The step is
    traced with `rules` and the mesh active, so the models' activation constraints apply.
    with_frozen: the step takes a third argument (an objective's frozen inputs), replicated."""

    def step(state, batch, *frozen):
        with tracing_on(mesh, rules):
            return train_step(state, batch, *frozen)

    in_shardings = (shardings, batch_sharding(mesh)) + ((replicated(mesh),) if with_frozen else ())
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(shardings, replicated(mesh)),
                   donate_argnums=0)


def padded_size(num, mesh):
    """`num` rounded up to a multiple of the data×fsdp devices."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    return -(-num // n) * n


def per_index_normal(key, num, shape, mesh):
    """Standard normal (num, *shape), row i drawn from `fold_in(key, i)`, created split over
    data×fsdp: row i is the same whatever `num` or the device count."""
    draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), tuple(shape))  # noqa: E731
    return jax.jit(lambda: jax.vmap(draw)(jnp.arange(num)), out_shardings=batch_sharding(mesh))()


def put_global(x, mesh):
    """A host array that every process holds whole, as a global array split over data×fsdp."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh), lambda idx: x[idx])


def gather(x):
    """A (possibly multi-process) global array, whole, on every host as numpy."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
