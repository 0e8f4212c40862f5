"""Post-training quantization of the UNet and the DiT through qwix, with timestep-aware
calibration.

qwix (google/qwix, Apache-2.0) intercepts the network's `dot_general` and `conv_general_dilated`
calls and quantizes their weights (per output channel, absmax) and input activations. Dynamic
activation scales are computed per call; static ones come from calibration statistics (qwix's
`QtProvider` collects them, `quantize_params` turns them into scales). This module adds what
diffusion needs on top:

- schemes (`SCHEMES`): W8A8, W4A8, W4A16, W8A16 (weight-only), fp8 (e4m3 weights and
  activations), W4A4; `"bf16"` casts the network (parameters and compute) to bfloat16;
- sensitive layers kept in full precision by default (`KEEP`: the time, label and patch
  embeddings, the first and last layers, the adaLN / AdaGN modulation projections), as PTQ4DM,
  Q-Diffusion and ViDiT-Q do; attention's activation-activation einsums are not quantized;
- calibration on the sampling trajectory: `record_calls` is a `Stateful` network that stores the
  inputs of every model call of a `jaxdiff.sample` run (under CFG the [x; x] batch), and
  `quantize(..., calibration="static")` computes one static scale per op from all of them;
- per-timestep scales (PTQ4DM / Q-Diffusion's observation that activation ranges drift with the
  noise level): `calibration="timestep", groups=G` splits the recorded calls into G groups of
  neighbouring noise levels, calibrates each, and the network selects the group's scales from
  its conditioning input t inside the compiled sampler (`TimestepParams`); the quantized weights
  are shared, only the activation scales are stacked;
- SVDQuant's low-rank branch (`quantize(..., lowrank=r)`, dynamic activation scales): each
  quantized dense layer's input is divided per channel by SmoothQuant's factor
  lambda = max|X|^a / max|W|^(1-a) (qwix.contrib's calibration over the recorded calls), its
  weight multiplied by it, and lambda·W split into its top-r SVD L1·L2, kept in float and run on
  the unquantized (smoothed) input, plus a residual that is quantized (qwix's LoRA provider:
  base op quantized, low-rank branch in float).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core.denoiser import Stateful

# scheme -> (weight qtype, activation qtype or None: weight-only)
SCHEMES = {
    "w8a8": ("int8", "int8"),
    "w4a8": ("int4", "int8"),
    "w4a16": ("int4", None),
    "w8a16": ("int8", None),
    "fp8": ("float8_e4m3fn", "float8_e4m3fn"),
    "w4a4": ("int4", "int4"),
    "bf16": (None, None),
}
CALIBRATIONS = ("dynamic", "static", "timestep")
# module paths kept in full precision (qwix's "/"-joined Flax module path; full match)
KEEP = (r"(t_embedder|y_embedder|w_embedder|x_embedder|final_layer|time_embed|label_embed|"
        r"guidance_embed|conv_in|conv_out)(/.*)?|.*(adaLN_modulation|emb_proj).*")


def check_scheme(scheme, calibration="dynamic", groups=1):
    """One-line ValueError for an unknown scheme or calibration, or groups out of range."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme {scheme!r} is unknown; allowed: "
                         f"{', '.join(SCHEMES)}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration {calibration!r} is unknown; allowed: "
                         f"{', '.join(CALIBRATIONS)}")
    if calibration != "dynamic" and SCHEMES[scheme][1] is None:
        raise ValueError(f"calibration={calibration!r} needs quantized activations; scheme "
                         f"{scheme!r} quantizes weights only (allowed: 'dynamic')")
    if not (isinstance(groups, (int, np.integer)) and groups >= 1):
        raise ValueError(f"groups={groups!r} must be an integer >= 1")
    if groups > 1 and calibration != "timestep":
        raise ValueError(f"groups={groups} needs calibration='timestep', not {calibration!r}")


# A static activation range is ACT_RANGE x qwix's statistic, the mean over calibration rows of
# each row's absmax (per token for a DiT), which clips every row whose max is above the mean: on
# the testbed DiT (W8A8, 20 steps) the RMS distance to fp32 samples was 0.093 at 1x, 0.019 at
# 1.5x, 0.013 at 2.5x, against 0.0066 with dynamic scales.
ACT_RANGE = 2.0


