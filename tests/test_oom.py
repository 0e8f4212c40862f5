"""Out of memory: `jaxdiff.train.oom` turns XLA's RESOURCE_EXHAUSTED into one line carrying the
caller's remedies; the CLI's remedies (`jaxdiff.cli.hints.memory_hints`) name the config flags
with their values, end to end too."""

import os

import jax.numpy as jnp
import pytest
from ml_collections import ConfigDict

from jaxdiff.cli import hints
from jaxdiff.train import oom
from tests._runs import INJECT, TINY, cli

OVERCOMMIT = "/proc/sys/vm/overcommit_memory"  # "1": huge allocations succeed, then thrash
OVERCOMMIT_ALWAYS = not os.path.exists(OVERCOMMIT) or open(OVERCOMMIT).read().strip() == "1"


class XlaRuntimeError(RuntimeError):
    """Stands in for jaxlib's error type (the name and text are what matter)."""


def test_oom_message_is_one_line_with_the_given_hints():
    exc = XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                          "8589934592 bytes.\nBufferAssignment OOM Debugging.\n...")
    msg = oom.oom_message(exc, ["a smaller batch", "remat=True"])
    assert msg.startswith("out of memory on ") and "\n" not in msg
    assert msg.endswith(": RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 "
                        "bytes; to use less memory: a smaller batch; remat=True"), msg
    assert oom.oom_message(exc).endswith("allocate 8589934592 bytes")  # no hints: no advice
    assert oom.oom_message(MemoryError()).endswith(": MemoryError")
    assert oom.oom_message(XlaRuntimeError("INVALID_ARGUMENT: bad shapes")) is None
    assert oom.oom_message(ValueError("Out of memory")) is None  # not a runtime error
    if not OVERCOMMIT_ALWAYS:  # a real XLA error: 4 TiB fails at once
        with pytest.raises(Exception) as e:
            jnp.ones((2**40,), jnp.float32).block_until_ready()
        msg = oom.oom_message(e.value, ["x"])
        assert msg.startswith("out of memory on ") and "RESOURCE_EXHAUSTED" in msg


def test_memory_hints_name_the_config_flags_with_their_values():
    config = ConfigDict({"data": {"batch_size": 64}, "mesh": {"data": -1, "fsdp": 2}})
    assert hints.memory_hints(config) == [
        "a smaller --config.data.batch_size [now 64]",
        "--config.mesh.fsdp=N (shard params and optimizer state over N devices) [now 2]"]
    config.model = {"remat": False}
    assert "--config.model.remat=True (recompute activations in the backward pass) [now False]" \
        in hints.memory_hints(config)
    assert hints.memory_hints(ConfigDict()) == list(hints.MEMORY_KNOBS.values())  # none: all
    msg = oom.oom_message(MemoryError(), hints.memory_hints(config))
    for knob in ("--config.data.batch_size [now 64]", "--config.model.remat=True",
                 "[now False]", "--config.mesh.fsdp=N", "[now 2]"):
        assert knob in msg, msg


@pytest.mark.skipif(OVERCOMMIT_ALWAYS, reason="a 4 TiB allocation would not fail at once")
def test_out_of_memory_is_one_line_with_knobs(cli_env, tmp_path):
    fail = ("import jax.numpy as jnp\n"
            "train.train = lambda *a, **k: jnp.ones((2**40,), jnp.float32).block_until_ready()")
    out = cli(cli_env, "train", *TINY, "--config.train.steps=2", f"--workdir={tmp_path}",
              code=INJECT.format(at=0, extra=fail))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("jaxdiff train: error: out of memory on ")
    assert "a smaller --config.data.batch_size [now 16]" in line and "mesh.fsdp=N" in line
