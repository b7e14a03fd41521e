"""Every benchmark runs at a tiny size and reports its numbers (timings are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_run_tiny_and_report_json():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--json"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    s = data["summary"]
    for key in ("train_speedup_vs_torch_eager", "zoo_derivation_cold_s", "zoo_derivation_warm_s",
                "check_points_per_s", "lambdify_loop_points_per_s", "figures_s", "slider_update_s", "import_s",
                "cli_list_s"):
        assert isinstance(s[key], float) and s[key] > 0, key
    assert s["all_rows_ok"] is True
    # the torch baseline and gradlab reach the same final metrics (a fair comparison)
    for row in data["results"]["training"]["families"].values():
        assert row["max_final_metric_difference"] < 1e-8
    assert data["machine"]["cores"] >= 1 and "jax" in data["machine"]["versions"]


def test_results_file_is_committed_from_a_full_run():
    text = (ROOT / "benchmarks" / "results.md").read_text()
    assert "Full run of `python -m benchmarks`" in text and "train_speedup_vs_torch_eager" in text
