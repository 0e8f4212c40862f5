"""ImageNet 256x256 with DiT-XL/2 in the latent space of a VAE (Peebles & Xie 2023).

    jaxdiff train --config configs/imagenet256_dit_xl2.py --workdir runs/imagenet256

Not runnable yet. DiT trains on 32x32x4 latents of the Stable Diffusion VAE (`data.latent_shape`
records them; `jaxdiff train` does not read it). Latent runs exist (`data.latents = <workdir of an
autoencoder run>`, configs/digits_vae.py then configs/digits_latent_dit.py), but they encode with
a VAE trained by `jaxdiff train` and cache a whole split in memory in one .npz: ImageNet needs
the pretrained SD VAE as the encoder (a diffusers folder, which
`jaxdiff.interop.autoencoder_kl.load` reads but `data.latents` cannot name yet) and a sharded
on-disk cache (1.28M x 32x32x4 float32 latents are 21 GB). The model section is the
reference DiT-XL/2 (675M parameters, 118.6 GFLOPs per forward; FID 2.27 with CFG 1.5 after 7M
steps at batch 256) with the reference parameter layout, so its checkpoints import by rename
(`jaxdiff.interop.dit_from_torch_state_dict`).
"""

import os
import runpy

from ml_collections.config_dict import placeholder

BASE = runpy.run_path(os.path.join(os.path.dirname(__file__), "cifar10_ddpmpp.py"))


def get_config():
    c = BASE["get_config"]()
    c.model = dict(name="dit", preset="DiT-XL/2", num_classes=1000, learn_sigma=False,
                   remat=False)
    c.process = dict(name="discrete_vp", beta_schedule="linear")
    c.loss = dict(prediction="eps", weighting="uniform", time_sampling="uniform", p_uncond=0.1)
    # cache: None, or a feature cache (jaxdiff/accel/cache.py), e.g. "taylorseer:interval=3"
    c.sampler = dict(name="ddim", steps=250, schedule="trailing", guidance=1.5, options={},
                     cache=placeholder(str))
    c.optim.update(lr=1e-4, warmup_steps=0, schedule="constant", ema_decays=(0.9999,))
    c.data = dict(name="imagenet2012_latents", batch_size=256, random_flip=False, data_dir=None,
                  latent_shape=(32, 32, 4))
    c.train.steps = 7_000_000
    return c
