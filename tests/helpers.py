"""Shared test helpers. Tolerances live here, in one place."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest
import sympy

import gradlab

RTOL = 1e-9  # closed form vs autodiff / high-precision finite differences
FD_DIGITS = 40  # mpmath precision for finite-difference references

# the figures quick to draw (two processes' bytes compared in tests/test_reliability.py)
QUICK_FIGURES = ("gradient_field", "force_vs_length", "length_force")


def users_formula(name: str) -> gradlab.Loss:
    """The registered loss ``name`` as a user's formula: the same expression (so the same
    disk-cache keys) and defaults, under a name the shipped answers table does not hold, so that
    its derivations come from the disk cache or sympy, as a user's formula's do."""
    loss = gradlab.get_loss(name)
    mine = gradlab.custom(str(loss.expr), name=f"my_{loss.name}",
                          defaults={k: float(v) for k, v in loss.defaults.items() if v is not None})
    assert mine.expr == loss.expr and mine.name not in gradlab.LOSSES
    return mine


def assert_same(a, b, msg: str = "") -> None:
    """Exact symbolic equality where simplify decides it, else high-precision random points."""
    assert gradlab.equivalent(sympy.sympify(a), sympy.sympify(b)), f"{msg}\n  {a}\n  !=\n  {b}"


def assert_differ(a, b) -> None:
    assert not gradlab.equivalent(sympy.sympify(a), sympy.sympify(b)), f"unexpectedly equal: {a} == {b}"


def unavailable(what: str, reason: str, how: str) -> NoReturn:
    """Skip ``what`` locally when a tool it needs is missing; under CI that is a failure, never a
    skip, so that a CI run cannot pass by skipping the tests that need the tool."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"{what} skipped: {reason} ({how})")


def trl_sides(apart) -> tuple[dict, dict]:
    """TRL's side of tests/test_trl_oracle.py and of tests/test_trl_grpo.py, computed in one
    process of TRL's own: importing torch, transformers and TRL takes longer than either side's
    work, so the two modules share one import (the first to ask computes both)."""
    import test_trl_grpo
    import test_trl_oracle

    oracle, grpo = apart(("test_trl_oracle", "trl_side", test_trl_oracle.trl_jobs()),
                         ("test_trl_grpo", "trl_side", test_trl_grpo.trl_jobs()))
    return oracle, grpo


def browser_unavailable(reason: str) -> NoReturn:
    unavailable("browser tests", reason, "install Debian's chromium, playwright and jupyterlab; CI installs them "
                "via .ci/run")


def _find_chromium() -> str | None:
    named = os.environ.get("GRADLAB_CHROMIUM")
    if named and Path(named).exists():
        return named
    for name in () if named else ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_path() -> str:
    """The Chromium executable: ``$GRADLAB_CHROMIUM``, else the first on the PATH; without one
    the browser tests are unavailable (skipped, or failed under CI)."""
    return _find_chromium() or browser_unavailable(
        "no Chromium executable found (chromium, chromium-browser or $GRADLAB_CHROMIUM)")


def notebooks_run_in_the_browser() -> bool:
    """Whether the JupyterLab browser test can run here (a Chromium, playwright and jupyterlab):
    it then executes every notebook and checks the saved outputs with
    ``assert_notebook_ran_cleanly``, so the headless run would repeat the same work."""
    import importlib.util

    return _find_chromium() is not None and all(
        importlib.util.find_spec(module) is not None for module in ("playwright", "jupyterlab"))


def assert_notebook_ran_cleanly(nb, name: str) -> None:
    """An executed notebook (nbformat): no cell raised, no plot shown as text, and its plots are
    shown through an Image widget whose state the notebook holds."""
    import nbformat

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert "<Figure size" not in nbformat.writes(nb), f"{name}: a plot is shown as text: display figures as images"
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    images = [m for m in state.values() if m.get("model_name") == "ImageModel"]
    assert images, f"{name} shows no image widget"


def run_cli(argv) -> tuple[int, str, str]:
    """``gradlab ARGV`` in this process: (exit status, stdout, stderr)."""
    from gradlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()
