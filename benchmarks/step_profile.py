"""Where a DiT-S/2 training step spends its time: jaxdiff (XLA:CPU) vs PyTorch eager, per op.

The case is train_throughput.py's DiT-S/2 (depth 12, width 384, 6 heads, patch 2, 32x32x4
latents, 1000 classes, float32; forward + backward + clipping + AdamW + EMA), built with its
`jax_case` / `torch_case`. After warm-up, each framework's step is
  * timed in process CPU seconds (time.process_time, all threads), the two interleaved;
  * profiled: jaxdiff with `jax.profiler.trace` and XLA:CPU per-thunk annotations
    (--xla_cpu_enable_xprof_traceme=true), the perfetto trace summed per HLO op (self time,
    all threads) and joined to `compiled.as_text()` to classify each op (YNNPACK matmul fusion,
    plain dot and its operand layout, convolution, GELU, softmax, layernorm, reductions,
    copies/transposes, optimizer, other) with FLOPs from the shapes; torch with
    `torch.profiler` (CPU, self time per aten op, FLOPs of mm/addmm/bmm) in the same categories.
jaxdiff's op classes, first match: RNG/while-loop ops (other); op_name outside the model's
jvp/transpose (optimizer); a dot inside (YNNPACK fusion or plain dot); convolution; only data
movement (copy, transpose, pad, concat, broadcast); op_name under LayerNorm (layernorm) or under
mlp/ outside fc1/fc2 (GELU); contains tanh (GELU), exp (softmax), rsqrt (layernorm), reduce.
Per-op times are wall time on the thread that ran the op. Torch's OpenMP workers and XLA's
intra-op helpers are not in them; XLA's Eigen dots run asynchronously, so a dot gets the
un-annotated worker-thread time while it is in flight. The "CPU s" columns apportion each side's
measured CPU seconds per step by its per-op shares. On a shared machine `--threads 1` gives the
cleanest attribution (every op synchronous on one thread, per-op sums = CPU time).

    PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/step_profile.py [--batch 32] [--quick]
        [--repeats 3] [--profile-steps 1] [--threads N]

It runs with the `jaxdiff` command's host malloc settings (`jaxdiff.cli.hostmalloc`, a restart
of the script); `JAXDIFF_HOST_MALLOC=system` keeps glibc's defaults, under which jaxdiff's step
takes ~1.3 M minor page faults (the before of RESULTS.md's table).

Writes benchmarks/out/step_profile[_quick][_tN].{md,json}.
"""

from __future__ import annotations

import os
import sys


def _pin_threads(argv):
    """--threads N pins the process to N cores before jax starts (XLA sizes its thread pool by
    the affinity mask); torch gets N intra-op threads in main()."""
    n = [a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
         if a.startswith("--threads") and ("=" in a or i + 1 < len(argv))]
    if n and int(n[-1]) > 0:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:int(n[-1])])


if __name__ == "__main__":  # the `jaxdiff` command's host malloc settings (a restart)
    from jaxdiff.cli import hostmalloc

    hostmalloc.reexec(sys.argv)
_pin_threads(sys.argv)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_xprof_traceme=true").strip()

import bisect  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _timing  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import train_throughput as tt  # noqa: E402

MM_Y, MM_LIB, MM_DOT, MM_T = ("matmul: YNNPACK fusion", "matmul: other library fusion",
                              "matmul: plain dot (XLA)", "matmul: mm/addmm/bmm (torch)")
ATTN = "attention: fused SDPA kernel (torch)"
CONV, GELU, SMAX, LN = ("convolution (patch embed)", "GELU fwd+bwd", "softmax fwd+bwd",
                        "layernorm fwd+bwd")
RED, ELT, COPY, OPT, OTHER = ("reductions (other)", "elementwise (other)",
                              "copies/transposes/layout", "optimizer (clip, AdamW, EMA)",
                              "other (RNG, embedding, dispatch, ...)")
ORDER = [MM_Y, MM_LIB, MM_DOT, MM_T, ATTN, CONV, GELU, SMAX, LN, RED, ELT, COPY, OPT, OTHER]
MATMULS = (MM_Y, MM_LIB, MM_DOT, MM_T, ATTN)
MOVE_OPS = {"copy", "transpose", "bitcast", "reshape", "pad", "slice", "concatenate",
            "broadcast", "parameter", "constant", "dynamic-slice", "dynamic-update-slice",
            "tuple", "get-tuple-element", "iota", "bitcast-convert"}
