"""Toy categorical policies in JAX (float64), with an explicit EOS token so that length is a
property of the policy.

Token 0 is EOS; tokens 1..V-1 are content. A response is a sequence of content tokens closed by
EOS, stored as a row of a padded int array ``(max_len,)`` with EOS at index ``length - 1`` and
EOS padding after it; its length counts the EOS. A policy never emits more than ``max_len``
tokens: the probability that it is still running at the cut-off is reported by ``enumerate``.

A family is a frozen description (vocabulary, cut-off, shapes); its parameters are a pytree
passed alongside, so that ``jax.grad``, ``jit`` and ``vmap`` apply directly. A reference policy
is the same family with frozen (non-differentiated) parameters.

Families:

- ``Unigram``: i.i.d. tokens, so the length is geometric.
- ``Tabular``: free logits for every prefix up to the cut-off.
- ``Bigram``: logits depend on the previous token only (parameters shared across positions).
- ``LinearHead``: logits = W h(previous token), with fixed or trainable features h; W is shared
  by every context, the setting in which likelihood displacement is analysed.
- ``SingleContext``: one softmax over K atomic responses (no EOS), for exact one-step facts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)


def _enable_compilation_cache() -> None:
    """Keep XLA's compiled programs on disk beside the derivation cache (unless the cache is
    off), so a sweep, a check or a notebook view compiled once is not compiled again in the
    next process. Compilation is most of the cold time of those programs."""
    from gradlab._cache import cache_dir

    folder = cache_dir()
    if folder is None or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(folder / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


_enable_compilation_cache()

# Families are frozen (hashable) dataclasses, so their methods jit with ``self`` static: one
# compilation per family and shape, instead of op-by-op dispatch.
_method_jit = functools.partial(jax.jit, static_argnums=0)

__all__ = [
    "EOS",
    "Family",
    "Unigram",
    "Tabular",
    "Bigram",
    "LinearHead",
    "SingleContext",
    "Enumeration",
    "FAMILIES",
    "make_family",
    "all_sequences",
    "sequence_sums",
]

EOS = 0
Params = Any


class Enumeration(NamedTuple):
    """Every finished sequence up to the cut-off with its probability under some parameters."""

    seqs: jax.Array  # (N, max_len) int
    lengths: jax.Array  # (N,) int, including EOS
    logp: jax.Array  # (N,) float64
    running_mass: jax.Array  # probability of not having emitted EOS by max_len


def all_sequences(vocab: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Every sequence of content tokens of length 0..max_len-1 followed by EOS, EOS-padded."""
    content = vocab - 1
    rows, lengths = [], []
    for k in range(max_len):
        if content == 0 and k > 0:
            break
        grid = np.indices((content,) * k).reshape(k, -1).T + 1 if k else np.zeros((1, 0), int)
        block = np.zeros((grid.shape[0], max_len), dtype=np.int64)
        block[:, :k] = grid
        rows.append(block)
        lengths.append(np.full(grid.shape[0], k + 1))
    return np.concatenate(rows), np.concatenate(lengths)


