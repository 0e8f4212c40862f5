"""Model folders as diffusers and transformers write them (`save_pretrained`): `config.json` and
weights in `*.safetensors` (one file, or shards listed by `*.safetensors.index.json`), read with
the `safetensors` package as numpy: no torch at run time.

The Flax networks of `jaxdiff.models` that mirror a PyTorch module name their submodules as its
state_dict does (a numbered child of a ModuleList joins its parent's name: `down_blocks.0`), so
a parameter's PyTorch key follows from its Flax path (`torch_key`): the modules joined by ".",
and the leaf renamed (`kernel`, `scale`, `embedding` -> `weight`), its layout transposed (Linear
(out, in) -> (in, out), Conv OIHW -> HWIO). A family's conversion module (`interop/clip.py`,
`interop/autoencoder_kl.py`, ...) only names what differs (`rename`).

`load_params` takes the abstract parameter tree of the network (`jax.eval_shape` of its init),
checks every key and shape against the folder (one-line errors naming what is missing, extra or
mis-shaped), casts to a dtype (refusing one that cannot hold the weights), and places each
parameter directly as a sharded array: every device's block is read from the file by itself
(`safe_open(...).get_slice`), so with FSDP no host holds a full copy. `save_params` is the
reverse (for `save_pretrained`-style export), written atomically: a kill leaves the old folder
or the new one, never half of it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

CONFIG = "config.json"
# a folder's weight files, by the project that writes them
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_ML_DTYPES = ("BF16", "F8_E4M3", "F8_E5M2")  # numpy lacks them: read by memory map


def read_config(folder):
    """The folder's `config.json` as a dict; one-line errors for a missing or unreadable one."""
    path = os.path.join(folder, CONFIG)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder {folder!r} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} has no {CONFIG}: not a diffusers/transformers "
                                "model folder (a pipeline's subfolders each have one)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config


def check_class(config, allowed, folder):
    """One-line error unless the folder's model class (diffusers `_class_name`, transformers
    `architectures`/`model_type`) is one of `allowed`."""
    names = [config.get("_class_name"), config.get("model_type"),
             *(config.get("architectures") or [])]
    names = [n for n in names if n]
    if not set(names) & set(allowed):
        raise ValueError(f"{folder!r} holds a {names[0] if names else 'model of unknown class'}, "
                         f"not a {' / '.join(allowed)}")


def weight_files(folder, variant=None):
    """The folder's safetensors files: `NAME[.variant].safetensors`, or the shards its
    `NAME[.variant].safetensors.index.json` lists (NAME: diffusion_pytorch_model or model)."""
    suffix = f".{variant}" if variant else ""
    for name in WEIGHT_NAMES:
        single = os.path.join(folder, f"{name}{suffix}.safetensors")
        if os.path.isfile(single):
            return [single]
        index = os.path.join(folder, f"{name}{suffix}.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise ValueError(f"{index} is not a safetensors index ({e})") from None
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise FileNotFoundError(f"{index} lists shard(s) missing from the folder: "
                                        f"{', '.join(missing)}")
            return [os.path.join(folder, s) for s in shards]
    found = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin", ".pth")))
    raise FileNotFoundError(
        f"{folder!r} has no {' or '.join(n + suffix + '.safetensors' for n in WEIGHT_NAMES)}"
        + (f" (it has {', '.join(found)}; only safetensors are read)" if found else ""))


class Tensors(Mapping):
    """The tensors of one or more safetensors files, read lazily: `shape(key)`, `dtype(key)`,
    `read(key, index)` (a numpy block: only its bytes are read). A file whose header or size
    does not match its contents raises a one-line ValueError naming it."""

    def __init__(self, files):
        self.files, self._where = list(files), {}
        for path in self.files:
            for key, entry in _header(path).items():
                if key in self._where:
                    raise ValueError(f"tensor {key!r} is in both {self._where[key][0]} and {path}")
                self._where[key] = (path, entry)

    def __getitem__(self, key):
        return self.read(key)

    def __contains__(self, key):  # Mapping's default reads the tensor
        return key in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

    def shape(self, key):
        return tuple(self._where[key][1]["shape"])

    def dtype(self, key):
        return np.dtype(_ST_DTYPES[self._where[key][1]["dtype"]])

    def read(self, key, index=None):
        """The tensor `key` (or its block `index`, a tuple of slices) as numpy: through
        safetensors' own slicing where numpy has the dtype, else (bfloat16, float8) a memory map
        of the tensor's bytes viewed as ml_dtypes."""
        path, entry = self._where[key]
        index = () if index is None else tuple(index)
        if entry["dtype"] not in _ML_DTYPES:
            with safe_open(path, framework="numpy") as f:
                part = f.get_slice(key)
                return np.asarray(part[index] if index else part[:] if entry["shape"] else
                                  f.get_tensor(key))
        start, end = entry["data_offsets"]
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=entry["base"] + start,
                         shape=(end - start,)) if end > start else np.zeros(0, np.uint8)
        return np.array(data.view(self.dtype(key)).reshape(self.shape(key))[index])


