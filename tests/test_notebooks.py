"""Notebooks: text sources in sync, committed without outputs, and executed top to bottom.

nbformat, jupytext and nbclient are imported in the tests that use them, not at the top: they take
seconds to import, and every xdist worker collects this module (test_tasks.py checks the rule).
The tests that read notebooks run on the browser tests' worker (``long``'s group), so that only
one worker imports them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import assert_notebook_ran_cleanly, notebooks_run_in_the_browser

# jupyter_client leaves zmq sockets for the garbage collector; that is its cleanup, not ours
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")

# the worker that runs the browser tests, which read notebooks too (test_browser.py)
_WITH_THE_BROWSER_TESTS = pytest.mark.long(seconds=0, group="jupyterlab")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def test_there_are_at_least_six_notebooks():
    assert len(NOTEBOOKS) >= 6


@_WITH_THE_BROWSER_TESTS
@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_matches_its_text_source_and_has_no_outputs(source):
    import jupytext
    import nbformat

    ipynb = source.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing; run: jupytext --to ipynb {source}"
    text_cells = [(c.cell_type, c.source) for c in jupytext.read(source).cells]
    nb = nbformat.read(ipynb, as_version=4)
    nb_cells = [(c.cell_type, c.source) for c in nb.cells]
    assert nb_cells == text_cells, f"{ipynb.name} drifted from {source.name}; run: jupytext --sync {source}"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{ipynb.name} is committed with outputs"


def _execute(nb, source: Path, tmp_path: Path) -> None:
    from jupyter_client import KernelManager
    from nbclient import NotebookClient

    # IPC transport: kernels of parallel test workers cannot race for the same TCP ports
    km = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path / "kernel"))
    client = NotebookClient(nb, km=km, timeout=300, startup_timeout=120, store_widget_state=True,
                            resources={"metadata": {"path": str(source.parent)}})
    try:
        client.execute()
    finally:  # a kernel manager we pass in is ours to shut down
        if km.has_kernel:
            km.shutdown_kernel(now=True)


# each is skipped where the browser test runs the notebooks: then it costs nothing to balance
@pytest.mark.long(seconds=0 if notebooks_run_in_the_browser() else 15)
@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(source, tmp_path, monkeypatch):
    """Every notebook runs top to bottom in a kernel without a browser. Where the browser test can
    run, it executes each notebook in JupyterLab and checks the notebook it saved with the same
    ``assert_notebook_ran_cleanly``: running it here too would do the same work twice."""
    if notebooks_run_in_the_browser():
        pytest.skip("executed in JupyterLab, and its saved outputs checked, by test_browser.py")
    assert os.environ.get("GRADLAB_CACHE_DIR")  # the kernel inherits the test cache
    # the kernel imports the gradlab of this checkout, whatever an editable install points at
    root = str(source.parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    import nbformat
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    try:
        _execute(nb, source, tmp_path)
    except (DeadKernelError, CellTimeoutError):
        # a kernel that dies or stops answering is the kernel's fault, not the notebook's:
        # one retry with a fresh kernel; a notebook error is never retried
        nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
        _execute(nb, source, tmp_path)
    assert_notebook_ran_cleanly(nb, source.stem)


@_WITH_THE_BROWSER_TESTS
@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_kernel_metadata(source):
    import nbformat

    # without a kernelspec JupyterLab opens a "Select Kernel" dialog
    nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
