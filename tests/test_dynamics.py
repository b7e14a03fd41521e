"""Training dynamics, run by the experiment runner (``gradlab simulate``'s engine): metrics,
determinism, sweeps, the presets' data, on-policy objectives, unbounded lengths, and the
closed-form optimum of docs/background.md recovered by training. Each check compares with an answer
computed here independently (a geometric length, 1/P(EOS), log 2, the closed-form optimum)."""

from __future__ import annotations

import numpy as np
import pytest

from gradlab import experiments
from gradlab.errors import GradlabError
from gradlab.experiments import analysis, datasets
from gradlab.experiments.config import ConfigError, DataConfig
from gradlab.experiments.validate import load
from gradlab.experiments.runner import build_family, program_count
from gradlab.policies import EOS, all_sequences, geometric_expected_length, make_family

TABULAR = {"family": "tabular", "vocab": 2, "max_len": 3}  # 2 content tokens + EOS, cut-off 3


def _population(loss: str, steps: int, temperature: float = 1.0, **values: float) -> dict:
    return {"policy": TABULAR, "reference": {"temperature": temperature}, "data": {"kind": "population"},
            "loss": {"name": loss, **values},
            "train": {"steps": steps, "seeds": [0], "metrics": ["sequence_entropy", "params"]}}


def test_metrics_have_one_value_per_recorded_step_and_seed():
    result = experiments.simulate("dpo", max_len=6, steps=7, seeds=3, sets={"train.metrics": [
        "expected_length", "eos_probability", "stopped_mass", "margin", "params"]})
    assert [r.seed for r in result.runs] == [0, 1, 2]
    for r in result.runs:
        assert r.steps == list(range(8))  # the start, then after every step (the last one included)
        assert r.metrics["expected_length"].shape == (8,) and r.metrics["margin"].shape == (8, 64)
        theta = r.metrics["params.theta"][0]
        p_eos = np.exp(theta[EOS]) / np.exp(theta).sum()
        # a unigram's length is geometric in P(EOS), cut off at 6 tokens
        assert r.metrics["expected_length"][0] == pytest.approx(geometric_expected_length(p_eos, 6), rel=1e-12)
        assert r.metrics["stopped_mass"][0] == pytest.approx((1 - p_eos) ** 6, rel=1e-12)  # 6 content tokens, no EOS
        np.testing.assert_array_equal(r.metrics["margin"][0], 0.0)  # the policy starts at its reference


def test_same_seed_same_metrics():
    a = experiments.simulate("ipo", policy="bigram", steps=20, seeds=2)
    b = experiments.simulate("ipo", policy="bigram", steps=20, seeds=2)
    assert a.as_dict() == b.as_dict()


def test_a_sweep_is_one_program_and_each_point_equals_its_single_run():
    base = {"loss": {"name": "gdpo"}, "train": {"steps": 5, "seeds": 2, "metrics": ["loss", "expected_length"]}}
    swept = {**base, "sweep": {"loss.beta": [0.1, 0.5], "loss.gamma": [0.1, 0.2]}}
    assert program_count(load(swept)) == 1
    result = experiments.run(swept)
    assert len(result.runs) == 8
    single = experiments.run({**base, "loss": {"name": "gdpo", "beta": 0.5, "gamma": 0.2}})
    np.testing.assert_allclose(result.series("loss", {"loss.beta": 0.5, "loss.gamma": 0.2}),
                               single.series("loss"), rtol=1e-12)


def test_training_reaches_the_closed_form_optimum():
    # pi* ~ pi_0^(gamma/beta) exp(r/beta) over every response (docs/background.md), pi_0 the seed-0 policy
    import jax

    fam = make_family("tabular", vocab=3, max_len=3)
    ref = fam.init(jax.random.PRNGKey(0), 0.5)  # the runner's seed-0 policy, also the reference
    settings = [(0.5, 0.25), (1.0, 1.0)]
    results = experiments.runner.run_many([_population("gdpo", 1500, beta=b, gamma=g) for b, g in settings])
    for (beta, gamma), result in zip(settings, results, strict=True):
        final = {"table": result.runs[0].metrics["params.table"][-1]}
        target = analysis.optimal_policy(fam, ref, beta, gamma)
        np.testing.assert_allclose(np.exp(np.asarray(fam.enumerate(final).logp)), target, atol=1e-6)
        assert result.series("sequence_entropy")[0, -1] == pytest.approx(analysis.entropy(target), abs=1e-6)


def test_tempered_reference_equals_rescaled_gamma():
    tempered, rescaled, plain = experiments.runner.run_many([
        _population("gdpo", 50, 2.0, beta=0.5, gamma=0.5), _population("gdpo", 50, beta=0.5, gamma=0.25),
        _population("gdpo", 50, beta=0.5, gamma=0.5)])
    h = [r.series("sequence_entropy") for r in (tempered, rescaled, plain)]
    np.testing.assert_allclose(h[0], h[1], atol=1e-10)
    assert np.abs(h[0] - h[2]).max() > 1e-3  # the temperature matters


