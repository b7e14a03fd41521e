"""Notebooks: text sources in sync, committed without outputs, and executed top to bottom."""

from __future__ import annotations

import os
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def test_there_are_at_least_six_notebooks():
    assert len(NOTEBOOKS) >= 6


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_matches_its_text_source_and_has_no_outputs(source):
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing; run: jupytext --to ipynb {source}"
    text_cells = [(c.cell_type, c.source) for c in jupytext.read(source).cells]
    nb = nbformat.read(ipynb, as_version=4)
    nb_cells = [(c.cell_type, c.source) for c in nb.cells]
    assert nb_cells == text_cells, f"{ipynb.name} drifted from {source.name}; run: jupytext --sync {source}"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{ipynb.name} is committed with outputs"


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(source, tmp_path):
    nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    env_cache = os.environ.get("GRADLAB_CACHE_DIR")
    assert env_cache  # the kernel inherits the test cache
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(source.parent)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
