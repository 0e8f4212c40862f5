"""`sample`: the one high-level entry that composes process, prediction adapter, schedule,
guidance and sampler.

The schedule is computed eagerly and padded to a fixed `capacity`; the step count, the grid's
values, the guidance parameters and the network's parameters (when `model_fn` is a
`jax.tree_util.Partial`) are data to one compiled program. Changing them does not recompile.
So is a stateful network's initial state (`Stateful(model_fn, init)`, see `jaxdiff.samplers.base`).

`sampler` is a name in `jaxdiff.samplers.SAMPLERS`, or a sampler object: a callable pytree
`obj(denoiser, x, sigmas, *, num_steps, trajectory, [key,] **options)` with the sampler contract
of `jaxdiff.samplers.base`, whose leaves (an inverse problem's operator and measurement, a
solver's step sizes) are data to the compiled program, e.g. `jaxdiff.inverse.DPS(operator, y)`.
"""

from __future__ import annotations

import collections
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import samplers as samplers_lib
from jaxdiff.core import schedules as schedules_lib
from jaxdiff.core.denoiser import Stateful, check_prediction
from jaxdiff.core.denoiser import denoiser as make_denoiser
from jaxdiff.core.guidance import check_guidance
from jaxdiff.core.process import check_process, short_repr

DEFAULT_CAPACITY = 256
_traces = collections.Counter()  # sampler name -> traces of the sampling program (`_core`)


def trace_count(sampler=None):
    """How many times the sampling program has been traced (so compiled) in this process, for
    `sampler` or for all: tests and benchmarks check with it that a call did not recompile. It
    counts traces, not cache entries, so `jax.clear_caches()` does not reset it."""
    return _traces[sampler] if sampler is not None else sum(_traces.values())


def sample(
    model_fn,
    noise,
    *,
    process,
    prediction,
    sampler,
    steps=None,
    schedule=None,
    key=None,
    guidance=None,
    capacity=None,
    trajectory=False,
    time=None,
    sampler_file=None,
    **sampler_options,
):
    """Draws samples by integrating from `noise` (standard normal, shaped like the data).

    Args:
      model_fn: the raw network, `model_fn(x, t)` with x in the process's scaling and t its
        conditioning value; with `guidance`, `model_fn(x, t, *args)` (see `jaxdiff.core.guidance`).
        Wrap a network and its params as `jax.tree_util.Partial(apply, params)` so that new
        params reuse the compiled program. A stateful network (a feature cache):
        `jaxdiff.core.denoiser.Stateful(model_fn, init)` with `model_fn(x, t, *args, state) ->
        (out, state)`, called once per model evaluation, the state threaded through every call
        of the sampler (under CFG one call on [x; x], see `jaxdiff.core.guidance`).
      process: a `jaxdiff.core.process` process; prediction: one of eps, x0, v, flow, score, edm.
      sampler: a name in `jaxdiff.samplers.SAMPLERS`, or a sampler object (module docstring);
        steps: number of sampler steps.
      schedule: a name in `jaxdiff.core.schedules.SCHEDULES`, a function `(process, steps) -> grid`,
        or an explicit grid of steps + 1 decreasing noise levels. Default: `karras` for EDM/VE,
        `trailing` for DiscreteVP, `logsnr` otherwise.
      key: PRNG key, required by stochastic samplers.
      guidance: a guidance object from `jaxdiff.core.guidance` (e.g. `CFG(scale, y, y_null)`).
      capacity: largest step count the compiled program serves (default 256 or above `steps`).
      trajectory: also return the states after every step.
      time: the time variable of samplers with a `time` option (heun): "t" (the process's own
        time) or "sigma" (the VE level). Default: `default_time(process)`.
      sampler_file: a learned solver (`jaxdiff.core.solver_fit`: a JSON path or its dict) for
        sampler="learned": its grid and per-step coefficients replace `schedule` and `steps`
        (steps, if given, must be its NFE); the coefficients are data to the compiled program.
      **sampler_options: passed to the sampler (e.g. `order=3`, `eta=1.0`).
    Returns:
      samples in the process's scaling at the last noise level (data space when it is 0), and
      the trajectory (VE view) when asked; for a `Stateful` model_fn, then the final state:
      `(x, state)` or `(x, traj, state)`.
    """
    noise = _check_inputs(noise, process, prediction, guidance)
    solver = None
    if sampler_file is not None or sampler == "learned":
        schedule, steps, solver = _solver_file(sampler, sampler_file, process, schedule, steps,
                                               capacity, sampler_options)
    fn, sampler, method = _sampler(sampler)
    params = inspect.signature(fn).parameters
    unknown = sorted(set(sampler_options) - set(params))
    if unknown:
        allowed = [p for p, v in params.items() if v.kind is v.KEYWORD_ONLY and p != "key"]
        raise ValueError(f"sampler {sampler!r} has no option {unknown[0]!r}; allowed: {allowed}")
    if sampler_options.get("return_info"):  # sample() returns the sample (and trajectory) only
        raise ValueError(f"return_info={sampler_options['return_info']!r} works only when "
                         f"{sampler!r} is called directly; allowed here: False (count model "
                         "calls with a jaxdiff.Stateful denoiser)")
    if "key" in params and params["key"].default is inspect.Parameter.empty and key is None:
        raise ValueError(f"sampler {sampler!r} is stochastic and needs key=jax.random.key(...)")
    time = _time(sampler, params, process, time)
    sigmas = _padded_grid(process, schedule, steps, capacity)
    model_fn = _as_pytree(model_fn)
    return _run(
        model_fn,
        jnp.asarray(noise),
        sigmas,
        jnp.asarray(steps, jnp.int32),
        key,
        process,
        guidance,
        sampler=sampler,
        prediction=prediction,
        options=tuple(sorted(sampler_options.items())),
        trajectory=trajectory,
        time=time,
        solver=solver,
        method=method,
    )


