"""Inference-time steering (issue 16): best-of-N, zero-order noise search and FK / SMC steering
(`jaxdiff.steer`) at equal compute, on the testbed digits model and on an exact tilted mixture.

Part 1, digits: the class-conditional `digits16_unet` run UNCONDITIONALLY (the null label 10; it
was trained with label dropout) is steered towards a requested digit, 0..9, `groups` samples per
digit. Reward: log p(digit | x) under the built-in digits classifier (`jaxdiff.eval.digits`; the
verifier). Judge: a separately trained classifier of another family, scikit-learn's RBF SVC with
its default settings, fitted on the 8x8 digits train split; it reads samples average-pooled to
8x8 and clipped (`digits.to_8x8`); its accuracy on the held-out test split is reported. Methods,
at NFE per returned sample a multiple of the base's S steps (one network call per step):
- base: the unconditional model, dpmpp_2m (deterministic) and euler_ancestral, S steps (1x);
- best_of_n: n dpmpp_2m samples from fresh noise, the best by reward (n x);
- search: Ma et al.'s zero-order search around a pivot noise with dpmpp_2m, rounds x
  candidates neighbours at `radius` ((1 + rounds x candidates) x);
- smc: FK steering (potential "diff", ESS threshold 0.5, systematic resampling) of
  euler_ancestral with k particles, reward log p(digit | x0-hat) at inverse temperature lam in
  {1, 4, 16} (lam = 1 targets p(x | digit) under the verifier), one particle drawn by the final
  weights (k x); with k = 2 the ESS (>= 1) never falls below 0.5 k: no resampling, only the
  final weighted pick;
- conditional: the conditional model (label = digit) without guidance (1x) and under CFG 2.0
  (the testbed's standard guidance, 2 calls per step: 2x), for reference.
Metrics per row: the judge's accuracy for the requested digit (the headline; +- its binomial
standard error) and its worst digit, the verifier's agreement (the gap shows over-optimisation
of the verifier), the mean reward, FD_digits and the FD of as many real digits
(`testbed.score`), SMC's resamplings and mean Z-hat (at lam = 1: the verifier's p(digit) under
the model), and wall time (2-core CPU, shared; after a 2-step warm-up run: no compilation).

Part 2, an exact reward-tilted 2-D Gaussian mixture: FK / SMC's error against the exact target
vs the particle count (`_steering_gmm`, whose docstring says what is measured).

    PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/steering.py [--quick]
        [--part digits|gmm|all] [--groups G] [--num N] [--out benchmarks/out]

Rows are cached (JSON, written atomically) in OUT/steering/{digits,gmm}.json (--quick:
*_quick.json), keyed by their settings, so a rerun resumes. Writes OUT/steering/tables.md and
benchmarks/steering.png (--quick: OUT/steering/tables_quick.md and steering_quick.png).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import _steering_gmm as gmm
import _timing
import jax
import jax.numpy as jnp
import numpy as np
import testbed

import jaxdiff
from jaxdiff import data as data_lib
from jaxdiff import steer
from jaxdiff.core.guidance import CFG, Chain, Conditioning
from jaxdiff.eval import digits

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL, SEED = "digits16_unet", 0
FULL = dict(groups=30, steps=25, gmm=dict(num=2000, ref=20000, steps=100, seed=0,
                                          ks=(1, 2, 4, 8, 16, 32, 64, 128, 256)))
QUICK = dict(groups=1, steps=6, gmm=dict(num=200, ref=2000, steps=20, seed=0, ks=(8,)))
# (method, settings) in table order; QUICK_CONFIGS: the --quick subset
CONFIGS = [("base", dict(sampler="dpmpp_2m")), ("base", dict(sampler="euler_ancestral")),
           ("conditional", dict(cfg=None)), ("conditional", dict(cfg=2.0))]
CONFIGS += [("best_of_n", dict(n=n)) for n in (2, 4, 8)]
CONFIGS += [("search", dict(rounds=r, candidates=c, radius=0.5)) for r, c in ((1, 3), (2, 3),
                                                                              (1, 7))]
CONFIGS += [("smc", dict(particles=k, lam=lam)) for lam in (1.0, 4.0, 16.0)
            for k in (2, 4, 8)]
# chosen on the verifier's agreement (50 samples, another key), after the rows above: the "sum"
# potential at lam 4 and resampling at every step (ESS threshold 1) at lam 16
CONFIGS += [("smc", dict(particles=k, lam=4.0, potential="sum")) for k in (4, 8)]
CONFIGS += [("smc", dict(particles=8, lam=16.0, ess_threshold=1.0))]
# (search 1 x 1 runs the base's program: one compilation fewer)
QUICK_CONFIGS = [CONFIGS[i] for i in (0, 2, 4, 10)] + [
    ("search", dict(rounds=1, candidates=1, radius=0.5))]
log = _timing.progress


class Digits:
    """The testbed UNet, the requested digits (each of 0..9 `groups` times) and the samplers."""

    def __init__(self, groups):
        try:
            self.tb = testbed.load(MODEL, build=False, log=False)
        except FileNotFoundError as e:
            sys.exit(f"steering: {e} (this benchmark never trains)")
        self.labels = np.repeat(np.arange(10, dtype=np.int32), groups)
        self.null = self.tb.num_classes

    def sample(self, noise, sampler, steps, *, labels=None, extra=None, key=None, cfg=None):
        """Samples of `noise`: conditional on `labels` (default: the null label), under CFG at
        scale `cfg`, or with a further guidance transform `extra` (FK) chained after."""
        n = len(noise)
        y = jnp.full((n,), self.null, jnp.int32) if labels is None else jnp.asarray(labels)
        guide = (Conditioning((y,)) if cfg is None else
                 CFG(scale=cfg, y=y, y_null=jnp.full((n,), self.null, jnp.int32)))
        if extra is not None:
            guide = Chain((guide, extra))
        return jaxdiff.sample(self.tb.model_fn, noise, process=self.tb.process,
                              prediction=self.tb.prediction, sampler=sampler, steps=steps,
                              key=jax.random.key(SEED + 1) if key is None else key,
                              guidance=guide)

    def noise(self, rows, tag):
        return jax.random.normal(jax.random.fold_in(jax.random.key(SEED), tag),
                                 (rows, *self.tb.shape))

    def reward(self, x):
        """log p(requested digit | x) of samples laid out group-major (one group per label)."""
        return digits.log_prob(x, np.repeat(self.labels, len(x) // len(self.labels)))


def _smc_reward(labels, x0, sigma):
    return digits.log_prob(x0, labels)


def run_method(dg, method, s, steps):
    """(returned samples (10 groups,) ..., extra row fields) of one configuration."""
    g = len(dg.labels)
    if method == "base":
        return dg.sample(dg.noise(g, 0), s["sampler"], steps), {}
    if method == "conditional":
        return dg.sample(dg.noise(g, 0), "dpmpp_2m", steps, labels=dg.labels, cfg=s["cfg"]), {}
    key = jax.random.fold_in(jax.random.key(SEED), 7)
    if method == "smc":
        return run_smc(dg, s["particles"], s["lam"], steps, key,
                       potential=s.get("potential", "diff"),
                       ess_threshold=s.get("ess_threshold", 0.5))

    def generate(z):  # in chunks of g rows: one compiled program, the base's
        return jnp.concatenate([dg.sample(c, "dpmpp_2m", steps) for c in jnp.split(
            z, len(z) // g)])

    if method == "best_of_n":
        return steer.best_of_n(generate, dg.reward, key, dg.tb.shape, n=s["n"], groups=g)[0], {}
    return steer.zero_order_search(generate, dg.reward, key, dg.tb.shape, rounds=s["rounds"],
                                   candidates=s["candidates"], radius=s["radius"],
                                   groups=g)[0], {}


def run_smc(dg, k, lam, steps, key, potential="diff", ess_threshold=0.5):
    """FK steering of euler_ancestral with k particles per requested sample, groups in chunks
    of 2 g rows (large batches run slower per row on a CPU): (samples, extra row fields)."""
    g = len(dg.labels)
    noise = dg.noise(g * k, 1).reshape(g, k, *dg.tb.shape)
    xs, z, res = [], [], []
    for i, idx in enumerate(np.array_split(np.arange(g), math.ceil(k / 2))):
        k_fk, k_pick, k_sampler = jax.random.split(jax.random.fold_in(key, i), 3)
        labels = jnp.asarray(np.repeat(dg.labels[idx], k))
        fk = steer.FK(jax.tree_util.Partial(_smc_reward, labels), particles=k, groups=len(idx),
                      key=k_fk, lam=lam, potential=potential, ess_threshold=ess_threshold)
        x, state = dg.sample(noise[idx].reshape(-1, *dg.tb.shape), "euler_ancestral", steps,
                             extra=fk, key=k_sampler)
        xs.append(steer.select(x, state, k_pick))
        z.append(np.exp(np.asarray(steer.log_evidence(state), np.float64)))
        res.append(np.asarray(state.resamples))
    return jnp.concatenate(xs), dict(resamples=float(np.concatenate(res).mean()),
                                     z_hat=float(np.concatenate(z).mean()))


def nfe(method, s, steps):
    mult = dict(base=1, best_of_n=s.get("n"), smc=s.get("particles"),
                conditional=1 if s.get("cfg") is None else 2,
                search=1 + s.get("rounds", 0) * s.get("candidates", 0))[method]
    return mult * steps


def setting(method, s):
    if method == "search":
        return f"rounds {s['rounds']} x {s['candidates']}, radius {s['radius']:g}"
    if method == "conditional":
        return "no guidance" if s["cfg"] is None else f"CFG {s['cfg']:g}"
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items())


def fit_judge():
    """(judge, test accuracy): scikit-learn's RBF SVC (defaults) on the 8x8 train split."""
    from sklearn.svm import SVC

    def split(name):
        it = data_lib.build("digits", name, batch_size=1, shuffle=False, num_epochs=1,
                            num_threads=1)
        rows = list(it)
        x = np.concatenate([r["x"] for r in rows])
        return x.reshape(len(x), -1), np.concatenate([r["label"] for r in rows])

    (x, y), (xt, yt) = split("train"), split("test")
    judge = SVC().fit(x, y)
    return judge, float(np.mean(judge.predict(xt) == yt))


