"""`jaxdiff distill`'s runs (cli/distill.py parses the flags): a teacher run in, a few-step
student run out, through the normal training loop (`jaxdiff.train.train`: checkpoints, resume
after a kill, meshes, metrics).

A method is a list of stages; each stage is an ordinary training run of `config.train.steps`
steps with its own objective (`jaxdiff.distill.objectives`) and its teacher's params passed to
every step as `frozen` data (never differentiated, never written). The last stage runs in
WORKDIR itself, so `jaxdiff sample/eval --workdir WORKDIR` read the student like any run; the
earlier ones in WORKDIR/stages/<k>-<name>/ (each with its own config.json: sample them too).
A stage whose checkpoint has reached its last step is done; the next stage's teacher is its
EMA params. A killed run goes on from the last checkpoint of the stage it was in.

Methods (`config.distill.method`):
- progressive (Salimans & Ho 2022): rounds from `teacher_steps` to `student_steps` DDIM steps,
  halving each round; round 1's teacher is the teacher run under classifier-free guidance at
  `distill.guidance` (the student absorbs it: one pass per step), each student starts as its
  teacher. The grids are nested: round r samples on every 2^r-th level of the teacher's grid
  (its schedule at `teacher_steps`).
- guided (Meng et al. 2023): stage 1 teaches a w-conditioned student (`guidance_embed=True`,
  its w embedding starting at zero, so it starts as the conditional teacher) the CFG teacher
  for w in `guidance_range`; then progressive rounds with w.
- cd (consistency distillation, Song et al. 2023): `levels` Karras levels, one `ode` step
  (a jaxdiff sampler) of the guided teacher; the student starts as the teacher.
- ct (consistency training, iCT recipe): no teacher in the loss (the teacher run gives the
  architecture and data); doubling discretization `s0` -> `s1` over the run, lognormal level
  pairs, pseudo-Huber; from a fresh init unless `init="teacher"`.
- reflow (Liu et al. 2023): `pairs` (noise, sample) pairs from the guided teacher's ODE
  (`pair_sampler`, `pair_steps`), written to WORKDIR/pairs.npz and read through the data
  pipeline (`jaxdiff.data.pairs`), then the denoising loss on the coupled pairs; Euler
  sampling at `student_steps`.

The student's config is the teacher's with its sampler replaced by the student's (the grid
written out as a list of levels) and two sections added: `distill` (the method's settings)
and `teacher` (its run, step and the sha256 of its params, `teacher_record`). A resumed run
with other settings, or whose teacher's params changed since, is refused in one line.
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from jaxdiff.distill import graft, params_digest, with_cfg
from jaxdiff.distill import objectives as obj

METHODS = ("progressive", "guided", "cd", "ct", "reflow")
DEFAULTS = dict(
    method="progressive",
    teacher_steps=32,  # progressive / guided: the first teacher's DDIM steps
    student_steps=4,  # the student's sampling steps (consistency: 1)
    guidance=None,  # the CFG scale a progressive / cd / reflow student absorbs (None: sampler's)
    guidance_range=(1.0, 4.0),  # guided: w drawn uniformly here
    levels=18,  # cd: Karras levels of the consistency grid
    ode="heun",  # cd: the sampler that moves the teacher's ODE one level
    distance="pseudo_huber",  # cd / ct
    s0=10, s1=1280,  # ct: iCT's discretization curriculum
    init=None,  # "teacher" or "fresh" (None: fresh for ct, teacher otherwise)
    pairs=2048, pair_sampler="heun", pair_steps=18,  # reflow
    sigma_min=0.002,  # consistency models: the level the consistency function maps to
)
# a student's resumed run may change these (how long, how it logs and samples)
RESUME_MAY_CHANGE = ("train.log_every", "train.ckpt_every", "train.keep", "train.sample_every",
                     "train.num_samples", "sampler", "mesh", "data.data_dir")


def student_config(teacher_config, method, **settings):
    """The student's config: the teacher run's config (a dict or ConfigDict, as its config.json
    holds it) with `distill` = DEFAULTS updated by method and settings; `check` validates it.
    Call `finish_config` after overrides to set the student's sampler."""
    cfg = ConfigDict(dict(teacher_config) if not isinstance(teacher_config, ConfigDict)
                     else teacher_config.to_dict())
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"distill.{unknown[0]} is not a distillation setting; allowed: "
                         f"{', '.join(DEFAULTS)}")
    d = dict(DEFAULTS, method=method, **settings)
    if method in ("cd", "ct") and "student_steps" not in settings:
        d["student_steps"] = 1
    cfg.distill = d
    return cfg