RNG_MARKS = ("threefry", "_randint", "_uniform", "_normal", "_interp", "searchsorted", "/while")


# ----------------------------------------------------------------------------- jaxdiff: HLO
_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*)$")


def _dims(shape):
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _attr(rest, key):
    m = re.search(key + r"=\{([\d,]*)\}", rest)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def parse_hlo(text):
    """{instruction name: dict(op, shape, operands, rest, comp)} and {computation: [names]}."""
    instrs, comps, comp = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            comp = "ENTRY" if line.startswith("ENTRY") else line.split()[0].lstrip("%")
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        args = rest.split(")", 1)[0]
        instrs[name] = dict(op=op, shape=shape, comp=comp, rest=rest,
                            operands=re.findall(r"%([\w.\-]+)", args))
        comps[comp].append(name)
    return instrs, comps


def _dot_info(ins, instrs):
    lhs, rhs = (_dims(instrs[o]["shape"]) if o in instrs else [] for o in ins["operands"][:2])
    lc, rc = _attr(ins["rest"], "lhs_contracting_dims"), _attr(ins["rest"], "rhs_contracting_dims")
    lb = _attr(ins["rest"], "lhs_batch_dims")
    k = int(np.prod([lhs[d] for d in lc])) if lhs else 0
    flops = 2.0 * float(np.prod(_dims(ins["shape"]))) * k
    layout = ("lhsT " if lc and lc[-1] != len(lhs) - 1 else "") + \
             ("rhsT" if rc and rc[0] != len(lb) else "")
    src = [instrs[o]["op"] + ("" if instrs[o]["op"] != "fusion" else ":" + o)
           for o in ins["operands"][:2] if o in instrs]
    return flops, (layout.strip() or "NN"), src


def _conv_flops(ins, instrs):
    rhs = _dims(instrs[ins["operands"][1]]["shape"])
    labels = re.search(r"dim_labels=\w+_(\w+)->", ins["rest"]).group(1)
    spatial = [rhs[i] for i, c in enumerate(labels) if c.isdigit()]
    return 2.0 * float(np.prod(_dims(ins["shape"]))) * float(np.prod(spatial)) * rhs[
        labels.index("i")]


def classify_jax(name, instrs, comps):
    """(category, FLOPs, detail) of one thunk (a top-level or while-body HLO instruction)."""
    ins = instrs.get(name)
    if ins is None:
        return OTHER, 0.0, "not in HLO"
    meta = re.search(r'op_name="([^"]*)"', ins["rest"])
    meta = meta.group(1) if meta else ""
    called = re.search(r"calls=%([\w.\-]+)", ins["rest"])
    body = [instrs[n] for n in comps.get(called.group(1), [])] if called else [ins]
    ops = {b["op"] for b in body}
    dots = [b for b in body if b["op"] == "dot"]
    if ins["comp"] != "ENTRY" or ins["op"] in ("while", "call") or \
            any(s in meta for s in RNG_MARKS):
        return OTHER, 0.0, meta
    if meta and "jvp(" not in meta and "transpose(" not in meta and not dots:
        return OPT, 0.0, meta
    if dots:
        flops, layout, src = _dot_info(dots[0], instrs)
        if "__ynn_fusion" in ins["rest"]:
            return MM_Y, flops, meta
        if ins["op"] == "fusion" and "kCustom" in ins["rest"]:
            return MM_LIB, flops, meta
        return MM_DOT, flops, f"{meta.removeprefix('jit(train_step)/')} | {layout} | " \
            + ", ".join(src)
    if "convolution" in ops:
        return CONV, sum(_conv_flops(b, instrs) for b in body if b["op"] == "convolution"), meta
    if ops <= MOVE_OPS:
        return COPY, 0.0, meta
    if "LayerNorm" in meta:
        return LN, 0.0, meta
    if "/mlp/" in meta and "/fc1/" not in meta and "/fc2/" not in meta:
        return GELU, 0.0, meta
    for op, cat in (("tanh", GELU), ("exponential", SMAX), ("rsqrt", LN)):
        if op in ops:
            return cat, 0.0, meta
    if "reduce" in ops or "reduce-window" in ops:
        return RED, 0.0, meta
    return ELT, 0.0, meta


