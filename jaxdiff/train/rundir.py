"""The run directory: one trainer per work directory, and what a resumed run may change.

`lock(workdir)` holds an exclusive `flock` on `workdir/.lock` for its block. A second trainer
on the same workdir is refused at once (`WorkdirBusy`, one line naming the holder's PID and
host) before it writes anything. The lock belongs to the open file descriptor, so the kernel
drops it when the holder ends in any way, SIGKILL and crashes included: there is no stale lock
to detect or break. The file itself only carries the holder's PID and host for that message;
the holder removes it when it ends normally, and one left behind by a killed holder is simply
locked again by the next trainer. The lock is re-entrant within a process (the CLI takes it, and
the training loop it calls takes it again).

A multi-process (multi-controller) job shares one workdir: process 0 takes the lock and tells
the others the outcome with one broadcast, so they all start or all stop; they never take it.

NFS: Linux emulates `flock` over NFSv4 (and NFSv3 with the NLM lock manager) with byte-range
locks, which hold across clients; a crashed client's lock is released only when its lease
expires (about 90 s). With NFS mounted `nolock` the lock is local to each host, and two hosts
could both train in one workdir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time

LOCK_NAME = ".lock"
OTHER_WORKDIR = "another work directory"  # in messages (jaxdiff.cli puts its flag in)
_held = {}  # realpath(workdir) -> [fd (None on processes other than 0), depth]


class WorkdirBusy(ValueError):
    """Another trainer holds the workdir (the message is one line naming it)."""


def held(workdir):
    """Whether this process holds (or, in a multi-process job, shares) `workdir`'s lock."""
    return os.path.realpath(workdir) in _held


@contextlib.contextmanager
def lock(workdir):
    """Holds `workdir`'s lock for the block; raises WorkdirBusy when another trainer has it.

    Creates `workdir` if needed (and removes it again if it is still empty at the end)."""
    key = os.path.realpath(workdir)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    created = not os.path.isdir(key)
    fd = _acquire_job(workdir)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        if fd is not None:
            _release(fd, key, created)


@contextlib.contextmanager
def local_lock(workdir):
    """This process alone holds the lock for the block: yields True, or False when another
    process holds it (nothing waits). Already held here: True."""
    if held(workdir):
        yield True
        return
    try:
        fd = _acquire(workdir)
    except WorkdirBusy:
        yield False
        return
    try:
        yield True
    finally:
        _release(fd, os.path.realpath(workdir), created=False)


def _acquire_job(workdir):
    """Process 0 takes the lock; every process raises the same way when that failed."""
    import jax

    if jax.process_count() == 1:
        return _acquire(workdir)
    import numpy as np
    from jax.experimental import multihost_utils

    fd, error = None, None
    if jax.process_index() == 0:
        try:
            fd = _acquire(workdir)
        except (OSError, ValueError) as e:
            error = e
    code = int(multihost_utils.broadcast_one_to_all(np.int32(0 if error is None else 1)))
    if error is not None:
        raise error
    if code:
        raise WorkdirBusy(f"{workdir}: process 0 of this job could not take the workdir lock "
                          f"({_holder_text(_read_holder(_lock_path(workdir)))})")
    return fd


def _lock_path(workdir):
    return os.path.join(os.path.realpath(workdir), LOCK_NAME)


def _acquire(workdir):
    """The open, locked descriptor of `workdir/.lock`, holding this process's PID and host."""
    path = _lock_path(workdir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(path, fd)
            os.close(fd)
            raise WorkdirBusy(
                f"{workdir} is in use by another jaxdiff train ({_holder_text(holder)}; lock "
                f"{path}); wait for it to end or stop it, or use {OTHER_WORKDIR}") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):  # not removed by a holder ending just as we opened it
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd


def _same_file(fd, path):
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _release(fd, workdir, created):
    """Removes the lock file, then unlocks (closing the descriptor); an emptied new workdir
    goes too."""
    try:
        os.unlink(os.path.join(workdir, LOCK_NAME))
    except FileNotFoundError:
        pass
    os.close(fd)
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(workdir)  # only when empty: a run refused before writing anything


def _read_holder(path, fd=None):
    try:
        if fd is None:
            with open(path) as f:
                text = f.read(4096)
        else:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
        return json.loads(text)
    except (OSError, ValueError):
        return {}


def _holder_text(holder):
    if not holder.get("pid"):
        return "holder not yet known"
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"pid {holder['pid']} on host {holder.get('host', '?')}{since}"


def changed_settings(saved, wanted, may_change=()):
    """['key: saved -> wanted', ...] for each setting (dotted key) of two nested dicts that
    differs, except those in or under `may_change` (e.g. "train.steps", "sampler"); keys only
    one of them has are not compared (a setting added or retired by another version)."""
    a, b = _flat(saved), _flat(json.loads(json.dumps(wanted)))
    free = tuple(may_change)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(set(a) & set(b))
            if a[k] != b[k] and not any(k == f or k.startswith(f + ".") for f in free)]


def _flat(tree, prefix=""):
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
