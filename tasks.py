#!/usr/bin/env python3
"""Set up and run gradlab's jobs with nothing but Python 3.11+ (standard library only).

    python3 tasks.py figures   # create .venv, install gradlab, regenerate every figure into figures/ (and the
                               # reproduction figures into figures/reproductions/ with docs/reproductions.md)
    python3 tasks.py test      # create .venv, install gradlab with its test, bench and trl extras, run the suite;
                               # prints the 15 slowest tests, the wall time and the largest process's peak memory
    python3 tasks.py golden    # regenerate tests/golden/gradients.json after an intended change
    python3 tasks.py docs      # regenerate docs/losses.md, docs/loss_audit.md, docs/trl.md and the generated
                               # tables gradlab/answers.jsonl and gradlab/experiments/_loss_table.py
    python3 tasks.py notebooks # install the notebook extra, start JupyterLab on notebooks/ and print its URL
    python3 tasks.py bench     # install the bench extra and run the benchmarks (python -m benchmarks)
    python3 tasks.py site      # install the site extra and build the website into site/ (python -m gradlab.website)
    python3 tasks.py lock      # refresh requirements.lock: every extra upgraded within pyproject's ranges, frozen

The virtual environment lives in .venv/ and is reinstalled whenever pyproject.toml or
requirements.lock changes. Every job installs the exact versions in requirements.lock (a pip
constraints file); the ranges in pyproject.toml are for library users. `lock` is the one job that
installs without it: it upgrades every dependency within those ranges, then writes the versions
it got back into requirements.lock (review the diff and run the tests before committing it).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
LOCK = ROOT / "requirements.lock"
ALL_EXTRAS = "[test,bench,trl,site,notebook,audit,model]"
EXTRAS = {"figures": "", "test": "[test,bench,trl]", "golden": "[test]", "docs": "", "notebooks": "[notebook]",
          "bench": "[bench]", "site": "[site]", "lock": ALL_EXTRAS}


def _run(*cmd: str | Path, env: dict[str, str] | None = None) -> None:
    """Run one step of a job (in ``env``, else this process's environment); if this process is
    stopped (Ctrl-C or SIGTERM), the step is stopped too, never left running on its own (a
    JupyterLab server, a test run)."""
    print("+", " ".join(map(str, cmd)), flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM unwinds like Ctrl-C
    try:
        with subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env) as proc:
            try:
                code = proc.wait()
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code:
        raise subprocess.CalledProcessError(code, [str(c) for c in cmd])


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def ensure_env(extras: str, *, locked: bool = True) -> None:
    """Create .venv if needed and install gradlab with ``extras`` at the locked versions
    (``locked=False``: the newest within pyproject's ranges, for ``lock``)."""
    if sys.version_info < (3, 11):  # noqa: UP036 - tasks.py runs under any python3 and says why it stops
        sys.exit(f"gradlab needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    stamp = VENV / f".installed{extras or '[core]'}"
    inputs = (ROOT / "pyproject.toml").read_bytes() + (LOCK.read_bytes() if LOCK.exists() and locked else b"")
    want = hashlib.sha256(inputs).hexdigest()
    if locked and stamp.exists() and stamp.read_text() == want and PY.exists():
        return
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    _run(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    if locked and LOCK.exists():
        _run(PY, "-m", "pip", "install", "--quiet", "-c", LOCK, "-e", f".{extras}")
    else:
        _run(PY, "-m", "pip", "install", "--quiet", "--upgrade", "--upgrade-strategy", "eager", "-e", f".{extras}")
    if locked:
        stamp.write_text(want)
    else:  # upgraded past the lock: every job reinstalls at the locked versions next time
        for old in VENV.glob(".installed*"):
            old.unlink()


# Run inside .venv by `lock`: the installed version of every distribution that the requirements
# given (pyproject's, every extra) need, following each requirement and its markers through the
# installed metadata, so that nothing else installed in .venv by hand reaches the lock file.
_CLOSURE = """
import json, re, sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
seen, todo = {}, []
for text in json.loads(sys.argv[1]):
    req = Requirement(text)
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        todo.append((req.name, frozenset(req.extras)))
while todo:
    name, extras = todo.pop()
    dist = metadata.distribution(name)
    key = norm(dist.metadata["Name"])
    if key in seen and extras <= seen[key][1]:
        continue
    seen[key] = (dist.version, extras | (seen[key][1] if key in seen else frozenset()))
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            todo.append((req.name, frozenset(req.extras)))
print(json.dumps({k: v for k, (v, _) in seen.items()}))
"""


def lock_text(versions: dict[str, str], python: str) -> str:
    """requirements.lock's text: ``name==version`` sorted, local version labels dropped (``==2.13.0``
    also matches the ``2.13.0+cpu`` wheel, so the file works wherever the plain release exists)."""
    lines = [
        "# Exact versions that tasks.py installs, as a pip constraints file (pip install -c requirements.lock).",
        "# Generated by `python3 tasks.py lock` (every extra, upgraded within pyproject.toml's ranges, then",
        f"# frozen) under Python {python}; do not edit by hand. pyproject.toml keeps the ranges for library users.",
    ]
    lines += [f"{name}=={version.split('+', 1)[0]}" for name, version in sorted(versions.items())]
    return "\n".join(lines) + "\n"


def requirements() -> list[str]:
    """pyproject.toml's requirements: the core ones and every extra's."""
    import tomllib  # Python 3.11+, checked by ensure_env before any job gets here

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]


def lock(python: Path = PY) -> int:
    out = subprocess.run([str(python), "-c", _CLOSURE, json.dumps(requirements())], check=True, cwd=ROOT,
                         capture_output=True, text=True)
    version = subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    LOCK.write_text(lock_text(json.loads(out.stdout), version))
    print(f"wrote {LOCK.name}; review `git diff {LOCK.name}`, run `python3 tasks.py test`, then commit it")
    return 0


def _port(preferred: int = 8888) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


def notebook_args(*, root: bool, display: bool, port: int, token: str) -> list[str]:
    """JupyterLab's options: a known port and token (so the URL can be printed before it starts),
    ``--allow-root`` as root (Jupyter refuses root otherwise), ``--no-browser`` without a display."""
    return ["--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}", *(["--allow-root"] if root else []),
            *([] if display else ["--no-browser"])]


def _has_display() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def notebooks(rest: list[str]) -> int:
    port, token = _port(), secrets.token_hex(24)
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    args = notebook_args(root=root, display=_has_display(), port=port, token=token)
    print(f"JupyterLab on notebooks/; open http://127.0.0.1:{port}/lab?token={token}"
          + ("" if _has_display() else " (no display here: from another machine, forward the port first,"
             f" e.g. ssh -L {port}:127.0.0.1:{port} THIS_HOST)") + "; stop it with Ctrl-C", flush=True)
    try:
        _run(PY, "-m", "jupyter", "lab", "notebooks/", *args, *rest)
    except subprocess.CalledProcessError as exc:
        return exc.returncode
    except KeyboardInterrupt:
        return 130
    return 0


# run after `gradlab figures` by the figures job: every reproduction entry at full length, writing
# figures/reproductions/NAME.png (linked from docs/reproductions.md) and the page itself
FIGURES_AFTER = ([PY, "-m", "gradlab.reproduce.docs", "docs/reproductions.md", "figures/reproductions"],)


def _run_all(*cmds: list) -> int:
    for cmd in cmds:
        try:
            _run(*cmd)
        except subprocess.CalledProcessError as exc:
            return exc.returncode
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__.strip())
        return 2
    job, rest = argv[0], argv[1:]
    if job == "lock":
        if rest:
            print("tasks.py lock takes no arguments", file=sys.stderr)
            return 2
        ensure_env(EXTRAS[job], locked=False)
        return lock()
    ensure_env(EXTRAS[job])
    if job == "notebooks":
        return notebooks(rest)
    if job == "figures":  # the project figures, then the reproduction catalogue's (linked from docs/)
        return _run_all([PY, "-m", "gradlab", "figures", "--out", "figures", *rest], *(() if rest else FIGURES_AFTER))
    env_cmd = {
        "test": [PY, "-m", "pytest", "-n", "auto", "--durations=15", *rest],
        "golden": [PY, "tests/make_golden.py", *rest],
        "docs": [PY, "-m", "gradlab.catalogue", *rest],
        "bench": [PY, "-m", "benchmarks", *rest],
        "site": [PY, "-m", "gradlab.website", "--out", "site", *rest],
    }[job]
    # the suite starts about three hundred Python processes: with PYTHONDONTWRITEBYTECODE set, each
    # would compile gradlab's sources again (~0.2 s); its bytecode goes beside the sources, in the
    # __pycache__ folders git ignores
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} if job == "test" else None
    start = time.perf_counter()
    try:
        _run(*env_cmd, env=env)
    except subprocess.CalledProcessError as exc:
        return exc.returncode
    finally:
        if job == "test":
            print(suite_footprint(time.perf_counter() - start), flush=True)
    return 0


def suite_footprint(seconds: float) -> str:
    """The test suite's wall time and the peak memory of its largest process: the maximum
    resident set of any finished child process (pytest, its workers and the processes the tests
    start), as the operating system records it for this process's children."""
    try:
        import resource
    except ImportError:  # Windows: no getrusage
        return f"test suite: {seconds:.1f} s wall time (peak memory not available on this platform)"
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere
    return f"test suite: {seconds:.1f} s wall time; largest process peaked at {peak_mb:,.0f} MB"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
