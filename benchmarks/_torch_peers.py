"""The PyTorch side of the throughput comparison: diffusers' DiT and UNet configured as jaxdiff's
DiT (Peebles & Xie 2023) and DDPM++-style UNet, and a train step equal to jaxdiff's.

The step is DDPM's simplified loss (Ho et al. 2020, Alg. 1: t uniform over the training steps,
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, MSE against eps), global-norm gradient clipping,
AdamW (Loshchilov & Hutter 2019) and one EMA of the parameters, in float32, as
`jaxdiff.train.make_train_step` does with `DiscreteVP.linear()` and prediction "eps".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, UNet2DModel


def diffusers_dit(*, depth, hidden_size, num_heads, patch_size, in_channels, image_size,
                  num_classes):
    """DiTTransformer2DModel with jaxdiff DiT's architecture (learn_sigma=False, LayerNorm eps
    1e-6, tanh GELU, adaLN-Zero, class-conditional with a CFG null row)."""
    return DiTTransformer2DModel(
        num_attention_heads=num_heads, attention_head_dim=hidden_size // num_heads,
        in_channels=in_channels, out_channels=in_channels, num_layers=depth,
        sample_size=image_size, patch_size=patch_size, num_embeds_ada_norm=num_classes,
        norm_eps=1e-6, activation_fn="gelu-approximate")


def diffusers_unet(*, channels, channel_mult, num_res_blocks, attn_resolutions, num_heads,
                   norm_groups, dropout, image_size, in_channels):
    """UNet2DModel with jaxdiff UNet's layout: AdaGN ("scale_shift") residual blocks, attention
    at the same resolutions and in the middle (with its GroupNorm), conv down/upsampling."""
    widths = [channels * m for m in channel_mult]
    res = [image_size // 2**level for level in range(len(channel_mult))]
    attn = [r in attn_resolutions for r in res]
    attn_widths = {w for w, a in zip(widths, attn) if a} | {widths[-1]}
    if len(attn_widths) != 1:
        raise ValueError(f"attention at widths {sorted(attn_widths)}: diffusers' UNet2DModel "
                         "has one attention_head_dim, so the head counts would differ")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DModel(
        sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=tuple(widths), layers_per_block=num_res_blocks,
        down_block_types=down, up_block_types=up,
        attention_head_dim=attn_widths.pop() // num_heads, norm_num_groups=norm_groups,
        attn_norm_num_groups=norm_groups, norm_eps=1e-6, resnet_time_scale_shift="scale_shift",
        dropout=dropout)


def param_count(module):
    return sum(p.numel() for p in module.parameters())


def linear_alphas_cumprod(num_steps=1000, beta_start=1e-4, beta_end=0.02):
    """DDPM's linear beta schedule (Ho et al. 2020, Sec. 4), as `DiscreteVP.linear()`."""
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    return torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)


def make_train_step(model, *, conditional, lr=1e-4, ema_decay=0.9999, grad_clip=1.0,
                    compile_model=False):
    """`step(x0, y)` -> loss; x0 NCHW float32, y int labels (ignored when not conditional).

    diffusers' DiT drops labels to its null row itself in training mode (probability 0.1, its
    `class_dropout_prob`), which is jaxdiff's p_uncond=0.1, so no dropping happens here."""
    model.train()
    net = torch.compile(model) if compile_model else model
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    try:
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                fused=True)
    except (RuntimeError, TypeError):  # a torch without the fused CPU kernel
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    abar = linear_alphas_cumprod()

    def step(x0, y):
        b = x0.shape[0]
        t = torch.randint(0, len(abar), (b,))
        eps = torch.randn_like(x0)
        a = abar[t].view(b, 1, 1, 1)
        x = a.sqrt() * x0 + (1 - a).sqrt() * eps
        out = net(x, t, class_labels=y).sample if conditional else net(x, t).sample
        loss = F.mse_loss(out, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - ema_decay)
        return loss.detach()

    return step
