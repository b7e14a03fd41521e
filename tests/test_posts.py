"""Every fact in docs/background.md, "What the formulas imply", derived by gradlab and checked here.

The expected closed forms are written by hand in this file: they are the independent reference
the derivations are checked against (no closed form is pasted into library code).
"""

from __future__ import annotations

import math

import mpmath
import pytest
import sympy
from sympy import Rational, exp, log

import gradlab
from gradlab.symbols import symbol
from helpers import assert_differ, assert_same

beta, gamma = symbol("beta"), symbol("gamma")
p_w, p_l, q_w, q_l = (symbol(n) for n in ("p_w", "p_l", "q_w", "q_l"))
lp_w, lp_l, ref_w, ref_l = (symbol(n) for n in ("lp_w", "lp_l", "ref_w", "ref_l"))
len_w, len_l, m_w, m_l, n_w, n_l = (symbol(n) for n in ("len_w", "len_l", "m_w", "m_l", "n_w", "n_l"))


def sig(x):
    return 1 / (1 + exp(-x))


Z_PROB = beta * log(p_w / p_l) - gamma * log(q_w / q_l)
Z_LOG = beta * (lp_w - lp_l) - gamma * (ref_w - ref_l)
Z_LEN = len_w * (beta * m_w - gamma * n_w) - len_l * (beta * m_l - gamma * n_l)


def d(wrt, view):
    return gradlab.derivative("gdpo", wrt, view)


def test_probability_partials_are_inverse_in_the_probability():
    assert_same(d("p_w", "probability"), -beta * sig(-Z_PROB) / p_w)
    assert_same(d("p_l", "probability"), beta * sig(-Z_PROB) / p_l)


def test_probability_partials_ratio():
    # (dl/dp-) / (dl/dp+) = -p+/p-: the force on a response is inversely proportional to it
    ratio = sympy.simplify(d("p_l", "probability") / d("p_w", "probability"))
    assert sympy.simplify(ratio - (-p_w / p_l)) == 0


def test_log_partials_are_equal_and_opposite():
    assert_same(d("lp_w", "log"), -beta * sig(-Z_LOG))
    assert_same(d("lp_l", "log"), beta * sig(-Z_LOG))
    assert sympy.simplify(gradlab.standard(d("lp_w", "log") + d("lp_l", "log"))) == 0


def test_loss_vanishes_as_rejected_probability_goes_to_zero():
    assert gradlab.limit(gradlab.in_view("gdpo", "probability"), "p_l", 0) == 0


@pytest.mark.parametrize(
    "b, expected", [(Rational(1, 10), sympy.oo), (Rational(1, 2), sympy.oo), (2, 0), (3, 0)]
)
def test_rejected_force_diverges_for_beta_below_one(b, expected):
    values = {"beta": b, "gamma": b}
    assert gradlab.limit(d("p_l", "probability"), "p_l", 0, values=values) == expected


@pytest.mark.parametrize("b", [Rational(1, 10), Rational(1, 2), 2])
def test_rejected_force_behaves_like_p_to_the_beta_minus_one(b):
    values = {"beta": b, "gamma": b, "p_w": Rational(1, 2), "q_w": Rational(1, 3), "q_l": Rational(1, 4)}
    ratio = d("p_l", "probability") / p_l ** (b - 1)
    c = gradlab.limit(ratio, "p_l", 0, values=values)
    assert c.is_finite and c.is_positive, c


def _force_through_length(L, m, b):
    f = gradlab.derivative("gdpo", "p_l", "probability")
    params = gradlab.parameter_values("gdpo", {"beta": b, "gamma": b})
    e = gradlab.standard(f.xreplace(params)).xreplace(
        {p_w: exp(L * m), p_l: exp(L * m), q_w: exp(L * m), q_l: exp(L * m)}
    )
    with mpmath.workdps(30):
        return sympy.lambdify([], e, "mpmath")()


