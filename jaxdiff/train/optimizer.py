"""The optimizer: AdamW with warmup, cosine or constant learning rate, global-norm clipping."""

from __future__ import annotations

import optax


def make_optimizer(*, lr, total_steps, warmup_steps=0, schedule="cosine", weight_decay=0.0,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0):
    """AdamW with linear warmup then cosine decay (to 0) or constant; global-norm clipping."""
    if not 0 <= warmup_steps < max(total_steps, 1):
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps})")
    if schedule == "cosine":
        lr_fn = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, 1))
    elif schedule == "constant":
        lr_fn = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
            [warmup_steps])
    else:
        raise ValueError(f"lr schedule={schedule!r} is unknown; allowed: cosine, constant")
    clip = optax.clip_by_global_norm(grad_clip) if grad_clip else optax.identity()
    return optax.chain(clip, optax.adamw(lr_fn, b1, b2, eps, weight_decay=weight_decay)), lr_fn
