"""Toy policies: normalisation, enumeration against sampling, geometric length, tempering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab.policies import EOS, FAMILIES, LinearHead, geometric_expected_length, make_family

FAMILY_NAMES = list(FAMILIES)


@pytest.fixture(params=FAMILY_NAMES)
def family(request):
    return make_family(request.param, vocab=4, max_len=5)


def test_probabilities_normalise_with_the_running_mass(family):
    e = family.enumerate(family.init(jax.random.PRNGKey(0)))
    total = float(jnp.exp(e.logp).sum() + e.running_mass)
    assert total == pytest.approx(1.0, abs=1e-12)
    assert 0.0 < float(e.running_mass) < 1.0


def test_next_token_distributions_normalise(family):
    params = family.init(jax.random.PRNGKey(1))
    e = family.enumerate(params)
    lps = family.token_logprobs(params, e.seqs)
    np.testing.assert_allclose(np.exp(lps).sum(-1), 1.0, rtol=1e-12)


def test_enumeration_matches_sampling(family):
    params = family.init(jax.random.PRNGKey(2))
    e = family.enumerate(params)
    n = 20_000
    seqs, lengths = family.sample(params, jax.random.PRNGKey(3), n)
    finished = np.asarray(lengths) <= family.max_len
    # map each finished sample to its enumeration row
    table = {tuple(np.asarray(s)): i for i, s in enumerate(e.seqs)}
    counts = np.zeros(len(e.seqs))
    for s in np.asarray(seqs)[finished]:
        counts[table[tuple(s)]] += 1
    p = np.exp(np.asarray(e.logp))
    # every cell within 5 standard errors, and the running mass too
    se = np.sqrt(p * (1 - p) / n) + 1e-12
    assert np.all(np.abs(counts / n - p) < 5 * se + 2 / n)
    pr = float(e.running_mass)
    assert abs((~finished).mean() - pr) < 5 * np.sqrt(pr * (1 - pr) / n)


def test_unigram_length_is_geometric():
    fam = make_family("unigram", vocab=4, max_len=8)
    params = fam.init(jax.random.PRNGKey(4))
    p_eos = float(jax.nn.softmax(params["theta"])[EOS])
    assert float(fam.expected_length(params)) == pytest.approx(geometric_expected_length(p_eos, 8), rel=1e-12)
    assert float(fam.eos_probability(params)) == pytest.approx(p_eos, rel=1e-12)


def test_unigram_token_entropy_is_the_softmax_entropy():
    fam = make_family("unigram", vocab=5, max_len=4)
    params = fam.init(jax.random.PRNGKey(5))
    p = jax.nn.softmax(params["theta"])
    assert float(fam.token_entropy(params)) == pytest.approx(float(-(p * jnp.log(p)).sum()), rel=1e-12)


def test_sequence_tempering_is_normalised_and_scales_log_ratios(family):
    params = family.init(jax.random.PRNGKey(6))
    e = family.enumerate(params)
    tempered = family.tempered_logprob(params, e.seqs, e.lengths, 2.0)
    assert float(jnp.exp(tempered).sum()) == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(tempered[1:] - tempered[0], (e.logp[1:] - e.logp[0]) / 2.0, rtol=1e-10)


def test_token_tempering_sharpens_every_step(family):
    params = family.init(jax.random.PRNGKey(7))
    cold = family.temper_tokens(params, 0.5)
    assert float(family.token_entropy(cold)) < float(family.token_entropy(params))


def test_tail_logprob_is_the_part_past_the_shared_length(family):
    params = family.init(jax.random.PRNGKey(8))
    e = family.enumerate(params)
    per_token = family.per_token_logp(params, e.seqs, e.lengths)
    shared = jnp.full(e.lengths.shape, 2)
    np.testing.assert_allclose(family.tail_logprob(params, e.seqs, e.lengths, shared), per_token[:, 2:].sum(-1))


def test_linear_head_shares_parameters_across_contexts():
    fam = LinearHead(vocab=4, max_len=3, dim=2)
    params = fam.init(jax.random.PRNGKey(9))
    e = fam.enumerate(params)
    g = jax.grad(lambda p: fam.logprob(p, e.seqs[3:4], e.lengths[3:4]).sum())(params)
    assert np.count_nonzero(np.asarray(g["W"])) == g["W"].size  # one sequence touches every row


def test_unknown_family_is_refused():
    from gradlab.errors import UnknownVariableError

    with pytest.raises(UnknownVariableError, match="the families are"):
        make_family("transformer")
