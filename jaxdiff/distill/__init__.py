"""Few-step generation by training: objectives for `jaxdiff.train.make_train_step` that distil
a teacher into a few-step student or train a consistency model (`objectives`), and the
teacher's side (`teacher`: its record, its CFG as one network, a student's init from it).
`jaxdiff distill` (`jaxdiff.cli.distill_stages`) runs them as stages of ordinary training runs."""

from jaxdiff.distill.objectives import (
    consistency_function,
    consistency_grid,
    consistency_objective,
    guided_objective,
    ict_discretization,
    karras_levels,
    ode_step,
    pd_target,
    progressive_objective,
    reflow_objective,
    reflow_pairs,
)
from jaxdiff.distill.teacher import graft, params_digest, teacher_record, with_cfg, zero_last

__all__ = ["consistency_function", "consistency_grid", "consistency_objective",
           "guided_objective", "ict_discretization", "karras_levels", "ode_step", "pd_target",
           "params_digest", "progressive_objective", "reflow_objective", "reflow_pairs",
           "teacher_record", "with_cfg", "zero_last", "graft"]