def check(config):
    """ValueError (one line naming the key and what is allowed) for a bad `distill` section."""
    d = config.distill
    if d.method not in METHODS:
        raise ValueError(f"distill.method={d.method!r} is unknown; allowed: {', '.join(METHODS)}")
    for key in ("student_steps", "teacher_steps", "levels", "pairs", "pair_steps", "s0", "s1"):
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"distill.{key}={v!r} must be an integer >= 1")
    if d.method in ("progressive", "guided"):
        ratio = d.teacher_steps / d.student_steps
        if d.teacher_steps % d.student_steps or ratio < 2 or not _power_of_two(int(ratio)):
            raise ValueError(
                f"distill.teacher_steps={d.teacher_steps} / distill.student_steps="
                f"{d.student_steps} must be a power of two >= 2 (each progressive round halves "
                "the steps), e.g. 32 / 4")
    if d.levels < 2:
        raise ValueError(f"distill.levels={d.levels} must be >= 2")
    if d.init not in (None, "teacher", "fresh"):
        raise ValueError(f"distill.init={d.init!r} is unknown; allowed: teacher, fresh")
    if d.distance not in ("pseudo_huber", "l2"):
        raise ValueError(f"distill.distance={d.distance!r} is unknown; allowed: pseudo_huber, l2")
    K = int(config.model.get("num_classes", 0) or 0)
    if d.method == "guided":
        if not K:
            raise ValueError("distill.method='guided' needs a class-conditional teacher "
                             "(model.num_classes > 0, trained with label dropout)")
        lo, hi = d.guidance_range
        if not 0 <= lo <= hi:
            raise ValueError(f"distill.guidance_range={tuple(d.guidance_range)}: need "
                             "0 <= lo <= hi")
        from jaxdiff import models

        if "guidance_embed" not in models.MODELS[config.model.name].__dataclass_fields__:
            raise ValueError(f"distill.method='guided': model.name={config.model.name!r} cannot "
                             "be conditioned on the guidance scale w; allowed: unet, dit")
    w = guidance(config)
    if not (math.isfinite(w) and w >= 0):
        raise ValueError(f"distill.guidance={w!r} must be a finite number >= 0")
    if d.method == "cd":
        from jaxdiff import samplers

        samplers.get(d.ode)
    if d.method == "reflow":
        from jaxdiff import samplers

        samplers.get(d.pair_sampler)


def _power_of_two(n):
    return n >= 1 and n & (n - 1) == 0


def guidance(config):
    """The CFG scale the student absorbs: distill.guidance, else the teacher's sampler's; 1.0
    (the conditional model) for an unconditional teacher."""
    if not int(config.model.get("num_classes", 0) or 0):
        return 1.0
    g = config.distill.guidance
    return float(config.sampler.guidance if g is None else g)


# --- stages ----------------------------------------------------------------------------------

def base_grid(config, process):
    """The first progressive teacher's grid: its schedule (the run's sampler.schedule, or the
    process's default) at distill.teacher_steps, VE levels ending at 0."""
    from jaxdiff.core import schedules
    from jaxdiff.sampling import default_schedule

    name = config.sampler.schedule
    if not isinstance(name, str):
        name = default_schedule(process)
    return np.asarray(schedules.get(name)(process, config.distill.teacher_steps), np.float64)


def stages(config, process):
    """[(name, kind, sampler dict)] of the method: kind in guided, progressive, cd, ct, reflow;
    the sampler is the one the stage's student samples with."""
    d = config.distill
    if d.method in ("progressive", "guided"):
        grid = base_grid(config, process)
        out = []
        if d.method == "guided":
            out.append(("guided", "guided", _sampler("ddim", grid)))
        n, r = d.teacher_steps, 1
        while n > d.student_steps:
            n //= 2
            out.append((f"pd{n}", "progressive", _sampler("ddim", grid[::2 ** r])))
            r += 1
        return out
    if d.method in ("cd", "ct"):
        grid = obj.consistency_grid(d.student_steps, d.sigma_min, _sigma_range(process)[1])
        return [(d.method, d.method, _sampler("consistency", np.asarray(grid),
                                              sigma_min=d.sigma_min))]
    return [("pairs", "pairs", None),
            ("reflow", "reflow", _sampler("euler", euler_grid(process, d.student_steps)))]


