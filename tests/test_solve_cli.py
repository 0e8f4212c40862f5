"""`jaxdiff solve` (inverse problems with a trained run as the prior, jaxdiff.inverse) and
`jaxdiff sample --steer/--reward` (jaxdiff.steer) on the session's tiny digits run
(tests/conftest.py, read only: outputs go to tmp dirs): files, reports, the measurement
consistency of DDNM, the reward raised by SMC steering, and one-line errors. Everything runs in
this process."""

import contextlib
import dataclasses
import io
import json
import os
import re

import numpy as np
import pytest

from jaxdiff.cli import solve as solve_cli
from jaxdiff.cli import steer as steer_cli

# the session's digits run read in this process: programs another module compiled for it
# are read back from the session's compilation cache (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("compiled_once")


def _run(*args):
    """`jaxdiff <args>` in this process: (exit code, stdout, stderr lines)."""
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
    return code, out.getvalue(), [ln for ln in err.getvalue().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """x.npz: 4 test digits in [-1, 1] with their labels; bad.npz: neither x nor y; y and x of
    shapes no task on this run measures or takes."""
    from jaxdiff.data import build

    root = tmp_path_factory.mktemp("solve_inputs")
    batch = next(iter(build("digits", "test", batch_size=4, seed=0)))
    x, labels = np.asarray(batch["x"], np.float32), np.asarray(batch["label"], np.int32)
    np.savez(root / "x.npz", x=x, labels=labels)
    np.savez(root / "bad.npz", images=x)
    np.savez(root / "y_wrong.npz", y=x[:, :4, :4])
    np.savez(root / "y_full.npz", y=x)
    np.savez(root / "x_wrong.npz", x=x[:, :4])
    return root


# --- jaxdiff solve --------------------------------------------------------------------------

def test_ddnm_restores_consistently_with_the_measurement(digits_run, inputs, tmp_path):
    """x measured here (inpaint:box, sigma_y 0), solved by DDNM: files, report, PSNR, and the
    observed pixels of the restoration equal the measurement (DDNM's last step projects onto
    A x = y). Then the written y alone (no truth) replaces the directory atomically."""
    out = tmp_path / "box"
    code, printed, errors = _run("solve", f"--workdir={digits_run}", "--task=inpaint:box",
                                 f"--input={inputs / 'x.npz'}", "--steps=6", f"--out={out}")
    assert code == 0, errors
    assert sorted(os.listdir(out)) == ["grid.png", "report.json", "restorations.npz"]
    report = json.load(open(out / "report.json"))
    assert report["task"] == "inpaint:box" and report["solver"] == "ddnm"
    assert report["steps"] == 6 and report["nfe"] == 6 and report["sigma_y"] == 0.0
    assert set(report["options"]) == {"eta"}  # what ddnm ran with: its defaults
    assert report["measured_here"] and report["num"] == 4 and report["step"] == 2
    assert np.isfinite(report["psnr"]) and 0 <= report["classifier_agreement"] <= 1
    assert report["wall_s"] > 0
    assert re.match(r"solve inpaint:box with ddnm: 4 restorations, 6 steps \(6 NFE each\), "
                    r"PSNR [\d.]+ dB, classifier agreement [\d.]+, [\d.]+ s; wrote ",
                    printed), printed
    got = np.load(out / "restorations.npz")
    x, y, truth = got["x"], got["y"], got["truth"]
    assert x.shape == truth.shape == (4, 8, 8, 1) and list(got["labels"]) == list(
        np.load(inputs / "x.npz")["labels"])
    from jaxdiff.inverse import box_mask

    observed = box_mask((8, 8)).astype(bool)
    np.testing.assert_allclose(y[:, observed], truth[:, observed])
    np.testing.assert_allclose(x[:, observed], y[:, observed], atol=1e-3)
    assert np.abs(x[:, ~observed] - truth[:, ~observed]).max() > 1e-2  # restored, not copied

    np.savez(tmp_path / "y.npz", y=y)  # measurements only: no truth, no PSNR
    code, printed, errors = _run("solve", f"--workdir={digits_run}", "--task=inpaint:box",
                                 f"--input={tmp_path / 'y.npz'}", "--steps=6", f"--out={out}")
    assert code == 0, errors
    report = json.load(open(out / "report.json"))
    assert not report["measured_here"] and "psnr" not in report
    assert "classifier_agreement" not in report and "PSNR" not in printed
    assert "truth" not in np.load(out / "restorations.npz").files
    assert sorted(os.listdir(tmp_path)) == ["box", "y.npz"]  # no temporary or old directory


@pytest.mark.parametrize("args,code,match", [
    (["--task=inpaint:box", "--input=missing.npz"], 2, r"--input=missing.npz: no such file"),
    (["--task=paint:box"], 2, r"--task=paint:box is unknown; allowed: inpaint:box, "
                              r"inpaint:half\[-left\|-right\|-top\|-bottom\], .*saturate"),
    (["--task=sr:2x"], 2, r"--task=sr:2x is unknown; allowed: "),
    (["--task=inpaint:box", "--solver=magic"], 2,
     r"--solver=magic: unknown kind 'magic'; allowed: dps, pigdm, ddnm, reddiff, dds"),
    (["--task=inpaint:box", "--solver=ddnm:zeta=1"], 2,
     r"--solver=ddnm:zeta=1: ddnm has no setting 'zeta'; allowed: eta"),
    (["--task=inpaint:box", "--solver=ddnm:eta=2"], 2, r"--solver=ddnm:eta=2: DDNM\(eta=2.0\) "
                                                       r"is invalid; allowed: 0 <= eta <= 1"),
    (["--task=inpaint:box", "--solver=dds:cg_steps=2.5"], 2,
     r"cg_steps=2.5 is invalid; allowed: an integer"),
    (["--task=inpaint:box", "--sigma_y=-0.1"], 2, r"--sigma_y=-0.1 must be a finite number >= 0"),
    (["--task=inpaint:box", "--input=bad.npz"], 1,
     r"bad.npz holds neither y \(measurements\) nor x \(clean images\); it has: images"),
    (["--task=sr:2", "--input=y_full.npz"], 1, r"y has shape \(4, 8, 8, 1\); the task "
                                               r"downsample x2 on this run's \(8, 8, 1\) images "
                                               r"measures \(N, 4, 4, 1\)"),
    (["--task=inpaint:box", "--input=y_wrong.npz"], 1,
     r"y has shape \(4, 4, 4, 1\); the task inpaint on this run's \(8, 8, 1\) images measures "
     r"\(N, 8, 8, 1\)"),
    (["--task=inpaint:box", "--input=x_wrong.npz"], 1,
     r"x has shape \(4, 4, 8, 1\); this run's images are \(8, 8, 1\): allowed \(N, 8, 8, 1\)"),
    (["--task=saturate:inpaint:box"], 1, r"--solver=ddnm needs a pseudo-inverse A\^\+, a linear "
                                         r"task; .* is nonlinear; allowed with it: dps, reddiff"),
    (["--task=saturate=2:sr:2", "--solver=dds"], 1, r"--solver=dds needs an adjoint"),
    (["--task=sr:3"], 1, r"--task=sr:3: .*not divisible by factor=3"),
    (["--task=inpaint:box", "--class=12"], 1, r"--class=12 is not a class of this model; "
                                              r"allowed: 0..9"),
])
def test_bad_solve_is_one_line(digits_run, inputs, tmp_path, args, code, match):
    """Flags and paths: exit 2 before anything is loaded; what the input, the task on this
    run's images or the model refuse: exit 1, before the checkpoint is read. Nothing is
    written."""
    if not any(a.startswith("--input") for a in args):
        args = [*args, "--input=x.npz"]
    args = [a.replace("--input=", f"--input={inputs}/") if "missing" not in a else a
            for a in args]
    got, printed, errors = _run("solve", f"--workdir={digits_run}", *args,
                                f"--out={tmp_path / 'out'}", "--steps=2")
    assert got == code and len(errors) == 1 and not printed, (got, errors)
    assert errors[0].startswith("jaxdiff solve: error: ")
    assert re.search(match, errors[0]), errors[0]
    assert not os.listdir(tmp_path)


def test_task_grammar_is_the_librarys():
    """The forms the flag check accepts (before jax) are the ones parse_task knows."""
    from jaxdiff.inverse import TASKS, parse_task
    from jaxdiff.inverse.solvers import SOLVERS

    assert solve_cli.TASK_FORMS == TASKS
    assert set(solve_cli.NEEDS) <= set(SOLVERS) and solve_cli.DEFAULT_SOLVER in SOLVERS
    import jax

    for task in ("inpaint:box", "inpaint:half", "inpaint:half-top", "inpaint:random",
                 "inpaint:random=0.5", "sr:2", "blur", "blur:std=0.5", "saturate:sr:2",
                 "saturate=2.5:inpaint:box", "gray"):
        assert solve_cli._TASK.fullmatch(task), task
        parse_task(task, (8, 8), 3, key=jax.random.key(0))
    for task in ("inpaint", "inpaint:circle", "sr", "sr:x", "blur:2", "grey", "saturate",
                 "saturate:saturate:sr:2", "inpaint:random=", "sr:2:3"):
        assert not solve_cli._TASK.fullmatch(task), task
        with pytest.raises(ValueError):
            parse_task(task, (8, 8), 3, key=jax.random.key(0))
    assert solve_cli.task_dirname("inpaint:random=0.5", "ddnm") == "inpaint_random-0.5-ddnm"
    assert solve_cli.task_dirname("saturate=2:sr:2", "dps") == "saturate-2_sr_2-dps"
    for name, cls in SOLVERS.items():  # every option has a numeric default the flag can parse
        for f in dataclasses.fields(cls):
            if f.name not in ("operator", "y"):
                assert isinstance(f.default, (int, float)), (name, f.name)


def test_solve_help():
    code, printed, errors = _run("solve", "--help")
    assert code == 0 and not errors
    assert printed.startswith("usage: jaxdiff solve --workdir RUN --task TASK --input")
    assert "example:" in printed and "dps:zeta,eta" in printed


# --- jaxdiff sample --steer / --reward ------------------------------------------------------

def test_smc_steering_raises_the_reward(digits_run, tmp_path):
    """--steer smc on the tiny run: files, the printed line (NFE per returned sample: particles
    x steps; the deterministic dpmpp_2m of the run replaced by euler_ancestral), and a higher
    mean log p(3 | x) than the same sampler unsteered from the same seed. The 2-step run barely
    moved its network, so the classifier sees near-noise; lam=4 makes the tilt visible: over
    seeds 0-3 the mean log p rose by 0.34-0.51 (measured), asserted > 0.1 here."""
    common = ("sample", f"--workdir={digits_run}", "--num=8", "--steps=4", "--seed=0",
              "--reward=classifier:digit=3")
    code, plain, errors = _run(*common, "--sampler=euler_ancestral",
                               f"--out={tmp_path / 'plain.png'}")
    assert code == 0, errors
    assert plain.startswith("no steering: 8 samples, 4 NFE per sample (euler_ancestral, 4 steps, "
                            "unconditional); reward classifier:digit=3: mean log p "), plain
    code, steered, errors = _run(*common, "--steer=smc:particles=8,lam=4",
                                 f"--out={tmp_path / 'smc.png'}")
    assert code == 0, errors
    assert steered.startswith("steer smc:particles=8,lam=4: 8 samples, 32 NFE per sample "
                              "(euler_ancestral, 4 steps, unconditional, "), steered
    assert re.search(r"resamplings per group\); reward classifier:digit=3: mean log p "
                     r"-?[\d.]+, classifier agreement [\d.]+\nwrote ", steered), steered
    assert os.path.exists(tmp_path / "smc.png")
    a, b = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "smc.npz")
    assert b["samples"].shape == (8, 8, 8, 1) and b["rewards"].shape == (8,)
    assert b["labels"].size == 0  # unconditional
    assert b["rewards"].mean() > a["rewards"].mean() + 0.1, (a["rewards"], b["rewards"])


