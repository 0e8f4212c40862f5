"""Every `jaxdiff` failure is one line: each bad invocation below exits non-zero with exactly one
line on stderr that names the offending value (no traceback), and creates or changes nothing
in the sandbox or in the trained run it points at. The invocations run in this process
(tests/_cli.py `here`: the entry point's `main`, sys.argv and working directory as a fresh
process has them, all of stderr captured), but for SHELL, which runs `python -m jaxdiff.cli`."""

import hashlib
import os
import re
import subprocess
import sys

import pytest

from tests._cli import here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
TINY = [  # a toy run that trains in seconds
    "--config=configs/toy2d.py", "--config.model.width=16", "--config.model.depth=1",
    "--config.data.batch_size=16", "--config.optim.warmup_steps=1", "--config.train.steps=2",
    "--config.train.ckpt_every=2", "--config.train.log_every=1", "--config.train.sample_every=0",
    "--config.train.num_samples=16", "--config.sampler.steps=2",
]
HUGE = 10**13  # samples or examples: petabytes, more than any host or device has
FILES = {  # the sandbox: broken config files and broken runs
    "syntax.py": "def get_config(:\n",
    "noget.py": "x = 1\n",
    "raises.py": "def get_config():\n    raise RuntimeError('boom')\n",
    "afile": "not a directory\n",
    "truncated/config.json": '{"model": {"name": "mlp", "wid',
    "notarun/config.json": "[1, 2, 3]\n",
}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxdiff.cli", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny trained toy run (unconditional), shared by the rows that read a run; trained in
    this process."""
    workdir = tmp_path_factory.mktemp("clierr") / "run"
    code, err = here(None, "train", *TINY, f"--workdir={workdir}")
    assert code in (0, None), err[-2000:]
    return str(workdir)


@pytest.fixture
def sandbox(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return str(tmp_path)


def _tree(*roots):
    """{path: sha256} of every file and directory under `roots`."""
    found = {}
    for root in roots:
        for d, dirs, files in os.walk(root):
            found[d] = "dir"
            for f in files:
                with open(os.path.join(d, f), "rb") as fh:
                    found[os.path.join(d, f)] = hashlib.sha256(fh.read()).hexdigest()
    return found


T = "train", "--config=configs/toy2d.py"
# (args, text the one line must contain: the offending value and what is allowed);
# {S}: the sandbox, {R}: the trained run
CASES = [
    pytest.param(["train", "--config={S}/nope.py", "--workdir={S}/w"],
                 "--config={S}/nope.py: no such file; expected a Python file", id="config-missing"),
    pytest.param(["train", "--config={S}", "--workdir={S}/w"],
                 "--config={S} is a directory; expected a Python file", id="config-directory"),
    pytest.param(["train", "--config={S}/syntax.py", "--workdir={S}/w"],
                 "--config={S}/syntax.py: syntax error at line 1", id="config-syntax-error"),
    pytest.param(["train", "--config={S}/noget.py", "--workdir={S}/w"],
                 "--config={S}/noget.py has no get_config()", id="config-no-get-config"),
    pytest.param(["train", "--config={S}/raises.py", "--workdir={S}/w"],
                 "--config={S}/raises.py: loading it failed: RuntimeError: boom",
                 id="config-get-config-raises"),
    pytest.param([*T, "--workdir={S}/afile"], "--workdir={S}/afile is a file; expected a run "
                 "directory", id="workdir-is-a-file"),
    pytest.param([*T, "--workdir={S}/afile/run"], "--workdir={S}/afile/run: {S}/afile is a "
                 "file, not a directory", id="workdir-under-a-file"),
    pytest.param([*T, "--workdir={S}/w", f"--config.data.batch_size={HUGE}"],
                 f"--config.data.batch_size={HUGE}: a training batch would take at least",
                 id="train-batch-too-large"),
    pytest.param(["sample", "--workdir={R}", "--smaples=3"],
                 "Unknown command line flag 'smaples'. Did you mean: sampler", id="unknown-flag"),
    pytest.param(["smaple", "--workdir={R}"], "got 'smaple'; did you mean sample?",
                 id="unknown-command"),
    pytest.param(["sample", "--workdir={R}", "--out={S}/missing/grid.png"],
                 "--out={S}/missing/grid.png: the directory {S}/missing does not exist",
                 id="out-missing-directory"),
    pytest.param(["sample", "--workdir={R}", "--out={S}/afile/grid.png"],
                 "--out={S}/afile/grid.png: {S}/afile is a file", id="out-under-a-file"),
    pytest.param(["sample", "--workdir={R}", "--out={S}/grid.jpg"],
                 "--out={S}/grid.jpg: sample writes .png or .txt files; allowed: a name ending in "
                 ".png or .txt",
                 id="out-not-png"),
    pytest.param(["sample", "--workdir={R}", f"--num={HUGE}"],
                 f"--num={HUGE}: the samples would take at least", id="sample-num-too-large"),
    pytest.param(["sample", "--workdir={R}", "--num=0"], "--num=0 must be a positive number",
                 id="sample-num-zero"),
    pytest.param(["sample", "--workdir={R}", "--seed=-1"], "--seed=-1 must be an integer in [0,",
                 id="sample-seed-negative"),
    pytest.param(["sample", "--workdir={R}", "--guidance=2"], "--guidance=2.0: this model is "
                 "unconditional (model.num_classes=0", id="sample-guidance-unconditional"),
    pytest.param(["sample", "--workdir={R}", "--class=1"], "--class=1: this model is "
                 "unconditional", id="sample-class-unconditional"),
    pytest.param(["eval", "--workdir={R}", "--guidance=3", "--num=10"], "--guidance=3.0: this "
                 "model is unconditional", id="eval-guidance-unconditional"),
    pytest.param(["eval", "--workdir={R}", "--steps=0"], "--steps=0 must be a positive integer",
                 id="eval-steps-zero"),
    pytest.param(["sample", "--workdir={S}/truncated"], "{S}/truncated/config.json is not valid "
                 "JSON", id="config-json-truncated"),
    pytest.param(["plot", "--workdir={S}/notarun"], "{S}/notarun/config.json is not a jaxdiff "
                 "run config", id="config-json-not-a-config"),
    pytest.param(["sample", "--workdir={S}/afile"], "--workdir={S}/afile is a file",
                 id="sample-workdir-is-a-file"),
]


SHELL = {"train-batch-too-large"}  # a fresh `python -m jaxdiff.cli`: the real entry point


@pytest.mark.parametrize("args,expected", CASES)
def test_failure_is_one_line_and_changes_nothing(request, capfd, sandbox, args, expected):
    where = {"S": sandbox}
    if any("{R}" in a for a in args):
        where["R"] = request.getfixturevalue("run")
    roots = list(where.values())
    before = _tree(*roots)
    argv = [a.format(**where) for a in args]
    if request.node.callspec.id in SHELL:
        out = _cli(*argv)
        code, err = out.returncode, out.stderr
    else:
        code, err = here(capfd, *argv)
    lines = err.strip().splitlines()
    assert code not in (0, None), err[-1000:]
    assert len(lines) == 1 and expected.format(**where) in lines[0], err[-3000:]
    assert lines[0].startswith("jaxdiff"), lines
    assert _tree(*roots) == before, "a failed command created or changed files"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only directories")
def test_out_in_read_only_directory(run, tmp_path, capfd):
    tmp_path.chmod(0o555)
    try:
        code, err = here(capfd, "sample", f"--workdir={run}", f"--out={tmp_path}/grid.png")
    finally:
        tmp_path.chmod(0o755)
    assert code not in (0, None) and f"the directory {tmp_path} is not writable" in err
    assert len(err.strip().splitlines()) == 1 and not os.listdir(tmp_path)


def test_unwritable_directory_is_refused(monkeypatch, tmp_path):
    """What the read-only test checks, where permission bits do not apply (as root)."""
    from jaxdiff.cli import flags as cli_flags

    monkeypatch.setattr(os, "access", lambda *args: False)
    with pytest.raises(ValueError, match="is not writable; allowed: a directory"):
        cli_flags._check_writable("--out", f"{tmp_path}/grid.png", str(tmp_path), create=False)
    with pytest.raises(ValueError, match=re.escape(f"--workdir={tmp_path}/run: the directory")):
        cli_flags._check_writable("--workdir", f"{tmp_path}/run", f"{tmp_path}/run")


def test_memory_check_names_the_flag_and_the_limit(monkeypatch):
    from ml_collections import ConfigDict

    from jaxdiff.cli import flags as cli_flags

    config = ConfigDict({"data": {"name": "moons", "data_dir": None}})
    monkeypatch.setattr(cli_flags, "_memory_limit", lambda: (10 * 2**30, "2 gpu device(s)"))
    cli_flags.check_memory("--num", 10**8, config, "the samples")  # 3 GiB: fits
    with pytest.raises(ValueError) as e:
        cli_flags.check_memory("--num", 10**9, config, "the samples")
    assert str(e.value).startswith("--num=1000000000: the samples would take at least 29.8 GiB")
    assert "more than the 10 GiB available on 2 gpu device(s)" in str(e.value)
    assert cli_flags._host_available() > 0


def test_config_file_runs_once(tmp_path):
    """The CLI loads --config itself (one-line errors) and hands that config to absl's flag,
    so the file runs once: FLAGS.config is the config it loaded, locked."""
    import contextlib
    import io

    from jaxdiff import cli

    runs = tmp_path / "runs.txt"
    path = tmp_path / "counting.py"
    path.write_text(f"import ml_collections\nopen({str(runs)!r}, 'a').write('x')\n\n\n"
                    "def get_config():\n    return ml_collections.ConfigDict(dict(a=1))\n")
    cli.FLAGS.unparse_flags()
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            code = cli.main(["jaxdiff", "sample", f"--config={path}", "--num=0"])  # refused
        assert code == 2 and "--num=0 must be a positive number" in err.getvalue()
        assert cli.FLAGS.config.a == 1 and cli.FLAGS.config.is_locked
    finally:
        cli.FLAGS.unparse_flags()
    assert runs.read_text() == "x"


def test_eval_flag_names_are_the_librarys():
    """The CLI checks --features and --divergence before importing jax, against its own copies
    of the library's names; they must agree."""
    from jaxdiff.cli import flags as cli_flags
    from jaxdiff.core import likelihood
    from jaxdiff.eval import quality

    assert cli_flags.FEATURES == quality.FEATURES
    assert cli_flags.DIVERGENCES == likelihood.DIVERGENCES


