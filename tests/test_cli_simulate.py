"""``gradlab simulate`` is a front end over the experiment runner: its flags are an experiment
table, and every test here would fail if it ran a simulator of its own."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from gradlab import experiments
from gradlab.cli import main
from gradlab.experiments import frontend, named
from gradlab.experiments.validate import load
from gradlab.experiments.runner import build_family
from tests.test_cli import run, run_json

SHORT = ("--steps", "3", "--seeds", "2")


def _series(doc: dict, name: str) -> np.ndarray:
    return np.asarray(doc["metrics"][name], dtype=float)  # (records, seeds, ...)


def test_simulate_json_equals_gradlab_run_on_the_equivalent_file(capsys, tmp_path):
    doc = run_json(capsys, "simulate", "ipo", "--policy", "bigram", "--vocab", "2", "--max-len", "4",
                   "--optimizer", "sgd", "--lr", "0.3", "--steps", "4", "--seeds", "2", "--dataset", "chosen-longer",
                   "--set", "beta=0.4")
    path = tmp_path / "same.toml"
    path.write_text('[policy]\nfamily = "bigram"\nvocab = 2\nmax_len = 4\nscale = 0.0\n'
                    '[data]\nkind = "chosen_longer"\n[loss]\nname = "ipo"\nbeta = 0.4\n'
                    '[train]\noptimizer = "sgd"\nlr = 0.3\nsteps = 4\nseeds = 2\n')
    ran = run_json(capsys, "run", str(path))
    assert doc["config"] == ran["config"]  # the resolved configuration is the runner's
    assert doc["metrics"]["step"] == ran["runs"][0]["steps"] == [0, 1, 2, 3, 4]
    assert (doc["loss"], doc["policy"], doc["dataset"], doc["seeds"]) == ("ipo", "bigram", "chosen_longer", 2)
    assert doc["hyperparameters"] == {"beta": 0.4}
    for name in ran["runs"][0]["metrics"]:
        file_series = np.stack([np.asarray(r["metrics"][name], dtype=float) for r in ran["runs"]], axis=1)
        np.testing.assert_allclose(_series(doc, name), file_series, rtol=1e-12, atol=1e-12, err_msg=name)


def test_default_simulate_is_the_named_length_drift_setting(capsys):
    # one number per quantity: `gradlab simulate dpo` prints the drift factor the length_drift figure
    # and the scorecard quote (the named setting's Adam run), so its defaults must be that setting
    doc = run_json(capsys, "simulate", "dpo", "--steps", "5")
    same = experiments.run(named.length_drift_config("dpo", "adam", steps=5))
    assert doc["seeds"] == named.SEEDS
    np.testing.assert_allclose(np.asarray(doc["metrics"]["expected_length"])[-1],
                               named.drift_factors(same) * 4.0, rtol=1e-12)  # uniform start: E[len] = 4
    assert main(["simulate", "dpo", "--steps", "5"]) == 0
    assert named.spread_text(named.drift_factors(same)) in capsys.readouterr().out


def test_vocab_counts_content_tokens_not_eos(capsys):
    # a uniform unigram (scale 0) over V content tokens + EOS: P(EOS) = 1/(V+1), E[length] = V+1;
    # the old meaning (vocab counting EOS) would give 1/V and V
    doc = run_json(capsys, "simulate", "dpo", "--vocab", "2", "--set", "policy.scale=0", "--steps", "1",
                   "--seeds", "1")
    assert doc["config"]["policy"]["vocab"] == 2 and len(doc["config"]["data"]["reward"]) == 2
    assert _series(doc, "eos_probability")[0, 0] == pytest.approx(1 / 3, rel=1e-12)
    assert _series(doc, "expected_length")[0, 0] == pytest.approx(3.0, rel=1e-12)
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    assert "content tokens 1..V; EOS (token 0) comes on top and is not counted" in " ".join(
        capsys.readouterr().out.split())


def test_max_len_defaults_to_unbounded_for_chain_families_only():
    assert load(frontend.table("dpo", policy="unigram")).policy.max_len is None
    assert load(frontend.table("dpo", policy="linear-head")).policy.max_len is None
    assert load(frontend.table("dpo", policy="tabular")).policy.max_len == 6  # a table needs a cut-off
    assert load(frontend.table("dpo", policy="bigram", max_len=4)).policy.max_len == 4
    assert load(frontend.table("dpo", policy="bigram", max_len="none")).policy.max_len is None


def _unigram_dpo_gradient(doc: dict) -> np.ndarray:
    """dL/dtheta at the start (policy = reference, h = 0), by hand: for DPO dl/dh = -beta/2, and a
    unigram's lp(y) = sum_t theta[y_t] - n lse(theta) (n tokens, the EOS included) has gradient
    counts(y) - n softmax(theta)."""
    exp = load(frontend.table("dpo", steps=1, seeds=1, sets={"train.metrics": ["params"]}))
    fam = build_family(exp.policy)
    theta = np.asarray(doc["metrics"]["params.theta"][0][0])
    with jax.enable_x64(True):
        params = {"theta": jax.numpy.asarray(theta)}
        data = experiments.datasets.build(exp.data, fam, 0, params, params)
    p = np.exp(theta - theta.max())
    p /= p.sum()
    grads = []
    for row, n in zip(data.items, data.lengths, strict=True):
        counts = np.bincount(row[:n], minlength=len(theta)).astype(float)
        grads.append(counts - n * p)
    grads = np.asarray(grads)
    beta = doc["hyperparameters"]["beta"]
    return (data.weight[:, None] * (-beta / 2) * (grads[data.w] - grads[data.l])).sum(0)


def test_optimizer_sgd_is_plain_gradient_descent(capsys):
    lr = 0.7
    doc = run_json(capsys, "simulate", "dpo", "--optimizer", "sgd", "--lr", str(lr), "--steps", "1", "--seeds", "1",
                   "--set", 'train.metrics=["params"]')
    theta = np.asarray(doc["metrics"]["params.theta"])[:, 0]  # (records, vocab + 1)
    np.testing.assert_allclose(theta[1], theta[0] - lr * _unigram_dpo_gradient(doc), rtol=1e-12, atol=1e-14)
    # the default (Adam) first step moves every coordinate by lr, whatever the gradient's size
    adam = run_json(capsys, "simulate", "dpo", "--lr", str(lr), "--steps", "1", "--seeds", "1",
                    "--set", 'train.metrics=["params"]')
    step = np.abs(np.diff(np.asarray(adam["metrics"]["params.theta"])[:, 0], axis=0))
    np.testing.assert_allclose(step, lr, rtol=1e-4)  # up to Adam's eps against the gradient


def test_batch_size_draws_minibatches(capsys):
    full = run_json(capsys, "simulate", "dpo", *SHORT)
    every = run_json(capsys, "simulate", "dpo", *SHORT, "--batch-size", "64")  # all 64 pairs, shuffled
    some = run_json(capsys, "simulate", "dpo", *SHORT, "--batch-size", "8")
    assert some["config"]["train"]["batch_size"] == 8 and full["config"]["train"]["batch_size"] == "full"
    np.testing.assert_allclose(_series(every, "loss"), _series(full, "loss"), rtol=1e-12)
    assert np.abs(_series(some, "loss")[1:] - _series(full, "loss")[1:]).max() > 1e-6
    again = run_json(capsys, "simulate", "dpo", *SHORT, "--batch-size", "8")
    assert again["metrics"] == some["metrics"]  # a seeded sampler


def test_dataset_names_accept_hyphens(capsys):
    hyphen = run_json(capsys, "simulate", "dpo", *SHORT, "--dataset", "equal-length")
    under = run_json(capsys, "simulate", "dpo", *SHORT, "--dataset", "equal_length")
    assert hyphen == under and hyphen["dataset"] == "equal_length"


@pytest.mark.parametrize("argv, flag, allowed", [
    (["--dataset", "nope"], "--dataset", "equal_length"),
    (["--policy", "nope"], "--policy", "unigram"),
    (["--optimizer", "nope"], "--optimizer", "sgd"),
    (["--vocab", "0"], "--vocab", "whole number"),
    (["--batch-size", "65"], "--batch-size", "at most 64"),
    (["--max-len", "0"], "--max-len", "'none'"),
    (["--batch-size", "some"], "--batch-size", "'full'"),
    (["--policy", "tabular", "--max-len", "none"], "--max-len", "'none'"),
    (["--set", "beta=abc"], "--set", "number"),
    (["--set", "policy.nope=1"], "policy.nope", "the keys of [policy]"),
    (["--steps", "0"], "--steps", "positive whole number"),
    (["--policy", "softmax", "--max-len", "4", "--dataset", "population"], "--max-len", "its keys are"),
    (["--policy", "tabular", "--vocab", "59", "--max-len", "9"], "budget", "policy.vocab = 59 content tokens"),
])
def test_bad_flags_are_refused_naming_the_flag_and_what_is_allowed(capsys, argv, flag, allowed):
    try:
        code, out, err = run(capsys, "simulate", "dpo", *argv)
    except SystemExit as exc:  # argparse's own refusals (usage errors)
        (out, err), code = capsys.readouterr(), exc.code
    assert code == 2 and out == "", err
    assert flag in err and allowed in err, err


def test_human_output_is_the_runner_summary_without_negative_zero(capsys):
    code, out, err = run(capsys, "simulate", "dpo", *SHORT)
    assert code == 0, err
    assert "dpo on unigram (3 content tokens + EOS, unbounded) / equal_length: adam lr=0.05, 3 steps" in out
    assert "-0.0000" not in out  # a zero margin at the start prints as 0.0000
    assert "margin" in out and "length drift factor" in out
    doc = run_json(capsys, "simulate", "dpo", *SHORT)
    el = _series(doc, "expected_length")
    assert f"median [min, max] over seeds) {named.spread_text(el[-1] / el[0])}" in out


def test_number_format_never_prints_negative_zero():
    assert frontend._number(-1e-9).strip() == "0.0000" and frontend._number(-0.00006).strip() == "-0.0001"


def test_set_values_are_read_as_toml_never_evaluated():
    sets = frontend.parse_sets(["beta=0.5,train.metrics=[\"loss\", \"params\"]", "train.optimizer=sgd"])
    assert sets == {"beta": 0.5, "train.metrics": ["loss", "params"], "train.optimizer": "sgd"}
    with pytest.raises(experiments.config.GradlabError, match="not a number, a word"):
        frontend.parse_sets(["data.kind=__import__('os')"])


def test_python_api_simulate_is_run_of_the_table():
    a = experiments.simulate("dpo", steps=2, seeds=1)
    b = experiments.run(frontend.table("dpo", steps=2, seeds=1))
    assert json.dumps(a.as_dict()) == json.dumps(b.as_dict())


def test_experiment_sizes_are_checked_against_the_budgets_before_anything_runs():
    from gradlab.budgets import BudgetError

    with pytest.raises(BudgetError, match="sweep setting .* 'steps' budget"):
        load({"sweep": {"train.steps": [2, 10**9]}})
    with pytest.raises(BudgetError, match="'pairs' budget"):
        load({"data": {"n_pairs": 10**9}})


def test_the_help_lists_the_registered_families(capsys):
    """The help is made from the registry when it is printed (building the parser loads no JAX),
    so a registered family appears in it."""
    from dataclasses import dataclass

    from gradlab import policies

    @dataclass(frozen=True)
    class Listed(policies.Unigram):
        name = "listed_in_help"

    try:
        policies.register(Listed)
        texts = {}
        for command in ("simulate", "check"):
            with pytest.raises(SystemExit):
                main([command, "--help"])
            texts[command] = " ".join(capsys.readouterr().out.split())
            assert all(name in texts[command] for name in policies.FAMILIES), texts[command]
            assert "listed_in_help" in texts[command]
        assert "softmax" in texts["simulate"] and "softmax" not in texts["check"]  # check runs EOS families
    finally:
        policies.unregister("listed_in_help")


# --------------------------------------------------------------------------------------------
# Divergence: growth past the bound is refused, not only NaN
# --------------------------------------------------------------------------------------------


def _readme_simulate_lines() -> list[tuple[list[str], bool]]:
    """Every ``gradlab simulate`` example of the README, and whether it is marked to diverge."""
    import shlex
    from pathlib import Path

    out = []
    for line in (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines():
        if line.startswith("gradlab simulate "):
            command, _, comment = line.partition("#")
            out.append((shlex.split(command)[1:], "diverges" in comment))
    return out


@pytest.mark.long(seconds=15)
def test_readme_simulate_examples_converge_and_the_diverging_one_exits_2(capsys):
    examples = _readme_simulate_lines()
    assert len(examples) >= 3 and sum(d for _, d in examples) == 1
    for argv, diverges in examples:
        code, out, err = run(capsys, *argv, "--seeds", "2")  # the last --seeds wins: two seeds of each
        if diverges:
            assert code == 2 and out == "", (argv, out)
            assert "diverged" in err and "at step" in err and "objective J" in err, err
        else:
            assert code == 0, (argv, err)
            doc = run_json(capsys, *argv, "--seeds", "2") if "--json" not in argv else json.loads(out)
            assert "loss" not in doc["metrics"] or np.isfinite(_series(doc, "loss")).all()


def test_divergence_names_the_step_and_the_quantity():
    from gradlab.experiments.runner import GROWTH, divergence

    steps = [0, 10, 20, 30]
    calm = np.array([[0.69, 2.0], [0.5, 3.0], [0.4, 40.0], [0.3, 60.0]])
    assert divergence(steps, calm) is None  # logits grow by tens: not a divergence
    loss = calm.copy()
    loss[2, 0] = GROWTH * 1.01  # the bound is GROWTH * max(1, |0.69|)
    assert "objective J" in divergence(steps, loss) and "step 20" in divergence(steps, loss)
    size = calm.copy()
    size[3, 1] = 2.0 * GROWTH * 1.01
    assert "parameter" in divergence(steps, size) and "step 30" in divergence(steps, size)
    nan = calm.copy()
    nan[1, 0] = np.nan
    assert "not finite at step 10" in divergence(steps, nan)


def test_a_diverged_run_is_returned_marked_when_allowed():
    table = frontend.table("ipo", policy="bigram", vocab=3, max_len=6, optimizer="sgd", lr=1.0, steps=40, seeds=1,
                           batch_size=16, sets={"beta": 0.5, "train.record_every": 10})
    with pytest.raises(experiments.runner.Diverged, match="diverged"):
        experiments.run(table)
    result = experiments.run(table, allow_divergence=True)
    assert result.runs[0].diverged and "step" in result.runs[0].diverged


def test_large_numbers_print_in_five_significant_figures():
    assert frontend._number(1.4e198).strip() == "1.4000e+198"
    assert frontend._number(12345.678).strip() == "1.2346e+04"
