r"""Exact expected gradients of the group losses on the toy policies, at the first on-policy step.

The unit is a group of G responses drawn i.i.d. from the policy for one prompt, each with a
binary reward. At the first on-policy step (π = π_old = π_ref, so ρ = κ = 1 and the k3 term's
gradient vanishes) every loss of :mod:`gradlab.group_losses` puts one weight
:math:`w_i = w(A_i, |o_i|, \sum_j|o_j|, G)` on every token of response i, so the gradient of the
expected loss is

.. math:: \nabla \mathbb{E}[\mathcal{L}] = -\mathbb{E}\Bigl[\sum_i w_i \nabla\log\pi(o_i)\Bigr]
          = -G \sum_{r, n} c(r, n)\, \nabla P_\theta(r, n), \qquad
          c(r, n) = \mathbb{E}\bigl[w_1 \mid r_1 = r, |o_1| = n\bigr],

by symmetry over the G responses, with c held fixed (the advantages and normalisers are
detached, as in TRL). :math:`P_\theta(r, n)` is the joint law of one response's reward and
length, and c is an expectation over the other G - 1 responses:

- the advantage depends on the others only through K, their number of successes:
  Binomial(G - 1, p) with p = P(r = 1);
- a per-sequence normaliser (``grpo``: G|o_i|) needs only the length n; a group-coupled one
  (``bnpo``, ``dapo``, ``cispo``, ``vespo``: Σ_j|o_j|) needs the joint law of (K, S), S the
  others' total length: the (G - 1)-fold convolution of P, computed exactly with FFTs, by K.

The joint law :math:`P_\theta(r, n)` comes from a dynamic programme over (policy state, reward
automaton state) for the chains (unigram, bigram; unbounded or with a forced stop), from
enumeration for the tabular family, and is one line for the single-context softmax (every
response is one token long). Unbounded lengths are summed exactly up to a horizon N past which
the length distribution's mass is below ``tol``, and the truncation's effect on the gradient is
bounded and reported (``tail_bound``, see :func:`exact_gradient`).

``expectation="sample"`` draws groups instead and reports the Monte Carlo standard error.

Rewards are binary and built by :func:`first_token`, :func:`contains` (finite automata on the
tokens, so the chains stay exact), :func:`table` (one value per enumerated response, or per
action of a softmax) or :func:`function` (any JAX-traceable function of a response, evaluated on
the enumeration). |o| counts the content tokens and the EOS, as TRL's completion mask does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab import caches
from gradlab.errors import DomainError
from gradlab.group_losses import ADVANTAGES, GroupLoss, advantages, get_group_loss, weight_function
from gradlab.policies import EOS, Bigram, ChainFamily, SingleContextFamily, Tabular, Unigram, all_sequences

__all__ = ["Reward", "GroupGradient", "first_token", "contains", "table", "function", "joint_law", "coefficients",
           "exact_gradient", "sample_gradient", "expected_gradient", "EXACT_FAMILIES"]

Params = Any
EXACT_FAMILIES = (Unigram, Bigram, Tabular, SingleContextFamily)
# the product chain (policy states x automaton states) is propagated densely; past this many
# (state x state x step) entries the exact step is refused (it would take minutes)
MAX_WORK = 2e10


@dataclass(frozen=True)
class Reward:
    """A binary reward of a response: ``first_token`` or ``contains`` (a set of content tokens),
    or ``table`` (one 0/1 value per enumerated response, or per softmax action)."""

    kind: str
    tokens: tuple[int, ...] = ()
    values: tuple[float, ...] = ()

    def automaton(self, vocab: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(delta (D, vocab) next state after each token, accept (D,) bool, start): the reward is
        ``accept`` of the state after the response's content tokens (EOS changes nothing)."""
        hit = np.isin(np.arange(vocab), self.tokens)
        if self.kind == "first_token":  # states: 0 before any token, 1 hit, 2 miss
            delta = np.stack([np.where(hit, 1, 2), np.ones(vocab, int), np.full(vocab, 2)])
            return delta, np.array([False, True, False]), 0
        if self.kind == "contains":  # states: 0 not yet, 1 seen
            return np.stack([np.where(hit, 1, 0), np.ones(vocab, int)]), np.array([False, True]), 0
        raise DomainError(f"a '{self.kind}' reward has no automaton: it needs an enumerable family (tabular, softmax)")

    def of_sequences(self, seqs: np.ndarray, lengths: np.ndarray, vocab: int) -> np.ndarray:
        """The 0/1 reward of each response (rows of tokens with their lengths)."""
        seqs, lengths = np.asarray(seqs), np.asarray(lengths)
        delta, accept, start = self.automaton(vocab)
        state = np.full(len(seqs), start)
        for t in range(seqs.shape[1]):
            content = (t < lengths) & (seqs[:, t] != EOS)
            state = np.where(content, delta[state, seqs[:, t]], state)
        return accept[state].astype(float)


