"""Input pipelines: grain over TFDS ``array_record`` data sources (no TensorFlow needed).

``build(name, split, batch_size=...)`` gives a checkpointable iterator of
``{"x": float32 in [-1, 1], "label": int32}`` batches; ``info(name)`` gives the example shape
and number of classes. ``BUILTINS`` lists the names that need no preparation (scikit-learn
digits, prepared automatically as a TFDS dataset, and 2-D toy sets); any other name is looked up
in TFDS. ``TOKENS`` lists the token datasets (``digits_tokens``, ``shakespeare_chars``; see
``jaxdiff.data.tokens``), whose batches are ``{"x": int32 (B, L), "label": int32}``.
"""

from jaxdiff.data.pipeline import (
    BUILTINS,
    DIGITS,
    TOKENS,
    DatasetNotPreparedError,
    build,
    check_random_flip,
    info,
)

__all__ = ["BUILTINS", "DIGITS", "TOKENS", "DatasetNotPreparedError", "build", "check_random_flip",
           "info"]
