"""diffusers scheduler configs as `jaxdiff.sample` arguments.

Every diffusers model repository ships `scheduler/scheduler_config.json`. `from_scheduler_config`
reads one (a dict or a path) and a step count and gives what `jaxdiff.sample` needs to draw the
same samples as diffusers' own loop with the same network and the same noise tensor:

    s = from_scheduler_config("scheduler_config.json", steps=20)
    x = jaxdiff.sample(model_fn, noise, **s.sample_kwargs(), key=key)  # key: stochastic ones

- the process (`DiscreteVP` from the betas, `RectifiedFlow` for flow matching, `EDM`), wrapped in
  `DiffusersProcess`, which scales the initial noise as diffusers' `init_noise_sigma` does and
  conditions the network on diffusers' (integer) timesteps where diffusers rounds them;
- the prediction (epsilon -> eps, v_prediction -> v, sample -> x0; flow; EDM's preconditioning);
- the sampler and its options, and the explicit grid of VE noise levels: diffusers' own
  sigmas, with its timestep spacings (DDIM-style and multistep-style "linspace"/"leading" differ:
  the multistep schedulers space n + 1 points and drop the last), `steps_offset`, Karras /
  exponential / beta sigmas and the final level (`final_sigmas_type`, `set_alpha_to_one`);
  DDIM's and PNDM's steps from t to t - T // n, off the listed timesteps for linspace (or
  trailing when n does not divide T), as `ddim`'s and `plms`' per-step `targets` (and `plms`'
  `heun_source`, where diffusers' Heun start reads its initial sample);
- a guidance transform for `clip_sample` / `thresholding` (`ClipX0`, `DynamicThreshold`); chain
  your own guidance before it with `jaxdiff.core.guidance.Chain((cfg, s.guidance))`.

`s.check_model(process, prediction)` refuses a network trained with another process or
prediction (`jaxdiff sample --scheduler_config`).

Sigma-based schedulers (Euler, Heun, LMS, KDPM2...) return the VE-view state x/alpha; jaxdiff
returns alpha x at a final level sigma > 0 (`final_sigmas_type="sigma_min"`): multiply by
`final_scale` for diffusers' number. Options this module cannot reproduce raise a one-line
ValueError naming the option and the supported values. No diffusers import: the grids are
computed here, and tests compare them with diffusers' own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdiff.core import guidance as guidance_lib
from jaxdiff.core.process import EDM, DiscreteVP, Process, RectifiedFlow, pytree_dataclass

# --- the process as diffusers drives it --------------------------------------------------------


@pytree_dataclass(data=("base", "levels", "timesteps"))
class DiffusersProcess(Process):
    """`base` with diffusers' initial-noise scale and network timesteps.

    `init_noise`: "process" (the base's own `prior_scale`), "sigma" (x/alpha = sigma_max * noise:
    diffusers' sigma-based schedulers with linspace/trailing spacing) or "vp" (x/alpha =
    sqrt(sigma_max^2 + 1) * noise: leading spacing, EDM). `levels`/`timesteps` (optional): at
    these VE levels the network gets these conditioning values instead of `base.cond(t)`, where
    diffusers rounds or truncates its timesteps (Karras/exponential/beta sigmas)."""

    base: Any
    levels: Any = None
    timesteps: Any = None
    init_noise: str = "process"

    def __getattr__(self, name):  # sigma_data, alphas_cumprod, num_train_timesteps, ...
        if name.startswith("__") or name in ("base", "levels", "timesteps", "init_noise"):
            raise AttributeError(name)
        return getattr(self.base, name)

    t_min = property(lambda self: self.base.t_min)
    t_max = property(lambda self: self.base.t_max)

    def alpha(self, t):
        return self.base.alpha(t)

    def sigma(self, t):
        return self.base.sigma(t)

    def ve_sigma(self, t):
        return self.base.ve_sigma(t)

    def t_of(self, ve_sigma):
        return self.base.t_of(ve_sigma)

    def t_of_cond(self, c):
        return self.base.t_of_cond(c)

    def cond(self, t):
        c = self.base.cond(t)
        if self.levels is None:
            return c
        # a level of the table (to float rounding) takes diffusers' timestep; others keep c
        d = jnp.abs(jnp.log(self.ve_sigma(t))[..., None] - jnp.log(self.levels))
        k = jnp.argmin(d, axis=-1)
        return jnp.where(jnp.min(d, axis=-1) < 1e-7, self.timesteps[k], c).astype(c.dtype)

    def prior_scale(self, ve_sigma):
        if self.init_noise == "sigma":
            return ve_sigma
        if self.init_noise == "vp":
            return jnp.sqrt(1.0 + jnp.square(ve_sigma))
        return self.base.prior_scale(ve_sigma)


@pytree_dataclass(data=("clip",))
class ClipX0:
    """diffusers' `clip_sample`: x0-hat clipped to [-clip, clip] (a guidance transform)."""

    clip: Any = 1.0

    def __call__(self, D):
        from jaxdiff.core.denoiser import lift, lower

        fn, init = lift(D)

        def clipped(x, sigma, *args_state):
            x0, state = fn(x, sigma, *args_state)
            return jnp.clip(x0, -self.clip, self.clip), state

        return lower(clipped, init)


