"""Formulas as people write them: grouped log-ratios and Greek hyperparameters, printing only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sympy

import gradlab
from gradlab import printing, symbolic
from gradlab.losses import LOSSES

ROOT = Path(__file__).resolve().parents[1]


def test_dpo_margin_is_grouped_as_papers_write_it():
    expr = gradlab.get_loss("dpo").expr
    assert printing.text(expr) == "softplus(-β·((lp_w - ref_w) - (lp_l - ref_l)))"
    tex = printing.latex(expr)
    assert r"\beta \left(\left(lp_{w} - ref_{w}\right) - \left(lp_{l} - ref_{l}\right)\right)" in tex


def test_hyperparameters_are_greek_letters():
    tex = printing.latex(gradlab.get_loss("cdpo").expr)
    assert r"\epsilon" in tex and "smoothing" not in tex
    assert "γ_SimPO" in printing.text(gradlab.get_loss("simpo").expr)
    assert printing.latex_symbol("gamma") == r"\gamma" and printing.latex_symbol("rpo_alpha").startswith(r"\alpha")
    assert set(printing.HYPER_LATEX) >= set(gradlab.symbols.HYPERPARAMETERS)  # every one has a symbol


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_grouping_never_changes_the_expression(name):
    # the printed tree, with its groups expanded again, is the loss and its gradient exactly
    loss = gradlab.get_loss(name)
    for expr in (loss.expr, symbolic.derivative(loss, "lp_w")):
        grouped = printing.group(expr)
        assert sympy.expand(printing.ungroup(grouped) - expr) == 0
    assert gradlab.get_loss(name).expr == loss.expr  # the registry is untouched


def test_negated_groups_and_other_coefficients():
    s = {n: gradlab.symbols.symbol(n) for n in ("lp_w", "lp_l", "ref_w", "ref_l", "beta")}
    assert printing.text(s["lp_l"] - s["lp_w"]) == "-(lp_w - lp_l)"
    e = 3 * s["beta"] * (s["lp_w"] - s["ref_w"]) + s["lp_l"]
    assert "(lp_w - ref_w)" in printing.text(e)
    assert sympy.expand(printing.ungroup(printing.group(e)) - e) == 0


def test_show_is_readable_in_a_terminal():
    out = subprocess.run([sys.executable, "-m", "gradlab", "show", "cdpo"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "((lp_w - ref_w) - (lp_l - ref_l))" in out and "ε" in out and "β" in out
    for markup in ("\\", "``", ".. math::", "operatorname", "{", "}"):
        assert markup not in out, markup
    out = subprocess.run([sys.executable, "-m", "gradlab", "grad", "dpo", "--wrt", "lp_w"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "\\" not in out and "sigmoid(-β·((lp_w - ref_w) - (lp_l - ref_l)))" in out
