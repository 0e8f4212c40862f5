"""Single-step ODE samplers: DDIM, Euler, Heun (EDM), DPM-Solver-1/2/3, DPM-Solver++(2S)."""

from __future__ import annotations

from jaxdiff.samplers.base import run


def ddim(denoiser, x, sigmas, *, num_steps=None, trajectory=False):
    """DDIM with eta = 0 (Song et al. 2021, Eq. 12), i.e. Euler in the VE view: 1 NFE per step.

    x' = D + (sigma'/sigma) (x - D)."""

    def step(i, x, carry):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, s)
        return x0 + (s_next / s) * (x - x0), carry

    return run(step, x, sigmas, num_steps=num_steps, trajectory=trajectory)


SAMPLERS = {"ddim": ddim}
