"""`jaxdiff` in the test process (`main`; `here`, `train_here`: a command line as a fresh
process runs it, all of its stderr): no interpreter start and no imports, for the command lines
that stop before training starts, only read a trained run, or train a tiny run; and faster XLA
compiles for the test's subprocesses (`fast_compile`). Subprocess runs themselves:
tests/_runs.py."""

import contextlib
import io
import logging


def main(*args):
    """`jaxdiff <args>`: (exit code, stderr lines that start with 'jaxdiff'). Flags are reset
    before and after, as a fresh process has them."""
    from jaxdiff.cli import FLAGS
    from jaxdiff.cli import main as jaxdiff_main

    err = io.StringIO()
    FLAGS.unparse_flags()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = jaxdiff_main(["jaxdiff", *args])
    except SystemExit as e:
        code = e.code
    finally:
        FLAGS.unparse_flags()
    return code, [ln for ln in err.getvalue().splitlines() if ln.startswith("jaxdiff")]


def here(capfd, *args, stdout=False):
    """`jaxdiff ARGS` in this process, as a fresh `python -m jaxdiff.cli ARGS` would run it:
    (exit status, everything written to stderr: file descriptor 2 included with pytest's
    `capfd`, sys.stderr only with capfd=None, e.g. in a module fixture; with stdout=True and
    capfd, also what it wrote to stdout: (status, stderr, stdout)). Flags are reset
    before and after, as a fresh process has them, and sys.argv is the command line and the
    checkout the working directory, as there (ml_collections defines a flag for each
    --config.KEY override it finds in sys.argv; they go after, as they would with the
    process). What the command logs at WARNING and above, which a fresh process prints on
    stderr (pytest's log capture takes it here), is added to stderr, a line a record."""
    import os
    import sys

    from jaxdiff.cli import FLAGS
    from jaxdiff.cli import main as jaxdiff_main

    err, logged = io.StringIO(), _Logged()
    if capfd is not None:
        capfd.readouterr()
    argv, sys.argv = sys.argv, ["jaxdiff", *args]
    FLAGS.unparse_flags()
    logging.getLogger().addHandler(logged)
    try:
        with contextlib.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), (
                contextlib.redirect_stderr(err) if capfd is None else contextlib.nullcontext()):
            code = jaxdiff_main(list(sys.argv))
    except SystemExit as e:
        code = e.code
    finally:
        logging.getLogger().removeHandler(logged)
        FLAGS.unparse_flags()
        sys.argv = argv
        for name in [n for n in FLAGS if n.startswith("config.")]:
            delattr(FLAGS, name)
    if capfd is None:
        return code, err.getvalue() + logged.text()
    out = capfd.readouterr()
    return (code, out.err + logged.text(), out.out) if stdout else (code, out.err + logged.text())


class _Logged(logging.Handler):
    """The log records of WARNING and above, as lines (`here`)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    def text(self):
        return "".join(f"{line}\n" for line in self.lines)


def train_here(capfd, *args):
    """`jaxdiff train ARGS` in this process (`here`), e.g. for a train that is refused before it
    trains (one line on stderr, exit status 1 or 2)."""
    return here(capfd, "train", *args)


# XLA:CPU compiles these tests' programs about 4x faster without LLVM's optimisation passes
# (measured: a tiny MLP train step 60.6 s -> 15.6 s, its sharded init 26.2 s -> 7.5 s, at the
# same load); the programs compute the same values, only slower, which tiny runs do not notice
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def fast_compile(env):
    """`env` (a subprocess environment) with FAST_COMPILE added to its XLA_FLAGS."""
    flags = env.get("XLA_FLAGS", "")
    return dict(env, XLA_FLAGS=flags if FAST_COMPILE in flags
                else f"{flags} {FAST_COMPILE}".strip())
