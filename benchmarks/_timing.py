"""Timing, machine description, table and JSON output shared by the peer benchmarks.

Timings on a shared machine are noisy, so every comparison runs its contenders alternately
(A, B, A, B, ...) within one process and reports the median and the minimum over repeats;
ratios are always taken between numbers from the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax

PAUSE_S = 0.05  # lets the other library's spinning worker threads go to sleep between calls


def parse_args(description, *, repeats, extra=None):
    """The command line every peer benchmark shares (--quick, --repeats, --out), plus the
    options `extra(parser)` adds; returns (parser, args)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, seconds)")
    ap.add_argument("--repeats", type=int, default=repeats, help="timed repeats per contender")
    ap.add_argument("--out", default="benchmarks/out", help="folder for the JSON result")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats={args.repeats} must be >= 1")
    return ap, args


def progress(message):
    """One progress line on stderr (the table and JSON are the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def interleaved(contenders, *, repeats, warmup=1, pause=PAUSE_S):
    """Times each zero-argument callable (which must block until its work is done) `repeats`
    times, alternating between contenders, `pause` seconds apart; returns {name: sorted list
    of seconds}."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for k in range(repeats):
        for name, fn in contenders.items():
            time.sleep(pause)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        progress(f"repeat {k + 1}/{repeats}: " + ", ".join(
            f"{name} {ts[-1]:.4g} s" for name, ts in times.items()))
    return {name: sorted(ts) for name, ts in times.items()}


def stats(seconds):
    """Median, min and all repeats of a list of seconds."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds),
            "repeats_s": [round(s, 6) for s in seconds]}


def timed(fn):
    """(result, seconds) of one call of fn()."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine():
    """What the numbers were measured on: CPU, cores, accelerator, versions, load average."""
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }
    try:
        import diffusers
        import torch

        info.update(torch=torch.__version__, diffusers=diffusers.__version__,
                    torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


def table(headers, rows):
    """A markdown table (numbers as given; format them before)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(out_dir, name, payload):
    """Writes payload to out_dir/name.json and returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def save_json(path, obj):
    """Writes obj to path atomically (a killed run never leaves a half-written file); numpy and
    jax scalars and arrays become numbers and lists."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(v):
    import numpy as np

    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, (np.ndarray, jax.Array)):
        return np.asarray(v).tolist()
    raise TypeError(f"not JSON: {type(v).__name__}")


def load_json(path):
    """The JSON in path, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
