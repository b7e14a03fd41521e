"""Training dynamics on toy policies: the pre-runner simulator, kept only for its remaining callers.

LEFTOVER, removed at the merge when figures/benchmarks move: ``gradlab simulate``, the notebooks'
views and the entropy figure run on ``gradlab.experiments`` (the experiment runner). What is left
here is used by ``gradlab/figures/{length_drift,scorecard,displacement,proper_loss}.py`` (issue 14)
and ``benchmarks/`` (issue 17): ``simulate``, ``Simulation``, ``METRICS``, ``make_dataset``,
``DATASETS``, ``drift_factor`` and, re-exported from ``gradlab.experiments.datasets`` (their one
definition), ``oracle_reward`` and ``sequence_rewards``. New code uses ``gradlab.experiments``.

A dataset is a table of distinct responses and (chosen, rejected) rows into it with a weight per
pair; the enumerating datasets (pairs drawn from the policy or the reference) use the whole
forced-stop support, stopped responses included, so every objective accounts for all the mass.
Every metric is exact and comes from the policy layer (``Family.metrics``): expected generated
length (untruncated when the policy is unbounded, ``max_len=None``), sequence and per-token
entropy, EOS probability, the probability of the forced stop, the expected oracle reward, the
mass outside the training responses, and the training pairs' log-probs, implicit-reward margin
and reward accuracy.

The step is compiled once with ``jit``; seeds and hyperparameter settings run together under
``vmap`` (and, when several JAX devices exist, the batch axis is sharded across them with
``jax.sharding``). Training runs in chunks so that a progress callback can report, and Ctrl-C
returns the metrics recorded so far, marked ``interrupted``.

The policy starts equal to its reference. Gradients are JAX autodiff of the loss computed from
the policy, which ``gradlab.checks`` verifies against the derived closed forms.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradlab import budgets, symbolic
from gradlab.errors import DomainError, UnknownVariableError
from gradlab.experiments.datasets import oracle_reward, sequence_rewards
from gradlab.experiments.runner import _shard
from gradlab.losses import Loss
from gradlab.policies import (
    CHAIN_RTOL,
    EOS,
    Family,
    Reference,
    all_sequences,
    canonical_variables,
    make_family,
    pair_variables,
)
from gradlab.runtime import require_x64

__all__ = ["DATASETS", "DATA_LEN", "METRICS", "Pairs", "Simulation", "drift_factor", "final", "make_dataset",
           "oracle_reward", "sequence_rewards", "simulate"]

METRICS = (
    "expected_length",
    "sequence_entropy",
    "token_entropy",
    "eos_probability",
    "lp_w",
    "lp_l",
    "mass_outside_data",
    "stopped_mass",
    "margin",
    "reward_accuracy",
    "expected_reward",
    "loss",
    "metric_error_bound",
)

# Width of the generated offline responses (content tokens 1..DATA_LEN-1, then EOS) when the
# policy is unbounded; with a forced stop at K the data use K.
DATA_LEN = 6


class Pairs(NamedTuple):
    """Preference pairs: a table of distinct responses and, per pair, the rows of the chosen and
    the rejected one, with weights. Enumerating datasets (``on_policy``, ``reference_pairs``,
    ``population``) use the whole forced-stop support as the table (``all_sequences`` order)."""

    seqs: np.ndarray  # (m, width) distinct responses
    lengths: np.ndarray  # (m,)
    w: np.ndarray  # (n,) chosen rows
    l: np.ndarray  # (n,) rejected rows
    weight: np.ndarray  # (n,), sums to 1
    on_policy: bool = False  # weights are recomputed from the current policy every step


def _data_len(fam: Family) -> int:
    return fam.max_len if fam.forced_stop else DATA_LEN


def _responses(tokens: np.ndarray, k: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Content tokens ``tokens[:, :k]`` followed by EOS, EOS-padded to ``width``."""
    seqs = np.where(np.arange(width) < k[:, None], np.pad(tokens, ((0, 0), (0, width - tokens.shape[1]))), EOS)
    return seqs.astype(np.int64), (k + 1).astype(np.int64)


