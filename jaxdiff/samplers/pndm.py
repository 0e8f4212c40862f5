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
from jaxdiff.samplers.single import _check_targets

# Adams-Bashforth weights on (e_i, e_{i-1}, e_{i-2}, e_{i-3}), PNDM Eq. 12 and its warm-up orders.
_AB = np.array(
    [[1, 0, 0, 0], [3 / 2, -1 / 2, 0, 0], [23 / 12, -16 / 12, 5 / 12, 0],
     [55 / 24, -59 / 24, 37 / 24, -9 / 24]]
)


def plms(denoiser, x, sigmas, *, num_steps=None, trajectory=False, targets=None,
         heun_source=None):
    """PLMS (PNDM, Liu et al. 2022, Eq. 12) with diffusers' warm-up (`skip_prk_steps=True`):
    step 0 is Heun in sigma on e = (x - D)/sigma (2 NFE), step i >= 1 is
    x' = x + (sigma' - sigma) sum_j w_j e_{i-j} with the Adams-Bashforth weights of order
    min(i + 1, 4); 1 NFE per later step. The grid may end at 0 (no model call there).

    `targets`, `heun_source` (variance-preserving processes; diffusers' `PNDMScheduler`, whose
    step from timestep t goes to t - T // n, not to the next listed timestep when n does not
    divide T): as in `ddim`, step i goes from sigmas[i] to its own level tau = targets[i] and the
    state alpha x reached there (alpha = 1/sqrt(1 + sigma^2)) is read as the state at
    sigmas[i + 1], x' = sqrt((1 + s'^2) / (1 + tau^2)) (x + (tau - s) e) for the combined e;
    for the Heun start targets[0] is where its Euler point goes (read at sigmas[1] for the
    second call), and its combined step reads the state alpha x at the level `heun_source`
    (default sigmas[0]; diffusers: t_1 + T // n) and steps from there to sigmas[1]:
    x_1 = sqrt((1 + r^2) / (1 + s_0^2)) x + (s_1 - r) (e_0 + e_1)/2, r = heun_source.
    targets = sigmas[1:] and heun_source = sigmas[0] are the plain method. `targets`: one level
    per step (an array, or through `jaxdiff.sample` a tuple of floats); `heun_source` a float
    (static options through `jaxdiff.sample`)."""
    n = num_steps_of(sigmas, num_steps)
    denoiser, state = lift(denoiser)
    ab = jnp.asarray(_AB, sigmas.dtype)
    if targets is not None:
        targets = _check_targets(targets, sigmas, num_steps)
    if heun_source is not None:
        heun_source = _check_source(heun_source, sigmas)

    def eps(x, s, state):
        x0, state = denoiser(x, s, state)
        return (x - x0) / s.astype(x.dtype), state

    def move(x, e, s, s_next, tau):  # to s_next, or to tau read as the state at s_next
        if tau is None:
            return x + (s_next - s) * e
        c = jnp.sqrt((1.0 + jnp.square(s_next)) / (1.0 + jnp.square(tau)))
        return c * (x + (tau - s) * e)

    def heun(x, e, s, s_next, tau, state):  # diffusers' counter-1 step: mean of the two slopes
        e1, state = eps(move(x, e, s, s_next, tau), s_next, state)
        if heun_source is None:
            return (x + (s_next - s) * 0.5 * (e + e1)).astype(x.dtype), state
        r = heun_source
        c = jnp.sqrt((1.0 + jnp.square(r)) / (1.0 + jnp.square(s)))
        return (c * x + (s_next - r) * 0.5 * (e + e1)).astype(x.dtype), state

    def step(i, x, hist, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        tau = None if targets is None else targets[i]
        e, state = eps(x, s, state)
        hist = jnp.concatenate([e[None], hist[:-1]])
        w = ab[jnp.minimum(i, 3)]
        x_ab = move(x, jnp.tensordot(w.astype(x.dtype), hist, axes=1), s, s_next, tau)
        # the Heun start needs a level > 0 for its second call; with one step it is DDIM
        x, state = jax.lax.cond(
            (i == 0) & (n > 1),
            lambda: heun(x, e, s, jnp.where(s_next > 0, s_next, s), tau, state),
            lambda: (x_ab.astype(x.dtype), state),
        )
        return x.astype(hist.dtype), hist, state

    hist = jnp.zeros((4,) + x.shape, x.dtype)
    return run(step, x, sigmas, hist, state, num_steps=num_steps, trajectory=trajectory)


def _check_source(r, sigmas):
    """`plms`'s heun_source as a scalar of the grid's dtype; refused when (known and) not a
    finite level > 0."""
    if not isinstance(r, jax.core.Tracer):
        v = np.asarray(r, np.float64)
        if v.ndim != 0 or not (np.isfinite(v) and v > 0):
            raise ValueError(f"heun_source must be one finite noise level > 0, got {r!r}")
    return jnp.asarray(r, sigmas.dtype)


SAMPLERS = {"plms": plms}
