"""Few-step objectives (`jaxdiff.distill`): each is zero at its fixed point, in closed form
(Gaussian and point-mass data with their exact denoisers and ODE maps), positive elsewhere, and
a short run of `make_train_step` lowers it; bad settings are one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdiff
from jaxdiff import distill
from jaxdiff.core import analytic, schedules
from jaxdiff.core.denoiser import denoiser, expand_like, model_from_denoiser

MEAN, STD = 0.7, 0.5
PROCESSES = [(jaxdiff.EDM(), "edm"), (jaxdiff.VPLinear(), "eps")]


def _apply(D, process, prediction):
    """An `apply(params, x, t)` whose denoiser is D (params ignored)."""
    net = model_from_denoiser(D, process, prediction)
    return lambda params, x, t, *a: net(x, t, *a)


def _batch(n=256, d=2, seed=0, std=STD):
    x = MEAN + std * jax.random.normal(jax.random.key(seed), (n, d))
    return {"x": x, "label": jnp.zeros(n, jnp.int32)}


@pytest.mark.parametrize("process,prediction", PROCESSES)
def test_progressive_loss_is_zero_for_the_teachers_two_step_map(process, prediction):
    D_T = analytic.gaussian_denoiser(MEAN, STD)
    sig = jnp.asarray(schedules.karras(process, 8), jnp.float32)  # 8 teacher, 4 student steps
    teacher = _apply(D_T, process, prediction)

    def D_star(x, s, *a):  # the exact student: one DDIM step lands where the teacher's two do
        i = jnp.argmin(jnp.abs(sig[None, :] - jnp.reshape(s, (-1, 1))), axis=1)
        return distill.pd_target(D_T, x, sig[i], sig[i + 1], sig[i + 2])

    obj = distill.progressive_objective(_apply(D_star, process, prediction), teacher,
                                        process=process, prediction=prediction,
                                        teacher_sigmas=sig)
    loss, aux = jax.jit(obj)({}, _batch(), jax.random.key(1), {})
    assert float(aux["pd_x0_mse"]) < 1e-9, aux
    # the teacher as its own student takes one DDIM step where it should take two: not zero
    loss_t, _ = jax.jit(distill.progressive_objective(
        teacher, teacher, process=process, prediction=prediction, teacher_sigmas=sig))(
        {}, _batch(), jax.random.key(1), {})
    assert float(loss_t) > 1e-4


def test_pd_target_reproduces_two_teacher_steps():
    D_T = analytic.gaussian_denoiser(MEAN, STD)
    x = _batch()["x"] + 3.0
    s, mid, nxt = jnp.float32(4.0), jnp.float32(1.5), jnp.float32(0.3)
    two = jaxdiff.samplers.get("ddim")(D_T, x, jnp.stack([s, mid, nxt]))
    target = distill.pd_target(D_T, x, s, mid, nxt)
    np.testing.assert_allclose(target + (nxt / s) * (x - target), two, rtol=1e-5, atol=1e-5)


def _exact_consistency(sigma_min, std):
    """D whose DDIM jump to sigma_min is the exact ODE map of N(MEAN, std^2) data."""

    def D(x, s, *a):
        f = analytic.gaussian_ode(x, expand_like(s, x), sigma_min, MEAN, std)
        r = expand_like(sigma_min / s, x)
        return jnp.where(r < 1, (f - r * x) / jnp.where(r < 1, 1 - r, 1.0), x)

    return D


@pytest.mark.parametrize("process,prediction", PROCESSES)
def test_consistency_distillation_is_zero_at_the_exact_consistency_function(process,
                                                                             prediction):
    sig = distill.karras_levels(18)
    sigma_min = float(sig[-1])
    teacher = _apply(analytic.gaussian_denoiser(MEAN, STD), process, prediction)
    student = _apply(_exact_consistency(sigma_min, STD), process, prediction)

    def exact(D, x, s_hi, s_lo, *a):  # the teacher's ODE in closed form
        return analytic.gaussian_ode(x, expand_like(s_hi, x), expand_like(s_lo, x), MEAN, STD)

    kw = dict(process=process, prediction=prediction, sigmas=sig, distance="l2")
    loss, _ = jax.jit(distill.consistency_objective(student, teacher=teacher, ode=exact, **kw))(
        {}, _batch(), jax.random.key(2), {})
    assert float(loss) < 1e-8, loss
    # a jaxdiff Heun step on the teacher instead of the closed form: close, not exact
    heun, _ = jax.jit(distill.consistency_objective(student, teacher=teacher, ode="heun",
                                                    **kw))({}, _batch(), jax.random.key(2), {})
    wrong, _ = jax.jit(distill.consistency_objective(teacher, teacher=teacher, ode="heun",
                                                     **kw))({}, _batch(), jax.random.key(2), {})
    assert float(heun) < 0.02 * float(wrong), (heun, wrong)


def test_consistency_training_is_zero_for_point_mass_data():
    """With x0 = MEAN always, the exact denoiser is MEAN, whose DDIM jump is the exact
    consistency function; CT's two points on the same noise then map to one point."""
    sig = distill.karras_levels(10)
    process, prediction = jaxdiff.EDM(), "edm"
    student = _apply(lambda x, s, *a: jnp.full_like(x, MEAN), process, prediction)
    obj = distill.consistency_objective(student, process=process, prediction=prediction,
                                        sigmas=sig)
    loss, _ = jax.jit(obj)({}, _batch(std=0.0), jax.random.key(3), None)
    assert float(loss) < 1e-5, loss
    f = distill.consistency_function(analytic.gaussian_denoiser(MEAN, STD), float(sig[-1]))
    x = _batch()["x"]
    np.testing.assert_array_equal(f(x, sig[-1]), x)  # the boundary condition, exactly


