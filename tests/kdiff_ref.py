"""k-diffusion's samplers (k-diffusion 0.1.1.post1, `k_diffusion/sampling.py`) for parity tests.

k-diffusion's package `__init__` imports its models, training utilities and torchvision; its
`sampling` module needs only torch, scipy, torchdiffeq, torchsde and `utils.append_dims`. So the
module is loaded alone, under a stub package whose `utils` holds that one function. Tests call
`load()` (skips when k-diffusion or a dependency is missing) and `model(D)` to wrap a jax
denoiser `D(x, sigma)` as k-diffusion's `model(x, sigma_batch)`, and compare in float64.
"""

import importlib.util
import pathlib
import sys
import types

import numpy as np
import pytest

_MODULE = None


def load():
    """k-diffusion's `sampling` module (cached), or skip the test."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    pytest.importorskip("torch")
    pytest.importorskip("torchsde")
    pytest.importorskip("torchdiffeq")
    pytest.importorskip("scipy")
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (make test installs k-diffusion==0.1.1.post1)")
    root = pathlib.Path(list(spec.submodule_search_locations)[0])
    package = types.ModuleType("_kdiff_stub")
    package.__path__ = [str(root)]
    utils = types.ModuleType("_kdiff_stub.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    package.utils = utils
    sys.modules["_kdiff_stub"] = package
    sys.modules["_kdiff_stub.utils"] = utils
    sampling_spec = importlib.util.spec_from_file_location(
        "_kdiff_stub.sampling", root / "sampling.py")
    module = importlib.util.module_from_spec(sampling_spec)
    sys.modules["_kdiff_stub.sampling"] = module
    sampling_spec.loader.exec_module(module)
    _MODULE = module
    return module


def model(D, calls=None):
    """k-diffusion's `model(x, sigma)` (sigma a batch of one level) calling the jax denoiser
    `D(x, sigma)` in float64; `calls`, a list, gets the level of each call."""
    import jax.numpy as jnp
    import torch

    def fn(x, sigma):
        s = float(sigma.reshape(-1)[0])
        if calls is not None:
            calls.append(s)
        out = D(jnp.asarray(x.numpy(), jnp.float64), jnp.asarray(s, jnp.float64))
        return torch.from_numpy(np.array(out, np.float64))

    return fn


class Noises:
    """k-diffusion's `noise_sampler(sigma, sigma_next)` returning given arrays in turn (and
    recording the intervals it was asked for)."""

    def __init__(self, arrays):
        self.arrays, self.asked = list(arrays), []

    def __call__(self, sigma, sigma_next):
        import torch

        self.asked.append((float(sigma), float(sigma_next)))
        return torch.from_numpy(np.array(self.arrays[len(self.asked) - 1], np.float64))
