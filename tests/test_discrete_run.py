"""Token runs through `jaxdiff train` / `jaxdiff sample` (jaxdiff.cli.discrete) and the token
network (`TokenTransformer`): masked diffusion and the autoregressive baseline on the digits as
tokens and on Shakespeare's characters, their reports, and their one-line config errors."""

import json
import os
import re
import runpy

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdiff.cli import build, validate
from jaxdiff.models import TokenTransformer
from jaxdiff.models.token_transformer import check_tokens
from tests._cli import here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.hidden_size=32", "--config.model.depth=1", "--config.model.num_heads=2",
        "--config.data.batch_size=8", "--config.optim.warmup_steps=1", "--config.train.steps=3",
        "--config.train.log_every=1", "--config.train.ckpt_every=3",
        "--config.train.num_samples=10"]


def config(name, variant="masked"):
    return runpy.run_path(os.path.join(ROOT, "configs", f"{name}.py"))["get_config"](variant)


@pytest.mark.parametrize("name,variant", [(n, v) for n in ("digits_tokens", "shakespeare")
                                          for v in ("masked", "ar", "uniform")])
def test_shipped_configs_check_and_build(name, variant):
    c = config(name, variant)
    validate.check_config(c)
    model = build.model(c)
    info = build.data_info(c)
    assert model.vocab_size == info["vocab_size"] and model.seq_len == info["shape"][0]
    assert model.causal == (variant == "ar")
    assert model.time_conditioning == (variant == "uniform")
    assert (build.process(c) is None) == (variant == "ar")


def _params(model, x, y=None, seed=0):
    v = model.init(jax.random.PRNGKey(seed), x, jnp.zeros(len(x)), y)
    # the final layer starts at zero (uniform logits): perturb so that outputs depend on inputs
    return jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(1), a.shape),
                        v)


def test_causal_network_sees_only_earlier_tokens_and_bidirectional_sees_all():
    x = jnp.array([[0, 1, 2, 3, 4, 0], [4, 3, 2, 1, 0, 1]], jnp.int32)
    y = jnp.array([0, 1])
    for causal in (True, False):
        m = TokenTransformer(vocab_size=5, seq_len=8, hidden_size=16, depth=2, num_heads=2,
                             num_classes=2, causal=causal)
        v = _params(m, x, y)
        out = m.apply(v, x, None, y)
        assert out.shape == (2, 6, 5) and out.dtype == jnp.float32
        changed = jnp.abs(m.apply(v, x.at[:, 3].set(2), None, y) - out).max(axis=(0, 2))
        if causal:  # logits[:, i] is p(x_i | x_<i): position 3 moves only positions 4, 5
            assert np.all(np.asarray(changed[:4]) == 0) and np.all(changed[4:] > 1e-4)
        else:
            assert np.all(changed > 1e-4)
        other = m.apply(v, x, None, jnp.array([1, 0]))  # the label conditions every position
        assert np.all(np.abs(np.asarray(other - out)).max(axis=(0, 2)) > 1e-4)


