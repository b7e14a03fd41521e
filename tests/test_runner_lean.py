"""The runner's lean step (issue 17): log-probabilities as contractions of per-run count matrices
with the log-softmax table, computed once per step. It must give what the per-position
formulation (``canonical_variables``: a log-softmax at every position, per-token gathers) gives,
for every sequence family, every canonical variable a loss may read, soft labels, minibatches,
on-policy weights, a tempered reference and the metrics over the enumerated distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import caches, policies
from gradlab.experiments import objective, runner
from gradlab.experiments.validate import load
from gradlab.policies import all_sequences

FAMILY_TABLES = {
    "unigram": {},
    "bigram": {},
    "linear_head": {"dim": 2, "train_features": True},
    "tabular": {},
    "hidden_state": {"dim": 2, "context": "prefix"},
}
ENUM_METRICS = ["loss", "lp_w", "lp_l", "margin", "reward_accuracy", "expected_reward",
                "mass_outside_data", "expected_length", "params"]


def _both(raw: dict) -> tuple:
    """The same experiment with the lean step and with the per-position formulation."""
    return runner.run(raw), runner.run(raw, lean=False)


def _assert_same(lean, old, tol: float = 1e-12) -> None:
    assert len(lean.runs) == len(old.runs)
    for a, b in zip(lean.runs, old.runs, strict=True):
        assert a.metrics.keys() == b.metrics.keys()
        for k in a.metrics:
            np.testing.assert_allclose(a.metrics[k], b.metrics[k], rtol=tol, atol=tol, err_msg=k)


@pytest.mark.parametrize("family", sorted(FAMILY_TABLES))
def test_the_logit_table_reproduces_each_familys_logits(family):
    fam = runner.build_family(load({"policy": {"family": family, "vocab": 3, "max_len": 4,
                                               **FAMILY_TABLES[family]}}).policy)
    assert policies.has_logit_table(fam)
    with jax.enable_x64(True):
        params = fam.init(jax.random.PRNGKey(3))
        seqs, _ = all_sequences(fam.vocab, fam.max_len)
        seqs = jnp.asarray(seqs)
        np.testing.assert_allclose(fam.table_logits(params)[fam.table_rows(seqs)], fam.logits(params, seqs),
                                   rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("family", sorted(FAMILY_TABLES))
def test_responses_read_exactly_the_rows_in_their_familys_reach(family):
    """``Family.table_reach`` is every row some response reads and no other: the lean form
    reads only those rows' cells (the bigram's and linear head's row of "after EOS" is read by
    no response)."""
    fam = runner.build_family(load({"policy": {"family": family, "vocab": 3, "max_len": 4,
                                               **FAMILY_TABLES[family]}}).policy)
    with jax.enable_x64(True):
        seqs, lengths = all_sequences(fam.vocab, fam.max_len)
        rows = np.asarray(fam.table_rows(jnp.asarray(seqs)))
        table = fam.table_logits(fam.init(jax.random.PRNGKey(0)))
    read = np.unique(rows[np.arange(seqs.shape[-1]) < lengths[:, None]])
    assert list(read) == list(np.arange(table.shape[0])[fam.table_reach()])


def test_every_registered_sequence_family_has_the_fast_path():
    """A family without ``table_logits`` runs the per-position form (the generic fallback); every
    registered one here has it (a chain hidden_state too, which once ran the slow path unnoticed)."""
    for name in policies.FAMILIES:
        for options in ({}, {"context": "previous_token"}, {"context": "prefix"}):
            cls = policies.family_class(name, **options)
            assert cls.table_logits is not policies.Family.table_logits, (name, options)


@pytest.mark.parametrize("family", sorted(FAMILY_TABLES))
def test_lean_step_equals_the_per_position_formulation(family):
    """Tails (LD-DPO's TRL form reads every tail), soft labels and a tempered reference. Plain
    gradient descent: Adam divides a gradient by its running scale, so on a coordinate whose
    gradient is exactly 0 in exact arithmetic (the start row's EOS logit under a DPO margin: the
    softmax terms of y_w and y_l cancel) it turns rounding noise of 1e-17 into steps of
    lr * noise / (noise + eps) ~ 1e-10, and two correct summation orders then part by ~1e-11."""
    raw = {"policy": {"family": family, "vocab": 3, "max_len": 4, "scale": 1.0, **FAMILY_TABLES[family]},
           "reference": {"params": "seed", "temperature": 1.5},
           "data": {"kind": "equal_length", "n_pairs": 12, "labels": "soft"},
           "loss": {"name": "ld_dpo_trl"},
           "train": {"steps": 30, "seeds": 2, "record_every": 10, "optimizer": "sgd", "lr": 0.5,
                     "metrics": ENUM_METRICS}}
    lean, old = _both(raw)
    _assert_same(lean, old)
    # the runs moved: the comparison is not between two copies of the initial state
    assert np.abs(lean.runs[0].metrics["loss"][-1] - lean.runs[0].metrics["loss"][0]) > 1e-3


def test_lean_step_with_minibatches_lengths_and_a_beta_sweep():
    raw = {"policy": {"family": "bigram", "vocab": 3, "max_len": 5},
           "data": {"kind": "chosen_longer", "n_pairs": 16},
           "loss": {"name": "r_dpo"},
           "train": {"steps": 40, "seeds": 2, "record_every": 8, "batch_size": 4, "optimizer": "sgd", "lr": 0.3,
                     "metrics": ["loss", "margin", "params", "expected_length"]},
           "sweep": {"loss.beta": [0.1, 0.5]}}
    lean, old = _both(raw)
    _assert_same(lean, old)


def test_lean_step_with_on_policy_weights():
    raw = {"policy": {"family": "unigram", "vocab": 2, "max_len": 3},
           "data": {"kind": "on_policy"},
           "loss": {"name": "dpo"},
           "train": {"steps": 20, "seeds": 1, "record_every": 5,
                     "metrics": ["loss", "lp_w", "expected_reward", "mass_outside_data"]}}
    lean, old = _both(raw)
    _assert_same(lean, old)


def test_large_tables_use_the_gather_form(monkeypatch):
    """Above the dense limit the step gathers the log-softmax table per token; same values (plain
    gradient descent, for the reason in the test above)."""
    raw = {"policy": {"family": "tabular", "vocab": 3, "max_len": 4},
           "data": {"kind": "equal_length", "n_pairs": 8},
           "loss": {"name": "ld_dpo"},
           "train": {"steps": 12, "seeds": 1, "record_every": 4, "optimizer": "sgd", "lr": 0.5,
                     "metrics": ["loss", "lp_w", "expected_reward", "mass_outside_data"]}}
    lean = runner.run(raw)
    monkeypatch.setattr(objective, "DENSE_LIMIT", 0)
    caches.clear_caches()  # programs compiled with the dense form are not reused
    try:
        _assert_same(lean, runner.run(raw))
    finally:
        monkeypatch.undo()
        caches.clear_caches()


def test_seeded_draws_are_the_eager_draws():
    """One compiled init program gives what the eager calls give (to the last bit or one ulp: XLA fuses the
    scale into the normal draw)."""
    exp = load({"policy": {"family": "bigram", "vocab": 3, "max_len": 4, "scale": 0.7},
                "reference": {"params": "seed"}})
    fam = runner.build_family(exp.policy)
    params, ref = runner.initial_params(exp, fam, 5)
    with jax.enable_x64(True):
        key = jax.random.PRNGKey(5)
        eager, eager_ref = fam.init(key, 0.7)["W"], fam.init(jax.random.fold_in(key, 1), 0.7)["W"]
        np.testing.assert_allclose(params["W"], np.asarray(eager), rtol=1e-15, atol=0)
        np.testing.assert_allclose(ref["W"], np.asarray(eager_ref), rtol=1e-15, atol=0)
