"""The command line, through its public contracts (README, docs/architecture.md) and its bad-input messages."""

from __future__ import annotations

import json
import subprocess
import sys

import mpmath
import pytest
import sympy

import gradlab
from gradlab.cli import main
from gradlab.symbols import symbol
from helpers import assert_same


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def parse_plain(out):
    """Parse 'expr' with plain sympy.sympify, using only the names in 'variables'."""
    local = {name: sympy.Symbol(name) for name in out["variables"]}
    return sympy.sympify(out["expr"], locals=local)


def with_assumptions(expr):
    return expr.xreplace({s: symbol(s.name) for s in expr.free_symbols})


def test_module_and_console_script_both_work():
    for cmd in (
        [sys.executable, "-m", "gradlab", "list"],
        [sys.executable, "-c", "from gradlab.cli import main; main(['list'])"],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        assert "dpo" in done.stdout


def test_list_json_has_every_loss_and_alias(capsys):
    out = run_json(capsys, "list")
    names = {row["name"] for row in out["losses"]}
    from gradlab.group_losses import GROUP_LOSSES

    assert names == set(gradlab.LOSSES) | set(GROUP_LOSSES)
    assert {row["name"] for row in out["losses"] if row["kind"] == "group"} == set(GROUP_LOSSES)
    assert {"sigmoid"} <= {a for row in out["losses"] for a in row["aliases"]}


def test_show_json_contract(capsys):
    out = run_json(capsys, "show", "gdpo")
    for key in ("name", "aliases", "expr", "latex", "defaults", "variables"):
        assert key in out
    assert out["defaults"] == {"beta": 0.1, "gamma": 0.1}
    assert_same(with_assumptions(parse_plain(out)), gradlab.standard(gradlab.get_loss("gdpo").expr))


def test_show_alias_resolves(capsys):
    assert run_json(capsys, "show", "sigmoid")["name"] == "dpo"


@pytest.mark.parametrize("name", list(gradlab.LOSSES))
def test_show_expr_parses_with_plain_sympify_for_every_loss(capsys, name):
    out = run_json(capsys, "show", name)
    assert_same(with_assumptions(parse_plain(out)), gradlab.get_loss(name).expr)


def test_grad_gdpo_p_l_probability(capsys):
    out = run_json(capsys, "grad", "gdpo", "--wrt", "p_l", "--view", "probability")
    b, g = symbol("beta"), symbol("gamma")
    z = b * sympy.log(symbol("p_w") / symbol("p_l")) - g * sympy.log(symbol("q_w") / symbol("q_l"))
    assert_same(with_assumptions(parse_plain(out)), b / (1 + sympy.exp(z)) / symbol("p_l"))
    assert "latex" in out and set(out["variables"]) >= {"p_w", "p_l", "q_w", "q_l", "beta", "gamma"}


def test_grad_gdpo_len_w_length(capsys):
    out = run_json(capsys, "grad", "gdpo", "--wrt", "len_w", "--view", "length")
    b, g = symbol("beta"), symbol("gamma")
    L = {n: symbol(n) for n in ("len_w", "len_l", "m_w", "m_l", "n_w", "n_l")}
    z = L["len_w"] * (b * L["m_w"] - g * L["n_w"]) - L["len_l"] * (b * L["m_l"] - g * L["n_l"])
    assert_same(with_assumptions(parse_plain(out)), -(b * L["m_w"] - g * L["n_w"]) / (1 + sympy.exp(z)))


def test_eval_gives_value_and_every_partial(capsys):
    out = run_json(capsys, "eval", "dpo", "--at", "lp_w=-1,lp_l=-2,ref_w=-1.5,ref_l=-1.5", "--set", "beta=0.5")
    h = (-1 + 1.5) - (-2 + 1.5)
    assert out["value"] == pytest.approx(float(sympy.log(1 + sympy.exp(-0.5 * h))), rel=1e-12)
    assert set(out["gradient"]) == {"lp_w", "lp_l", "ref_w", "ref_l", "beta"}
    assert out["gradient"]["lp_w"] == pytest.approx(-out["gradient"]["lp_l"], rel=1e-12)


def test_eval_reports_values_beyond_float64_exactly(capsys):
    out = run_json(
        capsys, "eval", "dpo", "--view", "probability", "--at", "p_w=0.5,p_l=1e-300,q_w=0.5,q_l=0.5", "--set", "beta=2"
    )
    assert isinstance(out["gradient"]["p_l"], float)
    # sigma(0)/p_l = 0.5/1e-320 = 5e319 overflows float64: reported as an exact decimal string
    out = run_json(
        capsys,
        "eval",
        "dpo",
        "--view",
        "probability",
        "--at",
        "p_w=1e-320,p_l=1e-320,q_w=0.5,q_l=0.5",
        "--set",
        "beta=1",
    )
    assert isinstance(out["gradient"]["p_l"], str)
    assert mpmath.almosteq(mpmath.mpf(out["gradient"]["p_l"]), mpmath.mpf("0.5") / mpmath.mpf("1e-320"), rel_eps=1e-12)


def test_unknown_loss_exits_2_with_close_names(capsys):
    code, _, err = run(capsys, "show", "dpoo")
    assert code == 2 and "dpo" in err and "unknown loss" in err


def test_out_of_scope_loss_explains_itself(capsys):
    code, out, _ = run(capsys, "show", "aot")
    assert code == 0 and "batch" in out
    code, _, err = run(capsys, "grad", "aot", "--wrt", "lp_w")
    assert code == 2 and "out of scope" in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["grad", "dpo", "--wrt", "nope"], "allowed: lp_w"),
        (["grad", "dpo", "--wrt", "lp_w", "--view", "polar"], "views are: log"),
        (["grad", "simpo", "--wrt", "h", "--view", "margin"], "margin h alone"),
        (["eval", "dpo", "--at", "lp_w"], "expected NAME=NUMBER"),
        (["eval", "dpo", "--at", "lp_w=abc"], "'abc' is not a number"),
        (["eval", "dpo", "--at", "lp_w=-1,lp_l=-1,ref_w=-1"], "missing ref_l"),
        (["eval", "dpo", "--at", "lp_w=-1,lp_l=-1,ref_w=-1,ref_l=-1,zz=1"], "not a variable here: zz"),
        (
            ["eval", "dpo", "--view", "probability", "--at", "p_w=1.5,p_l=0.5,q_w=0.5,q_l=0.5"],
            "p_w=1.5 is outside its domain (0, 1]",
        ),
        (["eval", "dpo", "--view", "probability", "--at", "p_w=0,p_l=0.5,q_w=0.5,q_l=0.5"], "p_w=0 is outside"),
        (["eval", "sigmoid_norm", "--at", "lp_w=-1,lp_l=-1,ref_w=-1,ref_l=-1,len_w=0,len_l=1"], "len_w=0 is outside"),
        (["eval", "dpo", "--at", "lp_w=-1,lp_l=-1,ref_w=-1,ref_l=-1", "--set", "beta=-1"], "beta=-1 is outside"),
        (["eval", "dpo", "--at", "lp_w=-1,lp_l=-1,ref_w=-1,ref_l=-1", "--set", "gamma=1"], "no hyperparameter gamma"),
        (["eval", "dpo", "--at", "lp_w=-1,lp_l=-1,ref_w=-1,ref_l=-1", "--set", "beta=nan"], "must be finite"),
        (["eval", "--expr", "beta*(lp_w-lp_l)", "--at", "lp_w=-1,lp_l=-1"], "beta"),
        (["show", "--expr", "__import__('os')"], "not allowed"),
    ],
)
def test_bad_input_gets_a_clear_message(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert fragment in err, err


def test_expr_loss_works_like_a_registered_one(capsys):
    out = run_json(capsys, "show", "--expr", "log(1 + exp(-beta*(lp_w - lp_l)))")
    assert set(out["variables"]) == {"lp_w", "lp_l", "beta"}
    out = run_json(
        capsys, "grad", "--expr", "log(1 + exp(-beta*(lp_w - lp_l)))", "--wrt", "p_l", "--view", "probability"
    )
    b = symbol("beta")
    assert_same(with_assumptions(parse_plain(out)), b / (1 + (symbol("p_w") / symbol("p_l")) ** b) / symbol("p_l"))
    out = run_json(
        capsys, "eval", "--expr", "log(1 + exp(-beta*(lp_w - lp_l)))", "--at", "lp_w=-1,lp_l=-1", "--set", "beta=1"
    )
    assert out["value"] == pytest.approx(0.6931471805599453)


def test_check_json_contract(capsys):
    out = run_json(capsys, "check", "dpo", "simpo", "--family", "unigram", "--points", "8")
    assert [(r["loss"], r["family"]) for r in out["rows"]] == [("dpo", "unigram"), ("simpo", "unigram")]
    for row in out["rows"]:
        assert {"loss", "family", "points", "max_rel_error", "seconds"} <= set(row)
        assert row["points"] == 8 and row["max_rel_error"] < 1e-9


def test_check_fails_loudly_and_names_the_row(capsys, monkeypatch):
    from gradlab import checks

    monkeypatch.setattr(checks, "TOLERANCE", -1.0)  # nothing can pass
    code, _, err = run(capsys, "check", "ipo", "--family", "bigram", "--points", "4")
    assert code == 1 and "ipo x bigram" in err


def test_check_refuses_bad_arguments(capsys):
    assert run(capsys, "check", "dpo", "--points", "0")[0] == 2
    code, _, err = run(capsys, "check", "dpo", "--family", "rnn")
    assert code == 2 and "the families are" in err
