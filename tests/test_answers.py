"""``gradlab list``, ``show``, ``grad``, ``eval`` and the families' ``--help`` answer from the shipped
table without sympy or JAX; the table is current, a table that does not match the sources it was
made from (or was edited) is never served, and ``eval`` from the table gives the derived path's
numbers digit for digit, refusals included. ``gradlab.symbolic`` reads a registered loss's
derivations from the same table: the very expressions a derivation gives, only for the expression
they were derived from, never for a user's formula; and the table is generated without reading it."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sympy

from gradlab import _cache, _shipped, answers, caches, catalogue, symbolic
from gradlab.errors import UnknownVariableError
from gradlab.losses import LOSSES, custom
from gradlab.symbols import VIEWS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("sympy", "jax", "numpy", "matplotlib", "mpmath")

# runs the CLI in a fresh interpreter, then reports on stderr which heavy modules it imported
_PROBE = """
import sys
from gradlab import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("HEAVY", [m for m in {heavy!r} if m in sys.modules], file=sys.stderr)
sys.exit(code)
"""


def _cli(*args: str, cwd: Path = ROOT, pythonpath: Path = ROOT) -> tuple[int, str, list[str]]:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    done = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    line = next(x for x in done.stderr.splitlines() if x.startswith("HEAVY "))
    return done.returncode, done.stdout, json.loads(line[6:].replace("'", '"'))


def _no_table_reads(*args, **kwargs):
    pytest.fail(f"the table was read while it was being generated: derivation{args}")


@pytest.fixture(scope="module")
def from_scratch():
    """The table and the docs' catalogue (``docs/losses.md``) rendered once for this module, from
    empty in-process caches, with the table's reader made to fail (so the generators provably
    derive: a table they read would certify itself); and what was derived, by loss and view: the
    expression in the view and the partials (None where the view does not apply)."""
    caches.clear_caches()
    derived = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_shipped, "derivation", _no_table_reads)
        text = catalogue.render_answers()
        losses_md = catalogue.render()
        for name, loss in LOSSES.items():
            for view in VIEWS:
                try:
                    derived[name, view] = (symbolic.in_view(loss, view, table=None),
                                           symbolic.gradient(loss, view, table=None))
                except UnknownVariableError:  # a view that does not apply (margin)
                    derived[name, view] = (None, None)
    return text, derived, losses_md


# the tests of the render, on one worker, so that it renders once (a module fixture is per worker)
_FROM_SCRATCH = pytest.mark.long(seconds=12, group="from_scratch")


@_FROM_SCRATCH
def test_the_shipped_table_is_current(from_scratch):
    assert answers.TABLE.exists(), "gradlab/answers.jsonl is missing; run 'python3 tasks.py docs'"
    stale = "gradlab/answers.jsonl is stale; run 'python3 tasks.py docs'"
    assert answers.TABLE.read_text(encoding="utf-8") == from_scratch[0], stale
    assert answers.table() is not None, stale


def test_the_table_covers_every_registered_loss_and_name():
    found = answers.decode(answers.TABLE.read_text(encoding="utf-8"))
    assert set(found["show"]) == set(LOSSES) == set(found["grad"]) == set(found["derivation"])
    assert found["names"]["sigmoid"] == "dpo" and found["names"]["dpo"] == "dpo"
    for name, loss in LOSSES.items():
        assert set(found["grad"][name]["log"]["partials"]) == {*loss.variables, *loss.hyperparameters}
        derivation = found["derivation"][name]
        assert set(derivation) == set(VIEWS)
        for view, spec in derivation.items():  # every tree encoded and decoding exactly (else None)
            assert ("expr" in spec) == bool(VIEWS[view].substitution)
            assert all(item is not None for item in [spec.get("expr", 0), *spec["partials"].values()]), (name, view)
            if view in found["grad"][name]:
                assert set(spec["partials"]) <= set(found["grad"][name][view]["partials"])
                assert set(spec["partials"]) >= set(symbolic.variables(loss, view, table=None))


@_FROM_SCRATCH
def test_the_catalogue_is_current_and_covers_every_loss(from_scratch):
    doc = ROOT / "docs" / "losses.md"
    assert doc.exists(), "docs/losses.md is missing; run 'python3 tasks.py docs'"
    assert doc.read_text(encoding="utf-8") == from_scratch[2], "docs/losses.md is stale; run 'python3 tasks.py docs'"
    for name in LOSSES:
        assert f"## `{name}`" in from_scratch[2]


@_FROM_SCRATCH
def test_the_table_s_derivations_are_the_derived_expressions(from_scratch, monkeypatch):
    """Every registered loss, every view, every variable: with the disk cache and sympy's
    differentiation made to fail, the expression in the view and every partial are the ones a
    derivation with the table off gives, to the structure (``==`` and ``srepr``)."""
    derived = from_scratch[1]
    caches.clear_caches()
    monkeypatch.setattr(_cache, "load", lambda key: pytest.fail("read the disk cache for a registered loss"))
    monkeypatch.setattr(sympy, "diff", lambda *a, **k: pytest.fail("derived a registered loss again"))
    compared = 0
    for (name, view), (expr, partials) in derived.items():
        if expr is None:
            with pytest.raises(UnknownVariableError):
                symbolic.gradient(name, view)
            continue
        mine = {"expr": symbolic.in_view(name, view), **symbolic.gradient(name, view)}
        theirs = {"expr": expr, **partials}
        assert list(mine) == list(theirs), (name, view)
        for wrt, e in theirs.items():
            assert mine[wrt] == e and sympy.srepr(mine[wrt]) == sympy.srepr(e), (name, view, wrt)
            compared += 1
    assert compared > 700


def test_a_user_s_formula_never_reads_the_table_and_another_dpo_is_derived(monkeypatch):
    """DPO written out by a user (any name but the registered one) never reaches the table; a
    formula under the name dpo that is not dpo's reads dpo's entry, finds its keys differ, and is
    derived. The control: the registered dpo reads it."""
    caches.clear_caches()
    reads = []
    real = _shipped.derivation
    monkeypatch.setattr(_shipped, "derivation", lambda name, path=answers.TABLE: reads.append(name) or real(name, path))
    dpo = LOSSES["dpo"]
    mine = custom(str(dpo.expr), name="my_dpo")
    assert mine.expr == dpo.expr
    for view in VIEWS:
        symbolic.gradient(mine, view)
    assert reads == []
    edited = custom(f"{dpo.expr} + lp_w**2/100", name="dpo")
    for view in ("log", "probability"):
        got = symbolic.gradient(edited, view)
        assert got == symbolic.gradient(edited, view, table=None) != symbolic.gradient(dpo, view, table=None)
    assert reads and set(reads) == {"dpo"}
    reads.clear()
    caches.clear_caches()
    symbolic.gradient("dpo", "probability")
    assert reads and set(reads) == {"dpo"}


def test_an_entry_for_another_expression_or_in_an_edited_table_is_not_served(tmp_path):
    """A copy of the table with a wrong tree for dpo's d/d p_l (probability view): served when
    the copy is whole and the tree is filed under the key of dpo's expression (the control: the
    table is trusted as it stands); not served under another key, nor once the body no longer
    matches the digest in the head. Likewise for the view's expression."""
    text = answers.TABLE.read_text(encoding="utf-8")
    doc = answers.decode(text)
    assert answers.encode(doc) == text
    truth = symbolic.derivative("dpo", "p_l", "probability", table=None)
    view_truth = symbolic.in_view("dpo", "probability", table=None)
    wrong, wrong_view = _cache.encode(2 * truth), _cache.encode(view_truth + symbolic.symbol_of("p_w"))

    def variant(name: str, key: str | None = None, view_key: str | None = None, *, whole: bool = True) -> Path:
        changed = copy.deepcopy(doc)
        spec = changed["derivation"]["dpo"]["probability"]
        spec["partials"]["p_l"] = [key or spec["partials"]["p_l"][0], wrong]
        spec["expr"] = [view_key or spec["expr"][0], wrong_view]
        new = answers.encode(changed)
        head = (new if whole else text).split("\n", 1)[0]  # not whole: the head's digest is the old body's
        path = tmp_path / name
        path.write_text(head + "\n" + new.split("\n", 1)[1], encoding="utf-8")
        return path

    served = variant("served.jsonl")
    assert answers.table(served) is not None
    assert symbolic.in_view("dpo", "probability", table=served) == _cache.decode(wrong_view)
    caches.clear_caches()
    served = variant("served_partial.jsonl", view_key="0" * 64)
    assert symbolic.derivative("dpo", "p_l", "probability", table=served) == _cache.decode(wrong) != truth
    other = variant("other_key.jsonl", "0" * 64, "0" * 64)
    assert answers.table(other) is not None
    assert symbolic.in_view("dpo", "probability", table=other) == view_truth
    assert symbolic.derivative("dpo", "p_l", "probability", table=other) == truth
    edited = variant("edited.jsonl", whole=False)
    assert answers.table(edited) is None
    assert symbolic.in_view("dpo", "probability", table=edited) == view_truth
    assert symbolic.derivative("dpo", "p_l", "probability", table=edited) == truth


