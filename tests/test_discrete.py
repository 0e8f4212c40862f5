"""Discrete diffusion: masked/uniform processes, their NELBOs, and the masked samplers.

The reference is a known joint p(x) over all V^L sequences of a tiny vocabulary and length,
with ideal denoisers computing p(x0_l | xt) by enumeration: the NELBOs must then equal
-log p(x) and the samplers must draw from p."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from jaxdiff.discrete import samplers as S
from jaxdiff.discrete.process import MaskedProcess, UniformProcess, check_tokens

V, L = 3, 3
X = np.stack(np.meshgrid(*[np.arange(V)] * L, indexing="ij"), -1).reshape(-1, L)  # (27, L)
_rng = np.random.default_rng(0)
P = _rng.uniform(0.3, 1.0, len(X))
P /= P.sum()
NLL = -np.log(P)
ENTROPY = float(np.sum(P * NLL))
POW = V ** np.arange(L)[::-1]


def ideal_masked(xt, t, scale=1.0):
    """Exact log p(x0_l | unmasked tokens of xt) (times `scale`; scale != 1 is non-ideal)."""
    table, probs = jnp.asarray(X), jnp.asarray(P)
    consistent = jnp.all((xt[:, None, :] == V) | (xt[:, None, :] == table[None]), axis=-1)
    w = consistent * probs
    return scale * jnp.log(jnp.einsum("bn,nlv->blv", w, jax.nn.one_hot(table, V, dtype=w.dtype)))


def ideal_uniform(process, scale=1.0):
    """Exact log p(x0_l | xt, t) under the uniform process (times `scale`)."""
    table, probs = jnp.asarray(X), jnp.asarray(P)

    def denoiser(xt, t):
        a = process.alpha(t)[:, None, None]
        q = a * (xt[:, None, :] == table[None]) + (1 - a) / V  # q_t(xt_j | x_j) (B, 27, L)
        w = jnp.prod(q, axis=-1) * probs
        onehot = jax.nn.one_hot(table, V, dtype=w.dtype)
        return scale * jnp.log(jnp.einsum("bn,nlv->blv", w, onehot))

    return denoiser


def histogram(tokens):
    return np.bincount(np.asarray(tokens) @ POW, minlength=len(X))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_and_corrupt(schedule):
    p = MaskedProcess(V, schedule)
    assert p.mask_id == V
    np.testing.assert_allclose(p.alpha(jnp.array([0.0, 1.0])), [1.0, 0.0], atol=1e-7)
    t = jnp.linspace(0.01, 0.99, 50)
    np.testing.assert_allclose(p.alpha(t) + p.mask_prob(t), 1.0, atol=2e-7)
    np.testing.assert_allclose(p.t_of_mask_prob(p.mask_prob(t)), t, atol=2e-6)
    w = p.weight(t)
    assert np.all(np.asarray(w) > 0) and np.all(np.diff(np.asarray(w)) < 0)
    # dalpha is alpha's derivative
    h = 1e-3
    fd = (p.alpha(t + h) - p.alpha(t - h)) / (2 * h)
    np.testing.assert_allclose(p.dalpha(t), fd, rtol=1e-3, atol=1e-4)
    if schedule == "cosine":  # MD4: alpha = 1 - cos(pi/2 (1 - t)), weight pi/2 tan(pi/2 (1-t))
        np.testing.assert_allclose(p.alpha(t), 1 - np.cos(np.pi / 2 * (1 - t)), atol=1e-6)
        np.testing.assert_allclose(w, np.pi / 2 * np.tan(np.pi / 2 * (1 - t)), rtol=1e-4)
    # mask rate of corrupt = 1 - alpha(t); masked tokens are the mask id, others unchanged
    x0 = jnp.asarray(np.random.default_rng(1).integers(0, V, (4, 20000)), jnp.int32)
    tt = jnp.array([0.0, 0.3, 0.7, 1.0])
    xt = p.corrupt(jax.random.key(0), x0, tt)
    rate = np.mean(np.asarray(xt) == V, axis=1)
    np.testing.assert_allclose(rate, p.mask_prob(tt), atol=0.012)
    assert np.all((np.asarray(xt) == V) | (np.asarray(xt) == np.asarray(x0)))
    # uniform: the resampled rate and the marginal
    u = UniformProcess(V, schedule)
    xt = np.asarray(u.corrupt(jax.random.key(1), x0, tt))
    kept = np.mean(xt == np.asarray(x0), axis=1)
    np.testing.assert_allclose(kept, u.alpha(tt) + (1 - u.alpha(tt)) / V, atol=0.012)
    np.testing.assert_allclose(u.marginal(x0[:, :2], tt).sum(-1), 1.0, atol=1e-6)


def test_subs_log_probs():
    p = MaskedProcess(4)
    xt = jnp.array([[4, 2, 4, 0]])
    lp = np.asarray(p.subs_log_probs(jnp.zeros((1, 4, 4)), xt))
    np.testing.assert_allclose(lp[0, 0], np.log(0.25), rtol=1e-6)
    assert lp[0, 1, 2] == 0 and np.all(np.isneginf(np.delete(lp[0, 1], 2)))
    assert lp[0, 3, 0] == 0 and np.all(np.isneginf(lp[0, 3, 1:]))


def exact_count_nelbo(process, denoiser):
    """sum_k (1/k) E_{|M|=k} sum_{l in M} -log p(x_l | x_M masked), by enumeration (27,)."""
    out = np.zeros(len(X))
    for k in range(1, L + 1):
        for M in itertools.combinations(range(L), k):
            xt = X.copy()
            xt[:, list(M)] = V
            xt = jnp.asarray(xt)
            lp = process.subs_log_probs(denoiser(xt, None), xt)
            nll = -jnp.take_along_axis(lp, jnp.asarray(X)[..., None], -1)[..., 0]
            out += np.asarray(jnp.sum(jnp.where(xt == V, nll, 0.0), -1)) / (k * math.comb(L, k))
    return out


def test_masked_nelbo_is_tight():
    p = MaskedProcess(V)
    with jax.enable_x64(True):
        exact = exact_count_nelbo(p, ideal_masked)
        np.testing.assert_allclose(exact, NLL, atol=1e-5)
        worse = exact_count_nelbo(p, lambda xt, t: ideal_masked(xt, t, scale=0.7))
    # a non-ideal denoiser: E_p[NELBO] = cross-entropy bound, strictly above the entropy
    assert float(np.sum(P * worse)) > ENTROPY + 1e-3
    # Monte Carlo: both estimators agree with -log p(x); "count" has the lower variance
    ses = {}
    for est in ("time", "count"):
        mean, se = p.nelbo(ideal_masked, X, jax.random.key(1), num_samples=1000, estimator=est)
        z = (np.asarray(mean) - NLL) / np.asarray(se)
        assert np.max(np.abs(z)) < 4.5, (est, z)
        if est == "count":  # the time estimator's 1/t weight makes it too heavy-tailed
            assert abs(np.mean(z)) * math.sqrt(len(X)) < 4, (est, z)
        ses[est] = float(np.mean(se))
    assert ses["count"] < 0.3 * ses["time"], ses
    # bits per token over the dataset (each sequence once): the mean of -log p / (L ln 2)
    bpt, se = p.bits_per_token(ideal_masked, X, jax.random.key(2), batch_size=10, num_samples=64)
    truth = float(np.mean(NLL)) / (L * math.log(2))
    assert 0 < se < 0.1 and abs(bpt - truth) < 4 * se, (bpt, se, truth)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_masked_loss_matches_nelbo(schedule):
    p = MaskedProcess(V, schedule)
    x0 = jnp.asarray(np.tile(X[:4], (400, 1)))  # 4 sequences, 400 antithetic draws each
    keys = jax.random.split(jax.random.key(3), 4)
    vals = jax.jit(jax.vmap(lambda k: p.loss(ideal_masked, x0, k, t_min=1e-5)))(keys)
    vals = np.asarray(vals).reshape(4, 400, 4).transpose(2, 0, 1).reshape(4, -1)
    mean, se = vals.mean(1), vals.std(1) / math.sqrt(vals.shape[1])
    assert np.all(np.abs(mean - NLL[:4]) < 4.5 * se), (mean, NLL[:4], se)


def test_masked_count_loss_matches_nelbo_with_lower_variance():
    """The training loss by the time-agnostic estimator (k stratified over the batch) is
    unbiased for the same NELBO, with a smaller spread than the time estimator's."""
    p = MaskedProcess(V, "linear")
    x0 = jnp.asarray(np.tile(X[:4], (400, 1)))
    keys = jax.random.split(jax.random.key(4), 4)

    def draws(est):
        v = jax.jit(jax.vmap(lambda k: p.loss(ideal_masked, x0, k, t_min=1e-5,
                                              estimator=est)))(keys)
        return np.asarray(v).reshape(4, 400, 4).transpose(2, 0, 1).reshape(4, -1)

    count, time_ = draws("count"), draws("time")
    mean, se = count.mean(1), count.std(1) / math.sqrt(count.shape[1])
    assert np.all(np.abs(mean - NLL[:4]) < 4.5 * se), (mean, NLL[:4], se)
    assert np.all(count.std(1) < 0.8 * time_.std(1))
    with pytest.raises(ValueError, match="estimator='nope' is unknown for MaskedProcess"):
        p.loss(ideal_masked, x0, keys[0], estimator="nope")
    with pytest.raises(ValueError, match="estimator='count' is unknown for UniformProcess; "
                                         "allowed: time"):
        UniformProcess(V).loss(ideal_masked, x0, keys[0], estimator="count")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_uniform_nelbo_is_tight(schedule):
    """The uniform NELBO's integrand, averaged exactly over xt and integrated over t by
    Gauss-Legendre (t = s^2 takes out the sqrt(t) behaviour at 0), equals -log p(x)."""
    with jax.enable_x64(True):
        u = UniformProcess(V, schedule)
        s, ws = np.polynomial.legendre.leggauss(48)
        s, ws = (s + 1) / 2, ws / 2
        t, w = s**2, ws * 2 * s
        K, N = len(t), len(X)
        x0 = jnp.asarray(np.repeat(X, N * K, 0))
        xt = jnp.asarray(np.tile(np.repeat(X, K, 0), (N, 1)))
        tt = jnp.asarray(np.tile(t, N * N))
        q = u.marginal(x0, tt)[jnp.arange(len(x0))[:, None], jnp.arange(L)[None], xt]
        q = jnp.prod(q, -1)

        def nelbo(scale):
            f = u.nelbo_integrand(ideal_uniform(u, scale)(xt, tt), xt, x0, tt)
            return np.asarray((f * q).reshape(N, N, K).sum(1)) @ w

        np.testing.assert_allclose(nelbo(1.0), NLL, atol=1e-5)
        assert float(np.sum(P * nelbo(0.7))) > ENTROPY + 1e-3
    # the float32 Monte-Carlo training loss agrees within its standard error
    x0 = jnp.asarray(np.tile(X[:4], (400, 1)))
    keys = jax.random.split(jax.random.key(4), 4)
    vals = jax.jit(jax.vmap(lambda k: u.loss(ideal_uniform(u), x0, k, t_min=1e-4)))(keys)
    vals = np.asarray(vals).reshape(4, 400, 4).transpose(2, 0, 1).reshape(4, -1)
    mean, se = vals.mean(1), vals.std(1) / math.sqrt(vals.shape[1])
    assert np.all(np.isfinite(vals)) and np.all(vals >= 0)
    assert np.all(np.abs(mean - NLL[:4]) < 4.5 * se), (mean, NLL[:4], se)


