"""Log-likelihood through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2).

In the VE view the probability-flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma. We integrate
it in u = log sigma, where it reads dx/du = f(x, u) = x - D(x, e^u) (no 1/sigma stiffness near
the data end), from u0 = log sigma_min (the data) up to u1 = log sigma_max. The instantaneous
change of variables (Chen et al. 2018, Thm. 1; Grathwohl et al. 2019, FFJORD, Eq. 4) gives

    log p_{sigma_min}(x(u0)) = log p_{sigma_max}(x(u1)) + int_{u0}^{u1} div_x f(x(u), u) du,

and p_{sigma_max} is replaced by the prior: the VE prior N(0, sigma_max^2 I) by default, or any
`prior_logp`. What is computed is therefore the model density of the data *as a state at
noise level sigma_min*: for data N(mu, s^2 I) the exact answer is N(mu, (s^2 + sigma_min^2) I),
not N(mu, s^2 I). For a variance-preserving process the VE-view state is x/alpha; alpha(t_min)
is within 1e-4 of 1 for the processes in `jaxdiff.core.process`, and no correction for it is made.

The divergence is either exact (the trace of the Jacobian from one JVP per data dimension:
small data only) or the Hutchinson-Skilling estimate div f ~ e^T (df/dx) e (Hutchinson 1989;
Skilling 1989; FFJORD Eq. 7) with Rademacher or Gaussian probes e, drawn once per solve and held
fixed along the trajectory, which keeps the estimate of the integral unbiased; "auto" takes the
exact trace for data of at most EXACT_MAX_DIM values per example, else Hutchinson's.

Use with any process through `jaxdiff.core.denoiser`:
    D = jaxdiff.denoiser(model_fn, process, prediction)
    nll(D, x, sigma_min=process.sigma_min, sigma_max=process.sigma_max, key=key)
"""

from __future__ import annotations

import math

import diffrax
import jax
import jax.numpy as jnp

from jaxdiff.core import analytic

DIVERGENCES = ("auto", "exact", "hutchinson")
EXACT_MAX_DIM = 16  # "auto" takes the exact trace up to this many data dimensions
PROBES = ("rademacher", "gaussian")


