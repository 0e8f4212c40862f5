"""CIFAR-10 with a DiT-S/2 in pixel space, rectified flow (SD3-style logit-normal times),
class-conditional with classifier-free guidance.

    jaxdiff train --config configs/cifar10_dit.py --workdir runs/cifar10_dit

A small transformer baseline: 256 tokens of 2x2 patches; expect recognisable class-conditional
samples after ~100k steps on one GPU.
"""

import os
import runpy

from ml_collections.config_dict import placeholder

BASE = runpy.run_path(os.path.join(os.path.dirname(__file__), "cifar10_ddpmpp.py"))


def get_config():
    c = BASE["get_config"]()
    c.model = dict(name="dit", preset="DiT-S/2", num_classes=10, learn_sigma=False,
                   remat=False)
    c.process = dict(name="rectified_flow", time_scale=1000.0)
    c.loss = dict(prediction="flow", weighting="uniform", time_sampling="logit_normal",
                  p_uncond=0.1)
    # cache: None, or a feature cache (jaxdiff/accel/cache.py), e.g. "taylorseer:interval=3"
    c.sampler = dict(name="heun", steps=25, schedule="shift", guidance=2.0, options={},
                     cache=placeholder(str))
    c.optim.update(lr=1e-4, warmup_steps=5000, schedule="constant")
    c.train.steps = 400_000
    return c
