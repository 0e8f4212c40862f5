"""Networks: a DDPM++/ADM UNet (`unet.py`), DiT (Peebles & Xie 2023, `dit.py`), a residual
MLP for low-dimensional data (`mlp.py`) and a transformer over tokens on DiT's blocks
(`token_transformer.py`: masked diffusion's denoiser, or causal as the autoregressive baseline),
which `jaxdiff train` builds (`MODELS`).

Pretrained-model families mirror their PyTorch modules' parameter names, so their weights load by
name (`jaxdiff.interop`): `autoencoder_kl.AutoencoderKL` (latent diffusion's KL autoencoder,
trainable here too), `unet_condition.UNet2DConditionModel` (Stable Diffusion 1.x/2.x/XL),
`mmdit.MMDiT` (SD3), `clip.CLIPTextModel` / `CLIPTextModelWithProjection`, on the shared
diffusers blocks of `diffusers_blocks.py`.

Every model is a Flax linen module called as `model.apply(variables, x, t, y, train=...)` with
x (B, H, W, C) NHWC, t the process's conditioning value and y optional int labels (label
`num_classes` is the classifier-free-guidance null label); the output is float32 and shaped
like x (2C channels for DiT with `learn_sigma`). Parameters carry logical axis names:
`flax.linen.unbox(variables)` gives plain arrays.
"""

from __future__ import annotations

import dataclasses

from jaxdiff.models.dit import DIT_PRESETS, DiT
from jaxdiff.models.layers import attention
from jaxdiff.models.mlp import MLP
from jaxdiff.models.token_transformer import TOKEN_PRESETS, TokenTransformer
from jaxdiff.models.unet import UNet

MODELS = {"unet": UNet, "dit": DiT, "mlp": MLP, "token_transformer": TokenTransformer}
PRESETS = {DiT: DIT_PRESETS, TokenTransformer: TOKEN_PRESETS}

__all__ = [
    "DIT_PRESETS",
    "MODELS",
    "DiT",
    "MLP",
    "TOKEN_PRESETS",
    "TokenTransformer",
    "UNet",
    "attention",
    "build",
]


def build(name, *, preset=None, image_size=None, **kwargs):
    """The model `name` (a key of `MODELS`) with fields `kwargs`; DiT takes `preset="DiT-S/2"`
    (TokenTransformer `preset="S"`, `TOKEN_PRESETS`) whose
    fields the kwargs override. `image_size` (int or (H, W)), when given, is checked up front."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is unknown; allowed: {', '.join(MODELS)}")
    cls = MODELS[name]
    if preset is not None:
        presets = PRESETS.get(cls, {})
        if preset not in presets:
            allowed = ", ".join(presets) or f"none ({cls.__name__} has no presets)"
            raise ValueError(f"preset {preset!r} is unknown for {name!r}; allowed: {allowed}")
        kwargs = {**presets[preset], **kwargs}
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"{name!r} has no field(s) {unknown}; allowed: {', '.join(fields)}")
    _check_sizes(name, kwargs)
    model = cls(**kwargs)
    if image_size is not None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        model.check_image_size(height, width)
    return model


POSITIVE = ("channels", "num_res_blocks", "num_heads", "norm_groups", "patch_size", "hidden_size",
            "depth", "width", "mlp_ratio")
PROBABILITIES = ("dropout", "class_dropout_prob")


def _check_sizes(name, fields):
    """One-line ValueError for a size that is not positive or a probability outside [0, 1)."""
    for key in POSITIVE:
        if key in fields and not fields[key] > 0:
            raise ValueError(f"{name} {key}={fields[key]!r} must be > 0")
    for key in PROBABILITIES:
        if key in fields and not 0 <= fields[key] < 1:
            raise ValueError(f"{name} {key}={fields[key]!r} must be in [0, 1)")
    mult = fields.get("channel_mult", (1,))
    if len(mult) == 0 or any(not m > 0 for m in mult):
        raise ValueError(f"{name} channel_mult={tuple(mult)!r} must be a non-empty list of "
                         "positive multipliers")
