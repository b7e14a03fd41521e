"""Training dynamics on toy policies: any registered loss, any family, seeded preference data.

Every finished sequence up to the cut-off is enumerated once, so a dataset is a set of index
pairs (chosen, rejected) into that enumeration with a weight per pair, and every metric is
exact (no sampling noise): expected generated length, sequence and per-token entropy, EOS
probability, the mass outside the training responses (and, within it, the mass still running at
the cut-off), the expected oracle reward, and the training pairs' log-probs, implicit-reward
margin and reward accuracy.

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
from gradlab.losses import Loss
from gradlab.policies import EOS, Family, all_sequences, make_family, sequence_sums

jax.config.update("jax_enable_x64", True)

__all__ = ["DATASETS", "METRICS", "Pairs", "Simulation", "drift_factor", "final", "make_dataset", "oracle_reward",
           "sequence_rewards", "simulate"]

METRICS = (
    "expected_length",
    "sequence_entropy",
    "token_entropy",
    "eos_probability",
    "lp_w",
    "lp_l",
    "mass_outside_data",
    "running_mass",
    "margin",
    "reward_accuracy",
    "expected_reward",
    "loss",
)


class Pairs(NamedTuple):
    """Preference pairs as indices into ``all_sequences(vocab, max_len)``, with weights."""

    w: np.ndarray  # (n,) chosen
    l: np.ndarray  # (n,) rejected
    weight: np.ndarray  # (n,), sums to 1
    on_policy: bool = False  # weights are recomputed from the current policy every step


def oracle_reward(vocab: int) -> np.ndarray:
    """Per-token reward of the oracle: token 1 is good (+1), token 2 bad (-1), others and EOS 0.
    A sequence's reward is the sum over its tokens, so it has no preference for length when
    good and bad tokens are equally likely."""
    r = np.zeros(vocab)
    r[1] = 1.0
    if vocab > 2:
        r[2] = -1.0
    return r


def sequence_rewards(fam: Family) -> np.ndarray:
    """The oracle's reward of every enumerated sequence (rows as in ``all_sequences``)."""
    return sequence_sums(fam.vocab, fam.max_len, oracle_reward(fam.vocab))


def _index_of(tokens: np.ndarray, k: np.ndarray, vocab: int) -> np.ndarray:
    """Row of ``all_sequences`` for content tokens ``tokens[:, :k]`` followed by EOS."""
    c = vocab - 1
    offsets = np.cumsum([0] + [c**j for j in range(tokens.shape[1] + 1)])
    idx = np.zeros(len(k), dtype=np.int64)
    for s in range(tokens.shape[1]):
        active = s < k
        idx = np.where(active, idx * c + (tokens[:, s] - 1), idx)
    return offsets[k] + idx


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
    """A generated, seeded preference dataset (see ``DATASETS`` for the names)."""
    if name not in DATASETS:
        raise UnknownVariableError(f"unknown dataset '{name}'; the datasets are: {', '.join(DATASETS)}")
    return DATASETS[name](fam, np.random.default_rng(seed), n_pairs, init_params)


def _lengths(rng, n, lo, hi):
    return rng.integers(lo, hi + 1, size=n)  # number of content tokens, inclusive range


def _pairs_from_tokens(fam, tw, kw, tl, kl) -> Pairs:
    n = len(kw)
    return Pairs(_index_of(tw, kw, fam.vocab), _index_of(tl, kl, fam.vocab), np.full(n, 1.0 / n))


def _equal_length(fam, rng, n, _params):
    k_max = fam.max_len - 1
    good = 1
    bad = 2 if fam.vocab > 2 else 1
    kw, kl = _lengths(rng, n, 1, k_max), _lengths(rng, n, 1, k_max)  # i.i.d., same law
    tw = _content(rng, n, k_max, _token_probs(fam.vocab, good))
    tl = _content(rng, n, k_max, _token_probs(fam.vocab, bad))
    return _pairs_from_tokens(fam, tw, kw, tl, kl)


