"""The training system: state, optimizer, step, loop, checkpoints, preemption and non-finite
handling, logs, the run-directory lock and device meshes. Library functions take explicit
keyword arguments; only `jaxdiff.cli` reads configs.

The public names are re-exported here: `from jaxdiff import train; train.init_state(...)`.
"""

from jaxdiff.train.loop import train
from jaxdiff.train.optimizer import make_optimizer
from jaxdiff.train.state import TrainState, abstract_state, init_state, state_shardings
from jaxdiff.train.step import ModelApply, diffusion_objective, make_train_step, network

__all__ = ["ModelApply", "TrainState", "abstract_state", "diffusion_objective", "init_state",
           "make_optimizer", "make_train_step", "network", "state_shardings", "train"]
