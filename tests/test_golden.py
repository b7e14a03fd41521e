"""Symbolic regression tests: derived gradients must match the committed golden file.

The golden file holds every gradient of every registered loss in every view, as text. Each
entry is parsed with gradlab's safe parser and compared by symbolic equivalence, never as a
string. After an intended change, regenerate it with ``python3 tasks.py golden`` and review
the diff.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest

import gradlab
from helpers import assert_same
from make_golden import GOLDEN, current_of

HINT = "regenerate with 'python3 tasks.py golden' after an intended change, and review the diff"


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing; {HINT}")
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


class _Derived(Mapping):
    """Each loss's gradients, derived on first use: pytest-xdist gives every worker its own copy of
    a module fixture, so each worker derives only the losses its tests compare."""

    def __init__(self) -> None:
        self._done: dict[str, dict[str, dict[str, str]]] = {}

    def __getitem__(self, name: str) -> dict[str, dict[str, str]]:
        if name not in self._done:
            self._done[name] = current_of(name)
        return self._done[name]

    def __iter__(self):
        return iter(gradlab.LOSSES)

    def __len__(self) -> int:
        return len(gradlab.LOSSES)


@pytest.fixture(scope="module")
def derived() -> Mapping[str, dict[str, dict[str, str]]]:
    return _Derived()


def test_golden_covers_exactly_the_registry(golden, derived):
    missing = sorted(set(derived) - set(golden))
    stale = sorted(set(golden) - set(derived))
    assert not missing, f"losses without golden gradients: {missing}; {HINT}"
    assert not stale, f"golden file has losses that are no longer registered: {stale}; {HINT}"


@pytest.mark.parametrize("name", list(gradlab.LOSSES))
def test_gradients_match_golden(name, golden, derived):
    assert name in golden, f"'{name}' has no golden entry; {HINT}"
    assert set(golden[name]) == set(derived[name]), f"views differ for '{name}'; {HINT}"
    for view, grads in derived[name].items():
        assert set(golden[name][view]) == set(grads), f"variables differ for {name}/{view}; {HINT}"
        for var, text in grads.items():
            assert_same(gradlab.parse(text), gradlab.parse(golden[name][view][var]), f"{name}/{view}/{var}: {HINT}")


def test_comparison_detects_a_changed_entry(golden):
    text = golden["dpo"]["log"]["lp_w"]
    changed = gradlab.parse(f"2*({text})")
    assert not gradlab.equivalent(gradlab.parse(text), changed)
