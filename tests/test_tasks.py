"""tasks.py: the lock file agrees with pyproject.toml's ranges, ``tasks.py notebooks`` starts
JupyterLab as root and without a display, printing a URL that answers, and the suite that
``tasks.py test`` runs is light to collect."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402


def _locked() -> dict[str, str]:
    pins = {}
    for line in tasks.LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_lock_pins_every_requirement_inside_its_range():
    pins = _locked()
    for text in tasks.requirements():
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is required by pyproject.toml but not in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}: "
            "run python3 tasks.py lock")


def test_lock_text_is_sorted_exact_and_portable():
    text = tasks.lock_text({"torch": "2.13.0+cpu", "absl-py": "2.5.1"}, "3.11")
    pins = [line for line in text.splitlines() if not line.startswith("#")]
    assert pins == ["absl-py==2.5.1", "torch==2.13.0"]  # '==2.13.0' also accepts the +cpu wheel
    assert "python3 tasks.py lock" in text


def test_notebook_args_for_root_and_headless():
    args = tasks.notebook_args(root=True, display=False, port=8899, token="t")
    assert "--allow-root" in args and "--no-browser" in args and "--ServerApp.port=8899" in args
    args = tasks.notebook_args(root=False, display=True, port=8899, token="t")
    assert "--allow-root" not in args and "--no-browser" not in args


def test_notebooks_job_starts_headless_and_prints_its_url(tmp_path):
    pytest.importorskip("jupyterlab")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"))
    code = "import sys, tasks; tasks.PY = sys.executable; sys.exit(tasks.notebooks(['--LabApp.news_url=']))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"open (http://127\.0\.0\.1:(\d+)/lab\?token=(\w+))", line)
        assert match, line
        assert "no display here" in line
        status = f"http://127.0.0.1:{match.group(2)}/api/status?token={match.group(3)}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(status, timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, "JupyterLab exited (as root without --allow-root it would)"
                assert time.monotonic() < deadline, "JupyterLab did not answer at the printed URL"
                time.sleep(0.5)
        with urllib.request.urlopen(match.group(1), timeout=10) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    # stopping the job stops JupyterLab too: nothing answers at the URL any more
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(status, timeout=2).close()
        except OSError:
            break
        assert time.monotonic() < deadline, "JupyterLab kept running after its job was stopped"
        time.sleep(0.5)


def test_suite_footprint_reports_the_largest_child_process():
    """The footprint line is measured, not assumed: a child that holds 200 MB must show up
    (and the control, a bare child, stays far below it)."""
    probe = ("import re, subprocess, sys, tasks\n"
             "subprocess.run([sys.executable, '-c', sys.argv[1]], check=True)\n"
             "line = tasks.suite_footprint(12.5)\n"
             "print(line)\n")
    big, small = "b = b'x' * (200 * 2**20)", "pass"
    lines = [subprocess.run([sys.executable, "-c", probe, child], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout for child in (big, small)]
    peaks = [int(re.search(r"peaked at ([\d,]+) MB", line).group(1).replace(",", "")) for line in lines]
    assert "12.5 s wall time" in lines[0]
    assert peaks[0] >= 200 > peaks[1]


# Libraries that few tests use and that take seconds to import: nbformat (and jupytext and
# nbclient) import jsonschema, whose IRI check (rfc3987-syntax) builds its grammars at import
# (~4.5 s); torch with transformers ~1.5 s. Every xdist worker collects the whole suite, so one
# imported at the top of a test module is paid by every worker before its first test: the tests
# that use them import them.
_HEAVY = {"jsonschema", "nbformat", "torch", "transformers"}


def test_collecting_the_suite_imports_no_library_that_few_tests_need(collected_imports):
    assert "tasks" in collected_imports  # the control: this module's own top-level import is seen
    assert sorted(_HEAVY & collected_imports) == []


@pytest.mark.parametrize("job, writes", [("test", True), ("docs", False)])
def test_the_suite_writes_bytecode_and_other_jobs_keep_the_callers_setting(monkeypatch, job, writes):
    """The test job's processes may write bytecode (~300 of them would each compile gradlab
    again), whatever PYTHONDONTWRITEBYTECODE says; every other job runs in the caller's
    environment. The job's command is recorded, not run."""
    ran = []
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setattr(tasks, "ensure_env", lambda extras: None)
    monkeypatch.setattr(tasks, "_run", lambda *cmd, env=None: ran.append(os.environ if env is None else env))
    assert tasks.main([job]) == 0
    assert len(ran) == 1 and ("PYTHONDONTWRITEBYTECODE" not in ran[0]) is writes
    assert ran[0]["PATH"] == os.environ["PATH"]
