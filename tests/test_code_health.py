"""Code health, enforced by the test command: ruff under the project's configuration, and mypy on
every module of gradlab (both configured in pyproject.toml; both in the ``test`` extra)."""

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


# long on a fresh checkout: mypy's cache (.mypy_cache) starts empty and the first run reads every
# imported library's types (minutes on a loaded 2-core machine; seconds once cached): first, never last
@pytest.mark.long(seconds=15)
def test_mypy_passes_on_the_whole_package():
    # pyproject.toml [tool.mypy] checks every module of gradlab/
    done = _run_tool("mypy", timeout=600)
    assert done.returncode == 0, f"mypy found problems:\n{done.stdout}{done.stderr}"


def test_mypy_skips_only_the_heavy_optional_libraries():
    # pyproject.toml lets mypy skip torch, transformers, IPython and mkdocs (most of a cold run's
    # time and memory; gradlab makes a few untyped calls into them). A library that gradlab's
    # typed code leans on (jax, numpy, matplotlib), or gradlab itself, skipped would hide real
    # errors: with skip, mypy checks no use of it.
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["follow_imports"] == "silent" and config["files"] == ["gradlab"]
    skipped = {m for o in config.get("overrides", []) if o.get("follow_imports") in ("skip", "error")
               for m in ([o["module"]] if isinstance(o["module"], str) else o["module"])}
    assert {m.removesuffix(".*") for m in skipped} <= {"torch", "transformers", "IPython", "mkdocs"}, skipped
    assert not any(o.get("ignore_errors") for o in config.get("overrides", []))


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


def test_every_in_process_cache_is_registered_and_cleared():
    # one registry (gradlab.caches): no module memoises with functools directly, and clear_caches
    # empties every memo the imported modules made
    import ast
    import importlib
    import pkgutil

    import gradlab
    from gradlab import caches

    stray = []
    for path in sorted((ROOT / "gradlab").rglob("*.py")):
        if path.name == "caches.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("lru_cache", "cache") and \
                    isinstance(node.value, ast.Name) and node.value.id == "functools":
                stray.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module == "functools" and \
                    {a.name for a in node.names} & {"lru_cache", "cache"}:
                stray.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not stray, f"memoise through gradlab.caches.memo, not functools: {stray}"

    for info in pkgutil.walk_packages(gradlab.__path__, "gradlab."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    from gradlab import symbolic

    symbolic.derivative("dpo", "lp_w")
    assert any(isinstance(c, caches.Bounded) for c in caches.registered())
    filled = [c for c in caches.registered() if (len(c) if isinstance(c, caches.Bounded) else c.cache_info().currsize)]
    assert filled, "nothing was cached: the test exercises nothing"
    caches.clear_caches()
    assert all((len(c) if isinstance(c, caches.Bounded) else c.cache_info().currsize) == 0
               for c in caches.registered())
