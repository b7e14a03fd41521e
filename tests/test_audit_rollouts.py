"""The rollout-log audit: reading, the weights against an independent transcription, the
length-bias finding and its control, and the configuration check against the generator's
known normaliser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

from gradlab.audit import rollouts
from gradlab.audit.generate import generate_rollouts, write
from gradlab.audit.io import AuditInputError

ROOT = Path(__file__).resolve().parents[1]


def _log(**kw):
    c = generate_rollouts(**kw)
    return rollouts.rollouts_from_arrays(prompt_id=c["prompt_id"], completion_length=c["completion_length"],
                                         reward=c["reward"], loss=c.get("loss"))


# --------------------------------------------------------------------------------------------
# The numbers
# --------------------------------------------------------------------------------------------


def test_weights_match_a_hand_transcription_of_trl():
    # two groups of 3 and one silent group; the weights written out by hand from TRL's code:
    # A = (r - mean) / (std_unbiased + 1e-4); grpo w = A / (G |o|), dapo w = A / sum|o|,
    # dr_grpo w = A / (G L_max)
    ids = ["a", "a", "a", "b", "b", "b", "c", "c"]
    length = np.array([10.0, 20.0, 40.0, 5.0, 50.0, 25.0, 7.0, 9.0])
    reward = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    r = rollouts.rollouts_from_arrays(prompt_id=ids, completion_length=length, reward=reward)
    groups = rollouts.Groups.of(r)
    a = np.zeros(8)
    for rows in ([0, 1, 2], [3, 4, 5]):
        x = reward[rows]
        a[rows] = (x - x.mean()) / (x.std(ddof=1) + 1e-4)
    sums = np.array([70.0] * 3 + [80.0] * 3 + [16.0] * 2)
    g = np.array([3.0] * 6 + [2.0] * 2)
    expected = {"grpo": a / (g * length), "dapo": a / sums, "dr_grpo": a / (g * 512)}
    for name, w in expected.items():
        from gradlab.group_losses import get_group_loss

        s = rollouts.config_statistics(r, groups, get_group_loss(name), "group", {})
        total = np.abs(w) * length
        assert s["incorrect_weight_share"] == pytest.approx(total[a < 0].sum() / total.sum(), rel=1e-12)
        assert s["silent_groups"] == 1 and s["silent_group_share"] == pytest.approx(1 / 3)
    # grpo's total weight per rollout is |A|/G, and A sums to 0 in a group: exactly half goes to the incorrect
    s = rollouts.config_statistics(r, groups, get_group_loss("grpo"), "group", {})
    assert s["incorrect_weight_share"] == pytest.approx(0.5, abs=1e-12)
    assert s["per_token_weight_exponent"] == pytest.approx(-1.0, abs=1e-9)


def test_a_length_biased_log_is_reported_and_the_control_is_not():
    biased = rollouts.audit_rollouts(_log(n_prompts=80, length_bias=1.0, seed=4), losses=["grpo"])
    control = rollouts.audit_rollouts(_log(n_prompts=80, length_bias=0.0, seed=4), losses=["grpo"])
    b, c = biased.dataset["length_bias"], control.dataset["length_bias"]
    assert b["biased"] and b["median_length_ratio"] > 1.2 and b["test"]["p_value"] < 0.01
    assert b["summary"].startswith("length-biased: incorrect responses are longer")
    assert f"{b['median_length_ratio']:.2f}x" in b["summary"]  # the verdict states its number
    assert not c["biased"] and c["test"]["p_value"] >= 0.01 and c["summary"].startswith("no length bias detected")
    for seed in range(5):  # more than one draw: the control's false-positive rate is the test's level, 1%
        for bias, expected in ((0.0, False), (1.0, True)):
            log = _log(n_prompts=80, length_bias=bias, seed=100 + seed, loss=None)
            assert rollouts.length_bias(log, rollouts.Groups.of(log))["biased"] is expected, (bias, seed)
    # grpo's 1/|o| favours long wrong answers per token: their per-token push is a fraction of the short ones'
    s = biased.configurations[0]
    assert s["incorrect_long_short_ratio"] < 0.5 and "pushed down" in s["verdict"]


@pytest.mark.parametrize("loss, normaliser", [("grpo", "per_sequence"), ("dr_grpo", "constant"),
                                              ("dapo", "group_tokens"), ("luspo", "sequences")])
@pytest.mark.parametrize("level", ["rollout", "group"])
def test_the_configuration_check_finds_the_generators_normaliser(loss, normaliser, level):
    check = rollouts.configuration_check(_log(n_prompts=60, loss=loss, loss_level=level, seed=7))
    assert check["decided"], check["summary"]
    assert check["best"]["normaliser"] == normaliser and loss in check["best"]["losses"]
    assert check["level"] == level
    assert check["runner_up"]["residual"] > 0.1 and f"{check['best']['residual']:.2g}" in check["summary"]
    if normaliser == "constant":
        assert check["best"]["max_completion_length"] == pytest.approx(1024, rel=1e-6)
        log = _log(n_prompts=60, loss=loss, loss_level=level, seed=7)
        assert rollouts.configuration_check(log, max_completion_length=1024)["decided"]
        wrong = rollouts.configuration_check(log, max_completion_length=512)  # the generator used 1024
        assert not (wrong["decided"] and wrong["best"]["normaliser"] == "constant")


def test_the_configuration_check_refuses_small_or_noisy_logs():
    small = rollouts.configuration_check(_log(n_prompts=4, loss="dapo", seed=1))
    assert not small["decided"] and "group(s) carry a gradient" in small["summary"]
    noisy = rollouts.configuration_check(_log(n_prompts=60, loss="dapo", loss_noise=0.3, seed=1))
    assert not noisy["decided"] and "no candidate matches" in noisy["summary"]
    slightly = rollouts.configuration_check(_log(n_prompts=60, loss="dapo", loss_noise=0.01, seed=1))
    assert slightly["decided"] and slightly["best"]["normaliser"] == "group_tokens"
    # equal lengths in every group: every normaliser is a constant multiple of another; no verdict
    c = generate_rollouts(60, loss="dapo", seed=1)
    same = np.full_like(c["completion_length"], 100.0)
    r = rollouts.rollouts_from_arrays(prompt_id=c["prompt_id"], completion_length=same, reward=c["reward"],
                                      loss=-rollouts.group_advantages(
                                          rollouts.rollouts_from_arrays(prompt_id=c["prompt_id"],
                                                                        completion_length=same, reward=c["reward"]),
                                          "group") / 8)
    tie = rollouts.configuration_check(r)
    assert not tie["decided"] and "fit about equally well" in tie["summary"]
    assert rollouts.configuration_check(_log(n_prompts=10, loss=None))["available"] is False


# --------------------------------------------------------------------------------------------
# Files and the command line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_formats_read_alike(tmp_path, suffix):
    pytest.importorskip("pyarrow")
    cols = generate_rollouts(12, loss="grpo", logps=True, token_logps=True, seed=2)
    path = write(tmp_path / f"log{suffix}", cols)
    r = rollouts.read_rollouts(path)
    assert r.n == 96 and r.n_groups == 12
    np.testing.assert_array_equal(r.length, cols["completion_length"])
    np.testing.assert_allclose(r.loss, cols["loss"], rtol=1e-15)
    # the per-token lists (rounded to 1e-6 when written) average to the summed log-prob over the length
    np.testing.assert_allclose(r.token_logp_mean, cols["logps"] / cols["completion_length"], atol=1e-6)


def test_bad_rows_are_refused_with_their_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_id": 1, "completion_length": 3, "reward": 1}\n'
                   '{"prompt_id": 1, "completion_length": 2.5, "reward": 0}\n')
    with pytest.raises(AuditInputError, match=r"row 1 \(line 2.*completion_length"):
        rollouts.read_rollouts(bad)
    bad.write_text('{"prompt_id": 1, "completion_length": 2, "reward": 1, "token_logps": [-1.0]}\n')
    with pytest.raises(AuditInputError, match="has 1 values, completion_length is 2"):
        rollouts.read_rollouts(bad)


def test_cli_audits_a_rollout_log_with_figures(tmp_path):
    out = tmp_path / "figs"
    log = str(ROOT / "examples" / "audit_rollouts.jsonl")
    code, stdout, err = run_cli(["audit", log, "--loss", "grpo", "dapo", "--scale-rewards", "group", "--json",
                                 "--out", str(out)])
    assert code == 0, err
    report = json.loads(stdout)
    assert report["kind"] == "rollouts" and [s["loss_type"] for s in report["configurations"]] == ["grpo", "dapo"]
    assert report["dataset"]["length_bias"]["biased"]
    assert report["configuration_check"]["best"]["normaliser"] == "group_tokens"
    assert (out / "audit_rollout_weight_vs_length.png").exists()
    code, _, err = run_cli(["audit", log, "--expr", "lp_w"])
    assert code == 2 and "--expr is for preference pairs" in err


def test_the_pair_reader_points_a_rollout_log_to_the_rollout_audit():
    from gradlab.audit import audit

    with pytest.raises(AuditInputError, match="is a rollout log"):
        audit(ROOT / "examples" / "audit_rollouts.jsonl")


def test_the_rollout_figure_draws_the_reports_numbers():
    from gradlab.audit import rollout_figures

    report = rollouts.audit_rollouts(_log(n_prompts=30, length_bias=1.0, seed=5), losses=["grpo", "dr_grpo"],
                                     scale_rewards=["group"])
    fig = rollout_figures.make_weight_vs_length(report)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2 and "L^-1.00" in axes[0].get_title()
    for ax, s in zip(axes, report.configurations, strict=True):
        correct, incorrect = ax.get_lines()[:2]
        np.testing.assert_array_equal(correct.get_xdata(), s["by_length"]["length"])
        np.testing.assert_array_equal(incorrect.get_ydata(), s["by_length"]["incorrect"])
