"""DPM-Solver with its own step selection (Lu et al. 2022a, Sec. 3.4 and App. C, as k-diffusion's
`DPMSolver` runs it): `dpm_fast` (orders chained to an NFE budget on a uniform lambda grid) and
`dpm_adaptive` (error-controlled DPM-Solver-12/23).

Both ignore the grid's interior: they integrate from sigmas[0] down to the grid's smallest
positive level (k-diffusion's sigma_max and sigma_min), in lambda = -log sigma, and when the grid
ends at 0 they finish with one denoiser call there (x' = D, as every sampler's step to 0).
The DPM-Solver-1/2/3 steps are Lu et al.'s noise-prediction updates (Alg. 1 and the general
DPM-Solver-3), written as k-diffusion's `dpm_solver_{1,2,3}_step`; `single.dpm_solver_2/3` are
the same updates on a given grid.

`trajectory=True`: row k holds the state after the k-th (accepted) step, row 0 the start; the
rows after the last step, and the last row, hold the final state. A stateful denoiser (`base`)
works, but with `dpm_adaptive` the number and levels of its calls depend on x (step-size
control), unlike every grid sampler's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.samplers.base import (
    NO_STATE,
    between_steps,
    check_between_steps,
    check_sigmas,
    lift,
    num_steps_of,
)
from jaxdiff.samplers.noise import noise_fn
from jaxdiff.samplers.stochastic import ancestral_sigmas


def _sigma(t):
    return jnp.exp(-t)


def _lam(sigma):
    return -jnp.log(sigma)


def _eps(denoiser, x, t, state):
    s = _sigma(t)
    x0, state = denoiser(x, s, state)
    return ((x - x0) / s.astype(x.dtype)).astype(x.dtype), state


def _update(x, eps, t, t_next, r1=None, eps_r1=None, r2=None, eps_r2=None):
    """DPM-Solver-1 (no stage), -2 (stage r1) or -3 (stages r1, r2) from lambda t to t_next,
    given the noise predictions at t and at the stages; `_stage` computes the stage states."""
    h = t_next - t
    sn, em1 = _sigma(t_next), jnp.expm1(h)
    x = x - (sn * em1).astype(x.dtype) * eps
    if r2 is not None:
        return x - (sn / r2 * (em1 / h - 1.0)).astype(x.dtype) * (eps_r2 - eps)
    if r1 is not None:
        return x - (sn / (2.0 * r1) * em1).astype(x.dtype) * (eps_r1 - eps)
    return x


def _stage(x, eps, t, h, r, r1=None, eps_r1=None):
    """The state at the stage lambda t + r h: DPM-Solver-1 to it, plus DPM-Solver-3's second-stage
    correction when (r1, eps_r1) are given."""
    sr = _sigma(t + r * h)
    u = x - (sr * jnp.expm1(r * h)).astype(x.dtype) * eps
    if r1 is None:
        return u
    c = sr * (r / r1) * (jnp.expm1(r * h) / (r * h) - 1.0)
    return u - c.astype(x.dtype) * (eps_r1 - eps)


def _step(denoiser, x, t, t_next, order, state):
    """One DPM-Solver step of `order` (traced: 1, 2 or 3) from t to t_next: order NFE."""
    eps, state = _eps(denoiser, x, t, state)
    h = t_next - t

    def first():
        return _update(x, eps, t, t_next), state

    def second():
        e1, st = _eps(denoiser, _stage(x, eps, t, h, 0.5), t + 0.5 * h, state)
        return _update(x, eps, t, t_next, 0.5, e1), st

    def third():
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        e1, st = _eps(denoiser, _stage(x, eps, t, h, r1), t + r1 * h, state)
        e2, st = _eps(denoiser, _stage(x, eps, t, h, r2, r1, e1), t + r2 * h, st)
        return _update(x, eps, t, t_next, r1, e1, r2, e2), st

    return jax.lax.switch(order - 1, (first, second, third))


def _ends(sigmas, num_steps):
    """(sigma_max, sigma_min, ends_at_zero, n): the integration range of the grid's used part."""
    check_sigmas(sigmas)
    n = num_steps_of(sigmas, num_steps)
    end = sigmas[n]
    zero = end == 0
    lo = jnp.where(zero, sigmas[jnp.maximum(n - 1, 0)], end)
    if not isinstance(sigmas, jax.core.Tracer) and not isinstance(n, jax.core.Tracer):
        if not 0 < float(lo) < float(sigmas[0]):
            raise ValueError(
                f"the grid's smallest positive level {float(lo):g} must lie below its first "
                f"{float(sigmas[0]):g}: give a grid with at least two positive levels")
    return sigmas[0], lo, zero, n


