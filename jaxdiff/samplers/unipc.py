"""UniPC (Zhao et al. 2023): unified predictor-corrector, orders 1-3, B(h) variants bh1/bh2.

Data prediction (diffusers' `UniPCMultistepScheduler` with `predict_x0=True`), in the VE view
x/alpha, with h = lambda' - lambda, rho = sigma'/sigma = e^{-h}, h~ = -h:

  UniP-p:  x' = rho x + (1 - rho) D_0 - B(h) sum_{k<p} a_k (D_k - D_0)/r_k
  UniC-p:  the same step redone with the model value D' at the predicted point added,
                    - B(h) a_p (D' - D_0), which raises the order to p + 1 at no extra NFE;

r_k = (lambda_{-k} - lambda_0)/h, B(h) = h~ (bh1) or e^{h~} - 1 (bh2), and the weights solve
sum_k a_k r_k^(m-1) = h~ phi_{m+1}(h~) m!/B(h) (Sec. 3; r = 1 for D'), with diffusers' shortcuts
a = 1/2 for the 2nd-order predictor and the 1st-order corrector. The corrector at step i fixes
the point just reached with the model value computed there, so it never runs after the last step.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff.samplers.base import lift, num_steps_of, run
from jaxdiff.samplers.multistep import combine, fused_step, past_sigmas, push, ratio, step_order


def _b(hh, B):
    """b_m = h~ phi_{m+1}(h~) m! / B(h) for m = 1, 2, 3 (the recursion of the paper's code)."""
    h_phi, fact, out = jnp.expm1(hh) / hh - 1, 1.0, []
    for m in range(1, 4):
        out.append(h_phi * fact / B)
        fact *= m + 1
        h_phi = h_phi / hh - 1 / fact
    return jnp.stack(out)


def _solve(nodes, b, m):
    """a with sum_k a_k nodes_k^j = b_j for j < m, over the first m nodes (a_k = 0 beyond)."""
    k = nodes.shape[0]
    j = jnp.arange(k)
    used = (j[:, None] < m) & (j[None, :] < m)
    vander = jnp.where(used, nodes[None, :] ** j[:, None], jnp.eye(k, dtype=nodes.dtype))
    return jnp.linalg.solve(vander, jnp.where(j < m, b[:k], 0.0))


def _coefs(sigmas, i, p, bh2, corrector):
    """(a, c, c_new) for x' = a x + c . (D_i, D_{i-1}, D_{i-2}) + c_new D' over the step from
    sigma_i to sigma_{i+1}: the predictor UniP-p, or with `corrector` UniC-p (D' at sigma_{i+1})."""
    rho, _, h = ratio(sigmas, i)
    s = past_sigmas(sigmas, i, 3)
    r = jnp.log(s[0] / s[1:]) / h  # (lambda_{i-k} - lambda_i)/h < 0, k = 1, 2
    hh = -h
    B = jnp.expm1(hh) if bh2 else hh
    b = _b(hh, B)
    half = jnp.asarray([0.5, 0.0, 0.0], s.dtype)
    if corrector:  # unknowns (a for D', a_1, a_2): nodes (1, r_1, r_2)
        a = jnp.where(p == 1, half, _solve(jnp.concatenate([jnp.ones(1, s.dtype), r]), b, p))
        a_new, a_k = a[0], a[1:]
    else:
        a_k = jnp.where(p == 2, half[:2], _solve(r, b, p - 1))
        a_new = 0.0
    w = a_k / r
    c = jnp.concatenate([(1 - rho + B * (jnp.sum(w) + a_new))[None], -B * w])
    return rho, c, -B * a_new


def unipc(denoiser, x, sigmas, *, order=2, variant="bh2", corrector=True, lower_order_final=True,
          num_steps=None, trajectory=False, use_kernel=False):
    """UniPC-p (Zhao et al. 2023, Sec. 3; diffusers' UniPCMultistepScheduler with predict_x0):
    1 NFE per step; order p = 1..3 (with the corrector the method is of order p + 1); variant
    "bh1" (advised for unconditional sampling under 10 steps) or "bh2". Warm-up through lower
    orders; `lower_order_final` caps step i at order n - i whatever n (as diffusers' UniPC); a
    step to sigma = 0 is first order. `use_kernel`: predictor and corrector updates run as the
    fused kernel `jaxdiff.kernels.solver_step`."""
    if order not in (1, 2, 3):
        raise ValueError(f"unipc: order={order!r} must be 1, 2 or 3")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc: variant={variant!r} must be 'bh1' or 'bh2'")
    bh2 = variant == "bh2"
    n = num_steps_of(sigmas, num_steps)
    denoiser, state = lift(denoiser)

    def step(i, x, carry, state):
        hist, x_prev, p_prev = carry
        D, state = denoiser(x, sigmas[i], state)
        if corrector:  # UniC-p for the step i-1 -> i just taken, with D at the predicted point
            a, c, c_new = _coefs(sigmas, jnp.maximum(i - 1, 0), p_prev, bh2, corrector=True)
            x_c = _corrected(a, c, c_new, x_prev, hist, D, use_kernel)
            x = jnp.where(i > 0, x_c, x)
        hist = push(hist, D)
        p = step_order(i, n, order, lower_order_final, below=jnp.inf, sigma_next=sigmas[i + 1])
        a, c, _ = _coefs(sigmas, i, p, bh2, corrector=False)
        return combine(a, c, x, hist, use_kernel), (hist, x, p), state

    carry = (jnp.zeros((order,) + x.shape, x.dtype), x, jnp.asarray(1, jnp.int32))
    return run(step, x, sigmas, carry, state, num_steps=num_steps, trajectory=trajectory)


def _corrected(a, c, c_new, x_prev, hist, D, use_kernel):
    """UniC's x' = a x_prev + c . hist + c_new D' (the kernel takes D' as one more term)."""
    if not use_kernel:
        return combine(a, c, x_prev, hist) + jnp.asarray(c_new, x_prev.dtype) * D
    b = jnp.concatenate([jnp.asarray(c)[: hist.shape[0]], jnp.reshape(c_new, (1,))])
    return fused_step(a, x_prev, b, [hist, D])


SAMPLERS = {"unipc": unipc}
