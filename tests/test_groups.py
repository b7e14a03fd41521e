"""Exact expected group gradients (gradlab.experiments.groups) against an independent brute force.

The brute force lists every group of G responses of a tiny toy, computes each group's rewards,
advantages (TRL's formula, written again here) and weights (hand-derived first-step closed forms,
written again here), and differentiates sum over groups of P(group) sum_i w_i log pi(o_i) with
JAX. The exact step must agree to 1e-10; the sampled step must fall within 4 standard errors.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab.errors import DomainError
from gradlab.experiments import groups as gr
from gradlab.policies import Bigram, Softmax, Tabular, Unigram

L_MAX = 7  # max_completion_length for dr_grpo, small so its weights are not tiny


def _advantage(r, scale, p):
    """TRL's advantages of one group (grpo_trainer.py; rloo_trainer.py for leave_one_out)."""
    g = len(r)
    if scale == "leave_one_out":
        return r - (r.sum() - r) / (g - 1)
    mean = r.mean()
    if scale == "none":
        return r - mean
    std = math.sqrt(((r - mean) ** 2).sum() / (g - 1)) if scale == "group" else math.sqrt(p * (1 - p))
    return (r - mean) / (std + 1e-4)


# hand-derived first-step weights w(A, |o_i|, sum_j |o_j|, G): DeepSeekMath Eq. 3 (grpo), Dr. GRPO,
# DAPO's token mean, TRL's cispo cap (epsilon_high = 0.2 by default), LUSPO, RLOO
WEIGHTS = {
    "grpo": lambda a, n, s, g: a / (g * n),
    "sapo": lambda a, n, s, g: a / (g * n),
    "dr_grpo": lambda a, n, s, g: a / (g * L_MAX),
    "dapo": lambda a, n, s, g: a / s,
    "bnpo": lambda a, n, s, g: a / s,
    "vespo": lambda a, n, s, g: a / s,
    "cispo": lambda a, n, s, g: 0.2 * a / s,
    "luspo": lambda a, n, s, g: a / g,
    "rloo": lambda a, n, s, g: a / g,
}


def _values(name):
    return {"max_completion_length": L_MAX} if name == "dr_grpo" else None


def brute_force(name, family, params, rewards_of, group_size, scale):
    """The gradient of the expected loss by listing every group."""
    if isinstance(family, Softmax):
        logp = np.asarray(family.logprobs(params))
        lengths = np.ones(family.k)
        rewards = rewards_of(None, None)

        def logprob(theta):
            return family.logprobs(theta)
    else:
        e = family.enumerate(params)
        seqs, lengths, logp = np.asarray(e.seqs), np.asarray(e.lengths), np.asarray(e.logp)
        rewards = rewards_of(seqs, lengths)

        def logprob(theta):
            return family.logprob(theta, e.seqs, e.lengths)
    prob = np.exp(logp)
    p = float(prob @ rewards)
    coef = np.zeros(len(prob))  # sum over groups of P(group) w_i, per response o_i
    for group in itertools.product(range(len(prob)), repeat=group_size):
        idx = np.array(group)
        adv = _advantage(rewards[idx], scale, p)
        w = WEIGHTS[name](adv, lengths[idx], lengths[idx].sum(), group_size)
        np.add.at(coef, idx, np.prod(prob[idx]) * w)
    grad = jax.grad(lambda theta: -jnp.sum(jnp.asarray(coef) * logprob(theta)))(params)
    return grad


def _first(tokens):
    return lambda seqs, lengths: np.isin(seqs[:, 0], tokens).astype(float)


def _contains(tokens):
    return lambda seqs, lengths: np.array([np.isin(s[:n], tokens).any() for s, n in zip(seqs, lengths, strict=True)],
                                          dtype=float)


TOYS = {
    "unigram": (Unigram(vocab=3, max_len=3), gr.first_token(1), _first([1])),
    "bigram": (Bigram(vocab=3, max_len=3), gr.contains(2), _contains([2])),
    "tabular": (Tabular(vocab=3, max_len=2), gr.first_token(2), _first([2])),
    "softmax": (Softmax(k=4), gr.table([1, 0, 0, 1]), lambda s, n: np.array([1.0, 0.0, 0.0, 1.0])),
}


def _leaves(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("toy", list(TOYS))
@pytest.mark.parametrize("name,scale", [("grpo", "group"), ("grpo", "none"), ("dr_grpo", "group"),
                                        ("dapo", "group"), ("dapo", "batch"), ("luspo", "none"),
                                        ("sapo", "group"), ("cispo", "none"), ("rloo", "leave_one_out")])
def test_exact_matches_brute_force(toy, name, scale):
    family, reward, rewards_of = TOYS[toy]
    params = family.init(jax.random.PRNGKey(3), scale=0.7)
    g = 3
    exact = gr.exact_gradient(name, family, params, reward, group_size=g, scale_rewards=scale, values=_values(name))
    brute = brute_force(name, family, params, rewards_of, g, scale)
    a, b = _leaves(exact.grad), _leaves(brute)
    assert np.abs(a).max() > 1e-4  # a real signal, not two zeros
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * max(1.0, np.abs(b).max()))
    assert exact.tail_bound == 0.0


