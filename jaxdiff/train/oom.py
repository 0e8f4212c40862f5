"""Device out-of-memory: recognise XLA's RESOURCE_EXHAUSTED (or a host MemoryError) and turn it
into one line. What to change to use less memory depends on who set the sizes, so the caller
passes those remedies as plain text (`jaxdiff.cli.hints.memory_hints` names config flags)."""

from __future__ import annotations

import jax

OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM when allocating",
               "Resource exhausted")


def is_oom(exc):
    """Whether `exc` is an out-of-memory error from XLA (any device) or from the host."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(m in text for m in OOM_MARKERS)


def oom_message(exc, hints=()):
    """One line for an out-of-memory error, else None: the device and XLA's own line (at most
    300 characters), then `hints` (texts such as "a smaller batch"), if any, after "; to use less
    memory: "."""
    if not is_oom(exc):
        return None
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if any(m in ln for m in OOM_MARKERS)),
                  lines[0] if lines else type(exc).__name__)
    message = f"out of memory on {_device_kind()}: {detail[:300].rstrip('.')}"
    return f"{message}; to use less memory: {'; '.join(hints)}" if hints else message


def _device_kind():
    try:
        d = jax.devices()[0]
        return f"{len(jax.devices())} {d.platform} device(s) ({d.device_kind})"
    except RuntimeError:
        return "the device"
