"""Masked (absorbing-state) diffusion on the digits as tokens: 8x8 grey levels 0..16 as 64 tokens
over a vocabulary of 17, a class-conditional bidirectional transformer (MDLM/MD4's NELBO, linear
masking schedule), sampled with the first-hitting sampler (64 network calls per sample).

    jaxdiff train --config configs/digits_tokens.py --workdir runs/digits_tokens

Expect (2 CPU cores): 2000 steps in ~10 minutes alone (25 minutes measured beside two other
jobs); runs/digits_tokens/samples/*.png (one column per digit) and report.json with the
held-out bits per token (± its standard error; 1.92 ± 0.03 measured), classifier agreement
(~0.92) and FD of the samples (~2.6, real digits 1.8), scored as the continuous digits models
are (benchmarks/discrete.py compares them with the testbed's digits8_unet).

Variants: `configs/digits_tokens.py:ar` is the autoregressive baseline (the same network with a
causal mask), `:uniform` the uniform-noise process (time-conditioned network).
"""

from ml_collections import ConfigDict


def get_config(variant="masked"):
    allowed = ("masked", "ar", "uniform")
    if variant not in allowed:
        raise ValueError(f"variant {variant!r} is unknown; allowed: {', '.join(allowed)}")
    c = ConfigDict()
    c.model = dict(name="token_transformer", hidden_size=128, depth=4, num_heads=4,
                   num_classes=10, class_dropout_prob=0.1, remat=False,
                   # zero adaLN input: 1.92 held-out bits/token vs 2.06 with the default
                   # learned constant at this budget (RESULTS.md, "Discrete diffusion")
                   adaln_input="zero")
    c.process = dict(name="masked", schedule="linear")
    c.loss = dict(p_uncond=0.1)
    # jaxdiff.discrete samplers: first_hitting, ancestral, confidence, block; options e.g.
    # {"gumbel": "float32"} (the inaccurate categorical sampling of Zheng et al. 2024)
    c.sampler = dict(name="first_hitting", steps=64, guidance=1.0, options={})
    c.optim = dict(lr=1e-3, warmup_steps=200, schedule="cosine", weight_decay=0.0,
                   grad_clip=1.0, ema_decays=(0.999,))
    c.data = dict(name="digits_tokens", batch_size=64, random_flip=False, data_dir=None)
    c.train = dict(steps=2000, seed=0, log_every=100, ckpt_every=500, keep=2, sample_every=0,
                   num_samples=100, skip_nonfinite=False)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    if variant == "ar":
        c.process = dict(name="autoregressive")
        c.sampler = dict(name="autoregressive", steps=64, guidance=1.0, options={})
    elif variant == "uniform":
        c.process = dict(name="uniform", schedule="linear")
        c.sampler = dict(name="ancestral", steps=128, guidance=1.0, options={})
    return c
