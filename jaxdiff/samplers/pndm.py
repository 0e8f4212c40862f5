"""PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022, "Pseudo Numerical Methods
for Diffusion Models on Manifolds", Sec. 3.3, Eq. 12), as diffusers' `PNDMScheduler` runs it with
`skip_prk_steps=True` (the Stable Diffusion 1.x default).

PNDM's transfer part is the DDIM step, which in the VE view x = x0 + sigma * eps is
x' = x + (sigma' - sigma) e for a noise prediction e; the gradient part chooses e. With the
Runge-Kutta warm-up skipped, diffusers takes a second-order first step (Heun in sigma: the mean
of e at sigma_0 and at the Euler point at sigma_1, 2 NFE) and then Adams-Bashforth with the
fixed uniform-step weights of orders 2, 3, 4 on the past predictions; the history keeps the
prediction at sigma_0 of the first step, not the one at its Euler point. NFE = N + 1 (N = 1:
one DDIM step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.base import lift, num_steps_of, run

# Adams-Bashforth weights on (e_i, e_{i-1}, e_{i-2}, e_{i-3}), PNDM Eq. 12 and its warm-up orders.
_AB = np.array(
    [[1, 0, 0, 0], [3 / 2, -1 / 2, 0, 0], [23 / 12, -16 / 12, 5 / 12, 0],
     [55 / 24, -59 / 24, 37 / 24, -9 / 24]]
)


def plms(denoiser, x, sigmas, *, num_steps=None, trajectory=False):
    """PLMS (PNDM, Liu et al. 2022, Eq. 12) with diffusers' warm-up (`skip_prk_steps=True`):
    step 0 is Heun in sigma on e = (x - D)/sigma (2 NFE), step i >= 1 is
    x' = x + (sigma' - sigma) sum_j w_j e_{i-j} with the Adams-Bashforth weights of order
    min(i + 1, 4); 1 NFE per later step. The grid may end at 0 (no model call there)."""
    n = num_steps_of(sigmas, num_steps)
    denoiser, state = lift(denoiser)
    ab = jnp.asarray(_AB, sigmas.dtype)

    def eps(x, s, state):
        x0, state = denoiser(x, s, state)
        return (x - x0) / s.astype(x.dtype), state

    def heun(x, e, s, s_next, state):  # diffusers' counter-1 step: mean of the two slopes
        e1, state = eps(x + (s_next - s) * e, s_next, state)
        return x + (s_next - s) * 0.5 * (e + e1), state

    def step(i, x, hist, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        e, state = eps(x, s, state)
        hist = jnp.concatenate([e[None], hist[:-1]])
        w = ab[jnp.minimum(i, 3)]
        x_ab = x + (s_next - s) * jnp.tensordot(w.astype(x.dtype), hist, axes=1)
        # the Heun start needs a level > 0 for its second call; with one step it is DDIM
        x, state = jax.lax.cond(
            (i == 0) & (n > 1),
            lambda: heun(x, e, s, jnp.where(s_next > 0, s_next, s), state),
            lambda: (x_ab, state),
        )
        return x.astype(hist.dtype), hist, state

    hist = jnp.zeros((4,) + x.shape, x.dtype)
    return run(step, x, sigmas, hist, state, num_steps=num_steps, trajectory=trajectory)


SAMPLERS = {"plms": plms}
