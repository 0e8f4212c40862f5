"""Deterministic, checkpointable grain input pipelines.

``build(name, split, batch_size=...)`` returns a grain ``DatasetIterator`` yielding
``{"x": float32 (B, H, W, C) in [-1, 1], "label": int32 (B,)}`` (``x`` is ``(B, 2)`` for the
2-D toy sets). ``it.get_state()`` is a small JSON-serialisable dict and ``it.set_state(state)``
resumes the exact stream, so the iterator state goes into the training checkpoint.

Sources:

* built-ins (``BUILTINS``): ``digits`` / ``digits16`` (scikit-learn digits as the TFDS dataset
  ``jaxdiff_digits``, prepared on first use, see ``digits.py``) and the 2-D toy sets ``moons``,
  ``swiss_roll``, ``gmm`` (``toy2d.py``);
* token datasets (``TOKENS``, ``jaxdiff.data.tokens``): ``digits_tokens`` (the digits as 64
  grey-level tokens, vocabulary 17, same split as ``digits``) and ``shakespeare_chars``
  (character windows of Shakespeare's plays, splits ``train``/``validation``, ``test`` an alias
  of ``validation``); their batches are ``{"x": int32 (B, L), "label": int32 (B,)}`` and
  ``info`` adds ``vocab_size`` and ``tokens=True``. No image mapping and no flip apply;
* any other name is a TFDS image dataset read with ``as_data_source`` from ``array_record``
  files (cifar10, mnist, celeb_a, imagenet2012, ...). It must already be prepared; TensorFlow is
  not needed to read it.

The pipeline is a ``grain.MapDataset`` graph, so every element is a pure function of
``(seed, position)``::

    source -> image prep -> shuffle(seed) -> random flip(seed) -> batch -> shard -> [-1, 1]
           -> repeat(num_epochs) -> to_iter_dataset (thread prefetch)

* Shuffling is a global permutation of the split, different in every epoch (grain derives the
  epoch's permutation from ``seed + epoch``).
* Sharding takes every ``process_count``-th batch of the shuffled stream, starting at
  ``process_index``: the k-th batches of processes 0..P-1, side by side, are exactly the k-th
  global batch that one process with ``P * batch_size`` would read, so a run gives the same
  results on any number of processes. All processes use the same seed: within an epoch their
  shards are disjoint and equally long (hence the same number of steps). ``batch_size`` is per
  process.
* Batches never straddle epochs; the last partial batch of each epoch is dropped.
* Random horizontal flip is off by default and must stay off for digits (a mirrored digit is
  not a digit); it is seeded by ``(seed, position in the shuffled stream)``.
* Images: uint8 ``(H, W, C)`` (grayscale gets ``C = 1``), mapped by ``x / 127.5 - 1``. With
  ``image_size`` they are center-cropped and resized as in ADM (``guided_diffusion``): halve with
  PIL's BOX filter while the short side is at least twice the target, resize the short side to
  ``image_size`` with BICUBIC, then center-crop. Datasets whose images vary in size
  (imagenet2012, ...) need ``image_size``. Examples without a ``label`` feature get label 0.
"""

from __future__ import annotations

import functools
import os

import grain
import numpy as np
import tensorflow_datasets as tfds

from jaxdiff.data import digits, toy2d

DIGITS = ("digits", "digits16")
# Token datasets, served by jaxdiff.data.tokens (imported on use: no jax for the image datasets).
TOKENS = ("digits_tokens", "shakespeare_chars")
BUILTINS = DIGITS + tuple(toy2d.GENERATORS) + TOKENS


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset is not present in ``array_record`` format in the data directory."""


def _env_data_dir(data_dir):
    """``data_dir``, else ``$JAXDIFF_DATA_DIR``, else None (TFDS's own default lookup)."""
    return data_dir or os.environ.get("JAXDIFF_DATA_DIR") or None


def _tfds_builder(name: str, data_dir):
    """``tfds.builder``; an unknown name becomes a ValueError naming the built-ins."""
    try:
        return tfds.builder(name, data_dir=_env_data_dir(data_dir))
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset {name!r}: built-ins are {list(BUILTINS)}; any other name is looked "
            "up in the TFDS catalog (tfds.builder) and was not found there."
        ) from None


def _not_prepared(name: str, builder) -> DatasetNotPreparedError:
    """The one-line error telling how to prepare ``name`` for random access."""
    root = builder.data_dir_root
    return DatasetNotPreparedError(
        f"TFDS dataset {name!r} is not prepared in array_record format under data_dir={root}; "
        f"prepare it once (TensorFlow needed for most datasets) with `tfds build {name} "
        f"--file_format=array_record --data_dir={root}` or `tfds.builder({name!r}, "
        f"data_dir={str(root)!r}).download_and_prepare(file_format='array_record')`."
    )


def _tfds_source(name: str, split: str, data_dir):
    """Random-access source of an already prepared TFDS dataset."""
    builder = _tfds_builder(name, data_dir)
    try:
        return builder.as_data_source(split=split)
    except (NotImplementedError, ValueError, KeyError, FileNotFoundError) as e:
        if isinstance(e, NotImplementedError) or not builder.is_prepared():
            raise _not_prepared(name, builder) from None
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(
            f"Bad split {split!r} for {name!r}; available: {sorted(builder.info.splits)}"
        ) from e


def _source(name: str, split: str, data_dir):
    """The random-access source behind ``name``."""
    if name in toy2d.GENERATORS:
        return toy2d.source(name, split)
    if name in DIGITS:
        return digits.load_source(name, split, data_dir)
    if name in TOKENS:
        from jaxdiff.data import tokens as token_data

        return toy2d.ArraySource(*token_data.dataset_arrays(name, split))
    return _tfds_source(name, split, data_dir)


