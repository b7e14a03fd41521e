"""Every benchmark runs at a tiny size and reports its numbers (timings are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


# The tiny run in two halves of about equal time, each its own process, so that two test workers
# run them side by side; together they run every benchmark (a test below checks that).
_HALVES = {
    "training": ("train_speedup_vs_torch_eager", "train_speedup_vs_torch_batched_warm", "first_simulate_s",
                 "first_simulate_cold_s"),
    "the rest": ("zoo_derivation_cold_s", "zoo_derivation_warm_s", "check_points_per_s",
                 "lambdify_loop_points_per_s", "figures_s", "slider_update_s", "import_s", "cli_list_s",
                 "python_startup_s", "cli_version_s", "cli_show_s", "cli_grad_s", "cli_eval_s"),
}
_RUNS = {"training": ["training", "cold_start", "audit", "logps"],  # about equal halves on a 2-core machine
         "the rest": ["verification", "derivation", "figures", "notebook_latency", "import_time", "exact_metrics",
                      "group_gradient"]}


def test_the_halves_run_every_benchmark():
    from benchmarks.suite import BENCHMARKS

    assert sorted(n for names in _RUNS.values() for n in names) == sorted(BENCHMARKS)


def test_the_results_page_says_why_each_target_is_not_met():
    import re

    from benchmarks.__main__ import LIMITS, TARGETS, UNEXPLAINED, markdown

    info = {"cpu": "cpu", "cores": 2, "python": "3.11", "versions": {}}
    met = {key: bound * 2 if op == ">=" else bound / 2 for key, (op, bound) in TARGETS.items()}
    explained, unexplained, unmeasured = next(iter(LIMITS)), "first_simulate_s", "audit_1m_pairs_s"
    summary = {**met, explained: TARGETS[explained][1] / 2, unexplained: TARGETS[unexplained][1] * 2, unmeasured: None}
    page = markdown({}, summary, info, 1.0, {unmeasured: "not run (--only)"})
    reasons = dict(re.findall(r"^- `(\w+)`: (.+)$", page, flags=re.M))
    assert reasons == {unmeasured: "not run (--only)", explained: LIMITS[explained], unexplained: UNEXPLAINED}
    assert f"| `{explained}` | {summary[explained]:.4g} | >= " in page
    assert page.count("| no |") == 3  # the two missed and the null
    # a reason names only targets and numbers that a full run reports (the committed page)
    results = (ROOT / "benchmarks" / "results.md").read_text(encoding="utf-8")
    assert set(LIMITS) <= set(TARGETS)
    for why in LIMITS.values():
        for name in re.findall(r"`(\w+)`", why):
            assert f'"{name}":' in results, name


@pytest.mark.parametrize("half", [pytest.param(half, marks=pytest.mark.long(seconds=seconds))
                                  for half, seconds in (("training", 17), ("the rest", 29))])
def test_benchmarks_run_tiny_and_report_json(half):
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--json", "--only", *_RUNS[half]], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    s = data["summary"]
    for key in _HALVES[half]:
        assert isinstance(s[key], float) and s[key] > 0, key
    # every target key is reported, measured or null with a reason
    from benchmarks.__main__ import TARGETS

    for key in TARGETS:
        assert key in s and (s[key] is not None or key in data["summary_notes"]), key
    assert data["machine"]["cores"] >= 1 and "jax" in data["machine"]["versions"]
    if half != "training":
        assert s["all_rows_ok"] is True
        return
    # the torch baselines and gradlab reach the same metrics (a fair comparison)
    for row in data["results"]["training"]["families"].values():
        assert row["max_final_metric_difference"] < 1e-8
        assert row["torch_batched_max_metric_difference"] < 1e-8
        assert row["torch_batched_naive_max_metric_difference"] < 1e-8
        # the batched baseline is the fastest form that reaches the metrics, and it is named
        forms = row["torch_batched_variants"]
        assert len(forms) >= 6 and row["torch_batched_variant"] in forms
        ok = [f["ms_per_step"] for f in forms.values() if f["reaches_metrics"]]
        assert forms[row["torch_batched_variant"]]["reaches_metrics"]
        assert row["torch_batched_ms_per_step"] == pytest.approx(min(ok))
        assert row["torch_batched_naive_s"] > 0


@pytest.mark.parametrize("family", ["unigram", "bigram"])
def test_batched_torch_baseline_is_the_per_run_loop(family):
    """The batched loop on two runs with different seeds, data and betas gives each run what the
    one-run loop gives it, so a batching error (mixed runs, a shared beta) fails here."""
    pytest.importorskip("torch")
    from benchmarks.torch_baseline import train_dpo, train_dpo_batched

    vocab, max_len, steps = 3, 4, 6
    seqs = np.array([[1, 0, 0, 0], [2, 0, 0, 0], [1, 2, 0, 0], [2, 2, 1, 0]])
    lengths = np.array([1, 1, 2, 3])
    rng = np.random.default_rng(0)
    shape = (vocab,) if family == "unigram" else (vocab + 1, vocab)
    inits = rng.normal(size=(2, *shape))
    w, l = np.array([[0, 2, 3], [1, 1, 2]]), np.array([[1, 3, 0], [2, 0, 3]])
    betas = np.array([0.1, 0.7])
    batched = train_dpo_batched(family, vocab, max_len, inits, seqs, lengths, w, l, betas, steps, 0.05, 1)
    name = "theta" if family == "unigram" else "W"
    for r in range(2):
        for at in (0, steps - 1):
            one = train_dpo(family, vocab, max_len, {name: inits[r]}, seqs, lengths, w[r], l[r], betas[r],
                            steps, 0.05, at)
            assert abs(one["loss"] - batched["loss"][at, r]) < 1e-12
            assert abs(one["expected_length"] - batched["expected_length"][at, r]) < 1e-12
    assert not np.allclose(batched["loss"][-1, 0], batched["loss"][-1, 1])  # the runs differ


@pytest.mark.parametrize("family", ["unigram", "bigram"])
def test_fast_torch_forms_are_the_batched_loop(family):
    """Every fast form (hoisted gather, count matrices) with every Adam gives every run what the
    plain batched loop gives it, at every step: a wrong count, sign, cell index or reference
    margin fails here."""
    pytest.importorskip("torch")
    from benchmarks.torch_baseline import ADAMS, BATCHED_VARIANTS, train_dpo_batched, train_dpo_fast

    vocab, max_len, steps = 3, 4, 6
    seqs = np.array([[1, 0, 0, 0], [2, 0, 0, 0], [1, 2, 0, 0], [2, 2, 1, 0], [1, 1, 2, 2]])
    lengths = np.array([1, 1, 2, 3, 4])
    rng = np.random.default_rng(1)
    shape = (vocab,) if family == "unigram" else (vocab + 1, vocab)
    inits = rng.normal(size=(2, *shape))
    w, l = np.array([[0, 2, 3, 4], [1, 4, 2, 3]]), np.array([[1, 3, 4, 0], [2, 0, 3, 1]])
    betas = np.array([0.1, 0.7])
    args = (family, vocab, max_len, inits, seqs, lengths, w, l, betas, steps, 0.05, 1)
    plain = train_dpo_batched(*args)
    assert np.ptp(plain["expected_length"][:, 0]) > 1e-3  # the runs move
    for variant in BATCHED_VARIANTS:
        for adam in ADAMS:
            fast = train_dpo_fast(*args, variant=variant, adam=adam)
            # 1e-10, not 1e-12: another summation order of the same margin, and Adam turns the
            # ~1e-17 rounding noise on a coordinate whose exact gradient is 0 (bigram's start-row
            # EOS logit) into steps of lr * noise / (|noise| + eps); an error in a count, sign or
            # cell moves the metrics by > 1e-3
            for m in ("loss", "expected_length"):
                np.testing.assert_allclose(fast[m], plain[m], rtol=0, atol=1e-10, err_msg=f"{variant}+{adam} {m}")
    with pytest.raises(ValueError, match="unknown variant"):
        train_dpo_fast(*args, variant="gathr")


@pytest.mark.long(seconds=14)
def test_fresh_torch_process_reaches_the_same_records(tmp_path):
    """The fresh-process run (``python -m benchmarks.torch_baseline``) writes the records the
    in-process loop computes, and ``suite._fresh_torch`` measures it against them."""
    pytest.importorskip("torch")
    from benchmarks import suite
    from benchmarks.torch_baseline import train_dpo_fast

    seqs = np.array([[1, 0, 0], [2, 0, 0], [1, 2, 0], [2, 2, 1]])
    lengths = np.array([1, 1, 2, 3])
    inits = np.random.default_rng(2).normal(size=(2, 4, 3))
    args = ("bigram", 3, 3, inits, seqs, lengths, np.array([[0, 2], [3, 1]]), np.array([[1, 3], [2, 0]]),
            np.array([0.2, 0.5]), 5, 0.05, 2)
    want = train_dpo_fast(*args, variant="counts", adam="fused")
    gap = lambda res: max(float(np.max(np.abs(res[m] - want[m]))) for m in ("loss", "expected_length"))  # noqa: E731
    out = suite._fresh_torch(args, "counts", "fused", 1, gap)
    assert out["torch_batched_fresh_max_metric_difference"] < 1e-13
    assert out["torch_batched_fresh_s"] > out["torch_batched_fresh_inside_s"] > out["torch_batched_fresh_import_s"] > 0
    wrong = suite._fresh_torch(args[:8] + (np.array([0.9, 0.5]),) + args[9:], "counts", "fused", 1, gap)
    assert wrong["torch_batched_fresh_max_metric_difference"] > 1e-6  # the check can fail
