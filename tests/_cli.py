"""`jaxdiff` in the test process (`main`): no interpreter start and no imports, for the command
lines that stop before training starts or only read a trained run; and faster XLA compiles for
the test's subprocesses (`fast_compile`). Subprocess runs themselves: tests/_runs.py."""

import contextlib
import io


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


# XLA:CPU compiles these tests' programs about 4x faster without LLVM's optimisation passes
# (measured: a tiny MLP train step 60.6 s -> 15.6 s, its sharded init 26.2 s -> 7.5 s, at the
# same load); the programs compute the same values, only slower, which tiny runs do not notice
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def fast_compile(env):
    """`env` (a subprocess environment) with FAST_COMPILE added to its XLA_FLAGS."""
    flags = env.get("XLA_FLAGS", "")
    return dict(env, XLA_FLAGS=flags if FAST_COMPILE in flags
                else f"{flags} {FAST_COMPILE}".strip())
