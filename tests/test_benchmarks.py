"""Every benchmark runs at a tiny size and reports its numbers (timings are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_run_tiny_and_report_json():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--json"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    s = data["summary"]
    for key in ("train_speedup_vs_torch_eager", "train_speedup_vs_torch_batched_warm", "zoo_derivation_cold_s",
                "zoo_derivation_warm_s", "check_points_per_s", "lambdify_loop_points_per_s", "figures_s",
                "slider_update_s", "import_s", "cli_list_s", "first_simulate_s"):
        assert isinstance(s[key], float) and s[key] > 0, key
    assert s["all_rows_ok"] is True
    # every target key is reported, measured or null with a reason
    from benchmarks.__main__ import TARGETS

    for key in TARGETS:
        assert key in s and (s[key] is not None or key in data["summary_notes"]), key
    # the torch baselines and gradlab reach the same metrics (a fair comparison)
    for row in data["results"]["training"]["families"].values():
        assert row["max_final_metric_difference"] < 1e-8
        assert row["torch_batched_max_metric_difference"] < 1e-8
    assert data["machine"]["cores"] >= 1 and "jax" in data["machine"]["versions"]


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
