import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU without LLVM's optimisation passes compiles the tests' programs ~4x faster and
# computes the same values (tests/_cli.py); set before jax starts, inherited by subprocesses.
from tests._cli import FAST_COMPILE  # noqa: E402

if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. XLA:CPU maps the code of every
    executable it keeps into the process; after ~1500 tests in one process the mappings passed
    the kernel's vm.max_map_count (65530) and the next compile died in a segfault. Clearing per
    module keeps the count near one module's worth (~3-6k) and frees their memory."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """Environment for `jaxdiff` subprocesses: one persistent compilation cache per test module
    (tests/_runs.py)."""
    from tests._runs import cached_env

    return cached_env(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="session")
def digits_jax_cache(tmp_path_factory):
    """One persistent compilation cache for the session's digits run (`digits_run`) and the
    modules that read it in this process (`compiled_once`)."""
    return tmp_path_factory.mktemp("digits_jax_cache")


@pytest.fixture(scope="module")
def compiled_once(digits_jax_cache):
    """JAX's persistent compilation cache in this process for one module (tests/_runs.py
    `compilation_cache`), shared by the modules that use it: the programs that `jaxdiff sample`,
    `eval`, `quantize`, `distill`... build again for the session's digits run (each module
    starts after jax.clear_caches(); a resumed run or a rebuilt train step is a new jit of the
    same program) are read back, not compiled again. A module opts in with
    `pytestmark = pytest.mark.usefixtures("compiled_once")`."""
    from tests._runs import compilation_cache

    with compilation_cache(digits_jax_cache):
        yield


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory, digits_jax_cache):
    """A tiny digits run trained once per session by the CLI (2 steps, logged every step, one
    checkpoint at step 2), for the tests that only read a trained run (test_train,
    test_eval_cli). A test that changes a run works on a copy (shutil.copytree)."""
    from tests._cli import fast_compile
    from tests._runs import TINY, cached_env, cli

    workdir = tmp_path_factory.mktemp("digits") / "run"
    env = fast_compile(cached_env(digits_jax_cache))
    out = cli(env, "train", *TINY, "--config.train.log_every=1", "--config.train.steps=2",
              "--config.train.ckpt_every=2", f"--workdir={workdir}", timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return workdir
