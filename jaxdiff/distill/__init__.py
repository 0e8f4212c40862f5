"""Few-step generation by training (issue 15, work in progress): objectives for
`jaxdiff.train.make_train_step` that distil a teacher into a few-step student or train a
consistency model (`objectives`)."""

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
from jaxdiff.distill.teacher import params_digest, teacher_record

__all__ = ["consistency_function", "consistency_grid", "consistency_objective",
           "guided_objective", "ict_discretization", "karras_levels", "ode_step", "pd_target",
           "params_digest", "progressive_objective", "reflow_objective", "reflow_pairs",
           "teacher_record"]
