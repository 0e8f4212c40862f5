"""CIFAR-10, continuous VP SDE with a DDPM++-style UNet (score_sde's `cifar10_ddpmpp_continuous`).

    jaxdiff train --config configs/cifar10_ddpmpp.py --workdir runs/cifar10_ddpmpp

Needs cifar10 in array_record format (see the README's Data section). score_sde trains 1.3M
steps at batch 128 on 8 accelerators and reports FID 2.55 (ODE) with this family; on one GPU,
expect recognisable samples after ~50k steps. The network is conditioned on 999 t, as there.
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder


def get_config():
    c = ConfigDict()
    c.model = dict(name="unet", channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=4,
                   attn_resolutions=(16,), dropout=0.1, num_classes=0, norm_groups=32,
                   remat=False)
    c.process = dict(name="vp_linear", beta_min=0.1, beta_max=20.0, t_min=1e-5, time_scale=999.0)
    c.loss = dict(prediction="eps", weighting="uniform", time_sampling="uniform", p_uncond=0.0)
    # cache: None, or a feature cache (jaxdiff/accel/cache.py), e.g. "deepcache:interval=3"
    c.sampler = dict(name="dpmpp_2m", steps=50, schedule="logsnr", guidance=1.0, options={},
                     cache=placeholder(str))
    c.optim = dict(lr=2e-4, warmup_steps=5000, schedule="constant", weight_decay=0.0,
                   grad_clip=1.0, ema_decays=(0.9999,))
    c.data = dict(name="cifar10", batch_size=128, random_flip=True, data_dir=None)
    c.train = dict(steps=1_300_000, seed=0, log_every=500, ckpt_every=10_000, keep=3,
                   sample_every=50_000, num_samples=64, skip_nonfinite=False)
    # device mesh over all devices, -1 = the rest (jaxdiff/train/parallel.py); data.batch_size is
    # the global batch and must divide by data×fsdp
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c