def _with_head(text: str, **changes) -> str:
    first, rest = text.split("\n", 1)
    return json.dumps(dict(json.loads(first), **changes), sort_keys=True) + "\n" + rest


def test_a_table_whose_sources_changed_is_not_served(tmp_path):
    text = answers.TABLE.read_text(encoding="utf-8")
    doc = answers.table()  # the head: what the freshness check reads
    assert answers.table(tmp_path / "absent.json") is None
    for key in ("gradlab/losses.py", "sympy/release.py"):
        path = tmp_path / f"{key.replace('/', '_')}.json"
        path.write_text(_with_head(text, sources={**doc["sources"], key: "0" * 64}), encoding="utf-8")
        assert answers.table(path) is None, key
    missing = _with_head(text, sources={**doc["sources"], "gradlab/no_such_module.py": "0" * 64})
    (tmp_path / "missing.json").write_text(missing, encoding="utf-8")
    assert answers.table(tmp_path / "missing.json") is None
    (tmp_path / "same.json").write_text(text, encoding="utf-8")
    assert answers.table(tmp_path / "same.json") is not None  # the control: an unchanged copy is served


def test_an_edited_table_is_not_served(tmp_path):
    """A hand edit anywhere after the head (here: dpo's default beta in its eval line) makes the whole
    table unservable, though every source it records is unchanged."""
    text = answers.TABLE.read_text(encoding="utf-8")
    line = next(x for x in text.splitlines() if x.startswith('{"eval": "dpo", '))
    edited = line.replace('"1/10"', '"1/5"', 1)  # the default beta
    assert edited != line
    (tmp_path / "edited.json").write_text(text.replace(line, edited), encoding="utf-8")
    assert answers.table(tmp_path / "edited.json") is None
    (tmp_path / "same.json").write_text(text, encoding="utf-8")
    assert answers.table(tmp_path / "same.json") is not None