# --------------------------------------------------------------------------- jaxdiff: trace
def _merge(ivs):
    out = []
    for a, b in sorted(ivs):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def thunk_times(events):
    """{hlo_op: microseconds} and notes. An op's time is the self time of its events (nested
    thunks, e.g. while bodies, subtracted) plus, for an async thunk (its "end: NAME" completion
    marker comes after its issuing event ends: XLA's Eigen dots), the un-annotated time of the
    XLA worker threads while it is in flight, split equally among the async thunks in flight."""
    xs = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: (e["ts"], -e["dur"]))
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    ops = [e for e in xs if "hlo_op" in e.get("args", {})]
    out, by_tid = collections.defaultdict(float), collections.defaultdict(list)
    for e in ops:
        by_tid[e["tid"]].append(e)
    for evs in by_tid.values():
        stack = []  # [name, end, child time]
        for e in evs:
            while stack and e["ts"] >= stack[-1][1]:
                n, _, child = stack.pop()
                out[n] -= child
            if stack:
                stack[-1][2] += e["dur"]
            out[e["name"]] += e["dur"]
            stack.append([e["name"], e["ts"] + e["dur"], 0.0])
        for n, _, child in stack:
            out[n] -= child
    last, asy = {}, []  # async thunks: (issue end, completion, name)
    for e in xs:
        if "hlo_op" in e.get("args", {}):
            last[e["name"]] = e
        elif e["name"].startswith("end: ") and e["name"][5:] in last:
            s = last.pop(e["name"][5:])
            if e["ts"] > s["ts"] + s["dur"]:
                asy.append((s["ts"] + s["dur"], e["ts"], s["name"]))
    marks = sorted({t for a, b, _ in asy for t in (a, b)})
    segs = [(lo, hi, [n for a, b, n in asy if a <= lo and b >= hi])
            for lo, hi in zip(marks, marks[1:])]
    starts = [s[0] for s in segs]
    t0, t1 = ops[0]["ts"], max(e["ts"] + e["dur"] for e in ops)
    filled, idle = collections.defaultdict(float), 0.0
    workers = [t for t in by_tid if names.get(t, "").startswith("tf_XLAEigen")]
    for tid in workers:
        cover = _merge((e["ts"], e["ts"] + e["dur"]) for e in by_tid[tid])
        edges = [t0] + [x for iv in cover for x in iv] + [t1]
        for g0, g1 in zip(edges[::2], edges[1::2]):
            k, busy = max(bisect.bisect_right(starts, g0) - 1, 0), 0.0
            while k < len(segs) and segs[k][0] < g1:
                lo, hi, active = segs[k]
                ov = min(hi, g1) - max(lo, g0)
                if ov > 0 and active:
                    busy += ov
                    for n in active:
                        filled[n] += ov / len(active)
                k += 1
            idle += max(g1 - g0, 0) - busy
    for n, v in filled.items():
        out[n] += v
    spans = collections.defaultdict(float)
    for a, b, n in asy:
        spans[n] += b - a
    return out, dict(window_us=t1 - t0, worker_threads=len(workers), async_thunks=len(asy),
                     async_fill_us=sum(filled.values()), unannotated_us=idle, spans_us=spans)


def profile_jax(run, compiled, steps):
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            t0 = time.process_time()
            for _ in range(steps):
                run()
            cpu = (time.process_time() - t0) / steps
        path = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    times, notes = thunk_times(events)
    per_op = {k: v / steps / 1e3 for k, v in times.items()}  # ms per step
    instrs, comps = parse_hlo(compiled.as_text())
    ops = []
    for name, ms in per_op.items():
        cat, flops, detail = classify_jax(name, instrs, comps)
        ops.append(dict(name=name, ms=ms, category=cat, flops=flops, detail=detail,
                        async_span_ms=notes["spans_us"].get(name, 0.0) / steps / 1e3))
    ops.sort(key=lambda o: -o["ms"])
    notes = {k.replace("_us", "_ms"): (v / steps / 1e3 if k.endswith("_us") else v)
             for k, v in notes.items()
             if k != "spans_us"}
    return dict(ops=ops, profiled_cpu_s=cpu, hlo_instructions=len(instrs), trace=notes)


# ---------------------------------------------------------------------------- torch: aten ops
_MM = {"aten::" + n for n in "mm addmm bmm baddbmm matmul linear".split()}
_COPY = {"aten::" + n for n in (
    "copy_ contiguous clone _to_copy to cat transpose t permute reshape view _unsafe_view expand "
    "as_strided chunk split narrow slice select unsqueeze squeeze flatten unflatten").split()}
_RED = {"aten::" + n for n in
        "sum mean norm linalg_vector_norm mse_loss mse_loss_backward max amax".split()}
