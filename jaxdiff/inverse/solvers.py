"""Training-free solvers of y = A(x0) + sigma_y n on a trained prior, as sampler objects.

Each solver is a frozen dataclass holding the operator (`jaxdiff.inverse.operators`), the
measurement y and its step sizes, all pytree leaves; called as a sampler,
`solver(denoiser, x, sigmas, *, key, num_steps=None, trajectory=False)`, it follows the contract
of `jaxdiff.samplers.base` (one shared loop, a traced `num_steps`, stateful denoisers, NFE
counted: every solver calls the denoiser once per step). So `jaxdiff.sample(model_fn, noise,
process=..., prediction=..., sampler=DPS(operator, y), steps=100, key=key)` solves the problem
with any process, prediction, network or guidance, and a new y, operator mask or step size
reuses the compiled program. Everything is in the VE view x = x0 + sigma eps of
`jaxdiff.core.denoiser`; formulas from VP papers are translated with alpha = 1/sqrt(1 + sigma^2)
and stated below as they act on any process.

The stochastic step shared by DDNM, PiGDM and DDS is DDIM with eta (Song et al. 2021, Eq. 12):
x' = x0 + sigma_down eps + sigma_up z, with (sigma_down, sigma_up) of
`jaxdiff.samplers.stochastic.ancestral_sigmas` (eta = 1: DDPM's posterior, eta = 0: DDIM).

Solvers and sources:
  DPS      Chung et al. 2023, "Diffusion Posterior Sampling for General Noisy Inverse
           Problems", Alg. 1 (any differentiable A, also nonlinear; 1 NFE + 1 VJP a step).
  PiGDM    Song et al. 2023, "Pseudoinverse-Guided Diffusion Models for Inverse Problems",
           Eq. 7-8 (linear A; 1 NFE + 1 VJP a step).
  DDNM     Wang et al. 2023, "Zero-Shot Image Restoration Using Denoising Diffusion Null-Space
           Model", Alg. 1, and DDNM+ (Sec. 3.3) for sigma_y > 0 (A with a pseudo-inverse).
  REDDiff  Mardani et al. 2024, "A Variational Perspective on Solving Inverse Problems with
           Diffusion Models", Alg. 1 (any differentiable A; no backprop through the network).
  DDS      Chung, Lee & Ye 2024, "Decomposed Diffusion Sampler for Accelerating Large-Scale
           Inverse Problems", Alg. 1-2 (linear A; conjugate gradients in the data-consistency
           step, no backprop through the network).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdiff.core.denoiser import expand_like
from jaxdiff.core.process import check_values, pytree_dataclass
from jaxdiff.samplers.base import lift, run, step_key
from jaxdiff.samplers.stochastic import ancestral_sigmas


def _sum(a):
    """Per-sample sum over every axis but the first."""
    return jnp.sum(a, axis=tuple(range(1, a.ndim)))


def _noise(key, i, x):
    return jax.random.normal(step_key(key, i), x.shape, x.dtype)


def _ddim_eta(x0, eps, s, s_next, eta, z):
    """x' = x0 + sigma_down eps + sigma_up z at s_next (x0 itself at s_next = 0)."""
    down, up = ancestral_sigmas(s, s_next, eta)
    return (x0 + down * eps + up * z).astype(x0.dtype)


def _check_common(name, eta, y, operator):
    check_values(name, "0 <= eta <= 1", lambda e: 0 <= e <= 1, eta=eta)
    if not hasattr(operator, "forward"):
        raise ValueError(f"{name} operator={type(operator).__name__} is not a measurement "
                         "operator; allowed: one of jaxdiff.inverse.operators (Inpaint, "
                         "Downsample, Blur, ChannelMix, Matrix, Saturate)")