def test_token_network_bad_input_is_one_line():
    m = TokenTransformer(vocab_size=5, seq_len=4, hidden_size=16, depth=1, num_heads=2)
    x = jnp.zeros((1, 4), jnp.int32)
    v = m.init(jax.random.PRNGKey(0), x)
    for bad, msg in ((x.at[0, 1].set(6), "tokens: id 6 is outside [0, 5] (5 = mask id)"),
                     (x.at[0, 0].set(-1), "tokens: id -1 is outside"),
                     (jnp.zeros((1, 5), jnp.int32), "length 5, longer than the model's "
                                                     "seq_len=4")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            m.apply(v, bad)
    with pytest.raises(ValueError, match="tokens must be integer token ids, got dtype float32"):
        check_tokens(jnp.zeros((1, 4)), 5, allow_mask=True)
    causal = TokenTransformer(vocab_size=5, seq_len=4, hidden_size=16, depth=1, num_heads=2,
                              causal=True)
    with pytest.raises(ValueError, match=r"tokens: mask id 5 is not allowed here"):
        causal.apply(causal.init(jax.random.PRNGKey(0), x), x.at[0, 2].set(5))


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """A 3-step masked run and a 3-step autoregressive run on the digits as tokens."""
    root = tmp_path_factory.mktemp("tokens")
    runs = {}
    for variant in ("masked", "ar"):
        workdir = root / variant
        code, err = here(None, "train", f"--config=configs/digits_tokens.py:{variant}", *TINY,
                         f"--workdir={workdir}")
        assert code in (0, None), err[-2000:]
        runs[variant] = str(workdir)
    return runs


@pytest.mark.parametrize("variant", ["masked", "ar"])
def test_digits_token_run_reports_and_samples(digits_runs, variant, tmp_path, capfd):
    workdir = digits_runs[variant]
    report = json.load(open(os.path.join(workdir, "report.json")))
    assert report["step"] == 3 and report["num_samples"] == 10
    assert report["process"] == ("autoregressive" if variant == "ar" else "masked")
    assert report["nfe"] == 64  # first-hitting / AR: one call per token
    # an untrained model is near uniform over 17 levels: log2(17) = 4.09 bits per token
    assert 3.0 < report["bits_per_token"] < 6.0 and 0 < report["bits_per_token_se"] < 0.5
    assert report["bits_per_token_split"] == "test"
    assert 0 <= report["classifier_agreement"] <= 1 and report["fd"] > 0
    assert 0 < report["sample_unigram_entropy_bits"] <= np.log2(17) + 1e-6
    grid = Image.open(os.path.join(workdir, "samples", "step_0000003.png"))
    assert grid.size[0] > grid.size[1] > 0  # 10 columns (one per digit) over 1 row
    rows = [json.loads(r) for r in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["bpt"] == pytest.approx(r["loss"] / np.log(2), rel=1e-5) for r in rows)
    out = tmp_path / "s.png"
    code, err = here(capfd, "sample", f"--workdir={workdir}", f"--out={out}", "--num=7",
                     "--class=3")
    assert code in (0, None), err
    z = np.load(tmp_path / "s.npz")
    assert z["tokens"].shape == (7, 64) and z["tokens"].min() >= 0 and z["tokens"].max() <= 16
    assert (z["labels"] == 3).all() and os.path.exists(out)


def test_text_run_writes_text_samples(tmp_path, capfd):
    workdir = tmp_path / "ar"
    code, err = here(None, "train", "--config=configs/shakespeare.py:ar", *TINY,
                     "--config.train.num_samples=2", f"--workdir={workdir}")
    assert code in (0, None), err[-2000:]
    text = open(workdir / "samples" / "step_0000003.txt").read()
    assert text.count("--- sample") == 2
    report = json.load(open(workdir / "report.json"))
    # near uniform over the 78 characters: log2(78) = 6.3 bits
    assert 5.0 < report["bits_per_token"] < 7.5 and report["bits_per_token_split"] == "validation"
    assert "fd" not in report and "classifier_agreement" not in report
    code, err = here(capfd, "sample", f"--workdir={workdir}", f"--out={tmp_path / 's.txt'}",
                     "--num=3")
    assert code in (0, None), err
    assert open(tmp_path / "s.txt").read().count("--- sample") == 3
    assert np.load(tmp_path / "s.npz")["tokens"].shape == (3, 128)
    code, err = here(capfd, "sample", f"--workdir={workdir}", f"--out={tmp_path / 's.png'}")
    assert code == 1 and ("s.png: this run's samples are .txt files (text); allowed: a name "
                          "ending in .txt") in err


@pytest.mark.parametrize("key,value,msg", [
    ("data.name", "digits", "process.name='masked' is a token process; data.name='digits' holds "
                            "images or vectors"),
    ("model.name", "dit", "model.name='dit' cannot take the tokens of data.name="
                          "'digits_tokens'; allowed: 'token_transformer'"),
    ("model.seq_len", 64, "model.seq_len is set by the run"),
    ("sampler.name", "dpmpp_2m", "sampler.name='dpmpp_2m' is unknown for process.name='masked'"),
    ("sampler.options", {"nope": 1}, "sampler.options.nope is not an option of sampler "
                                     "'first_hitting'"),
    ("process.schedule", "sqrt", "schedule='sqrt'"),
    ("process.eps", 0.1, "process.eps is not a setting of process.name='masked'"),
    ("loss.prediction", "eps", "loss.prediction is not a config key; allowed in loss: "
                               "p_uncond"),
    ("model.num_classes", 3, "model.num_classes=3 does not match the 10 classes"),
    ("loss.estimator", "bogus", "loss.estimator='bogus' does not apply to process.name="
                                "'masked'; allowed: count, time"),
])
def test_bad_token_configs_are_one_line(key, value, msg):
    c = config("digits_tokens")
    section, name = key.split(".")
    with c.unlocked():
        c[section][name] = value
    with pytest.raises(ValueError, match=None) as e:
        validate.check_config(c)
    assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_autoregressive_run_takes_only_its_sampler_and_no_estimator():
    c = config("shakespeare", "ar")
    with c.unlocked():
        c.loss.estimator = "count"
    with pytest.raises(ValueError, match="loss.estimator='count' does not apply to process.name="
                                         r"'autoregressive'; allowed: None \(the exact"):
        validate.check_config(c)
    del c.loss["estimator"]
    c.sampler.name = "first_hitting"
    with pytest.raises(ValueError, match="sampler.name='first_hitting': process.name="
                                         "'autoregressive' samples one token per call"):
        validate.check_config(c)


@pytest.mark.parametrize("kind", ["masked-time", "masked-count", "uniform", "ar"])
def test_objectives_give_finite_losses_and_gradients(kind):
    from jaxdiff.discrete import MaskedProcess, UniformProcess, objectives

    V, L = 6, 8
    m = TokenTransformer(vocab_size=V, seq_len=L, hidden_size=16, depth=1, num_heads=2,
                         causal=kind == "ar", time_conditioning=kind == "uniform")
    x = jax.random.randint(jax.random.key(0), (4, L), 0, V)
    params = m.init(jax.random.PRNGKey(0), x, jnp.zeros(4))["params"]
    if kind == "ar":
        obj = objectives.autoregressive_objective(m)
    else:
        process = UniformProcess(V) if kind == "uniform" else MaskedProcess(V)
        obj = objectives.diffusion_objective(m, process, estimator=kind.split("-")[-1]
                                             if kind != "uniform" else "time")
    (loss, aux), grads = jax.value_and_grad(obj, has_aux=True)(params, {"x": x},
                                                               jax.random.key(1))
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert float(aux["bpt"]) == pytest.approx(float(loss) / np.log(2))
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0
    if kind == "ar":  # zero-initialised output: uniform predictions, log(V) nats per token
        assert float(loss) == pytest.approx(np.log(V), rel=1e-5)


def test_sincos_positions_are_fixed_and_bad_choice_is_one_line():
    from jaxdiff.models.token_transformer import sincos_pos_embed_1d

    pe = sincos_pos_embed_1d(8, 5)
    assert pe.shape == (5, 8) and np.allclose(pe[0], [0, 0, 0, 0, 1, 1, 1, 1])
    assert np.allclose(pe[:, :4] ** 2 + pe[:, 4:] ** 2, 1.0)
    x = jnp.zeros((1, 4), jnp.int32)
    m = TokenTransformer(vocab_size=5, seq_len=4, hidden_size=8, depth=1, num_heads=2,
                         pos_embed="sincos")
    params = m.init(jax.random.PRNGKey(0), x)["params"]
    assert "pos_embed" not in params and m.apply({"params": params}, x).shape == (1, 4, 5)
    bad = TokenTransformer(vocab_size=5, seq_len=4, hidden_size=8, depth=1, num_heads=2,
                           pos_embed="alibi")
    with pytest.raises(ValueError, match="pos_embed='alibi' is unknown; allowed: learned, sincos, "
                                         "rope"):
        bad.init(jax.random.PRNGKey(0), x)


def test_rotary_positions_are_relative_and_keep_the_causal_mask():
    from jaxdiff.models.layers import MultiHeadAttention, apply_rope, rope_tables

    cos, sin = rope_tables(12, 8)
    q, k = jax.random.normal(jax.random.PRNGKey(0), (2, 8))
    rot = lambda a: apply_rope(jnp.broadcast_to(a, (1, 12, 1, 8)), cos, sin)[0, :, 0]  # noqa
    rq, rk = rot(q), rot(k)
    assert np.allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q), rtol=1e-5)
    assert np.allclose(rq[0], q) and np.allclose(rk[0], k)  # position 0: no rotation
    dots = np.asarray(rq @ rk.T)  # q at position i, k at j: a function of i - j alone
    for d in (-3, 0, 2, 5):
        diag = np.diagonal(dots, offset=-d)
        assert np.allclose(diag, diag[0], atol=1e-4)
    assert not np.isclose(dots[3, 1], dots[1, 3])
    x = jnp.zeros((1, 4, 8))
    mha = MultiHeadAttention(2)
    v = mha.init(jax.random.PRNGKey(0), x, x)
    with pytest.raises(ValueError, match="rope.*self-attention only"):
        mha.apply(v, x, x, rope=rope_tables(4, 4))
    # the token network with rotary positions has no position table and stays causal
    xs = jnp.array([[0, 1, 2, 3, 4, 0]], jnp.int32)
    for causal in (True, False):
        m = TokenTransformer(vocab_size=5, seq_len=8, hidden_size=16, depth=2, num_heads=2,
                             pos_embed="rope", causal=causal)
        v = _params(m, xs)
        assert "pos_embed" not in v["params"]
        out = m.apply(v, xs)
        changed = jnp.abs(m.apply(v, xs.at[:, 3].set(2)) - out).max(axis=(0, 2))
        assert (np.all(np.asarray(changed[:4]) == 0) if causal else changed[0] > 1e-4)
        assert np.all(changed[4:] > 1e-4)
        # a token's identity at another position changes the logits: positions are seen
        swapped = m.apply(v, xs.at[:, 1].set(2).at[:, 2].set(1))
        assert float(jnp.abs(swapped[:, 5] - out[:, 5]).max()) > 1e-4


