"""Stateful denoisers (`jaxdiff.core.denoiser.Stateful`, contract in `jaxdiff.samplers.base`)
through every sampler in the registry, the prediction adapter, the guidance transforms and
`jaxdiff.sample`: the state counts the model calls that actually run (= the exact NFE), a state
that changes nothing leaves the samples bit-for-bit equal, a cache that reuses every other output
matches a hand-written loop, and repeated calls reuse one compiled program."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import sampling
from jaxdiff.core import analytic, guidance
from jaxdiff.core.denoiser import NO_STATE, Stateful, model_from_denoiser
from jaxdiff.core.process import EDM, RectifiedFlow
from jaxdiff.samplers import SAMPLERS
from tests._gauss import counting, karras_grid

REFUSED = {"ode"}  # diffrax's adaptive loop cannot carry a state (see `ode`'s docstring)
GMM = analytic.gmm_denoiser(jnp.array([[0.5, -0.3], [-0.6, 0.4]]), jnp.array([0.2, 0.3]),
                            jnp.array([0.4, 0.6]))
X = 80.0 * jax.random.normal(jax.random.key(0), (3, 2))
KEY = jax.random.key(1)


def _needs_key(name):
    p = inspect.signature(SAMPLERS[name]).parameters
    return "key" in p and p["key"].default is inspect.Parameter.empty


def _grid(final_zero, capacity=8):
    return karras_grid(5, final_zero, capacity)


def cache(D, reuse):
    """Stateful D with state (calls, last output); `reuse`: every odd call returns the last
    output instead of calling D (a toy feature cache)."""

    def fn(x, sigma, state):
        calls, last = state
        if reuse:
            x0 = jax.lax.cond(calls % 2 == 1, lambda: last, lambda: D(x, sigma))
        else:
            x0 = D(x, sigma)
        return x0, (calls + 1, x0)

    return fn


def init(x):
    return jnp.zeros((), jnp.int32), jnp.zeros_like(x)


# samplers that run from fitted tables: any table will do to compare stateful with plain
TABLES = {
    "learned": dict(coefficients=jnp.tile(jnp.asarray([[0.6, 0.3, 0.1]]), (8, 1))),
    "dpm_v3": dict(tables=dict(E=jnp.full((8,), 0.5), C=jnp.zeros((8,) + X.shape[1:]),
                               L1=jnp.full((8,), 0.1),  # W: (steps, history, *feature shape)
                               W=jnp.tile(jnp.asarray([0.4, 0.1])[None, :, None], (8, 1, 2)))),
}
# the registry, plus options that take other code paths
CASES = [(name, TABLES.get(name, {})) for name in SAMPLERS] + [
    ("heun", dict(s_churn=2.0)),
    ("heun", dict(time=RectifiedFlow())),
    ("pc", dict(n_corrector=2, predictor="euler_maruyama")),
    ("dpmpp_singlestep", dict(order=3)),
    ("unipc", dict(order=3, variant="bh1")),
    ("dpmpp_2s", dict(use_kernel=True)),
    ("dpmpp_2m", dict(use_kernel=True)),
]


@pytest.mark.parametrize("name,opts", CASES, ids=[f"{n}-{','.join(o)}" for n, o in CASES])
def test_state_counts_exact_nfe_and_leaves_samples_unchanged(name, opts):
    opts = dict(opts, key=KEY) if _needs_key(name) or "s_churn" in opts else opts
    fn = SAMPLERS[name]
    if name in REFUSED:
        with pytest.raises(ValueError, match="cannot carry a denoiser state"):
            fn(Stateful(cache(GMM, False), init(X)), X, _grid(True), **opts)
        return
    traces = []

    @jax.jit
    def stateful(x, sigmas, n, state):
        traces.append(1)
        return fn(Stateful(cache(GMM, False), state), x, sigmas, num_steps=n, trajectory=True,
                  **opts)

    counted, calls = counting(GMM)
    plain = jax.jit(lambda x, sigmas, n: fn(counted, x, sigmas, num_steps=n, trajectory=True,
                                            **opts))
    for final_zero, n in ((True, 5), (False, 4)):
        calls.clear()
        sigmas = _grid(final_zero)
        x_ref, traj_ref = plain(X, sigmas, n)
        jax.effects_barrier()
        x, traj, (count, last) = stateful(X, sigmas, n, init(X))
        assert int(count) == len(calls) > 0, (final_zero, int(count), len(calls))
        np.testing.assert_array_equal(x, x_ref)  # a state that changes nothing changes nothing
        np.testing.assert_array_equal(traj, traj_ref)
        assert last.shape == X.shape
    assert len(traces) == 1  # other grid, step count and state values: one program


def _ddim_reuse(x, sigmas):
    """DDIM where every odd model call returns the previous output (hand-written loop)."""
    last = None
    for i in range(len(sigmas) - 1):
        s, t = sigmas[i], sigmas[i + 1]
        last = GMM(x, s) if i % 2 == 0 else last
        x = last + (t / s) * (x - last)
    return x


def _heun_reuse(x, sigmas):
    """EDM Alg. 1 with calls 0, 2, 4, ... computed and 1, 3, ... reusing the previous output:
    the corrector (odd calls) reuses the Euler slope's D, and the final step to 0 is call 8."""
    for i in range(len(sigmas) - 1):
        s, t = sigmas[i], sigmas[i + 1]
        x0 = GMM(x, s)
        d = (x - x0) / s
        x_euler = x + (t - s) * d
        x = x + (t - s) * 0.5 * (d + (x_euler - x0) / t) if t > 0 else x_euler
    return x


