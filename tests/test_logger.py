"""Logs: JSON lines, and TensorBoard event files that TensorBoard's own reader accepts."""

import json
import os
import re
import sys
import time

import pytest

from jaxdiff.train.logger import MetricsLog, crc32c, event_step, scalar_event


def test_crc32c_known_values():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_jsonl_and_tensorboard_round_trip(tmp_path):
    log = MetricsLog(str(tmp_path), total_steps=20)
    log.write(10, {"loss": 0.5, "lr": 1e-3})
    log.write(20, {"loss": 0.25, "lr": 5e-4})
    log.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 10, "loss": 0.5, "lr": 1e-3}, {"step": 20, "loss": 0.25, "lr": 5e-4}]

    loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    (events_file,) = (tmp_path / "tb").iterdir()
    events = list(loader.LegacyEventFileLoader(str(events_file)).Load())
    assert events[0].file_version == "brain.Event:2"
    got = [(e.step, v.tag, round(v.simple_value, 7)) for e in events[1:] for v in e.summary.value]
    assert got == [(10, "loss", 0.5), (10, "lr", 0.001), (20, "loss", 0.25), (20, "lr", 0.0005)]


def _tb_steps(logdir):
    """[(step, tag)] of every scalar in every event file, read with TensorBoard's own reader."""
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    got = []
    for name in sorted(os.listdir(logdir)):
        events = list(loader.LegacyEventFileLoader(os.path.join(logdir, name)).Load())
        got += [(e.step, v.tag) for e in events for v in e.summary.value]
    return got


def _run_segment(workdir, steps, start_step):
    log = MetricsLog(str(workdir), total_steps=10, start_step=start_step)
    for s in steps:
        log.write(s, {"loss": 1.0 / s, "lr": 0.1})
    log.close()


def test_resume_logs_each_step_once(tmp_path):
    """A run logged steps 1..7, its last checkpoint is step 4; the resumed run (start_step=4)
    logs 5..10 again: metrics.jsonl and TensorBoard hold each step once, one curve."""
    _run_segment(tmp_path, range(1, 8), start_step=0)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # killed mid-line
    tb = tmp_path / "tb"
    (first,) = tb.iterdir()
    with open(first, "ab") as f:
        f.write(b"\x30\x00\x00")  # killed mid-record
    time.sleep(1.1)  # the new segment's event file sorts after the first
    _run_segment(tmp_path, range(5, 11), start_step=4)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[4]["loss"] == 1.0 / 5
    got = _tb_steps(tb)
    assert got == [(s, tag) for s in range(1, 11) for tag in ("loss", "lr")]
    assert len(os.listdir(tb)) == 2  # the earlier segment's file, trimmed to steps 1..4


def test_fresh_start_drops_logs_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    _run_segment(tmp_path, [1, 2, 3], start_step=0)
    _run_segment(tmp_path, [1, 2], start_step=0)
    rows = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [1, 2]
    assert _tb_steps(tmp_path / "tb") == [(1, "loss"), (1, "lr"), (2, "loss"), (2, "lr")]
    assert len(os.listdir(tmp_path / "tb")) == 1  # the emptied first file is gone


def test_event_records_round_trip():
    data = scalar_event("loss", 0.5, 123456789, 1.0)
    assert event_step(data) == 123456789


@pytest.mark.parametrize("tty", [False, True])
def test_progress_line_every_write(tmp_path, monkeypatch, capsys, tty):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    log = MetricsLog(str(tmp_path), total_steps=300)
    log.write(100, {"loss": 0.5, "lr": 1e-3})
    log.write(200, {"loss": 0.25, "lr": 1e-3})
    log.close()
    err = capsys.readouterr().err
    lines = err.split("\r") if tty else err.splitlines()
    lines = [ln.replace("\033[K", "").strip() for ln in lines if ln.strip()]
    assert len(lines) == 2, err
    assert re.fullmatch(r"step 200/300 loss=0\.25 [0-9.e+]+ steps/s ETA \S+", lines[1]), lines
    assert err.endswith("\n") and ("\r" in err) == tty
