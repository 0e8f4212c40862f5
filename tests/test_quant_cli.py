"""A quantized network as an artefact: `jaxdiff.accel.quant_ckpt` saves and loads it bit-exactly
(int4, float8, per-timestep scales), atomically; `jaxdiff quantize` writes one from the
session's tiny digits run (tests/conftest.py, read only: outputs go to tmp dirs via --out);
`jaxdiff sample` / `jaxdiff eval --quantized` use it; another architecture and bad flags are
one-line errors. Everything runs in this process."""

import contextlib
import io
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("qwix")

from jaxdiff.accel import quant, quant_ckpt  # noqa: E402
from jaxdiff.models import DiT  # noqa: E402

# the session's digits run read in this process: programs another module compiled for it
# are read back from the session's compilation cache (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("compiled_once")

DIT = DiT(patch_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=10)
X = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
T = jnp.linspace(-1.0, 1.0, 4)
Y = jnp.array([0, 1, 2, 0])
EXAMPLE = (X[:1], T[:1], Y[:1])
EXAMPLE_UNET = EXAMPLE  # the digits run's network input: 8x8x1, a label


def _variables(model, *inputs, seed=1):
    """Host-drawn parameters (a fresh init outputs zeros through the adaLN-zero layers)."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


VARS = _variables(DIT, X, T, Y)
# two "calls" at two noise levels: per-timestep calibration gets two groups
INPUTS = (np.stack([np.asarray(X), 3 * np.asarray(X)]),
          np.stack([np.full(4, -1.0, np.float32), np.full(4, 1.0, np.float32)]),
          (np.stack([np.asarray(Y)] * 2),))


def _bits(a):
    """An array's bytes (int4 as int8), to compare bit for bit."""
    a = np.asarray(a)
    return a.astype(np.int8) if a.dtype == jnp.int4 else a.view(np.uint8)


def _same_bits(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
            and all(x.dtype == y.dtype and x.shape == y.shape
                    and np.array_equal(_bits(x), _bits(y)) for x, y in zip(la, lb)))


@pytest.mark.parametrize("scheme,dtype,keep,lowrank", [
    ("w4a8", jnp.int4, None, 0), ("fp8", jnp.float8_e4m3fn, quant.KEEP, 0),
    ("bf16", jnp.bfloat16, None, 0), ("w4a4", jnp.int4, quant.KEEP, 2),
])
def test_save_load_is_bit_exact(tmp_path, scheme, dtype, keep, lowrank):
    """int4 and float8_e4m3fn leaves go through orbax as they are, bit for bit, and so do
    SVDQuant's low-rank and smoothing leaves (per-timestep params:
    test_quantize_writes_a_checkpoint)."""
    q = quant.quantize(DIT, VARS, scheme, inputs=INPUTS, keep=keep, lowrank=lowrank)
    assert any(a.dtype == dtype for a in jax.tree.leaves(q.params))
    if scheme == "w4a8":  # saved with another keep than quantize had: refused before writing
        with pytest.raises(quant_ckpt.QuantizedCheckpointError,
                           match=r"pass the settings that quantize was given \(keep, "):
            quant_ckpt.save_quantized(tmp_path / "q", q, example=EXAMPLE, keep=quant.KEEP)
    info = quant_ckpt.save_quantized(tmp_path / "q", q, example=EXAMPLE, meta={"step": 7},
                                     keep=keep)
    got = quant_ckpt.load_quantized(tmp_path / "q", DIT)
    assert (got.scheme, got.calibration, got.groups) == (scheme, "dynamic", 1)
    assert got.lowrank == lowrank and _same_bits(got.params, q.params)  # SVD leaves included
    saved = json.load(open(tmp_path / "q" / "quant.json"))
    assert saved["param_bytes"] == quant.param_bytes(q.params) == info["param_bytes"]
    assert saved["keep"] == keep and saved["meta"] == {"step": 7}
    assert saved["architecture"]["class"] == "DiT" and saved["disk_bytes"] > 0
    assert sorted(os.listdir(tmp_path)) == ["q"]  # no temporary directory left


def test_writing_is_atomic(tmp_path, monkeypatch):
    """A save that fails half-way leaves neither a half checkpoint nor temporary directories;
    a checkpoint already there stays whole until the new one replaces it."""
    first = quant.quantize(DIT, VARS, "w8a8", inputs=INPUTS)
    second = quant.quantize(DIT, VARS, "bf16", inputs=INPUTS)
    quant_ckpt.save_quantized(tmp_path / "q", first, example=EXAMPLE)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(quant_ckpt.json, "dump", crash)  # after the arrays, before quant.json
    with pytest.raises(OSError, match="disk full"):
        quant_ckpt.save_quantized(tmp_path / "q", second, example=EXAMPLE)
    with pytest.raises(OSError, match="disk full"):
        quant_ckpt.save_quantized(tmp_path / "new", second, example=EXAMPLE)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["q"]
    assert _same_bits(quant_ckpt.load_quantized(tmp_path / "q", DIT).params, first.params)
    quant_ckpt.save_quantized(tmp_path / "q", second, example=EXAMPLE)  # replaces it
    assert quant_ckpt.load_quantized(tmp_path / "q", DIT).scheme == "bf16"
    assert sorted(os.listdir(tmp_path)) == ["q"]