SAMPLERS = {
    "first_hitting": lambda p, k, **kw: S.first_hitting(ideal_masked, p, k, **kw),
    "ancestral": lambda p, k, **kw: S.ancestral(ideal_masked, p, k, steps=200, **kw),
    "confidence_random": lambda p, k, **kw: S.confidence_decoding(
        ideal_masked, p, k, steps=L, by="random", **kw),
    "block_ar": lambda p, k, **kw: S.block_decoding(
        ideal_masked, p, k, block_size=1, steps_per_block=1, **kw),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_draw_the_joint(name):
    """first-hitting, one-token-at-a-time random-order and left-to-right decoding are exact for
    the ideal model; ancestral is exact as steps -> infinity (200 steps here)."""
    n = 4000
    p = MaskedProcess(V, "cosine" if name == "ancestral" else "linear")
    run = jax.jit(lambda k: SAMPLERS[name](p, k, batch=n, length=L))
    x, nfe = run(jax.random.key(5))
    counts = histogram(x)
    assert counts.sum() == n
    assert chisquare(counts, P / P.sum() * n).pvalue > 1e-3
    if name == "first_hitting":
        assert int(nfe) == L


def toy_denoiser(xt, t):
    """A time-agnostic context-dependent toy model over V = 5."""
    pos = jnp.arange(xt.shape[1])[None, :, None]
    left = jnp.roll(xt, 1, axis=1)[..., None]
    return jnp.sin(1.3 * pos + 0.7 * jnp.arange(5) + 0.4 * left) * 2.0


ALL = {
    "ancestral": lambda p, k, **kw: S.ancestral(toy_denoiser, p, k, steps=8, **kw),
    "first_hitting": lambda p, k, **kw: S.first_hitting(toy_denoiser, p, k, **kw),
    "confidence": lambda p, k, **kw: S.confidence_decoding(toy_denoiser, p, k, steps=4, **kw),
    "block": lambda p, k, **kw: S.block_decoding(toy_denoiser, p, k, block_size=4,
                                                  steps_per_block=2, **kw),
}


@pytest.mark.parametrize("name", list(ALL))
def test_reproducible_and_x_init(name):
    p = MaskedProcess(5)
    B, Ln = 3, 16
    x_init = np.full((B, Ln), 5)
    x_init[:, ::3] = np.arange(6)[None] % 5
    run = jax.jit(lambda k, xi: ALL[name](p, k, batch=B, length=Ln, x_init=xi))
    a, nfe_a = run(jax.random.key(0), x_init)
    b, _ = run(jax.random.key(0), x_init)
    c, _ = run(jax.random.key(1), x_init)
    a, b, c = map(np.asarray, (a, b, c))
    assert a.dtype == np.int32 and a.shape == (B, Ln)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.all((a >= 0) & (a < 5))  # every mask filled
    given = x_init != 5
    assert np.array_equal(a[given], x_init[given])
    if name == "first_hitting":
        assert int(nfe_a) == int(np.max(np.sum(~given, 1)))


def test_nfe_counts():
    p = MaskedProcess(5)
    x, nfe = jax.jit(lambda k: S.first_hitting(toy_denoiser, p, k, batch=2, length=6))(
        jax.random.key(0))
    assert int(nfe) == 6
    steps = 64
    run = jax.jit(lambda k, cache: S.ancestral(toy_denoiser, p, k, batch=2, length=4,
                                               steps=steps, cache=cache), static_argnums=1)
    _, nfe = run(jax.random.key(0), True)
    assert 1 <= int(nfe) <= 2 * 4 + 1 < steps  # a call only after a step that changed a token
    _, nfe = run(jax.random.key(0), False)
    assert int(nfe) == steps
    # caching is exact for a time-agnostic model: same tokens either way
    assert np.array_equal(run(jax.random.key(2), True)[0], run(jax.random.key(2), False)[0])
    _, nfe = S.block_decoding(toy_denoiser, p, jax.random.key(0), batch=2, length=8,
                              block_size=4, steps_per_block=3)
    assert int(nfe) == 6


def test_confidence_commits_most_confident():
    """Each round commits the most confident masked position. The model is sure in the order
    of positions 0, 3, 2, 1 and predicts the number of tokens already given (capped at 2), so
    one commit per round yields [0, 2, 2, 1]; with one round every position gets 0."""
    conf = jnp.array([8.0, 0.1, 0.2, 0.3])

    def model(xt, t):
        given = jnp.minimum(jnp.sum(xt != 3, axis=1), 2)  # (B,)
        hot = jax.nn.one_hot(given, 3)[:, None, :]
        return conf[None, :, None] * hot

    p = MaskedProcess(3)
    for by in ("max_prob", "neg_entropy"):
        x, nfe = S.confidence_decoding(model, p, jax.random.key(0), batch=1, length=4, steps=4,
                                       temperature=0.0, by=by)
        assert int(nfe) == 4 and np.array_equal(np.asarray(x), [[0, 2, 2, 1]]), by
    x, nfe = S.confidence_decoding(model, p, jax.random.key(0), batch=1, length=4, steps=1,
                                   temperature=0.0)
    assert int(nfe) == 1 and np.array_equal(np.asarray(x), [[0, 0, 0, 0]])
    x, nfe = S.block_decoding(model, p, jax.random.key(0), batch=1, length=4, block_size=2,
                              steps_per_block=2, temperature=0.0)
    assert int(nfe) == 4 and np.array_equal(np.asarray(x), [[0, 1, 2, 2]])
    x, nfe = S.block_decoding(model, p, jax.random.key(0), batch=1, length=4, block_size=4,
                              steps_per_block=4, x_init=np.array([[1, 1, 1, 1]]))
    assert int(nfe) == 0 and np.array_equal(np.asarray(x), [[1, 1, 1, 1]])


def test_gumbel_float32_cap_and_exact_tail():
    """float32 Gumbel noise is capped at -log(-log(1 - 2^-23)) = 15.942 because jax's float32
    uniform lies on the 2^-23 grid; the exact noise reaches 45 and is exact in its tail."""
    key = jax.random.key(0)
    u = np.asarray(jax.random.uniform(key, (1 << 20,), jnp.float32), np.float64)
    assert np.all(u * 2**23 == np.round(u * 2**23))  # 23 random bits
    cap = float(-jnp.log(-jnp.log(jnp.float32(1 - 2**-23))))
    assert abs(cap - S.F32_GUMBEL_CAP) < 1e-5 and abs(cap - 23 * math.log(2)) < 1e-3
    g32 = np.asarray(S.gumbel_noise(key, (1 << 20,), "float32"))
    assert np.max(g32) <= cap + 1e-6
    # the exact path's exponential at extreme and random words vs a float64 reference
    words = np.random.default_rng(0).integers(0, 2**32, (2, 4096), dtype=np.uint64)
    words[:, :4] = [[0, 0, 2**32 - 1, 1], [0, 1, 2**32 - 1, 0]]
    for shift in (0, 8, 16, 24, 31):  # W from 2^-65 up to ~1
        hi = (words[0] >> shift).astype(np.uint32)
        lo = words[1].astype(np.uint32)
        w = (hi.astype(np.float64) * 2**32 + lo.astype(np.float64) + 0.5) * 2.0**-64
        comp = ((~hi).astype(np.float64) * 2**32 + (~lo).astype(np.float64) + 0.5) * 2.0**-64
        ref = np.where(hi >= 2**31, -np.log(comp), -np.log1p(-np.minimum(w, 0.5)))
        e = np.asarray(S.exponential_from_words(jnp.asarray(hi), jnp.asarray(lo)), np.float64)
        np.testing.assert_allclose(e, ref, rtol=3e-7)
    g_max = float(-jnp.log(S.exponential_from_words(jnp.uint32(0), jnp.uint32(0))))
    assert abs(g_max - 65 * math.log(2)) < 1e-4
    g_min = float(-jnp.log(S.exponential_from_words(jnp.uint32(2**32 - 1),
                                                    jnp.uint32(2**32 - 1))))
    assert abs(g_min + math.log(65 * math.log(2))) < 1e-5
    # what the cap costs: P(token with logit gap D beats the top token), exact for the
    # float32 grid (head Gumbel by quadrature): at D = 17 the float32 path samples it at
    # under a quarter of its probability, the exact noise (cap 45) at its probability
    D = 17.0
    gh = np.linspace(-4, 25, 4001)
    dens = np.exp(-gh - np.exp(-gh))
    thr = np.exp(-np.exp(-(D + gh)))  # need u > thr
    top = (2**23 - np.arange(1, 65, dtype=np.float64)) * 2.0**-23  # the grid's top 64 values
    g_top = -np.log(-np.log(np.float32(top)).astype(np.float64))
    tail32 = np.array([(g_top > D + h).sum() for h in gh]) * 2.0**-23
    assert np.all((1 - thr) * 2**23 < 60)  # the 64 top grid points cover every threshold
    p32 = np.trapezoid(dens * tail32, gh)
    p_true = 1 / (1 + math.exp(D))
    assert p32 < 0.25 * p_true
    # sampling: on a moderate distribution both paths match the probabilities
    logits = jnp.log(jnp.array([0.6, 0.25, 0.1, 0.045, 0.005]))
    for gumbel in ("exact", "float32"):
        draws = S.sample_categorical(jax.random.key(1), jnp.broadcast_to(logits, (100000, 5)),
                                     gumbel=gumbel)
        counts = np.bincount(np.asarray(draws), minlength=5)
        probs = np.exp(np.asarray(logits, np.float64))
        assert chisquare(counts, probs / probs.sum() * 1e5).pvalue > 1e-3
    hot = S.sample_categorical(jax.random.key(2), jnp.broadcast_to(logits, (20000, 5)),
                               temperature=0.5)
    frac = np.mean(np.asarray(hot) == 0)
    assert abs(frac - 0.36 / np.sum(np.array([0.6, 0.25, 0.1, 0.045, 0.005]) ** 2)) < 0.015


def test_gumbel_float64():
    logits = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match="jax_enable_x64"):
        S.sample_categorical(jax.random.key(0), logits, gumbel="float64")
    with jax.enable_x64(True):
        x = S.sample_categorical(jax.random.key(0), jnp.zeros((2000, 3)), gumbel="float64")
        counts = np.bincount(np.asarray(x), minlength=3)
        assert chisquare(counts).pvalue > 1e-3


