"""Methods that make sampling cheaper without retraining: feature caches (`cache.py`)."""

from jaxdiff.accel.cache import (
    CACHES,
    branch_flops,
    check_cache,
    full_network_equivalents,
    make_cache,
)

__all__ = ["CACHES", "branch_flops", "check_cache", "full_network_equivalents", "make_cache"]
