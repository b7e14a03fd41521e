"""The error-bounded evaluator: trees through JSON are data, settling at an exact point finds the
exact zeros and kinks, and it refuses what it cannot know."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import pytest

import gradlab
from gradlab import _mpeval, budgets
from gradlab.parsing import parse


def _trees(**exprs: str) -> dict:
    doc = _mpeval.to_json({k: parse(v) for k, v in exprs.items()})
    return _mpeval.from_json(doc, {"lp_w", "lp_l", "ref_w", "ref_l", "beta"})


def _point(**values: str) -> dict[str, Fraction]:
    return {k: _mpeval.exact_decimal(k, v) for k, v in values.items()}


def test_equal_terms_cancel_exactly_at_the_point():
    roots = _trees(a="sigmoid(beta*(lp_w - ref_w))*sigmoid(-beta*(lp_w - ref_w))"
                     " - sigmoid(beta*(lp_l - ref_l))*sigmoid(-beta*(lp_l - ref_l))",
                   b="log(exp(lp_w)) - lp_w", c="exp(lp_w)*exp(-lp_w)", d="Heaviside(lp_w - lp_l)",
                   e="log(-lp_w) - log(-lp_l)")
    same = _point(lp_w="-1.5", lp_l="-2", ref_w="-1", ref_l="-1.5", beta="0.1")  # equal log-ratios
    settled = {k: _mpeval.settle(t, same) for k, t in roots.items()}
    assert settled["a"] == 0 and settled["b"] == 0 and settled["c"] == 1
    assert settled["d"] == 1 and not isinstance(settled["e"], Fraction)
    kink = _point(lp_w="-2", lp_l="-2", ref_w="0", ref_l="0", beta="1")
    assert _mpeval.settle(roots["d"], kink) == Fraction(1, 2) and _mpeval.settle(roots["e"], kink) == 0
    # the control: a point where the log-ratios differ is not settled to 0, and its value is right
    other = _point(lp_w="-1.5", lp_l="-2", ref_w="-1", ref_l="-1.25", beta="0.1")
    assert not isinstance(_mpeval.settle(roots["a"], other), Fraction)
    got = _mpeval.evaluate({"a": roots["a"]}, other)["a"]
    s = lambda x: 1 / (1 + mpmath.exp(-x))  # noqa: E731
    with mpmath.workdps(50):
        want = s(mpmath.mpf("-0.05")) * s(mpmath.mpf("0.05")) - s(mpmath.mpf("-0.075")) * s(mpmath.mpf("0.075"))
        assert abs(got / want - 1) < mpmath.mpf(10) ** -20


def test_exp_minus_one_at_a_tiny_point_is_refused_as_the_derived_path_refuses():
    roots = _trees(loss="exp(lp_w) - 1")
    point = _point(lp_w="-1e-990")
    with pytest.raises(budgets.BudgetError, match="eval_digits"):
        _mpeval.evaluate(roots, point)
    with pytest.raises(budgets.BudgetError, match="eval_digits"):
        gradlab.evaluate(gradlab.custom("exp(lp_w) - 1"), {"lp_w": "-1e-990"})
    with budgets.raised(eval_digits=2000):
        got = _mpeval.evaluate(roots, point)["loss"]
        want = gradlab.evaluate(gradlab.custom("exp(lp_w) - 1"), {"lp_w": "-1e-990"})["loss"]
    with mpmath.workdps(40):
        assert abs(got / mpmath.mpf("-1e-990") - 1) < mpmath.mpf(10) ** -20
        assert abs(got / want - 1) < mpmath.mpf(10) ** -20


def test_undefined_points_are_domain_errors():
    roots = _trees(a="1/(lp_w - lp_l)", b="log(lp_w - lp_l + 1)")
    point = _point(lp_w="-1", lp_l="-1")
    with pytest.raises(gradlab.DomainError, match="undefined or infinite"):
        _mpeval.evaluate({"a": roots["a"]}, point)
    assert _mpeval.evaluate({"b": roots["b"]}, point)["b"] == 0


def test_max_decided_far_from_its_kink_carries_only_the_pick_s_error():
    tree = _trees(m="Max(0, 1 + beta*(lp_w - lp_l))")["m"]
    left = _mpeval.settle(tree, _point(lp_w="-1000", lp_l="-1", beta="0.5"))  # 1 - 499.5 < 0
    v, err, _ = _mpeval.walk_tree(left, {})
    assert v == 0 and err == 0


@pytest.mark.parametrize("doc", [
    {"nodes": [["__import__", 0]], "roots": {"x": 0}},  # an operation outside the vocabulary
    {"nodes": [["exp", 1], ["sym", "lp_w"]], "roots": {"x": 0}},  # a child after its parent
    {"nodes": [["q", "1e5"]], "roots": {"x": 0}},  # a constant that is not a plain fraction
    {"nodes": [["q", "(1).__class__"]], "roots": {"x": 0}},
    {"nodes": [["sym", "os"]], "roots": {"x": 0}},  # a symbol not of this loss
    {"nodes": [["sym", "lp_w"], ["pow", 0]], "roots": {"x": 1}},  # the wrong number of children
    {"nodes": [["sym", "lp_w"]], "roots": {"x": 3}},
    {"nodes": "lp_w", "roots": {}},
])
def test_a_malformed_tree_is_refused_not_run(doc):
    with pytest.raises(ValueError):
        _mpeval.from_json(doc, {"lp_w"})


def test_float_constants_are_not_written_into_a_table():
    import sympy

    with pytest.raises(_mpeval.Unsupported):
        _mpeval.to_json({"x": sympy.Float(0.1) * gradlab.symbol("lp_w")})