def test_time_agnostic_network_gates_learn_through_their_weights():
    """A time-agnostic model's adaLN input is a learned constant (the time embedder at t = 0),
    not zero: the adaLN-Zero modulation weights get gradient from the first step (with a zero
    input only their biases would, and the blocks stay near identity in a short run), and the
    output does not depend on t."""
    V, L = 5, 6
    m = TokenTransformer(vocab_size=V, seq_len=L, hidden_size=16, depth=1, num_heads=2)
    x = jax.random.randint(jax.random.PRNGKey(1), (2, L), 0, V + 1)
    params = flax.linen.meta.unbox(m.init(jax.random.PRNGKey(0), x)["params"])

    def loss(p):
        return -jax.nn.log_softmax(m.apply({"params": p}, x))[..., 0].mean()

    # one step first: at init the zero output layer hides the blocks from the loss
    p1 = jax.tree.map(lambda a, b: a - 0.1 * b, params, jax.grad(loss)(params))
    kernel = jax.grad(loss)(p1)["blocks.0"]["adaLN_modulation.1"]["kernel"]
    assert float(jnp.abs(kernel).max()) > 1e-6  # gates/shift/scale learn through the weights
    a = m.apply({"params": p1}, x, jnp.full((2,), 0.9))
    b = m.apply({"params": p1}, x, jnp.full((2,), 0.1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_zero_adaln_input_learns_through_biases_only_and_bad_choice_is_one_line():
    V, L = 5, 6
    x = jax.random.randint(jax.random.PRNGKey(1), (2, L), 0, V + 1)
    m = TokenTransformer(vocab_size=V, seq_len=L, hidden_size=16, depth=1, num_heads=2,
                         adaln_input="zero")
    params = flax.linen.meta.unbox(m.init(jax.random.PRNGKey(0), x)["params"])
    assert "t_embedder" not in params

    def loss(p):
        return -jax.nn.log_softmax(m.apply({"params": p}, x))[..., 0].mean()

    p1 = jax.tree.map(lambda a, b: a - 0.1 * b, params, jax.grad(loss)(params))
    g = jax.grad(loss)(p1)["blocks.0"]["adaLN_modulation.1"]
    assert float(jnp.abs(g["kernel"]).max()) == 0.0 and float(jnp.abs(g["bias"]).max()) > 1e-6
    bad = TokenTransformer(vocab_size=V, seq_len=L, hidden_size=16, depth=1, num_heads=2,
                           adaln_input="time")
    with pytest.raises(ValueError, match="adaln_input='time' is unknown; allowed: constant, zero"):
        bad.init(jax.random.PRNGKey(0), x)
