"""Checkpoints: an orbax `CheckpointManager` holding the train state, the data iterator's state
and a small description of the run, under `workdir/checkpoints/<step>/`.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
crash or kill during a save leaves the previous checkpoint as the latest readable one. Saves
are asynchronous: training continues while arrays are written.

A checkpoint damaged afterwards (a truncated or deleted file, a missing commit marker, an
interrupted copy) is detected on restore: a warning names its directory and the previous one
is restored instead, and so on back; when checkpoints exist but none is readable, restore
raises `CheckpointError` rather than letting the run start from scratch. The first save of
the run then moves the unreadable directories aside to `<step>.unreadable` (so that step can
be written again) and removes temporary directories left by killed saves.

Old checkpoints (beyond `keep`) leave by an atomic rename into `checkpoints/deleted/`, emptied
before the next save, so a kill during a deletion cannot leave a half-deleted step either.
Temporary directories are removed only by the holder of the workdir's lock (`jaxdiff.train.rundir`),
so a save another trainer has in flight is never deleted.

A save that fails raises `CheckpointError`, one line naming the checkpoint directory and the OS
error: from `save` itself when its directory cannot be made (unwritable, not a directory; the
directories are made synchronously), else (e.g. a full disk while arrays are written in the
background) from the next `save`, `wait` or `close`. Orbax's own tracebacks of it (logged from
its threads) are kept off stderr.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging as pylogging
import os
import shutil
import sys

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from jaxdiff.train import rundir

COMMIT_MARKER = "commit_success.txt"  # orbax writes it into every finalized step directory
_TMP_MARK = ".orbax-checkpoint-tmp"
TRASH = "deleted"  # old steps are renamed into this subdirectory, then removed
FRESH_WORKDIR = "a fresh work directory"  # in messages (jaxdiff.cli puts its flag in)


class CheckpointError(ValueError):
    """A checkpoint that cannot serve this run (missing, unreadable, another architecture)."""


class _Unreadable(Exception):
    """A step directory whose files cannot be read back (internal: triggers the fallback)."""


class Checkpointer:
    """Saves and restores (train state, data-iterator state, run description) by step."""

    def __init__(self, workdir, *, keep=3, async_save=True):
        self.workdir = workdir
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            todelete_subdir=TRASH,
            # directories made in save() itself: a failure to make them raises there, and no
            # background thread is left waiting (up to 20 min, keeping the process alive) for
            # a directory that will never exist
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        pylogging.getLogger("absl").addFilter(_QUIET_ORBAX)  # once: the same filter object
        with self._writing("open"):
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        self.unreadable = {}  # step -> reason, found by restore(); set aside by the first save
        self._saved = False
        self._pending = None  # the step of the save in flight
        self._failed = False

    def all_steps(self):
        """Every committed step, ascending, less those found unreadable."""
        return sorted(s for s in self._manager.all_steps() if s not in self.unreadable)

    def latest_step(self):
        """The latest committed step not known to be unreadable, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step):
        return os.path.join(self.directory, str(int(step)))

    def save(self, step, state, data_state, description):
        """Starts saving; returns at once when async. `description` is a JSON-able dict.
        Raises CheckpointError (one line) when this or the previous save fails."""
        self.wait()  # orbax waits for the previous save here anyway
        with self._writing(f"save checkpoint step {step} in"):
            self._empty_trash()
            if not self._saved:
                self._tidy()
                self._saved = True
            args = ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state or {}),
                run=ocp.args.JsonSave(description),
            )
            self._manager.save(int(step), args=args, force=True)
        self._pending = int(step)

    @contextlib.contextmanager
    def _writing(self, what):
        """Turns any error of the block into one CheckpointError line (no traceback):
        'could not <what> <directory> (<OS error>)'."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:  # orbax raises OSErrors and its own types, from its threads
            self._failed = True
            hint = "; check that it is writable and has free space" if isinstance(
                _root(e), OSError) else ""
            raise CheckpointError(f"could not {what} {self.directory} ({_root_cause(e)})"
                                  f"{hint}") from e

    def description(self, step=None):
        """The run description saved with a checkpoint (latest by default), or None."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        args = ocp.args.Composite(run=ocp.args.JsonRestore())
        return self._manager.restore(step, args=args)["run"]

    def restore(self, abstract_state, description, step=None):
        """(state, data_state) of the latest readable checkpoint, or None when there is none.

        An unreadable latest checkpoint is skipped with a warning naming it, back to the newest
        readable one. With `step`, exactly that step is read (no fallback). Raises
        CheckpointError when the checkpoint was written for another architecture or train
        state, or when checkpoints exist but none can be read."""
        return self._first_readable(
            step, lambda s: self._restore_step(s, abstract_state, description), warn=True)

    def check(self, abstract_state, description):
        """The step `restore` would resume from, or None when there is no checkpoint, checked
        against this run as `restore` checks it (architecture, every array's shape) from the
        metadata alone: no array is read. Unreadable steps are skipped quietly (restore warns);
        raises CheckpointError as restore would."""
        def fits(s):
            self._check_step(s, abstract_state, description)
            return s

        return self._first_readable(None, fits, warn=False)

    def _first_readable(self, step, fn, warn):
        steps = [int(step)] if step is not None else self.all_steps()[::-1]
        if not steps:
            return None
        bad = {}
        for s in steps:
            try:
                return fn(s)
            except _Unreadable as e:
                _drop_late_read_errors()
                bad[s] = str(e)
                if not warn:
                    continue
                self.unreadable[s] = str(e)
                older = [t for t in steps if t < s]
                then = f"restoring step {older[0]} instead" if older else "no older checkpoint"
                logging.warning("checkpoint %s is unreadable (%s); %s", self.step_dir(s), e,
                                then)
        found = "; ".join(f"step {s}: {bad[s]}" for s in steps)
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} ({found}); move the damaged step "
            f"directories away to start over, or use {FRESH_WORKDIR}"
        )

    def _restore_step(self, step, abstract_state, description):
        self._check_step(step, abstract_state, description)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        )
        out = _read(lambda: self._manager.restore(step, args=args))
        return out["state"], out["data"]

    def _check_step(self, step, abstract_state, description):
        """_Unreadable, or CheckpointError naming what does not fit; reads metadata only."""
        path = self.step_dir(step)
        description = json.loads(json.dumps(description))  # as saved: tuples become lists
        if not os.path.exists(os.path.join(path, COMMIT_MARKER)):
            raise _Unreadable(f"no commit marker {COMMIT_MARKER}: an incomplete save or copy")
        saved = _read(lambda: self._manager.restore(
            step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"])
        if not isinstance(saved, dict):
            raise _Unreadable(f"run description is {type(saved).__name__}, not a JSON object")
        if saved.get("model") != description.get("model"):
            raise CheckpointError(
                f"{self.directory} holds a checkpoint (step {step}) of another architecture: "
                f"saved model {saved.get('model')}, this run's model {description.get('model')}; "
                f"use {FRESH_WORKDIR} or the original config"
            )
        saved_shapes = _read(lambda: _shapes(ocp.StandardCheckpointHandler().metadata(
            epath.Path(path) / "state").tree))
        _check_fits(saved_shapes, _shapes(abstract_state), self.directory, step)

    def _tidy(self):
        """Before the first save: set aside unreadable steps, drop killed saves' temp dirs.
        Only under the workdir's lock: another trainer's save in flight is left alone."""
        if jax.process_index() == 0:
            with rundir.local_lock(self.workdir) as mine:
                if mine:
                    self._set_aside()
                else:
                    logging.warning("%s is locked by another process: leaving its temporary "
                                    "and unreadable checkpoints alone", self.workdir)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxdiff_checkpoint_tidy")
        self._manager.reload()
        self.unreadable = {}

    def _set_aside(self):
        for step in sorted(self.unreadable):
            src, dst = self.step_dir(step), self.step_dir(step) + ".unreadable"
            n = 1
            while os.path.exists(dst):
                dst, n = f"{self.step_dir(step)}.unreadable.{n}", n + 1
            if os.path.exists(src):
                os.rename(src, dst)
                logging.warning("moved unreadable checkpoint %s to %s", src, dst)
        for name in os.listdir(self.directory):
            if _TMP_MARK in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def wait(self):
        """Waits for the save in flight; CheckpointError (one line) when it failed."""
        step, self._pending = self._pending, None
        what = "save a checkpoint in" if step is None else f"save checkpoint step {step} in"
        with self._writing(what):
            self._manager.wait_until_finished()

    def close(self):
        """Finishes the save in flight and closes; after a failed save (already reported),
        quietly."""
        try:
            with self._quiet_if_failed():
                self.wait()
            self._empty_trash()
        finally:
            with self._quiet_if_failed():
                self._manager.close()

    def _quiet_if_failed(self):
        return contextlib.suppress(Exception) if self._failed else contextlib.nullcontext()

    def _empty_trash(self):
        """Removes the steps orbax retired into TRASH (no save is in flight when called)."""
        trash = os.path.join(self.directory, TRASH)
        if jax.process_index() == 0 and os.path.isdir(trash):
            for name in os.listdir(trash):
                shutil.rmtree(os.path.join(trash, name), ignore_errors=True)


def _root(e):
    """The innermost cause of `e` (e.g. the OSError under orbax's errors)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


def _root_cause(e):
    """'Type: first line' of the innermost cause of `e`."""
    root = _root(e)
    lines = str(root).strip().splitlines()
    return f"{type(root).__name__}: {lines[0][:200] if lines else ''}"


class _QuietOrbax(pylogging.Filter):
    """Orbax logs a failed background save with its full traceback from each thread involved
    (hundreds of lines); the failure reaches the caller as one CheckpointError line, so those
    records go to DEBUG as one line each."""

    def filter(self, record):
        if (record.levelno >= pylogging.ERROR and record.exc_info
                and f"{os.sep}orbax{os.sep}" in record.pathname):
            logging.debug("orbax: %s", record.getMessage().splitlines()[0][:300])
            return False
        return True


_QUIET_ORBAX = _QuietOrbax()


def _read(fn):
    """fn(), with any error reading files turned into _Unreadable naming the root cause.

    Orbax reads arrays in concurrent coroutines; when one fails, the others' errors surface
    only as "Exception ignored in <coroutine>" tracebacks at garbage collection. Those are
    collected here and kept out of the one-line-per-problem output."""
    previous, ignored = sys.unraisablehook, []
    sys.unraisablehook = ignored.append
    try:
        return fn()
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        gc.collect()  # the failed read's other coroutines report here, to `ignored`
        raise _Unreadable(_root_cause(e)) from e
    finally:
        sys.unraisablehook = previous
        if ignored:
            logging.debug("%d further read errors: %s", len(ignored),
                          [str(u.exc_value)[:100] for u in ignored])


def _drop_late_read_errors():
    """After a failed read, tensorstore finishes the reads still in flight and reports each to
    orbax's event loop, closed by then: "Event loop is closed" tracebacks on stderr, seconds
    later. Those reports are dropped from then on; every other one goes on as before."""
    previous = sys.unraisablehook
    if getattr(previous, "jaxdiff_filter", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook.jaxdiff_filter = True
    sys.unraisablehook = hook


def _shapes(tree):
    """{'params/conv/kernel': shape} for every leaf of a state or of orbax tree metadata."""
    def name(path):
        return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                        for k in path)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {name(p): tuple(getattr(x, "shape", None) or ()) for p, x in flat}


def _check_fits(saved, wanted, directory, step):
    """CheckpointError naming the first leaf that is missing, extra or of another shape."""
    def order(keys):  # the params first: the likeliest to tell what changed
        return sorted(keys, key=lambda k: (not k.startswith("params"), k))

    problems = [f"{k} has shape {saved[k]} in the checkpoint, {wanted[k]} in this run"
                for k in order(set(saved) & set(wanted)) if saved[k] != wanted[k]]
    problems += [f"{k} is not in the checkpoint" for k in order(set(wanted) - set(saved))]
    problems += [f"checkpoint has {k}, this run does not" for k in order(set(saved) - set(wanted))]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"{directory} step {step} does not fit this run's train state ({problems[0]}{more}); "
            f"use {FRESH_WORKDIR} or the original config"
        )


def abstract(tree):
    """Shape/dtype/sharding skeleton of a pytree, for restoring without a first allocation."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
