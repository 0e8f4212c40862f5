"""Pluggable objectives: `make_train_step(objective, ...)` trains any `objective(params, batch,
key, frozen) -> (loss, aux)` with the same loop, checkpoints and resume; a run stopped and
resumed ends bit-identical to an uninterrupted one for the diffusion loss and for a
teacher-student objective whose teacher comes in as `frozen`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import models, train
from jaxdiff.core.process import RectifiedFlow

MODEL = models.build("mlp", width=16, depth=1, num_classes=0)


class Batches:
    """A deterministic, checkpointable stream of 2-D batches (grain's get/set_state API)."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        rng = np.random.default_rng(self.i)
        self.i += 1
        return {"x": rng.standard_normal((8, 2)).astype(np.float32),
                "label": np.zeros(8, np.int32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def teacher_mse(params, batch, key, frozen):
    """The student matches the frozen teacher's output at noised inputs (a distillation toy)."""
    t = jax.random.uniform(key, (batch["x"].shape[0],))
    x = batch["x"] + jax.random.normal(jax.random.fold_in(key, 1), batch["x"].shape)
    student = train.ModelApply(MODEL)(params, x, t)
    teacher = train.ModelApply(MODEL)(frozen, x, t)
    err = jnp.mean((student - teacher) ** 2)
    return err, {"teacher_norm": jnp.mean(teacher ** 2)}


OBJECTIVES = {
    "diffusion": (train.diffusion_objective(MODEL, process=RectifiedFlow(), prediction="flow"),
                  False),
    "teacher_mse": (teacher_mse, True),
}


def _teacher():
    """Teacher params: random everywhere (a fresh MLP's last layer is zero, which would make a
    teacher that always answers 0)."""
    params = train.init_state(MODEL, train.make_optimizer(lr=1.0, total_steps=1)[0],
                              x_shape=(2,), num_classes=0, seed=7, ema_decays=()).params
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, p.shape, p.dtype)
                                     for k, p in zip(keys, leaves)])


def _run(workdir, objective, frozen, total_steps, seed=0):
    tx, lr_fn = train.make_optimizer(lr=1e-2, total_steps=6, schedule="constant")
    state = train.init_state(MODEL, tx, x_shape=(2,), num_classes=0, seed=seed,
                             ema_decays=(0.9,))
    step = train.make_train_step(objective, tx, lr_fn, ema_decays=(0.9,))
    return train.train(state, step, Batches(), workdir=str(workdir), total_steps=total_steps,
                       log_every=1, ckpt_every=3, log=False, frozen=frozen)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_stop_and_resume_is_bit_identical(tmp_path, name):
    objective, needs_teacher = OBJECTIVES[name]
    frozen = _teacher() if needs_teacher else None
    straight = _run(tmp_path / "a", objective, frozen, total_steps=6)
    _run(tmp_path / "b", objective, frozen, total_steps=3)  # stops after the step-3 checkpoint
    resumed = _run(tmp_path / "b", objective, frozen, total_steps=6)
    assert int(resumed.step) == int(straight.step) == 6
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_objective_reads_frozen_and_reports_scalar_aux():
    tx, lr_fn = train.make_optimizer(lr=1e-2, total_steps=10, schedule="constant")
    init = lambda seed: train.init_state(MODEL, tx, x_shape=(2,), num_classes=0,  # noqa: E731
                                         seed=seed, ema_decays=(0.9,))
    state, teacher = init(0), _teacher()
    step = jax.jit(train.make_train_step(teacher_mse, tx, lr_fn, ema_decays=(0.9,)))
    batch = next(Batches())
    first = None
    for _ in range(30):
        state, metrics = step(state, batch, teacher)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < 0.5 * first  # the student moves towards the teacher
    assert set(metrics) == {"loss", "grad_norm", "lr", "teacher_norm"}
    # with the student as its own teacher the loss is 0 (to rounding: XLA may compile the
    # student's and the teacher's forward passes differently, e.g. with fast compiles)
    _, same = step(state, batch, state.params)
    assert float(same["loss"]) < 1e-12 * first
