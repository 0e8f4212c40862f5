"""The quickstart notebook runs top to bottom (at a tiny step count)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("JAXDIFF_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("JAXDIFF_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for o in outputs), "the sample grid was not displayed"
    text = "".join(o.get("text", "") for o in outputs)
    assert "classifier agreement:" in text
    assert (tmp_path / "run" / "grid.png").exists()
