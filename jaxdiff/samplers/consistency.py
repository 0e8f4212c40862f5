"""The consistency model's multistep sampler (Song et al. 2023, Alg. 1).

For a network trained as a consistency model (`jaxdiff.distill`), its consistency function is
the DDIM jump of its denoiser to sigma_min, f(x, s) = D + (sigma_min / s)(x - D). One step
from level s maps x to f(x, s), an estimate of the clean sample; when the grid goes on to
s' > 0 the state is renoised to s', x' = f + sqrt(s'^2 - sigma_min^2) z. One NFE per step; a
grid [sigma_max, 0] is one-step generation. In the VE view x = x0 + sigma * eps like every
sampler here; noise: `jaxdiff.samplers.noise`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff.core.denoiser import ddim_step
from jaxdiff.samplers.base import lift, run
from jaxdiff.samplers.noise import noise_fn


def consistency(denoiser, x, sigmas, *, key, num_steps=None, trajectory=False, sigma_min=0.002,
                noise_sampler="normal"):
    """Multistep consistency sampling: x <- f(x, s), then renoise to the next level s' > 0 with
    sqrt(s'^2 - sigma_min^2) z. `sigma_min`: the level the model's consistency function maps to
    (its training grid's smallest; `jaxdiff.distill.karras_levels` default 0.002)."""
    denoiser, state = lift(denoiser)
    draw = noise_fn(noise_sampler, key, sigmas, num_steps)

    def step(i, x, carry, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0, state = denoiser(x, s, state)
        f = ddim_step(x, x0, s, jnp.minimum(sigma_min, s)).astype(x.dtype)
        up = jnp.sqrt(jnp.maximum(jnp.square(s_next) - sigma_min**2, 0.0))
        x = f + jnp.where(s_next > 0, up, 0.0).astype(x.dtype) * draw(i, s, s_next, x)
        return x, carry, state

    return run(step, x, sigmas, (), state, num_steps=num_steps, trajectory=trajectory)


SAMPLERS = {"consistency": consistency}