def test_bad_inputs():
    p = MaskedProcess(V)
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 1, got 0"):
        MaskedProcess(0)
    with pytest.raises(ValueError, match="unknown schedule 'cos'"):
        UniformProcess(3, "cos")
    with pytest.raises(ValueError, match="id 7 is outside \\[0, 3\\)"):
        check_tokens(np.array([[0, 7]]), 3, allow_mask=False)
    with pytest.raises(ValueError, match="id -1 is outside \\[0, 3\\]"):
        check_tokens(np.array([[0, -1]]), 3, allow_mask=True)
    with pytest.raises(ValueError, match="x0: mask id 3 is not allowed"):
        p.nelbo(ideal_masked, np.array([[0, 3, 1]]), jax.random.key(0))
    with pytest.raises(ValueError, match="tokens: id 9 is outside"):
        p.bits_per_token(ideal_masked, np.array([[0, 9, 1]]), jax.random.key(0))
    with pytest.raises(ValueError, match="estimator='tim' is unknown for MaskedProcess; "
                                         "allowed: count, time"):
        p.nelbo(ideal_masked, X, jax.random.key(0), estimator="tim")
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 0"):
        p.nelbo(ideal_masked, X, jax.random.key(0), num_samples=0)
    with pytest.raises(ValueError, match="unknown gumbel 'f32'"):
        S.sample_categorical(jax.random.key(0), jnp.zeros((2, 3)), gumbel="f32")
    with pytest.raises(ValueError, match="temperature must be a number >= 0, got -1"):
        S.sample_categorical(jax.random.key(0), jnp.zeros((2, 3)), temperature=-1)
    kw = dict(batch=1, length=6)
    with pytest.raises(ValueError, match="length 6 is not divisible by block_size 4"):
        S.block_decoding(ideal_masked, p, jax.random.key(0), block_size=4, steps_per_block=1,
                         **kw)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        S.ancestral(ideal_masked, p, jax.random.key(0), steps=0, **kw)
    with pytest.raises(ValueError, match="unknown by 'conf'"):
        S.confidence_decoding(ideal_masked, p, jax.random.key(0), steps=2, by="conf", **kw)
    with pytest.raises(ValueError, match="x_init: id 4 is outside \\[0, 3\\]"):
        S.first_hitting(ideal_masked, p, jax.random.key(0), x_init=np.array([[4] * 6]), **kw)
    with pytest.raises(ValueError, match="x_init must have shape \\(1, 6\\)"):
        S.first_hitting(ideal_masked, p, jax.random.key(0), x_init=np.zeros((1, 5)), **kw)
    with pytest.raises(ValueError, match="process must be a MaskedProcess, got UniformProcess"):
        S.first_hitting(ideal_masked, UniformProcess(3), jax.random.key(0), **kw)