@pytest.mark.parametrize("name,ref", [("ddim", _ddim_reuse), ("heun", _heun_reuse)])
def test_reusing_cache_matches_hand_written_loop(name, ref):
    sigmas = _grid(True, capacity=5)
    x, (count, _) = jax.jit(lambda x: SAMPLERS[name](Stateful(cache(GMM, True), init(x)), x,
                                                     sigmas))(X)
    np.testing.assert_allclose(x, ref(X, np.asarray(sigmas)), rtol=1e-5, atol=1e-5)
    assert int(count) == {"ddim": 5, "heun": 9}[name]
    assert not np.allclose(x, SAMPLERS[name](GMM, X, sigmas), atol=1e-3)  # reuse did matter


# --- through the adapter, guidance and `jaxdiff.sample` ---------------------------------------

MEANS = jnp.array([[1.0, -1.0], [-1.0, 1.0], [0.2, 0.0]])
Y, NULL, STD = jnp.array([0, 1, 0]), 2, 0.5


def class_denoiser(x, sigma, y):
    mean = MEANS[y]
    s2 = jnp.square(jnp.asarray(sigma, x.dtype)).reshape(-1, 1)
    return mean + STD**2 / (STD**2 + s2) * (x - mean)


PROCESS = EDM()
MODEL = model_from_denoiser(class_denoiser, PROCESS, "edm")


def stateful_model(x, t, y, state):
    """The network with a cache of its last output for the 2B batch [x; x] and a call count;
    called on B samples (outside a guidance interval) it updates the first B rows."""
    calls, last = state
    out = MODEL(x, t, y)
    return out, (calls + 1, last.at[: x.shape[0]].set(out))


def model_state(value=0):
    return jnp.asarray(value, jnp.int32), jnp.zeros((2 * X.shape[0], X.shape[1]))


NOISE = jax.random.normal(jax.random.key(2), X.shape)


def _sample(model_fn, g, **kw):
    kw = dict(process=PROCESS, prediction="edm", sampler="heun", steps=6, guidance=g) | kw
    return jaxdiff.sample(model_fn, NOISE, **kw)