_ELT = {"aten::" + n for n in (
    "add add_ mul mul_ sub sub_ rsub div div_ silu silu_backward sqrt neg exp cos sin pow clamp "
    "clamp_ where lerp_ addcmul_ addcdiv_ sigmoid tanh fill_ zero_ reciprocal expm1 log "
    "masked_fill clamp_min sign").split()}
_OPT_MARKS = ("adam", "_foreach", "optimizer.", "clip_grad")


def torch_category(name):
    n = name.lower()
    if "backward0" in n or n.startswith("autograd::"):  # autograd nodes: dispatch overhead
        return OTHER
    if any(m in n for m in _OPT_MARKS):
        return OPT
    if name in _MM or n.startswith("aten::mm") or n.startswith("aten::addmm"):
        return MM_T
    if "scaled_dot_product" in n or "flash_attention" in n or "attention" in n:
        return ATTN
    if "conv" in n:
        return CONV
    for key, cat in (("gelu", GELU), ("softmax", SMAX), ("layer_norm", LN)):
        if key in n:
            return cat
    if name in _COPY:
        return COPY
    if name in _RED:
        return RED
    if name in _ELT:
        return ELT
    return OTHER


def profile_torch(run, steps):
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts, with_flops=True) as prof:
        t0 = time.process_time()
        for _ in range(steps):
            run()
        cpu = (time.process_time() - t0) / steps
    agg = collections.defaultdict(lambda: dict(ms=0.0, flops=0.0, count=0))
    for e in prof.events():  # an op called by the optimizer (foreach fallback) is optimizer;
        p, cat, names = e, torch_category(e.name), [e.name.lower()]  # under autograd: bwd
        while (p := p.cpu_parent) is not None:
            names.append(p.name.lower())
        if any(m in n for n in names for m in _OPT_MARKS):
            cat = OPT
        a = agg[(e.name, cat, "bwd" if any("backward" in n for n in names) else "fwd")]
        a["ms"] += e.self_cpu_time_total / steps / 1e3
        a["flops"] += float(getattr(e, "flops", 0) or 0) / steps
        a["count"] += 1
    ops = [dict(name=k[0], category=k[1], phase=k[2], **v) for k, v in agg.items() if v["ms"] > 0]
    ops.sort(key=lambda o: -o["ms"])
    return dict(ops=ops, profiled_cpu_s=cpu)


# ------------------------------------------------------------------------------------ report
def by_category(ops):
    cats = {c: dict(ms=0.0, flops=0.0, n=0) for c in ORDER}
    for o in ops:
        c = cats[o["category"]]
        c["ms"] += o["ms"]
        c["flops"] += o["flops"]
        c["n"] += 1
    return cats


def _f(v, fmt="{:.0f}"):
    return "—" if v is None else fmt.format(v)


def _row(label, j, t, jt, tt_, jcpu, tcpu):
    """One table row: ms, shares, difference, and the CPU seconds apportioned by share."""
    js, ts = (j or 0) / jt * jcpu, (t or 0) / tt_ * tcpu
    return [label, _f(j), _f(j and 100 * j / jt, "{:.1f}%"), _f(t), _f(t and 100 * t / tt_,
            "{:.1f}%"), f"{(j or 0) - (t or 0):+.0f}", f"{js:.2f}", f"{ts:.2f}", f"{js - ts:+.2f}"]


def _attn_core(detail):
    return "/attn/" in detail and "/attn/qkv/" not in detail and "/attn/proj/" not in detail


