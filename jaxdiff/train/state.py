"""The train state and its creation: `TrainState` is data only (step, params, EMA params,
optimizer state, PRNG key); `init_state` creates it, already sharded on a mesh when given one
(`jaxdiff.train.parallel`), `abstract_state` describes it without allocating (a restore target).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp

from jaxdiff.train import parallel


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: tuple  # one parameter tree per EMA decay
    opt_state: Any
    rng: jax.Array  # raw uint32 key data


def init_state(model, tx, *, x_shape, num_classes, seed, ema_decays, mesh=None,
               rules=parallel.LOGICAL_RULES):
    """A fresh TrainState; wrap in `jax.eval_shape` for the abstract one (no allocation).

    With `mesh`, the state is created already sharded (params, EMA and optimizer moments by the
    models' logical axis names and `rules`; see `jaxdiff.train.parallel`): one jitted init whose
    outputs land in their shards, so no device or host ever holds the whole state."""
    init = functools.partial(_init_state, model, tx, x_shape=x_shape, num_classes=num_classes,
                             seed=seed, ema_decays=ema_decays)
    if mesh is None:
        return init()
    shardings = state_shardings(model, tx, mesh, x_shape=x_shape, num_classes=num_classes,
                                ema_decays=ema_decays, rules=rules)
    return parallel.create_sharded(init, shardings)


def state_shardings(model, tx, mesh, *, x_shape, num_classes, ema_decays,
                    rules=parallel.LOGICAL_RULES):
    """The NamedSharding of every leaf of this model's TrainState on `mesh` (no allocation)."""
    abstract = jax.eval_shape(functools.partial(
        _init_state, model, tx, x_shape=x_shape, num_classes=num_classes, seed=0,
        ema_decays=ema_decays))
    boxed = jax.eval_shape(lambda: _variables(model, x_shape, num_classes,
                                              jax.random.PRNGKey(0)))
    return parallel.state_shardings(abstract, parallel.param_specs(boxed), tx, mesh, rules)


def abstract_state(model, tx, *, x_shape, num_classes, ema_decays, mesh=None,
                   rules=parallel.LOGICAL_RULES):
    """ShapeDtypeStructs of the TrainState (with `.sharding` on `mesh`): a restore target."""
    kw = dict(x_shape=x_shape, num_classes=num_classes, ema_decays=ema_decays)
    abstract = jax.eval_shape(lambda: _init_state(model, tx, seed=0, **kw))
    if mesh is None:
        return abstract
    shardings = state_shardings(model, tx, mesh, rules=rules, **kw)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def _variables(model, x_shape, num_classes, key):
    """The model's variables, boxed with logical axis names."""
    x = jnp.zeros((1,) + tuple(x_shape), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if num_classes else None
    kw = {"w": jnp.ones((1,))} if getattr(model, "guidance_embed", False) else {}
    return model.init({"params": key}, x, jnp.zeros((1,)), y, **kw)


def _init_state(model, tx, *, x_shape, num_classes, seed, ema_decays):
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    # the models box params with logical axis names; the state holds plain arrays
    params = flax.linen.unbox(_variables(model, x_shape, num_classes, init_key))["params"]
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                      ema_params=tuple(jax.tree.map(jnp.copy, params) for _ in ema_decays),
                      opt_state=tx.init(params),
                      rng=rng)
