"""The README's Python examples run as written and print what they say."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    scope = {}
    for block in blocks:  # later blocks build on earlier ones, as a reader would run them
        exec(compile(block, str(README), "exec"), scope)
    lines = capsys.readouterr().out.splitlines()
    shape, spread = lines[0].split(") ")
    assert shape == "(512, 2" and abs(float(spread) - 1.0) < 0.05  # both modes at |x0| = 1
    assert abs(float(lines[1]) - 1.0) < 0.05  # guided to class 1's mode
    assert "(4, 64) 64 4.087" in lines  # discrete: a uniform model's log2(17) bits per token


def test_readme_names_only_files_and_make_targets_that_exist():
    text = README.read_text()
    root = README.parent
    paths = set(re.findall(r"\b((?:configs|launch|benchmarks|notebooks)/[\w./-]+\.\w+)", text))
    assert {"launch/local.sh", "launch/tpu_pod.sh", "launch/slurm.sbatch"} <= paths
    missing = sorted(p for p in paths - {"configs/nope.py"}  # the troubleshooting example
                     if not (root / p).exists())
    assert not missing, f"README names missing files: {missing}"
    makefile = (root / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+):", makefile, re.M)) | {".venv/.installed-base"}  # $(BASE)
    named = set(re.findall(r"\bmake ([\w./-]+)", text))
    assert {"demo", "test"} <= named and named <= targets, named - targets