def _header(path):
    """{key: entry} of a safetensors file (safetensors checks the header and that the file
    holds every byte it promises), each entry with its data's absolute start as `base`."""
    from safetensors import SafetensorError

    try:
        with safe_open(path, framework="numpy"):
            pass
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (SafetensorError, OSError, struct.error, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a readable safetensors file ({reason}): truncated or "
                         "corrupt; write or download it again") from None
    header.pop("__metadata__", None)
    for key, entry in header.items():
        if entry.get("dtype") not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {entry.get('dtype')!r}; allowed: "
                             f"{', '.join(_ST_DTYPES)}")
        entry["base"] = 8 + n
    return header


# --- Flax paths <-> PyTorch keys ---------------------------------------------------------------

# Flax leaf -> (PyTorch leaf, axis permutation from the PyTorch layout by ndim)
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_KERNEL_PERM = {1: (0,), 2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}


def torch_key(path):
    """A Flax parameter path -> the PyTorch state_dict key of the mirrored module (a leaf with
    another name keeps it: a bare nn.Parameter such as `position_ids` or `pos_embed`)."""
    *modules, leaf = path
    return ".".join([*modules, _LEAVES.get(leaf, leaf)])


def torch_perm(path, ndim):
    """The axis permutation that takes the PyTorch tensor to the Flax leaf at `path`."""
    return _KERNEL_PERM[ndim] if path[-1] == "kernel" else tuple(range(ndim))


def flatten(params):
    """{path tuple: leaf} of a nested params dict (boxed logical-partitioning leaves unboxed)."""
    import flax.linen as nn
    from flax import traverse_util

    return traverse_util.flatten_dict(nn.unbox(params))


Rename = Callable[[tuple], "str | tuple[str, tuple] | None"]


def _source(path, ndim, rename):
    """(PyTorch key, permutation) for the Flax leaf at `path`; `rename(path)` may give a key, a
    (key, permutation) pair, or None for the default."""
    got = rename(path) if rename is not None else None
    if got is None:
        return torch_key(path), torch_perm(path, ndim)
    if isinstance(got, str):
        return got, torch_perm(path, ndim)
    return got


def _floating(dtype):
    return jnp.issubdtype(dtype, jnp.floating)


def _check_fits(key, value, dtype):
    """One-line error when `value` (a float array) overflows `dtype`."""
    if not _floating(dtype) or not _floating(value.dtype) or value.size == 0:
        return
    largest = float(ml_dtypes.finfo(dtype).max)
    if largest >= float(ml_dtypes.finfo(value.dtype).max):  # a wider dtype holds every value
        return
    top = float(np.max(np.abs(value.astype(np.float32))))
    if np.isfinite(top) and top > largest:
        raise ValueError(f"weight {key!r} holds values up to {top:.3g}, beyond {np.dtype(dtype)}'s "
                         f"largest {largest:.3g}; load it in a wider dtype")


def load_params(folder_or_tensors, abstract, *, rename: Rename | None = None, dtype=None,
                shardings=None, ignore=(), what="model"):
    """The params tree shaped like `abstract` (a tree of arrays or ShapeDtypeStructs, e.g.
    `jax.eval_shape(model.init, ...)["params"]`, boxed or not) filled from a folder's weights.

    `rename(path)`: the family's exceptions to `torch_key`/`torch_perm`. `ignore`: PyTorch keys
    (or key prefixes ending in ".") the folder may hold beyond the model's (buffers such as
    `position_ids`). `dtype`: cast floating weights to it (default: the abstract leaf's dtype).
    `shardings`: a `jax.sharding.Mesh` (each leaf split by its logical axis names,
    `mesh_shardings`: FSDP), a tree of `jax.sharding.Sharding` like `abstract`, one for every
    leaf, or None (the default device). Each device's block is read from the file alone, so no
    host holds a whole sharded parameter.
    """
    tensors = (folder_or_tensors if isinstance(folder_or_tensors, Tensors)
               else Tensors(weight_files(folder_or_tensors)))
    flat = flatten(abstract)
    if dtype is not None and not _floating(dtype):
        raise ValueError(f"dtype {np.dtype(dtype)} cannot hold weights; allowed: a floating "
                         "dtype (float32, bfloat16, float16, float64)")
    sources = {p: _source(p, len(leaf.shape), rename) for p, leaf in flat.items()}
    wanted = {key for key, _ in sources.values()}
    missing = sorted(wanted - set(tensors))
    extra = sorted(k for k in set(tensors) - wanted
                   if not any(k == i or (i.endswith(".") and k.startswith(i)) for i in ignore))
    where = os.path.dirname(tensors.files[0]) if tensors.files else "the folder"
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} weight(s) the {what} needs: "
                         f"{_some(missing)} (another architecture or config?)")
    if extra:
        raise ValueError(f"{where} holds {len(extra)} weight(s) the {what} does not have: "
                         f"{_some(extra)} (another architecture or config?)")
    leaf_shardings = _leaf_shardings(shardings, abstract, flat)
    out = {}
    for path, leaf in flat.items():
        key, perm = sources[path]
        shape = tuple(tensors.shape(key)[a] for a in perm) if len(perm) == len(
            tensors.shape(key)) else None
        if shape != tuple(leaf.shape):
            raise ValueError(f"weight {key!r} has shape {tensors.shape(key)}; the {what} needs "
                             f"{_torch_shape(leaf.shape, perm)} (another config?)")
        target = np.dtype(dtype if dtype is not None and _floating(leaf.dtype) else leaf.dtype)
        out[path] = _place(tensors, key, perm, leaf.shape, target, leaf_shardings.get(path))
    from flax import traverse_util

    return traverse_util.unflatten_dict(out)