@pytree_dataclass(data=("operator", "y", "zeta", "eta"))
class DPS:
    """Diffusion posterior sampling (Chung et al. 2023, Alg. 1).

    Each step takes the ancestral step from x0 = D(x, sigma), then moves against the gradient
    of the measurement residual's norm through the denoiser:
      x' = ancestral step - zeta c grad_x ||y - A(D(x, sigma))||,  c = sqrt((1 + s^2)(1 + s'^2)).
    This is the reference code's update (the paper's Alg. 1 writes ||.||^2 with step
    zeta' / ||y - A(x0)||, i.e. zeta = 2 zeta'); c = 1 / (alpha alpha') makes it the paper's
    step of a VP model exactly, and defines it for every process. `eta` is the ancestral
    step's (1: DDPM, as in the paper). The residual norm is per sample."""

    operator: Any
    y: Any
    zeta: Any = 1.0
    eta: Any = 1.0

    def __post_init__(self):
        _check_common("DPS", self.eta, self.y, self.operator)
        check_values("DPS", "zeta >= 0", lambda z: z >= 0, zeta=self.zeta)

    def __call__(self, denoiser, x, sigmas, *, key, num_steps=None, trajectory=False):
        fn, state = lift(denoiser)
        op, y = self.operator, self.y

        def loss(x, s, state):
            x0, state = fn(x, s, state)
            norm = jnp.sqrt(_sum(jnp.square(y - op(x0))))
            return jnp.sum(norm), (x0, state, norm)

        def step(i, x, carry, state):
            s, s_next = sigmas[i], sigmas[i + 1]
            grad, (x0, state, _) = jax.grad(loss, has_aux=True)(x, s, state)
            x_next = _ddim_eta(x0, (x - x0) / s, s, s_next, self.eta, _noise(key, i, x))
            c = jnp.sqrt((1 + jnp.square(s)) * (1 + jnp.square(s_next)))
            return (x_next - self.zeta * c * grad).astype(x.dtype), carry, state

        return run(step, x, sigmas, (), state, num_steps=num_steps, trajectory=trajectory)


@pytree_dataclass(data=("operator", "y", "scale", "eta", "data_std"))
class PiGDM:
    """Pseudoinverse-guided diffusion (Song et al. 2023, Eq. 7-8), for linear A.

    p(x0 | x) is approximated by N(D(x, sigma), r^2 I) with r^2 = sigma^2 s_d^2 / (sigma^2 +
    s_d^2) (the paper's r_t^2 = sigma_t^2 / (1 + sigma_t^2) for data of std s_d = `data_std`),
    so p(y | x) ~ N(A D, r^2 A A^T + sigma_y^2 I), whose score through the denoiser's VJP is
      g = J_D^T A^T (r^2 A A^T + sigma_y^2 I)^+ (y - A D)
    (sigma_y = 0: J_D^T (A^+ y - A^+ A D) / r^2, the paper's noiseless form). The guided score
    gives the guided denoiser D' = D + scale sigma^2 g (Tweedie), from which the DDIM-eta step is
    taken (the paper uses eta = 1)."""

    operator: Any
    y: Any
    scale: Any = 1.0
    eta: Any = 1.0
    data_std: Any = 1.0

    def __post_init__(self):
        _check_common("PiGDM", self.eta, self.y, self.operator)
        check_values("PiGDM", "scale >= 0, data_std > 0", lambda w, d: w >= 0 and d > 0,
                     scale=self.scale, data_std=self.data_std)

    def __call__(self, denoiser, x, sigmas, *, key, num_steps=None, trajectory=False):
        fn, state = lift(denoiser)
        op, y = self.operator, self.y
        d2 = jnp.square(jnp.asarray(self.data_std, x.dtype))

        def step(i, x, carry, state):
            s, s_next = sigmas[i], sigmas[i + 1]
            x0, vjp, state = jax.vjp(lambda x: fn(x, s, state), x, has_aux=True)
            r2 = jnp.square(s) * d2 / (jnp.square(s) + d2)
            v = op.gram_solve(y - op(x0), r2, jnp.square(op.sigma_y))
            (g,) = vjp(v.astype(x0.dtype))
            guided = x0 + self.scale * jnp.square(s) * g
            x_next = _ddim_eta(guided, (x - guided) / s, s, s_next, self.eta, _noise(key, i, x))
            return x_next, carry, state

        return run(step, x, sigmas, (), state, num_steps=num_steps, trajectory=trajectory)


