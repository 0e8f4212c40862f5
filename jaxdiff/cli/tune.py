"""`jaxdiff tune-sampler`: fits a learned few-step solver (`jaxdiff.core.solver_fit`) to a
trained run's EMA model and writes its solver file (JSON).

    jaxdiff tune-sampler --workdir RUN --nfe 5 [--out FILE] [--num 1024] [--iters 150]
                         [--order 2] [--init trailing] [--loss huber] [--seed 0]
                         [--no-corrector] [--end sigma_min|zero]

Calibration: --num standard-normal draws (class-conditional models: classes cycled, CFG at
the config's guidance); their reference end points come from the run's own sampler at 8x the
NFE in steps on the same grid kind (dpmpp_3m). A fifth of the draws is held out for early
stopping. The default start (order 2, a grid ending at sigma_min with no final denoising call)
is what measured best on the testbed models (benchmarks/RESULTS.md, "Samplers II"). Default
--out: RUN/solvers/solver_nfe<N>.json. Then:

    jaxdiff sample --workdir RUN --sampler learned --sampler_file FILE
"""

from __future__ import annotations

import argparse
import json
import os
import sys

USAGE = __doc__.split("\n\n")[1]


def parser():
    ap = argparse.ArgumentParser(prog="jaxdiff tune-sampler", add_help=True,
                                 description="fit a learned few-step solver to a trained run")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--nfe", type=int, required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--num", type=int, default=1024, help="calibration draws")
    ap.add_argument("--iters", type=int, default=150)
    ap.add_argument("--order", type=int, default=2)
    ap.add_argument("--end", choices=("sigma_min", "zero"), default="sigma_min",
                    help="sigma_min: the (N+1)-level grid without its final 0, N calls and no "
                         "final denoising call; zero: the N-step grid to 0")
    ap.add_argument("--init", default=None, help="initial grid (default: the run's schedule)")
    ap.add_argument("--loss", default="huber")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-corrector", action="store_true",
                    help="fit the predictor table only (no corrector table)")
    return ap


def main(argv):
    """argv: the arguments after `tune-sampler`. Returns the exit status."""
    args = parser().parse_args(argv)
    if args.nfe < 2:
        print(f"jaxdiff tune-sampler: error: --nfe={args.nfe} must be >= 2", file=sys.stderr)
        return 2
    if args.num < 8:
        print(f"jaxdiff tune-sampler: error: --num={args.num} must be >= 8", file=sys.stderr)
        return 2
    cfg_path = os.path.join(args.workdir, "config.json")
    if not os.path.exists(cfg_path):
        print(f"jaxdiff tune-sampler: error: no trained run in {args.workdir} ({cfg_path} is "
              "missing)", file=sys.stderr)
        return 2
    try:
        out = tune(args)
    except ValueError as e:
        print(f"jaxdiff tune-sampler: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def tune(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from ml_collections import ConfigDict

    from jaxdiff import samplers
    from jaxdiff import train as train_lib
    from jaxdiff.cli import build, commands
    from jaxdiff.core import schedules, solver_fit
    from jaxdiff.core.denoiser import denoiser as make_denoiser
    from jaxdiff.core.guidance import cfg as cfg_guidance
    from jaxdiff.sampling import default_schedule
    from jaxdiff.train import parallel

    with open(os.path.join(args.workdir, "config.json")) as f:
        config = ConfigDict(json.load(f))
    model, process, params, step = commands.restore(config, args.workdir, parallel.make_mesh())
    net = train_lib.network(model, params)
    D = make_denoiser(net, process, config.loss.prediction)
    shape = tuple(build.data_info(config)["shape"])
    n = args.num
    noise = jax.random.normal(jax.random.key(args.seed), (n,) + shape, jnp.float32)
    K = commands.classes(config)
    cond = ()
    scale = float(config.sampler.get("guidance", 1.0) or 1.0)
    if K:
        cond = (jnp.arange(n, dtype=jnp.int32) % K,)

        def Dc(x, sigma, y):
            return cfg_guidance(D, scale, y, jnp.full_like(y, K))(x, sigma)
    else:
        def Dc(x, sigma):
            return D(x, sigma)

    sched = args.init or config.sampler.get("schedule") or default_schedule(process)
    init = np.asarray(schedules.get(sched)(process, args.nfe + (args.end == "sigma_min")),
                      np.float64)
    if args.end == "sigma_min" and init[-1] == 0:
        init = init[:-1]
    fine = jnp.asarray(schedules.get(sched)(process, 8 * args.nfe), jnp.float32)
    x = noise * process.prior_scale(init[0]).astype(noise.dtype)
    ref_fn = jax.jit(lambda x, *c: samplers.SAMPLERS["dpmpp_3m"](
        lambda y, s: Dc(y, s, *c), x, fine))
    ref = jnp.concatenate([ref_fn(x[i : i + 256], *(a[i : i + 256] for a in cond))
                           for i in range(0, n, 256)])
    floor = float(fine[-2]) if init[-1] == 0 else None
    solver = solver_fit.fit_solver(
        Dc, x, ref, init, order=args.order, sigma_floor=floor, cond_cal=cond, iters=args.iters,
        batch=min(args.batch, int(0.8 * n)), loss=args.loss, seed=args.seed, eval_every=5,
        patience=8, corrector=not args.no_corrector, process=process)
    info = solver["fit"]
    info.pop("history", None)
    info.update(run=os.path.abspath(args.workdir), step=step, init=sched, guidance=scale,
                reference=f"dpmpp_3m, {8 * args.nfe} steps")
    out = args.out or os.path.join(args.workdir, "solvers", f"solver_nfe{args.nfe}.json")
    solver_fit.save_solver(out, solver)
    print(f"validation RMSE {info['initial_validation_rmse']:.4g} ({sched}) -> "
          f"{info['validation_rmse']:.4g} (learned), calibration {info['calibration_rmse']:.4g}")
    return out
