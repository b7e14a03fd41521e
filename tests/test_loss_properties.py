"""Meaning-level properties of every loss: what the papers say a loss does, checked on the registry.

These complement the transcription tests (``test_reference_impls.py``): a property says what the
loss is *for*, so a sign or a misplaced term that still matches some formula is caught too.
"""

from __future__ import annotations

import mpmath
import pytest
import sympy

import gradlab
from gradlab.losses import LOSSES
from gradlab.symbols import symbol
from helpers import assert_same

PAIR_LOSSES = [n for n, loss in LOSSES.items() if loss.kind == "pair"]

# The reference point: the policy equals the reference (for reference-free losses, the policy is
# indifferent between equally long responses). Unequal lengths and a tail on the longer response.
REFERENCE_POINT = {"lp_w": -6.0, "lp_l": -9.0, "ref_w": -6.0, "ref_l": -9.0, "len_w": 8.0, "len_l": 12.0,
                   "tail_w": 0.0, "tail_l": -3.0, "ref_tail_w": 0.0, "ref_tail_l": -3.0}
INDIFFERENT_POINT = {"lp_w": -7.0, "lp_l": -7.0, "len_w": 10.0, "len_l": 10.0}

# Where descent at the reference point does not raise lp_w and lower lp_l, on purpose:
EXPECTED_SIGNS = {
    # APO-down lowers the chosen's likelihood too: its pull on lp_w is exactly balanced at r_w = r_l = 0
    "apo_down": (0, +1),
    # SFT does not read the rejected response
    "sft": (-1, 0),
    # DiscoPOP (Lu et al. 2024, Eq. 5) is non-convex: at margin 0 its slope in m = beta*h is
    # (1 - log 2)/(4 tau) - 3/4, positive for tau < (1 - log 2)/3 = 0.102, so at the default
    # tau = 0.05 descent first *lowers* the margin (tested below, with the threshold)
    "discopop": (+1, -1),
}


def _point(loss):
    base = REFERENCE_POINT if loss.needs_reference else {**REFERENCE_POINT, **INDIFFERENT_POINT}
    return {k: base[k] for k in loss.variables}


def _sign(x) -> int:
    return 0 if abs(x) < mpmath.mpf(10) ** -25 else (1 if x > 0 else -1)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_descent_at_the_reference_point_raises_chosen_and_lowers_rejected(name):
    loss = LOSSES[name]
    point = _point(loss)
    if name == "dpop":  # its penalty max(0, ref_w - lp_w) has a kink exactly at the reference point
        point["lp_w"] += 1e-3
    grad = gradlab.evaluate(loss, point)
    # descent moves against the gradient: d loss/d lp_w < 0 raises lp_w, d loss/d lp_l > 0 lowers lp_l
    want = EXPECTED_SIGNS.get(name, (-1, +1))
    got = (_sign(grad["lp_w"]), _sign(grad.get("lp_l", 0)))
    assert got == want, f"{name}: {grad['lp_w']}, {grad.get('lp_l')}"


def test_discopop_pushes_the_right_way_at_zero_only_above_the_tau_threshold():
    threshold = (1 - mpmath.log(2)) / 3
    point = _point(LOSSES["discopop"])
    for tau, sign in ((float(threshold) * 0.9, +1), (float(threshold) * 1.1, -1)):
        grad = gradlab.evaluate("discopop", point, {"discopop_tau": tau})
        assert _sign(grad["lp_w"]) == sign


def test_weighted_combination_keeps_the_direction():
    grad = gradlab.evaluate(gradlab.get_loss("sigmoid:0.8,bco_pair:0.2,sft:1"), _point(LOSSES["dpo"]) | {
        "len_w": 8.0})
    assert grad["lp_w"] < 0 < grad["lp_l"]


