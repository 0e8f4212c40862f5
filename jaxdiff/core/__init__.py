"""The math: noise processes, denoiser adapters, schedules, guidance, losses, likelihood and
closed forms. Pure jax/numpy: no Flax, no configs, nothing else of jaxdiff."""