@pytest.mark.parametrize("model,match", [
    (DiT(patch_size=4, hidden_size=16, depth=2, num_heads=2, num_classes=10),
     "was quantized from another architecture (depth: 1 there, 2 in this model: DiT("),
    # qwix keeps the scales in the module's dtype
    (DiT(patch_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=10, dtype=jnp.bfloat16),
     "(dtype: float32 there, bfloat16 in this model: DiT("),
])
def test_another_architecture_is_refused(tmp_path, model, match):
    q = quant.quantize(DIT, VARS, "w8a8", inputs=INPUTS)
    quant_ckpt.save_quantized(tmp_path / "q", q, example=EXAMPLE)
    with pytest.raises(quant_ckpt.QuantizedCheckpointError) as e:
        quant_ckpt.load_quantized(tmp_path / "q", model)
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


# --- the command line -----------------------------------------------------------------------------

def _run(*args):
    """`jaxdiff <args>` in this process: (exit code, stdout, stderr lines starting 'jaxdiff')."""
    from jaxdiff.cli import FLAGS
    from jaxdiff.cli import main as jaxdiff_main

    out, err = io.StringIO(), io.StringIO()
    FLAGS.unparse_flags()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = jaxdiff_main(["jaxdiff", *args])
    except SystemExit as e:
        code = e.code
    finally:
        FLAGS.unparse_flags()
    return code, out.getvalue(), [ln for ln in err.getvalue().splitlines()
                                  if ln.startswith("jaxdiff")]


@pytest.fixture(scope="module")
def quantized(digits_run, tmp_path_factory):
    """{name: directory} of the run quantized w8a8 dynamic and w8a8 per-timestep (2 groups,
    calibrated on 4 draws, activation range 1.5), and their printed reports."""
    root = tmp_path_factory.mktemp("quantized")
    dirs, printed = {}, {}
    for name, flags in (("dynamic", ()),
                        ("timestep", ("--calibration=timestep", "--groups=2", "--calib=4",
                                      "--act_range=1.5"))):
        dirs[name] = str(root / name)
        code, out, errors = _run("quantize", f"--workdir={digits_run}", "--scheme=w8a8",
                                 f"--out={dirs[name]}", *flags)
        assert code == 0, errors
        printed[name] = out
    return dirs, printed


def test_quantize_writes_a_checkpoint(digits_run, quantized, tmp_path):
    """The two checkpoints and what was printed; per-timestep params round-trip bit for bit
    (TimestepParams: stacked flags, bounds, tree) and select their scales by t as before."""
    from ml_collections import ConfigDict

    from jaxdiff.cli import commands

    dirs, printed = quantized
    assert "calibration" not in printed["dynamic"]
    assert "calibration: 4 draws x 4 network calls (dpmpp_2m, 4 steps, guidance 2.0; seed " \
           "1000)" in printed["timestep"], printed["timestep"]
    for name, directory in dirs.items():
        info = json.load(open(os.path.join(directory, "quant.json")))
        line = next(ln for ln in printed[name].splitlines() if ln.startswith("parameters: "))
        assert f"float32 -> {info['param_bytes'] / 1e3:.3g} kB w8a8-{name}" in line, line
        assert "x smaller; keep: default); on disk " in line
        assert info["meta"]["step"] == 2 and info["meta"]["model"]["name"] == "unet"
        assert info["meta"]["float_param_bytes"] > 1.5 * info["param_bytes"]
    info = json.load(open(os.path.join(dirs["timestep"], "quant.json")))
    assert info["groups"] == 2 and len(info["timestep"]["bounds"]) == 1
    assert info["rules"]["act_range"] == 1.5 and info["rules"]["keep_weights"] == "fp32"
    assert info["meta"]["calibration_calls"] == 4 and info["meta"]["calibration_seed"] == 1000
    config = ConfigDict(json.load(open(digits_run / "config.json")))
    model, _, q, _ = commands.load_quantized(config, dirs["timestep"])
    assert isinstance(q.params, quant.TimestepParams) and q.params.groups == 2
    assert any(q.params.stacked) and not all(q.params.stacked)
    assert any(a.dtype == jnp.int8 for a in q.params.leaves)
    quant_ckpt.save_quantized(tmp_path / "again", q, example=EXAMPLE_UNET)
    got = quant_ckpt.load_quantized(tmp_path / "again", model)
    assert _same_bits(got.params, q.params) and got.params.treedef == q.params.treedef
    assert got.params.stacked == q.params.stacked
    np.testing.assert_array_equal(got.params.bounds, q.params.bounds)
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 8, 8, 1)))
    call = jax.jit(lambda fn, *args: fn(*args))
    for t in (info["timestep"]["bounds"][0] - 1, info["timestep"]["bounds"][0] + 1):
        args = (x, np.full(2, t, np.float32), np.array([1, 10], np.int32))
        np.testing.assert_array_equal(call(got.model_fn, *args), call(q.model_fn, *args))


