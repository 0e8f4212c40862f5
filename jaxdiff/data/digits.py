"""scikit-learn's bundled 8×8 digits as a TFDS dataset (``jaxdiff_digits``).

The 1797 images ship inside the scikit-learn wheel (``sklearn.datasets.load_digits``), so this
dataset needs no download and no TensorFlow. It is written as a regular TFDS builder in
``array_record`` format, so the training pipeline reads it through ``as_data_source`` exactly as
it reads cifar10 or imagenet2012.

Builder configs:

* ``jaxdiff_digits/digits``: native 8×8×1.
* ``jaxdiff_digits/digits16``: 16×16×1, upsampled with PIL's bilinear filter (bilinear rather
  than bicubic so that no ringing overshoot is clipped at 0 and 255).

Pixels: the original 0..16 intensities become ``round(v * 255 / 16)`` in uint8. Labels 0..9.

Splits: a fixed permutation of all 1797 images (``numpy.random.default_rng(0)``); the first
200 form ``test``, the remaining 1597 form ``train``. The split does not depend on any
pipeline seed.

Preparation happens on first use (``load_source``) under an exclusive ``fcntl`` lock on
``<data_dir>/jaxdiff_digits.lock``, so racing processes prepare once and the rest wait. TFDS
writes into an ``*.incomplete*`` directory and renames it into place only when complete, so a
killed preparation never looks prepared; leftover incomplete directories are removed under the
lock before the next attempt.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

NAME = "jaxdiff_digits"
NUM_TEST = 200
_SPLIT_SEED = 0


def data_dir_root(data_dir: str | os.PathLike | None = None) -> str:
    """The data directory: ``data_dir``, else ``$JAXDIFF_DATA_DIR``, else TFDS's default.

    TFDS's default is ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
    """
    if data_dir is None:
        data_dir = os.environ.get("JAXDIFF_DATA_DIR") or tfds.core.constants.DATA_DIR
    return os.path.expanduser(os.fspath(data_dir))


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
    """Builder config carrying the output side length (8 = native)."""

    size: int = 8


def _digits_arrays(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 ``(N, size, size, 1)`` images and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    if size != 8:
        from PIL import Image

        images = np.stack(
            [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images]
        )
    return images[..., None], bunch.target.astype(np.int64)


def split_indices() -> dict[str, np.ndarray]:
    """The fixed train/test split: indices into ``load_digits()`` (1597 train, 200 test)."""
    perm = np.random.default_rng(_SPLIT_SEED).permutation(1797)
    return {"train": np.sort(perm[NUM_TEST:]), "test": np.sort(perm[:NUM_TEST])}


class JaxdiffDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn 8×8 handwritten digits (UCI optdigits test set), 10 classes."""

    # No checksums file (nothing is downloaded). Setting this also skips TFDS's code-path lookup,
    # which needs the optional `importlib_resources` package for builders defined in a package.
    code_path = None
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 1597 train / 200 test, 8×8 and 16×16."}
    BUILDER_CONFIGS = [
        DigitsConfig(name="digits", description="Native 8×8×1.", size=8),
        DigitsConfig(name="digits16", description="16×16×1, bilinear upsampling.", size=16),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: uint8 image (S, S, 1) and a 10-way class label."""
        size = self.builder_config.size
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n")[0],
            features=features,
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        """The fixed seeded train/test split (no download)."""
        del dl_manager
        images, labels = _digits_arrays(self.builder_config.size)
        return {
            split: self._generate_examples(images[idx], labels[idx], idx)
            for split, idx in split_indices().items()
        }

    def _generate_examples(self, images, labels, indices):
        """Yields ``(sklearn index, example)`` pairs."""
        for image, label, index in zip(images, labels, indices):
            yield int(index), {"image": image, "label": int(label)}


def _remove_incomplete(root: Path) -> None:
    """Deletes ``*incomplete*`` directories left by a killed preparation (caller holds lock)."""
    for path in root.glob(f"{NAME}/*/*incomplete*"):
        shutil.rmtree(path, ignore_errors=True)


def prepared_builder(config: str = "digits", data_dir=None) -> JaxdiffDigits:
    """Returns the builder for ``config``, preparing it into ``data_dir`` if needed."""
    root = Path(data_dir_root(data_dir))
    builder = JaxdiffDigits(config=config, data_dir=root, file_format="array_record")
    if builder.is_prepared():
        return builder
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        builder = JaxdiffDigits(config=config, data_dir=root, file_format="array_record")
        if not builder.is_prepared():
            _remove_incomplete(root)
            builder.download_and_prepare(file_format="array_record")
    return JaxdiffDigits(config=config, data_dir=root, file_format="array_record")


def load_source(config: str, split: str, data_dir=None):
    """Random-access data source of ``split`` (``train``/``test`` or a TFDS split string)."""
    builder = prepared_builder(config, data_dir)
    try:
        return builder.as_data_source(split=split)
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"Bad split {split!r} for {NAME}/{config}; available: {sorted(builder.info.splits)}"
        ) from e
