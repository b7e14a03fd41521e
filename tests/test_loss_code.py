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


# --------------------------------------------------------------------------------------------
# The facts a run checks a registered loss against, without sympy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
def test_the_facts_are_the_registrys(name):
    """Kind, variables, hyperparameters in order, defaults as the floats the registry's exact
    defaults give, and ranges: what ``gradlab.losses`` says of each loss, by each spelling."""
    loss = LOSSES[name]
    for spelling in (name, *loss.aliases):
        found = _loss_code.facts(spelling)
        assert found is not None, spelling
        assert (found.name, found.kind, found.variables) == (loss.name, loss.kind, loss.variables)
        assert found.hyperparameters == loss.hyperparameters
        for k, default, domain in found.hyper:
            want = loss.defaults[k]
            assert default == (None if want is None else float(want)), (name, k)
            assert domain == loss.domain(k), (name, k)


def _registry_values(name: str, given: dict):
    """The registry's answer: the floats, or the refusal's type and message."""
    from gradlab import symbolic
    from gradlab.errors import GradlabError

    try:
        return tuple((s.name, float(v)) for s, v in symbolic.parameter_values(LOSSES[name], given).items())
    except GradlabError as exc:
        return type(exc), str(exc)


@pytest.mark.parametrize(("name", "given"), [
    ("dpo", {}), ("dpo", {"beta": 0.5}), ("dpo", {"beta": 2}), ("dpo", {"beta": 1e-300}), ("dpo", {"beta": 3e38}),
    ("cdpo", {"label_smoothing": 0.0}), ("cdpo", {"label_smoothing": 0.4999999999999999}),
    ("ld_dpo", {"ld_alpha": 1}), ("ld_dpo", {"ld_alpha": 0.0}), ("bco_pair", {"bco_delta": -7.25}),
    ("alphapo", {"alpha": 0.3, "cpo_alpha": 0.2}), ("sft", {}),
])
def test_plainly_valid_values_give_the_registrys_floats(name, given):
    assert _loss_code.facts(name).values(given) == _registry_values(name, given)


@pytest.mark.parametrize(("name", "given"), [
    ("dpo", {"beta": 0.0}), ("dpo", {"beta": -1}), ("dpo", {"gamma": 0.1}), ("dpo", {"beta": float("nan")}),
    ("dpo", {"beta": float("inf")}), ("dpo", {"beta": True}), ("dpo", {"beta": "0.1"}), ("dpo", {"beta": 2**60}),
    ("cdpo", {"label_smoothing": 0.5}), ("ld_dpo", {"ld_alpha": 1.5}), ("sft", {"beta": 0.1}),
])
def test_values_not_plainly_valid_are_left_to_the_registry(name, given):
    """Each is refused by the registry (with the message the user sees) or, for an int past
    2**53 or a string, read by it; the table answers none of them."""
    from gradlab.errors import GradlabError

    assert _loss_code.facts(name).values(given) is None
    found = _registry_values(name, given)
    if given in ({"beta": 2**60}, {"beta": "0.1"}):
        assert found == (("beta", float(given["beta"])),)
    else:
        assert isinstance(found[0], type) and issubclass(found[0], GradlabError) and found[1], found


def test_a_hyperparameter_without_a_default_is_left_to_the_registry():
    table = _loss_code.table()
    fake = types.SimpleNamespace(**{k: getattr(table, k) for k in ("FORMAT", "SOURCES", "LOSSES", "ALIASES")},
                                 FACTS={**table.FACTS, "dpo": ("pair", (("beta", None, (0.0, None, True, True)),))})
    found = _loss_code.facts("dpo", module=fake)
    assert found.values({}) is None and found.values({"beta": 0.25}) == (("beta", 0.25),)


def test_stale_or_absent_facts_are_not_served():
    table = _loss_code.table()
    assert _loss_code.facts("sigmoid").name == "dpo"
    stale = types.SimpleNamespace(**{k: getattr(table, k) for k in ("FORMAT", "LOSSES", "ALIASES", "FACTS")},
                                  SOURCES={**table.SOURCES, "gradlab/losses.py": "0" * 64})
    assert _loss_code.facts("dpo", module=stale) is None
    assert _loss_code.facts("dpo:0.5,ipo:0.5") is None and _loss_code.facts("DPO") is None
    assert _loss_code.facts("grpo") is None and _loss_code.facts(None) is None  # a group loss: the registry's


def test_a_run_checks_a_registered_loss_from_the_table_and_refuses_as_the_registry_does():
    from gradlab.errors import GradlabError
    from gradlab.experiments import validate
    from gradlab.experiments.config import LossConfig

    cfg = LossConfig(name="sigmoid", values={"beta": 0.5})
    loss = validate.resolve_loss(cfg)
    assert isinstance(loss, _loss_code.Facts) and validate.hyper_values(cfg, loss) == {"beta": 0.5}
    for values, message in (({"beta": -1.0}, "[loss]: beta=-1.0 is outside its domain (0, inf)"),
                            ({"gamma": 1.0}, "[loss]: 'dpo' has no hyperparameter gamma; its hyperparameters: beta")):
        bad = LossConfig(name="sigmoid", values=values)
        with pytest.raises(GradlabError) as exc:
            validate.hyper_values(bad, validate.resolve_loss(bad))
        assert str(exc.value) == message


# A fresh interpreter runs both commands through the CLI, then reports whether sympy was imported.
_NO_SYMPY = """
import sys
from gradlab import cli
codes = [cli.main(["simulate", "dpo", "--steps", "2", "--seeds", "1", "--json"]),
         cli.main(["run", sys.argv[1], "--set", "train.steps=2", "--json"])]
print("CODES", codes, "SYMPY", "sympy" in sys.modules, file=sys.stderr)
"""


def test_simulate_and_run_on_registered_losses_do_not_import_sympy():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    example = root / "experiments" / "three_actions_two_losses.toml"  # dpo and ipo, beta given
    done = subprocess.run([sys.executable, "-c", _NO_SYMPY, str(example)], capture_output=True, text=True, cwd=root)
    assert "CODES [0, 0] SYMPY False" in done.stderr, done.stderr[-2000:]
