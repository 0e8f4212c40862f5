"""`jaxdiff.sample`: composition, no recompiles for knobs, trajectories, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import sampling
from jaxdiff.core import analytic, schedules
from jaxdiff.core.denoiser import model_from_denoiser
from jaxdiff.core.process import EDM, VE, DiscreteVP, RectifiedFlow, VPLinear

MU, STD = 0.3, 0.6


def _model(process, prediction):
    return model_from_denoiser(analytic.gaussian_denoiser(MU, STD), process, prediction)


@pytest.mark.parametrize("process,prediction", [
    (DiscreteVP.linear(), "eps"), (VPLinear(), "v"), (VE(), "score"), (EDM(), "edm"),
    (RectifiedFlow(), "flow"),
])
def test_sample_scales_noise_and_matches_direct_sampler(process, prediction):
    """sample() = prior scaling + adapter + sampler, checked against a hand-built call."""
    noise = jax.random.normal(jax.random.key(1), (4, 3))
    out = jaxdiff.sample(_model(process, prediction), noise, process=process,
                         prediction=prediction, sampler="ddim", steps=12)
    grid = jnp.asarray(schedules.get(sampling.default_schedule(process))(process, 12))
    x = noise * process.prior_scale(grid[0])
    ref = jaxdiff.SAMPLERS["ddim"](analytic.gaussian_denoiser(MU, STD), x, grid)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_prior_scale_conventions():
    # diffusers: x_T = noise for VP (init_noise_sigma = sqrt(1 + sigma^2) in the VE view)
    assert float(VPLinear().prior_scale(3.0)) == pytest.approx(np.sqrt(10.0))
    assert float(EDM().prior_scale(80.0)) == pytest.approx(80.0)
    assert float(RectifiedFlow().prior_scale(9.0)) == pytest.approx(10.0)  # x_T = noise, t=0.9


def test_no_recompile_for_steps_schedule_and_model_params():
    p = EDM()
    noise = jnp.ones((2, 3))
    # network params as data: a Partial's bound arrays are traced, not baked in
    model = lambda scale, x, c: scale * _model(p, "edm")(x, c)  # noqa: E731
    before, ddim_before = sampling.trace_count(), sampling.trace_count("ddim")
    outs = []
    for steps, sched, scale in [(5, "karras", 1.0), (17, "karras", 1.0), (9, "logsnr", 1.0),
                                (9, "logsnr", 0.5), (30, schedules.time_uniform, 2.0)]:
        fn = jax.tree_util.Partial(model, jnp.asarray(scale))
        outs.append(jaxdiff.sample(fn, noise, process=p, prediction="edm", sampler="ddim",
                                   steps=steps, schedule=sched))
    assert sampling.trace_count() - before == 1
    assert sampling.trace_count("ddim") - ddim_before == 1  # counted per sampler, too
    assert not np.allclose(outs[0], outs[1])  # the knobs did change the result


def test_named_schedule_grids_are_computed_once(monkeypatch):
    calls = []
    karras = schedules.SCHEDULES["karras"]
    monkeypatch.setitem(schedules.SCHEDULES, "karras",
                        lambda *a, **k: calls.append(a[1]) or karras(*a, **k))
    monkeypatch.setattr(sampling, "_GRIDS", type(sampling._GRIDS)())
    model, noise = _model(EDM(), "edm"), jnp.ones((2, 3))
    run = lambda process, steps: jaxdiff.sample(  # noqa: E731
        model, noise, process=process, prediction="edm", sampler="ddim", steps=steps,
        schedule="karras")
    first, again = run(EDM(), 7), run(EDM(), 7)
    np.testing.assert_array_equal(first, again)
    assert calls == [7]  # the second call reused the grid
    run(EDM(t_max=40.0), 7)  # another process (by value) or step count: computed anew
    run(EDM(), 8)
    assert calls == [7, 7, 8]
    assert len(sampling._GRIDS) == 3


def test_explicit_grid_and_capacity():
    p = EDM()
    noise = jax.random.normal(jax.random.key(0), (2, 3))
    grid = schedules.karras(p, 6)
    a = jaxdiff.sample(_model(p, "edm"), noise, process=p, prediction="edm", sampler="ddim",
                       steps=6, schedule=grid)
    b = jaxdiff.sample(_model(p, "edm"), noise, process=p, prediction="edm", sampler="ddim",
                       steps=6, schedule="karras", capacity=6)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_trajectory_rows():
    p = EDM()
    noise = jax.random.normal(jax.random.key(0), (2, 3))
    x, traj = jaxdiff.sample(_model(p, "edm"), noise, process=p, prediction="edm",
                             sampler="ddim", steps=4, capacity=8, trajectory=True)
    assert traj.shape == (9, 2, 3)
    np.testing.assert_allclose(traj[0], noise * 80.0, rtol=1e-6)
    np.testing.assert_allclose(traj[4], x, rtol=1e-6)
    np.testing.assert_allclose(traj[8], x, rtol=1e-6)  # rows past the last step repeat it


def test_final_level_above_zero_returns_process_scaling():
    p = VPLinear()
    noise = jax.random.normal(jax.random.key(0), (2, 3))
    grid = schedules.logsnr(p, 8, final_zero=False)
    x = jaxdiff.sample(_model(p, "eps"), noise, process=p, prediction="eps", sampler="ddim",
                       steps=8, schedule=grid)
    x_T = noise * float(p.prior_scale(grid[0]))
    x_ve = jaxdiff.SAMPLERS["ddim"](analytic.gaussian_denoiser(MU, STD), x_T, jnp.asarray(grid))
    np.testing.assert_allclose(x, x_ve * float(p.alpha(p.t_of(grid[-1]))), rtol=1e-5)


def test_vmap_over_sample_entry_components():
    D = analytic.gaussian_denoiser(MU, STD)
    grid = jnp.asarray(schedules.karras(EDM(), 10))
    xs = jax.random.normal(jax.random.key(0), (5, 1, 3)) * 80
    f = jax.jit(jax.vmap(lambda x: jaxdiff.SAMPLERS["ddim"](D, x, grid)))
    np.testing.assert_allclose(f(xs)[:, 0], jaxdiff.SAMPLERS["ddim"](D, xs[:, 0], grid),
                               rtol=1e-5)


BAD = [
    (dict(sampler="dpm_turbo"), "sampler='dpm_turbo' is unknown; allowed:"),
    (dict(sampler="dpm_adaptive", return_info=True),
     "return_info=True works only when 'dpm_adaptive' is called directly"),
    (dict(schedule="cosine"), "schedule='cosine' is unknown; allowed:"),
    (dict(steps=0), "steps=0 must be an integer >= 1"),
    (dict(steps=20, capacity=10), "steps=20 exceeds capacity=10"),
    (dict(prediction="epsilon"), "prediction='epsilon' is unknown; allowed: eps"),
    (dict(schedule=[80.0, 90.0, 0.0], steps=2), r"strictly decreasing; sigmas\[0\]=80"),
    (dict(schedule=[80.0, 1.0, 0.0], steps=5), "schedule has 3 noise levels but steps=5 needs 6"),
    (dict(order=2), "sampler 'ddim' has no option 'order'"),
    (dict(sampler="ddpm"), "sampler 'ddpm' is stochastic and needs key="),
]


@pytest.mark.parametrize("kw,msg", BAD, ids=[m[:24] for _, m in BAD])
def test_bad_input(kw, msg):
    p = EDM()
    args = dict(process=p, prediction="edm", sampler="ddim", steps=4) | kw
    with pytest.raises(ValueError, match=msg):
        jaxdiff.sample(_model(p, "edm"), jnp.ones((2, 3)), **args)


def test_bad_model_output_shape():
    with pytest.raises(ValueError, match=r"model output shape \(2, 1\) does not match"):
        jaxdiff.sample(lambda x, t: x[:, :1], jnp.ones((2, 3)), process=EDM(), prediction="x0",
                       sampler="ddim", steps=3)
