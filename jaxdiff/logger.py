"""Training logs: JSON lines, TensorBoard event files (no TensorFlow needed), a progress line.

TensorBoard reads TFRecord files of `Event` protocol buffers. Scalars need only a few fields,
so they are encoded here by hand: Event{wall_time: double = 1, step: int64 = 2,
summary: Summary = 5}, Summary{value: Value = 1}, Value{tag: string = 1, simple_value: float =
2}; a TFRecord is length (uint64), masked CRC-32C of the length, data, masked CRC-32C of data.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord files."""
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
    """A serialized Event holding one scalar summary."""
    v = _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(value)))
    summary = _bytes_field(1, v)
    return (_field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(int(step)))
            + _bytes_field(5, summary))


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", _masked_crc(header)) + data
            + struct.pack("<I", _masked_crc(data)))


class TensorBoardWriter:
    """Appends scalar events to `logdir/events.out.tfevents.<time>.<host>`."""

    def __init__(self, logdir):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._f = open(os.path.join(logdir, name), "ab")
        version = _field(1, 1, struct.pack("<d", time.time())) + _bytes_field(3, b"brain.Event:2")
        self._f.write(_record(version))  # file_version event, as TensorBoard expects first

    def scalars(self, step, metrics):
        now = time.time()
        for tag, value in metrics.items():
            self._f.write(_record(scalar_event(tag, value, step, now)))
        self._f.flush()

    def close(self):
        self._f.close()


class MetricsLog:
    """Scalars to `workdir/metrics.jsonl` and to TensorBoard under `workdir/tb`; a progress
    line on stderr when it is a terminal."""

    def __init__(self, workdir, total_steps, enabled=True):
        self.enabled, self.total = enabled, total_steps
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._tb = TensorBoardWriter(os.path.join(workdir, "tb"))
        self._tty = sys.stderr.isatty()

    def write(self, step, metrics):
        metrics = {k: float(v) for k, v in metrics.items()}
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": int(step), **metrics}) + "\n")
        self._jsonl.flush()
        self._tb.scalars(step, metrics)
        if self._tty:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            sys.stderr.write(f"\r[{int(step)}/{self.total}] {shown}\033[K")
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            if self._tty:
                sys.stderr.write("\n")
