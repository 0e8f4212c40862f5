"""The bad-input table: each bad config, flag, data setting, mesh or API argument stops with one
line that names the offending value (and no traceback), before any training starts.

The rows double as the README's troubleshooting table."""

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

import jaxdiff
from jaxdiff import data, models, train
from jaxdiff.core import losses, schedules
from jaxdiff.train.loop import check_loop
from tests._cli import here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = "--config=configs/digits.py"
FOUR_CPUS = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


def _has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _loop_checked():
    import inspect

    return "check_loop" in inspect.getsource(train.train)


MESH = pytest.mark.skipif(not _has("jaxdiff.train.parallel"), reason="needs jaxdiff.train.parallel")
WIRED = pytest.mark.skipif(not _loop_checked(), reason="train() does not call check_loop")

# (args, extra environment, expected text; it contains the offending value); W = a workdir
CLI = [
    pytest.param([], {}, "expected a command, one of train, sample, eval, plot; got nothing",
                 id="no-command"),
    pytest.param(["fit", CFG], {},
                 "expected a command, one of train, sample, eval, plot; got 'fit'",
                 id="unknown-command"),
    pytest.param(["train", CFG, "W", "--nosuchflag=1"], {},
                 "Unknown command line flag 'nosuchflag'", id="unknown-flag"),
    pytest.param(["train", CFG, "W", "--config.optim.lrr=1e-3"], {},
                 "unknown config key 'optim.lrr': valid keys in optim: ", id="unknown-key"),
    pytest.param(["train", CFG, "W", "--config.data.batch_size=1.5"], {},
                 "--config.data.batch_size=1.5", id="bad-value-type"),
    pytest.param(["train", "--config=configs/nope.py", "W", "--config.train.steps=3"], {},
                 "--config=configs/nope.py: no such file", id="missing-config"),
    pytest.param(["train", CFG], {}, "train needs --config=<file> and --workdir=<dir>",
                 id="missing-workdir"),
    pytest.param(["train", CFG, "W", "--config.model.name=resnet"], {},
                 "'resnet' is unknown; allowed: unet, dit, mlp", id="unknown-model"),
    pytest.param(["train", CFG, "W", "--config.data.name=mnist3"], {},
                 "Unknown dataset 'mnist3'", id="unknown-dataset"),
    pytest.param(["train", CFG, "W", "--config.data.batch_size=0"], {},
                 "batch_size must be positive, got 0", id="batch-zero"),
    pytest.param(["train", CFG, "W", "--config.mesh.fsdp=3"], {},
                 "mesh sizes data=-1, fsdp=3, tensor=1 do not fit the 1 devices",
                 id="mesh-not-dividing-devices", marks=MESH),
    pytest.param(["train", CFG, "W", "--config.mesh.data=0"], {},
                 "mesh.data=0 is not a mesh size", id="mesh-size-zero", marks=MESH),
    pytest.param(["train", CFG, "W", "--config.data.batch_size=6"], FOUR_CPUS,
                 "global batch size 6 is not divisible by data×fsdp = 4×1 = 4",
                 id="batch-not-divisible-by-data-parallel", marks=MESH),
    pytest.param(["train", CFG, "W", "--config.train.log_every=0"], {},
                 "log_every=0 must be an integer >= 1 (config: train.log_every)",
                 id="log-every-zero", marks=WIRED),
    pytest.param(["sample", "W", "--num=0"], {}, "--num=0 must be a positive number of samples",
                 id="sample-num-zero"),
    pytest.param(["sample"], {}, "sample needs --workdir=<dir> of a trained run",
                 id="sample-no-workdir"),
    pytest.param(["sample", "W"], {}, "no trained run in ", id="sample-untrained-workdir"),
]


@pytest.mark.parametrize("args,env,expected", CLI)
def test_cli_bad_input(tmp_path, capfd, args, env, expected):
    """In this process (tests/_cli.py `here`: the entry point's `main` as a fresh process runs
    it, all of stderr captured), but for a row with its own environment (4 host devices exist
    only from a process's start): `python -m jaxdiff.cli`, the real entry point."""
    args = [f"--workdir={tmp_path / 'w'}" if a == "W" else a for a in args]
    if env:
        out = subprocess.run([sys.executable, "-m", "jaxdiff.cli", *args], cwd=ROOT,
                             timeout=300, capture_output=True, text=True,
                             env=dict(os.environ, **env))
        code, err = out.returncode, out.stderr
    else:
        code, err = here(capfd, *args)
    assert code not in (0, None), err[-1500:]
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("jaxdiff")]
    assert len(errors) == 1 and expected in errors[0], err[-1500:]


def _net(x, t, *args):
    return jnp.zeros_like(x)


X, P = jnp.zeros((2, 2)), jaxdiff.EDM()
KEY = jax.random.key(0)


def _sample(**kw):
    return lambda: jaxdiff.sample(_net, X, **{"process": P, "prediction": "x0",
                                              "sampler": "euler", "steps": 4, **kw})


def _loss(**kw):
    return lambda: losses.diffusion_loss(_net, X, KEY, **{"process": P, "prediction": "x0", **kw})


