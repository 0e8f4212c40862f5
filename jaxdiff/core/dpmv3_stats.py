"""DPM-Solver-v3 (Zheng et al. 2023): empirical model statistics (EMS) and the step tables of
its multistep solver, in the VE view with data prediction.

With lambda = -log sigma the probability-flow ODE is dx/dlambda = D(x, lambda) - x. v3 splits
the model's output into a part linear in x with a per-dimension coefficient l_lambda and a rest,
and models the rest's change along the trajectory as affine in itself:

    dx/dlambda = -l x + N,   N = D - (1 - l) x,   dN/dlambda ~ s N + b

(the paper's l_lambda, s_lambda, b_lambda, written for its noise-prediction form; this is the
same construction on D: x' = -l x + N is its "linear part", s and b its "rest"). The EMS are
the least-squares choices over data at each lambda:

- l = 1 - E[diag dD/dx], by Hutchinson's estimator E_v[v * (J v)] with Rademacher v and
  `jax.jvp` (l makes the Jacobian of N smallest in Frobenius norm);
- s = Cov(N', N) / Var(N) (a scalar, pooled over dimensions; 0 when Var(N) is round-off),
  b = E[N'] - s E[N] (per dimension), where N' = dN/dlambda along the ODE = jvp of D in the
  direction (D - x, 1) minus (1 - l)(D - x) plus l' x (l' by central differences on the
  statistics grid).

With g(lambda) = e^{-S(lambda_i, lambda)} N - B_i(lambda), S the integral of s and B_i(lambda)
= int_{lambda_i}^{lambda} e^{-S(lambda_i, r)} b_r dr, g is constant along the exact trajectory
when the model obeys the affine law, and the exact solution from lambda_i to lambda_{i+1} is

    x_{i+1} = E x_i + int E(tau) e^{S(lambda_i, tau)} (B_i(tau) + g(tau)) dtau,
    E(tau) = exp(-int_tau^{lambda_{i+1}} l).

The multistep solver extrapolates g by a Lagrange polynomial through its values at the last
p steps (re-anchored at lambda_i: g_i(lambda_j) = e^{-S(lambda_i, lambda_j)} N_j -
B_i(lambda_j)), and the integrals are done by quadrature on a fine sub-grid. Each step is then
x' = E x + C + sum_j W_j N_j with per-dimension tables (E, C, W) precomputed from the grid and
the EMS (`v3_tables`); a final step to sigma = 0 returns D. On Gaussian data D is affine in x
with the coefficient 1 - l, N does not depend on x, s = 0, b = N' and the solver is exact up to
quadrature (tests). The paper's "pseudo-order" predictor/corrector refinements are not
implemented: orders 1..3 with warm-up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def ems(denoiser, x0, sigmas, key, *, probes=1):
    """Empirical model statistics at the noise levels `sigmas` (a 1-D array, any order; a fine
    grid in log sigma, e.g. 200 levels) from data samples `x0` (B, ...).

    Returns {"lam": (K,) increasing lambda = -log sigma, "l": (K, ...), "s": (K,),
    "b": (K, ...)} as float64 numpy arrays (data shape = x0.shape[1:])."""
    lam = np.sort(-np.log(np.asarray(sigmas, np.float64)))
    x0 = jnp.asarray(x0)
    dtype = x0.dtype

    def noisy(k, sigma):
        eps = jax.random.normal(jax.random.fold_in(key, k), x0.shape, dtype)
        return x0 + sigma * eps

    @jax.jit
    def diag_jac(x, sigma, k):
        tot = jnp.zeros(x.shape[1:], dtype)
        for p in range(probes):
            v = jax.random.rademacher(jax.random.fold_in(key, 10_000 + 7 * k + p), x.shape, dtype)
            _, jv = jax.jvp(lambda y: denoiser(y, sigma), (x,), (v,))
            tot = tot + jnp.mean(v * jv, 0)
        return tot / probes

    ls = []
    for k, lm in enumerate(lam):
        sigma = jnp.asarray(np.exp(-lm), dtype)
        ls.append(1.0 - np.asarray(diag_jac(noisy(k, sigma), sigma, k), np.float64))
    l_grid = np.stack(ls)
    dl = np.gradient(l_grid, lam, axis=0)

    @jax.jit
    def rest(x, lm, l, dl):
        sigma = jnp.exp(-lm)

        def d_of(y, lmb):
            return denoiser(y, jnp.exp(-lmb))

        D = d_of(x, lm)
        _, dD = jax.jvp(d_of, (x, lm), (D - x, jnp.ones_like(lm)))
        N = D - (1 - l) * x
        Np = dD - (1 - l) * (D - x) + dl * x
        del sigma
        return N, Np

    ss, bs = [], []
    for k, lm in enumerate(lam):
        x = noisy(k, jnp.asarray(np.exp(-lm), dtype))
        N, Np = rest(x, jnp.asarray(lm, dtype), jnp.asarray(l_grid[k], dtype),
                     jnp.asarray(dl[k], dtype))
        N, Np = np.asarray(N, np.float64), np.asarray(Np, np.float64)
        Nc, Npc = N - N.mean(0), Np - Np.mean(0)
        # a variance of N below 1e-8 of that of the linear part removed from D is round-off
        # (N independent of x, as on Gaussian data): s is then 0, not a ratio of round-offs
        lin = np.asarray(x, np.float64) * (1.0 - l_grid[k])
        floor = 1e-8 * np.sum((lin - lin.mean(0)) ** 2) + 1e-300
        s = np.sum(Npc * Nc) / (np.sum(Nc**2) + floor)
        ss.append(s)
        bs.append(Np.mean(0) - s * N.mean(0))
    return {"lam": lam, "l": l_grid, "s": np.asarray(ss), "b": np.stack(bs)}


def _interp(lam_grid, values, lam):
    """Linear interpolation of per-level values (K, ...) at the points lam (M,)."""
    flat = values.reshape(len(lam_grid), -1)
    out = np.stack([np.interp(lam, lam_grid, flat[:, j]) for j in range(flat.shape[1])], 1)
    return out.reshape((len(lam),) + values.shape[1:])


def _cumtrapz(y, x):
    """Cumulative trapezoid integral of y (M, ...) over x (M,), starting at 0."""
    dx = np.diff(x).reshape((-1,) + (1,) * (y.ndim - 1))
    inc = 0.5 * (y[1:] + y[:-1]) * dx
    return np.concatenate([np.zeros((1,) + y.shape[1:]), np.cumsum(inc, 0)])


def _lagrange(nodes, j, t):
    """The j-th Lagrange basis polynomial over `nodes` at the points t."""
    out = np.ones_like(t)
    for m, v in enumerate(nodes):
        if m != j:
            out = out * (t - v) / (nodes[j] - v)
    return out


def v3_tables(stats, sigmas, order=2, quad=200):
    """Step tables of the v3 multistep solver on the grid `sigmas` (n + 1 decreasing levels,
    possibly ending at 0): {"E", "C", "L1": (n, ...), "W": (n, order, ...)}, float64, where
    step i is x' = E x + C + sum_j W_j N_{i-j} with N = D - L1 x (L1 = 1 - l at sigma_i)."""
    if order not in (1, 2, 3):
        raise ValueError(f"order={order!r} must be 1, 2 or 3")
    sig = np.asarray(sigmas, np.float64)
    lam_g, l_g, s_g, b_g = stats["lam"], stats["l"], stats["s"], stats["b"]
    shape = l_g.shape[1:]
    n = len(sig) - 1
    lam = -np.log(np.maximum(sig, 1e-300))
    E = np.zeros((n,) + shape)
    C = np.zeros((n,) + shape)
    L1 = np.zeros((n,) + shape)
    W = np.zeros((n, order) + shape)
    expand = (slice(None),) + (None,) * len(shape)
    for i in range(n):
        L1[i] = 1.0 - _interp(lam_g, l_g, np.array([lam[i]]))[0]
        if sig[i + 1] == 0:  # final step to 0: x' = D = N + (1 - l) x
            E[i], W[i, 0] = L1[i], 1.0
            continue
        p = min(order, i + 1)
        lo = lam[i - p + 1]  # earliest node (smallest lambda)
        # fine grid from the earliest node to lambda_{i+1}, containing lambda_i
        pts = np.unique(np.concatenate([np.linspace(lo, lam[i], quad * (p - 1) + 1),
                                        np.linspace(lam[i], lam[i + 1], quad + 1),
                                        lam[i - p + 1 : i + 1]]))
        l_f = _interp(lam_g, l_g, pts)
        s_f = np.interp(pts, lam_g, s_g)
        b_f = _interp(lam_g, b_g, pts)
        ii = np.searchsorted(pts, lam[i])
        S = _cumtrapz(s_f, pts)
        S = S - S[ii]  # S(lambda_i, tau)
        Bi = _cumtrapz(np.exp(-S)[expand] * b_f, pts)
        Bi = Bi - Bi[ii]  # B_i(tau)
        Lc = _cumtrapz(l_f, pts)
        Ecoef = np.exp(-(Lc[-1] - Lc))  # exp(-int_tau^{lambda_{i+1}} l)
        E[i] = Ecoef[ii]
        seg = slice(ii, None)
        kern = Ecoef[seg] * np.exp(S[seg])[expand]
        C_i = np.trapezoid(kern * Bi[seg], pts[seg], axis=0)
        nodes = lam[i - p + 1 : i + 1][::-1]  # lambda_i, lambda_{i-1}, ...
        for j in range(p):
            w = np.trapezoid(kern * _lagrange(nodes, j, pts[seg])[expand], pts[seg], axis=0)
            k = np.searchsorted(pts, nodes[j])
            r, Bij = np.exp(-S[k]), Bi[k]  # g_i(lambda_j) = r N_j - B_i(lambda_j)
            W[i, j] = w * r
            C_i = C_i - w * Bij
        C[i] = C_i
    return {"E": E, "C": C, "L1": L1, "W": W}