def _sampler(sampler):
    """(function, name, pytree object or None) of a sampler name or sampler object."""
    if isinstance(sampler, str):
        return samplers_lib.get(sampler), sampler, None
    if not callable(sampler) or isinstance(sampler, type):
        raise ValueError(f"sampler={short_repr(sampler)} is neither a sampler name nor a sampler "
                         f"object; allowed: {', '.join(sorted(samplers_lib.SAMPLERS))}, or a "
                         "callable pytree such as jaxdiff.inverse.DPS(operator, y)")
    return sampler, type(sampler).__name__, sampler


def _solver_file(sampler, sampler_file, process, schedule, steps, capacity, options):
    """(grid, steps, {"coefficients", "corrector" if any}: padded to the capacity) of a
    learned solver file."""
    from jaxdiff.core.solver_fit import check_solver_process, load_solver

    if sampler != "learned":
        raise ValueError(f"sampler_file is for sampler='learned', not sampler={sampler!r}")
    if sampler_file is None:
        raise ValueError("sampler='learned' needs sampler_file=PATH (or its dict), e.g. from "
                         "`jaxdiff tune-sampler`")
    for name in ("coefficients", "corrector"):
        if name in options:
            raise ValueError(f"sampler='learned' takes its {name} from sampler_file, not as an "
                             "option")
    solver = load_solver(sampler_file)
    check_solver_process(solver, process)
    if schedule is not None:
        raise ValueError("schedule must be None with a sampler_file (the file holds the grid)")
    if steps is not None and steps != solver["nfe"]:
        raise ValueError(f"steps={steps!r} but the solver file is for {solver['nfe']} steps")
    steps = solver["nfe"]
    rows = _capacity(steps, capacity) - steps
    tables = {k: jnp.asarray(np.pad(solver[k], ((0, rows), (0, 0))), jnp.result_type(float))
              for k in ("coefficients", "corrector") if solver.get(k) is not None}
    return solver["sigmas"], steps, tables


def _as_pytree(model_fn):
    """model_fn as a jit argument: a `jax.tree_util.Partial` (inside a `Stateful`, whose initial
    state is then data too)."""
    if isinstance(model_fn, Stateful):
        return Stateful(_as_pytree(model_fn.fn), model_fn.init)
    if not isinstance(model_fn, jax.tree_util.Partial):
        model_fn = jax.tree_util.Partial(model_fn)
    return model_fn


def _check_inputs(noise, process, prediction, guidance):
    """Refuses arguments that would run and give a silently wrong result; returns the noise as
    an array."""
    check_process(process)
    check_prediction(prediction, process)
    noise = jnp.asarray(noise)
    if not jnp.issubdtype(noise.dtype, jnp.floating):  # integer states round every step to 0
        raise TypeError(
            f"noise must be a float array (standard normal draws, e.g. jax.random.normal), "
            f"got dtype {noise.dtype}"
        )
    check_guidance(guidance, noise.shape[0] if noise.ndim else None)
    return noise


_GRIDS = collections.OrderedDict()  # recent padded grids: a repeated call skips their math
_GRIDS_SIZE = 32


def _padded_grid(process, schedule, steps, capacity):
    """The schedule's grid padded to the capacity, as an array; cached for named schedules of a
    concrete process (the math is many small eager ops: ~1.5 ms a call on a CPU)."""
    key = _grid_key(process, schedule, steps, capacity)
    if key is not None and key in _GRIDS:
        _GRIDS.move_to_end(key)
        return _GRIDS[key]
    grid = _grid(process, schedule, steps)
    capacity = _capacity(steps, capacity)
    sigmas = jnp.asarray(schedules_lib.pad(grid, capacity), jnp.result_type(float))
    if key is not None:
        _GRIDS[key] = sigmas
        while len(_GRIDS) > _GRIDS_SIZE:
            _GRIDS.popitem(last=False)
    return sigmas


