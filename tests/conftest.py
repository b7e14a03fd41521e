"""Strict harness: float64 JAX, warnings are errors (pyproject), one shared derivation cache.

The test session is an entry point: it configures JAX (float64, compilation cache) through
``gradlab.runtime.configure``; no library import does."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

os.environ.setdefault("GRADLAB_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".gradlab-cache"))
os.environ.setdefault("JAX_ENABLE_X64", "1")  # inherited by the subprocesses some tests start
os.environ.setdefault("MPLBACKEND", "Agg")
# the two workers share the cores, so LAPACK's own threads (scipy's OpenBLAS, which JAX's CPU
# linear algebra calls) only contend: an LU at vocabulary 1,000 takes ~20 ms on one thread and
# up to ~190 ms on two while the other worker is busy
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# a training program compiles its optimised tier ahead, in the background, only in the tests of
# that (which ask for it): elsewhere the suite would compile each of its hundreds of programs twice
os.environ.setdefault("GRADLAB_COMPILE_AHEAD", "0")

# Started in the background by a shell without job control, the suite ignores SIGINT, and every
# process it starts would inherit that: a test that stops a child with SIGINT (Ctrl-C) would find
# it ignored and wait out its timeout. The suite runs its children as a terminal's foreground run
# does, with Python's own handler (restored before any test starts a child).
if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        browser_unavailable(f"{exc.name} is not installed")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def _release_memory() -> None:
    """Drop what the tests compiled and cached (gradlab's caches, JAX's compiled programs) and hand
    the freed memory back to the system."""
    import gc

    from gradlab import caches

    caches.clear_caches()
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed pages otherwise
        except (OSError, AttributeError):
            pass


def _resident_mb() -> float | None:
    """This process's resident set now, in MB (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


# a module's tests keep their compiled programs until the module ends (~25 MB a test in
# test_policies, 1.1 GB over the module); past this, they are released after the test instead
# (at 1.2 GB a fresh clone's suite took 651 s against 482 s, its releases costing recompiles and
# derivations)
_RELEASE_ABOVE_MB = 1500


@pytest.fixture(scope="module", autouse=True)
def _release_memory_after_each_module():
    """After each test module, release what it compiled and cached: a worker that runs hundreds
    of modules would otherwise keep every module's programs at once (4 GB), where one module
    needs < 1 GB."""
    yield
    _release_memory()


@pytest.fixture(autouse=True)
def _release_memory_when_high():
    """After a test that leaves the process above ``_RELEASE_ABOVE_MB``, release at once: the
    largest process stays under its 2 GB budget whatever a worker's share of modules."""
    yield
    resident = _resident_mb()
    if resident is not None and resident > _RELEASE_ABOVE_MB:
        _release_memory()


def _long_units(items) -> list[tuple[float, list]]:
    """The tests marked ``long``, in units that one worker runs: a module marked as a whole (its
    tests share a module fixture: a JupyterLab server, a built site), tests marked with the same
    ``group`` (they share one process's answer), or a test marked on its own. Each unit with its
    cost, the marks' ``seconds`` (a rough estimate, cold, on a quiet 2-core machine), largest first."""
    units: dict[str, tuple[float, list]] = {}
    for item in items:
        mark = item.get_closest_marker("long")
        if mark is None:
            continue
        module_marks = getattr(getattr(item, "module", None), "pytestmark", [])
        module_marks = module_marks if isinstance(module_marks, list) else [module_marks]
        whole_module = any(getattr(m, "mark", m) == mark for m in module_marks)
        key = mark.kwargs.get("group") or (item.module.__name__ if whole_module else item.nodeid)
        seconds, members = units.get(key, (0.0, []))
        units[key] = (max(seconds, float(mark.kwargs.get("seconds", 10))), [*members, item])
    return sorted(units.values(), key=lambda unit: -unit[0])


def pytest_collection_modifyitems(items):
    """The tests marked ``long`` first in each worker's share, balanced by their estimated cost:
    started at the end of a worker's queue, one would keep that worker busy after the other has
    finished, and run all on one worker they keep it busy for minutes while the other is free.

    xdist's ``worksteal`` deals the collection out in contiguous slices (the first worker the
    first ``len // workers`` tests, and so on) and steals from a queue's end: each slice starts
    with its lane's long tests, so each worker starts its own and none is stolen."""
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    lanes: list[tuple[float, list]] = [(0.0, []) for _ in range(workers)]
    for seconds, members in _long_units(items):
        i = min(range(workers), key=lambda k: lanes[k][0])
        lanes[i] = (lanes[i][0] + seconds, lanes[i][1] + members)
    placed = {id(item) for _, members in lanes for item in members}
    rest = [item for item in items if id(item) not in placed]
    ordered, left = [], len(items)
    for k, (_, members) in enumerate(lanes):
        size = left // (workers - k)  # the slice worksteal gives worker k
        fill = max(0, size - len(members))
        ordered += members + rest[:fill]
        rest, left = rest[fill:], left - len(members) - fill
    items[:] = ordered + rest


_COLLECTED = pytest.StashKey[frozenset]()


def pytest_collection_finish(session):
    """Record the packages this process had imported once it had collected (``collected_imports``)."""
    session.config.stash[_COLLECTED] = frozenset(name.partition(".")[0] for name in sys.modules)