@pytest.mark.parametrize("args,code,match", [
    (["--steer=beam", "--reward=classifier:digit=3"], 2,
     r"--steer=beam: unknown kind 'beam'; allowed: smc, best_of_n, search"),
    (["--steer=smc:particles=0", "--reward=classifier:digit=3"], 2,
     r"--steer=smc:particles=0: particles=0 is invalid; allowed: an integer >= 1"),
    (["--steer=smc:particles=many", "--reward=classifier:digit=3"], 2,
     r"particles=many is invalid; allowed: an integer >= 1"),
    (["--steer=smc:potential=min", "--reward=classifier:digit=3"], 2,
     r"potential=min is invalid; allowed: diff, max, sum"),
    (["--steer=search:radius=0", "--reward=classifier:digit=3"], 2,
     r"radius=0 is invalid; allowed: a number in \(0, 1\]"),
    (["--steer=best_of_n:8", "--reward=classifier:digit=3"], 2, r"'8' is not KEY=VALUE"),
    (["--steer=smc"], 2, r"--steer=smc needs --reward, e.g. --reward=classifier:digit=D"),
    (["--reward=clip:cat"], 2, r"--reward=clip:cat: unknown kind 'clip'; allowed: "
                               r"classifier:digit=D"),
    (["--reward=classifier"], 2, r"--reward=classifier: classifier needs digit= "
                                 r"\(an integer 0..9\)"),
    (["--reward=classifier:digit=10"], 2, r"digit=10 is invalid; allowed: an integer 0..9"),
    (["--steer=smc", "--reward=classifier:digit=3", "--sampler=ode"], 2,
     r"--sampler=ode is adaptive \(no fixed grid\)"),
    (["--steer=smc", "--reward=classifier:digit=3", "--cache=deepcache:interval=2"], 2,
     r"and --cache=deepcache:interval=2: .* give one of them"),
])
def test_bad_steering_is_one_line(digits_run, tmp_path, args, code, match):
    got, printed, errors = _run("sample", f"--workdir={digits_run}", *args,
                                f"--out={tmp_path / 's.png'}")
    assert got == code and len(errors) == 1 and not printed, (got, errors)
    assert errors[0].startswith("jaxdiff sample: error: ") and re.search(match, errors[0]), \
        errors[0]
    assert not os.listdir(tmp_path)


