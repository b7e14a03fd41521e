"""Toy policies: proper distributions in both modes, the chain metrics against enumeration,
Monte Carlo and the unigram closed forms, their gradients, and refusal where exactness fails."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gradlab.errors import DomainError, UnknownVariableError
from gradlab.policies import (
    CHAIN_RTOL,
    EOS,
    FAMILIES,
    POLICY_VARIABLES,
    ChainMetrics,
    LinearHead,
    Unigram,
    all_sequences,
    canonical_variables,
    geometric_expected_length,
    make_family,
    reference_values,
    response_index,
)

FAMILY_NAMES = list(FAMILIES)
CHAIN_NAMES = [n for n, f in FAMILIES.items() if f.finite_state]
REWARD = jnp.array([0.3, 1.0, -1.0, 0.5])  # per token, EOS's entry included
FIELDS = ChainMetrics._fields[:-1]  # every metric but the error bound


# One forced-stop shape, vocabulary 4 (EOS and three tokens) and K = 4, for every test that does
# not need another: the families' methods are compiled per shape, so tests on the same shape share
# their programs (K = 1 and 2 are the chain test's edge cases; unbounded tests have no K).
VOCAB, K = 4, 4


@pytest.fixture(params=FAMILY_NAMES)
def family(request):
    return make_family(request.param, vocab=VOCAB, max_len=K)


def test_forced_stop_probabilities_sum_to_one(family):
    e = family.enumerate(family.init(jax.random.PRNGKey(0)))
    assert float(jnp.exp(e.logp).sum()) == pytest.approx(1.0, abs=1e-12)
    stopped = float(jnp.exp(e.logp)[e.stopped].sum())
    assert 0.0 < stopped < 1.0  # the stopped responses carry real mass, and it is counted
    assert (np.asarray(e.lengths)[np.asarray(e.stopped)] == family.max_len).all()


def test_next_token_distributions_normalise(family):
    params = family.init(jax.random.PRNGKey(1))
    e = family.enumerate(params)
    lps = family.token_logprobs(params, e.seqs)
    np.testing.assert_allclose(np.exp(lps).sum(-1), 1.0, rtol=1e-12)


def test_enumeration_matches_sampling(family):
    params = family.init(jax.random.PRNGKey(2))
    p = np.exp(np.asarray(family.enumerate(params).logp))
    n = 20_000
    seqs, lengths = family.sample(params, jax.random.PRNGKey(3), n)
    family.validate(np.asarray(seqs), np.asarray(lengths))
    rows = response_index(family.vocab, family.max_len, np.asarray(seqs), np.asarray(lengths))
    counts = np.bincount(rows, minlength=len(p))
    se = np.sqrt(p * (1 - p) / n) + 1e-12
    assert np.all(np.abs(counts / n - p) < 5 * se + 2 / n)


def test_response_index_inverts_all_sequences():
    seqs, lengths = all_sequences(4, 4)
    np.testing.assert_array_equal(response_index(4, 4, seqs, lengths), np.arange(len(seqs)))


@pytest.mark.parametrize("name", CHAIN_NAMES)
@pytest.mark.parametrize("k", [1, 2, K])
def test_chain_metrics_equal_enumeration_with_a_forced_stop(name, k):
    fam = make_family(name, vocab=VOCAB, max_len=k)
    params = fam.init(jax.random.PRNGKey(k), 1.5)
    chain, enum = fam.metrics(params, REWARD), fam._enumerated_metrics(params, REWARD)
    for field in FIELDS:
        assert float(getattr(chain, field)) == pytest.approx(float(getattr(enum, field)), rel=1e-12, abs=1e-12), field
    t = np.arange(k + 2)
    e = fam.enumerate(params)
    tail_enum = [(np.exp(np.asarray(e.logp)) * (np.asarray(e.lengths) > ti)).sum() for ti in t]
    np.testing.assert_allclose(fam.length_tail(params, t), tail_enum, rtol=1e-12, atol=1e-14)
    assert fam.log_partition(params, 2.0) == pytest.approx(float(jax.nn.logsumexp(e.logp / 2.0)), rel=1e-12)


@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_unbounded_chain_metrics_agree_with_monte_carlo(name):
    fam = make_family(name, vocab=4, max_len=None)
    params = fam.init(jax.random.PRNGKey(11))
    m = fam.metrics(params, REWARD)
    n = 20_000
    seqs, lengths = fam.sample(params, jax.random.PRNGKey(12), n)
    fam.validate(np.asarray(seqs), np.asarray(lengths))
    assert (np.asarray(seqs)[np.arange(n), np.asarray(lengths) - 1] == EOS).all()  # whole responses
    lengths = np.asarray(lengths, dtype=float)
    logp = np.asarray(fam.logprob(params, seqs, jnp.asarray(lengths, dtype=int)))
    reward = np.asarray((REWARD[seqs] * fam.mask(jnp.asarray(lengths, dtype=int), seqs.shape[1])).sum(-1))
    for value, sample in [(m.expected_length, lengths), (m.sequence_entropy, -logp), (m.expected_reward, reward),
                          (fam.length_tail(params, 3), lengths > 3)]:
        sample = np.asarray(sample, dtype=float)
        se = sample.std(ddof=1) / math.sqrt(n)
        assert abs(sample.mean() - float(value)) < 4 * se, (float(value), sample.mean(), se)
    q = fam.length_quantile(params, 0.9)
    assert (lengths <= q).mean() >= 0.9 - 4 * math.sqrt(0.09 / n)
    assert (lengths <= q - 1).mean() < 0.9 + 4 * math.sqrt(0.09 / n)


def test_quantile_is_the_smallest_length_reaching_the_level():
    fam = make_family("bigram", vocab=4, max_len=None)
    params = fam.init(jax.random.PRNGKey(13))
    for q in (0.1, 0.5, 0.99, 0.999999):
        t = fam.length_quantile(params, q)
        cdf = 1.0 - np.asarray(fam.length_tail(params, [t, t - 1]))
        assert cdf[0] >= q > cdf[1]


@pytest.mark.parametrize("max_len", [None, 3, 8])
def test_unigram_closed_forms(max_len):
    fam = make_family("unigram", vocab=5, max_len=max_len)
    params = fam.init(jax.random.PRNGKey(4))
    p = np.asarray(jax.nn.softmax(params["theta"]))
    p_eos, h_token = p[EOS], float(-(p * np.log(p)).sum())
    length = geometric_expected_length(p_eos, max_len)
    assert float(fam.expected_length(params)) == pytest.approx(length, rel=1e-12)
    # i.i.d. tokens: the sequence entropy is the per-token entropy times the expected length
    assert float(fam.sequence_entropy(params)) == pytest.approx(h_token * length, rel=1e-12)
    assert float(fam.token_entropy(params)) == pytest.approx(h_token, rel=1e-12)
    assert float(fam.eos_probability(params)) == pytest.approx(p_eos, rel=1e-12)
    t = np.arange(6)
    tail = (1 - p_eos) ** t if max_len is None else np.where(t < max_len, (1 - p_eos) ** t, 0.0)
    np.testing.assert_allclose(fam.length_tail(params, t), tail, rtol=1e-12)
    stopped = 0.0 if max_len is None else (1 - p_eos) ** max_len
    assert float(fam.stopped_mass(params)) == pytest.approx(stopped, rel=1e-12, abs=1e-300)
    if max_len is None:  # geometric quantile: the smallest t with 1 - (1 - p)^t >= q
        assert fam.length_quantile(params, 0.5) == math.ceil(math.log(0.5) / math.log(1 - p_eos))


@pytest.mark.parametrize("name, max_len", [(n, k) for n in CHAIN_NAMES for k in (None, K)] + [("tabular", 3)])
def test_metric_gradients_match_finite_differences(name, max_len):
    fam = make_family(name, vocab=4, max_len=max_len)
    params = fam.init(jax.random.PRNGKey(5))
    flat, unravel = ravel_pytree(params)
    values = jax.jit(lambda f: jnp.stack(fam.metrics(unravel(f), REWARD)[:-1]))  # every metric, one program
    jac = np.asarray(jax.jit(jax.jacrev(values))(flat))
    direction = np.random.default_rng(0).normal(size=flat.shape)
    direction /= np.linalg.norm(direction)
    eps = 1e-6
    fd = (np.asarray(values(flat + eps * direction)) - np.asarray(values(flat - eps * direction))) / (2 * eps)
    scale = np.linalg.norm(jac, axis=1) + np.abs(np.asarray(values(flat)))
    error = np.abs(fd - jac @ direction)
    assert np.all(error <= 1e-7 * scale + 1e-12), dict(zip(FIELDS, error, strict=True))
    assert np.abs(jac).max() > 0


def _no_eos(fam, params):
    """The same policy with EOS's logit pushed to -60 everywhere (P(EOS) ~ 1e-26)."""
    if isinstance(fam, Unigram):
        return {"theta": params["theta"].at[EOS].set(-60.0)}
    return {**params, "W": params["W"].at[:, EOS].set(-60.0)}


