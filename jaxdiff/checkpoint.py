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
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

COMMIT_MARKER = "commit_success.txt"  # orbax writes it into every finalized step directory
_TMP_MARK = ".orbax-checkpoint-tmp"
TRASH = "deleted"  # old steps are renamed into this subdirectory, then removed


class CheckpointError(ValueError):
    """A checkpoint that cannot serve this run (missing, unreadable, another architecture)."""


class _Unreadable(Exception):
    """A step directory whose files cannot be read back (internal: triggers the fallback)."""


class Checkpointer:
    """Saves and restores (train state, data-iterator state, run description) by step."""

    def __init__(self, workdir, *, keep=3, async_save=True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            todelete_subdir=TRASH,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self.unreadable = {}  # step -> reason, found by restore(); set aside by the first save
        self._saved = False

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
        """Starts saving; returns at once when async. `description` is a JSON-able dict."""
        self._manager.wait_until_finished()  # orbax waits for the previous save here anyway
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
        steps = [int(step)] if step is not None else self.all_steps()[::-1]
        if not steps:
            return None
        description = json.loads(json.dumps(description))  # as saved: tuples become lists
        for s in steps:
            try:
                return self._restore_step(s, abstract_state, description)
            except _Unreadable as e:
                _drop_late_read_errors()
                self.unreadable[s] = str(e)
                older = [t for t in steps if t < s]
                then = f"restoring step {older[0]} instead" if older else "no older checkpoint"
                logging.warning("checkpoint %s is unreadable (%s); %s", self.step_dir(s), e,
                                then)
        found = "; ".join(f"step {s}: {self.unreadable[s]}" for s in steps)
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} ({found}); move the damaged step "
            "directories away to start over, or use a fresh --workdir"
        )

    def _restore_step(self, step, abstract_state, description):
        path = self.step_dir(step)
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
                "use a fresh --workdir or the original config"
            )
        saved_shapes = _read(lambda: _shapes(ocp.StandardCheckpointHandler().metadata(
            epath.Path(path) / "state").tree))
        _check_fits(saved_shapes, _shapes(abstract_state), self.directory, step)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        )
        out = _read(lambda: self._manager.restore(step, args=args))
        return out["state"], out["data"]

    def _tidy(self):
        """Before the first save: set aside unreadable steps, drop killed saves' temp dirs."""
        if jax.process_index() == 0:
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
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxdiff_checkpoint_tidy")
        self._manager.reload()
        self.unreadable = {}

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._empty_trash()
        self._manager.close()

    def _empty_trash(self):
        """Removes the steps orbax retired into TRASH (no save is in flight when called)."""
        trash = os.path.join(self.directory, TRASH)
        if jax.process_index() == 0 and os.path.isdir(trash):
            for name in os.listdir(trash):
                shutil.rmtree(os.path.join(trash, name), ignore_errors=True)


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
        root = e
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        lines = str(root).strip().splitlines()
        raise _Unreadable(f"{type(root).__name__}: {lines[0][:200] if lines else ''}") from e
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
            "use a fresh --workdir or the original config"
        )


def abstract(tree):
    """Shape/dtype/sharding skeleton of a pytree, for restoring without a first allocation."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