def test_the_sources_cover_the_loss_definitions_and_their_derivation():
    keys = set(answers.source_files())
    assert {"gradlab/losses.py", "gradlab/symbolic.py", "gradlab/printing.py", "gradlab/symbols.py",
            "gradlab/answers.py", "gradlab/parsing.py", "sympy/release.py"} <= keys
    assert "gradlab/cli.py" not in keys and "gradlab/policies.py" not in keys


@pytest.mark.parametrize("args", [
    ["--version"], ["--help"], ["grad", "--help"], ["list"], ["list", "--json"], ["show", "dpo"],
    ["show", "sigmoid", "--json"], ["grad", "ipo", "--wrt", "p_l", "--view", "probability", "--json"],
    ["grad", "dpo", "--wrt", "len_w", "--view", "length"], ["simulate", "--help"], ["check", "--help"],
])
def test_commands_answered_from_the_table_import_neither_sympy_nor_jax(args):
    code, out, heavy = _cli(*args)
    assert code == 0 and out.strip()
    assert heavy == []


def test_the_families_help_is_the_registry_s():
    from gradlab.policies import REGISTRY, facts

    assert answers.families() == facts()
    assert [r["name"] for r in answers.families()] == list(REGISTRY)
    assert "policies.py" not in str(answers.source_files())  # a policy edit leaves the loss answers current
    assert "gradlab/policies.py" in answers.table()["families"]["sources"]
    code, out, heavy = _cli("simulate", "--help")
    assert code == 0 and heavy == []
    for name in REGISTRY:
        assert name in out


