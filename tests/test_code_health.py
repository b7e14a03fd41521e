"""Code health, enforced by the test command: ruff under the project's configuration, and mypy on
the public API (both configured in pyproject.toml; both in the ``test`` extra)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_tool(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed; install the test extra: pip install -e '.[test]'")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_ruff_is_clean():
    done = _run_tool("ruff", "check", "--output-format", "concise", "--no-cache", ".", timeout=120)
    assert done.returncode == 0, f"ruff found problems (fix them, or 'ruff check --fix'):\n{done.stdout}{done.stderr}"


def test_mypy_passes_on_the_public_api():
    # the files checked are listed in pyproject.toml [tool.mypy]
    done = _run_tool("mypy", timeout=600)
    assert done.returncode == 0, f"mypy found problems:\n{done.stdout}{done.stderr}"


def test_only_gradlab_is_installed_as_a_package():
    # benchmarks/ runs from a checkout (python -m benchmarks) and must not land in site-packages
    import tomllib

    import setuptools

    found_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_packages(where=str(ROOT), include=found_cfg["include"],
                                        exclude=found_cfg.get("exclude", ()))
    assert "gradlab" in packages
    assert all(p == "gradlab" or p.startswith("gradlab.") for p in packages), packages


def test_benchmarks_still_run_as_a_module_from_the_repository_root():
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stderr
