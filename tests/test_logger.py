"""Logs: JSON lines, and TensorBoard event files that TensorBoard's own reader accepts."""

import json

import pytest

from jaxdiff.logger import MetricsLog, crc32c


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