def rules(scheme, calibration="dynamic", keep=KEEP, act_range=ACT_RANGE, keep_weights="fp32",
          lowrank=0):
    """qwix's quantization rules for a scheme: the `keep` modules first (their dense layers'
    weights in int8 when keep_weights="int8", else nothing quantized), then every weight op of
    the others; static activation ranges `act_range` x the mean per-row absmax of the
    calibration data; lowrank > 0: the others' dense layers carry a float low-rank branch of
    that rank (qwix's `LoraRule`, SVDQuant)."""
    import qwix

    check_scheme(scheme, calibration)
    if keep_weights not in ("fp32", "int8"):
        raise ValueError(f"keep_weights={keep_weights!r} is not a precision for the kept layers; "
                         "allowed: 'fp32', 'int8' (weight-only, dense layers)")
    weight, act = SCHEMES[scheme]
    static = (calibration != "dynamic") if act is not None else None
    method = f"absmax,{act_range}" if static else None
    out = []
    if keep and keep_weights == "int8":
        out.append(qwix.QuantizationRule(module_path=keep, op_names=("dot_general",),
                                         weight_qtype="int8"))
    out += [qwix.QuantizationRule(module_path=keep)] if keep else []
    dense = dict(module_path=".*", op_names=("dot_general",), weight_qtype=weight,
                 act_qtype=act, act_static_scale=static, act_calibration_method=method)
    out.append(qwix.LoraRule(rank=lowrank, alpha=float(lowrank), **dense) if lowrank
               else qwix.QuantizationRule(**dense))
    # qwix's PTQ convolution needs one type for weights and activations: a wXaY conv runs as
    # wYaY on kernels rounded to the wX grid first (`conv_weight_grid`), a weight-only one in
    # float on rounded kernels; both are stored at the wX type (`pack_convs`)
    if act is not None:
        out.append(qwix.QuantizationRule(module_path=".*", op_names=("conv_general_dilated",),
                                         weight_qtype=act, act_qtype=act,
                                         act_static_scale=static, act_calibration_method=method))
    return out


def conv_weight_grid(params, scheme, keep=KEEP):
    """params with every convolution kernel (4-D "kernel" outside `keep`) rounded to the
    scheme's weight grid (symmetric, per output channel, absmax) where qwix's convolution
    cannot hold that type itself (weights and activations of different types); else params."""
    import re

    weight, act = SCHEMES[scheme]
    if weight is None or weight == act:
        return params

    def grid(path, w):
        module = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
        if getattr(path[-1], "key", None) != "kernel" or w.ndim != 4 or (
                keep and re.fullmatch(keep, module)):
            return w
        qmax = 2.0 ** (jnp.iinfo(jnp.dtype(weight)).bits - 1) - 1
        scale = jnp.max(jnp.abs(w), axis=(0, 1, 2), keepdims=True) / qmax
        scale = jnp.where(scale == 0, 1.0, scale)
        return (jnp.clip(jnp.round(w / scale), -qmax, qmax) * scale).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(grid, params)


def _is_conv_kernel(path, node, keep):
    import re

    module = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
    return (getattr(path[-1], "key", None) == "kernel" and len(node.shape) == 4
            and not (keep and re.fullmatch(keep, module)))


