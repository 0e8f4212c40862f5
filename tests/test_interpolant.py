"""Stochastic interpolants (`jaxdiff.core.interpolant`) and their SDE sampler
(`jaxdiff.samplers.interpolant`): the paths, exact conversions between velocity / noise / score /
x0 predictions, SiT's loss weightings, and that every diffusion coefficient w(t) leaves the
marginals of Gaussian data exact.

Statistics: x0 ~ N(0.7, 0.5^2), scalars, float64, the ideal denoiser, start x = noise at t_max.
For Gaussian data the Euler-Maruyama chain is linear, x' = x - h [a' mu + k (x - a mu)] +
sqrt(w h) z with k = (a a' s^2 + sig sig') / V + w / (2V), V = a^2 s^2 + sig^2 (the exact velocity
and score of the marginal N(a mu, V)), so its mean and variance after N steps follow a two-line
recursion (`_chain_moments`, written from the SDE, not from the sampler's code): that is the exact
discretisation bias of the scheme on that grid. Sampled moments must match the chain's within
5 Monte-Carlo standard errors, and the exact N(mu, s^2) within 5 standard errors plus that bias
(first order in the step: it halves when the steps double, checked below).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.core import analytic, losses
from jaxdiff.core.denoiser import PREDICTIONS, denoiser, from_x0, model_from_denoiser, to_x0
from jaxdiff.core.interpolant import GVPInterpolant, LinearInterpolant
from jaxdiff.core.process import PROCESSES, RectifiedFlow
from jaxdiff.samplers import SAMPLERS
from jaxdiff.samplers.interpolant import diffusion_coefficient, interpolant_sde, sit_schedule

MU, S = 0.7, 0.5
PATHS = {"linear": LinearInterpolant(), "gvp": GVPInterpolant()}
GAUSS = analytic.gaussian_denoiser(MU, S)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _paths_np(name, t):
    """(alpha, sigma, alpha', sigma') of SiT's paths, written out in numpy."""
    if name == "linear":
        return 1.0 - t, t, -np.ones_like(t), np.ones_like(t)
    c, s = np.cos(np.pi * t / 2), np.sin(np.pi * t / 2)
    return c, s, -np.pi / 2 * s, np.pi / 2 * c


# ------------------------------------------------------------------------------ the paths


