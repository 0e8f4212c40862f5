"""Feature caches from the command line and configs: `parse_cache`'s specs, `sampler.cache` in a
config (checked with the rest of it), and `jaxdiff sample --cache` on the session's tiny digits
run (tests/conftest.py, read only): the cost line, the config's cache, and DeepCache at interval
1 giving the uncached samples. Everything runs in this process."""

import contextlib
import io
import json
import os
import runpy

import numpy as np
import pytest
from ml_collections import ConfigDict

from jaxdiff.accel.cache import describe_cost, format_cache, parse_cache
from jaxdiff.cli.validate import check_config
from tests._cli import main

# the session's digits run read in this process: programs another module compiled for it
# are read back from the session's compilation cache (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("compiled_once")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("spec,want", [
    ("deepcache:interval=3,skip_level=1", ("deepcache", {"interval": 3, "skip_level": 1})),
    ("taylorseer", ("taylorseer", {})),
    (" fbcache : threshold = 0.1 ", ("fbcache", {"threshold": 0.1})),
    ("deepcache:full_calls=0/1/2/4/8", ("deepcache", {"full_calls": [0, 1, 2, 4, 8]})),
    ("deepcache:full_calls=0", ("deepcache", {"full_calls": [0]})),  # a list of one
    ("delta_dit:interval=2,boundary=10,blocks=1",
     ("delta_dit", {"interval": 2, "boundary": 10, "blocks": 1})),
    (None, None), ("", None), ("none", None), ("None", None),
])
def test_parse_cache(spec, want):
    assert parse_cache(spec) == want
    if want is not None:  # format_cache is its inverse
        assert parse_cache(format_cache(*want)) == want


@pytest.mark.parametrize("spec,match", [
    ("nosuch", "cache 'nosuch' is unknown; allowed: deepcache, fbcache, taylorseer, delta_dit"),
    ("deepcache:every=2", "cache 'deepcache' has no setting 'every'; allowed: interval, "
     "skip_level, full_calls"),
    ("deepcache:interval", "item 'interval' is not KEY=VALUE; allowed: NAME[:KEY=VALUE,...]"),
    ("deepcache:interval=two", "interval='two' is not a number"),
    ("deepcache:full_calls=0,1", "item '1' is not KEY=VALUE"),  # lists are joined by /
    ("deepcache:full_calls=0/x", "full_calls='0/x' is not a list of call indices; allowed: "
     "integers joined by '/'"),
    ("deepcache:interval=2,interval=3", "setting 'interval' is given twice"),
    (3, "cache 3 is not a cache spec"),
])
def test_parse_cache_errors_are_one_line(spec, match):
    with pytest.raises(ValueError) as e:
        parse_cache(spec)
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_describe_cost():
    state = {"calls": np.int32(20), "fulls": np.int32(7)}
    line = describe_cost("deepcache:interval=3", state, (10.0, 2.0))  # (7·10 + 13·2) / 200
    assert line == ("deepcache (interval=3): 7 of 20 calls full, 0.48 full-network equivalents "
                    "(XLA FLOPs)")
    assert describe_cost("taylorseer", state, (10.0, 2.0)).startswith("taylorseer: 7 of 20")


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


def test_sample_with_a_cache(digits_run, tmp_path, monkeypatch):
    """The run: a 1-level UNet under CFG (guidance 2), dpmpp_2m (one call per step). DeepCache
    at interval 2 runs the full network at calls 0 and 2 of 4; at interval 1 at every call,
    which is the uncached sampler; the config's sampler.cache applies without the flag."""
    import jaxdiff.cli as cli

    def sample(name, *flags):
        code, out, errors = _run("sample", f"--workdir={digits_run}", "--steps=4", "--num=8",
                                 f"--out={tmp_path / name}.png", *flags)
        assert code == 0, errors
        return out, np.load(tmp_path / f"{name}.npz")["samples"]

    out, every = sample("every", "--cache=deepcache:interval=1")
    assert "cache deepcache (interval=1): 4 of 4 calls full, 1.00 full-network" in out, out
    out, plain = sample("plain", "--cache=none")
    assert "full-network equivalents" not in out, out
    np.testing.assert_allclose(every, plain, rtol=0, atol=1e-5)
    assert every.shape == (8, 8, 8, 1) and np.isfinite(every).all()

    config = json.load(open(digits_run / "config.json"))  # read only: the run is shared
    config["sampler"]["cache"] = "deepcache:interval=2"
    monkeypatch.setattr(cli, "_run_config", lambda command: ConfigDict(config))
    out, cached = sample("cached")
    fne = float(out.split("2 of 4 calls full, ")[1].split()[0])
    assert "cache deepcache (interval=2): 2 of 4 calls full," in out, out
    assert 0.5 < fne < 1  # half the calls ran the shallow branch, which costs something
    assert np.isfinite(cached).all()