def first_token(*tokens: int) -> Reward:
    """1 when the first content token is one of ``tokens`` (0 for an empty response), else 0."""
    return Reward("first_token", _content_tokens(tokens))


def contains(*tokens: int) -> Reward:
    """1 when the response has one of ``tokens``, else 0."""
    return Reward("contains", _content_tokens(tokens))


def table(values: Any) -> Reward:
    """One 0/1 reward per response in the family's enumeration order (per action for a softmax)."""
    v = np.asarray(values, dtype=float).ravel()
    if not np.isin(v, (0.0, 1.0)).all():
        raise DomainError("a reward table holds 0/1 values (binary rewards: the exact step conditions on successes)")
    return Reward("table", values=tuple(v.tolist()))


def function(fn: Any, family: Any) -> Reward:
    """A reward from any JAX-traceable ``fn(tokens, length) -> 0 or 1`` of a response (its EOS-padded
    tokens and its length, EOS included; for a softmax, ``fn(action, 1)``), evaluated once on every
    response of the family's enumeration (vmapped): a :func:`table`. Needs an enumerable family (a
    forced stop, or a softmax)."""
    _check_family(family)
    if isinstance(family, SingleContextFamily):
        seqs, lengths = np.arange(family.k), np.ones(family.k, dtype=int)
    elif family.forced_stop:
        seqs, lengths = all_sequences(family.vocab, family.max_len)
    else:
        raise DomainError("a reward function is evaluated on every response: it needs a forced stop (max_len=K) "
                          "or a softmax; for an unbounded chain use first_token or contains")
    values = np.asarray(jax.vmap(fn)(jnp.asarray(seqs), jnp.asarray(lengths)), dtype=float)
    return table(values)


def _content_tokens(tokens: tuple[int, ...]) -> tuple[int, ...]:
    if not tokens or any(not isinstance(t, int | np.integer) or t < 1 for t in tokens):
        raise DomainError(f"reward tokens are content tokens 1..V-1 (0 is EOS), not {list(tokens)}")
    return tuple(int(t) for t in tokens)


class GroupGradient(NamedTuple):
    """The gradient of the expected group loss (descend it: the update is ``-lr * grad``).

    ``stderr`` is the Monte Carlo standard error per parameter (``expectation="sample"``), None
    when exact. ``success`` is p = P(reward = 1). ``horizon`` is N: lengths up to N are summed
    exactly (exact mode). ``tail_bound`` bounds the L1 norm of (true - computed) gradient from
    the mass beyond N (0 when nothing is truncated). ``groups`` is the number of sampled groups.
    """

    grad: Params
    stderr: Params | None
    success: float
    horizon: int
    tail_bound: float
    groups: int | None = None


# --------------------------------------------------------------------------------------------
# The joint law of one response's reward and length
# --------------------------------------------------------------------------------------------


def _check_family(family: Any) -> None:
    if not isinstance(family, EXACT_FAMILIES):
        raise DomainError(f"the exact group gradient is for the unigram, bigram, tabular and softmax families, "
                          f"not {getattr(family, 'name', type(family).__name__)}")


