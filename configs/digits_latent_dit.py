"""Latent diffusion on 16x16 digits: a class-conditional DiT on the 8x8x2 latents of the
autoencoder run configs/digits_vae.py trains (Rombach et al. 2022; Peebles & Xie 2023).

    jaxdiff train --config configs/digits_vae.py --workdir runs/digits_vae
    jaxdiff train --config configs/digits_latent_dit.py --workdir runs/digits_latent_dit \
        [--config.data.latents=runs/digits_vae]

data.latents names the autoencoder run. On first use its EMA params encode the digits16 train
split (posterior means) into runs/digits_vae/latents/train.npz, with scale = 1 / std and shift =
mean of the latents; the DiT trains on (z - shift) * scale. Samples are decoded by the
autoencoder (from_latent, then decode): the grids in samples/ and `jaxdiff sample` / `jaxdiff
eval` show images, and report.json has their FD_digits against the held-out digits as the
pixel-space runs do. A patch-2 DiT sees 16 tokens of the 8x8 latents; the rest (process,
loss, optimizer, steps) is the pixel-space testbed model `digits16_flow` (benchmarks/testbed.py).

Expect (2 shared CPU cores): ~2 minutes; `jaxdiff eval --workdir runs/digits_latent_dit --num
500 --sampler dpmpp_2m --steps 20`: FD_digits 3.0 (real data 1.09), agreement 0.98 (the pixel
DiT `digits16_flow`: 2.84, 0.974).
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder


def get_config():
    c = ConfigDict()
    c.model = dict(name="dit", patch_size=2, hidden_size=64, depth=4, num_heads=4,
                   num_classes=10, learn_sigma=False, remat=False)
    c.process = dict(name="rectified_flow", time_scale=1000.0)
    c.loss = dict(prediction="flow", weighting="uniform", time_sampling="logit_normal",
                  p_uncond=0.1)
    # cache: None, or a feature cache (jaxdiff/accel/cache.py), e.g. "taylorseer:interval=3"
    c.sampler = dict(name="dpmpp_2m", steps=20, schedule=None, guidance=2.0, options={},
                     cache=placeholder(str))
    c.optim = dict(lr=2e-3, warmup_steps=100, schedule="cosine", weight_decay=0.0,
                   grad_clip=1.0, ema_decays=(0.995,))
    c.data = dict(name="digits16", batch_size=32, random_flip=False, data_dir=None,
                  latents="runs/digits_vae")
    c.train = dict(steps=1200, seed=0, log_every=100, ckpt_every=500, keep=3, sample_every=600,
                   num_samples=100, skip_nonfinite=False)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c