@dataclass(frozen=True)
class Family:
    """Base class: subclasses define ``init`` and ``logits``."""

    vocab: int = 4
    max_len: int = 6

    name = "family"

    def __post_init__(self):
        if self.vocab < 2:
            raise ValueError(f"vocab must be at least 2 (EOS plus one content token), not {self.vocab}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be at least 1, not {self.max_len}")

    # -- to be defined by each family -------------------------------------------------------

    def init(self, key: jax.Array, scale: float = 1.0) -> Params:
        raise NotImplementedError

    def logits(self, params: Params, seqs: jax.Array) -> jax.Array:
        """Next-token logits at every position given the prefix: ``(..., max_len, vocab)``."""
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------------

    @_method_jit
    def token_logprobs(self, params: Params, seqs: jax.Array) -> jax.Array:
        """Log-softmax of the next-token distribution at every position."""
        return jax.nn.log_softmax(self.logits(params, seqs), axis=-1)

    def mask(self, lengths: jax.Array) -> jax.Array:
        return jnp.arange(self.max_len) < lengths[..., None]

    @_method_jit
    def per_token_logp(self, params: Params, seqs: jax.Array, lengths: jax.Array) -> jax.Array:
        """log pi(y_t | y_<t) for every real token, 0 on padding."""
        lp = jnp.take_along_axis(self.token_logprobs(params, seqs), seqs[..., None], axis=-1)[..., 0]
        return jnp.where(self.mask(lengths), lp, 0.0)

    @_method_jit
    def logprob(self, params: Params, seqs: jax.Array, lengths: jax.Array) -> jax.Array:
        """Exact sequence log-probability, summed over tokens (EOS included)."""
        return self.per_token_logp(params, seqs, lengths).sum(-1)

    @_method_jit
    def tail_logprob(self, params: Params, seqs: jax.Array, lengths: jax.Array, shared: jax.Array) -> jax.Array:
        """Log-prob of the tokens past position ``shared`` (LD-DPO's verbose tail)."""
        lp = self.per_token_logp(params, seqs, lengths)
        return jnp.where(jnp.arange(self.max_len) >= shared[..., None], lp, 0.0).sum(-1)

    @_method_jit
    def enumerate(self, params: Params) -> Enumeration:
        """Every finished sequence with its exact log-probability, and the mass still running."""
        seqs, lengths = all_sequences(self.vocab, self.max_len)
        seqs, lengths = jnp.asarray(seqs), jnp.asarray(lengths)
        logp = self.logprob(params, seqs, lengths)
        running = jnp.clip(1.0 - jnp.exp(jax.nn.logsumexp(logp)), 0.0, 1.0)
        return Enumeration(seqs, lengths, logp, running)

    @functools.partial(jax.jit, static_argnums=(0, 3))
    def sample(self, params: Params, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """``n`` sequences drawn from the policy: ``(seqs, lengths)``. A sequence still running at
        the cut-off is returned without EOS, with length ``max_len + 1`` as a marker."""

        def step(carry, t):
            seqs, done, key = carry
            key, sub = jax.random.split(key)
            logits = self.logits(params, seqs)[:, t, :]
            tok = jax.random.categorical(sub, logits, axis=-1)
            tok = jnp.where(done, EOS, tok)
            seqs = seqs.at[:, t].set(tok)
            return (seqs, done | (tok == EOS), key), None

        seqs0 = jnp.zeros((n, self.max_len), dtype=jnp.int64)
        done0 = jnp.zeros((n,), dtype=bool)
        (seqs, done, _), _ = jax.lax.scan(step, (seqs0, done0, key), jnp.arange(self.max_len))
        first_eos = jnp.argmax(seqs == EOS, axis=-1)
        lengths = jnp.where(done, first_eos + 1, self.max_len + 1)
        return seqs, lengths

    @_method_jit
    def expected_length(self, params: Params) -> jax.Array:
        """E[min(length, max_len)]: finished sequences by enumeration, running ones count max_len."""
        e = self.enumerate(params)
        return (jnp.exp(e.logp) * e.lengths).sum() + e.running_mass * self.max_len

    @_method_jit
    def sequence_entropy(self, params: Params) -> jax.Array:
        """Entropy (nats) of the distribution over finished sequences, renormalised to them."""
        e = self.enumerate(params)
        logp = e.logp - jax.nn.logsumexp(e.logp)
        return -(jnp.exp(logp) * logp).sum()

    @_method_jit
    def token_entropy(self, params: Params) -> jax.Array:
        """Mean per-token entropy along the policy's own sequences: E[sum_t H_t] / E[length]."""
        e = self.enumerate(params)
        lps = self.token_logprobs(params, e.seqs)
        h = -(jnp.exp(lps) * lps).sum(-1)
        h = jnp.where(self.mask(e.lengths), h, 0.0).sum(-1)
        w = jnp.exp(e.logp)
        return (w * h).sum() / (w * e.lengths).sum()

    @_method_jit
    def eos_probability(self, params: Params) -> jax.Array:
        """Mean probability of EOS at each step along the policy's own sequences."""
        e = self.enumerate(params)
        p_eos = jnp.exp(self.token_logprobs(params, e.seqs)[..., EOS])
        p_eos = jnp.where(self.mask(e.lengths), p_eos, 0.0).sum(-1)
        w = jnp.exp(e.logp)
        return (w * p_eos).sum() / (w * e.lengths).sum()

    @_method_jit
    def tempered_logprob(self, params: Params, seqs: jax.Array, lengths: jax.Array, tau: float) -> jax.Array:
        """log of the sequence-level tempered policy pi^(1/tau)/Z, with Z over finished sequences."""
        e = self.enumerate(params)
        log_z = jax.nn.logsumexp(e.logp / tau)
        return self.logprob(params, seqs, lengths) / tau - log_z

    def temper_tokens(self, params: Params, tau: float) -> Params:
        """Token-level tempering: every next-token softmax at temperature tau. For sequences this
        differs from ``tempered_logprob`` (each step is renormalised)."""
        return jax.tree_util.tree_map(lambda p: p / tau, params)  # logits are linear in params


def _prev_tokens(seqs: jax.Array, bos: int) -> jax.Array:
    """The token before each position; ``bos`` before the first."""
    pad = jnp.full(seqs.shape[:-1] + (1,), bos, dtype=seqs.dtype)
    return jnp.concatenate([pad, seqs[..., :-1]], axis=-1)


@dataclass(frozen=True)
class Unigram(Family):
    """Unigram + EOS: every token i.i.d. from softmax(theta); length is geometric in P(EOS)."""

    name = "unigram"

    def init(self, key, scale=1.0):
        return {"theta": scale * jax.random.normal(key, (self.vocab,))}

    def logits(self, params, seqs):
        return jnp.broadcast_to(params["theta"], seqs.shape + (self.vocab,))


@dataclass(frozen=True)
class Bigram(Family):
    """Markov: logits depend on the previous token (row V is the start state)."""

    name = "bigram"

    def init(self, key, scale=1.0):
        return {"W": scale * jax.random.normal(key, (self.vocab + 1, self.vocab))}

    def logits(self, params, seqs):
        return params["W"][_prev_tokens(seqs, self.vocab)]


@dataclass(frozen=True)
class Tabular(Family):
    """Tabular autoregressive: free logits for every prefix of content tokens."""

    name = "tabular"

    @property
    def n_prefixes(self) -> int:
        c = self.vocab - 1
        return sum(c**k for k in range(self.max_len))

    def init(self, key, scale=1.0):
        return {"table": scale * jax.random.normal(key, (self.n_prefixes, self.vocab))}

    def prefix_index(self, seqs: jax.Array) -> jax.Array:
        """Row of the table for the prefix before each position (garbage after EOS, masked).

        The prefix y_<t (content tokens 1..c) is row offset[t] + sum_{s<t} (y_s - 1) c^(t-1-s).
        """
        c, T = self.vocab - 1, self.max_len
        offsets = np.cumsum([0] + [c**k for k in range(T - 1)])
        powers = np.array([[c ** (t - 1 - s) if s < t else 0 for s in range(T)] for t in range(T)])
        digits = jnp.clip(seqs - 1, 0, max(c - 1, 0))
        return jnp.asarray(offsets) + digits @ jnp.asarray(powers.T)

    def logits(self, params, seqs):
        return params["table"][self.prefix_index(seqs)]


@dataclass(frozen=True)
class LinearHead(Family):
    """Shared-feature linear head: logits = W h(previous token), W shared by every context.

    ``features`` (d per context, row V is the start state) are fixed random unit vectors unless
    ``train_features`` is set, in which case they are parameters too.
    """

    dim: int = 3
    train_features: bool = False
    feature_seed: int = 0
    name = "linear_head"

    def fixed_features(self) -> jax.Array:
        f = jax.random.normal(jax.random.PRNGKey(self.feature_seed), (self.vocab + 1, self.dim))
        return f / jnp.linalg.norm(f, axis=-1, keepdims=True)

    def init(self, key, scale=1.0):
        params = {"W": scale * jax.random.normal(key, (self.vocab, self.dim))}
        if self.train_features:
            params["features"] = self.fixed_features()
        return params

    def logits(self, params, seqs):
        feats = params["features"] if self.train_features else self.fixed_features()
        return feats[_prev_tokens(seqs, self.vocab)] @ params["W"].T

    def temper_tokens(self, params, tau):
        return {**params, "W": params["W"] / tau}


@dataclass(frozen=True)
class SingleContext:
    """One softmax over ``k`` atomic responses: log pi(y) = log_softmax(theta)[y]."""

    k: int = 5
    name = "single_context"

    def init(self, key, scale=1.0):
        return {"theta": scale * jax.random.normal(key, (self.k,))}

    @_method_jit
    def logprob(self, params, y):
        return jax.nn.log_softmax(params["theta"])[y]


FAMILIES: dict[str, type[Family]] = {
    "unigram": Unigram,
    "tabular": Tabular,
    "bigram": Bigram,
    "linear_head": LinearHead,
}


def make_family(name: str, **kwargs) -> Family:
    """A family by name (``unigram``, ``tabular``, ``bigram``, ``linear_head``)."""
    from gradlab.errors import UnknownVariableError

    if name not in FAMILIES:
        raise UnknownVariableError(f"unknown policy family '{name}'; the families are: {', '.join(FAMILIES)}")
    return FAMILIES[name](**kwargs)


def sequence_sums(vocab: int, max_len: int, token_values) -> np.ndarray:
    """Sum of a per-token value over the tokens of every enumerated sequence (EOS included),
    e.g. an oracle's reward of each sequence; rows as in ``all_sequences``."""
    seqs, lengths = all_sequences(vocab, max_len)
    return (np.asarray(token_values)[seqs] * (np.arange(max_len) < lengths[:, None])).sum(-1)


def geometric_expected_length(p_eos: float, max_len: int) -> float:
    """E[min(L, max_len)] for i.i.d. tokens with EOS probability p_eos (L counts the EOS)."""
    return (1.0 - (1.0 - p_eos) ** max_len) / p_eos if p_eos > 0 else float(max_len)


# ============================================================================================
# Issue 13: single-context families and the hidden-state head (one block, registered below).
# ============================================================================================


@dataclass(frozen=True)
class SingleContextFamily:
    """Base of the families with one context and ``k`` atomic actions (no EOS, no length): a
    response is an action index 0..k-1 and log pi(y) = log_softmax(logits(params))[y].

    The metric names follow ``Family`` where they mean the same thing: ``sequence_entropy`` is the
    entropy of the distribution over responses, here the k actions.
    """

    k: int = 5
    name = "single_context_family"

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


def make_hidden_state(context: str = "previous_token", **kwargs) -> HiddenState | SingleHiddenState:
    """A hidden-state head by context: ``"single"`` (k actions, no EOS; pass ``k``),
    ``"previous_token"`` or ``"prefix"`` (pass ``vocab`` and ``max_len``)."""
    if context == "single":
        return SingleHiddenState(**kwargs)
    return HiddenState(context=context, **kwargs)


# The EOS (sequence) families are what ``FAMILIES`` iterates over (checks and tests run every
# one); the single-context families, which have no EOS and no length, have their own registry.
FAMILIES.update({"hidden_state": HiddenState})
SINGLE_CONTEXT_FAMILIES: dict[str, type[SingleContextFamily]] = {
    "softmax": Softmax,
    "hidden_state": SingleHiddenState,
}
__all__ += ["SingleContextFamily", "Softmax", "SingleHiddenState", "HiddenState", "make_hidden_state",
            "SINGLE_CONTEXT_FAMILIES", "HIDDEN_STATE_CONTEXTS"]
# ============================================================================================
# End of the issue-13 block.
# ============================================================================================
