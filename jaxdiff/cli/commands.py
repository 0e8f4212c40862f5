"""`jaxdiff train` and `jaxdiff sample`: config in, library calls, files out."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

import jaxdiff
from jaxdiff import train as train_lib
from jaxdiff.accel import cache as cache_lib
from jaxdiff.cli import build, validate
from jaxdiff.cli import discrete as discrete_cli
from jaxdiff.cli.flags import first_line
from jaxdiff.core.denoiser import Stateful
from jaxdiff.core.guidance import CFG, Chain
from jaxdiff.eval import images, quality
from jaxdiff.train import parallel, rundir
from jaxdiff.train.checkpoint import Checkpointer, CheckpointError
from jaxdiff.train.nonfinite import with_skip_nonfinite
from jaxdiff.train.step import autoencoder_objective

# Settings a resumed run may change: how long and how often (train.steps extends a run), how it
# samples, evaluates and lays out devices, where the data lives, and how the network computes.
# Any other change (optim.lr, loss, data, process, train.seed, ...) is refused on resume.
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep",
                     "train.sample_every", "train.num_samples", "train.skip_nonfinite", "sampler",
                     "mesh", "data.data_dir") + tuple(f"model.{k}" for k in build.COMPUTE_ONLY)


def train(config, workdir):
    """Trains from `config`, resuming from `workdir`; ends with samples and a short report.

    The state is sharded on the mesh `config.mesh` over all devices; `config.data.batch_size`
    is the global batch (all processes together), split evenly over processes and over the
    mesh's data×fsdp devices. Nothing in `workdir` changes until the config is checked whole,
    the workdir is locked (one trainer per workdir, `jaxdiff.train.rundir`) and the config fits the
    checkpoint there (`_check_resume`); only then is config.json written, atomically.

    An autoencoder run (`build.is_autoencoder`) trains `autoencoder_objective`; its samples are
    reconstructions of held-out images and its report their PSNR (`_autoencoder_report`). A
    latent run (`data.latents`) trains on the autoencoder's latents (encoded on first use) and
    its samples are decoded to images (`draw`)."""
    t_start = time.time()
    validate.check_config(config)
    autoencoder = build.is_autoencoder(config)
    model, info = build.model(config), build.data_info(config)
    process = None if autoencoder else build.process(config)
    mesh = build.mesh(config)
    with rundir.lock(workdir):
        data = build.dataset(config, config.train.seed)  # checks the batch against processes
        parallel.check_batch(config.data.batch_size, mesh)
        tx, lr_fn = build.optimizer(config)
        _check_resume(config, workdir, model, tx, info)
        write_json(os.path.join(workdir, "config.json"), config.to_dict())
        c = config.train
        state = train_lib.init_state(model, tx, x_shape=info["shape"],
                                     num_classes=classes(config), seed=c.seed,
                                     ema_decays=tuple(config.optim.ema_decays), mesh=mesh)

        def sample_fn(state, step):
            x, labels = draw(config, model, process, state.ema_params[0], num=c.num_samples,
                             seed=0)
            _save_samples(os.path.join(workdir, "samples", f"step_{step:07d}.png"), x,
                          cols=classes(config) or None)
            if step == c.steps:
                _report(config, workdir, x, labels, step, t_start)

        if autoencoder:
            sample_fn = _reconstruction_fn(config, model, workdir, mesh, t_start)
        if build.is_discrete(config):
            sample_fn = discrete_cli.sample_fn(config, model, process, workdir, t_start)
        train_lib.train(state, build_train_step(config, model, tx, lr_fn, process), data,
                        workdir=workdir, total_steps=c.steps, log_every=c.log_every,
                        ckpt_every=c.ckpt_every, keep=c.keep, sample_every=c.sample_every,
                        sample_fn=sample_fn, description=build.description(config), mesh=mesh)


def build_train_step(config, model, tx, lr_fn, process):
    """The run's pure train step (`make_train_step` around its objective: an autoencoder's,
    a token run's or the diffusion loss), as `train` runs it and `jaxdiff plan` compiles it."""
    if build.is_autoencoder(config):
        objective = autoencoder_objective(model, **build.autoencoder_loss(config))
    elif build.is_discrete(config):
        objective = discrete_cli.train_objective(config, model, process)
    else:
        objective = train_lib.diffusion_objective(model, process=process,
                                                  prediction=config.loss.prediction,
                                                  num_classes=classes(config),
                                                  p_uncond=config.loss.p_uncond,
                                                  loss_options=build.loss_options(config))
    step = train_lib.make_train_step(objective, tx, lr_fn,
                                     ema_decays=tuple(config.optim.ema_decays))
    # train.skip_nonfinite is optional (validate.OPTIONAL): configs written before it lack it
    return with_skip_nonfinite(step) if config.train.get("skip_nonfinite") else step