@pytest.mark.parametrize("name", PATHS)
def test_paths_and_registration(name):
    p, t = PATHS[name], np.linspace(0.01, 0.99, 7)
    a, s, da, ds = _paths_np(name, t)
    np.testing.assert_allclose(p.alpha(t), a, rtol=1e-14)
    np.testing.assert_allclose(p.sigma(t), s, rtol=1e-14)
    np.testing.assert_allclose(p.d_alpha(t), da, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(p.d_sigma(t), ds, rtol=1e-14, atol=1e-15)
    _, (jda, jds) = jax.jvp(lambda u: (p.alpha(u), p.sigma(u)), (t,), (np.ones_like(t),))
    np.testing.assert_allclose(jda, da, rtol=1e-13, atol=1e-15)  # analytic = autodiff
    np.testing.assert_allclose(jds, ds, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(p.ve_sigma(t), s / a, rtol=1e-13)
    np.testing.assert_allclose(p.t_of(p.ve_sigma(t)), t, rtol=1e-13)
    np.testing.assert_allclose(p.prior_scale(p.ve_sigma(t)), 1 / a, rtol=1e-13)  # x = noise
    np.testing.assert_allclose(p.t_of_cond(type(p)(time_scale=1000.0).cond(t) / 1000), t)
    # g^2 = 2 (sig sig' - (a'/a) sig^2); for Linear 2t/(1-t), for GVP pi tan(pi t/2)
    g2 = {"linear": 2 * t / (1 - t), "gvp": np.pi * np.tan(np.pi * t / 2)}[name]
    np.testing.assert_allclose(p.sbdm_diffusion(t), g2, rtol=1e-13)
    assert PROCESSES[f"interpolant_{name}"] is type(p)
    with pytest.raises(ValueError, match=r"t_max=1\.0\) is invalid; allowed: 0 < t_min < t_max"):
        type(p)(t_max=1.0)


def test_linear_is_rectified_flow():
    lin, rf, t = LinearInterpolant(), RectifiedFlow(), np.linspace(1e-4, 1 - 1e-4, 9)
    for f in ("alpha", "sigma", "ve_sigma", "cond"):
        np.testing.assert_array_equal(getattr(lin, f)(t), getattr(rf, f)(t))
    np.testing.assert_allclose(lin.prior_scale(lin.ve_sigma(t)), rf.prior_scale(rf.ve_sigma(t)),
                               rtol=1e-12)


# ------------------------------------------------------------------ exact conversions


@pytest.mark.parametrize("name", PATHS)
def test_prediction_conversions_are_exact(name):
    """velocity -> x0 -> eps -> x0 -> score -> x0 -> velocity on random inputs, per-sample t;
    and the interpolant's own velocity <-> score closed forms agree with that chain."""
    p = PATHS[name]
    kx, kv, kt = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (64, 3))
    v = jax.random.normal(kv, (64, 3))
    t = jax.random.uniform(kt, (64,), minval=0.02, maxval=0.98)
    x0 = to_x0(v, x, t, p, "flow")
    eps = from_x0(x0, x, t, p, "eps")
    x0_e = to_x0(eps, x, t, p, "eps")
    score = from_x0(x0_e, x, t, p, "score")
    x0_s = to_x0(score, x, t, p, "score")
    v_back = from_x0(x0_s, x, t, p, "flow")
    np.testing.assert_allclose(v_back, v, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(x0_s, x0, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(score, -eps / p.sigma(t)[:, None], rtol=1e-12)
    tt = t[:, None]
    np.testing.assert_allclose(p.score_from_velocity(v, x, tt), score, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(p.velocity_from_score(score, x, tt), v, rtol=1e-10, atol=1e-10)
    # the velocity target is alpha' x0 + sigma' eps (SiT's u_t, in this file's time direction)
    np.testing.assert_allclose(p.velocity(x0, eps, tt), v, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("name", PATHS)
def test_gaussian_denoiser_through_every_prediction(name):
    """The closed-form denoiser, wrapped as a network of each prediction type and adapted back,
    gives the same x0; and its velocity is the closed-form E[a' x0 + sig' eps | x_t]."""
    p = PATHS[name]
    x_ve = 3.0 * jax.random.normal(jax.random.key(1), (32, 2))
    for t in (0.05, 0.5, 0.95):
        ve = p.ve_sigma(t)
        ref = GAUSS(x_ve, ve)
        for pred in set(PREDICTIONS) - {"edm"}:
            got = denoiser(model_from_denoiser(GAUSS, p, pred), p, pred)(x_ve, ve)
            np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-12, err_msg=pred)
        a, s, da, ds = _paths_np(name, np.float64(t))
        x, V = a * x_ve, a**2 * S**2 + s**2
        v_exact = da * MU + (da * a * S**2 + s * ds) / V * (x - a * MU)
        v = model_from_denoiser(GAUSS, p, "flow")(x, p.cond(t))
        np.testing.assert_allclose(v, v_exact, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("name", PATHS)
def test_sit_loss_weightings(name):
    """SiT's weights (its transport.training_losses, drift_var = g^2/2 in this time direction):
    score loss ||sig s + eps||^2 = sig^2 x score MSE; velocity weighting (g^2/2 / sig)^2 on the
    noise error, (g^2/2)^2 on the score error; likelihood g^2/(2 sig^2) on the noise error."""
    p, t = PATHS[name], jnp.linspace(0.05, 0.95, 7)
    _, s, _, _ = _paths_np(name, np.asarray(t))
    half_g2 = 0.5 * np.asarray(p.sbdm_diffusion(t))

    def w(pred, weighting):
        return np.asarray(losses.loss_weight(t, p, pred, weighting))

    np.testing.assert_allclose(w("score", "noise"), s**2, rtol=1e-12)
    np.testing.assert_allclose(w("eps", "noise"), 1.0, rtol=1e-12)
    np.testing.assert_allclose(w("eps", "velocity"), (half_g2 / s) ** 2, rtol=1e-12)
    np.testing.assert_allclose(w("score", "velocity"), half_g2**2, rtol=1e-12)
    np.testing.assert_allclose(w("flow", "velocity"), 1.0, rtol=1e-12)
    np.testing.assert_allclose(w("eps", "likelihood"), half_g2 / s**2 * (p.t_max - p.t_min),
                               rtol=1e-10)
    # end to end: the weighted score loss is SiT's mean((sig * out + eps)^2)
    x0 = MU + S * jax.random.normal(jax.random.key(2), (16, 3))
    key = jax.random.key(3)

    def model(x, c):
        return jnp.sin(x) + c[:, None]

    loss, aux = losses.diffusion_loss(model, x0, key, process=p, prediction="score",
                                      weighting="noise")
    key_t, key_eps = jax.random.split(key)
    eps = jax.random.normal(key_eps, x0.shape)
    tt = aux["t"][:, None]
    x = p.alpha(tt) * x0 + p.sigma(tt) * eps
    sit = jnp.mean(jnp.square(p.sigma(tt) * model(x, p.cond(aux["t"])) + eps))
    np.testing.assert_allclose(loss, sit, rtol=1e-12)


# ------------------------------------------------------------------------- the sampler


def _grid(p, n, t_end=0.0):
    """VE levels of n uniform steps in t from t_max to t_end (0: the last level is 0)."""
    t = np.linspace(p.t_max, t_end, n + 1)
    return jnp.asarray(np.append(np.asarray(p.ve_sigma(t[:-1])),
                                 0.0 if t_end == 0 else float(p.ve_sigma(t_end))))


def _chain_moments(name, diffusion, w_scale, ts, last_step):
    """Exact mean and variance of the Euler-Maruyama chain on Gaussian data (module docstring),
    starting from x = noise at ts[0], in the process scaling at ts[-1]."""
    m, q = 0.0, 1.0
    for i in range(len(ts) - 1):
        t, h = ts[i], ts[i] - ts[i + 1]
        a, s, da, ds = _paths_np(name, np.float64(t))
        V = a**2 * S**2 + s**2
        w = w_scale * {"none": 0.0, "sigma": s, "sigma2": s**2, "t": t, "constant": 1.0,
                       "sbdm": 2 * (s * ds - da / a * s**2),
                       "sin2": np.sin(np.pi * t) ** 2}[diffusion]
        k = (da * a * S**2 + s * ds) / V + 0.5 * w / V
        m = m - h * da * MU - h * k * (m - a * MU)
        q = (1 - h * k) ** 2 * q + (0.0 if i == len(ts) - 2 and last_step == "mean" else w * h)
    return m, q


N_SCALARS = 1 << 16
# (path, diffusion, w_scale): every named w, several scales; sbdm only at scale 1 (its w ~ 2/(1-t)
# near t = 1 makes the first explicit steps unstable at other scales, see the sampler's docstring)
MARGINAL_CASES = [(n, d, w) for n in PATHS for d, w in (
    ("none", 1.0), ("sigma", 1.0), ("sigma", 2.0), ("sigma", 4.0), ("sigma2", 1.0), ("t", 1.0),
    ("constant", 1.0), ("constant", 0.5), ("sin2", 1.0), ("sbdm", 1.0))]


def _run(p, diffusion, w_scale, sigmas, last_step="mean", seed=0):
    noise = jax.random.normal(jax.random.key(seed), (N_SCALARS,))
    fn = jax.jit(lambda x, s: interpolant_sde(GAUSS, x, s, key=jax.random.key(seed + 1), time=p,
                                              diffusion=diffusion, w_scale=w_scale,
                                              last_step=last_step))
    return np.asarray(fn(noise * p.prior_scale(sigmas[0]), sigmas))


def _check_moments(out, m_chain, q_chain, m_true, q_true):
    n = out.size
    se_m, se_q = math.sqrt(q_chain / n), q_chain * math.sqrt(2 / (n - 1))
    mean, var = out.mean(), out.var(ddof=1)
    assert abs(mean - m_chain) < 5 * se_m and abs(var - q_chain) < 5 * se_q, (
        mean, m_chain, var, q_chain)  # the sampler is the scheme
    assert abs(mean - m_true) < 5 * se_m + abs(m_chain - m_true), (mean, m_true)
    assert abs(var - q_true) < 5 * se_q + abs(q_chain - q_true), (var, q_true)


@pytest.mark.parametrize("name,diffusion,w_scale", MARGINAL_CASES, ids=str)
def test_every_diffusion_keeps_the_gaussian_marginals(name, diffusion, w_scale):
    """400 uniform steps to t = 0: mean and variance of N(mu, s^2) within 5 standard errors
    (2^16 samples: 2% of s for the mean, 2.8% of s^2 for the variance) plus the chain's exact
    discretisation bias on that grid (at most 1% of s^2 here)."""
    p, n = PATHS[name], 400
    sigmas = _grid(p, n)
    out = _run(p, diffusion, w_scale, sigmas)
    ts = np.append(np.asarray(p.t_of(sigmas[:-1])), 0.0)
    m, q = _chain_moments(name, diffusion, w_scale, ts, "mean")
    assert abs(q / S**2 - 1) < 0.011 and abs(m - MU) < 0.005 * S  # fine steps: a small bias
    _check_moments(out, m, q, MU, S**2)


@pytest.mark.parametrize("name,diffusion,w_scale", [
    ("linear", "none", 1.0), ("linear", "sigma", 1.0), ("linear", "constant", 1.0),
    ("gvp", "constant", 1.0), ("gvp", "sigma", 1.0)], ids=str)
def test_discretisation_error_halves_when_steps_double(name, diffusion, w_scale):
    """First order: the chain's error (variance, and mean for GVP) halves from 25 to 50 to 100
    steps, and the sampled moments follow the chain at 25 and 50 steps (where the bias is
    2-30x the standard error, so the sampler's own error visibly shrinks)."""
    p = PATHS[name]
    errs = []
    for n in (25, 50, 100):
        sigmas = _grid(p, n)
        ts = np.append(np.asarray(p.t_of(sigmas[:-1])), 0.0)
        m, q = _chain_moments(name, diffusion, w_scale, ts, "mean")
        errs.append(abs(q - S**2) + abs(m - MU))
        if n < 100:
            _check_moments(_run(p, diffusion, w_scale, sigmas), m, q, MU, S**2)
    assert 0.4 < errs[1] / errs[0] < 0.6 and 0.4 < errs[2] / errs[1] < 0.6, errs


@pytest.mark.parametrize("name,diffusion,w_scale", [
    ("linear", "sigma", 2.0), ("gvp", "constant", 1.0), ("gvp", "sbdm", 1.0)], ids=str)
def test_intermediate_marginal_is_exact(name, diffusion, w_scale):
    """From t_max to t = 0.5 (200 steps, noise on every step, through `jaxdiff.sample` with an
    explicit grid): N(alpha mu, alpha^2 s^2 + sigma^2) at t = 0.5."""
    p, n = PATHS[name], 200
    sigmas = _grid(p, n, t_end=0.5)
    noise = jax.random.normal(jax.random.key(4), (N_SCALARS,))
    out = np.asarray(jaxdiff.sample(model_from_denoiser(GAUSS, p, "flow"), noise, process=p,
                                    prediction="flow", sampler="interpolant_sde", steps=n,
                                    schedule=np.asarray(sigmas), key=jax.random.key(5),
                                    diffusion=diffusion, w_scale=w_scale, last_step="none"))
    a, s, _, _ = _paths_np(name, np.float64(0.5))
    ts = np.asarray(p.t_of(sigmas))
    m, q = _chain_moments(name, diffusion, w_scale, ts, "none")
    _check_moments(out, m, q, a * MU, a**2 * S**2 + s**2)


def test_ode_is_euler_for_the_linear_path():
    """w = 0 on the Linear path (and rectified flow) is the probability-flow ODE's Euler =
    DDIM, to rounding; in the VE view (time=None) it is Euler in sigma for any process."""
    x = 2.0 * jax.random.normal(jax.random.key(6), (8, 3))
    gmm = analytic.gmm_denoiser(jnp.array([[0.5, -0.3, 0.1], [-0.6, 0.4, 0.0]]),
                                jnp.array([0.2, 0.3]), jnp.array([0.4, 0.6]))
    for p in (LinearInterpolant(), RectifiedFlow()):
        sigmas = _grid(p, 12)
        x_ve = x * p.prior_scale(sigmas[0])
        ref = SAMPLERS["euler"](gmm, x_ve, sigmas)
        for last in ("mean", "euler"):
            out = interpolant_sde(gmm, x_ve, sigmas, key=jax.random.key(0), time=p,
                                  diffusion="none", last_step=last)
            np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
        out = interpolant_sde(gmm, x_ve, sigmas, key=jax.random.key(0), time=p, w_scale=0.0)
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    sigmas = jnp.asarray([80.0, 10.0, 1.0, 0.1, 0.0])
    out = interpolant_sde(gmm, 80.0 * x, sigmas, key=jax.random.key(0), diffusion="none")
    np.testing.assert_allclose(out, SAMPLERS["euler"](gmm, 80.0 * x, sigmas), rtol=1e-12)


def test_gvp_ode_converges_to_the_exact_flow():
    """w = 0 on GVP is Euler in t, not DDIM: first order toward the exact ODE map."""
    p = GVPInterpolant()
    x_ve = p.prior_scale(p.ve_sigma(p.t_max)) * jnp.linspace(-2.0, 2.0, 9)
    errs = []
    for n in (50, 100, 200):
        sigmas = _grid(p, n, t_end=0.05)  # stop above 0, where the exact map is smooth
        out = interpolant_sde(GAUSS, x_ve, sigmas, key=jax.random.key(0), time=p,
                              diffusion="none")
        exact = analytic.gaussian_ode(x_ve, sigmas[0], sigmas[-1], MU, S)
        errs.append(float(jnp.max(jnp.abs(out - exact))))
    assert errs[0] < 0.05 and 0.4 < errs[1] / errs[0] < 0.6 and 0.4 < errs[2] / errs[1] < 0.6


def test_sbdm_in_the_ve_view_is_em():
    """time=None, diffusion='sbdm' (w = d sigma^2 / d sigma = 2 sigma), last step 'tweedie':
    the same chain and the same noise as `em`."""
    x = 80.0 * jax.random.normal(jax.random.key(7), (6, 2))
    sigmas = jnp.asarray([80.0, 20.0, 5.0, 1.0, 0.2, 0.0])
    key = jax.random.key(8)
    ref = SAMPLERS["em"](GAUSS, x, sigmas, key=key)
    out = interpolant_sde(GAUSS, x, sigmas, key=key, diffusion="sbdm", last_step="tweedie")
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    w = diffusion_coefficient(None, jnp.asarray([3.0]), "sbdm", 1.0)
    np.testing.assert_allclose(w, 6.0)


def test_last_step_options():
    """One step from t = 0.6 to 0 on Linear, by hand: mean = drift without noise, euler = the
    ODE step (= D for Linear), tweedie = D, none = drift plus sqrt(w h) z."""
    p, t = LinearInterpolant(), 0.6
    sigmas = jnp.asarray([float(p.ve_sigma(t)), 0.0])
    x_ve = jnp.asarray([1.3, -0.4])
    key = jax.random.key(9)
    D = GAUSS(x_ve, sigmas[0])
    eps, x = (x_ve - D) / sigmas[0], (1 - t) * x_ve
    v, score, w = -D + eps, -eps / t, 2.0 * t  # diffusion sigma, w_scale 2
    drift = v - 0.5 * w * score
    z = jax.random.normal(jax.random.fold_in(key, 0), x.shape)
    expect = dict(mean=x - t * drift, euler=x - t * v, tweedie=D,
                  none=x - t * drift + jnp.sqrt(w * t) * z)
    for last, ref in expect.items():
        out = interpolant_sde(GAUSS, x_ve, sigmas, key=key, time=p, w_scale=2.0, last_step=last)
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12, err_msg=last)
    np.testing.assert_allclose(expect["euler"], D, rtol=1e-12)


def test_every_prediction_gives_the_same_samples_through_sample():
    """jaxdiff.sample with the Gaussian denoiser posed as a velocity, score, noise or x0 network
    on GVP, SiT's grid: the same samples (the same key), and a short readable error for a bad
    option."""
    p = GVPInterpolant(time_scale=1000.0)
    noise = jax.random.normal(jax.random.key(10), (5, 3))
    outs = {pred: jaxdiff.sample(model_from_denoiser(GAUSS, p, pred), noise, process=p,
                                 prediction=pred, sampler="interpolant_sde", steps=20,
                                 schedule=sit_schedule, key=jax.random.key(11))
            for pred in ("flow", "score", "eps", "x0")}
    for pred, out in outs.items():
        np.testing.assert_allclose(out, outs["flow"], rtol=1e-9, atol=1e-9, err_msg=pred)
    grid = sit_schedule(p, 5, last_step_size=0.04)
    np.testing.assert_allclose(np.asarray(p.t_of(np.asarray(grid))),
                               [p.t_max, *np.linspace(p.t_max, 0.04, 5)[1:], 0.0], rtol=1e-12)


@pytest.mark.parametrize("kw,text", [
    (dict(diffusion="sigma3"), "diffusion='sigma3' is unknown; allowed: none, sigma, sigma2"),
    (dict(last_step="Mean"), "last_step='Mean' is unknown; allowed: mean, euler, tweedie, none"),
    (dict(w_scale=-1.0), r"interpolant_sde\(w_scale=-1.0\) is invalid; allowed: w_scale >= 0"),
    (dict(time="t"), "must be None or a process"),
])
def test_bad_options(kw, text):
    with pytest.raises(ValueError, match=text) as e:
        interpolant_sde(GAUSS, jnp.ones(2), jnp.asarray([1.0, 0.0]), key=jax.random.key(0), **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="last_step_size=1.5"):
        sit_schedule(GVPInterpolant(), 10, last_step_size=1.5)
