"""`jaxdiff sample --scheduler_config`: a diffusers scheduler_config.json on a trained run.

The session's digits run (tests/conftest.py) is an EDM model (prediction "edm"), which diffusers
expresses as `EDMEulerScheduler` / `EDMDPMSolverMultistepScheduler` with the same sigma_data;
the DDPM-style schedulers (a DiscreteVP of betas) do not match it, which the bad-input case
uses. Both run in this process (`tests._cli.main`): sample only reads the run.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

import jaxdiff
from jaxdiff.core.guidance import CFG
from jaxdiff.interop.diffusers import from_scheduler_config
from tests._cli import main

EDM_EULER = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0,
             "sigma_data": 0.5, "sigma_schedule": "karras", "prediction_type": "epsilon"}


def _write(tmp_path, config, name="scheduler_config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


def test_sample_with_a_scheduler_config_is_the_library_call(digits_run, tmp_path):
    from jaxdiff.cli import commands
    from jaxdiff.train import network, parallel

    path, png = _write(tmp_path, EDM_EULER), tmp_path / "x.png"
    code, errors = main("sample", f"--workdir={digits_run}", f"--scheduler_config={path}",
                        "--steps=3", "--num=2", f"--out={png}")
    assert code == 0, errors
    assert png.stat().st_size > 0
    got = np.load(tmp_path / "x.npz")["samples"]
    # the same draw through the library: the run's EMA params, noise normal(fold_in(key(0), i)),
    # classes 0, 1 under the run's CFG scale
    config = ConfigDict(json.load(open(digits_run / "config.json")))
    model, _, params, _ = commands.restore(config, str(digits_run), parallel.make_mesh())
    s = from_scheduler_config(EDM_EULER, 3)
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(0), i),
                                                 (8, 8, 1)))(jnp.arange(2))
    guide = CFG(scale=config.sampler.guidance, y=jnp.arange(2, dtype=jnp.int32),
                y_null=jnp.full(2, 10, jnp.int32))
    want = jaxdiff.sample(network(model, params), noise, **s.sample_kwargs(), guidance=guide)
    assert got.shape == (2, 8, 8, 1) and np.isfinite(got).all()
    np.testing.assert_allclose(got, np.asarray(want), rtol=0, atol=1e-5)


@pytest.mark.parametrize("flags,code,match", [
    (["--scheduler_config={ddim}"], 1,
     "--scheduler_config: DDIMScheduler implies the process DiscreteVP(num_train_timesteps=1000"
     ", alphas_cumprod[-1]=4.03"),
    (["--scheduler_config={euler}", "--sampler_file={euler}"], 2,
     "--scheduler_config={euler} and --sampler_file={euler} both choose the sampler"),
    (["--scheduler_config={tmp}/none.json"], 2, "no such file"),
], ids=["other-process", "with-sampler-file", "missing"])
def test_bad_scheduler_config_is_one_line(digits_run, tmp_path, monkeypatch, flags, code, match):
    ddim = _write(tmp_path, {"_class_name": "DDIMScheduler", "clip_sample": False}, "ddim.json")
    euler = _write(tmp_path, EDM_EULER)
    paths = dict(ddim=ddim, euler=euler, tmp=tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    got, errors = main("sample", f"--workdir={digits_run}", "--num=2",
                       *(f.format(**paths) for f in flags))
    assert got == code and len(errors) == 1 and match.format(**paths) in errors[0], errors
    assert "the model was trained with EDM(sigma_data=0.5)" in errors[0] or code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before