def test_stop_len_is_the_forced_stop_and_refused_when_unbounded():
    assert make_family("unigram", vocab=3, max_len=5).stop_len == 5
    unbounded = make_family("unigram", vocab=3, max_len=None)
    with pytest.raises(DomainError, match="forced stop"):
        unbounded.stop_len  # noqa: B018 - the property is what is tested
    with pytest.raises(DomainError, match="forced stop"):  # the same refusal wherever K is needed
        unbounded.mask(jnp.asarray([1, 2]))


@pytest.mark.parametrize("name", ["unigram", "bigram"])  # the linear head shares the bigram's chain algebra
def test_every_metric_is_exact_or_refused_when_eos_is_near_zero(name):
    unbounded = make_family(name, vocab=4, max_len=None)
    params = _no_eos(unbounded, unbounded.init(jax.random.PRNGKey(6)))
    methods = ("expected_length", "sequence_entropy", "token_entropy", "eos_probability", "stopped_mass")
    if name == "unigram":  # one state: a division by P(EOS), exact for any P(EOS) > 0
        p = np.asarray(jax.nn.softmax(params["theta"]), dtype=float)
        h = float(-(p * np.log(p)).sum())
        assert float(unbounded.expected_length(params)) == pytest.approx(1 / p[EOS], rel=1e-12)
        assert float(unbounded.sequence_entropy(params)) == pytest.approx(h / p[EOS], rel=1e-12)
        assert float(unbounded.expected_reward(params, REWARD)) == pytest.approx(float(p @ np.asarray(REWARD)) / p[EOS],
                                                                               rel=1e-12)
    else:
        for method in methods:
            with pytest.raises(DomainError, match="refused"):
                getattr(unbounded, method)(params)
        with pytest.raises(DomainError, match="refused"):
            unbounded.expected_reward(params, REWARD)
        # inside a trace the refusal is a NaN that callers (the simulator) check, never a number
        assert np.isnan(float(jax.jit(unbounded.expected_length)(params)))
    with pytest.raises(DomainError, match="too small"):
        unbounded.sample(params, jax.random.PRNGKey(0), 4)
    # a forced stop is exact for any EOS probability: enumeration agrees to 1e-12
    forced = make_family(name, vocab=VOCAB, max_len=K)
    chain, enum = forced.metrics(params, REWARD), forced._enumerated_metrics(params, REWARD)
    assert float(chain.stopped_mass) == pytest.approx(1.0, abs=1e-9)
    for field in FIELDS:
        assert float(getattr(chain, field)) == pytest.approx(float(getattr(enum, field)), rel=1e-12, abs=1e-12)
    assert float(forced.expected_length(params)) == pytest.approx(K, abs=1e-9)