def euler_grid(process, steps):
    """A reflowed student's grid: `steps` Euler steps uniform in the process's time, from t_max
    to 0 (t_max (1 - i / steps) for i < steps, then the final 0)."""
    from jaxdiff.core import schedules

    t = float(process.t_max) * (1.0 - np.arange(steps) / steps)
    return schedules.timesteps(process, t)


def _sampler(name, grid, **options):
    grid = [float(s) for s in np.asarray(grid, np.float64)]
    return dict(name=name, steps=len(grid) - 1, schedule=grid, options=options)


def _sigma_range(process):
    return float(process.sigma_min), float(process.sigma_max)


def teacher_grid(config, process, index):
    """The progressive teacher's grid of stage `index` (its 2N + 1 levels)."""
    first = 1 if config.distill.method == "guided" else 0
    r = index - first  # 0: the first round, whose teacher samples on the base grid
    return base_grid(config, process)[::2 ** r]


def objective_of(config, index, kind, *, student, teacher, process):
    """The objective of stage `index`: student / teacher are `apply(params, x, t, *args)`
    (the teacher already under CFG where the stage's teacher is the teacher run)."""
    d, pred = config.distill, config.loss.prediction
    K = int(config.model.get("num_classes", 0) or 0)
    if kind == "guided":
        return obj.guided_objective(student, teacher, process=process, prediction=pred,
                                    num_classes=K, guidance_range=tuple(d.guidance_range))
    if kind == "progressive":
        gr = tuple(d.guidance_range) if d.method == "guided" else None
        return obj.progressive_objective(student, teacher, process=process, prediction=pred,
                                         teacher_sigmas=teacher_grid(config, process, index),
                                         num_classes=K, guidance_range=gr)
    if kind in ("cd", "ct"):
        lo, hi = _sigma_range(process)
        common = dict(process=process, prediction=pred, distance=d.distance, num_classes=K,
                      sigma_min=d.sigma_min, sigma_max=hi)
        if kind == "cd":
            return obj.consistency_objective(
                student, teacher=teacher, ode=d.ode,
                sigmas=obj.karras_levels(d.levels, d.sigma_min, hi), **common)
        return obj.consistency_objective(
            student, curriculum=dict(total_steps=config.train.steps, s0=d.s0, s1=d.s1),
            level_sampling="lognormal", **common)
    if kind == "reflow":
        from jaxdiff.cli import build

        return obj.reflow_objective(student, process=process, prediction=pred, num_classes=K,
                                    **build.loss_options(config))
    raise ValueError(f"stage kind {kind!r} has no objective")


# --- the run ---------------------------------------------------------------------------------

def stage_dir(workdir, index, name, count):
    return workdir if index == count - 1 else os.path.join(workdir, "stages",
                                                           f"{index}-{name}")