@pytest.mark.parametrize(("args", "expr"), [
    (["eval", "dpo", "--at", "lp_w=-1,lp_l=-2,ref_w=-1,ref_l=-1", "--json", "--set", "beta=0.1"],
     "softplus(-beta*(lp_w - ref_w - lp_l + ref_l))"),
    (["eval", "sigmoid", "--view", "probability", "--at", "p_w=1e-400,p_l=0.5,q_w=0.5,q_l=0.5", "--set", "beta=0.3"],
     "softplus(-beta*(lp_w - ref_w - lp_l + ref_l))"),
    (["eval", "ipo", "--at", "lp_w=-1e-300,lp_l=-1,ref_w=-1,ref_l=-3", "--json", "--set", "beta=0.1"],
     "(lp_w - ref_w - lp_l + ref_l - 1/(2*beta))**2"),
])
def test_eval_of_a_registered_loss_imports_no_sympy_and_prints_the_derived_answer(args, expr):
    code, out, heavy = _cli(*args)
    assert code == 0 and out.strip()
    assert heavy == ["mpmath"]  # the numbers need mpmath, and nothing else heavy
    # the control: the same formula given with --expr keeps the sympy path, and prints the same
    code, derived, heavy = _cli(args[0], "--expr", expr, *args[2:])
    assert code == 0 and "sympy" in heavy
    if "--json" in args:
        mine, theirs = json.loads(out), json.loads(derived)
        assert mine.pop("loss") == args[1] and theirs.pop("loss") == "custom"
        assert mine == theirs
    else:
        assert out.splitlines()[1:] == derived.splitlines()[1:]


@pytest.mark.parametrize(("args", "message"), [
    (["eval", "dpo", "--at", "lp_w=1,lp_l=-1,ref_w=-1,ref_l=-1"], "lp_w=1 is outside its domain"),
    (["eval", "dpo", "--at", "lp_w=-1,lp_l=-1,ref_w=-1"], "missing ref_l"),
    (["eval", "dpo", "--at", "lp_w=-1,lp_l=-1,ref_w=-1,ref_l=-1", "--set", "gamma=1"], "no hyperparameter gamma"),
    (["eval", "dpo", "--at", "lp_w=-1,lp_l=-1,ref_w=-1,ref_l=-1", "--set", "beta=0"], "beta=0 is outside"),
    (["eval", "dpo", "--view", "nope", "--at", "lp_w=-1"], "unknown view"),
    (["eval", "ipo", "--view", "margin", "--at", "h=1", "--set", "beta=1e-400"], "beta=1e-400 is outside"),
    (["eval", "grpo", "--at", "A=1"], "group loss"),
])
def test_eval_refusals_for_registered_losses_are_the_derived_path_s(args, message, capsys):
    from gradlab import cli

    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


def test_an_invalid_eval_is_refused_by_the_derived_path():
    code, out, heavy = _cli("eval", "dpo", "--at", "lp_w=-1,lp_l=-1,ref_w=-1,ref_l=-1", "--set", "beta=0")
    assert code == 2 and out == "" and "sympy" in heavy
    code, out, heavy = _cli("eval", "dpo", "--at", "lp_w=-1,lp_l=-1,ref_w=-1,ref_l=-1", "--set", "beta=1")
    assert code == 0 and "sympy" not in heavy  # the control


