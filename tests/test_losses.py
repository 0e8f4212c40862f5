"""Tests for jaxdiff.core.losses: Bayes optimality of the ideal denoiser under every process and
prediction, target formulas, closed-form weightings, time-sampling statistics, an end-to-end fit.

For data N(MEAN, STD^2) the ideal denoiser is known (`analytic.gaussian_denoiser`); wrapped as a
network of any prediction type by `denoiser.model_from_denoiser`, it minimises every weighted
denoising loss, since each target is affine in x0 given x_t and the weights depend on t alone.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff.core.analytic import gaussian_denoiser
from jaxdiff.core.denoiser import denoiser, model_from_denoiser
from jaxdiff.core.losses import diffusion_loss, loss_weight, sample_time
from jaxdiff.core.process import EDM, VE, DiscreteVP, RectifiedFlow, VPCosine, VPLinear

PROCESSES = {
    "discrete_vp": DiscreteVP.linear(),
    "vp_linear": VPLinear(),
    "vp_cosine": VPCosine(),
    "ve": VE(),
    "edm": EDM(),
    "rectified_flow": RectifiedFlow(),
}
PREDICTIONS = ("eps", "x0", "v", "flow", "score")
CASES = [(p, q) for p in PROCESSES for q in PREDICTIONS] + [("edm", "edm")]
MEAN, STD = 0.3, 0.7
N = 4096  # one batch shape throughout, so eagerly compiled primitives are shared by the tests


def _data(n=N):
    return MEAN + STD * jax.random.normal(jax.random.key(0), (n, 2))


@pytest.mark.parametrize("name,prediction", CASES)
def test_ideal_denoiser_is_stationary_minimum(name, prediction):
    """L(eps) for D + eps: the gradient at 0 is Monte-Carlo noise, tiny next to the one at 0.5,
    and L(0) < L(0.5); the same keys at both points make the difference exact in the samples."""
    process, D = PROCESSES[name], gaussian_denoiser(MEAN, STD)
    x0 = _data()

    def loss(e):
        model = model_from_denoiser(lambda x, s: D(x, s) + e, process, prediction)
        key = jax.random.key(1)
        return diffusion_loss(model, x0, key, process=process, prediction=prediction)[0]

    (l0, g0), (l1, g1) = jax.value_and_grad(loss)(0.0), jax.value_and_grad(loss)(0.5)
    assert l0 < l1
    assert abs(g0) < 0.05 * abs(g1)


@pytest.mark.parametrize("name,prediction", CASES)
def test_targets_reproduced_by_ideal_network_on_constant_data(name, prediction):
    process = PROCESSES[name]
    model = model_from_denoiser(gaussian_denoiser(MEAN, 1e-6), process, prediction)
    x0 = jnp.full((N, 2), MEAN)
    zero = lambda x, c: jnp.zeros_like(x)
    kw = dict(process=process, prediction=prediction)
    loss, aux = diffusion_loss(model, x0, jax.random.key(2), **kw)
    ref, _ = diffusion_loss(zero, x0, jax.random.key(2), **kw)  # mean square of the targets
    assert float(jnp.max(aux["loss"])) <= 1e-6 * float(ref)


def _edm_f(x, c, x0):  # EDM Table 1 with sigma_data = 0.5, written out independently
    sigma, sd = jnp.exp(4.0 * c)[:, None], 0.5
    x_ve = x * jnp.sqrt(sigma**2 + sd**2)
    return (x0 - sd**2 / (sigma**2 + sd**2) * x_ve) / (sigma * sd / jnp.sqrt(sigma**2 + sd**2))


ORACLES = {  # the paper's target from x_t and the known constant x0, as a network
    ("rectified_flow", "flow"): lambda x, t, x0: (x - (1 - t) * x0) / t - x0,  # eps - x0
    ("rectified_flow", "v"): lambda x, t, x0: (1 - t) * (x - (1 - t) * x0) / t - t * x0,
    ("ve", "score"): lambda x, sigma, x0: -(x - x0) / sigma**2,
    ("vp_linear", "eps"): lambda x, t, x0: (x - VPLinear().alpha(t) * x0) / VPLinear().sigma(t),
    ("edm", "edm"): _edm_f,
}


@pytest.mark.parametrize("name,prediction", list(ORACLES))
def test_target_formulas_against_closed_forms(name, prediction):
    process, oracle = PROCESSES[name], ORACLES[(name, prediction)]
    x0 = jnp.full((N, 2), MEAN)
    if prediction == "edm":
        model = lambda x, c: oracle(x, c, MEAN)
    else:
        model = lambda x, c: oracle(x, c[:, None], MEAN)
    kw = dict(process=process, prediction=prediction, time_sampling="lognormal")
    _, aux = diffusion_loss(model, x0, jax.random.key(3), **kw)
    _, ref = diffusion_loss(lambda x, c: jnp.zeros_like(x), x0, jax.random.key(3), **kw)
    np.testing.assert_array_less(aux["mse"], 1e-8 * ref["mse"] + 1e-10)


def test_min_snr_uniform_and_edm_weights_closed_forms():
    p = VPLinear()
    t = jnp.linspace(p.t_min, p.t_max, 50)
    snr = (p.alpha(t) / p.sigma(t)) ** 2
    assert float(jnp.min(snr)) < 5.0 < float(jnp.max(snr))  # both branches of the min
    w = lambda pred, kind="min_snr": loss_weight(t, p, pred, kind)
    np.testing.assert_allclose(w("eps"), jnp.minimum(snr, 5.0) / snr, rtol=1e-5)
    np.testing.assert_allclose(w("v"), jnp.minimum(snr, 5.0) / (snr + 1), rtol=1e-5)
    np.testing.assert_allclose(w("x0"), jnp.minimum(snr, 5.0), rtol=1e-5)
    for pred in PREDICTIONS:
        np.testing.assert_array_equal(w(pred, "uniform"), 1.0)
    rf, tf = RectifiedFlow(), jnp.linspace(0.01, 0.99, 50)
    snr_rf = ((1 - tf) / tf) ** 2
    w_flow = loss_weight(tf, rf, "flow", "min_snr", min_snr_gamma=2.0)
    np.testing.assert_allclose(w_flow, jnp.minimum(snr_rf, 2.0) * tf**2, rtol=1e-5)
    sig = jnp.geomspace(0.002, 80.0, 50)
    np.testing.assert_allclose(loss_weight(sig, EDM(), "edm", "edm"), 1.0, rtol=1e-5)
    lam_edm = (sig**2 + 0.25) / (0.5 * sig) ** 2  # EDM Eq. 8 lambda(sigma)
    np.testing.assert_allclose(loss_weight(sig, EDM(), "x0", "edm"), lam_edm, rtol=1e-5)


def test_likelihood_weight_closed_forms():
    """eps-space ELBO weight -dlambda/dt * (t_max - t_min): beta(t)/(2 sigma^2) for the linear VP
    SDE (Song et al. 2021, g^2 = beta), 1/(t (1 - t)) for rectified flow."""
    p = VPLinear()
    t = jnp.linspace(p.t_min, p.t_max, 50)
    beta = p.beta_min + t * (p.beta_max - p.beta_min)
    expected = (p.t_max - p.t_min) * beta / (2 * p.sigma(t) ** 2)
    np.testing.assert_allclose(loss_weight(t, p, "eps", "likelihood"), expected, rtol=1e-4)
    rf, tf = RectifiedFlow(), jnp.linspace(0.01, 0.99, 50)
    expected = (rf.t_max - rf.t_min) / (tf * (1 - tf))
    np.testing.assert_allclose(loss_weight(tf, rf, "eps", "likelihood"), expected, rtol=1e-4)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_x0_space_weightings_agree_across_predictions(name):
    """min_snr, edm and likelihood weight the x0-space error, so the ideal network's per-sample
    loss must not depend on the prediction type: this checks every conversion factor."""
    process, D = PROCESSES[name], gaussian_denoiser(MEAN, STD)
    x0 = _data()
    preds = PREDICTIONS + (("edm",) if name == "edm" else ())
    for weighting in ("min_snr", "edm", "likelihood"):
        losses = [
            diffusion_loss(
                model_from_denoiser(D, process, q), x0, jax.random.key(4), process=process,
                prediction=q, weighting=weighting,
            )[1]["loss"]
            for q in preds
        ]
        for q, loss in zip(preds[1:], losses[1:]):
            # float32 cancellation in x0 = (x - sigma out)/alpha at low noise: per-sample 1e-2
            np.testing.assert_allclose(loss, losses[0], rtol=1e-2, atol=1e-7, err_msg=q)
            np.testing.assert_allclose(loss.mean(), losses[0].mean(), rtol=1e-4, err_msg=q)


@pytest.mark.parametrize(
    "name,prediction", [("vp_cosine", q) for q in PREDICTIONS] + [("edm", "edm"), ("edm", "flow")]
)
def test_weighted_loss_is_x0_error_of_the_sampling_denoiser(name, prediction):
    """For an arbitrary network, the min_snr / edm loss equals w_x0 * |D(x_ve) - x0|^2 with D the
    sampling-time adapter `jaxdiff.core.denoiser.denoiser`: training and sampling agree."""
    process, seen = PROCESSES[name], {}

    def net(x, c):
        seen["x"] = x  # eager call: record the network input
        return jnp.tanh(x) + 0.1 * c[:, None]

    weighting = "edm" if name == "edm" else "min_snr"
    _, aux = diffusion_loss(
        net, _data(), jax.random.key(10), process=process, prediction=prediction,
        weighting=weighting,
    )
    t, ve = aux["t"], aux["sigma"]
    if prediction == "edm":
        x_ve = seen["x"] * jnp.sqrt(ve**2 + 0.25)[:, None]  # undo c_in
    else:
        x_ve = seen["x"] / process.alpha(t)[:, None]
    if weighting == "edm":
        w_x0 = (ve**2 + 0.25) / (0.5 * ve) ** 2  # EDM Eq. 8 lambda(sigma)
    else:
        w_x0 = jnp.minimum(1 / ve**2, 5.0)  # Hang et al. 2023, min(SNR, gamma)
    D = denoiser(net, process, prediction)(x_ve, ve)
    expected = w_x0 * jnp.mean((D - _data()) ** 2, axis=1)
    np.testing.assert_allclose(aux["loss"], expected, rtol=1e-2)
    np.testing.assert_allclose(aux["loss"].mean(), expected.mean(), rtol=1e-4)


def test_uniform_discrete_timesteps_are_integers():
    p = DiscreteVP.linear(num_train_timesteps=50)
    t = sample_time(jax.random.key(5), 20000, p)
    np.testing.assert_array_equal(t, jnp.round(t))
    assert float(t.min()) == 0.0 and float(t.max()) == 49.0
    counts = np.bincount(np.asarray(t, int), minlength=50)
    assert counts.min() > 300  # expected 400 each
    t_ln = sample_time(jax.random.key(5), 1000, p, "lognormal")
    np.testing.assert_array_equal(t_ln, jnp.round(t_ln))


def test_logit_normal_statistics():
    p, n = RectifiedFlow(), 40000
    t = sample_time(jax.random.key(6), n, p, "logit_normal", logit_mean=0.5, logit_std=0.8)
    u = (t - p.t_min) / (p.t_max - p.t_min)
    logit = jnp.log(u / (1 - u))
    assert abs(float(logit.mean()) - 0.5) < 4 * 0.8 / math.sqrt(n)
    assert abs(float(logit.std()) - 0.8) < 0.02
    z, wq = np.polynomial.hermite_e.hermegauss(60)  # E[sigmoid(0.5 + 0.8 z)], z ~ N(0, 1)
    mean_t = np.sum(wq / (1 + np.exp(-(0.5 + 0.8 * z)))) / math.sqrt(2 * math.pi)
    assert abs(float(u.mean()) - mean_t) < 0.005


def test_edm_lognormal_statistics():
    x0 = jnp.zeros((40000, 1))
    _, aux = diffusion_loss(
        lambda x, c: x, x0, jax.random.key(7), process=EDM(), prediction="edm",
        time_sampling="lognormal",
    )
    log_sigma = jnp.log(aux["sigma"])
    assert abs(float(log_sigma.mean()) + 1.2) < 0.03
    assert abs(float(log_sigma.std()) - 1.2) < 0.03


def test_jit_vmap_and_bf16_network():
    p = VPCosine()
    model = model_from_denoiser(gaussian_denoiser(MEAN, STD), p, "v")
    bf16 = lambda x, c: model(x.astype(jnp.bfloat16), c).astype(jnp.bfloat16)
    x0, keys = _data(), jax.random.split(jax.random.key(8), 3)
    kw = dict(process=p, prediction="v", weighting="min_snr", time_sampling="logit_normal")
    f = lambda key, net: diffusion_loss(net, x0, key, **kw)
    batched, _ = jax.jit(jax.vmap(f, (0, None)), static_argnums=1)(keys, model)
    eager, aux = f(keys[1], model)
    assert batched.shape == (3,) and set(aux) == {"t", "sigma", "weight", "mse", "loss"}
    np.testing.assert_allclose(batched[1], eager, rtol=1e-5)
    low, _ = f(keys[1], bf16)
    assert low.dtype == jnp.float32
    assert abs(float(low) - float(eager)) < 0.05 * float(eager)


def test_fit_recovers_data_std():
    """A 1-parameter network (the ideal-denoiser family, log std learned) trained with Adam on
    the rectified-flow loss with logit-normal times recovers the data std."""
    p, x0 = RectifiedFlow(), _data(256 * 300).reshape(300, 256, 2)
    opt = optax.adam(0.05)

    def loss(log_std, x, key):
        net = model_from_denoiser(gaussian_denoiser(MEAN, jnp.exp(log_std)), p, "flow")
        return diffusion_loss(net, x, key, process=p, prediction="flow",
                              time_sampling="logit_normal")[0]

    def step(carry, inp):
        log_std, state = carry
        g = jax.grad(loss)(log_std, *inp)
        upd, state = opt.update(g, state)
        return (optax.apply_updates(log_std, upd), state), log_std

    init = jnp.array(0.0)
    keys = jax.random.split(jax.random.key(9), 300)
    _, path = jax.lax.scan(step, (init, opt.init(init)), (x0, keys))
    assert abs(float(jnp.exp(path[-100:].mean())) - STD) < 0.02


@pytest.mark.parametrize(
    "kw,bad",
    [
        (dict(weighting="snr"), "'snr'"),
        (dict(time_sampling="cosine"), "'cosine'"),
        (dict(prediction="noise"), "'noise'"),
    ],
)
def test_bad_names_raise(kw, bad):
    args = dict(process=VE(), prediction="eps") | kw
    with pytest.raises(ValueError, match=bad):
        diffusion_loss(lambda x, c: x, jnp.zeros((2, 1)), jax.random.key(0), **args)
