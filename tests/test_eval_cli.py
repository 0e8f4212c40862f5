"""`jaxdiff eval`, `jaxdiff eval sweep`, `jaxdiff plot` and the built-in digits feature network."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.core import analytic, likelihood
from jaxdiff.core.denoiser import denoiser, model_from_denoiser
from jaxdiff.core.process import EDM
from jaxdiff.eval import digits, metrics, plots, quality, train_digits
from tests import _runs
from tests._cli import fast_compile, here
from tests._cli import main as _main

# the session's digits run read in this process: programs another module compiled for it
# are read back from the session's compilation cache (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("compiled_once")


@pytest.fixture(scope="module")
def run(digits_run):
    """The session's tiny digits run (tests/conftest.py): 2 steps, logged every step."""
    return digits_run


@pytest.fixture(scope="module")
def cli_env(cli_env):
    """tests/conftest.py's environment (a compilation cache for this module), compiling fast."""
    return fast_compile(cli_env)


def test_eval_writes_fd_pr_nll_report(run, tmp_path, capfd):
    """In this process (tests/_cli.py `here`), as the sweep below: eval only reads the run."""
    path = tmp_path / "report.json"
    code, err = here(capfd, "eval", f"--workdir={run}", "--metrics=fd,pr,nll", "--sampler=heun",
                     "--steps=3", "--num=20", "--divergence=hutchinson", f"--out={path}")
    assert code in (0, None), err[-2000:]
    r = json.load(open(path))
    assert (r["step"], r["sampler"], r["steps"], r["num_samples"]) == (2, "heun", 3, 20)
    assert r["nfe"] == 5  # heun: 2 per step, 1 for the last step to sigma = 0
    assert r["features"] == "digits" and r["split"] == "test" and r["num_real"] == 200
    # a 2-step model makes blobs: further from the test digits than 20 real training digits are
    assert r["fd"] > r["fd_real"] + 3 * r["fd_real_std"] > 0  # measured 45.9 and 14.4 ± 1.0
    assert r["num_train_pool"] == 80 and r["fd_real_draws"] == 10 and r["fd_real_balanced"]
    assert 0 < r["fd_real_std_err"] < r["fd_real_std"]
    assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["precision"] < 0.5
    assert 0 <= r["classifier_agreement"] <= 1
    # untrained model on 8-bit data: bits/dim positive, finite, below 8-bit noise + a margin
    assert r["nll_examples"] == 20 and r["divergence"] == "hutchinson"
    assert 0 < r["bpd"] < 30 and np.isfinite(r["bpd_std_err"])


