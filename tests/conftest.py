"""Strict harness: float64 JAX, warnings are errors (pyproject), one shared derivation cache.

The test session is an entry point: it configures JAX (float64, compilation cache) through
``gradlab.runtime.configure``; no library import does."""

from __future__ import annotations

import os
import sys
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


# --------------------------------------------------------------------------------------------
# Peak memory: which tests raise the largest process's resident set (this worker or a process
# a test starts). Each test's report carries the peak after it ran when it raised one; the
# summary lists the largest, so a test that grows a process past the suite's 2 GB budget is named.
# --------------------------------------------------------------------------------------------

_BUDGET_MB = 2048


def _peaks_mb() -> tuple[float, float]:
    """(this process, its largest finished child) peak resident set, in MB."""
    import resource

    scale = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, KiB elsewhere
    return tuple(resource.getrusage(who).ru_maxrss / scale for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if sys.platform == "win32":
        yield
        return
    before = _peaks_mb()
    yield
    after = _peaks_mb()
    raised = [a for a, b in zip(after, before, strict=True) if a > b]
    if raised:
        item.user_properties.append(("peak_rss_mb", max(raised)))


def pytest_terminal_summary(terminalreporter):
    peaks = [(dict(r.user_properties)["peak_rss_mb"], r.nodeid)
             for kind in ("passed", "failed") for r in terminalreporter.getreports(kind)
             if r.when == "call" and "peak_rss_mb" in dict(r.user_properties)]
    if not peaks:
        return
    peaks.sort(reverse=True)
    terminalreporter.section("largest processes (peak resident memory, the test that raised it)")
    for mb, nodeid in peaks[:5]:
        flag = f"  over the {_BUDGET_MB} MB budget" if mb > _BUDGET_MB else ""
        terminalreporter.write_line(f"{mb:8.0f} MB  {nodeid}{flag}")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty derivation cache of this test's own, and every in-process cache cleared."""
    from gradlab import caches

    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("GRADLAB_CACHE_DIR", str(folder))
    caches.clear_caches()
    yield folder
    caches.clear_caches()
