"""Training dynamics: metrics, determinism, sweeps, datasets, interruption, sharding, and the
closed-form optimum of posts.md recovered by training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import jax
import numpy as np
import pytest

from gradlab import dynamics
from gradlab.errors import DomainError, UnknownVariableError
from gradlab.policies import CHAIN_RTOL, EOS, Bigram, Unigram, all_sequences, make_family


def test_metrics_have_one_value_per_step_and_seed():
    sim = dynamics.simulate("dpo", "unigram", steps=7, seeds=3, chunks=3)
    assert set(sim.metrics) == set(dynamics.METRICS)
    for series in sim.metrics.values():
        assert series.shape == (7, 1, 3)
    fam = make_family("unigram", vocab=4, max_len=6)
    for s in range(3):
        init = fam.init(jax.random.PRNGKey(s), 0.5)
        # the simulator records the policy layer's metrics, the ones the policy tests check
        for name in ("expected_length", "sequence_entropy", "token_entropy", "eos_probability", "stopped_mass"):
            assert sim.series(name)[0, s] == pytest.approx(float(getattr(fam, name)(init)), rel=1e-12), name
    assert np.allclose(sim.series("margin")[0], 0.0)  # the policy starts at its reference


def test_same_seed_same_metrics():
    a = dynamics.simulate("ipo", "bigram", steps=20, seeds=2)
    b = dynamics.simulate("ipo", "bigram", steps=20, seeds=2)
    for k in dynamics.METRICS:
        np.testing.assert_array_equal(a.metrics[k], b.metrics[k])


def test_sweep_runs_the_grid_at_once():
    sim = dynamics.simulate("gdpo", "unigram", steps=5, seeds=2, values={"beta": [0.1, 0.5], "gamma": [0.1, 0.2]})
    assert sim.metrics["loss"].shape == (5, 4, 2)
    assert [s["beta"] for s in sim.settings] == [0.1, 0.1, 0.5, 0.5]
    single = dynamics.simulate("gdpo", "unigram", steps=5, seeds=2, values={"beta": 0.5, "gamma": 0.2})
    np.testing.assert_allclose(sim.metrics["loss"][:, 3], single.metrics["loss"][:, 0], rtol=1e-12)


def test_training_reaches_the_closed_form_optimum():
    fam = make_family("tabular", vocab=3, max_len=3)
    ref = fam.init(jax.random.PRNGKey(0), 0.5)
    for beta, gamma in [(0.5, 0.25), (1.0, 1.0)]:
        sim = dynamics.simulate("gdpo", fam, "population", steps=1500, seeds=1, values={"beta": beta, "gamma": gamma})
        target = dynamics.entropy(dynamics.optimal_policy(fam, ref, beta, gamma))
        assert sim.series("sequence_entropy")[-1, 0] == pytest.approx(target, abs=1e-6)


def test_tempered_reference_equals_rescaled_gamma():
    fam = make_family("tabular", vocab=3, max_len=3)
    a = dynamics.simulate(
        "gdpo", fam, "population", steps=50, seeds=1, values={"beta": 0.5, "gamma": 0.5}, ref_temperature=2.0
    )
    b = dynamics.simulate("gdpo", fam, "population", steps=50, seeds=1, values={"beta": 0.5, "gamma": 0.25})
    np.testing.assert_allclose(a.metrics["sequence_entropy"], b.metrics["sequence_entropy"], atol=1e-10)
    c = dynamics.simulate("gdpo", fam, "population", steps=50, seeds=1, values={"beta": 0.5, "gamma": 0.5})
    assert np.abs(a.metrics["sequence_entropy"] - c.metrics["sequence_entropy"]).max() > 1e-3


def test_equal_length_dataset_has_no_length_difference():
    fam = make_family("unigram", vocab=4, max_len=6)
    pairs = dynamics.make_dataset("equal_length", fam, 0, 20_000)
    lw, ll = pairs.lengths[pairs.w], pairs.lengths[pairs.l]
    se = np.sqrt(lw.var() / len(lw) + ll.var() / len(ll))
    assert abs(lw.mean() - ll.mean()) < 4 * se
    longer = dynamics.make_dataset("chosen_longer", fam, 0, 500)
    assert (longer.lengths[longer.w] > longer.lengths[longer.l]).all()
    shorter = dynamics.make_dataset("rejected_longer", fam, 0, 500)
    assert (shorter.lengths[shorter.w] < shorter.lengths[shorter.l]).all()
    # an unbounded policy gets the same data (responses of at most DATA_LEN tokens, ended by EOS)
    unbounded = dynamics.make_dataset("equal_length", make_family("unigram", vocab=4, max_len=None), 0, 20_000)
    np.testing.assert_array_equal(unbounded.seqs[unbounded.w], pairs.seqs[pairs.w])


def test_shared_prefix_pairs_differ_in_one_token():
    fam = make_family("bigram", vocab=4, max_len=5)
    pairs = dynamics.make_dataset("shared_prefix", fam, 1, 300)
    assert ((pairs.seqs[pairs.w] != pairs.seqs[pairs.l]).sum(1) == 1).all()


def test_similar_embeddings_picks_the_most_similar_rows():
    fam = make_family("linear_head", vocab=5, max_len=3)
    params = fam.init(jax.random.PRNGKey(0))
    pairs = dynamics.make_dataset("similar_embeddings", fam, 0, 4, params)
    a, b = pairs.seqs[pairs.w[0], 0], pairs.seqs[pairs.l[0], 0]
    assert (pairs.lengths[pairs.w] == 2).all() and a != b
    W = np.asarray(params["W"])[1:]
    W = W / np.linalg.norm(W, axis=1, keepdims=True)
    sim = W @ W.T - 2 * np.eye(len(W))
    assert sim[a - 1, b - 1] == pytest.approx(sim.max())


def test_on_policy_and_population_cover_every_pair():
    fam = make_family("tabular", vocab=3, max_len=3)
    n = len(all_sequences(3, 3)[0])
    assert n == 7 + 8  # 7 responses ended by EOS and 8 stopped at the cut-off
    params = fam.init(jax.random.PRNGKey(0))
    assert len(dynamics.make_dataset("on_policy", fam, 0, 1).w) == n * n
    pop = dynamics.make_dataset("population", fam, 0, 1, params)
    assert len(pop.w) == n * (n - 1) and pop.weight.sum() == pytest.approx(1.0)
    for name in ("on_policy", "reference_pairs", "population"):
        with pytest.raises(DomainError, match="forced stop"):
            dynamics.make_dataset(name, make_family("bigram", vocab=3, max_len=None), 0, 1, params)


def test_on_policy_objective_accounts_for_every_pair():
    # policy == reference at the first step: on-policy DPO weights pi(y)pi(y') sum to 1 over the
    # pairs (stopped responses included), so the loss is exactly log 2
    sim = dynamics.simulate("dpo", "tabular", "on_policy", steps=2, seeds=1, vocab=3, max_len=3)
    assert sim.series("loss")[0, 0] == pytest.approx(np.log(2.0), rel=1e-12)
    assert sim.series("mass_outside_data")[0, 0] == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < sim.series("stopped_mass")[0, 0] < 1.0


def test_ctrl_c_returns_what_was_recorded():
    calls = []

    def progress(done, total):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    sim = dynamics.simulate("dpo", "unigram", steps=40, seeds=1, chunks=4, progress=progress)
    assert sim.interrupted and len(sim.steps) == 20
    assert sim.metrics["expected_length"].shape == (20, 1, 1)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(dataset="nope"), UnknownVariableError),
        (dict(steps=0), DomainError),
        (dict(lr=-1.0), DomainError),
        (dict(values={"beta": -1}), DomainError),
        (dict(values={"gamma": 1}), UnknownVariableError),
    ],
)
def test_bad_settings_are_refused(kwargs, error):
    with pytest.raises(error):
        dynamics.simulate("dpo", "unigram", **{"steps": 2, **kwargs})


def test_sweep_is_sharded_across_forced_host_devices():
    script = textwrap.dedent(
        """
        import json, jax
        from gradlab import dynamics
        sim = dynamics.simulate("dpo", "unigram", steps=4, seeds=2)
        print(json.dumps([jax.device_count(), sim.metrics["expected_length"].tolist()]))
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    count, metrics = json.loads(out.stdout)
    assert count == 2
    single = dynamics.simulate("dpo", "unigram", steps=4, seeds=2)
    np.testing.assert_allclose(np.asarray(metrics), single.metrics["expected_length"], rtol=1e-12)