def pack_convs(params, scheme, keep=KEEP):
    """The quantized tree with each convolution kernel stored at the scheme's weight type where
    qwix's convolution runs it at another (`conv_weight_grid`): a wXaY kernel (qwix: wYaY on the
    wX grid) as its wX integers and their scale, a weight-only one (float in qwix) as a qwix
    `QArray`. Exact: the same numbers, in fewer bytes; `unpack_convs` undoes it at each call.
    A pure function of the tree, so it also maps abstract (ShapeDtypeStruct) trees."""
    weight, act = SCHEMES[scheme]
    if weight is None or weight == act:
        return params
    import qwix
    from qwix._src.core import numerics
    from qwix._src.providers.ptq import WithAux

    qmax = 2 ** (jnp.iinfo(jnp.dtype(weight)).bits - 1) - 1

    def pack(path, node):
        if (isinstance(node, WithAux) and isinstance(node.array, qwix.QArray)
                and _is_conv_kernel(path, node.array.qvalue, keep)):
            # kernel on the wX grid (absmax qmax * s), then qwix's wY: step s' = qmax * s / B
            # (B its symmetric bound), so the wX integer is round(q * qmax / B), exactly
            ratio = numerics.get_symmetric_bound(node.array.qvalue.dtype) / qmax
            a = node.array
            g = jnp.round(a.qvalue.astype(jnp.float32) / ratio).astype(weight)
            return node.replace(array=a.replace(qvalue=g, scale=a.scale * ratio))
        if not isinstance(node, WithAux) and _is_conv_kernel(path, node, keep) and act is None:
            scale = jnp.max(jnp.abs(node), axis=(0, 1, 2), keepdims=True) / qmax
            scale = jnp.where(scale == 0, 1.0, scale)
            return qwix.QArray(qvalue=jnp.round(node / scale).astype(weight),
                               scale=scale.astype(node.dtype))
        return node

    return jax.tree_util.tree_map_with_path(pack, params,
                                            is_leaf=lambda n: isinstance(n, WithAux))


def _packs(scheme):
    weight, act = SCHEMES[scheme]
    return weight is not None and weight != act


def unpack_convs(params):
    """What qwix's model takes from a `pack_convs` tree: int4 convolution integers widened to
    int8 (the wYaY grid's container; the same values) and weight-only kernels dequantized."""
    import qwix
    from qwix._src.providers.ptq import WithAux

    def unpack(node):
        if (isinstance(node, WithAux) and isinstance(node.array, qwix.QArray)
                and node.array.qvalue.ndim == 4 and node.array.qvalue.dtype == jnp.int4):
            return node.replace(array=node.array.replace(qvalue=node.array.qvalue.astype(
                jnp.int8)))
        if isinstance(node, qwix.QArray) and node.qvalue.ndim == 4:
            return qwix.dequantize(node)
        return node

    return jax.tree.map(unpack, params, is_leaf=lambda n: isinstance(n, (WithAux,
                                                                           qwix.QArray)))


# --- recording the calibration inputs ------------------------------------------------------------

def record_calls(model_fn, x, t, *args, capacity):
    """A `Stateful` network that calls `model_fn` and records each call's inputs: after
    `jaxdiff.sample`, `state["x"][:calls]`, `state["t"][:calls]`, `state["args"]` (each with a
    leading call axis) hold up to `capacity` calls. `x, t, args`: an input as the model gets it
    (under CFG the 2B rows of [x; x])."""
    if not isinstance(model_fn, jax.tree_util.Partial):  # a jit argument: its params as data
        model_fn = jax.tree_util.Partial(model_fn)
    buf = lambda a: jnp.zeros((capacity,) + jnp.shape(a), jnp.asarray(a).dtype)
    init = dict(calls=jnp.zeros((), jnp.int32), x=buf(x), t=buf(t),
                args=tuple(buf(a) for a in args))

    def fn(model_fn, x, t, *args_state):
        *args, state = args_state
        i = jnp.minimum(state["calls"], capacity - 1)
        new = dict(calls=state["calls"] + 1, x=state["x"].at[i].set(x),
                   t=state["t"].at[i].set(jnp.broadcast_to(t, state["t"].shape[1:])),
                   args=tuple(b.at[i].set(a) for b, a in zip(state["args"], args)))
        return model_fn(x, t, *args), new

    return Stateful(jax.tree_util.Partial(fn, model_fn), init)


def recorded(state):
    """(x, t, args) of the recorded calls, each with a leading call axis, as numpy."""
    n = int(state["calls"])
    cap = state["x"].shape[0]
    if n > cap:
        raise ValueError(f"the recorder holds {cap} calls and the run made {n}; make it with "
                         f"capacity >= {n}")
    return (np.asarray(state["x"][:n]), np.asarray(state["t"][:n]),
            tuple(np.asarray(a[:n]) for a in state["args"]))