def _data(kind: str, policy: dict, n_pairs: int = 64, seed: int = 0, params=None) -> datasets.PairData:
    exp = load({"policy": policy, "data": {"kind": kind, **({"n_pairs": n_pairs} if n_pairs else {})}})
    fam = build_family(exp.policy)
    return datasets.build(exp.data, fam, seed, params, params)


def test_length_presets():
    pairs = _data("equal_length", {"max_len": 6}, 20_000)
    lw, ll = pairs.lengths[pairs.w], pairs.lengths[pairs.l]
    se = np.sqrt(lw.var() / len(lw) + ll.var() / len(ll))
    assert abs(lw.mean() - ll.mean()) < 4 * se
    longer = _data("chosen_longer", {"max_len": 6}, 500)
    assert (longer.lengths[longer.w] > longer.lengths[longer.l]).all()
    shorter = _data("rejected_longer", {"max_len": 6}, 500)
    assert (shorter.lengths[shorter.w] < shorter.lengths[shorter.l]).all()
    # an unbounded policy gets the same responses (1..5 content tokens, ended by EOS)
    unbounded = _data("equal_length", {"max_len": "none"}, 20_000)
    np.testing.assert_array_equal(unbounded.lengths[unbounded.w], lw)
    np.testing.assert_array_equal(unbounded.items[unbounded.w][:, :6], pairs.items[pairs.w])


def test_shared_prefix_pairs_differ_in_one_token():
    pairs = _data("shared_prefix", {"family": "bigram", "vocab": 3, "max_len": 5}, 300, seed=1)
    assert ((pairs.items[pairs.w] != pairs.items[pairs.l]).sum(1) == 1).all()


def test_similar_embeddings_picks_the_most_similar_rows():
    import jax

    fam = make_family("linear_head", vocab=5, max_len=3)
    params = fam.init(jax.random.PRNGKey(0))
    pairs = _data("similar_embeddings", {"family": "linear_head", "vocab": 4, "max_len": 3}, 4, params=params)
    a, b = pairs.items[pairs.w[0], 0], pairs.items[pairs.l[0], 0]
    assert (pairs.lengths[pairs.w] == 2).all() and a != b
    W = np.asarray(params["W"])[1:]
    W = W / np.linalg.norm(W, axis=1, keepdims=True)
    sim = W @ W.T - 2 * np.eye(len(W))
    assert sim[a - 1, b - 1] == pytest.approx(sim.max())


def test_on_policy_and_population_cover_every_pair():
    import jax

    n = len(all_sequences(3, 3)[0])
    assert n == 7 + 8  # 7 responses ended by EOS and 8 stopped at the cut-off
    params = make_family("tabular", vocab=3, max_len=3).init(jax.random.PRNGKey(0))
    assert len(_data("on_policy", TABULAR, None).w) == n * n
    pop = _data("population", TABULAR, None, params=params)
    assert len(pop.w) == n * (n - 1) and pop.weight.sum() == pytest.approx(1.0)
    for kind in ("on_policy", "reference_pairs", "population"):
        with pytest.raises(ConfigError, match="integer policy.max_len"):
            load({"policy": {"family": "bigram", "max_len": "none"}, "data": {"kind": kind}})
    assert DataConfig().kind == "equal_length"


def test_on_policy_objective_accounts_for_every_pair():
    # policy == reference at the first step: on-policy DPO weights pi(y)pi(y') sum to 1 over the
    # pairs (stopped responses included), so the loss is exactly log 2
    result = experiments.simulate("dpo", policy="tabular", vocab=2, max_len=3, dataset="on-policy", steps=2, seeds=1,
                                  sets={"train.metrics": ["loss", "mass_outside_data", "stopped_mass"]})
    m = result.runs[0].metrics
    assert m["loss"][0] == pytest.approx(np.log(2.0), rel=1e-12)
    assert m["mass_outside_data"][0] == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < m["stopped_mass"][0] < 1.0


@pytest.mark.parametrize("flags, match", [
    (dict(dataset="nope"), "--dataset"),
    (dict(steps=0), "--steps"),
    (dict(lr=-1.0), "--lr"),
    (dict(sets={"beta": -1}), "beta"),
    (dict(sets={"gamma": 1}), "gamma"),
])
def test_bad_settings_are_refused(flags, match):
    with pytest.raises(GradlabError, match=match):
        experiments.simulate("dpo", **{"steps": 2, **flags})


def test_an_unbounded_simulation_reports_the_real_length():
    result = experiments.simulate("dpo", max_len="none", steps=150, seeds=2,
                                  sets={"train.metrics": ["expected_length", "stopped_mass", "params"]})
    for r in result.runs:
        theta = r.metrics["params.theta"]  # (records, vocab + 1)
        p_eos = np.exp(theta[:, EOS]) / np.exp(theta).sum(-1)
        np.testing.assert_allclose(r.metrics["expected_length"], 1.0 / p_eos, rtol=1e-10)
        assert r.metrics["expected_length"][-1] > 2 * 6  # far past the data's lengths and any cut-off of 6
        assert (r.metrics["stopped_mass"] == 0).all()


