"""A quantized network on disk: `save_quantized(directory, q, example=..., meta=...)` writes a
`jaxdiff.accel.quant.Quantized`, `load_quantized(directory, model)` reads it back for the
architecture `model` (the float Flax UNet or DiT it was made from).

Layout of `directory`:

- `params/`: an orbax checkpoint (`StandardCheckpointer`) of a flat dict `{"p00000": leaf, ...}`,
  the leaves of the quantized parameter tree in `jax.tree` order (qwix's `WithAux` / `QArray`
  nodes flattened: int8 / int4 / float8_e4m3fn values, float scales, the kept float layers);
  under per-timestep calibration the stacked leaves hold the group axis first and `"bounds"`
  the group boundaries (`TimestepParams`). orbax (tensorstore) stores int4 and float8_e4m3fn
  natively and bit-exactly (checked by tests/test_quant_cli.py), so nothing is repacked; int4
  takes one byte per value in the array, compressed on disk (zstd) to about half of that.
- `quant.json`: the scheme, calibration, groups, the `quant.rules` settings (the keep regex,
  the static activation range); the model's architecture
  (`architecture(model)`: class and fields, compute-only fields left out); the example input
  shapes the tree was built for; each leaf's path, shape and dtype; the `TimestepParams`
  stacked flags and bounds; the parameter bytes; the caller's `meta` (e.g. the run's model
  section and checkpoint step).

Loading rebuilds the abstract tree from the model, the scheme and the settings (qwix's PTQ
model initialised under `jax.eval_shape`; per-timestep leaves stacked G times), checks it leaf
by leaf against `quant.json` and restores into it: a directory made from another architecture
or for other input shapes is refused in one line (`QuantizedCheckpointError`) before any array
is read. Saving checks that this rebuild gives q's tree exactly (qwix metadata included), so
settings other than the ones `quantize` was given are refused before anything is written.

Writing is atomic: everything goes into a temporary directory beside `directory`, renamed to it
when complete (a directory already there is renamed aside first and removed after), so a crash
never leaves a half-written checkpoint at `directory`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import tempfile
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.accel import quant

FORMAT = "jaxdiff-quantized"
VERSION = 1
INFO = "quant.json"
PARAMS = "params"
# fields that change neither the params nor the computed values (dtype does both: qwix keeps
# the scales in the module's dtype)
COMPUTE_ONLY = ("remat", "attention_impl")


class QuantizedCheckpointError(ValueError):
    """A quantized checkpoint that cannot serve this model (missing, damaged, another
    architecture or settings); one line."""


def architecture(model):
    """{"class": name, field: value, ...} of a Flax module (a qwix-quantized copy gives its
    jaxdiff class): what must match for a checkpoint to fit; compute-only fields left out."""
    cls = next((c for c in type(model).__mro__ if c.__module__.startswith("jaxdiff.")),
               type(model))
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.name not in ("parent", "name") + COMPUTE_ONLY}
    return {"class": cls.__name__, **_jsonable(fields)}


def _jsonable(obj):
    """obj as it reads back from JSON (tuples as lists; dtypes and other objects as str)."""
    def default(o):
        try:
            return str(np.dtype(o))
        except TypeError:
            return str(o)
    return json.loads(json.dumps(obj, default=default))


def _path(keypath):
    return jax.tree_util.keystr(keypath)


def _leaf_rows(params):
    """[{path, shape, dtype}] of a (quantized) parameter tree's leaves, in flatten order."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [{"path": _path(k), "shape": list(np.shape(v)), "dtype": str(jnp.dtype(v.dtype))}
            for k, v in flat]


def rule_settings(q=None, **given):
    """The settings of `quant.rules` besides scheme and calibration (keep, act_range, ...):
    those `given`, else `q`'s attributes of the same names where `Quantized` has them, else
    the defaults of `quant.rules`. Unknown names: TypeError."""
    params = {n: p for n, p in inspect.signature(quant.rules).parameters.items()
              if n not in ("scheme", "calibration")}
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise TypeError(f"{unknown[0]!r} is not a setting of quant.rules; allowed: "
                        f"{', '.join(params)}")
    return {n: given[n] if n in given else getattr(q, n, p.default) for n, p in params.items()}


