"""Linear multistep ODE samplers: DPM-Solver++(2M/3M), DEIS (multistep AB), iPNDM, LMS.

Each takes one NFE per step and keeps its past model values in the loop carry, most recent
first (`push`). Step i combines them as x' = a x + sum_j c_j hist_j, with scalar coefficients
(a, c) computed from the grid; the past noise levels are read from the grid itself
(`past_sigmas`). Shared rules, as diffusers applies them:

- warm-up: step i uses order min(order, i + 1), the history holding i + 1 values;
- `lower_order_final`: when the run has fewer than 15 steps, the last steps drop to order n - i
  (final step first order, second-to-last at most second order) -- `step_order`;
- an exponential integrator (DPM-Solver++, DEIS, UniPC) stepping to sigma = 0 (lambda = inf)
  takes a first-order step, which returns the denoiser output: polynomial extrapolation in
  lambda to lambda = inf is meaningless (diffusers' `final_sigmas_type="zero"` does the same).

All coefficients stay finite whatever the step (also those of the orders not taken, which
`jnp.where` would otherwise turn into NaN gradients): before the grid starts, `past_sigmas`
supplies fictitious distinct levels, and a step to 0 uses a stand-in ratio in the high-order terms.

`use_kernel=True` runs the update x' = a x + sum_j c_j hist_j as the fused Pallas kernel
`jaxdiff.kernels.solver_step` (one pass over memory, float32 accumulation, differentiable); the
default jnp path is unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.base import lift, num_steps_of, run


def push(hist, value):
    """The history with `value` in front and the oldest entry dropped."""
    return jnp.concatenate([value[None], hist[:-1]])


def past_sigmas(sigmas, i, k):
    """(sigma_i, sigma_{i-1}, ..., sigma_{i-k+1}); before the grid's start, the fictitious levels
    e^{-idx} sigma_0 keep the nodes distinct so that unused coefficients stay finite."""
    idx = i - jnp.arange(k)
    fake = sigmas[0] * jnp.exp(-idx.astype(sigmas.dtype))
    return jnp.where(idx >= 0, sigmas[jnp.maximum(idx, 0)], fake)


def step_order(i, n, order, lower_order_final, *, below=15, sigma_next=None):
    """Order of step i of n: warm up through 1..order; with `lower_order_final` and n < below the
    last steps use order n - i (diffusers' DPM-Solver/DEIS rule; UniPC passes below=inf); when
    `sigma_next` is given (exponential integrators), a step to sigma = 0 is first order."""
    p = jnp.minimum(order, i + 1)
    if lower_order_final:
        p = jnp.where(n < below, jnp.minimum(p, n - i), p)
    if sigma_next is not None:
        p = jnp.where(sigma_next == 0, 1, p)
    return jnp.asarray(p, jnp.int32)


def combine(a, c, x, hist, use_kernel=False):
    """a x + sum_j c_j hist_j over the history's depth, in x's dtype; `use_kernel`: fused
    (`jaxdiff.kernels.solver_step`, float32 coefficients and accumulation)."""
    if use_kernel:
        return fused_step(a, x, jnp.asarray(c)[: hist.shape[0]], hist)
    c = jnp.asarray(c, x.dtype)[: hist.shape[0]]
    return jnp.asarray(a, x.dtype) * x + jnp.tensordot(c, hist, axes=1)


def fused_step(a, x, b, ds):
    """`jaxdiff.kernels.solver_step` with float32 (or float64) coefficients. Imported on first
    use: the samplers (math layer) do not import the kernels layer unless asked to."""
    from jaxdiff.kernels.solver_step import compute_dtype, solver_step

    ct = compute_dtype(x.dtype)
    return solver_step(jnp.asarray(a, ct), x, jnp.asarray(b, ct), ds)


def ratio(sigmas, i):
    """(rho, rho_safe, h): rho = sigma_{i+1}/sigma_i = e^{-h}; a step to 0 has rho = 0 and takes
    first order, so the higher-order terms get the stand-in rho_safe = 1/2 there."""
    rho = sigmas[i + 1] / sigmas[i]
    rho_safe = jnp.where(rho > 0, rho, 0.5)
    return rho, rho_safe, -jnp.log(rho_safe)


def _multistep(denoiser, x, sigmas, k, coefs, *, slope, num_steps, trajectory, use_kernel):
    """Loop shared by the samplers here: one NFE, push D (or the slope d = (x - D)/sigma when
    `slope`) to a k-deep history, then x' = a x + sum_j c_j hist_j with (a, c) = coefs(i)."""
    denoiser, state = lift(denoiser)

    def step(i, x, hist, state):
        s = sigmas[i]
        D, state = denoiser(x, s, state)
        hist = push(hist, (x - D) / s.astype(x.dtype) if slope else D)
        a, c = coefs(i)
        return combine(a, c, x, hist, use_kernel), hist, state

    hist = jnp.zeros((k,) + x.shape, x.dtype)
    return run(step, x, sigmas, hist, state, num_steps=num_steps, trajectory=trajectory)


def _check_order(name, order, top):
    if order not in range(1, top + 1):
        raise ValueError(f"{name}: order={order!r} must be an integer in 1..{top}")


# --- DPM-Solver++ --------------------------------------------------------------------------


def _dpmpp_coefs(sigmas, i, p, exact_phi3=False):
    """Coefficients of DPM-Solver++ (data prediction) of order p on (D_i, D_{i-1}, D_{i-2}), in
    the VE view (x/alpha): x' = rho x + (1 - rho) D + phi terms of the divided differences."""
    rho, rho_s, h = ratio(sigmas, i)
    s = past_sigmas(sigmas, i, 3)
    r0, r1 = jnp.log(s[1] / s[0]) / h, jnp.log(s[2] / s[1]) / h  # h_{i-1}/h, h_{i-2}/h
    e = jnp.eye(3, dtype=s.dtype)
    d10, d11 = (e[0] - e[1]) / r0, (e[1] - e[2]) / r1
    c1 = (1 - rho) * e[0]
    c2 = c1 + 0.5 * (1 - rho_s) * d10  # Alg. 2: (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}
    phi2 = (rho_s - 1) / h + 1  # diffusers' third-order update, written with rho = e^{-h}
    phi3 = (rho_s - 1 + h) / h**2 - 0.5
    D1 = d10 + r0 / (r0 + r1) * (d10 - d11)
    D2 = (d10 - d11) / (r0 + r1)
    c3 = c1 + phi2 * D1 - (2.0 if exact_phi3 else 1.0) * phi3 * D2
    return rho, jnp.stack([c1, c2, c3])[p - 1]


def _dpmpp(denoiser, x, sigmas, order, lower_order_final, euler_at_final, num_steps, trajectory,
           exact_phi3=False, use_kernel=False):
    n = num_steps_of(sigmas, num_steps)

    def coefs(i):
        p = step_order(i, n, order, lower_order_final, sigma_next=sigmas[i + 1])
        p = jnp.where(euler_at_final & (i == n - 1), 1, p)
        return _dpmpp_coefs(sigmas, i, p, exact_phi3)

    return _multistep(denoiser, x, sigmas, order, coefs, slope=False, num_steps=num_steps,
                      trajectory=trajectory, use_kernel=use_kernel)


def dpmpp_2m(denoiser, x, sigmas, *, lower_order_final=True, euler_at_final=False,
             num_steps=None, trajectory=False, use_kernel=False):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2; diffusers' `solver_type="midpoint"`): 1 NFE
    per step. First step first order; `lower_order_final`: last step first order when n < 15;
    `euler_at_final`: always. `use_kernel`: fused update (module docstring)."""
    return _dpmpp(denoiser, x, sigmas, 2, lower_order_final, euler_at_final, num_steps, trajectory,
                  use_kernel=use_kernel)


def dpmpp_3m(denoiser, x, sigmas, *, lower_order_final=True, euler_at_final=False,
             exact_phi3=False, num_steps=None, trajectory=False, use_kernel=False):
    """DPM-Solver++(3M): the multistep data-prediction solver of Lu et al. 2022b extended by a
    second divided difference, as the DPM-Solver reference code, diffusers'
    `multistep_dpm_solver_third_order_update` and k-diffusion do it: 1 NFE per step. Warm-up
    orders 1, 2; with `lower_order_final` and n < 15 the last two steps are orders 2 and 1.

    That update weights D2 = h^2 D''/2 by -phi_3 = h/6 + O(h^2), half the Taylor-exact weight,
    leaving a local error h^3 D''/12: it is formally second order (tests measure it).
    `exact_phi3=True` uses the exact weight 2 (-phi_3), which makes it third order."""
    return _dpmpp(denoiser, x, sigmas, 3, lower_order_final, euler_at_final, num_steps, trajectory,
                  exact_phi3, use_kernel)


# --- Lagrange interpolation (DEIS, LMS) ----------------------------------------------------


def _lagrange(nodes, p):
    """Power-series coefficients (lowest power first, shape (k, k)) of the Lagrange basis over
    the first p of the k nodes; rows j >= p are zero."""
    k = nodes.shape[0]
    j = jnp.arange(k)
    coef = jnp.zeros((k, k), nodes.dtype).at[:, 0].set(1.0)
    for m in range(k):  # multiply row j by (v - v_m) / (v_j - v_m) for every used m != j
        use = (j != m) & (m < p)
        d = jnp.where(use, nodes - nodes[m], 1.0)
        a, b = jnp.where(use, 1.0 / d, 0.0), jnp.where(use, -nodes[m] / d, 1.0)
        shifted = jnp.concatenate([jnp.zeros((k, 1), coef.dtype), coef[:, :-1]], axis=1)
        coef = a[:, None] * shifted + b[:, None] * coef
    return jnp.where((j < p)[:, None], coef, 0.0)


def _powers(v, k):
    """(1, v, ..., v^{k-1}) without pow of a possibly negative base."""
    return jnp.cumprod(jnp.concatenate([jnp.ones(1, v.dtype), jnp.full(k - 1, v)]))


def _deis_coefs(sigmas, i, p, k):
    """DEIS-tAB weights on past eps-predictions: the integral over [sigma_i, sigma_{i+1}] of the
    Lagrange basis in log sigma, in closed form. With v = log(tau/sigma_i), int P(v) e^v dv =
    e^v (P - P' + P'' - ...), so c_j = sigma_i (rho Q_j(v') - Q_j(0))."""
    rho, rho_s, _ = ratio(sigmas, i)
    s = sigmas[i]
    q = _lagrange(jnp.log(past_sigmas(sigmas, i, k) / s), p)
    deriv, sign = q, 1.0
    for m in range(1, k):  # Q = sum_m (-1)^m P^(m)
        deriv = deriv[:, 1:] * jnp.arange(1, deriv.shape[1], dtype=q.dtype)
        sign = -sign
        q = q.at[:, : k - m].add(sign * deriv)
    return 1.0, s * (rho * q @ _powers(jnp.log(rho_s), k) - q[:, 0])


def deis(denoiser, x, sigmas, *, order=3, lower_order_final=True, num_steps=None,
         trajectory=False, use_kernel=False):
    """DEIS multistep (Zhang & Chen 2023, Sec. 4: AB-DEIS, Lagrange extrapolation of past
    predictions under the exponential integrator) in diffusers' `logrho` form: eps = (x - D)/sigma
    of the last `order` steps is extrapolated by a Lagrange polynomial in log sigma and
    integrated exactly over the step in sigma (VE view, where the linear part vanishes).
    1 NFE per step; orders 1..3 (first order = DDIM); warm-up and `lower_order_final` (n < 15)
    as DPM-Solver++."""
    _check_order("deis", order, 3)
    n = num_steps_of(sigmas, num_steps)

    def coefs(i):
        p = step_order(i, n, order, lower_order_final, sigma_next=sigmas[i + 1])
        return _deis_coefs(sigmas, i, p, order)

    return _multistep(denoiser, x, sigmas, order, coefs, slope=True, num_steps=num_steps,
                      trajectory=trajectory, use_kernel=use_kernel)


# --- Adams-Bashforth in sigma (iPNDM, LMS) -------------------------------------------------

_AB = np.array(
    [[1, 0, 0, 0], [3 / 2, -1 / 2, 0, 0], [23 / 12, -16 / 12, 5 / 12, 0],
     [55 / 24, -59 / 24, 37 / 24, -9 / 24]]
)


def ipndm(denoiser, x, sigmas, *, order=4, num_steps=None, trajectory=False, use_kernel=False):
    """iPNDM (Zhang & Chen 2023, the DEIS paper's improved PNDM; as in Zhou et al. 2024's
    diff-solvers benchmark):
    Adams-Bashforth with the fixed uniform-step coefficients on d = (x - D)/sigma in sigma,
    warming up through orders 1..order (1..4). 1 NFE per step. The coefficients ignore the
    grid's non-uniformity, which costs accuracy at third order and above (see the tests)."""
    _check_order("ipndm", order, 4)

    def coefs(i):
        p = jnp.minimum(order, i + 1)
        return 1.0, (sigmas[i + 1] - sigmas[i]) * jnp.asarray(_AB, sigmas.dtype)[p - 1]

    return _multistep(denoiser, x, sigmas, order, coefs, slope=True, num_steps=num_steps,
                      trajectory=trajectory, use_kernel=use_kernel)


