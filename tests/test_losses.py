"""The registry: metadata completeness, identities between related losses, user-defined losses."""

from __future__ import annotations

import inspect
import re

import pytest
import sympy

import gradlab
from gradlab.losses import LOSSES, OUT_OF_SCOPE
from gradlab.symbols import HYPERPARAMETERS, SYMBOLS, symbol
from helpers import assert_differ, assert_same


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_is_documented_referenced_and_defaulted(name):
    loss = LOSSES[name]
    assert loss.function is not None and loss.function.__doc__, f"{name} has no docstring"
    doc = loss.doc
    assert loss.title and loss.title.endswith("."), f"{name}: one-line summary missing"
    assert ".. math::" in doc, f"{name}: docstring lacks the formula"
    assert "Reference" in doc and loss.references, f"{name}: no reference"
    for ref in loss.references:
        assert re.match(r"arXiv:\d{4}\.\d{4,5}$", ref) or ref.startswith("http"), ref
    sig = inspect.signature(loss.function)
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY:
            assert p.default is not p.empty, f"{name}: {p.name} has no default"
            assert p.name in HYPERPARAMETERS, f"{name}: {p.name} is not a declared hyperparameter"
            assert loss.domain(p.name).contains(float(p.default)), f"{name}: default {p.name} outside domain"
        else:
            assert p.name in SYMBOLS, f"{name}: {p.name} is not a canonical variable"
    assert loss.expr.free_symbols <= {SYMBOLS[v].symbol for v in loss.variables} | {
        HYPERPARAMETERS[h].symbol for h in loss.hyperparameters
    }


def test_at_least_thirty_per_pair_losses():
    assert sum(loss.kind == "pair" for loss in LOSSES.values()) >= 30


def test_names_and_aliases_are_unique():
    names = list(LOSSES)
    aliases = [a for loss in LOSSES.values() for a in loss.aliases]
    assert len(set(names + aliases)) == len(names) + len(aliases)
    assert not set(OUT_OF_SCOPE) & set(names + aliases)


def at(name, **values):
    return LOSSES[name].expr.xreplace({symbol(k): sympy.sympify(v) for k, v in values.items()})


def dpo():
    return LOSSES["dpo"].expr


@pytest.mark.parametrize(
    "a, b",
    [
        (lambda: at("robust", label_smoothing=0), dpo),
        (lambda: at("cdpo", label_smoothing=0), dpo),
        (lambda: at("r_dpo", alpha=0), dpo),
        (lambda: at("dpop", dpop_lambda=0), dpo),
        (lambda: at("h_dpo", hdpo_alpha=1), dpo),
        (lambda: at("sigmoid_norm", len_w=1, len_l=1), dpo),
        (lambda: at("gdpo", gamma=symbol("beta")), dpo),
        (lambda: at("ld_dpo", ld_alpha=1), dpo),
        (lambda: at("ld_dpo_trl", ld_alpha=1), dpo),
        (lambda: at("ld_dpo", tail_w=0, tail_l=0), dpo),
        (lambda: at("ipo_trl", len_w=1, len_l=1), lambda: LOSSES["ipo"].expr),
        (lambda: at("rpo", rpo_alpha=0), dpo),
        (lambda: at("simpo_trl", cpo_alpha=0, label_smoothing=0, beta=2, simpo_gamma=1),
         lambda: at("simpo", beta=2, simpo_gamma=1)),
        (lambda: at("cpo", label_smoothing=0, cpo_alpha=0), lambda: at("dpo", ref_w=0, ref_l=0)),
        (lambda: at("apo_zero_unpaired", desirable_weight=1, undesirable_weight=1), lambda: LOSSES["apo_zero"].expr),
        # TRL 1.x removed rpo_alpha: sigmoid plus rpo_alpha times sft is the same loss
        (lambda: LOSSES["rpo"].expr, lambda: dpo() + symbol("rpo_alpha") * LOSSES["sft"].expr),
        (lambda: gradlab.get_loss("mpo").expr,
         lambda: sympy.Rational(4, 5) * dpo() + LOSSES["bco_pair"].expr / 5 + LOSSES["sft"].expr),
        # H-DPO is two-coefficient DPO with beta -> alpha beta, gamma -> beta
        (lambda: LOSSES["h_dpo"].expr,
         lambda: at("gdpo", beta=symbol("hdpo_alpha") * symbol("beta"), gamma=symbol("beta"))),
        # the two alpha-divergence conventions: TRL 1.x's alpha is the paper's 1 - alpha
        (lambda: at("fdpo_alpha", f_alpha_divergence_coef=sympy.Rational(3, 10)),
         lambda: at("fdpo_alpha_trl", f_alpha_divergence_coef=sympy.Rational(7, 10))),
        (lambda: at("fdpo_alpha", f_alpha_divergence_coef=1), lambda: LOSSES["fdpo_fkl"].expr),
        (lambda: at("bco_pair", bco_delta=0),
         lambda: gradlab.parse("softplus(-beta*(lp_w - ref_w)) + softplus(beta*(lp_l - ref_l))")),
        (lambda: at("kto", kto_z0=0, desirable_weight=1, undesirable_weight=1),
         lambda: 2 - gradlab.parse("sigmoid(beta*(lp_w - ref_w)) + sigmoid(-beta*(lp_l - ref_l))")),
    ],
)
def test_identity(a, b):
    assert_same(a(), b())