# --- quantized networks ---------------------------------------------------------------------------

@jax.tree_util.register_pytree_node_class
class TimestepParams:
    """Quantized params with per-timestep-group activation scales: the leaves that differ between
    groups are stacked (group axis first, groups in increasing t), the others shared;
    `select(t)` gives the params of the group whose t-interval holds mean(t)."""

    def __init__(self, leaves, bounds, stacked, treedef):
        self.leaves, self.bounds, self.stacked, self.treedef = leaves, bounds, stacked, treedef

    def tree_flatten(self):
        return (self.leaves, self.bounds), (self.stacked, self.treedef)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], children[1], *aux)

    @classmethod
    def stack(cls, trees, bounds):
        flat = [jax.tree.flatten(tr) for tr in trees]
        treedef = flat[0][1]
        leaves, stacked = [], []
        for group in zip(*(f[0] for f in flat)):
            same = all(np.array_equal(np.asarray(group[0]), np.asarray(g)) for g in group[1:])
            leaves.append(group[0] if same else jnp.stack(group))
            stacked.append(not same)
        return cls(tuple(leaves), jnp.asarray(bounds, jnp.float32), tuple(stacked), treedef)

    @property
    def groups(self):
        return int(self.bounds.shape[0]) + 1

    def select(self, t):
        g = jnp.searchsorted(self.bounds, jnp.mean(jnp.asarray(t, jnp.float32)))
        leaves = [jax.lax.dynamic_index_in_dim(leaf, g, keepdims=False) if s else leaf
                  for leaf, s in zip(self.leaves, self.stacked)]
        return jax.tree.unflatten(self.treedef, leaves)


@dataclasses.dataclass(frozen=True)
class QuantizedApply:
    """`model_fn(x, t, *args)` of a quantized model, params first (a `jax.tree_util.Partial`
    with the params as data); the output in float32."""

    model: Any
    packed: bool = False  # convolution kernels stored by `pack_convs`

    def __call__(self, params, x, t, *args):
        if isinstance(params, TimestepParams):
            params = params.select(t)
        if self.packed:
            params = unpack_convs(params)
        return self.model.apply({"params": params}, x, t, *args).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Quantized:
    """A quantized network: `model_fn` for `jaxdiff.sample`, the quantized Flax module and its
    params (`TimestepParams` under per-timestep calibration), and how it was made."""

    model: Any
    params: Any
    scheme: str
    calibration: str
    groups: int = 1
    split: bool = False
    keep: Any = KEEP  # the rules' settings: the quantized tree's layout depends on them
    act_range: float = ACT_RANGE
    keep_weights: str = "fp32"
    lowrank: int = 0

    @property
    def model_fn(self):
        packed = _packs(self.scheme)
        return jax.tree_util.Partial(QuantizedApply(self.model, packed), self.params)


