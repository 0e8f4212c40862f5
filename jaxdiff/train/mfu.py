"""Model FLOPs utilization (MFU): the FLOP/s a train step achieves as a fraction of the
devices' peak.

- FLOPs per step: XLA's cost analysis of the compiled step (`step_flops`). For a program
  partitioned over several devices (SPMD: `jax.jit` with shardings on a mesh) XLA analyses
  the per-device program, so the figure is PER DEVICE; the global figure is that times the
  device count. It is what the compiled program executes: matmuls count 2·M·N·K, elementwise
  work and the optimizer update count too, and recomputation (remat) counts again — closer
  to "hardware FLOPs" than to a hand-counted model figure.
- Peak: `PEAK_FLOPS`, dense (no 2:4 sparsity) figures per device from the vendors' spec
  sheets, bf16 and f32. f32 on NVIDIA GPUs is the TF32 tensor-core dense figure: XLA:GPU
  runs f32 matmuls at default precision on TF32 tensor cores (with
  `jax_default_matmul_precision="highest"` the plain FP32 rate, 19.5 / 67 TFLOP/s on
  A100 / H100, is the real ceiling, and the MFU shown is then too low). TPUs publish bf16
  figures only; XLA:TPU runs f32 matmuls at default precision as bf16 MXU passes, so f32
  uses the same figure. On CPU the "peak" is a measured f32 GEMM rate (`cpu_gemm_rate`),
  not a hardware peak. Unknown device kinds: no peak (None), so no MFU.
- MFU = achieved FLOP/s per device / peak per device = (per-device FLOPs per step × steps/s)
  / peak (`throughput`).
"""

from __future__ import annotations

import functools
import math
import re
import statistics
import time

import jax
import jax.numpy as jnp

T = 1e12
# Dense peak FLOP/s per jax device (one chip: v4 and v5p run their two TensorCores as one
# device, "megacore"), {"bf16": ..., "f32": ...}. Sources:
#   TPU v4:  cloud.google.com/tpu/docs/v4  "Peak compute per chip (bf16) 275 TFLOPs"
#   TPU v5e: cloud.google.com/tpu/docs/v5e "Peak compute per chip (bf16) 197 TFLOPs"
#   TPU v5p: cloud.google.com/tpu/docs/v5p "Peak compute per chip (bf16) 459 TFLOPs"
#   TPU v6e: cloud.google.com/tpu/docs/v6e "Peak compute per chip (bf16) 918 TFLOPs"
#   A100:    NVIDIA A100 Tensor Core GPU datasheet: BF16 312 / TF32 156 TFLOPS dense (624 /
#            312 "with sparsity"); the same for SXM and PCIe.
#   H100:    NVIDIA H100 Tensor Core GPU Architecture whitepaper, H100 SXM5: BF16 989.4 /
#            TF32 494.7 TFLOPS dense (the datasheet's 1,979 / 989 are "with sparsity").
#   H200:    NVIDIA H200 datasheet, H200 SXM: BF16 1,979 / TF32 989 TFLOPS "with sparsity",
#            the H100 SXM's figures; dense = half.
# f32 on TPU: no published figure; XLA runs f32 matmuls as bf16 passes by default (see above).
PEAK_FLOPS = {
    "TPU v4": {"bf16": 275 * T, "f32": 275 * T},
    "TPU v5e": {"bf16": 197 * T, "f32": 197 * T},
    "TPU v5p": {"bf16": 459 * T, "f32": 459 * T},
    "TPU v6e": {"bf16": 918 * T, "f32": 918 * T},
    "NVIDIA A100": {"bf16": 312 * T, "f32": 156 * T},
    "NVIDIA H100 SXM": {"bf16": 989.4 * T, "f32": 494.7 * T},
    "NVIDIA H200": {"bf16": 989.4 * T, "f32": 494.7 * T},
}

# jax's `device_kind` strings -> PEAK_FLOPS keys (matched lower-case, in order)
_KINDS = (
    (r"tpu v4", "TPU v4"),
    (r"tpu v5 ?lite|tpu v5e", "TPU v5e"),
    (r"tpu v5p?", "TPU v5p"),
    (r"tpu v6 ?lite|tpu v6e|trillium", "TPU v6e"),
    (r".*\ba100\b.*", "NVIDIA A100"),
    (r".*\bh100\b(?!.*(pcie|nvl)).*", "NVIDIA H100 SXM"),  # PCIe/NVL have lower peaks
    (r".*\bh200\b(?!.*nvl).*", "NVIDIA H200"),
)