def test_a_long_but_well_conditioned_chain_is_exact():
    fam = make_family("unigram", vocab=4, max_len=None)
    theta = jnp.array([-12.0, 0.0, 0.0, 0.0])  # P(EOS) ~ 2e-6: E[L] ~ 5e5, bound ~ 2e-10
    p_eos = float(jax.nn.softmax(theta)[EOS])
    m = fam.metrics({"theta": theta})
    assert float(m.error_bound) <= CHAIN_RTOL
    assert float(fam.expected_length({"theta": theta})) == pytest.approx(1 / p_eos, rel=1e-10)


def test_vocabulary_1000_unbounded_metrics():
    fam = make_family("bigram", vocab=1000, max_len=None)
    params = fam.init(jax.random.PRNGKey(7))
    params = {"W": params["W"].at[:, EOS].add(5.0)}  # P(EOS) ~ 0.13 in every state
    m = fam.metrics(params, jnp.linspace(-1, 1, 1000))
    assert all(np.isfinite(float(x)) for x in m) and float(m.error_bound) <= CHAIN_RTOL
    # expected length is the sum of visits: also E[L] = sum_t P(L > t) (the tail past 400 is < 1e-20)
    tails = np.asarray(fam.length_tail(params, np.arange(0, 400)))
    assert float(m.expected_length) == pytest.approx(tails.sum(), rel=1e-9)


