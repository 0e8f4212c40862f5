"""Every shipped config loads and wires: process, model (shapes only), optimizer, sampler."""

import os
import runpy

import jax
import jax.numpy as jnp
import pytest

from jaxdiff import models, samplers
from jaxdiff.cli import build
from jaxdiff.core import schedules
from jaxdiff.train import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["digits", "toy2d", "cifar10_ddpmpp", "cifar10_edm", "cifar10_dit",
           "imagenet256_dit_xl2"]
SECTIONS = {"model", "process", "loss", "sampler", "optim", "data", "train", "mesh"}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_wires(name):
    tfds = pytest.importorskip("tensorflow_datasets")
    path = os.path.join(ROOT, "configs", f"{name}.py")
    module = runpy.run_path(path)
    config = module["get_config"]()
    assert set(config) == SECTIONS
    assert "jaxdiff train --config configs/" in module["__doc__"]  # the command, documented
    build.process(config)
    samplers.get(config.sampler.name)
    schedules.get(config.sampler.schedule)
    tx, _ = build.optimizer(config)
    if name == "imagenet256_dit_xl2":  # latents arrive with the VAE; check the model alone
        config.model.preset = "DiT-S/2"  # same code path as XL/2, a fraction of the size
        model = models.build(config.model.name, **{k: v for k, v in config.model.items()
                                                    if k != "name"})
        shape = tuple(config.data.latent_shape)
    else:
        with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
            model, shape = build.model(config), build.data_info(config)["shape"]
    state = jax.eval_shape(lambda: init_state(model, tx, x_shape=shape,
                                              num_classes=config.model.num_classes, seed=0,
                                              ema_decays=tuple(config.optim.ema_decays)))
    x = jax.ShapeDtypeStruct((2,) + tuple(shape), jnp.float32)
    y = jax.ShapeDtypeStruct((2,), jnp.int32) if config.model.num_classes else None
    out = jax.eval_shape(lambda p, x, y: model.apply({"params": p}, x, jnp.ones(2), y),
                         state.params, x, y)
    assert out.shape == x.shape