@pytest.mark.parametrize("flags,code,match", [
    (["--cache=nosuch"], 2, "jaxdiff sample: error: --cache=nosuch: cache 'nosuch' is unknown; "
     "allowed: deepcache, fbcache, taylorseer, delta_dit"),
    (["--cache=deepcache:interval"], 2, "--cache=deepcache:interval: cache spec "),
    (["--cache=taylorseer"], 1, "--cache=taylorseer: cache 'taylorseer' is for a DiT, got a "
     "UNet; allowed for it: deepcache"),
    (["--cache=deepcache", "--sampler=ode"], 1, "--cache=deepcache: sampler 'ode' (diffrax, "
     "adaptive) cannot carry a cache's state"),
], ids=["unknown", "malformed", "backbone", "ode"])
def test_bad_cache_flag_is_one_line(digits_run, tmp_path, monkeypatch, flags, code, match):
    monkeypatch.chdir(tmp_path)
    got, errors = main("sample", f"--workdir={digits_run}", "--num=2",
                       f"--out={tmp_path / 'x.png'}", *flags)
    assert got == code and len(errors) == 1 and match in errors[0], errors
    assert not list(tmp_path.iterdir())


def _digits(**sampler):
    """configs/digits.py as the CLI loads it, with `sampler` keys set."""
    config = runpy.run_path(os.path.join(ROOT, "configs", "digits.py"))["get_config"]()
    config.unlock()
    for key, value in sampler.items():
        config.sampler[key] = value
    return config


@pytest.mark.parametrize("sampler,match", [
    (dict(cache="fbcache"), "sampler.cache='fbcache': cache 'fbcache' is for a DiT, got a UNet; "
     "allowed for it: deepcache"),
    (dict(cache="deepcache:skip_level=9"), "sampler.cache='deepcache:skip_level=9': cache "
     "'deepcache' skip_level=9 must be at most 3 (the UNet's encoder skips)"),
    (dict(cache="deepcache:interval=0"), "sampler.cache='deepcache:interval=0': cache "
     "'deepcache' interval=0 must be an integer >= 1"),
    (dict(cache="deepcache:every=2"), "sampler.cache='deepcache:every=2': cache 'deepcache' has "
     "no setting 'every'"),
    (dict(cache="deepcache", name="ode"), "sampler.cache='deepcache' needs a fixed-grid "
     "sampler: sampler.name='ode'"),
], ids=["backbone", "skip-level", "interval", "setting", "ode"])
def test_config_cache_is_checked(sampler, match):
    with pytest.raises(ValueError) as e:
        check_config(_digits(**sampler))
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_config_cache_passes_and_may_be_missing():
    check_config(_digits(cache="deepcache:interval=3,skip_level=1"))
    config = _digits()
    del config.sampler["cache"]  # configs written before sampler.cache
    check_config(config)


def test_train_takes_the_cache_from_the_command_line(tmp_path, capfd):
    """--config.sampler.cache=... overrides the config's placeholder (a None field could not be
    overridden); the cache is checked with the rest of the config, before anything is written.
    `train_here` (tests/_cli.py): absl parses the --config.* overrides it finds in sys.argv,
    which it sets as a fresh process has it."""
    from tests._cli import train_here

    workdir = tmp_path / "run"
    code, err = train_here(capfd, "--config=configs/digits.py", f"--workdir={workdir}",
                           "--config.sampler.cache=fbcache")
    errors = [ln for ln in err.splitlines() if ln.startswith("jaxdiff")]
    assert code == 1 and errors == [
        "jaxdiff train: error: sampler.cache='fbcache': cache 'fbcache' is for a DiT, got a UNet; "
        "allowed for it: deepcache"], err[-2000:]
    assert not workdir.exists()


def test_train_refuses_the_cache_flag(tmp_path):
    got, errors = main("train", f"--config={ROOT}/configs/digits.py",
                       f"--workdir={tmp_path / 'run'}", "--cache=deepcache")
    assert got == 2 and errors == [
        "jaxdiff train: error: --cache=deepcache: it is a flag of jaxdiff sample and eval, not of "
        "jaxdiff train; training-time samples take the config's: "
        "--config.sampler.cache=deepcache"], errors
    assert not (tmp_path / "run").exists()
