"""`jaxdiff plan` checked against measured runs, and the DiT-XL/2 plan for TPU pods.

    python benchmarks/plan.py [--quick] [--skip-xl] [--xl-search] [--out benchmarks/out]

1. Planned vs measured, on CPU. For a few small configs the planner's per-device total
   (`jaxdiff.train.plan.plan_of`: arguments + outputs - aliases + temporaries of the compiled
   step) is compared with the memory the step takes when it runs: in a fresh process (N fake
   CPU devices), the same compiled step is run once to warm up, the arrays dropped, the resident
   set read (VmRSS), the kernel's peak counter reset (`echo 5 > /proc/self/clear_refs`), then a
   fresh state and batch are made and one step runs; measured = (VmHWM - that VmRSS) / N. glibc
   is told to mmap every buffer over 64 KiB (MALLOC_MMAP_THRESHOLD_), so freed buffers leave
   the resident set. `jax.devices()[0].memory_stats()` returns None on CPU, so RSS it is.
2. DiT-XL/2 on ImageNet-256 latents (configs/imagenet256_dit_xl2.py, global batch 256) planned
   with `jaxdiff plan --topology v5e-N` at 8, 64 and 256 devices (data / data×fsdp meshes) and
   remat none, full, dots_saveable. libtpu is not installed here, so these are XLA:CPU compiles
   on fake CPU devices with the v5e's 16 GiB per chip.

Writes OUT/plan.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (config, overrides, devices, mesh, global batch, remat)
MEASURED = {
    "digits UNet": ("configs/digits.py", [], 1, "data=1", 512, "none"),
    "digits UNet, remat full": ("configs/digits.py", [], 1, "data=1", 512, "full"),
    "CIFAR-10 DiT-S/2 (depth 4), fsdp=2": (
        "configs/cifar10_dit.py", ["--config.model.depth=4"], 2, "data=1,fsdp=2", 32, "none"),
}
QUICK = ("digits UNet",)
XL_CONFIG = "configs/imagenet256_dit_xl2.py"
XL_MESHES = {8: "data=8", 64: "data=8,fsdp=8", 256: "data=32,fsdp=8"}
XL_REMAT = "none,full,dots_saveable"
MMAP_THRESHOLD = 65536


def _status(key):
    """A /proc/self/status entry in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_child(config_path, overrides, devices, mesh_text, global_batch, remat):
    """In a fresh process: the planner's numbers and the measured peak of one step (module
    doc), as a dict."""
    from jaxdiff.train import plan as plan_lib

    assert plan_lib.use_cpu_devices(devices)
    import jax
    import numpy as np

    from jaxdiff.cli import build, commands
    from jaxdiff.cli import plan as plan_cli
    from jaxdiff.train import init_state, parallel
    from jaxdiff.train.state import abstract_state

    config = plan_cli._config(argparse.Namespace(config=config_path), overrides)
    info = plan_cli._data_info(config)
    model = build.model(config, info).clone(remat={"none": False, "full": True}.get(remat, remat))
    tx, lr_fn = build.optimizer(config)
    step = commands.build_train_step(config, model, tx, lr_fn, build.process(config))
    sizes = plan_lib.resolve_mesh(plan_lib.parse_mesh(mesh_text), devices)
    mesh = parallel.make_mesh(*sizes, devices=plan_lib.cpu_devices(devices))
    kw = dict(x_shape=info["shape"], num_classes=commands.classes(config),
              ema_decays=tuple(config.optim.ema_decays))
    abstract = abstract_state(model, tx, mesh=mesh, **kw)
    batch_abs = plan_lib.abstract_batch(global_batch, info["shape"], mesh)
    t0 = time.perf_counter()
    compiled = plan_lib.compile_train_step(step, abstract, batch_abs, mesh)
    plan = plan_lib.plan_of(compiled, abstract, batch_abs, mesh, remat=remat,
                            compile_s=time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    host = {"x": rng.standard_normal(batch_abs["x"].shape).astype(np.float32),
            "label": (np.arange(global_batch) % max(1, kw["num_classes"])).astype(np.int32)}

    def run():
        state = init_state(model, tx, seed=0, mesh=mesh, **kw)
        batch = {k: jax.device_put(v, batch_abs[k].sharding) for k, v in host.items()}
        out = compiled(state, batch)
        jax.block_until_ready(out)
        return out

    out = run()  # warm-up: the init's compile, thread pools, first-run allocations
    loss = float(out[1]["loss"])
    del out
    gc.collect()
    base = _status("VmRSS")
    _reset_peak()
    out = run()
    peak = _status("VmHWM")
    del out
    return dict(plan=plan.to_dict(), measured=(peak - base) // devices, loss=loss,
                baseline_rss=base)


def measure(name, spec):
    """`measure_child` in a fresh process (the device count is fixed when JAX starts)."""
    from jaxdiff.cli.plan import xla_flags

    env = dict(os.environ, JAX_PLATFORMS="cpu", MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
               XLA_FLAGS=xla_flags(""))  # the flags `jaxdiff plan` compiles with
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); import plan; "
            f"print('RESULT ' + json.dumps(plan.measure_child(*{json.dumps(list(spec))})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{name}: measuring failed: {out.stderr[-2000:]}")
    r = json.loads(lines[-1][len("RESULT "):])
    planned = r["plan"]["total"]
    r.update(name=name, config=spec[0], overrides=spec[1], devices=spec[2], mesh=spec[3],
             global_batch=spec[4], remat=spec[5], planned=planned,
             error=(planned - r["measured"]) / r["measured"])
    return r


