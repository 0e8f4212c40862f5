"""Damaged checkpoints and output files: a damaged latest step falls back to an older one with a
warning, no readable step is an error (not a fresh start), another run's checkpoint is refused,
killed saves are cleaned up, and output files are replaced whole or not at all."""

import glob
import logging
import os
import shutil

import numpy as np
import pytest

from jaxdiff.train.checkpoint import FRESH_WORKDIR, Checkpointer, CheckpointError, abstract
from tests._runs import DESC, state

DAMAGE = {  # how a step directory gets damaged after it was committed
    "truncated array data": lambda d: [os.truncate(f, os.path.getsize(f) // 2) for f in
                                       glob.glob(f"{d}/state/**/d/*", recursive=True)],
    "missing commit marker": lambda d: os.remove(f"{d}/commit_success.txt"),
    "truncated _METADATA": lambda d: os.truncate(f"{d}/state/_METADATA", 40),
    "corrupt run description": lambda d: open(f"{d}/run/metadata", "w").write("{\"mod"),
    "deleted state": lambda d: shutil.rmtree(f"{d}/state"),
}


def _saved(workdir, steps):
    ckpt = Checkpointer(workdir, keep=10)
    for s in steps:
        ckpt.save(s, state(s), {"next_index": s}, DESC)
    ckpt.close()


def test_damaged_latest_checkpoints_fall_back_with_warnings(tmp_path, caplog):
    _saved(tmp_path, range(1, 7))
    for step, how in zip(range(6, 1, -1), DAMAGE.values()):  # steps 6..2 each damaged one way
        how(tmp_path / "checkpoints" / str(step))
    ckpt = Checkpointer(tmp_path)
    with caplog.at_level(logging.WARNING):
        restored, data = ckpt.restore(abstract(state(0)), DESC)
    assert int(restored.step) == 1 and data == {"next_index": 1}
    np.testing.assert_array_equal(restored.params["w"], state(1).params["w"])
    warned = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
    assert len(warned) == 5, warned
    d = ckpt.directory
    assert warned[0].startswith(f"checkpoint {d}/6 is unreadable (")
    assert warned[0].endswith("; restoring step 5 instead") and "no commit marker" in warned[1]
    assert ckpt.latest_step() == 1  # the damaged ones no longer count
    # the run goes on from step 1: its first save sets the damaged steps aside, step 2 is new
    ckpt.save(2, state(2), {"next_index": 2}, DESC)
    ckpt.close()
    names = sorted(os.listdir(d))
    assert {"2.unreadable", "6.unreadable"} <= set(names) and "3" not in names
    ckpt = Checkpointer(tmp_path)
    assert int(ckpt.restore(abstract(state(0)), DESC)[0].step) == 2
    ckpt.close()


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    _saved(tmp_path, [1, 2])
    DAMAGE["truncated array data"](tmp_path / "checkpoints" / "2")
    DAMAGE["missing commit marker"](tmp_path / "checkpoints" / "1")
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError) as e:
        ckpt.restore(abstract(state(0)), DESC)
    msg = str(e.value)
    assert msg.startswith(f"no readable checkpoint in {tmp_path / 'checkpoints'} (step 2: ")
    assert "; step 1: no commit marker" in msg and "\n" not in msg
    # the library's own words for the way out (the CLI names its --workdir flag instead)
    assert msg.endswith(f"or use {FRESH_WORKDIR}") and "--" not in msg, msg
    with pytest.raises(CheckpointError, match="no readable checkpoint"):  # an explicit step too
        ckpt.restore(abstract(state(0)), DESC, step=2)
    ckpt.close()


def test_another_run_is_refused_not_skipped(tmp_path):
    _saved(tmp_path, [1, 2])
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds a checkpoint \(step 2\) of another arch"):
        ckpt.restore(abstract(state(0)), {"model": {"name": "toy", "width": 32}})
    with pytest.raises(CheckpointError, match=r"step 2 does not fit this run's train state "
                                              r"\(params/w has shape \(64,\) in the checkpoint, "
                                              r"\(32,\) in this run \(and 3 more\)\); use a "
                                              r"fresh work directory or the original config$"):
        ckpt.restore(abstract(state(0, n=32)), DESC)
    assert ckpt.unreadable == {}
    ckpt.close()


def test_first_save_removes_killed_saves(tmp_path):
    _saved(tmp_path, [1])
    stale = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp"
    (stale / "state").mkdir(parents=True)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 1  # an uncommitted save is not a checkpoint
    ckpt.save(3, state(3), {}, DESC)
    ckpt.close()
    assert not stale.exists() and sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "3"]


def test_output_files_are_replaced_whole_or_not_at_all(tmp_path):
    from jaxdiff.eval import images

    path = str(tmp_path / "out" / "report.json")
    images.write_atomically(path, lambda tmp: open(tmp, "w").write("old"))

    def crash(tmp):  # dies half-way through writing the new version
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        images.write_atomically(path, crash)
    assert open(path).read() == "old"  # the previous file is intact
    images.write_atomically(path, lambda tmp: open(tmp, "w").write("new"))
    assert open(path).read() == "new"