def quantize(model, variables, scheme, *, calibration="dynamic", inputs=None, groups=1,
             keep=KEEP, act_range=ACT_RANGE, keep_weights="fp32", split=False, lowrank=0,
             smooth=0.5, batch=256):
    """`model` (a Flax UNet or DiT) with `variables` ({"params": ...}) quantized by `scheme`.

    calibration: "dynamic" (activation scales computed at every call), "static" (one scale per
    op from `inputs`) or "timestep" (`groups` sets of scales, each from the recorded calls of
    neighbouring noise levels, selected by t at run time). inputs: `recorded(state)` of a
    `record_calls` sampling run, (x, t, args) with a leading call axis. keep: a regex of module
    paths left in full precision (None: quantize all); keep_weights="int8": their dense
    weights in int8 (weight-only; what a 4-bit scheme needs to be ~7x smaller than fp32 on a
    small model, whose embeddings and modulation layers are a large share). act_range: see
    `ACT_RANGE`. split:
    Q-Diffusion's split shortcut for a UNet (`UNet.split_skips`: the h and skip channels of each
    decoder block's input get their own activation scales). lowrank: SVDQuant's float low-rank
    branch of this rank on every quantized dense layer, after smoothing its input with
    SmoothQuant's migration strength `smooth` (needs inputs; dynamic activation scales).
    batch: rows per calibration pass."""
    check_scheme(scheme, calibration, groups)
    import flax.linen as nn

    params = nn.unbox(variables["params"])  # an init's LogicallyPartitioned boxes
    how = dict(split=split, keep=keep, act_range=act_range, keep_weights=keep_weights,
               lowrank=lowrank)
    if lowrank:
        check_lowrank(scheme, calibration, lowrank, smooth)
        if inputs is None:
            raise ValueError(f"lowrank={lowrank} needs inputs= (recorded model calls, for the "
                             "smoothing statistics: jaxdiff.accel.quant.record_calls)")
    if split:
        from jaxdiff.models.unet import UNet, split_skip_params

        if not isinstance(model, UNet):
            raise ValueError(f"split=True is the UNet's split shortcut; got a "
                             f"{type(model).__name__} (allowed: split=False)")
        params, model = split_skip_params(params, model), model.clone(split_skips=True)
    if scheme == "bf16":
        cast = jax.tree.map(lambda a: a.astype(jnp.bfloat16)
                            if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
        return Quantized(model.clone(dtype=jnp.bfloat16), cast, scheme, calibration, **how)
    import qwix

    if SCHEMES[scheme][1] == "int4" and _conv_modules(params, keep):
        raise ValueError(f"scheme {scheme!r} quantizes activations to int4, which XLA's CPU and "
                         f"GPU backends do not compile into a convolution (this model's "
                         f"{_conv_modules(params, keep)[0]}); allowed here: w4a8, w8a8, fp8 or "
                         "a weight-only scheme")
    params = conv_weight_grid(params, scheme, keep)
    rule_list = rules(scheme, calibration, keep, act_range, keep_weights, lowrank)
    ptq = inference_model(model, rule_list)
    if lowrank:
        params = _lowrank_split(model, params, inputs, scheme, keep, lowrank, smooth, batch)
    if calibration == "dynamic":
        example = _example(model, params, inputs)
        abstract = jax.eval_shape(ptq.init, jax.random.key(0), *example)["params"]
        return Quantized(ptq, pack_convs(qwix.quantize_params(params, abstract), scheme, keep),
                         scheme, calibration, **how)
    if inputs is None:
        raise ValueError(f"calibration={calibration!r} needs inputs= (recorded model calls: "
                         "jaxdiff.accel.quant.record_calls, then recorded(state))")
    xs, ts, args = inputs
    calls = np.argsort(_level(ts), kind="stable")  # increasing t
    chunks = np.array_split(calls, groups if calibration == "timestep" else 1)
    if any(len(c) == 0 for c in chunks):
        raise ValueError(f"groups={groups} is more than the {len(calls)} recorded calls")
    qt = qwix.quantize_model(model, qwix.QtProvider(rule_list))
    first = (xs[0][:1], ts[0][:1], *(a[0][:1] for a in args))
    stats0 = qt.init(jax.random.key(0), *first)["quant_stats"]
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), *first)["params"]

    @jax.jit  # params as an argument: not baked into the program as constants
    def update(params, stats, x, t, *a):
        _, new = qt.apply({"params": params, "quant_stats": stats}, x, t, *a,
                          mutable=["quant_stats"])
        return new["quant_stats"]

    trees = []
    with _conv_forward_only():
        for chunk in chunks:
            stats = stats0
            for i in chunk:
                for lo in range(0, xs.shape[1], batch):
                    rows = slice(lo, lo + batch)
                    stats = update(params, stats, xs[i][rows], ts[i][rows],
                                   *(a[i][rows] for a in args))
            trees.append(pack_convs(qwix.quantize_params(params, abstract, stats), scheme, keep))
    if calibration == "static":
        return Quantized(ptq, trees[0], scheme, calibration, **how)
    level = _level(ts)
    bounds = [(level[a[-1]] + level[b[0]]) / 2 for a, b in zip(chunks, chunks[1:])]
    return Quantized(ptq, TimestepParams.stack(trees, bounds), scheme, calibration,
                     groups=groups, **how)


