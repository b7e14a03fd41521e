"""Issue 27: what is read back is verified, exactness, and exit 2 for bad input in formulas and
cache paths. One class per family; each test failed on the code before the fix.

The disk cache's read-back is checked on a user's formula (DPO written out, under another name):
a registered loss's derivations come from the shipped table, which the disk cache cannot change."""

from __future__ import annotations

import json
import os

import mpmath
import pytest
from helpers import run_cli, users_formula
import sympy

import gradlab
from gradlab import _cache, caches, symbolic


def _plant(folder, key, tree):
    path = folder / f"{key}.json"
    path.write_text(json.dumps({"format": "gradlab-derivation-cache/2", "key": key, "expr": tree}))
    path.chmod(0o600)


def _dpo_key(wrt="lp_w"):
    expr = symbolic.in_view("dpo", "log")
    return _cache.make_key("derivative", "log", wrt, symbolic._key_text(expr))


LP_W = gradlab.symbol("lp_w")


class TestReadBackIsVerified:
    """A planted entry that is right on a box and wrong outside it is never served."""

    @pytest.mark.parametrize("plant", [
        42 * sympy.Heaviside(-5 - LP_W),  # the example: wrong for lp_w < -5
        42 * sympy.Heaviside(LP_W + 999),  # wrong only for lp_w > -999 ... right near -1e3
        42 * sympy.Heaviside(-999 - LP_W),  # wrong only in the far tail lp_w < -999
        sympy.Max(0, -LP_W - 3),
        sympy.exp(1000 * LP_W),  # wrong only near lp_w = 0
    ])
    def test_a_planted_wrong_gradient_is_never_served(self, fresh_cache, plant):
        loss = users_formula("dpo")
        truth = gradlab.derivative(loss, "lp_w")
        key = _dpo_key()
        for _ in range(3):  # fresh points every time: never served, not just rarely
            _plant(fresh_cache, key, _cache.encode(truth + plant))
            caches.clear_caches()
            assert gradlab.derivative(loss, "lp_w") == truth

    def test_eval_and_audit_see_the_true_value_not_the_planted_one(self, fresh_cache):
        loss = users_formula("dpo")
        truth = gradlab.derivative(loss, "lp_w")
        _plant(fresh_cache, _dpo_key(), _cache.encode(truth + 42 * sympy.Heaviside(-5 - LP_W)))
        caches.clear_caches()
        out = gradlab.evaluate(loss, {"lp_w": -40, "lp_l": -1, "ref_w": -1, "ref_l": -1})
        beta = float(gradlab.get_loss("dpo").defaults["beta"])
        expected = -beta / (1 + mpmath.exp(-beta * 39))  # -beta sigma(-beta h), h = -39 (hand-derived)
        assert abs(float(out["lp_w"]) - float(expected)) < 1e-12

    def test_a_plant_hidden_by_a_cancellation_too_deep_to_resolve_is_refused(self, fresh_cache):
        """e^(-1000 lp_w) + 42 - e^(-1000 lp_w), kept unevaluated, is 0 at any affordable
        precision where lp_w is far out; its error bound says it is not known there."""
        loss = users_formula("dpo")
        truth = gradlab.derivative(loss, "lp_w")
        big = ["f", "exp", [["f", "Mul", [["I", "-1000"], ["S", "lp_w"]]]]]
        hidden = ["f", "Add", [big, ["I", "42"], ["f", "Mul", [["I", "-1"], big]]]]
        _plant(fresh_cache, _dpo_key(), ["f", "Add", [_cache.encode(truth), hidden]])
        caches.clear_caches()
        assert gradlab.derivative(loss, "lp_w") == truth

    def test_a_right_entry_is_served_from_the_cache(self, fresh_cache, monkeypatch):
        loss = users_formula("dpo")
        truth = gradlab.gradient(loss, "log")
        caches.clear_caches()
        monkeypatch.setattr(sympy, "diff", lambda *a, **k: pytest.fail("derived again despite a right entry"))
        assert gradlab.gradient(loss, "log") == truth

    def test_a_planted_view_expression_wrong_in_the_tail_is_refused(self, fresh_cache):
        loss = users_formula("dpo")
        truth = symbolic.in_view(loss, "probability")
        key = _cache.make_key("in_view", "probability", symbolic._key_text(loss.expr))
        p_w = gradlab.symbol("p_w")
        _plant(fresh_cache, key, _cache.encode(truth + 42 * sympy.Heaviside(sympy.Rational(1, 10**100) - p_w)))
        caches.clear_caches()
        assert symbolic.in_view(loss, "probability") == truth

    def test_a_registered_loss_is_served_from_the_table_whatever_the_disk_cache_holds(self, fresh_cache):
        """An entry 1e-14 off in relative terms is below what the read-back check can see (its
        tolerance is 1e-12), so the disk cache serves it for a user's formula (the control); for
        the registered loss with the same expression the shipped table wins, in the log view
        and in a view whose expression is itself cached."""
        mine = users_formula("dpo")
        for view, wrt in (("log", "lp_w"), ("probability", "p_l")):
            truth = gradlab.derivative("dpo", wrt, view)
            assert gradlab.derivative(mine, wrt, view) == truth
            key = _cache.make_key("derivative", view, wrt, symbolic._key_text(symbolic.in_view("dpo", view)))
            off = sympy.Mul(1 + sympy.Rational(1, 10**14), truth, evaluate=False)
            _plant(fresh_cache, key, _cache.encode(off))
            caches.clear_caches()
            assert gradlab.derivative(mine, wrt, view) == _cache.decode(_cache.encode(off)) != truth
            caches.clear_caches()
            assert gradlab.derivative("dpo", wrt, view) == truth
            assert gradlab.gradient("dpo", view)[wrt] == truth


