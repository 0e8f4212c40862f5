"""jaxdiff: diffusion and flow generative models in JAX.

Layers, imports pointing downward only (tests/test_layers.py checks it):
  core/ (process, denoiser, schedules, guidance, losses, likelihood, closed forms: pure jax),
  kernels/ (Pallas), samplers/ (one function per algorithm, one loop), models/ (Flax networks),
  this facade (`sample` composes process + adapter + schedule + guidance + sampler),
  the system: train/, eval/, data/; and cli/ on top.
"""

from jaxdiff.core import guidance, schedules
from jaxdiff.core.denoiser import Stateful, denoiser
from jaxdiff.core.process import EDM, VE, DiscreteVP, RectifiedFlow, VPCosine, VPLinear
from jaxdiff.samplers import SAMPLERS
from jaxdiff.sampling import sample

__version__ = "0.1.0"

__all__ = [
    "EDM",
    "SAMPLERS",
    "Stateful",
    "VE",
    "DiscreteVP",
    "RectifiedFlow",
    "VPCosine",
    "VPLinear",
    "denoiser",
    "guidance",
    "sample",
    "schedules",
]
