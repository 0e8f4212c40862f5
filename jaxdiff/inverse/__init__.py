"""Training-free solvers of inverse problems y = A(x0) + noise on a trained prior: operators
(`jaxdiff.inverse.operators`: the measurement A, its adjoint, pseudo-inverse and PiGDM's
A^T (r2 A A^T + s2 I)^+, and `parse_task` for CLI task strings) and solvers
(`jaxdiff.inverse.solvers`: DPS, PiGDM, DDNM(+), RED-Diff, DDS as sampler objects for
`jaxdiff.sample`, and `solve`). Functions take callables (networks, denoisers), never configs."""

from jaxdiff.inverse.operators import (
    TASKS,
    Blur,
    ChannelMix,
    Downsample,
    Inpaint,
    Matrix,
    Saturate,
    box_mask,
    gaussian_kernel,
    grayscale,
    half_mask,
    parse_task,
    random_mask,
)
from jaxdiff.inverse.solvers import DDNM, DDS, DPS, SOLVERS, PiGDM, REDDiff, solve

__all__ = ["Inpaint", "Downsample", "Blur", "ChannelMix", "Matrix", "Saturate", "box_mask",
           "random_mask", "half_mask", "gaussian_kernel", "grayscale", "parse_task", "TASKS", "DPS",
           "PiGDM", "DDNM", "REDDiff", "DDS", "SOLVERS", "solve"]