def _matmul_rows(spec, res):
    g = collections.defaultdict(lambda: [0.0, 0.0])  # (side, group, pass) -> [FLOPs, ms]
    a = spec["arch"]
    sdpa = 4 * (spec["image"] // a["patch_size"]) ** 4 * a["hidden_size"] * a["depth"] * \
        spec["batch"]
    for o in res["jaxdiff"]["ops"]:
        if o["category"] in (MM_Y, MM_LIB, MM_DOT, CONV):
            grp = "attention-core dots" if _attn_core(o["detail"]) else o["category"]
            k = g["jaxdiff", grp, "bwd" if "transpose(" in o["detail"] else "fwd"]
            k[0], k[1] = k[0] + o["flops"], k[1] + o["ms"]
    for o in res["torch"]["ops"]:
        if o["category"] in (MM_T, ATTN, CONV):
            k = g["torch", o["category"], o["phase"]]
            flops = (sdpa * (2 if o["phase"] == "bwd" else 1) if o["category"] == ATTN and
                     "flash_attention" in o["name"] else o["flops"])
            k[0], k[1] = k[0] + flops, k[1] + o["ms"]
    return [[*key, f"{f / 1e9:.1f}", f"{ms:.0f}", f"{f / ms / 1e6:.1f}" if ms else "—"]
            for key, (f, ms) in sorted(g.items())]


def report(spec, res):
    jc, tc = (by_category(res[k]["ops"]) for k in ("jaxdiff", "torch"))
    jt, tt_ = (sum(c["ms"] for c in cats.values()) for cats in (jc, tc))
    tot = (jt, tt_, res["jaxdiff"]["cpu_s_median"], res["torch"]["cpu_s_median"])
    rows = [_row(c, jc[c]["ms"] if jc[c]["n"] else None, tc[c]["ms"] if tc[c]["n"] else None,
                 *tot) for c in ORDER if jc[c]["n"] or tc[c]["n"]]
    jm, tm = (sum(cats[c]["ms"] for c in MATMULS) for cats in (jc, tc))
    rows.append(_row("**matmul + attention kernels (subtotal)**", jm, tm, *tot))
    rows.append(_row("**total (per-op sum)**", jt, tt_, *tot))
    head = ["category", "jaxdiff ms", "share", "torch ms", "share", "difference ms",
            "jaxdiff CPU s", "torch CPU s", "difference CPU s"]
    lines = [f"## {spec['name']}, B = {spec['batch']}, float32, {res['threads']} thread(s): one "
             "training step per op category", "", _timing.table(head, rows), ""]
    lines += ["Matmul rates by pass (FLOPs from shapes; torch SDPA: analytic 4 T^2 D per block "
              "and image forward, 2x that backward; GFLOP/s = FLOPs / per-op ms):", "",
              _timing.table(["side", "group", "pass", "GFLOP", "ms", "GFLOP/s"],
                            _matmul_rows(spec, res)), ""]
    dots = [o for o in res["jaxdiff"]["ops"] if o["category"] == MM_DOT]
    drows = [[o["name"], f"{o['ms']:.1f}", f"{o['async_span_ms']:.1f}",
              f"{o['flops'] / 1e9:.2f}", f"{o['flops'] / o['ms'] / 1e6:.1f}",
              *(o["detail"].split(" | ") + ["", ""])[:3]] for o in dots[:12]]
    lines += ["jaxdiff plain dots, largest first (ms: issue + worker time while in flight; span: "
              "issue end to completion; lhsT/rhsT: contracting dim not in the row-major GEMM "
              "position):", "",
              _timing.table(["op", "ms", "async span ms", "GFLOP", "GFLOP/s",
                             "op_name", "layout", "operands"], drows), ""]
    ja = [o for o in res["jaxdiff"]["ops"] if _attn_core(o["detail"])]
    ja_ms = sum(o["ms"] for o in ja)
    ja_cat = collections.Counter()
    for o in ja:
        ja_cat[o["category"]] += o["ms"]
    lines += [f"Attention core (QK^T, softmax, PV, their backward, and layout ops under `/attn/` "
              f"except the qkv/proj Dense layers): jaxdiff {ja_ms:.0f} ms "
              f"({100 * ja_ms / jt:.1f}%; " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                        ja_cat.most_common()) +
              f"); torch fused SDPA {tc[ATTN]['ms']:.0f} ms ({100 * tc[ATTN]['ms'] / tt_:.1f}%).",
              ""]
    for side in ("jaxdiff", "torch"):
        r = res[side]
        tot = jt if side == "jaxdiff" else tt_
        lines.append(
            f"{side}: CPU s per step {r['cpu_s_median']:.2f} (median of {len(r['cpu_s'])}: "
            f"user {r['user_s_median']:.2f}, system {r['sys_s_median']:.2f}, "
            f"{r['minor_faults_median'] / 1e3:.0f}k minor page faults; "
            f"wall {r['wall_s_median']:.2f} s, {r['cpu_s_median'] / r['wall_s_median']:.2f} CPU "
            f"s per wall s); profiled step {r['profiled_cpu_s']:.2f} CPU s; per-op sum "
            f"{tot / 1e3:.2f} s = {100 * tot / 1e3 / r['cpu_s_median']:.0f}% of the CPU s.")
    n = res["jaxdiff"]["trace"]
    lines.append(f"jaxdiff trace: {n['worker_threads']} XLA worker threads, step window "
                 f"{n['window_ms']:.0f} ms wall; {n['async_thunks']} async thunks given "
                 f"{n['async_fill_ms']:.0f} ms of worker time while in flight; "
                 f"{n['unannotated_ms']:.0f} ms of worker-thread time with no op running or in "
                 "flight (idle, helper threads of sync ops, runtime) is in no category.")
    top = lambda side: ", ".join(f"{o['name']} {o['ms']:.0f}" for o in res[side]["ops"][:10])  # noqa
    lines += ["", f"Top jaxdiff ops (ms): {top('jaxdiff')}", "",
              f"Top torch ops (ms): {top('torch')}", "",
              f"load average before/after: {res['load'][0]} / {res['load'][1]}"]
    return "\n".join(lines)


