"""Training system: the step, kill-and-resume bit-identity, the CLI's commands and errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import models, train
from jaxdiff.core import losses
from jaxdiff.core.process import EDM
from tests import _runs
from tests._cli import here, main, train_here

# the session's digits run read in this process: programs another module compiled for it
# are read back from the session's compilation cache (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("compiled_once")

TINY = _runs.TINY + ["--config.train.log_every=3"]  # a small, fast run of the digits config


def test_train_step_learns_and_is_pure():
    model = models.build("unet", channels=8, channel_mult=(1,), attn_resolutions=(),
                         norm_groups=4, num_classes=3)
    tx, lr_fn = train.make_optimizer(lr=3e-3, total_steps=60, warmup_steps=0)
    state = train.init_state(model, tx, x_shape=(8, 8, 1), num_classes=3, seed=0,
                             ema_decays=(0.5, 0.99))
    objective = train.diffusion_objective(model, process=EDM(), prediction="edm", num_classes=3,
                                          loss_options=dict(time_sampling="lognormal"))
    step = jax.jit(train.make_train_step(objective, tx, lr_fn, ema_decays=(0.5, 0.99)))
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.uniform(-1, 1, (16, 8, 8, 1)) > 0, jnp.float32) * 2 - 1,
             "label": jnp.asarray(rng.integers(0, 3, 16), jnp.int32)}
    first, _ = step(state, batch)
    again, _ = step(state, batch)  # same state, same batch: same result (randomness from step)
    # compared on the host: eager jnp ops would compile a program per leaf shape
    assert jax.tree.all(jax.tree.map(np.array_equal, *jax.device_get((first, again))))
    @jax.jit
    def held_out_loss(params):  # fixed noise draws: a deterministic measure of fit
        net = train.network(model, params)
        return jnp.mean(jax.vmap(lambda k: losses.diffusion_loss(
            net, batch["x"], jax.random.key(k), process=EDM(), prediction="edm",
            time_sampling="lognormal", args=(batch["label"],))[0])(jnp.arange(8)))

    before = float(held_out_loss(state.params))
    for _ in range(60):
        state, metrics = step(state, batch)
    assert int(state.step) == 60 and len(state.ema_params) == 2
    assert np.isfinite(float(metrics["loss"])) and float(metrics["lr"]) >= 0
    assert float(held_out_loss(state.params)) < 0.9 * before  # measured 0.81; no learning = 1.0
    # EMA with decay 0.99 (warmed up: min(d, (1+step)/(10+step))) lags further behind than 0.5
    params, emas = jax.device_get((state.params, state.ema_params))  # on the host, as above
    dist = [np.sqrt(sum(np.sum(np.square(np.asarray(e, np.float64) - p)) for e, p in
                        zip(jax.tree.leaves(ema), jax.tree.leaves(params)))) for ema in emas]
    assert 0 < float(dist[0]) < float(dist[1])


def test_sample_command_and_errors(digits_run, tmp_path, capfd, monkeypatch):
    """`jaxdiff sample` on the session's trained run (tests/conftest.py: 2 steps), and its bad
    flags, all in this process (tests/_cli.py): sample only reads the run."""
    report = json.load(open(digits_run / "report.json"))
    assert report["step"] == 2 and 0 <= report["classifier_agreement"] <= 1
    png = tmp_path / "grid.png"
    code, err = here(capfd, "sample", f"--workdir={digits_run}", "--num=6", "--steps=3",
                     "--class=3", "--guidance=2.0", f"--out={png}")
    assert code in (0, None), err[-2000:]
    arrays = np.load(tmp_path / "grid.npz")
    assert arrays["samples"].shape == (6, 8, 8, 1) and list(arrays["labels"]) == [3] * 6
    assert png.stat().st_size > 0
    monkeypatch.chdir(tmp_path)  # a bad command writes nothing here (checked below)
    for args, msg in [
        (["--num=0"], "--num=0 must be a positive number of samples"),
        (["--class=12"], "--class=12 is not a class of this model; allowed: 0..9"),
        (["--sampler=fast"], "sampler='fast' is unknown"),
    ]:
        code, errors = main("sample", f"--workdir={digits_run}", *args)
        assert code != 0 and len(errors) == 1 and msg in errors[0], errors
    code, errors = main("sample", f"--workdir={tmp_path / 'none'}")
    assert code != 0 and len(errors) == 1 and "no trained run in" in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.npz", "grid.png"]


def test_resuming_another_architecture_is_refused(digits_run, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)  # the session's run: 2 steps, a checkpoint at step 2
    # refused before it trains: in this process (tests/_cli.py), all of stderr captured
    code, err = train_here(capfd, *TINY, "--config.model.channels=16", "--config.train.steps=4",
                           f"--workdir={run}")
    assert code != 0
    assert "holds a checkpoint (step 2) of another architecture" in err
    assert len(err.strip().splitlines()) == 1  # one clear line, no traceback
    # remat changes how the network computes, not its parameters: the run resumes with it
    # (2 more steps, in this process too)
    code, err = train_here(capfd, *TINY, "--config.model.remat=True", "--config.train.steps=4",
                           f"--workdir={run}")
    assert code in (0, None), err[-2000:]
    assert "from step 2" in err


@pytest.mark.parametrize("args,msg", [
    (["--config.model.foo=3"], "unknown config key 'model.foo': valid keys in model:"),
    (["--config.train.steps=abc"], "flag --config.train.steps=abc"),
    (["--config=configs/nope.py"], "--config=configs/nope.py: no such file"),
    (["--config.optim.warmup_steps=50", "--config.train.steps=10"],
     "warmup_steps=50 must be in [0, total_steps=10)"),
    (["--config.model.channel_mult=(1,2,2,2)"], "not divisible"),
])
def test_bad_train_input(tmp_path, capfd, args, msg):
    """Refused before it trains: in this process (tests/_cli.py), all of stderr captured."""
    code, err = train_here(capfd, *TINY, *args, f"--workdir={tmp_path / 'w'}")
    assert code not in (0, None) and msg in err, err[-1500:]
