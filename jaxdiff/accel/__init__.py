"""Methods that make sampling cheaper without retraining: feature caches (`cache.py`)."""

from jaxdiff.accel.cache import (
    CACHES,
    branch_flops,
    cache_cost,
    cache_for,
    check_cache,
    describe_cost,
    format_cache,
    full_network_equivalents,
    make_cache,
    parse_cache,
)

__all__ = ["CACHES", "branch_flops", "cache_cost", "cache_for", "check_cache", "describe_cost",
           "format_cache", "full_network_equivalents", "make_cache", "parse_cache"]
