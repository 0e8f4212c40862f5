"""Processes and denoiser adapters: closed forms, inverses, diffusers' alphas_cumprod."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.core import analytic
from jaxdiff.core.denoiser import PREDICTIONS, denoiser, model_from_denoiser
from jaxdiff.core.process import EDM, VE, DiscreteVP, RectifiedFlow, VPCosine, VPLinear

PROCESSES = [DiscreteVP.linear(), DiscreteVP.cosine(), VPLinear(), VPCosine(), VE(), EDM(),
             RectifiedFlow()]
IDS = [type(p).__name__ for p in PROCESSES]
IDS[1] = "DiscreteVP-cosine"


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_inverses_and_identities(process):
    with jax.enable_x64(True):
        t = jnp.linspace(process.t_min, process.t_max, 9)
        s = process.ve_sigma(t)
        np.testing.assert_allclose(process.t_of(s), t, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(process.sigma(t) / process.alpha(t), s, rtol=1e-9)
        np.testing.assert_allclose(process.t_of_cond(process.cond(t)), t, rtol=1e-9, atol=1e-9)
        assert np.all(np.diff(np.asarray(s)) > 0), "ve_sigma must increase with t"


def test_closed_forms():
    with jax.enable_x64(True):
        t = jnp.array([0.1, 0.5, 1.0])
        vp = VPLinear()
        log_a = -0.25 * t**2 * (20 - 0.1) - 0.5 * t * 0.1
        np.testing.assert_allclose(vp.alpha(t), np.exp(log_a), rtol=1e-12)
        np.testing.assert_allclose(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, 1.0, rtol=1e-12)
        np.testing.assert_allclose(VE().sigma(t), 0.01 * 5000.0**t, rtol=1e-12)
        np.testing.assert_allclose(RectifiedFlow().ve_sigma(t[:2]), t[:2] / (1 - t[:2]))
        np.testing.assert_allclose(EDM().cond(jnp.array(2.0)), np.log(2.0) / 4)
        cos = VPCosine()
        np.testing.assert_allclose(cos.alpha(0.0), 1.0, rtol=1e-12)


@pytest.mark.parametrize("ctor,schedule,kw", [
    ("linear", "linear", dict(beta_start=1e-4, beta_end=0.02)),
    ("scaled_linear", "scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
    ("cosine", "squaredcos_cap_v2", {}),
])
def test_alphas_cumprod_match_diffusers(ctor, schedule, kw):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule=schedule, **kw).alphas_cumprod.double().numpy()
    ours = getattr(DiscreteVP, ctor)(**kw).alphas_cumprod
    # diffusers accumulates its cumprod in float32: equality to float32 precision
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-9)


def test_discrete_interpolation():
    with jax.enable_x64(True):
        p = DiscreteVP.linear()
        train = np.sqrt((1 - p.alphas_cumprod) / p.alphas_cumprod)
        np.testing.assert_allclose(p.ve_sigma(jnp.arange(1000.0)), train, rtol=1e-12)
        mid = float(p.ve_sigma(10.5))
        np.testing.assert_allclose(mid, np.sqrt(train[10] * train[11]), rtol=1e-12)  # log-interp
        lin = DiscreteVP(p.alphas_cumprod, interpolation="linear")
        np.testing.assert_allclose(float(lin.ve_sigma(10.5)), (train[10] + train[11]) / 2)
    with pytest.raises(ValueError, match="interpolation='cubic'"):
        DiscreteVP(p.alphas_cumprod, interpolation="cubic")


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_adapters_round_trip(process, prediction):
    """model_from_denoiser is the inverse of denoiser: the adapter recovers the exact D."""
    if prediction == "edm" and not isinstance(process, EDM):
        pytest.skip("EDM preconditioning is defined with the EDM process")
    with jax.enable_x64(True):
        D = analytic.gaussian_denoiser(0.3, 0.7)
        D2 = denoiser(model_from_denoiser(D, process, prediction), process, prediction)
        x = jax.random.normal(jax.random.key(0), (3, 5), jnp.float64) * 4
        for t in (0.2, 0.7):
            sig = process.ve_sigma(process.t_min + t * (process.t_max - process.t_min))
            np.testing.assert_allclose(D2(x, sig), D(x, sig), rtol=1e-8, atol=1e-9)


def test_adapters_on_known_outputs():
    """Each prediction type decodes a hand-computed network output to the right x0."""
    with jax.enable_x64(True):
        p = VPLinear()
        t = jnp.asarray(0.4)
        a, s = float(p.alpha(t)), float(p.sigma(t))
        x0, eps = jnp.array([[0.5, -1.0]]), jnp.array([[1.5, 0.2]])
        x = a * x0 + s * eps
        sig = float(p.ve_sigma(t))
        outs = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "score": -eps / s}
        for pred, out in outs.items():
            D = denoiser(lambda xx, c, out=out: out, p, pred)
            np.testing.assert_allclose(D(x / a, sig), x0, rtol=1e-10, err_msg=pred)
        rf = RectifiedFlow()
        t = jnp.asarray(0.3)
        xr = 0.7 * x0 + 0.3 * eps
        D = denoiser(lambda xx, c: eps - x0, rf, "flow")  # u = eps - x0
        np.testing.assert_allclose(D(xr / 0.7, 0.3 / 0.7), x0, rtol=1e-10)


def test_edm_preconditioning_formula():
    with jax.enable_x64(True):
        seen = {}

        def F(x_in, c_noise):
            seen["x_in"], seen["c_noise"] = x_in, c_noise
            return jnp.ones_like(x_in)

        D = denoiser(F, EDM(sigma_data=0.5), "edm")
        x, sig = jnp.array([[2.0]]), 3.0
        out = D(x, sig)
        c_skip, c_out, c_in = 0.25 / 9.25, 3 * 0.5 / np.sqrt(9.25), 1 / np.sqrt(9.25)
        np.testing.assert_allclose(out, c_skip * 2 + c_out, rtol=1e-12)
        np.testing.assert_allclose(seen["x_in"], c_in * 2, rtol=1e-12)
        np.testing.assert_allclose(seen["c_noise"], np.log(3) / 4, rtol=1e-12)


def test_bad_prediction_and_shape():
    with pytest.raises(ValueError, match="prediction='epsilon' is unknown"):
        denoiser(lambda x, t: x, EDM(), "epsilon")
    D = denoiser(lambda x, t: x[..., :1], VPLinear(), "eps")
    with pytest.raises(ValueError, match=r"model output shape \(2, 1\) does not match"):
        D(jnp.ones((2, 3)), 1.0)
