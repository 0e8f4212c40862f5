"""The `jaxdiff` help texts: a short usage per command (`jaxdiff help COMMAND`, `--help`);
`--helpfull` adds every absl flag."""

from __future__ import annotations

OVERVIEW = """\
usage: jaxdiff COMMAND [flags]      (jaxdiff help COMMAND, or COMMAND --help: its flags)

commands:
  train       train a model from a config file, resuming the run in --workdir
  sample      draw samples from a trained run's latest checkpoint into a PNG (+ .npz)
  eval        score a trained run: FD, precision/recall, bits/dim (JSON report)
  eval sweep  FD against NFE for several samplers and step counts (.md, .png, .json)
  plot        a trained run's training curves as a PNG
  tune-sampler  fit a learned few-step solver to a trained run (JSON; tune-sampler --help)
  distill     a few-step student of a trained run: progressive, guided, cd, ct, reflow
              (distill --help); sample and eval read the student's --workdir
  quantize    post-training quantization of a trained run into a quantized checkpoint
              (w8a8, w4a8, fp8, ...; quantize --help); sample and eval take it: --quantized
  solve       an inverse problem (inpainting, super-resolution, deblurring, ...) with a
              trained run as the prior: dps, pigdm, ddnm, reddiff, dds (solve --help)
  generate    images from a pretrained diffusers pipeline folder: Stable Diffusion 1.x/2.x,
              SDXL, SD3, DiT (generate --help)
  plan        memory per device of a config's train step on a target mesh (--devices,
              --topology v5e-256), per remat policy, from an ahead-of-time compile (plan --help)

example:
  jaxdiff train --config configs/toy2d.py --workdir runs/toy2d
  jaxdiff sample --workdir runs/toy2d --out runs/toy2d/moons.png

--helpfull lists every flag, including those of the libraries."""

COMMAND_HELP = {
    "train": """\
usage: jaxdiff train --config FILE --workdir DIR [--config.KEY=VALUE ...]

Trains the model described by a config file; checkpoints, logs, samples and report.json go to
--workdir. Running the same command again resumes from the latest checkpoint.

flags:
  --config FILE            a Python file defining get_config(), e.g. configs/digits.py
  --workdir DIR            the run directory (created if missing)
  --config.KEY=VALUE       override one config value, e.g. --config.optim.lr=1e-3
  --distributed            join a multi-host run (TPU pods, SLURM); see launch/

example:
  jaxdiff train --config configs/digits.py --workdir runs/digits --config.train.steps=2000""",
    "sample": """\
usage: jaxdiff sample --workdir DIR [--out FILE.png] [flags]

Draws samples from the EMA parameters of the latest checkpoint of a trained run; writes a PNG
grid (a scatter plot for 2-D data) and an .npz with the arrays beside it.

flags:
  --workdir DIR            a trained run (its config.json and checkpoints/)
  --out FILE.png           the PNG to write, in an existing directory
                           (default: DIR/samples/sample_<time>.png)
  --num N                  number of samples (default 64)
  --sampler NAME           a sampler, e.g. euler, heun, ddim, dpmpp_2m (default: the config's)
  --steps N                sampler steps (default: the config's)
  --seed N                 noise seed, >= 0 (default 0)
  --class K                class-conditional models: one class for every sample (default: cycle)
  --guidance S             class-conditional models: guidance scale (1 = none)
  --sampler_file FILE      a learned solver (jaxdiff tune-sampler): its grid and steps
  --scheduler_config FILE  a diffusers scheduler_config.json: its sampler, grid and options
                           (with --steps N; the run's process and prediction must match)
  --cache SPEC             a feature cache, NAME[:KEY=VALUE,...], e.g. deepcache:interval=3
                           (default: the config's sampler.cache; none: no cache)
  --quantized DIR          sample a quantized network of this run (jaxdiff quantize's DIR)
                           instead of the EMA params
  --steer SPEC             steer toward --reward: smc:particles=8[,lam=1.0] (Feynman-Kac SMC;
                           default sampler: the run's if stochastic, else euler_ancestral),
                           best_of_n:n=8, search:rounds=2,candidates=3; --num samples returned
  --reward SPEC            classifier:digit=D (digits runs); alone it only scores the samples;
                           sampled unconditionally unless --class K

example:
  jaxdiff sample --workdir runs/digits --sampler dpmpp_2m --steps 20 --num 64 --out grid.png
  jaxdiff sample --workdir runs/digits --steer smc:particles=8 --reward classifier:digit=3""",
    "eval": """\
usage: jaxdiff eval --workdir DIR [flags]      (jaxdiff eval sweep --help: the sweep)

Scores the latest checkpoint of a trained run and writes a JSON report: Frechet distance (fd),
precision/recall (pr) of --num samples against the --split data, and bits/dim (nll).

flags:
  --workdir DIR            a trained run
  --metrics LIST           from fd, pr, nll (default fd,pr)
  --num N                  samples for fd/pr, at most N test examples for nll (default 1000)
  --sampler NAME           sampler (default: the config's); --steps N: its steps
  --seed N                 noise seed, >= 0 (default 0)
  --guidance S             class-conditional models: guidance scale (1 = none)
  --features NAME          digits, raw or inception (needs --inception_weights FILE)
  --split NAME             the real data to compare with (default test)
  --cache SPEC             fd/pr: a feature cache, e.g. deepcache:interval=3 (as for sample)
  --quantized DIR          score a quantized network (jaxdiff quantize's DIR); the report
                           says which (quantized: scheme, calibration, groups, param_bytes)
  --divergence NAME        nll: exact, hutchinson or auto (default)
  --out FILE.json          the report (default: DIR/eval/eval_<time>.json)

example:
  jaxdiff eval --workdir runs/digits --metrics fd,pr,nll --sampler heun --steps 18 --num 1000""",
    "eval sweep": """\
usage: jaxdiff eval sweep --workdir DIR --samplers LIST [--steps LIST] [flags]

Scores every sampler at every step count of a trained run: a table of FD (and NFE) as
PREFIX.md, a plot of FD against NFE as PREFIX.png, and the rows as PREFIX.json.

flags:
  --workdir DIR            a trained run
  --samplers LIST          fixed-step samplers, e.g. ddim,heun,dpmpp_2m
  --steps LIST             step counts (default 5,10,20,50)
  --num N                  samples per cell (default 1000)
  --metrics LIST           fd and/or pr (default fd,pr)
  --seed N, --guidance S, --features NAME, --split NAME, --cache SPEC, --quantized DIR:
                           as for jaxdiff eval
  --out PREFIX             path prefix of the outputs (default: DIR/eval/sweep)

example:
  jaxdiff eval sweep --workdir runs/digits --samplers ddim,heun,dpmpp_2m --steps 5,10,20""",
    "plot": """\
usage: jaxdiff plot --workdir DIR [--out FILE.png]

Plots the training curves (loss, learning rate, ...) of a run from its metrics.jsonl.

flags:
  --workdir DIR            a trained run
  --out FILE.png           the PNG to write (default: DIR/training.png)

example:
  jaxdiff plot --workdir runs/digits --out curves.png""",
}


def text(command=None):
    """The help of `command` ('train', ..., 'eval sweep'), or the overview for None."""
    return OVERVIEW if command is None else COMMAND_HELP[command]