def score(x, dg, judge):
    x, labels = np.asarray(x), dg.labels
    sc = testbed.score(x, labels, resolution=16)
    hit = judge.predict(digits.to_8x8(x)) == labels
    per = [float(np.mean(hit[labels == d])) for d in range(10)]
    acc = float(np.mean(hit))
    return dict(judge=acc, judge_se=math.sqrt(acc * (1 - acc) / len(hit)), judge_worst=min(per),
                judge_per_digit=per, agreement=sc["agreement"], fd=sc["fd"],
                fd_real=sc["fd_real"], reward=float(np.mean(dg.reward(x))))


def digit_rows(cfg, configs, cached, save, compute=True):
    """The rows of `configs`, from `cached` or (when `compute`) run, scored and cached."""
    steps, rows, setup = cfg["steps"], [], None
    for method, s in configs:
        key = json.dumps([method, s, cfg["groups"], steps, SEED], sort_keys=True)
        if key not in cached and compute:
            setup = setup or (Digits(cfg["groups"]), *fit_judge())
            cached[key] = digit_row(setup, method, s, steps)
            save()
        if key in cached:
            rows.append(cached[key])
    return rows


def digit_row(setup, method, s, steps):
    dg, judge, judge_test = setup
    run_method(dg, method, s, 2)  # compiles (the step count is data to the program)
    t0 = time.perf_counter()
    x, extra = run_method(dg, method, s, steps)
    x = jax.block_until_ready(x)
    secs = time.perf_counter() - t0
    r = dict(method=method, setting=setting(method, s), params=s, steps=steps,
             nfe=nfe(method, s, steps), num=len(dg.labels), wall_s=round(secs, 2),
             judge_test_accuracy=judge_test, **extra, **score(x, dg, judge))
    log(f"digits {method} {r['setting']}: judge {r['judge']:.3f}, verifier "
        f"{r['agreement']:.3f}, FD {r['fd']:.2f} ({secs:.0f} s)")
    return r


