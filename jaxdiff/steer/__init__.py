"""Inference-time steering of a trained sampler by a reward: SMC / Feynman-Kac steering
(`smc`), best-of-N and zero-order noise search (`search`). Functions take callables (rewards,
generators, denoisers), never configs."""

from jaxdiff.steer.search import best_of_n, zero_order_search
from jaxdiff.steer.smc import (
    FK,
    POTENTIALS,
    RESAMPLING,
    Particles,
    ess,
    log_evidence,
    multinomial,
    select,
    systematic,
    weights,
)

__all__ = ["FK", "Particles", "POTENTIALS", "RESAMPLING", "ess", "systematic", "multinomial",
           "log_evidence", "weights", "select", "best_of_n", "zero_order_search"]
