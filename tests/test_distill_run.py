"""`jaxdiff distill` and `jaxdiff.cli.distill_stages` on the session's tiny digits run: stages as
training runs, the teacher's record and its params untouched, kill-and-resume bit-identical
mid-round, students sampled through `jaxdiff sample`, one-line errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from jaxdiff import train as train_lib
from jaxdiff.cli import build, commands
from jaxdiff.cli import distill_stages as run
from jaxdiff.data import pairs
from jaxdiff.distill import graft, params_digest, teacher_record
from jaxdiff.train import loop
from tests._cli import main

# the library's run of the CLI's distillation and its resume compile the CLI's programs again:
# read back from the session's compilation cache (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("compiled_once")

FAST = ["--config.train.steps=3", "--config.optim.warmup_steps=1", "--config.train.log_every=1",
        "--config.train.ckpt_every=1", "--config.train.num_samples=4"]


def _teacher(workdir):
    cfg = ConfigDict(json.load(open(workdir / "config.json")))
    _, _, params, step = commands.restore(cfg, str(workdir), build.mesh(cfg))
    return cfg, jax.device_get(params), step


def _student(teacher_dir, method, **settings):
    cfg, params, step = _teacher(teacher_dir)
    config = run.student_config(cfg.to_dict(), method, **settings)
    config.train.steps, config.optim.warmup_steps = 3, 1
    config.train.log_every = config.train.ckpt_every = 1
    return config, params, teacher_record(str(teacher_dir), step, params)


PD = ["--method=progressive", "--config.distill.teacher_steps=4",
      "--config.distill.student_steps=1", *FAST]


@pytest.fixture(scope="module")
def pd_run(digits_run, tmp_path_factory):
    """A two-round progressive distillation (4 -> 2 -> 1 steps) of the session's run, by the
    CLI."""
    work = tmp_path_factory.mktemp("distill") / "pd"
    code, errors = main("distill", f"--teacher={digits_run}", f"--workdir={work}", *PD)
    assert code == 0, errors
    return work


def test_progressive_cli_records_its_teacher_and_samples(digits_run, pd_run, tmp_path):
    work = pd_run
    _, params, step = _teacher(digits_run)
    before = params_digest(params)
    config = json.load(open(work / "config.json"))
    assert config["teacher"] == dict(workdir=os.path.abspath(digits_run), step=step,
                                     params_sha256=before)
    base = run.base_grid(ConfigDict(config), build.process(ConfigDict(config)))
    assert config["sampler"]["name"] == "ddim" and config["sampler"]["steps"] == 1
    np.testing.assert_allclose(config["sampler"]["schedule"], base[::4], rtol=1e-6)
    # round 1 (4 -> 2 steps) in stages/, round 2 (2 -> 1) in the workdir itself
    stage = json.load(open(work / "stages" / "0-pd2" / "config.json"))
    np.testing.assert_allclose(stage["sampler"]["schedule"], base[::2], rtol=1e-6)
    assert os.listdir(work / "stages" / "0-pd2" / "checkpoints") and os.listdir(
        work / "checkpoints")
    code, errors = main("sample", f"--workdir={work}", "--num=4", f"--out={tmp_path}/s.png")
    assert code == 0 and os.path.exists(tmp_path / "s.png"), errors
    # it absorbed CFG at the teacher's scale: another one is refused in one line
    code, errors = main("sample", f"--workdir={work}", "--num=4", "--guidance=3",
                        f"--out={tmp_path}/t.png")
    assert code == 1 and "absorbed classifier-free guidance at 2.0" in errors[-1], errors
    # the same command again: every stage is done, nothing retrains, the student is unchanged
    final = params_digest(_teacher(work)[1])
    code, errors = main("distill", f"--teacher={digits_run}", f"--workdir={work}", *PD)
    assert code == 0, errors
    assert params_digest(_teacher(work)[1]) == final


class _Killed(Exception):
    pass


def test_kill_mid_round_then_resume_is_bit_identical(digits_run, pd_run, tmp_path,
                                                     monkeypatch):
    """The CLI's run, again through the library, killed in round 2 after its first checkpoint
    and resumed: the same student bit for bit, the teacher's params untouched."""
    from jaxdiff.cli.distill import apply_overrides, parse

    args, overrides = parse([f"--teacher={digits_run}", "--workdir=unused", *PD])
    cfg, params, step = _teacher(digits_run)
    config = run.student_config(cfg.to_dict(), args.method)
    apply_overrides(config, overrides)
    record = teacher_record(str(digits_run), step, params)
    before = params_digest(params)
    real = loop.check_finite
    calls = []

    def kill_in_round_two(metrics, step, ckpt):
        calls.append(step)  # twice a step: after logging, before the checkpoint
        if len(calls) > 4 and step == 2:  # round 2, after its checkpoint at step 1
            raise _Killed
        return real(metrics, step, ckpt)

    monkeypatch.setattr(loop, "check_finite", kill_in_round_two)
    with pytest.raises(_Killed):
        run.distill(ConfigDict(config.to_dict()), str(tmp_path / "b"), teacher_params=params,
                    record=record, log=False)
    monkeypatch.setattr(loop, "check_finite", real)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["1"]
    resumed = run.distill(ConfigDict(config.to_dict()), str(tmp_path / "b"),
                          teacher_params=params, record=record, log=False)
    assert params_digest(resumed) == params_digest(_teacher(pd_run)[1])
    assert params_digest(params) == before  # the frozen teacher was never donated or updated


