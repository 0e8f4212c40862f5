"""UniPC (Zhao et al. 2023): unified predictor-corrector, orders 1-3, bh1/bh2."""

SAMPLERS = {}
