#!/usr/bin/env python3
"""Set up and run gradlab's jobs with nothing but Python 3.11+ (standard library only).

    python3 tasks.py figures   # create .venv, install gradlab, regenerate every figure into figures/ (and the
                               # reproduction figures into figures/reproductions/ with docs/reproductions.md)
    python3 tasks.py test      # create .venv, install gradlab with its test, bench and trl extras, run the suite
    python3 tasks.py golden    # regenerate tests/golden/gradients.json after an intended change
    python3 tasks.py docs      # regenerate docs/losses.md, docs/loss_audit.md, docs/trl.md
    python3 tasks.py notebooks # install the notebook extra and open JupyterLab on notebooks/
    python3 tasks.py bench     # install the bench extra and run the benchmarks (python -m benchmarks)

The virtual environment lives in .venv/ and is reinstalled whenever pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
EXTRAS = {"figures": "", "test": "[test,bench,trl]", "golden": "[test]", "docs": "", "notebooks": "[notebook]",
          "bench": "[bench]"}


def _run(*cmd: str | Path) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def ensure_env(extras: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - tasks.py runs under any python3 and says why it stops
        sys.exit(f"gradlab needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    stamp = VENV / f".installed{extras or '[core]'}"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == want and PY.exists():
        return
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    _run(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    _run(PY, "-m", "pip", "install", "--quiet", "-e", f".{extras}")
    stamp.write_text(want)


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
    ensure_env(EXTRAS[job])
    if job == "figures":  # the project figures, then the reproduction catalogue's (linked from docs/)
        return _run_all([PY, "-m", "gradlab", "figures", "--out", "figures", *rest], *(() if rest else FIGURES_AFTER))
    env_cmd = {
        "test": [PY, "-m", "pytest", "-n", "auto", "--durations=15", *rest],
        "golden": [PY, "tests/make_golden.py", *rest],
        "docs": [PY, "-m", "gradlab.catalogue", *rest],
        "notebooks": [PY, "-m", "jupyter", "lab", "notebooks/", *rest],
        "bench": [PY, "-m", "benchmarks", *rest],
    }[job]
    try:
        _run(*env_cmd)
    except subprocess.CalledProcessError as exc:
        return exc.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