def resolve_divergence(divergence, shape):
    """"auto" -> "exact" for examples of `shape` with at most EXACT_MAX_DIM values, else
    "hutchinson"; the other choices as they are."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is unknown; allowed: {', '.join(DIVERGENCES)}")
    if divergence != "auto":
        return divergence
    return "exact" if math.prod(shape) <= EXACT_MAX_DIM else "hutchinson"


def nll(
    denoiser,
    x0,
    *,
    sigma_min,
    sigma_max,
    key=None,
    divergence="hutchinson",
    probe="rademacher",
    num_probes=1,
    prior_logp=None,
    rtol=1e-5,
    atol=1e-5,
    max_steps=4096,
):
    """Negative log-likelihood -log p_{sigma_min}(x0) in nats, one value per sample.

    Args:
      denoiser: D(x, sigma) -> x0-hat in the VE view; x0: data of shape (batch, ...).
      sigma_min, sigma_max: the noise levels of the data end (> 0) and of the prior.
      key: PRNG key for the Hutchinson probes (unused with divergence="exact").
      divergence: "exact", "hutchinson" or "auto" (`resolve_divergence`); probe: "rademacher" or
        "gaussian"; num_probes: probes averaged per sample (each fixed along the whole solve).
      prior_logp: log density of the state at sigma_max, per sample; default N(0, sigma_max^2 I).
      rtol, atol: tolerances of the adaptive Tsit5 solver (score_sde uses RK45 at 1e-5);
        max_steps: its step budget (diffrax raises an error when it is exceeded).
    """
    _check(x0, divergence, probe, num_probes, key, sigma_min, sigma_max)
    x0 = jnp.asarray(x0)
    divergence = resolve_divergence(divergence, x0.shape[1:])
    probes, weight = _probes(x0, key, divergence, probe, num_probes)
    x_T, delta_logp = _integrate(denoiser, x0, probes, weight, sigma_min, sigma_max,
                                 rtol, atol, max_steps)
    if prior_logp is None:
        prior = analytic.gaussian_log_density(x_T, sigma_max, 0.0, 0.0)  # N(0, sigma_max^2 I)
    else:
        prior = prior_logp(x_T)
    return -(prior + delta_logp)


def _integrate(D, x0, probes, weight, sigma_min, sigma_max, rtol, atol, max_steps):
    """[x, delta_logp] from log sigma_min to log sigma_max with adaptive Tsit5."""
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_vector_field(D, probes, weight)),
        diffrax.Tsit5(),
        t0=jnp.log(sigma_min),
        t1=jnp.log(sigma_max),
        dt0=None,
        y0=(x0, jnp.zeros(x0.shape[:1], x0.dtype)),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
    )
    return sol.ys[0][-1], sol.ys[1][-1]


def _vector_field(D, probes, weight):
    """(dx/du, d delta_logp/du) = (x - D(x, e^u), div_x of it), estimated with `probes`."""
    axes = tuple(i for i in range(probes.ndim) if i != 1)  # all but the batch axis

    def f(u, state, args):
        x, _ = state
        sigma = jnp.exp(u).astype(x.dtype)
        drift, jvp = jax.linearize(lambda x: x - D(x, sigma), x)
        div = weight * jnp.sum(probes * jax.vmap(jvp)(probes), axis=axes)  # e^T J e, per sample
        return drift, div

    return f


def _probes(x, key, divergence, probe, num_probes):
    """Probe vectors (K, batch, ...) and their weight: sum_k w e_k^T J e_k estimates tr J.

    Exact: the K = dim standard basis vectors with weight 1. Hutchinson: K random probes with
    E[e e^T] = I and weight 1/K."""
    if divergence == "exact":
        dim = math.prod(x.shape[1:])
        basis = jnp.eye(dim, dtype=x.dtype).reshape((dim, 1) + x.shape[1:])
        return jnp.broadcast_to(basis, (dim,) + x.shape), 1.0
    shape = (num_probes,) + x.shape
    if probe == "rademacher":
        e = jax.random.rademacher(key, shape, x.dtype)
    else:
        e = jax.random.normal(key, shape, x.dtype)
    return e, 1.0 / num_probes


def bits_per_dim(
    denoiser,
    x,
    *,
    sigma_min,
    sigma_max,
    key=None,
    data_scale=1.0,
    dequantize=False,
    divergence="hutchinson",
    probe="rademacher",
    num_probes=1,
    prior_logp=None,
    rtol=1e-5,
    atol=1e-5,
):
    """Negative log-likelihood in bits per dimension, one value per sample.

    For discrete data (Theis et al. 2016; score_sde's `likelihood.py`): 8-bit pixels k in
    {0, ..., 255} stored as x = data_scale * k + shift, e.g. data_scale = 2/256, shift = -1 for
    score_sde's centred data in [-1, 1), 1/256 for [0, 1). Each k owns the bin
    [x, x + data_scale)^D, and with uniform dequantization y = x + data_scale * u, u ~ U[0, 1)^D,
    Jensen's inequality bounds the discrete likelihood,
        -log2 P(k) <= E_u[-log2 p(y)] - D log2(data_scale),
    so bpd = nll(y) / (D ln 2) - log2(data_scale): +7 for [-1, 1), +8 for [0, 1) (score_sde's
    `offset = 7 - inverse_scaler(-1)`). `dequantize=True` draws u with `key` (x must then be the
    bin's lower edge, as above); data_scale = 1 (default) adds nothing, for continuous data.
    The other arguments are those of `nll`.
    """
    if dequantize:
        if key is None:
            raise ValueError("dequantize=True needs key=jax.random.key(...) to draw the noise")
        key, k_u = jax.random.split(key)
        x = x + data_scale * jax.random.uniform(k_u, jnp.shape(x), jnp.asarray(x).dtype)
    nats = nll(denoiser, x, sigma_min=sigma_min, sigma_max=sigma_max, key=key,
               divergence=divergence, probe=probe, num_probes=num_probes, prior_logp=prior_logp,
               rtol=rtol, atol=atol)
    dim = math.prod(jnp.shape(x)[1:])
    return nats / (dim * math.log(2.0)) - jnp.log2(data_scale)


def _check(x0, divergence, probe, num_probes, key, sigma_min, sigma_max):
    if jnp.ndim(x0) < 2:
        raise ValueError(f"x0 has shape {jnp.shape(x0)}; allowed: (batch, ...) with >= 1 data axis")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is unknown; allowed: {', '.join(DIVERGENCES)}")
    if probe not in PROBES:
        raise ValueError(f"probe={probe!r} is unknown; allowed: {', '.join(PROBES)}")
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes={num_probes!r} must be an integer >= 1")
    if resolve_divergence(divergence, jnp.shape(x0)[1:]) == "hutchinson" and key is None:
        raise ValueError(f"divergence={divergence!r} needs key=jax.random.key(...) for its "
                         "Hutchinson probes")
    lo, hi = _concrete(sigma_min), _concrete(sigma_max)
    if lo is not None and not lo > 0:
        raise ValueError(f"sigma_min={lo!r} must be > 0 (the ODE is singular at sigma = 0)")
    if lo is not None and hi is not None and not hi > lo:
        raise ValueError(f"sigma_max={hi!r} must be > sigma_min={lo!r}")


def _concrete(v):
    """v as a Python float when its value is known (not traced), else None."""
    if isinstance(v, jax.core.Tracer):
        return None
    return float(v)