def test_a_short_run_lowers_the_progressive_loss():
    """A linear student D = a(s) x + b(s) (per student level) from scratch, 150 Adam steps."""
    process, prediction = jaxdiff.EDM(), "x0"
    sig = jnp.asarray(schedules.karras(process, 4), jnp.float32)
    teacher = _apply(analytic.gaussian_denoiser(MEAN, STD), process, prediction)
    levels = sig[::2]

    def student(params, x, t, *a):
        i = jnp.argmin(jnp.abs(levels[None, :] - jnp.reshape(process.t_of_cond(t), (-1, 1))),
                       axis=1)
        return expand_like(params["a"][i], x) * x + expand_like(params["b"][i], x)

    obj = distill.progressive_objective(student, teacher, process=process,
                                        prediction=prediction, teacher_sigmas=sig)
    params = {"a": jnp.zeros(3), "b": jnp.zeros(3)}
    tx = optax.adam(0.05)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        (loss, _), g = jax.value_and_grad(obj, has_aux=True)(params, _batch(), key, {})
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    losses = []
    for k in range(150):
        params, opt, loss = step(params, opt, jax.random.key(k))
        losses.append(float(loss))
    assert np.mean(losses[-10:]) < 0.05 * np.mean(losses[:10]), (losses[:3], losses[-3:])


@pytest.mark.parametrize("teacher", [True, False], ids=["distillation", "training"])
def test_a_short_run_lowers_the_consistency_loss(teacher):
    """A linear student D = a(s) x + b(s) per grid level, from D = 0, 200 Adam steps: the
    consistency loss (l2) falls to a small part of where it started, with the exact teacher's
    Heun step (CD) or without a teacher (CT)."""
    process, prediction = jaxdiff.EDM(), "x0"
    levels = distill.karras_levels(6, sigma_max=10.0)
    exact = _apply(analytic.gaussian_denoiser(MEAN, STD), process, prediction)

    def student(params, x, t, *a):
        i = jnp.argmin(jnp.abs(levels[None, :] - jnp.reshape(process.t_of_cond(t), (-1, 1))),
                       axis=1)
        return expand_like(params["a"][i], x) * x + expand_like(params["b"][i], x)

    obj = distill.consistency_objective(student, process=process, prediction=prediction,
                                        sigmas=levels, teacher=exact if teacher else None,
                                        distance="l2")
    params = {"a": jnp.zeros(6), "b": jnp.zeros(6)}
    tx = optax.adam(0.05)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        (loss, _), g = jax.value_and_grad(obj, has_aux=True)(params, _batch(), key, {})
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    losses = []
    for k in range(200):
        params, opt, loss = step(params, opt, jax.random.key(k))
        losses.append(float(loss))
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:10]), (losses[:3], losses[-3:])


