"""Learned few-step solvers: per-step multistep coefficients and the noise-level grid, fitted to a
model by gradient through the sampler, and the small JSON "solver file" that stores them.

The solver (VE view, data prediction, one model call per step): with D_i = D(x_i, sigma_i) and
the k most recent values kept, most recent first,

    x_{i+1} = a_i x_i + sum_{j<k} c_{i,j} D_{i-j}.

Every hand-made linear multistep method on D is such a table. The base table here is the
exponential integrator with Lagrange extrapolation of D in lambda = -log sigma over the last
p = min(k, i + 1) values (Adams-Bashforth on the data prediction; order 1 is DDIM, order 2 is
DPM-Solver++(2M) with the exact phi-integral of the linear interpolant): with rho = s'/s, h =
log(s/s'), nodes v_m = log(sigma_i/sigma_{i-m}) and x' = rho x + sigma' int e^lambda D dlambda,

    a = rho,    c = V^{-T} (rho I),    rho I_0 = 1 - rho,  rho I_m = h^m - m rho I_{m-1},

V the Vandermonde matrix of the nodes (I_m = int_0^h e^v v^m dv). A step to sigma = 0 is first
order (c = (1, 0, ...), a = 0).

Optionally a corrector table (UniC-style, Zhao et al. 2023; no extra model call): the value
D_{i+1} = D(x_{i+1}, sigma_{i+1}) that the next step evaluates anyway also corrects x_{i+1}
before it is used,

    x_{i+1} <- a'_i x_i + c'_i D_{i+1} + sum_{j<k} c'_{i,j} D_{i-j},

while D_{i+1} stays the value at the predicted point (as UniPC). The base corrector is the same
exponential integrator with D_{i+1} added as a node (one order higher than the predictor); the
last step (whose D is never evaluated) is not corrected. In the stored table row i of the
corrector corrects x_i (row 0 is unused).

`fit_solver` learns (bespoke-style, Shaul et al. 2023; the per-step coefficient search of Liu
et al. 2023's USF, done here by gradient): the grid (softmax log-gaps, as `schedule_opt`) and
residuals delta on the c's (predictor and corrector), a_i absorbing -sum_j delta_ij so that
every step keeps a + sum c fixed (a constant stays a constant). What makes the fit generalise
to fresh noise (the RMS error at few steps is dominated by rare draws that switch modes, which a
small calibration set lets the fit chase):
- many calibration draws, seen in random minibatches;
- a robust loss on the per-sample error: "huber" (quadratic below the q-quantile of the initial
  per-sample RMS error, linear above) or "trimmed" (the largest fraction dropped), or "mse";
- a smoothness prior on the grid (squared second differences of the log-gaps) and a ridge on
  delta (towards the hand-made solver);
- a held-out validation split scored by the plain mean squared error, with early stopping: the
  returned solver is the iterate with the best validation error.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.core.schedule_opt import grid_from_logits, logits_from_grid

FORMAT = "jaxdiff-solver"
VERSION = 1  # the optional "corrector" table keeps version 1 files readable
LOSSES = ("mse", "huber", "trimmed")
# The coefficients are far more sensitive than the grid's log-gaps (a change of 1e-2 in an early
# step's a moves x by 1e-2 sigma_max): they are fitted as DELTA_SCALE * params, so that one
# Adam learning rate suits both.
DELTA_SCALE = 0.05


# --- the solver ------------------------------------------------------------------------------


def _past_levels(sigmas, i, k):
    """(sigma_i, sigma_{i-1}, ..., sigma_{i-k+1}); before the grid's start fictitious distinct
    levels sigma_0 e^{-idx} keep the unused Lagrange nodes finite."""
    out = []
    for m in range(k):
        idx = i - m
        out.append(sigmas[idx] if idx >= 0 else sigmas[0] * math.exp(-idx))
    return jnp.stack(out)


def ei_coefficients(sigmas, order=3, final_zero=None):
    """Base table (n, order + 1) for the grid `sigmas` (n + 1 levels): rows (a_i, c_i0, ...) of
    the Lagrange exponential integrator on D in lambda (module docstring); differentiable in the
    positive levels. A final step to 0 is (0, 1, 0, ...); a final step to a positive level is
    first order below 15 steps (as diffusers' lower_order_final); `final_zero` says whether the grid
    ends at 0 (needed when the levels are traced; read from the last level otherwise)."""
    sigmas = jnp.asarray(sigmas)
    n = sigmas.shape[0] - 1
    if final_zero is None:
        final_zero = _is_zero(sigmas[-1])
    rows = []
    for i in range(n):
        if i == n - 1 and final_zero:
            rows.append(jnp.zeros(order + 1, sigmas.dtype).at[1].set(1.0))
            continue
        p = min(order, i + 1)
        if i == n - 1 and n < 15:  # diffusers' lower_order_final: a long last step to sigma_min
            p = 1                  # is unstable at order > 1 (Lagrange extrapolation over h)
        rho = sigmas[i + 1] / sigmas[i]
        h = jnp.log(sigmas[i] / sigmas[i + 1])
        nodes = jnp.log(sigmas[i] / _past_levels(sigmas, i, p))  # v_m <= 0, v_0 = 0
        rho_i = [1.0 - rho]
        for m in range(1, p):
            rho_i.append(h**m - m * rho_i[-1])
        # powers by products: pow's derivative at the node v_0 = 0 would be NaN
        vander = jnp.cumprod(jnp.concatenate(
            [jnp.ones((p, 1), sigmas.dtype), jnp.tile(nodes[:, None], (1, p - 1))], 1), 1)
        c = jnp.linalg.solve(vander.T, jnp.stack(rho_i))
        rows.append(jnp.concatenate([rho[None], c, jnp.zeros(order - p, sigmas.dtype)]))
    return jnp.stack(rows)


def corrector_coefficients(sigmas, order=3):
    """Base corrector table (n, order + 2) for the grid `sigmas` (n + 1 levels): row i >= 1
    (a', c'_new, c'_0, ...) re-does the step sigma_{i-1} -> sigma_i with the Lagrange
    exponential integrator through D_i (new) and the p = min(order, i) values D_{i-1}, ...,
    D_{i-p} the predictor used; row 0 is zero (nothing to correct). Differentiable in the
    levels."""
    sigmas = jnp.asarray(sigmas)
    n = sigmas.shape[0] - 1
    rows = [jnp.zeros(order + 2, sigmas.dtype)]
    for i in range(1, n):
        p = min(order, i)
        rho = sigmas[i] / sigmas[i - 1]
        h = jnp.log(sigmas[i - 1] / sigmas[i])
        levels = jnp.concatenate([sigmas[i][None], _past_levels(sigmas, i - 1, p)])
        nodes = jnp.log(sigmas[i - 1] / levels)  # h, 0, v_1, ...
        rho_i = [1.0 - rho]
        for m in range(1, p + 1):
            rho_i.append(h**m - m * rho_i[-1])
        vander = jnp.cumprod(jnp.concatenate(
            [jnp.ones((p + 1, 1), sigmas.dtype), jnp.tile(nodes[:, None], (1, p))], 1), 1)
        c = jnp.linalg.solve(vander.T, jnp.stack(rho_i))
        rows.append(jnp.concatenate([rho[None], c, jnp.zeros(order - p, sigmas.dtype)]))
    return jnp.stack(rows)


def _is_zero(v):
    """Static test of a grid level against 0 (a traced one counts as positive)."""
    try:
        return float(v) == 0.0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return False


def run_solver(denoiser, x, sigmas, coefficients, *cond, corrector=None):
    """Applies the table: x_{i+1} = a_i x_i + sum_j c_ij D_{i-j} for i < n (n = the table's
    length), with the `corrector` table (n, k + 2) applied to each x_i as soon as D_i is known
    (module docstring), as a `lax.scan` (one traced step whatever n). The sampler
    `jaxdiff.samplers.learned` runs the same update in the shared loop; this one is for fitting
    (reverse mode through the scan). `cond`: per-sample arrays passed on as
    denoiser(x, sigma, *cond) (e.g. class labels)."""
    n, k1 = coefficients.shape
    if corrector is None:
        corrector = jnp.zeros((n, k1 + 1), coefficients.dtype)
        use = False
    else:
        use = True

    def step(carry, inp):
        x, x_prev, hist = carry
        sigma, row, crow, i = inp
        d = denoiser(x, sigma.astype(x.dtype), *cond)
        if use:
            crow = crow.astype(x.dtype)
            xc = crow[0] * x_prev + crow[1] * d + jnp.tensordot(crow[2:], hist, axes=1)
            x = jnp.where(i > 0, xc, x)
        hist = jnp.concatenate([d[None], hist[:-1]])
        row = row.astype(x.dtype)
        return (row[0] * x + jnp.tensordot(row[1:], hist, axes=1), x, hist), None

    hist = jnp.zeros((k1 - 1,) + x.shape, x.dtype)
    (x, _, _), _ = jax.lax.scan(step, (x, x, hist),
                                (sigmas[:n], coefficients, corrector, jnp.arange(n)))
    return x


# --- the solver file -------------------------------------------------------------------------


def process_info(process):
    """What a solver file records of the process it was fitted for."""
    return {"type": type(process).__name__, "sigma_min": float(process.sigma_min),
            "sigma_max": float(process.sigma_max)}


def solver_dict(sigmas, coefficients, process=None, fit=None, corrector=None):
    """The solver file's content (JSON-ready)."""
    sigmas, coefficients = np.asarray(sigmas, np.float64), np.asarray(coefficients, np.float64)
    out = {"format": FORMAT, "version": VERSION, "nfe": int(len(sigmas) - 1),
           "order": int(coefficients.shape[1] - 1), "sigmas": sigmas.tolist(),
           "coefficients": coefficients.tolist()}
    if corrector is not None:
        out["corrector"] = np.asarray(corrector, np.float64).tolist()
    if process is not None:
        out["process"] = process if isinstance(process, dict) else process_info(process)
    if fit is not None:
        out["fit"] = fit
    return out


def save_solver(path, solver):
    """Writes a solver (a dict from `solver_dict` or `load_solver`) as JSON."""
    solver = solver_dict(solver["sigmas"], solver["coefficients"], solver.get("process"),
                         solver.get("fit"), solver.get("corrector"))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(solver, f, indent=1)
    return path


def load_solver(source):
    """A validated solver from a path or a dict: {"sigmas": (n+1,) float64, "coefficients":
    (n, k+1) float64, "corrector": (n, k+2) float64 or None, "nfe", "order", "process" (or
    None), "fit" (or None)}. Any defect raises
    a one-line ValueError naming it."""
    where = "solver"
    if isinstance(source, (str, os.PathLike)):
        where = f"solver file {os.fspath(source)!r}"
        try:
            with open(source) as f:
                source = json.load(f)
        except OSError as e:
            raise ValueError(f"{where}: cannot read it ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(source, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(source).__name__}")
    if source.get("format") != FORMAT:
        raise ValueError(f"{where}: format={source.get('format')!r}, expected {FORMAT!r}")
    if source.get("version") != VERSION:
        raise ValueError(f"{where}: version={source.get('version')!r}, supported: {VERSION}")
    for field in ("nfe", "sigmas", "coefficients"):
        if field not in source:
            raise ValueError(f"{where}: missing field {field!r}")
    nfe = source["nfe"]
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"{where}: nfe={nfe!r} must be an integer >= 1")
    try:
        sigmas = np.asarray(source["sigmas"], np.float64)
        coefs = np.asarray(source["coefficients"], np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: sigmas and coefficients must be lists of numbers") from None
    if sigmas.shape != (nfe + 1,):
        raise ValueError(f"{where}: sigmas has shape {sigmas.shape}, nfe={nfe} needs ({nfe + 1},)")
    if not (np.all(np.isfinite(sigmas)) and np.all(np.diff(sigmas) < 0) and sigmas[-1] >= 0):
        raise ValueError(f"{where}: sigmas must be finite, strictly decreasing and >= 0")
    if coefs.ndim != 2 or coefs.shape[0] != nfe or not 2 <= coefs.shape[1] <= 9:
        raise ValueError(f"{where}: coefficients has shape {coefs.shape}, expected ({nfe}, k + 1)"
                         " with order k in 1..8")
    if not np.all(np.isfinite(coefs)):
        raise ValueError(f"{where}: coefficients must be finite")
    order = source.get("order", coefs.shape[1] - 1)
    if order != coefs.shape[1] - 1:
        raise ValueError(f"{where}: order={order!r} but coefficients have {coefs.shape[1]} columns")
    corrector = source.get("corrector")
    if corrector is not None:
        try:
            corrector = np.asarray(corrector, np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: corrector must be a list of rows of numbers") from None
        if corrector.shape != (nfe, coefs.shape[1] + 1) or not np.all(np.isfinite(corrector)):
            raise ValueError(f"{where}: corrector has shape {corrector.shape}, expected finite "
                             f"({nfe}, {coefs.shape[1] + 1}) (one column more than coefficients)")
    process = source.get("process")
    if process is not None and not (isinstance(process, dict) and "type" in process):
        raise ValueError(f"{where}: process={process!r} must be an object with a 'type'")
    return {"nfe": nfe, "order": int(order), "sigmas": sigmas, "coefficients": coefs,
            "corrector": corrector, "process": process, "fit": source.get("fit")}


def check_solver_process(solver, process):
    """Refuses a solver fitted for another kind of process or another sigma_max (its first
    level is where the prior is matched)."""
    info = solver.get("process")
    if info is None:
        return
    got = type(process).__name__
    if info["type"] != got:
        raise ValueError(f"the solver was fitted for a {info['type']} process, not {got}")
    smax = float(process.sigma_max)
    if "sigma_max" in info and not math.isclose(info["sigma_max"], smax, rel_tol=1e-5):
        raise ValueError(f"the solver was fitted for sigma_max={info['sigma_max']:.6g}, "
                         f"this process has {smax:.6g}")


# --- fitting ---------------------------------------------------------------------------------


def per_sample_error(x, ref):
    """Mean squared error of each sample (over all but the batch axis)."""
    return jnp.mean(jnp.square(x - ref).reshape(x.shape[0], -1), axis=1)


def robust_loss(err, kind, tau=None, trim=0.05):
    """Aggregate of per-sample squared errors `err`: "mse" (mean), "huber" (on the RMS error r:
    r^2 below tau, 2 tau r - tau^2 above), "trimmed" (mean without the largest `trim` share)."""
    if kind == "mse":
        return jnp.mean(err)
    if kind == "huber":
        r = jnp.sqrt(err + 1e-30)
        return jnp.mean(jnp.where(r < tau, err, 2 * tau * r - tau**2))
    if kind == "trimmed":
        keep = max(1, int(round(err.shape[0] * (1 - trim))))
        return jnp.mean(jnp.sort(err)[:keep])
    raise ValueError(f"loss={kind!r} is unknown; allowed: {', '.join(LOSSES)}")


def _table(params, consts, cfg):
    """(grid, table, corrector or None) of the parameters; cfg = (n, order, final_zero,
    free_end, fit_grid, fit_coefficients, corrector) is static, consts = (init_grid, sigma_max,
    sigma_end) data."""
    n, order, final_zero, free_end, fit_grid, fit_coefficients, corrector = cfg
    init_grid, sigma_max, sigma_end = consts
    if fit_grid:
        grid = grid_from_logits(params["logits"], sigma_max, sigma_end, final_zero, free_end)
        grid = grid.astype(init_grid.dtype)
    else:
        grid = init_grid
    base = ei_coefficients(grid, order, final_zero)
    corr = corrector_coefficients(grid, order) if corrector else None
    if not fit_coefficients:
        return grid, base, corr
    mask = np.zeros((n, order))
    for i in range(n):
        mask[i, : min(order, i + 1)] = 1.0
    table = base + _residual(params["delta"], mask, base.dtype)
    if corrector:
        cmask = np.zeros((n, order + 1))
        for i in range(1, n):
            cmask[i, : min(order, i) + 1] = 1.0
        corr = corr + _residual(params["delta_c"], cmask, base.dtype)
    return grid, table, corr


def _residual(params, mask, dtype):
    """(-sum delta, delta) with delta = DELTA_SCALE * params on the mask's used entries: a
    change of the c's that keeps a + sum c."""
    delta = DELTA_SCALE * params * jnp.asarray(mask, dtype)
    return jnp.concatenate([-jnp.sum(delta, 1, keepdims=True), delta], 1)


@jax.jit(static_argnames=("denoiser", "cfg"))
def _errors(params, consts, x, ref, cond, *, denoiser, cfg):
    grid, table, corr = _table(params, consts, cfg)
    return per_sample_error(run_solver(denoiser, x, grid, table, *cond, corrector=corr), ref)


def _objective(params, consts, x, ref, cond, weights, *, denoiser, cfg, loss, trim):
    tau, smooth, ridge = weights
    grid, table, corr = _table(params, consts, cfg)
    err = per_sample_error(run_solver(denoiser, x, grid, table, *cond, corrector=corr), ref)
    value = robust_loss(err, loss, tau, trim)
    if "logits" in params:
        value = value + smooth * jnp.sum(jnp.square(jnp.diff(params["logits"], 2)))
    return value + ridge * sum(jnp.sum(jnp.square(params[k])) for k in ("delta", "delta_c")
                               if k in params)


def _optimizer(learning_rate, iters):
    """Adam with a cosine decay of the learning rate over the fit's iterations."""
    return optax.adam(optax.cosine_decay_schedule(learning_rate, max(1, iters)))


@jax.jit(static_argnames=("denoiser", "cfg", "loss", "trim", "learning_rate", "iters"))
def _update(params, state, consts, x, ref, cond, weights, *, denoiser, cfg, loss, trim,
            learning_rate, iters):
    value, grad = jax.value_and_grad(_objective)(params, consts, x, ref, cond, weights,
                                                 denoiser=denoiser, cfg=cfg, loss=loss, trim=trim)
    grad = jax.tree.map(jnp.nan_to_num, grad)  # a rare overflow must not poison Adam
    updates, state = _optimizer(learning_rate, iters).update(grad, state, params)
    return optax.apply_updates(params, updates), state, value


def _chunked_errors(params, consts, x, ref, cond, batch, **kw):
    """Per-sample errors over a set of any size, in chunks of `batch` (one compiled shape)."""
    out = []
    for s in range(0, len(x), batch):
        part = [a[s : s + batch] for a in (x, ref, *cond)]
        m = len(part[0])
        if m < batch:  # pad with repeats of the chunk; the padding is dropped
            reps = -(-batch // m)
            part = [jnp.concatenate([a] * reps)[:batch] for a in part]
        out.append(_errors(params, consts, part[0], part[1], tuple(part[2:]), **kw)[:m])
    return jnp.concatenate(out)


def fit_solver(
    denoiser,
    x_cal,
    ref_cal,
    init_grid,
    *,
    order=3,
    sigma_floor=None,
    x_val=None,
    ref_val=None,
    cond_cal=(),
    cond_val=(),
    val_fraction=0.2,
    iters=300,
    batch=1024,
    learning_rate=0.02,
    loss="huber",
    quantile=0.9,
    trim=0.05,
    smooth=1e-3,
    ridge=1e-3,
    fit_grid=True,
    fit_coefficients=True,
    corrector=True,
    eval_every=10,
    patience=8,
    seed=0,
    process=None,
):
    """Fits a solver table to `denoiser` (VE view) from calibration starts `x_cal` (at
    init_grid[0]) and their reference end points `ref_cal`.

    init_grid: n + 1 decreasing levels (usually ending at 0); its first level stays, the last
    positive level moves only when the grid ends at 0 and `sigma_floor` is given. Without
    (x_val, ref_val), `val_fraction` of the calibration draws is held out. `cond_cal` /
    `cond_val`: per-draw arrays (e.g. class labels) the denoiser gets as denoiser(x, sigma,
    *cond), split and batched with the draws. `corrector`: fit a corrector table too (module
    docstring; same NFE). Minibatches of `batch` draws, Adam with a cosine-decayed
    `learning_rate`; every `eval_every` iterations the validation MSE is measured and the fit
    stops after `patience` measurements without improvement. Returns the solver as the dict
    `solver_dict` makes (sigmas, coefficients, corrector, the `process` it is for when given,
    and "fit": losses, iterations, chosen iteration), ready for `save_solver` and for
    `jaxdiff.sample(..., sampler="learned", sampler_file=solver)`. The compiled programs are
    shared by fits with the same denoiser, shapes and settings."""
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is unknown; allowed: {', '.join(LOSSES)}")
    if isinstance(order, bool) or order not in range(1, 9):
        raise ValueError(f"order={order!r} must be an integer in 1..8")
    init_grid = np.asarray(init_grid, np.float64)
    n = len(init_grid) - 1
    final_zero = bool(init_grid[-1] == 0)
    levels = init_grid[:-1] if final_zero else init_grid
    free_end = final_zero and sigma_floor is not None
    fit_grid = bool(fit_grid and len(levels) >= (2 if free_end else 3))
    if free_end and not 0 < sigma_floor < levels[-1] * (1 + 1e-9):
        raise ValueError(f"sigma_floor={sigma_floor!r} must be in (0, {levels[-1]:g}]")
    if x_val is None:
        n_val = max(1, int(round(len(x_cal) * val_fraction)))
        perm = np.random.default_rng(seed).permutation(len(x_cal))
        x_val, ref_val = x_cal[perm[:n_val]], ref_cal[perm[:n_val]]
        x_cal, ref_cal = x_cal[perm[n_val:]], ref_cal[perm[n_val:]]
        cond_val = tuple(a[perm[:n_val]] for a in cond_cal)
        cond_cal = tuple(a[perm[n_val:]] for a in cond_cal)
    cond_cal, cond_val = tuple(cond_cal), tuple(cond_val)
    dtype = x_cal.dtype
    batch = min(batch, len(x_cal))
    cfg = (n, order, final_zero, free_end, fit_grid, bool(fit_coefficients), bool(corrector))
    sigma_end = float(sigma_floor) if free_end else float(levels[-1])
    consts = (jnp.asarray(init_grid, dtype), jnp.asarray(levels[0], dtype),
              jnp.asarray(sigma_end, dtype))
    kw = dict(denoiser=denoiser, cfg=cfg)

    params = {"delta": jnp.zeros((n, order), dtype)}
    if corrector:
        params["delta_c"] = jnp.zeros((n, order + 1), dtype)
    if fit_grid:
        params["logits"] = logits_from_grid(levels, sigma_end if free_end else None).astype(dtype)

    def val_mse(params):
        errs = _chunked_errors(params, consts, x_val, ref_val, cond_val, batch, **kw)
        return float(jnp.mean(errs))

    err0 = _chunked_errors(params, consts, x_val, ref_val, cond_val, batch, **kw)
    tau = float(jnp.quantile(jnp.sqrt(err0), quantile))
    weights = jnp.asarray([tau, smooth, ridge], dtype)
    state = _optimizer(learning_rate, iters).init(params)
    rng = np.random.default_rng(seed + 1)
    best, best_val, best_it = params, float(jnp.mean(err0)), 0
    init_val, history, bad = best_val, [], 0
    for it in range(1, iters + 1):
        idx = rng.choice(len(x_cal), batch, replace=False)
        cond = tuple(a[idx] for a in cond_cal)
        params, state, value = _update(params, state, consts, x_cal[idx], ref_cal[idx], cond,
                                       weights,
                                       loss=loss, trim=trim, learning_rate=learning_rate,
                                       iters=iters, **kw)
        history.append(float(value))
        if it % eval_every == 0 or it == iters:
            v = val_mse(params)
            if np.isfinite(v) and v < best_val:
                best, best_val, best_it, bad = params, v, it, 0
            else:
                bad += 1
                if bad >= patience:
                    break
    grid, table, corr = _table(best, consts, cfg)
    cal_mse = float(jnp.mean(_chunked_errors(best, consts, x_cal, ref_cal, cond_cal, batch,
                                               **kw)))
    info = {"loss": loss, "order": order, "corrector": bool(corrector), "iterations": it,
            "best_iteration": best_it, "learning_rate": learning_rate,
            "calibration_draws": int(len(x_cal)), "validation_draws": int(len(x_val)),
            "calibration_rmse": math.sqrt(cal_mse), "validation_rmse": math.sqrt(best_val),
            "initial_validation_rmse": math.sqrt(init_val), "history": history}
    return solver_dict(grid, table, process, info, corr)
