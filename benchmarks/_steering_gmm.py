"""Part 2 of `benchmarks/steering.py`: FK / SMC steering towards an exact reward-tilted target.

The prior is a 2-D mixture of 8 isotropic Gaussians (`MEANS`, `STDS`, unequal `WEIGHTS`) with its
exact denoiser (`analytic.gmm_denoiser`) on EDM's process; the reward r(x) = -|x - CENTER|^2 /
(2 TAU^2) sits between two light modes, so the tilted target p(x) exp(r(x)) / Z (exact:
`analytic.gmm_tilt`, lam = 1) moves most of the mass onto them. For each particle count k,
`num` returned samples, each from its own SMC group (groups = num, one particle per group drawn
by the final weights), are compared with exact draws of the target:
- sw: sliced Wasserstein-2 distance (`metrics.sliced_wasserstein`, 256 directions) to `ref`
  exact draws; the floor is the same distance of `num` exact draws (mean of `FLOOR_DRAWS`);
- weight TV: total variation between the samples' mean posterior responsibilities under the
  target mixture and its weights (exact samples give the weights in expectation);
- mean error: distance between the samples' mean and the target's mean;
- log Z: log of the mean of the groups' unbiased estimates Z-hat minus the exact log Z
  (Z = E_p exp(r), in closed form for the mixture): 0 up to sampling noise and the sampler's
  discretisation error.
The plain sampler (no reward) against the exact prior shows the sampler's discretisation floor.
"""

from __future__ import annotations

import math
import time

import _timing
import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff import steer
from jaxdiff.core import analytic
from jaxdiff.core.denoiser import model_from_denoiser
from jaxdiff.core.process import EDM
from jaxdiff.eval.metrics import sliced_wasserstein

_ANGLES = np.deg2rad([0, 40, 95, 140, 180, 225, 270, 315])
_RADII = np.array([2.0, 2.2, 1.8, 2.1, 2.0, 1.9, 2.2, 2.0])
MEANS = np.stack([_RADII * np.cos(_ANGLES), _RADII * np.sin(_ANGLES)], 1)
STDS = np.array([0.3, 0.25, 0.35, 0.3, 0.28, 0.32, 0.3, 0.26])
WEIGHTS = np.array([0.26, 0.2, 0.16, 0.12, 0.09, 0.07, 0.05, 0.05])
CENTER = 0.5 * (MEANS[6] + MEANS[7])  # between the two lightest modes
TAU, LAM = 0.7, 1.0
SAMPLER = "euler_ancestral"
FLOOR_DRAWS = 5
MAX_ROWS = 1 << 17  # rows per sampler call (groups are split into chunks above it)
PROCESS = EDM()
NET = model_from_denoiser(analytic.gmm_denoiser(MEANS, STDS, WEIGHTS), PROCESS, "x0")
log = _timing.progress


def reward(x0, sigma):
    """r(x0) = -|x0 - CENTER|^2 / (2 TAU^2), per sample."""
    return -jnp.sum((x0 - jnp.asarray(CENTER, x0.dtype)) ** 2, -1) / (2 * TAU**2)


def target():
    """The exact tilted mixture (weights, means, covs) and log Z = log E_p exp(r)."""
    w, mu, covs = analytic.gmm_tilt(MEANS, STDS, WEIGHTS, CENTER, TAU)
    log_ev = analytic.gmm_log_evidence(MEANS, STDS, WEIGHTS, np.eye(2), CENTER, TAU)
    log_z = float(log_ev) + math.log(2 * math.pi * TAU**2)  # exp(r) = 2 pi tau^2 N(c; x, tau^2)
    return (np.asarray(w), np.asarray(mu), np.asarray(covs)), log_z


def prior():
    return WEIGHTS / WEIGHTS.sum(), MEANS, np.asarray(analytic.isotropic_covs(STDS, 2))


def exact(mix, n, seed):
    w, mu, covs = mix
    return np.asarray(analytic.gmm_sample(jax.random.key(seed), w, mu, covs, n))