@dataclasses.dataclass(frozen=True)
class DiffusersSampling:
    """What `jaxdiff.sample` needs to reproduce a diffusers scheduler: `sample_kwargs()`."""

    scheduler: str
    process: Any
    prediction: str
    sampler: str
    steps: int
    grid: np.ndarray
    options: dict
    guidance: Any = None
    final_scale: float = 1.0
    stochastic: bool = False

    def sample_kwargs(self):
        """Keyword arguments for `jaxdiff.sample(model_fn, noise, **kwargs)` (add `key=` when
        `stochastic`)."""
        kw = dict(process=self.process, prediction=self.prediction, sampler=self.sampler,
                  steps=self.steps, schedule=self.grid, **self.options)
        if self.guidance is not None:
            kw["guidance"] = self.guidance
        return kw

    def check_model(self, process, prediction):
        """Refuses, with a one-line ValueError naming both, a network trained with another
        process or prediction than this config's: the process type must match and, for
        DiscreteVP, alphas_cumprod (the betas and num_train_timesteps, to float32 rounding),
        for EDM sigma_data, for flow matching the time scale (num_train_timesteps)."""
        if not _same_process(self.process.base, process):
            want, got = _describe(self.process.base), _describe(process)
            got = got if got != want else f"{got} with other betas"
            raise ValueError(f"{self.scheduler} implies the process {want}, but the model was "
                             f"trained with {got}; supported: a config of the model's process")
        if prediction != self.prediction:
            raise ValueError(f"{self.scheduler} implies prediction={self.prediction!r}, but the "
                             f"model predicts {prediction!r}; supported: a config of the model's "
                             "prediction")


def _describe(process):
    name = type(process).__name__
    if isinstance(process, DiscreteVP):
        abar = np.asarray(process.alphas_cumprod, np.float64)
        return (f"DiscreteVP(num_train_timesteps={len(abar)}, alphas_cumprod[-1]="
                f"{abar[-1]:.6g})")
    if isinstance(process, EDM):
        return f"EDM(sigma_data={float(process.sigma_data):g})"
    if isinstance(process, RectifiedFlow):
        return f"RectifiedFlow(time_scale={float(process.time_scale):g})"
    return name