def digit_table(rows):
    head = ["method", "setting", "NFE / sample", "x base", "judge acc", "judge worst digit",
            "verifier agreement", "gap", "mean log p (verifier)", "FD", "FD real",
            "resamples", "mean Z-hat", "wall s", "ms / sample"]
    body = []
    for r in rows:
        body.append([r["method"], r["setting"], r["nfe"], f"{r['nfe'] / r['steps']:g}",
                     f"{r['judge']:.3f} +- {r['judge_se']:.3f}", f"{r['judge_worst']:.2f}",
                     f"{r['agreement']:.3f}", f"{r['agreement'] - r['judge']:+.3f}",
                     f"{r['reward']:.2f}", f"{r['fd']:.2f}", f"{r['fd_real']:.2f}",
                     f"{r['resamples']:.1f}" if "resamples" in r else "-",
                     f"{r['z_hat']:.3f}" if "z_hat" in r else "-", f"{r['wall_s']:.1f}",
                     f"{1000 * r['wall_s'] / r['num']:.0f}"])
    return _timing.table(head, body)


def plot(drows, grows, path):
    from jaxdiff.eval.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    if drows:
        _plot_digits(axes[0], axes[1], drows)
    gmm.plot(axes[2], grows)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(rows):
    out = {}
    for r in rows:
        if r["method"] in ("best_of_n", "smc", "search"):
            p = r["params"]
            name = r["method"] + ("" if r["method"] == "best_of_n" else
                                  f" lam {p['lam']:g}" + "".join(
                                      f" {k} {p[k]}" for k in ("potential", "ess_threshold")
                                      if k in p) if r["method"] == "smc"
                                  else f" radius {p['radius']:g}")
            out.setdefault(name, []).append(r)
    return {k: sorted(v, key=lambda r: r["nfe"]) for k, v in out.items()}


