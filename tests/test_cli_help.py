"""`jaxdiff --help` and each command's help: its own short usage (purpose, flags, an example),
exit 0; `--helpfull` adds every flag; no command at all is a usage error (exit 2)."""

import contextlib
import io
import os
import subprocess
import sys

import pytest

from jaxdiff.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FORMS = [  # (arguments, what the help must name: the command's usage line)
    (["--help"], "usage: jaxdiff COMMAND"),
    (["-h"], "usage: jaxdiff COMMAND"),
    (["help"], "usage: jaxdiff COMMAND"),
    (["help", "train"], "usage: jaxdiff train"),
    (["train", "--help"], "usage: jaxdiff train"),
    (["train", "--config=configs/toy2d.py", "-h"], "usage: jaxdiff train"),
    (["sample", "--help"], "usage: jaxdiff sample"),
    (["help", "sample"], "usage: jaxdiff sample"),
    (["eval", "--help"], "usage: jaxdiff eval --workdir"),
    (["eval", "sweep", "--help"], "usage: jaxdiff eval sweep"),
    (["help", "eval", "sweep"], "usage: jaxdiff eval sweep"),
    (["plot", "--help"], "usage: jaxdiff plot"),
]


def _main(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["jaxdiff", *args])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("args,usage", FORMS, ids=[" ".join(f[0]) for f in FORMS])
def test_help_is_the_commands_own_short_usage(args, usage):
    code, out, err = _main(*args)
    assert code == 0 and not err, err
    lines = out.splitlines()
    assert lines[0].startswith(usage), out
    assert "example:" in out and len(lines) < 60, out
    example = out.split("example:")[1]
    command = usage.split("jaxdiff ")[1].split(" --")[0]
    if command != "COMMAND":
        assert f"jaxdiff {command} --" in example, out


def test_helpfull_prints_every_flag():
    code, out, _ = _main("sample", "--helpfull")
    assert code == 0 and out.startswith("usage: jaxdiff sample")
    assert "--inception_weights" in out and "--verbosity" in out and len(out.splitlines()) > 60


def test_help_for_no_such_command_is_one_line():
    code, out, err = _main("help", "fit")
    assert code == 2 and not out
    assert err.strip() == ("jaxdiff help: error: no command 'fit'; allowed: train, sample, "
                           "eval, eval sweep, plot")


def test_from_the_shell():
    """The real entry: `train --help` exits 0 with train's usage; no command prints the
    overview on stderr and exits 2."""
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "jaxdiff.cli", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))

    out = cli("train", "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: jaxdiff train"), out.stderr
    assert len(out.stdout.splitlines()) < 60 and not out.stderr
    out = cli()
    assert out.returncode == 2 and not out.stdout
    assert out.stderr.startswith("usage: jaxdiff COMMAND") and "example:" in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "jaxdiff: expected a command, one of train, sample, eval, plot; got nothing "
        "(jaxdiff --help: the commands)")
