"""Learned few-step solvers (jaxdiff.core.solver_fit, samplers/learned.py): the base table is a
known solver, a fit generalises to held-out noise, the solver file round-trips and refuses bad
input, and `jaxdiff.sample` runs it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.core import analytic, schedules
from jaxdiff.core import solver_fit as sf
from jaxdiff.core.denoiser import model_from_denoiser
from jaxdiff.core.process import EDM, DiscreteVP
from jaxdiff.samplers import SAMPLERS

MEANS = np.array([[-1.0, 0.5], [1.0, -0.5], [0.2, 1.0]])
STDS = np.array([0.1, 0.2, 0.3])


def _gmm():
    return analytic.gmm_denoiser(MEANS, STDS, np.array([0.5, 0.3, 0.2]))


@pytest.fixture(scope="module")
def fitted():
    """A 4-step order-2 predictor-corrector solver fitted on 512 draws of a 2-D mixture (EDM
    levels), and held-out draws to score it on."""
    D = _gmm()
    with jax.enable_x64(True):
        def draws(seed, n):
            x = 80.0 * jax.random.normal(jax.random.key(seed), (n, 2), jnp.float64)
            return x, SAMPLERS["ode"](D, x, jnp.array([80.0, 0.0]), rtol=1e-9, atol=1e-9)

        (x_cal, r_cal), (x_test, r_test) = draws(0, 320), draws(1, 256)
        init = np.asarray(schedules.karras(EDM(), 4))
        solver = sf.fit_solver(D, x_cal, r_cal, init, order=2, sigma_floor=0.002, iters=40,
                               batch=256, eval_every=5, patience=100, process=EDM())
        yield dict(D=D, init=init, sigmas=np.asarray(solver["sigmas"]),
                   table=np.asarray(solver["coefficients"]),
                   corrector=np.asarray(solver["corrector"]), info=solver["fit"], solver=solver,
                   x=x_test, ref=r_test)


def _rmse(a, b):
    return float(jnp.sqrt(jnp.mean((a - b) ** 2)))


def test_base_table_is_ddim_and_dpmpp():
    grid = jnp.asarray(schedules.logsnr(DiscreteVP.linear(), 6), jnp.float32)
    x = 10.0 * jax.random.normal(jax.random.key(0), (8, 2))
    D = _gmm()
    ours = sf.run_solver(D, x, grid, sf.ei_coefficients(grid, 1))
    np.testing.assert_allclose(ours, SAMPLERS["ddim"](D, x, grid), atol=1e-5)
    # order 2 with the exact phi-integral: a + sum c = 1 and the same first step as DDIM
    table = np.asarray(sf.ei_coefficients(grid, 2))
    np.testing.assert_allclose(table.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(table[0], np.asarray(sf.ei_coefficients(grid, 1))[0].tolist()
                               + [0.0], atol=1e-7)
    assert table[-1].tolist() == [0.0, 1.0, 0.0]


def test_base_table_order_on_a_gaussian():
    """Halving the log-steps cuts the error ~4x at order 2, ~8x or more at order 3."""
    with jax.enable_x64(True):
        D = analytic.gaussian_denoiser(0.3, 0.5)
        x = jnp.full((1, 2), 80.0)
        exact = analytic.gaussian_ode(x, 80.0, 0.01, 0.3, 0.5)
        for order, gain in ((2, 3.5), (3, 7.0)):
            errs = []
            for n in (20, 40):
                g = jnp.exp(jnp.linspace(jnp.log(80.0), jnp.log(0.01), n + 1))
                errs.append(_rmse(sf.run_solver(D, x, g, sf.ei_coefficients(g, order)), exact))
            assert errs[0] / errs[1] > gain


def test_corrector_base_table_raises_the_order():
    """The corrector (the predictor's exponential integrator with the new D as one more node)
    adds one order at no extra model call: on a Gaussian, halving the log-steps cuts the error
    ~4x with an order-1 predictor (~2x without), ~8x with order 2; the first row is unused and
    every row keeps a + sum c = 1."""
    with jax.enable_x64(True):
        D = analytic.gaussian_denoiser(0.3, 0.5)
        x = jnp.full((1, 2), 80.0)
        exact = analytic.gaussian_ode(x, 80.0, 0.01, 0.3, 0.5)
        for order, gain in ((1, 3.5), (2, 7.0)):
            errs, plain = [], []
            for n in (20, 40):
                g = jnp.exp(jnp.linspace(jnp.log(80.0), jnp.log(0.01), n + 1))
                corr = sf.corrector_coefficients(g, order)
                assert corr.shape == (n, order + 2) and not np.any(corr[0])
                np.testing.assert_allclose(np.sum(corr[1:], 1), 1.0, atol=1e-12)
                table = sf.ei_coefficients(g, order)
                errs.append(_rmse(sf.run_solver(D, x, g, table, corrector=corr), exact))
                plain.append(_rmse(sf.run_solver(D, x, g, table), exact))
            assert errs[0] / errs[1] > gain, (order, errs)
            assert errs[1] < 0.5 * plain[1], (order, errs, plain)


def test_fit_generalises_to_held_out_noise(fitted):
    f = fitted
    with jax.enable_x64(True):
        base = sf.run_solver(f["D"], f["x"], jnp.asarray(f["init"]),
                             sf.ei_coefficients(jnp.asarray(f["init"]), 2))
        learned = sf.run_solver(f["D"], f["x"], jnp.asarray(f["sigmas"]), jnp.asarray(f["table"]),
                                corrector=jnp.asarray(f["corrector"]))
        before, after = _rmse(base, f["ref"]), _rmse(learned, f["ref"])
    assert after < 0.8 * before, (before, after)
    info = f["info"]
    assert info["validation_rmse"] < info["initial_validation_rmse"]
    assert f["sigmas"][0] == pytest.approx(80.0) and f["sigmas"][-1] == 0.0
    assert np.all(np.diff(f["sigmas"]) < 0) and f["sigmas"][-2] >= 0.002 * (1 - 1e-9)


def test_solver_file_round_trip_and_sample(fitted, tmp_path):
    f = fitted
    path = sf.save_solver(tmp_path / "s.json", f["solver"])
    solver = sf.load_solver(path)
    np.testing.assert_array_equal(solver["coefficients"], f["table"])
    np.testing.assert_array_equal(solver["corrector"], f["corrector"])
    np.testing.assert_array_equal(solver["sigmas"], f["sigmas"])
    assert solver["nfe"] == 4 and solver["order"] == 2 and solver["process"]["type"] == "EDM"
    with jax.enable_x64(True):
        model = model_from_denoiser(f["D"], EDM(), "x0")
        noise = f["x"][:16] / 80.0
        direct = sf.run_solver(f["D"], f["x"][:16], jnp.asarray(f["sigmas"]),
                               jnp.asarray(f["table"]), corrector=jnp.asarray(f["corrector"]))
        got = jaxdiff.sample(model, noise, process=EDM(), prediction="x0", sampler="learned",
                             sampler_file=str(path))
        np.testing.assert_allclose(got, direct, rtol=1e-9, atol=1e-9)
        again = jaxdiff.sample(model, noise, process=EDM(), prediction="x0", sampler="learned",
                               sampler_file=json.load(open(path)), steps=4)
        np.testing.assert_allclose(again, got, rtol=1e-12)
        # another table of the same order and capacity: the same compiled program
        before = jaxdiff.sampling.trace_count("learned")
        other = sf.solver_dict(f["sigmas"], np.asarray(f["table"]) * 1.01, EDM(),
                               corrector=f["corrector"])
        jaxdiff.sample(model, noise, process=EDM(), prediction="x0", sampler="learned",
                       sampler_file=other)
        assert jaxdiff.sampling.trace_count("learned") == before


def _good():
    return sf.solver_dict([80.0, 1.0, 0.0], [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], EDM())


@pytest.mark.parametrize("change, message", [
    (dict(format="x"), "format='x'"),
    (dict(version=7), "version=7"),
    (dict(nfe=3), "sigmas has shape (3,), nfe=3"),
    (dict(sigmas=[80.0, 90.0, 0.0]), "strictly decreasing"),
    (dict(coefficients=[[0.5, 0.5, 0.0]]), "coefficients has shape (1, 3)"),
    (dict(coefficients=[[0.5, float("nan"), 0.0], [0.0, 1.0, 0.0]]), "must be finite"),
    (dict(order=5), "order=5"),
    (dict(corrector=[[0.0] * 4]), "corrector has shape (1, 4)"),
])
def test_bad_solver_files(change, message):
    bad = dict(_good(), **change)
    with pytest.raises(ValueError, match=None) as e:
        sf.load_solver(bad)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_files_and_sample_arguments(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        sf.load_solver(tmp_path / "x.json")
    with pytest.raises(ValueError, match="cannot read"):
        sf.load_solver(tmp_path / "missing.json")
    model = model_from_denoiser(_gmm(), EDM(), "x0")
    noise = jnp.zeros((2, 2))
    kw = dict(process=EDM(), prediction="x0")
    with pytest.raises(ValueError, match="needs sampler_file"):
        jaxdiff.sample(model, noise, sampler="learned", steps=2, **kw)
    with pytest.raises(ValueError, match="not sampler='euler'"):
        jaxdiff.sample(model, noise, sampler="euler", steps=2, sampler_file=_good(), **kw)
    with pytest.raises(ValueError, match="steps=3 but the solver file is for 2 steps"):
        jaxdiff.sample(model, noise, sampler="learned", steps=3, sampler_file=_good(), **kw)
    with pytest.raises(ValueError, match="fitted for a EDM process, not DiscreteVP"):
        jaxdiff.sample(model, noise, sampler="learned", sampler_file=_good(),
                       process=DiscreteVP.linear(), prediction="x0")
    with pytest.raises(ValueError, match="loss='l1' is unknown"):
        sf.fit_solver(_gmm(), noise, noise, [80.0, 1.0, 0.0], loss="l1")


def test_dpm_v3_statistics_and_exactness_on_a_gaussian():
    """On Gaussian data D is affine in x: l = sigma^2 / (w^2 + sigma^2) exactly (Hutchinson is
    exact for a diagonal Jacobian), s = 0, and v3 integrates the ODE exactly up to quadrature:
    far below DPM-Solver++(2M) at the same 4 steps."""
    from jaxdiff.core import dpmv3_stats as v3

    m, w = 0.3, 0.5
    with jax.enable_x64(True):
        D = analytic.gaussian_denoiser(m, w)
        x0 = m + w * jax.random.normal(jax.random.key(0), (64, 2), jnp.float64)
        levels = np.geomspace(0.005, 100.0, 80)
        stats = v3.ems(D, x0, levels, jax.random.key(1))
        sig = np.exp(-stats["lam"])
        np.testing.assert_allclose(stats["l"][:, 0], sig**2 / (w**2 + sig**2), rtol=1e-9)
        assert np.max(np.abs(stats["s"])) < 1e-3
        x = 80.0 * jax.random.normal(jax.random.key(2), (8, 2), jnp.float64)
        grid = np.geomspace(80.0, 0.01, 5)
        exact = analytic.gaussian_ode(x, 80.0, 0.01, m, w)
        base = _rmse(SAMPLERS["dpmpp_2m"](D, x, jnp.asarray(grid)), exact)
        for order in (1, 2):
            y = SAMPLERS["dpm_v3"](D, x, jnp.asarray(grid),
                                   tables=v3.v3_tables(stats, grid, order))
            assert _rmse(y, exact) < 0.02 * base, (order, _rmse(y, exact), base)
        with pytest.raises(ValueError, match="order=4 must be 1, 2 or 3"):
            v3.v3_tables(stats, grid, 4)


def test_tune_sampler_cli(digits_run, capfd, tmp_path):
    """`jaxdiff tune-sampler` writes a solver file that `jaxdiff sample --sampler_file` uses;
    both in this process (tests/_cli.py `here`: they only read the run)."""
    from tests._cli import here, main

    out_file = tmp_path / "solver.json"
    code, err = here(capfd, "tune-sampler", f"--workdir={digits_run}", "--nfe=3", "--num=16",
                     "--iters=3", "--batch=8", f"--out={out_file}")
    assert code in (0, None), err[-2000:]
    solver = sf.load_solver(out_file)
    assert solver["nfe"] == 3 and solver["process"]["type"] == "EDM"
    assert solver["fit"]["validation_rmse"] <= solver["fit"]["initial_validation_rmse"]
    png = tmp_path / "x.png"
    code, err = here(capfd, "sample", f"--workdir={digits_run}", f"--sampler_file={out_file}",
                     "--num=2", f"--out={png}")
    assert code in (0, None), err[-2000:]
    assert png.exists()
    # no trained run: stops before anything is computed, so checked in this process
    code, errors = main("tune-sampler", f"--workdir={tmp_path}", "--nfe=3")
    assert code == 2 and len(errors) == 1 and "no trained run" in errors[0], errors