AUTOENCODER_COLS = 10  # reconstruction grids: rows of originals, each over its reconstructions


def reconstruct(model, params, x, mesh=None):
    """An autoencoder's reconstructions (decode of the posterior mode) of images `x` (numpy),
    in batches, as numpy."""
    from jaxdiff.data import latents as latents_lib

    mesh = parallel.make_mesh() if mesh is None else mesh
    params = jax.device_put(params, parallel.replicated(mesh))
    run = jax.jit(lambda p, x: model.apply({"params": p}, x))
    return latents_lib.in_batches(lambda b: run(params, b), x)


def _reconstruction_fn(config, model, workdir, mesh, t_start):
    """An autoencoder run's sample_fn: the first train.num_samples held-out ("test") images
    and their reconstructions by the EMA params, as a grid (a row of originals above a row of
    their reconstructions); at the last step the report (`_autoencoder_report`)."""
    d, c = config.data, config.train
    x_test, y_test = build.split_arrays(d.name, "test", d.data_dir)
    fixed = x_test[:c.num_samples]

    def sample_fn(state, step):
        params = state.ema_params[0]
        rec = np.clip(reconstruct(model, params, x_test if step == c.steps else fixed, mesh),
                      -1.0, 1.0)
        _save_samples(os.path.join(workdir, "samples", f"step_{step:07d}.png"),
                      _pairs(fixed, rec[:len(fixed)], AUTOENCODER_COLS), cols=AUTOENCODER_COLS)
        if step == c.steps:
            _autoencoder_report(config, workdir, model, params, x_test, y_test, rec, step,
                                t_start)

    return sample_fn