def test_brute_force_is_not_blind_to_the_normaliser():
    """The comparison above separates the normalisers: grpo and dapo differ on the same toy."""
    family, reward, _ = TOYS["unigram"]
    params = family.init(jax.random.PRNGKey(3), scale=0.7)
    a = _leaves(gr.exact_gradient("grpo", family, params, reward, group_size=3).grad)
    b = _leaves(gr.exact_gradient("dapo", family, params, reward, group_size=3).grad)
    assert np.abs(a / np.abs(a).max() - b / np.abs(b).max()).max() > 1e-2


@pytest.mark.parametrize("name", ["grpo", "dapo"])
def test_unbounded_chain_equals_a_long_forced_stop(name):
    """The unbounded chain (horizon and tail bound) against the same chain stopped far out."""
    params = Unigram(vocab=3, max_len=None).init(jax.random.PRNGKey(1))
    unbounded = gr.exact_gradient(name, Unigram(vocab=3, max_len=None), params, gr.first_token(2), group_size=4)
    stopped = gr.exact_gradient(name, Unigram(vocab=3, max_len=200), params, gr.first_token(2), group_size=4)
    assert 0 < unbounded.tail_bound < 1e-9
    np.testing.assert_allclose(_leaves(unbounded.grad), _leaves(stopped.grad), rtol=0, atol=1e-11)


@pytest.mark.parametrize("name,scale", [("grpo", "group"), ("dapo", "none")])
def test_sample_is_within_four_standard_errors(name, scale):
    family = Unigram(vocab=3, max_len=None)
    params = family.init(jax.random.PRNGKey(2))
    exact = gr.exact_gradient(name, family, params, gr.first_token(1), group_size=4, scale_rewards=scale)
    sample = gr.expected_gradient(name, family, params, gr.first_token(1), group_size=4, expectation="sample",
                                  groups=4000, key=jax.random.PRNGKey(7), scale_rewards=scale)
    z = (_leaves(sample.grad) - _leaves(exact.grad)) / _leaves(sample.stderr)
    assert np.abs(z).max() < 4, z
    assert sample.groups == 4000 and abs(sample.success - exact.success) < 0.05


def test_bad_input_is_refused_clearly():
    family = Unigram(vocab=3, max_len=None)
    params = family.init(jax.random.PRNGKey(0))
    with pytest.raises(DomainError, match="content tokens"):
        gr.first_token(0)
    with pytest.raises(DomainError, match="0/1"):
        gr.table([0.5, 1])
    with pytest.raises(DomainError, match="at least 2"):
        gr.exact_gradient("grpo", family, params, gr.first_token(1), group_size=1)
    with pytest.raises(DomainError, match="forced stop"):
        gr.exact_gradient("grpo", family, params, gr.table([1, 0]), group_size=2)
    with pytest.raises(DomainError, match="exact' or 'sample"):
        gr.expected_gradient("grpo", family, params, gr.first_token(1), group_size=2, expectation="mc")


def test_group_weights_figure_data_matches_closed_forms():
    """The figure's per-prompt weights: (G-1)/G without std, 1 for RLOO, and for the group std the
    single-outlier advantage (1 - 1/G) sqrt(G) / (1 + 1e-4 sqrt(G)) as p -> 0."""
    from gradlab.figures import group_weights

    g = 8
    d = group_weights.compute(group_size=g, points=3)
    w = d["weights"]
    np.testing.assert_allclose(w["grpo, no std"], (g - 1) / g, rtol=1e-12)
    np.testing.assert_allclose(w["rloo"], 1.0, rtol=1e-12)
    low = group_weights.compute(group_size=g, points=2)["weights"]["grpo, group std"][0]
    outlier = (1 - 1 / g) / (1 / math.sqrt(g) + 1e-4)
    assert abs(low - outlier) < 0.05 * outlier and low > w["grpo, group std"][1]
    np.testing.assert_allclose(d["silent"][8], d["p"] ** 8 + (1 - d["p"]) ** 8)


def test_reward_function_is_the_same_table():
    """A JAX-traceable reward (here: the first content token is 1) gives first_token's gradient."""
    family = Unigram(vocab=3, max_len=3)
    params = family.init(jax.random.PRNGKey(5), scale=0.7)
    reward = gr.function(lambda seq, n: (seq[0] == 1) & (n > 1), family)
    a = gr.exact_gradient("grpo", family, params, reward, group_size=3).grad
    b = gr.exact_gradient("grpo", family, params, gr.first_token(1), group_size=3).grad
    np.testing.assert_allclose(_leaves(a), _leaves(b), rtol=0, atol=1e-12)
    with pytest.raises(DomainError, match="forced stop"):
        gr.function(lambda seq, n: seq[0] == 1, Unigram(vocab=3, max_len=None))
