"""Weights in other projects' formats, one conversion module per family.

- `dit_reference`: facebookresearch/DiT checkpoints <-> `jaxdiff.models.DiT` params (a rename:
  the parameter tree mirrors the reference's).
- `diffusers`: a diffusers `scheduler_config.json` as `jaxdiff.sample` arguments
  (`from_scheduler_config`), reproducing diffusers' own sampling loop.
- `torch_weights`: what every PyTorch conversion shares: reading a state_dict file, tensors as
  numpy, Linear/Conv weights as Flax kernels and back, nesting parameter paths into a tree.
- `folders`: diffusers/transformers model folders (`config.json` + safetensors, sharded too):
  key and shape checks, dtype casts, per-device block reads into sharded arrays, atomic export.
  One module a family on top of it, each with `from_config`, `load(folder, dtype=, shardings=)`
  and `export`: `autoencoder_kl` (diffusers AutoencoderKL), `unet_condition`
  (UNet2DConditionModel: SD 1.x/2.x/XL), `sd3` (SD3Transformer2DModel), `diffusers_dit`
  (DiTTransformer2DModel <-> `jaxdiff.models.DiT`), `clip` (transformers CLIPTextModel /
  WithProjection), and `tokenizer` (CLIP's BPE from a folder's files, via `tokenizers`).

System layer (DESIGN.md): imports models and core; nothing below imports it.
"""

from jaxdiff.interop.diffusers import from_scheduler_config
from jaxdiff.interop.dit_reference import (
    dit_from_torch_state_dict,
    dit_to_torch_state_dict,
    dit_torch_key,
)

__all__ = ["dit_from_torch_state_dict", "dit_to_torch_state_dict", "dit_torch_key",
           "from_scheduler_config"]
