"""Post-training quantization on the testbed digits models (issue 14): quality, bytes, memory and
latency of each scheme and calibration against fp32.

For `digits16_unet` and `digits16_dit`, with the testbed's standard sampler (dpmpp_2m, 20 steps,
CFG 2.0):
- calibration set: the inputs of every network call (`jaxdiff.accel.quant.record_calls`) of a
  fp32 sampling run on `CALIB` draws from other noise than the scored ones (classes cycled);
- rows: fp32, bf16, and each scheme of `SCHEMES` under each calibration it allows (dynamic, one
  static scale per op, per-timestep scales in `GROUPS` groups of noise levels); on the UNet the
  static and per-timestep rows again with Q-Diffusion's split shortcut (+split);
- quality: FD_digits and classifier agreement of `NUM` samples from noise seed 0
  (`testbed.score`), and the RMS distance to the fp32 samples from the same noise;
- size: parameter bytes at their stored bit widths, against fp32; peak temporary memory of one
  network call on the sampling batch (XLA's memory analysis of the compiled call);
- latency: median wall time of a sampling run on `TIME_NUM` samples, all rows interleaved.

    PYTHONPATH=$PWD/benchmarks python benchmarks/quantization.py [--models ...] [--repeats 3]
        [--out benchmarks/out] [--quick]

Scored rows are cached (JSON, written atomically) in OUT/quantization/, so a rerun resumes.
Writes OUT/quantization.md (tables), .json (every row) and .png (FD per scheme and calibration).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import _timing
import jax
import jax.numpy as jnp
import numpy as np
import testbed

import jaxdiff
from jaxdiff.accel import quant
from jaxdiff.core.guidance import CFG

NUM, SEED = 500, 0  # scored samples, as the testbed scores
CALIB, CALIB_SEED = 64, 100  # calibration draws (x 2 rows under CFG, x the sampler's calls)
TIME_NUM = 128
GROUPS = 4
LOWRANKS = (8, 16)  # SVDQuant branch ranks on the DiT (hidden size 64)
SCHEMES = ("w8a8", "w4a8", "fp8", "w4a4", "w8a16", "w4a16")
QUICK = dict(num=40, calib=4, time_num=8, steps=4, schemes=("w8a8", "w4a16"))

HERE = os.path.dirname(os.path.abspath(__file__))
log = _timing.progress


def rows_for(steps, schemes, unet):
    """Rows: fp32, bf16, each scheme under each calibration it allows (dynamic, static,
    per-timestep); on the UNet the static and per-timestep rows of its 4- and 8-bit integer
    activation schemes again with Q-Diffusion's split shortcut (+split). Then variants of the
    defaults: the naive static range (qwix's own, the mean per-row absmax: `r1`), the kept
    layers' weights in int8 (`kw8`, for bytes) and nothing kept (`keep none`)."""
    out = [("fp32", "-", False, {}), ("bf16", "dynamic", False, {})]
    for s in schemes:
        if unet and s == "w4a4":  # XLA:CPU/GPU do not compile int4 activations into a conv
            continue
        cals = ("dynamic",) if quant.SCHEMES[s][1] is None else ("dynamic", "static", "timestep")
        out += [(s, c, False, {}) for c in cals]
        if unet and quant.SCHEMES[s][1] is not None and s != "fp8":
            out += [(s, c, True, {}) for c in cals[1:]]
    for s in ("w8a8", "w4a8"):
        if s in schemes:
            out += [(s, c, False, dict(act_range=1.0)) for c in ("static", "timestep")]
    if "w8a8" in schemes:
        out.append(("w8a8", "dynamic", False, dict(keep_weights="int8")))
    if "w4a8" in schemes:
        out.append(("w4a8", "timestep", unet, dict(keep_weights="int8")))
        if not unet:
            out.append(("w4a8", "timestep", False, dict(keep=None)))
    if "w4a4" in schemes and not unet:  # SVDQuant: smoothing + a float low-rank branch
        out += [("w4a4", "dynamic", False, dict(lowrank=r)) for r in LOWRANKS]
    rows = []
    for s, c, sp, extra in out:
        g = GROUPS if c == "timestep" else 1
        label = (s if c == "-" else f"{s} {c}" + (f" x{g}" if g > 1 else "")) + (
            " +split" if sp else "")
        label += {(): "", ("act_range",): " r1", ("keep_weights",): " kw8",
                  ("keep",): " keep none",
                  ("lowrank",): f" svd{extra.get('lowrank')}"}[tuple(extra)]
        rows.append(dict(scheme=s, calibration=c, groups=g, split=sp, steps=steps, label=label,
                         **extra))
    return rows


class Model:
    def __init__(self, name, steps):
        try:
            self.tb = tb = testbed.load(name, build=False, log=False)
        except FileNotFoundError as e:
            sys.exit(f"quantization: {e}\n(this benchmark never trains)")
        self.name, self.std, self.steps = name, tb.sampler, steps
        self.variables = {"params": tb.params}

    def sample(self, model_fn, num, seed):
        labels = np.arange(num, dtype=np.int32) % self.tb.num_classes
        guide = CFG(scale=self.std["guidance"], y=labels,
                    y_null=np.full(num, self.tb.num_classes, np.int32))
        noise = jax.random.normal(jax.random.key(seed), (num, *self.tb.shape))
        out = jaxdiff.sample(model_fn, noise, process=self.tb.process,
                             prediction=self.tb.prediction, sampler=self.std["name"],
                             steps=self.steps, schedule=self.std["schedule"], guidance=guide)
        return jax.block_until_ready(out), labels

    def calibration_inputs(self, num):
        rows = 2 * num
        example = (jnp.zeros((rows, *self.tb.shape)), jnp.zeros(rows), jnp.zeros(rows, jnp.int32))
        rec = quant.record_calls(self.tb.model_fn, *example, capacity=self.steps + 1)
        (_, state), _ = self.sample(rec, num, CALIB_SEED)
        return quant.recorded(state)

    def network(self, row, inputs):
        if row["scheme"] == "fp32":
            return self.tb.model_fn, self.tb.params
        q = quant.quantize(self.tb.model, self.variables, row["scheme"],
                           calibration=row["calibration"], inputs=inputs, groups=row["groups"],
                           split=row["split"], act_range=row.get("act_range", quant.ACT_RANGE),
                           keep=row.get("keep", quant.KEEP),
                           keep_weights=row.get("keep_weights", "fp32"),
                           lowrank=row.get("lowrank", 0))
        return q.model_fn, q.params


def temp_bytes(model_fn, num, shape):
    """XLA's temporary memory of one network call on the 2·num rows of a CFG sampling call."""
    rows = 2 * num
    args = (jnp.zeros((rows, *shape)), jnp.zeros(rows), jnp.zeros(rows, jnp.int32))
    mem = jax.jit(model_fn).lower(*args).compile().memory_analysis()
    return None if mem is None else int(mem.temp_size_in_bytes)


def score_rows(model, rows, folder, num, calib):
    path = os.path.join(folder, f"scores_{model.name}.json")
    done = _timing.load_json(path) or {}
    inputs = ref = None
    for r in rows:
        key = json.dumps([r["label"], model.steps, num, calib])
        if key in done:
            r.update(done[key])
            continue
        t0 = time.perf_counter()
        if inputs is None:
            inputs = model.calibration_inputs(calib)
        if ref is None:
            ref = np.asarray(model.sample(model.tb.model_fn, num, SEED)[0])
        fn, params = model.network(r, inputs)
        x, labels = model.sample(fn, num, SEED)
        x = np.asarray(x)
        sc = testbed.score(x, labels, resolution=model.tb.resolution)
        r.update(fd=sc["fd"], fd_real=sc["fd_real"], agreement=sc["agreement"],
                 dev=float(np.sqrt(np.mean((x - ref) ** 2))),
                 param_bytes=quant.param_bytes(params),
                 temp_bytes=temp_bytes(fn, TIME_NUM, model.tb.shape))
        done[key] = {k: r[k] for k in ("fd", "fd_real", "agreement", "dev", "param_bytes",
                                       "temp_bytes")}
        _timing.save_json(path, done)
        log(f"{model.name} {r['label']}: FD {r['fd']:.2f}, agreement {r['agreement']:.3f}, "
            f"dev {r['dev']:.4f}, {r['param_bytes'] / 1e3:.0f} kB "
            f"({time.perf_counter() - t0:.0f} s)")
    return inputs


def time_rows(model, rows, inputs, num, repeats, folder):
    """Median wall time of each row's sampling run (the variants of a row's rules are timed
    only for SVDQuant's branch, which adds compute); cached in FOLDER/timing_<model>.json for
    the same rows, sizes and repeats."""
    rows = [r for r in rows if not {"act_range", "keep", "keep_weights", "lowrank"} & set(r)
            or "lowrank" in r]
    path = os.path.join(folder, f"timing_{model.name}.json")
    key = json.dumps([[r["label"] for r in rows], model.steps, num, repeats])
    cached = (_timing.load_json(path) or {}).get(key)
    if cached is None:
        fns = {}
        for r in rows:
            fn, _ = model.network(r, inputs)
            fns[r["label"]] = lambda fn=fn: model.sample(fn, num, SEED)
        for f in fns.values():  # compiles
            f()
        seconds = _timing.interleaved(fns, repeats=repeats, warmup=0)
        cached = {r["label"]: statistics.median(seconds[r["label"]]) for r in rows}
        _timing.save_json(path, {key: cached})
    for r in rows:
        r["wall_s"] = cached[r["label"]]


def weight_bytes(model, row, inputs):
    """(bytes of the quantized weight matrices: their qvalues and scales, and SVDQuant's
    branch; their float32 bytes): the weights alone, without the layers kept in float, biases
    and norms. The weights
    do not depend on the activation calibration, so dynamic stands in for it."""
    if row["scheme"] in ("fp32", "bf16"):
        return None, None
    dyn = dict(row, calibration="dynamic", groups=1)
    _, params = model.network(dyn, inputs)
    q = f = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        if name.endswith(".array.qvalue"):
            q += quant.param_bytes([leaf])
            f += 4 * leaf.size
        elif name.endswith((".array.scale", "_lora_a']", "_lora_b']", "_smooth']")):
            q += quant.param_bytes([leaf])  # scales; SVDQuant's float branch and smoothing
    return q, f


def report(all_rows, path_md, path_png, args):
    machine = _timing.machine()
    lines = ["# Post-training quantization on the testbed (`benchmarks/quantization.py`)", "",
             f"{args.num} scored samples; calibration: {args.calib} draws x every call of the "
             f"sampler; per-timestep: {GROUPS} groups; wall: median of {args.repeats} interleaved "
             f"runs on {args.time_num} samples; {machine['cpu']}, {machine['cores']} cores, "
             f"jax {machine['jax']} ({machine['jax_backend']}).", ""]
    for name in dict.fromkeys(r["model"] for r in all_rows):
        rows = [r for r in all_rows if r["model"] == name]
        fp = rows[0]
        nan = float("nan")

        def ratio(a, b):
            return f"{a / b:.2f}x" if a and b else "-"

        lines += [f"## {name}", "", _timing.table(
            ["scheme", "FD", "vs fp32", "agreement", "dev", "param kB", "smaller",
             "weights smaller", "temp MB", "wall s", "vs fp32"],
            [[r["label"], f"{r['fd']:.2f}", f"{100 * (r['fd'] / fp['fd'] - 1):+.1f}%",
              f"{r['agreement']:.3f}", f"{r['dev']:.4f}", f"{r['param_bytes'] / 1e3:.0f}",
              ratio(fp["param_bytes"], r["param_bytes"]),
              ratio(r.get("weight_bytes_fp32"), r.get("weight_bytes")),
              f"{r['temp_bytes'] / 1e6:.1f}" if r["temp_bytes"] else "-",
              f"{r['wall_s']:.2f}" if "wall_s" in r else "-",
              ratio(r.get("wall_s", nan), fp.get("wall_s", nan)) if "wall_s" in r else "-"]
             for r in rows]), "", f"FD of real digits (the floor): {fp['fd_real']:.2f}", ""]
    with open(path_md, "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(all_rows, path_png)


def plot(all_rows, path):
    """Per model, FD (fp32 and the issue's +5% / +15% marked) and the RMS distance to the fp32
    samples from the same noise, one bar per row, coloured by calibration."""
    from matplotlib.patches import Patch

    from jaxdiff.eval.plots import _pyplot

    plt = _pyplot()
    names = list(dict.fromkeys(r["model"] for r in all_rows))
    height = 0.22 * max(sum(r["model"] == n for r in all_rows) for n in names) + 1.4
    fig, axes = plt.subplots(1, 2 * len(names), figsize=(5.2 * 2 * len(names), height),
                             squeeze=False)
    colors = {"-": "k", "dynamic": "tab:blue", "static": "tab:red", "timestep": "tab:green"}
    for k, name in enumerate(names):
        rows = [r for r in all_rows if r["model"] == name]
        y = np.arange(len(rows))[::-1]
        c = [colors[r["calibration"]] for r in rows]
        fd_ax, dev_ax = axes[0][2 * k], axes[0][2 * k + 1]
        fd_ax.barh(y, [r["fd"] for r in rows], color=c)
        fd_ax.set_yticks(y, [r["label"] for r in rows], fontsize=7)
        fp = rows[0]["fd"]
        for f, ls in ((1.0, "-"), (1.05, "--"), (1.15, ":")):
            fd_ax.axvline(fp * f, color="k", lw=0.8, ls=ls)
        fd_ax.set_xlim(0, max(max(r["fd"] for r in rows), 1.3 * fp) * 1.05)
        fd_ax.set_xlabel("FD_digits; lines: fp32, +5%, +15%")
        fd_ax.set_title(f"{name}: FD")
        dev_ax.barh(y, [r["dev"] for r in rows], color=c)
        dev_ax.set_yticks(y, [])
        dev_ax.set_xlabel("RMS distance to fp32 samples (same noise)")
        dev_ax.set_title(f"{name}: deviation from fp32")
        dev_ax.legend(handles=[Patch(color=colors[n], label=n)
                               for n in ("dynamic", "static", "timestep")],
                      fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["digits16_unet", "digits16_dit"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    args = ap.parse_args(argv)
    steps, schemes = 20, SCHEMES
    args.num, args.calib, args.time_num = NUM, CALIB, TIME_NUM
    if args.quick:
        args.num, args.calib, args.time_num = QUICK["num"], QUICK["calib"], QUICK["time_num"]
        steps, schemes = QUICK["steps"], QUICK["schemes"]
    name = "quantization_quick" if args.quick else "quantization"
    folder = os.path.join(args.out, name)
    all_rows = []
    for m in args.models:
        model = Model(m, steps)
        rows = [dict(r, model=m) for r in rows_for(steps, schemes, "unet" in m)]
        inputs = score_rows(model, rows, folder, args.num, args.calib)
        if inputs is None:
            inputs = model.calibration_inputs(args.calib)
        time_rows(model, rows, inputs, args.time_num, args.repeats, folder)
        for r in rows:
            r["weight_bytes"], r["weight_bytes_fp32"] = weight_bytes(model, r, inputs)
        all_rows += rows
        report(all_rows, os.path.join(args.out, f"{name}.md"),
               os.path.join(args.out, f"{name}.png"), args)
    _timing.save_json(os.path.join(args.out, f"{name}.json"), dict(rows=all_rows))
    with open(os.path.join(args.out, f"{name}.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
