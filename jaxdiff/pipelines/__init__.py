"""End-to-end pipelines for pretrained models in diffusers folders (system layer).

    pipe = jaxdiff.pipelines.load("path/to/stable-diffusion-v1-5")   # a `save_pretrained` folder
    images = pipe("a photo of a cat", steps=25, guidance=7.5, seed=0)  # (N, H, W, 3) in [0, 1]

`load` reads the folder's `model_index.json` and builds a `TextToImage` (Stable Diffusion 1.x/2.x,
SDXL, SD3 without its optional T5 encoder) or a `ClassToImage` (DiT) from the networks of
`jaxdiff.models` with their weights read by `jaxdiff.interop` (one conversion module a family),
sampling with any jaxdiff sampler or the folder's own diffusers scheduler config
(`jaxdiff.interop.diffusers.from_scheduler_config`). CLI: `jaxdiff generate`.
"""

from jaxdiff.pipelines.diffusers_folder import (
    PIPELINES,
    ClassToImage,
    TextToImage,
    load,
)

__all__ = ["PIPELINES", "ClassToImage", "TextToImage", "load"]
