"""Where stochastic samplers get their Gaussian noise: the `noise_sampler` option.

Every stochastic sampler draws the noise of a move from level sigma down to sigma' through
`draw = noise_fn(noise_sampler, key, sigmas, num_steps)`, `z = draw(i, sigma, sigma', like, j)`
(`j` numbers the draws within step i, 0 first). `noise_sampler` is

- "normal" (the default): z = normal(fold_in(key, i)) for the first draw of step i and
  normal(fold_in(fold_in(key, i), j)) for the j-th after it: independent standard normal draws,
  the same whatever the grid's padding or the compilation (`base.step_key`);
- "brownian": z = (W(sigma') - W(sigma)) / sqrt(sigma - sigma') for one Brownian path W over
  the noise level, fixed by `key` and the grid's first level (k-diffusion's
  `BrownianTreeNoiseSampler` semantics, whose path runs over sigma as here). The noise of a step
  is then a function of its interval only, so the same path drives a run of 10 steps and one of
  1000, and an SDE sampler's output converges to the SDE's pathwise solution as the steps grow
  (with "normal", each step count draws new noise: samples differ by O(1) whatever the steps);
- a function `(key, sigmas, num_steps) -> draw` with `draw` as above, for other noise.

The Brownian path is a Brownian tree (Gaines & Lyons 1997; torchsde's BrownianTree): W(0) = 0,
W(T) ~ N(0, T) with T = sigmas[0], and W at the midpoint of a node [a, b] is the Brownian
bridge's draw (W(a) + W(b))/2 + sqrt((b - a)/4) z_node, z_node from a PRNG key that depends on
the node only (`fold_in` along the path from the root). W(t) walks `DEPTH` bisections down to
t's leaf (width T / 2^DEPTH) and interpolates linearly in it, so W is one deterministic
function of (key, T, t): increments add exactly, W(a, c) = W(a, b) + W(b, c), up to rounding,
and Var(W(b) - W(a)) = b - a for any a < b down to the leaf width. Cost: DEPTH normal draws of
x's shape per evaluation of W, two (in one vmapped walk) per move (k-diffusion's torchsde tree
caches; this one recomputes, which keeps it a pure function under jit and vmap).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.samplers.base import step_key

DEPTH = 32  # leaf width T / 2^32: 2e-8 for EDM's sigma_max = 80
NOISES = ("normal", "brownian")


def normal(key, sigmas, num_steps):
    """Independent draws: normal(fold_in(key, i)) at step i (then fold_in(., j) for j >= 1)."""

    def draw(i, s, s_next, like, j=0):
        k = step_key(key, i)
        if j:
            k = jax.random.fold_in(k, j)
        return jax.random.normal(k, like.shape, like.dtype)

    return draw


def brownian_path(key, t, t_max, shape, dtype=jnp.float32, depth=DEPTH):
    """W(t) of the Brownian path on [0, t_max] that `key` fixes (module docstring); t is clipped
    to [0, t_max]. Every element of the `shape` array is an independent path."""
    t_max = jnp.asarray(t_max)
    t = jnp.clip(jnp.asarray(t, t_max.dtype), 0.0, t_max)
    w_top = jnp.sqrt(t_max).astype(dtype) * jax.random.normal(  # node keys fold in 0, 1, 2
        jax.random.fold_in(key, 3), shape, dtype)

    def bisect(_, node):
        k, a, b, wa, wb = node
        m = 0.5 * (a + b)
        z = jax.random.normal(jax.random.fold_in(k, 2), shape, dtype)
        wm = 0.5 * (wa + wb) + (0.5 * jnp.sqrt(b - a)).astype(dtype) * z
        right = t >= m
        return (jax.random.fold_in(k, right.astype(jnp.uint32)), jnp.where(right, m, a),
                jnp.where(right, b, m), jnp.where(right, wm, wa), jnp.where(right, wb, wm))

    zero = jnp.zeros((), t_max.dtype)
    _, a, b, wa, wb = jax.lax.fori_loop(
        0, depth, bisect, (key, zero, t_max, jnp.zeros(shape, dtype), w_top))
    # in float32 the deepest nodes near t_max can collapse (a == b): take W(a) there
    frac = jnp.where(b > a, (t - a) / jnp.where(b > a, b - a, 1.0), 0.0)
    return wa + frac.astype(dtype) * (wb - wa)


def brownian(key, sigmas, num_steps):
    """Brownian-tree noise over the noise level (module docstring); the path spans
    [0, sigmas[0]], so it is the same for every grid that starts at the same level."""
    t_max = sigmas[0]

    def draw(i, s, s_next, like, j=0):
        ends = jnp.stack([jnp.maximum(s_next, 0.0), s]).astype(t_max.dtype)
        w = jax.vmap(lambda t: brownian_path(key, t, t_max, like.shape, like.dtype))(ends)
        dt = s - s_next
        scale = jnp.where(dt > 0, jax.lax.rsqrt(jnp.where(dt > 0, dt, 1.0)), 0.0)
        return (w[0] - w[1]) * scale.astype(like.dtype)

    return draw


def check_noise_sampler(noise_sampler):
    """Refuses an unknown `noise_sampler` (a name in NOISES or a function)."""
    if not callable(noise_sampler) and noise_sampler not in NOISES:
        raise ValueError(
            f"noise_sampler={noise_sampler!r} is unknown; allowed: 'normal', 'brownian', or a "
            "function (key, sigmas, num_steps) -> draw(i, sigma, sigma_next, like, j)"
        )


def noise_fn(noise_sampler, key, sigmas, num_steps):
    """The `draw(i, sigma, sigma_next, like, j=0)` function of `noise_sampler` (module
    docstring)."""
    check_noise_sampler(noise_sampler)
    if callable(noise_sampler):
        return noise_sampler(key, sigmas, num_steps)
    return {"normal": normal, "brownian": brownian}[noise_sampler](key, sigmas, num_steps)