def _direct_chain(fam, params, token_reward):
    """(E[L], sequence entropy, E[reward]) of an unbounded bigram or linear head written out
    independently: P from the state logits, Q its content columns shifted to the next state, and
    the fundamental matrix by ``jnp.linalg.inv`` (differentiated by JAX's own rules)."""
    logp = jax.nn.log_softmax(fam.state_logits(params), axis=-1)
    p = jnp.exp(logp)
    s = fam.n_states
    q = jnp.zeros((s, s)).at[:, : s - 1].set(p[:, 1:])  # token i leads to state i - 1
    visits = jnp.linalg.inv(jnp.eye(s) - q)[s - 1]  # the start state's row
    return jnp.stack([visits.sum(), visits @ -(p * logp).sum(-1), visits @ (p @ token_reward)])


@pytest.mark.parametrize("name", ["bigram", "linear_head"])
def test_unbounded_metrics_and_gradients_match_a_direct_inverse(name):
    fam = make_family(name, vocab=40, max_len=None)
    params = fam.init(jax.random.PRNGKey(14), 1.5)
    reward = jnp.linspace(-1.0, 1.0, 40)

    def chain(p):
        m = fam.metrics(p, reward)
        return jnp.stack([m.expected_length, m.sequence_entropy, m.expected_reward])

    direct = jax.jit(lambda p: _direct_chain(fam, p, reward))
    np.testing.assert_allclose(chain(params), direct(params), rtol=1e-12)
    jac, ref = jax.jit(jax.jacrev(chain))(params), jax.jit(jax.jacrev(direct))(params)
    for key in params:
        scale = np.abs(np.asarray(ref[key])).max()
        assert scale > 0
        np.testing.assert_allclose(jac[key], ref[key], rtol=0, atol=1e-11 * scale)


def test_unbounded_metrics_are_within_their_stated_error_bound():
    # a 50-digit solve of the same chain is the reference; the EOS logits are lowered until the
    # bound is within two decades of CHAIN_RTOL, where rounding is visible
    import mpmath

    fam = make_family("bigram", vocab=24, max_len=None)
    params = fam.init(jax.random.PRNGKey(15))
    params = {"W": params["W"].at[:, EOS].add(-7.0)}
    m = fam.metrics(params)
    bound = float(m.error_bound)
    assert 1e-12 < bound <= CHAIN_RTOL
    with mpmath.workdps(50):
        w = mpmath.matrix(np.asarray(fam.state_logits(params)).tolist())
        s = fam.n_states
        a = mpmath.eye(s)
        for i in range(s):
            row = [mpmath.exp(w[i, v]) for v in range(fam.vocab)]
            total = mpmath.fsum(row)
            for j in range(s - 1):
                a[i, j] -= row[j + 1] / total
        e = mpmath.matrix([0] * (s - 1) + [1])
        visits = mpmath.lu_solve(a.T, e)
        length = mpmath.fsum(visits)
    error = abs(mpmath.mpf(float(m.expected_length)) - length) / length
    assert float(error) <= bound
    assert float(length) == pytest.approx(float(m.expected_length), rel=bound)


