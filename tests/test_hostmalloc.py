"""The host malloc settings of `jaxdiff` on CPU hosts (jaxdiff/cli/hostmalloc.py): when they
apply, that the command restarts with them, and their effect (no page faults from a repeated
XLA:CPU step that allocates a large temporary)."""

import os
import subprocess
import sys

import pytest

from jaxdiff.cli import hostmalloc

LINUX = dict(system="Linux", libc="glibc", accelerator=False)


def test_when_the_settings_apply():
    assert hostmalloc.wanted({}, **LINUX)
    assert hostmalloc.wanted({hostmalloc.SWITCH: "jaxdiff"}, **LINUX)
    assert not hostmalloc.wanted({hostmalloc.SWITCH: "system"}, **LINUX)
    assert not hostmalloc.wanted({"MALLOC_ARENA_MAX": "4"}, **LINUX)  # the user's setting
    assert not hostmalloc.wanted({}, **dict(LINUX, accelerator=True))
    assert hostmalloc.wanted({"JAX_PLATFORMS": "cpu"}, **dict(LINUX, accelerator=True))
    assert not hostmalloc.wanted({}, **dict(LINUX, system="Darwin"))
    assert not hostmalloc.wanted({}, **dict(LINUX, libc="musl"))
    with pytest.raises(ValueError, match="JAXDIFF_HOST_MALLOC='tcmalloc' is unknown; allowed: "
                                         "jaxdiff, system"):
        hostmalloc.wanted({hostmalloc.SWITCH: "tcmalloc"}, **LINUX)


def test_never_replaces_a_test_process_or_an_in_process_main(monkeypatch):
    import jaxdiff.cli as cli

    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(hostmalloc, "wanted", lambda *a, **k: True)
    hostmalloc.reexec(["-c", "pass"])  # pytest is imported: a no-op
    monkeypatch.setattr(sys, "argv", ["jaxdiff", "train", "--help"])
    assert cli.main(["jaxdiff", "help"]) == 0  # main() itself never restarts
    assert calls == []


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in hostmalloc.ENV and k != hostmalloc.SWITCH}
    return dict(env, JAX_PLATFORMS="cpu", **extra)


def test_the_command_restarts_with_the_settings_and_opts_out():
    show = "import os; print(os.environ.get('MALLOC_MMAP_MAX_'))"
    code = f"from jaxdiff.cli import hostmalloc; hostmalloc.reexec(['-c', {show!r}]); {show}"
    if not hostmalloc.wanted(_env()):
        pytest.skip("not a Linux/glibc host")
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env,  # noqa: E731
                                     capture_output=True, text=True, check=True).stdout.strip()
    assert run(_env()) == "0"
    assert run(_env(JAXDIFF_HOST_MALLOC="system")) == "None"
    bad = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "train"], capture_output=True,
                         text=True, env=_env(JAXDIFF_HOST_MALLOC="nope"))
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("jaxdiff: error: JAXDIFF_HOST_MALLOC='nope' is unknown; "
                                  "allowed: jaxdiff, system")


STEP = """
import os, resource
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])  # one XLA thread: a fixed order
import jax, jax.numpy as jnp
def loss(w, x):
    for wi in w:
        x = jax.nn.gelu(x @ wi)
    return (x ** 2).mean()
step = jax.jit(jax.grad(loss))        # a backward pass: 32 MiB activations per layer
w, x = [jnp.full((512, 512), 0.01)] * 3, jnp.ones((16384, 512))
for _ in range(8):                     # past the heap's growth to its steady state
    step(w, x)[0].block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step(w, x)[0].block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def test_repeated_steps_stop_faulting_in_their_buffers():
    if not hostmalloc.wanted(_env()):
        pytest.skip("not a Linux/glibc host")
    code = f"from jaxdiff.cli import hostmalloc; hostmalloc.reexec(['-c', {STEP!r}])\n{STEP}"
    faults = lambda env: int(subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], env=env, capture_output=True, text=True,
        check=True).stdout.split()[-1])
    system, ours = faults(_env(JAXDIFF_HOST_MALLOC="system")), faults(_env())
    # glibc's defaults: the activations are mmap'd anew each step (measured: ~66 k pages of
    # 4 KiB per step); with the settings the heap reaches a steady state (measured: 0 in most
    # runs, one late heap growth of ~80 k pages in some)
    assert system >= 10 * 8192
    assert ours < 0.2 * system
