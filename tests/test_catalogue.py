"""docs/losses.md is generated from the registry and must not go stale."""

from __future__ import annotations

from pathlib import Path

from gradlab import catalogue
from gradlab.losses import LOSSES

DOC = Path(__file__).resolve().parents[1] / "docs" / "losses.md"


def test_catalogue_is_current():
    assert DOC.exists(), "docs/losses.md is missing; run 'python3 tasks.py docs'"
    assert DOC.read_text(encoding="utf-8") == catalogue.render(), (
        "docs/losses.md is stale; run 'python3 tasks.py docs'"
    )


def test_catalogue_covers_every_loss():
    text = catalogue.render()
    for name in LOSSES:
        assert f"## `{name}`" in text
