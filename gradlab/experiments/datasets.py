"""Preference data for experiments: explicit pairs, the nine seeded presets with their
parameters exposed, hard or soft labels, and rewards.

Every dataset is a :class:`PairData`: a table of responses (``items``: EOS-padded token rows, or
action indices for single-context families) and the pairs as indices into it, with a weight per
pair (summing to 1) and a label, the probability that the first response of the pair is the
preferred one (1 for hard labels; sigma(r(y_w) - r(y_l)) for soft ones, Bradley-Terry).

Tokens: EOS is token 0 and content tokens are 1..vocab, so a policy family has ``vocab + 1``
tokens. A response is written as its content tokens; the EOS that ends it is implied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from gradlab.errors import DomainError
from gradlab.experiments.config import (
    ENUMERATED_PRESETS,
    ConfigError,
    DataConfig,
    LengthDist,
)

if TYPE_CHECKING:  # the policy layer imports JAX; this module imports it where it is used
    from gradlab.policies import AnyFamily, Family

__all__ = ["PairData", "RolloutData", "build", "best_worst_weights", "rollout_reward", "token_reward",
           "oracle_reward", "sequence_rewards",
           "item_rewards", "support"]


class PairData(NamedTuple):
    items: np.ndarray  # (N, T) EOS-padded content tokens, or (N,) action indices
    lengths: np.ndarray  # (N,) tokens including EOS (1 for an action)
    w: np.ndarray  # (n,) index of the chosen response
    l: np.ndarray  # (n,) index of the rejected response
    weight: np.ndarray  # (n,) sums to 1
    label: np.ndarray  # (n,) probability that w is preferred to l
    on_policy: bool = False  # weights are recomputed from the current policy every step

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays a compiled run reads (``inp["data"]``)."""
        return {"items": np.asarray(self.items), "lengths": np.asarray(self.lengths), "w": np.asarray(self.w),
                "l": np.asarray(self.l), "weight": np.asarray(self.weight, dtype=np.float64),
                "label": np.asarray(self.label, dtype=np.float64)}


class RolloutData(NamedTuple):
    """Groups of G responses drawn on-policy at every step, each with a binary reward: the reward
    as arrays (``groups.reward_arrays``), the lengths summed exactly (0..N: the forced stop, 1 for
    a softmax, else ``data.horizon`` or ``HORIZON_HEADROOM`` times the initial policy's length
    quantile ``groups.horizon``, so that the mass past N, recorded as ``tail_mass``, stays
    negligible while lengths grow; the steps ignore it), and G."""

    reward: dict[str, np.ndarray]
    span: np.ndarray  # (N + 1,) the lengths 0..N
    group_size: int
    on_policy: bool = True

    def arrays(self) -> dict[str, np.ndarray]:
        # G is read off the shape of ``group`` in the compiled program (one program per G)
        return {**self.reward, "span": self.span, "group": np.zeros(self.group_size)}


# --------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------


def token_reward(cfg: DataConfig, fam: AnyFamily) -> np.ndarray | None:
    """The reward per token (EOS first, worth 0) or per action, or None when only explicit
    per-sequence values (or nothing, for a single-context family) are given.

    The default for EOS families is the posts' oracle: token 1 is good (+1), token 2 bad (-1).
    """
    if isinstance(cfg.reward, dict):
        return None
    if cfg.reward is not None:
        r = np.asarray(cfg.reward, dtype=float)
        return r if fam.single_context else np.concatenate([[0.0], r])
    if fam.single_context:
        return None
    return oracle_reward(fam.vocab)


def oracle_reward(n_tokens: int) -> np.ndarray:
    """The posts' oracle, per token of an EOS family with ``n_tokens`` tokens (EOS first): token 1
    is good (+1), token 2 bad (-1), the others and EOS 0. A response's reward is the sum over its
    tokens, so it prefers no length when good and bad tokens are equally likely."""
    r = np.zeros(n_tokens)
    r[1] = 1.0
    if n_tokens > 2:
        r[2] = -1.0
    return r


def sequence_rewards(fam: Family) -> np.ndarray:
    """The oracle's reward of every response of a forced-stop family (rows as in
    ``policies.all_sequences``, which is ``fam.enumerate``'s order)."""
    from gradlab.policies import sequence_sums

    return sequence_sums(fam.vocab, fam.stop_len, oracle_reward(fam.vocab))


