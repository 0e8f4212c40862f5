"""A KL-regularised autoencoder (diffusers' AutoencoderKL) on 16x16 digits: the first stage of
latent diffusion (configs/digits_latent_dit.py is the second).

    jaxdiff train --config configs/digits_vae.py --workdir runs/digits_vae

16x16x1 digits -> 8x8x2 latents (block_out_channels (16, 32): one 2x downsampling). The loss is
latent diffusion's without its perceptual and adversarial terms: L1 reconstruction +
kl_weight * KL(posterior || N(0, I)) (jaxdiff.train.step.autoencoder_objective). The samples in
runs/digits_vae/samples/ are held-out digits (odd rows) over their reconstructions (even rows);
report.json has the reconstruction MSE and PSNR on the 200 held-out digits, the FD of the
reconstructions (FD_digits) and the digits classifier's agreement on them.

Expect (2 shared CPU cores): ~4 minutes; held-out PSNR 37.6 dB (MSE 7e-4 on [-1, 1]), FD of
the reconstructions 0.014, agreement 0.995 (real digits: 0.993). kl_weight 1e-4 gave the same
PSNR; latent_channels=4 gave 38.4 dB but a latent DiT worse by FD 1 (configs/digits_latent_dit.py).
"""

from ml_collections import ConfigDict


def get_config():
    c = ConfigDict()
    c.model = dict(name="autoencoder_kl", in_channels=1, out_channels=1,
                   down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                   up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                   block_out_channels=(16, 32), layers_per_block=1, latent_channels=2,
                   norm_num_groups=8, sample_size=16, mid_block_add_attention=True)
    c.loss = dict(reconstruction="l1", kl_weight=1e-3)
    c.optim = dict(lr=1e-3, warmup_steps=100, schedule="cosine", weight_decay=0.0,
                   grad_clip=1.0, ema_decays=(0.999,))
    c.data = dict(name="digits16", batch_size=32, random_flip=False, data_dir=None)
    c.train = dict(steps=1000, seed=0, log_every=100, ckpt_every=500, keep=3, sample_every=500,
                   num_samples=50, skip_nonfinite=False)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c