def test_sweep_writes_table_plot_and_counts_nfe(run, tmp_path, capfd):
    prefix = tmp_path / "sweep"
    code, err = here(capfd, "eval", "sweep", f"--workdir={run}", "--samplers=ddim,heun",
                     "--steps=1,3", "--num=20", f"--out={prefix}")
    assert code in (0, None), err[-2000:]
    rows = json.load(open(f"{prefix}.json"))["rows"]
    nfe = {(r["sampler"], r["steps"]): r["nfe"] for r in rows}
    assert nfe == {("ddim", 1): 1, ("ddim", 3): 3, ("heun", 1): 1, ("heun", 3): 5}
    assert all(r["fd"] > 0 and 0 <= r["precision"] <= 1 for r in rows)
    table = open(f"{prefix}.md").read().splitlines()
    assert table[0] == "| sampler | 1 steps | 3 steps |"
    assert table[2].startswith("| ddim | ") and table[3].startswith("| heun | ")
    assert table[3].endswith(" (5) |")
    assert table[-1].startswith("Real data: 20 training examples with the samples' class "
                                "balance score FD ")
    assert open(f"{prefix}.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_writes_training_curves(run, tmp_path):
    png = tmp_path / "curves.png"
    code, errors = _main("plot", f"--workdir={run}", f"--out={png}")
    assert code == 0 and not errors, errors
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    from jaxdiff.eval import plots

    rows = plots.read_metrics_log(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and "loss" in rows[0]


def test_plot_skips_damaged_log_lines(run, tmp_path):
    """A run killed mid-write leaves a half-written last line; a resumed run appends to it."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    work = tmp_path / "w"
    work.mkdir()
    (work / "config.json").write_text((run / "config.json").read_text())
    log, png = work / "metrics.jsonl", tmp_path / "curves.png"
    log.write_text(lines[0] + "\n" + lines[1][:20] + "\x00\x00\n" + "[1, 2]\n"
                   + lines[1][:30])
    code, errors = _main("plot", f"--workdir={work}", f"--out={png}")
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    want = f"jaxdiff plot: warning: {log}: skipped 3 damaged lines (2, 3, 4; first: not JSON ("
    assert len(errors) == 1 and errors[0].startswith(want), errors

    from jaxdiff.eval import plots

    log.write_text(lines[0] + "\n" + lines[1][:25] + lines[1] + "\n")  # resumed after a kill
    assert [r["step"] for r in plots.read_metrics_log(log)] == [1, 2]  # no warning
    log.write_text("\n" + lines[0][:25] + "\n")
    code, errors = _main("plot", f"--workdir={work}", f"--out={png}")
    assert code == 1 and len(errors) == 1, errors
    assert errors[0].startswith(f"jaxdiff plot: error: {log}, line 2: not JSON (")
    assert errors[0].endswith("); the log holds no readable step")


BAD = [
    (["eval", "W", "--metrics=fd,is"], "--metrics=fd,is: 'is' is not a valid name; allowed: "
     "fd, pr, nll"),
    (["eval", "W", "--metrics=fd,fd"], "--metrics=fd,fd: a name is repeated"),
    (["eval", "W", "--steps=5,10"], "--steps=5,10 must be a positive integer"),
    (["eval", "W", "--steps=0"], "--steps=0 must be a positive integer"),
    (["eval", "sweep", "W", "--samplers=ddim", "--steps=5,x"],
     "--steps=5,x must be a comma-separated list of positive integers"),
    (["eval", "sweep", "W", "--samplers=ddim,,heun"], "--samplers=ddim,,heun: '' is not a valid"),
    (["eval", "sweep", "W", "--steps=5"], "eval sweep needs --samplers=<a,b,...>"),
    (["eval", "sweep", "W", "--samplers=ddim", "--metrics=nll"], "--metrics=nll does not depend"),
    (["eval", "W", "--features=clip"], "--features=clip: 'clip' is not a valid name; allowed: "
     "digits, inception, raw"),
    (["eval", "W", "--num=0"], "--num=0 must be a positive number of samples"),
    (["eval", "swep", "W"], "unexpected argument 'swep': eval takes flags only (its one "
     "sub-command is sweep)"),
    (["eval", "W", "--divergence=trace"], "--divergence=trace: 'trace' is not a valid name"),
    (["eval"], "eval needs --workdir=<dir> of a trained run"),
    (["plot", "W"], "no trained run in "),
    # these read the trained run's config first
    (["eval", "sweep", "R", "--samplers=ddim,nope"], "--samplers=ddim,nope: 'nope' is not a "
     "valid name; allowed: "),
    (["eval", "sweep", "R", "--samplers=heun,ode"], "--samplers: 'ode' is adaptive"),
    (["eval", "R", "--sampler=fast"], "--sampler=fast: 'fast' is not a valid name; allowed: "),
    (["eval", "R", "--metrics=fd", "--features=inception"], "--features=inception needs "
     "--inception_weights"),
]


@pytest.mark.parametrize("args,msg", BAD)
def test_bad_eval_input_is_one_line(run, tmp_path, args, msg):
    where = {"W": f"--workdir={tmp_path / 'w'}", "R": f"--workdir={run}"}
    code, errors = _main(*[where.get(a, a) for a in args])
    assert code != 0 and len(errors) == 1 and msg in errors[0], errors
    command = "eval sweep" if args[1:2] == ["sweep"] else args[0]
    assert errors[0].startswith(f"jaxdiff {command}: error: ")


def test_bad_input_from_the_shell_is_one_line(tmp_path, cli_env):
    out = _runs.cli(cli_env, "eval", "sweep", f"--workdir={tmp_path}", "--samplers=ddim",
                    "--steps=5,-1")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip() == ("jaxdiff eval sweep: error: --steps=5,-1 must be a "
                                  "comma-separated list of positive integers, e.g. 5,10,20,50")


@pytest.fixture(scope="module")
def split():
    return train_digits.load_split()


def test_feature_net_classifies_held_out_digits(split):
    x, y = split["test"]
    acc, per_class = digits.agreement(x, y)
    assert acc >= 0.97  # measured 0.995 on the 200 held-out test digits
    assert min(per_class.values()) >= 0.85 and len(per_class) == 10
    assert digits.load()[1]["test_accuracy"] == pytest.approx(acc)
    assert os.path.getsize(digits.WEIGHTS) < 1_000_000
    # 16x16 digits are pooled to 8x8: a 2x nearest-neighbour upsampling reads the same
    big = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(digits.features(big), digits.features(x), atol=1e-5)
    assert digits.features(x).shape == (200, 64) and digits.logits(x).shape == (200, 10)


def test_fd_separates_real_from_noise(split):
    test, train = digits.features(split["test"][0]), split["train"][0]
    rng = np.random.default_rng(0)
    fd_real = metrics.frechet_distance(test, digits.features(train[:1000]))  # train: 1597
    fd_noise = metrics.frechet_distance(test, digits.features(rng.uniform(-1, 1, (1000, 8, 8, 1))))
    x = train[:1000]
    blurred = 0.5 * x + 0.25 * (np.roll(x, 1, axis=1) + np.roll(x, 1, axis=2))  # a smeared digit
    fd_blur = metrics.frechet_distance(test, digits.features(blurred))
    assert fd_real < 2.5 and fd_noise > 25  # measured 1.77 and 37.1
    assert fd_real < fd_blur < fd_noise


def test_real_fd_matches_count_and_class_balance(split):
    """FD grows as the sample count falls, and an even class balance lowers it: one set of 100
    training digits (the first) scores 6.4 against the test digits, class-balanced draws of 100
    (as a class-conditional model's samples are) 3.8 ± 0.3. Each draw has the classes' counts;
    with fewer examples of a class than asked for it is drawn with replacement."""
    (x, y), test = split["train"], digits.features(split["test"][0])
    feats = digits.features(x)
    first = metrics.frechet_distance(feats[:100], test)
    counts = np.bincount(np.arange(100) % 10, minlength=10)
    r = quality.real_fd(feats, test, num=100, train_labels=y, class_counts=counts, seed=1)
    assert first > r["fd_real"] + 2 * r["fd_real_std"]  # measured 6.39 and 3.80 ± 0.28
    assert r == quality.real_fd(feats, test, num=100, train_labels=y, class_counts=counts,
                                seed=1)
    assert not r["fd_real_replace"] and r["fd_real_std_err"] == pytest.approx(
        r["fd_real_std"] / np.sqrt(10))
    unbalanced = quality.real_fd(feats, test, num=100, seed=1)
    assert unbalanced["fd_real"] > r["fd_real"]  # measured 4.12 ± 0.73 and 3.80
    big = quality.real_fd(feats, test, num=1000, train_labels=y, class_counts=counts * 10)
    assert big["fd_real"] < r["fd_real"] and not big["fd_real_replace"]  # 1.57 ± 0.04
    assert np.bincount(y[:50], minlength=10).min() == 4  # 5 of a class: with replacement
    few = quality.real_fd(feats[:50], test, num=50, train_labels=y[:50],
                          class_counts=np.full(10, 5), draws=3)
    assert few["fd_real_replace"] and few["fd_real_draws"] == 3
    with pytest.raises(ValueError, match="class_counts add up to 20, not num=30"):
        quality.real_fd(feats, test, num=30, train_labels=y, class_counts=np.full(10, 2))


def test_bits_per_dim_batches_match_closed_form():
    """N(0, s^2 I) data with its exact denoiser: the model density at sigma_min is
    N(0, (s^2 + sigma_min^2) I) (`jaxdiff.core.likelihood`); batching with a padded last batch
    and the exact divergence ("auto" in 2-D) reproduce it per example."""
    s, process = 0.7, EDM(t_min=0.01, t_max=20.0)
    net = model_from_denoiser(analytic.gaussian_denoiser(0.0, s), process, "edm")
    x = np.random.default_rng(0).normal(0, s, (7, 2)).astype(np.float32)
    bpd = quality.batched_bits_per_dim(net, process, "edm", x, key=jax.random.key(0),
                                       quantized=False, divergence="auto", batch=3)
    assert likelihood.resolve_divergence("auto", (2,)) == "exact"
    assert likelihood.resolve_divergence("auto", (8, 8, 1)) == "hutchinson"
    D = denoiser(net, process, "edm")
    whole = likelihood.bits_per_dim(D, jnp.asarray(x), sigma_min=0.01, sigma_max=20.0,
                                    divergence="exact")
    np.testing.assert_allclose(bpd, whole, atol=1e-4)  # adaptive steps differ per batch
    logp = analytic.gaussian_log_density(jnp.asarray(x), 0.01, 0.0, s)  # the prior's error:
    np.testing.assert_allclose(bpd, -np.asarray(logp) / (2 * np.log(2)), atol=3e-3)  # 1.6e-3
    assert quality.count_nfe(process, "edm", sampler="dpmpp_3m", steps=7, shape=(2,)) == 7
    assert quality.count_nfe(process, "edm", sampler="ode", steps=7, shape=(2,)) is None


def test_library_errors_name_the_librarys_arguments(tmp_path):
    """eval's functions name their own arguments; only the CLI speaks of flags."""
    cases = [(lambda: quality.feature_fn("clip"), r"^features='clip' is unknown; allowed: "),
             (lambda: quality.feature_fn("inception"), r"^features='inception' needs "
              r"inception_weights=<\.pth or \.npz file>"),
             (lambda: plots.read_metrics_log(str(tmp_path / "metrics.jsonl")),
              r"^no training log \S+metrics\.jsonl$")]
    for call, match in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
            call()
        assert "--" not in str(e.value)


def test_which_features_and_classifier_judge_a_dataset():
    """One place says how a dataset's samples are judged: the digits network's features and
    its classifier for the digits, the data itself for 2-D toy sets, Inception for images."""
    assert [quality.default_features(n) for n in ("digits", "digits16", "moons", "cifar10")] == [
        "digits", "digits", "raw", "inception"]
    assert quality.classifier_agreement_fn("digits16") is digits.agreement
    assert quality.classifier_agreement_fn("moons") is None
    assert quality.classifier_agreement_fn("cifar10") is None