def save_quantized(directory, q, *, example, meta=None, **settings):
    """Writes `q` (a `Quantized`) to `directory` atomically; returns `info` (quant.json's dict).

    example: the network's inputs (x, t, *args) with a batch of one, arrays or
    ShapeDtypeStructs: the shapes the quantized tree is rebuilt for on loading. meta: a
    JSON-able dict stored as is (e.g. the run's model section, the checkpoint step, the float
    parameter bytes). settings: the `quant.rules` settings `quantize` was given, e.g. keep
    (the module regex kept in full precision; None: nothing kept) and act_range; the others
    are `q`'s attributes of those names, else the defaults (`rule_settings`). They are checked:
    the tree they rebuild must be q's (QuantizedCheckpointError before anything is written)."""
    settings = rule_settings(q, **settings)
    quant.check_scheme(q.scheme, q.calibration, q.groups)
    params = q.params
    timestep = None
    if isinstance(params, quant.TimestepParams):
        leaves = list(params.leaves)
        inner = jax.tree.unflatten(params.treedef, [a[0] if s else a for a, s in
                                                    zip(leaves, params.stacked)])
        rows = _leaf_rows(inner)
        for row, leaf, s in zip(rows, leaves, params.stacked):
            row["shape"] = list(np.shape(leaf))
            row["stacked"] = bool(s)
        timestep = {"stacked": [bool(s) for s in params.stacked],
                    "bounds": [float(b) for b in np.asarray(params.bounds)]}
    else:
        leaves, rows = jax.tree.leaves(params), _leaf_rows(params)
    # what loading will rebuild (qwix re-quantizes a quantized module with the rules given)
    # must be this tree, its qwix metadata included: catches settings or an example other
    # than the ones q was made with
    _, rebuilt = abstract_params(q.model, {
        "scheme": q.scheme, "calibration": q.calibration, "rules": settings,
        "groups": q.groups, "example": _shapes(example), "timestep": timestep})
    problem = _leaf_mismatch({"leaves": rows, "scheme": q.scheme, "rules": settings}, rebuilt)
    if problem is None and _treedef(rebuilt) != _treedef(params):
        problem = "the same leaves, other qwix metadata (e.g. a calibration method)"
    if problem is not None:
        raise QuantizedCheckpointError(
            f"save_quantized: the parameters do not fit what loading would rebuild ("
            f"{problem.replace('in the checkpoint', 'in q')}); pass the settings that quantize "
            f"was given ({', '.join(settings)}) and an example input of the model's shapes")
    arrays = {f"p{i:05d}": leaf for i, leaf in enumerate(leaves)}
    if timestep is not None and np.size(params.bounds):  # (orbax refuses empty arrays)
        arrays["bounds"] = jnp.asarray(params.bounds, jnp.float32)
    info = {
        "format": FORMAT, "version": VERSION, "scheme": q.scheme, "calibration": q.calibration,
        "groups": int(q.groups), "keep": settings.get("keep"),
        "rules": _jsonable(settings), "architecture": architecture(q.model),
        "example": _shapes(example), "timestep": timestep,
        "param_bytes": quant.param_bytes(params), "leaves": rows, "meta": _jsonable(meta or {}),
    }
    _write_atomically(os.path.abspath(directory), arrays, info)
    return info


def _shapes(example):
    return [{"shape": list(np.shape(a)), "dtype": str(jnp.dtype(a.dtype))} for a in example]


def _write_atomically(directory, arrays, info):
    import orbax.checkpoint as ocp

    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise QuantizedCheckpointError(f"{directory} is a file; expected a directory to write "
                                       "the quantized checkpoint into")
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        ckptr = ocp.StandardCheckpointer()
        try:
            ckptr.save(os.path.join(tmp, PARAMS), arrays)
            ckptr.wait_until_finished()
        finally:
            ckptr.close()
        info["disk_bytes"] = disk_bytes(os.path.join(tmp, PARAMS))
        with open(os.path.join(tmp, INFO), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if os.path.exists(directory):
            old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
            os.rename(directory, old)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def disk_bytes(path):
    """Bytes of the files under `path`."""
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path)
               for n in names)