def lms(denoiser, x, sigmas, *, order=4, num_steps=None, trajectory=False, use_kernel=False):
    """Linear multistep (k-diffusion's `sample_lms`, diffusers' `LMSDiscreteScheduler`):
    variable-step Adams-Bashforth on d = (x - D)/sigma in sigma, the weights being the exact
    integrals of the Lagrange basis over the past levels of the actual grid. Orders 1..4, warming
    up through lower orders; 1 NFE per step."""
    _check_order("lms", order, 4)

    def coefs(i):
        p = jnp.minimum(order, i + 1)
        s, w = sigmas[i], sigmas[i + 1] - sigmas[i]
        basis = _lagrange(past_sigmas(sigmas, i, order) - s, p)  # in v = tau - sigma_i
        m = jnp.arange(1, order + 1, dtype=s.dtype)
        return 1.0, basis @ (_powers(w, order) * w / m)  # int_0^w v^(m-1) dv = w^m / m

    return _multistep(denoiser, x, sigmas, order, coefs, slope=True, num_steps=num_steps,
                      trajectory=trajectory, use_kernel=use_kernel)


SAMPLERS = {"dpmpp_2m": dpmpp_2m, "dpmpp_3m": dpmpp_3m, "deis": deis, "ipndm": ipndm, "lms": lms}