def test_uniform_ancestral_draws_the_joint():
    """The uniform-noise reverse process with the ideal per-token posteriors: exact as the steps
    grow (each step changes one token at most, to first order); 400 steps here."""
    n, p = 4000, UniformProcess(V, "linear")
    run = jax.jit(lambda k: S.uniform_ancestral(ideal_uniform(p), p, k, batch=n, length=L,
                                                steps=400))
    x, nfe = run(jax.random.key(6))
    assert int(nfe) == 400 and chisquare(histogram(x), P * n).pvalue > 1e-3
    # a model that ignores the data (uniform logits) draws uniform sequences instead
    flat = jax.jit(lambda k: S.uniform_ancestral(lambda xt, t: jnp.zeros(xt.shape + (V,)), p,
                                                 k, batch=n, length=L, steps=50))(
        jax.random.key(7))[0]
    assert chisquare(histogram(flat), np.full(len(X), n / len(X))).pvalue > 1e-3
    assert chisquare(histogram(flat), P * n).pvalue < 1e-6
    with pytest.raises(ValueError, match="process must be a UniformProcess, got MaskedProcess"):
        S.uniform_ancestral(ideal_masked, MaskedProcess(V), jax.random.key(0), batch=1,
                            length=L, steps=2)


@pytest.mark.parametrize("steps", [1000, 999])
def test_ancestral_fills_every_mask_for_any_step_count(steps):
    """1000 * float32(1/1000) rounds above 1: the grid must still end at t = 0 exactly."""
    p = MaskedProcess(7)
    x, nfe = jax.jit(lambda k: S.ancestral(toy_denoiser7, p, k, batch=2, length=16,
                                           steps=steps, cache=False))(jax.random.key(2))
    assert int((x == 7).sum()) == 0 and int(x.max()) < 7 and int(nfe) == steps


def toy_denoiser7(xt, t):
    return jnp.sin(jnp.arange(7.0) + xt[..., None])