@pytest.mark.parametrize("g,nfe", [
    (guidance.CFG(2.5, Y, NULL), 11),
    (guidance.CFG(2.5, Y, NULL, interval=(0.5, 3.0)), 11),
    (guidance.Chain((guidance.CFG(2.5, Y, NULL, rescale=0.5), guidance.DynamicThreshold(0.9, 2.0))),
     11),
    (guidance.AdaptiveCFG(2.5, Y, NULL, sigma_stop=1.0), 11),
], ids=["cfg", "interval", "chain", "adaptive"])
def test_sample_threads_state_through_guidance(g, nfe):
    x, (calls, last) = _sample(Stateful(stateful_model, model_state()), g)
    ref = _sample(MODEL, g)
    np.testing.assert_array_equal(x, ref)
    assert int(calls) == nfe  # heun, 6 steps to 0: 2 * 6 - 1 model calls, guided or not
    assert last.shape == (2 * X.shape[0], X.shape[1]) and np.any(np.asarray(last) != 0)
    # new initial state and step count: the same program
    before = sampling.trace_count()
    _, (calls2, _) = _sample(Stateful(stateful_model, model_state(100)), g, steps=4)
    assert int(calls2) == 100 + 7
    assert sampling.trace_count() == before


def test_sample_trajectory_and_stochastic_with_state():
    g = guidance.CFG(2.0, Y, NULL)
    x, traj, (calls, _) = _sample(Stateful(stateful_model, model_state()), g, sampler="pc",
                                  key=KEY, trajectory=True, n_corrector=2)
    x_ref, traj_ref = _sample(MODEL, g, sampler="pc", key=KEY, trajectory=True, n_corrector=2)
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(traj, traj_ref)
    assert int(calls) == 6 * 3  # pc: 1 + n_corrector calls per step


def test_adapter_and_autoguidance_with_state():
    D = jaxdiff.denoiser(Stateful(stateful_model, model_state()), PROCESS, "edm")
    assert isinstance(D, Stateful) and D.init is not NO_STATE
    x0, (calls, _) = D.fn(X, 0.7, Y, D.init)
    np.testing.assert_allclose(x0, class_denoiser(X, 0.7, Y), rtol=1e-5, atol=1e-6)
    assert int(calls) == 1
    # autoguidance: a stateful main and a plain weak denoiser share the main one's state
    weak = jax.tree_util.Partial(model_from_denoiser(class_denoiser, PROCESS, "edm"))
    g = guidance.Autoguidance(weak_model_fn=weak, process=PROCESS, prediction="edm", scale=2.0,
                              y=Y)
    counting = lambda x, t, y, n: (MODEL(x, t, y), n + 1)  # noqa: E731
    x, n = _sample(Stateful(counting, jnp.int32(0)), g, sampler="dpmpp_2m")
    np.testing.assert_array_equal(x, _sample(MODEL, g, sampler="dpmpp_2m"))
    assert int(n) == 6
    # both stateful: the state is the pair (weak's, main's)
    g = guidance.Autoguidance(weak_model_fn=Stateful(counting, jnp.int32(10)), process=PROCESS,
                              prediction="edm", scale=2.0, y=Y)
    _, (n_weak, n_main) = _sample(Stateful(counting, jnp.int32(0)), g, sampler="dpmpp_2m")
    assert (int(n_weak), int(n_main)) == (16, 6)


def test_state_that_changes_shape_is_refused():
    def shrinking(x, t, y, state):  # returns a B-row cache where it got 2B rows
        return MODEL(x, t, y), (state[0] + 1, jnp.zeros_like(x))

    with pytest.raises(ValueError, match=r"got state\[1\] of shape \(6, 2\).*returned shape "
                                         r"\(3, 2\)"):
        _sample(Stateful(shrinking, model_state()), guidance.CFG(2.0, Y, NULL, interval=(0.5, 3)))


def test_plain_callers_refuse_a_stateful_function():
    with pytest.raises(TypeError, match="called as fn"):
        Stateful(cache(GMM, False), init(X))(X, 1.0)
    with pytest.raises(ValueError, match="sampler 'ode'"):
        _sample(Stateful(stateful_model, model_state()), guidance.CFG(2.0, Y, NULL),
                sampler="ode")