def _mesh(**kw):
    def make():
        from jaxdiff.train import parallel

        return parallel.make_mesh(**kw)

    return make


def _check_batch():
    from jaxdiff.train import parallel

    four_way = types.SimpleNamespace(shape={"data": 4, "fsdp": 1, "tensor": 1})
    parallel.check_batch(6, four_way)


API = [  # (call, expected text; it contains the offending value)
    pytest.param(_sample(sampler="dpm_turbo"), "sampler='dpm_turbo' is unknown; allowed: ",
                 id="sample-unknown-sampler"),
    pytest.param(_sample(steps=0), "steps=0 must be an integer >= 1", id="sample-steps-zero"),
    pytest.param(_sample(sampler="euler_ancestral"),
                 "sampler 'euler_ancestral' is stochastic and needs key=", id="sample-no-key"),
    pytest.param(_sample(s_churn2=1.0), "sampler 'euler' has no option 's_churn2'",
                 id="sample-unknown-option"),
    pytest.param(_sample(prediction="epsilon"), "prediction='epsilon' is unknown; allowed: ",
                 id="sample-unknown-prediction"),
    pytest.param(_sample(steps=300, capacity=256), "steps=300 exceeds capacity=256",
                 id="sample-over-capacity"),
    pytest.param(lambda: schedules.get("cosine2"), "schedule='cosine2' is unknown; allowed: ",
                 id="schedule-unknown"),
    pytest.param(lambda: schedules.timesteps(jaxdiff.DiscreteVP.linear(), [10, 20, 5]),
                 "timesteps must be a strictly decreasing 1-D list, got [10.0, 20.0, 5.0]",
                 id="schedule-not-decreasing"),
    pytest.param(lambda: schedules.karras(P, 10, sigma_min=5.0, sigma_max=1.0),
                 "need 0 < sigma_min < sigma_max, got sigma_min=5, sigma_max=1",
                 id="schedule-inverted-range"),
    pytest.param(lambda: models.build("resnet"), "model 'resnet' is unknown; allowed: ",
                 id="model-unknown"),
    pytest.param(lambda: models.build("unet", widthh=3), "'unet' has no field(s) ['widthh']",
                 id="model-unknown-field"),
    pytest.param(lambda: models.build("dit", preset="DiT-Z/2"),
                 "preset 'DiT-Z/2' is unknown for 'dit'", id="model-unknown-preset"),
    pytest.param(lambda: models.build("unet", num_res_blocks=-1),
                 "unet num_res_blocks=-1 must be > 0", id="model-negative-blocks"),
    pytest.param(lambda: models.build("unet", channel_mult=()),
                 "unet channel_mult=() must be a non-empty list", id="model-empty-channel-mult"),
    pytest.param(lambda: models.build("dit", preset="DiT-S/2", class_dropout_prob=1.0),
                 "dit class_dropout_prob=1.0 must be in [0, 1)", id="model-dropout-one"),
    pytest.param(lambda: data.build("mnist3", "train", batch_size=4), "Unknown dataset 'mnist3'",
                 id="data-unknown"),
    pytest.param(lambda: data.build("digits", "train", batch_size=4, seed=-1),
                 "seed must be in [0, 2**32), got -1", id="data-negative-seed"),
    pytest.param(lambda: data.build("moons", "validation", batch_size=4),
                 "Bad split 'validation' for toy set 'moons'", id="data-unknown-split"),
    pytest.param(_loss(weighting="snr5"), "weighting='snr5' is unknown; allowed: ",
                 id="loss-unknown-weighting"),
    pytest.param(_loss(time_sampling="beta"), "time_sampling='beta' is unknown; allowed: ",
                 id="loss-unknown-time-sampling"),
    pytest.param(lambda: train.make_optimizer(lr=1e-3, total_steps=10, schedule="linear"),
                 "lr schedule='linear' is unknown; allowed: cosine, constant",
                 id="optimizer-unknown-schedule"),
    pytest.param(lambda: train.make_optimizer(lr=1e-3, total_steps=5, warmup_steps=10),
                 "warmup_steps=10 must be in [0, total_steps=5)", id="optimizer-long-warmup"),
    pytest.param(lambda: check_loop(total_steps=100, keep=0),
                 "keep=0 must be an integer >= 1", id="loop-keep-zero"),
    pytest.param(_mesh(fsdp=3), "fsdp=3, tensor=1 do not fit the 1 devices",
                 id="mesh-not-dividing-devices", marks=MESH),
    pytest.param(_mesh(data=-1, fsdp=-1), "at most one axis may be -1", id="mesh-two-rest",
                 marks=MESH),
    pytest.param(_check_batch, "global batch size 6 is not divisible by data×fsdp = 4×1 = 4",
                 id="batch-not-divisible-by-data-parallel", marks=MESH),
]


@pytest.mark.parametrize("call,expected", API)
def test_api_bad_input(call, expected):
    if jax.device_count() != 1 and "the 1 devices" in expected:
        pytest.skip("written for one device")
    with pytest.raises(ValueError) as e:
        call()
    message = str(e.value)
    assert expected in message and "\n" not in message.strip(), message
