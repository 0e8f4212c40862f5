"""Training logs: JSON lines, TensorBoard event files (no TensorFlow needed), a progress line.

A resumed run logs each step once: opened with the step it resumes from, `MetricsLog` first
drops the rows past that step (logged after the checkpoint, before the run stopped; the resumed
run logs them again) from `metrics.jsonl` and from every earlier TensorBoard event file, each
rewritten atomically (a temporary file renamed over it), then starts a new event file. A line
cut short by a kill is dropped too. TensorBoard does not reliably drop steps that one event
file repeats from another, hence the rewrite rather than relying on it.

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


def read_records(path):
    """[(raw record bytes, event data)] of the TFRecords in `path`, up to the first incomplete
    one (a kill mid-write). Only the length's checksum is verified (the data's costs a pure
    Python CRC over the whole file; a torn append shows as a short or bad length)."""
    with open(path, "rb") as f:
        blob = f.read()
    out, i = [], 0
    while i + 12 <= len(blob):
        header = blob[i:i + 8]
        end = i + 12 + struct.unpack("<Q", header)[0] + 4
        if struct.unpack("<I", blob[i + 8:i + 12])[0] != _masked_crc(header) or end > len(blob):
            break
        out.append((blob[i:end], blob[i + 12:end - 4]))
        i = end
    return out


def _read_varint(data, i):
    n = shift = 0
    while True:
        b = data[i]
        n, i, shift = n | (b & 0x7F) << shift, i + 1, shift + 7
        if not b & 0x80:
            return n, i


def event_step(data: bytes):
    """The `step` field of a serialized Event (0 when absent, as for the file_version event)."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
            if field == 2:
                return value
        elif wire == 2:
            size, i = _read_varint(data, i)
            i += size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            break
    return 0


def _replace(path, data: bytes):
    """Writes `path` whole or not at all (a temporary file renamed over it)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def trim_events(logdir, last_step):
    """Drops the events past `last_step` from every event file in `logdir` (a file left with
    no scalar is removed), and a torn last record."""
    for name in sorted(os.listdir(logdir)) if os.path.isdir(logdir) else []:
        path = os.path.join(logdir, name)
        if "tfevents" not in name or name.endswith(".tmp") or not os.path.isfile(path):
            continue
        records = read_records(path)
        kept = [raw for raw, data in records if event_step(data) <= last_step]
        if len(kept) <= 1:  # the file_version event alone, or nothing readable
            os.remove(path)
        elif len(kept) < len(records) or sum(map(len, kept)) != os.path.getsize(path):
            _replace(path, b"".join(kept))


def trim_jsonl(path, last_step):
    """Keeps each step <= `last_step` of a metrics.jsonl once (its last row), in step order;
    drops later steps and lines that do not parse (one cut short by a kill)."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    rows = {}
    for line in lines:
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, TypeError, KeyError):
            continue
        if step <= last_step:
            rows[step] = line
    kept = [rows[s] for s in sorted(rows)]
    if kept != lines:
        _replace(path, b"".join(line + b"\n" for line in kept))


def _events_path(logdir):
    """A new event file's name: time, host and PID (TensorBoard reads files in name order)."""
    base = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    n = 0
    while os.path.exists(os.path.join(logdir, f"{base}.{n}")):
        n += 1
    return os.path.join(logdir, f"{base}.{n}")


class TensorBoardWriter:
    """Writes scalar events to a new file `logdir/events.out.tfevents.<time>.<host>.<pid>.<n>`."""

    def __init__(self, logdir):
        os.makedirs(logdir, exist_ok=True)
        self.path = _events_path(logdir)
        self._f = open(self.path, "xb")
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
    line on stderr (step/total, loss, steps/s, achieved TFLOP/s and MFU when the metrics hold
    `tflops_per_s` / `mfu`, ETA) at each write: redrawn in place on a terminal, one line each
    otherwise (cluster logs).

    start_step: the step the run resumes from (0 for a fresh one); the logs' rows past it are
    dropped first (module docstring). None: the logs are appended to as they are."""

    def __init__(self, workdir, total_steps, enabled=True, start_step=None):
        self.enabled, self.total = enabled, total_steps
        self._tty = sys.stderr.isatty()
        self._last = (start_step or 0, time.perf_counter())
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            jsonl, tb = os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "tb")
            if start_step is not None:
                trim_jsonl(jsonl, start_step)
                trim_events(tb, start_step)
            self._jsonl = open(jsonl, "a")
            self._tb = TensorBoardWriter(tb)

    def write(self, step, metrics):
        metrics = {k: float(v) for k, v in metrics.items()}
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": int(step), **metrics}) + "\n")
        self._jsonl.flush()
        self._tb.scalars(step, metrics)
        line = self._progress(int(step), metrics)
        sys.stderr.write(f"\r{line}\033[K" if self._tty else line + "\n")
        sys.stderr.flush()

    def _progress(self, step, metrics):
        """'step 200/3000 loss=0.1234 51.2 steps/s 12.3 TFLOP/s MFU 31% ETA 55s', rates since
        the last write (TFLOP/s and MFU as the metrics give them, when they do)."""
        now = time.perf_counter()
        rate = (step - self._last[0]) / max(now - self._last[1], 1e-9)
        self._last = (step, now)
        loss = f" loss={metrics['loss']:.4g}" if "loss" in metrics else ""
        flops = f" {_num(metrics['tflops_per_s'])} TFLOP/s" if "tflops_per_s" in metrics else ""
        if "mfu" in metrics:
            flops += f" MFU {_num(100 * metrics['mfu'], 2)}%"
        eta = _duration((self.total - step) / rate) if rate > 0 else "?"
        return f"step {step}/{self.total}{loss} {rate:.3g} steps/s{flops} ETA {eta}"

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            if self._tty:
                sys.stderr.write("\n")


def _num(x, digits=3):
    """`x` to `digits` significant digits, whole numbers without an exponent from
    10**(digits - 1) on: '12.3', '0.042', '1234'."""
    return f"{x:.0f}" if abs(x) >= 10 ** (digits - 1) else f"{x:.{digits}g}"


def _duration(seconds):
    """'1h02m', '3m05s', '42s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