def test_sample_and_eval_with_a_quantized_network(digits_run, quantized, tmp_path):
    """Samples from the same seed stay within 5 % (RMS) of what the network contributes to the
    float samples, and differ from them. In this 2-step run the network's output is small (its
    zero-initialised output conv has barely moved): the samples of the float network and of one
    whose output conv is zeroed differ by RMS 0.014; W8A8 moves the network's output by
    0.4 % (dynamic) and 1.7 % (per-timestep, 4 calibration draws), and the samples by 0.4 % and
    0.8 % of that 0.014 (measured), inside the bound with 6x room; a network whose quantized
    weights or scales were wrong would move them by the whole contribution."""
    from ml_collections import ConfigDict

    from jaxdiff.cli import commands
    from jaxdiff.train import parallel

    dirs, _ = quantized

    def sample(name, *flags):
        code, out, errors = _run("sample", f"--workdir={digits_run}", "--steps=4", "--num=8",
                                 f"--out={tmp_path / name}.png", *flags)
        assert code == 0, errors
        return out, np.load(tmp_path / f"{name}.npz")["samples"]

    _, ref = sample("float")
    config = ConfigDict(json.load(open(digits_run / "config.json")))
    mesh = parallel.make_mesh()
    model, process, params, _ = commands.restore(config, str(digits_run), mesh)
    zero = dict(params, conv_out=jax.tree.map(jnp.zeros_like, params["conv_out"]))
    without, _ = commands.draw(config, model, process, zero, num=8, seed=0, steps=4, mesh=mesh)
    contribution = np.sqrt(np.mean((ref - without) ** 2))
    assert contribution > 1e-3
    for name, directory in dirs.items():
        out, x = sample(name, f"--quantized={directory}")
        assert f"(8 samples, step 2, quantized w8a8-{name}" in out, out
        rms = np.sqrt(np.mean((x - ref) ** 2))
        assert 1e-6 < rms < 0.05 * contribution, (name, rms, contribution)

    report = tmp_path / "eval.json"
    code, _, errors = _run("eval", f"--workdir={digits_run}", f"--quantized={dirs['timestep']}",
                           "--metrics=fd", "--num=16", "--steps=4", f"--out={report}")
    assert code == 0, errors
    got = json.load(open(report))
    assert got["quantized"] == {"path": dirs["timestep"], "scheme": "w8a8",
                                "calibration": "timestep", "groups": 2, "lowrank": 0,
                                "param_bytes": json.load(open(os.path.join(
                                    dirs["timestep"], "quant.json")))["param_bytes"], "step": 2}
    assert np.isfinite(got["fd"]) and got["step"] == 2


def test_another_architecture_is_one_line(digits_run, tmp_path):
    """A DiT's quantized checkpoint given to the UNet run: one line, exit 1, nothing written."""
    q = quant.quantize(DIT, VARS, "w8a8", inputs=INPUTS)
    quant_ckpt.save_quantized(tmp_path / "dit", q, example=EXAMPLE)
    out = tmp_path / "out"
    out.mkdir()
    code, _, errors = _run("sample", f"--workdir={digits_run}", f"--quantized={tmp_path / 'dit'}",
                           "--num=2", f"--out={out / 'x.png'}")
    assert code == 1 and len(errors) == 1, errors
    assert errors[0].startswith(
        f"jaxdiff sample: error: --quantized={tmp_path / 'dit'}: {tmp_path / 'dit'} was quantized "
        "from another architecture (class: DiT there, UNet in this model: DiT(patch_size=4, "
        "hidden_size=16, depth=1, "), errors
    assert errors[0].endswith("); quantize this model instead"), errors
    assert not list(out.iterdir())


