"""FID InceptionV3 against torch-fidelity's pure-PyTorch FID InceptionV3, same random weights.

torch-fidelity's package __init__ imports torchvision, which does not import with the CPU torch
build here, so its two needed modules are loaded from their files with the package stubbed.
"""

import importlib.util
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.eval import inception as inc

torch = pytest.importorskip("torch")


def _load_tf_module(name):
    """Load torch_fidelity/<name>.py without running torch_fidelity/__init__.py."""
    if "torch_fidelity" in sys.modules:  # the stub below, or the real package
        root = pathlib.Path(sys.modules["torch_fidelity"].__path__[0])
    else:
        spec = importlib.util.find_spec("torch_fidelity")  # locating does not run __init__
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("torch_fidelity is not installed")
        root = pathlib.Path(list(spec.submodule_search_locations)[0])
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = [str(root)]  # submodules import from here; __init__ never runs
        sys.modules["torch_fidelity"] = pkg
    full = f"torch_fidelity.{name}"
    if full not in sys.modules:
        mspec = importlib.util.spec_from_file_location(full, root / f"{name}.py")
        module = importlib.util.module_from_spec(mspec)
        sys.modules[full] = module
        mspec.loader.exec_module(module)
    return sys.modules[full]


@pytest.fixture(scope="module")
def tf_inception():
    return _load_tf_module("feature_extractor_inceptionv3")


def _calibrated_random_model(tf_inception, images_u8):
    """torch-fidelity's FID InceptionV3 with random weights whose activations stay O(1).

    Default init shrinks activations layer by layer, so the batch-norm running statistics are
    set to the batch statistics of one forward pass in train mode, and scale/bias are random,
    making every BN entry matter for the comparison.
    """
    class RandomInception(tf_inception.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):
            if state_dict is not None:  # None: the stubbed download; keep the random init
                return super().load_state_dict(state_dict, strict)

    tf_inception.load_state_dict_from_url = lambda *a, **k: None
    torch.manual_seed(0)
    model = RandomInception("inception-v3-compat", ["2048", "logits_unbiased", "logits"])
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, exactly its statistics
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    model.train()
    with torch.no_grad():
        model(images_u8)
    return model.eval()


@pytest.fixture(scope="module")
def reference(tf_inception, tmp_path_factory):
    """(images NHWC uint8, torch float64 outputs, path of the saved float32 .pth state_dict).

    The reference runs in float64 (torch-fidelity's internal_dtype option): in float32 torch
    itself is 3e-4 away from it on this net, more than the difference under test.
    """
    rng = np.random.default_rng(0)
    calib = rng.integers(0, 256, size=(2, 3, 37, 37), dtype=np.uint8)
    model = _calibrated_random_model(tf_inception, torch.from_numpy(calib))
    path = tmp_path_factory.mktemp("fid") / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)  # float32, like the real file
    model.feature_extractor_internal_dtype = torch.float64
    model.double()
    images = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)  # CIFAR-sized
    with torch.no_grad():
        pool3, unbiased, logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    out = {"pool3": pool3, "logits_unbiased": unbiased, "logits": logits}
    return images, {k: v.numpy() for k, v in out.items()}, path


def test_tf1_resize_matches_torch_fidelity():
    interp = _load_tf_module("interpolate_compat_tensorflow")
    x = np.random.default_rng(1).uniform(0, 255, size=(2, 3, 13, 32)).astype(np.float32)
    for size in ((299, 299), (8, 20)):  # up- and down-sampling, non-square
        want = interp.interpolate_bilinear_2d_like_tensorflow1x(
            torch.from_numpy(x), size=size, align_corners=False).numpy()
        got = np.asarray(inc.resize_bilinear_tf1(x.transpose(0, 2, 3, 1), size))
        np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, rtol=0, atol=1e-4)


def test_pth_state_dict_keys_are_the_models(reference):
    state_dict = torch.load(reference[2], weights_only=True)
    weights = [k for k in state_dict if not k.endswith("num_batches_tracked")]
    assert len(weights) == len(inc.param_shapes()) == 4 * 94 + 94 + 2  # 94 conv+bn, fc
    params = inc.load_fid_weights(reference[2])
    w = state_dict["Mixed_6b.branch7x7_2.conv.weight"].numpy()  # (out, in, 1, 7)
    np.testing.assert_array_equal(params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
                                  w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                  state_dict["Mixed_7c.branch_pool.bn.running_var"].numpy())
    np.testing.assert_array_equal(params["fc"]["kernel"], state_dict["fc.weight"].numpy().T)