def _same_process(a, b):
    """The same process as far as the network is concerned (`check_model`)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, DiscreteVP):
        x, y = (np.asarray(p.alphas_cumprod, np.float64) for p in (a, b))
        return x.shape == y.shape and np.allclose(x, y, rtol=1e-4, atol=0)
    if isinstance(a, EDM):
        return math.isclose(float(a.sigma_data), float(b.sigma_data), rel_tol=1e-6)
    if isinstance(a, RectifiedFlow):
        return math.isclose(float(a.time_scale), float(b.time_scale), rel_tol=1e-6)
    return False


# --- config reading ------------------------------------------------------------------------------

_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
              trained_betas=None, rescale_betas_zero_snr=False)
_KARRAS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
_THRESH = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
_MULTI = dict(**_BETAS, **_KARRAS, **_THRESH, prediction_type="epsilon", solver_order=2,
              lower_order_final=True, timestep_spacing="linspace", steps_offset=0,
              final_sigmas_type="zero", use_flow_sigmas=False, use_dynamic_shifting=False,
              variance_type=None, lambda_min_clipped=-math.inf)
_SIGMA = dict(**_BETAS, **_KARRAS, prediction_type="epsilon", timestep_spacing="linspace",
              steps_offset=0)
_K = dict(_SIGMA, beta_start=0.00085, beta_end=0.012)  # Heun, KDPM2: "sensible defaults"

DEFAULTS = {
    "DDIMScheduler": dict(**_BETAS, **_THRESH, clip_sample=True, clip_sample_range=1.0,
                          set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                          timestep_spacing="leading"),
    "DDPMScheduler": dict(**_BETAS, **_THRESH, clip_sample=True, clip_sample_range=1.0,
                          variance_type="fixed_small", steps_offset=0, prediction_type="epsilon",
                          timestep_spacing="leading"),
    "PNDMScheduler": dict(**_BETAS, skip_prk_steps=False, set_alpha_to_one=False,
                          prediction_type="epsilon", timestep_spacing="leading", steps_offset=0),
    "EulerDiscreteScheduler": dict(**_SIGMA, interpolation_type="linear", sigma_min=None,
                                   sigma_max=None, timestep_type="discrete",
                                   final_sigmas_type="zero"),
    "EulerAncestralDiscreteScheduler": dict(**_BETAS, prediction_type="epsilon",
                                            timestep_spacing="linspace", steps_offset=0),
    "HeunDiscreteScheduler": dict(**_K, clip_sample=False, clip_sample_range=1.0),
    "LMSDiscreteScheduler": dict(_SIGMA),
    "KDPM2DiscreteScheduler": dict(_K),
    "KDPM2AncestralDiscreteScheduler": dict(_K),
    "DPMSolverMultistepScheduler": dict(**_MULTI, algorithm_type="dpmsolver++",
                                        solver_type="midpoint", euler_at_final=False,
                                        use_lu_lambdas=False),
    "DPMSolverSinglestepScheduler": {**_MULTI, "algorithm_type": "dpmsolver++",
                                     "solver_type": "midpoint", "lower_order_final": False},
    "UniPCMultistepScheduler": dict(**_MULTI, predict_x0=True, solver_type="bh2",
                                    disable_corrector=(), solver_p=None, sigma_min=None,
                                    sigma_max=None, shift_terminal=None),
    "DEISMultistepScheduler": dict(**{k: v for k, v in _MULTI.items()
                                      if k != "final_sigmas_type"},
                                   algorithm_type="deis", solver_type="logrho"),
    "FlowMatchEulerDiscreteScheduler": dict(num_train_timesteps=1000, shift=1.0,
                                            use_dynamic_shifting=False, invert_sigmas=False,
                                            shift_terminal=None, stochastic_sampling=False,
                                            time_shift_type="exponential", **_KARRAS),
    "EDMEulerScheduler": dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5,
                              sigma_schedule="karras", prediction_type="epsilon", rho=7.0,
                              final_sigmas_type="zero"),
    "EDMDPMSolverMultistepScheduler": dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5,
                                           sigma_schedule="karras", prediction_type="epsilon",
                                           rho=7.0, solver_order=2, algorithm_type="dpmsolver++",
                                           solver_type="midpoint", lower_order_final=True,
                                           euler_at_final=False, final_sigmas_type="zero",
                                           **_THRESH),
}


class _Config:
    """A scheduler config with diffusers' defaults filled in; `allow` checks one option."""

    def __init__(self, name, values):
        self.name, self.values = name, {**DEFAULTS[name], **values}

    def __getitem__(self, key):
        return self.values[key]

    def allow(self, key, *allowed):
        if self.values[key] not in allowed:
            raise ValueError(f"{self.name} {key}={self.values[key]!r} is not supported; "
                             f"supported: {', '.join(repr(a) for a in allowed)}")
        return self.values[key]


def _read(config):
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict or a path to scheduler_config.json, got "
                         f"{type(config).__name__}")
    name = config.get("_class_name")
    if name not in BUILDERS:
        raise ValueError(f"_class_name={name!r} is not supported; supported: {', '.join(BUILDERS)}")
    values = {k: v for k, v in config.items() if not k.startswith("_")}
    return _Config(name, values)


# --- grids -----------------------------------------------------------------------------------


def alphas_cumprod(cfg):
    """diffusers' alphas_cumprod (float32, as diffusers computes it), as float64."""
    cfg.allow("rescale_betas_zero_snr", False)
    T = int(cfg["num_train_timesteps"])
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], np.float32)
    else:
        kind = cfg.allow("beta_schedule", "linear", "scaled_linear", "squaredcos_cap_v2")
        b0, b1 = cfg["beta_start"], cfg["beta_end"]
        if kind == "linear":
            betas = np.linspace(b0, b1, T, dtype=np.float32)
        elif kind == "scaled_linear":
            betas = np.linspace(b0**0.5, b1**0.5, T, dtype=np.float32) ** 2
        else:
            abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],
                             np.float32)
    return np.cumprod(1.0 - betas, dtype=np.float32).astype(np.float64)


