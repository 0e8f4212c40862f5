"""The train step and the network wrapper.

`make_train_step` builds the pure step `(state, batch) -> (state, metrics)` around an objective
(`diffusion_objective`, `autoencoder_objective` or any other); its randomness is
`fold_in(rng, step)`, so a resumed run draws exactly the numbers an uninterrupted one would.
`ModelApply` / `network` wrap a Flax module as the `model_fn(x, t, *labels)` that
`jaxdiff.sample` and the objectives call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdiff.core import losses
from jaxdiff.models.autoencoder_kl import AutoencoderKL


@dataclasses.dataclass(frozen=True)
class ModelApply:
    """`model_fn(x, t, *labels)` over a Flax module, params first: `Partial(ModelApply(m), p)`
    is what `jaxdiff.sample` takes, with the params as data (new params do not recompile)."""

    model: Any
    train: bool = False

    def __call__(self, params, x, t, *args, rngs=None):
        y = args[0] if args else None
        kw = {"w": args[1]} if len(args) > 1 else {}  # a guidance-conditioned student's w
        return self.model.apply({"params": params}, x, t, y, train=self.train, rngs=rngs, **kw)


def network(model, params):
    """The sampling-time network: `model_fn(x, t, *labels)` with `params` bound as data."""
    return jax.tree_util.Partial(ModelApply(model), params)


def make_train_step(objective, tx, lr_fn, *, ema_decays):
    """The pure step `(state, batch, frozen=None) -> (state, metrics)` of any objective.

    objective(params, batch, key, frozen) -> (loss, aux): the scalar to minimise over `params`,
    with `key` = fold_in(state.rng, state.step) (a resumed run draws the same numbers) and
    `frozen` what the objective reads but does not train (e.g. a teacher's params); scalar
    entries of a dict `aux` join the metrics. `diffusion_objective` is the denoising loss. An
    objective with the attribute `takes_step = True` is also given `step=` (the state's step,
    traced), for curricula such as consistency training's discretization.
    EMA decay d is warmed up as min(d, (1 + step) / (10 + step))."""

    takes_step = getattr(objective, "takes_step", False)

    def train_step(state, batch, frozen=None):
        key = jax.random.fold_in(state.rng, state.step)
        kw = {"step": state.step} if takes_step else {}
        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, batch, key, frozen, **kw)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        warm = (1.0 + state.step) / (10.0 + state.step)
        ema = tuple(_ema(e, params, jnp.minimum(d, warm)) for d, e in zip(ema_decays,
                                                                          state.ema_params))
        extra = {k: v for k, v in aux.items() if jnp.ndim(v) == 0} if isinstance(aux, dict) else {}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state.step),
                   **extra}
        new = state.replace(step=state.step + 1, params=params, ema_params=ema,
                            opt_state=opt_state)
        return new, metrics

    return train_step


def diffusion_objective(model, *, process, prediction, num_classes=0, p_uncond=0.1,
                        loss_options=None):
    """The denoising loss of `jaxdiff.core.losses.diffusion_loss` on a Flax model, as an
    objective for `make_train_step`; batch = {"x", "label"}. Labels are replaced by the null
    label `num_classes` with probability `p_uncond` (CFG training)."""
    apply = ModelApply(model, train=True)
    loss_options = dict(loss_options or {})

    def objective(params, batch, key, frozen=None):
        k_loss, k_drop, k_label = jax.random.split(key, 3)
        args = ()
        if num_classes:
            drop = jax.random.uniform(k_label, batch["label"].shape) < p_uncond
            args = (jnp.where(drop, num_classes, batch["label"]),)
        net = lambda x, t, *a: apply(params, x, t, *a, rngs={"dropout": k_drop})  # noqa: E731
        loss, _ = losses.diffusion_loss(net, batch["x"], k_loss, process=process,
                                        prediction=prediction, args=args, **loss_options)
        return loss, {}

    return objective


RECONSTRUCTIONS = ("l1", "l2")  # autoencoder_objective's pixel losses


class TrainedAutoencoder(AutoencoderKL):
    """An `AutoencoderKL` as the train state holds it: called as the diffusion networks are,
    `(x, t, y, train=...)` (`jaxdiff.train.init_state` initialises every model so; t and y are
    ignored), it returns the reconstruction from the posterior's mode. Its parameter tree is the
    AutoencoderKL's own, so the run's params load into a plain `AutoencoderKL` (and export to
    diffusers) unchanged."""

    def __call__(self, x, t=None, y=None, train=False):
        del t, y, train
        return super().__call__(x)


def autoencoder_objective(model, *, reconstruction="l1", kl_weight=1e-6):
    """The KL-regularised autoencoder loss of latent diffusion (Rombach et al. 2022, App. G,
    without its perceptual and adversarial terms) on an `AutoencoderKL` `model`, as an objective
    for `make_train_step`; batch = {"x"} images (labels unused).

    The posterior is sampled with the step's key; loss = mean pixel error (|x - x_rec| for "l1",
    its square for "l2") + kl_weight * KL(posterior || N(0, I)) / pixels per image. That is
    LDM's per-image sums (reconstruction summed over pixels, KL over latent values; its
    kl_weight 1e-6) divided by the pixel count, so `kl_weight` means what it means there and
    the loss's size does not grow with the resolution. aux: rec (the reconstruction term), mse,
    kl (per image, summed over latent values), latent_std (the posterior's mean std)."""
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction={reconstruction!r} is unknown; allowed: "
                         f"{', '.join(RECONSTRUCTIONS)}")

    def run(m, x, key):
        posterior = m.encode(x)
        return m.decode(posterior.sample(key)), posterior.kl(), jnp.mean(posterior.std)

    def objective(params, batch, key, frozen=None):
        x = batch["x"]
        x_rec, kl, latent_std = model.apply({"params": params}, x, key, method=run)
        err = x_rec.astype(jnp.float32) - x
        rec = jnp.mean(jnp.abs(err) if reconstruction == "l1" else jnp.square(err))
        kl = jnp.mean(kl)
        pixels = x[0].size
        loss = rec + kl_weight * kl / pixels
        return loss, {"rec": rec, "mse": jnp.mean(jnp.square(err)), "kl": kl,
                      "latent_std": latent_std}

    return objective


def _ema(ema, params, decay):
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)