class TestNoCodeFromNames:
    @pytest.mark.parametrize("backend", ["numpy", "mpmath", "jax"])
    def test_a_symbol_named_like_code_runs_nothing(self, tmp_path, backend):
        marker = tmp_path / "pwned"
        x = sympy.Symbol(f"__import__('os').system('touch {marker}')")
        f = gradlab.numeric(x + 1, [x], backend)  # an argument: replaced by a dummy
        assert float(f(2.0)) == 3.0
        with pytest.raises(gradlab.GradlabError, match="not among its arguments"):
            gradlab.numeric(x + gradlab.symbol("lp_w"), ["lp_w"], backend)
        foreign = sympy.Function(f"__import__('os').system('touch {marker}')")
        with pytest.raises(gradlab.GradlabError, match="cannot compile"):
            gradlab.numeric(foreign(gradlab.symbol("lp_w")), ["lp_w"], backend)
        assert not marker.exists()


class TestEquivalentSamplesTheWholeDomain:
    @pytest.mark.parametrize("other", ["lp_w + max(0, -lp_w - 3)", "lp_w + exp(1000*lp_w)",
                                       "lp_w + 1e-3*Heaviside(-999 - lp_w)"])
    def test_different_functions_are_not_equivalent(self, other):
        for _ in range(3):
            assert not gradlab.equivalent("lp_w", other)

    def test_equal_functions_still_are(self):
        assert gradlab.equivalent("softplus(beta*(lp_w - lp_l))", "log(1 + exp(beta*lp_w - beta*lp_l))")
        assert gradlab.equivalent("sigmoid(lp_w)", "1 - sigmoid(-lp_w)")


class TestExactOrRefused:
    def test_exp_minus_one_at_a_tiny_point_is_never_zero(self):
        code, out, err = run_cli(["eval", "--expr", "exp(lp_w) - 1", "--at", "lp_w=-1e-990"])
        assert code == 2 and "eval_digits" in err and "0.0" not in out
        with gradlab.budgets.raised(eval_digits=2000):
            value = gradlab.evaluate(gradlab.custom("exp(lp_w) - 1"), {"lp_w": "-1e-990"})["loss"]
        with mpmath.workdps(30):
            assert abs(value / mpmath.mpf("-1e-990") - 1) < mpmath.mpf(10) ** -15

    def test_a_literal_below_float64_is_never_rounded_to_zero(self):
        code, out, err = run_cli(["show", "--expr", "lp_w + 1e-400*lp_l", "--json"])
        assert code == 2 and "constant_digits" in err
        with gradlab.budgets.raised(constant_digits=500):
            expr = gradlab.parse("lp_w + 1e-400*lp_l")
        assert expr.coeff(gradlab.symbol("lp_l")) == sympy.Rational(1, 10**400)
        assert gradlab.parse("1e-300*lp_l").coeff(gradlab.symbol("lp_l")) == sympy.Rational(1, 10**300)
        assert gradlab.parse("2.5e3 + 0.1*lp_w") == 2500 + gradlab.symbol("lp_w") / 10


class TestBadInputExits2:
    def test_a_nested_power_exponent_is_refused(self):
        text = "lp_w"
        for _ in range(16):
            text = f"({text})**(10**299)"
        for argv in (["show", "--expr", text], ["grad", "--expr", text, "--wrt", "lp_w"]):
            code, _, err = run_cli(argv)
            assert code == 2, err
            assert "constant_digits" in err

    @pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs lchown")
    def test_a_cache_path_through_a_link_someone_else_owns_is_refused(self, tmp_path, monkeypatch):
        target = tmp_path / "real"
        target.mkdir(mode=0o700)
        link = tmp_path / "link"
        link.symlink_to(target)
        os.lchown(link, 65534, 65534)
        monkeypatch.setenv("GRADLAB_CACHE_DIR", str(link / "gradlab"))
        _cache._WARNED.clear()
        with pytest.warns(_cache.CacheWarning, match="symbolic link"):
            assert _cache.cache_dir() is None
        code, _, err = run_cli(["show", "dpo"])  # a folder the user named: the command refuses it
        assert code == 2 and "GRADLAB_CACHE_DIR" in err and "symbolic link" in err and str(link) in err
        os.lchown(link, os.getuid(), os.getgid())
        _cache._WARNED.clear()
        assert _cache.cache_dir() is not None
        assert run_cli(["show", "dpo"])[0] == 0

    def test_a_named_cache_folder_others_can_write_is_refused(self, tmp_path, monkeypatch):
        folder = tmp_path / "shared"
        folder.mkdir()
        folder.chmod(0o777)
        monkeypatch.setenv("GRADLAB_CACHE_DIR", str(folder))
        code, out, err = run_cli(["grad", "dpo", "--wrt", "lp_w"])
        assert code == 2 and out == "" and "other users can write" in err
        monkeypatch.setenv("GRADLAB_CACHE_DIR", "off")
        assert run_cli(["grad", "dpo", "--wrt", "lp_w"])[0] == 0
