"""The quickstart notebook runs top to bottom (at a tiny step count), and its install cell works
as on Colab: a no-op where jaxdiff imports, an install from JAXDIFF_SOURCE where it does not, a
one-line error naming JAXDIFF_SOURCE where it is unset, and past a `jaxdiff/` folder in the
working directory (what a clone leaves behind after "restart session": an empty namespace
package)."""

import json
import os

import pytest

from tests._cli import fast_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
INSTALL, CONFIG = 1, 3  # code cells: the install cell, the config cell (reads configs/digits.py)
UNSET = 'JAXDIFF_SOURCE = ""'
# Simulates an environment without jaxdiff: the checkout's venv imports it through the editable
# install's finder (a .pth file run at start-up); drop that finder.
UNINSTALL = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in str(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in str(h)]
sys.path_importer_cache.clear()"""
TRAPPED = """import jaxdiff
assert jaxdiff.__file__ is None and not hasattr(jaxdiff, "sample")  # the folder in the cwd"""
CHECK = """import jaxdiff
print("loaded", jaxdiff.__file__, hasattr(jaxdiff, "sample"))"""
# after the config cell: tests/test_train.py's tiny UNet; the shipped model takes minutes to
# compile on 2 cores and is no different to the notebook's flow
TINY_MODEL = """config.model.update(channels=8, channel_mult=(1,), attn_resolutions=())
config.model.norm_groups = 4
config.data.batch_size = 16
config.train.num_samples = 10"""


def _execute(nb, cwd, allow_errors=False):
    nbclient = pytest.importorskip("nbclient")
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _cells(*sources):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    return nb, [s if isinstance(s, str) else nb.cells[s].source for s in sources]


def _notebook(*sources):
    """A notebook of these cells: source text, or the index of a quickstart cell."""
    nb, sources = _cells(*sources)
    nb.cells = [pytest.importorskip("nbformat").v4.new_code_cell(s) for s in sources]
    return nb


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    """(a) the checkout's environment: the install cell finds jaxdiff and installs nothing."""
    nbformat = pytest.importorskip("nbformat")
    monkeypatch.setenv("JAXDIFF_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("JAXDIFF_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("XLA_FLAGS", fast_compile(os.environ)["XLA_FLAGS"])  # for the kernel
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert UNSET in nb.cells[INSTALL].source  # as shipped: unset
    assert "config = runpy.run_path(" in nb.cells[CONFIG].source
    nb.cells.insert(CONFIG + 1, nbformat.v4.new_code_cell(TINY_MODEL))
    outputs = _execute(nb, tmp_path)
    install = "".join(o.get("text", "") for o in nb.cells[INSTALL].outputs)
    assert install == f"jaxdiff from {os.path.join(ROOT, 'jaxdiff')}\n"  # no pip output
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for o in outputs), "the sample grid was not displayed"
    text = "".join(o.get("text", "") for o in outputs)
    assert "classifier agreement:" in text
    assert (tmp_path / "run" / "grid.png").exists()


def test_install_cell_looks_past_a_jaxdiff_folder(tmp_path):
    """(b1) after "restart session" the working directory holds a `jaxdiff/` folder (here empty),
    which `import jaxdiff` alone takes for an empty namespace package; jaxdiff is installed and
    JAXDIFF_SOURCE unset: the cell finds the real package and the config cell runs."""
    (tmp_path / "jaxdiff").mkdir()
    nb = _notebook(TRAPPED, INSTALL, CONFIG, CHECK)
    text = "".join(o.get("text", "") for o in _execute(nb, tmp_path))
    assert f"loaded {os.path.join(ROOT, 'jaxdiff', '__init__.py')} True" in text


def test_install_cell_installs_from_source(tmp_path, monkeypatch):
    """(b2) jaxdiff not installed, the `jaxdiff/` folder of (b1) in the working directory, and
    JAXDIFF_SOURCE = this checkout: the cell runs `pip install -e <checkout>` and imports jaxdiff
    from the checkout. pip runs with --dry-run (resolving the checkout's requirements against
    this venv, offline; its --report says what it would install), so the shared venv is left as
    it is."""
    report = tmp_path / "pip-report.json"
    monkeypatch.setenv("PIP_DRY_RUN", "1")
    monkeypatch.setenv("PIP_REPORT", str(report))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")  # pip reads "0" as --no-build-isolation
    (tmp_path / "jaxdiff").mkdir()
    nb, (install,) = _cells(INSTALL)
    nb = _notebook(UNINSTALL, TRAPPED,
                   install.replace(UNSET, f"JAXDIFF_SOURCE = {ROOT!r}"), CONFIG, CHECK)
    text = "".join(o.get("text", "") for o in _execute(nb, tmp_path))
    (item,) = json.loads(report.read_text())["install"]
    assert item["metadata"]["name"] == "jaxdiff"
    assert item["download_info"] == {"url": f"file://{ROOT}", "dir_info": {"editable": True}}
    assert f"loaded {os.path.join(ROOT, 'jaxdiff', '__init__.py')} True" in text


def test_install_cell_without_source_is_one_line_error(tmp_path):
    """(c) jaxdiff not installed and JAXDIFF_SOURCE unset: one line says what to set."""
    (tmp_path / "jaxdiff").mkdir()
    nb = _notebook(UNINSTALL, INSTALL)
    outputs = _execute(nb, tmp_path, allow_errors=True)
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert len(errors) == 1 and errors[0]["ename"] == "RuntimeError"
    assert "\n" not in errors[0]["evalue"] and "set JAXDIFF_SOURCE" in errors[0]["evalue"]
    assert not any("jaxdiff from" in o.get("text", "") for o in outputs)