def inference_model(model, rule_list):
    """`model` under qwix's PTQ provider for `rule_list`; with SVDQuant's low-rank branch
    (`LoraRule`s) under `_smoothed_lora_provider`'s."""
    import qwix

    lora = any(isinstance(r, qwix.LoraRule) for r in rule_list)
    provider = _smoothed_lora_provider() if lora else qwix.PtqProvider
    return qwix.quantize_model(model, provider(rule_list))


@functools.cache
def _smoothed_lora_provider():
    import qwix
    from qwix._src.providers import ptq
    from qwix._src.utils import flax_util

    class SmoothedLoraProvider(qwix.LoraProvider):
        """qwix's LoRA provider (a PTQ base op plus a float low-rank branch) with SVDQuant's
        smoothing: the input of a weight op under a `LoraRule` is multiplied per contracted
        channel by the layer's `<weight>_smooth` parameter (1/lambda) before both branches."""

        def dot_general(self, lhs, rhs, dimension_numbers, *args, **kwargs):
            rule, _ = self._get_current_rule_and_op_id("dot_general", only_rule=True)
            name = flax_util.find_param(rhs, ptq.WithAux)
            (lhs_ca, _), (lhs_ba, _) = dimension_numbers
            if (isinstance(rule, qwix.LoraRule) and name is not None and len(lhs_ca) == 1
                    and not lhs_ba):
                axis, n = lhs_ca[0], lhs.shape[lhs_ca[0]]
                smooth = flax_util.get_or_create_param(
                    name + "_smooth", lambda: jnp.ones((n,), jnp.float32))
                shape = [1] * lhs.ndim
                shape[axis] = n
                lhs = lhs * jnp.reshape(smooth, shape).astype(lhs.dtype)
            return super().dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)

    return SmoothedLoraProvider


def check_lowrank(scheme, calibration, lowrank, smooth=0.5):
    """One-line ValueError for a low-rank branch (SVDQuant) the scheme or calibration can't
    take, or settings out of range."""
    if not (isinstance(lowrank, (int, np.integer)) and lowrank >= 0):
        raise ValueError(f"lowrank={lowrank!r} must be an integer >= 0 (0: no low-rank branch)")
    weight, act = SCHEMES[scheme]
    if weight is None or act is None:
        raise ValueError(f"lowrank={lowrank} (SVDQuant) needs quantized weights and activations; "
                         f"scheme {scheme!r} quantizes not both (allowed: w4a4, w4a8, w8a8, fp8)")
    if calibration != "dynamic":
        raise ValueError(f"lowrank={lowrank} (SVDQuant) uses dynamic activation scales; got "
                         f"calibration={calibration!r} (allowed: 'dynamic')")
    if not 0 <= smooth <= 1:
        raise ValueError(f"smooth={smooth!r} is a migration strength; allowed: 0 <= smooth <= 1")


