"""Experiments: every example file runs; closed-form optima reached by gradient descent; the
optimiser, minibatches, records, sweeps and references behave as specified; every refusal."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import experiments
from gradlab.cli import main
from gradlab.errors import GradlabError
from gradlab.experiments import _engine, runner
from gradlab.experiments.config import ConfigError
from gradlab.experiments.validate import load
from gradlab.policies import FAMILIES, HiddenState, LinearHead, SingleHiddenState, Softmax, make_hidden_state

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.toml"))
SHORT = {"steps": 6, "record_every": 4}


def _raw(name: str) -> dict:
    with open(next(p for p in EXAMPLES if p.stem == name), "rb") as fh:
        return tomllib.load(fh)


def _short(raw: dict, **train) -> dict:
    raw = copy.deepcopy(raw)
    raw.setdefault("train", {}).update({**SHORT, **train})
    return raw


# --------------------------------------------------------------------------------------------
# Every example file
# --------------------------------------------------------------------------------------------


def test_the_five_required_examples_exist():
    names = {p.stem for p in EXAMPLES}
    assert {"softmax_gradient_descent", "three_actions_two_losses", "hidden_state_given_w",
            "soft_labels_from_reward", "minibatch_sgd_vs_adam"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_runs_shortened(path):
    exp = load(path)
    result = experiments.run(path, overrides={"train": SHORT})
    n_settings = len(experiments.settings(exp))
    assert len(result.runs) == n_settings * len(exp.train.seeds)
    out = json.loads(json.dumps(result.as_dict()))  # JSON-clean (no NaN, no numpy types)
    assert out["config"]["train"]["steps"] == SHORT["steps"]
    for run in out["runs"]:
        assert set(run) == {"setting", "seed", "steps", "metrics"}
        assert run["steps"] == [0, 4, 6]  # the last step is always recorded
        for series in run["metrics"].values():
            assert len(series) == 3
    assert "->" in experiments.summary(result)


def test_gradlab_run_prints_a_summary_and_json(capsys, tmp_path):
    path = tmp_path / "x.toml"
    path.write_text((EXAMPLES[0].parent / "three_actions_two_losses.toml").read_text()
                    .replace("steps = 400", "steps = 5"))
    assert main(["run", str(path)]) == 0
    text = capsys.readouterr().out
    assert "loss.name=dpo" in text and "loss.name=ipo" in text and "->" in text
    assert main(["run", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["loss"]["beta"] == 0.5
    assert [r["setting"] for r in out["runs"]] == [{"loss.name": "dpo"}, {"loss.name": "ipo"}]
    assert out["runs"][0]["steps"] == [0, 5]


def test_gradlab_run_refuses_with_status_2(capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[policy]\nfamily = "softmax"\nvocab = 3\ncolour = "red"\n')
    assert main(["run", str(path)]) == 2
    assert "policy.colour" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# What the examples show, at full length
# --------------------------------------------------------------------------------------------


def test_gradient_descent_reaches_the_closed_form_optimum():
    raw = _raw("softmax_gradient_descent")
    result = experiments.run(raw)
    beta, r = raw["loss"]["beta"], np.asarray(raw["data"]["reward"])
    ref = jax.nn.softmax(jnp.asarray(raw["policy"]["init"]["logits"]))
    target = np.asarray(ref) * np.exp(r / beta)  # pi* ~ pi_0 exp(r / beta), docs/background.md
    target /= target.sum()
    final = result.runs[0].metrics["probabilities"][-1]
    np.testing.assert_allclose(final, target, rtol=0, atol=1e-14)  # measured: 7e-17
    assert result.runs[0].steps[-1] == raw["train"]["steps"]


def test_ipo_regresses_the_margins_onto_one_over_two_beta():
    raw = _raw("three_actions_two_losses")
    result = experiments.run(raw)
    beta = raw["loss"]["beta"]
    # h = A theta for the pairs' incidence matrix A; IPO is least squares of h onto 1/(2 beta)
    A = np.zeros((3, 3))
    for i, (w, l) in enumerate(zip(raw["data"]["chosen"], raw["data"]["rejected"], strict=True)):
        A[i, w], A[i, l] = 1.0, -1.0
    target = A @ np.linalg.lstsq(A, np.full(3, 1 / (2 * beta)), rcond=None)[0]
    ipo = next(r for r in result.runs if r.setting == {"loss.name": "ipo"})
    np.testing.assert_allclose(ipo.metrics["margin"][-1], target, rtol=1e-8)
    dpo = next(r for r in result.runs if r.setting == {"loss.name": "dpo"})
    assert np.all(dpo.metrics["margin"][-1] > 2 * target)  # DPO's margins keep growing


def test_hidden_state_keeps_w_fixed_and_shows_displacement():
    raw = _raw("hidden_state_given_w")
    run = experiments.run(raw).runs[0]
    W = np.asarray(raw["policy"]["W"])
    h = run.metrics["params.h"]  # (records, 1, dim)
    assert not np.allclose(h[0], h[-1])  # h is trained
    for k in range(len(run.steps)):  # logits = W h with the given W at every record
        np.testing.assert_allclose(run.metrics["probabilities"][k], jax.nn.softmax(W @ h[k, 0]), rtol=1e-12)
    assert run.metrics["lp_w"][-1, 0] < run.metrics["lp_w"][0, 0]  # the chosen falls too
    assert run.metrics["lp_l"][-1, 0] < run.metrics["lp_l"][0, 0]
    assert run.metrics["mass_outside_data"][-1] > 0.9


def test_soft_labels_drive_the_implicit_reward_to_the_reward_difference():
    raw = _raw("soft_labels_from_reward")
    result = experiments.run(raw)
    r, beta = np.asarray(raw["data"]["reward"]), raw["loss"]["beta"]
    diff = r[raw["data"]["chosen"]] - r[raw["data"]["rejected"]]
    for run in result.runs:
        np.testing.assert_allclose(beta * run.metrics["margin"][-1], diff, rtol=1e-8)


def test_soft_labels_with_a_large_reward_gap_approach_hard_labels():
    base = {"policy": {"family": "softmax", "vocab": 3}, "train": {"steps": 5, "seeds": 1},
            "data": {"kind": "pairs", "chosen": [0, 1], "rejected": [2, 2]}}
    hard = experiments.run(base).runs[0].metrics["loss"]
    soft_raw = copy.deepcopy(base)
    soft_raw["data"].update(labels="soft", reward=[40.0, 40.0, 0.0])
    soft = experiments.run(soft_raw).runs[0].metrics["loss"]
    np.testing.assert_allclose(soft, hard, rtol=1e-12)
    soft_raw["data"]["reward"] = [1.0, 0.5, 0.0]
    assert not np.allclose(experiments.run(soft_raw).runs[0].metrics["loss"][1:], hard[1:])


def test_minibatches_are_seeded_and_the_sweep_reports_each_optimizer():
    raw = _short(_raw("minibatch_sgd_vs_adam"), seeds=2, metrics=["loss"])
    a, b = experiments.run(raw), experiments.run(raw)
    for ra, rb in zip(a.runs, b.runs, strict=True):
        for k in ra.metrics:
            np.testing.assert_array_equal(ra.metrics[k], rb.metrics[k])
    assert [r.setting for r in a.runs] == [{"train.optimizer": o} for o in ("sgd", "sgd", "adam", "adam")]
    full = copy.deepcopy(raw)
    full.pop("sweep")
    full["train"].update(optimizer="sgd", batch_size="full")
    f = experiments.run(full)
    assert not np.allclose(a.runs[0].metrics["loss"][1:], f.runs[0].metrics["loss"][1:])
    # a batch of every pair is the full gradient (a permutation of the same sum)
    every = copy.deepcopy(full)
    every["train"]["batch_size"] = raw["data"]["n_pairs"]
    e = experiments.run(every)
    np.testing.assert_allclose(e.runs[0].metrics["loss"], f.runs[0].metrics["loss"], rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Optimiser, records, sweeps, references
# --------------------------------------------------------------------------------------------


def _pair_softmax(**train) -> dict:
    return {"policy": {"family": "softmax", "vocab": 4, "init": {"logits": [0.3, -0.2, 0.1, 0.0]}},
            "data": {"kind": "pairs", "chosen": [1], "rejected": [3]},
            "loss": {"name": "dpo", "beta": 0.7},
            "train": {"optimizer": "sgd", "lr": 0.3, "steps": 1, "seeds": 1, "metrics": ["params"], **train}}


def test_sgd_is_plain_gradient_descent():
    from gradlab import checks

    run = experiments.run(_pair_softmax()).runs[0]
    theta = jnp.asarray([0.3, -0.2, 0.1, 0.0])
    expected = checks.dpo_step_single_context(theta, 1, 3, beta=0.7, lr=0.3)  # closed-form step
    np.testing.assert_allclose(run.metrics["params.logits"][-1], expected, rtol=1e-12)


def test_optimizer_arguments_reach_optax():
    plain = experiments.run(_pair_softmax(optimizer="adam", steps=3)).runs[0].metrics["params.logits"]
    tuned = experiments.run(_pair_softmax(optimizer={"name": "adam", "b1": 0.5}, steps=3)).runs[0]
    assert not np.allclose(plain[-1], tuned.metrics["params.logits"][-1])
    momentum = experiments.run(_pair_softmax(optimizer={"name": "sgd", "momentum": 0.9}, steps=3)).runs[0]
    sgd = experiments.run(_pair_softmax(steps=3)).runs[0]
    np.testing.assert_allclose(momentum.metrics["params.logits"][1], sgd.metrics["params.logits"][1], rtol=1e-12)
    assert not np.allclose(momentum.metrics["params.logits"][-1], sgd.metrics["params.logits"][-1])


def test_records_every_r_steps_and_always_the_last_state():
    long = experiments.run(_pair_softmax(steps=10, record_every=4)).runs[0]
    assert long.steps == [0, 4, 8, 10]
    for k, step in enumerate(long.steps):
        one = experiments.run(_pair_softmax(steps=step or 1, record_every=step or 1)).runs[0]
        np.testing.assert_allclose(long.metrics["params.logits"][k],
                                   one.metrics["params.logits"][-1 if step else 0], rtol=1e-12)


def test_a_sweep_of_values_is_one_program_and_equals_single_runs():
    raw = _short(_raw("beta_sweep_one_program"), seeds=2, metrics=["loss", "lp_w", "expected_length"])
    exp = load(raw)
    assert runner.program_count(exp) == 1
    result = experiments.run(exp)
    assert len(result.runs) == 6 * 2
    single = copy.deepcopy(raw)
    single.pop("sweep")
    single["loss"]["beta"], single["train"]["lr"] = 0.5, 0.01
    alone = experiments.run(single).runs[1]
    swept = next(r for r in result.runs if r.setting == {"loss.beta": 0.5, "train.lr": 0.01} and r.seed == 1)
    for k in alone.metrics:
        np.testing.assert_allclose(swept.metrics[k], alone.metrics[k], rtol=1e-12, atol=1e-15)


def test_losses_share_one_program_and_optimizers_do_not():
    """A sweep over losses is one program per optimiser, the loss chosen by its index (issue 17);
    each swept run equals the same run alone, in a program of its own loss."""
    raw = _short(_raw("length_drift_optimizers"), seeds=2, metrics=["loss", "lp_w", "expected_length"])
    exp = load(raw)
    assert runner.program_count(exp) == 2
    result = experiments.run(exp)
    for name in ("dpo", "sigmoid_norm"):
        single = copy.deepcopy(raw)
        single.pop("sweep")
        single["loss"]["name"], single["train"]["optimizer"] = name, "adam"
        alone = experiments.run(single).runs[1]
        setting = {"loss.name": name, "train.optimizer": "adam"}
        swept = next(r for r in result.runs if r.setting == setting and r.seed == 1)
        assert not np.allclose(swept.metrics["loss"][0], swept.metrics["loss"][-1])
        for k in alone.metrics:
            np.testing.assert_allclose(swept.metrics[k], alone.metrics[k], rtol=1e-12, atol=1e-15, err_msg=k)


def test_reference_choices_and_temperature():
    base = {"policy": {"family": "softmax", "vocab": 3}, "data": {"kind": "pairs", "chosen": [0], "rejected": [2]},
            "train": {"steps": 1, "seeds": 1, "metrics": ["margin", "lp_w", "lp_l"]}}
    same = copy.deepcopy(base)
    same["policy"]["init"], same["reference"] = "reference", {"params": "seed"}
    assert experiments.run(same).runs[0].metrics["margin"][0, 0] == 0.0
    apart = copy.deepcopy(base)
    apart["reference"] = {"params": "seed"}
    assert abs(experiments.run(apart).runs[0].metrics["margin"][0, 0]) > 1e-3
    tau = 2.0
    hot = copy.deepcopy(base)
    hot["reference"] = {"temperature": tau}
    m = experiments.run(hot).runs[0].metrics
    # ref = lp / tau - log Z, so h = (1 - 1/tau)(lp_w - lp_l) at the start
    np.testing.assert_allclose(m["margin"][0], (1 - 1 / tau) * (m["lp_w"][0] - m["lp_l"][0]), rtol=1e-12)


def test_metrics_by_name_match_the_family_methods():
    raw = {"policy": {"family": "bigram", "vocab": 2, "max_len": 4},
           "data": {"kind": "pairs", "chosen": [[1], [1, 1]], "rejected": [[2], []]},
           "train": {"steps": 3, "seeds": 1, "metrics": ["expected_length", "token_entropy", "params",
                                                         "mass_outside_data", "lp_w"]}}
    run = experiments.run(raw).runs[0]
    fam = runner.build_family(load(raw).policy)
    for k in range(len(run.steps)):
        params = {"W": jnp.asarray(run.metrics["params.W"][k])}
        assert run.metrics["expected_length"][k] == pytest.approx(float(fam.expected_length(params)), rel=1e-12)
        assert run.metrics["token_entropy"][k] == pytest.approx(float(fam.token_entropy(params)), rel=1e-12)
        seqs = jnp.asarray([[1, 0, 0, 0], [1, 1, 0, 0]])
        np.testing.assert_allclose(run.metrics["lp_w"][k], fam.logprob(params, seqs, jnp.asarray([2, 3])), rtol=1e-12)
        e = fam.enumerate(params)
        inside = sum(float(jnp.exp(e.logp[i])) for i, (s, n) in enumerate(zip(e.seqs, e.lengths, strict=True))
                     if tuple(np.asarray(s[: n - 1])) in {(1,), (1, 1), (2,), ()})
        assert run.metrics["mass_outside_data"][k] == pytest.approx(1 - inside, rel=1e-12)


@pytest.mark.parametrize("kind", ["equal_length", "chosen_longer", "rejected_longer", "shared_prefix",
                                  "similar_embeddings", "on_policy", "reference_pairs", "population"])
def test_every_preset_runs(kind):
    raw = {"policy": {"family": "linear_head" if kind == "similar_embeddings" else "unigram", "vocab": 3,
                      "max_len": 3},
           "data": {"kind": kind.replace("_", "-")}, "train": {"steps": 2, "seeds": 2}}
    if kind in ("equal_length", "shared_prefix", "similar_embeddings"):
        raw["data"]["n_pairs"] = 5
    result = experiments.run(raw)
    assert all(np.all(np.isfinite(v)) for r in result.runs for v in r.metrics.values())


def test_preset_parameters_shape_the_data():
    from gradlab.experiments import datasets

    raw = {"policy": {"family": "unigram", "vocab": 2, "max_len": 8},
           "data": {"kind": "chosen_longer", "n_pairs": 400, "seed": 3,
                    "chosen_length": {"dist": "poisson", "mean": 4},
                    "rejected_length": {"dist": "uniform", "low": 0, "high": 2},
                    "chosen_token_probs": [0.0, 1.0], "rejected_token_probs": [1.0, 0.0]}}
    exp = load(raw)
    fam = runner.build_family(exp.policy)
    d = datasets.build(exp.data, fam, 0, None, None)
    k_w, k_l = d.lengths[d.w] - 1, d.lengths[d.l] - 1
    # poisson(4) conditioned on fitting 7 content tokens (redrawn, never clipped)
    from math import factorial

    pmf = np.array([4.0**k / factorial(k) for k in range(8)])
    pmf /= pmf.sum()
    mean, sd = (pmf * np.arange(8)).sum(), np.sqrt((pmf * np.arange(8) ** 2).sum() - (pmf * np.arange(8)).sum() ** 2)
    assert k_w.max() <= 7 and abs(k_w.mean() - mean) < 4 * sd / np.sqrt(len(k_w))
    assert set(k_l) == {0, 1, 2}
    mask_w = np.arange(8) < k_w[:, None]
    assert np.all(d.items[d.w][mask_w] == 2) and np.all(d.items[d.l][np.arange(8) < k_l[:, None]] == 1)
    same = datasets.build(exp.data, fam, 1, None, None)  # data.seed fixes the data across run seeds
    np.testing.assert_array_equal(same.items, d.items)


@pytest.mark.parametrize("seed", range(40))
def test_a_presets_tokens_are_the_draws_of_one_choice_per_row(seed):
    """The rows of content tokens, drawn in one call, are the numbers numpy's ``choice`` gives
    row by row from the same stream (the presets' data, and so every record, as before), and
    the stream is left where those calls leave it."""
    from gradlab.experiments import datasets

    g = np.random.default_rng(10**6 + seed)
    vocab = int(g.integers(1, 8))
    p = g.random(vocab) * (g.random(vocab) > 0.3)
    p[int(g.integers(vocab))] += 0.5  # never all zero
    lengths = g.integers(0, 9, size=int(g.integers(1, 70)))
    by_row, at_once = np.random.default_rng(seed), np.random.default_rng(seed)
    expected = [tuple(by_row.choice(np.arange(1, vocab + 1), size=k, p=p / p.sum())) for k in lengths]
    assert datasets._tokens(at_once, p, lengths) == expected
    assert at_once.random() == by_row.random()


# --------------------------------------------------------------------------------------------
# The new families
# --------------------------------------------------------------------------------------------


def test_hidden_state_over_previous_tokens_is_a_linear_head_with_trained_features():
    head = LinearHead(vocab=4, max_len=4, dim=2, train_features=True)
    p = head.init(jax.random.PRNGKey(0))
    hs = HiddenState(vocab=4, max_len=4, dim=2, W=tuple(map(tuple, np.asarray(p["W"]).tolist())))
    e = head.enumerate(p)
    np.testing.assert_allclose(hs.enumerate({"h": p["features"]}).logp, e.logp, rtol=1e-12)
    assert "hidden_state" in FAMILIES


def test_hidden_state_over_prefixes_tells_prefixes_apart():
    fam = make_hidden_state("prefix", vocab=3, max_len=3, dim=2)
    params = fam.init(jax.random.PRNGKey(1))
    seqs = jnp.asarray([[1, 1, 0], [2, 1, 0]])  # same previous token, different prefixes
    lps = fam.token_logprobs(params, seqs)
    assert not np.allclose(lps[0, 2], lps[1, 2])
    # forced stop: finished and stopped responses together carry all the mass
    assert float(jnp.exp(fam.enumerate(params).logp).sum()) == pytest.approx(1.0, abs=1e-12)


def test_single_context_families_normalise():
    for fam in (Softmax(k=4), SingleHiddenState(k=4, dim=2)):
        params = fam.init(jax.random.PRNGKey(2))
        assert float(fam.probabilities(params).sum()) == pytest.approx(1.0, abs=1e-14)
        p = fam.probabilities(params)
        assert float(fam.sequence_entropy(params)) == pytest.approx(float(-(p * jnp.log(p)).sum()), rel=1e-12)
    assert isinstance(make_hidden_state("single", k=3), SingleHiddenState)


# --------------------------------------------------------------------------------------------
# Refusals: every one before anything runs, naming the key and what is allowed
# --------------------------------------------------------------------------------------------

GOOD = {"policy": {"family": "softmax", "vocab": 3},
        "data": {"kind": "pairs", "chosen": [0, 1], "rejected": [1, 2]},
        "loss": {"name": "dpo", "beta": 0.1},
        "train": {"optimizer": "sgd", "lr": 0.1, "steps": 3, "seeds": 1}}
SEQ = {"policy": {"family": "unigram", "vocab": 3, "max_len": 4},
       "data": {"kind": "pairs", "chosen": [[1, 2]], "rejected": [[3]]},
       "train": {"steps": 3, "seeds": 1}}


def _with(base: dict, section: str, **changes) -> dict:
    raw = copy.deepcopy(base)
    raw.setdefault(section, {}).update(changes)
    return raw


REFUSALS = [
    ("unknown section", {**GOOD, "model": {}}, "experiment.model"),
    ("unknown policy key", _with(GOOD, "policy", colour="red"), "policy.colour"),
    ("unknown train key", _with(GOOD, "train", epochs=3), "train.epochs"),
    ("wrong type", _with(GOOD, "policy", vocab="three"), "policy.vocab"),
    ("unknown family", _with(GOOD, "policy", family="transformer"), "'softmax'"),
    ("unbounded unavailable", _with(SEQ, "policy", family="tabular", max_len="none"), "policy.max_len"),
    ("init shape", _with(GOOD, "policy", init={"logits": [0.0, 0.0]}), "policy.init.logits"),
    ("init name", _with(GOOD, "policy", init={"theta": [0.0, 0.0, 0.0]}), "parameters are: logits [3]"),
    ("W shape", _with(GOOD, "policy", family="hidden_state", context="single", W=[[1.0, 0.0]]), "policy.W"),
    ("key not for family", _with(SEQ, "policy", context="prefix"), "policy.context"),
    ("max_len on softmax", _with(GOOD, "policy", max_len=3), "policy.max_len"),
    ("circular init", _with(GOOD, "policy", init="reference"), "reference.params"),
    ("token out of range", _with(SEQ, "data", chosen=[[1, 4]]), "data.chosen[0]"),
    ("response too long", _with(SEQ, "data", chosen=[[1, 2, 3, 1]]), "at most 3"),
    ("action as a list", _with(GOOD, "data", chosen=[[0], 1]), "data.chosen[0]"),
    ("action out of range", _with(GOOD, "data", rejected=[1, 3]), "0..2"),
    ("pair counts", _with(GOOD, "data", rejected=[1]), "one to one"),
    ("weights count", _with(GOOD, "data", weights=[1.0]), "data.weights"),
    ("reward length", _with(GOOD, "data", reward=[1.0, 0.0]), "data.reward"),
    ("soft labels need a reward", _with(GOOD, "data", labels="soft"), "data.reward"),
    ("population is already soft", SEQ | {"data": {"kind": "population", "labels": "soft"}}, "data.labels"),
    ("key not for data kind", _with(GOOD, "data", n_pairs=4), "data.n_pairs"),
    ("token probs length", SEQ | {"data": {"kind": "equal_length", "chosen_token_probs": [1.0]}},
     "data.chosen_token_probs"),
    ("length past the cut-off", SEQ | {"data": {"kind": "equal_length", "chosen_length": {"high": 9}}},
     "data.chosen_length.high"),
    ("empty shared prefix", SEQ | {"data": {"kind": "shared_prefix", "chosen_length": {"high": 2}}},
     "data.chosen_length.low"),
    ("poisson without a mean", SEQ | {"data": {"kind": "equal_length", "chosen_length": {"dist": "poisson"}}},
     "data.chosen_length"),
    ("loss needs length", _with(GOOD, "loss", name="simpo"), "len_w"),
    ("unknown loss", _with(GOOD, "loss", name="dpoo"), "loss.name"),
    ("unknown hyperparameter", _with(GOOD, "loss", gamma=0.3), "gamma"),
    ("hyperparameter domain", _with(GOOD, "loss", beta=-1.0), "beta"),
    ("name and expr", _with(GOOD, "loss", expr="lp_w"), "not both"),
    ("expr outside the grammar", {**GOOD, "loss": {"expr": "__import__('os')"}}, "loss.expr"),
    ("expr without a value", {**GOOD, "loss": {"expr": "softplus(-beta*(lp_w - lp_l))"}}, "beta"),
    ("unknown optimizer", _with(GOOD, "train", optimizer="adamm"), "train.optimizer"),
    ("unknown optimizer argument", _with(GOOD, "train", optimizer={"name": "adam", "beta1": 0.9}), "b1"),
    ("batch larger than data", _with(GOOD, "train", batch_size=5), "train.batch_size"),
    ("batch on on-policy data", _with(SEQ, "train", batch_size=2) | {"data": {"kind": "on_policy"}},
     "train.batch_size"),
    ("unknown metric", _with(GOOD, "train", metrics=["expected_length"]), "train.metrics"),
    ("record_every zero", _with(GOOD, "train", record_every=0), "train.record_every"),
    ("negative lr", _with(GOOD, "train", lr=-0.1), "train.lr"),
    ("duplicate seeds", _with(GOOD, "train", seeds=[1, 1]), "train.seeds"),
    ("bad sweep key", {**GOOD, "sweep": {"beta": [0.1]}}, "sweep key 'beta'"),
    ("bad sweep value", {**GOOD, "sweep": {"loss.beta": [0.1, -2.0]}}, "sweep setting {'loss.beta': -2.0}"),
    ("sweep not a list", {**GOOD, "sweep": {"loss.beta": 0.1}}, "sweep.loss.beta"),
]


@pytest.mark.parametrize("raw, fragment", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_key(raw, fragment, monkeypatch):
    monkeypatch.setattr(_engine, "program", lambda static: pytest.fail("ran before refusing"))
    with pytest.raises(GradlabError) as info:
        experiments.run(raw)
    assert fragment in str(info.value)


def test_the_good_base_configurations_run():
    for raw in (GOOD, SEQ):
        assert experiments.run(raw).runs


def test_toml_errors_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy\nfamily = 1")
    with pytest.raises(GradlabError, match="not valid TOML"):
        load(bad)
    with pytest.raises(GradlabError, match="no experiment file"):
        load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError):
        load({"policy": "softmax"})


def test_unquoted_dotted_sweep_keys_and_hyphenated_presets():
    raw = copy.deepcopy(SEQ)
    raw["data"] = {"kind": "equal-length", "n_pairs": 4}
    raw["sweep"] = {"loss": {"beta": [0.1, 0.2]}}  # what TOML makes of  loss.beta = [...]
    exp = load(raw)
    assert exp.data.kind == "equal_length"
    assert [s for s, _ in experiments.settings(exp)] == [{"loss.beta": 0.1}, {"loss.beta": 0.2}]


def test_runs_are_sharded_across_forced_host_devices():
    import os
    import subprocess
    import sys
    import textwrap

    raw = _with(GOOD, "train", seeds=2, steps=4)
    script = textwrap.dedent(
        f"""
        import json, jax, jax.numpy as jnp
        from gradlab import experiments
        from gradlab.experiments import _engine
        with jax.enable_x64(True):
            spread = len(_engine.shard({{"a": jnp.zeros((2, 3))}})["a"].sharding.device_set)
        result = experiments.run({raw!r})
        print(json.dumps([jax.device_count(), spread, [r.metrics["lp_w"].tolist() for r in result.runs]]))
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    count, spread, lp_w = json.loads(out.stdout)
    assert count == 2 and spread == 2
    single = experiments.run(raw)
    np.testing.assert_allclose(np.asarray(lp_w), [r.metrics["lp_w"] for r in single.runs], rtol=1e-12)


def test_flags_map_onto_the_schema():
    from gradlab.experiments.config import from_flags

    raw = from_flags("ipo", policy="bigram", vocab=2, max_len="5", optimizer="sgd", lr=0.1, steps=3, seeds=2,
                     batch_size="4", dataset="chosen-longer", values={"beta": 0.3})
    exp = load(raw)
    assert (exp.policy.family, exp.policy.vocab, exp.policy.max_len) == ("bigram", 2, 5)
    assert (exp.train.optimizer, exp.train.lr, exp.train.steps, exp.train.seeds, exp.train.batch_size) == \
        ("sgd", 0.1, 3, (0, 1), 4)
    assert exp.data.kind == "chosen_longer" and exp.loss.values == {"beta": 0.3}
    assert load(from_flags(batch_size="full")).train.batch_size is None


def test_the_resolved_config_has_every_applicable_key_after_defaults():
    cfg = experiments.resolved(load(_raw("hidden_state_given_w")))
    assert cfg["policy"]["dim"] == 2  # the width of the given W
    assert "max_len" not in cfg["policy"] and "n_pairs" not in cfg["data"]  # do not apply here
    assert cfg["loss"] == {"name": "dpo", "expr": None, "resolved": "dpo", "beta": 1.0}
    seq = experiments.resolved(load(SEQ))
    assert seq["data"]["reward"] == [1.0, -1.0, 0.0]  # the default oracle, written out
    assert seq["train"]["batch_size"] == "full" and seq["train"]["seeds"] == [0]
    assert "expected_length" in seq["train"]["metrics"]


def test_a_weighted_combination_is_a_loss_name():
    base = _with(GOOD, "train", steps=1, metrics=["loss"])
    losses = {}
    for name in ("sigmoid", "ipo", "sigmoid:0.25,ipo:0.75"):
        losses[name] = experiments.run(_with(base, "loss", name=name)).runs[0].metrics["loss"][0]
    assert losses["sigmoid:0.25,ipo:0.75"] == pytest.approx(0.25 * losses["sigmoid"] + 0.75 * losses["ipo"], rel=1e-12)


def test_a_sweeps_points_are_parsed_once_per_content_and_budget(monkeypatch):
    """``settings`` keeps the parsed points by the source's content and the size budgets: a
    repeat parses nothing, and a lowered budget is applied to a sweep seen before."""
    from gradlab import budgets
    from gradlab.experiments import config

    raw = {"policy": {"family": "softmax", "vocab": 3}, "data": {"kind": "pairs", "chosen": [0], "rejected": [2]},
           "train": {"steps": 5, "seeds": 1}, "sweep": {"loss.beta": [0.1, 0.2]}}
    exp = experiments.load(raw)
    parsed = []
    real = config.parse
    monkeypatch.setattr(config, "parse", lambda r: parsed.append(1) or real(r))
    first = experiments.settings(exp)
    assert not parsed  # load() has already expanded this content
    first[0][0]["loss.beta"] = 99.0  # a caller's edit does not reach the kept points
    again = experiments.settings(experiments.load(copy.deepcopy(raw)))
    assert [s for s, _ in again] == [{"loss.beta": 0.1}, {"loss.beta": 0.2}]
    assert len(parsed) == 1  # load's parse of the base table only
    with budgets.raised(steps=4), pytest.raises(GradlabError, match="steps"):
        experiments.load(copy.deepcopy(raw))  # checked again: the budgets are part of the key


# --------------------------------------------------------------------------------------------
# Bad values that must be refused as bad input (exit 2), naming the key and its legal range
# --------------------------------------------------------------------------------------------

RANGE_REFUSALS = [
    ("poisson mean 1e300", 'kind = "equal_length"\nchosen_length = {dist = "poisson", mean = 1e300}', "data",
     "data.chosen_length.mean", "at most 1e+06"),
    ("seed 2**70", f"seeds = [{2**70}]", "train", "train.seeds", "0..4294967295"),
    ("data seed 2**70", f"seed = {2**70}", "data", "data.seed", "0..4294967295"),
    ("unknown dtype", 'optimizer = {name = "adam", mu_dtype = "float99"}', "train", "train.optimizer.mu_dtype",
     "'float32'"),
]


@pytest.mark.parametrize("line, section, key, allowed", [r[1:] for r in RANGE_REFUSALS],
                         ids=[r[0] for r in RANGE_REFUSALS])
def test_out_of_range_values_exit_2_naming_the_key_and_its_range(line, section, key, allowed, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    tables = {"data": "", "train": "steps = 2\nseeds = 1\n"}
    tables[section] = line + "\n" + ("steps = 2\n" if section == "train" and "steps" not in line else "")
    path.write_text("".join(f"[{name}]\n{body}\n" for name, body in tables.items() if body))
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert key in err and allowed in err and "internal error" not in err


def test_the_legal_edges_of_those_ranges_still_run():
    base = {"policy": {"family": "unigram", "vocab": 2, "max_len": 4}, "train": {"steps": 1}}
    result = experiments.run(base | {"data": {"kind": "equal_length", "n_pairs": 3, "seed": 2**32 - 1,
                                              "chosen_length": {"dist": "poisson", "mean": 1.0}},
                                     "train": {"steps": 1, "seeds": [2**32 - 1],
                                               "optimizer": {"name": "adam", "mu_dtype": "float64"}}})
    assert result.runs[0].seed == 2**32 - 1


# --------------------------------------------------------------------------------------------
# A family owns its facts: one class, registered, runs end to end
# --------------------------------------------------------------------------------------------


def _positional_families():
    """Two test-local families: the next-token logits depend on the position only (one free row
    per position), with the optional fast path and without it."""
    from dataclasses import dataclass

    from gradlab.policies import Family

    @dataclass(frozen=True)
    class Positional(Family):
        """Position-only logits: one free row of logits per position (a test's family)."""

        name = "positional"

        def init(self, key, scale=1.0):
            return {"P": scale * jax.random.normal(key, (self.max_len, self.vocab))}

        def logits(self, params, seqs):
            return jnp.broadcast_to(params["P"][: seqs.shape[-1]], seqs.shape + (self.vocab,))

        def table_logits(self, params):
            return params["P"]

        def table_rows(self, seqs):
            return jnp.broadcast_to(jnp.arange(seqs.shape[-1]), seqs.shape)

    @dataclass(frozen=True)
    class PositionalWithoutTable(Positional):
        """The same family without the fast path: generic code falls back to the per-position form."""

        name = "positional_slow"
        table_logits = Family.table_logits
        table_rows = Family.table_rows

    return Positional, PositionalWithoutTable


def test_a_new_family_is_one_registered_class(monkeypatch):
    from gradlab import caches, policies
    from gradlab.experiments import frontend, validate

    fast, slow = _positional_families()
    raw = {"policy": {"family": "positional", "vocab": 2, "max_len": 4, "scale": 1.0},
           "reference": {"params": "seed"}, "data": {"kind": "equal_length", "n_pairs": 8},
           "loss": {"name": "ld_dpo_trl"},
           "train": {"steps": 12, "seeds": 2, "record_every": 4, "optimizer": "sgd", "lr": 0.5,
                     "metrics": ["loss", "lp_w", "expected_length", "expected_reward", "mass_outside_data", "params"]}}
    with pytest.raises(ConfigError, match="policy.family"):  # unknown until registered
        load(raw)
    try:
        policies.register(fast)
        policies.register(slow)
        lean = experiments.run(raw)
        fallback = experiments.run(_with(raw, "policy", family="positional_slow"))
        per_position = experiments.run(raw, lean=False)
        # every list elsewhere is derived from the registry
        assert "positional" in policies.FAMILIES and "positional" in validate.family_table()
        assert frontend.default_max_len("positional") is None  # no finite state: keeps the cut-off
        with pytest.raises(ConfigError, match="policy.dim does not apply"):
            load(_with(raw, "policy", dim=2))
        with pytest.raises(ConfigError, match="max_len = 'none'"):
            load(_with(raw, "policy", max_len="none"))
    finally:
        policies.unregister("positional")
        policies.unregister("positional_slow")
        caches.clear_caches()
    assert "positional" not in policies.REGISTRY and "positional" not in policies.FAMILIES
    first, last = lean.runs[0].metrics["loss"][0], lean.runs[0].metrics["loss"][-1]
    assert abs(last - first) > 1e-3  # the runs trained
    assert lean.runs[0].metrics["params.P"].shape == (4, 4, 3)  # (records, max_len, vocab + 1)
    for other in (fallback, per_position):
        for a, b in zip(lean.runs, other.runs, strict=True):
            for k in a.metrics:
                np.testing.assert_allclose(a.metrics[k], b.metrics[k], rtol=1e-11, atol=1e-12, err_msg=k)


def test_the_docs_family_table_is_the_registrys():
    from gradlab.experiments import validate

    text = (Path(__file__).resolve().parents[1] / "docs" / "experiments.md").read_text()
    start, end = (text.index(m) for m in validate.FAMILY_TABLE_MARKERS)
    assert text[start + len(validate.FAMILY_TABLE_MARKERS[0]):end].strip() == validate.family_table(), \
        "regenerate it: python -c \"from gradlab.experiments import validate; " \
        "validate.write_family_table('docs/experiments.md')\""


# --------------------------------------------------------------------------------------------
# Ties are no preference; run --set; sweep zip
# --------------------------------------------------------------------------------------------

TIED = """
[policy]
family = "unigram"
vocab = 2
max_len = 3
scale = 0.7

[reference]
params = "policy"

[data]
kind = "on_policy"
reward = [0.0, 0.0]  # every response worth 0: every pair a tie

[loss]
name = "dpo"

[train]
optimizer = "sgd"
lr = 0.1  # a stable step for both losses: rounding is not amplified
steps = 20
seeds = 2
record_every = 20
metrics = ["params"]

[sweep]
"data.kind" = ["on_policy", "reference_pairs", "population"]
"loss.name" = ["dpo", "ipo"]
"""


def test_all_rewards_equal_leaves_the_policy_where_it_started(tmp_path, capsys):
    """Every token worth the same: every pair of the enumerated presets is a tie, which is no
    preference, so neither DPO nor IPO moves a random start (the reference is the start)."""
    path = tmp_path / "tied.toml"
    path.write_text(TIED)
    assert main(["run", str(path), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert len(runs) == 12
    for run in runs:
        theta = np.asarray(run["metrics"]["params.theta"])
        assert np.abs(theta[0]).max() > 0.1  # a non-uniform start
        np.testing.assert_allclose(theta[-1], theta[0], rtol=0, atol=1e-12, err_msg=str(run["setting"]))


def test_a_tie_is_both_labellings_at_half_weight():
    from gradlab.experiments import datasets

    exp = load(tomllib.loads(TIED.replace("[sweep]", "[unused]").split("[unused]")[0]))
    fam = runner.build_family(exp.policy)
    for kind in ("on_policy", "reference_pairs"):
        data = datasets._enumerated(kind, fam, np.array([0.0, 1.0, 1.0]), None if kind == "on_policy" else
                                    fam.init(jax.random.PRNGKey(0)))
        r = datasets.item_rewards(np.array([0.0, 1.0, 1.0]), data.items, data.lengths)
        tie = (r[data.w] == r[data.l]) & (data.w != data.l)
        ordered = {(int(a), int(b)) for a, b in zip(data.w[tie], data.l[tie], strict=True)}
        assert ordered and all((b, a) in ordered for a, b in ordered)  # each labelling, equally listed
        assert (r[data.w] >= r[data.l]).all()  # strict preferences keep the oracle's order


def test_run_set_overrides_file_keys_with_simulate_grammar(tmp_path, capsys):
    path = EXAMPLES[0]
    assert main(["run", str(path), "--set", "train.steps=3,train.record_every=3", "--set", "beta=0.25",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["train"]["steps"] == 3 and doc["runs"][0]["steps"] == [0, 3]
    assert doc["config"]["loss"]["beta"] == 0.25
    assert main(["run", str(path), "--set", "train.steps"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["run", str(path), "--set", "nosuch.key=1"]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_sweep_zip_steps_lists_together_beside_the_grid():
    raw = _short(copy.deepcopy(SEQ), seeds=[0])
    raw["sweep"] = {"loss.name": ["dpo", "ipo"], "zip": {"loss.beta": [0.1, 0.5, 1.0], "train.lr": [0.3, 0.2, 0.1]}}
    exp = load(raw)
    points = [s for s, _ in experiments.settings(exp)]
    assert points[:3] == [{"loss.name": "dpo", "loss.beta": b, "train.lr": lr}
                          for b, lr in [(0.1, 0.3), (0.5, 0.2), (1.0, 0.1)]]
    assert len(points) == 6
    result = experiments.run(raw)
    assert [(r.setting["loss.beta"], r.setting["train.lr"]) for r in result.runs][:3] == [(0.1, 0.3), (0.5, 0.2),
                                                                                          (1.0, 0.1)]
    assert result.config["sweep"]["zip"] == {"loss.beta": [0.1, 0.5, 1.0], "train.lr": [0.3, 0.2, 0.1]}
    bad = copy.deepcopy(raw)
    bad["sweep"]["zip"]["train.lr"] = [0.3]
    with pytest.raises(ConfigError, match="equal lengths"):
        load(bad)
    bad["sweep"] = {"loss.beta": [0.1], "zip": {"loss.beta": [0.2]}}
    with pytest.raises(ConfigError, match="both in the grid"):
        load(bad)


# ---------------------------------------------------------------------------------------------
# best_of_n: the best and the worst of n reference samples
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
def test_best_of_n_weights_are_the_enumerated_draws(n):
    """Against every sequence of n draws: the best draw (one of the top-reward draws, uniformly)
    and the worst (one of the bottom, a different draw when all n tie), weighted by the draws'
    probability. Ties and a reward shared by several responses included."""
    import itertools

    from gradlab.experiments.datasets import best_worst_weights

    q, r = np.array([0.1, 0.2, 0.3, 0.15, 0.25]), np.array([1.0, 3.0, 1.0, 2.0, 0.0])
    expected = np.zeros((5, 5))
    for draw in itertools.product(range(5), repeat=n):
        rs = r[list(draw)]
        top = [k for k in range(n) if rs[k] == rs.max()]
        bottom = [k for k in range(n) if rs[k] == rs.min()]
        pairs = [(a, b) for a in top for b in bottom if a != b or rs.max() != rs.min()]
        for a, b in pairs:
            expected[draw[a], draw[b]] += np.prod(q[list(draw)]) / len(pairs)
    np.testing.assert_allclose(best_worst_weights(q, r, n), expected, rtol=0, atol=1e-15)


def test_best_of_n_preset_trains_filtered_mle_and_ties_do_not_move():
    """sft on best_of_n raises the best response; with every reward equal, DPO leaves the start
    (a tie is both labellings); best_of must be at least 2."""
    base = {"policy": {"family": "softmax", "vocab": 4, "init": {"logits": [0.3, -0.2, 0.1, 0.0]}},
            "reference": {"params": "policy"},
            "data": {"kind": "best_of_n", "best_of": 3, "reward": [0.0, 1.0, 2.0, 3.0]},
            "loss": {"expr": "-lp_w"},
            "train": {"optimizer": "sgd", "lr": 0.5, "steps": 20, "seeds": 1, "record_every": 20,
                      "metrics": ["expected_reward", "params"]}}
    result = experiments.run(base)
    reward = result.series("expected_reward")[0]
    assert reward[-1] > reward[0] + 0.1
    tied = {**base, "data": {**base["data"], "reward": [1.0, 1.0, 1.0, 1.0]}, "loss": {"name": "dpo"}}
    logits = experiments.run(tied).runs[0].metrics["params.logits"]
    np.testing.assert_allclose(logits[-1], logits[0], rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="best_of"):
        experiments.run({**base, "data": {**base["data"], "best_of": 1}})
    with pytest.raises(ConfigError, match="best_of"):
        experiments.run({**base, "data": {"kind": "on_policy", "best_of": 3, "reward": [0.0, 1.0, 2.0, 3.0]}})