def _finish(denoiser, x, lo, zero, state):
    """x' = D(x, sigma_min) when the grid ends at 0 (1 NFE), else x."""
    return jax.lax.cond(zero, lambda: denoiser(x, lo, state), lambda: (x, state))


def _record(traj, k, x):
    return None if traj is None else traj.at[jnp.minimum(k, traj.shape[0] - 1)].set(x)


def _close(traj, k, x):
    """Rows after step k, and the last row, hold the final state x."""
    rows = jnp.arange(traj.shape[0]).reshape((-1,) + (1,) * x.ndim)
    return jnp.where((rows > k) | (rows == traj.shape[0] - 1), x, traj)


def _out(x, traj, state, info=None):
    """x, then the trajectory, the denoiser state and the info when there are any."""
    out = (x,) if traj is None else (x, traj)
    out = out if state is NO_STATE else (*out, state)
    out = out if info is None else (*out, info)
    return out[0] if len(out) == 1 else out


def _check_eta(eta, key, name):
    if isinstance(eta, jax.core.Tracer) or eta != 0:
        if key is None:
            raise ValueError(f"{name} with eta != 0 is stochastic: pass key=jax.random.key(...)")
        return True
    return False


def fast_orders(nfe):
    """(number of steps m, order of step j): k-diffusion's DPM-Solver-fast split of an NFE
    budget (Lu et al. 2022a, Sec. 3.4): m = nfe // 3 + 1 steps of order 3, ending with orders
    2, 1 when 3 divides nfe, else with order nfe mod 3. Works on traced nfe."""
    m = nfe // 3 + 1
    rem = nfe % 3

    def order(j):
        last_two = jnp.where(j == m - 1, 1, jnp.where(j == m - 2, 2, 3))
        last_one = jnp.where(j == m - 1, rem, 3)
        return jnp.where(rem == 0, last_two, last_one).astype(jnp.int32)

    return m, order


def dpm_fast(denoiser, x, sigmas, *, num_steps=None, trajectory=False, nfe=None, eta=0.0,
             s_noise=1.0, key=None, noise_sampler="normal"):
    """DPM-Solver-fast (Lu et al. 2022a, Sec. 3.4; k-diffusion's `sample_dpm_fast`; no diffusers
    counterpart): the NFE budget `nfe` spent as m = nfe // 3 + 1 steps, uniform in
    lambda = -log sigma from sigmas[0] to the grid's smallest positive level, of DPM-Solver-3
    except the last: orders ..., 3, 2, 1 when 3 divides nfe, else ..., 3, nfe mod 3
    (`fast_orders`). One call, one compiled program (nfe and num_steps may be traced).

    Default `nfe`: num_steps, less 1 when the grid ends at 0 (its final call, x' = D at sigma_min),
    so NFE = num_steps. `eta` > 0 (needs `key`): ancestral steps as k-diffusion's, each step
    aiming at sigma_down (no lower than sigma_min) then adding s_noise sqrt(sigma'^2 -
    sigma_down^2) z, z drawn over [sigma', sigma] (`noise_sampler`: "normal" or "brownian")."""
    hi, lo, zero, n = _ends(sigmas, num_steps)
    stochastic = _check_eta(eta, key, "dpm_fast")
    if nfe is None:
        nfe = jnp.maximum(n - zero.astype(jnp.int32), 1)
    elif not isinstance(nfe, jax.core.Tracer) and nfe < 1:
        raise ValueError(f"nfe={nfe!r} must be an integer >= 1")
    m, order = fast_orders(nfe)
    t_start, t_end = _lam(hi), _lam(lo)
    denoiser, state = lift(denoiser)
    draw = noise_fn(noise_sampler, key, sigmas, num_steps) if stochastic else None
    traj = jnp.zeros((sigmas.shape[0],) + x.shape, x.dtype).at[0].set(x) if trajectory else None

    span, dt = t_end - t_start, t_start.dtype

    def body(j, loop):
        x, state, traj = loop
        t = t_start + span * (jnp.asarray(j, dt) / m)
        t_next = jnp.where(j + 1 == m, t_end, t_start + span * (jnp.asarray(j + 1, dt) / m))
        if stochastic:
            down, _ = ancestral_sigmas(_sigma(t), _sigma(t_next), eta)
            t_to = jnp.minimum(t_end, _lam(down))
            up = jnp.sqrt(jnp.maximum(_sigma(t_next) ** 2 - _sigma(t_to) ** 2, 0.0))
        else:
            t_to = t_next
        x, state = _step(denoiser, x, t, t_to, order(j), state)
        if stochastic:
            z = draw(j, _sigma(t), _sigma(t_next), x)
            x = x + (up * s_noise).astype(x.dtype) * z
        x, _, state = between_steps(j, x, (), state)
        return x, state, _record(traj, j + 1, x)

    x, state, traj = jax.lax.fori_loop(0, m, body, (x, state, traj))
    x, state = _finish(denoiser, x, lo, zero, state)
    if trajectory:
        k = m + zero.astype(jnp.int32)
        traj = _close(_record(traj, k, x), k, x)
    return _out(x, traj, state)