def _grid_key(process, schedule, steps, capacity):
    """A hashable fingerprint of the grid's inputs, or None when they are not all concrete."""
    if not (schedule is None or isinstance(schedule, str)):
        return None
    if not isinstance(steps, (int, np.integer)) or isinstance(capacity, jax.core.Tracer):
        return None
    leaves, treedef = jax.tree.flatten(process)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return None
    arrays = [np.asarray(leaf) for leaf in leaves]
    key = (treedef, tuple((a.dtype.str, a.shape, a.tobytes()) for a in arrays), schedule,
           int(steps), capacity, jnp.result_type(float).name)
    try:
        hash(key)
    except TypeError:  # unhashable static fields in a user's process
        return None
    return key


def _grid(process, schedule, steps):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps={short_repr(steps)} must be an integer >= 1")
    if schedule is None:
        schedule = default_schedule(process)
    name = schedule if isinstance(schedule, str) else getattr(schedule, "__name__", "<array>")
    if isinstance(schedule, str):
        schedule = schedules_lib.get(schedule)
    grid = schedule(process, steps) if callable(schedule) else schedule
    try:  # inside the compiled program the grid is traced, and a sampler can no longer check it
        grid = schedules_lib.array(grid)
    except ValueError as e:
        raise ValueError(f"schedule={name} gives a bad grid: {e}") from None
    if len(grid) != steps + 1:
        raise ValueError(
            f"schedule has {len(grid)} noise levels but steps={steps} needs {steps + 1}"
        )
    return grid


def default_schedule(process):
    """karras for EDM/VE processes, trailing for DiscreteVP, logsnr otherwise."""
    name = type(process).__name__
    return {"EDM": "karras", "VE": "karras", "DiscreteVP": "trailing"}.get(name, "logsnr")


def default_time(process):
    """The process's natural time for `time`: "t" for RectifiedFlow and the continuous VP
    processes; "sigma" for EDM (whose t is sigma: the two coincide), VE (whose t is a rescaled
    log sigma; EDM's own sampler steps every process in sigma, Table 1) and DiscreteVP (its t
    interpolates the training timesteps piecewise, and diffusers' HeunDiscreteScheduler, which
    the parity tests reproduce, steps in sigma)."""
    return "sigma" if type(process).__name__ in ("EDM", "VE", "DiscreteVP") else "t"


def _time(sampler, params, process, time):
    """`time` for `_core`: "t" or "sigma" when the sampler has the option, else None."""
    if time is not None and time not in ("t", "sigma"):
        raise ValueError(f"time={time!r} is unknown; allowed: 't', 'sigma'")
    if "time" not in params:
        if time is not None:
            having = [n for n, f in samplers_lib.SAMPLERS.items()
                      if "time" in inspect.signature(f).parameters]
            raise ValueError(f"sampler {sampler!r} has no time option; samplers with one: {having}")
        return None
    return default_time(process) if time is None else time


def _capacity(steps, capacity):
    if capacity is None:
        return max(DEFAULT_CAPACITY, 1 << (int(steps) - 1).bit_length())
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ValueError(f"capacity={short_repr(capacity)} must be an integer >= 1 (or None)")
    if steps > capacity:
        raise ValueError(f"steps={steps} exceeds capacity={capacity}; pass capacity >= {steps}")
    return capacity


def _core(model_fn, noise, sigmas, steps, key, process, guidance, *, sampler, prediction, options,
          trajectory, time, solver=None, method=None):
    _traces[sampler] += 1
    D = make_denoiser(model_fn, process, prediction)
    if guidance is not None:
        D = guidance(D)
    fn = samplers_lib.get(sampler) if method is None else method
    kwargs = dict(options, num_steps=steps, trajectory=trajectory)
    if key is not None and "key" in inspect.signature(fn).parameters:
        kwargs["key"] = key
    if solver is not None:  # a learned solver's coefficient tables: data, like the grid
        kwargs.update(solver)
    if time == "t":  # the process is traced here, so it reaches the sampler as an argument
        kwargs["time"] = process
    x = noise * process.prior_scale(sigmas[0]).astype(noise.dtype)
    out = fn(D, x, sigmas, **kwargs)
    out = out if isinstance(D, Stateful) or trajectory else (out,)
    x = out[0]  # then the trajectory when asked, then the denoiser state if any
    # x = alpha * x_ve at the last level; at ve_sigma = 0 the state is x0 (alpha = 1), which a
    # discrete process, whose time stops at its smallest trained level, cannot express via t.
    end = sigmas[steps]
    x = x * jnp.where(end > 0, process.alpha(process.t_of(end)), 1.0).astype(x.dtype)
    return (x, *out[1:]) if len(out) > 1 else x


_run = jax.jit(_core, static_argnames=("sampler", "prediction", "options", "trajectory",
                                       "time"))
