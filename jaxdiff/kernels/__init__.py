"""Pallas kernels, each with a plain-jnp `*_reference` and an `interpret` switch.

- `attention`: blockwise (flash) attention, forward and backward (Dao et al. 2022, FlashAttention).
- `solver_step`: the fused linear multistep update x' = a x + sum_i b_i D_i of the ODE samplers.
"""