def _launch(tmp_path, python, *args):
    env = dict(ENV, PYTHON=python)
    return subprocess.run(["bash", "launch/local.sh", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_local_sh_names_the_python_without_jaxdiff(tmp_path):
    bare = tmp_path / "python"  # the same interpreter, without site-packages nor the checkout
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")
    bare.chmod(0o755)
    out = _launch(tmp_path, str(bare), "2", "train", "--config=configs/toy2d.py")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        f"launch/local.sh: error: {bare} cannot import jaxdiff; point PYTHON at an environment "
        f"that has it, e.g. PYTHON={ROOT}/.venv/bin/python launch/local.sh 2 train "
        "--config=configs/toy2d.py"]
    out = _launch(tmp_path, sys.executable, "two", "train")
    assert out.returncode == 2 and out.stderr.startswith("launch/local.sh: error: N=two must be")


def test_device_out_of_memory_while_sampling_names_num():
    from jaxdiff import cli

    error = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB.\n"
                         "BufferAssignment OOM Debugging.\n...")
    cli.FLAGS.unparse_flags()
    try:
        cli.FLAGS(["jaxdiff", "--num=5000"])
        message = cli._oom_message("sample", error)
        assert cli._oom_message("eval sweep", ValueError("x")) is None
    finally:
        cli.FLAGS.unparse_flags()
    assert message.startswith("out of memory on ") and "\n" not in message
    assert "allocate 8.00GiB" in message and message.endswith("use a smaller --num (now 5000)")


def test_library_advice_becomes_flags():
    """The library's errors name its own arguments; the CLI swaps each phrase for the flag that
    does it (jaxdiff.cli.hints.FLAG_WORDS), and every library phrase has a flag."""
    import numpy as np

    from jaxdiff.cli import hints
    from jaxdiff.train import checkpoint, nonfinite, rundir

    with pytest.raises(FloatingPointError) as e:
        nonfinite.check_finite({"loss": np.float32(np.nan)}, 3)
    library = str(e.value)
    assert "--" not in library
    assert hints.flag_words(library) == (
        "non-finite loss at step 3; no checkpoint was written yet; lower --config.optim.lr, or "
        "set --config.train.skip_nonfinite=True to skip such updates")
    phrases = (nonfinite.LOWER_LR, nonfinite.SKIP, checkpoint.FRESH_WORKDIR, rundir.OTHER_WORKDIR)
    assert set(hints.FLAG_WORDS) == set(phrases)
    for phrase in phrases:
        assert "--" not in phrase and hints.flag_words(f"x {phrase} y").count("--") == 1
    assert hints.flag_words("use a fresh work directory or the original config") == (
        "use a fresh --workdir or the original config")