def test_an_unbounded_simulation_reports_the_real_length():
    sim = dynamics.simulate("dpo", "unigram", "equal_length", steps=150, seeds=2, max_len=None)
    theta = np.asarray(sim.final_params["theta"])
    p_eos = np.exp(theta[:, EOS]) / np.exp(theta).sum(-1)
    # the recorded metric is at the start of the last step: recompute it there independently
    last = dynamics.simulate("dpo", "unigram", "equal_length", steps=149, seeds=2, max_len=None)
    p_last = np.exp(last.final_params["theta"][:, EOS]) / np.exp(last.final_params["theta"]).sum(-1)
    np.testing.assert_allclose(sim.series("expected_length")[-1], 1.0 / p_last, rtol=1e-10)
    assert (sim.series("expected_length")[-1] > 2 * dynamics.DATA_LEN).all()  # far past any cut-off
    assert (1.0 / p_eos > sim.series("expected_length")[0]).all()
    assert (sim.series("stopped_mass") == 0).all() and (sim.series("metric_error_bound") <= CHAIN_RTOL).all()


@dataclass(frozen=True)
class _NoEosBigram(Bigram):
    """A bigram policy whose EOS logits start at -60 (P(EOS) ~ 1e-26 in every state)."""

    name = "bigram"

    def init(self, key, scale=1.0):
        return {"W": super().init(key, scale)["W"].at[:, EOS].set(-60.0)}


