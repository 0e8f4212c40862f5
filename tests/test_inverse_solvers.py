"""Inverse-problem solvers (jaxdiff.inverse.solvers) on a Gaussian prior, where the exact
posterior of a linear Gaussian measurement is Gaussian: each solver's sample mean against it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.core import analytic
from jaxdiff.core.denoiser import Stateful, model_from_denoiser
from jaxdiff.core.process import EDM, DiscreteVP
from jaxdiff.inverse import operators as ops
from jaxdiff.inverse.solvers import DDNM, DDS, DPS, PiGDM, REDDiff, conjugate_gradient

D_DIM, STD, B = 4, 0.8, 2000
MEAN = jnp.array([0.5, -1.0, 0.3, 0.0])
A = jax.random.normal(jax.random.key(7), (2, D_DIM))
Y = jnp.array([0.7, -0.4])
PROCESS = EDM()
NET = model_from_denoiser(analytic.gaussian_denoiser(MEAN, STD), PROCESS, "x0")


def posterior(sigma_y):
    """Exact posterior mean and covariance of N(MEAN, STD^2 I) given y = A x + sigma_y n."""
    s = STD**2 * A @ A.T + sigma_y**2 * jnp.eye(2)
    mean = MEAN + STD**2 * A.T @ jnp.linalg.solve(s, Y - A @ MEAN)
    cov = STD**2 * jnp.eye(D_DIM) - STD**4 * A.T @ jnp.linalg.solve(s, A)
    return mean, cov


def solve(solver, steps=100, net=NET, process=PROCESS, prediction="x0"):
    noise = jax.random.normal(jax.random.key(0), (B, D_DIM))
    return jaxdiff.sample(net, noise, process=process, prediction=prediction, sampler=solver,
                          steps=steps, key=jax.random.key(1))


def y_batch():
    return jnp.broadcast_to(Y, (B, 2))


# (solver, sigma_y, tolerance on |mean - exact| and on max |cov - exact|): DDNM, PiGDM, DDS
# are exact for this prior as steps grow (PiGDM's Gaussian p(x0 | x) is exact here, noisy or
# not); RED-Diff gives a point estimate (its covariance is not checked); DPS is approximate;
# DDNM+ puts the noisy y into the range space at high noise and leaves it there, so its mean is
# the noiseless posterior's (0.31 away here): its tolerance says so.
CASES = [
    ("ddnm", 0.0, 0.05, 0.06), ("pigdm", 0.0, 0.05, 0.06), ("dds", 0.0, 0.05, 0.06),
    ("pigdm", 0.2, 0.05, 0.06), ("ddnm", 0.2, 0.35, 0.12), ("reddiff", 0.0, 0.06, None),
    ("dps", 0.0, 0.12, None),
]


def make(name, op, y):
    return {"ddnm": lambda: DDNM(op, y), "pigdm": lambda: PiGDM(op, y, data_std=STD),
            "dds": lambda: DDS(op, y, eta=0.85), "reddiff": lambda: REDDiff(op, y, lr=0.05),
            "dps": lambda: DPS(op, y, zeta=0.5)}[name]()


@pytest.mark.parametrize("name,sigma_y,tol_mean,tol_cov", CASES)
def test_solver_matches_the_gaussian_posterior(name, sigma_y, tol_mean, tol_cov):
    mean, cov = posterior(sigma_y)
    x = solve(make(name, ops.Matrix(A, sigma_y=sigma_y), y_batch()), steps=200)
    assert float(jnp.linalg.norm(x.mean(0) - mean)) < tol_mean
    if tol_cov is not None:
        assert float(jnp.abs(jnp.cov(x.T) - cov).max()) < tol_cov
    if sigma_y == 0 and name in ("ddnm", "dds", "pigdm"):  # the measurement holds exactly
        assert float(jnp.abs(x @ A.T - Y).max()) < 1e-3


def test_dps_moves_toward_the_measurement():
    op = ops.Matrix(A)
    resid = [float(jnp.abs(solve(DPS(op, y_batch(), zeta=z)) @ A.T - Y).mean())
             for z in (0.0, 0.5)]
    assert resid[1] < 0.6 * resid[0]


def test_solvers_work_on_a_vp_model_with_eps_prediction():
    """Any process and prediction: a DiscreteVP eps-network (the closed form behind it)."""
    process = DiscreteVP.linear()
    net = model_from_denoiser(analytic.gaussian_denoiser(MEAN, STD), process, "eps")
    mean, _ = posterior(0.0)
    x = solve(DDNM(ops.Matrix(A), y_batch()), steps=100, net=net, process=process,
              prediction="eps")
    assert float(jnp.linalg.norm(x.mean(0) - mean)) < 0.06


def test_one_network_call_per_step_and_one_program():
    """NFE = steps for every solver (a counting Stateful network); a new y reuses the
    compiled program."""
    def counted(x, t, state):
        return NET(x, t), state + 1

    net = Stateful(counted, jnp.zeros((), jnp.int32))
    op = ops.Matrix(A, sigma_y=0.1)
    for name in ("ddnm", "pigdm", "dds", "reddiff", "dps"):
        _, calls = solve(make(name, op, y_batch()), steps=7, net=net)
        assert int(calls) == 7, name
    before = jaxdiff.sampling.trace_count("DDNM")
    solve(DDNM(op, y_batch() + 0.1), steps=7, net=net)
    assert jaxdiff.sampling.trace_count("DDNM") == before


def test_reproducible_from_a_key():
    op = ops.Matrix(A, sigma_y=0.1)
    a, b = (solve(DPS(op, y_batch()), steps=10) for _ in range(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_conjugate_gradient_reaches_the_least_squares_point():
    op = ops.Matrix(A)
    x0 = jax.random.normal(jax.random.key(3), (5, D_DIM))
    x = conjugate_gradient(op, jnp.broadcast_to(Y, (5, 2)), x0, 0.0, 10)
    # the closest point to x0 on {A x = y}: x0 + A^+ (y - A x0), reached in rank(A) steps
    want = x0 + (Y - x0 @ A.T) @ jnp.linalg.pinv(A).T
    np.testing.assert_allclose(np.asarray(x), np.asarray(want), atol=1e-4)


@pytest.mark.parametrize("make_bad,match", [
    (lambda op, y: DPS(op, y, zeta=-1.0), "zeta"),
    (lambda op, y: DDNM(op, y, eta=1.5), "eta"),
    (lambda op, y: DDS(op, y, cg_steps=0), "cg_steps"),
    (lambda op, y: REDDiff(op, y, lr=0.0), "lr"),
    (lambda op, y: PiGDM(op, y, data_std=0.0), "data_std"),
    (lambda op, y: DPS("blur", y), "operator"),
])
def test_bad_settings_are_refused_in_one_line(make_bad, match):
    with pytest.raises(ValueError, match=match) as e:
        make_bad(ops.Matrix(A), y_batch())
    assert "\n" not in str(e.value)
