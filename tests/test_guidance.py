"""Guidance transforms against closed forms on Gaussian "class" denoisers, with network calls and
rows counted (at trace time by a Python counter, at run time by `jax.debug.callback`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import sampling
from jaxdiff.core import analytic, guidance
from jaxdiff.core.denoiser import model_from_denoiser
from jaxdiff.core.process import EDM
from jaxdiff.samplers.single import ddim

MEANS = jnp.array([[1.0, -1.0, 0.5, 0.0], [-1.0, 1.0, 0.0, 0.5], [0.2, 0.0, 0.0, 0.1]])
STD = 0.5
NULL = 2  # class 2 plays the unconditional model
B, DIM = 3, 4


def class_denoiser(x, sigma, y):
    """Ideal denoiser of class y: data N(MEANS[y], STD^2 I)."""
    mean = MEANS[y]  # (B, d)
    s2 = jnp.square(jnp.asarray(sigma, x.dtype)).reshape(-1, 1)
    return mean + STD**2 / (STD**2 + s2) * (x - mean)


class Counter:
    """Wraps a denoiser; `batches` lists the batch size of each traced call, `rows` sums the
    batch sizes of the calls that actually ran."""

    def __init__(self, D):
        self.D, self.batches, self.rows = D, [], 0

    def _count(self, n):
        self.rows += int(n)

    def __call__(self, x, sigma, *args):
        self.batches.append(x.shape[0])
        jax.debug.callback(self._count, x.shape[0])
        return self.D(x, sigma, *args)


Y = jnp.array([0, 1, 0])
X = jax.random.normal(jax.random.key(0), (B, DIM)) * 2.0


def closed_cfg(x, sigma, w):
    d_c = class_denoiser(x, sigma, Y)
    d_u = class_denoiser(x, sigma, jnp.full_like(Y, NULL))
    return d_u + w * (d_c - d_u), d_c


@pytest.mark.parametrize("sigma", [0.7, jnp.array([0.3, 1.0, 5.0])], ids=["scalar", "per_sample"])
def test_cfg_closed_form_one_batched_call(sigma):
    counter = Counter(class_denoiser)
    D = jax.jit(guidance.cfg(counter, 3.0, Y, NULL))
    out = D(X, sigma)
    jax.effects_barrier()
    np.testing.assert_allclose(out, closed_cfg(X, sigma, 3.0)[0], rtol=1e-6, atol=1e-6)
    assert counter.batches == [2 * B] and counter.rows == 2 * B  # one call, cond+uncond batched
    D(X, sigma)
    jax.effects_barrier()
    assert counter.rows == 4 * B  # one call per evaluation at run time


def test_cfg_scale_one_is_conditional():
    out = guidance.CFG(scale=1.0, y=Y, y_null=NULL)(class_denoiser)(X, 0.4)
    np.testing.assert_allclose(out, class_denoiser(X, 0.4, Y), rtol=1e-6, atol=1e-6)


def test_cfg_rescale():
    w, sigma = 4.0, 0.6
    guided, d_c = closed_cfg(X, sigma, w)
    plain = guidance.cfg(class_denoiser, w, Y, NULL, rescale=0.0)(X, sigma)
    np.testing.assert_allclose(plain, guided, rtol=1e-6, atol=1e-6)
    full = guidance.cfg(class_denoiser, w, Y, NULL, rescale=1.0)(X, sigma)
    np.testing.assert_allclose(jnp.std(full, axis=1), jnp.std(d_c, axis=1), rtol=1e-5)
    ratio = np.std(d_c, axis=1, keepdims=True) / np.std(guided, axis=1, keepdims=True)
    half = guidance.cfg(class_denoiser, w, Y, NULL, rescale=0.5)(X, sigma)
    np.testing.assert_allclose(half, 0.5 * guided * ratio + 0.5 * guided, rtol=1e-5, atol=1e-6)
    assert not np.allclose(full, guided, atol=1e-3)  # the rescale did something


def test_guidance_interval_values_and_rows():
    counter = Counter(class_denoiser)
    g = guidance.CFG(scale=2.0, y=Y, y_null=NULL, interval=(0.5, 3.0))
    D = jax.jit(g(counter))
    for sigma, inside in [(0.3, False), (0.5, False), (1.0, True), (3.0, True), (10.0, False)]:
        want_guided, want_cond = closed_cfg(X, sigma, 2.0)
        want = want_guided if inside else want_cond
        np.testing.assert_allclose(D(X, sigma), want, rtol=1e-6, atol=1e-6, err_msg=str(sigma))
    jax.effects_barrier()
    assert counter.rows == 2 * 2 * B + 3 * B  # two guided evaluations, three conditional only
    # In a sampler: 12 DDIM steps on a Karras grid, rows = B per step plus B more per step inside.
    sigmas = jnp.asarray(jaxdiff.core.schedules.karras(EDM(), 12))
    counter.rows = 0
    jax.jit(lambda x: ddim(g(counter), x, sigmas))(X)
    jax.effects_barrier()
    n_in = int(np.sum((sigmas[:-1] > 0.5) & (sigmas[:-1] <= 3.0)))
    assert 0 < n_in < 12 and counter.rows == (12 + n_in) * B


def test_adaptive_nfe_and_calibration():
    sigmas = jnp.asarray(jaxdiff.core.schedules.karras(EDM(), 16))
    x = X * 80.0
    sigma_stop, sim = jax.jit(
        lambda x: guidance.calibrate_adaptive(class_denoiser, x, sigmas, Y, NULL, 3.0, 0.99))(x)
    k = int(np.argmax(np.asarray(sim) >= 0.99))
    assert 0 < k < 15 and float(sigma_stop) == float(sigmas[k])
    assert np.all(np.asarray(sim[:k]) < 0.99) and sim[k] >= 0.99
    # The recorded similarity is the one along the CFG trajectory, recomputed independently.
    _, traj = ddim(guidance.cfg(class_denoiser, 3.0, Y, NULL), x, sigmas, trajectory=True)
    d_c = class_denoiser(traj[k], sigmas[k], Y)
    d_u = class_denoiser(traj[k], sigmas[k], jnp.full_like(Y, NULL))
    cos = jnp.sum(d_c * d_u, 1) / jnp.linalg.norm(d_c, axis=1) / jnp.linalg.norm(d_u, axis=1)
    np.testing.assert_allclose(jnp.min(cos), sim[k], rtol=1e-5)
    # Adaptive sampling: 2B rows per step above sigma_stop, B below (NFE drops).
    counter = Counter(class_denoiser)
    g = guidance.AdaptiveCFG(scale=3.0, y=Y, y_null=NULL, sigma_stop=sigma_stop)
    jax.jit(lambda x: ddim(g(counter), x, sigmas))(x)
    jax.effects_barrier()
    assert counter.rows == (2 * k + (16 - k)) * B
    np.testing.assert_allclose(g(class_denoiser)(X, 0.9 * sigma_stop), class_denoiser(X, 0.9 *
                               sigma_stop, Y), rtol=1e-6)


def test_autoguidance_closed_form_and_sample():
    std_main, std_weak, w, sigma = 0.5, 0.9, 2.5, 0.8
    D_main = analytic.gaussian_denoiser(0.3, std_main)
    D_weak = analytic.gaussian_denoiser(0.3, std_weak)
    out = guidance.autoguidance(D_main, D_weak, w)(X, sigma)
    a = lambda s: s**2 / (s**2 + sigma**2)
    np.testing.assert_allclose(out, 0.3 + (w * a(std_main) + (1 - w) * a(std_weak)) * (X - 0.3),
                               rtol=1e-5, atol=1e-6)
    # Through `sample`: the weak network enters as a Partial, made a denoiser with its process.
    process = EDM()
    weak_fn = jax.tree_util.Partial(model_from_denoiser(D_weak, process, "edm"))
    g = guidance.Autoguidance(weak_model_fn=weak_fn, process=process, prediction="edm", scale=w)
    got = jaxdiff.sample(model_from_denoiser(D_main, process, "edm"), X, process=process,
                         prediction="edm", sampler="ddim", steps=8, guidance=g)
    sigmas = jnp.asarray(jaxdiff.core.schedules.karras(process, 8))
    want = ddim(guidance.autoguidance(D_main, D_weak, w), X * sigmas[0], sigmas)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sigma", [1.5, jnp.array([0.5, 1.0, 2.0])], ids=["scalar", "per_sample"])
def test_classifier_guidance(sigma):
    c, tau, w = jnp.array([1.0, 0.0, -1.0, 2.0]), 0.7, 1.8
    # A Gaussian "classifier": grad_x log p(y | x) = (c - x) / tau^2.
    log_prob = lambda x, s: -0.5 * jnp.sum(jnp.square(x - c), axis=1) / tau**2
    D = lambda x, s: class_denoiser(x, s, Y)
    out = guidance.ClassifierGuidance(log_prob_fn=log_prob, scale=w)(D)(X, sigma)
    s2 = jnp.square(jnp.asarray(sigma)).reshape(-1, 1)
    np.testing.assert_allclose(out, D(X, sigma) + w * s2 * (c - X) / tau**2, rtol=1e-5, atol=1e-6)


def test_dynamic_threshold():
    x0 = np.stack([np.linspace(-0.8, 0.6, 200),       # quantile < 1: s = 1, a plain clip
                   np.linspace(-1.5, 1.2, 200),       # 1 < quantile < max_value
                   np.linspace(-9.0, 3.0, 200)])      # quantile > max_value: s = max_value
    out = guidance.dynamic_threshold(lambda x, s: x, 0.9, 4.0)(jnp.asarray(x0), 1.0)
    s = np.clip(np.quantile(np.abs(x0), 0.9, axis=1), 1.0, 4.0)[:, None]
    assert 1.0 < s[1, 0] < 4.0 and s[2, 0] == 4.0
    np.testing.assert_allclose(out, np.clip(x0, -s, s) / s, rtol=1e-6)
    assert np.abs(out).max() <= 1.0
    assert np.mean(np.abs(out[1]) == 1.0) == pytest.approx(0.1, abs=0.02)  # 10% clipped
    with pytest.raises(ValueError, match="percentile"):
        guidance.DynamicThreshold(percentile=99.5)(lambda x, s: x)


def test_sample_cfg_compiles_once():
    process = EDM()
    model = model_from_denoiser(class_denoiser, process, "edm")
    kw = dict(process=process, prediction="edm", sampler="ddim", steps=6)
    n0 = sampling.trace_count()
    out = [jaxdiff.sample(model, X, guidance=guidance.CFG(scale=w, y=Y, y_null=NULL), **kw)
           for w in (1.5, 4.0)]
    assert sampling.trace_count() == n0 + 1
    sigmas = jnp.asarray(jaxdiff.core.schedules.karras(process, 6))
    want = ddim(guidance.cfg(class_denoiser, 4.0, Y, NULL), X * sigmas[0], sigmas)
    np.testing.assert_allclose(out[1], want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(out[0], out[1], atol=1e-2)
    n0 = sampling.trace_count()  # the interval's bounds are data too
    for lo, hi in [(0.5, 3.0), (0.2, 5.0)]:
        jaxdiff.sample(model, X, guidance=guidance.CFG(4.0, Y, NULL, interval=(lo, hi)), **kw)
    assert sampling.trace_count() == n0 + 1
    g = guidance.CFG(scale=4.0, y=Y, y_null=NULL)
    chained = guidance.Chain((g, guidance.DynamicThreshold()))
    got = jaxdiff.sample(model, X, guidance=chained, **kw)
    want = ddim(guidance.dynamic_threshold(guidance.cfg(class_denoiser, 4.0, Y, NULL)),
                X * sigmas[0], sigmas)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