DTYPES = ("bf16", "f32")


def device_key(device_kind):
    """The `PEAK_FLOPS` key of a jax `device_kind` ("TPU v5 lite" -> "TPU v5e",
    "NVIDIA H100 80GB HBM3" -> "NVIDIA H100 SXM"), or None when it has no entry."""
    kind = " ".join(str(device_kind).lower().split())
    for pattern, key in _KINDS:
        if re.fullmatch(pattern, kind):
            return key
    return None


def table_peak(device_kind, dtype="bf16"):
    """The dense peak FLOP/s of one device of `device_kind` for `dtype` ("bf16" or "f32";
    float16 counts as bf16), or None for a kind not in `PEAK_FLOPS`."""
    dtype = "bf16" if dtype in ("bf16", "bfloat16", "f16", "float16") else dtype
    dtype = "f32" if dtype in ("float32",) else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; allowed: {', '.join(DTYPES)}")
    key = device_key(device_kind)
    return None if key is None else PEAK_FLOPS[key][dtype]


def peak_flops(device=None, dtype="bf16"):
    """Peak FLOP/s of one `device` (default: the first of jax's default backend) for matmuls
    in `dtype`: the spec-sheet figure (`table_peak`), or on CPU the measured f32 GEMM rate
    (`cpu_gemm_rate`, whatever `dtype`); None when unknown."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return cpu_gemm_rate()
    return table_peak(device.device_kind, dtype)


@functools.cache
def cpu_gemm_rate(n=1024, repeats=5):
    """FLOP/s of an n×n×n f32 matmul on jax's default CPU device: the median of `repeats`
    timed runs after a warm-up, 2·n³ FLOPs each. A measured GEMM rate, not a hardware peak
    (it depends on the BLAS, the threads jax may use and whatever else runs); measured once
    per process and cached."""
    a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices("cpu")[0])
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()  # compile and warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2.0 * n ** 3 / max(statistics.median(times), 1e-9)


def cost_flops(cost):
    """The 'flops' of a `cost_analysis()` result, whatever its shape across jax versions: a
    dict, a list/tuple of dicts (older jax: one per program; the first with 'flops' is
    taken), or None. None when absent, not a number, negative or not finite."""
    if isinstance(cost, (list, tuple)):
        cost = next((c for c in cost if isinstance(c, dict) and "flops" in c), None)
    if not isinstance(cost, dict):
        return None
    try:
        flops = float(cost.get("flops"))
    except (TypeError, ValueError):
        return None
    return flops if math.isfinite(flops) and flops >= 0 else None


def step_flops(stage):
    """FLOPs of one execution of a compiled (`jax.jit(f).lower(...).compile()`) or lowered
    program, from XLA's cost analysis; None when the backend offers none. A compiled SPMD
    program gives the PER-DEVICE figure (XLA analyses the partitioned program each device
    runs); a lowered one gives the global, unoptimised figure, and only on backends without
    the PJRT C API (CPU): prefer the compiled program."""
    try:
        return cost_flops(stage.cost_analysis())
    except Exception:  # NotImplementedError, or a backend's own runtime error
        return None


_MATMUL = re.compile(r"stablehlo\.(dot_general|dot|convolution)\b")
_LOW_PRECISION = re.compile(r"x(bf16|f16|f8\w*)>")


def matmul_dtype(lowered):
    """"bf16" when any matmul or convolution of a lowered program takes 16-bit (or 8-bit)
    float operands, else "f32": which peak of `PEAK_FLOPS` the step is held to (a mixed
    program is held to the higher, bf16 one)."""
    try:
        text = lowered.as_text()
    except Exception:
        return "f32"
    for line in text.splitlines():
        if _MATMUL.search(line) and _LOW_PRECISION.search(line):
            return "bf16"
    return "f32"


def throughput(flops_per_step, steps_per_s, devices=1, peak=None):
    """(achieved FLOP/s over all devices, MFU) of a step of `flops_per_step` FLOPs summed over
    its `devices` devices, run at `steps_per_s`, on devices of `peak` FLOP/s each. MFU is the
    fraction of peak, achieved / (devices · peak); None when `peak` is unknown.
    E.g. throughput(1e12, 2.0, devices=4, peak=1e12) == (2e12, 0.5)."""
    achieved = float(flops_per_step) * float(steps_per_s)
    mfu = achieved / (devices * peak) if peak else None
    return achieved, mfu