def info(name: str, data_dir=None, *, image_size: int | None = None) -> dict:
    """``dict(shape=..., num_classes=K)`` of one example, from builder metadata (no data read).

    ``shape`` is ``(H, W, C)`` for images (``(image_size, image_size, C)`` when given; ``None``
    for dimensions that vary) and ``(2,)`` for toy sets. Labels lie in ``[0, K)``; ``K = 1``
    means the dataset is unlabelled (label always 0). Token datasets: ``shape=(L,)``, also
    ``vocab_size`` and ``tokens=True`` (text is unlabelled: ``num_classes=1``).
    """
    if name in TOKENS:
        from jaxdiff.data import tokens as token_data

        return token_data.dataset_info(name)
    if name in toy2d.GENERATORS:
        return dict(shape=(2,), num_classes=toy2d.NUM_CLASSES[name])
    if name in DIGITS:
        builder = digits.JaxdiffDigits(config=name, data_dir=digits.data_dir_root(data_dir))
    else:
        builder = _tfds_builder(name, data_dir)
    features = builder.info.features
    if "image" not in features:
        raise ValueError(f"TFDS dataset {name!r} has no 'image' feature: {list(features)}")
    shape = tuple(features["image"].shape)
    shape = shape + (1,) if len(shape) == 2 else shape
    if image_size is not None:
        shape = (image_size, image_size, shape[-1])
    label = features["label"] if "label" in features else None
    return dict(shape=shape, num_classes=int(getattr(label, "num_classes", None) or 1))


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """ADM's center crop: BOX-halve, BICUBIC-resize the short side to ``size``, crop the middle."""
    from PIL import Image

    gray = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if gray else image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(s * scale) for s in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    arr = arr[top : top + size, left : left + size]
    return arr[..., None] if gray else arr


def _prepare_image(example: dict, image_size: int | None) -> dict:
    """Keeps ``image`` (uint8, (H, W, C)) and ``label``; optional crop/resize."""
    image = np.asarray(example["image"])
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image_size is not None and image.shape[:2] != (image_size, image_size):
        image = center_crop_resize(image, image_size)
    return {"image": image, "label": np.int32(example.get("label", 0))}


def _random_flip(example: dict, rng: np.random.Generator) -> dict:
    """Mirrors the image left-right with probability 1/2."""
    if rng.random() < 0.5:
        example = {**example, "image": np.ascontiguousarray(example["image"][:, ::-1])}
    return example


def _to_model_inputs(batch: dict) -> dict:
    """uint8 images -> float32 in [-1, 1]; tokens int32; toy points float32; labels int32."""
    if "image" in batch:
        x = batch["image"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    elif np.issubdtype(batch["x"].dtype, np.integer):
        x = batch["x"].astype(np.int32)
    else:
        x = batch["x"].astype(np.float32)
    return {"x": x, "label": batch["label"].astype(np.int32)}


def _shard(ds: grain.MapDataset, batch_size: int, index: int, count: int) -> grain.MapDataset:
    """Batches, then the equal-length strided shard ``index`` of ``count`` of those batches."""
    if len(ds) < batch_size * count:
        raise ValueError(f"{len(ds)} examples do not fill one batch of {batch_size} on each of "
                         f"{count} processes")
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds if count == 1 else ds[: len(ds) // count * count][index::count]


def _check_args(name, batch_size, seed, num_epochs, process_index, process_count, flip, size):
    """Validates ``build``'s arguments."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}")
    if name in toy2d.GENERATORS and (flip or size is not None):
        raise ValueError(f"random_flip and image_size do not apply to toy set {name!r}")
    if name in TOKENS and size is not None:
        raise ValueError(f"image_size={size} does not apply to token dataset {name!r}; "
                         "allowed: None")
    check_random_flip(name, flip)


def check_random_flip(name, random_flip):
    """Refuses ``random_flip=True`` for the digits datasets (a mirrored digit is not a digit)
    and for token datasets (sequences, not images)."""
    if random_flip and name in DIGITS:
        raise ValueError(f"random_flip=True mirrors {name!r} (a mirrored digit is not a digit); "
                         "allowed: False")
    if random_flip and name in TOKENS:
        raise ValueError(f"random_flip=True does not apply to token dataset {name!r}; "
                         "allowed: False")


def build(
    name: str,
    split: str,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    random_flip: bool = False,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    data_dir=None,
    image_size: int | None = None,
    num_threads: int = 4,
    prefetch: int = 8,
) -> grain.DatasetIterator:
    """Per-process iterator of ``{"x", "label"}`` batches of ``batch_size`` (see module doc).

    ``num_epochs=None`` repeats forever. ``num_threads``/``prefetch`` set grain's thread
    prefetch (batches in flight); they do not change the stream.
    """
    _check_args(
        name, batch_size, seed, num_epochs, process_index, process_count, random_flip, image_size
    )
    meta = info(name, data_dir, image_size=image_size)
    if None in meta["shape"]:
        raise ValueError(f"images of {name!r} vary in size {meta['shape']}; pass image_size")
    ds = grain.MapDataset.source(_source(name, split, data_dir))
    if name not in toy2d.GENERATORS and name not in TOKENS:
        ds = ds.map(functools.partial(_prepare_image, image_size=image_size))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if random_flip:
        ds = ds.random_map(_random_flip, seed=seed)
    ds = _shard(ds, batch_size, process_index, process_count)
    ds = ds.map(_to_model_inputs).repeat(num_epochs)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))
