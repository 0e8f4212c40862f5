"""Model folders (`jaxdiff.interop.folders`): safetensors read lazily (sharded index files,
bfloat16, blocks), every key and shape checked in one line, casts that cannot hold the weights
refused, atomic export; and on a 4-device mesh (a subprocess running this file) parameters land
as sharded arrays, each device's block read from the file by itself."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxdiff.interop import folders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(rng):
    return {"down_blocks.0": {"conv": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
                                       "bias": rng.normal(size=(8,)).astype(np.float32)}},
            "proj": {"kernel": rng.normal(size=(8, 16)).astype(np.float32)},
            "norm": {"scale": rng.normal(size=(16,)).astype(np.float32)}}


def _abstract(tree, dtype=jnp.float32):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), tree)


def test_round_trip_layouts_and_names(tmp_path):
    tree = _tree(np.random.default_rng(0))
    folders.save_params(tmp_path / "m", tree, {"_class_name": "Toy"})
    t = folders.Tensors(folders.weight_files(tmp_path / "m"))
    # PyTorch names and layouts: Conv OIHW, Linear (out, in), norm scale -> weight
    assert sorted(t) == ["down_blocks.0.conv.bias", "down_blocks.0.conv.weight", "norm.weight",
                         "proj.weight"]
    assert t.shape("down_blocks.0.conv.weight") == (8, 4, 3, 3)
    assert t.shape("proj.weight") == (16, 8)
    np.testing.assert_array_equal(t.read("proj.weight"), tree["proj"]["kernel"].T)
    np.testing.assert_array_equal(t.read("proj.weight", (slice(2, 5),)),
                                  tree["proj"]["kernel"].T[2:5])
    back = folders.load_params(tmp_path / "m", _abstract(tree))
    jax.tree.map(np.testing.assert_array_equal, back, tree)
    assert folders.read_config(tmp_path / "m") == {"_class_name": "Toy"}
    assert oct(os.stat(tmp_path / "m").st_mode & 0o777) != oct(0o700)  # not mkdtemp's mode


def test_sharded_index_and_bfloat16(tmp_path):
    import torch
    from safetensors.torch import save_file

    tree = _tree(np.random.default_rng(1))
    folders.save_params(tmp_path / "one", tree, {})
    t = folders.Tensors(folders.weight_files(tmp_path / "one"))
    shards = tmp_path / "sharded"
    shards.mkdir()
    keys = sorted(t)
    weight_map = {}
    for i, part in enumerate((keys[:2], keys[2:])):  # bfloat16 in one shard, float32 in the other
        name = f"model-0000{i + 1}-of-00002.safetensors"
        tensors = {k: torch.from_numpy(t.read(k)) for k in part}
        if i == 0:
            tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
        save_file(tensors, str(shards / name))
        weight_map.update(dict.fromkeys(part, name))
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (shards / "config.json").write_text("{}")
    files = folders.weight_files(shards)
    assert [os.path.basename(f) for f in files] == ["model-00001-of-00002.safetensors",
                                                    "model-00002-of-00002.safetensors"]
    tb = folders.Tensors(files)
    assert tb.dtype(keys[0]) == np.dtype(ml_dtypes.bfloat16)
    assert tb.read(keys[0], (slice(0, 3),)).shape[0] == 3
    back = folders.load_params(shards, _abstract(tree))
    for path in [("down_blocks.0", "conv", "bias"), ("down_blocks.0", "conv", "kernel")]:
        leaf = back[path[0]][path[1]][path[2]]
        want = tree[path[0]][path[1]][path[2]].astype(ml_dtypes.bfloat16).astype(np.float32)
        assert leaf.dtype == jnp.float32 and np.array_equal(np.asarray(leaf), want)
    np.testing.assert_array_equal(back["proj"]["kernel"], tree["proj"]["kernel"])
    os.remove(files[1])
    with pytest.raises(FileNotFoundError, match="lists shard.* missing from the folder: "
                                                "model-00002-of-00002.safetensors"):
        folders.weight_files(shards)


def test_one_line_errors(tmp_path):
    tree = _tree(np.random.default_rng(2))
    folders.save_params(tmp_path / "m", tree, {})
    small = {k: v for k, v in tree.items() if k != "norm"}
    with pytest.raises(ValueError, match=r"holds 1 weight\(s\) the model does not have: "
                                         r"norm.weight \(another architecture"):
        folders.load_params(tmp_path / "m", _abstract(small))
    big = dict(tree, extra={"bias": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"lacks 1 weight\(s\) the model needs: extra.bias"):
        folders.load_params(tmp_path / "m", _abstract(big))
    wrong = dict(tree, proj={"kernel": np.zeros((8, 15), np.float32)})
    with pytest.raises(ValueError, match=r"weight 'proj.weight' has shape \(16, 8\); the model "
                                         r"needs \(15, 8\)"):
        folders.load_params(tmp_path / "m", _abstract(wrong))
    with pytest.raises(ValueError, match="dtype int32 cannot hold weights; allowed: a floating"):
        folders.load_params(tmp_path / "m", _abstract(tree), dtype=jnp.int32)
    huge = dict(tree, proj={"kernel": np.full((8, 16), 1e6, np.float32)})
    folders.save_params(tmp_path / "huge", huge, {})
    with pytest.raises(ValueError, match=r"weight 'proj.weight' holds values up to 1e\+06, beyond "
                                         "float16's largest 6.55e\\+04"):
        folders.load_params(tmp_path / "huge", _abstract(huge), dtype=jnp.float16)
    data = (tmp_path / "m" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "m" / "diffusion_pytorch_model.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="is not a readable safetensors file .*truncated or "
                                         "corrupt"):
        folders.load_params(tmp_path / "m", _abstract(tree))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        folders.read_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no diffusion_pytorch_model.safetensors or "
                                                "model.safetensors"):
        folders.weight_files(tmp_path)


def test_export_replaces_a_folder_whole_or_not_at_all(tmp_path, monkeypatch):
    tree = _tree(np.random.default_rng(3))
    folders.save_params(tmp_path / "m", tree, {"v": 1})
    before = {f: (tmp_path / "m" / f).read_bytes() for f in os.listdir(tmp_path / "m")}

    def fail(path, tensors):
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(folders, "_write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        folders.save_params(tmp_path / "m", tree, {"v": 2})
    assert {f: (tmp_path / "m" / f).read_bytes() for f in os.listdir(tmp_path / "m")} == before
    assert os.listdir(tmp_path) == ["m"]  # no temporary folder left


def test_fsdp_placement_reads_blocks(tmp_path):
    """4 devices (a subprocess): a VAE's params placed by their logical axes on an fsdp mesh;
    every split parameter's blocks read one by one, never whole."""
    from tests._cli import fast_compile

    env = fast_compile(dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                            JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["split"] >= 10 and report["whole_reads_of_split"] == 0, report
    assert report["max_block_fraction"] == 0.25 and report["equal"], report


def _fsdp_main(workdir):
    import flax.linen as nn

    from jaxdiff.interop import autoencoder_kl

    assert jax.device_count() == 4
    config = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "latent_channels": 4,
              "down_block_types": ["DownEncoderBlock2D"] * 2, "norm_num_groups": 4,
              "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1}
    model = autoencoder_kl.from_config(config)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"])
    params = jax.tree.map(lambda p: p + 0.01, params)
    folder = os.path.join(workdir, "vae")
    autoencoder_kl.export(folder, model, params)
    reads, read = [], folders.Tensors.read

    def spy(self, key, index=None):
        value = read(self, key, index)
        reads.append((key, value.size, int(np.prod(self.shape(key)))))
        return value

    folders.Tensors.read = spy
    mesh = jax.make_mesh((4,), ("fsdp",))
    _, placed = autoencoder_kl.load(folder, shardings=mesh)
    split = {folders.torch_key(p) for p, leaf in folders.flatten(placed).items()
             if not leaf.sharding.is_fully_replicated}
    whole = [k for k, n, total in reads if k in split and n == total]
    fractions = [n / total for k, n, total in reads if k in split]
    equal = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                zip(jax.tree.leaves(placed), jax.tree.leaves(params)))
    print(json.dumps({"split": len(split), "whole_reads_of_split": len(whole),
                      "max_block_fraction": max(fractions), "equal": equal}))


if __name__ == "__main__":
    _fsdp_main(sys.argv[1])
