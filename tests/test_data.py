"""Input pipelines: digits builder, TFDS (mocked cifar10), resumable state, sharding, toy sets."""

import ast
import contextlib
import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdiff import data
from jaxdiff.data import digits, pipeline, toy2d


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """A data dir holding both digits configs, prepared once for the module."""
    root = tmp_path_factory.mktemp("tfds")
    for config in ("digits", "digits16"):
        digits.prepared_builder(config, root)
    return root


@pytest.fixture
def mock_tfds():
    """TFDS datasets replaced by random examples generated from their feature specs."""
    def mock(num_examples):
        return tfds.testing.mock_data(
            num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE
        )

    return mock


def take(it, n):
    """The next ``n`` batches of ``it``."""
    return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
    """Bit-identical batch lists."""
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["label"], b["label"])


def hashes(batches):
    """Content hash of every example (pixels + label)."""
    return [
        hashlib.sha1(x.tobytes() + label.tobytes()).hexdigest()
        for b in batches
        for x, label in zip(b["x"], b["label"])
    ]


@pytest.mark.parametrize("name,size", [("digits", 8), ("digits16", 16)])
def test_digits(digits_dir, name, size):
    assert data.info(name, digits_dir) == dict(shape=(size, size, 1), num_classes=10)
    assert len(digits.load_source(name, "train", digits_dir)) == 1597
    test = data.build(name, "test", batch_size=200, num_epochs=1, data_dir=digits_dir)
    (batch,) = list(test)
    assert batch["x"].shape == (200, size, size, 1) and batch["x"].dtype == np.float32
    assert batch["x"].min() == -1.0 and batch["x"].max() == 1.0
    assert batch["label"].dtype == np.int32 and set(batch["label"]) == set(range(10))
    train = list(data.build(name, "train", batch_size=64, num_epochs=1, data_dir=digits_dir))
    assert len(train) == 1597 // 64
    train_hashes, test_hashes = set(hashes(train)), set(hashes([batch]))
    assert not train_hashes & test_hashes  # disjoint splits


