"""Two-dimensional toy data sets for instant demos: ``moons``, ``swiss_roll``, ``gmm``.

Each generator is ``fn(n, seed) -> (x, label)`` with ``x`` float32 ``(n, 2)`` and ``label``
int32 ``(n,)``, deterministic in ``seed``. Points are standardised with fixed constants (not
per-sample statistics), so every seed and size shares one scaling and the per-axis variance is
close to 1:

* ``moons``: scikit-learn's two half-circles, noise 0.05; label = which moon (0/1).
* ``swiss_roll``: scikit-learn's swiss roll projected on its (x, z) plane, noise 0.25;
  label 0.
* ``gmm``: eight isotropic Gaussians (std 0.1) evenly spaced on a ring of radius
  ``sqrt(2 (1 - 0.1²))``, equal weights; label = mode index 0..7.

As pipeline sources (``source(name, split)``) each split is a fixed draw: ``train`` has
10 000 points (generation seed 0), ``test`` 2 000 points (generation seed 1).
"""

from __future__ import annotations

import numpy as np

GMM_MODES = 8
GMM_STD = 0.1
GMM_RADIUS = float(np.sqrt(2.0 * (1.0 - GMM_STD**2)))
SPLITS = {"train": (10_000, 0), "test": (2_000, 1)}  # split -> (size, generation seed)


def moons(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half-circles, standardised per axis; label = moon index."""
    from sklearn.datasets import make_moons

    x, y = make_moons(n, noise=0.05, random_state=seed)
    x = (x - np.array([0.5, 0.25])) / np.array([0.867, 0.497])
    return x.astype(np.float32), y.astype(np.int32)


def swiss_roll(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D swiss roll (x, z coordinates of scikit-learn's), standardised per axis; label 0."""
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n, noise=0.25, random_state=seed)
    x = (x[:, [0, 2]] - np.array([2.01, 0.2])) / np.array([6.64, 6.95])
    return x.astype(np.float32), np.zeros(n, np.int32)


def gmm_means() -> np.ndarray:
    """The eight mode centres, ``(8, 2)``, on a ring (mode k at angle 2πk/8)."""
    angles = 2 * np.pi * np.arange(GMM_MODES) / GMM_MODES
    return GMM_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def gmm(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Equal-weight 8-mode ring mixture with unit variance per axis; label = mode index."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, GMM_MODES, size=n)
    x = gmm_means()[labels] + GMM_STD * rng.standard_normal((n, 2))
    return x.astype(np.float32), labels.astype(np.int32)


GENERATORS = {"moons": moons, "swiss_roll": swiss_roll, "gmm": gmm}
NUM_CLASSES = {"moons": 2, "swiss_roll": 1, "gmm": GMM_MODES}


class ArraySource:
    """Random-access source over in-memory arrays; item ``i`` is ``{"x": (2,), "label": ()}``."""

    def __init__(self, x: np.ndarray, label: np.ndarray):
        self.x, self.label = x, label

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"x": self.x[index], "label": self.label[index]}


def source(name: str, split: str) -> ArraySource:
    """The fixed ``train``/``test`` draw of toy set ``name`` as a random-access source."""
    if split not in SPLITS:
        raise ValueError(f"Bad split {split!r} for toy set {name!r}; available: {list(SPLITS)}")
    n, seed = SPLITS[split]
    return ArraySource(*GENERATORS[name](n, seed))