def test_steering_flags_belong_to_sample(digits_run):
    code, _, errors = _run("eval", f"--workdir={digits_run}", "--reward=classifier:digit=3")
    assert code == 2 and len(errors) == 1
    assert "--reward=classifier:digit=3: it is a flag of jaxdiff sample, not of jaxdiff eval" \
        in errors[0]


def test_a_dataset_without_a_classifier_is_refused(digits_run, tmp_path):
    """classifier:digit=D needs a built-in classifier of the run's data: a run on moons (its
    config only: the refusal comes before the checkpoint is read) is refused in one line."""
    config = json.load(open(digits_run / "config.json"))
    config["data"]["name"] = "moons"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    code, printed, errors = _run("sample", f"--workdir={tmp_path / 'run'}",
                                 "--reward=classifier:digit=3", "--steer=best_of_n:n=2",
                                 f"--out={tmp_path / 's.png'}")
    assert code == 1 and len(errors) == 1 and not printed, errors
    assert errors[0] == ("jaxdiff sample: error: --reward=classifier:digit=3: the dataset "
                         "'moons' of this run has no built-in classifier; allowed: runs on "
                         "digits, digits16")


def test_spec_tables_are_the_librarys():
    from jaxdiff import steer

    assert steer_cli.POTENTIALS == steer.POTENTIALS
    assert steer_cli.RESAMPLING == steer.RESAMPLING
    assert steer_cli.parse_steer("smc:particles=8") == ("smc", dict(
        particles=8, lam=1.0, potential="diff", ess_threshold=0.5, resampling="systematic"))
    assert steer_cli.parse_steer(" search:rounds=3 , radius=1") == ("search", dict(
        rounds=3, candidates=3, radius=1.0))
    assert steer_cli.batch_factor("best_of_n:n=5") == 5 and steer_cli.batch_factor(None) == 1


def test_sample_help_names_the_steering_flags():
    code, printed, _ = _run("sample", "--help")
    assert code == 0 and "--steer SPEC" in printed and "--reward SPEC" in printed