def _no_eos(family: str) -> dict:
    """Explicit parameters whose EOS logits are -60 (P(EOS) ~ 1e-26 in every state)."""
    import jax

    fam = make_family(family, vocab=4, max_len=None)
    params = {k: np.array(v) for k, v in fam.init(jax.random.PRNGKey(0), 0.5).items()}
    key = "theta" if family == "unigram" else "W"
    params[key][..., EOS] = -60.0
    return {key: params[key].tolist()}


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_a_simulation_with_eos_near_zero_is_exact_or_refused(loss):
    metrics = {"train.metrics": ["expected_length", "stopped_mass", "loss"]}
    with pytest.raises(GradlabError, match="EOS probability"):  # a multi-state chain: refused, not a number
        experiments.simulate(loss, policy="bigram", max_len="none", steps=2, seeds=1,
                             sets={"policy.init": _no_eos("bigram"), **metrics})
    # one state: exact (E[L] = 1/P(EOS) ~ 1e26)
    init = _no_eos("unigram")
    result = experiments.simulate(loss, max_len="none", steps=1, seeds=1, sets={"policy.init": init, **metrics})
    theta = np.asarray(init["theta"])
    assert result.runs[0].metrics["expected_length"][0] == pytest.approx(np.exp(theta).sum() / np.exp(theta[EOS]),
                                                                         rel=1e-12)
    for family in ("bigram", "unigram"):
        result = experiments.simulate(loss, policy=family, max_len=6, steps=2, seeds=1,
                                      sets={"policy.init": _no_eos(family), **metrics})
        m = result.runs[0].metrics
        assert m["expected_length"][0] == pytest.approx(6.0, abs=1e-9)  # stopped at K
        assert m["stopped_mass"][0] == pytest.approx(1.0, abs=1e-9)
        assert np.isfinite(m["loss"]).all()


def test_cli_simulate_reports_the_untruncated_length(capsys):
    import json

    from gradlab import cli

    argv = ["simulate", "dpo", "--max-len", "none", "--steps", "3", "--seeds", "1", "--json",
            "--set", 'train.metrics=["expected_length","params"]']
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["policy"]["max_len"] == "none"
    theta = np.asarray(out["metrics"]["params.theta"][0][0])
    assert out["metrics"]["expected_length"][0][0] == pytest.approx(np.exp(theta).sum() / np.exp(theta[EOS]),
                                                                    rel=1e-12)
    assert cli.main(["simulate", "dpo", "--vocab", "4", "--max-len", "4", "--steps", "2", "--seeds", "1"]) == 0
    assert "(4 content tokens + EOS, cut-off at 4 tokens)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["simulate", "dpo", "--max-len", "zero"])


def test_dpo_lengthens_responses_on_equal_length_data():
    # the effect the first post describes, measured on the exact unbounded toy (no cut-off caps it)
    result = experiments.simulate("dpo", steps=150, seeds=4, sets={"train.metrics": ["expected_length"]})
    assert result.config["policy"]["max_len"] == "none"
    assert (analysis.drift_factor(result) > 1.2).all()


def test_a_previous_token_hidden_state_is_an_exact_chain():
    import jax

    from gradlab.policies import Bigram, ChainHiddenState, HiddenState, make_hidden_state

    with jax.enable_x64(True):
        for max_len in (None, 5):
            chain = make_hidden_state("previous_token", vocab=4, max_len=max_len, dim=2)
            assert isinstance(chain, ChainHiddenState)
            params = chain.init(jax.random.PRNGKey(1), 1.0)
            # the same model as a bigram whose logit rows are W h(previous token)
            bigram, as_bigram = Bigram(vocab=4, max_len=max_len), {"W": params["h"] @ chain.fixed_W().T}
            for name in ("expected_length", "sequence_entropy", "eos_probability", "stopped_mass"):
                assert float(getattr(chain, name)(params)) == pytest.approx(
                    float(getattr(bigram, name)(as_bigram)), rel=1e-12), name
            if max_len is not None:  # and as the plain family, by enumeration of the forced stop
                plain = HiddenState(vocab=4, max_len=max_len, dim=2)
                assert float(chain.expected_length(params)) == pytest.approx(float(plain.expected_length(params)),
                                                                             rel=1e-12)
    with pytest.raises(ConfigError, match="max_len"):
        load({"policy": {"family": "hidden_state", "context": "prefix", "max_len": "none"}})
    result = experiments.simulate("dpo", policy="hidden_state", steps=3, seeds=1,
                                  sets={"train.metrics": ["expected_length", "stopped_mass"]})
    assert result.config["policy"]["max_len"] == "none"  # simulate's default for a chain
    assert (result.runs[0].metrics["stopped_mass"] == 0).all()