def read_info(directory):
    """quant.json of a quantized checkpoint, checked to be one (QuantizedCheckpointError)."""
    path = os.path.join(directory, INFO)
    if not os.path.isdir(directory):
        raise QuantizedCheckpointError(f"{directory}: no such directory; expected a quantized "
                                       "checkpoint (jaxdiff quantize)")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise QuantizedCheckpointError(f"{directory} is not a quantized checkpoint ({INFO} is "
                                       "missing); make one with jaxdiff quantize") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantizedCheckpointError(f"{path} is not valid JSON ({_first_line(e)})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise QuantizedCheckpointError(f"{path} is not a {FORMAT} description")
    if info.get("version") != VERSION:
        raise QuantizedCheckpointError(f"{path} has format version {info.get('version')}; this "
                                       f"jaxdiff reads version {VERSION}")
    return info


def _first_line(e):
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0].strip() if lines else type(e).__name__


def _describe(arch, limit=200):
    fields = ", ".join(f"{k}={v}" for k, v in arch.items() if k != "class")
    text = f"{arch.get('class')}({fields})"
    return text if len(text) <= limit else text[:limit - 4] + "...)"


def check_architecture(directory, info, model):
    """QuantizedCheckpointError naming the first field where `model` differs from the
    architecture the checkpoint was made from."""
    saved, here = info.get("architecture") or {}, architecture(model)
    if saved == here:
        return
    keys = ["class"] + sorted((set(saved) | set(here)) - {"class"})
    key = next(k for k in keys if saved.get(k, "<none>") != here.get(k, "<none>"))
    raise QuantizedCheckpointError(
        f"{directory} was quantized from another architecture ({key}: "
        f"{saved.get(key, '<none>')} there, {here.get(key, '<none>')} in this model: "
        f"{_describe(saved)}); quantize this model instead")


def abstract_params(model, info):
    """The shapes and dtypes of the checkpoint's parameter tree for `model` under the settings
    in `info`: (quantized model, abstract params; `TimestepParams` of ShapeDtypeStructs under
    per-timestep calibration)."""
    example = [jnp.zeros(e["shape"], e["dtype"]) for e in info["example"]]
    key = jax.random.key(0)
    if info["scheme"] == "bf16":
        qmodel = model.clone(dtype=jnp.bfloat16)
        shapes = _unbox(jax.eval_shape(model.init, key, *example)["params"])
        return qmodel, jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16)
            if jnp.issubdtype(s.dtype, jnp.floating) else s, shapes)

    settings = info.get("rules", {"keep": info.get("keep")})
    qmodel = quant.inference_model(model, quant.rules(info["scheme"], info["calibration"],
                                                      **settings))
    shapes = _unbox(jax.eval_shape(qmodel.init, key, *example)["params"])
    shapes = jax.eval_shape(lambda p: quant.pack_convs(p, info["scheme"], settings.get(
        "keep", quant.KEEP)), shapes)
    ts = info.get("timestep")
    if ts is None:
        return qmodel, shapes
    leaves, treedef = jax.tree.flatten(shapes)
    if len(leaves) != len(ts["stacked"]):
        raise QuantizedCheckpointError(
            f"the quantized tree has {len(leaves)} leaves for this model, the checkpoint's "
            f"per-timestep flags {len(ts['stacked'])}")
    groups = int(info["groups"])
    leaves = tuple(jax.ShapeDtypeStruct((groups,) + tuple(s.shape), s.dtype) if st else s
                   for s, st in zip(leaves, ts["stacked"]))
    bounds = jax.ShapeDtypeStruct((len(ts["bounds"]),), jnp.float32)
    return qmodel, quant.TimestepParams(leaves, bounds, tuple(ts["stacked"]), treedef)


def _settings_text(settings):
    return ", ".join(f"{k} {v!r}" for k, v in settings.items())


def _treedef(params):
    return params.treedef if isinstance(params, quant.TimestepParams) else jax.tree.structure(
        params)


def _unbox(tree):
    import flax.linen as nn

    return nn.unbox(tree)


def _check_leaves(directory, info, abstract):
    """QuantizedCheckpointError naming the first leaf whose path, shape or dtype differs."""
    problem = _leaf_mismatch(info, abstract)
    if problem is not None:
        raise QuantizedCheckpointError(f"{directory} does not fit this model: {problem}")