def test_rejected_force_grows_exponentially_with_length():
    # docs/background.md: beta = gamma = 0.1, m = -1 gives about 1e3 at L = 10 and about 1e42 at L = 100
    assert round(float(mpmath.log10(_force_through_length(10, -1, 0.1)))) == 3
    assert round(float(mpmath.log10(_force_through_length(100, -1, 0.1)))) == 42
    # and it is beta sigma(0) exp(-L m) exactly, at any length
    for L in (1, 37, 500):
        got = _force_through_length(L, -1, 0.1)
        assert mpmath.almosteq(got, mpmath.mpf("0.05") * mpmath.e**L, rel_eps=1e-12)


def test_implicit_reward_is_linear_in_length():
    (arg,) = gradlab.in_view("gdpo", "length").args  # the loss is softplus(-z)
    assert sympy.expand(-arg - Z_LEN) == 0


def test_length_partials():
    assert_same(d("len_w", "length"), -sig(-Z_LEN) * (beta * m_w - gamma * n_w))
    assert_same(d("len_l", "length"), sig(-Z_LEN) * (beta * m_l - gamma * n_l))
    assert_same(d("m_w", "length"), -beta * len_w * sig(-Z_LEN))


def test_tempering_the_reference_is_gamma_over_tau():
    tau, logZ = sympy.symbols("tau logZ", positive=True)
    loss = gradlab.get_loss("gdpo").expr
    tempered = loss.xreplace({ref_w: ref_w / tau - logZ, ref_l: ref_l / tau - logZ})
    assert sympy.simplify(gradlab.standard(tempered - loss.xreplace({gamma: gamma / tau}))) == 0


def test_optimum_of_entropy_regularised_objective():
    # pi* ~ pi_0^(gamma/beta) exp(r/beta) is stationary for E[r] + gamma E[log pi_0] + beta H(pi)
    r = sympy.symbols("r0:3", real=True)
    q = sympy.symbols("q0:3", positive=True)
    weights = [q[i] ** (gamma / beta) * exp(r[i] / beta) for i in range(3)]
    pi_star = [w / sum(weights) for w in weights]
    pis = sympy.symbols("pi0:3", positive=True)
    objective = sum(pis[i] * (r[i] + gamma * log(q[i]) - beta * log(pis[i])) for i in range(3))
    grads = [sympy.diff(objective, pis[i]).subs(dict(zip(pis, pi_star, strict=False))) for i in range(3)]
    # on the simplex, stationarity means every partial is the same Lagrange multiplier
    for i in (1, 2):
        assert sympy.simplify(sympy.expand_log(grads[i] - grads[0], force=True)) == 0


def test_loss_is_log2_on_the_reference_margin():
    on_margin = {p_w: p_l * (q_w / q_l) ** (gamma / beta)}
    loss = gradlab.in_view("gdpo", "probability").xreplace(on_margin)
    assert sympy.simplify(sympy.expand_log(gradlab.standard(loss), force=True) - log(2)) == 0
    assert_differ(gradlab.in_view("gdpo", "probability"), log(2))


def test_reference_free_when_gamma_is_zero():
    loss = gradlab.in_view("gdpo", "probability").xreplace({gamma: 0})
    assert_same(loss, log(1 + (p_l / p_w) ** beta))


def test_hyperparameter_partials():
    assert_same(d("beta", "probability"), -sig(-Z_PROB) * log(p_w / p_l))
    assert_same(d("gamma", "probability"), sig(-Z_PROB) * log(q_w / q_l))


def test_dpo_is_gdpo_with_gamma_equal_beta():
    assert_same(gradlab.get_loss("dpo").expr, gradlab.get_loss("gdpo").expr.xreplace({gamma: beta}))


def test_numbers_are_finite_in_float64_for_moderate_lengths():
    assert math.isfinite(float(_force_through_length(100, -1, 0.1)))