def responsibilities(x, mix):
    """(n, K) posterior component probabilities of points x under a full-covariance mixture."""
    w, mu, covs = mix
    diff = x[:, None, :] - mu[None]
    quad = np.einsum("nki,kij,nkj->nk", diff, np.linalg.inv(covs), diff)
    logdet = np.linalg.slogdet(covs)[1]
    logp = np.log(w) - 0.5 * (quad + logdet + x.shape[1] * math.log(2 * math.pi))
    logp -= logp.max(1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(1, keepdims=True)


def errors(x, ref, mix):
    x = np.asarray(x, np.float64)
    mean = np.einsum("k,kd->d", mix[0], mix[1])
    return dict(sw=sliced_wasserstein(x, ref), weight_tv=0.5 * float(np.abs(
        responsibilities(x, mix).mean(0) - mix[0]).sum()),
        mean_err=float(np.linalg.norm(x.mean(0) - mean)))


def floor(ref, mix, n, seed):
    """Mean errors of n exact draws (FLOOR_DRAWS draws): the sampling-noise floor."""
    rows = [errors(exact(mix, n, seed + i), ref, mix) for i in range(FLOOR_DRAWS)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def smc(k, n, steps, seed):
    """(n returned samples, n log Z-hat, mean resamples per group) of FK steering with k
    particles per group, groups split into chunks of at most MAX_ROWS rows."""
    xs, log_z, res = [], [], []
    chunks = np.array_split(np.arange(n), max(1, math.ceil(n * k / MAX_ROWS)))
    for i, idx in enumerate(chunks):
        g = len(idx)
        k_noise, k_fk, k_sampler, k_pick = jax.random.split(
            jax.random.fold_in(jax.random.key(seed), i), 4)
        fk = steer.FK(reward, particles=k, groups=g, key=k_fk, lam=LAM)
        x, state = jaxdiff.sample(NET, jax.random.normal(k_noise, (g * k, 2)), process=PROCESS,
                                  prediction="x0", sampler=SAMPLER, steps=steps, key=k_sampler,
                                  guidance=fk)
        xs.append(np.asarray(steer.select(x, state, k_pick)))
        log_z.append(np.asarray(steer.log_evidence(state)))
        res.append(np.asarray(state.resamples))
    return np.concatenate(xs), np.concatenate(log_z), float(np.concatenate(res).mean())


def plain(n, steps, seed):
    k_noise, k_sampler = jax.random.split(jax.random.key(seed))
    return np.asarray(jaxdiff.sample(NET, jax.random.normal(k_noise, (n, 2)), process=PROCESS,
                                     prediction="x0", sampler=SAMPLER, steps=steps,
                                     key=k_sampler))


def _timed(call, steps):
    """(call(steps), seconds) after a 2-step warm-up call (compilation is not timed)."""
    call(2)
    t0 = time.perf_counter()
    out = call(steps)
    return out, time.perf_counter() - t0


def run(cfg, cached, save, compute=True):
    """The floors, the plain sampler and FK / SMC at every k of cfg["ks"]: rows from `cached`
    or (when `compute`) measured and cached, save() after each new one."""
    n, steps, ref_n, seed = cfg["num"], cfg["steps"], cfg["ref"], cfg["seed"]
    refs = {}

    def ref(name):  # exact draws: the target's or the prior's, with the target's log Z
        if name not in refs:
            mix, log_z = target() if name == "tilted" else (prior(), None)
            draws = exact(mix, ref_n, seed + (10_000 if name == "tilted" else 20_000))
            refs[name] = draws, mix, log_z
        return refs[name]

    todo = [("floor tilted", lambda: floor(*ref("tilted")[:2], n, seed + 100)),
            ("floor prior", lambda: floor(*ref("prior")[:2], n, seed + 200)),
            ("plain vs prior", lambda: _plain_row(*ref("prior")[:2], n, steps, seed))]
    todo += [(f"smc k={k}", lambda k=k: _smc_row(k, *ref("tilted"), n, steps, seed))
             for k in cfg["ks"]]
    rows = []
    for label, make in todo:
        key = f"{label}/n{n}/steps{steps}/ref{ref_n}/seed{seed}"
        if key not in cached and compute:
            cached[key] = dict(label=label, num=n, steps=steps, ref=ref_n, **make())
            log(f"gmm {label}: " + ", ".join(f"{a} {b:.4g}" for a, b in cached[key].items()
                                             if isinstance(b, float)))
            save()
        if key in cached:
            rows.append(cached[key])
    return rows


def _plain_row(pref, pmix, n, steps, seed):
    x, secs = _timed(lambda s: plain(n, s, seed + 300), steps)
    return dict(k=1, nfe=steps, wall_s=round(secs, 2), **errors(x, pref, pmix))


def _smc_row(k, ref, mix, log_z, n, steps, seed):
    (x, lz, res), secs = _timed(lambda s: smc(k, n, s, seed + 1000 + k), steps)
    lz_mean = float(jax.nn.logsumexp(jnp.asarray(lz)) - math.log(len(lz)))
    return dict(k=k, nfe=k * steps, wall_s=round(secs, 2), resamples=res,
                log_z_err=lz_mean - log_z, **errors(x, ref, mix))


def describe():
    """One line on the target: the weights the tilt moves and log Z."""
    (w, _, _), log_z = target()
    p = WEIGHTS / WEIGHTS.sum()
    r3 = lambda a: [round(float(v), 3) for v in a]  # noqa: E731
    return (f"Prior weights {r3(p)}, tilted weights {r3(w)} (reward centre {r3(CENTER)}, "
            f"tau {TAU:g}, lam {LAM:g}); log Z = {log_z:.4f}.")


def table(rows):
    """Markdown lines of the GMM rows."""
    head = ["run", "k", "NFE / sample", "SW2", "weight TV", "mean err", "log mean Z-hat - log Z",
            "resamples / group", "wall s"]
    body = []
    for r in rows:
        body.append([r["label"], r.get("k", "-"), r.get("nfe", "-"), f"{r['sw']:.4f}",
                     f"{r['weight_tv']:.4f}", f"{r['mean_err']:.4f}",
                     f"{r['log_z_err']:+.4f}" if "log_z_err" in r else "-",
                     f"{r['resamples']:.1f}" if "resamples" in r else "-",
                     r.get("wall_s", "-")])
    return _timing.table(head, body)


def plot(ax, rows):
    smc_rows = sorted((r for r in rows if r["label"].startswith("smc")), key=lambda r: r["k"])
    if not smc_rows:
        return
    ax.plot([r["k"] for r in smc_rows], [r["sw"] for r in smc_rows], "o-", label="FK / SMC")
    for label, style in (("floor tilted", "k--"), ("plain vs prior", "g:")):
        for r in rows:
            if r["label"] == label:
                text = ("exact samples (noise floor)" if label == "floor tilted" else
                        "plain sampler vs exact prior (discretisation)")
                ax.axhline(r["sw"], color=style[0], ls=style[1:], lw=0.9, label=text)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("particles k (NFE / sample = k x steps)")
    ax.set_ylabel("SW2 to the exact tilted target")
    ax.set_title("Gaussian mixture, exact reward-tilted target")
    ax.legend(fontsize=7)
