"""Strict harness: float64 JAX, warnings are errors (pyproject), one shared derivation cache.

The test session is an entry point: it configures JAX (float64, compilation cache) through
``gradlab.runtime.configure``; no library import does."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADLAB_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".gradlab-cache"))
os.environ.setdefault("JAX_ENABLE_X64", "1")  # inherited by the subprocesses some tests start
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from gradlab import runtime  # noqa: E402

runtime.configure()

settings.register_profile(
    "gradlab", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("gradlab")


@pytest.fixture(scope="session")
def chromium_browser():
    """One headless Chromium per test process, driven by Playwright's sync API (which allows one
    instance per thread, so every browser test shares this one)."""
    from helpers import browser_unavailable, chromium_path

    chromium = chromium_path()
    if chromium is None:
        browser_unavailable("no Chromium executable found (chromium, chromium-browser or $GRADLAB_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        browser_unavailable(f"{exc.name} is not installed")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()
