"""The group-loss registry: name resolution, the derived per-token weights against hand-derived
closed forms, their length derivatives, and ``gradlab show``/``grad`` on group losses."""

from __future__ import annotations

import json

import pytest
import sympy

import gradlab
from gradlab import group_losses as gl
from gradlab.cli import main
from gradlab.errors import UnknownLossError, UnknownVariableError
from gradlab.losses import LOSSES, Loss, get_loss

A, n, s, G, rho = (gl.SYMBOLS[k].symbol for k in ("A", "len_i", "len_sum", "G", "rho"))
others = gl.SYMBOLS["len_others"].symbol

# hand-derived first-step weights (rho = kappa = 1, defaults): TRL 1.16.0 grpo_trainer.py per loss_type
FIRST_STEP = {
    "grpo": A / (G * n), "sapo": A / (G * n), "gspo": A / (G * n),
    "bnpo": A / s, "dapo": A / s, "vespo": A / s, "cispo": sympy.Rational(1, 5) * A / s,
    "dr_grpo": A / (512 * G), "dr_grpo_paper": A / (512 * G),
    "luspo": A / G, "rloo": A / G,
}


def test_registry_covers_every_trl_loss_type():
    assert {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"} <= set(gl.GROUP_LOSSES)
    assert set(FIRST_STEP) == set(gl.GROUP_LOSSES)


@pytest.mark.parametrize("name", list(gl.GROUP_LOSSES))
def test_first_step_weight_is_the_hand_derived_one(name):
    loss = gl.GROUP_LOSSES[name]
    assert sympy.simplify(loss.first_step() - FIRST_STEP[name]) == 0


@pytest.mark.parametrize("name", list(gl.GROUP_LOSSES))
def test_every_docstring_cites_trl_and_a_paper(name):
    loss = gl.GROUP_LOSSES[name]
    assert "1.16.0" in loss.doc and loss.references and loss.equation and loss.trl


def test_clipping_zeroes_the_weight_outside_the_trust_region():
    w = gl.GROUP_LOSSES["grpo"].expr.xreplace(gl.GROUP_LOSSES["grpo"].values())
    at = {G: 4, n: 3, gl.SYMBOLS["kappa"].symbol: 1}
    assert w.xreplace({**at, A: 1, rho: sympy.Rational(13, 10)}) == 0  # A > 0, rho > 1 + epsilon: clipped
    assert w.xreplace({**at, A: -1, rho: sympy.Rational(7, 10)}) == 0  # A < 0, rho < 1 - epsilon: clipped
    assert w.xreplace({**at, A: -1, rho: sympy.Rational(13, 10)}) == sympy.Rational(-13, 120)  # not clipped


def test_length_derivatives_show_the_length_bias():
    """d w / d |o_i| at the first step: -A/(G|o_i|^2) for grpo (Dr. GRPO's bias), 0 for dr_grpo
    and luspo; for dapo 0 at a fixed group total, -A/total^2 once the total grows with |o_i|."""
    grpo = gl.GROUP_LOSSES["grpo"].derivative("len_i", "first_step")
    assert sympy.simplify(grpo + A / (G * n**2)) == 0
    assert gl.GROUP_LOSSES["dr_grpo"].derivative("len_i", "first_step") == 0
    assert gl.GROUP_LOSSES["luspo"].derivative("len_i", "first_step") == 0
    dapo = gl.GROUP_LOSSES["dapo"]
    assert dapo.derivative("len_i", "first_step") == 0
    grown = dapo.derivative("len_i", "length").xreplace({rho: 1, gl.SYMBOLS["kappa"].symbol: 1})
    grown = grown.xreplace({sympy.Min(1, gl.HYPERPARAMETERS["delta"].symbol): 1})
    assert sympy.simplify(grown.subs(gl.HYPERPARAMETERS["delta"].symbol, sympy.oo) + A / (n + others) ** 2) == 0


def test_kl_term_enters_the_weight_as_beta_one_minus_kappa():
    kappa, beta = gl.SYMBOLS["kappa"].symbol, gl.HYPERPARAMETERS["beta"].symbol
    w = gl.GROUP_LOSSES["dapo"].expr.xreplace({rho: 1})
    assert sympy.simplify(sympy.diff(w, beta) + (1 - kappa) / s) == 0
    assert "beta" not in gl.GROUP_LOSSES["rloo"].defaults  # RLOO's KL is a reward penalty


def test_names_resolve_through_get_loss():
    for spelling, name in [("grpo", "grpo"), ("DAPO", "dapo"), ("grpo.dr_grpo", "dr_grpo"),
                           ("GRPOTrainer.sapo", "sapo"), ("Dr-GRPO", "dr_grpo"), ("rloo", "rloo")]:
        loss = get_loss(spelling)
        assert isinstance(loss, Loss) and loss.kind == "group" and loss.name == name
    assert gradlab.get_loss("dpo").kind == "pair" and get_loss("ipo") is LOSSES["ipo"]
    with pytest.raises(UnknownLossError, match="grpo"):
        get_loss("grop")
    with pytest.raises(UnknownLossError):
        get_loss("grpo:1,sigmoid:1")  # a group loss is not a per-pair term


def test_bad_values_and_variables_are_refused():
    loss = gl.GROUP_LOSSES["grpo"]
    with pytest.raises(UnknownVariableError, match="no hyperparameter"):
        loss.values({"gamma": 1})
    with pytest.raises(gradlab.errors.DomainError, match="outside"):
        loss.values({"epsilon": -1})
    with pytest.raises(UnknownVariableError, match="allowed"):
        loss.derivative("lp_w")
    with pytest.raises(UnknownVariableError, match="views"):
        loss.in_view("probability")
    with pytest.raises(gradlab.errors.DomainError):
        gl.advantages([[1.0, 0.0]], "mean")


def test_cli_show_and_grad(capsys):
    assert main(["show", "dr_grpo", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "group" and doc["paper_variant"]["loss"] == "dr_grpo_paper"
    assert sympy.simplify(sympy.sympify(doc["first_step"]["expr"], locals={"G": G, "A": A}) - A / (512 * G)) == 0
    assert {"name", "aliases", "expr", "latex", "defaults", "variables"} <= set(doc)
    assert main(["show", "dr_grpo"]) == 0
    text = capsys.readouterr().out
    assert "scale_rewards" in text and "A/(512·G)" in text
    assert main(["grad", "grpo", "--wrt", "len_i", "--view", "first_step", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    expr = sympy.sympify(doc["expr"], locals={"G": G, "A": A, "len_i": n})
    assert sympy.simplify(expr + A / (G * n**2)) == 0
    assert main(["eval", "grpo", "--at", "A=1"]) == 2
    assert "group loss" in capsys.readouterr().err
    assert main(["grad", "grpo", "--wrt", "lp_w"]) == 2