def test_answers_from_the_table_are_the_derived_answers():
    loss = LOSSES["simpo"]
    for view, wrt in (("log", "lp_w"), ("length", "len_l"), ("probability", "beta")):
        assert answers.grad("simpo", None, wrt, view) == answers.derive_grad(loss, wrt, view)
    assert answers.show("simpo", None) == answers.derive_show(loss)
    assert answers.list_document() == answers.derive_list()


def test_a_changed_loss_definition_is_derived_not_served_from_the_table(tmp_path):
    """A copy of the package whose dpo has another default beta: the CLI must print (and
    evaluate) the new definition, which the shipped table (copied along, unchanged) does not hold."""
    copy = tmp_path / "gradlab"
    shutil.copytree(ROOT / "gradlab", copy, ignore=shutil.ignore_patterns("__pycache__"))
    source = (copy / "losses.py").read_text(encoding="utf-8")
    marker = "def dpo(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA) -> Expr:"
    assert marker in source
    changed = marker.replace("= BETA", "= 0.25")
    assert changed != marker
    (copy / "losses.py").write_text(source.replace(marker, changed),
                                    encoding="utf-8")
    code, out, heavy = _cli("show", "dpo", "--json", cwd=tmp_path, pythonpath=tmp_path)
    assert code == 0 and "sympy" in heavy
    assert json.loads(out)["defaults"] == {"beta": 0.25}
    code, out, heavy = _cli("show", "dpo", "--json")  # the control: the real package serves 0.1
    assert code == 0 and heavy == [] and json.loads(out)["defaults"] == {"beta": 0.1}
    at = ("--at", "lp_w=-1,lp_l=-2,ref_w=-1,ref_l=-1", "--json")
    code, out, heavy = _cli("eval", "dpo", *at, cwd=tmp_path, pythonpath=tmp_path)
    assert code == 0 and "sympy" in heavy and json.loads(out)["hyperparameters"] == {"beta": 0.25}
    code, out, heavy = _cli("eval", "dpo", *at)
    assert code == 0 and "sympy" not in heavy and json.loads(out)["hyperparameters"] == {"beta": 0.1}