def horizon(family: Any, params: Params, tol: float = 1e-14) -> int:
    """N: the longest length summed exactly. The forced stop K, 1 for a softmax, else the
    smallest N with P(length > N) <= tol (``length_quantile``)."""
    if isinstance(family, SingleContextFamily):
        return 1
    if family.forced_stop:
        return int(family.max_len)
    n = max(int(family.length_quantile(params, 1.0 - tol)), 1)
    return -(-n // 256) * 256  # a multiple of 256: few compilations as the policy moves


def joint_law(family: Any, params: Params, reward: Reward, n: int) -> tuple[jax.Array, jax.Array]:
    """(P (2, n + 1), beyond): P[r, m] = P(reward = r, length = m) for m <= n (column 0 is 0),
    and ``beyond`` = the product-chain state distribution after n tokens (its sum is
    P(length > n); zeros when nothing is left). Differentiable in ``params``."""
    _check_family(family)
    return law_of(family, params, reward_arrays(family, reward), n)


def reward_arrays(family: Any, reward: Reward) -> dict[str, np.ndarray]:
    """The reward as arrays, the form a compiled program takes: the reward automaton
    (``delta``, ``accept``, ``start`` one-hot) for a chain, else one 0/1 value per response of
    the family's enumeration (``items``, ``lengths``, ``reward``), or per softmax action."""
    _check_family(family)
    if isinstance(family, SingleContextFamily):
        return {"reward": _table(reward, family.k)}
    if isinstance(family, ChainFamily) and reward.kind != "table":
        delta, accept, start = reward.automaton(family.vocab)
        return {"delta": delta, "accept": accept.astype(float), "start": np.eye(len(accept))[start]}
    if not family.forced_stop:
        raise DomainError("a reward table needs a forced stop (max_len=K): unbounded responses cannot be listed")
    seqs, lengths = all_sequences(family.vocab, family.max_len)  # the order of family.enumerate
    r = _table(reward, len(seqs)) if reward.kind == "table" else reward.of_sequences(seqs, lengths, family.vocab)
    return {"items": np.asarray(seqs), "lengths": np.asarray(lengths), "reward": r}


def law_of(family: Any, params: Params, arrays: Mapping[str, Any], n: int) -> tuple[jax.Array, jax.Array]:
    """:func:`joint_law` from :func:`reward_arrays` (numpy or traced: the compiled runner's form)."""
    if isinstance(family, SingleContextFamily):
        p = family.probabilities(params)
        r = jnp.asarray(arrays["reward"], dtype=p.dtype)
        law = jnp.zeros((2, 2), p.dtype).at[:, 1].set(jnp.stack([p @ (1 - r), p @ r]))
        return law, jnp.zeros(1, p.dtype)
    if "delta" in arrays:
        return _chain_law(family, params, arrays, n)
    p = jnp.exp(family.logprob(params, jnp.asarray(arrays["items"]), jnp.asarray(arrays["lengths"])))
    r = jnp.asarray(arrays["reward"]).astype(jnp.int32)
    law = jnp.zeros((2, n + 1), p.dtype).at[r, jnp.asarray(arrays["lengths"])].add(p)
    return law, jnp.zeros(1, p.dtype)


def _table(reward: Reward, size: int) -> np.ndarray:
    if reward.kind != "table":
        r = None
    else:
        r = np.asarray(reward.values)
    if r is None or len(r) != size:
        raise DomainError(f"this family needs a reward table of {size} values (one per response)"
                          if reward.kind == "table" else
                          f"a softmax has no tokens: give a reward table of its {size} actions")
    return r


def _product(family: ChainFamily, params: Params, arrays: Mapping[str, Any]):
    """The product chain of the policy and the reward automaton: (T (X, X) content transitions,
    eos (X,), accept (X,), start (X,) distribution), X = states x automaton states."""
    delta, accept = arrays["delta"], arrays["accept"]
    d_count = accept.shape[0]
    p = jnp.exp(jax.nn.log_softmax(family.state_logits(params), axis=-1))  # (S, V)
    nxt = family.next_state()
    s_count, vocab = nxt.shape
    s, d, v = np.meshgrid(np.arange(s_count), np.arange(d_count), np.arange(1, vocab), indexing="ij")
    rows = (s * d_count + d).ravel()
    cols = (nxt[s, v] * d_count + jnp.asarray(delta)[d, v]).ravel()  # delta may be traced
    x = s_count * d_count
    t = jnp.zeros((x, x), p.dtype).at[rows, cols].add(p[s.ravel(), v.ravel()])
    eos = jnp.repeat(p[:, EOS], d_count)
    start = jnp.kron(jax.nn.one_hot(family.start_state, s_count, dtype=p.dtype), jnp.asarray(arrays["start"]))
    return t, eos, jnp.tile(jnp.asarray(accept, dtype=p.dtype), s_count), start


def _chain_law(family: ChainFamily, params: Params, arrays: Mapping[str, Any], n: int) -> tuple[jax.Array, jax.Array]:
    x = family.n_states * arrays["accept"].shape[0]
    if x * x * n > MAX_WORK:
        raise DomainError(f"the exact group step needs {n} steps of a {x}-state product chain (policy x reward "
                          f"automaton); that is beyond {MAX_WORK:.0e} operations. Use a smaller vocabulary, a "
                          "forced stop (max_len=K), or expectation='sample'")
    return _chain_law_jit(family, n, params, arrays)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _chain_law_jit(family: ChainFamily, n: int, params: Params,
                   arrays: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    t, eos, acc, alpha0 = _product(family, params, arrays)

    def step(alpha, _):
        ended = alpha * eos
        return alpha @ t, jnp.stack([ended @ (1 - acc), ended @ acc])

    beyond, cols = jax.lax.scan(step, alpha0, None, length=n)
    law = jnp.concatenate([jnp.zeros((2, 1), t.dtype), cols.T], axis=1)
    if family.forced_stop:  # K content tokens and no EOS: length K, reward from the automaton
        law = law.at[:, n].add(jnp.stack([beyond @ (1 - acc), beyond @ acc]))
        beyond = jnp.zeros_like(beyond)
    return law, beyond


def _remaining(family: ChainFamily, params: Params, reward: Reward) -> np.ndarray:
    """E[tokens still to come, EOS included | product state]: (I - T)^-1 1."""
    t, _, _, _ = _product(family, params, reward_arrays(family, reward))
    return np.linalg.solve(np.eye(t.shape[0]) - np.asarray(t), np.ones(t.shape[0]))


# --------------------------------------------------------------------------------------------
# The coefficients c(r, n): the expected weight given one response's reward and length
# --------------------------------------------------------------------------------------------


def _weight_parts(loss: GroupLoss, values: Any) -> tuple[bool, bool, bool]:
    """(reads |o_i|, reads sum_j |o_j|, linear in A) of the first-step weight (from sympy)."""
    return _weight_parts_memo(loss, tuple(sorted((values or {}).items())))


@caches.memo(maxsize=256)
def _weight_parts_memo(loss: GroupLoss, items: tuple[tuple[str, Any], ...]) -> tuple[bool, bool, bool]:
    import sympy

    from gradlab.group_losses import A, len_i, len_sum

    e = loss.first_step(dict(items))
    linear = sympy.simplify(e - A * sympy.diff(e, A)) == 0 and A not in sympy.diff(e, A).free_symbols
    return len_i in e.free_symbols, len_sum in e.free_symbols, linear


SCALES = tuple(ADVANTAGES)  # scale_rewards, by index in a compiled program


def _group_rewards(g: int) -> np.ndarray:
    """(2, G, G): response 1's reward r, then k ones and G - 1 - k zeros, for r in (0, 1), k < G."""
    others = (np.arange(g - 1)[None, :] < np.arange(g)[:, None]).astype(float)  # (G, G - 1): k ones
    return np.stack([np.concatenate([np.full((g, 1), r), others], axis=1) for r in (0.0, 1.0)])


def advantage_table(group_size: int, scale_rewards: str, success: Any) -> Any:
    """A[r, k]: the advantage of a response with reward r when k of the other G - 1 succeed,
    from :func:`gradlab.group_losses.advantages` on the group's reward vector. ``"batch"``
    takes the batch to be many groups of this prompt: its std is sqrt(p (1 - p)). ``success``
    may be traced (then so is the table)."""
    rewards = _group_rewards(int(group_size))
    if scale_rewards != "batch":
        return np.asarray(advantages(rewards, scale_rewards))[..., 0]
    if isinstance(success, float | int | np.floating):
        return np.asarray(advantages(rewards, "batch", batch_std=math.sqrt(max(success * (1 - success), 0.0))))[..., 0]
    std = jnp.sqrt(jnp.maximum(success * (1 - success), 0.0))
    return advantages(jnp.asarray(rewards), "batch", batch_std=std)[..., 0]


def coefficients(loss: GroupLoss | str, law: np.ndarray, group_size: int, *, scale_rewards: str | None = None,
                 values: Any = None) -> np.ndarray:
    """c[r, n] = E[w_1 | r_1 = r, |o_1| = n] over the other G - 1 responses drawn from ``law``
    ((2, N + 1) sub-probabilities of (reward, length)). Numpy, float64; no gradient flows."""
    loss = get_group_loss(loss)
    g = int(group_size)
    if g < 2:
        raise DomainError(f"a group needs at least 2 responses, not {group_size}")
    law = np.clip(np.asarray(law, dtype=float), 0.0, None)
    p = law[1].sum() / law.sum()
    adv = advantage_table(g, scale_rewards or loss.scale_rewards, float(p))
    reads_len, reads_sum, linear = _weight_parts(loss, values)
    if reads_sum and (reads_len or not linear):
        raise DomainError(f"the first-step weight of '{loss.name}' reads both |o_i| and sum_j |o_j| (or is not "
                          "linear in A); its exact expectation is not implemented: use expectation='sample'")
    return np.asarray(expected_weight(weight_function(loss, values), law, adv, g, reads_sum, np))


def expected_weight(w: Any, law: Any, adv: Any, g: int, reads_sum: bool, xp: Any) -> Any:
    """c[r, n] (:func:`coefficients`) from the weight ``w(A, |o_i|, sum_j |o_j|, G)``, the law
    (2, N + 1), the advantage table A[r, k] (2, G) and whether w reads the group's total length
    (then w = A phi(sum_j |o_j|)); ``xp`` is numpy or jax.numpy (traced in a compiled run)."""
    n_max = law.shape[1] - 1
    q0, q1 = law[0].sum(), law[1].sum()
    ks = np.arange(g)
    binom = np.array([math.comb(g - 1, int(k)) for k in ks], dtype=float)
    n = np.arange(n_max + 1, dtype=float)
    n[0] = 1.0  # column 0 holds no mass; any length keeps the weight finite there
    if not reads_sum:
        pk = binom * q1**ks * q0 ** (g - 1 - ks)  # P(K = k), sub-probability
        grid = w(adv[:, :, None], n[None, None, :], n[None, None, :], g)  # (2, G, N + 1)
        return xp.einsum("k,rkn->rn", pk, grid)
    # w = A phi(sum_j |o_j|), so c[r, n] = sum_k A[r, k] sum_s L_k[s] phi(n + s) with
    # L_k[s] = P(K = k, S = s) = C(G-1, k) (law_1^{*k} * law_0^{*(G-1-k)})[s], the others' convolution.
    # Both sums run in the frequency domain: the correlation with phi is linear in L_k, so the
    # spectra are combined with the weights A[r, k] first (one inverse FFT per reward value).
    from scipy import fft

    size = (g - 1) * n_max + 1
    fft_size = fft.next_fast_len(size + n_max + 1, real=True)
    ffts = fft if xp is np else xp.fft  # scipy's FFTs on the host (faster than numpy's), JAX's when traced
    f0, f1 = ffts.rfft(law[0], fft_size), ffts.rfft(law[1], fft_size)
    # sum_k a_k f1^k f0^(G-1-k) by a Horner-type recurrence: B <- B f0 + a_k f1^k (no powers, no division)
    a = adv * binom[None, :]  # (2, G)
    combined = a[:, :1] * xp.ones_like(f0)[None, :]
    power = xp.ones_like(f0)
    for k in ks[1:]:  # augmented assignment: in place for numpy (no temporaries), a new array for JAX
        power *= f1
        combined *= f0[None, :]
        combined += a[:, k, None] * power[None, :]
    total = np.arange(size + n_max + 1, dtype=float)
    total[0] = 1.0
    phi = w(np.ones_like(total), total, total, g)
    corr = ffts.irfft(xp.conj(combined) * ffts.rfft(phi, fft_size)[None, :], fft_size, axis=-1)
    return corr[:, : n_max + 1]  # (2, N + 1)


# --------------------------------------------------------------------------------------------
# The exact step and the sampled one
# --------------------------------------------------------------------------------------------


def exact_gradient(loss: GroupLoss | str, family: Any, params: Params, reward: Reward, *, group_size: int,
                   scale_rewards: str | None = None, values: Any = None, tol: float = 1e-14) -> GroupGradient:
    """The exact gradient of the expected group loss at the first on-policy step.

    Args:
        loss: a group loss or its name (``grpo``, ``dr_grpo``, ``dapo``, ...).
        family, params: a unigram or bigram chain (unbounded or forced stop), a tabular family
            or a softmax (:mod:`gradlab.policies`), and its parameters.
        reward: :func:`first_token`, :func:`contains` or :func:`table`.
        group_size: G, the responses per prompt (at least 2).
        scale_rewards: ``group``, ``batch``, ``none`` or ``leave_one_out``; default the loss's.
        values: hyperparameter values (``max_completion_length``, ``epsilon_high``, ...).
        tol: unbounded chains are summed exactly up to the length N with P(length > N) <= tol.

    Returns:
        :class:`GroupGradient`. ``tail_bound`` bounds the L1 distance to the untruncated
        gradient: every normaliser decreases with length, so |w| <= w_max = max |w| at the
        shortest lengths; the gradient of log pi of a token has L1 norm <= 2 in these families
        (free logits per state), so the responses longer than N contribute at most
        2 G w_max E[L 1{L > N}], and truncating the other G - 1 moves c by at most
        w_max (G - 1) P(L > N), adding 2 G w_max (G - 1) P(L > N) E[L].
    """
    loss = get_group_loss(loss)
    _check_family(family)
    g = int(group_size)
    n = horizon(family, params, tol)
    law, beyond = joint_law(family, params, reward, n)
    law_np = np.asarray(law)
    c = jnp.asarray(coefficients(loss, law_np, g, scale_rewards=scale_rewards, values=values))
    grad = _surrogate_grad(family, reward, n, params, -g * c)
    success = float(law_np[1].sum() / law_np.sum())
    tail = float(np.asarray(beyond).sum())
    bound = 0.0
    if tail > 0:
        rest = _remaining(family, params, reward)
        tail_length = float(np.asarray(beyond) @ (n + rest))  # E[L 1{L > N}]
        expected_length = float((law_np * np.arange(n + 1)).sum()) + tail_length
        w_max = float(np.abs(np.asarray(weight_function(loss, values)(
            advantage_table(g, scale_rewards or loss.scale_rewards, success), 1.0, float(g), g))).max())
        bound = 2 * g * w_max * (tail_length + (g - 1) * tail * expected_length)
    return GroupGradient(grad, None, success, n, bound)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _surrogate_grad(family: Any, reward: Reward, n: int, params: Params, c: jax.Array) -> Params:
    """grad of sum_{r,m} c[r, m] P_theta(r, m), c held fixed."""
    return jax.grad(lambda theta: jnp.sum(c * joint_law(family, theta, reward, n)[0]))(params)


def sample_gradient(loss: GroupLoss | str, family: Any, params: Params, reward: Reward, *, group_size: int,
                    groups: int, key: jax.Array, scale_rewards: str | None = None,
                    values: Any = None) -> GroupGradient:
    """The same gradient estimated from ``groups`` sampled groups: the mean of the per-group
    gradients and its standard error. ``"batch"`` scaling divides by the std of every sampled
    reward (the batch is all the groups)."""
    loss = get_group_loss(loss)
    _check_family(family)
    g, m = int(group_size), int(groups)
    if g < 2 or m < 2:
        raise DomainError("sampling needs a group size of at least 2 and at least 2 groups (for the standard error)")
    scale = scale_rewards or loss.scale_rewards
    seqs: jax.Array | np.ndarray
    if isinstance(family, SingleContextFamily):
        seqs = jax.random.categorical(key, family.logprobs(params), shape=(m * g,))
        lengths: Any = np.ones(m * g, dtype=int)
        r = _table(reward, family.k)[np.asarray(seqs)]

        def logprob(theta, s, _):
            return family.logprob(theta, s)
    else:
        seqs, lengths = family.sample(params, key, m * g)
        seqs, lengths = np.asarray(seqs), np.asarray(lengths)
        if reward.kind == "table":
            raise DomainError("sampling with a reward table is not supported; use first_token or contains")
        r = reward.of_sequences(seqs, lengths, family.vocab)

        def logprob(theta, s, ln):
            return family.logprob(theta, s, ln)
    rewards = r.reshape(m, g)
    batch_std = float(np.std(rewards, ddof=1)) if scale == "batch" else None
    adv = np.asarray(advantages(rewards, scale, batch_std=batch_std))
    ln = np.asarray(lengths).reshape(m, g).astype(float)
    w = np.asarray(weight_function(loss, values)(adv, ln, ln.sum(-1, keepdims=True), g))
    seqs_g = jnp.asarray(seqs).reshape((m, g) + tuple(np.shape(seqs)[1:]))
    len_g = jnp.asarray(lengths).reshape(m, g)

    def group_grad(s, lg, wg):
        return jax.grad(lambda theta: -jnp.sum(wg * logprob(theta, s, lg)))(params)

    per = jax.vmap(group_grad)(seqs_g, len_g, jnp.asarray(w))
    mean = jax.tree_util.tree_map(lambda x: x.mean(0), per)
    stderr = jax.tree_util.tree_map(lambda x: x.std(0, ddof=1) / math.sqrt(m), per)
    return GroupGradient(mean, stderr, float(rewards.mean()), 0, 0.0, m)


def expected_gradient(loss: GroupLoss | str, family: Any, params: Params, reward: Reward, *, group_size: int,
                      expectation: str = "exact", groups: int | None = None, key: jax.Array | None = None,
                      scale_rewards: str | None = None, values: Any = None) -> GroupGradient:
    """:func:`exact_gradient` (``expectation="exact"``) or :func:`sample_gradient` (``"sample"``,
    with ``groups`` and ``key``)."""
    if expectation == "exact":
        return exact_gradient(loss, family, params, reward, group_size=group_size, scale_rewards=scale_rewards,
                              values=values)
    if expectation == "sample":
        if groups is None or key is None:
            raise DomainError("expectation='sample' needs groups (a count) and key (a jax.random key)")
        return sample_gradient(loss, family, params, reward, group_size=group_size, groups=groups, key=key,
                               scale_rewards=scale_rewards, values=values)
    raise DomainError(f"expectation must be 'exact' or 'sample', not {expectation!r}")