def _plot_digits(ax_acc, ax_fd, rows):
    base = [r for r in rows if r["method"] == "base"]
    cond = [r for r in rows if r["method"] == "conditional"]
    for ax, metric in ((ax_acc, "judge"), (ax_fd, "fd")):
        for name, rs in _series(rows).items():  # from the base of the method's sampler
            sampler = "euler_ancestral" if name.startswith("smc") else "dpmpp_2m"
            rs = [r for r in base if r["params"]["sampler"] == sampler] + rs
            ax.plot([r["nfe"] for r in rs], [r[metric] for r in rs], "o-", ms=4, label=name)
        for r, m in zip(base, "sD"):
            ax.plot([r["nfe"]], [r[metric]], "k" + m, label=f"base ({r['setting']})")
        for r, m in zip(cond, "^v"):
            ax.plot([r["nfe"]], [r[metric]], "r" + m, label=f"conditional model ({r['setting']})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"NFE per returned sample (base: {rows[0]['steps']} steps)")
    ax_acc.axhline(0.8, color="grey", ls="--", lw=0.8, label="target 0.8")
    ax_acc.axvline(8 * rows[0]["steps"], color="grey", ls=":", lw=0.8)
    ax_acc.set_ylabel("judge accuracy for the requested digit (SVC)")
    ax_acc.set_title("digits16_unet, unconditional, steered to a digit")
    ax_fd.axhline(rows[0]["fd_real"], color="grey", ls=":", lw=0.8, label="real digits")
    ax_fd.set_ylabel("FD_digits (lower is better)")
    ax_fd.set_title("sample quality")
    ax_acc.legend(fontsize=7)


def verdict(rows):
    """The issue's target, judged on every steering row at <= 8x the base's NFE."""
    steps = rows[0]["steps"]
    cands = [r for r in rows if r["method"] in ("best_of_n", "search", "smc")
             and r["nfe"] <= 8 * steps]
    base = [f"{r['judge']:.3f} ({r['params']['sampler']})" for r in rows if r["method"] == "base"]
    if not cands:
        return f"Base judge accuracy: {', '.join(base)}."
    best = max(cands, key=lambda r: r["judge"])
    met = "met" if best["judge"] >= 0.8 else f"missed by {0.8 - best['judge']:.3f}"
    return (f"Target (judge accuracy >= 0.8 at <= 8x the NFE of one sample, from the base's "
            f"{', '.join(base)}): {met}; highest of the {len(cands)} steering rows: "
            f"{best['method']} {best['setting']} at {best['nfe'] / steps:g}x, "
            f"{best['judge']:.3f} (verifier {best['agreement']:.3f}).")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, < 1 min)")
    ap.add_argument("--part", default="all", choices=("digits", "gmm", "all"))
    ap.add_argument("--groups", type=int, help="samples per requested digit (default 30)")
    ap.add_argument("--num", type=int, help="returned mixture samples per k (default 2000)")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    args = ap.parse_args(argv)
    for name in ("groups", "num"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name}={v} must be >= 1")
    cfg = json.loads(json.dumps(QUICK if args.quick else FULL))
    cfg["groups"] = args.groups or cfg["groups"]
    cfg["gmm"]["num"] = args.num or cfg["gmm"]["num"]
    suffix = "_quick" if args.quick else ""
    folder = os.path.join(args.out, "steering")
    paths = {p: os.path.join(folder, f"{p}{suffix}.json") for p in ("digits", "gmm")}
    cached = {p: _timing.load_json(path) or {} for p, path in paths.items()}
    t0 = time.perf_counter()
    # a part not asked for is reported from the cache (nothing is run for it)
    drows = digit_rows(cfg, QUICK_CONFIGS if args.quick else CONFIGS, cached["digits"],
                       lambda: _timing.save_json(paths["digits"], cached["digits"]),
                       compute=args.part in ("digits", "all"))
    grows = gmm.run(cfg["gmm"], cached["gmm"],
                    lambda: _timing.save_json(paths["gmm"], cached["gmm"]),
                    compute=args.part in ("gmm", "all"))
    log(f"steering: done in {time.perf_counter() - t0:.0f} s")
    report(drows, grows, folder, suffix, args)


