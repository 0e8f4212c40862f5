"""Latent diffusion through `jaxdiff train`: an autoencoder run (configs/digits_vae.py), its
latents as a cached dataset, a latent DiT run (configs/digits_latent_dit.py) whose samples are
decoded, and the one-line refusals. Tiny runs in this process (tests/_cli.py `here`)."""

import json
import os
import runpy
import shutil

import flax
import jax
import numpy as np
import pytest
from PIL import Image

from jaxdiff.cli import build, validate
from jaxdiff.data import latents as latents_lib
from jaxdiff.interop import autoencoder_kl
from tests._cli import here, train_here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAE = ["--config=configs/digits_vae.py", "--config.model.block_out_channels=(8,16)",
       "--config.model.norm_num_groups=4", "--config.model.mid_block_add_attention=False",
       "--config.data.batch_size=16", "--config.optim.warmup_steps=1",
       "--config.train.steps=2", "--config.train.log_every=1", "--config.train.ckpt_every=2",
       "--config.train.sample_every=0", "--config.train.num_samples=10"]
DIT = ["--config=configs/digits_latent_dit.py", "--config.model.hidden_size=16",
       "--config.model.depth=1", "--config.model.num_heads=2", "--config.data.batch_size=16",
       "--config.optim.warmup_steps=1", "--config.train.steps=2", "--config.train.log_every=1",
       "--config.train.sample_every=0", "--config.train.num_samples=10",
       "--config.sampler.steps=2"]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A 2-step autoencoder run on digits16 (8x8x2 latents), trained once for the module."""
    workdir = tmp_path_factory.mktemp("latent") / "vae"
    code, err = here(None, "train", *VAE, f"--workdir={workdir}")
    assert code in (0, None), err[-2000:]
    return str(workdir)


def latent_config(vae):
    config = runpy.run_path(os.path.join(ROOT, "configs", "digits_latent_dit.py"))["get_config"]()
    config.data.latents = vae
    return config


def test_autoencoder_run_reports_psnr(vae_run):
    report = json.load(open(os.path.join(vae_run, "report.json")))
    assert report["step"] == 2 and report["num_images"] == 200 and report["split"] == "test"
    assert report["latent_shape"] == [8, 8, 2]
    assert 0 < report["mse"] < 4  # images and clipped reconstructions both lie in [-1, 1]
    assert report["psnr"] == pytest.approx(10 * np.log10(4 / report["mse"]))
    assert np.isfinite(report["fd_reconstruction"]) and report["fd_reconstruction"] > 0
    assert 0 <= report["classifier_agreement"] <= 1
    rows = [json.loads(r) for r in open(os.path.join(vae_run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["kl"] >= 0 and r["rec"] > 0 for r in rows)
    # 10 held-out digits over their reconstructions: 2 rows of 10 16x16 tiles, 4x upscaled
    grid = Image.open(os.path.join(vae_run, "samples", "step_0000002.png"))
    assert grid.size == ((10 * 17 - 1) * 4, (2 * 17 - 1) * 4)
    # the train state's params are a plain AutoencoderKL's: they load and export as such
    vae, params, step = build.autoencoder(vae_run)
    plain = autoencoder_kl.from_config(autoencoder_kl.config_of(vae))
    assert step == 2 and jax.tree.structure(params) == jax.tree.structure(
        flax.linen.unbox(autoencoder_kl.abstract_params(plain)))


def test_latent_cache_written_once_and_equal_to_a_direct_encode(vae_run):
    config = latent_config(vae_run)
    path = build.latents_path(config, "train")
    assert not os.path.exists(path)
    first = build.latents(config, "train")
    stamp = os.stat(path).st_mtime_ns
    again = build.latents(config, "train")  # read back, not encoded anew
    assert os.stat(path).st_mtime_ns == stamp
    assert np.array_equal(first["z"], again["z"]) and first["vae_step"] == 2
    assert first["z"].shape == (1597, 8, 8, 2) and first["data"] == "digits16"
    # the posterior means of the train split under the run's EMA params
    vae, params, _ = build.autoencoder(vae_run)
    images, labels = build.split_arrays("digits16", "train")
    direct = jax.jit(lambda x: vae.apply({"params": params}, x, method="encode").mean)
    np.testing.assert_allclose(first["z"][:256], direct(images[:256]), rtol=1e-5, atol=1e-6)
    assert np.array_equal(first["label"], labels)
    scaled = latents_lib.to_latent(first["z"], first["scale"], first["shift"])
    assert first["scale"] == pytest.approx(1 / np.std(first["z"].astype(np.float64)))
    assert abs(scaled.mean()) < 1e-5 and scaled.std() == pytest.approx(1.0, abs=1e-5)
    # the test split: scaled with the train split's statistics
    test = build.latents(config, "test")
    assert test["z"].shape == (200, 8, 8, 2) and test["scale"] == first["scale"]
    # batches: (z - shift) * scale of train examples, with their labels
    batch = next(build.dataset(config, seed=0))
    flat = scaled.reshape(len(scaled), -1)
    rows = [int(np.argmin(np.abs(flat - b.reshape(1, -1)).max(axis=1))) for b in batch["x"]]
    assert batch["x"].shape == (32, 8, 8, 2)
    np.testing.assert_array_equal(batch["x"], scaled[rows])
    np.testing.assert_array_equal(batch["label"], first["label"][rows])
    # checkpointable: a fresh iterator set to a saved state goes on with the same batches
    it = build.dataset(config, seed=0)
    next(it)
    state, expected = it.get_state(), [next(it)["x"] for _ in range(2)]
    resumed = build.dataset(config, seed=0)
    resumed.set_state(state)
    assert all(np.array_equal(next(resumed)["x"], x) for x in expected)
    with pytest.raises(ValueError, match=r"holds latents made with vae_step=2, not 7 as now"):
        latents_lib.cached(path, dict, expect=dict(vae_step=7))


def test_latent_dit_trains_and_reports_fd_of_decoded_samples(vae_run, tmp_path, capfd):
    workdir = tmp_path / "dit"
    code, err = train_here(capfd, *DIT, f"--config.data.latents={vae_run}",
                           f"--workdir={workdir}")
    assert code in (0, None), err[-2000:]
    report = json.load(open(workdir / "report.json"))
    assert report["step"] == 2 and report["num_samples"] == 10
    assert np.isfinite(report["fd"]) and report["fd"] > 0 and report["fd_split"] == "test"
    assert np.isfinite(report["fd_real"]) and 0 <= report["classifier_agreement"] <= 1
    assert report["autoencoder"]["step"] == 2
    assert report["autoencoder"]["workdir"] == os.path.abspath(vae_run)
    # the training-time grid: 10 decoded 16x16 digits (one column per class), 4x upscaled
    grid = Image.open(workdir / "samples" / "step_0000002.png")
    assert grid.size == ((10 * 17 - 1) * 4, 16 * 4)
    # jaxdiff sample: decoded images too, not latents
    code, err = here(capfd, "sample", f"--workdir={workdir}", "--num=10", "--steps=2",
                     f"--out={tmp_path / 'grid.png'}")
    assert code in (0, None), err[-2000:]
    samples = np.load(tmp_path / "grid.npz")["samples"]
    assert samples.shape == (10, 16, 16, 1) and np.all(np.isfinite(samples))
    # what works on pixels only is refused on latent (and autoencoder) runs, in one line
    refused = [(("sample", f"--workdir={workdir}", "--steer=smc:particles=2",
                 "--reward=classifier:digit=3"), "this is a latent run (data.latents)"),
               (("eval", f"--workdir={workdir}", "--metrics=nll"),
                "a latent run (data.latents) models latents, not pixels"),
               (("solve", f"--workdir={workdir}", "--task=inpaint:box",
                 f"--input={tmp_path / 'grid.npz'}"), "is a latent or autoencoder run"),
               (("sample", f"--workdir={vae_run}"), "is an autoencoder run (model.name=auto")]
    for args, message in refused:
        code, err = here(capfd, *args)
        lines = [ln for ln in err.splitlines() if "error:" in ln]
        assert code in (1, 2) and len(lines) == 1 and message in lines[0], err[-2000:]


def _fake_run(path, model):
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model": model, "data": {"name": "digits16"}}, f)
    return str(path)


def test_bad_latent_and_autoencoder_configs(vae_run, tmp_path, capfd):
    """The shipped configs pass `check_config` (the latent one naming a trained autoencoder
    run); each bad setting is refused in one line before anything is written."""
    validate.check_config(runpy.run_path(os.path.join(ROOT, "configs", "digits_vae.py"))[
        "get_config"]())
    validate.check_config(latent_config(vae_run))
    unet = _fake_run(tmp_path / "unet", {"name": "unet"})
    untrained = _fake_run(tmp_path / "untrained", {"name": "autoencoder_kl"})
    moved = tmp_path / "moved"  # the autoencoder trained further since its latents were encoded
    shutil.copytree(vae_run, moved)
    build.latents(latent_config(str(moved)), "train")
    os.rename(moved / "checkpoints" / "2", moved / "checkpoints" / "4")
    cases = [
        (DIT + [f"--config.data.latents={tmp_path / 'none'}"],
         f"data.latents={tmp_path / 'none'}: no jaxdiff run there"),
        (DIT + [f"--config.data.latents={unet}"],
         f"data.latents={unet} is a run of model.name='unet', not an autoencoder run"),
        (DIT + [f"--config.data.latents={untrained}"],
         f"data.latents={untrained} has no checkpoint yet"),
        (DIT + [f"--config.data.latents={moved}"],
         "were encoded at step 2 of the autoencoder, which is now at step 4"),
        (DIT + [f"--config.data.latents={vae_run}", "--config.data.name=digits"],
         "encodes images of shape (16, 16, 1) ('digits16'), not the (8, 8, 1) of "
         "data.name='digits'"),
        (VAE + ["--config.loss.reconstruction=l3"],
         "loss.reconstruction='l3' is unknown; allowed: l1, l2"),
        (VAE + ["--config.loss.kl_weight=-1.0"], "loss.kl_weight=-1.0 must be a finite number"),
        (VAE + ["--config.model.in_channels=3"],
         "model.in_channels=3 does not match the 1-channel images of data.name='digits16'"),
        (VAE + ["--config.model.down_block_types=('DownEncoderBlock2D',)"],
         "AutoencoderKL config down_block_types=['DownEncoderBlock2D'] is not supported"),
    ]
    for args, msg in cases:
        workdir = tmp_path / "w"
        code, err = train_here(capfd, *args, f"--workdir={workdir}")
        lines = err.strip().splitlines()
        assert code not in (0, None) and len(lines) == 1 and msg in lines[0], (msg, err[-1500:])
        assert not workdir.exists()