def _leaf_mismatch(info, abstract):
    """The first difference between info's leaves and `abstract`'s, in words; None if none."""
    if isinstance(abstract, quant.TimestepParams):
        inner = jax.tree.unflatten(abstract.treedef, [
            jax.ShapeDtypeStruct(s.shape[1:], s.dtype) if st else s
            for s, st in zip(abstract.leaves, abstract.stacked)])
        rows = _leaf_rows(inner)
        for row, s, st in zip(rows, abstract.leaves, abstract.stacked):
            row["shape"], row["stacked"] = list(s.shape), bool(st)
    else:
        rows = _leaf_rows(abstract)
    saved = info.get("leaves") or []
    for i, (a, b) in enumerate(zip(saved, rows)):
        if a != b:
            what = next(k for k in ("path", "shape", "dtype", "stacked") if a.get(k) != b.get(k))
            return (f"leaf {i} {b['path']} has {what} {a.get(what)} in the checkpoint, "
                    f"{b.get(what)} for this model (scheme {info['scheme']}, "
                    f"{_settings_text(info.get('rules', {}))})")
    if len(saved) != len(rows):
        return (f"{len(saved)} parameter leaves in the checkpoint, {len(rows)} for this model "
                f"(scheme {info['scheme']})")
    return None


def load_quantized(directory, model, *, example=None):
    """The `Quantized` saved in `directory`, for `model` (the float Flax module it was made
    from), its arrays as host (numpy) arrays. Raises QuantizedCheckpointError (one line) for a
    directory that is no quantized checkpoint, one made from another architecture or for other
    input shapes (`example`: inputs (x, t, *args) to check the stored shapes against, batch
    axis ignored), or one whose arrays cannot be read."""
    import orbax.checkpoint as ocp

    info = read_info(directory)
    split = bool((info.get("architecture") or {}).get("split_skips"))
    if split and hasattr(model, "split_skips"):  # Q-Diffusion's split shortcut (quant.quantize)
        model = model.clone(split_skips=True)
    check_architecture(directory, info, model.clone(dtype=jnp.bfloat16)
                       if info["scheme"] == "bf16" else model)
    if example is not None:
        saved = [tuple(e["shape"][1:]) for e in info["example"]]
        here = [tuple(np.shape(a)[1:]) for a in example]
        if saved != here:
            raise QuantizedCheckpointError(
                f"{directory} was quantized for inputs of shapes {saved}, this model takes "
                f"{here}")
    try:
        qmodel, abstract = abstract_params(model, info)
    except QuantizedCheckpointError:
        raise
    except Exception as e:  # e.g. a keep regex or scheme this qwix does not take
        raise QuantizedCheckpointError(f"{directory}: cannot rebuild the quantized model "
                                       f"({type(e).__name__}: {_first_line(e)})") from None
    _check_leaves(directory, info, abstract)
    timestep = isinstance(abstract, quant.TimestepParams)
    leaves = list(abstract.leaves) if timestep else jax.tree.leaves(abstract)
    target = {f"p{i:05d}": s for i, s in enumerate(leaves)}
    if timestep and abstract.bounds.shape[0]:
        target["bounds"] = abstract.bounds
    ckptr = ocp.PyTreeCheckpointer()
    try:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        got = ckptr.restore(os.path.join(os.path.abspath(directory), PARAMS),
                            args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
    except Exception as e:  # orbax / tensorstore raise many types for damaged files
        raise QuantizedCheckpointError(f"{directory}: the quantized parameters cannot be read "
                                       f"({type(e).__name__}: {_first_line(e)[:200]})") from None
    finally:
        ckptr.close()
    arrays = [np.asarray(got[f"p{i:05d}"]).astype(s.dtype, copy=False)
              for i, s in enumerate(leaves)]
    if timestep:
        bounds = got["bounds"] if "bounds" in target else np.zeros(0)
        params = quant.TimestepParams(tuple(arrays), np.asarray(bounds, np.float32),
                                      abstract.stacked, abstract.treedef)
    else:
        params = jax.tree.unflatten(jax.tree.structure(abstract), arrays)
    # settings Quantized itself records (where it has fields of those names) go with it
    fields = {f.name for f in dataclasses.fields(quant.Quantized)}
    extra = {k: v for k, v in info.get("rules", {}).items() if k in fields}
    return quant.Quantized(qmodel, params, info["scheme"], info["calibration"],
                           int(info["groups"]), **dict(extra, split=split))


__all__ = ["QuantizedCheckpointError", "abstract_params", "architecture", "check_architecture",
           "disk_bytes", "load_quantized", "read_info", "rule_settings", "save_quantized"]