def spaced_timesteps(T, n, spacing, offset=0, multistep=False, integer=True):
    """diffusers' `timestep_spacing`, decreasing. DDIM/DDPM/PNDM/Euler-style by default;
    `multistep`: DPMSolver/UniPC/DEIS-style linspace/leading over n + 1 points, the last dropped.
    `integer=False` keeps the fractional linspace of the Euler-style schedulers."""
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1.0
    m = n + 1 if multistep else n
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, m)
        ts = (ts.round() if integer or multistep else ts)[::-1]
    else:  # leading
        ts = (np.arange(0, m) * (T // m)).round()[::-1] + offset
    return ts[:n] if multistep else ts


def sigma_to_t(sigma, log_sigmas):
    """diffusers' `_sigma_to_t`: log-sigma interpolation of the training timesteps."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def convert_sigmas(kind, in_sigmas, n, sigma_min=None, sigma_max=None, rho=7.0):
    """diffusers' `_convert_to_karras` / `_convert_to_exponential` / `_convert_to_beta`."""
    lo = float(in_sigmas[-1]) if sigma_min is None else float(sigma_min)
    hi = float(in_sigmas[0]) if sigma_max is None else float(sigma_max)
    if kind == "karras":
        ramp = np.linspace(0, 1, n)
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    if kind == "exponential":
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    import scipy.stats

    ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6)
    return np.array([lo + p * (hi - lo) for p in ppf])


def _sigma_kind(cfg):
    kinds = [k for k in ("karras", "exponential", "beta") if cfg.values.get(f"use_{k}_sigmas")]
    if len(kinds) > 1:
        raise ValueError(f"{cfg.name}: use_{kinds[0]}_sigmas and use_{kinds[1]}_sigmas both set; "
                         "supported: at most one")
    return kinds[0] if kinds else None


def _prediction(cfg, allowed=("epsilon", "v_prediction", "sample")):
    return {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[
        cfg.allow("prediction_type", *allowed)]


def _x0_guidance(cfg):
    """diffusers' thresholding (Imagen) or clip_sample on x0-hat."""
    if cfg.values.get("thresholding"):
        return guidance_lib.DynamicThreshold(cfg["dynamic_thresholding_ratio"],
                                             cfg["sample_max_value"])
    if cfg.values.get("clip_sample"):
        return ClipX0(float(cfg["clip_sample_range"]))
    return None


def _check_grid(cfg, sigmas):
    if np.any(np.diff(sigmas) >= 0):
        raise ValueError(f"{cfg.name} gives repeated noise levels for these options (a "
                         "zero-length step); supported: a strictly decreasing schedule")
    return sigmas


# --- builders, one per scheduler family -------------------------------------------------------


def _discrete(cfg, sampler, grid, process, *, prediction=None, options=None, guidance=None,
              table=None, init_noise="process", final_scale=1.0, stochastic=False):
    # diffusers keeps its sigmas in float32: the same rounding gives its grid to the bit
    grid = np.asarray(grid, np.float32).astype(np.float64)
    levels, ts = table if table is not None else (None, None)
    if levels is not None:
        levels = jnp.asarray(np.asarray(levels, np.float32).astype(np.float64))
        ts = jnp.asarray(ts)
    proc = DiffusersProcess(process, levels, ts, init_noise)
    return DiffusersSampling(cfg.name, proc, prediction or _prediction(cfg), sampler,
                             len(grid) - 1, np.asarray(grid, np.float64), options or {},
                             guidance, final_scale, stochastic)


def _x_space(cfg, n, sampler, options, *, multistep=True, final=None, karras_ok=True):
    """Schedulers whose state is x (DPM-Solver, UniPC, DEIS; DDIM/DDPM/PNDM with
    `multistep=False`): grid at diffusers' timesteps, network at its integer timesteps."""
    abar = alphas_cumprod(cfg)
    T = len(abar)
    train = np.sqrt((1 - abar) / abar)
    spacing = cfg.allow("timestep_spacing", "linspace", "leading", "trailing")
    ts = spaced_timesteps(T, n, spacing, cfg["steps_offset"], multistep=multistep)
    if ts[0] > T - 1 or ts[-1] < 0:
        raise ValueError(f"{cfg.name} steps_offset={cfg['steps_offset']} puts timesteps outside "
                         f"0..{T - 1}; supported: offsets that keep them inside")
    kind = _sigma_kind(cfg)
    table = None
    if kind is None:
        sigmas = np.interp(ts, np.arange(T), train)
    else:
        if not karras_ok:
            cfg.allow(f"use_{kind}_sigmas", False)
        sigmas = convert_sigmas(kind, train[::-1], n)
        t = sigma_to_t(sigmas, np.log(train))
        if kind == "karras" and not (cfg.name == "DPMSolverMultistepScheduler"
                                     and cfg["beta_schedule"] == "squaredcos_cap_v2"):
            t = t.round()
        table = (sigmas, np.floor(t))  # diffusers' int64 timesteps
    last = final if final is not None else cfg.allow("final_sigmas_type", "zero", "sigma_min")
    sigma_last = 0.0 if last == "zero" else float(train[0]) if last == "sigma_min" else last
    if kind is not None and last == "sigma_min" and cfg.name == "UniPCMultistepScheduler":
        sigma_last = float(sigmas[-1])
    if not multistep and n > 2 and sigmas[-1] == sigma_last:
        sigma_last = None  # DDIM/PLMS from timestep 0 to abar[0]: an exact no-op, dropped
    grid = _check_grid(cfg, sigmas if sigma_last is None else np.append(sigmas, sigma_last))
    process = DiscreteVP(alphas_cumprod=abar)
    return _discrete(cfg, sampler, grid, process, options=options, guidance=_x0_guidance(cfg),
                     table=table)


def _dpmsolver_multistep(cfg, n):
    for key, ok in (("use_lu_lambdas", False), ("use_flow_sigmas", False),
                    ("use_dynamic_shifting", False), ("variance_type", None),
                    ("lambda_min_clipped", -math.inf), ("solver_type", "midpoint")):
        cfg.allow(key, ok)
    algo = cfg.allow("algorithm_type", "dpmsolver++", "sde-dpmsolver++")
    order = cfg.allow("solver_order", 1, 2, 3)
    lof, eaf = bool(cfg["lower_order_final"]), bool(cfg["euler_at_final"])
    if algo == "dpmsolver++":
        sampler = {1: "ddim", 2: "dpmpp_2m", 3: "dpmpp_3m"}[order]
        opts = {} if order == 1 else dict(lower_order_final=lof, euler_at_final=eaf)
    else:
        sampler = {1: "ddpm", 2: "dpmpp_2m_sde", 3: "dpmpp_3m_sde"}[order]
        opts = {} if order == 1 else dict(lower_order_final=lof)
        if order == 3:  # diffusers' own third-order SDE step (see dpmpp_3m_sde)
            opts.update(solver_type="midpoint", diffusers_d2=True)
        if order >= 2 and eaf:
            cfg.allow("euler_at_final", False)
    out = _x_space(cfg, n, sampler, opts)
    return dataclasses.replace(out, stochastic=algo != "dpmsolver++")


def _dpmsolver_singlestep(cfg, n):
    for key, ok in (("use_flow_sigmas", False), ("use_dynamic_shifting", False),
                    ("variance_type", None), ("lambda_min_clipped", -math.inf),
                    ("solver_type", "midpoint"), ("algorithm_type", "dpmsolver++")):
        cfg.allow(key, ok)
    order = cfg.allow("solver_order", 1, 2, 3)
    zero = cfg.allow("final_sigmas_type", "zero", "sigma_min") == "zero"
    lof = bool(cfg["lower_order_final"]) or n % order != 0 or zero
    # jaxdiff's order list: 1 + (i mod order), first order on the last step (diffusers' with
    # lower_order_final, except for order 3 when n % 3 == 2 and the grid ends above 0)
    if not lof or (order == 3 and n % 3 == 2 and not zero):
        raise ValueError(f"{cfg.name} solver_order={order} with final_sigmas_type='sigma_min', "
                         f"lower_order_final={cfg['lower_order_final']} and {n} steps is not "
                         "supported; supported: final_sigmas_type='zero', or steps with "
                         "lower_order_final=True and steps % 3 != 2 for order 3")
    cfg.values["timestep_spacing"], cfg.values["steps_offset"] = "linspace", 0
    return _x_space(cfg, n, "dpmpp_singlestep", {"order": order})


def _unipc(cfg, n):
    for key, ok in (("use_flow_sigmas", False), ("use_dynamic_shifting", False),
                    ("predict_x0", True), ("solver_p", None), ("sigma_min", None),
                    ("sigma_max", None), ("shift_terminal", None)):
        cfg.allow(key, ok)
    order = cfg.allow("solver_order", 1, 2, 3)
    variant = cfg.allow("solver_type", "bh1", "bh2")
    off = set(int(i) for i in (cfg["disable_corrector"] or ()))
    if off and not set(range(n - 1)) <= off:
        raise ValueError(f"{cfg.name} disable_corrector={sorted(off)} is not supported for "
                         f"{n} steps; supported: [] or every step index 0..{n - 2}")
    opts = dict(order=order, variant=variant, corrector=not off,
                lower_order_final=bool(cfg["lower_order_final"]))
    return _x_space(cfg, n, "unipc", opts)


def _deis(cfg, n):
    for key, ok in (("use_flow_sigmas", False), ("use_dynamic_shifting", False),
                    ("algorithm_type", "deis"), ("solver_type", "logrho")):
        cfg.allow(key, ok)
    order = cfg.allow("solver_order", 1, 2, 3)
    opts = dict(order=order, lower_order_final=bool(cfg["lower_order_final"]))
    # with Karras/exponential/beta sigmas DEIS repeats its last level (a zero-length step)
    return _x_space(cfg, n, "deis", opts, final="sigma_min", karras_ok=False)


def _ddim_family(cfg, n, sampler, final, options=None, stochastic=False):
    out = _x_space(cfg, n, sampler, options or {}, multistep=False, final=final)
    return dataclasses.replace(out, stochastic=stochastic)


def _ddim(cfg, n):
    if cfg["clip_sample"] or cfg["thresholding"]:
        raise ValueError(f"{cfg.name} clip_sample={cfg['clip_sample']}, thresholding="
                         f"{cfg['thresholding']} is not supported (diffusers' DDIM keeps the "
                         "unclipped noise prediction); supported: clip_sample=False, "
                         "thresholding=False")
    final = "zero" if cfg["set_alpha_to_one"] else "sigma_min"
    missed = _step_targets(cfg, n)
    if missed is None:
        return _ddim_family(cfg, n, "ddim", final)
    # each step to its own target level (ddim's `targets`); the grid ends at the last target
    ts, prev = missed
    abar = alphas_cumprod(cfg)
    train = np.sqrt((1 - abar) / abar)
    last = 0.0 if final == "zero" else float(train[0])  # diffusers' final_alpha_cumprod
    targets = np.where(prev >= 0, train[np.maximum(prev, 0)], last)
    grid = np.append(train[ts], targets[-1])
    if grid[-1] == grid[-2]:  # from timestep 0 to abar[0]: an exact no-op, dropped
        grid, targets = grid[:-1], targets[:-1]
    targets = tuple(float(v) for v in np.asarray(targets, np.float32))
    return _discrete(cfg, "ddim", _check_grid(cfg, grid), DiscreteVP(alphas_cumprod=abar),
                     options={"targets": targets})


def _ddpm(cfg, n):
    # diffusers' DDPM steps to the next listed timestep (`previous_timestep`) for every spacing
    cfg.allow("variance_type", "fixed_small")
    return _ddim_family(cfg, n, "ddpm", "zero", stochastic=True)


def _pndm(cfg, n):
    # diffusers' PLMS combines raw v predictions and converts the combination at the current
    # timestep (its Heun start with the other step's sample): another method than PLMS on eps
    cfg.allow("prediction_type", "epsilon")
    cfg.allow("skip_prk_steps", True)
    final = "zero" if cfg["set_alpha_to_one"] else "sigma_min"
    T = int(cfg["num_train_timesteps"])
    missed = _step_targets(cfg, n)
    if missed is None:
        ts = spaced_timesteps(T, n, cfg["timestep_spacing"], cfg["steps_offset"]).astype(np.int64)
        # n <= 2 ending with the no-op from timestep 0 to abar[0]: kept as a target (below)
        if n > 2 or final == "zero" or ts[-1] != 0:
            return _ddim_family(cfg, n, "plms", final)
        missed = ts, ts - T // n
    # as DDIM, each step to its own target level (plms' `targets`; for the Heun start the target
    # of its Euler point); the Heun start's combined step goes from t_1 + T // n to t_1, reading
    # the initial sample there (`heun_source`): diffusers' counter-1 step of `step_plms`
    ts, prev = missed
    abar = alphas_cumprod(cfg)
    train = np.sqrt((1 - abar) / abar)
    src = int(ts[1]) + T // n if n > 1 else None  # <= T - 1 for linspace and trailing
    last = 0.0 if final == "zero" else float(train[0])  # diffusers' final_alpha_cumprod
    targets = np.where(prev >= 0, train[np.maximum(prev, 0)], last)
    grid = np.append(train[ts], targets[-1])
    if grid[-1] == grid[-2]:  # from timestep 0 to abar[0]: an exact no-op
        if n > 2:
            grid, targets = grid[:-1], targets[:-1]  # dropped
        else:  # kept (of 2 steps the first stays Heun); any lower end reads the same state
            grid[-1] = 0.0
    options = {"targets": tuple(float(v) for v in np.asarray(targets, np.float32))}
    if src is not None:
        options["heun_source"] = float(np.float32(train[src]))
    return _discrete(cfg, "plms", _check_grid(cfg, grid), DiscreteVP(alphas_cumprod=abar),
                     options=options)


def _step_targets(cfg, n):
    """DDIM and PNDM step from timestep t to t - T // n (diffusers' `prev_timestep`; below 0:
    the final level), which is the next listed timestep only for leading spacing, or trailing
    when n divides T: None then, else (the listed timesteps, their targets), as integers."""
    T = int(cfg["num_train_timesteps"])
    spacing = cfg.allow("timestep_spacing", "linspace", "leading", "trailing")
    ts = spaced_timesteps(T, n, spacing, cfg["steps_offset"]).astype(np.int64)
    prev = ts - T // n
    if n == 1 or np.all(prev[:-1] == ts[1:]):
        return None
    return ts, prev


def _sigma_based(cfg, n, sampler, options=None, *, karras_round=False, final="zero",
                 stochastic=False, guidance=None, log_stages=False):
    """Euler-style schedulers: the state is x/alpha, the grid diffusers' sigmas, the network
    called at fractional timesteps (linear interpolation of sigma, or log for converted sigmas)."""
    abar = alphas_cumprod(cfg)
    T = len(abar)
    train = np.sqrt((1 - abar) / abar)
    spacing = cfg.allow("timestep_spacing", "linspace", "leading", "trailing")
    ts = spaced_timesteps(T, n, spacing, cfg["steps_offset"], integer=False)
    sigmas = np.interp(ts, np.arange(T), train)
    kind, table = _sigma_kind(cfg), None
    if kind is not None:
        sigmas = convert_sigmas(kind, sigmas, n, cfg.values.get("sigma_min"),
                                cfg.values.get("sigma_max"))
        if karras_round and kind == "karras":
            table = (sigmas, sigma_to_t(sigmas, np.log(train)).round())
    elif log_stages:  # KDPM2: grid levels at their (fractional) timesteps, stages log-interpolated
        table = (sigmas, ts)
    sigma_last = 0.0 if final == "zero" else float(train[0])
    grid = np.append(sigmas, sigma_last)
    if sampler == "euler" and len(grid) > 2 and grid[-1] == grid[-2]:
        grid = grid[:-1]  # Euler from sigma_min to sigma_min: an exact no-op, dropped
    grid = _check_grid(cfg, grid)
    interp = "linear" if kind is None and not log_stages else "log"
    process = DiscreteVP(alphas_cumprod=abar, interpolation=interp)
    init = "sigma" if spacing in ("linspace", "trailing") else "vp"
    scale = 1.0 if final == "zero" else float(np.sqrt(1 + sigma_last**2))
    return _discrete(cfg, sampler, grid, process, options=options, table=table, init_noise=init,
                     final_scale=scale, stochastic=stochastic, guidance=guidance)


def _euler(cfg, n):
    cfg.allow("interpolation_type", "linear")
    cfg.allow("timestep_type", "discrete")
    final = cfg.allow("final_sigmas_type", "zero", "sigma_min")
    return _sigma_based(cfg, n, "euler", final=final)


def _euler_ancestral(cfg, n):
    return _sigma_based(cfg, n, "euler_ancestral", stochastic=True)


def _heun(cfg, n):
    return _sigma_based(cfg, n, "heun", {"time": "sigma"}, guidance=_x0_guidance(cfg))


def _lms(cfg, n):
    return _sigma_based(cfg, n, "lms", {"order": 4})


def _kdpm2(cfg, n):
    cfg.allow("use_karras_sigmas", False)  # diffusers rounds only some of its timesteps then
    return _sigma_based(cfg, n, "dpm_2", log_stages=True)


def _kdpm2_ancestral(cfg, n):
    cfg.allow("use_karras_sigmas", False)
    return _sigma_based(cfg, n, "dpm_2_ancestral", stochastic=True, log_stages=True)


def flow_sigmas(cfg, n, mu=None):
    """FlowMatchEulerDiscreteScheduler's flow times (n of them, then 0)."""
    T = int(cfg["num_train_timesteps"])
    shift = float(cfg["shift"])
    train = np.linspace(1, T, T)[::-1] / T
    dynamic = bool(cfg["use_dynamic_shifting"])
    if not dynamic:
        train = shift * train / (1 + (shift - 1) * train)
    t = np.linspace(train[0] * T, train[-1] * T, n) / T
    if dynamic:
        if mu is None:
            raise ValueError(f"{cfg.name} use_dynamic_shifting=True needs mu=...; supported: "
                             "from_scheduler_config(config, steps, mu=...)")
        kind = cfg.allow("time_shift_type", "exponential", "linear")
        e = math.exp(mu) if kind == "exponential" else mu
        t = e / (e + (1 / t - 1))
    else:
        t = shift * t / (1 + (shift - 1) * t)
    return np.append(t, 0.0)


def _flow_euler(cfg, n, mu=None, flow_eps=None):
    for key, ok in (("invert_sigmas", False), ("shift_terminal", None),
                    ("stochastic_sampling", False), ("use_karras_sigmas", False),
                    ("use_exponential_sigmas", False), ("use_beta_sigmas", False)):
        cfg.allow(key, ok)
    t = flow_sigmas(cfg, n, mu)
    # the VE view needs alpha = 1 - t > 0: the first time 1 moves to 1 - flow_eps (error O(eps))
    eps = flow_eps if flow_eps is not None else (1e-9 if jnp.result_type(float) == jnp.float64
                                                 else 1e-4)
    t = np.minimum(t, 1.0 - eps)
    process = RectifiedFlow(t_min=min(1e-4, float(t[-2]) / 2), t_max=1.0 - eps,
                            time_scale=float(cfg["num_train_timesteps"]))
    grid = np.where(t > 0, t / np.where(t < 1, 1 - t, 1.0), 0.0)
    return _discrete(cfg, "euler", grid, process, prediction="flow")


def edm_sigmas(cfg, n):
    """EDMEuler/EDMDPMSolverMultistep sigmas (n of them), Karras or exponential."""
    lo, hi, rho = float(cfg["sigma_min"]), float(cfg["sigma_max"]), float(cfg["rho"])
    ramp = np.linspace(0, 1, n)
    if cfg.allow("sigma_schedule", "karras", "exponential") == "karras":
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return np.exp(np.linspace(math.log(lo), math.log(hi), n))[::-1]


def _edm(cfg, n, sampler, options, guidance=None):
    cfg.allow("prediction_type", "epsilon")  # diffusers' EDM preconditioning (c_skip, c_out)
    sigmas = edm_sigmas(cfg, n)
    grid = np.append(sigmas, 0.0)
    process = EDM(sigma_data=float(cfg["sigma_data"]), t_min=float(cfg["sigma_min"]),
                  t_max=float(cfg["sigma_max"]))
    return _discrete(cfg, sampler, grid, process, prediction="edm", options=options,
                     init_noise="vp", guidance=guidance)


def _edm_euler(cfg, n):
    if cfg.allow("final_sigmas_type", "zero", "sigma_min") == "sigma_min":
        # diffusers' last step goes from sigma_min to sigma_min: Euler leaves x unchanged there
        out = _edm(cfg, n, "euler", {})
        grid = out.grid[:-1]
        return dataclasses.replace(out, grid=grid, steps=len(grid) - 1)
    return _edm(cfg, n, "euler", {})


def _edm_dpmsolver(cfg, n):
    cfg.allow("final_sigmas_type", "zero")
    cfg.allow("algorithm_type", "dpmsolver++")
    cfg.allow("solver_type", "midpoint")
    order = cfg.allow("solver_order", 1, 2, 3)
    sampler = {1: "ddim", 2: "dpmpp_2m", 3: "dpmpp_3m"}[order]
    opts = {} if order == 1 else dict(lower_order_final=bool(cfg["lower_order_final"]),
                                      euler_at_final=bool(cfg["euler_at_final"]))
    return _edm(cfg, n, sampler, opts, guidance=_x0_guidance(cfg))


BUILDERS = {
    "DDIMScheduler": _ddim,
    "DDPMScheduler": _ddpm,
    "PNDMScheduler": _pndm,
    "EulerDiscreteScheduler": _euler,
    "EulerAncestralDiscreteScheduler": _euler_ancestral,
    "HeunDiscreteScheduler": _heun,
    "LMSDiscreteScheduler": _lms,
    "KDPM2DiscreteScheduler": _kdpm2,
    "KDPM2AncestralDiscreteScheduler": _kdpm2_ancestral,
    "DPMSolverMultistepScheduler": _dpmsolver_multistep,
    "DPMSolverSinglestepScheduler": _dpmsolver_singlestep,
    "UniPCMultistepScheduler": _unipc,
    "DEISMultistepScheduler": _deis,
    "FlowMatchEulerDiscreteScheduler": _flow_euler,
    "EDMEulerScheduler": _edm_euler,
    "EDMDPMSolverMultistepScheduler": _edm_dpmsolver,
}


def from_scheduler_config(config, steps, *, mu=None, flow_eps=None):
    """`DiffusersSampling` for a diffusers scheduler config (a dict, or the path of a
    `scheduler_config.json`) and a step count; `mu`: the shift of FlowMatchEulerDiscrete's
    `use_dynamic_shifting` (diffusers' `set_timesteps(mu=...)`); `flow_eps`: how far below 1
    flow matching starts (default 1e-9 under x64, 1e-4 in float32)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    cfg = _read(config)
    if cfg.name == "FlowMatchEulerDiscreteScheduler":
        return _flow_euler(cfg, int(steps), mu, flow_eps)
    if mu is not None:
        raise ValueError(f"mu={mu!r} applies to FlowMatchEulerDiscreteScheduler with "
                         f"use_dynamic_shifting=True, not to {cfg.name}")
    return BUILDERS[cfg.name](cfg, int(steps))
