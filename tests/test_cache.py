"""Feature caches (`jaxdiff.accel.cache`): the models' feature interfaces leave the plain forward
pass and the parameter tree unchanged; each cache equals the uncached sampler when it recomputes
every call; TaylorSeer's extrapolation is exact on polynomial features; the state starts afresh
at every sampling call; jit, CFG and a multistep sampler; the skipped branch really does not run
(host-side counters); bad settings give one-line errors."""

import hashlib
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import sampling
from jaxdiff.accel.cache import (
    DeepCache,
    DeltaDiT,
    FirstBlockCache,
    TaylorSeer,
    branch_flops,
    feature_changes,
    full_calls_from_changes,
    full_network_equivalents,
    make_cache,
    newton_extrapolate,
)
from jaxdiff.core import guidance
from jaxdiff.core.process import EDM
from jaxdiff.models import DiT, UNet

K = 3  # classes; label K is the null label
UNET = UNet(channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
            num_heads=2, norm_groups=4, num_classes=K)
DIT = DiT(patch_size=2, hidden_size=16, depth=3, num_heads=2, num_classes=K)
X = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
T = jnp.array([0.3, -0.4])
Y = jnp.array([0, 2])
PROCESS = EDM()


def _params(model, seed=1):
    """Host-drawn parameters in the model's tree (every layer active; a fresh init outputs 0)."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), X, T, Y))

    def draw(path, s):
        name, shape = path[-1].key, s.shape
        std = 1 / np.sqrt(np.prod(shape[:-1])) if name == "kernel" else 0.1
        return (float(name == "scale") + std * rng.normal(size=shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


PARAMS = {"unet": _params(UNET), "dit": _params(DIT)}
MODELS = {"unet": UNET, "dit": DIT}
# settings that make each cache recompute at every call
EVERY_CALL = {"deepcache": dict(interval=1, skip_level=1), "fbcache": dict(threshold=0.0),
              "taylorseer": dict(interval=1, order=2), "delta_dit": dict(interval=1)}
BACKBONE = {"deepcache": "unet", "fbcache": "dit", "taylorseer": "dit", "delta_dit": "dit"}


def _sample(model_fn, noise=X, **kw):
    kw = dict(process=PROCESS, prediction="edm", sampler="dpmpp_2m", steps=6) | kw
    return jaxdiff.sample(model_fn, noise, **kw)


def _plain(name):
    return jax.tree_util.Partial(MODELS[name].apply, PARAMS[name])


def _cache(name, rows=2, **settings):
    b = BACKBONE[name]
    x, t, y = jnp.zeros((rows,) + X.shape[1:]), jnp.zeros(rows), jnp.zeros(rows, jnp.int32)
    return make_cache(name, MODELS[b], PARAMS[b], x, t, y, **settings)


def _fingerprint(variables):
    """sha256 of the sorted parameter paths and shapes, and the parameter count."""
    rows = sorted(f"{jax.tree_util.keystr(p)}{tuple(leaf.shape)}"
                  for p, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(variables)))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nn.unbox(variables)))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16], count


# the parameter trees of UNET and DIT as the code before the feature interfaces made them
BEFORE = {"unet": ("8715e5e6107aeb7e", 48529), "dit": ("1e94365b602df853", 19684)}


def test_feature_interfaces_keep_forward_pass_and_param_tree():
    key = jax.random.key(0)
    for name, model in MODELS.items():  # existing checkpoints still load
        assert _fingerprint(jax.eval_shape(model.init, key, X, T, Y)) == BEFORE[name]
    split = jax.eval_shape(partial(UNET.init, skip_level=1), key, X, T, Y)
    assert _fingerprint(split) == BEFORE["unet"]

    @jax.jit
    def every_level(v):  # one program: eager UNet calls are slow
        outs = []
        for level in range(UNET.num_skips()):
            out, deep = UNET.apply(v, X, T, Y, skip_level=level)
            outs += [out, UNET.apply(v, X, T, Y, skip_level=level, deep=deep)[0]]
        return UNET.apply(v, X, T, Y), outs

    ref, outs = every_level(PARAMS["unet"])
    assert float(jnp.abs(ref).max()) > 0.1
    for out in outs:  # the full pass, and the shallow one on its own deep feature
        np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)

    @jax.jit
    def split(v):
        h1 = DIT.apply(v, X, T, Y, blocks=(0, 1), tokens=True)  # (B, T, D)
        h3 = DIT.apply(v, X, T, Y, blocks=(1, 3), hidden=h1, tokens=True)
        return DIT.apply(v, X, T, Y, blocks=(3, 3), hidden=h3), DIT.apply(v, X, T, Y)

    np.testing.assert_allclose(*split(PARAMS["dit"]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(EVERY_CALL))
def test_cache_recomputing_every_call_equals_uncached(name):
    x, state = _sample(_cache(name, **EVERY_CALL[name]))
    ref = _sample(_plain(BACKBONE[name]))
    np.testing.assert_allclose(x, ref, atol=1e-6, rtol=0)
    assert int(state["calls"]) == int(state["fulls"]) == 6


@pytest.mark.parametrize("name,settings,fulls", [
    ("deepcache", dict(interval=3), 2),  # calls 0 and 3 of 6
    ("taylorseer", dict(interval=2, order=1), 3),
    ("fbcache", dict(threshold=10.0), 1),  # a large threshold: only the first call is full
    ("delta_dit", dict(interval=3, boundary=3), 2),  # call 1, 2: rear cached; 4, 5: front
])
def test_cache_skips_and_stays_close(name, settings, fulls):
    x, state = _sample(_cache(name, **settings))
    ref = _sample(_plain(BACKBONE[name]))
    assert int(state["fulls"]) == fulls and int(state["calls"]) == 6
    err = float(jnp.abs(x - ref).max())
    assert 1e-5 < err < float(jnp.abs(ref).max()), err  # it did skip, and stays on the data scale


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_taylorseer_exact_on_polynomial_features(order):
    """A fake DiT whose tokens are a degree-`order` polynomial of t; t = the call index."""
    coef = np.array([0.5, -1.0, 0.25, 0.1])[: order + 1]

    class Poly:
        depth = 1

        def apply(self, params, x, t, *args, blocks=None, hidden=None, tokens=False):
            if not tokens:  # the head: identity on the tokens
                return hidden
            return jnp.polyval(jnp.asarray(coef), t)[:, None, None] * jnp.ones((1, 4, 2))

    seer = TaylorSeer(Poly(), order)
    x = jnp.zeros((1, 2, 2, 1))
    state = seer.init(None, x, jnp.zeros(1))
    interval, step = 3, jax.jit(seer)  # eager lax.conds are slow
    for call in range(4 * interval):
        t = jnp.full((1,), float(call))
        out, state = step(None, dict(interval=interval), x, t, state)
        if call >= order * interval:  # order + 1 full values seen
            np.testing.assert_allclose(out, np.polyval(coef, call) * np.ones((1, 4, 2)),
                                       rtol=1e-4, err_msg=f"call {call}")
    # one degree more is not exact: the test can fail
    cubic = jnp.asarray([1.0, 0.0, 0.0, 0.0, 0.0][: order + 2])
    hist = jnp.stack([jnp.polyval(cubic, -1.0 * i) for i in range(order + 1)])
    error = float(newton_extrapolate(hist, order + 1, 0.5)) - float(jnp.polyval(cubic, 0.5))
    assert abs(error) > 1e-3


def test_state_is_created_per_sampling_call():
    stateful = _cache("deepcache", interval=4)
    noise2 = jax.random.normal(jax.random.key(5), X.shape)
    first, state = _sample(stateful)
    before = sampling.trace_count()
    second, _ = _sample(stateful, noise2)
    assert sampling.trace_count() == before  # the same compiled program
    fresh, _ = _sample(_cache("deepcache", interval=4), noise2)
    np.testing.assert_array_equal(second, fresh)  # nothing from the first call leaked
    leaked, _ = _sample(jaxdiff.Stateful(stateful.fn, state), noise2)
    assert not np.allclose(leaked, fresh, atol=1e-4)  # a carried-over state would have mattered
    np.testing.assert_array_equal(_sample(stateful)[0], first)


def test_cfg_shares_the_decision():
    """The first-block cache decides from the batch (the counter-based caches from the call
    count, trivially shared): under CFG one decision for the [x; x] rows."""
    name = "fbcache"
    g = guidance.CFG(2.0, Y, K)
    ref = _sample(_plain(BACKBONE[name]), guidance=g)
    x, state = _sample(_cache(name, rows=4, **EVERY_CALL[name]), guidance=g)
    np.testing.assert_allclose(x, ref, atol=1e-6, rtol=0)
    x, state = _sample(_cache(name, rows=4, threshold=10.0), guidance=g)  # the same program
    assert int(state["fulls"]) == 1
    assert 1e-5 < float(jnp.abs(x - ref).max()) < float(jnp.abs(ref).max())
    # outside a guidance interval the model runs on x alone: the leading rows of the cache
    g = guidance.CFG(2.0, Y, K, interval=(0.5, 3.0))
    x, state = _sample(_cache(name, rows=4, **EVERY_CALL[name]), guidance=g)
    np.testing.assert_allclose(x, _sample(_plain(BACKBONE[name]), guidance=g), atol=1e-6, rtol=0)


class _Counted:
    """Mixin: a host-side counter per stage that executes (a skipped lax.cond branch adds none)."""

    def tokens(self, params, x, t, *args, blocks, hidden=None):
        jax.debug.callback(lambda: COUNTS.append(("tokens", blocks)))
        return super().tokens(params, x, t, *args, blocks=blocks, hidden=hidden)

    def full(self, params, x, t, *args):
        jax.debug.callback(lambda: COUNTS.append("full"))
        return super().full(params, x, t, *args)

    def shallow(self, params, deep, x, t, *args):
        jax.debug.callback(lambda: COUNTS.append("shallow"))
        return super().shallow(params, deep, x, t, *args)


COUNTS = []


@pytest.mark.parametrize("cls,data,expected", [
    (DeepCache, dict(interval=3), {"full": 2, "shallow": 4}),
    (FirstBlockCache, dict(threshold=10.0), {("tokens", (0, 1)): 6, ("tokens", (1, 3)): 1}),
    (TaylorSeer, dict(interval=3), {("tokens", None): 2}),
    # calls 0, 3 full; 1, 2 rear-cached (blocks 0..1 run); 4, 5 front-cached (blocks 1..2 run)
    (DeltaDiT, dict(interval=3, boundary=3), {("tokens", (2, 3)): 2, ("tokens", (0, 2)): 2,
                                              ("tokens", (1, 3)): 2, ("tokens", (0, 1)): 2}),
])
def test_skipped_branch_does_not_run(cls, data, expected):
    model = UNET if cls is DeepCache else DIT
    counted = type("Counted" + cls.__name__, (_Counted, cls), {})
    fn = jax.tree_util.Partial(counted(model), PARAMS["unet" if cls is DeepCache else "dit"],
                               jax.tree.map(jnp.asarray, data))
    COUNTS.clear()
    _, state = _sample(jaxdiff.Stateful(fn, fn.func.init(fn.args[0], X, T, Y)))
    jax.effects_barrier()
    got = {k: COUNTS.count(k) for k in expected}
    assert got == expected, COUNTS
    assert int(state["fulls"]) == {FirstBlockCache: 1}.get(cls, 2)


@pytest.mark.parametrize("call,match", [
    (lambda: _cache("deepcache", interval=0), r"deepcache' interval=0 must be an integer >= 1"),
    (lambda: _cache("taylorseer", interval=2.5), r"interval=2.5 must be an integer >= 1"),
    (lambda: _cache("fbcache", threshold=-1), r"threshold=-1 must be a number >= 0"),
    (lambda: make_cache("magic", UNET, PARAMS["unet"], X, T, Y),
     r"cache 'magic' is unknown; allowed: deepcache, fbcache, taylorseer, delta_dit"),
    (lambda: make_cache("fbcache", UNET, PARAMS["unet"], X, T, Y),
     r"cache 'fbcache' is for a DiT, got a UNet; allowed for it: deepcache"),
    (lambda: _cache("deepcache", window=3),
     r"no setting 'window'; allowed: interval, skip_level, full_calls"),
    (lambda: _cache("deepcache", skip_level=4), r"skip_level=4 must be at most 3 \(the UNet"),
    (lambda: _cache("delta_dit", blocks=2), r"blocks=2 must be at most depth / 2 = 1"),
    (lambda: _sample(_cache("deepcache", rows=1)),
     r"holds features for 1 rows and was called on 2"),
])
def test_bad_settings_one_line_errors(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_nonuniform_deepcache_schedule():
    x, state = _sample(_cache("deepcache", full_calls=(0, 1, 2, 4), skip_level=1))
    assert int(state["fulls"]) == 4
    x_every, _ = _sample(_cache("deepcache", full_calls=tuple(range(6)), skip_level=1))
    np.testing.assert_allclose(x_every, _sample(_plain("unet")), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"full_calls=\(1, 2\) must be call indices >= 0 that "
                                         "include 0"):
        _cache("deepcache", full_calls=(1, 2))


def test_nonuniform_schedule_from_the_feature_change_profile():
    """The profile is recorded along the uncached trajectory; the schedule puts the full calls
    where the change accumulates."""
    prof = feature_changes(UNET, PARAMS["unet"], X, T, Y, skip_level=1, capacity=8)
    x, state = _sample(prof)
    np.testing.assert_allclose(x, _sample(_plain("unet")), atol=1e-6, rtol=0)
    change = np.asarray(state["change"])
    assert int(state["calls"]) == 6 and change[0] == 0 and np.all(change[1:6] > 0)
    assert np.all(change[6:] == 0)
    assert full_calls_from_changes([0, 1, 1, 1, 1, 1], 3) == [0, 2, 4]  # uniform change
    assert full_calls_from_changes([0, 8, 1, 1, 1, 1], 3) == [0, 1, 2]  # fast early: dense
    assert full_calls_from_changes([0, 0, 0, 0, 0, 1], 2) == [0, 5]
    assert full_calls_from_changes([0, 0, 0, 0, 0, 0], 3) == [0, 1, 2]  # no change: the earliest
    with pytest.raises(ValueError, match=r"num_full=7 must be an integer in 1..6"):
        full_calls_from_changes(change[:6], 7)


@pytest.mark.parametrize("name,settings", [("deepcache", dict(interval=3)),
                                           ("fbcache", dict(threshold=10.0)),
                                           ("taylorseer", dict(interval=3, order=1)),
                                           ("delta_dit", dict(interval=3))])
def test_full_network_equivalents_from_xla_cost(name, settings):
    stateful = _cache(name, **settings)
    full, skipped = branch_flops(stateful, X, T, Y)
    assert 0 < skipped < 0.8 * full, (full, skipped)  # the skipping branch is much cheaper
    _, state = _sample(stateful)
    fne = full_network_equivalents(int(state["fulls"]), int(state["calls"]), full, skipped)
    fulls = int(state["fulls"])
    assert fne == pytest.approx((fulls + (6 - fulls) * skipped / full) / 6)
    assert fne < 0.8


@pytest.mark.parametrize("name,settings", [("taylorseer", dict(interval=2, order=1)),
                                           ("fbcache", dict(threshold=0.05))])
def test_cache_under_vmap(name, settings):
    """vmap over independent noise batches: each batch equals its own run. (TaylorSeer decides
    from the call count, which vmap leaves unbatched, so its lax.cond stays a cond; FBCache
    decides from x, so under vmap its cond becomes a select that computes both branches.)"""
    stateful = _cache(name, **settings)
    noises = jax.random.normal(jax.random.key(7), (2,) + X.shape)
    run = jax.vmap(lambda n: _sample(stateful, n)[0])  # sample() jits inside
    out = run(noises)
    for i in range(2):
        np.testing.assert_allclose(out[i], _sample(stateful, noises[i])[0], atol=1e-5)


@pytest.mark.parametrize("sampler,nfe", [("heun", 11), ("dpmpp_2m_sde", 6),
                                         ("dpm_solver_3", 16)])
def test_every_call_cache_through_other_samplers(sampler, nfe):
    """Multi-stage, multistep and stochastic samplers: a cache that recomputes every call is the
    uncached sampler, and the state counts the sampler's exact NFE."""
    kw = dict(sampler=sampler, key=jax.random.key(3))
    x, state = _sample(_cache("fbcache", threshold=0.0), **kw)
    np.testing.assert_allclose(x, _sample(_plain("dit"), **kw), atol=1e-6, rtol=0)
    assert int(state["calls"]) == int(state["fulls"]) == nfe