@dataclass(frozen=True)
class _NoEosUnigram(Unigram):
    name = "unigram"

    def init(self, key, scale=1.0):
        return {"theta": super().init(key, scale)["theta"].at[EOS].set(-60.0)}


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_a_simulation_with_eos_near_zero_is_exact_or_refused(loss):
    with pytest.raises(DomainError, match="stopped being exact"):  # a multi-state chain: refused
        dynamics.simulate(loss, _NoEosBigram(vocab=4, max_len=None), "equal_length", steps=2, seeds=1)
    # one state: exact (E[L] = 1/P(EOS) ~ 1e26)
    fam = _NoEosUnigram(vocab=4, max_len=None)
    sim = dynamics.simulate(loss, fam, "equal_length", steps=1, seeds=1)
    theta = fam.init(jax.random.PRNGKey(0), 0.5)["theta"]
    assert sim.series("expected_length")[0, 0] == pytest.approx(1 / float(jax.nn.softmax(theta)[EOS]), rel=1e-12)
    for forced in (_NoEosBigram(vocab=4, max_len=6), _NoEosUnigram(vocab=4, max_len=6)):
        sim = dynamics.simulate(loss, forced, "equal_length", steps=2, seeds=1)
        assert sim.series("expected_length")[0, 0] == pytest.approx(6.0, abs=1e-9)  # stopped at K
        assert sim.series("stopped_mass")[0, 0] == pytest.approx(1.0, abs=1e-9)
        assert np.isfinite(sim.series("loss")).all()


def test_cli_simulate_reports_the_untruncated_length(capsys):
    from gradlab import cli

    assert (
        cli.main(
            ["simulate", "dpo", "--policy", "unigram", "--max-len", "none", "--steps", "3", "--seeds", "1", "--json"]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["max_len"] is None
    fam = make_family("unigram", vocab=4, max_len=None)
    assert out["metrics"]["expected_length"][0][0] == pytest.approx(
        float(fam.expected_length(fam.init(jax.random.PRNGKey(0), 0.5))), rel=1e-12
    )
    assert cli.main(["simulate", "dpo", "--vocab", "5", "--max-len", "4", "--steps", "2", "--seeds", "1"]) == 0
    assert "vocab 5, forced stop at 4 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["simulate", "dpo", "--max-len", "zero"])


def test_dpo_lengthens_responses_on_equal_length_data():
    # the effect the first post describes, measured (see the length_drift figure for the rest)
    sim = dynamics.simulate("dpo", "unigram", "equal_length", steps=150, seeds=4)
    assert (dynamics.drift_factor(sim) > 1.2).all()