@pytest.mark.parametrize("args,code,match", [
    (["--scheme=w3a8"], 2, "--scheme=w3a8: quantization scheme 'w3a8' is unknown; allowed: "
     "w8a8, w4a8, w4a16, w8a16, fp8, w4a4, bf16"),
    (["--scheme=w8a8", "--calibration=minmax"], 2, "--calibration=minmax: calibration 'minmax' "
     "is unknown; allowed: dynamic, static, timestep"),
    (["--scheme=w8a8", "--calibration=timestep", "--groups=0"], 2,
     "--groups=0 must be an integer >= 1"),
    (["--scheme=w8a8", "--calib=0"], 2, "--calib=0 must be a positive number of draws"),
    (["--scheme=w8a8", "--keep=some"], 2, "--keep=some is unknown; allowed: default, none"),
    (["--scheme=w8a8", "--keep_weights=int4"], 2,
     "--keep_weights=int4 is unknown; allowed: fp32, int8"),
    (["--scheme=w8a8", "--act_range=0"], 2, "--act_range=0.0 must be a finite number > 0"),
    (["--scheme=w8a8", "--lowrank=-1"], 2, "--lowrank=-1 must be an integer >= 0 (0: none)"),
    (["--scheme=w4a4", "--lowrank=4", "--smooth=2"], 2, "--smooth=2.0 must be in [0, 1]"),
    (["--scheme=w4a16", "--lowrank=4"], 1, "lowrank=4 (SVDQuant) needs quantized weights and "
     "activations; scheme 'w4a16' quantizes not both (allowed: w4a4, w4a8, w8a8, fp8)"),
    (["--scheme=w8a8", "--calibration=static", "--lowrank=4"], 1, "lowrank=4 (SVDQuant) uses "
     "dynamic activation scales; got calibration='static' (allowed: 'dynamic')"),
    (["--scheme=w8a8", "--groups=two"], 2, "argument --groups: invalid int value: 'two'"),
    ([], 2, "the following arguments are required: --scheme"),
    (["--scheme=w4a16", "--calibration=static"], 1, "calibration='static' needs quantized "
     "activations; scheme 'w4a16' quantizes weights only (allowed: 'dynamic')"),
    (["--scheme=w8a8", "--calibration=static", "--groups=2"], 1,
     "groups=2 needs calibration='timestep', not 'static'"),
])
def test_bad_quantize_flags_are_one_line(digits_run, tmp_path, args, code, match):
    got, _, errors = _run("quantize", f"--workdir={digits_run}", f"--out={tmp_path / 'q'}",
                          *args)
    assert got == code and len(errors) == 1, errors
    assert errors[0] == f"jaxdiff quantize: error: {match}", errors
    assert not list(tmp_path.iterdir())


def test_quantize_needs_a_checkpoint(digits_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text((digits_run / "config.json").read_text())
    code, _, errors = _run("quantize", f"--workdir={run}", "--scheme=w8a8")
    assert code == 1 and len(errors) == 1, errors
    assert errors[0].startswith(f"jaxdiff quantize: error: no checkpoint in {run}/checkpoints; "
                                "train first"), errors
    code, _, errors = _run("quantize", f"--workdir={tmp_path / 'none'}", "--scheme=w8a8")
    assert code == 1 and errors == [
        f"jaxdiff quantize: error: no trained run in {tmp_path / 'none'} ("
        f"{tmp_path / 'none' / 'config.json'} is missing); train first with: jaxdiff train "
        "--config ... --workdir ..."], errors
    assert not (run / "quantized").exists()


@pytest.mark.parametrize("args,match", [
    (["sample", "--quantized=NOPE"], "--quantized=NOPE: no such directory; expected a directory "
     "written by jaxdiff quantize"),
    (["sample", "--quantized=EMPTY"], "--quantized=EMPTY is not a quantized checkpoint (no "
     "quant.json)"),
    (["eval", "--quantized=Q", "--cache=deepcache"], "--quantized=Q and --cache=deepcache: a "
     "feature cache runs the float network; give one of them"),
    (["plot", "--quantized=Q"], "--quantized=Q: it is a flag of jaxdiff sample and eval, not of "
     "jaxdiff plot"),
])
def test_bad_quantized_flag_is_one_line(digits_run, tmp_path, args, match):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "Q").mkdir()
    (tmp_path / "Q" / "quant.json").write_text("{}")
    paths = {f"--quantized={n}": f"--quantized={tmp_path / n}" for n in ("NOPE", "EMPTY", "Q")}
    args = [paths.get(a, a) for a in args]
    for n in ("NOPE", "EMPTY", "Q"):
        match = match.replace(f"--quantized={n}", f"--quantized={tmp_path / n}")
    code, _, errors = _run(*args[:1], f"--workdir={digits_run}", *args[1:])
    assert code == 2 and len(errors) == 1 and match in errors[0], errors


def test_quantize_help():
    code, out, errors = _run("quantize", "--help")
    assert code == 0 and not errors
    assert out.startswith("usage: jaxdiff quantize --workdir RUN --scheme NAME")
    assert "example:\n  jaxdiff quantize --workdir" in out and len(out.splitlines()) < 60