def test_alpha_divergence_tends_to_dpo():
    # paper convention: alpha -> 0 is reverse KL
    alpha = symbol("f_alpha_divergence_coef")
    point = {symbol("lp_w"): -1, symbol("lp_l"): -2, symbol("ref_w"): sympy.Rational(-3, 2),
             symbol("ref_l"): sympy.Rational(-3, 2), symbol("beta"): sympy.Rational(1, 2)}
    limit = sympy.limit(gradlab.standard(LOSSES["fdpo_alpha"].expr.xreplace(point)), alpha, 0)
    assert sympy.simplify(limit - gradlab.standard(dpo().xreplace(point))) == 0


def test_conventions_that_differ_really_differ():
    assert_differ(LOSSES["cdpo"].expr, LOSSES["robust"].expr)
    assert_differ(LOSSES["ipo"].expr, LOSSES["ipo_trl"].expr)
    assert_differ(LOSSES["simpo"].expr, at("simpo_trl", beta=2, simpo_gamma=1))
    assert_differ(LOSSES["ld_dpo"].expr, LOSSES["ld_dpo_trl"].expr)


def test_needs_reference_is_derived_from_the_variables():
    assert LOSSES["dpo"].needs_reference and not LOSSES["simpo"].needs_reference
    assert not LOSSES["orpo"].needs_reference and not LOSSES["cpo"].needs_reference


def test_unknown_and_out_of_scope_names():
    with pytest.raises(gradlab.UnknownLossError, match="Did you mean: simpo"):
        gradlab.get_loss("simpoo")
    with pytest.raises(gradlab.UnknownLossError, match="out of scope"):
        gradlab.get_loss("aot_unpaired")


def test_custom_loss_matches_registered_dpo():
    loss = gradlab.custom("log(1 + exp(-beta*((lp_w - ref_w) - (lp_l - ref_l))))", defaults={"beta": 0.1})
    assert loss.expr == LOSSES["dpo"].expr  # rewritten to the stable softplus form
    for view in ("log", "probability", "length"):
        assert gradlab.gradient(loss, view) == gradlab.gradient("dpo", view)


def test_custom_loss_refuses_view_variables_and_unused_defaults():
    with pytest.raises(gradlab.ParseError, match="belong to a view"):
        gradlab.custom("log(p_w)")
    with pytest.raises(gradlab.ParseError, match="does not use"):
        gradlab.custom("lp_w", defaults={"beta": 1})


def test_pdpo_integrand_has_the_score_function_term():
    # d/d lp_w [p_w p_l L] = p_w p_l (dL/dlp_w + L): the product rule of docs/background.md
    lw, ll = symbol("lp_w"), symbol("lp_l")
    L = dpo()
    expected = sympy.exp(lw + ll) * (sympy.diff(L, lw) + L)
    assert_same(gradlab.derivative("pdpo", "lp_w"), expected)
    assert_same(gradlab.derivative("pdpo", "lp_l"), sympy.exp(lw + ll) * (sympy.diff(L, ll) + L))
