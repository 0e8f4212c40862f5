"""The loop every sampler shares, and the contract it implies.

A sampler is a plain function `sampler(denoiser, x, sigmas, *, num_steps=None, trajectory=False,
[key,] **options)`:

- `denoiser(x, sigma) -> x0-hat` in the VE view (see `jaxdiff.core.denoiser`); `sigma` is a scalar.
- `x` is the state at `sigmas[0]`, already scaled (VE view: x0 + sigma * eps).
- `sigmas` is a decreasing 1-D grid, usually ending at 0. It may be padded to a fixed capacity:
  only `sigmas[: num_steps + 1]` is used. `num_steps` may be a traced integer, so changing the
  number of steps, or the grid's values, reuses one compiled program.
- Returns the final state, or `(x, traj)` with `traj[k]` the state after k steps when
  `trajectory=True` (`traj` has `len(sigmas)` rows; rows past `num_steps` repeat the final state).

The loop is a `lax.fori_loop` (a `while_loop` when `num_steps` is traced), so samplers never
unroll over steps in Python and the history of multistep methods lives in the loop carry.

Stateful denoisers (feature caches such as DeepCache or TaylorSeer, SMC particles and weights):
every sampler also takes `Stateful(D, init)` (`jaxdiff.core.denoiser.Stateful`) with
`D(x, sigma, state) -> (x0, state)`, and then returns `(x, state)`, or `(x, traj, state)`.

- `state` is any pytree of arrays; D must return it with the same structure, shapes and dtypes
  (it is a loop carry; a changed leaf is refused at trace time).
- The sampler calls D exactly as it calls a plain denoiser, in the same order, and threads the
  state through every call exactly once: the state D returns is the one the next call gets, and
  the final one is returned. There is one state per model call, so the number of state updates is
  the sampler's NFE; a call skipped by a `lax.cond` (a stage at sigma' = 0) leaves it untouched
  in both branches. Calls inside one step (Heun's corrector, DPM-Solver-2/3's stages, pc's
  Langevin corrections) see the state the previous call returned.
- D gets the noise level `sigma` of the call (a grid level, or an intermediate stage level for
  multi-stage samplers), not the step index: keep a call counter in the state. The sequence of
  calls and levels depends only on the grid and `num_steps`, never on the values of x.
- Still one compiled program per sampler and shapes, under `jit`, `vmap` and a traced
  `num_steps`. A plain denoiser is lifted to the stateful form with the state `NO_STATE`, a pytree
  without leaves: its program has no extra carry entries and no extra ops.
- `ode` (diffrax's adaptive solver) refuses a stateful denoiser: see its docstring.

States that act between steps (SMC's particles, `jaxdiff.steer`): a state with a method
`after_step(i, x, carry) -> (x, carry, state)` is called by the loop after every step i, with
the state that step produced; it may reorder the particles (resampling): x and every leaf of the
carry whose trailing dimensions are x's shape (a multistep history stacked in front) are then
gathered by the same ancestor indices. Samplers without fixed
steps (`dpm_adaptive`, `ode`) refuse such a state (`check_between_steps`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core.denoiser import NO_STATE, Stateful, lift
from jaxdiff.core.schedules import check_sigmas

__all__ = ["NO_STATE", "Stateful", "lift", "run", "num_steps_of", "check_sigmas", "step_key",
           "is_last", "between_steps", "check_between_steps"]


def num_steps_of(sigmas, num_steps):
    """Steps to take: `num_steps` if given (int or traced), else `len(sigmas) - 1`."""
    capacity = sigmas.shape[0] - 1
    if num_steps is None:
        return capacity
    if isinstance(num_steps, (int, np.integer)) and not 1 <= num_steps <= capacity:
        raise ValueError(
            f"num_steps={num_steps} must be between 1 and len(sigmas) - 1 = {capacity}"
        )
    return num_steps


def run(step, x, sigmas, carry=(), state=NO_STATE, *, num_steps=None, trajectory=False):
    """Applies `step(i, x, carry, state) -> (x, carry, state)` for i = 0 .. num_steps - 1, where
    `state` is the denoiser's (from `lift(denoiser)`).

    Returns `x` or `(x, traj)` as described in the module docstring, with the final denoiser state
    appended unless it is `NO_STATE`."""
    check_sigmas(sigmas)
    n = num_steps_of(sigmas, num_steps)
    stateful = state is not NO_STATE

    def advance(i, x, carry, state):
        return between_steps(i, *step(i, x, carry, state))

    if not trajectory:
        x, _, state = jax.lax.fori_loop(0, n, lambda i, s: advance(i, *s), (x, carry, state))
        return (x, state) if stateful else x
    traj = jnp.zeros((sigmas.shape[0],) + x.shape, x.dtype).at[0].set(x)

    def body(i, loop):
        x, carry, state, traj = loop
        x, carry, state = advance(i, x, carry, state)
        return x, carry, state, traj.at[i + 1].set(x)

    x, _, state, traj = jax.lax.fori_loop(0, n, body, (x, carry, state, traj))
    rows = jnp.arange(sigmas.shape[0]).reshape((-1,) + (1,) * x.ndim)
    traj = jnp.where(rows > n, x, traj)
    return (x, traj, state) if stateful else (x, traj)




def between_steps(i, x, carry, state):
    """The state's `after_step` hook after step i (see the module docstring), if it has one."""
    hook = getattr(state, "after_step", None)
    if hook is None:
        return x, carry, state
    return hook(i, x, carry)


def check_between_steps(state, sampler):
    """Refuses a state that acts between steps in a sampler without fixed steps."""
    if getattr(state, "after_step", None) is not None:
        raise ValueError(
            f"sampler {sampler!r} has no fixed steps, so it cannot run a state that acts between "
            f"steps ({type(state).__name__}, e.g. SMC particles); allowed: a fixed-grid sampler "
            "(euler_ancestral, ddpm, ddim, dpmpp_2m, ...)")


def step_key(key, i):
    """The PRNG key of step i: the same numbers whatever the step count or compilation."""
    return jax.random.fold_in(key, i)


def is_last(i, num_steps, sigmas):
    """Traced boolean: step i is the final step."""
    return i == num_steps_of(sigmas, num_steps) - 1
