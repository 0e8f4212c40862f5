"""Samplers: one plain jittable function per algorithm (see `base` for the shared contract).

`SAMPLERS` maps each name to its function; it is the only registry.
"""

from jaxdiff.samplers import (
    ancestral,
    consistency,
    dpm_solver,
    dpm_v3,
    interpolant,
    learned,
    multistep,
    ode,
    pndm,
    single,
    stochastic,
    unipc,
)

SAMPLERS = {
    **single.SAMPLERS,
    **multistep.SAMPLERS,
    **unipc.SAMPLERS,
    **stochastic.SAMPLERS,
    **ancestral.SAMPLERS,
    **dpm_solver.SAMPLERS,
    **ode.SAMPLERS,
    **interpolant.SAMPLERS,
    **learned.SAMPLERS,
    **dpm_v3.SAMPLERS,
    **pndm.SAMPLERS,
    **consistency.SAMPLERS,
}


def get(name):
    """The sampler function called `name`."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r} is unknown; allowed: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]