def test_bad_output_folders_are_refused_before_any_heavy_import(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine", encoding="utf-8")
    for args in (["figures", "--out", "."], ["figures", "--out", "mine"],
                 ["figures", "no_such_figure", "--out", "new"], ["reproduce", "--all", "--figures", "mine"]):
        code, out, heavy = _cli(*args, cwd=tmp_path)
        assert code == 2 and out == "" and heavy == [], args
    assert [p.name for p in tmp_path.iterdir()] == ["mine"] and [p.name for p in mine.iterdir()] == ["notes.txt"]


# ``gradlab eval`` from the table against the derived (sympy) path, at points that include the
# extremes and the cancellations of the exact-or-refused tests: the policy equal to the reference
# (terms that cancel exactly), log-probs far out (-1e4) and next to 0 (-1e-300, -1e-990, where
# exp(lp) - 1 cancels), probabilities below float64's range (5e-324, 1e-400), one float above
# another (0.5000000000000001), and the hinge's kink (1 - beta h = 0)
_POINTS = {
    "typical": dict(lp_w="-1", lp_l="-2", ref_w="-1.5", ref_l="-1.25", len_w="3", len_l="5", p_w="0.5", p_l="0.25",
                    q_w="0.4", q_l="0.3", m_w="-0.5", m_l="-0.75", n_w="-0.6", n_l="-0.4", h="0.7",
                    tail_w="-0.5", tail_l="-0.7", ref_tail_w="-0.6", ref_tail_l="-0.2"),
    "equal": dict(lp_w="-1", lp_l="-2", ref_w="-1", ref_l="-2", len_w="4", len_l="4", p_w="0.5", p_l="0.5", q_w="0.5",
                  q_l="0.5", m_w="-0.5", m_l="-0.5", n_w="-0.5", n_l="-0.5", h="0",
                  tail_w="-0.5", tail_l="-0.5", ref_tail_w="-0.5", ref_tail_l="-0.5"),
    "deep": dict(lp_w="0", lp_l="-1000", ref_w="0", ref_l="0", len_w="1", len_l="1e4", p_w="0.5", p_l="1e-300",
                 q_w="0.25", q_l="0.5", m_w="-1e-3", m_l="-10", n_w="0", n_l="0", h="-1000",
                 tail_w="0", tail_l="-1000", ref_tail_w="0", ref_tail_l="0"),
    "tiny": dict(lp_w="-1e-300", lp_l="-1", ref_w="-1", ref_l="-1", len_w="1", len_l="1", p_w="5e-324", p_l="0.5",
                 q_w="0.5", q_l="0.5", m_w="-1e-300", m_l="-1", n_w="-1", n_l="-1", h="1e-300",
                 tail_w="-1e-300", tail_l="-1", ref_tail_w="-1", ref_tail_l="-1"),
    "far": dict(lp_w="-1e4", lp_l="-1e4", ref_w="0", ref_l="0", len_w="1e4", len_l="2", p_w="1e-400", p_l="0.5",
                q_w="0.5", q_l="0.5000000000000001", m_w="-1e-990", m_l="-3", n_w="0", n_l="-1e-990", h="1e3",
                tail_w="-1e4", tail_l="-1e4", ref_tail_w="0", ref_tail_l="0"),
    "cancel": dict(lp_w="-1e-990", lp_l="-1e-990", ref_w="0", ref_l="0", len_w="1", len_l="1", p_w="1", p_l="1",
                   q_w="1", q_l="1", m_w="-1e-990", m_l="-1e-990", n_w="0", n_l="0", h="-1e-990",
                   tail_w="-1e-990", tail_l="-1e-990", ref_tail_w="0", ref_tail_l="0"),
    "kink": dict(lp_w="0", lp_l="-10", ref_w="0", ref_l="0", len_w="2", len_l="2", p_w="1", p_l="0.5", q_w="1",
                 q_l="1", m_w="0", m_l="-5", n_w="0", n_l="0", h="10",
                 tail_w="0", tail_l="-10", ref_tail_w="0", ref_tail_l="0"),
}


def _outcome(call, *args):
    from gradlab.errors import GradlabError

    try:
        return call(*args)
    except GradlabError as exc:
        return type(exc).__name__


@pytest.mark.parametrize("name", list(LOSSES))
def test_eval_from_the_table_is_the_derived_eval_digit_for_digit(name):
    """Every view of every registered loss, at every point of ``_POINTS``, at the defaults and
    (at two points) at hyperparameters of 0.3: the same 20 correct digits (so the same JSON
    numbers), the same exact zeros, and the same refusals (budget or domain)."""
    import mpmath

    from gradlab import output

    entry = answers.line(answers.TABLE, "eval", name)["entry"]
    compared = 0
    for view, spec in entry["views"].items():
        at_all = {p: {v: pt[v] for v, _ in spec["variables"]} for p, pt in _POINTS.items()}
        settings = [(p, {}) for p in _POINTS]
        settings += [(p, {k: "0.3" for k, _, (low, high, *_) in entry["hyperparameters"]
                          if low in (0, None) and (high is None or high > 0.3)}) for p in ("typical", "equal")]
        for point, values in settings:
            at = at_all[point]
            mine = _outcome(answers._evaluate_entry, name, entry, at, values, view)
            theirs = _outcome(answers.derive_eval, LOSSES[name], at, values, view)
            case = (view, point, values)
            if mine is None:  # not plainly valid: the derived path must refuse it (its message)
                assert isinstance(theirs, str), case
                continue
            if isinstance(mine, str) or isinstance(theirs, str):
                assert mine == theirs, case
                continue
            assert {k: mine[k] for k in ("at", "hyperparameters")} == {k: theirs[k] for k in ("at", "hyperparameters")}
            assert list(mine["values"]) == list(theirs["values"]), case
            for k, x in mine["values"].items():
                y = theirs["values"][k]
                with mpmath.workdps(60):
                    assert x == y or abs(x - y) <= mpmath.mpf(10) ** -20 * abs(y), (case, k, x, y)
                assert output.number(x) == output.number(y), (case, k)
                compared += 1
    assert compared > 0
