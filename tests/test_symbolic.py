"""Derivations: the cache's robustness, readable forms, numeric backends, evaluation, limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import mpmath
import numpy as np
import pytest
import sympy

import gradlab
from gradlab import _cache, caches, symbolic
from gradlab.symbols import VIEWS, sigmoid, softplus, symbol
from helpers import users_formula

# The disk cache serves users' formulas (a registered loss's derivations come from the shipped
# table): its tests use registered losses written out as a user would (helpers.users_formula).


def test_cache_round_trip_and_hit(fresh_cache):
    loss = users_formula("dpo")
    cold = gradlab.gradient(loss, "probability")
    files = {p.stem for p in fresh_cache.glob("*.json")}
    view_key = _cache.make_key("in_view", "probability", symbolic._key_text(loss.expr))
    assert view_key in files  # the loss in the view's variables
    assert len(files - {view_key}) == len(cold)  # and one data-only file per partial derivative
    caches.clear_caches()
    assert gradlab.gradient(loss, "probability") == cold


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_cache_file_is_a_miss_not_a_crash(fresh_cache, damage):
    loss = users_formula("ipo")
    good = gradlab.derivative(loss, "lp_w", "log")
    (path,) = fresh_cache.glob("*.json")
    blob = path.read_bytes()
    damaged = {
        "truncate": blob[: len(blob) // 2],
        "flip": blob[:-5] + bytes([blob[-5] ^ 0xFF]) + blob[-4:],
        "garbage": os.urandom(len(blob)),
        "empty": b"",
    }[damage]
    path.write_bytes(damaged)
    caches.clear_caches()
    assert gradlab.derivative(loss, "lp_w", "log") == good
    assert _cache.load(path.stem) == good  # rewritten


def test_a_well_formed_but_wrong_entry_is_recomputed(fresh_cache):
    loss = users_formula("dpo")
    good = gradlab.derivative(loss, "lp_w", "log")
    (path,) = fresh_cache.glob("*.json")
    doc = json.loads(path.read_text())
    doc["expr"] = _cache.encode(sympy.Integer(42))
    path.write_text(json.dumps(doc))
    assert _cache.load(path.stem) == 42  # readable as data, but wrong
    caches.clear_caches()
    assert gradlab.derivative(loss, "lp_w", "log") == good
    assert _cache.load(path.stem) == good  # and repaired


def test_one_wrong_partial_among_a_gradients_cached_partials_is_found_and_only_it_rederived(fresh_cache, monkeypatch):
    loss = users_formula("simpo")
    good = gradlab.gradient(loss, "log")  # several partials, each its own file
    assert len(good) >= 3
    files = {}
    for path in fresh_cache.glob("*.json"):
        doc = json.loads(path.read_text())
        files[_cache.decode(doc["expr"])] = (path, doc)
    path, doc = files[good["beta"]]
    doc["expr"] = _cache.encode(good["beta"] * (1 + sympy.Rational(1, 10**6)))  # slightly wrong
    path.write_text(json.dumps(doc))
    caches.clear_caches()
    derived = []
    real_diff = sympy.diff
    monkeypatch.setattr(sympy, "diff", lambda e, s: derived.append(s.name) or real_diff(e, s))
    assert gradlab.gradient(loss, "log") == good
    assert derived == ["beta"]  # the batch check failed, the per-entry checks found the one
    assert _cache.load(path.stem) == good["beta"]  # and repaired


def test_the_joint_check_cannot_be_fooled_by_swapped_entries():
    """d dpo / d lp_w = -d dpo / d lp_l: swapped entries keep an unweighted sum of partials
    right, so the check must weigh each partial by its own random direction component."""
    expr = symbolic.in_view("dpo", "log")
    w, l = symbol("lp_w"), symbol("lp_l")
    dw, dl = sympy.diff(expr, w), sympy.diff(expr, l)
    assert symbolic._are_derivatives({w: dw, l: dl}, expr)
    for _ in range(5):
        assert not symbolic._are_derivatives({w: dl, l: dw}, expr)
        assert not symbolic._are_derivatives({w: dw, l: dl + sympy.Rational(1, 10**9)}, expr)


@pytest.mark.parametrize("planted", ["wrong value", "foreign symbol"])
def test_a_wrong_cached_view_expression_is_not_served(fresh_cache, planted):
    """Expressions in a view are cached too (substituting re-evaluates the whole tree); a
    planted entry that differs in value, or that reads a symbol the view cannot bring in, is
    substituted again and repaired."""
    loss = users_formula("orpo")
    truth = symbolic.in_view(loss, "probability")
    key = _cache.make_key("in_view", "probability", symbolic._key_text(loss.expr))
    assert _cache.load(key) == truth
    path = fresh_cache / f"{key}.json"
    doc = json.loads(path.read_text())
    if planted == "wrong value":
        doc["expr"] = _cache.encode(truth * sympy.Rational(1000001, 1000000))
    else:  # + 0*h, unevaluated: the same value, but h is no variable of the probability view
        doc["expr"] = ["f", "Add", [doc["expr"], ["f", "Mul", [["I", "0"], ["S", "h"]]]]]
    path.write_text(json.dumps(doc))
    assert _cache.load(key) != truth
    caches.clear_caches()
    assert symbolic.in_view(loss, "probability") == truth
    assert _cache.load(key) == truth  # repaired
    assert gradlab.gradient(loss, "probability") == _fresh_gradient("orpo", "probability")


def test_the_joint_check_sees_a_small_wrong_partial_beside_a_huge_one():
    """Each partial weighs about the same in the joint check, whatever its size: a wrong
    1e-3 beside a right 1e12 is found (unweighted, the 1e12 term would hide it)."""
    w, l = symbol("lp_w"), symbol("lp_l")
    expr = 10**12 * w + l / 1000
    assert symbolic._are_derivatives({w: sympy.Integer(10**12), l: sympy.Rational(1, 1000)}, expr)
    for _ in range(5):
        assert not symbolic._are_derivatives({w: sympy.Integer(10**12), l: sympy.S.Zero}, expr)


def test_changed_definition_never_gets_a_stale_result(fresh_cache):
    a = gradlab.custom("softplus(-beta*(lp_w - lp_l))", name="mine")
    b = gradlab.custom("softplus(-2*beta*(lp_w - lp_l))", name="mine")  # same name, new formula
    da, db = gradlab.derivative(a, "lp_w"), gradlab.derivative(b, "lp_w")
    assert sympy.simplify(gradlab.standard(db - da.xreplace({symbol("beta"): 2 * symbol("beta")}))) == 0
    assert da != db


def test_concurrent_processes_share_the_cache(fresh_cache):
    script = textwrap.dedent(
        """
        import gradlab
        for name in ("dpo", "ipo", "simpo", "orpo"):  # as users' formulas: the disk cache serves those
            loss = gradlab.custom(str(gradlab.get_loss(name).expr), name="my_" + name)
            for view in ("log", "probability", "length"):
                gradlab.gradient(loss, view)
        print("ok")
        """
    )
    env = dict(os.environ, GRADLAB_CACHE_DIR=str(fresh_cache))
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and all("ok" in o for o in outs)
    assert not list(fresh_cache.glob("*.tmp")), "temporary files left behind"
    assert list(fresh_cache.glob("*.json"))
    for path in fresh_cache.glob("*.json"):
        assert _cache.load(path.stem) is not None
    caches.clear_caches()
    assert gradlab.gradient("orpo", "length") == _fresh_gradient("orpo", "length")


def _fresh_gradient(name, view):
    old = os.environ.get("GRADLAB_CACHE_DIR")
    os.environ["GRADLAB_CACHE_DIR"] = "off"
    caches.clear_caches()
    try:
        return gradlab.gradient(name, view)
    finally:
        os.environ["GRADLAB_CACHE_DIR"] = old or ""
        caches.clear_caches()


def test_warm_cache_is_used(fresh_cache, monkeypatch):
    gradlab.gradient("discopop", "length")
    caches.clear_caches()
    monkeypatch.setattr(sympy, "diff", lambda *a, **k: pytest.fail("derived again despite a warm cache"))
    gradlab.gradient("discopop", "length")


def test_readable_uses_sigmoid_and_softplus():
    x = sympy.Symbol("x", real=True)
    assert symbolic.readable(sympy.log(1 + sympy.exp(x))) == softplus(x)
    assert symbolic.readable(1 / (1 + sympy.exp(-x))) == sigmoid(x)
    assert symbolic.readable(sympy.exp(x) / (1 + sympy.exp(x))) == sigmoid(x)
    d = gradlab.derivative("dpo", "lp_l")
    assert d.has(sigmoid) and not d.has(sympy.exp)


def test_standard_has_only_standard_functions():
    for name in gradlab.LOSSES:
        e = gradlab.standard(gradlab.get_loss(name).expr)
        assert not e.has(sigmoid, softplus, gradlab.symbols.log1mexp), name


def test_latex_renders_sigma():
    assert r"\sigma" in gradlab.latex(gradlab.derivative("dpo", "lp_w"))


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_numeric_backends_are_stable_at_extremes(backend):
    f = gradlab.numeric(gradlab.get_loss("dpo").expr, ["lp_w", "lp_l", "ref_w", "ref_l", "beta"], backend)
    g = gradlab.numeric(gradlab.derivative("dpo", "lp_w"), ["lp_w", "lp_l", "ref_w", "ref_l", "beta"], backend)
    for lw, ll, b in [(-1e4, 0.0, 1e3), (0.0, -1e4, 1e3), (-1e4, -1e4, 1e-3)]:
        assert np.isfinite(f(lw, ll, 0.0, 0.0, b)) and np.isfinite(g(lw, ll, 0.0, 0.0, b))
    assert float(f(-1e4, 0.0, 0.0, 0.0, 1e3)) == pytest.approx(1e7)


def test_log1mexp_numeric_is_accurate_near_zero_and_far_below():
    f = gradlab.numeric(gradlab.symbols.log1mexp(symbol("lp_w")), ["lp_w"])
    with mpmath.workdps(40):
        for x in (-1e-12, -0.5, -1.0, -40.0, -700.0):
            expected = float(mpmath.log(1 - mpmath.exp(x)))
            assert float(f(x)) == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_evaluate_matches_numpy():
    point = {"lp_w": -3.0, "lp_l": -2.0, "ref_w": -2.5, "ref_l": -2.5, "len_w": 4.0, "len_l": 7.0}
    out = gradlab.evaluate("orpo", {k: point[k] for k in ("lp_w", "lp_l", "len_w", "len_l")}, {"beta": 0.3})
    args = ["lp_w", "lp_l", "len_w", "len_l"]
    params = gradlab.parameter_values("orpo", {"beta": 0.3})
    for name, value in out.items():
        expr = gradlab.get_loss("orpo").expr if name == "loss" else gradlab.derivative("orpo", name)
        f = gradlab.numeric(expr.xreplace(params), args)
        assert float(value) == pytest.approx(float(f(*(point[a] for a in args))), rel=1e-10)


def test_margin_view_only_for_margin_losses():
    assert gradlab.variables("dpo", "margin") == ["h"]
    assert gradlab.variables("ipo", "margin") == ["h"]
    with pytest.raises(gradlab.UnknownVariableError, match="margin h alone"):
        gradlab.variables("dpop", "margin")


def test_limit_substitutes_values():
    d = gradlab.derivative("dpo", "p_l", "probability")
    assert gradlab.limit(d, "p_l", 0, values={"beta": sympy.Rational(1, 2)}) == sympy.oo


def test_equivalent_falls_back_to_numbers_and_can_say_no():
    x = symbol("lp_w")
    assert gradlab.equivalent(softplus(x) - softplus(-x), x)
    assert not gradlab.equivalent(softplus(x), x)


def test_import_is_light():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, gradlab; print(sorted(m for m in ('jax', 'matplotlib') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"


def test_log1mexp_derivative_is_accurate_near_zero():
    x = symbol("lp_w")
    f = gradlab.numeric(sympy.diff(gradlab.symbols.log1mexp(x), x), ["lp_w"])
    with mpmath.workdps(40):
        for v in (-1e-14, -1e-8, -0.3, -30.0):
            expected = float(-mpmath.exp(v) / (1 - mpmath.exp(v)))
            assert float(f(v)) == pytest.approx(expected, rel=1e-12)


def test_equivalent_fails_when_too_few_points_evaluate():
    # sqrt of a non-positive log-prob is not real at any sample point: nothing was compared, so
    # nothing was shown (before, this returned True)
    lp = gradlab.symbol("lp_w")
    assert not gradlab.equivalent(sympy.sqrt(lp), 2 * sympy.sqrt(lp))
    # and a real identity that simplify cannot close is still confirmed at the sample points
    assert gradlab.equivalent(sympy.log(1 + sympy.exp(lp)), gradlab.parse("softplus(lp_w)"))


@pytest.mark.parametrize(
    "call",
    [
        lambda: gradlab.custom(None),
        lambda: gradlab.evaluate("dpo", {"lp_w": "x", "lp_l": 0, "ref_w": 0, "ref_l": 0}),
        lambda: gradlab.derivative("dpo", None),
        lambda: gradlab.numeric("lp_w", [3]),
    ],
)
def test_bad_arguments_stay_typed_errors(call):
    with pytest.raises(gradlab.GradlabError):
        call()


# ---------------------------------------------------------------------------------------------
# Views as objects: their inverse maps, neutral point and gradient fields
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VIEWS))
def test_view_coordinates_invert_the_substitution(name):
    """Reading a view's variables off a canonical point and substituting them back gives the
    canonical point again (the two directions of the map are one coordinate system)."""
    from gradlab.symbols import CANONICAL

    v = VIEWS[name]
    back = {k: e.xreplace(dict(v.coordinates)) for k, e in v.substitution.items() if k in CANONICAL}
    for canonical, expr in back.items():
        assert sympy.simplify(expr - canonical) == 0, (name, canonical, expr)
    for var in v.variables:  # every view variable is readable from the canonical ones
        expr = v.coordinates.get(var, var)
        assert expr.free_symbols <= set(CANONICAL) | set(v.substitution) | {var}, (name, var)


def test_view_neutral_point_and_axes():
    import math

    prob, log_view = VIEWS["probability"], VIEWS["log"]
    assert prob.axes == ("p_w", "p_l") and log_view.axes == ("lp_w", "lp_l")
    assert prob.neutral()["q_w"] == 0.3 and prob.neutral((0.1, 0.2))["q_l"] == pytest.approx(0.2, abs=0)
    n = log_view.neutral(0.1)
    assert n["ref_w"] == pytest.approx(math.log(0.1), rel=1e-15) and n["len_l"] == 1.0 and n["tail_w"] == 0.0
    assert set(n) == {s.name for s in log_view.variables} - set(log_view.axes)
    with pytest.raises(ValueError, match="no axes.*log, probability"):
        VIEWS["length"].neutral()


def test_field_is_dpos_hand_derived_gradient():
    """``symbolic.field`` on a grid against DPO's hand-derived partials: d/dlp_w = -beta sigma(-beta h)
    (Rafailov et al. 2023, Eq. 7), and the probability view's divided by p_w (chain rule)."""
    from gradlab import symbolic

    lp_w, lp_l = np.meshgrid(np.linspace(-3, -0.1, 4), np.linspace(-2, -0.2, 3))
    q = 0.2
    for beta in (0.1, 0.7):
        margin = (lp_w - np.log(q)) - (lp_l - np.log(q))
        push = -beta / (1 + np.exp(beta * margin))  # -beta sigma(-beta h)
        gx, gy = symbolic.field("dpo", "log")(lp_w, lp_l, {"beta": beta}, reference=q)
        np.testing.assert_allclose(gx, push, rtol=1e-12)
        np.testing.assert_allclose(gy, -push, rtol=1e-12)
        px, py = symbolic.field("dpo", "probability")(np.exp(lp_w), np.exp(lp_l), {"beta": beta}, reference=q)
        np.testing.assert_allclose(px, push / np.exp(lp_w), rtol=1e-12)
        np.testing.assert_allclose(py, -push / np.exp(lp_l), rtol=1e-12)
    with pytest.raises(gradlab.GradlabError, match="length view has no axes"):
        symbolic.field("dpo", "length")
    nan = symbolic.field("dpo", "probability")(np.array([np.nan, 0.5]), np.array([0.2, 0.2]))[0]
    assert np.isnan(nan[0]) and np.isfinite(nan[1])