def _some(keys, n=4):
    shown = ", ".join(keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _torch_shape(shape, perm):
    inverse = np.argsort(perm)
    return tuple(int(shape[i]) for i in inverse)


def _leaf_shardings(shardings, abstract, flat):
    if shardings is None:
        return {}
    if isinstance(shardings, jax.sharding.Mesh):
        return mesh_shardings(abstract, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        return dict.fromkeys(flat, shardings)
    return flatten(shardings)


def mesh_shardings(abstract, mesh):
    """{path: NamedSharding} for a boxed abstract params tree on `mesh`: each leaf split by its
    logical axis names under the models' rules (`jaxdiff.models.partitioning`: e.g. FSDP splits
    widths over "fsdp" where they divide), replicated where it has none."""
    import flax.linen as nn
    from flax import traverse_util

    from jaxdiff.models.partitioning import LOGICAL_RULES, mesh_spec

    # the rules restricted to the mesh's axes (a mesh may have only "fsdp", say)
    as_tuple = lambda axes: (axes,) if isinstance(axes, str) else tuple(axes or ())
    rules = tuple((name, tuple(a for a in as_tuple(axes) if a in mesh.axis_names))
                  for name, axes in LOGICAL_RULES)
    out = {}
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else ()
        spec = mesh_spec(names, nn.unbox(leaf).shape, mesh, rules)
        out[path] = jax.sharding.NamedSharding(mesh, spec)
    return out


def _place(tensors, key, perm, shape, dtype, sharding):
    """One parameter as a jax array: with a sharding, each device's block read alone."""

    def block(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        torch_index = [None] * len(perm)
        for axis, source in enumerate(perm):
            torch_index[source] = index[axis]
        value = tensors.read(key, tuple(torch_index)).transpose(perm)
        _check_fits(key, value, dtype)
        return value.astype(dtype)

    if sharding is None:
        return jax.device_put(block(()))  # a copy to the device; no XLA program per shape
    return jax.make_array_from_callback(tuple(shape), sharding, block)


# --- export ------------------------------------------------------------------------------------


def save_params(folder, params, config, *, rename: Rename | None = None, dtype=None,
                filename="diffusion_pytorch_model.safetensors", extra=None):
    """Write `params` as a model folder (`config.json` + one safetensors file) that diffusers or
    transformers loads with `from_pretrained`; `extra`: further {key: array} (buffers). Written
    into a temporary sibling and renamed into place: an existing folder is replaced whole or not
    at all."""
    tensors = {}
    for path, leaf in flatten(params).items():
        value = np.asarray(jax.device_get(leaf))
        key, perm = _source(path, value.ndim, rename)
        value = value.transpose(np.argsort(perm))
        cast = dtype is not None and _floating(value.dtype)
        tensors[key] = value.astype(dtype) if cast else value
    for key, value in (extra or {}).items():
        tensors[key] = np.asarray(value)
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        _write_safetensors(os.path.join(tmp, filename), tensors)
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old.", dir=parent)
            os.rmdir(old)
            os.rename(folder, old)
        os.rename(tmp, folder)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_safetensors(path, tensors):
    """{key: numpy array} as a safetensors file (the format's header + little-endian data;
    bfloat16 and float8 included, which the safetensors package's numpy writer refuses)."""
    header, offset, blobs = {}, 0, []
    for key in sorted(tensors):
        value = np.ascontiguousarray(tensors[key])
        data = value.astype(value.dtype.newbyteorder("<")).tobytes()
        header[key] = {"dtype": _NP_TO_ST[np.dtype(value.dtype)], "shape": list(value.shape),
                       "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for data in blobs:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
