"""gradlab.audit's fast path: the compiled program equals gradlab.numeric on the length view
(the previous path), and every statistic equals a direct numpy/scipy computation, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy
from scipy.stats import rankdata, spearmanr

import gradlab
from gradlab import audit, symbolic
from gradlab.audit import gradients, program, stats
from gradlab.symbols import symbol

PAIR_LOSSES = [n for n, loss in gradlab.LOSSES.items() if loss.kind == "pair"]


def _data(n: int, seed: int, **kwargs) -> dict[str, np.ndarray]:
    cols = audit.generate(n, seed=seed, **kwargs)
    return {"lp_w": cols["chosen_logps"], "lp_l": cols["rejected_logps"], "ref_w": cols["ref_chosen_logps"],
            "ref_l": cols["ref_rejected_logps"], "len_w": cols["chosen_length"], "len_l": cols["rejected_length"]}


# --------------------------------------------------------------------------------------------
# Closed forms: the program against lambdify of the length view's own derivative
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mid_data() -> dict[str, np.ndarray]:
    return _data(3000, seed=21, length_bias=0.1)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_program_equals_lambdify_of_the_log_and_length_views(name, mid_data):
    """The previous path: each of the four partials derived in its own view (the levers in the
    length view, not by the chain rule), substituted and compiled by ``gradlab.numeric``."""
    loss = gradlab.get_loss(name)
    fast = gradients.weights(loss, mid_data)
    values = symbolic.parameter_values(loss)
    inverse = gradients._inverse_length_map()
    tails = gradients.estimated_tails()
    forms = [
        symbolic.derivative(loss, "lp_w", "log").xreplace(tails),
        symbolic.derivative(loss, "lp_l", "log").xreplace(tails),
        symbolic.derivative(loss, "m_w", "length").xreplace(inverse),
        symbolic.derivative(loss, "m_l", "length").xreplace(inverse),
    ]
    names = ["lp_w", "lp_l", "ref_w", "ref_l", "len_w", "len_l"]
    slow = symbolic.numeric(sympy.Tuple(*[f.xreplace(values) for f in forms]), names, "numpy")
    with np.errstate(all="ignore"):
        want = [np.broadcast_to(np.asarray(v, dtype=float), fast.g_w.shape)
                for v in slow(*[mid_data[k] for k in names])]
    for key, ref in zip(gradients.WEIGHT_NAMES, want, strict=True):
        got = getattr(fast, key)
        finite = np.isfinite(ref)
        assert np.array_equal(np.isfinite(got), finite), (name, key)
        # rounding of a difference of nearly equal terms (APO-down's two sides) is absolute, on
        # the scale of the terms: a floor of 1e-13 of the largest value covers it, no more
        scale = float(np.abs(ref[finite]).max()) if finite.any() else 0.0
        np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-11, atol=1e-13 * scale + 1e-300,
                                   err_msg=f"{name} {key}")


def test_the_program_folds_zero_hyperparameters_as_substitution_would():
    x, b = sympy.symbols("lp_w beta")
    prog = program.compile_program([b * sympy.log(x) + 1, x * 0 + b], ["lp_w"], constants={b: 0.0})
    first, second = prog(np.array([0.0, 2.0]))
    assert first == 1.0 and second == 0.0  # 0 * log(0) is never evaluated: the term is gone
    assert prog.steps == []


def test_the_program_shares_subexpressions_and_refuses_unknown_functions():
    x, y = sympy.symbols("lp_w lp_l")
    s = gradlab.symbols.SPECIAL_FUNCTIONS["sigmoid"](x - y)
    prog = program.compile_program([s, 2 * s, -s * x], ["lp_w", "lp_l"])
    sigmoid = program._functions()[gradlab.symbols.SPECIAL_FUNCTIONS["sigmoid"]]
    assert sum(fn is sigmoid for fn, _ in prog.steps) == 1
    with pytest.raises(program.Unsupported):
        program.compile_program([sympy.sin(x)], ["lp_w"])
    with pytest.raises(program.Unsupported):
        program.compile_program([x + sympy.Symbol("elsewhere")], ["lp_w"])


def test_the_lever_jacobian_is_the_length_views_substitution():
    jac = gradients.lever_jacobian()
    assert jac["m_w"][("lp_w")] == symbol("len_w")
    assert set(jac["m_w"]) == {"lp_w", "tail_w"} and set(jac["m_l"]) == {"lp_l", "tail_l"}


# --------------------------------------------------------------------------------------------
# Statistics: against numpy and scipy written out
# --------------------------------------------------------------------------------------------


def _direct(g_w, g_l, lever_w, lever_l, len_w, len_l, top=10) -> dict:
    """The statistics the way one would write them without caring for speed."""
    w = np.abs(g_w) + np.abs(g_l)
    n = w.size
    d = len_w - len_l
    out = {"total_weight": w.sum()}
    desc = np.sort(w)[::-1]
    out["top1_share"] = desc[: max(1, math.ceil(0.01 * n))].sum() / w.sum()
    out["top10_share"] = desc[: max(1, math.ceil(0.10 * n))].sum() / w.sum()
    out["effective_pairs_fraction"] = w.sum() ** 2 / (n * (w**2).sum())
    q = np.round(w / (stats.TIES * w.max()))  # ties within 1e-10 of the largest, as documented
    for key, x in (("corr_weight_length_difference", d), ("corr_weight_chosen_length", len_w),
                   ("corr_weight_rejected_length", len_l)):
        out[key] = spearmanr(q, x).statistic
    out["share_from_chosen_longer"] = w[d > 0].sum() / w.sum()
    out["top_rows"] = list(np.argsort(-w, kind="stable")[:top])
    for name, x in (("weight", w), ("g_w", g_w), ("g_l", g_l)):
        out[name] = dict(zip([f"q{round(100 * p):02d}" for p in stats.QUANTILES], np.quantile(x, stats.QUANTILES),
                             strict=True)) | {"mean": x.mean(), "std": x.std(), "min": x.min(), "max": x.max()}
    both, lev = np.concatenate([len_w, len_l]), np.abs(np.concatenate([lever_w, lever_l]))
    lo, hi = np.quantile(both, [0.25, 0.75])
    out["lever_long_short_ratio"] = lev[both >= hi].mean() / lev[both <= lo].mean()
    return out


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "r_dpo", "hinge", "ld_dpo", "kto"])
def test_statistics_equal_a_direct_computation(name, mid_data):
    loss = gradlab.get_loss(name)
    w = gradients.weights(loss, mid_data)
    lengths = stats.Lengths.of(mid_data["len_w"], mid_data["len_l"])
    got = stats.loss_statistics(w.g_w, w.g_l, w.lever_w, w.lever_l, lengths)
    want = _direct(w.g_w, w.g_l, w.lever_w, w.lever_l, mid_data["len_w"], mid_data["len_l"])
    for key in ("total_weight", "top1_share", "top10_share", "effective_pairs_fraction", "share_from_chosen_longer",
                "lever_long_short_ratio"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    for key in ("corr_weight_length_difference", "corr_weight_chosen_length", "corr_weight_rejected_length"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert [r["row"] for r in got["top_pairs"]] == want["top_rows"]
    for part in ("weight", "g_w", "g_l"):
        for key, value in want[part].items():
            assert got[part][key] == pytest.approx(value, rel=1e-12, abs=1e-300), (part, key)


def test_statistics_with_many_exact_and_near_ties():
    """Weights on a few levels, each level blurred by float64-sized noise (the ties the
    quantisation must merge), and many exact repeats, including the heaviest rows."""
    rng = np.random.default_rng(3)
    n = 20_000
    level = rng.integers(1, 6, n).astype(float)
    g_w = -(level * (1 + rng.integers(-3, 4, n) * 1e-15))
    g_l = level * 0.5
    len_w = rng.integers(1, 40, n).astype(float)
    len_l = rng.integers(1, 40, n).astype(float)
    lever_w, lever_l = g_w * len_w, g_l * len_l
    lengths = stats.Lengths.of(len_w, len_l)
    got = stats.loss_statistics(g_w, g_l, lever_w, lever_l, lengths)
    want = _direct(g_w, g_l, lever_w, lever_l, len_w, len_l)
    assert got["corr_weight_length_difference"] == pytest.approx(want["corr_weight_length_difference"], abs=1e-12)
    assert got["corr_weight_chosen_length"] == pytest.approx(want["corr_weight_chosen_length"], abs=1e-12)
    assert [r["row"] for r in got["top_pairs"]] == want["top_rows"]
    assert got["top10_share"] == pytest.approx(want["top10_share"], rel=1e-12)


@pytest.mark.parametrize("tol", [1e-3, 1e-300])  # packed-key sort, and the argsort fallback
def test_tie_ranks_equal_scipy_rankdata_of_the_quantised_values(tol):
    rng = np.random.default_rng(4)
    w = np.concatenate([rng.lognormal(size=5000), np.repeat(rng.lognormal(size=50), 20), [0.0, 0.0]])
    rng.shuffle(w)
    want = rankdata(np.round(w / tol))
    assert np.array_equal(stats.tie_ranks(w, tol), want)


def test_margin_shortcut_gives_the_same_sorted_parts():
    rng = np.random.default_rng(5)
    g = -rng.lognormal(size=1000)
    g[::7] = 0.0
    for g_w, g_l in ((g, -g), (-g, g), (g, g[::-1].copy()), (np.r_[g[:500], -g[500:]], -np.r_[g[:500], -g[500:]])):
        w = np.abs(g_w) + np.abs(g_l)
        sw, sl, ws = stats._sorted_parts(g_w, g_l, w)
        assert np.array_equal(sw, np.sort(g_w)) and np.array_equal(sl, np.sort(g_l))
        assert np.array_equal(ws, np.sort(w)) and not np.signbit(ws).any()


def test_audit_of_a_mid_size_dataset_equals_the_direct_computation_for_every_loss(mid_data):
    """The whole pipeline (threads, compile while evaluating) against the statistics computed
    one loss at a time from ``weights``."""
    report = audit.audit(audit.pairs_from_arrays(**mid_data), workers=2)
    for name, got in report.losses.items():
        w = gradients.weights(gradlab.get_loss(name), mid_data)
        want = _direct(w.g_w, w.g_l, w.lever_w, w.lever_l, mid_data["len_w"], mid_data["len_l"])
        assert got["top10_share"] == pytest.approx(want["top10_share"], rel=1e-12), name
        if not got["constant_weight"]:
            assert got["corr_weight_length_difference"] == pytest.approx(
                want["corr_weight_length_difference"], abs=1e-12), name
        assert [r["row"] for r in got["top_pairs"]] == want["top_rows"], name


# --------------------------------------------------------------------------------------------
# Words that match the numbers
# --------------------------------------------------------------------------------------------


def test_equal_weights_list_no_heaviest_rows():
    cols = audit.generate(300, seed=3, policy=False)  # at initialisation: DPO's weight is beta/2 at every pair
    report = audit.audit(audit.pairs_from_arrays(ref_w=cols["ref_chosen_logps"], ref_l=cols["ref_rejected_logps"],
                                                 len_w=cols["chosen_length"], len_l=cols["rejected_length"]),
                         losses=["dpo", "simpo"])
    dpo = report.losses["dpo"]
    assert dpo["constant_weight"] and dpo["top_pairs"] == []
    assert dpo["weight_spread"] <= stats.TIES
    assert "every pair pushed equally" in dpo["verdict"]
    line = next(x for x in audit.render(report).splitlines() if x.startswith("  dpo: "))
    assert "Heaviest rows" not in line
    simpo = next(x for x in audit.render(report).splitlines() if x.startswith("  simpo: "))
    assert "Heaviest rows: " in simpo and not report.losses["simpo"]["constant_weight"]


def test_one_dominating_pair_gets_no_power_law_verdict():
    rng = np.random.default_rng(0)
    n = 400
    len_w, len_l = rng.integers(5, 300, n).astype(float), rng.integers(5, 300, n).astype(float)
    ref_w, ref_l = -len_w * rng.uniform(1, 2, n), -len_l * rng.uniform(1, 2, n)
    lp_w, lp_l = ref_w + rng.normal(0, 1, n), ref_l + rng.normal(0, 1, n)
    lp_w[7] = ref_w[7] - 30  # forward-KL f-DPO's weight grows like exp(-(lp_w - ref_w)): this pair takes it all
    pairs = audit.pairs_from_arrays(lp_w=lp_w, lp_l=lp_l, ref_w=ref_w, ref_l=ref_l, len_w=len_w, len_l=len_l)
    report = audit.audit(pairs, losses=["fdpo_fkl", "dpo"])
    fkl, dpo = report.losses["fdpo_fkl"], report.losses["dpo"]
    w = gradients.weights(gradlab.get_loss("fdpo_fkl"), {"lp_w": lp_w, "lp_l": lp_l, "ref_w": ref_w,
                                                         "ref_l": ref_l, "len_w": len_w, "len_l": len_l}).weight
    assert fkl["largest_share"] == pytest.approx(w.max() / w.sum(), rel=1e-12) and fkl["largest_share"] > 0.9
    assert "one pair (row 7)" in fkl["verdict"] and "no per-token lever verdict" in fkl["verdict"]
    assert "L^" not in fkl["verdict"].split("no per-token lever verdict")[0]
    assert "one pair" not in dpo["verdict"] and "(R^2 0.99)" in dpo["verdict"]  # DPO's lever is L sigma(.)


def test_lever_r2_equals_the_squared_correlation_of_the_logs():
    rng = np.random.default_rng(1)
    len_w, len_l = rng.integers(2, 500, 999).astype(float), rng.integers(2, 500, 999).astype(float)
    lever_w, lever_l = len_w ** 0.7 * rng.lognormal(0, 1.5, 999), len_l ** 0.7 * rng.lognormal(0, 1.5, 999)
    b, _, r2 = stats.lever_exponent(lever_w, lever_l, stats.Lengths.of(len_w, len_l))
    x, y = np.log(np.concatenate([len_w, len_l])), np.log(np.concatenate([lever_w, lever_l]))
    assert b == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-9)
    assert r2 == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, rel=1e-9)


@pytest.mark.parametrize(("b", "r2", "ratio", "expected"), [
    (1.0, 0.99, 8.0, "L^1.00 (R^2 0.99): pushes per-token log-probs of long responses harder"),
    (2.3, 0.2, 9.0, "follows no power law of the length (the best fit, L^2.30, explains R^2 = 0.20"),
    (0.05, 0.01, 1.1, "roughly length-neutral: the longest quarter of responses gets 1.10x"),
])
def test_the_lever_verdict_carries_its_numbers(b, r2, ratio, expected):
    s = {"top10_share": 0.2, "top1_share": 0.03, "constant_weight": False, "largest_share": 0.004,
         "top_pairs": [{"row": 0}], "corr_weight_length_difference": 0.02, "lever_exponent": b, "lever_r2": r2,
         "lever_long_short_ratio": ratio}
    assert expected in audit.verdict(s, 1000)


def test_tiny_p_values_are_printed_as_bounds():
    lw = np.random.default_rng(2).integers(10, 100, 20000).astype(float)
    report = audit.audit(audit.pairs_from_arrays(ref_w=-lw, ref_l=-lw, len_w=lw + 5, len_l=lw), losses=["simpo"])
    test = report.dataset["length_test"]
    assert test["p_value"] < stats.P_FLOOR and test["p_value_text"] == "p < 1e-300"
    assert "p < 1e-300" in report.dataset["summary"] and "p = 0" not in audit.render(report)
    assert stats.p_text(0.0123) == "p = 0.0123"
