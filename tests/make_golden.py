"""Regenerate tests/golden/gradients.json: every derived gradient of every loss in every view.

Run after an intended change to a loss or to the derivation code, then review the diff:

    python3 tasks.py golden
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gradlab
from gradlab.errors import UnknownVariableError

GOLDEN = Path(__file__).resolve().parent / "golden" / "gradients.json"


def current_of(name: str) -> dict[str, dict[str, str]]:
    """{view: {variable: expression}} of one loss as derived now (readable forms, as text)."""
    out: dict[str, dict[str, str]] = {}
    for view in gradlab.VIEWS:
        try:
            grads = gradlab.gradient(name, view)
        except UnknownVariableError:
            continue  # the margin view applies only to losses of the margin alone
        out[view] = {k: str(v) for k, v in grads.items()}
    return out


def current() -> dict[str, dict[str, dict[str, str]]]:
    """{loss: {view: {variable: expression}}} as derived now (readable forms, as text)."""
    return {name: current_of(name) for name in gradlab.LOSSES}


def main() -> int:
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(current(), indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