@pytest.mark.parametrize("make,match", [
    (lambda: distill.progressive_objective(None, None, process=jaxdiff.EDM(), prediction="edm",
                                           teacher_sigmas=jnp.array([2.0, 1.0, 0.5, 0.0])),
     r"teacher_sigmas has 4 levels; progressive distillation needs 2N \+ 1"),
    (lambda: distill.consistency_objective(None, process=jaxdiff.EDM(), prediction="edm",
                                           sigmas=jnp.array([2.0, 1.0, 0.0])),
     r"sigmas end at 0.0; a consistency grid ends at sigma_min > 0"),
    (lambda: distill.consistency_objective(None, process=jaxdiff.EDM(), prediction="edm",
                                           sigmas=distill.karras_levels(4), distance="l1"),
     r"distance='l1' is unknown; allowed: pseudo_huber, l2"),
    (lambda: distill.karras_levels(1), r"n=1 levels: a consistency grid needs an integer n >= 2"),
])
def test_bad_settings_are_one_line_errors(make, match):
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_student_denoiser_sees_the_process_scaling():
    """The objectives work on denoisers: a VP student's raw input is alpha(t) x_ve."""
    process = jaxdiff.VPLinear()
    D = denoiser(model_from_denoiser(analytic.gaussian_denoiser(MEAN, STD), process, "v"),
                 process, "v")
    x = _batch()["x"] + 2.0
    np.testing.assert_allclose(D(x, 2.0), analytic.gaussian_denoiser(MEAN, STD)(x, 2.0),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3])
def test_consistency_sampler_draws_the_data_with_the_exact_consistency_function(steps):
    """`sampler="consistency"` through `jaxdiff.sample`: with the exact consistency function
    of N(MEAN, STD^2) data, one step and three steps both give its mean and std."""
    sigma_min = 0.002
    process = jaxdiff.EDM()
    net = model_from_denoiser(_exact_consistency(sigma_min, STD), process, "edm")
    noise = jax.random.normal(jax.random.key(4), (4096, 2))
    grid = np.asarray(distill.consistency_grid(steps, sigma_min))
    assert grid.shape == (steps + 1,) and grid[-1] == 0 and np.all(grid[:-1] > sigma_min)
    x = jaxdiff.sample(net, noise, process=process, prediction="edm", sampler="consistency",
                       steps=steps, schedule=grid, key=jax.random.key(5),
                       sigma_min=sigma_min)
    assert abs(float(x.mean()) - MEAN) < 0.03 and abs(float(x.std()) - STD) < 0.02, (
        float(x.mean()), float(x.std()))


def test_reflow_loss_is_zero_for_the_straight_velocity_of_a_linear_coupling():
    """Gaussian data and its rectified flow: the teacher's ODE couples z with x1 = MEAN + STD z
    (the monotone map). Along the straight lines between them z is recoverable from (x_t, t), so
    the reflow loss of the straight velocity z - x1 is zero; the independent-coupling velocity
    (the teacher's own) is not straight and scores above it."""
    process = jaxdiff.RectifiedFlow()
    z = jax.random.normal(jax.random.key(6), (512, 2))
    batch = {"x": MEAN + STD * z, "noise": z}

    def straight(params, x, t, *a):
        t = expand_like(t, x)
        zz = (x - (1 - t) * MEAN) / ((1 - t) * STD + t)
        return zz - (MEAN + STD * zz)

    obj = distill.reflow_objective(straight, process=process)
    loss, _ = jax.jit(obj)({}, batch, jax.random.key(7))
    assert float(loss) < 1e-9, loss
    teacher = _apply(analytic.gaussian_denoiser(MEAN, STD), process, "flow")
    loss_t, _ = jax.jit(distill.reflow_objective(teacher, process=process))(
        {}, batch, jax.random.key(7))
    assert float(loss_t) > 1e-3, loss_t


MEANS = jnp.array([-1.0, 0.5, 2.0])  # class means; the null label 3 is the mixture's N(0, 1)