@pytest.fixture
def collected_imports(request) -> frozenset:
    """The top-level packages this process (an xdist worker) had imported when it finished
    collecting, before its first test ran."""
    return request.config.stash[_COLLECTED]


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


def _record_peak(item):
    if sys.platform == "win32":
        yield
        return
    before = _peaks_mb()
    yield
    after = _peaks_mb()
    raised = [a for a, b in zip(after, before, strict=True) if a > b]
    if raised:
        item.user_properties.append(("peak_rss_mb", max(raised)))


# the setup too: a fixture (a model built, a separate process run) can raise the peak before the
# test body runs; the call's report carries what both recorded
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _record_peak(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _record_peak(item)


def pytest_terminal_summary(terminalreporter):
    peaks = [(max(v for k, v in r.user_properties if k == "peak_rss_mb"), r.nodeid)
             for kind in ("passed", "failed") for r in terminalreporter.getreports(kind)
             if r.when == "call" and any(k == "peak_rss_mb" for k, _ in r.user_properties)]
    if not peaks:
        return
    peaks.sort(reverse=True)
    terminalreporter.section("largest processes (peak resident memory, the test that raised it)")
    for mb, nodeid in peaks[:5]:
        flag = f"  over the {_BUDGET_MB} MB budget" if mb > _BUDGET_MB else ""
        terminalreporter.write_line(f"{mb:8.0f} MB  {nodeid}{flag}")


# --------------------------------------------------------------------------------------------
# Heavy libraries apart: torch, transformers and TRL run in a fresh interpreter of their own, so
# that no process holds them and JAX at once. Test modules' functions run there on JSON payloads
# and return JSON; the answers are computed once per test session and shared by the xdist
# workers through a file in their common temporary folder.
# --------------------------------------------------------------------------------------------

_APART = """
import importlib, json, sys
calls = json.load(sys.stdin)
answers = [getattr(importlib.import_module(module), function)(payload) for module, function, payload in calls]
assert "jax" not in sys.modules, "the separate process imported JAX: it would hold JAX and torch at once"
json.dump(answers, sys.stdout)
"""


def once_per_session(tmp_path_factory, name: str, make) -> Path:
    """``shared/name``, made by ``make(path)`` once per test session and shared by the xdist
    workers through their common temporary folder (the first to ask makes it; the others wait for
    it). ``make`` writes a file or a folder at ``path``; what it leaves there when it raises is
    removed, and the next to ask makes it again. Callers only read it."""
    import shutil

    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the folder every worker's own basetemp sits in
    done, making = shared / name, shared / f"{name}.making"
    with FileLock(str(done) + ".lock"):
        if not done.exists():
            try:
                make(making)
            except BaseException:
                if making.is_dir():
                    shutil.rmtree(making)
                making.unlink(missing_ok=True)
                raise
            making.rename(done)  # whole or absent: a worker never reads half of it
    return done


@pytest.fixture(scope="session")
def apart(tmp_path_factory):
    """``apart((module, function, payload), ...)``: each ``module.function(payload)`` (a module in
    tests/), all in ONE fresh Python with warnings as errors (calls that import the same heavy
    library share its import); their JSON answers, in order, once per session."""
    import hashlib
    import json
    import subprocess

    tests = Path(__file__).resolve().parent

    def run(*calls: tuple[str, str, object]) -> list:
        text = json.dumps([list(call) for call in calls], sort_keys=True)
        key = hashlib.sha256(text.encode()).hexdigest()[:16]
        names = "-".join(sorted({f"{module}.{function}" for module, function, _ in calls}))

        def compute(answer: Path) -> None:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                p for p in (str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")) if p))
            out = subprocess.run([sys.executable, "-W", "error", "-c", _APART], input=text,
                                 capture_output=True, text=True, cwd=tests, env=env)
            if out.returncode != 0:
                pytest.fail(f"{names} failed in its own process:\n{out.stderr[-4000:]}", pytrace=False)
            answer.write_text(out.stdout)

        answers = json.loads(once_per_session(tmp_path_factory, f"apart-{names}-{key}.json", compute).read_text())
        assert len(answers) == len(calls)
        return answers

    return run


# One `gradlab figures` process per session redraws every figure into a copy of the committed
# gallery: the figures job's determinism (tests/test_figures.py) and the killed runs and
# cross-process checks (tests/test_reliability.py) read that one run.
@pytest.fixture(scope="session")
def redrawn_gallery(tmp_path_factory) -> Path:
    """A copy of ``figures/`` (without its reproductions) with every figure redrawn into it, at
    every size and in every format, by ``python -m gradlab figures`` in a process of its own (read
    it; copy it to change it)."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def draw(out: Path) -> None:
        shutil.copytree(root / "figures", out, ignore=shutil.ignore_patterns("reproductions"))
        copied = {p.name: p.stat().st_ino for p in out.iterdir()}
        run = subprocess.run([sys.executable, "-m", "gradlab", "figures", "--out", str(out)],
                             cwd=root, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            pytest.fail(f"gradlab figures failed:\n{run.stderr[-4000:]}", pytrace=False)
        # every file was written anew (replaced, not kept)
        kept = [p.name for p in out.iterdir() if copied.get(p.name) == p.stat().st_ino]
        if kept:
            pytest.fail(f"gradlab figures did not rewrite {kept}", pytrace=False)

    return once_per_session(tmp_path_factory, "redrawn-gallery", draw)


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