def test_benchmark_compares_at_equal_wall_time():
    """benchmarks/caching.py's verdict: a cache beats fewer steps when its FD is below the
    uncached FD interpolated (linear in log time) at its wall time; speedup vs the same steps."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import caching

    runs = [dict(cache=None, steps=10, wall_s=1.0, fd=3.0, dev=0.2),
            dict(cache=None, steps=20, wall_s=2.0, fd=2.0, dev=0.0),
            dict(cache="deepcache", steps=20, wall_s=2 ** 0.5, fd=2.4, dev=0.11),
            dict(cache="deepcache", steps=20, wall_s=2 ** 0.5, fd=2.6, dev=0.09),
            dict(cache="taylorseer", steps=10, wall_s=0.5, fd=2.0, dev=0.0)]
    caching.compare(runs)
    assert runs[2]["fd_equal_time"] == pytest.approx(2.5)
    assert runs[2]["dev_equal_time"] == pytest.approx(0.1)
    assert runs[2]["beats_on_fd"] is True and runs[3]["beats_on_fd"] is False
    assert runs[2]["beats_on_dev"] is False and runs[3]["beats_on_dev"] is True
    assert runs[2]["speedup"] == pytest.approx(2 ** 0.5)
    assert runs[2]["fd_change"] == pytest.approx(0.2)
    assert runs[4]["fd_equal_time"] is None and runs[4]["beats_on_fd"] is None
    assert runs[0]["beats_on_fd"] is None  # the baseline itself