def _pairs(x, rec, cols):
    """Rows of `cols` originals, each followed by the row of their reconstructions (a partial
    last row padded with white)."""
    rows = -(-len(x) // cols)
    pad = rows * cols - len(x)
    white = np.ones((pad,) + x.shape[1:], np.float32)
    x, rec = (np.concatenate([a, white]).reshape((rows, cols) + x.shape[1:]) for a in (x, rec))
    return np.stack([x, rec], axis=1).reshape((-1,) + x.shape[2:])


def psnr(x, rec):
    """(mse, psnr in dB) of reconstructions `rec` of images `x` in [-1, 1] (peak-to-peak 2):
    psnr = 10 log10(2^2 / mse), the mse over every pixel of the set."""
    mse = float(np.mean(np.square(np.asarray(rec, np.float64) - np.asarray(x, np.float64))))
    return mse, float(10.0 * np.log10(4.0 / max(mse, 1e-20)))


def _autoencoder_report(config, workdir, model, params, x, labels, rec, step, t_start):
    """report.json of an autoencoder run: reconstruction mse and PSNR on the held-out split
    (the posterior mode decoded, clipped to [-1, 1]), the latent shape, and where the dataset
    has the built-in digits network, the FD of the reconstructions to the originals and the
    digits classifier's agreement on them."""
    mse, db = psnr(x, rec)
    info = build.data_info(config)
    report = {"step": step, "train_wall_s": round(time.time() - t_start, 1),
              "split": "test", "num_images": len(x), "mse": mse, "psnr": db,
              "latent_shape": list(build.latent_shape(config.model, info["shape"]))}
    if quality.default_features(config.data.name) == "digits":
        featurize = quality.feature_fn("digits")
        report["fd_reconstruction"] = quality.sample_quality(rec, featurize(x), featurize,
                                                             metrics=("fd",))["fd"]
    agreement = quality.classifier_agreement_fn(config.data.name)
    if agreement is not None:
        report["classifier_agreement"] = agreement(rec, labels)[0]
    write_json(os.path.join(workdir, "report.json"), report)
    if jax.process_index() == 0:
        print("report: " + json.dumps(report))


def _check_resume(config, workdir, model, tx, info):
    """CheckpointError (one line) unless the checkpoint in `workdir`, if any, can go on under
    `config`: the same architecture and train state (read from metadata, not restored), and no
    setting changed outside RESUME_MAY_CHANGE since the run's config.json."""
    ckpt = Checkpointer(workdir)
    try:
        template = train_lib.abstract_state(model, tx, x_shape=info["shape"],
                                            num_classes=classes(config),
                                            ema_decays=tuple(config.optim.ema_decays))
        step = ckpt.check(template, build.description(config))
    finally:
        ckpt.close()
    saved = os.path.join(workdir, "config.json")
    try:
        with open(saved) as f:
            old = json.load(f)
    except (OSError, ValueError):  # none (e.g. copied checkpoints) or unreadable: no record
        old = None
    changed = rundir.changed_settings(old, config.to_dict(), RESUME_MAY_CHANGE) if (
        step is not None and isinstance(old, dict)) else []
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise CheckpointError(
            f"{workdir} holds step {step} of a run with other settings ({'; '.join(changed[:3])}"
            f"{more}); resume it with its settings ({saved}), or copy {ckpt.directory} into a "
            "fresh --workdir to go on from that checkpoint with these")


def draw(config, model, process, params, *, num, seed, sampler=None, steps=None, label=None,
         guidance=None, mesh=None, sampler_file=None, scheduler=None, cache=None,
         quantized=None):
    """num samples from `params`, data-parallel over `mesh` (default: every device on "data");
    class-conditional models get labels 0..K-1 cycled (or `label`) with classifier-free
    guidance at `guidance` (default: the config's).

    Samples are padded up to a multiple of the data×fsdp devices and the padding dropped after.
    Sample i starts from the noise normal(fold_in(key(seed), i)); a stochastic sampler gets the
    one key key(seed + 1), and JAX's partitionable threefry (the default) makes its draws of
    shape (N, ...) independent of how they are sharded and row i independent of N. So sample i
    is the same for any device count or `num` > i, up to float reassociation.

    `scheduler`: a `jaxdiff.interop.diffusers.DiffusersSampling` (`scheduler_sampling`), whose
    process, sampler, options and grid replace the config's (its clipping after the CFG).

    `cache`: a feature cache spec (`jaxdiff.accel.cache.parse_cache`; "none": no cache), else
    the config's `sampler.cache` (optional); with one, the network is the cache and a line on
    its cost is printed (`draw_with_cost`).

    `quantized`: a `jaxdiff.accel.quant.Quantized` network (e.g. `quant_ckpt.load_quantized`)
    sampled instead of `model` with `params` (which may then be None); not under a cache."""
    x, labels, _ = draw_with_cost(config, model, process, params, num=num, seed=seed,
                                  sampler=sampler, steps=steps, label=label, guidance=guidance,
                                  mesh=mesh, sampler_file=sampler_file, scheduler=scheduler,
                                  cache=cache, quantized=quantized)
    return x, labels


def draw_with_cost(config, model, process, params, *, num, seed, sampler=None, steps=None,
                   label=None, guidance=None, mesh=None, sampler_file=None, scheduler=None,
                   cache=None, quantized=None, wrap=None):
    """`draw`'s (x, labels), and the feature cache's cost: None without a cache, else
    {cache: its spec, calls, fulls, full_network_equivalents} (`jaxdiff.accel.cache.cache_cost`),
    also printed as one line on process 0.

    A latent run's samples (`data.latents`) come back decoded by its autoencoder: images, not
    latents.

    `quantized`: as for `draw`. `wrap(net, x, t, *args)` -> a `Stateful` network around the
    network `net` (x, t, args: an input as the network gets it, under CFG the 2N rows of
    [x; x]), e.g. `jaxdiff.accel.quant.record_calls`: sampling runs through it and its final
    state comes back in place of the cost; not under a cache."""
    s = config.sampler
    parsed, what = _cache_spec(config, cache)
    if parsed is not None and (quantized is not None or wrap is not None):
        raise ValueError(f"{what}: a feature cache runs the float network; it cannot sample a "
                         "quantized one (--quantized) or record calibration calls; allowed "
                         "with them: --cache=none")
    mesh = parallel.make_mesh() if mesh is None else mesh
    padded = parallel.padded_size(num, mesh)
    shape = tuple(build.data_info(config)["shape"])
    noise = parallel.per_index_normal(jax.random.key(seed), padded, shape, mesh)
    if quantized is not None:  # its params (qwix QArrays, TimestepParams) as the jit's data
        params = None
        quantized = dataclasses.replace(
            quantized, params=jax.device_put(quantized.params, parallel.replicated(mesh)))
    params = jax.device_put(params, parallel.replicated(mesh))
    labels, guide = _labels(config, padded, label, guidance, mesh)
    run = dict(sampler=sampler or s.name, steps=steps or s.steps, schedule=s.schedule,
               **dict(s.options))
    if sampler_file is not None:  # a learned solver: its file holds grid, steps and coefficients
        run = dict(sampler="learned", steps=steps, sampler_file=sampler_file)
    if scheduler is not None:  # a diffusers scheduler (process and prediction: the run's)
        run = scheduler.sample_kwargs()
        process, _, clip = run.pop("process"), run.pop("prediction"), run.pop("guidance", None)
        if clip is not None:  # clip_sample / thresholding, after the CFG
            guide = clip if guide is None else Chain((guide, clip))
    if parsed is not None and run["sampler"] == "ode":
        raise ValueError(f"{what}: sampler 'ode' (diffrax, adaptive) cannot carry a cache's "
                         "state; allowed: a fixed-grid sampler (e.g. dpmpp_2m) or no cache")
    rows = padded * (2 if isinstance(guide, CFG) else 1)  # CFG: [x; x], labels [y; y_null]
    example = (np.zeros((rows,) + shape, np.float32), np.zeros(rows, np.float32),
               *(() if labels is None else (np.zeros(rows, np.int32),)),
               *((np.zeros(rows, np.float32),) if config.model.get("guidance_embed") else ()))
    with parallel.tracing_on(mesh):
        if parsed is None:
            net = (train_lib.network(model, params) if quantized is None
                   else quantized.model_fn)
            if wrap is not None:
                net = wrap(net, *example)
                net = Stateful(net.fn, jax.device_put(net.init, parallel.replicated(mesh)))
        else:
            try:
                net = cache_lib.cache_for(parsed, model, {"params": params}, *example)
            except ValueError as e:
                raise ValueError(f"{what}: {first_line(e)}") from None
            net = Stateful(net.fn, jax.device_put(net.init, parallel.replicated(mesh)))
        out = jaxdiff.sample(net, noise, process=process, prediction=config.loss.prediction,
                             key=jax.random.key(seed + 1), guidance=guide, **run)
        if parsed is None:
            x, cost = out if wrap is not None else (out, None)
        else:  # (x, final state): what ran, against XLA's FLOPs of the two branches
            x, state = out
            flops = cache_lib.branch_flops(net, *example)
            cost = dict(cache=cache_lib.format_cache(*parsed),
                        **cache_lib.cache_cost(state, flops))
            if jax.process_index() == 0:
                print(f"cache {cache_lib.describe_cost(parsed, state, flops)}")
    x = parallel.gather(x)[:num]
    if config.data.get("latents"):  # a latent run: its samples decoded to images
        x = build.decoder(config)(x)
    return x, None if labels is None else labels[:num], cost


def _cache_spec(config, cache):
    """(parsed (name, settings) or None, how to name it in an error): `cache` (the
    --cache flag; "none" turns the config's off), else the config's sampler.cache (optional:
    configs written before it lack it)."""
    spec = config.sampler.get("cache") if cache is None else cache
    what = f"--cache={cache}" if cache is not None else f"sampler.cache={spec!r}"
    try:
        return cache_lib.parse_cache(spec), what
    except ValueError as e:
        raise ValueError(f"{what}: {first_line(e)}") from None


def _labels(config, num, label, guidance, mesh):
    """(host labels, CFG guidance split over `mesh`), or (None, None) for unconditional models."""
    K = classes(config)
    if not K:
        return None, None
    if label is not None and not 0 <= label < K:
        raise ValueError(f"--class={label} is not a class of this model; allowed: 0..{K - 1}")
    labels = np.full(num, label, np.int32) if label is not None else np.arange(num) % K
    scale = config.sampler.guidance if guidance is None else guidance
    y = parallel.put_global(labels.astype(np.int32), mesh)
    if "distill" in config:  # a distilled student: one pass (guidance absorbed, or w an input)
        from jaxdiff.cli.distill_stages import conditioning

        return labels, conditioning(config, y, guidance, put=lambda a: parallel.put_global(
            a, mesh))
    guide = CFG(scale=scale, y=y, y_null=parallel.put_global(np.full(num, K, np.int32), mesh))
    return labels, guide


def restore(config, workdir, mesh):
    """(model, process, EMA params, step) of the latest checkpoint in `workdir`, restored
    straight into the layout of `mesh`."""
    model = build.model(config)
    process = None if build.is_autoencoder(config) else build.process(config)
    tx, _ = build.optimizer(config)
    ckpt = Checkpointer(workdir)
    if ckpt.latest_step() is None:
        raise CheckpointError(f"no checkpoint in {ckpt.directory}; train first with "
                              f"jaxdiff train --config ... --workdir {workdir}")
    template = train_lib.abstract_state(
        model, tx, x_shape=build.data_info(config)["shape"], num_classes=classes(config),
        ema_decays=tuple(config.optim.ema_decays), mesh=mesh)
    state, _ = ckpt.restore(template, build.description(config))
    ckpt.close()
    return model, process, state.ema_params[0], int(state.step)


def scheduler_sampling(config, scheduler_config, steps=None):
    """`from_scheduler_config(scheduler_config, steps or the config's)`, refused (one line)
    unless the run's process and prediction are the ones the scheduler config implies."""
    from jaxdiff.interop.diffusers import from_scheduler_config

    try:
        s = from_scheduler_config(scheduler_config, steps or config.sampler.steps)
        s.check_model(build.process(config), config.loss.prediction)
    except ValueError as e:
        raise ValueError(f"--scheduler_config: {first_line(e)}") from None
    return s


def load_quantized(config, directory):
    """(model, process, `Quantized` network, its quant.json) of a quantized checkpoint
    (`jaxdiff quantize`) for the run's `config`: refused in one line when it was made from
    another architecture or for other input shapes."""
    from jaxdiff.accel import quant_ckpt

    model, process = build.model(config), build.process(config)
    shape = tuple(build.data_info(config)["shape"])
    example = (np.zeros((1,) + shape, np.float32), np.zeros(1, np.float32),
               *((np.zeros(1, np.int32),) if classes(config) else ()))
    try:
        q = quant_ckpt.load_quantized(directory, model, example=example)
    except quant_ckpt.QuantizedCheckpointError as e:
        raise ValueError(f"--quantized={directory}: {first_line(e)}") from None
    return model, process, q, quant_ckpt.read_info(directory)


def quantized_summary(q, info, directory):
    """What a report says of a quantized network: {path, scheme, calibration, groups, lowrank,
    param_bytes, step}."""
    return {"path": os.path.abspath(directory), "scheme": q.scheme,
            "calibration": q.calibration, "groups": q.groups, "lowrank": q.lowrank,
            "param_bytes": int(info["param_bytes"]), "step": info.get("meta", {}).get("step")}


def sample(config, workdir, *, out, num, seed, sampler=None, steps=None, label=None,
           guidance=None, sampler_file=None, scheduler_config=None, cache=None, quantized=None):
    """Loads the EMA params of the latest checkpoint and writes `out` (PNG) and `.npz`;
    sampling is data-parallel over every device (see `draw`).

    A class-conditional model without `label` draws the classes 0..K-1 in turn, and the grid
    has K columns, one per class, as the training-time grids: sample i is in row i // K, column
    i % K. When `num` is not a multiple of K the last row is only partly filled (the rest of it
    stays blank); `num` samples are drawn and saved, never more. With `label`, and for
    unconditional models, the grid is as square as `num` allows.

    `scheduler_config` (a diffusers scheduler_config.json as a dict or path): sample with what
    `jaxdiff.interop.diffusers.from_scheduler_config(scheduler_config, steps)` gives, checked
    against the run's process and prediction before the checkpoint is read.

    `cache`: a feature cache spec (`draw`), else the config's sampler.cache; the line on its
    cost is printed, not saved.

    `quantized`: the directory of a quantized checkpoint of this run (`jaxdiff quantize`),
    sampled instead of the EMA params."""
    kind = discrete_cli.sample_extension(config)
    if os.path.splitext(out)[1].lower() != kind:
        raise ValueError(f"--out={out}: this run's samples are {kind} files "
                         f"({'text' if kind == '.txt' else 'images'}); allowed: a name ending in "
                         f"{kind}")
    if build.is_discrete(config):
        return _sample_tokens(config, workdir, out=out, num=num, seed=seed, sampler=sampler,
                              steps=steps, label=label, guidance=guidance,
                              unsupported=dict(sampler_file=sampler_file, cache=cache,
                                               scheduler_config=scheduler_config,
                                               quantized=quantized))
    scheduler = (None if scheduler_config is None
                 else scheduler_sampling(config, scheduler_config, steps))
    mesh = parallel.make_mesh()
    q = None
    if quantized is None:
        model, process, params, step = restore(config, workdir, mesh)
    else:
        model, process, q, info = load_quantized(config, quantized)
        params, step = None, info.get("meta", {}).get("step")
    x, labels = draw(config, model, process, params, num=num, seed=seed,
                     sampler=sampler, steps=steps, label=label, guidance=guidance, mesh=mesh,
                     sampler_file=sampler_file, scheduler=scheduler, cache=cache, quantized=q)
    _save_samples(out, x, cols=(classes(config) or None) if label is None else None)
    if jax.process_index() == 0:
        np.savez(os.path.splitext(out)[0] + ".npz", samples=x,
                 labels=np.zeros(0) if labels is None else labels)
        what = ("" if q is None else
                f", quantized {quantized_name(q.scheme, q.calibration, q.groups, q.lowrank)}")
        print(f"wrote {out} ({num} samples, step {step}{what})")


def _sample_tokens(config, workdir, *, out, num, seed, sampler, steps, label, guidance,
                   unsupported):
    """`sample` for a token run: `out` as a PNG grid (digits) or a text file, and `.npz` with
    the tokens (`jaxdiff.cli.discrete`)."""
    given = [k for k, v in unsupported.items() if v is not None]
    if given:
        raise ValueError(f"--{given[0]} does not apply to a token run (process.name="
                         f"{config.process.name!r})")
    model, process, params, step = restore(config, workdir, None)
    tokens, labels, nfe = discrete_cli.draw_tokens(config, model, process, params, num=num,
                                                   seed=seed, sampler=sampler, steps=steps,
                                                   label=label, guidance=guidance)
    base = os.path.splitext(out)[0]
    discrete_cli.save_samples(config, base, tokens, labels)
    if jax.process_index() == 0:
        np.savez(base + ".npz", tokens=tokens, labels=np.zeros(0) if labels is None else labels)
        print(f"wrote {out} ({num} samples, step {step}, {nfe} network calls each)")


def quantized_name(scheme, calibration, groups, lowrank=0):
    """'w8a8-dynamic', 'w8a8-timestep4', 'w4a4-dynamic-svd16': a quantized network's scheme,
    calibration and low-rank branch (the default directory name of `jaxdiff quantize`, under
    RUN/quantized/)."""
    return (f"{scheme}-{calibration}" + (str(groups) if calibration == "timestep" else "")
            + (f"-svd{lowrank}" if lowrank else ""))


def _save_samples(path, x, cols=None):
    if jax.process_index() != 0:  # every process computes the samples, one writes them
        return
    if x.ndim == 2:  # vectors: a scatter plot of the first two coordinates
        images.save_scatter(path, x)
    else:
        images.save_grid(path, x, cols=cols, scale=4)


def classes(config):
    return int(config.model.get("num_classes", 0) or 0)


def _report(config, workdir, x, labels, step, t_start):
    """report.json + a printed summary: time, and the classifier agreement of class-conditional
    samples where the dataset has a built-in classifier (`quality.classifier_agreement_fn`),
    and their FD where it has the built-in digits features (`_fd`). A latent run's samples are
    decoded images (`draw`); its report names the autoencoder run and step."""
    report = {"step": step, "train_wall_s": round(time.time() - t_start, 1),
              "num_samples": len(x), "sampler": config.sampler.name,
              "sampler_steps": config.sampler.steps, "guidance": config.sampler.guidance}
    agreement = quality.classifier_agreement_fn(config.data.name)
    if agreement is not None and labels is not None:
        acc, per_class = agreement(x, labels)
        report.update(classifier_agreement=acc, per_class=per_class)
    report.update(_fd(config, x))
    if config.data.get("latents"):
        lat = build.latents(config, "train")
        report["autoencoder"] = {"workdir": os.path.abspath(config.data.latents),
                                 "step": int(lat["vae_step"]), "scale": float(lat["scale"]),
                                 "shift": float(lat["shift"])}
    write_json(os.path.join(workdir, "report.json"), report)
    if jax.process_index() == 0:
        print("report: " + json.dumps(report))


FD_REAL_DRAWS = 10  # draws of real training data behind a report's fd_real
FD_REAL_POOL = 4  # ... from the first FD_REAL_POOL * num training examples


def _fd(config, x):
    """{fd, fd_split, fd_real, fd_real_std} of samples `x` (images) where the dataset has the
    built-in digits features (else {}): FD_digits against the held-out "test" split, as
    `jaxdiff eval` computes it, and `fd_real`, the FD of as many real training digits with the
    samples' class balance (what an exact model scores at this count; `quality.real_fd`)."""
    d = config.data
    if quality.default_features(d.name) != "digits" or np.ndim(x) != 4:
        return {}
    featurize = quality.feature_fn("digits")
    real, _ = quality.real_features(d.name, "test", featurize, data_dir=d.data_dir)
    fd = quality.sample_quality(x, real, featurize, metrics=("fd",))["fd"]
    num, K = len(x), classes(config)
    pool, pool_y = quality.real_features(d.name, "train", featurize, num=FD_REAL_POOL * num,
                                         data_dir=d.data_dir)
    counts = np.bincount(np.arange(num) % K, minlength=K) if K else None
    ref = quality.real_fd(pool, real, num=num, train_labels=pool_y, class_counts=counts,
                          draws=FD_REAL_DRAWS, seed=0)
    return {"fd": fd, "fd_split": "test", "fd_real": ref["fd_real"],
            "fd_real_std": ref["fd_real_std"]}


def write_json(path, obj):
    if jax.process_index() != 0:
        return
    images.write_atomically(path, lambda tmp: _dump_json(tmp, obj))


def _dump_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
