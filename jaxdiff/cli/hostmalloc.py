"""Host malloc settings for XLA:CPU runs: freed buffers stay in the process for the next step.

XLA:CPU takes each step's temporaries from malloc and frees them after the step. glibc serves
large blocks with fresh mmap'd pages (and returns freed heap tops to the OS), so every step
touches those pages anew: on the 2-core CPU VM a DiT-S/2 train step at batch 32 took 1.3 M minor
page faults and ~2.5 CPU-s of kernel time (~13 % of the step's CPU time). With one arena, no mmap
and no trimming (`ENV`), the next step reuses the freed blocks: no page faults, no kernel time
(benchmarks/RESULTS.md, "Training performance"). The cost: memory freed by the process is not
given back to the OS until it exits, so its resident size stays at its peak.

glibc reads these settings only at start-up, so `reexec` starts the same command again with them
in the environment. The `jaxdiff` command does so on Linux/glibc hosts without an accelerator
plugin (CPU training, the case measured); `JAXDIFF_HOST_MALLOC=system` keeps glibc's defaults,
and any of the `ENV` variables already set is respected (nothing is changed).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 46)}
SWITCH = "JAXDIFF_HOST_MALLOC"
CHOICES = ("jaxdiff", "system")
# installed jax plugins of an accelerator host (its host memory behaviour was not measured)
ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin", "libtpu")


def _has_accelerator_plugin():
    return any(importlib.util.find_spec(m) is not None for m in ACCELERATOR_MODULES)


def wanted(environ=None, *, system=None, libc=None, accelerator=None):
    """True when this process should run with `ENV`: `JAXDIFF_HOST_MALLOC` is unset or
    "jaxdiff", none of the `ENV` variables is set yet, the host is Linux with glibc, and either
    JAX_PLATFORMS is "cpu" or no accelerator plugin is installed. A bad switch value is a
    one-line ValueError. (The keywords stand in for the host's facts in tests.)"""
    environ = os.environ if environ is None else environ
    choice = environ.get(SWITCH, "jaxdiff") or "jaxdiff"
    if choice not in CHOICES:
        raise ValueError(f"{SWITCH}={choice!r} is unknown; allowed: {', '.join(CHOICES)}")
    if choice == "system" or any(k in environ for k in ENV):
        return False
    system = platform.system() if system is None else system
    libc = platform.libc_ver()[0] if libc is None else libc
    if system != "Linux" or libc != "glibc":
        return False
    if environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return True
    return not (_has_accelerator_plugin() if accelerator is None else accelerator)


def reexec(args):
    """Replaces this process by `python ARGS` with `ENV` added when `wanted()`; returns (doing
    nothing) otherwise. Call it before anything heavy has run: the process starts over. Never
    inside a test run (pytest imported): that would replace the test process itself."""
    if "pytest" in sys.modules or not wanted():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], dict(os.environ, **ENV))
