"""SiT's observation on the testbed: sampling a trained velocity model with the SDE
dx = [v - w s/2] dt + sqrt(w) dW (`jaxdiff.samplers.interpolant`) instead of its ODE, with the
diffusion coefficient w(t) = w_scale * sigma(t) chosen after training.

    python benchmarks/interpolant_sde.py [--model digits16_flow] [--num 500]
        [--steps 50 100] [--w-scales 0.5 1 2 4] [--diffusion sigma] [--stale-ok]

Model: the testbed's rectified-flow DiT (`digits16_flow`: flow prediction, alpha = 1 - t,
sigma = t, which is SiT's Linear path), class-conditional with the testbed's CFG scale 2. Grid:
SiT's (`sit_schedule`: uniform in t down to t = 0.04, then one last step to 0); the ODE row
(w = 0) is Euler on that grid, the SDE rows are Euler-Maruyama with SiT's default last step
("mean": the drift without noise). w_scale = 2 with `diffusion="sigma"` is SiT's sample.py
default (its diffusion_norm = 1 draws sqrt(2 sigma) dW). Scores: `testbed.score` (FD_digits
against the held-out digits, and the digit classifier's agreement with the requested labels),
the same noise and labels for every row.

The model is never (re)built here: a missing or stale cache stops the script. `--stale-ok` reads
the cached parameters even when their fingerprint no longer matches the sources (the cache
predates an edit of a fingerprinted file); the output then records both fingerprints.

Writes benchmarks/out/interpolant_sde.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import flax
import jax
import testbed

from jaxdiff import train as train_lib
from jaxdiff.samplers.interpolant import sit_schedule

OUT = os.path.join(testbed.HERE, "out", "interpolant_sde.json")


def _load(name, stale_ok):
    """(Testbed, note): the cached model, never built; with `stale_ok` a stale cache is read."""
    try:
        return testbed.load(name, build=False, log=False), None
    except FileNotFoundError as e:
        if not stale_ok:
            sys.exit(f"{e}\nnot rebuilding it here; pass --stale-ok to read the cached parameters "
                     "anyway (recorded in the output)")
    spec = json.loads(json.dumps(testbed.SPECS[name]))
    folder = os.path.join(testbed.CACHE, name)
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    if meta.get("settings") != spec:
        sys.exit(f"cached {name} was trained from other settings than testbed.SPECS[{name!r}]")
    with open(os.path.join(folder, "params.msgpack"), "rb") as f:
        params = jax.tree.map(jax.numpy.asarray, flax.serialization.msgpack_restore(f.read()))
    shape = testbed._shape(spec)
    model = testbed._model(spec, shape)
    tb = testbed.Testbed(name=name, params=params, model=model,
                         model_fn=train_lib.network(model, params), process=testbed._process(spec),
                         prediction=spec["loss"]["prediction"], settings=spec,
                         num_classes=spec["model"].get("num_classes", 0), shape=shape,
                         meta=dict(meta, built_now=False))
    note = dict(stale_cache=True, cached_fingerprint=meta.get("fingerprint"),
                current_fingerprint=testbed.fingerprint(spec))
    return tb, note


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="digits16_flow")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--steps", type=int, nargs="+", default=[50, 100])
    p.add_argument("--w-scales", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    p.add_argument("--diffusion", default="sigma")
    p.add_argument("--last-step-size", type=float, default=0.04)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stale-ok", action="store_true")
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    tb, note = _load(args.model, args.stale_ok)
    schedule = functools.partial(sit_schedule, last_step_size=args.last_step_size)
    rows = []
    for steps in args.steps:
        for w_scale in [0.0, *args.w_scales]:
            opts = dict(diffusion="none") if w_scale == 0 else dict(diffusion=args.diffusion,
                                                                   w_scale=w_scale)
            t0 = time.perf_counter()
            x, labels = testbed.sample(tb, num=args.num, seed=args.seed, sampler="interpolant_sde",
                                       steps=steps, schedule=schedule, **opts)
            s = testbed.score(x, labels, resolution=tb.resolution)
            rows.append(dict(steps=steps, w_scale=w_scale, diffusion=opts["diffusion"],
                             fd=s["fd"], fd_real=s["fd_real"], agreement=s["agreement"],
                             sample_s=round(time.perf_counter() - t0, 1)))
            r = rows[-1]
            print(f"steps {steps:4d}  w = {w_scale:g} * {r['diffusion']:6s}  FD {r['fd']:.3f}  "
                  f"agreement {r['agreement']:.3f}  ({r['sample_s']} s)", flush=True)
            result = dict(model=args.model, num=args.num, seed=args.seed,
                          guidance=tb.sampler["guidance"], last_step="mean",
                          schedule=f"sit_schedule(last_step_size={args.last_step_size})",
                          fd_real=rows[0]["fd_real"], rows=rows, **(note or {}),
                          command="python benchmarks/interpolant_sde.py "
                          + " ".join(argv or sys.argv[1:]))
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "w") as f:  # after every row: a long run keeps what it has
                json.dump(result, f, indent=1)
    print(f"\n{args.model}, {args.num} samples, CFG {result['guidance']}, SiT grid; "
          f"FD_digits of real digits: {result['fd_real']:.2f}\n")
    print("| steps | w(t) | FD_digits | agreement |\n| --- | --- | --- | --- |")
    for r in rows:
        w = "0 (ODE, Euler)" if r["w_scale"] == 0 else f"{r['w_scale']:g} σ(t)"
        print(f"| {r['steps']} | {w} | {r['fd']:.3f} | {r['agreement']:.3f} |")
    return result


if __name__ == "__main__":
    main()