def plan_xl(devices, mesh, search, max_compiles, out_dir):
    """`jaxdiff plan` of DiT-XL/2 on v5e-`devices` (a fresh process); its JSON and stderr."""
    path = os.path.join(out_dir, f"plan_xl_{devices}.json")
    cmd = [sys.executable, "-m", "jaxdiff.cli", "plan", "--config", XL_CONFIG, "--topology",
           f"v5e-{devices}", "--mesh", mesh, "--remat", XL_REMAT, "--json", path]
    cmd += ["--max-compiles", str(max_compiles)] if search else ["--no-search"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if out.returncode:
        raise RuntimeError(f"plan at {devices} devices failed: {out.stderr[-2000:]}")
    with open(path) as f:
        result = json.load(f)
    os.remove(path)
    result.update(wall_s=round(time.perf_counter() - t0, 1), stdout=out.stdout,
                  stderr=out.stderr)
    return result


def gib(n):
    return "-" if n is None else f"{n / 2**30:.2f}"


def mib(n):
    return f"{n / 2**20:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one measured config, no DiT-XL/2")
    ap.add_argument("--skip-xl", action="store_true", help="no DiT-XL/2 plans")
    ap.add_argument("--skip-measured", action="store_true", help="only the DiT-XL/2 plans")
    ap.add_argument("--xl-devices", default="8,64,256")
    ap.add_argument("--xl-search", action="store_true",
                    help="also search the largest batch per device (slow: a compile each)")
    ap.add_argument("--max-compiles", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {"measured": [], "dit_xl2": []}
    names = () if args.skip_measured else QUICK if args.quick else tuple(MEASURED)
    if names:
        print("## Planned vs measured per-device peak (XLA:CPU, RSS growth of a fresh "
              "process)\n")
        print("| config | devices, mesh | batch (global) | remat | state MiB | temp MiB "
              "| planned MiB | measured MiB | error |")
        print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        r = measure(name, MEASURED[name])
        results["measured"].append(r)
        p = r["plan"]
        print(f"| {name} | {r['devices']}, {r['mesh']} | {r['global_batch']} | {r['remat']} | "
              f"{mib(p['state'])} | {mib(p['temp'])} | {mib(r['planned'])} | "
              f"{mib(r['measured'])} | {100 * r['error']:+.1f}% |", flush=True)
        _write(args.out, results)
    if not (args.quick or args.skip_xl):
        print("\n## DiT-XL/2, ImageNet-256 latents (32x32x4), global batch 256, v5e (16 GiB), "
              "compiled by XLA:CPU\n")
        print("| devices | mesh | remat | batch/dev | params | opt state | EMA | temp | total "
              "GiB | fits 16 GiB | largest batch/dev | compile s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for n in (int(d) for d in args.xl_devices.split(",")):
            r = plan_xl(n, XL_MESHES[n], args.xl_search, args.max_compiles, args.out)
            results["dit_xl2"].append(r)
            for p in r["plans"]:
                best = r["largest"].get(p["remat"], {}).get("batch_per_device", "-")
                print(f"| {n} | {XL_MESHES[n]} | {p['remat']} | {p['batch_per_device']} | "
                      f"{gib(p['params'])} | {gib(p['opt_state'])} | {gib(p['ema'])} | "
                      f"{gib(p['temp'])} | {gib(p['total'])} | {'yes' if p['fits'] else 'no'} "
                      f"| {best} | {p['compile_s']} |", flush=True)
            _write(args.out, results)
    print("\nGiB/MiB per device. XLA:CPU's temporaries estimate what the TPU/GPU compilers "
          "allocate; the state's bytes are exact.")


def _write(out_dir, results):
    """OUT/plan.json: these results over what is there (a run with --skip-measured or
    --skip-xl keeps the other part)."""
    path = os.path.join(out_dir, "plan.json")
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    with open(path, "w") as f:
        json.dump(dict(old, **{k: v for k, v in results.items() if v}), f, indent=1)


if __name__ == "__main__":
    main()