def report(drows, grows, folder, suffix, args):
    lines = [f"# Steering (`benchmarks/steering.py{' --quick' if args.quick else ''}`)", ""]
    if drows:
        lines += [f"## Digits: {MODEL} unconditional, steered to a requested digit", "",
                  f"{drows[0]['num']} returned samples per row ({drows[0]['num'] // 10} per "
                  f"digit), base {drows[0]['steps']} steps; judge: RBF SVC, test accuracy "
                  f"{drows[0]['judge_test_accuracy']:.3f}; machine {_timing.machine()['cpu']}.",
                  "", digit_table(drows), "", verdict(drows), ""]
    if grows:
        lines += ["## Exact reward-tilted Gaussian mixture (FK / SMC)", "",
                  f"{grows[0]['num']} returned samples per row, {gmm.SAMPLER} at "
                  f"{grows[0]['steps']} steps, {grows[0]['ref']} exact reference draws. "
                  + gmm.describe(), "", gmm.table(grows), ""]
    text = "\n".join(lines)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"tables{suffix}.md"), "w") as f:
        f.write(text + "\n")
    png = (os.path.join(folder, "steering_quick.png") if args.quick
           else os.path.join(HERE, "steering.png"))
    plot(drows, grows, png)
    print(text)


if __name__ == "__main__":
    main()