def _class_denoiser(x, s, y):
    cond = analytic.gaussian_denoiser(MEANS[jnp.minimum(y, 2)][:, None], STD)(x, s)
    return jnp.where((y == 3)[:, None], analytic.gaussian_denoiser(0.0, 1.0)(x, s), cond)


@pytest.mark.parametrize("process,prediction", PROCESSES)
def test_guided_loss_is_zero_for_the_cfg_combination(process, prediction):
    """Stage 1: a w-conditioned student equal to D_u + w (D_c - D_u) has zero loss; one that
    ignores w (always w = 2) does not."""
    teacher = _apply(_class_denoiser, process, prediction)

    def exact(x, s, y, w):
        d_c, d_u = _class_denoiser(x, s, y), _class_denoiser(x, s, jnp.full_like(y, 3))
        return d_u + expand_like(w, x) * (d_c - d_u)

    batch = {"x": _batch()["x"], "label": jnp.arange(256) % 3}
    kw = dict(process=process, prediction=prediction, num_classes=3)
    loss, _ = jax.jit(distill.guided_objective(_apply(exact, process, prediction), teacher,
                                               **kw))({}, batch, jax.random.key(8), {})
    assert float(loss) < 1e-9, loss
    fixed = _apply(lambda x, s, y, w: exact(x, s, y, jnp.full_like(w, 2.0)), process,
                   prediction)
    loss_f, _ = jax.jit(distill.guided_objective(fixed, teacher, **kw))(
        {}, batch, jax.random.key(8), {})
    assert float(loss_f) > 1e-3, loss_f


def test_guided_progressive_stage_passes_w_to_both_networks():
    """Stage 2: progressive distillation of a w-conditioned teacher is zero for the student
    that reproduces its two-step map at the same w."""
    process, prediction = jaxdiff.EDM(), "edm"
    sig = jnp.asarray(schedules.karras(process, 4), jnp.float32)

    def D_T(x, s, y, w):
        d_c, d_u = _class_denoiser(x, s, y), _class_denoiser(x, s, jnp.full_like(y, 3))
        return d_u + expand_like(w, x) * (d_c - d_u)

    def D_star(x, s, y, w):
        i = jnp.argmin(jnp.abs(sig[None, :] - jnp.reshape(s, (-1, 1))), axis=1)
        return distill.pd_target(D_T, x, sig[i], sig[i + 1], sig[i + 2], y, w)

    batch = {"x": _batch()["x"], "label": jnp.arange(256) % 3}
    obj = distill.progressive_objective(_apply(D_star, process, prediction),
                                        _apply(D_T, process, prediction), process=process,
                                        prediction=prediction, teacher_sigmas=sig,
                                        num_classes=3, guidance_range=(1.0, 4.0))
    _, aux = jax.jit(obj)({}, batch, jax.random.key(9), {})
    assert float(aux["pd_x0_mse"]) < 1e-9, aux
    with pytest.raises(ValueError, match=r"guidance_range=\(2.0, 1.0\): need 0 <= lo <= hi"):
        distill.guided_objective(None, None, process=process, prediction=prediction,
                                 num_classes=3, guidance_range=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"needs a class-conditional teacher"):
        distill.guided_objective(None, None, process=process, prediction=prediction,
                                 num_classes=0)


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_guidance_conditioned_students(name):
    """UNet/DiT(guidance_embed=True) take w (the param tree gains only its embedder, and w
    changes the output); a model without it refuses w, one with it needs w, in one line; the
    training wrapper passes the labels' next argument as w."""
    from jaxdiff.models import DiT, UNet
    from jaxdiff.train.step import ModelApply

    make = {"unet": lambda **k: UNet(channels=8, channel_mult=(1,), num_res_blocks=1,
                                     attn_resolutions=(), mid_attn=False, norm_groups=4,
                                     num_classes=3, **k),
            "dit": lambda **k: DiT(patch_size=2, hidden_size=16, depth=1, num_heads=2,
                                   num_classes=3, **k)}[name]
    x, t, y = jnp.ones((2, 4, 4, 1)), jnp.array([10.0, 500.0]), jnp.array([0, 1])
    plain, guided = make(), make(guidance_embed=True)
    p_plain = plain.init(jax.random.key(0), x, t, y)["params"]
    p_guided = guided.init(jax.random.key(0), x, t, y, w=jnp.array([1.0, 2.0]))["params"]
    extra = set(p_guided) - set(p_plain)
    assert extra == {"unet": {"guidance_embed"}, "dit": {"w_embedder"}}[name], extra
    p_guided = jax.tree.map(lambda a: a + 0.1, p_guided)  # adaLN-zero: make w matter
    apply = ModelApply(guided)
    out1 = apply(p_guided, x, t, y, jnp.array([1.0, 1.0]))
    out3 = apply(p_guided, x, t, y, jnp.array([3.0, 3.0]))
    assert float(jnp.max(jnp.abs(out1 - out3))) > 1e-4
    with pytest.raises(ValueError, match=r"guidance scale w was given to a .* with "
                                         r"guidance_embed=False"):
        plain.apply({"params": p_plain}, x, t, y, w=jnp.ones(2))
    with pytest.raises(ValueError, match=r"has guidance_embed=True and needs w="):
        guided.apply({"params": p_guided}, x, t, y)


