"""Few-step objectives for `jaxdiff.train.make_train_step`: progressive distillation,
consistency distillation and consistency training (issue 15, work in progress).

Each is `objective(params, batch, key, frozen) -> (loss, aux)`, the protocol of
`make_train_step`: `params` are the student's, `frozen` the teacher's (never differentiated),
batch = {"x": data, "label": classes (class-conditional models)}. Networks are callables
`apply(params, x, t, *labels)` returning the raw output of their `prediction` type (e.g.
`jaxdiff.train.step.ModelApply(flax_module)`); everything is written on their denoisers in the
VE view (x_ve = x0 + s eps, D(x_ve, s) ~ E[x0 | x_ve]; `jaxdiff.core.denoiser.denoiser`), so
one formula serves every process and prediction.

- Progressive distillation (Salimans & Ho 2022, Alg. 2): the student takes one DDIM step where
  the teacher takes two. From x at level s, two teacher DDIM steps s -> s_mid -> s_next land on
  x''; the student's x0 target is the x0 whose single DDIM step s -> s_next lands there,
  x~ = (x'' - r x) / (1 - r), r = s_next / s (x~ = x'' on the last step, s_next = 0). Loss: the
  x0 error weighted by max(SNR, 1) = max(1 / s^2, 1) ("truncated SNR", their Sec. 4).
- Consistency models (Song et al. 2023; iCT: Song & Dhariwal 2023). The consistency function
  is the DDIM jump of the network's denoiser to sigma_min, f(x, s) = D + (sigma_min / s)(x - D):
  exactly x at s = sigma_min (the boundary condition) for any network, and the teacher's own
  one-step map when the student starts as the teacher. The loss compares f at adjacent levels
  s_hi > s_lo of a Karras grid on the same noise: d(f_theta(x_hi, s_hi), sg f_theta(x_lo, s_lo))
  weighted by 1 / (s_hi - s_lo) (iCT), with d the pseudo-Huber distance
  sqrt(|a - b|^2 + c^2) - c, c = 0.00054 sqrt(dim) (iCT Sec. 3.3), or "l2". The target uses the
  student's current params under stop_gradient (iCT drops the EMA teacher of the original CM).
  - distillation (CD): x_lo is one step of a jaxdiff sampler (Heun by default, or any
    callable) on the teacher's probability-flow ODE from x_hi = x0 + s_hi z;
  - training (CT): x_lo = x0 + s_lo z, the same z (no teacher).

- Reflow (Liu et al. 2023, "Flow straight and fast"): the denoising loss on pairs (x0, z) of a
  teacher's samples and the noise they came from, instead of independent noise: the student
  learns straighter paths between the same endpoints (`reflow_objective`, pairs from
  `reflow_pairs`).

- Guided distillation (Meng et al. 2023): stage 1 (`guided_objective`) teaches a student
  conditioned on the guidance scale w the CFG teacher's two-pass output in one pass; stage 2 is
  progressive distillation with w (`progressive_objective(guidance_range=...)`).

iCT's recipe: `consistency_objective(curriculum=dict(total_steps=K),
level_sampling="lognormal")` (the doubling discretization, lognormal pairs, pseudo-Huber).

The consistency sampler is `jaxdiff.samplers.consistency` (`consistency_grid` gives its levels).
Not here yet (issue 15): the `jaxdiff distill` CLI, the testbed benchmark.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdiff.core.denoiser import ddim_step, denoiser, expand_like

PSEUDO_HUBER_C = 0.00054  # iCT: c = 0.00054 sqrt(d) for data of d dimensions


def _bound(apply, params):
    return jax.tree_util.Partial(apply, params)


def _labels(batch, num_classes):
    return (batch["label"],) if num_classes else ()


def karras_levels(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """n >= 2 noise levels from sigma_max down to sigma_min on EDM's rho-grid (no final zero):
    the discretization of consistency models."""
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"n={n!r} levels: a consistency grid needs an integer n >= 2")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min={sigma_min}, sigma_max={sigma_max}: need "
                         "0 < sigma_min < sigma_max")
    u = jnp.linspace(0.0, 1.0, n)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + u * (b - a)) ** rho


def consistency_grid(steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The sampling grid of an n-step consistency model: sigma_max, then n - 1 intermediate
    levels of the rho-grid between sigma_max and sigma_min (not sigma_min itself, where the
    consistency function is the identity), then 0; e.g. [80, 2.5, 0] for 2 steps."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    levels = karras_levels(steps + 1, sigma_min, sigma_max, rho)[:-1]
    return jnp.concatenate([levels, jnp.zeros(1, levels.dtype)])


# --- progressive distillation ----------------------------------------------------------------

def pd_target(D_teacher, x, s, s_mid, s_next, *args):
    """The student's x0 target at (x, s): two teacher DDIM steps s -> s_mid -> s_next, then the
    x0 whose one DDIM step s -> s_next lands on the same point (s, s_mid, s_next per sample)."""
    x1 = ddim_step(x, D_teacher(x, s, *args), expand_like(s, x), expand_like(s_mid, x))
    x2 = ddim_step(x1, D_teacher(x1, s_mid, *args), expand_like(s_mid, x), expand_like(s_next, x))
    r = expand_like(s_next / s, x)
    return (x2 - r * x) / (1.0 - r)


def progressive_objective(student, teacher, *, process, prediction, teacher_sigmas,
                          num_classes=0, guidance_range=None):
    """Progressive distillation: the student learns in N steps what the teacher does in 2N.
    teacher_sigmas: the teacher's 2N + 1 VE levels, decreasing, ending at 0 (a
    `jaxdiff.core.schedules` grid); the student's are every other one. guidance_range=(lo, hi):
    guided distillation's stage 2, both networks conditioned on a guidance scale w drawn
    uniformly per sample and passed after the labels."""
    sig = jnp.asarray(teacher_sigmas, jnp.float32)
    if sig.ndim != 1 or sig.shape[0] < 3 or (sig.shape[0] - 1) % 2:
        raise ValueError(f"teacher_sigmas has {sig.shape[0] if sig.ndim == 1 else sig.shape} "
                         "levels; progressive distillation needs 2N + 1 (an even number of "
                         "teacher steps)")
    n = (sig.shape[0] - 1) // 2
    if guidance_range is not None:
        _check_guidance_range(guidance_range)

    def objective(params, batch, key, frozen):
        x0 = batch["x"]
        k_i, k_eps, k_w = jax.random.split(key, 3)
        args = _labels(batch, num_classes) + _guidance(k_w, x0.shape[0], guidance_range)
        i = jax.random.randint(k_i, (x0.shape[0],), 0, n)
        s, s_mid, s_next = sig[2 * i], sig[2 * i + 1], sig[2 * i + 2]
        x = x0 + expand_like(s, x0) * jax.random.normal(k_eps, x0.shape, x0.dtype)
        D_teacher = denoiser(_bound(teacher, frozen), process, prediction)
        target = jax.lax.stop_gradient(pd_target(D_teacher, x, s, s_mid, s_next, *args))
        pred = denoiser(_bound(student, params), process, prediction)(x, s, *args)
        w = jnp.maximum(1.0 / jnp.square(s), 1.0)
        err = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, x0.ndim)))
        return jnp.mean(w * err), {"pd_x0_mse": jnp.mean(err)}

    return objective


def _guidance(key, n, guidance_range):
    if guidance_range is None:
        return ()
    lo, hi = guidance_range
    return (jax.random.uniform(key, (n,), jnp.float32, lo, hi),)


def _check_guidance_range(guidance_range):
    lo, hi = guidance_range
    if not 0 <= lo <= hi:
        raise ValueError(f"guidance_range={tuple(guidance_range)}: need 0 <= lo <= hi (w = 1 is "
                         "the conditional model, w = 0 the unconditional one)")


def guided_objective(student, teacher, *, process, prediction, num_classes,
                     guidance_range=(1.0, 4.0)):
    """Guided distillation's stage 1 (Meng et al. 2023, Sec. 3.1): a student conditioned on the
    guidance scale w, `student(params, x, t, labels, w)`, matches the classifier-free-guided
    teacher D_u + w (D_c - D_u) (`jaxdiff.core.guidance.cfg`'s convention) at one network call,
    for w uniform in guidance_range, at noise levels drawn as training draws them
    (`losses.sample_time`); the x0 error weighted by max(SNR, 1). The teacher is
    class-conditional with the null label `num_classes` (CFG training)."""
    from jaxdiff.core import losses

    if not num_classes:
        raise ValueError("guided distillation needs a class-conditional teacher (num_classes > "
                         "0, the null label num_classes)")
    _check_guidance_range(guidance_range)

    def objective(params, batch, key, frozen):
        x0, y = batch["x"], batch["label"]
        k_t, k_eps, k_w = jax.random.split(key, 3)
        t = losses.sample_time(k_t, x0.shape[0], process, "uniform")
        s = process.ve_sigma(t)
        x = x0 + expand_like(s, x0) * jax.random.normal(k_eps, x0.shape, x0.dtype)
        (w,) = _guidance(k_w, x0.shape[0], guidance_range)
        D_teacher = denoiser(_bound(teacher, frozen), process, prediction)
        d_c, d_u = D_teacher(x, s, y), D_teacher(x, s, jnp.full_like(y, num_classes))
        target = jax.lax.stop_gradient(d_u + expand_like(w, x0) * (d_c - d_u))
        pred = denoiser(_bound(student, params), process, prediction)(x, s, y, w)
        err = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, x0.ndim)))
        return jnp.mean(jnp.maximum(1.0 / jnp.square(s), 1.0) * err), {
            "guided_x0_mse": jnp.mean(err)}

    return objective


# --- consistency models ----------------------------------------------------------------------

def consistency_function(D, sigma_min):
    """f(x, s, *args) = D + (sigma_min / s)(x - D): the DDIM jump of denoiser D to sigma_min;
    f(x, sigma_min) = x exactly."""

    def f(x, s, *args):
        x0 = D(x, s, *args)
        return ddim_step(x, x0, expand_like(s, x), sigma_min)

    return f


def _distance(name, a, b):
    axes = tuple(range(1, a.ndim))
    sq = jnp.sum(jnp.square(a - b), axis=axes)
    if name == "l2":
        return sq
    if name == "pseudo_huber":
        c = PSEUDO_HUBER_C * math.sqrt(math.prod(a.shape[1:]))
        return jnp.sqrt(sq + c * c) - c
    raise ValueError(f"distance={name!r} is unknown; allowed: pseudo_huber, l2")


def ode_step(name="heun"):
    """`step(D, x, s_hi, s_lo, *args) -> x at s_lo`: one step of the jaxdiff sampler `name` on
    the probability-flow ODE of D, each sample from its own level (vmapped)."""
    from jaxdiff import samplers

    sampler = samplers.get(name)

    def step(D, x, s_hi, s_lo, *args):
        def one(xi, hi, lo, *ai):
            Di = lambda z, s: D(z, s, *(a[None] for a in ai))  # noqa: E731
            return sampler(Di, xi[None], jnp.stack([hi, lo]))[0]

        return jax.vmap(one)(x, s_hi, s_lo, *args)

    return step


def ict_discretization(step, total_steps, s0=10, s1=1280):
    """iCT's number of levels at training step `step` of `total_steps` (Song & Dhariwal 2023,
    Sec. 3.4): N = min(s0 · 2^floor(step / K'), s1) + 1, K' = floor(total_steps /
    (floor(log2(s1 / s0)) + 1)); jittable in step."""
    k_prime = max(int(total_steps) // (int(math.log2(s1 // s0)) + 1), 1)
    doublings = jnp.minimum(jnp.asarray(step) // k_prime, 30).astype(jnp.float32)
    return (jnp.minimum(s0 * 2.0**doublings, s1) + 1).astype(jnp.int32)


def _pair_logits(sig, valid, level_sampling, p_mean, p_std):
    """Log-probabilities of the adjacent pairs (sig[i], sig[i + 1]) of a decreasing grid:
    uniform, or iCT's lognormal (the mass of N(p_mean, p_std^2) of log sigma between them)."""
    if level_sampling == "uniform":
        return jnp.where(valid, 0.0, -jnp.inf)
    cdf = jax.scipy.special.erf((jnp.log(sig) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf[:-1] - cdf[1:]
    return jnp.where(valid, jnp.log(jnp.maximum(mass, 1e-30)), -jnp.inf)


def consistency_objective(student, *, process, prediction, sigmas=None, teacher=None,
                          ode="heun", distance="pseudo_huber", num_classes=0,
                          curriculum=None, level_sampling="uniform", p_mean=-1.1, p_std=2.0,
                          sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Consistency distillation (`teacher` given: its probability-flow ODE moves x_hi to s_lo by
    `ode`, a sampler name or a `step(D, x, s_hi, s_lo, *args)` callable) or consistency training
    (teacher=None: x_lo from the same noise).

    The levels: `sigmas`, a fixed decreasing grid > 0 (`karras_levels`), or `curriculum` =
    dict(total_steps=K[, s0=10, s1=1280]): iCT's doubling number of levels
    (`ict_discretization`) on the rho-grid from sigma_max to sigma_min; the objective then takes
    the training step (`takes_step`). A pair of adjacent levels is drawn per sample, uniformly
    or by iCT's lognormal (`level_sampling="lognormal"`, log sigma ~ N(p_mean, p_std^2))."""
    if (sigmas is None) == (curriculum is None):
        raise ValueError("give one of sigmas= (a fixed grid) and curriculum= (iCT's doubling "
                         "grid)")
    if level_sampling not in ("uniform", "lognormal"):
        raise ValueError(f"level_sampling={level_sampling!r} is unknown; allowed: uniform, "
                         "lognormal")
    if sigmas is not None:
        fixed = jnp.asarray(sigmas, jnp.float32)
        if fixed.ndim != 1 or fixed.shape[0] < 2:
            raise ValueError("sigmas must be a 1-D grid of at least 2 levels")
        sigma_min = float(fixed[-1])
        if sigma_min <= 0:
            raise ValueError(f"sigmas end at {sigma_min}; a consistency grid ends at "
                             "sigma_min > 0")
    else:
        curriculum = dict(curriculum)
        size = int(curriculum.get("s1", 1280)) + 1
        karras_levels(2, sigma_min, sigma_max, rho)  # checks the range
    _distance(distance, jnp.zeros((1, 1)), jnp.zeros((1, 1)))  # checks the name
    step_fn = ode_step(ode) if isinstance(ode, str) else ode

    def levels(step):
        if curriculum is None:
            return fixed, jnp.ones(fixed.shape[0] - 1, bool), fixed.shape[0]
        n = ict_discretization(step, **curriculum)
        i = jnp.arange(size)
        u = i / (n - 1).astype(jnp.float32)
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        sig = (a + jnp.minimum(u, 1.0) * (b - a)) ** rho
        return sig, i[:-1] < n - 1, n

    def objective(params, batch, key, frozen, step=0):
        x0 = batch["x"]
        args = _labels(batch, num_classes)
        k_n, k_z = jax.random.split(key)
        sig, valid, count = levels(step)
        logits = _pair_logits(sig, valid, level_sampling, p_mean, p_std)
        n = jax.random.categorical(k_n, logits, shape=(x0.shape[0],))
        s_hi, s_lo = sig[n], sig[n + 1]
        z = jax.random.normal(k_z, x0.shape, x0.dtype)
        x_hi = x0 + expand_like(s_hi, x0) * z
        if teacher is None:
            x_lo = x0 + expand_like(s_lo, x0) * z
        else:
            D_teacher = denoiser(_bound(teacher, frozen), process, prediction)
            x_lo = jax.lax.stop_gradient(step_fn(D_teacher, x_hi, s_hi, s_lo, *args))
        f = consistency_function(denoiser(_bound(student, params), process, prediction),
                                 sigma_min)
        target = jax.lax.stop_gradient(f(x_lo, s_lo, *args))
        d = _distance(distance, f(x_hi, s_hi, *args), target)
        return jnp.mean(d / (s_hi - s_lo)), {"consistency_distance": jnp.mean(d),
                                               "levels": count}

    objective.takes_step = curriculum is not None
    return objective


# --- reflow ----------------------------------------------------------------------------------

def reflow_pairs(model_fn, noise, **sample_kwargs):
    """{"x": the teacher's samples, "noise": the noise each came from}: one reflow batch, by
    `jaxdiff.sample(model_fn, noise, **sample_kwargs)` (a deterministic sampler: the pair is
    the teacher's ODE coupling)."""
    import jaxdiff

    return {"x": jaxdiff.sample(model_fn, noise, **sample_kwargs), "noise": noise}


def reflow_objective(student, *, process, prediction="flow", num_classes=0,
                     **loss_options):
    """The denoising loss (`jaxdiff.core.losses.diffusion_loss`, its weighting and time
    sampling in `loss_options`) with batch["noise"] as the noise paired to batch["x"]."""
    from jaxdiff.core import losses

    def objective(params, batch, key, frozen=None):
        net = _bound(student, params)
        loss, aux = losses.diffusion_loss(net, batch["x"], key, process=process,
                                          prediction=prediction,
                                          args=_labels(batch, num_classes),
                                          eps=batch["noise"], **loss_options)
        return loss, {"reflow_mse": jnp.mean(aux["mse"])}

    return objective