def _table(seqs_w, len_w, seqs_l, len_l, weight=None) -> Pairs:
    """Pairs over a table of the distinct responses among the chosen and rejected ones."""
    n = len(len_w)
    both = np.concatenate([np.concatenate([seqs_w, len_w[:, None]], 1), np.concatenate([seqs_l, len_l[:, None]], 1)])
    rows, inverse = np.unique(both, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    weight = np.full(n, 1.0 / n) if weight is None else weight
    return Pairs(rows[:, :-1], rows[:, -1], inverse[:n], inverse[n:], weight)


def _content(rng, n, k_max, probs) -> np.ndarray:
    return rng.choice(np.arange(1, len(probs) + 1), size=(n, k_max), p=probs)


def _token_probs(vocab: int, favour: int) -> np.ndarray:
    """Content-token distribution that favours one token (0.5 on it, the rest shared)."""
    c = vocab - 1
    p = np.full(c, 0.5 / max(c - 1, 1)) if c > 1 else np.ones(1)
    if c > 1:
        p[favour - 1] = 0.5
    return p / p.sum()


def make_dataset(
    name: str, fam: Family, seed: int, n_pairs: int = 64, init_params: Any = None
) -> Pairs:
    """A generated, seeded preference dataset (see ``DATASETS`` for the names). Offline data are
    responses of at most ``max_len`` tokens (``DATA_LEN`` for an unbounded policy), each ended
    by EOS."""
    if name not in DATASETS:
        raise UnknownVariableError(f"unknown dataset '{name}'; the datasets are: {', '.join(DATASETS)}")
    pairs = DATASETS[name](fam, np.random.default_rng(seed), n_pairs, init_params)
    fam.validate(pairs.seqs, pairs.lengths)
    return pairs


def _lengths(rng, n, lo, hi):
    return rng.integers(lo, hi + 1, size=n)  # number of content tokens, inclusive range


def _pairs_from_tokens(fam, tw, kw, tl, kl) -> Pairs:
    width = _data_len(fam)
    return _table(*_responses(tw, kw, width), *_responses(tl, kl, width))


def _equal_length(fam, rng, n, _params):
    k_max = _data_len(fam) - 1
    good = 1
    bad = 2 if fam.vocab > 2 else 1
    kw, kl = _lengths(rng, n, 1, k_max), _lengths(rng, n, 1, k_max)  # i.i.d., same law
    tw = _content(rng, n, k_max, _token_probs(fam.vocab, good))
    tl = _content(rng, n, k_max, _token_probs(fam.vocab, bad))
    return _pairs_from_tokens(fam, tw, kw, tl, kl)


def _longer(chosen_longer: bool):
    def build(fam, rng, n, _params):
        k_max = _data_len(fam) - 1
        mid = max(1, k_max // 2)
        long_k, short_k = _lengths(rng, n, mid + 1 if k_max > 1 else 1, k_max), _lengths(rng, n, 1, mid)
        kw, kl = (long_k, short_k) if chosen_longer else (short_k, long_k)
        tw = _content(rng, n, k_max, _token_probs(fam.vocab, 1))
        tl = _content(rng, n, k_max, _token_probs(fam.vocab, 2 if fam.vocab > 2 else 1))
        return _pairs_from_tokens(fam, tw, kw, tl, kl)

    return build


def _shared_prefix(fam, rng, n, _params):
    k_max, c = _data_len(fam) - 1, fam.vocab - 1
    if c < 2:
        raise DomainError("the shared-prefix dataset needs at least two content tokens (vocab >= 3)")
    k = _lengths(rng, n, 1, k_max)
    tw = _content(rng, n, k_max, np.full(c, 1.0 / c))
    tl = tw.copy()
    pos = rng.integers(0, k)  # one position inside each response
    shift = rng.integers(1, c, size=n)
    tl[np.arange(n), pos] = (tw[np.arange(n), pos] - 1 + shift) % c + 1  # a different token
    # the oracle decides which of the two is chosen
    r = oracle_reward(fam.vocab)
    rw, rl = r[tw[np.arange(n), pos]], r[tl[np.arange(n), pos]]
    swap = rl > rw
    tw[swap], tl[swap] = tl[swap].copy(), tw[swap].copy()
    return _pairs_from_tokens(fam, tw, k, tl, k)


def _similar_embeddings(fam, rng, n, params):
    """Single-token responses (one content token + EOS): the two content tokens whose
    unembedding rows are most similar at initialisation; the oracle-better one is chosen."""
    c = fam.vocab - 1
    if c < 2:
        raise DomainError("the similar-embeddings dataset needs at least two content tokens (vocab >= 3)")
    if params is not None and "W" in params:
        W = np.asarray(params["W"])[1:]
        Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
        sim = Wn @ Wn.T - 2 * np.eye(c)
        a, b = np.unravel_index(np.argmax(sim), sim.shape)
        a, b = a + 1, b + 1
    else:
        a, b = 1, 2
    r = oracle_reward(fam.vocab)
    w_tok, l_tok = (a, b) if r[a] >= r[b] else (b, a)
    k = np.ones(n, dtype=np.int64)
    return _pairs_from_tokens(fam, np.full((n, 1), w_tok), k, np.full((n, 1), l_tok), k)


def _index_pairs(n: int, diagonal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair (i, j) of ``range(n)``, with or without i = j."""
    i, j = (x.ravel() for x in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    keep = np.ones_like(i, dtype=bool) if diagonal else i != j
    return i[keep], j[keep]


def _support(fam: Family, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    if not fam.forced_stop:
        raise DomainError(f"the {dataset} dataset enumerates every response and needs a forced stop (max_len=K); "
                          "for an unbounded policy, gradlab.checks.pair_expectation estimates expectations over "
                          "pairs from the policy with their standard errors")
    return all_sequences(fam.vocab, fam.max_len)


def _all_pairs(fam, dataset: str, diagonal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair of responses as (winner, loser) by the oracle."""
    _support(fam, dataset)
    r = sequence_rewards(fam)
    i, j = _index_pairs(len(r), diagonal)
    i_wins = (r[i] > r[j]) | ((r[i] == r[j]) & (i < j))
    return np.where(i_wins, i, j), np.where(i_wins, j, i)


def _on_policy(fam, rng, n, _params):
    """Every ordered pair (y, y') of responses (stopped ones included), y = y' included as in
    the first post's sum, labelled by the oracle; each step the pairs are weighted by the
    current policy's probabilities (pairs drawn from the model), which sum to 1 exactly."""
    w, l = _all_pairs(fam, "on_policy", diagonal=True)
    return Pairs(*_support(fam, "on_policy"), w, l, np.full(len(w), 1.0 / len(w)), on_policy=True)


def _reference_weights(fam, params) -> np.ndarray:
    """pi_0 of every response, from the initial (= reference) parameters (sums to 1: nothing
    is renormalised away)."""
    return np.exp(np.asarray(fam.enumerate(params).logp))


def _reference_pairs(fam, rng, n, params):
    """Every ordered pair of distinct responses labelled by the oracle, weighted by
    pi_0(y) pi_0(y'): the exact expectation of the offline objective J_0 of posts.md."""
    w, l = _all_pairs(fam, "reference_pairs")
    q = _reference_weights(fam, params)
    weight = q[w] * q[l]
    return Pairs(*_support(fam, "reference_pairs"), w, l, weight / weight.sum())


def _population(fam, rng, n, params):
    """Bradley-Terry population data: every ordered pair (y, y') of distinct responses with
    weight pi_0(y) pi_0(y') sigma(r(y) - r(y')), r the oracle reward. The DPO-family optimum on
    this data is the closed-form pi* of posts.md, which the entropy figure checks."""
    seqs, lengths = _support(fam, "population")
    r = sequence_rewards(fam)
    i, j = _index_pairs(len(r), diagonal=False)
    q = _reference_weights(fam, params)
    weight = q[i] * q[j] / (1.0 + np.exp(-(r[i] - r[j])))
    return Pairs(seqs, lengths, i, j, weight / weight.sum())


DATASETS: dict[str, Callable[..., Pairs]] = {
    "equal_length": _equal_length,
    "chosen_longer": _longer(True),
    "rejected_longer": _longer(False),
    "shared_prefix": _shared_prefix,
    "similar_embeddings": _similar_embeddings,
    "on_policy": _on_policy,
    "reference_pairs": _reference_pairs,
    "population": _population,
}


@dataclass
class Simulation:
    """Metrics of a run: ``metrics[name]`` has shape ``(records, settings, seeds)``."""

    loss: str
    family: str
    dataset: str
    steps: np.ndarray
    metrics: dict[str, np.ndarray]
    settings: list[dict[str, float]]
    seeds: int
    interrupted: bool = False
    final_params: Any = None
    config: dict[str, Any] = field(default_factory=dict)

    def series(self, name: str, setting: int = 0) -> np.ndarray:
        """``(records, seeds)`` for one hyperparameter setting."""
        return self.metrics[name][:, setting, :]


def _make_step(loss: Loss, fam: Family, optimizer, data_on_policy: bool, ref_temperature: float = 1.0):
    """(step, reference): ``reference(ref_params, table)`` computes the frozen reference's
    per-token log-probs of every response in the data table once; ``step`` is one optimiser
    step that optionally records the metrics at the current parameters.

    The canonical variables come from ``policies.canonical_variables`` and every policy metric
    from ``Family.metrics`` (exact: closed forms over the chain's states, or enumeration of the
    forced-stop distribution), so the simulator reports what the tests check.
    """
    variables = list(loss.variables)
    loss_fn = symbolic.numeric(loss.expr, variables + list(loss.hyperparameters), backend="jax")
    token_reward = jnp.asarray(oracle_reward(fam.vocab))
    ref_weighting = loss.kind != "expectation"

    def reference(ref_params, table):
        seqs, lengths = table
        tok = fam.per_token_logp(ref_params, seqs, lengths)
        if ref_temperature == 1.0:
            return tok, jnp.zeros(())
        # the sequence-level tempered reference pi_0^(1/tau) / Z, Z over every response
        return tok / ref_temperature, fam.log_partition(ref_params, ref_temperature)

    def pair_values(params, reference_values, table, w, l):
        (seqs, lengths), (ref_tok, log_z) = table, reference_values
        ref = Reference(ref_tok[w], ref_tok[l], log_z)
        if data_on_policy:  # every pair of the support: assemble from the table's per-token log-probs
            per_tok = fam.per_token_logp(params, seqs, lengths)
            return pair_variables(per_tok[w], per_tok[l], ref, lengths[w], lengths[l]), per_tok.sum(-1)
        return canonical_variables(fam, params, ref, seqs[w], lengths[w], seqs[l], lengths[l]), None

    def weights(lp, w, l, base):
        if not data_on_policy:
            return base
        if not ref_weighting:  # the proper loss carries pi(y)pi(y') in its own integrand
            return jnp.ones_like(base)
        # DPO on pairs drawn from the model: pi(y)pi(y') over every pair of the forced-stop
        # support sums to 1, so nothing is renormalised
        return jax.lax.stop_gradient(jnp.exp(lp[w] + lp[l]))

    def objective(params, reference_values, table, data, hvals):
        w, l, base = data
        vals, lp = pair_values(params, reference_values, table, w, l)
        per_pair = loss_fn(*[vals[v] for v in variables], *hvals)
        return (weights(lp, w, l, base) * per_pair).sum(), vals

    def metrics(params, value, vals, table, data, beta):
        (seqs, lengths), (w, l, base) = table, data
        m = fam.metrics(params, token_reward)
        p_table = jnp.exp(fam.logprob(params, seqs, lengths))
        in_data = jnp.zeros_like(p_table).at[w].set(1.0).at[l].set(1.0)
        h = (vals["lp_w"] - vals["ref_w"]) - (vals["lp_l"] - vals["ref_l"])
        wt = base
        return {
            "expected_length": m.expected_length,
            "sequence_entropy": m.sequence_entropy,
            "token_entropy": m.token_entropy,
            "eos_probability": m.eos_probability,
            "lp_w": (wt * vals["lp_w"]).sum(),
            "lp_l": (wt * vals["lp_l"]).sum(),
            "mass_outside_data": 1.0 - (p_table * in_data).sum(),
            "stopped_mass": m.stopped_mass,
            "margin": (wt * beta * h).sum(),
            # ties (h = 0 up to rounding, as at initialisation) count one half
            "reward_accuracy": (wt * jnp.where(jnp.abs(h) <= 1e-9, 0.5, (h > 0).astype(jnp.float64))).sum(),
            "expected_reward": m.expected_reward,
            "loss": value,
            "metric_error_bound": m.error_bound,
        }

    def step(state, _, data, hvals, beta, reference_values, table, record=True):
        params, opt_state = state
        (value, vals), grads = jax.value_and_grad(objective, has_aux=True)(params, reference_values, table, data, hvals)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new_state = (optax.apply_updates(params, updates), opt_state)
        return new_state, (metrics(params, value, vals, table, data, beta) if record else None)

    return step, reference


@functools.lru_cache(maxsize=64)
def _runner(loss: Loss, fam: Family, on_policy: bool, ref_temperature: float, lr: float, record_every: int):
    """(optimizer, run_chunk): the jitted, vmapped training program, built once per
    configuration and reused across calls (a notebook re-running a view does not recompile)."""
    optimizer = optax.adam(lr)
    step, reference = _make_step(loss, fam, optimizer, on_policy, ref_temperature)

    def block(state, _, **kw):
        # one recorded step (metrics at the current parameters), then record_every - 1 silent ones
        state, record = step(state, None, **kw)
        if record_every > 1:
            state, _ = jax.lax.scan(functools.partial(step, record=False, **kw), state, None, length=record_every - 1)
        return state, record

    @functools.partial(jax.jit, static_argnums=0)
    def run_chunk(n, state, data, hvals, beta, ref_params, table):
        def one(state, data, hvals, beta, ref_params):
            body = functools.partial(block, data=data, hvals=hvals, beta=beta, table=table,
                                     reference_values=reference(ref_params, table))
            return jax.lax.scan(body, state, None, length=n)

        return jax.vmap(one)(state, data, hvals, beta, ref_params)

    return optimizer, run_chunk


def _merge_tables(datasets: list[Pairs]) -> tuple[tuple[np.ndarray, np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """One response table for every seed's pairs (the union of their tables), and each seed's
    (chosen, rejected) rows in it."""
    first = datasets[0]
    if all(d.seqs is first.seqs or (d.seqs.shape == first.seqs.shape and (d.seqs == first.seqs).all()
                                    and (d.lengths == first.lengths).all()) for d in datasets):
        return (first.seqs, first.lengths), [(d.w, d.l) for d in datasets]
    rows = [np.concatenate([d.seqs, d.lengths[:, None]], 1) for d in datasets]
    table, inverse = np.unique(np.concatenate(rows), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    offsets = np.cumsum([0] + [len(r) for r in rows])
    remapped = [(inverse[o + d.w], inverse[o + d.l]) for o, d in zip(offsets, datasets, strict=False)]
    return (table[:, :-1], table[:, -1]), remapped


def _settings_grid(loss: Loss, values: Mapping[str, Any] | list[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    if isinstance(values, list):  # explicit settings, one dict each
        grid = [dict(v) for v in values] or [{}]
        for g in grid:
            symbolic.parameter_values(loss, g)
        return grid
    values = dict(values or {})
    keys = list(values)
    lists = [v if isinstance(v, list | tuple | np.ndarray) else [v] for v in values.values()]
    grid = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*lists)] or [{}]
    for g in grid:
        symbolic.parameter_values(loss, g)  # validates names and domains up front
    return grid


def simulate(
    loss: str | Loss,
    family: str | Family = "unigram",
    dataset: str = "equal_length",
    *,
    steps: int = 300,
    seeds: int = 4,
    values: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
    lr: float = 0.05,
    n_pairs: int = 64,
    vocab: int = 4,
    max_len: int | None = 6,
    init_scale: float = 0.5,
    ref_temperature: float = 1.0,
    first_seed: int = 0,
    record_every: int = 1,
    chunks: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> Simulation:
    """Train ``loss`` on a toy policy with Adam and record every metric at every step.

    ``max_len`` is the policy's forced stop K, or None for an unbounded policy (unigram, bigram,
    linear head), whose metrics are then untruncated closed forms (see ``gradlab.policies``).
    A metric whose exactness cannot be guaranteed (an unbounded chain whose EOS probability
    falls so low that the linear solve's error bound exceeds ``policies.CHAIN_RTOL``) stops the
    run with a ``DomainError``; ``metric_error_bound`` records the bound at every step.

    ``values`` sets hyperparameters; a list value sweeps it (the grid of all lists is run at
    once, with every seed, in one vmapped program); a list of dicts gives explicit settings.
    ``ref_temperature`` tau replaces the
    reference by the sequence-level tempered pi_0^(1/tau)/Z. Seeds are ``first_seed`` onwards
    (the seed sets both the initial policy and the dataset). Metrics are recorded at the start
    of every ``record_every``-th step. Returns a :class:`Simulation`.
    """
    require_x64()
    budgets.check_simulation(steps=steps, seeds=seeds, n_pairs=n_pairs, vocab=vocab, max_len=max_len)
    loss = symbolic.as_loss(loss)
    fam = family if isinstance(family, Family) else make_family(family, vocab=vocab, max_len=max_len)
    if steps < 1 or seeds < 1 or n_pairs < 1:
        raise DomainError(f"steps, seeds and n_pairs must be positive (got {steps}, {seeds}, {n_pairs})")
    if record_every < 1 or steps % record_every:
        raise DomainError(f"record_every must be a positive divisor of steps ({steps}), not {record_every}")
    if not (lr > 0 and math.isfinite(lr)):
        raise DomainError(f"the learning rate must be a positive number, not {lr}")
    grid = _settings_grid(loss, values)
    hyper_rows = [[float(v) for v in symbolic.parameter_values(loss, g).values()] for g in grid]
    betas = [float(g.get("beta", loss.defaults.get("beta", 1.0) or 1.0)) for g in grid]

    seed_ids = range(first_seed, first_seed + seeds)
    inits = [fam.init(jax.random.PRNGKey(s), init_scale) for s in seed_ids]
    datasets = [make_dataset(dataset, fam, s, n_pairs, init) for s, init in zip(seed_ids, inits, strict=True)]
    on_policy = datasets[0].on_policy
    optimizer, run_chunk = _runner(loss, fam, on_policy, float(ref_temperature), float(lr), record_every)

    # one batch axis over (setting, seed)
    n_set = len(grid)
    stack = lambda xs: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    params = stack([inits[s] for _ in range(n_set) for s in range(seeds)])
    (table_seqs, table_lengths), rows = _merge_tables(datasets)
    table = (jnp.asarray(table_seqs), jnp.asarray(table_lengths))
    per_seed = [(w, l, d.weight) for (w, l), d in zip(rows, datasets, strict=True)]
    data = tuple(jnp.asarray(np.stack([per_seed[s][f] for _ in range(n_set) for s in range(seeds)])) for f in range(3))
    hvals = tuple(jnp.asarray([row[i] for row in hyper_rows for _ in range(seeds)]) for i in range(len(hyper_rows[0])))
    beta = jnp.asarray([b for b in betas for _ in range(seeds)])
    params, data, hvals, beta = _shard((params, data, hvals, beta))
    ref_params = params
    opt_state = jax.vmap(optimizer.init)(params)

    n_records = steps // record_every
    chunk = max(1, math.ceil(n_records / max(1, chunks)))

    state = (params, opt_state)
    records: list[dict[str, np.ndarray]] = []
    done, interrupted = 0, False  # done counts records
    try:
        while done < n_records:
            n = min(chunk, n_records - done)
            state, rec = run_chunk(n, state, data, hvals, beta, ref_params, table)
            records.append({k: np.asarray(v) for k, v in rec.items()})  # (batch, n)
            _refuse_inexact(records[-1], done * record_every, record_every)
            done += n
            if progress:
                progress(done * record_every, steps)
    except KeyboardInterrupt:
        interrupted = True
    metrics = {
        k: np.concatenate([r[k] for r in records], axis=1).T.reshape(-1, n_set, seeds) if records
        else np.zeros((0, n_set, seeds))
        for k in METRICS
    }
    return Simulation(
        loss=loss.name, family=fam.name, dataset=dataset, steps=np.arange(done) * record_every, metrics=metrics,
        settings=[{k: float(v) for k, v in zip(loss.hyperparameters, row, strict=True)} for row in hyper_rows],
        seeds=seeds, interrupted=interrupted, final_params=state[0],
        config={"lr": lr, "n_pairs": n_pairs, "vocab": fam.vocab, "max_len": fam.max_len,
                "init_scale": init_scale, "optimizer": "adam", "ref_temperature": ref_temperature},
    )


def _refuse_inexact(rec: dict[str, np.ndarray], first_step: int, record_every: int) -> None:
    """Raise if a recorded metric is not exact (its error bound exceeds the tolerance)."""
    bound = rec["metric_error_bound"]
    bad = ~(bound <= CHAIN_RTOL)
    if bad.any():
        step = first_step + record_every * int(np.argwhere(bad)[0][1])
        raise DomainError(
            f"at training step {step} the policy's unbounded metrics stopped being exact (relative error bound "
            f"{float(bound[bad].max()):.3g} > {CHAIN_RTOL:g}: its EOS probability is ~0); rerun with a forced stop "
            "(max_len=K), which is exact for any EOS probability")


def final(sim: Simulation, name: str) -> np.ndarray:
    """The last recorded value of a metric, ``(settings, seeds)``."""
    return sim.metrics[name][-1]


def drift_factor(sim: Simulation) -> np.ndarray:
    """Expected length at the end over expected length at the start, ``(settings, seeds)``."""
    return sim.metrics["expected_length"][-1] / sim.metrics["expected_length"][0]