def test_float64_forward_is_torch_fidelitys_network(reference):
    images, want, path = reference
    params = inc.load_fid_weights(path)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        forward = jax.jit(lambda p, x: inc.FIDInceptionV3().apply(
            {"params": p}, inc.preprocess(x, jnp.float64)))
        got = {k: np.asarray(v) for k, v in forward(p64, images).items()}
    assert got["pool3"].dtype == np.float64
    for key in ("pool3", "logits_unbiased", "logits"):
        # torch-fidelity returns its float64 result rounded to float32 (relative 6e-8)
        np.testing.assert_allclose(got[key], want[key], rtol=2e-7, atol=1e-7)


def test_float32_features_match_torch_fidelity(reference):
    images, want, path = reference
    params = inc.load_fid_weights(path)
    # 3 images in batches of 2: the last batch is padded, and one compiled shape serves both
    got = inc.inception_outputs(params, np.concatenate([images, images[:1]]), batch_size=2)
    assert got["pool3"].shape == (3, 2048) and got["logits"].shape == (3, 1008)
    assert np.abs(want["pool3"]).mean() > 0.05  # the calibrated net is not near zero
    for key in ("pool3", "logits_unbiased", "logits"):
        scale = np.abs(want[key]).max()
        np.testing.assert_allclose(got[key][:2], want[key], rtol=0, atol=1e-4 * max(scale, 1.0))
        np.testing.assert_array_equal(got[key][2], got[key][0])
    np.testing.assert_array_equal(inc.fid_features(params, images), got["pool3"][:2])


def test_grayscale_is_repeated_to_rgb():
    gray = np.random.default_rng(2).uniform(0, 255, size=(1, 5, 7, 1))
    np.testing.assert_array_equal(np.asarray(inc.preprocess(gray)),
                                  np.asarray(inc.preprocess(np.repeat(gray, 3, axis=-1))))


def test_npz_round_trip(reference, tmp_path):
    params = inc.load_fid_weights(reference[2])
    npz = tmp_path / "fid.npz"
    inc.convert_pth_to_npz(reference[2], npz)
    again = inc.load_fid_weights(npz)
    leaves_a = jax.tree_util.tree_leaves_with_path(params)
    leaves_b = dict(jax.tree_util.tree_leaves_with_path(again))
    assert len(leaves_a) == len(leaves_b) == len(inc.param_shapes())
    for path, value in leaves_a:
        np.testing.assert_array_equal(np.asarray(value), np.asarray(leaves_b[path]))


def test_bad_weights_and_images(reference, tmp_path):
    state_dict = dict(np.load(_npz(reference[2], tmp_path)))
    extra = dict(state_dict, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    with pytest.raises(ValueError, match="'AuxLogits.fc.weight' is not a FID InceptionV3"):
        inc.params_from_torch_state_dict(extra)
    missing = {k: v for k, v in state_dict.items() if not k.startswith("Mixed_7c.")}
    with pytest.raises(ValueError, match="lacks 45 FID InceptionV3 entries"):
        inc.params_from_torch_state_dict(missing)
    wrong = dict(state_dict, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(ValueError, match="'fc.weight' has shape"):
        inc.params_from_torch_state_dict(wrong)
    with pytest.raises(ValueError, match="must end in .pth, .pt or .npz"):
        inc.load_fid_weights(tmp_path / "weights.bin")
    params = inc.params_from_torch_state_dict(state_dict)
    for images, match in [(np.zeros((2, 8, 8, 4)), "1 or 3 channels"),
                          (np.zeros((8, 8, 3)), "NHWC"),
                          (np.full((1, 8, 8, 3), -1.0), r"\[0, 255\].*got range \[-1.0"),
                          (np.full((1, 8, 8, 3), np.nan), "got range")]:
        with pytest.raises(ValueError, match=match):
            inc.fid_features(params, images)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        inc.fid_features(params, np.zeros((1, 8, 8, 3)), batch_size=0)


def _npz(pth, tmp_path):
    out = tmp_path / "w.npz"
    inc.convert_pth_to_npz(pth, out)
    return out
