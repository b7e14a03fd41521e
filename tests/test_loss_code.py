"""The shipped numeric loss functions (``gradlab.experiments._loss_code``): the committed table is
what the generator gives now, it gives the derivation's bits, and a table that is not current,
or a loss it does not hold, is derived instead of served."""

from __future__ import annotations

import types
import zlib

import numpy as np
import pytest

from gradlab.experiments import _loss_code, objective
from gradlab.losses import LOSSES

HINT = "regenerate it with: python -m gradlab.catalogue gradlab/experiments/_loss_table.py"


@pytest.fixture(scope="module")
def rendered() -> str:
    return _loss_code.render()


def test_the_shipped_table_is_what_the_generator_gives_now(rendered):
    assert _loss_code.TABLE.read_text(encoding="utf-8") == rendered, f"the shipped table is stale; {HINT}"
    assert _loss_code.table() is not None, f"the shipped table is not current; {HINT}"


def _points(variables: list[str], n_hyper: int, rng) -> list[np.ndarray]:
    """Log-probs and tails over [-1e3, 0), lengths over [1e-3, 1e4], hyperparameters over
    [1e-3, 1e1]: spread over orders of magnitude, with the domains' extremes."""
    spread = lambda low, high: np.exp(rng.uniform(np.log(low), np.log(high), 256))  # noqa: E731
    out = []
    for v in variables:
        out.append(-spread(1e-6, 1e3) if v.startswith(("lp", "ref", "tail")) else spread(1e-3, 1e4))
    return out + [spread(1e-3, 10.0) for _ in range(n_hyper)]


@pytest.mark.parametrize("name", list(LOSSES))
def test_the_table_gives_the_derivations_bits(name):
    shipped, derived = _loss_code.served(name), _loss_code.derive(LOSSES[name])
    assert shipped is not None
    assert (shipped[0], shipped[1], shipped[3]) == (derived[0], derived[1], derived[3])
    args = _points(shipped[0], shipped[1], np.random.default_rng(zlib.crc32(name.encode())))
    got = [np.asarray(shipped[2](*args)), *map(np.asarray, shipped[4](*args))]
    want = [np.asarray(derived[2](*args)), *map(np.asarray, derived[4](*args))]
    assert len(got) == len(want) == 1 + len(shipped[3])
    for a, b in zip(got, want, strict=True):
        assert a.tobytes() == b.tobytes(), name


def test_aliases_are_served_and_other_names_are_derived():
    table = _loss_code.table()
    assert _loss_code.served("sigmoid") is not None and _loss_code.served("sigmoid")[2] is table.dpo_value
    assert _loss_code.served("dpo:0.5,ipo:0.5") is None  # a combination: derived
    assert _loss_code.served("DPO") is None and _loss_code.served(None) is None
    fns = objective.loss_fns("custom", "softplus(-beta*(lp_w - lp_l))")  # a formula: derived, whatever its name
    assert fns.value is not table.dpo_value and fns.moving == ["lp_w", "lp_l"]
    assert objective.loss_fns("dpo", None).value is table.dpo_value


def test_a_table_that_is_not_current_is_not_served():
    """A changed loss (or derivation, printer, sympy release) changes a recorded hash: nothing
    is served from that table, and ``loss_fns`` derives."""
    table = _loss_code.table()
    assert _loss_code.served("dpo", module=table) is not None
    for key in ("gradlab/losses.py", "gradlab/symbolic.py", "sympy/release.py"):
        assert key in table.SOURCES
        stale = types.SimpleNamespace(**{k: getattr(table, k) for k in ("FORMAT", "LOSSES", "ALIASES")},
                                      SOURCES={**table.SOURCES, key: "0" * 64})
        assert _loss_code.served("dpo", module=stale) is None, key
    other = types.SimpleNamespace(FORMAT="another", SOURCES=table.SOURCES, LOSSES=table.LOSSES, ALIASES={})
    assert _loss_code.served("dpo", module=other) is None
