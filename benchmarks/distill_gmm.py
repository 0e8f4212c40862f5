"""Few-step students of an exact Gaussian-mixture teacher (issue 15).

The teacher is the closed-form denoiser of a 2-D mixture (`analytic.gmm_denoiser`) on EDM's
process, so its probability-flow ODE map from noise to data is known to solver precision
(`ode` sampler, rtol = atol = 1e-6): a student's distance to that map is its distillation
error alone. Students: a residual MLP (`jaxdiff.models.MLP`) trained from scratch with each
objective of `jaxdiff.distill` through `make_train_step`:
- progressive distillation: rounds from the exact teacher on 16 Karras steps down to 1 step,
  each round's student initialized from the previous one, its grid every other level of its
  teacher's; sampled with DDIM on that grid;
- consistency distillation (Heun on the teacher) and consistency training (data only), on a
  Karras grid of `CM_LEVELS` levels, and consistency training with iCT's doubling curriculum
  and lognormal pairs; sampled with the consistency sampler on `consistency_grid`;
- reflow: the denoising loss on `REFLOW_PAIRS` (teacher sample, its noise) pairs of the
  teacher's ODE (Heun, 64 steps), instead of independent noise; sampled with Euler;
Scores at 1, 2, 4, 8 steps on fixed noise: RMSE to the exact ODE map (for the deterministic
maps), the sliced Wasserstein-1 distance to the exact map's samples (a distribution distance,
also for multistep consistency sampling, which renoises), and the mixture-weight error (total
variation between the weights of the components the samples land nearest to and the true
weights). The teacher itself at the same steps (DDIM, Heun and DPM-Solver++(2M) on the
exact denoiser) for reference.

    PYTHONPATH=$PWD/benchmarks python benchmarks/distill_gmm.py [--quick] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import os
import time

import _timing
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdiff
from jaxdiff import distill
from jaxdiff.core import analytic, schedules
from jaxdiff.core.denoiser import model_from_denoiser
from jaxdiff.models import MLP
from jaxdiff.train import make_train_step
from jaxdiff.train.state import init_state
from jaxdiff.train.step import ModelApply

MEANS = np.array([[-1.0, -1.0], [1.0, -0.5], [0.0, 1.2], [1.4, 1.0]])
STDS = np.array([0.12, 0.1, 0.15, 0.08])
WEIGHTS = np.array([0.4, 0.3, 0.2, 0.1])
SIGMA_DATA = 1.0
STEPS = (1, 2, 4, 8)
EVAL_NUM = 4096
CM_LEVELS = 18
REFLOW_PAIRS = 16384
HERE = os.path.dirname(os.path.abspath(__file__))
log = _timing.progress


def sample_data(key, n):
    k_c, k_x = jax.random.split(key)
    c = jax.random.choice(k_c, len(WEIGHTS), (n,), p=jnp.asarray(WEIGHTS))
    return jnp.asarray(MEANS)[c] + jnp.asarray(STDS)[c][:, None] * jax.random.normal(k_x, (n, 2))


def weight_error(x):
    """Total variation between the nearest-component shares of x and the true weights."""
    d = np.sum((np.asarray(x)[:, None, :] - MEANS[None]) ** 2, axis=-1)
    share = np.bincount(np.argmin(d, axis=1), minlength=len(WEIGHTS)) / len(x)
    return 0.5 * float(np.sum(np.abs(share - WEIGHTS)))


def sliced_w1(x, y, directions=64):
    """Sliced Wasserstein-1 distance between two equal-size 2-D samples (the mean over fixed
    random directions of the 1-D W1 of the sorted projections): a distribution distance, for
    samplers that do not follow the ODE map (multistep consistency sampling renoises)."""
    theta = np.random.default_rng(0).normal(size=(2, directions))
    theta /= np.linalg.norm(theta, axis=0)
    return float(np.mean(np.abs(np.sort(x @ theta, axis=0) - np.sort(y @ theta, axis=0))))


class Setup:
    def __init__(self, iters, batch):
        self.process = jaxdiff.EDM(sigma_data=SIGMA_DATA)
        self.D = analytic.gmm_denoiser(MEANS, STDS, WEIGHTS)
        self.teacher_net = model_from_denoiser(self.D, self.process, "edm")
        self.iters, self.batch = iters, batch
        self.noise = jax.random.normal(jax.random.key(123), (EVAL_NUM, 2))
        t0 = time.perf_counter()
        # the probability-flow ODE from sigma_max down to sigma_min, then D (the last step)
        grid = np.array([self.process.t_max, self.process.t_min, 0.0])
        self.exact = np.asarray(self.draw(self.teacher_net, "ode", 2, schedule=grid,
                                          rtol=1e-6, atol=1e-6))
        log(f"exact ODE map of {EVAL_NUM} noise draws ({time.perf_counter() - t0:.0f} s)")

    def draw(self, net, sampler, steps, schedule="karras", **kw):
        return jaxdiff.sample(net, self.noise, process=self.process, prediction="edm",
                              sampler=sampler, steps=steps, schedule=schedule, **kw)

    def score(self, x):
        x = np.asarray(x)
        return dict(rmse=float(np.sqrt(np.mean((x - self.exact) ** 2))), weight_err=weight_error(x),
                    sw=sliced_w1(x, self.exact))

    def train(self, objective, params=None, frozen=None, seed=0, lr=2e-3, batches=None):
        """A fresh MLP student (or `params`) trained `iters` steps; returns (EMA params,
        seconds, final loss)."""
        model = MLP(width=128, depth=3)
        tx = optax.adam(optax.cosine_decay_schedule(lr, self.iters))
        state = init_state(model, tx, x_shape=(2,), num_classes=0, seed=seed,
                           ema_decays=(0.999,))
        if params is not None:
            state = state.replace(params=params, ema_params=(params,),
                                  opt_state=tx.init(params))
        step = jax.jit(make_train_step(objective, tx, lambda s: lr, ema_decays=(0.999,)))
        t0 = time.perf_counter()
        for i in range(self.iters):
            batch = ({"x": sample_data(jax.random.key(10_000 + i), self.batch)}
                     if batches is None else batches(i))
            state, metrics = step(state, batch, frozen)
        loss = float(metrics["loss"])
        return state.ema_params[0], time.perf_counter() - t0, loss


def student_net(params):
    return jax.tree_util.Partial(ModelApply(MLP(width=128, depth=3)), params)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    iters, batch = (200, 256) if args.quick else (3000, 512)
    S = Setup(iters, batch)
    student = ModelApply(MLP(width=128, depth=3), train=True)
    exact_teacher = lambda frozen, x, t, *a: S.teacher_net(x, t, *a)  # noqa: E731
    rows = []
    for name in ("ddim", "heun", "dpmpp_2m"):
        for n in STEPS:
            rows.append(dict(method=f"teacher {name}", steps=n, **S.score(S.draw(
                S.teacher_net, name, n))))
    # progressive distillation: the exact teacher on 16 Karras steps -> 8 -> 4 -> 2 -> 1, each
    # student's grid every other level of its teacher's
    base = np.asarray(schedules.karras(S.process, 2 * STEPS[-1]), np.float32)
    teacher, frozen, params, total, stride = exact_teacher, None, None, 0.0, 1
    while (len(base) - 1) // stride > 1:
        grid = jnp.asarray(base[::stride])
        obj = distill.progressive_objective(student, teacher, process=S.process,
                                            prediction="edm", teacher_sigmas=grid)
        params, secs, loss = S.train(obj, params=params, frozen=frozen)
        total += secs
        stride *= 2
        n = (len(base) - 1) // stride
        x = S.draw(student_net(params), "ddim", n, schedule=base[::stride])
        rows.append(dict(method="progressive", steps=n, train_s=total, **S.score(x)))
        log(f"progressive {n} steps: {rows[-1]} (loss {loss:.4g})")
        teacher, frozen = ModelApply(MLP(width=128, depth=3)), params
    # consistency distillation and training
    levels = distill.karras_levels(CM_LEVELS)
    ict = dict(curriculum=dict(total_steps=iters), level_sampling="lognormal")
    for label, teacher_fn, grid in (("consistency distillation", exact_teacher, {}),
                                    ("consistency training", None, {}),
                                    ("consistency training (iCT)", None, ict)):
        obj = distill.consistency_objective(student, process=S.process, prediction="edm",
                                            teacher=teacher_fn,
                                            **(grid or dict(sigmas=levels)))
        params, secs, loss = S.train(obj, frozen={} if teacher_fn else None)
        for n in STEPS:
            x = S.draw(student_net(params), "consistency", n, key=jax.random.key(7),
                       schedule=np.asarray(distill.consistency_grid(n, float(levels[-1]))),
                       sigma_min=float(levels[-1]))
            rows.append(dict(method=label, steps=n, train_s=secs, **S.score(x)))
        log(f"{label}: {rows[-len(STEPS):]} (loss {loss:.4g})")
    # reflow: the denoising loss on (teacher sample, its noise) pairs; the exact teacher's
    # ODE (Heun, 64 Karras steps) on REFLOW_PAIRS noise draws; sampled with Euler (= DDIM)
    z = jax.random.normal(jax.random.key(77), (REFLOW_PAIRS, 2))
    x0 = jaxdiff.sample(S.teacher_net, z, process=S.process, prediction="edm", sampler="heun",
                        steps=64)
    obj = distill.reflow_objective(student, process=S.process, prediction="edm",
                                   weighting="uniform", time_sampling="lognormal",
                                   p_mean=1.0, p_std=2.0)  # levels up to sigma_max matter
    params, secs, loss = S.train(obj, batches=lambda i: {
        "x": x0[(i * S.batch + jnp.arange(S.batch)) % REFLOW_PAIRS],
        "noise": z[(i * S.batch + jnp.arange(S.batch)) % REFLOW_PAIRS]})
    for n in STEPS:
        x = S.draw(student_net(params), "euler", n)
        rows.append(dict(method="reflow", steps=n, train_s=secs, **S.score(x)))
    log(f"reflow: {rows[-len(STEPS):]} (loss {loss:.4g})")
    md = ["| method | steps | RMSE to exact ODE map | sliced W1 to exact samples | "
          "mixture-weight error | train s |", "|---|---|---|---|---|---|"]
    md += [f"| {r['method']} | {r['steps']} | {r['rmse']:.4f} | {r['sw']:.4f} | "
           f"{r['weight_err']:.3f} | {r.get('train_s', float('nan')):.0f} |" for r in rows]
    name = "distill_gmm_quick" if args.quick else "distill_gmm"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    _timing.save_json(os.path.join(args.out, f"{name}.json"), dict(rows=rows))
    print("\n".join(md))


if __name__ == "__main__":
    main()
