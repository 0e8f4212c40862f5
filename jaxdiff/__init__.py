"""jaxdiff: diffusion and flow generative models in JAX.

The math layer (`process`, `denoiser`, `schedules`, `samplers`, `guidance`, `likelihood`) is
pure functions over arrays; `sample` composes it into one call.
"""

from jaxdiff import schedules
from jaxdiff.denoiser import Stateful, denoiser
from jaxdiff.process import EDM, VE, DiscreteVP, RectifiedFlow, VPCosine, VPLinear
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
    "sample",
    "schedules",
]