@pytree_dataclass(data=("operator", "y", "eta"))
class DDNM:
    """Denoising diffusion null-space model (Wang et al. 2023, Alg. 1; DDNM+ for sigma_y > 0).

    Each step replaces the range-space part of the denoiser's estimate by the measurement,
    x0r = x0 - lam A^+ (A x0 - y) (lam = 1: A^+ y + (I - A^+ A) x0), and samples the DDIM-eta
    posterior around it, x' = x0r + (sigma_down / sigma)(x - x0r) + sigma_up z. With noise
    (DDNM+), lam = min(1, sigma_up / (a sigma_y)) where a = 1 - sigma_down / sigma is x0r's
    coefficient in x', so the measurement noise carried into x' never exceeds the step's own
    noise, and the fresh noise is cut to sqrt(sigma_up^2 - (a lam sigma_y)^2) (A^+ n is taken to
    have std sigma_y per entry, true for masks and average pooling). The paper's code defaults
    to eta = 0.85."""

    operator: Any
    y: Any
    eta: Any = 0.85

    def __post_init__(self):
        _check_common("DDNM", self.eta, self.y, self.operator)

    def __call__(self, denoiser, x, sigmas, *, key, num_steps=None, trajectory=False):
        fn, state = lift(denoiser)
        op, y = self.operator, self.y

        def step(i, x, carry, state):
            s, s_next = sigmas[i], sigmas[i + 1]
            x0, state = fn(x, s, state)
            down, up = ancestral_sigmas(s, s_next, self.eta)
            a = 1.0 - down / s
            sy = jnp.asarray(op.sigma_y, x.dtype)
            lam = jnp.where(a * sy > up, up / jnp.maximum(a * sy, 1e-30), 1.0)
            x0r = x0 - lam * op.pinv(op(x0) - y)
            fresh = jnp.sqrt(jnp.maximum(jnp.square(up) - jnp.square(a * lam * sy), 0.0))
            x_next = x0r + (down / s) * (x - x0r) + fresh * _noise(key, i, x)
            return x_next.astype(x.dtype), carry, state

        return run(step, x, sigmas, (), state, num_steps=num_steps, trajectory=trajectory)


@pytree_dataclass(data=("operator", "y", "gamma", "eta"))
class DDS:
    """Decomposed diffusion sampling (Chung, Lee & Ye 2024, Alg. 1-2), for linear A.

    Each step refines the denoiser's estimate by `cg_steps` conjugate-gradient iterations on the
    data-consistency problem min_x ||y - A x||^2 / 2 + gamma ||x - x0||^2 / 2, started at x0
    (the Krylov subspace keeps the update close to the data manifold's tangent space; no
    backprop through the network), then takes the DDIM-eta step from the refined x0c with the
    network's own eps: x' = x0c + sigma_down eps + sigma_up z. `cg_steps` is static (another
    count compiles another program)."""

    operator: Any
    y: Any
    cg_steps: int = 5
    gamma: Any = 0.0
    eta: Any = 0.15

    def __post_init__(self):
        _check_common("DDS", self.eta, self.y, self.operator)
        if isinstance(self.cg_steps, bool) or not isinstance(self.cg_steps, int) or not (
                1 <= self.cg_steps <= 100):
            raise ValueError(f"DDS cg_steps={self.cg_steps!r} is invalid; allowed: an integer "
                             "1..100")
        check_values("DDS", "gamma >= 0", lambda g: g >= 0, gamma=self.gamma)

    def __call__(self, denoiser, x, sigmas, *, key, num_steps=None, trajectory=False):
        fn, state = lift(denoiser)
        op, y = self.operator, self.y

        def step(i, x, carry, state):
            s, s_next = sigmas[i], sigmas[i + 1]
            x0, state = fn(x, s, state)
            x0c = conjugate_gradient(op, y, x0, self.gamma, self.cg_steps)
            x_next = _ddim_eta(x0c, (x - x0) / s, s, s_next, self.eta, _noise(key, i, x))
            return x_next, carry, state

        return run(step, x, sigmas, (), state, num_steps=num_steps, trajectory=trajectory)


def conjugate_gradient(op, y, x0, gamma, steps, rtol=1e-4):
    """`steps` CG iterations on (A^T A + gamma I) x = A^T y + gamma x0 from x = x0, per sample
    (Hestenes & Stiefel 1952). A sample stops when its residual falls below rtol times the
    scale of the right-hand side or of x0 (A^T A is singular for gamma = 0, where more
    iterations would divide by round-off)."""

    def normal(v):
        return op.adjoint(op(v)) + gamma * v

    def dot(a, b):
        return expand_like(_sum(a * b), a)

    b = op.adjoint(y) + gamma * x0
    r = b - normal(x0)
    rr0 = dot(r, r)
    # relative to the right-hand side (the usual test), and to round-off: below it, r and p
    # are noise and a step would divide by it
    floor = jnp.square(jnp.asarray(rtol, x0.dtype)) * jnp.maximum(dot(b, b), dot(x0, x0))

    def body(_, loop):
        x, r, p, rr = loop
        ap = normal(p)
        pap = dot(p, ap)
        live = (rr > floor) & (pap > 0)
        alpha = jnp.where(live, rr / jnp.where(live, pap, 1.0), 0.0)
        x, r = x + alpha * p, r - alpha * ap
        rr_new = dot(r, r)
        p = r + jnp.where(live, rr_new / jnp.where(live, rr, 1.0), 0.0) * p
        return x, r, p, jnp.where(live, rr_new, rr)

    x, *_ = jax.lax.fori_loop(0, steps, body, (x0, r, r, rr0))
    return x.astype(x0.dtype)


