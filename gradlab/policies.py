"""Toy categorical policies in JAX, with an explicit EOS token so that length is a property of
the policy, and every metric of them, written once.

Responses and their length
--------------------------
Token 0 is EOS; tokens 1..V-1 are content. A family is a proper distribution over responses in
one of two exact modes, set by ``max_len``:

- *unbounded* (``max_len=None``): tokens are drawn until EOS, with no cut-off. A response is
  ``n >= 0`` content tokens followed by EOS, and its **length is n + 1** (the EOS counts). Only
  finite-state families (``ChainFamily``: unigram, bigram, linear head) support this mode; their
  metrics are absorbing-Markov-chain closed forms.
- *forced stop at K* (``max_len=K``): generation stops after K tokens, as ``max_new_tokens=K``
  does. A response is either ``n < K`` content tokens followed by EOS (length ``n + 1 <= K``) or
  K content tokens with no EOS (length K, *stopped*). Its probability is the product of its
  tokens' probabilities, so the responses' probabilities sum to 1 exactly; a stopped response is a
  response like any other. Lengths are ``min(L, K)`` with L the unbounded length.

A response is stored as a row of a padded int array whose width is at least its length, with
EOS padding after it; ``lengths`` counts its tokens as above.

No metric or objective drops probability mass. Enumeration (``Family.enumerate``) lists every
response of the forced-stop distribution, stopped ones included; the chain metrics are exact in
both modes (linear solves when unbounded, dynamic programming over (step, state) with a forced
stop). The one numerical limit, an unbounded chain whose EOS probability is so small that the
linear solve loses its accuracy, is refused (``DomainError``; NaN inside a trace) with the bound
reported, never returned silently (``CHAIN_RTOL``).

A family is a frozen description (vocabulary, mode, shapes); its parameters are a pytree passed
alongside, so that ``jax.grad``, ``jit`` and ``vmap`` apply directly. A reference policy is the
same family with frozen parameters.

Families: ``Unigram`` (i.i.d. tokens, geometric length), ``Tabular`` (free logits for every
prefix; forced stop only), ``Bigram`` (logits depend on the previous token), ``LinearHead``
(logits = W h(previous token), W shared by every context), ``HiddenState`` (logits = W h(context),
h trained), and the single-context ``Softmax`` (one softmax over atomic responses, no EOS).

A family owns its facts. Its class attributes say what it is (``name``, ``config_keys``,
``single_context``, ``finite_state``, the canonical ``variables`` it supplies, its
``default_metrics``), ``from_config`` builds it from an experiment's ``[policy]`` table, and it
may supply an optional fast path, ``table_logits``/``table_rows`` (as a ``sympy.stats``
distribution may supply ``_cdf``): generic code falls back when it is absent. ``REGISTRY`` is the
one registry (``register``/``unregister``); ``FAMILIES`` is its live view of the EOS (sequence)
families. A new family is one subclass, registered: the experiment schema, the command-line help
and the documentation's table are derived from the registry.

The map from a policy and a batch of preference pairs to the canonical variables of
``gradlab.symbols`` is ``canonical_variables``; ``checks`` and the experiments runner both use it.

This module configures nothing globally: call ``gradlab.runtime.configure()`` (float64, XLA
compilation cache) at an entry point.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from gradlab.errors import DomainError, UnknownVariableError

# Families are frozen (hashable) dataclasses, so their methods jit with ``self`` static: one
# compilation per family and shape, instead of op-by-op dispatch.
_method_jit = functools.partial(jax.jit, static_argnums=0)

__all__ = [
    "EOS",
    "CHAIN_RTOL",
    "Family",
    "ChainFamily",
    "Unigram",
    "Tabular",
    "Bigram",
    "LinearHead",
    "Enumeration",
    "ChainMetrics",
    "Reference",
    "FAMILIES",
    "REGISTRY",
    "facts",
    "register",
    "unregister",
    "family_class",
    "has_logit_table",
    "SEQUENCE_DEFAULTS",
    "POLICY_VARIABLES",
    "make_family",
    "all_sequences",
    "response_index",
    "sequence_sums",
    "token_mask",
    "reference_values",
    "canonical_variables",
    "pair_variables",
    "geometric_expected_length",
]

EOS = 0
Params = Any

# Relative accuracy required of an unbounded chain metric. The linear solve (I - Q) x = b loses
# about eps * cond(I - Q) in relative accuracy, and cond_inf(I - Q) <= 2 max_s E[L | start s]
# (the fundamental matrix is nonnegative with row sums E[L | s]); a chain whose bound
# S * eps * 2 max_s E[L | s] exceeds this tolerance is refused. (A one-state chain, the unigram,
# is a division by P(EOS) and exact to a few eps for any P(EOS) > 0.)
CHAIN_RTOL = 1e-8


def _tail_names() -> tuple[str, ...]:
    from gradlab._declared import EXTRA_NAMES  # the names of gradlab.symbols.EXTRA, without sympy

    return EXTRA_NAMES


# The canonical variables a policy's parameters move: the sequence log-probs and the tails that
# gradlab.symbols lists in EXTRA (the reference's tails are constants of the policy).
POLICY_VARIABLES: tuple[str, ...] = ("lp_w", "lp_l") + tuple(n for n in _tail_names() if not n.startswith("ref_"))
# The metrics an experiment records by default on an EOS family (its methods of these names).
SEQUENCE_DEFAULTS = ("expected_length", "sequence_entropy", "token_entropy", "eos_probability")


def token_mask(lengths: jax.Array | np.ndarray, width: int) -> jax.Array:
    """True at the positions ``< length`` of a row of width ``width``: the response's tokens."""
    return jnp.arange(width) < jnp.asarray(lengths)[..., None]


class Enumeration(NamedTuple):
    """Every response of a forced-stop family with its probability under some parameters."""

    seqs: jax.Array  # (N, max_len) int
    lengths: jax.Array  # (N,) int, including EOS where there is one
    logp: jax.Array  # (N,) float64; logsumexp(logp) == 0 up to rounding
    stopped: jax.Array  # (N,) bool: ended by the forced stop (K content tokens, no EOS)


class ChainMetrics(NamedTuple):
    """Exact metrics of a policy's distribution over responses (see ``Family.metrics``).

    ``error_bound`` is a bound on the relative rounding error of the values (0 where they come
    from a finite sum); a value whose bound exceeds ``CHAIN_RTOL`` is refused.
    """

    expected_length: jax.Array
    sequence_entropy: jax.Array
    token_entropy: jax.Array
    eos_probability: jax.Array
    stopped_mass: jax.Array  # P(the forced stop ends the response); 0 when unbounded
    expected_reward: jax.Array  # E[sum_t r(y_t)] for the token reward given (0 if none)
    error_bound: jax.Array


