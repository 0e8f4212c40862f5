"""`jaxdiff eval`, `jaxdiff eval sweep` and `jaxdiff plot`: a run's config and checkpoint in,
library calls (`jaxdiff.eval`), JSON / markdown / PNG out."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np
from ml_collections import ConfigDict

from jaxdiff import train as train_lib
from jaxdiff.cli import build, commands
from jaxdiff.core import likelihood
from jaxdiff.eval import images, plots, quality
from jaxdiff.train import parallel

NLL_BATCH = 100  # test examples per likelihood ODE solve
REAL_DRAWS = 10  # draws of real training data behind `fd_real`
REAL_POOL = 4  # ... from the first REAL_POOL * num training examples (all of them if fewer)


@dataclasses.dataclass
class Run:
    """A trained run loaded for evaluation, and the real split it is compared with."""

    config: ConfigDict
    workdir: str
    model: object
    process: object
    params: object
    step: int
    mesh: object
    split: str
    quantized: object = None  # a jaxdiff.accel.quant.Quantized network, sampled instead
    quantized_info: dict | None = None  # what reports say of it (commands.quantized_summary)


def load(config, workdir, *, split, quantized=None):
    """The latest EMA params of `workdir`, restored over all devices; with `quantized` (a
    directory written by `jaxdiff quantize`) that quantized network instead."""
    mesh = parallel.make_mesh()
    if quantized is None:
        model, process, params, step = commands.restore(config, workdir, mesh)
        return Run(config, workdir, model, process, params, step, mesh, split)
    model, process, q, info = commands.load_quantized(config, quantized)
    summary = commands.quantized_summary(q, info, quantized)
    return Run(config, workdir, model, process, None, summary["step"], mesh, split, q, summary)


def feature_fn(features, inception_weights):
    """`quality.feature_fn`, its missing weights file named as the flags that give it."""
    if features == "inception" and not inception_weights:
        raise ValueError("--features=inception needs --inception_weights=<.pth or .npz file> "
                         f"({quality.INCEPTION_FILE}; nothing is downloaded)")
    return quality.feature_fn(features, inception_weights=inception_weights)


def reference(run, featurize, *, features, num, seed):
    """(featurize, real features of the reference split, facts about them). The facts hold
    `fd_real` (`quality.real_fd`): the FD of `num` real training examples with the class
    balance of the samples, mean and spread over REAL_DRAWS draws from the first
    REAL_POOL * num training examples: what a model of the data distribution scores in
    expectation at this sample count."""
    d = run.config.data
    real_feats, _ = quality.real_features(d.name, run.split, featurize, data_dir=d.data_dir)
    train_feats, train_y = quality.real_features(d.name, "train", featurize,
                                                 num=REAL_POOL * num, data_dir=d.data_dir)
    K = commands.classes(run.config)  # commands.draw labels the samples 0..K-1 in turn
    counts = np.bincount(np.arange(num) % K, minlength=K) if K else None
    facts = {"split": run.split, "num_real": len(real_feats), "features": features,
             "num_train_pool": len(train_feats), "fd_real_balanced": bool(K)}
    facts.update(quality.real_fd(train_feats, real_feats, num=num, train_labels=train_y,
                                 class_counts=counts, draws=REAL_DRAWS, seed=seed))
    return featurize, real_feats, facts


def _sampler_config(config, sampler):
    """The config with `sampler` as its sampler; the config's sampler options apply only to the
    sampler they were written for."""
    cfg = ConfigDict(config.to_dict())
    if sampler != cfg.sampler.name:
        cfg.sampler.name, cfg.sampler.options = sampler, {}
    return cfg


def quality_of(run, ref, *, metrics, sampler, steps, num, seed, guidance, cache=None):
    """{sampler, steps, nfe, fd, precision, recall, [classifier_agreement], sample_s} of `num`
    samples drawn with `sampler` over `steps` steps; with a feature cache (`cache`, else the
    config's sampler.cache) also {cache, full_network_equivalents}."""
    featurize, real_feats, _ = ref
    cfg = _sampler_config(run.config, sampler)
    t0 = time.time()
    x, labels, cost = commands.draw_with_cost(cfg, run.model, run.process, run.params, num=num,
                                              seed=seed, steps=steps, guidance=guidance,
                                              mesh=run.mesh, cache=cache,
                                              quantized=run.quantized)
    row = {"sampler": sampler, "steps": steps, "sample_s": round(time.time() - t0, 2)}
    if cost is not None:
        row.update(cache=cost["cache"], full_network_equivalents=cost["full_network_equivalents"])
    row["nfe"] = quality.count_nfe(run.process, cfg.loss.prediction, sampler=sampler,
                                   steps=steps, shape=build.data_info(cfg)["shape"],
                                   schedule=cfg.sampler.schedule, options=cfg.sampler.options)
    row.update(quality.sample_quality(x, real_feats, featurize, metrics=metrics))
    agreement = quality.classifier_agreement_fn(run.config.data.name)
    if agreement is not None and labels is not None:
        row["classifier_agreement"] = agreement(x, labels)[0]
    return row


def nll_of(run, *, num, seed, divergence):
    """{bpd, bpd_std_err, nll_examples, ...} on the first `num` examples of the split; a
    class-conditional model is evaluated unconditionally (the null class)."""
    d, t0 = run.config.data, time.time()
    x, _ = quality.real_data(d.name, run.split, num=num, data_dir=d.data_dir)
    net = (train_lib.network(run.model, run.params) if run.quantized is None
           else run.quantized.model_fn)
    K = commands.classes(run.config)
    args = (np.full(len(x), K, np.int32),) if K else ()
    bpd = quality.batched_bits_per_dim(net, run.process, run.config.loss.prediction, x,
                                       key=jax.random.key(seed), args=args, quantized=x.ndim == 4,
                                       divergence=divergence, batch=min(NLL_BATCH, len(x)))
    return {"bpd": float(np.mean(bpd)), "bpd_std_err": float(np.std(bpd) / np.sqrt(len(bpd))),
            "nll_examples": len(bpd),
            "divergence": likelihood.resolve_divergence(divergence, x.shape[1:]),
            "nll_s": round(time.time() - t0, 2)}


def evaluate(config, workdir, *, metrics, sampler, steps, num, seed, guidance, features,
             inception_weights, split, divergence, out, cache=None, quantized=None):
    """Writes the JSON report `out` of `metrics` for one sampler setting; returns it. With
    `quantized` (a `jaxdiff quantize` directory) the report scores that network and says so
    (`quantized`: scheme, calibration, groups, param_bytes)."""
    quality_metrics = {"fd", "pr"} & set(metrics)
    if quality_metrics:  # a missing weights file shows before the checkpoint is read
        featurize = feature_fn(features, inception_weights)
    run = load(config, workdir, split=split, quantized=quantized)
    report = {"workdir": workdir, "step": run.step, "dataset": config.data.name}
    if run.quantized_info is not None:
        report["quantized"] = run.quantized_info
    sampler, steps = sampler or config.sampler.name, steps or config.sampler.steps
    if quality_metrics:
        ref = reference(run, featurize, features=features, num=num, seed=seed)
        report.update(ref[2], num_samples=num, seed=seed, schedule=config.sampler.schedule,
                      guidance=config.sampler.guidance if guidance is None else guidance)
        report.update(quality_of(run, ref, metrics=metrics, sampler=sampler, steps=steps,
                                 num=num, seed=seed, guidance=guidance, cache=cache))
    if "nll" in metrics:
        report.update(split=split, **nll_of(run, num=num, seed=seed, divergence=divergence))
    commands.write_json(out, report)
    _say(f"wrote {out}: " + json.dumps(report))
    if "fd" in metrics:
        _say(f"FD {report['fd']:.3g}. " + real_data_line(report))
    return report


def sweep(config, workdir, *, metrics, samplers, steps_list, num, seed, guidance, features,
          inception_weights, split, out, cache=None, quantized=None):
    """Quality of every sampler at every step count: `out`.json (rows), `out`.md (table of
    FD and NFE), `out`.png (FD vs NFE); returns the rows."""
    adaptive = [s for s in samplers if s in quality.ADAPTIVE]
    if adaptive:
        raise ValueError(f"--samplers: {adaptive[0]!r} is adaptive (its NFE depends on the "
                         "model, not on --steps); the sweep takes fixed-step samplers")
    featurize = feature_fn(features, inception_weights)
    run = load(config, workdir, split=split, quantized=quantized)
    ref = reference(run, featurize, features=features, num=num, seed=seed)
    rows = []
    for sampler in samplers:
        for steps in steps_list:
            rows.append(quality_of(run, ref, metrics=metrics, sampler=sampler, steps=steps,
                                   num=num, seed=seed, guidance=guidance, cache=cache))
            _say(json.dumps(rows[-1]))
    head = dict(workdir=workdir, step=run.step, dataset=config.data.name, num_samples=num,
                seed=seed, schedule=config.sampler.schedule,
                guidance=config.sampler.guidance if guidance is None else guidance, **ref[2])
    if run.quantized_info is not None:
        head["quantized"] = run.quantized_info
    _write_sweep(out, head, rows, "fd" if "fd" in metrics else "precision")
    return rows


def _write_sweep(out, head, rows, metric):
    commands.write_json(out + ".json", dict(head, rows=rows))
    if jax.process_index() != 0:
        return
    text = plots.sweep_markdown(rows, metric=metric)
    text += (f"\n{head['num_samples']} samples per cell against {head['num_real']} real "
             f"{head['split']} images ({head['features']} features); checkpoint step "
             f"{head['step']}, schedule {head['schedule']}, guidance {head['guidance']}.\n"
             f"\n{real_data_line(head)}\n")
    if "quantized" in head:
        q = head["quantized"]
        name = commands.quantized_name(q["scheme"], q["calibration"], q["groups"],
                                           q.get("lowrank", 0))
        text += (f"\nThe network: quantized {name} ({q['param_bytes']} parameter bytes), "
                 f"{q['path']}.\n")
    images.write_atomically(out + ".md", lambda tmp: pathlib.Path(tmp).write_text(text))
    name = plots.METRIC_NAMES[metric]
    plots.plot_sweep(rows, out + ".png", metric=metric,
                     real=(head["fd_real"], head["fd_real_std"]) if metric == "fd" else None,
                     title=f"{head['dataset']}: {name} vs NFE (step {head['step']}, "
                           f"guidance {head['guidance']})")
    print(text + f"wrote {out}.md, {out}.png, {out}.json")


def real_data_line(facts):
    """One sentence on `fd_real` for tables: what real data scores at the same sample count."""
    how = ", drawn with replacement" if facts["fd_real_replace"] else ""
    balance = " with the samples' class balance" if facts["fd_real_balanced"] else ""
    return (f"Real data: {facts['num_samples']} training examples{balance} score FD "
            f"{facts['fd_real']:.3g} ± {facts['fd_real_std_err']:.2g} (mean ± "
            f"s.e. over {facts['fd_real_draws']} draws{how}; one draw varies by "
            f"{facts['fd_real_std']:.2g}, and so does a model's FD): what a model of the data "
            "distribution scores in expectation, no strict lower bound.")


def plot(workdir, *, out):
    """Training curves of `workdir` (its metrics.jsonl) as a PNG."""
    log = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(log):
        raise FileNotFoundError(f"no training log {log}; train first with "
                                "jaxdiff train --config ... --workdir ...")
    rows = plots.read_metrics_log(
        log, warn=lambda message: print(f"jaxdiff plot: warning: {message}", file=sys.stderr))
    plots.plot_training(rows, out, title=workdir)
    print(f"wrote {out} ({len(rows)} logged steps, last {rows[-1]['step']})")


def _say(text):
    if jax.process_index() == 0:
        print(text)