def test_unbounded_metric_gradients_differentiate_again_and_batch():
    fam = make_family("bigram", vocab=4, max_len=None)
    params = fam.init(jax.random.PRNGKey(16))
    flat, unravel = ravel_pytree(params)
    grad = jax.jit(jax.grad(lambda f: fam.metrics(unravel(f), REWARD).expected_reward))
    direction = np.random.default_rng(1).normal(size=flat.shape)
    _, hvp = jax.jvp(grad, (flat,), (jnp.asarray(direction),))  # second order, through the adjoint solve
    eps = 1e-5
    fd = (np.asarray(grad(flat + eps * direction)) - np.asarray(grad(flat - eps * direction))) / (2 * eps)
    np.testing.assert_allclose(hvp, fd, rtol=0, atol=1e-7 * np.abs(fd).max())
    # a batch of policies (the runner vmaps over seeds and settings) gives each policy's metrics
    batch = jax.tree_util.tree_map(lambda *x: jnp.stack(x), params, fam.init(jax.random.PRNGKey(17)))
    together = jax.vmap(lambda p: fam.metrics(p, REWARD))(batch)
    for i in range(2):
        alone = fam.metrics(jax.tree_util.tree_map(lambda x, i=i: x[i], batch), REWARD)
        for field in ChainMetrics._fields:
            assert float(getattr(together, field)[i]) == pytest.approx(float(getattr(alone, field)), rel=1e-12,
                                                                      abs=1e-300)


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


def test_canonical_variables(family):
    params, ref_params = family.init(jax.random.PRNGKey(9)), family.init(jax.random.PRNGKey(10))
    e = family.enumerate(params)
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(e.lengths), 20), rng.integers(0, len(e.lengths), 20)
    pair = (e.seqs[i], e.lengths[i], e.seqs[j], e.lengths[j])
    v = canonical_variables(family, params, reference_values(family, ref_params, *pair), *pair)
    np.testing.assert_allclose(v["lp_w"], e.logp[i], rtol=1e-12)
    np.testing.assert_allclose(v["ref_l"], family.logprob(ref_params, e.seqs[j], e.lengths[j]), rtol=1e-12)
    shared = jnp.minimum(e.lengths[i], e.lengths[j])
    np.testing.assert_allclose(v["tail_w"], family.tail_logprob(params, e.seqs[i], e.lengths[i], shared), rtol=1e-12)
    np.testing.assert_allclose(v["ref_tail_l"], family.tail_logprob(ref_params, e.seqs[j], e.lengths[j], shared),
                               rtol=1e-12)
    np.testing.assert_array_equal(v["len_l"], e.lengths[j])
    from gradlab.symbols import CANONICAL, EXTRA

    assert set(v) == {str(s) for s in CANONICAL + EXTRA}
    assert set(POLICY_VARIABLES) == {"lp_w", "lp_l"} | {str(s) for s in EXTRA if not str(s).startswith("ref_")}
    # the sequence-level tempered reference: log pi_0^(1/tau) - log Z
    tempered = reference_values(family, ref_params, *pair, tau=2.0)
    vt = canonical_variables(family, params, tempered, *pair)
    np.testing.assert_allclose(vt["ref_w"], family.tempered_logprob(ref_params, e.seqs[i], e.lengths[i], 2.0),
                               rtol=1e-12)


def test_linear_head_shares_parameters_across_contexts():
    fam = LinearHead(vocab=4, max_len=3, dim=2)
    params = fam.init(jax.random.PRNGKey(9))
    e = fam.enumerate(params)
    g = jax.grad(lambda p: fam.logprob(p, e.seqs[3:4], e.lengths[3:4]).sum())(params)
    assert np.count_nonzero(np.asarray(g["W"])) == g["W"].size  # one sequence touches every row


def test_chain_logits_on_sequences_are_the_state_logits():
    for name in CHAIN_NAMES:
        fam = make_family(name, vocab=VOCAB, max_len=K)
        params = fam.init(jax.random.PRNGKey(1))
        e = fam.enumerate(params)
        m = fam.metrics(params, REWARD)  # the chain test's program: the reward moves no length
        # the chain's visits reproduce enumeration, so the state map agrees with logits(); and
        # a state's logits are those at any position whose previous token leads to it
        assert float(m.expected_length) == pytest.approx(float((jnp.exp(e.logp) * e.lengths).sum()), rel=1e-12)
        logits = fam.logits(params, e.seqs)
        np.testing.assert_allclose(logits[:, 0], jnp.broadcast_to(fam.state_logits(params)[fam.start_state],
                                                                  logits[:, 0].shape), rtol=1e-12)