def _longer(chosen_longer: bool):
    def build(fam, rng, n, _params):
        k_max = fam.max_len - 1
        mid = max(1, k_max // 2)
        long_k, short_k = _lengths(rng, n, mid + 1 if k_max > 1 else 1, k_max), _lengths(rng, n, 1, mid)
        kw, kl = (long_k, short_k) if chosen_longer else (short_k, long_k)
        tw = _content(rng, n, k_max, _token_probs(fam.vocab, 1))
        tl = _content(rng, n, k_max, _token_probs(fam.vocab, 2 if fam.vocab > 2 else 1))
        return _pairs_from_tokens(fam, tw, kw, tl, kl)

    return build


def _shared_prefix(fam, rng, n, _params):
    k_max, c = fam.max_len - 1, fam.vocab - 1
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


def _all_pairs(fam, diagonal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair of enumerated sequences as (winner, loser) by the oracle."""
    r = sequence_rewards(fam)
    i, j = _index_pairs(len(r), diagonal)
    i_wins = (r[i] > r[j]) | ((r[i] == r[j]) & (i < j))
    return np.where(i_wins, i, j), np.where(i_wins, j, i)


def _on_policy(fam, rng, n, _params):
    """Every ordered pair (y, y') of finished sequences, y = y' included as in the first post's
    sum, labelled by the oracle; each step the pairs are weighted by the current policy's
    probabilities (pairs drawn from the model)."""
    w, l = _all_pairs(fam, diagonal=True)
    return Pairs(w, l, np.full(len(w), 1.0 / len(w)), on_policy=True)


def _reference_weights(fam, params) -> np.ndarray:
    """pi_0 over finished sequences (renormalised), from the initial (= reference) parameters."""
    logp = np.asarray(fam.enumerate(params).logp)
    p = np.exp(logp - logp.max())
    return p / p.sum()


def _reference_pairs(fam, rng, n, params):
    """Every ordered pair of distinct sequences labelled by the oracle, weighted by
    pi_0(y) pi_0(y'): the exact expectation of the offline objective J_0 of posts.md."""
    w, l = _all_pairs(fam)
    q = _reference_weights(fam, params)
    weight = q[w] * q[l]
    return Pairs(w, l, weight / weight.sum())


def _population(fam, rng, n, params):
    """Bradley-Terry population data: every ordered pair (y, y') of distinct sequences with
    weight pi_0(y) pi_0(y') sigma(r(y) - r(y')), r the oracle reward. The DPO-family optimum on
    this data is the closed-form pi* of posts.md, which the entropy figure checks."""
    r = sequence_rewards(fam)
    i, j = _index_pairs(len(r), diagonal=False)
    q = _reference_weights(fam, params)
    weight = q[i] * q[j] / (1.0 + np.exp(-(r[i] - r[j])))
    return Pairs(i, j, weight / weight.sum())


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
    """(step, reference): ``reference(ref_params)`` computes the frozen reference's per-token
    log-probs of every sequence once; ``step`` is one Adam step that optionally records the
    metrics at the current parameters."""
    variables = list(loss.variables)
    loss_fn = symbolic.numeric(loss.expr, variables + list(loss.hyperparameters), backend="jax")
    seqs, lengths = (jnp.asarray(x) for x in all_sequences(fam.vocab, fam.max_len))
    mask = fam.mask(lengths)
    seq_reward = jnp.asarray(sequence_rewards(fam))
    ref_weighting = loss.kind != "expectation"

    def reference(ref_params):
        ref_tok = fam.per_token_logp(ref_params, seqs, lengths)
        ref = ref_tok.sum(-1)
        if ref_temperature != 1.0:
            # the sequence-level tempered reference pi_0^(1/tau) / Z, Z over finished sequences
            ref = ref / ref_temperature - jax.nn.logsumexp(ref / ref_temperature)
            ref_tok = ref_tok / ref_temperature
        return ref_tok, ref

    def pair_values(params, reference_values, w, l):
        ref_tok, ref = reference_values
        if data_on_policy:  # the pair weights need every sequence's probability
            per_tok = fam.per_token_logp(params, seqs, lengths)
            tok_w, tok_l, lp = per_tok[w], per_tok[l], per_tok.sum(-1)
        else:  # offline data: only the sequences in the pairs
            tok_w = fam.per_token_logp(params, seqs[w], lengths[w])
            tok_l = fam.per_token_logp(params, seqs[l], lengths[l])
            lp = None
        past = jnp.arange(fam.max_len) >= jnp.minimum(lengths[w], lengths[l])[:, None]
        return {
            "lp_w": tok_w.sum(-1), "lp_l": tok_l.sum(-1), "ref_w": ref[w], "ref_l": ref[l],
            "len_w": lengths[w].astype(jnp.float64), "len_l": lengths[l].astype(jnp.float64),
            "tail_w": jnp.where(past, tok_w, 0.0).sum(-1), "tail_l": jnp.where(past, tok_l, 0.0).sum(-1),
            "ref_tail_w": jnp.where(past, ref_tok[w], 0.0).sum(-1), "ref_tail_l": jnp.where(past, ref_tok[l], 0.0).sum(-1),
        }, lp

    def weights(lp, w, l, base):
        if not data_on_policy:
            return base
        if not ref_weighting:  # the proper loss carries pi(y)pi(y') in its own integrand
            return jnp.ones_like(base)
        p = jax.lax.stop_gradient(jnp.exp(lp[w] + lp[l]))  # DPO on pairs drawn from the model
        return p / p.sum()

    def objective(params, reference_values, data, hvals):
        w, l, base = data
        vals, lp = pair_values(params, reference_values, w, l)
        per_pair = loss_fn(*[vals[v] for v in variables], *hvals)
        return (weights(lp, w, l, base) * per_pair).sum(), vals

    def metrics(params, value, vals, data, beta):
        w, l, base = data
        tok_lp = fam.token_logprobs(params, seqs)
        lp = jnp.where(mask, jnp.take_along_axis(tok_lp, seqs[..., None], axis=-1)[..., 0], 0.0).sum(-1)
        p = jnp.exp(lp)
        running = jnp.clip(1.0 - p.sum(), 0.0, 1.0)
        tok_h = jnp.where(mask, -(jnp.exp(tok_lp) * tok_lp).sum(-1), 0.0).sum(-1)
        eos = jnp.where(mask, jnp.exp(tok_lp[..., EOS]), 0.0).sum(-1)
        steps_taken = (p * lengths).sum()
        pn = p / p.sum()
        in_data = jnp.zeros_like(p).at[w].set(1.0).at[l].set(1.0)
        h = (vals["lp_w"] - vals["ref_w"]) - (vals["lp_l"] - vals["ref_l"])
        wt = base
        return {
            "expected_length": steps_taken + running * fam.max_len,
            "sequence_entropy": -(pn * jnp.log(pn)).sum(),
            "token_entropy": (p * tok_h).sum() / steps_taken,
            "eos_probability": (p * eos).sum() / steps_taken,
            "lp_w": (wt * vals["lp_w"]).sum(),
            "lp_l": (wt * vals["lp_l"]).sum(),
            "mass_outside_data": 1.0 - (p * in_data).sum(),
            "running_mass": running,
            "margin": (wt * beta * h).sum(),
            # ties (h = 0 up to rounding, as at initialisation) count one half
            "reward_accuracy": (wt * jnp.where(jnp.abs(h) <= 1e-9, 0.5, (h > 0).astype(jnp.float64))).sum(),
            "expected_reward": (pn * seq_reward).sum(),
            "loss": value,
        }

    def step(state, _, data, hvals, beta, reference_values, record=True):
        params, opt_state = state
        (value, vals), grads = jax.value_and_grad(objective, has_aux=True)(params, reference_values, data, hvals)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new_state = (optax.apply_updates(params, updates), opt_state)
        return new_state, (metrics(params, value, vals, data, beta) if record else None)

    return step, reference


@functools.lru_cache(maxsize=64)
def _runner(loss: Loss, fam: Family, on_policy: bool, ref_temperature: float, lr: float, record_every: int):
    """(optimizer, run_chunk): the jitted, vmapped training program, built once per
    configuration and reused across calls (a notebook re-running a view does not recompile)."""
    optimizer = optax.adam(lr)
    step, reference = _make_step(loss, fam, optimizer, on_policy, ref_temperature)

    def block(state, _, data, hvals, beta, reference_values):
        # one recorded step (metrics at the current parameters), then record_every - 1 silent ones
        kw = dict(data=data, hvals=hvals, beta=beta, reference_values=reference_values)
        state, record = step(state, None, **kw)
        if record_every > 1:
            state, _ = jax.lax.scan(functools.partial(step, record=False, **kw), state, None, length=record_every - 1)
        return state, record

    @functools.partial(jax.jit, static_argnums=0)
    def run_chunk(n, state, data, hvals, beta, ref_params):
        def one(state, data, hvals, beta, ref_params):
            body = functools.partial(block, data=data, hvals=hvals, beta=beta, reference_values=reference(ref_params))
            return jax.lax.scan(body, state, None, length=n)

        return jax.vmap(one)(state, data, hvals, beta, ref_params)

    return optimizer, run_chunk


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
    max_len: int = 6,
    init_scale: float = 0.5,
    ref_temperature: float = 1.0,
    first_seed: int = 0,
    record_every: int = 1,
    chunks: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> Simulation:
    """Train ``loss`` on a toy policy with Adam and record every metric at every step.

    ``values`` sets hyperparameters; a list value sweeps it (the grid of all lists is run at
    once, with every seed, in one vmapped program); a list of dicts gives explicit settings. ``ref_temperature`` tau replaces the
    reference by the sequence-level tempered pi_0^(1/tau)/Z. Seeds are ``first_seed`` onwards
    (the seed sets both the initial policy and the dataset). Metrics are recorded at the start
    of every ``record_every``-th step. Returns a :class:`Simulation`.
    """
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
    data = tuple(jnp.asarray(np.stack([getattr(datasets[s], f) for _ in range(n_set) for s in range(seeds)]))
                 for f in ("w", "l", "weight"))
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
            state, rec = run_chunk(n, state, data, hvals, beta, ref_params)
            records.append({k: np.asarray(v) for k, v in rec.items()})  # (batch, n)
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


def _shard(tree):
    """Shard the leading (setting x seed) axis across devices when several are present."""
    devices = jax.devices()
    leaves = jax.tree_util.tree_leaves(tree)
    batch = leaves[0].shape[0] if leaves else 0
    if len(devices) < 2 or batch % len(devices):
        return tree
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices), ("batch",))
    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree)


def final(sim: Simulation, name: str) -> np.ndarray:
    """The last recorded value of a metric, ``(settings, seeds)``."""
    return sim.metrics[name][-1]


def drift_factor(sim: Simulation) -> np.ndarray:
    """Expected length at the end over expected length at the start, ``(settings, seeds)``."""
    return sim.metrics["expected_length"][-1] / sim.metrics["expected_length"][0]


def optimal_policy(fam: Family, ref_params: Any, beta: float, gamma: float) -> np.ndarray:
    """The closed-form optimum pi* ~ pi_0^(gamma/beta) exp(r/beta) over finished sequences
    (posts.md), with pi_0 renormalised to finished sequences and r the oracle reward."""
    e = fam.enumerate(ref_params)
    q = np.asarray(e.logp) - np.asarray(jax.nn.logsumexp(e.logp))
    logits = (gamma / beta) * q + sequence_rewards(fam) / beta
    p = np.exp(logits - logits.max())
    return p / p.sum()


def entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())
