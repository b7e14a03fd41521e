"""The generated docs must not go stale (``docs/losses.md``, derived from scratch, is checked with
the answers table in ``tests/test_answers.py``, from the one render of both)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradlab import catalogue
from gradlab.losses import LOSSES

DOC = Path(__file__).resolve().parents[1] / "docs" / "losses.md"


@pytest.mark.parametrize("name", ["loss_audit.md", "trl.md"])
def test_generated_docs_are_current(name):
    path = DOC.parent / name
    assert path.exists(), f"docs/{name} is missing; run 'python3 tasks.py docs'"
    stale = f"docs/{name} is stale; run 'python3 tasks.py docs'"
    assert path.read_text(encoding="utf-8") == catalogue.DOCS[name](), stale


def test_audit_table_has_one_row_per_loss_with_its_sources():
    text = catalogue.render_audit()
    for name, loss in LOSSES.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert loss.equation and loss.audit, name
        for impl in loss.implementations:
            assert impl.source.commit[:8] in row and impl.path in row


def test_trl_table_lists_every_trl_row():
    from gradlab.trl import TRL_CONFIGS

    text = catalogue.render_trl()
    assert sum(line.startswith("| ") and "Trainer" in line for line in text.splitlines()) == len(TRL_CONFIGS)
