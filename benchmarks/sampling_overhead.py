"""Per-step sampling overhead: jaxdiff vs diffusers' scheduler loop, with a trivial denoiser.

The denoiser does almost nothing (x0-hat = 0.9 x on a (1, 16) state), so the time per step is
the sampler machinery itself: for diffusers, the Python loop over `scheduler.step` (DDIM, Song
et al. 2021; DPM-Solver++(2M), Lu et al. 2022b) with a torch "model" returning 0.9 x; for
jaxdiff, (a) the public `jaxdiff.sample` call end to end (eager schedule, padding, dispatch of
one compiled program whose loop runs on the device) and (b) the sampler function jitted alone
over a precomputed grid. Both sides sample a DDPM linear-beta process (1000 training steps) on
a trailing grid and time the whole call (diffusers: `set_timesteps` plus the loop). Compilation
is excluded from the step times and reported separately. Per-step overhead = time / steps;
the marginal cost per step, net of each call's fixed cost, comes from the two step counts.

    python benchmarks/sampling_overhead.py [--quick] [--repeats 7]

Prints a table and writes benchmarks/out/sampling_overhead.json.
"""

from __future__ import annotations

import os

import _timing
import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff import sampling
from jaxdiff.core import schedules
from jaxdiff.core.process import DiscreteVP
from jaxdiff.samplers import SAMPLERS

PAIRS = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
STEPS = {"full": (50, 1000), "quick": (5, 20)}
SHAPE = (1, 16)
TARGET = 1 / 50


def trivial_model(x, t):
    """A network that predicts x0-hat = 0.9 x, whatever t."""
    return 0.9 * x


def jaxdiff_sample(name, steps, noise, process):
    """The public entry, end to end; blocks on the result."""
    def run():
        return jaxdiff.sample(trivial_model, noise, process=process, prediction="x0",
                              sampler=name, steps=steps, schedule="trailing").block_until_ready()
    return run


def jaxdiff_jitted(name, steps, noise, process):
    """The sampler alone, jitted over a precomputed grid (the device loop's own cost);
    returns (run, compile seconds)."""
    sigmas = jnp.asarray(schedules.get("trailing")(process, steps), jnp.float32)
    fn = jax.jit(lambda x, s: SAMPLERS[name](lambda x, sigma: 0.9 * x, x, s))
    compiled, seconds = _timing.timed(lambda: fn.lower(noise, sigmas).compile())
    return (lambda: compiled(noise, sigmas).block_until_ready()), seconds


def diffusers_loop(cls_name, steps, noise):
    """diffusers' standard loop: set_timesteps, then scale_model_input / model / step."""
    import diffusers
    import torch

    scheduler = getattr(diffusers, cls_name)(beta_schedule="linear", prediction_type="sample",
                                             timestep_spacing="trailing")
    x0 = torch.from_numpy(np.array(noise))  # a writable copy

    def run():
        scheduler.set_timesteps(steps)
        x = x0 * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = 0.9 * scheduler.scale_model_input(x, t)
            x = scheduler.step(out, t, x).prev_sample
        return x
    return run


def measure(name, steps, repeats):
    """Times the three contenders alternately for one sampler and step count."""
    process = DiscreteVP.linear()
    noise = jax.random.normal(jax.random.key(0), SHAPE, jnp.float32)
    sample = jaxdiff_sample(name, steps, noise, process)
    traces = sampling.trace_count()
    _, first_s = _timing.timed(sample)  # traces and compiles unless this capacity was seen
    jitted, compile_s = jaxdiff_jitted(name, steps, noise, process)
    traced_before = sampling.trace_count()
    times = _timing.interleaved({
        "jaxdiff.sample": sample, "jaxdiff sampler (jitted)": jitted,
        f"diffusers {PAIRS[name]}": diffusers_loop(PAIRS[name], steps, noise),
    }, repeats=repeats)
    rows = {k: dict(_timing.stats(v), per_step_s=np.median(v) / steps,
                    per_step_best_s=min(v) / steps) for k, v in times.items()}
    ref = rows[f"diffusers {PAIRS[name]}"]["per_step_s"]
    for r in rows.values():
        r["ratio_to_diffusers"] = r["per_step_s"] / ref
    return dict(sampler=name, steps=steps, first_call_s=first_s, jitted_compile_s=compile_s,
                traces_first_call=traced_before - traces,
                retraces_while_timed=sampling.trace_count() - traced_before, contenders=rows)


def marginal(results):
    """Per-step cost net of the fixed per-call cost: (t(n_max) - t(n_min)) / (n_max - n_min)
    from the medians at the smallest and largest step counts, per sampler and implementation."""
    out = []
    for name in PAIRS:
        mine = sorted((r for r in results if r["sampler"] == name), key=lambda r: r["steps"])
        lo, hi = mine[0], mine[-1]
        dn = hi["steps"] - lo["steps"]
        rows = {k: (hi["contenders"][k]["median_s"] - lo["contenders"][k]["median_s"]) / dn
                for k in lo["contenders"]}
        ref = rows[f"diffusers {PAIRS[name]}"]
        out.append(dict(sampler=name, steps=[lo["steps"], hi["steps"]], per_step_s=rows,
                        ratio_to_diffusers={k: v / ref for k, v in rows.items()}))
    return out


def report(results, margins, load):
    rows = []
    for r in results:
        for k, s in r["contenders"].items():
            rows.append([r["sampler"], r["steps"], k, f"{1e3 * s['median_s']:.3f}",
                         f"{1e6 * s['per_step_s']:.2f}", f"{1e6 * s['per_step_best_s']:.2f}",
                         f"{s['ratio_to_diffusers']:.4f}"])
    head = ["sampler", "steps", "implementation", "call ms (median)", "us/step (median)",
            "us/step (min)", "ratio to diffusers"]
    lines = [_timing.table(head, rows), "", "Marginal cost per step, (t(n2) - t(n1)) / (n2 - n1):",
             _timing.table(["sampler", "n1, n2", "implementation", "us/step", "ratio to diffusers"],
                           [[m["sampler"], m["steps"], k, f"{1e6 * v:.3f}",
                             f"{m['ratio_to_diffusers'][k]:.4f}"]
                            for m in margins for k, v in m["per_step_s"].items()]),
             "", f"target: ratio <= {TARGET:.3f} (1/50); "
             f"load average before/after: {load[0]} / {load[1]}"]
    for r in results:
        lines.append(f"{r['sampler']} {r['steps']} steps: first jaxdiff.sample call "
                     f"{r['first_call_s']:.2f} s ({r['traces_first_call']} trace), jitted sampler "
                     f"compile {r['jitted_compile_s']:.2f} s, retraces while timed "
                     f"{r['retraces_while_timed']}")
    return "\n".join(lines)


def main():
    _, args = _timing.parse_args(__doc__.splitlines()[0], repeats=7)
    import torch

    torch.set_num_threads(os.cpu_count())
    load_before = os.getloadavg()
    results = [measure(name, n, args.repeats) for name in PAIRS
               for n in STEPS["quick" if args.quick else "full"]]
    load = (tuple(round(v, 2) for v in load_before), tuple(round(v, 2) for v in os.getloadavg()))
    margins = marginal(results)
    print(report(results, margins, load))
    path = _timing.write_json(args.out, "sampling_overhead", dict(
        machine=_timing.machine(), load_avg_before=load[0], load_avg_after=load[1],
        quick=args.quick, shape=SHAPE, target_ratio=TARGET, results=results,
        marginal=margins))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