def _weight_on_chosen(name, len_w, len_l, alpha):
    """|d loss / d lp_w| at a pair with the given lengths: how hard descent pushes."""
    loss = LOSSES[name]
    point = {**REFERENCE_POINT, "lp_w": -5.0, "len_w": len_w, "len_l": len_l}
    grad = gradlab.evaluate(loss, {k: point[k] for k in loss.variables}, {"alpha": alpha})
    return abs(grad["lp_w"])


def test_r_dpo_weight_shrinks_with_alpha_when_the_chosen_is_longer():
    # Park et al. 2024, arXiv:2403.19159, Sec. 4 / Eq. 9: the regulariser lowers the push on a
    # longer chosen response (so DPO stops rewarding length) and raises it on a shorter one.
    longer = [_weight_on_chosen("r_dpo", 30.0, 10.0, a) for a in (0.0, 0.01, 0.05)]
    shorter = [_weight_on_chosen("r_dpo", 10.0, 30.0, a) for a in (0.0, 0.01, 0.05)]
    assert longer[0] > longer[1] > longer[2], longer
    assert shorter[0] < shorter[1] < shorter[2], shorter


@pytest.mark.parametrize("name", ["ld_dpo", "ld_dpo_trl"])
def test_ld_dpo_scales_the_tail_gradient_by_alpha(name):
    # Liu et al. 2024, arXiv:2409.06411, Eq. 12: tokens past the shorter response's length count
    # with weight alpha. A tail token moves lp_w and tail_w together; a shared token only lp_w.
    loss = LOSSES[name]
    point = {**REFERENCE_POINT, "lp_w": -14.0, "tail_w": -4.0, "ref_tail_w": -5.0, "len_w": 16.0, "tail_l": 0.0,
             "ref_tail_l": 0.0}
    for alpha in (0.25, 0.5, 0.9):
        grad = gradlab.evaluate(loss, {k: point[k] for k in loss.variables}, {"ld_alpha": alpha})
        on_tail, on_shared = grad["lp_w"] + grad["tail_w"], grad["lp_w"]
        assert mpmath.almosteq(on_tail / on_shared, alpha, rel_eps=1e-12)


# label_smoothing = 0 must give the loss without smoothing
_BASE_OF_SMOOTHED = {
    "cdpo": "softplus(-beta*((lp_w - ref_w) - (lp_l - ref_l)))",
    "robust": "softplus(-beta*((lp_w - ref_w) - (lp_l - ref_l)))",
    "cpo": "softplus(-beta*(lp_w - lp_l)) - cpo_alpha*lp_w/len_w",
    "simpo_trl": "softplus(-(beta*(lp_w/len_w - lp_l/len_l) - simpo_gamma)) - cpo_alpha*lp_w/len_w",
    "alphapo": "softplus(-(beta*((1 - exp(-alpha*lp_w/len_w))/alpha - (1 - exp(-alpha*lp_l/len_l))/alpha)"
               " - simpo_gamma)) - cpo_alpha*lp_w/len_w",
}


def test_every_smoothed_loss_is_listed():
    smoothed = {n for n, loss in LOSSES.items() if "label_smoothing" in loss.defaults}
    # EXO's epsilon is the target distribution's mass on the rejected response: log(epsilon) at 0
    assert smoothed - {"exo_pair"} == set(_BASE_OF_SMOOTHED)


@pytest.mark.parametrize("name", sorted(_BASE_OF_SMOOTHED))
def test_label_smoothing_zero_gives_the_base_loss(name):
    at_zero = LOSSES[name].expr.xreplace({symbol("label_smoothing"): sympy.Integer(0)})
    assert_same(at_zero, gradlab.parse(_BASE_OF_SMOOTHED[name]))


@pytest.mark.parametrize("name", list(LOSSES))
def test_reference_free_losses_do_not_read_the_reference(name):
    loss = LOSSES[name]
    refs = {symbol(v) for v in ("ref_w", "ref_l", "ref_tail_w", "ref_tail_l")}
    reads = bool(loss.expr.free_symbols & refs)
    assert reads == loss.needs_reference
    if not loss.needs_reference:
        assert "ref" not in " ".join(loss.variables)
