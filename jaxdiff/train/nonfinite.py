"""Non-finite training steps: stop with one line, or skip the update.

- `check_finite`: the one-line error for a NaN/Inf metric, naming the step and the last good
  checkpoint; the loop calls it before every save, so a non-finite state is never written.
- `skip_nonfinite` / `with_skip_nonfinite`: a jittable guard that keeps the previous params and
  optimizer state when the loss, the gradients or the new params are not finite (the step
  still advances; metric `skipped` = 1).

The remedies `check_finite` names are the library's own words (`LOWER_LR`, `SKIP`,
`checkpoint.FRESH_WORKDIR`); a front end such as `jaxdiff.cli` may replace them with its own
settings' names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.train.checkpoint import FRESH_WORKDIR

PROTECTED = ("loss", "grad_norm")  # metrics whose non-finite values skip_nonfinite handles
LOWER_LR = "lower the learning rate"
SKIP = "wrap the train step in with_skip_nonfinite"


def _finite(x):
    return jnp.all(jnp.isfinite(x))


def skip_nonfinite(old, new, metrics):
    """(state, metrics): `new`, or `old` with `new`'s step when the update is not finite.

    Not finite: the loss, the gradient norm or any new parameter is NaN/Inf (each parameter is
    tested itself, so huge but finite parameters do not count). Everything in the state but
    `step` comes from `old` then: params, EMA params, optimizer state. Jittable; adds metric
    `skipped` (1.0 for a skipped update)."""
    ok = jnp.logical_and(_finite(metrics["loss"]), _finite(metrics["grad_norm"]))
    ok = jnp.logical_and(ok, jax.tree.reduce(jnp.logical_and,
                                             jax.tree.map(_finite, new.params), True))
    state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    state = state.replace(step=new.step)
    return state, {**metrics, "skipped": 1.0 - ok.astype(jnp.float32)}


def with_skip_nonfinite(train_step):
    """`train_step(state, batch) -> (state, metrics)` with `skip_nonfinite` applied."""

    def step(state, batch):
        new, metrics = train_step(state, batch)
        return skip_nonfinite(state, new, metrics)

    return step


def check_finite(metrics, step, ckpt=None):
    """Raises FloatingPointError (one line) when a fetched metric is NaN/Inf.

    The message names the step and the last good checkpoint. Metrics of a step guarded by
    `skip_nonfinite` (they carry `skipped`) may have a non-finite loss or gradient norm: the
    update was skipped and the state is intact, so those do not raise."""
    guarded = "skipped" in metrics
    bad = [k for k, v in metrics.items()
           if not np.all(np.isfinite(v)) and not (guarded and k in PROTECTED)]
    if not bad:
        return
    bad.sort(key=lambda k: (PROTECTED.index(k) if k in PROTECTED else len(PROTECTED), k))
    last = ckpt.latest_step() if ckpt is not None else None
    where = (f"the last good checkpoint is step {last} in {ckpt.directory} (untouched)"
             if last is not None else "no checkpoint was written yet")
    # a resume may not change the lr (jaxdiff.train.rundir): a lower one goes on from a copy
    lower = (LOWER_LR if last is None
             else f"{LOWER_LR} in {FRESH_WORKDIR} holding a copy of {ckpt.directory}")
    raise FloatingPointError(
        f"non-finite {', '.join(bad)} at step {step}; {where}; {lower}, or {SKIP} to skip such "
        "updates"
    )
