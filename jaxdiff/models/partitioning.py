"""Logical axis names of the models' parameters and activations, and the rules that map them
onto the mesh axes ("data", "fsdp", "tensor").

The models name their axes logically (`nn.with_logical_partitioning`); `LOGICAL_RULES` maps those
names onto mesh axes in one place. The models need this at trace time (attention runs its Pallas
kernel per shard under a mesh); meshes, sharded init and the sharded train step build on it in
`jaxdiff.train.parallel`.
"""

from __future__ import annotations

import math

from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; "tensor" holds whole batches

# logical axis name -> mesh axes, in order of priority. A mesh axis is used at most once per
# array: in a ("embed", "embed") kernel or a ("batch", ..., "embed") activation the later axis
# stays whole. An axis whose size the mesh axes do not divide stays whole too (see `mesh_spec`).
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),  # transformer / MLP width
    ("conv_out", "fsdp"),  # conv output channels (and their norm scale/bias)
    ("mlp", "tensor"),  # MLP hidden units
    ("heads", "tensor"),  # attention heads (q, k, v, output projection)
    ("kv", "tensor"),
    ("conv_in", None),  # conv input channels: conv_out already carries fsdp
    ("vocab", None),  # class-label table: K + 1 rows rarely divide anything
    ("length", None),  # tokens
)


def mesh_spec(logical, shape, mesh, rules=LOGICAL_RULES):
    """The mesh PartitionSpec for an array of `shape` whose axes are named `logical`.

    Each named axis takes its rule's mesh axes if none of them is already used by this array
    and their total size divides the axis; otherwise it stays whole (replicated)."""
    table, used, out = dict(rules), set(), []
    for name, dim in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or used & set(axes) or dim % size:
            out.append(None)
            continue
        used |= set(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)