def _lowrank_split(model, params, inputs, scheme, keep, rank, smooth, batch):
    """SVDQuant's decomposition of every quantized dense kernel W (in, out): lambda per input
    channel from qwix.contrib's SmoothQuant calibration over `inputs` (migration strength
    `smooth`), then lambda·W = L1·L2 (its top-`rank` singular triplets, float64 SVD) + R. The
    tree gets kernel = R and kernel_lora_a = L1, kernel_lora_b = L2, kernel_smooth = 1/lambda."""
    import flax
    import qwix
    from qwix._src import averaging
    from qwix.contrib import smooth_quant

    weight, act = SCHEMES[scheme]
    sq_rules = ([qwix.QuantizationRule(module_path=keep)] if keep else []) + [
        smooth_quant.SqRule(module_path=".*", op_names=("dot_general",), weight_qtype=weight,
                            act_qtype=act, alpha=float(smooth))]
    cal = qwix.quantize_model(model, smooth_quant.SqCalibrationProvider(sq_rules))

    def step(params, stats, x, t, *a):
        variables = {"params": params} if stats is None else {"params": params,
                                                              "quant_stats": stats}
        return cal.apply(variables, x, t, *a, mutable=["quant_stats"])[1]["quant_stats"]

    first = jax.jit(lambda params, *a: step(params, None, *a))
    update = jax.jit(step)
    xs, ts, args = inputs
    stats = None
    for i in range(len(xs)):
        for lo in range(0, xs.shape[1], batch):
            rows = slice(lo, lo + batch)
            batch_in = (xs[i][rows], ts[i][rows], *(a[i][rows] for a in args))
            stats = (first(params, *batch_in) if stats is None
                     else update(params, stats, *batch_in))
    stats = flax.traverse_util.flatten_dict(stats)
    flat = flax.traverse_util.flatten_dict(params)
    out = dict(flat)
    for path, w in flat.items():
        key = (*path[:-1], path[-1] + "_sq")
        st = {k[len(key)]: v for k, v in stats.items() if k[:len(key)] == key}
        if not st or np.ndim(w) != 2:
            continue
        if rank > min(np.shape(w)):
            raise ValueError(f"lowrank={rank} is more than the rank of {'/'.join(path)} "
                             f"{tuple(np.shape(w))}; allowed: 1..{min(np.shape(w))}")
        lam = np.asarray(averaging.SimpleMovingAverage().get_calibration(st)["sq_scale"],
                         np.float64)
        scaled = np.asarray(w, np.float64) * lam[:, None]
        u, sv, vt = np.linalg.svd(scaled, full_matrices=False)
        l1, l2 = u[:, :rank] * sv[:rank], vt[:rank]
        dtype = jnp.asarray(w).dtype
        out[path] = jnp.asarray(scaled - l1 @ l2, dtype)
        stem = path[-1]
        out[(*path[:-1], stem + "_lora_a")] = jnp.asarray(l1, dtype)
        out[(*path[:-1], stem + "_lora_b")] = jnp.asarray(l2, dtype)
        out[(*path[:-1], stem + "_smooth")] = jnp.asarray(1.0 / lam, dtype)
    return flax.traverse_util.unflatten_dict(out)


def _conv_modules(params, keep):
    """Paths of the modules with a convolution kernel (4-D "kernel") outside `keep`."""
    import re

    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        module = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
        if (getattr(path[-1], "key", None) == "kernel" and jnp.ndim(leaf) == 4
                and not (keep and re.fullmatch(keep, module))):
            out.append(module)
    return out


@contextlib.contextmanager
def _conv_forward_only():
    """qwix 0.1.8's quantization-aware convolution updates its calibration statistics inside
    its custom_vjp, which leaks a tracer under jit; calibration needs no gradient, so it runs
    the convolution's forward rule alone."""
    from unittest import mock

    from qwix._src import interception
    from qwix._src.core import conv_general_qt as cq

    fwd = interception.disable_interceptions(lambda *a: cq.conv_general_qt_fwd(*a)[0])
    with mock.patch.object(cq, "conv_general_qt", fwd):
        yield


def _level(ts):
    """Each recorded call's conditioning value (the mean over its rows)."""
    return np.asarray(ts, np.float64).reshape(len(ts), -1).mean(axis=1)


def _example(model, params, inputs):
    if inputs is not None:
        xs, ts, args = inputs
        return (xs[0][:1], ts[0][:1], *(a[0][:1] for a in args))
    raise ValueError("quantize needs inputs= (recorded model calls) to know the input shape")


def param_bytes(params):
    """Bytes of a (quantized) parameter tree at its dtypes' bit widths (int4: half a byte)."""
    total = 0.0
    for leaf in jax.tree.leaves(params):
        dtype = jnp.dtype(leaf.dtype)
        bits = (jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer)
                else jnp.finfo(dtype).bits)
        total += np.prod(leaf.shape) * bits / 8
    return int(total)


__all__ = ["ACT_RANGE", "CALIBRATIONS", "KEEP", "SCHEMES", "Quantized", "QuantizedApply",
           "TimestepParams", "check_lowrank", "check_scheme", "conv_weight_grid",
           "inference_model", "pack_convs", "param_bytes", "quantize", "record_calls", "recorded",
           "rules", "unpack_convs"]