def all_sequences(vocab: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Every response of the forced-stop distribution at K = ``max_len``, EOS-padded.

    Rows: for n = 0..K-1, every n content tokens followed by EOS (length n + 1), in
    lexicographic order; then every K content tokens with no EOS (the stopped responses, length
    K). ``response_index`` gives the row of a response.
    """
    content = vocab - 1
    rows, lengths = [], []
    for k in range(max_len + 1):
        grid = np.indices((content,) * k).reshape(k, -1).T + 1 if k else np.zeros((1, 0), int)
        block = np.zeros((grid.shape[0], max_len), dtype=np.int64)
        block[:, :k] = grid
        rows.append(block)
        lengths.append(np.full(grid.shape[0], min(k + 1, max_len)))
    return np.concatenate(rows), np.concatenate(lengths)


def response_index(vocab: int, max_len: int, seqs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Row of ``all_sequences(vocab, max_len)`` of each response ``(seqs, lengths)``."""
    seqs, lengths = np.asarray(seqs), np.asarray(lengths)
    c = vocab - 1
    ends_in_eos = seqs[np.arange(len(lengths)), lengths - 1] == EOS
    k = np.where(ends_in_eos, lengths - 1, lengths)  # number of content tokens
    offsets = np.cumsum([0] + [c**j for j in range(max_len + 1)])
    idx = np.zeros(len(k), dtype=np.int64)
    for s in range(min(seqs.shape[1], max_len)):
        idx = np.where(s < k, idx * c + (seqs[:, s] - 1), idx)
    return offsets[k] + idx


def sequence_sums(vocab: int, max_len: int, token_values) -> np.ndarray:
    """Sum of a per-token value over the tokens of every response (EOS included where there is
    one), e.g. an oracle's reward of each response; rows as in ``all_sequences``."""
    seqs, lengths = all_sequences(vocab, max_len)
    return (np.asarray(token_values)[seqs] * (np.arange(max_len) < lengths[:, None])).sum(-1)


def geometric_expected_length(p_eos: float, max_len: int | None) -> float:
    """E[min(L, K)] for i.i.d. tokens with EOS probability p_eos (L counts the EOS): the
    geometric law, (1 - (1 - p)^K) / p, and 1/p without a cut-off. An independent reference for
    tests; the policies compute lengths as chain metrics."""
    if max_len is None:
        return 1.0 / p_eos if p_eos > 0 else math.inf
    return (1.0 - (1.0 - p_eos) ** max_len) / p_eos if p_eos > 0 else float(max_len)


def _refuse_or_poison(value: jax.Array, bound: jax.Array, what: str) -> jax.Array:
    """``value`` if its error bound is within ``CHAIN_RTOL``; otherwise a ``DomainError``, or NaN
    inside a trace (where raising is impossible; the simulator checks and raises)."""
    if isinstance(bound, jax.core.Tracer) or isinstance(value, jax.core.Tracer):
        return jnp.where(bound <= CHAIN_RTOL, value, jnp.nan)
    if not float(bound) <= CHAIN_RTOL:
        raise DomainError(
            f"the exact unbounded {what} is refused: the policy's EOS probability is so small that the "
            f"linear solve's relative error bound is {float(bound):.3g} (tolerance {CHAIN_RTOL:g}); "
            "use a forced stop (max_len=K), which is exact for any EOS probability"
        )
    return value


def _entropy_rows(logp: jax.Array) -> jax.Array:
    """Entropy of each row of log-probabilities; 0 log 0 = 0 (an exp(-inf) row entry)."""
    p = jnp.exp(logp)
    return -jnp.where(p > 0, p * logp, 0.0).sum(-1)


@dataclass(frozen=True)
class Family:
    """Base class of the EOS (sequence) families: subclasses define ``init`` and ``logits``;
    metrics by enumeration.

    What a family is, as class attributes (read by the experiment schema, the runner, the
    command-line help and the documentation, which keep no list of their own):

    - ``name``: its name in an experiment's ``[policy] family`` and in ``REGISTRY``;
    - ``config_keys``: the ``[policy]`` keys it reads beyond the common ones (family, vocab,
      max_len, init, scale), passed to ``from_config``;
    - ``single_context``: one context and atomic actions, no EOS and no length (False here);
    - ``finite_state``: a chain, whose metrics are exact with no cut-off (``max_len=None``);
    - ``variables``: the canonical variables it supplies for a pair;
    - ``default_metrics``: the methods an experiment records by default.

    Optional fast path: ``table_logits`` and ``table_rows`` (both, or neither), the lean form the
    experiment runner uses when a family has it and falls back from when it does not.
    """

    vocab: int = 4
    max_len: int | None = 6

    name = "family"
    config_keys: ClassVar[tuple[str, ...]] = ()
    single_context: ClassVar[Literal[False]] = False
    variables: ClassVar[tuple[str, ...]] = ("lp_w", "lp_l", "ref_w", "ref_l", "len_w", "len_l", *_tail_names())
    default_metrics: ClassVar[tuple[str, ...]] = SEQUENCE_DEFAULTS

    @classmethod
    def variant(cls, **options: Any) -> FamilyClass:
        """The class that ``options`` (the ``[policy]`` keys of ``config_keys``) select: this one,
        unless a family has several forms (``HiddenState`` by its ``context``)."""
        return cls

    @classmethod
    def from_config(cls, *, vocab: int, max_len: int | None, **options: Any) -> Family:
        """The family of an experiment's ``[policy]`` table: ``vocab`` content tokens (the family
        adds EOS), the cut-off ``max_len``, and the keys of ``config_keys`` that are set."""
        return cls(vocab=vocab + 1, max_len=max_len, **options)

    @property
    def enumerable(self) -> bool:
        """Whether every response can be listed (a forced stop)."""
        return self.max_len is not None

    # -- the optional fast path ---------------------------------------------------------------
    #
    # A family whose next-token logits are rows of one table, logits(params, y)[t] =
    # table_logits(params)[table_rows(y)[t]], supplies both methods. Then
    #     log pi(y) = sum_{t < len(y)} log_softmax(table)[row_t, y_t] = n(y) . vec(log_softmax(table)),
    # with n(y) the counts of the (row, token) cells y visits, and a training step takes one
    # log-softmax of the table instead of one per position of every response.

    def table_logits(self, params: Params) -> jax.Array | None:
        """The ``(rows, vocab)`` logit table, or None when the family has no such table."""
        return None

    def table_rows(self, seqs: jax.Array) -> jax.Array | None:
        """The table row of every position of ``seqs`` ``(..., T)``, or None (no table)."""
        return None

    def table_reach(self) -> slice:
        """The rows of ``table_logits`` that a position inside a response can read (``table_rows``
        before the response's end): every row, unless the family knows that some are never read
        (the bigram's row of "after EOS"). The lean form reads only these rows' cells."""
        return slice(None)

    def hidden_states(self, params: Params, seqs: jax.Array) -> jax.Array:
        """The hidden embedding from which each position's next-token logits are read,
        ``(..., T, d)``: logits = hidden state times a (fixed or trained) unembedding. By default a
        family with a logit table reads row ``table_rows`` of it, so its hidden state is the one-hot
        vector of that row (``d`` = the table's rows); a family with real features overrides this.
        Razin et al.'s CHES score (arXiv:2410.08847) is computed from these."""
        rows = self.table_rows(seqs)
        table = self.table_logits(params)
        if rows is None or table is None:
            raise NotImplementedError(f"the {self.name} family exposes no hidden states")
        return jax.nn.one_hot(rows, table.shape[0], dtype=table.dtype)

    def __post_init__(self):
        if not isinstance(self.vocab, int | np.integer) or self.vocab < 2:
            raise DomainError(f"vocab must be a whole number of at least 2 (EOS plus one content token), "
                              f"not {self.vocab}")
        if self.max_len is not None and (not isinstance(self.max_len, int | np.integer) or self.max_len < 1):
            raise DomainError(f"max_len must be a positive whole number (the forced stop) or None (unbounded), "
                              f"not {self.max_len!r}")
        if self.max_len is None and not self.finite_state:
            raise DomainError(f"the {self.name} family has no finite state and needs a forced stop: give max_len=K "
                              "(the unbounded families are: "
                              f"{', '.join(n for n, f in FAMILIES.items() if f.finite_state)})")

    finite_state = False

    @property
    def forced_stop(self) -> bool:
        """True with a forced stop at ``max_len`` tokens, False when unbounded."""
        return self.max_len is not None

    @property
    def stop_len(self) -> int:
        """The forced stop K (``max_len``), for code that needs one; refused when unbounded."""
        if self.max_len is None:
            raise DomainError(f"the {self.name} family is unbounded here: this needs a forced stop (max_len=K)")
        return self.max_len

    # -- to be defined by each family -------------------------------------------------------

    def init(self, key: jax.Array, scale: float = 1.0) -> Params:
        """Random parameters: standard normals times ``scale``."""
        raise NotImplementedError

    def logits(self, params: Params, seqs: jax.Array) -> jax.Array:
        """Next-token logits at every position of ``seqs`` (..., T) given the prefix: (..., T, vocab)."""
        raise NotImplementedError

    # -- log-probabilities of given responses -------------------------------------------------

    @_method_jit
    def token_logprobs(self, params: Params, seqs: jax.Array) -> jax.Array:
        """Log-softmax of the next-token distribution at every position."""
        return jax.nn.log_softmax(self.logits(params, seqs), axis=-1)

    def mask(self, lengths: jax.Array, width: int | None = None) -> jax.Array:
        """``token_mask`` at width ``width`` (default: the forced stop K, ``stop_len``)."""
        return token_mask(lengths, self.stop_len if width is None else width)

    @_method_jit
    def per_token_logp(self, params: Params, seqs: jax.Array, lengths: jax.Array) -> jax.Array:
        """log pi(y_t | y_<t) for every token of each response, 0 on padding."""
        lp = jnp.take_along_axis(self.token_logprobs(params, seqs), seqs[..., None], axis=-1)[..., 0]
        return jnp.where(token_mask(lengths, seqs.shape[-1]), lp, 0.0)

    @_method_jit
    def logprob(self, params: Params, seqs: jax.Array, lengths: jax.Array) -> jax.Array:
        """Exact log-probability of each response (the sum over its tokens, EOS included)."""
        return self.per_token_logp(params, seqs, lengths).sum(-1)

    @_method_jit
    def tail_logprob(self, params: Params, seqs: jax.Array, lengths: jax.Array, shared: jax.Array) -> jax.Array:
        """Log-prob of the tokens past position ``shared`` (LD-DPO's verbose tail)."""
        lp = self.per_token_logp(params, seqs, lengths)
        return jnp.where(jnp.arange(seqs.shape[-1]) >= shared[..., None], lp, 0.0).sum(-1)

    def validate(self, seqs: np.ndarray, lengths: np.ndarray) -> None:
        """Raise ``DomainError`` unless every row is a response of this family (see the module
        docstring): tokens in range, EOS exactly at the end, or no EOS only at the forced stop."""
        seqs, lengths = np.asarray(seqs), np.asarray(lengths)
        if seqs.ndim != 2 or lengths.shape != seqs.shape[:1]:
            raise DomainError(f"responses must be (n, width) tokens with (n,) lengths, not {seqs.shape}, "
                              f"{lengths.shape}")
        width = seqs.shape[1]
        if ((lengths < 1) | (lengths > width)).any() or (self.forced_stop and (lengths > self.max_len).any()):
            raise DomainError(f"response lengths must lie in 1..{min(width, self.max_len or width)}")
        if ((seqs < 0) | (seqs >= self.vocab)).any():
            raise DomainError(f"tokens must lie in 0..{self.vocab - 1}")
        inside = token_mask(lengths, width)
        last = seqs[np.arange(len(lengths)), lengths - 1]
        early_eos = ((seqs == EOS) & inside & (np.arange(width) < (lengths - 1)[:, None])).any(-1)
        stopped = last != EOS
        bad_stop = stopped & ((not self.forced_stop) | (lengths != (self.max_len or 0)))
        if early_eos.any() or bad_stop.any():
            raise DomainError("every response must end with its only EOS, or (with a forced stop at K) be K "
                              "content tokens without EOS")

    # -- the distribution over responses -------------------------------------------------------

    def _need_forced_stop(self, what: str) -> None:
        if not self.forced_stop:
            raise DomainError(f"{what} needs a forced stop (max_len=K): an unbounded policy has infinitely many "
                              "responses")

    def enumerate(self, params: Params) -> Enumeration:
        """Every response of the forced-stop distribution with its exact log-probability (stopped
        responses included: the probabilities sum to 1). Refused when unbounded."""
        self._need_forced_stop("enumeration")
        return self._enumerate(params)

    @_method_jit
    def _enumerate(self, params: Params) -> Enumeration:
        rows, ends = all_sequences(self.vocab, self.stop_len)
        stopped = rows[np.arange(len(ends)), ends - 1] != EOS
        seqs, lengths = jnp.asarray(rows), jnp.asarray(ends)
        return Enumeration(seqs, lengths, self.logprob(params, seqs, lengths), jnp.asarray(stopped))

    def sample(self, params: Params, key: jax.Array, n: int, horizon: int | None = None) -> tuple[jax.Array, jax.Array]:
        """``n`` responses drawn from the policy: ``(seqs, lengths)``.

        With a forced stop the width is K and a response without EOS is stopped (length K).
        Unbounded, tokens are drawn for ``horizon`` steps (default 64); if any response is still
        running, the horizon doubles and the same key draws again (the same prefixes), up to
        2^20 tokens, beyond which the call is refused. Nothing is cut off silently."""
        if self.forced_stop:
            seqs, done = self._sample(params, key, n, self.stop_len)
            first_eos = jnp.argmax(seqs == EOS, axis=-1)
            return seqs, jnp.where(done, first_eos + 1, self.stop_len)
        if self.finite_state:  # refuse up front what could not finish within the cap
            m = self.metrics(params, None)
            if not (float(m.error_bound) <= CHAIN_RTOL and float(m.expected_length) * 64 <= 2**20):
                raise DomainError(f"the policy's expected length is {float(m.expected_length):.3g} tokens (error bound "
                                  f"{float(m.error_bound):.3g}): its EOS probability is too small to sample whole "
                                  "unbounded responses; use a forced stop (max_len=K)")
        width = horizon or 64
        while True:
            seqs, done = self._sample(params, key, n, width)
            if bool(done.all()):
                return seqs, jnp.argmax(seqs == EOS, axis=-1) + 1
            if width >= 2**20:
                raise DomainError(f"{int((~done).sum())} of {n} unbounded samples are still running after {width} "
                                  "tokens; the policy's EOS probability is too small to sample from")
            width *= 2

    @functools.partial(jax.jit, static_argnums=(0, 3, 4))
    def _sample(self, params: Params, key: jax.Array, n: int, width: int) -> tuple[jax.Array, jax.Array]:
        def step(carry, t):
            seqs, done, key = carry
            key, sub = jax.random.split(key)
            logits = self.logits(params, seqs)[:, t, :]
            tok = jax.random.categorical(sub, logits, axis=-1)
            tok = jnp.where(done, EOS, tok)
            seqs = seqs.at[:, t].set(tok)
            return (seqs, done | (tok == EOS), key), None

        seqs0 = jnp.zeros((n, width), dtype=jnp.int64)
        done0 = jnp.zeros((n,), dtype=bool)
        (seqs, done, _), _ = jax.lax.scan(step, (seqs0, done0, key), jnp.arange(width))
        return seqs, done

    # -- metrics (each written once; exact) ---------------------------------------------------

    @_method_jit
    def metrics(self, params: Params, token_reward: jax.Array | None = None) -> ChainMetrics:
        """Every metric of the distribution over responses at once (traceable, differentiable).

        Here by enumeration of the forced-stop distribution (all mass included);
        ``ChainFamily`` overrides it with closed forms. ``token_reward`` (vocab,) defines the
        additive reward sum_t r(y_t) whose expectation is ``expected_reward``."""
        self._need_forced_stop(f"the {self.name} family's metrics")
        return self._enumerated_metrics(params, token_reward)

    @_method_jit
    def _enumerated_metrics(self, params: Params, token_reward: jax.Array | None) -> ChainMetrics:
        e = self._enumerate(params)
        p = jnp.exp(e.logp)
        inside = self.mask(e.lengths)
        lps = self.token_logprobs(params, e.seqs)
        length = (p * e.lengths).sum()
        h_tok = jnp.where(inside, _entropy_rows(lps), 0.0).sum(-1)
        eos = jnp.where(inside, jnp.exp(lps[..., EOS]), 0.0).sum(-1)
        reward = jnp.zeros(()) if token_reward is None else (
            p * (jnp.asarray(token_reward)[e.seqs] * inside).sum(-1)).sum()
        # sequence entropy -E[log pi(y)] over every response: nothing to renormalise
        seq_h = -(jnp.where(p > 0, p * e.logp, 0.0)).sum()
        return ChainMetrics(length, seq_h, (p * h_tok).sum() / length, (p * eos).sum() / length,
                            (p * e.stopped).sum(), reward, jnp.zeros(()))

    def _metric(self, params: Params, field: str, token_reward: jax.Array | None = None) -> jax.Array:
        m = self.metrics(params, token_reward)
        return _refuse_or_poison(getattr(m, field), m.error_bound, field.replace("_", " "))

    def expected_length(self, params: Params) -> jax.Array:
        """E[length] of a response (tokens, EOS included where there is one): E[L] unbounded,
        E[min(L, K)] with a forced stop at K."""
        return self._metric(params, "expected_length")

    def sequence_entropy(self, params: Params) -> jax.Array:
        """Entropy (nats) of the distribution over responses, -E[log pi(y)]."""
        return self._metric(params, "sequence_entropy")

    def token_entropy(self, params: Params) -> jax.Array:
        """Mean per-token entropy along the policy's own responses: E[sum_t H_t] / E[length]."""
        return self._metric(params, "token_entropy")

    def eos_probability(self, params: Params) -> jax.Array:
        """Mean probability of EOS per generated token: E[sum_t P_t(EOS)] / E[length] (1/E[L]
        when unbounded, since EOS is emitted exactly once)."""
        return self._metric(params, "eos_probability")

    def stopped_mass(self, params: Params) -> jax.Array:
        """Probability that the forced stop ends the response (K content tokens, no EOS); 0
        when unbounded."""
        return self._metric(params, "stopped_mass")

    def expected_reward(self, params: Params, token_reward: jax.Array) -> jax.Array:
        """E[sum_t r(y_t)]: the expected additive reward, ``token_reward`` (vocab,) per token
        (EOS's entry counts once when the response ends with EOS)."""
        return self._metric(params, "expected_reward", jnp.asarray(token_reward, dtype=jnp.float64))

    def length_tail(self, params: Params, t: int | np.ndarray) -> jax.Array:
        """P(length > t) for each t (here by enumeration of the forced-stop distribution)."""
        e = self.enumerate(params)
        ts = jnp.asarray(t)
        return (jnp.exp(e.logp) * (e.lengths > ts[..., None])).sum(-1)

    def length_quantile(self, params: Params, q: float) -> int:
        """The smallest t with P(length <= t) >= q."""
        if not 0.0 < q < 1.0:
            raise DomainError(f"a quantile level must lie strictly between 0 and 1, not {q}")
        tails = np.asarray(self.length_tail(params, np.arange(self.stop_len + 1)))
        return int(np.argmax(1.0 - tails >= q - 1e-15))

    def tempered_logprob(self, params: Params, seqs: jax.Array, lengths: jax.Array, tau: float) -> jax.Array:
        """log of the sequence-level tempered policy pi^(1/tau)/Z, Z over every response of the
        forced-stop distribution."""
        return self.logprob(params, seqs, lengths) / tau - self.log_partition(params, tau)

    def log_partition(self, params: Params, tau: float) -> jax.Array:
        """log Z(tau) = log sum_y pi(y)^(1/tau) over every response (forced stop)."""
        return jax.nn.logsumexp(self.enumerate(params).logp / tau)

    def temper_tokens(self, params: Params, tau: float) -> Params:
        """Token-level tempering: every next-token softmax at temperature tau. For sequences this
        differs from ``tempered_logprob`` (each step is renormalised)."""
        return jax.tree_util.tree_map(lambda p: p / tau, params)  # logits are linear in params


@dataclass(frozen=True)
class ChainFamily(Family):
    """A finite-state family: the next-token distribution depends on a state in 0..S-1 that
    the emitted content token updates, so a response is a path of an absorbing Markov chain
    (absorbed at EOS). Subclasses define ``state_logits(params) -> (S, vocab)``; by default the
    state is the previous content token (state i-1 after token i, state S-1 = V-1 at the start).

    The metrics are closed forms over the states. With Q the transient matrix
    (Q[s, s'] = sum of P[s, v] over the content tokens v leading to s') and e the start state,
    the expected number of visits to each state is n = e^T (I - Q)^-1 (unbounded; one LU solve)
    or n = sum_{t<K} e^T Q^t (forced stop; dynamic programming over (step, state)). Each visit
    emits one token, so E[length] = sum_s n_s, the sequence entropy is sum_s n_s H(P[s]) (chain
    rule of entropy), and an additive reward has expectation sum_s n_s E_{P[s]}[r]: every metric
    is a linear functional of the one vector n. Unbounded, a gradient costs no second
    factorisation: the adjoint solve (I - Q) y = dmetric/dn uses the same LU factors (implicit
    differentiation). The values' relative error bound, 2 S eps max_s E[L | start in s], comes
    with them (``ChainMetrics.error_bound``; refused above ``CHAIN_RTOL``).
    """

    finite_state = True

    @property
    def n_states(self) -> int:
        return self.vocab

    @property
    def start_state(self) -> int:
        return self.n_states - 1

    def next_state(self) -> np.ndarray:
        """(S, vocab) int: the state after emitting each token from each state (EOS: -1)."""
        nxt = np.tile(np.arange(-1, self.vocab - 1), (self.n_states, 1))
        return nxt

    def state_logits(self, params: Params) -> jax.Array:
        """(S, vocab) next-token logits in each state."""
        raise NotImplementedError

    # -- chain algebra ----------------------------------------------------------------------

    def _chain(self, params: Params) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(logP (S, V), Q (S, S), leave (S,)): ``leave[s] = 1 - Q[s, s]``, summed from the
        probabilities of the tokens that leave s (EOS included), never as 1 - Q[s, s], which
        cancels catastrophically when EOS is rare."""
        logp = jax.nn.log_softmax(self.state_logits(params), axis=-1)
        p = jnp.exp(logp)
        q = self._transient(p)
        nxt = self.next_state()
        leaves = (nxt < 0) | (nxt != np.arange(self.n_states)[:, None])
        leave = jnp.where(jnp.asarray(leaves), p, 0.0).sum(-1)
        return logp, q, leave

    def _transient(self, p: jax.Array) -> jax.Array:
        """Q[s, s'] = sum of p[s, v] over the content tokens v that lead from s to s'. With the
        default state map (state i-1 after token i; the start state is never re-entered) Q is
        p's content columns plus a zero column; a subclass with its own ``next_state`` gets a
        scatter-add (O(S V) memory, not a dense (S, V, S) one-hot)."""
        if type(self).next_state is ChainFamily.next_state:
            return jnp.concatenate([p[:, 1:], jnp.zeros((self.n_states, 1), p.dtype)], axis=1)
        nxt = self.next_state()
        s, v = np.nonzero(nxt >= 0)
        return jnp.zeros((self.n_states, self.n_states), p.dtype).at[s, nxt[s, v]].add(p[s, v])

    def _visits(self, q: jax.Array, leave: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(n (S,), stopped mass, relative error bound): expected visits to each state of the
        chain (Q, leave) of ``_chain``."""
        start = jax.nn.one_hot(self.start_state, self.n_states, dtype=q.dtype)
        if self.forced_stop:
            def step(alpha, _):
                return alpha @ q, alpha

            alpha_k, alphas = jax.lax.scan(step, start, None, length=self.max_len)
            return alphas.sum(0), alpha_k.sum(), jnp.zeros(())
        # I - Q with a cancellation-free diagonal, as one elementwise select (a scatter onto the
        # diagonal is not fused, and cost as much as the rest of the matrix's construction)
        a = jnp.where(jnp.eye(self.n_states, dtype=bool), leave[:, None], -q)
        # One LU factorisation, a[perm] = L U, serves every solve: (I - Q)^T n = e for the visits,
        # (I - Q) x = 1 for the error bound, and in a gradient the adjoint (I - Q) y = dn, which
        # custom_linear_solve takes from the same factors (implicit differentiation, dn = -N^T dA^T n:
        # no derivative of the factorisation, whose own rule costs several S^3 products).
        lu, _, perm = jax.lax.linalg.lu(jax.lax.stop_gradient(a))
        tri = functools.partial(jax.lax.linalg.triangular_solve, lu, left_side=True)

        def solve(_, b):  # (I - Q) x = b: x = U^-1 L^-1 b[perm]
            return tri(tri(b[perm][:, None], lower=True, unit_diagonal=True), lower=False)[:, 0]

        def solve_transposed(_, b):  # (I - Q)^T n = b: n[perm] = L^-T U^-T b
            w = tri(tri(b[:, None], lower=False, transpose_a=True), lower=True, unit_diagonal=True, transpose_a=True)
            return jnp.zeros_like(b).at[perm].set(w[:, 0])

        visits = jax.lax.custom_linear_solve(lambda n: n @ a, start, solve_transposed, transpose_solve=solve)
        remaining = solve(None, jnp.ones_like(start))  # E[L | start in s], for the bound only
        # cond_inf(I - Q) <= 2 max_s E[L | s]; a negative or non-finite solution is a failed solve.
        # One state is a division by P(leave), itself accurate to a few eps: no conditioning loss.
        eps = jnp.finfo(q.dtype).eps
        bound = 4 * eps if self.n_states == 1 else self.n_states * eps * 2.0 * jnp.max(jnp.abs(remaining))
        failed = ~(jnp.isfinite(remaining).all() & (remaining > 0).all() & (visits >= -1e-12).all())
        return visits, jnp.zeros(()), jnp.where(failed, jnp.inf, bound)

    @_method_jit
    def metrics(self, params: Params, token_reward: jax.Array | None = None) -> ChainMetrics:
        logp, q, leave = self._chain(params)  # built once, for the solve and for the sums over states
        visits, stopped, bound = self._visits(q, leave)
        p = jnp.exp(logp)
        length = visits.sum()
        seq_h = visits @ _entropy_rows(logp)
        eos = visits @ p[:, EOS]
        reward = jnp.zeros(()) if token_reward is None else visits @ (p @ jnp.asarray(token_reward))
        return ChainMetrics(length, seq_h, seq_h / length, eos / length, stopped, reward, bound)

    def length_tail(self, params: Params, t: int | np.ndarray) -> jax.Array:
        """P(length > t) = e^T Q^t 1 (0 for t >= K with a forced stop): the distribution over
        states propagated max(t) steps (cost O(max(t) S^2); see ``length_quantile`` for far tails)."""
        _, q, _ = self._chain(params)
        t = np.asarray(t, dtype=np.int64)
        if t.size and t.min() < 0:
            raise DomainError("length_tail needs non-negative lengths t")
        horizon = int(t.max()) + 1 if t.size else 1
        if self.forced_stop:
            horizon = min(horizon, self.stop_len)
        start = jax.nn.one_hot(self.start_state, self.n_states, dtype=q.dtype)
        _, running = jax.lax.scan(lambda alpha, _: (alpha @ q, alpha.sum()), start, None, length=horizon)
        inside = t < horizon
        return jnp.where(jnp.asarray(inside), running[jnp.asarray(np.minimum(t, horizon - 1))], 0.0)

    def length_quantile(self, params: Params, q: float) -> int:
        """The smallest t with P(length <= t) >= q: doubling, then bisection, on Q^t (cost
        O(S^3 log t), so a heavy tail costs no more than a light one)."""
        if not 0.0 < q < 1.0:
            raise DomainError(f"a quantile level must lie strictly between 0 and 1, not {q}")
        _, q_chain, _ = self._chain(params)
        qm = np.asarray(q_chain)
        start = np.eye(self.n_states)[self.start_state]
        tail = lambda m: float((start @ m).sum())  # noqa: E731
        if self.forced_stop:
            tails = np.asarray(self.length_tail(params, np.arange(self.stop_len + 1)))
            return int(np.argmax(1.0 - tails >= q))
        powers = [qm]  # Q^(2^i)
        while tail(powers[-1]) > 1.0 - q:
            if len(powers) > 62:
                raise DomainError("the length quantile is beyond 2^62 tokens: the policy's EOS probability is ~0")
            powers.append(powers[-1] @ powers[-1])
        t, acc = 0, np.eye(self.n_states)  # largest t with tail(Q^t) > 1 - q, bit by bit
        for i in reversed(range(len(powers))):
            cand = acc @ powers[i]
            if tail(cand) > 1.0 - q:
                acc, t = cand, t + 2**i
        return t + 1 if tail(acc) > 1.0 - q else t

    @functools.partial(jax.jit, static_argnums=(0, 3, 4))
    def _sample(self, params: Params, key: jax.Array, n: int, width: int) -> tuple[jax.Array, jax.Array]:
        """As ``Family._sample``, walking the chain's states: O(width) logits, not O(width^2)."""
        logits = self.state_logits(params)
        nxt = jnp.asarray(np.maximum(self.next_state(), 0))  # after EOS the state no longer matters

        def step(carry, t):
            seqs, done, state, key = carry
            key, sub = jax.random.split(key)
            tok = jnp.where(done, EOS, jax.random.categorical(sub, logits[state], axis=-1))
            seqs = seqs.at[:, t].set(tok)
            return (seqs, done | (tok == EOS), nxt[state, tok], key), None

        init = (jnp.zeros((n, width), dtype=jnp.int64), jnp.zeros((n,), dtype=bool),
                jnp.full((n,), self.start_state), key)
        (seqs, done, _, _), _ = jax.lax.scan(step, init, jnp.arange(width))
        return seqs, done

    def log_partition(self, params: Params, tau: float) -> jax.Array:
        """log sum_y pi(y)^(1/tau) by dynamic programming over (step, state) (forced stop)."""
        self._need_forced_stop("the sequence-level tempered policy")
        logp, _, _ = self._chain(params)
        pt = jnp.exp(logp / tau)
        qt = self._transient(pt)
        start = jax.nn.one_hot(self.start_state, self.n_states, dtype=qt.dtype)

        def step(alpha, _):
            return alpha @ qt, alpha @ pt[:, EOS]

        alpha_k, ends = jax.lax.scan(step, start, None, length=self.max_len)
        return jnp.log(ends.sum() + alpha_k.sum())


def _prev_tokens(seqs: jax.Array, bos: int) -> jax.Array:
    """The token before each position; ``bos`` before the first."""
    pad = jnp.full(seqs.shape[:-1] + (1,), bos, dtype=seqs.dtype)
    return jnp.concatenate([pad, seqs[..., :-1]], axis=-1)


# Rows of a (vocab + 1)-row table indexed by the previous token (row vocab = start) for the
# chain states 0..V-1: state i-1 is "previous token i" (i = 1..V-1), state V-1 is the start, so
# rows 1..V in order. A slice, not an index array: XLA fuses a slice into its consumers, while a
# gather of a vocabulary-1000 table is materialised (about a third of the chain metrics' time).
def _state_rows(vocab: int) -> slice:
    return slice(1, vocab + 1)


@dataclass(frozen=True)
class Unigram(ChainFamily):
    """Unigram + EOS: every token i.i.d. from softmax(theta); length is geometric in P(EOS)."""

    name = "unigram"

    @property
    def n_states(self) -> int:
        return 1

    def next_state(self) -> np.ndarray:
        return np.where(np.arange(self.vocab) == EOS, -1, 0)[None, :]

    def _transient(self, p: jax.Array) -> jax.Array:
        return p[:, 1:].sum(-1, keepdims=True)  # one state: Q = P(content)

    def init(self, key, scale=1.0):
        return {"theta": scale * jax.random.normal(key, (self.vocab,))}

    def state_logits(self, params):
        return params["theta"][None, :]

    def logits(self, params, seqs):
        return jnp.broadcast_to(params["theta"], seqs.shape + (self.vocab,))

    def table_logits(self, params):
        return params["theta"][None, :]

    def table_rows(self, seqs):
        return jnp.zeros_like(seqs)


@dataclass(frozen=True)
class Bigram(ChainFamily):
    """Markov: logits depend on the previous token (row V of W is the start state)."""

    name = "bigram"

    def init(self, key, scale=1.0):
        return {"W": scale * jax.random.normal(key, (self.vocab + 1, self.vocab))}

    def state_logits(self, params):
        return params["W"][_state_rows(self.vocab)]

    def logits(self, params, seqs):
        return params["W"][_prev_tokens(seqs, self.vocab)]

    def table_logits(self, params):
        return params["W"]

    def table_rows(self, seqs):
        return _prev_tokens(seqs, self.vocab)

    def table_reach(self):
        return _state_rows(self.vocab)  # no token follows EOS: its row is never read


@dataclass(frozen=True)
class Tabular(Family):
    """Tabular autoregressive: free logits for every prefix of content tokens (forced stop only)."""

    name = "tabular"

    @property
    def n_prefixes(self) -> int:
        c = self.vocab - 1
        return sum(c**k for k in range(self.stop_len))

    def init(self, key, scale=1.0):
        return {"table": scale * jax.random.normal(key, (self.n_prefixes, self.vocab))}

    def prefix_index(self, seqs: jax.Array) -> jax.Array:
        """Row of the table for the prefix before each position (garbage after EOS, masked).

        The prefix y_<t (content tokens 1..c) is row offset[t] + sum_{s<t} (y_s - 1) c^(t-1-s).
        """
        c, T = self.vocab - 1, seqs.shape[-1]
        if T > self.stop_len:
            raise DomainError(f"a tabular policy with a forced stop at {self.max_len} has no logits past it "
                              f"(responses of width {T})")
        offsets = np.cumsum([0] + [c**k for k in range(T - 1)])
        powers = np.array([[c ** (t - 1 - s) if s < t else 0 for s in range(T)] for t in range(T)])
        digits = jnp.clip(seqs - 1, 0, max(c - 1, 0))
        return jnp.asarray(offsets) + digits @ jnp.asarray(powers.T)

    def logits(self, params, seqs):
        return params["table"][self.prefix_index(seqs)]

    def table_logits(self, params):
        return params["table"]

    def table_rows(self, seqs):
        return self.prefix_index(seqs)


@dataclass(frozen=True)
class LinearHead(ChainFamily):
    """Shared-feature linear head: logits = W h(previous token), W shared by every context.

    ``features`` (d per context, row V is the start state) are fixed random unit vectors unless
    ``train_features`` is set, in which case they are parameters too.
    """

    dim: int = 3
    train_features: bool = False
    feature_seed: int = 0
    name = "linear_head"
    config_keys = ("dim", "train_features", "feature_seed")

    def fixed_features(self) -> jax.Array:
        f = jax.random.normal(jax.random.PRNGKey(self.feature_seed), (self.vocab + 1, self.dim))
        return f / jnp.linalg.norm(f, axis=-1, keepdims=True)

    def init(self, key, scale=1.0):
        params = {"W": scale * jax.random.normal(key, (self.vocab, self.dim))}
        if self.train_features:
            params["features"] = self.fixed_features()
        return params

    def _features(self, params):
        return params["features"] if self.train_features else self.fixed_features()

    def state_logits(self, params):
        return self._features(params)[_state_rows(self.vocab)] @ params["W"].T

    def logits(self, params, seqs):
        return self._features(params)[_prev_tokens(seqs, self.vocab)] @ params["W"].T

    def table_logits(self, params):
        return self._features(params) @ params["W"].T

    def table_rows(self, seqs):
        return _prev_tokens(seqs, self.vocab)

    def table_reach(self):
        return _state_rows(self.vocab)  # no token follows EOS: its row is never read

    def hidden_states(self, params, seqs):
        return self._features(params)[_prev_tokens(seqs, self.vocab)]

    def temper_tokens(self, params, tau):
        return {**params, "W": params["W"] / tau}


# --------------------------------------------------------------------------------------------
# The canonical variables of a batch of preference pairs
# --------------------------------------------------------------------------------------------


class Reference(NamedTuple):
    """The frozen reference's per-token log-probs of the chosen and rejected responses, and an
    offset subtracted from their sums (log Z for a sequence-level tempered reference)."""

    tok_w: jax.Array  # (n, width)
    tok_l: jax.Array  # (n, width)
    log_z: jax.Array | float = 0.0


def reference_values(fam: Family, ref_params: Params, seq_w, len_w, seq_l, len_l, *, tau: float = 1.0) -> Reference:
    """``Reference`` of the pairs under ``ref_params``; ``tau != 1`` gives the sequence-level
    tempered reference pi_0^(1/tau)/Z (its tails are the per-token log-probs over tau)."""
    tok_w = fam.per_token_logp(ref_params, seq_w, len_w) / tau
    tok_l = fam.per_token_logp(ref_params, seq_l, len_l) / tau
    return Reference(tok_w, tok_l, fam.log_partition(ref_params, tau) if tau != 1.0 else 0.0)


def pair_variables(tok_w, tok_l, ref: Reference, len_w, len_l) -> dict[str, jax.Array]:
    """The canonical variables from per-token log-probs (policy ``tok_w``, ``tok_l``, each
    (n, width), 0 on padding) and the reference: the assembly step of ``canonical_variables``,
    for callers that already hold the policy's per-token log-probs."""
    width = tok_w.shape[-1]
    past = jnp.arange(width) >= jnp.minimum(len_w, len_l)[..., None]  # the longer one's tail
    tail = lambda tok: jnp.where(past, tok, 0.0).sum(-1)  # noqa: E731
    return {
        "lp_w": tok_w.sum(-1), "lp_l": tok_l.sum(-1),
        "ref_w": ref.tok_w.sum(-1) - ref.log_z, "ref_l": ref.tok_l.sum(-1) - ref.log_z,
        "len_w": jnp.asarray(len_w).astype(jnp.float64), "len_l": jnp.asarray(len_l).astype(jnp.float64),
        "tail_w": tail(tok_w), "tail_l": tail(tok_l), "ref_tail_w": tail(ref.tok_w), "ref_tail_l": tail(ref.tok_l),
    }


def canonical_variables(
    fam: Family, params: Params, ref: Reference, seq_w, len_w, seq_l, len_l
) -> dict[str, jax.Array]:
    """The canonical variables of a batch of preference pairs under a policy: the one map.

    Arguments:
        fam: the policy family.
        params: the policy's parameters (differentiable: gradients flow through lp and tails).
        ref: the reference's values for the same pairs, ``reference_values(fam, ref_params, ...)``
            (computed once, since the reference is frozen).
        seq_w, len_w: chosen responses, (n, width) int tokens and (n,) lengths (see the module
            docstring for the length convention); seq_l, len_l: the rejected ones, same width.

    Returns a dict of (n,) float64 arrays keyed by the canonical names: ``lp_w``, ``lp_l``
    (sequence log-probs under the policy), ``ref_w``, ``ref_l`` (under the reference),
    ``len_w``, ``len_l`` (lengths), and the tails of ``gradlab.symbols.EXTRA``: ``tail_w``,
    ``tail_l``, ``ref_tail_w``, ``ref_tail_l`` (log-prob of the tokens past the shorter
    response's length, LD-DPO's verbose part). Traceable under jit, vmap and grad.
    """
    tok_w = fam.per_token_logp(params, seq_w, len_w)
    tok_l = fam.per_token_logp(params, seq_l, len_l)
    return pair_variables(tok_w, tok_l, ref, len_w, len_l)


# --------------------------------------------------------------------------------------------
# Single-context families and the hidden-state head
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SingleContextFamily:
    """Base of the families with one context and ``k`` atomic actions (no EOS, no length): a
    response is an action index 0..k-1 and log pi(y) = log_softmax(logits(params))[y].

    The metric names follow ``Family`` where they mean the same thing: ``sequence_entropy`` is the
    entropy of the distribution over responses, here the k actions.
    """

    k: int = 5
    name = "single_context_family"
    config_keys: ClassVar[tuple[str, ...]] = ()
    single_context: ClassVar[Literal[True]] = True
    finite_state = False
    variables: ClassVar[tuple[str, ...]] = ("lp_w", "lp_l", "ref_w", "ref_l")
    default_metrics: ClassVar[tuple[str, ...]] = ("probabilities", "sequence_entropy")
    enumerable = True  # the k actions

    @classmethod
    def variant(cls, **options: Any) -> FamilyClass:
        return cls

    @classmethod
    def from_config(cls, *, vocab: int, max_len: int | None = None, **options: Any) -> Any:
        """The family of a ``[policy]`` table: ``vocab`` is the number of actions k (no EOS, no
        cut-off)."""
        return cls(k=vocab, **options)

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"k (the number of actions) must be at least 2, not {self.k}")

    def init(self, key: jax.Array, scale: float = 1.0) -> Params:
        raise NotImplementedError

    def action_logits(self, params: Params) -> jax.Array:
        """The k logits, ``(k,)``."""
        raise NotImplementedError

    @_method_jit
    def logprobs(self, params: Params) -> jax.Array:
        return jax.nn.log_softmax(self.action_logits(params))

    @_method_jit
    def logprob(self, params: Params, y: jax.Array) -> jax.Array:
        """log pi(y) for action indices ``y`` (any shape)."""
        return self.logprobs(params)[y]

    @_method_jit
    def probabilities(self, params: Params) -> jax.Array:
        return jnp.exp(self.logprobs(params))

    @_method_jit
    def sequence_entropy(self, params: Params) -> jax.Array:
        """Entropy (nats) of the distribution over the k actions."""
        lp = self.logprobs(params)
        return -(jnp.exp(lp) * lp).sum()

    @_method_jit
    def tempered_logprobs(self, params: Params, tau: float) -> jax.Array:
        """log of pi^(1/tau)/Z over the k actions."""
        return jax.nn.log_softmax(self.logprobs(params) / tau)


@dataclass(frozen=True)
class Softmax(SingleContextFamily):
    """One softmax over k actions with free logits: the toy of the single-token analyses."""

    name = "softmax"

    def init(self, key, scale=1.0):
        return {"logits": scale * jax.random.normal(key, (self.k,))}

    def action_logits(self, params):
        return params["logits"]


def _fixed_matrix(given: tuple | None, seed: int, shape: tuple[int, int]) -> jax.Array:
    """The fixed output matrix of a hidden-state head: the given one, or seeded normal entries."""
    if given is not None:
        return jnp.asarray(given, dtype=jnp.float64)
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _check_matrix(given: tuple | None, shape: tuple[int, int], what: str) -> None:
    from gradlab.errors import DomainError

    if given is not None and np.shape(given) != shape:
        raise DomainError(f"W of {what} must have shape {shape} (outputs x dim), not {np.shape(given)}")


@dataclass(frozen=True)
class SingleHiddenState(SingleContextFamily):
    """logits = W h over k actions, one trainable hidden state h (``(1, dim)``), W fixed: the
    model of the likelihood-displacement analyses (W given as a nested tuple, or seeded)."""

    dim: int = 3
    W: tuple | None = None
    w_seed: int = 0
    name = "hidden_state"
    context = "single"
    config_keys = ("dim", "context", "W", "w_seed")

    @classmethod
    def from_config(cls, *, vocab: int, max_len: int | None = None, **options: Any) -> Any:
        options.pop("context", None)  # "single": this form
        return cls(k=vocab, **options)

    def __post_init__(self):
        super().__post_init__()
        _check_matrix(self.W, (self.k, self.dim), "a single-context hidden_state")

    def fixed_W(self) -> jax.Array:
        return _fixed_matrix(self.W, self.w_seed, (self.k, self.dim))

    def init(self, key, scale=1.0):
        return {"h": scale * jax.random.normal(key, (1, self.dim))}

    def action_logits(self, params):
        return self.fixed_W() @ params["h"][0]


HIDDEN_STATE_CONTEXTS = ("single", "previous_token", "prefix")


@dataclass(frozen=True)
class HiddenState(Family):
    """logits = W h(context) over the vocabulary (EOS included), with a trainable hidden state per
    context and W fixed (given as a nested tuple ``(vocab, dim)``, or seeded by ``w_seed``).

    ``context`` is ``"previous_token"`` (one state per previous token, row ``vocab`` the start) or
    ``"prefix"`` (one state per prefix of content tokens, rows as ``Tabular``). The single-context
    version is ``SingleHiddenState``; ``make_hidden_state`` picks one by ``context``.
    """

    dim: int = 3
    context: str = "previous_token"
    W: tuple | None = None
    w_seed: int = 0
    name = "hidden_state"
    config_keys = ("dim", "context", "W", "w_seed")

    def __post_init__(self):
        super().__post_init__()
        if self.context not in HIDDEN_STATE_CONTEXTS[1:]:
            raise ValueError(f"context must be one of {', '.join(HIDDEN_STATE_CONTEXTS[1:])} for a "
                             f"sequence hidden_state (SingleHiddenState is the 'single' one), not {self.context!r}")
        _check_matrix(self.W, (self.vocab, self.dim), "hidden_state")

    @property
    def n_contexts(self) -> int:
        if self.context == "previous_token":
            return self.vocab + 1
        return Tabular(self.vocab, self.max_len).n_prefixes

    def fixed_W(self) -> jax.Array:
        return _fixed_matrix(self.W, self.w_seed, (self.vocab, self.dim))

    def context_index(self, seqs: jax.Array) -> jax.Array:
        if self.context == "previous_token":
            return _prev_tokens(seqs, self.vocab)
        return Tabular(self.vocab, self.max_len).prefix_index(seqs)

    def init(self, key, scale=1.0):
        return {"h": scale * jax.random.normal(key, (self.n_contexts, self.dim))}

    def logits(self, params, seqs):
        return params["h"][self.context_index(seqs)] @ self.fixed_W().T

    def table_logits(self, params):
        return params["h"] @ self.fixed_W().T

    def table_rows(self, seqs):
        return self.context_index(seqs)

    def hidden_states(self, params, seqs):
        return params["h"][self.context_index(seqs)]

    @classmethod
    def variant(cls, context: str = "previous_token", **options: Any) -> FamilyClass:
        """``SingleHiddenState`` for context ``"single"``, the chain ``ChainHiddenState`` for
        ``"previous_token"``, this class for ``"prefix"``."""
        return {"single": SingleHiddenState, "previous_token": ChainHiddenState}.get(context, HiddenState)

    @classmethod
    def from_config(cls, *, vocab: int, max_len: int | None, **options: Any) -> Any:
        """As ``Family.from_config``; ``dim`` defaults to the width of a given ``W``, and the
        ``context`` picks the form (``variant``)."""
        if options.get("W") is not None and options.get("dim") is None:
            options["dim"] = len(options["W"][0])
        form = cls.variant(**options)
        if issubclass(form, SingleContextFamily):  # SingleHiddenState
            return form.from_config(vocab=vocab, max_len=max_len, **options)
        return form(vocab=vocab + 1, max_len=max_len, **options)


@dataclass(frozen=True)
class ChainHiddenState(HiddenState, ChainFamily):
    """``hidden_state`` with context ``"previous_token"`` as the finite-state chain it is: the
    state is the previous token (rows laid out as ``Bigram``'s, row ``vocab`` the start), with
    next-token logits W h(state). Its metrics are the chain closed forms, so ``max_len=None``
    (unbounded) is exact, as for bigram."""

    def __post_init__(self):
        super().__post_init__()
        if self.context != "previous_token":
            raise ValueError(f"a chain hidden_state has context 'previous_token', not {self.context!r}")

    def state_logits(self, params):
        return params["h"][_state_rows(self.vocab)] @ self.fixed_W().T


def make_hidden_state(context: str = "previous_token", **kwargs) -> HiddenState | SingleHiddenState:
    """A hidden-state head by context: ``"single"`` (k actions, no EOS; pass ``k``),
    ``"previous_token"`` (a chain: exact metrics, ``max_len=None`` allowed) or ``"prefix"`` (pass
    ``vocab`` and ``max_len``; forced stop only)."""
    if context == "single":
        return SingleHiddenState(**kwargs)
    if context == "previous_token":
        return ChainHiddenState(context=context, **kwargs)
    return HiddenState(context=context, **kwargs)


# --------------------------------------------------------------------------------------------
# The registry: one home for the families' names
# --------------------------------------------------------------------------------------------

FamilyClass = type[Family] | type[SingleContextFamily]  # what ``REGISTRY`` holds
AnyFamily = Family | SingleContextFamily  # a family of either kind (``single_context`` tells which)

_FamilyT = TypeVar("_FamilyT", bound=FamilyClass)

REGISTRY: dict[str, FamilyClass] = {}  # [policy] family name -> the class that name builds (its forms: ``variant``)


def register(cls: _FamilyT) -> _FamilyT:
    """Add a family class to ``REGISTRY`` under its ``name`` (usable as a decorator). The
    experiment schema, the runner, the command-line help and the documentation's family table
    read the registry, so a registered family runs end to end with nothing else to change."""
    if not isinstance(getattr(cls, "name", None), str) or not cls.name.isidentifier():
        raise ValueError(f"a family needs a name that is an identifier, not {getattr(cls, 'name', None)!r}")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"a family named '{cls.name}' is already registered ({REGISTRY[cls.name].__name__})")
    REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a family from ``REGISTRY`` (a test's family, once it has run)."""
    REGISTRY.pop(name, None)


def family_class(name: str, **options: Any) -> FamilyClass:
    """The class the ``[policy]`` table ``family = name`` with ``options`` builds (``variant``)."""
    if name not in REGISTRY:
        raise UnknownVariableError(f"unknown policy family '{name}'; the families are: {', '.join(REGISTRY)}")
    return REGISTRY[name].variant(**options)


def facts() -> list[dict[str, Any]]:
    """Each registered family's facts as data, in ``REGISTRY``'s order: ``name``,
    ``single_context``, ``finite_state`` (of its default form) and ``config_keys``. The command
    line's help reads them from the shipped table (``gradlab.answers.families``), without JAX."""
    return [{"name": n, "single_context": bool(cls.single_context), "finite_state": bool(cls.variant().finite_state),
             "config_keys": list(cls.config_keys)} for n, cls in REGISTRY.items()]


def has_logit_table(fam: Any) -> bool:
    """Whether a family supplies the optional fast path (``Family.table_logits``)."""
    return not fam.single_context and type(fam).table_logits is not Family.table_logits


class _SequenceFamilies(Mapping):
    """``FAMILIES``: the registry's EOS (sequence) families by name, a live view."""

    def __getitem__(self, name: str) -> type[Family]:
        cls = REGISTRY[name]
        if cls.single_context or not issubclass(cls, Family):
            raise KeyError(name)
        return cls

    def __iter__(self):
        return (n for n, cls in REGISTRY.items() if not cls.single_context)

    def __len__(self) -> int:
        return sum(1 for _ in self)


FAMILIES: Mapping[str, type[Family]] = _SequenceFamilies()

for _cls in (Unigram, Tabular, Bigram, LinearHead, HiddenState, Softmax):
    register(_cls)


def make_family(name: str, **kwargs) -> Family:
    """A sequence family by name (see ``FAMILIES``); ``max_len=None`` for the unbounded mode."""
    if name not in FAMILIES:
        raise UnknownVariableError(f"unknown policy family '{name}'; the families are: {', '.join(FAMILIES)}")
    return FAMILIES[name](**kwargs)


__all__ += ["SingleContextFamily", "Softmax", "SingleHiddenState", "HiddenState", "ChainHiddenState",
            "make_hidden_state", "HIDDEN_STATE_CONTEXTS"]