def distill(config, workdir, *, teacher_params, record, log=True, on_stage=None):
    """Runs (or resumes) the distillation of `config` (a `student_config`) into `workdir`.

    teacher_params: the teacher's (EMA) params; record: its `teacher_record` (checked against
    the params, and against the record of a run being resumed). Returns the student's EMA
    params. The teacher's params are only read. on_stage(name, wall_s): called after each
    stage this call ran (a resumed stage: the time of its remaining steps)."""
    import time

    from jaxdiff.cli import build, commands, validate
    from jaxdiff.train import rundir

    if config.distill.method == "guided":
        config.model.guidance_embed = True
    check(config)
    process = build.process(config)
    plan = stages(config, process)
    config.sampler = _student_sampler(config, dict(config.sampler.to_dict(), **plan[-1][2]))
    validate.check_config(config)
    if params_digest(teacher_params) != record["params_sha256"]:
        raise ValueError("the teacher's params do not match their record's params_sha256")
    config.teacher = dict(record)
    with rundir.lock(workdir):
        _check_resume(config, workdir)
        commands.write_json(os.path.join(workdir, "config.json"), config.to_dict())
        teacher = teacher_params
        for index, (name, kind, sampler) in enumerate(plan):
            folder = stage_dir(workdir, index, name, len(plan))
            if kind == "pairs":
                t0 = time.perf_counter()
                if _write_pairs(config, process, teacher_params, workdir, log) and on_stage:
                    on_stage(name, time.perf_counter() - t0)
                continue
            scfg = ConfigDict(config.to_dict())
            scfg.sampler = _student_sampler(config, dict(config.sampler.to_dict(), **sampler))
            if log:
                print(f"jaxdiff distill: stage {index + 1}/{len(plan)} {name} in {folder}",
                      file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            teacher = _run_stage(scfg, folder, index, kind, process, teacher,
                                 first=teacher is teacher_params, original=teacher_params,
                                 workdir=workdir, log=log)
            if on_stage is not None:
                on_stage(name, time.perf_counter() - t0)
    return teacher


def _student_sampler(config, sampler):
    """The student's sampler section: a guided student is sampled at w = distill's guidance
    (the --guidance flag changes it), every other one absorbed its guidance."""
    s = dict(sampler)
    s["guidance"] = guidance(config)
    s.setdefault("cache", None)
    return s


def _check_resume(config, workdir):
    """One line unless the run in `workdir`, if any, is this distillation of this teacher."""
    from jaxdiff.train import rundir

    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return
    if not isinstance(old, dict):
        return
    was = (old.get("teacher") or {}).get("params_sha256")
    if was is not None and was != config.teacher["params_sha256"]:
        raise ValueError(f"{workdir} distils a teacher whose params had sha256 {was[:12]}...; "
                         f"{config.teacher['workdir']} step {config.teacher['step']} has "
                         f"{config.teacher['params_sha256'][:12]}... now; use a fresh --workdir")
    changed = rundir.changed_settings(old, config.to_dict(), RESUME_MAY_CHANGE + ("teacher",))
    if changed:
        raise ValueError(f"{workdir} holds a distillation with other settings "
                         f"({'; '.join(changed[:3])}); resume it with its settings or use a "
                         "fresh --workdir")


def _models(config):
    from jaxdiff.cli import build

    teacher_model = build.model(_plain_model_config(config))
    student_model = teacher_model
    if config.distill.method == "guided":
        c = ConfigDict(config.to_dict())
        c.model.guidance_embed = True
        student_model = build.model(c)
    return teacher_model, student_model


def _plain_model_config(config):
    c = ConfigDict(config.to_dict())
    if "guidance_embed" in c.model:
        del c.model["guidance_embed"]
    return c


def _run_stage(config, folder, index, kind, process, teacher, *, first, original, workdir, log):
    """Trains stage `index` in `folder` (resuming) and returns its EMA params."""
    from jaxdiff import train as train_lib
    from jaxdiff.cli import build, commands
    from jaxdiff.train.step import ModelApply

    d = config.distill
    K = int(config.model.get("num_classes", 0) or 0)
    teacher_model, student_model = _models(config)
    # the stage's teacher network: the teacher run (under CFG at the absorbed scale), or the
    # previous stage's student (a guided student takes w, the others absorbed their guidance)
    guided_student = d.method == "guided"
    t_model = student_model if (guided_student and not first) else teacher_model
    t_apply = ModelApply(t_model)
    if first and kind != "guided":
        t_apply = with_cfg(t_apply, guidance(config), K)
    s_apply = ModelApply(student_model)
    objective = objective_of(config, index, kind, student=s_apply, teacher=t_apply,
                             process=process)
    tx, lr_fn = build.optimizer(config)
    shape = tuple(build.data_info(config)["shape"])
    c = config.train
    state = train_lib.init_state(student_model, tx, x_shape=shape, num_classes=K, seed=c.seed,
                                 ema_decays=tuple(config.optim.ema_decays))
    if (d.init or ("fresh" if kind == "ct" else "teacher")) == "teacher":
        params = graft(state.params, teacher if not first else original)
        state = state.replace(params=params, ema_params=tuple(
                                  jax.tree.map(jnp.copy, params) for _ in state.ema_params),
                              opt_state=tx.init(params))
    commands.write_json(os.path.join(folder, "config.json"), config.to_dict())
    data = (build.dataset(config, c.seed) if kind != "reflow"
            else _pairs_data(config, workdir, c.seed))
    step = train_lib.make_train_step(objective, tx, lr_fn,
                                     ema_decays=tuple(config.optim.ema_decays))

    def sample_fn(state, at):
        if folder == workdir or at == c.steps:
            x, _ = commands.draw(config, student_model, process, state.ema_params[0],
                                 num=c.num_samples, seed=0)
            commands._save_samples(os.path.join(folder, "samples", f"step_{at:07d}.png"), x,
                                   cols=K or None)

    description = dict(build.description(config), distill_stage=f"{index}-{kind}")
    state = train_lib.train(state, step, data, workdir=folder, total_steps=c.steps,
                            log_every=c.log_every, ckpt_every=c.ckpt_every, keep=c.keep,
                            sample_every=0, sample_fn=sample_fn if log else None,
                            description=description, frozen=teacher, log=log)
    return state.ema_params[0]


# --- reflow pairs ----------------------------------------------------------------------------

def pairs_path(workdir):
    return os.path.join(workdir, "pairs.npz")


def _write_pairs(config, process, teacher_params, workdir, log):
    """(noise, sample, label) pairs of the guided teacher's ODE, written once atomically."""
    from jaxdiff.cli import build
    from jaxdiff.data import pairs as pairs_lib

    path = pairs_path(workdir)
    if os.path.exists(path):
        return False
    d = config.distill
    c = ConfigDict(config.to_dict())
    c.sampler = dict(name=d.pair_sampler, steps=d.pair_steps, schedule=None,
                     guidance=guidance(config), options={}, cache=None)
    del c["distill"]
    teacher_model, _ = _models(config)
    shape = tuple(build.data_info(config)["shape"])
    K = int(config.model.get("num_classes", 0) or 0)
    xs, zs, ys = [], [], []
    chunk = 256
    for start in range(0, d.pairs, chunk):
        n = min(chunk, d.pairs - start)
        x, z, y = _teacher_pairs(c, teacher_model, process, teacher_params, n, shape, K,
                                 seed=start)
        xs.append(x), zs.append(z), ys.append(y)
        if log:
            print(f"jaxdiff distill: reflow pairs {start + n}/{d.pairs}", file=sys.stderr,
                  flush=True)
    pairs_lib.write(path, x=np.concatenate(xs), noise=np.concatenate(zs),
                    label=np.concatenate(ys))
    return True


def _teacher_pairs(config, model, process, params, n, shape, K, seed):
    import jaxdiff
    from jaxdiff import train as train_lib
    from jaxdiff.core.guidance import CFG

    key = jax.random.key(10_000 + seed)
    z = jax.random.normal(key, (n,) + shape, jnp.float32)
    y = np.arange(seed, seed + n) % max(K, 1)
    guide = None
    if K:
        guide = CFG(scale=config.sampler.guidance, y=jnp.asarray(y, jnp.int32),
                    y_null=jnp.full(n, K, jnp.int32))
    s = config.sampler
    x = jaxdiff.sample(train_lib.network(model, params), z, process=process,
                       prediction=config.loss.prediction, sampler=s.name, steps=s.steps,
                       schedule=s.schedule, guidance=guide)
    return np.asarray(x), np.asarray(z), y.astype(np.int32)


def _pairs_data(config, workdir, seed):
    from jaxdiff.data import pairs as pairs_lib

    return pairs_lib.build(pairs_path(workdir), batch_size=config.data.batch_size, seed=seed)


# --- sampling a student ----------------------------------------------------------------------

def conditioning(config, y, guidance_scale=None, put=jnp.asarray):
    """How a student is called (`jaxdiff.core.guidance.Conditioning`, one network pass):
    labels `y`, and for a guided student the guidance scale w (`guidance_scale`, else its
    sampler's) per sample. A student that absorbed a fixed guidance scale refuses another."""
    from jaxdiff.core.guidance import Conditioning

    if not config.model.get("guidance_embed"):
        g = config.sampler.guidance
        if guidance_scale is not None and float(guidance_scale) != float(g):
            raise ValueError(f"--guidance={guidance_scale}: this student absorbed classifier-free "
                             f"guidance at {g} (distill.method={config.distill.method!r}); "
                             f"allowed: {g}, or distil with method guided for a choice of w")
        return Conditioning((y,))
    w = config.sampler.guidance if guidance_scale is None else guidance_scale
    lo, hi = config.distill.guidance_range
    if not lo <= float(w) <= hi:
        print(f"jaxdiff: warning: guidance {w} is outside the range this student was distilled "
              f"on, {lo}..{hi}", file=sys.stderr)
    return Conditioning((y, put(np.full(y.shape[0], float(w), np.float32))))