def dpm_adaptive(denoiser, x, sigmas, *, num_steps=None, trajectory=False, order=3, rtol=0.05,
                 atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                 accept_safety=0.81, eta=0.0, s_noise=1.0, max_nfe=1000, key=None,
                 noise_sampler="normal", return_info=False):
    """Adaptive DPM-Solver-12 (`order=2`) or -23 (`order=3`, the default) (Lu et al. 2022a,
    Sec. 3.4 and App. C; k-diffusion's `sample_dpm_adaptive` with the same defaults; no
    diffusers counterpart), from sigmas[0] to the grid's smallest positive level in
    lambda = -log sigma, in one `lax.while_loop` (through `jaxdiff.sample`, `steps` only picks
    the grid's ends; count NFE there with a `Stateful` counter).

    Each attempt from lambda s with step h computes a low- and a high-order solution on
    [s, min(s + h, end)] (DPM-Solver-1 and -2, or DPM-Solver-2 with r1 = 1/3 and -3, sharing
    model calls: `order` NFE an attempt) and the error ||(x_low - x_high) / delta||_rms with
    delta = max(atol, rtol max(|x_low|, |x_prev|)) over the whole array. k-diffusion's
    controller: with inverse errors e_k = 1/(err_k + 1e-8) of the current and two last accepted
    attempts, factor = 1 + atan(e_0^b1 e_1^b2 e_2^b3 - 1), b1 = (pcoeff + icoeff + dcoeff)/q,
    b2 = -(pcoeff + 2 dcoeff)/q, b3 = dcoeff/q (q = order, or 1.5 when eta > 0); the attempt is
    accepted when factor >= accept_safety, and h *= factor either way. Accepted steps keep
    x_high (and x_prev = x_low). The loop stops at the end level (to 1e-5 in lambda); when the
    next attempt could overrun `max_nfe` (counting the final call at 0), the remaining range is
    taken in one accepted step, so NFE <= max_nfe always (a capped run is then inaccurate:
    raise max_nfe or loosen rtol/atol).

    eta > 0 (needs `key`): ancestral as `dpm_fast`, the k-th accepted step drawing noise
    k (`noise_sampler`). `return_info=True` (called directly, not through `jaxdiff.sample`)
    appends {"nfe", "n_accept", "n_reject"}, the exact counts (with the final call at 0)."""
    if order not in (2, 3):
        raise ValueError(f"order={order!r} must be 2 or 3")
    hi, lo, zero, _ = _ends(sigmas, num_steps)
    stochastic = _check_eta(eta, key, "dpm_adaptive")
    if not isinstance(max_nfe, jax.core.Tracer) and max_nfe < order + 1:
        raise ValueError(f"max_nfe={max_nfe!r} must be at least order + 1 = {order + 1}")
    denoiser, state = lift(denoiser)
    check_between_steps(state, "dpm_adaptive")
    draw = noise_fn(noise_sampler, key, sigmas, num_steps) if stochastic else None
    t_start, t_end = _lam(hi), _lam(lo)
    q = 1.5 if stochastic else order
    b1, b2, b3 = (pcoeff + icoeff + dcoeff) / q, -(pcoeff + 2 * dcoeff) / q, dcoeff / q
    budget = max_nfe - zero.astype(jnp.int32)  # calls left for the loop
    dt = t_start.dtype
    traj = jnp.zeros((sigmas.shape[0],) + x.shape, x.dtype).at[0].set(x) if trajectory else None

    def attempt(x, s, t_to, state):
        eps, state = _eps(denoiser, x, s, state)
        h = t_to - s
        if order == 2:
            e1, state = _eps(denoiser, _stage(x, eps, s, h, 0.5), s + 0.5 * h, state)
            return _update(x, eps, s, t_to), _update(x, eps, s, t_to, 0.5, e1), state
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        e1, state = _eps(denoiser, _stage(x, eps, s, h, r1), s + r1 * h, state)
        e2, state = _eps(denoiser, _stage(x, eps, s, h, r2, r1, e1), s + r2 * h, state)
        return (_update(x, eps, s, t_to, r1, e1),
                _update(x, eps, s, t_to, r1, e1, r2, e2), state)

    def cond(loop):
        return loop["s"] < t_end - 1e-5

    def body(loop):
        x, s, h = loop["x"], loop["s"], loop["h"]
        force = loop["nfe"] + 2 * order > budget
        t = jnp.where(force, t_end, jnp.minimum(t_end, s + h))
        if stochastic:
            down, _ = ancestral_sigmas(_sigma(s), _sigma(t), eta)
            t_to = jnp.minimum(t_end, _lam(down))
            up = jnp.sqrt(jnp.maximum(_sigma(t) ** 2 - _sigma(t_to) ** 2, 0.0))
        else:
            t_to = t
        x_low, x_high, state = attempt(x, s, t_to, loop["state"])
        delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(loop["x_prev"])))
        err = jnp.sqrt(jnp.mean(jnp.square((x_low - x_high) / delta))).astype(dt)
        inv = 1.0 / (err + 1e-8)
        errs = jnp.where(loop["attempts"] == 0, jnp.full(3, inv, dt), loop["errs"].at[0].set(inv))
        factor = errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3
        factor = 1.0 + jnp.arctan(factor - 1.0)
        accept = (factor >= accept_safety) | force
        errs = jnp.where(accept, jnp.stack([errs[0], errs[0], errs[1]]), errs)
        if stochastic:
            z = draw(loop["n_accept"], _sigma(s), _sigma(t), x)
            x_high = x_high + (up * s_noise).astype(x.dtype) * z
        n_accept = loop["n_accept"] + accept.astype(jnp.int32)
        return dict(
            x=jnp.where(accept, x_high, x), x_prev=jnp.where(accept, x_low, loop["x_prev"]),
            s=jnp.where(accept, t, s), h=h * factor, errs=errs, attempts=loop["attempts"] + 1,
            n_accept=n_accept, n_reject=loop["n_reject"] + 1 - accept.astype(jnp.int32),
            nfe=loop["nfe"] + order, state=state,
            traj=None if traj is None else jnp.where(
                accept, _record(loop["traj"], n_accept, x_high), loop["traj"]),
        )

    zero_i = jnp.zeros((), jnp.int32)
    loop = dict(x=x, x_prev=x, s=t_start, h=jnp.asarray(abs(h_init), dt),
                errs=jnp.ones(3, dt), attempts=zero_i, n_accept=zero_i, n_reject=zero_i,
                nfe=zero_i, state=state, traj=traj)
    loop = jax.lax.while_loop(cond, body, loop)
    x, state = _finish(denoiser, loop["x"], lo, zero, loop["state"])
    if trajectory:
        k = loop["n_accept"] + zero.astype(jnp.int32)
        traj = _close(_record(loop["traj"], k, x), k, x)
    info = None
    if return_info:
        info = dict(nfe=loop["nfe"] + zero.astype(jnp.int32), n_accept=loop["n_accept"],
                    n_reject=loop["n_reject"])
    return _out(x, traj, state, info)


SAMPLERS = {"dpm_fast": dpm_fast, "dpm_adaptive": dpm_adaptive}