def item_rewards(reward: np.ndarray, items: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Additive reward of each response: the sum over its tokens (EOS worth 0), or the action's."""
    if items.ndim == 1:
        return reward[items]
    mask = np.arange(items.shape[1]) < lengths[:, None]
    return (reward[items] * mask).sum(-1)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def rollout_reward(cfg: DataConfig) -> Any:
    """The binary reward of ``data.kind = "rollouts"``: a :class:`~gradlab.experiments.groups.Reward`."""
    from gradlab.experiments import groups

    if not isinstance(cfg.reward, Mapping):
        raise DomainError("data.kind = 'rollouts' needs a binary reward: {first_token}, {contains} or {table}")
    (kind, values), = cfg.reward.items()
    if kind == "table":
        return groups.table(values)
    return getattr(groups, kind)(*(int(t) for t in values))


HORIZON_HEADROOM = 8  # an unbounded chain's N: this many times the initial policy's (or data.horizon)


def _rollouts(cfg: DataConfig, fam, init_params: Any) -> RolloutData:
    from gradlab.experiments import groups
    from gradlab.policies import SingleContextFamily

    arrays = groups.reward_arrays(fam, rollout_reward(cfg))
    n = groups.horizon(fam, init_params)
    if not isinstance(fam, SingleContextFamily) and not fam.forced_stop:
        n = cfg.horizon or HORIZON_HEADROOM * n  # room for lengths that grow in training
    return RolloutData(arrays, np.arange(n + 1, dtype=np.float64), cfg.group_size)


def build(cfg: DataConfig, fam: AnyFamily, seed: int, init_params: Any, ref_params: Any) -> PairData | RolloutData:
    """The dataset of one run. Presets draw from ``cfg.seed`` if given, else the run's seed."""
    if cfg.kind == "rollouts":
        return _rollouts(cfg, fam, init_params)
    rng = np.random.default_rng(seed if cfg.seed is None else cfg.seed)
    reward = token_reward(cfg, fam)
    if cfg.kind == "pairs":
        data = _explicit(cfg, fam)
    elif cfg.kind in ENUMERATED_PRESETS:
        assert reward is not None  # validated: this preset labels by a reward
        data = _enumerated(cfg.kind, fam, reward, ref_params, cfg.best_of)
    elif cfg.kind == "similar_embeddings":
        data = _similar_embeddings(cfg, fam, reward, init_params)
    elif cfg.kind == "shared_prefix":
        assert reward is not None  # validated: this preset labels by a reward
        data = _shared_prefix(cfg, fam, reward, rng)
    else:
        data = _length_preset(cfg, fam, rng)
    if cfg.labels == "soft":
        data = data._replace(label=_soft_labels(cfg, data, reward))
    return data


def _pad(rows: list[tuple[int, ...]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Content-token rows -> EOS-padded ``(n, width)`` array and lengths counting the EOS."""
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, np.array([len(r) + 1 for r in rows], dtype=np.int64)


def _width(fam, longest: int) -> int:
    return fam.max_len if fam.max_len is not None else longest + 1


def _from_rows(fam, chosen: list, rejected: list, weights=None) -> PairData:
    n = len(chosen)
    if fam.single_context:
        items, lengths = np.asarray(list(chosen) + list(rejected), dtype=np.int64), np.ones(2 * n, dtype=np.int64)
    else:
        rows = [tuple(r) for r in list(chosen) + list(rejected)]
        items, lengths = _pad(rows, _width(fam, max(map(len, rows))))
    w = np.full(n, 1.0) if weights is None else np.asarray(weights, dtype=float)
    return PairData(items, lengths, np.arange(n), n + np.arange(n), w / w.sum(), np.ones(n))


def _explicit(cfg: DataConfig, fam) -> PairData:
    assert cfg.chosen is not None and cfg.rejected is not None  # kind = "pairs" sets both (the schema)
    return _from_rows(fam, list(cfg.chosen), list(cfg.rejected), cfg.weights)


def _favouring(vocab: int, token: int) -> np.ndarray:
    """Content-token distribution with half its mass on ``token`` and the rest shared."""
    if vocab == 1:
        return np.ones(1)
    p = np.full(vocab, 0.5 / (vocab - 1))
    p[token - 1] = 0.5
    return p


def _default_lengths(kind: str, k_max: int) -> tuple[LengthDist, LengthDist]:
    mid = max(1, k_max // 2)
    full = LengthDist("uniform", 1, k_max)
    long, short = LengthDist("uniform", min(mid + 1, k_max), k_max), LengthDist("uniform", 1, mid)
    return {"equal_length": (full, full), "chosen_longer": (long, short),
            "rejected_longer": (short, long), "shared_prefix": (full, full)}[kind]


def _draw_lengths(rng: np.random.Generator, dist: LengthDist, n: int, k_max: int | None,
                  k_min: int = 0) -> np.ndarray:
    """Numbers of content tokens. A poisson draw outside ``k_min..k_max`` is redrawn (the law is
    the poisson conditioned on fitting), never clipped onto the bounds."""
    if dist.dist == "uniform":
        hi = dist.high if dist.high is not None else k_max
        if hi is None:
            raise ConfigError("a uniform length needs high when policy.max_len is 'none'")
        assert dist.low is not None  # a uniform length has its low (the schema's default 0)
        return rng.integers(dist.low, hi + 1, size=n)
    mean = dist.mean
    assert mean is not None  # a poisson length has its mean (the schema)
    out = rng.poisson(mean, size=n)
    for _ in range(1000):
        bad = (out < k_min) | (out > (k_max if k_max is not None else np.inf))
        if not bad.any():
            return out
        out[bad] = rng.poisson(mean, size=int(bad.sum()))
    raise DomainError(f"a poisson length of mean {dist.mean} almost never fits {k_min}..{k_max} content tokens")


def _length_preset(cfg: DataConfig, fam, rng: np.random.Generator) -> PairData:
    """equal_length, chosen_longer, rejected_longer: lengths from two distributions (the same
    one for equal_length), content tokens i.i.d. from two token distributions (by default the
    chosen favour token 1 and the rejected token 2, the oracle's good and bad tokens)."""
    vocab, k_max = fam.vocab - 1, (fam.max_len - 1 if fam.max_len is not None else None)
    d_w, d_l = _default_lengths(cfg.kind, k_max if k_max is not None else 5)
    d_w, d_l = cfg.chosen_length or d_w, cfg.rejected_length or d_l
    p_w = np.asarray(cfg.chosen_token_probs or _favouring(vocab, 1), dtype=float)
    p_l = np.asarray(cfg.rejected_token_probs or _favouring(vocab, min(2, vocab)), dtype=float)
    n = cfg.n_pairs
    k_w, k_l = _draw_lengths(rng, d_w, n, k_max), _draw_lengths(rng, d_l, n, k_max)
    return _from_rows(fam, _tokens(rng, p_w, k_w), _tokens(rng, p_l, k_l))


def _tokens(rng: np.random.Generator, p: np.ndarray, lengths: np.ndarray) -> list[tuple]:
    """Rows of ``lengths`` content tokens i.i.d. from ``p`` (over tokens 1..len(p)): the draws
    ``rng.choice(tokens, size=k, p=p / p.sum())`` makes for each ``k`` in turn, the same numbers
    from the same stream (numpy's choice inverts the normalised cdf at ``rng.random(k)``), in
    one call for every row (a call per row was most of a seed's data, ~2 ms)."""
    q = p / p.sum()
    cdf = q.cumsum()
    cdf /= cdf[-1]
    tokens = np.arange(1, len(p) + 1)[cdf.searchsorted(rng.random(int(np.sum(lengths))), side="right")]
    return [tuple(row) for row in np.split(tokens, np.cumsum(lengths)[:-1])]


def _shared_prefix(cfg: DataConfig, fam, reward: np.ndarray, rng: np.random.Generator) -> PairData:
    """Two responses of the same length that differ in one position; the reward decides which
    one is chosen (the tokens elsewhere are uniform)."""
    vocab, k_max = fam.vocab - 1, (fam.max_len - 1 if fam.max_len is not None else None)
    dist = cfg.chosen_length or _default_lengths("shared_prefix", k_max if k_max is not None else 5)[0]
    chosen, rejected = [], []
    for k in _draw_lengths(rng, dist, cfg.n_pairs, k_max, k_min=1):  # one position must differ
        a = rng.integers(1, vocab + 1, size=k)
        b = a.copy()
        pos = rng.integers(0, k)
        b[pos] = (a[pos] - 1 + rng.integers(1, vocab)) % vocab + 1  # a different token
        if reward[b[pos]] > reward[a[pos]]:
            a, b = b, a
        chosen.append(tuple(a))
        rejected.append(tuple(b))
    return _from_rows(fam, chosen, rejected)


def _similar_embeddings(cfg: DataConfig, fam, reward, init_params) -> PairData:
    """Single-token responses: the two content tokens whose output rows of W are most similar at
    initialisation (tokens 1 and 2 when the family has no W); the better-rewarded one is chosen."""
    vocab = fam.vocab - 1
    a, b = 1, 2
    W = None
    if isinstance(init_params, dict) and "W" in init_params:
        W = np.asarray(init_params["W"])
    elif hasattr(fam, "fixed_W"):
        W = np.asarray(fam.fixed_W())
    if W is not None:
        rows = W[1:]
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        sim = unit @ unit.T - 2 * np.eye(vocab)
        i, j = np.unravel_index(np.argmax(sim), sim.shape)
        a, b = int(i) + 1, int(j) + 1
    if reward is not None and reward[b] > reward[a]:
        a, b = b, a
    return _from_rows(fam, [(a,)] * cfg.n_pairs, [(b,)] * cfg.n_pairs)


def enumeration(fam: AnyFamily) -> tuple[np.ndarray, np.ndarray]:
    """Every response, in the order of ``fam.enumerate`` (whose probabilities the metrics use):
    the sequences the family enumerates, or the k actions."""
    if fam.single_context:
        return np.arange(fam.k), np.ones(fam.k, dtype=np.int64)
    from gradlab.policies import Family, all_sequences

    if type(fam)._enumerate is Family._enumerate:  # the table itself, without running JAX
        fam._need_forced_stop("enumeration")  # the refusal of fam.enumerate when unbounded
        return all_sequences(fam.vocab, fam.stop_len)
    import jax

    e = fam.enumerate(fam.init(jax.random.PRNGKey(0)))
    return np.asarray(e.seqs), np.asarray(e.lengths)


def _reference_distribution(fam, ref_params, items, lengths) -> np.ndarray:
    if fam.single_context:
        return np.asarray(fam.probabilities(ref_params))
    logp = np.asarray(fam.logprob(ref_params, items, lengths))
    p = np.exp(logp - logp.max())
    return p / p.sum()  # pi_0 renormalised to finished sequences, as in docs/background.md's J_0


def _enumerated(kind: str, fam, reward: np.ndarray, ref_params, best_of: int = 10) -> PairData:
    """on_policy: every ordered pair (y = y' included, as in the first post's sum) labelled by
    the reward and reweighted each step by the current policy. reference_pairs: every ordered
    pair of distinct responses, weighted pi_0(y) pi_0(y'). population: every ordered pair of
    distinct responses weighted pi_0(y) pi_0(y') sigma(r(y) - r(y')), Bradley-Terry data whose
    DPO-family optimum is the closed form of docs/background.md. best_of_n: n = ``best_of`` responses drawn
    from pi_0, the best of them chosen and the worst rejected (:func:`best_worst_weights`, exact);
    a loss of the chosen alone (``sft``) is then maximum likelihood on filtered samples.

    Ties are never a preference: in every preset a tied pair contributes both labellings at
    weight 1/2 (on_policy and reference_pairs list (y, y') and (y', y) at equal weights; in
    population sigma(0) = 1/2 does it)."""
    items, lengths = enumeration(fam)
    r = item_rewards(reward, items, lengths)
    n = len(items)
    i, j = (x.ravel() for x in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    if kind not in ("on_policy", "best_of_n"):
        keep = i != j
        i, j = i[keep], j[keep]
    if kind == "population":
        q = _reference_distribution(fam, ref_params, items, lengths)
        weight = q[i] * q[j] / (1.0 + np.exp(-(r[i] - r[j])))
        return PairData(items, lengths, i, j, weight / weight.sum(), np.ones(len(i)))
    if kind == "best_of_n":
        q = _reference_distribution(fam, ref_params, items, lengths)
        weight = best_worst_weights(q, r, best_of)[i, j]
        return PairData(items, lengths, i, j, weight / weight.sum(), np.ones(len(i)))
    # The oracle labels each ordered pair (i, j): the higher reward wins. A tie keeps the order
    # listed, and since (j, i) is listed too with the same weight, a tied pair contributes both
    # labellings at half its weight each: no preference, so it exerts no net force at h = 0.
    i_wins = r[i] >= r[j]
    w, l = np.where(i_wins, i, j), np.where(i_wins, j, i)
    if kind == "on_policy":
        return PairData(items, lengths, w, l, np.full(len(w), 1.0 / len(w)), np.ones(len(w)), on_policy=True)
    q = _reference_distribution(fam, ref_params, items, lengths)
    weight = q[w] * q[l]
    return PairData(items, lengths, w, l, weight / weight.sum(), np.ones(len(w)))


def best_worst_weights(q: np.ndarray, r: np.ndarray, n: int) -> np.ndarray:
    """``P[y, y']``: the probability that, of ``n`` >= 2 independent draws from ``q``, the best
    (highest reward) is ``y`` and the worst is ``y'``, exactly.

    Over the distinct reward levels in increasing order with cumulative mass S (S_{-1} = 0), the
    chance that every draw lies in levels b..a is H(a, b) = (S_a - S_{b-1})^n, so by inclusion and
    exclusion P(max level a, min level b) = H(a, b) - H(a-1, b) - H(a, b+1) + H(a-1, b+1), and
    given the levels the best and worst draws are q restricted to their level, independently.
    Ties are never a preference: within one level (all n draws tied, a = b) the pair (y, y')
    and its swap get the same weight q(y) q(y') / Q_a^2, both labellings at 1/2."""
    levels, level_of = np.unique(np.asarray(r, dtype=float), return_inverse=True)
    mass = np.bincount(level_of, weights=q, minlength=len(levels))
    cum = np.concatenate([[0.0], np.cumsum(mass)])  # cum[a + 1] = S_a

    def h(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        inside = (a >= b) & (a >= 0) & (b < len(levels))
        a_, b_ = np.clip(a, 0, len(levels) - 1), np.clip(b, 0, len(levels) - 1)
        return np.where(inside, np.clip(cum[a_ + 1] - cum[b_], 0.0, None) ** n, 0.0)

    a, b = np.meshgrid(np.arange(len(levels)), np.arange(len(levels)), indexing="ij")
    joint = h(a, b) - h(a - 1, b) - h(a, b + 1) + h(a - 1, b + 1)  # (max level, min level)
    level_mass = mass[level_of]
    within = np.divide(q, level_mass, out=np.zeros_like(level_mass), where=level_mass > 0)  # q given its level
    return joint[level_of[:, None], level_of[None, :]] * within[:, None] * within[None, :]


def _soft_labels(cfg: DataConfig, data: PairData, reward: np.ndarray | None) -> np.ndarray:
    """P(y_w preferred) = sigma(r(y_w) - r(y_l)) under Bradley-Terry."""
    if isinstance(cfg.reward, dict):
        r_w, r_l = np.asarray(cfg.reward["chosen"]), np.asarray(cfg.reward["rejected"])
    else:
        assert reward is not None  # validated: soft labels need a reward
        r = item_rewards(reward, data.items, data.lengths)
        r_w, r_l = r[data.w], r[data.l]
    return 1.0 / (1.0 + np.exp(-(r_w - r_l)))


def support(fam: AnyFamily, data: PairData) -> np.ndarray:
    """0/1 over ``enumeration(fam)``: which responses appear in the data."""
    items, lengths = enumeration(fam)
    used = np.unique(np.concatenate([data.w, data.l]))
    if fam.single_context:
        out = np.zeros(fam.k)
        out[data.items[used]] = 1.0
        return out
    # a response is its tokens up to its length (the EOS included when it has one)
    table = {tuple(row[:n]): i for i, (row, n) in enumerate(zip(items, lengths, strict=True))}
    out = np.zeros(len(items))
    for u in used:
        out[table[tuple(data.items[u, : data.lengths[u]])]] = 1.0
    return out
