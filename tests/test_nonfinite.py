"""Non-finite steps (`jaxdiff.train.nonfinite`): the skip guard keeps the state, `check_finite`
is one line in the library's words, and end to end a NaN stops `jaxdiff train` with one line
naming the flags (or, with train.skip_nonfinite, the run finishes): `jaxdiff train` in this
process (tests/_cli.py `here`), its train step poisoned by tests/_runs.py `nan_at`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff.train import nonfinite
from jaxdiff.train.checkpoint import Checkpointer
from tests._cli import here
from tests._runs import DESC, TOY, final, nan_at, read_all, state


def _toy_step(tx):
    def step(state, batch):
        loss, grads = jax.value_and_grad(lambda p: jnp.sum(p["w"] * batch["x"]))(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": jnp.float32(0.1)}
        return state.replace(step=state.step + 1, params=params, ema_params=(params,),
                             opt_state=opt_state), metrics
    return step


def test_skip_nonfinite_keeps_state_and_advances_step():
    start = state(1, n=4)  # Adam moments, as _toy_step's optimizer
    step = jax.jit(nonfinite.with_skip_nonfinite(_toy_step(optax.adam(1e-3))))
    good, m = step(start, {"x": jnp.ones(4)})
    assert int(good.step) == 2 and float(m["skipped"]) == 0.0
    assert not np.array_equal(good.params["w"], start.params["w"])
    bad, m = step(good, {"x": jnp.array([1.0, jnp.nan, 1.0, 1.0])})
    assert int(bad.step) == 3 and float(m["skipped"]) == 1.0 and np.isnan(m["loss"])
    for a, b in zip(jax.tree.leaves(bad.replace(step=good.step)), jax.tree.leaves(good)):
        np.testing.assert_array_equal(a, b)  # params, EMA, optimizer state (count too) kept
    huge = good.replace(params={**good.params, "w": jnp.full(4, 1e30)})  # finite; norm is not
    out, m = jax.jit(nonfinite.skip_nonfinite)(good, huge, {"loss": 1.0, "grad_norm": 1.0})
    assert float(m["skipped"]) == 0.0 and out.params["w"][0] == np.float32(1e30)


def test_check_finite_names_step_and_last_good_checkpoint(tmp_path):
    nonfinite.check_finite({"loss": np.float32(1.0)}, 3)
    with pytest.raises(FloatingPointError) as e:
        nonfinite.check_finite({"loss": np.float32(np.nan), "lr": 1.0}, 7)
    assert str(e.value) == ("non-finite loss at step 7; no checkpoint was written yet; lower the "
                            "learning rate, or wrap the train step in with_skip_nonfinite to "
                            "skip such updates")
    ckpt = Checkpointer(tmp_path)
    ckpt.save(4, state(4), {}, DESC)
    ckpt.wait()
    with pytest.raises(FloatingPointError) as e:
        nonfinite.check_finite({"loss": np.inf, "grad_norm": np.nan}, 9, ckpt)
    d = tmp_path / "checkpoints"
    assert str(e.value) == (  # the library's words: no command-line flag in them
        f"non-finite loss, grad_norm at step 9; the last good checkpoint is step 4 in {d} "
        f"(untouched); lower the learning rate in a fresh work directory holding a copy of {d}, "
        "or wrap the train step in with_skip_nonfinite to skip such updates")
    nonfinite.check_finite({"loss": np.nan, "grad_norm": np.nan, "skipped": 1.0}, 9)  # guarded
    ckpt.close()
    with pytest.raises(FloatingPointError, match="non-finite lr at step 9"):
        nonfinite.check_finite({"loss": np.nan, "lr": np.nan, "skipped": 1.0}, 9)


def test_nonfinite_loss_stops_with_one_line_and_keeps_checkpoints(capfd, monkeypatch,
                                                                   tmp_path):
    nan_at(monkeypatch, 4)
    code, err = here(capfd, "train", *TOY, "--config.train.steps=8",
                     "--config.train.ckpt_every=2", "--config.train.log_every=5",
                     f"--workdir={tmp_path}")
    assert code == 1 and "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert lines == [  # the CLI puts its flags in for the library's words
        f"jaxdiff train: error: non-finite loss, grad_norm at step 4; the last good checkpoint "
        f"is step 2 in {tmp_path / 'checkpoints'} (untouched); lower --config.optim.lr in a "
        f"fresh --workdir holding a copy of {tmp_path / 'checkpoints'}, or set "
        "--config.train.skip_nonfinite=True to skip such updates"], err[-2000:]
    saved = read_all(tmp_path)  # step 4 (NaN params) was never written
    assert list(saved) == [2] and all(np.isfinite(x).all() for x in jax.tree.leaves(saved[2]))


def test_skip_nonfinite_finishes_the_run(capfd, monkeypatch, tmp_path):
    nan_at(monkeypatch, 4)
    code, err = here(capfd, "train", *TOY, "--config.train.steps=6",
                     "--config.train.ckpt_every=3", "--config.train.log_every=1",
                     "--config.train.skip_nonfinite=True", f"--workdir={tmp_path}")
    assert code == 0, err[-2000:]
    rows = {r["step"]: r for r in map(json.loads, open(tmp_path / "metrics.jsonl"))}
    assert [rows[s]["skipped"] for s in range(1, 7)] == [0, 0, 0, 1, 0, 0]
    assert np.isnan(rows[4]["loss"]) and np.isfinite(rows[5]["loss"])
    step, params = final(tmp_path)
    assert step == 6 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