def test_help_is_the_commands_usage(capsys):
    from jaxdiff.cli import distill

    assert distill.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: jaxdiff distill --teacher RUN --method NAME --workdir DIR")
    assert "progressive, guided, cd, ct, reflow" in out


def test_guided_student_takes_w_and_starts_as_the_conditional_teacher(digits_run, tmp_path):
    config, params, _ = _student(digits_run, "guided", teacher_steps=2, student_steps=1)
    # a 2-step run is still nearly its zero-initialised output layer: perturb every weight so
    # that gradients reach the w embedding (one draw cut into the leaves: one small program, not
    # one per leaf shape)
    leaves, tree = jax.tree.flatten(params)
    ends = np.cumsum([p.size for p in leaves])
    noise = np.asarray(jax.random.normal(jax.random.key(0), (int(ends[-1]),)))
    params = jax.tree.unflatten(tree, [np.asarray(p) + 0.05 * noise[e - p.size:e].reshape(p.shape)
                                       for p, e in zip(leaves, ends)])
    record = teacher_record(str(digits_run), 2, params)
    config.train.steps = 2  # the learning rate is 0 at step 0 (warmup)
    student = run.distill(config, str(tmp_path / "g"), teacher_params=params, record=record,
                          log=False)
    saved = ConfigDict(json.load(open(tmp_path / "g" / "config.json")))
    assert saved.model.guidance_embed is True and saved.sampler.name == "ddim"
    model = build.model(saved)
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
    t, y = np.full(3, 0.3, np.float32), np.array([1, 2, 3], np.int32)
    outs = [model.apply({"params": student}, x, t, y, w=np.full(3, w, np.float32))
            for w in (1.0, 4.0)]
    assert float(np.abs(outs[0] - outs[1]).max()) > 0  # w changes the output
    # at init the w embedding adds zero: the student is the conditional teacher for every w
    tx, _ = build.optimizer(saved)
    fresh = graft(train_lib.init_state(model, tx, x_shape=(8, 8, 1), num_classes=10,
                                            seed=0, ema_decays=(0.9,)).params, params)
    init = [model.apply({"params": fresh}, x, t, y, w=np.full(3, w, np.float32))
            for w in (1.0, 4.0)]
    teacher = build.model(ConfigDict(dict(saved.to_dict(), model=dict(
        {k: v for k, v in saved.model.items() if k != "guidance_embed"}))))
    want = teacher.apply({"params": params}, x, t, y)
    np.testing.assert_allclose(init[0], want, atol=1e-6)
    np.testing.assert_allclose(init[1], want, atol=1e-6)
    cond = run.conditioning(saved, np.array([1, 2], np.int32), 3.0)
    assert len(cond.args) == 2 and np.allclose(cond.args[1], 3.0)


def test_reflow_pairs_go_through_the_data_path(digits_run, tmp_path):
    config, params, record = _student(digits_run, "reflow", student_steps=2, pairs=16,
                                      pair_steps=2)
    config.data.batch_size, config.train.steps, config.optim.warmup_steps = 8, 1, 0
    run.distill(config, str(tmp_path / "r"), teacher_params=params, record=record, log=False)
    got = pairs.load(tmp_path / "r" / "pairs.npz")
    assert got["x"].shape == got["noise"].shape == (16, 8, 8, 1)
    assert list(got["label"][:11]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    batch = next(pairs.build(tmp_path / "r" / "pairs.npz", batch_size=8, seed=0))
    rows = [int(np.flatnonzero((got["noise"] == n).all(axis=(1, 2, 3)))[0])
            for n in batch["noise"]]
    np.testing.assert_array_equal(batch["x"], got["x"][rows])  # each x keeps its noise
    saved = json.load(open(tmp_path / "r" / "config.json"))
    assert saved["sampler"]["name"] == "euler" and saved["sampler"]["steps"] == 2


@pytest.mark.parametrize("flags,code,match", [
    (["--method=pd"], 2, "--method=pd is unknown; allowed: progressive, guided, cd, ct, reflow"),
    (["--method=progressive", "--config.distill.teacher_steps=12"], 1,
     "distill.teacher_steps=12 / distill.student_steps=4 must be a power of two"),
    (["--method=progressive", "--config.distill.nope=1"], 1,
     "--config.distill.nope is not a config key"),
    (["--method=cd", "--config.distill.ode=rk9"], 1, "rk9"),
])
def test_bad_flags_are_one_line(digits_run, tmp_path, flags, code, match):
    got, errors = main("distill", f"--teacher={digits_run}", f"--workdir={tmp_path}/s", *flags)
    assert got == code and match in errors[-1], errors
    assert not os.path.exists(tmp_path / "s")


def test_a_teacher_without_checkpoints_is_refused(digits_run, tmp_path):
    teacher = tmp_path / "t"
    os.makedirs(teacher)
    shutil.copy(digits_run / "config.json", teacher / "config.json")
    code, errors = main("distill", f"--teacher={teacher}", "--method=cd",
                        f"--workdir={tmp_path}/s")
    assert code == 1 and "no checkpoint in" in errors[-1], errors


def test_a_student_that_cannot_take_w_is_refused(digits_run):
    cfg, _, _ = _teacher(digits_run)
    config = run.student_config(cfg.to_dict(), "guided")
    config.model = dict(name="mlp", num_classes=10)
    with pytest.raises(ValueError, match="model.name='mlp' cannot be conditioned on the "
                                         "guidance scale"):
        run.check(config)
