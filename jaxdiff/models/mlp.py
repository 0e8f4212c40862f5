"""A residual MLP for low-dimensional data (the 2-D toy sets): x (B, D) -> (B, D).

Time and label conditioning as in the image models: sinusoidal time features through an MLP,
plus a label embedding with a classifier-free-guidance null row, added to every block.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.layers import LabelEmbedder, TimestepEmbedder, dense


class ResidualMLPBlock(nn.Module):
    width: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, c):  # (B, W), (B, W) -> (B, W)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        z = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype)(h) + c
        z = dense(2 * self.width, ("embed", "mlp"), name="fc1", **kw)(nn.silu(z))
        return h + dense(self.width, ("mlp", "embed"), name="fc2", **kw)(nn.silu(z))


class MLP(nn.Module):
    """Residual MLP denoiser network for vectors."""

    width: int = 256
    depth: int = 3
    num_classes: int = 0
    time_scale: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t, y=None, *, train=False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1]) * self.time_scale
        c = TimestepEmbedder(self.width, name="t_embedder", **kw)(t)
        if self.num_classes:
            y = jnp.full(x.shape[:1], self.num_classes) if y is None else y
            c = c + LabelEmbedder(self.num_classes, self.width, name="y_embedder", **kw)(y)
        h = dense(self.width, (None, "embed"), name="proj_in", **kw)(x)
        for i in range(self.depth):
            h = ResidualMLPBlock(self.width, name=f"blocks.{i}", **kw)(h, c)
        h = nn.silu(nn.LayerNorm(**kw)(h))
        out = dense(x.shape[-1], ("embed", None), name="proj_out", init=nn.initializers.zeros,
                    **kw)(h)
        return out.astype(jnp.float32)