@pytree_dataclass(data=("operator", "y", "lam", "lr", "obs_weight"))
class REDDiff:
    """RED-Diff (Mardani et al. 2024, Alg. 1): variational posterior sampling by optimisation.

    The estimate mu (started at A^+ y, A^T y without a pseudo-inverse) is optimised with Adam
    (lr, betas 0.9 / 0.99) over the grid's levels in descending order, one network call each:
      loss(mu) = obs_weight mean((y - A(mu))^2) / 2 + lam w(sigma) mean(sg(eps_hat - eps) mu),
    with x = mu + sigma eps, eps_hat = (x - D(x, sigma)) / sigma and w(sigma) = sigma, the
    paper's sqrt(1 / SNR) weighting (its code's default "linear"); the regulariser's gradient
    is then lam (mu - D(x, sigma)) / dim: a pull toward the denoised estimate, never
    differentiated through the network. Means are per sample, as in the paper's code. The
    result is mu after the last level (x, the initial noise, is not used)."""

    operator: Any
    y: Any
    lam: Any = 0.25
    lr: Any = 0.1
    obs_weight: Any = 1.0

    def __post_init__(self):
        _check_common("REDDiff", 0.0, self.y, self.operator)
        check_values("REDDiff", "lam >= 0, lr > 0, obs_weight >= 0",
                     lambda l, r, o: l >= 0 and r > 0 and o >= 0,
                     lam=self.lam, lr=self.lr, obs_weight=self.obs_weight)

    def __call__(self, denoiser, x, sigmas, *, key, num_steps=None, trajectory=False):
        fn, state = lift(denoiser)
        op, y = self.operator, self.y
        mu = (op.pinv(y) if op.has_pinv else op.adjoint(y) if op.linear else jnp.zeros_like(x))
        mu = mu.astype(x.dtype)
        opt = optax.adam(self.lr, b1=0.9, b2=0.99)
        m = y[0].size

        def obs(mu):
            return self.obs_weight * jnp.sum(jnp.square(y - op(mu))) / (2 * m)

        def step(i, mu, opt_state, state):
            s = sigmas[i]
            eps = _noise(key, i, mu)
            x0, state = fn(mu + s * eps, s, state)
            grad = jax.grad(obs)(mu) + self.lam * (mu - jax.lax.stop_gradient(x0)) / mu[0].size
            updates, opt_state = opt.update(grad, opt_state, mu)
            return optax.apply_updates(mu, updates).astype(mu.dtype), opt_state, state

        return run(step, mu, sigmas, opt.init(mu), state, num_steps=num_steps,
                   trajectory=trajectory)


SOLVERS = {"dps": DPS, "pigdm": PiGDM, "ddnm": DDNM, "reddiff": REDDiff, "dds": DDS}


def solve(model_fn, y, operator, *, solver, process, prediction, steps, key, schedule=None,
          guidance=None, **options):
    """Restorations (B, *x_shape) of measurements y (B, *y_shape) = A(x0) + noise, drawn by
    `solver` (a name in `SOLVERS`) with its `options` through `jaxdiff.sample` (model_fn,
    process, prediction, steps, schedule, guidance as there). The initial noise is drawn from
    fold_in(key, 0), the solver's noise from fold_in(key, 1)."""
    from jaxdiff.sampling import sample

    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is unknown; allowed: {', '.join(SOLVERS)}")
    y = jnp.asarray(y)
    if y.ndim < 2:
        raise ValueError(f"y has shape {y.shape}; allowed: a batch (B, ...) of measurements")
    shape = tuple(operator.input_shape(y.shape[1:]))
    operator.check(shape, y)
    noise = jax.random.normal(jax.random.fold_in(key, 0), (y.shape[0], *shape),
                              jnp.result_type(float))
    return sample(model_fn, noise, process=process, prediction=prediction,
                  sampler=SOLVERS[solver](operator, y, **options), steps=steps,
                  schedule=schedule, key=jax.random.fold_in(key, 1), guidance=guidance)


__all__ = ["DPS", "PiGDM", "DDNM", "DDS", "REDDiff", "SOLVERS", "conjugate_gradient", "solve"]