def test_digits_reuses_prepared_data(digits_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("prepared twice")

    monkeypatch.setattr(digits.JaxdiffDigits, "download_and_prepare", fail)
    monkeypatch.setenv("JAXDIFF_DATA_DIR", str(digits_dir))
    for _ in range(2):
        batch = next(data.build("digits", "train", batch_size=8))  # data_dir from the env
        assert batch["x"].shape == (8, 8, 8, 1)


def test_digits_prepare_race_and_leftovers(tmp_path):
    junk = tmp_path / "jaxdiff_digits" / "digits" / "incomplete.KILLED_1.0.0"
    junk.mkdir(parents=True)  # what a preparation killed midway leaves behind
    (junk / "jaxdiff_digits-train.array_record-00000-of-00001").write_bytes(b"partial")
    assert not digits.JaxdiffDigits(config="digits", data_dir=tmp_path).is_prepared()
    errors = []

    def prepare():
        try:
            digits.prepared_builder("digits", tmp_path)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert not junk.exists()
    assert len(digits.load_source("digits", "test", tmp_path)) == 200


def test_cifar10_mock_and_flip(mock_tfds):
    with mock_tfds(64):
        assert data.info("cifar10") == dict(shape=(32, 32, 3), num_classes=10)
        plain = take(data.build("cifar10", "train", batch_size=16, seed=3), 4)
        flip = take(data.build("cifar10", "train", batch_size=16, seed=3, random_flip=True), 4)
        again = take(data.build("cifar10", "train", batch_size=16, seed=3, random_flip=True), 4)
    b = plain[0]
    assert b["x"].shape == (16, 32, 32, 3) and b["x"].dtype == np.float32
    assert -1.0 <= b["x"].min() and b["x"].max() <= 1.0
    assert b["label"].dtype == np.int32 and ((0 <= b["label"]) & (b["label"] < 10)).all()
    assert_same(flip, again)
    x, xf = np.concatenate([p["x"] for p in plain]), np.concatenate([f["x"] for f in flip])
    same = (x == xf).all(axis=(1, 2, 3))
    mirrored = (x[:, :, ::-1] == xf).all(axis=(1, 2, 3))
    assert (same | mirrored).all() and 10 < mirrored.sum() < 54


def test_variable_size_images_need_image_size(mock_tfds):
    with mock_tfds(8):
        batch = next(data.build("celeb_a", "train", batch_size=4, image_size=16))
        assert batch["x"].shape == (4, 16, 16, 3) and (batch["label"] == 0).all()
        with pytest.raises(ValueError, match="image_size"):
            data.build("imagenet2012", "train", batch_size=4)
    out = pipeline.center_crop_resize(np.zeros((218, 178, 1), np.uint8), 32)
    assert out.shape == (32, 32, 1)


@pytest.mark.parametrize("name", ["digits", "cifar10"])
def test_resume_from_state(digits_dir, mock_tfds, name):
    """k batches, save, m more (across an epoch boundary) == fresh pipeline + set_state."""
    kwargs = dict(batch_size=32, seed=7, data_dir=digits_dir, random_flip=name == "cifar10")
    split = "test" if name == "digits" else "train"  # 200 / 6 batches, 100 / 3 batches per epoch
    with mock_tfds(100) if name == "cifar10" else contextlib.nullcontext():
        full = take(data.build(name, split, **kwargs), 9)
        it = data.build(name, split, **kwargs)
        head = take(it, 4)
        state = json.loads(json.dumps(it.get_state()))
        tail = take(it, 5)
        resumed = data.build(name, split, **kwargs)
        resumed.set_state(state)
        assert_same(take(resumed, 5), tail)
    assert_same(head + tail, full)
    assert hashes(full[:3]) != hashes(full[3:6])  # reshuffled and reflipped


def test_sharding_disjoint_and_covering(mock_tfds):
    kwargs = dict(batch_size=8, num_epochs=2, seed=5)
    with mock_tfds(70):
        shards = [
            list(data.build("cifar10", "train", **kwargs, process_index=i, process_count=2))
            for i in range(2)
        ]
        source = tfds.data_source("cifar10", split="train", download=False)
        stacked = {k: np.stack([ex[k] for ex in source]) for k in ("image", "label")}
        everything = hashes([pipeline._to_model_inputs(stacked)])
    assert [len(s) for s in shards] == [8, 8]  # 35 examples per shard -> 4 batches per epoch
    for epoch in range(2):
        a, b = (set(hashes(s[4 * epoch : 4 * epoch + 4])) for s in shards)
        assert len(a) == len(b) == 32 and not a & b
        assert a | b <= set(everything)
    assert hashes(shards[0][:4]) != hashes(shards[0][4:])


@pytest.mark.parametrize("name", list(toy2d.GENERATORS))
def test_toy2d(name):
    x, label = toy2d.GENERATORS[name](20_000, seed=1)
    x2, label2 = toy2d.GENERATORS[name](20_000, seed=1)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(label, label2)
    assert not np.array_equal(x, toy2d.GENERATORS[name](20_000, seed=2)[0])
    assert x.shape == (20_000, 2) and x.dtype == np.float32 and label.dtype == np.int32
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.05)
    np.testing.assert_allclose(x.var(0), 1.0, atol=0.1)
    k = data.info(name)["num_classes"]
    assert set(np.unique(label)) == set(range(k))
    batch = next(data.build(name, "train", batch_size=128))
    assert batch["x"].shape == (128, 2) and batch["label"].shape == (128,)


def test_errors(tmp_path, digits_dir):
    with pytest.raises(ValueError, match="built-ins are .*digits.*TFDS"):
        data.build("no_such_dataset", "train", batch_size=8)
    with pytest.raises(data.DatasetNotPreparedError) as e:
        data.build("mnist", "train", batch_size=8, data_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "tfds build mnist --file_format=array_record" in msg
    assert str(tmp_path) in msg
    with pytest.raises(ValueError, match="Bad split 'trian'.*train"):
        data.build("digits", "trian", batch_size=8, data_dir=digits_dir)
    with pytest.raises(ValueError, match="Bad split"):
        data.build("moons", "validation", batch_size=8)
    with pytest.raises(ValueError, match="random_flip"):
        data.build("moons", "train", batch_size=8, random_flip=True)
    with pytest.raises(ValueError, match=r"^random_flip=True mirrors 'digits16' \(a mirrored "):
        data.build("digits16", "train", batch_size=8, random_flip=True, data_dir=digits_dir)
    with pytest.raises(ValueError, match="do not fill one batch of"):
        data.build("digits", "test", batch_size=256, data_dir=digits_dir)


def test_code_shape():
    """Data files: ≤ 400 lines, functions ≤ 40 lines, docstrings on modules/classes/functions."""
    for path in Path(digits.__file__).parent.glob("*.py"):
        source = path.read_text()
        assert len(source.splitlines()) <= 400, path
        tree = ast.parse(source)
        assert ast.get_docstring(tree), path
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert ast.get_docstring(node) or node.name.startswith("__"), (path, node.name)
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 40, (path, node.name)