def _with_usage(fn, out):
    """fn, appending its process CPU, user and system seconds and minor page faults to out."""
    def run():
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        fn()
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        out.append(dict(cpu=t1 - t0, user=r1.ru_utime - r0.ru_utime,
                        sys=r1.ru_stime - r0.ru_stime, minflt=r1.ru_minflt - r0.ru_minflt))
    return run


def main():
    ap, args = _timing.parse_args(__doc__.splitlines()[0], repeats=3, extra=_extra_args)
    import torch

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    spec = dict(tt.FULL["dit"])
    if args.quick:
        spec.update(name="DiT-S/2 (quick: depth 2)", batch=4,
                    arch=dict(spec["arch"], depth=2))
    if args.batch:
        spec["batch"] = args.batch
    load0 = tuple(round(v, 2) for v in os.getloadavg())
    rng = np.random.default_rng(0)  # the batch run_case builds
    x = rng.standard_normal((spec["batch"], spec["image"], spec["image"], spec["channels"]),
                            np.float32)
    y = rng.integers(0, max(spec["num_classes"], 1), spec["batch"]).astype(np.int32)
    j = tt.jax_case(spec, x, y)
    jrun = j["run"]
    cells = dict(zip(jrun.__code__.co_freevars, (c.cell_contents for c in jrun.__closure__)))
    compiled = cells["compiled"]  # jax_case's compiled step, for its HLO text
    _timing.progress(f"jaxdiff step compiled in {j['compile_s']:.1f} s")
    t = tt.torch_case(spec, x, y, False)
    _timing.progress(f"torch eager first call {t['first_call_s']:.1f} s")
    runs, res = {"jaxdiff": jrun, "torch": t["run"]}, {}
    cpu = {k: [] for k in runs}
    walls = _timing.interleaved({k: _with_usage(f, cpu[k]) for k, f in runs.items()},
                                repeats=args.repeats, warmup=1, pause=0.2)
    for k in runs:  # the warm-up call dropped
        med = {u: float(np.median([c[u] for c in cpu[k][1:]])) for u in cpu[k][0]}
        res[k] = dict(cpu_s=[c["cpu"] for c in cpu[k][1:]], cpu_s_median=med["cpu"],
                      user_s_median=med["user"], sys_s_median=med["sys"],
                      minor_faults_median=med["minflt"], wall_s=walls[k],
                      wall_s_median=float(np.median(walls[k])))
    _timing.progress("profiling jaxdiff")
    res["jaxdiff"].update(profile_jax(jrun, compiled, args.profile_steps))
    _timing.progress("profiling torch")
    res["torch"].update(profile_torch(t["run"], args.profile_steps))
    res["load"] = (load0, tuple(round(v, 2) for v in os.getloadavg()))
    res["threads"] = threads
    text = report(spec, res)
    print(text)
    name = "step_profile" + ("_quick" if args.quick else "") + (
        f"_t{args.threads}" if args.threads else "")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(text + "\n")
    for k in ("jaxdiff", "torch"):
        res[k]["categories"] = by_category(res[k]["ops"])
    path = _timing.write_json(args.out, name, dict(
        machine=_timing.machine(), spec=spec, threads=threads, profile_steps=args.profile_steps,
        xla_flags=os.environ["XLA_FLAGS"], results=res))
    print(f"wrote {path} and {name}.md")


def _extra_args(ap):
    ap.add_argument("--batch", type=int, default=0, help="batch size (default 32; 4 with --quick)")
    ap.add_argument("--threads", type=int, default=0,
                    help="pin to this many cores (XLA pool and torch threads); 0: all")
    ap.add_argument("--profile-steps", type=int, default=1, help="steps inside each profile")


if __name__ == "__main__":
    main()