def test_bad_families_and_responses_are_refused():
    with pytest.raises(UnknownVariableError, match="the families are"):
        make_family("transformer")
    with pytest.raises(DomainError, match="needs a forced stop"):
        make_family("tabular", max_len=None)
    for bad in (0, -3, 2.5):
        with pytest.raises(DomainError, match="max_len"):
            make_family("unigram", max_len=bad)
    with pytest.raises(DomainError, match="vocab"):
        make_family("bigram", vocab=1)
    unbounded = make_family("unigram", max_len=None)
    with pytest.raises(DomainError, match="forced stop"):
        unbounded.enumerate(unbounded.init(jax.random.PRNGKey(0)))
    forced = make_family("unigram", vocab=4, max_len=3)
    with pytest.raises(DomainError, match="only EOS"):
        forced.validate(np.array([[1, 0, 2]]), np.array([3]))  # EOS inside
    with pytest.raises(DomainError, match="only EOS"):
        unbounded.validate(np.array([[1, 2, 3]]), np.array([3]))  # no EOS and no forced stop
    forced.validate(np.array([[1, 2, 3]]), np.array([3]))  # stopped: a response
    with pytest.raises(DomainError, match="quantile"):
        forced.length_quantile(forced.init(jax.random.PRNGKey(0)), 1.0)


def test_the_registry_holds_every_family_and_their_facts():
    from gradlab import policies

    assert list(policies.REGISTRY) == ["unigram", "tabular", "bigram", "linear_head", "hidden_state", "softmax"]
    assert list(policies.FAMILIES) == ["unigram", "tabular", "bigram", "linear_head", "hidden_state"]
    assert not hasattr(policies, "SingleContext") and not hasattr(policies, "SINGLE_CONTEXT_FAMILIES")
    single = policies.family_class("hidden_state", context="single")
    assert single is policies.SingleHiddenState and single.single_context
    chain = policies.family_class("hidden_state", context="previous_token")
    assert chain is policies.ChainHiddenState and chain.finite_state
    assert not policies.family_class("hidden_state", context="prefix").finite_state
    assert policies.Softmax.variables == ("lp_w", "lp_l", "ref_w", "ref_l")
    assert {"len_w", "tail_w"} <= set(policies.Unigram.variables)
    # from_config: vocab counts content tokens (an EOS family adds EOS); dim defaults to W's width
    fam = policies.REGISTRY["hidden_state"].from_config(vocab=2, max_len=None, W=((1.0, 0.0),) * 3)
    assert isinstance(fam, policies.ChainHiddenState) and (fam.vocab, fam.dim) == (3, 2)
    assert policies.REGISTRY["softmax"].from_config(vocab=4, max_len=None).k == 4
    with pytest.raises(UnknownVariableError, match="softmax"):
        policies.family_class("transformer")


def test_registering_refuses_a_clash_and_unregistering_forgets():
    from dataclasses import dataclass

    from gradlab import policies

    @dataclass(frozen=True)
    class Impostor(policies.Unigram):
        name = "unigram"

    with pytest.raises(ValueError, match="already registered"):
        policies.register(Impostor)
    assert policies.REGISTRY["unigram"] is policies.Unigram

    @dataclass(frozen=True)
    class Other(policies.Unigram):
        name = "other_unigram"

    try:
        assert policies.register(Other) is Other and "other_unigram" in policies.FAMILIES
    finally:
        policies.unregister("other_unigram")
    assert "other_unigram" not in policies.REGISTRY


@pytest.mark.parametrize("name", ["unigram", "bigram", "tabular", "linear_head", "hidden_state"])
def test_hidden_states_read_the_logits(name):
    """Each position's logits are its hidden state times the family's unembedding (the logit
    table for a one-hot state, W for linear_head, the fixed W for hidden_state)."""
    from gradlab.policies import make_family

    fam = make_family(name, vocab=VOCAB, max_len=K)
    params = fam.init(jax.random.PRNGKey(3), 1.0)
    seqs = jnp.asarray([[1, 2, 3, 0], [3, 3, 0, 0], [0, 0, 0, 0]])
    hidden = fam.hidden_states(params, seqs)
    unembedding = {"linear_head": lambda: params["W"].T, "hidden_state": lambda: fam.fixed_W().T}.get(
        name, lambda: fam.table_logits(params))()
    np.testing.assert_allclose(hidden @ unembedding, fam.logits(params, seqs), rtol=1e-12, atol=1e-12)
