"""Discrete (masked) diffusion (issue 18): samplers, likelihood and the float32-Gumbel effect,
on digits as tokens and on character-level Shakespeare.

Part digits: configs/digits_tokens.py (a class-conditional masked-diffusion transformer on the
8x8 digits as 64 grey-level tokens) trained through `jaxdiff train`; for each sampler and number
of steps, `--num` samples (digits 0..9 in turn) scored as the testbed scores the continuous
models (`testbed.score`: classifier agreement, FD_digits against the held-out digits and the FD
of as many real digits), with NFE and wall time; the same for the testbed's `digits8_unet`
(configs/digits.py's UNet, EDM, dpmpp_2m, CFG 2.0: 2 network calls per step).

Part text: configs/shakespeare.py (masked) and its `:ar` variant (the autoregressive baseline:
the same network and training budget, a causal mask) trained through `jaxdiff train`, then
- validation bits per character: the masked model's NELBO (count estimator, `--elbo-samples`
  draws per sequence) and the AR model's exact -log2 p, on the same validation windows, with
  standard errors; the target is masked <= 1.3x AR;
- samples of the masked model from ancestral sampling (MDLM's joint categorical over "stay
  masked" and the tokens, one Gumbel-max per position and step) at 2^k steps, float32 vs exact
  Gumbel: generative perplexity under the AR model and the unigram entropy of the samples (the
  validation text's for reference) -- the "inaccurate categorical sampling" effect of Zheng et
  al. 2024 appears as entropy and perplexity falling with steps under float32;
- speed: tokens per second of first-hitting (L calls) against 1000-step ancestral without the
  cache (1000 calls) and with it, at their generative perplexities; the target is >= 5x.

    PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/discrete.py [--quick]
        [--part digits|text|all] [--num N] [--out benchmarks/out] [--from-cache]

Runs live in OUT/discrete/runs/ (--quick: runs_quick/; a rerun resumes them); rows are cached in
OUT/discrete/{digits,text}.json keyed by their settings; tables in OUT/discrete/tables.md and
the plot in benchmarks/discrete.png (--quick: *_quick files, nothing in benchmarks/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import runpy
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _log(msg):
    print(f"[discrete {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def config(name, variant, quick):
    """A shipped config (configs/<name>.py:<variant>), shortened with --quick."""
    c = runpy.run_path(os.path.join(ROOT, "configs", f"{name}.py"))["get_config"](variant)
    if quick:
        c.train.steps, c.train.ckpt_every, c.optim.warmup_steps = 40, 40, 5
        c.train.log_every, c.train.num_samples = 10, 10
    return c


def trained(name, variant, out, quick):
    """(config, model, process, EMA params) of a run trained (or resumed) in OUT/runs/."""
    from jaxdiff.cli import commands

    c = config(name, variant, quick)
    workdir = os.path.join(out, "runs_quick" if quick else "runs", f"{name}_{variant}")
    t0 = time.perf_counter()
    commands.train(c, workdir)
    _log(f"{name}:{variant} trained/loaded in {time.perf_counter() - t0:.0f} s")
    model, process, params, step = commands.restore(c, workdir, None)
    return c, model, process, params


class Rows:
    """Result rows cached in a JSON file, keyed by their settings (a rerun resumes)."""

    def __init__(self, path):
        self.path = path
        self.rows = json.load(open(path)) if os.path.exists(path) else {}

    def get(self, key, make):
        k = json.dumps(key, sort_keys=True)
        if k not in self.rows:
            self.rows[k] = dict(key, **make())
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.rows, f, indent=1)
            os.replace(tmp, self.path)
        return self.rows[k]


def _timed(fn, *args):
    """(result, seconds) of one call of the jitted `fn`, compiled ahead (no compilation in the
    time)."""
    compiled = fn.lower(*args).compile()
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------ digits


DIGIT_SAMPLERS = (("first_hitting", 64, {}),
                  *(("ancestral", s, {}) for s in (8, 16, 32, 64)),
                  *(("confidence", s, {}) for s in (4, 8, 16, 32)),
                  ("block", 16, dict(block_size=16)))
UNET_STEPS = (2, 4, 8, 16, 32)


def digits_part(out, num, quick, suffix):
    import testbed

    from jaxdiff import discrete
    from jaxdiff.cli import discrete as discrete_cli
    from jaxdiff.data.tokens import tokens_to_images

    c, model, process, params = trained("digits_tokens", "masked", out, quick)
    rows = Rows(os.path.join(out, f"digits{suffix}.json"))
    y = jnp.asarray(np.arange(num) % 10, jnp.int32)
    den = discrete_cli.guided_denoiser(model, params, y, 1.0, 10)
    results = []
    settings = DIGIT_SAMPLERS[:3] + DIGIT_SAMPLERS[6:7] if quick else DIGIT_SAMPLERS
    for name, steps, opts in settings:
        def make(name=name, steps=steps, opts=opts):
            run = jax.jit(lambda k: discrete.sample(den, process, k, sampler=name, batch=num,
                                                    length=64, steps=steps, **opts))
            (tokens, nfe), dt = _timed(run, jax.random.key(0))
            s = testbed.score(tokens_to_images(np.asarray(tokens)), np.asarray(y), resolution=8)
            return dict(fd=s["fd"], fd_real=s["fd_real"], agreement=s["agreement"],
                        nfe=int(nfe), seconds=dt)
        r = rows.get(dict(model="digits_tokens", sampler=name, steps=steps, **opts), make)
        _log(f"digits tokens {name}/{steps}: {r}")
        results.append(r)
    tb = testbed.load("digits8_unet")
    for steps in UNET_STEPS[:2] if quick else UNET_STEPS:
        def make(steps=steps):
            fn = lambda: testbed.sample(tb, num=num, sampler="dpmpp_2m", steps=steps)  # noqa
            fn()  # compiles
            t0 = time.perf_counter()
            x, labels = fn()
            dt = time.perf_counter() - t0
            s = testbed.score(x, labels, resolution=8)
            return dict(fd=s["fd"], fd_real=s["fd_real"], agreement=s["agreement"],
                        nfe=2 * steps, seconds=dt)
        r = rows.get(dict(model="digits8_unet", sampler="dpmpp_2m", steps=steps), make)
        _log(f"digits8_unet dpmpp_2m/{steps}: {r}")
        results.append(r)
    bpt = rows.get(dict(model="digits_tokens", what="test_bits_per_token"), lambda: dict(zip(
        ("bpt", "se"), discrete_cli.bits_per_token(c, model, process, params, "test",
                                                   num=200))))
    return results, bpt


# -------------------------------------------------------------------------------- text


def text_part(out, num, quick, suffix, elbo_samples):
    from jaxdiff import discrete
    from jaxdiff.cli import discrete as discrete_cli
    from jaxdiff.data.tokens import dataset_arrays, dataset_info
    from jaxdiff.discrete import objectives

    cm, masked, process, pm = trained("shakespeare", "masked", out, quick)
    ca, ar, _, pa = trained("shakespeare", "ar", out, quick)
    rows = Rows(os.path.join(out, f"text{suffix}.json"))
    L, V = 128, dataset_info("shakespeare_chars")["vocab_size"]
    n_val = 64 if quick else 1024
    x_val, _ = dataset_arrays("shakespeare_chars", "validation")
    x_val = x_val[:n_val]

    def bpc():
        m = discrete_cli.bits_per_token(cm, masked, process, pm, "validation", num=n_val,
                                        samples=elbo_samples)
        a = discrete_cli.bits_per_token(ca, ar, None, pa, "validation", num=n_val)
        return dict(masked_bpc=m[0], masked_se=m[1], ar_bpc=a[0], ar_se=a[1],
                    ratio=m[0] / a[0], sequences=n_val)

    like = rows.get(dict(what="validation_bpc", elbo_samples=elbo_samples), bpc)
    _log(f"validation bpc: {like}")
    ll = jax.jit(lambda x: objectives.log_likelihood(ar, pa, x))

    def gen_ppl(tokens):
        """(generative perplexity under the AR model, its log's standard error, entropy)."""
        nll = -np.concatenate([np.asarray(ll(tokens[i:i + 64])) for i in
                               range(0, len(tokens), 64)]) / L
        return (float(np.exp(nll.mean())), float(nll.std(ddof=1) / math.sqrt(len(nll))),
                discrete_cli.unigram_entropy(tokens, V))

    ref = rows.get(dict(what="validation_reference", num=num), lambda: dict(zip(
        ("gen_ppl", "log_se", "entropy"), gen_ppl(x_val[:num]))))
    den = objectives.denoiser_of(masked, pm)
    results = []
    # One sequence per sampler call (lax.map over them): the cache then skips every step that
    # leaves that sequence unchanged, so a sequence costs <= L network calls at any step count.
    # Timed once (compilation included): these rows measure quality, the speed rows below time.
    steps_list = (16, 256) if quick else (16, 256, 4096, 32768)
    n_anc = min(num, 32)
    for gumbel in ("float32", "exact"):
        for steps in steps_list:
            def make(steps=steps, gumbel=gumbel):
                one = lambda k: discrete.sample(den, process, k, sampler="ancestral",  # noqa
                                                batch=1, length=L, steps=steps, gumbel=gumbel)
                run = jax.jit(lambda k: jax.lax.map(one, jax.random.split(k, n_anc)))
                t0 = time.perf_counter()
                tokens, nfe = jax.block_until_ready(run(jax.random.key(1)))
                dt = time.perf_counter() - t0
                p, se, h = gen_ppl(np.asarray(tokens)[:, 0])
                return dict(gen_ppl=p, log_se=se, entropy=h, nfe=float(np.mean(nfe)),
                            seconds=dt)
            r = rows.get(dict(what="ancestral", steps=steps, gumbel=gumbel, num=n_anc), make)
            _log(f"ancestral {steps} {gumbel}: {r}")
            results.append(r)

    n_speed = min(num, 16)  # a batch of 16: 1000 uncached steps cost 1000 network calls

    def speed(sampler, steps, cache):
        def make():
            opts = {} if sampler != "ancestral" else dict(cache=cache)
            run = jax.jit(lambda k: discrete.sample(den, process, k, sampler=sampler,
                                                    batch=n_speed, length=L, steps=steps,
                                                    **opts))
            (tokens, nfe), dt = _timed(run, jax.random.key(2))
            p, se, h = gen_ppl(np.asarray(tokens))
            return dict(gen_ppl=p, log_se=se, entropy=h, nfe=int(nfe), seconds=dt,
                        tokens_per_s=n_speed * L / dt)
        r = rows.get(dict(what="speed", sampler=sampler, steps=steps, cache=cache,
                          num=n_speed), make)
        _log(f"speed {sampler}/{steps} cache={cache}: {r}")
        return r

    fast = [speed("first_hitting", L, True),
            speed("ancestral", 50 if quick else 1000, False),
            speed("ancestral", 50 if quick else 1000, True),
            speed("confidence", 32, True)]

    def ar_samples():
        run = jax.jit(lambda k: objectives.autoregressive_sample(ar, pa, k, batch=n_speed,
                                                                 length=L))
        tokens, dt = _timed(run, jax.random.key(3))
        p, se, h = gen_ppl(np.asarray(tokens))
        return dict(gen_ppl=p, log_se=se, entropy=h, nfe=L, seconds=dt,
                    tokens_per_s=n_speed * L / dt)

    fast.append(rows.get(dict(what="speed", sampler="autoregressive", num=n_speed),
                         ar_samples))
    return like, ref, results, fast


# ------------------------------------------------------------------------------ output


def tables(digits, text):
    lines = []
    if digits is not None:
        results, bpt = digits
        lines += ["### Digits as tokens vs the continuous digits8_unet (samples scored alike)",
                  "", f"Masked model's held-out NELBO: {bpt['bpt']:.3f} ± {bpt['se']:.3f} "
                  "bits per token (200 test digits).", "",
                  "| model | sampler | steps | NFE | agreement | FD (real) | s |",
                  "|---|---|---|---|---|---|---|"]
        blk = lambda r: f"/b{r['block_size']}" if "block_size" in r else ""  # noqa: E731
        lines += [f"| {r['model']} | {r['sampler']}{blk(r)} | {r['steps']} | {r['nfe']} | "
                  f"{r['agreement']:.3f} | {r['fd']:.2f} ({r['fd_real']:.2f}) | "
                  f"{r['seconds']:.2f} |" for r in results]
        lines.append("")
    if text is not None:
        like, ref, results, fast = text
        lines += ["### Shakespeare characters: masked diffusion vs autoregressive", "",
                  "| model | validation bits/char | ± SE |", "|---|---|---|",
                  f"| masked (NELBO, count estimator) | {like['masked_bpc']:.3f} | "
                  f"{like['masked_se']:.3f} |",
                  f"| autoregressive (exact) | {like['ar_bpc']:.3f} | {like['ar_se']:.3f} |", "",
                  f"Ratio masked / AR: **{like['ratio']:.3f}** ({like['sequences']} validation "
                  "windows of 128 characters).", "",
                  "Ancestral sampling (MDLM's joint categorical), float32 vs exact Gumbel: "
                  f"validation text reference: gen. PPL {ref['gen_ppl']:.2f}, unigram entropy "
                  f"{ref['entropy']:.3f} bits.", "",
                  "| steps | gumbel | gen. PPL (AR) | unigram entropy (bits) | NFE per sample |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['steps']} | {r['gumbel']} | {r['gen_ppl']:.2f} | {r['entropy']:.3f} | "
                  f"{r['nfe']:.0f} |" for r in sorted(results, key=lambda r: (r['steps'],
                                                                          r['gumbel']))]
        lines += ["", "| sampler | steps | cache | NFE | tokens/s | gen. PPL | entropy |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['sampler']} | {r.get('steps', 128)} | {r.get('cache', '-')} | "
                  f"{r['nfe']} | {r['tokens_per_s']:.0f} | {r['gen_ppl']:.2f} | "
                  f"{r['entropy']:.3f} |" for r in fast]
        fh = fast[0]
        slow = fast[1]
        lines += ["", f"First-hitting vs 1000-step ancestral without cache: "
                  f"**{fh['tokens_per_s'] / slow['tokens_per_s']:.1f}x** tokens/s."]
    return "\n".join(lines) + "\n"


def plot(digits, text, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if digits is not None:
        results, _ = digits
        for label, pick in (("first_hitting", "first_hitting"), ("ancestral", "ancestral"),
                            ("confidence", "confidence"), ("UNet dpmpp_2m", "dpmpp_2m")):
            rs = sorted([r for r in results if r["sampler"] == pick], key=lambda r: r["nfe"])
            if rs:
                axes[0].plot([r["nfe"] for r in rs], [r["fd"] for r in rs], "o-", label=label)
        axes[0].set(xscale="log", xlabel="network calls per sample", ylabel="FD_digits",
                    title="digits: tokens vs continuous UNet")
        axes[0].legend()
    if text is not None:
        _, ref, results, _ = text
        for gumbel, style in (("float32", "o-"), ("exact", "s--")):
            rs = sorted([r for r in results if r["gumbel"] == gumbel], key=lambda r: r["steps"])
            axes[1].plot([r["steps"] for r in rs], [r["entropy"] for r in rs], style,
                         label=gumbel)
            axes[2].plot([r["steps"] for r in rs], [r["gen_ppl"] for r in rs], style,
                         label=gumbel)
        axes[1].axhline(ref["entropy"], color="gray", ls=":", label="validation text")
        axes[2].axhline(ref["gen_ppl"], color="gray", ls=":", label="validation text")
        axes[1].set(xscale="log", xlabel="ancestral steps", ylabel="unigram entropy (bits)",
                    title="float32 Gumbel lowers the temperature")
        axes[2].set(xscale="log", xlabel="ancestral steps", ylabel="gen. PPL under AR model")
        axes[1].legend()
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def from_cache(out, suffix):
    """(digits, text) as `tables` and `plot` take them, from the rows cached in OUT (None for a
    part with no rows)."""
    def load(name):
        path = os.path.join(out, f"{name}{suffix}.json")
        return list(json.load(open(path)).values()) if os.path.exists(path) else []

    d, t = load("digits"), load("text")
    digits = text = None
    if d:
        samples = [r for r in d if "sampler" in r]
        bpt = next(r for r in d if r.get("what") == "test_bits_per_token")
        digits = (samples, bpt)
    if t:
        pick = lambda what: [r for r in t if r.get("what") == what]  # noqa: E731
        order = {("first_hitting", True): 0, ("ancestral", False): 1, ("ancestral", True): 2,
                 ("confidence", True): 3}
        fast = sorted(pick("speed"), key=lambda r: order.get((r["sampler"], r.get("cache")), 9))
        text = (pick("validation_bpc")[0], pick("validation_reference")[0], pick("ancestral"),
                fast)
    return digits, text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny runs (smoke test)")
    ap.add_argument("--part", default="all", choices=("digits", "text", "all"))
    ap.add_argument("--num", type=int, default=None, help="samples per row (500 digits, "
                    "64 texts; --quick 20)")
    ap.add_argument("--elbo-samples", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--from-cache", action="store_true",
                    help="tables and plot from the cached rows only (no training, no sampling)")
    a = ap.parse_args(argv)
    out = os.path.join(a.out, "discrete")
    os.makedirs(out, exist_ok=True)
    suffix = "_quick" if a.quick else ""
    digits = text = None
    if a.from_cache:
        digits, text = from_cache(out, suffix)
    elif a.part in ("digits", "all"):
        digits = digits_part(out, a.num or (20 if a.quick else 500), a.quick, suffix)
    if a.part in ("text", "all") and not a.from_cache:
        text = text_part(out, a.num or (20 if a.quick else 64), a.quick, suffix,
                         a.elbo_samples)
    md = tables(digits, text)
    with open(os.path.join(out, f"tables{suffix}.md"), "w") as f:
        f.write(f"<!-- {' '.join(sys.argv)} | {jax.devices()[0].device_kind} -->\n" + md)
    plot(digits, text, os.path.join(out, "discrete_quick.png") if a.quick
         else os.path.join(ROOT, "benchmarks", "discrete.png"))
    print(md)


if __name__ == "__main__":
    main()
