"""Default demo: a class-conditional UNet on scikit-learn's 8x8 digits, EDM preconditioning.

    jaxdiff train --config configs/digits.py --workdir runs/digits

Expect (2 CPU cores): ~3.5 minutes of training, a sample grid in runs/digits/samples/ with one
column per digit, and report.json with classifier agreement >= 0.9 (the share of samples the
built-in digits classifier, `jaxdiff.eval.digits`, reads as the requested digit).
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder


def get_config():
    c = ConfigDict()
    c.model = dict(name="unet", channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(4,), norm_groups=8, dropout=0.1, num_classes=10,
                   remat=False)
    c.process = dict(name="edm", sigma_data=0.5)
    c.loss = dict(prediction="edm", weighting="uniform", time_sampling="lognormal", p_uncond=0.1)
    # cache: None, or a feature cache (jaxdiff/accel/cache.py), e.g. "deepcache:interval=3"
    c.sampler = dict(name="dpmpp_2m", steps=20, schedule="karras", guidance=2.0, options={},
                     cache=placeholder(str))
    c.optim = dict(lr=2e-3, warmup_steps=200, schedule="cosine", weight_decay=0.0,
                   grad_clip=1.0, ema_decays=(0.999,))
    c.data = dict(name="digits", batch_size=64, random_flip=False, data_dir=None)
    c.train = dict(steps=1500, seed=0, log_every=100, ckpt_every=500, keep=3, sample_every=750,
                   num_samples=100, skip_nonfinite=False)
    # device mesh over all devices, -1 = the rest (jaxdiff/train/parallel.py); data.batch_size is
    # the global batch and must divide by data×fsdp
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c