def test_ict_curriculum_and_the_step_reaching_the_objective():
    """iCT's discretization doubles from s0 + 1 to s1 + 1 levels in floor(log2(s1/s0)) + 1
    stages; under make_train_step a `takes_step` objective sees the state's step (metrics
    'levels'); the point-mass fixed point holds on every curriculum grid with lognormal pairs."""
    N = [int(distill.ict_discretization(k, 80_000)) for k in (0, 9_999, 10_000, 30_000, 79_999)]
    assert N == [11, 11, 21, 81, 1281], N
    process, prediction = jaxdiff.EDM(), "edm"
    student = _apply(lambda x, s, *a: jnp.full_like(x, MEAN), process, prediction)
    obj = distill.consistency_objective(student, process=process, prediction=prediction,
                                        curriculum=dict(total_steps=80),
                                        level_sampling="lognormal")
    assert obj.takes_step
    for k, want in ((0, 11), (45, 161), (79, 1281)):
        loss, aux = jax.jit(obj)({}, _batch(std=0.0), jax.random.key(k), None, step=k)
        assert int(aux["levels"]) == want and float(loss) < 1e-5, (k, aux, loss)
    from jaxdiff.train import make_train_step
    from jaxdiff.train.state import TrainState

    def stepped(params, batch, key, frozen, step=0):
        return jnp.sum(params["w"] ** 2) * (1.0 + step), {"seen": step}

    stepped.takes_step = True
    tx = optax.sgd(0.0)
    state = TrainState(step=jnp.int32(7), params={"w": jnp.ones(2)}, ema_params=(),
                       opt_state=tx.init({"w": jnp.ones(2)}), rng=jax.random.PRNGKey(0))
    _, metrics = make_train_step(stepped, tx, lambda s: 0.0, ema_decays=())(state, {})
    assert int(metrics["seen"]) == 7 and float(metrics["loss"]) == 16.0
    with pytest.raises(ValueError, match=r"give one of sigmas= .* and curriculum="):
        distill.consistency_objective(student, process=process, prediction=prediction)
    with pytest.raises(ValueError, match=r"level_sampling='beta' is unknown"):
        distill.consistency_objective(student, process=process, prediction=prediction,
                                      sigmas=distill.karras_levels(4), level_sampling="beta")


def test_teacher_record_digest_changes_with_any_bit():
    params = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones(4, jnp.int32)}}
    rec = distill.teacher_record("runs/t", 12, params)
    assert rec["step"] == 12 and rec["workdir"].endswith("runs/t")
    assert len(rec["params_sha256"]) == 64
    assert distill.params_digest(jax.tree.map(jnp.array, params)) == rec["params_sha256"]
    flipped = {"a": params["a"].at[1, 2].set(np.nextafter(np.float32(5.0), np.float32(6.0))),
               "b": params["b"]}
    reshaped = {"a": params["a"].reshape(3, 2), "b": params["b"]}
    renamed = {"x": params["a"], "b": params["b"]}
    digests = {distill.params_digest(p) for p in (params, flipped, reshaped, renamed)}
    assert len(digests) == 4
