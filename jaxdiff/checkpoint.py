"""Checkpoints: an orbax `CheckpointManager` holding the train state, the data iterator's state
and a small description of the run, under `workdir/checkpoints/<step>/`.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
crash or kill during a save leaves the previous checkpoint as the latest readable one. Saves
are asynchronous: training continues while arrays are written.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint that cannot serve this run (missing, or of another architecture)."""


class Checkpointer:
    """Saves and restores (train state, data-iterator state, run description) by step."""

    def __init__(self, workdir, *, keep=3, async_save=True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self):
        return self._manager.latest_step()

    def save(self, step, state, data_state, description):
        """Starts saving; returns at once when async. `description` is a JSON-able dict."""
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
        """(state, data_state) of the latest checkpoint, or None when there is none.

        Raises CheckpointError when the checkpoint was written for another architecture."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        saved = self.description(step)
        description = json.loads(json.dumps(description))  # as saved: tuples become lists
        if saved.get("model") != description.get("model"):
            raise CheckpointError(
                f"{self.directory} holds a checkpoint (step {step}) of another architecture: "
                f"saved model {saved.get('model')}, this run's model {description.get('model')}; "
                "use a fresh --workdir or the original config"
            )
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        )
        try:
            out = self._manager.restore(step, args=args)
        except ValueError as e:
            raise CheckpointError(
                f"{self.directory} step {step} does not fit this run's train state "
                f"({str(e).splitlines()[0]}); use a fresh --workdir or the original config"
            ) from e
        return out["state"], out["data"]

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def abstract(tree):
    """Shape/dtype/sharding skeleton of a pytree, for restoring without a first allocation."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
