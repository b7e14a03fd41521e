"""Run an experiment: any optax optimiser, full or minibatch gradients, metrics recorded every
``record_every`` steps and always after the last one.

Every (sweep setting, seed) of an experiment becomes one *run*. Runs whose static structure
agrees (the family, the loss, the optimiser and its arguments, steps, batch size, metrics, and the
shapes of every input array) are stacked and executed as one compiled program, ``jit(vmap(...))``
over the runs, with the run axis sharded across devices when there are several. What differs
between the runs of one program are arrays: initial and reference parameters, the data, the
loss's hyperparameter values, the learning rate and the minibatch sampler's key.

Gradients are the loss's symbolic partial derivatives in its canonical variables, pulled back
through the policy by JAX autodiff (``_gradient``; ``gradlab.checks`` verifies the same closed
forms against autodiff of the whole composition).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import sympy

from gradlab import caches, runtime, symbolic
from gradlab.errors import GradlabError
from gradlab.experiments import datasets
from gradlab.experiments.config import (
    ENUMERATED_PRESETS,
    ConfigError,
    Experiment,
    LossConfig,
    PolicyConfig,
    load,
    resolved,
    settings,
)
from gradlab.losses import Loss

__all__ = ["Run", "Result", "run", "run_many", "build_family", "canonical_variables", "METRICS", "metric_names"]

PER_PAIR_DEFAULT_LIMIT = 256  # per-pair series are recorded by default up to this many pairs
# XLA:CPU compile options (issue 17, measured back to back on 2 cores). LLVM's expensive passes,
# XLA's newer MLIR fusion emitters and the split of code generation into parallel modules cost
# compile time and gain nothing measurable on these programs. XLA's backend optimisation makes the
# training step ~3x faster but its compile ~1.5-4x slower (length_drift program: 1.3 s at level 0,
# 2.4 s optimised; 36 losses in one program: 2.3 s against 7.5-11 s), so a training program runs
# at level 0 first and is compiled optimised only once it has proved long-running (``_Tiered``).
COMPILE_OPTIONS = {"xla_llvm_disable_expensive_passes": True, "xla_cpu_use_fusion_emitters": False,
                   "xla_cpu_parallel_codegen_split_count": 1}
RUN_ONCE_OPTIONS = {**COMPILE_OPTIONS, "xla_backend_optimization_level": 0}
SEQUENCE_DEFAULTS = ("expected_length", "sequence_entropy", "token_entropy", "eos_probability")


# --------------------------------------------------------------------------------------------
# Building blocks from the configuration
# --------------------------------------------------------------------------------------------


def is_single(fam: Any) -> bool:
    from gradlab.policies import SingleContextFamily

    return isinstance(fam, SingleContextFamily)


def build_family(policy: PolicyConfig):
    """The policy family of a ``[policy]`` table (vocab counts content tokens; the family adds EOS)."""
    from gradlab import policies

    dim = policy.hidden_dim
    try:
        if policy.single_context:
            if policy.family == "softmax":
                return policies.Softmax(k=policy.vocab)
            return policies.SingleHiddenState(k=policy.vocab, dim=dim, W=policy.W, w_seed=policy.w_seed)
        kw: dict[str, Any] = {"vocab": policy.vocab + 1, "max_len": policy.max_len}
        if policy.family == "linear_head":
            kw.update(dim=dim, train_features=policy.train_features, feature_seed=policy.feature_seed)
        if policy.family == "hidden_state":  # previous_token: the chain version (exact, unbounded allowed)
            return policies.make_hidden_state(policy.context, dim=dim, W=policy.W, w_seed=policy.w_seed, **kw)
        return policies.FAMILIES[policy.family](**kw)
    except (GradlabError, TypeError, ValueError) as exc:
        if str(exc).startswith("W "):
            raise ConfigError(f"policy.W: {exc}") from None
        if policy.max_len is None:
            raise ConfigError(f"policy.max_len = 'none' (unbounded) is not available for the '{policy.family}' "
                              f"family: {exc}") from None
        raise ConfigError(f"[policy]: {exc}") from None


@caches.memo(maxsize=128)
def _param_shapes(fam) -> dict[str, tuple[int, ...]]:
    example = jax.eval_shape(lambda: fam.init(jax.random.PRNGKey(0)))
    return {k: tuple(v.shape) for k, v in example.items()}


def check_params(exp: Experiment, fam) -> None:
    """Explicit ``policy.init`` / ``reference.params`` tables must name every parameter of the
    family with its exact shape."""
    shapes = _param_shapes(fam)
    expected = ", ".join(f"{k} {list(s)}" for k, s in shapes.items())
    for key, table in (("policy.init", exp.policy.init), ("reference.params", exp.reference.params)):
        if not isinstance(table, Mapping):
            continue
        if set(table) != set(shapes):
            odd = sorted(set(table) ^ set(shapes))[0]
            raise ConfigError(f"{key}: parameter '{odd}' does not match the '{fam.name}' family, whose "
                              f"parameters are: {expected}")
        for name, value in table.items():
            if np.shape(value) != shapes[name]:
                raise ConfigError(f"{key}.{name} has shape {list(np.shape(value))}; the '{fam.name}' family here "
                                  f"needs {list(shapes[name])} (parameters: {expected})")


@caches.memo(maxsize=128)
def _loss(name: str | None, expr: str | None) -> Loss:
    from gradlab.losses import custom, get_loss

    return custom(expr, name="custom") if expr is not None else get_loss(name)


def resolve_loss(cfg: LossConfig) -> Loss:
    """The ``[loss]`` table's loss: a name goes through gradlab's loss resolution (registered
    names, aliases, combinations), an ``expr`` through the safe formula parser."""
    key = "loss.expr" if cfg.expr is not None else "loss.name"
    try:
        return _loss(cfg.name, cfg.expr)
    except GradlabError as exc:
        raise type(exc)(f"{key}: {exc}") from None


def hyper_values(cfg: LossConfig, loss: Loss) -> dict[str, float]:
    """Every hyperparameter of the loss with its value (defaults filled in), validated."""
    return dict(_hyper_values(loss, tuple(sorted(cfg.values.items()))))


@caches.memo(maxsize=1024)
def _hyper_values(loss: Loss, given: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
    try:
        values = symbolic.parameter_values(loss, dict(given))
    except GradlabError as exc:
        raise type(exc)(f"[loss]: {exc}") from None
    return tuple((s.name, float(v)) for s, v in values.items())


def supplied_variables(fam) -> tuple[str, ...]:
    """The canonical variables a family can supply for a pair."""
    if is_single(fam):
        return ("lp_w", "lp_l", "ref_w", "ref_l")
    return ("lp_w", "lp_l", "ref_w", "ref_l", "len_w", "len_l", "tail_w", "tail_l", "ref_tail_w", "ref_tail_l")


def check_loss(exp: Experiment, fam) -> None:
    loss = resolve_loss(exp.loss)
    hyper_values(exp.loss, loss)
    missing = [v for v in loss.variables if v not in supplied_variables(fam)]
    if missing:
        raise ConfigError(f"loss '{loss.name}' needs {', '.join(missing)}, which the '{fam.name}' family "
                          f"(single context: no EOS, no length) cannot supply; it supplies "
                          f"{', '.join(supplied_variables(fam))}")


def _n_pairs(exp: Experiment, fam) -> int:
    d = exp.data
    if d.kind == "pairs":
        return len(d.chosen)
    if d.kind in ENUMERATED_PRESETS:
        n = len(datasets.enumeration(fam)[0])
        return n * n if d.kind == "on_policy" else n * (n - 1)
    return d.n_pairs


def _reward_available(exp: Experiment, fam) -> bool:
    return datasets.token_reward(exp.data, fam) is not None


def _enumerable(fam) -> bool:
    return is_single(fam) or fam.max_len is not None


def available_metrics(exp: Experiment, fam) -> list[str]:
    out = ["loss", "lp_w", "lp_l", "margin", "reward_accuracy", "params"]
    if is_single(fam):
        out.append("probabilities")
    if _enumerable(fam):
        out.append("mass_outside_data")
    if _reward_available(exp, fam):  # unbounded: the family's exact chain expectation
        out.append("expected_reward")
    if not is_single(fam):
        out.append("stopped_mass")  # the family's own metric: 0 when unbounded
    return out


def metric_names(exp: Experiment) -> tuple[str, ...]:
    """The metrics recorded: ``train.metrics`` as given, or the defaults for the family and data
    (per-pair lp_w, lp_l and margin only up to ``PER_PAIR_DEFAULT_LIMIT`` pairs)."""
    if exp.train.metrics is not None:
        return exp.train.metrics
    fam = build_family(exp.policy)
    avail = available_metrics(exp, fam)
    names = ["probabilities", "sequence_entropy"] if is_single(fam) else list(SEQUENCE_DEFAULTS)
    names += [m for m in ("stopped_mass", "expected_reward") if m in avail]
    names += ["loss", "reward_accuracy"]
    if _n_pairs(exp, fam) <= PER_PAIR_DEFAULT_LIMIT:
        names += ["lp_w", "lp_l", "margin"]
    return tuple(names)


def _family_metric(fam, name: str, params=None) -> bool:
    """Whether ``fam.<name>(params)`` computes something from the parameters alone."""
    return _is_family_metric(fam, name, bool(jax.config.jax_enable_x64))


@caches.memo(maxsize=1024)
def _is_family_metric(fam, name: str, x64: bool) -> bool:  # x64: the dtypes of the abstract parameters
    method = getattr(fam, name, None)
    if name.startswith("_") or not callable(method) or name in ("init",):
        return False
    try:
        jax.eval_shape(method, jax.eval_shape(lambda: fam.init(jax.random.PRNGKey(0))))
    except Exception:  # noqa: BLE001 - any failure means "not a metric of the parameters"
        return False
    return True


def check_train(exp: Experiment, fam) -> None:
    t = exp.train
    n = _n_pairs(exp, fam)
    if t.batch_size is not None:
        if exp.data.kind == "on_policy":
            raise ConfigError("train.batch_size must be 'full' for data.kind = 'on_policy' (its pair weights are "
                              "the current policy's probabilities of every pair)")
        if t.batch_size > n:
            raise ConfigError(f"train.batch_size = {t.batch_size} is larger than the data ({n} pairs); "
                              f"give at most {n}, or 'full'")
    if t.metrics is not None:
        avail = available_metrics(exp, fam)
        for m in t.metrics:
            if m not in avail and not (m not in METRICS and _family_metric(fam, m)):
                methods = sorted(n for n in dir(fam) if n not in avail and _family_metric(fam, n))
                raise ConfigError(f"train.metrics: '{m}' is not a metric of the '{fam.name}' family with this "
                                  f"data; allowed: {', '.join(avail + methods)}")


# --------------------------------------------------------------------------------------------
# The policy -> canonical variables map
# --------------------------------------------------------------------------------------------


def reference_values(fam, ref_params, items, lengths, temperature,
                     tempered: bool | None = None) -> dict[str, jax.Array]:
    """The frozen reference's log-probabilities of every response (and per token, for the tails),
    computed once. With ``temperature`` tau the reference is the sequence-level tempered
    pi_0^(1/tau)/Z, Z over every response (finished sequences, or the k actions): per-token
    log-probs over tau, and ``log_z`` subtracted from their sums."""
    if is_single(fam):
        return {"lp": fam.tempered_logprobs(ref_params, temperature)[items]}
    tok = fam.per_token_logp(ref_params, items, lengths) / temperature
    tempered = temperature != 1.0 if tempered is None else tempered  # (a traced tau cannot be compared)
    log_z = fam.log_partition(ref_params, temperature) if tempered else jnp.zeros(())
    return {"tok": tok, "log_z": log_z}


def canonical_variables(fam, params, ref: Mapping[str, jax.Array], items, lengths, w, l) -> dict[str, jax.Array]:
    """The canonical variables of the pairs (w[i], l[i]) of a response table: for sequence
    families the policy layer's one map (``policies.pair_variables``), fed with the per-token
    log-probs of every response in the table, computed once per step."""
    from gradlab.policies import Reference, pair_variables

    if is_single(fam):
        lp = fam.logprob(params, items)
        return {"lp_w": lp[w], "lp_l": lp[l], "ref_w": ref["lp"][w], "ref_l": ref["lp"][l]}
    tok = fam.per_token_logp(params, items, lengths)
    reference = Reference(ref["tok"][w], ref["tok"][l], ref["log_z"])
    return pair_variables(tok[w], tok[l], reference, lengths[w], lengths[l])


def _swapped(values: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The same pair with chosen and rejected exchanged (the other label of a soft pair)."""
    flip = {"w": "l", "l": "w"}
    return {k[:-1] + flip[k[-1]]: v for k, v in values.items()}


# --------------------------------------------------------------------------------------------
# One compiled program per static structure
# --------------------------------------------------------------------------------------------


class Static(NamedTuple):
    """Everything that fixes the compiled program (hashable)."""

    fam: Any
    losses: tuple[tuple[str | None, str | None], ...]  # (name, expr) of each loss the program can train
    kind: str  # the losses' kind: "pair", or "expectation" (the proper loss)
    optimizer: str
    optimizer_args: tuple[tuple[str, Any], ...]
    steps: int
    record_every: int
    batch_size: int | None
    metrics: tuple[str, ...]
    on_policy: bool
    soft: bool
    tempered: bool = False  # a sequence-level tempered reference (temperature != 1): log Z is computed


def record_steps(steps: int, record_every: int) -> list[int]:
    """0, r, 2r, ... and always ``steps`` itself."""
    out = list(range(0, steps + 1, record_every))
    return out if out[-1] == steps else out + [steps]


# --------------------------------------------------------------------------------------------
# The lean step: log-probabilities as contractions of counts with the log-softmax table
# --------------------------------------------------------------------------------------------
#
# Every sequence family here looks its next-token logits up in a table of rows:
# logits(params, y)[t] = table(params)[row(y_<t)]. So
#     log pi(y) = sum_{t < len(y)} log_softmax(table)[row_t, y_t] = n(y) . vec(log_softmax(table)),
# with n(y) the counts of the (row, token) cells that y's first len(y) positions visit. A step then
# takes one log-softmax of the (rows, V) table, not one per position of every pair, and one
# contraction of each side's (pairs, rows * V) count matrix, instead of per-token gathers, which
# XLA:CPU runs element by element under vmap (issue 17's profile: 6.8 ms -> ~0.2 ms per step for
# 128 unigram runs). The counts are built once per run inside the compiled program (one
# scatter-add, before the steps). Where a count matrix would be too large (a big table) the step
# gathers the log-softmax table per token instead (still one log-softmax per step).

_DENSE_LIMIT = 1 << 20  # count-matrix entries per run above which the gather form is used
_LEAN = True  # False: the per-position formulation (``canonical_variables``), kept for the tests


def _prev_rows(fam, seqs):
    from gradlab.policies import _prev_tokens

    return _prev_tokens(seqs, fam.vocab)


def _logit_tables() -> dict[type, tuple[Any, Any]]:
    """family type -> (table(fam, params) -> (rows, vocab) logits, row(fam, seqs) -> (..., T) row
    of each position). Each pair reproduces that family's ``logits`` (tested against it)."""
    from gradlab import policies as P

    return {
        P.Unigram: (lambda fam, p: p["theta"][None, :], lambda fam, seqs: jnp.zeros_like(seqs)),
        P.Bigram: (lambda fam, p: p["W"], _prev_rows),
        P.LinearHead: (lambda fam, p: fam._features(p) @ p["W"].T, _prev_rows),
        P.Tabular: (lambda fam, p: p["table"], lambda fam, seqs: fam.prefix_index(seqs)),
        P.HiddenState: (lambda fam, p: p["h"] @ fam.fixed_W().T, lambda fam, seqs: fam.context_index(seqs)),
    }


def logit_table(fam) -> tuple[Any, Any] | None:
    """``(table, row)`` functions of a sequence family (see above), or None (per-position path)."""
    if not _LEAN or is_single(fam):
        return None
    return _logit_tables().get(type(fam))


def _table_logp(fam, params) -> jax.Array:
    """vec(log_softmax(table)): the log-probability of every (row, token) cell, flattened."""
    return jax.nn.log_softmax(logit_table(fam)[0](fam, params), axis=-1).reshape(-1)


def _uses_tails(static: Static) -> bool:
    return any(v.startswith(("tail_", "ref_tail_")) for n, e in static.losses for v in _loss(n, e).variables)


class _Side(NamedTuple):
    """How to read one side's (w or l) log-probabilities off the flattened log-softmax table:
    dense counts ``(P, K)`` (``lp = counts @ table``), or flat cell indices ``(P, T)`` with a
    mask of the positions that count (``lp = sum(table[index] * mask)``)."""

    counts: jax.Array | None
    index: jax.Array | None
    mask: jax.Array | None

    def logp(self, table: jax.Array, idx=None) -> jax.Array:
        pick = (lambda a: a) if idx is None else (lambda a: a[idx])  # noqa: E731
        if self.counts is not None:
            return pick(self.counts) @ table
        return (table[pick(self.index)] * pick(self.mask)).sum(-1)


def _side(fam, items, rows_of, mask) -> _Side:
    """The ``_Side`` of the responses ``rows_of`` (``(P,)`` indices into the table ``items``),
    counting the positions where the boolean ``(P, T)`` ``mask`` holds."""
    row = logit_table(fam)[1](fam, items)
    flat = (row * fam.vocab + items)[rows_of]  # (P, T) cells; past a response's end they are masked
    n, k = flat.shape[0], _n_cells(fam)
    if n * k > _DENSE_LIMIT:
        return _Side(None, flat, mask.astype(jnp.float64))
    counts = jnp.zeros((n, k), jnp.float64).at[jnp.arange(n)[:, None], flat].add(mask.astype(jnp.float64))
    return _Side(counts, None, None)


@caches.memo(maxsize=64)
def _n_cells(fam) -> int:
    """Entries of the flattened log-softmax table (rows times vocab)."""
    params = jax.eval_shape(lambda: fam.init(jax.random.PRNGKey(0)))
    return int(np.prod(jax.eval_shape(lambda p: logit_table(fam)[0](fam, p), params).shape))


def _prepare(static: Static, inp) -> dict[str, Any]:
    """The constants of one run, computed once per call before the steps: how to read each
    pair's log-probabilities off the table, and the frozen reference's values of the pairs.

    With temperature tau the reference is the sequence-level tempered pi_0^(1/tau)/Z, Z over every
    response: per-token log-probs over tau, and ``log_z`` subtracted from their sums."""
    fam, d = static.fam, inp["data"]
    items, lengths, w, l = d["items"], d["lengths"], d["w"], d["l"]
    tau = inp["tau"]
    if is_single(fam):
        return {"ref_lp": fam.tempered_logprobs(inp["ref_params"], tau)[items]}
    if logit_table(fam) is None:
        old = reference_values(fam, inp["ref_params"], items, lengths, tau, static.tempered)
        return {"ref": old}
    width = items.shape[-1]
    inside = token_mask_of(lengths, width)
    past = jnp.arange(width) >= jnp.minimum(lengths[w], lengths[l])[:, None]  # the longer one's tail
    want_tails = _uses_tails(static)
    sw, sl = _side(fam, items, w, inside[w]), _side(fam, items, l, inside[l])
    ref_table = _table_logp(fam, inp["ref_params"]) / tau
    log_z = fam.log_partition(inp["ref_params"], tau) if static.tempered else jnp.zeros(())
    pre = {"w": sw, "l": sl, "ref_w": sw.logp(ref_table) - log_z, "ref_l": sl.logp(ref_table) - log_z,
           "len_w": lengths[w].astype(jnp.float64), "len_l": lengths[l].astype(jnp.float64)}
    if want_tails:
        tw, tl = _side(fam, items, w, inside[w] & past), _side(fam, items, l, inside[l] & past)
        pre.update(tail_w=tw, tail_l=tl, ref_tail_w=tw.logp(ref_table), ref_tail_l=tl.logp(ref_table))
    if "enum" in inp:  # every response of the family, for the metrics over the distribution
        e_items, e_lengths = inp["enum"]
        pre["enum"] = _side(fam, e_items, jnp.arange(e_items.shape[0]), token_mask_of(e_lengths, e_items.shape[-1]))
    return pre


def token_mask_of(lengths, width: int) -> jax.Array:
    from gradlab.policies import token_mask

    return token_mask(lengths, width)


def _pair_values(static: Static, params, inp, pre, idx=None) -> dict[str, jax.Array]:
    """The canonical variables of the pairs (or of the minibatch ``idx``) at ``params``."""
    fam, d = static.fam, inp["data"]
    w, l = (d["w"], d["l"]) if idx is None else (d["w"][idx], d["l"][idx])
    pick = (lambda a: a) if idx is None else (lambda a: a[idx])  # noqa: E731
    if is_single(fam):
        lp = fam.logprob(params, d["items"])
        return {"lp_w": lp[w], "lp_l": lp[l], "ref_w": pre["ref_lp"][w], "ref_l": pre["ref_lp"][l]}
    if "ref" in pre:  # the per-position formulation
        return canonical_variables(fam, params, pre["ref"], d["items"], d["lengths"], w, l)
    table = _table_logp(fam, params)
    vals = {"lp_w": pre["w"].logp(table, idx), "lp_l": pre["l"].logp(table, idx)}
    vals.update({k: pick(pre[k]) for k in ("ref_w", "ref_l", "len_w", "len_l")})
    if "tail_w" in pre:
        vals.update(tail_w=pre["tail_w"].logp(table, idx), tail_l=pre["tail_l"].logp(table, idx),
                    ref_tail_w=pick(pre["ref_tail_w"]), ref_tail_l=pick(pre["ref_tail_l"]))
    return vals


def _pair_weights(static: Static, inp, vals, idx=None) -> tuple[jax.Array, jax.Array]:
    """The pairs' weights (summing to 1) and soft labels, for all pairs or the minibatch ``idx``.
    On-policy weights are pi(y)pi(y') at the current parameters, not differentiated."""
    d = inp["data"]
    weight, label = d["weight"], d["label"]
    if idx is not None:  # a minibatch: its pairs, weights renormalised within it
        weight, label = weight[idx], label[idx]
        weight = weight / weight.sum()
    if static.on_policy:
        if static.kind == "expectation":
            weight = jnp.ones_like(weight)  # the proper loss carries pi(y)pi(y') in its integrand
        else:  # pairs drawn from the current policy
            p = jax.lax.stop_gradient(jnp.exp(vals["lp_w"] + vals["lp_l"]))
            weight = p / p.sum()
    return weight, label


class _LossFns(NamedTuple):
    """One loss compiled for the runner: its variables, its hyperparameter count, its value per
    pair, and its partial derivatives in the variables that move with the parameters."""

    variables: list[str]
    n_hyper: int
    value: Any
    moving: list[str]
    partials: Any


def _loss_fns(name: str | None, expr: str | None) -> _LossFns:
    loss = _loss(name, expr)
    variables = list(loss.variables)
    args = variables + list(loss.hyperparameters)
    moving = [v for v in variables if v in _MOVING]
    partials = sympy.Tuple(*[sympy.diff(loss.expr, symbolic.symbol_of(v)) for v in moving])
    return _LossFns(variables, len(loss.hyperparameters), symbolic.numeric(loss.expr, args, backend="jax"),
                    moving, symbolic.numeric(partials, args, backend="jax", cse=True))


def _args(fns: _LossFns, values: Mapping[str, jax.Array], hvals) -> list:
    """The positional arguments of the loss's functions: its variables, then its hyperparameters
    (the first ``n_hyper`` entries of the run's padded ``hvals``)."""
    return [values[v] for v in fns.variables] + [hvals[i] for i in range(fns.n_hyper)]


def _value(static: Static, fns: _LossFns, vals, inp, idx=None) -> jax.Array:
    """The weighted loss over the pairs (or the minibatch ``idx``) with these pair values."""
    weight, label = _pair_weights(static, inp, vals, idx)
    per_pair = fns.value(*_args(fns, vals, inp["hvals"]))
    if static.soft:  # Bradley-Terry soft label: p l(y_w, y_l) + (1 - p) l(y_l, y_w)
        per_pair = label * per_pair + (1 - label) * fns.value(*_args(fns, _swapped(vals), inp["hvals"]))
    return (weight * per_pair).sum()


# The training step's gradient. The objective is sum_i weight_i l(v_i), with v_i the canonical
# variables of pair i, so
#     d objective / d params = sum_i weight_i sum_v dl/dv(v_i) dv_i/d params,
# the closed-form partials dl/dv (sympy's derivative of the loss, one cse-compiled function) pulled
# back through the policy by one vjp of the pair values. Only the variables that move with the
# parameters (log-probabilities, tails) have partials; ref_*, len_* are constants of a run. This
# is the gradient jax.grad of the value computes (tested to rounding), without differentiating the
# loss's own arithmetic at every step: for DPO, one sigmoid per pair instead of softplus, its
# derivative and the loss's value (issue 17: 4x fewer transcendentals per step).
_MOVING = ("lp_w", "lp_l", "tail_w", "tail_l")
_CLOSED_FORM = True  # False: jax.grad of the value, kept for the tests


def _other(name: str) -> str:
    return name[:-1] + {"w": "l", "l": "w"}[name[-1]]


def _cotangent(static: Static, fns: _LossFns, vals, inp, idx=None) -> dict[str, jax.Array]:
    """d value / d (pair values): weight_i dl/dv at each pair (see above); 0 for the constants."""
    weight, label = _pair_weights(static, inp, vals, idx)

    def at(values):  # name -> dl/d name at these pair values
        return dict(zip(fns.moving, fns.partials(*_args(fns, values, inp["hvals"])), strict=True))

    dl = at(vals)
    if static.soft:  # + (1 - p) l(swap(v)): d/dv of it is (1 - p) dl/d(swap v) at the swapped pair
        swapped = at(_swapped(vals))
        dl = {v: label * dl.get(v, 0.0) + (1 - label) * swapped.get(_other(v), 0.0)
              for v in {*fns.moving, *map(_other, fns.moving)}}
    return {k: weight * jnp.broadcast_to(dl[k], weight.shape) if k in dl else jnp.zeros_like(x)
            for k, x in vals.items()}


def _gradient(static: Static, cotangent, params, inp, pre, idx=None):
    """d value / d params: ``cotangent(vals, inp, idx)`` pulled back through the pair values;
    the value itself is not computed."""
    vals, pullback = jax.vjp(lambda p: _pair_values(static, p, inp, pre, idx), params)
    return pullback(cotangent(vals, inp, idx))[0]


def _chosen(fns: list[_LossFns], k, make):
    """``make(fns[j])`` for the loss the run trains: ``lax.switch`` on its index ``k`` when the
    program holds several losses (``k`` is the same for every run of a call, so only one branch
    runs), the function itself when it holds one."""
    branches = [make(f) for f in fns]
    if len(branches) == 1:
        return branches[0]
    return lambda *a: jax.lax.switch(k, branches, *a)


class _State(NamedTuple):
    """What a metric may read: the family, the parameters, the run's inputs, the objective's
    value, the pairs' canonical variables at these parameters and the run's constants."""

    fam: Any
    params: Any
    inp: dict
    value: jax.Array | None
    vals: dict
    pre: dict


def _margin(s: _State) -> jax.Array:
    """h = (lp_w - ref_w) - (lp_l - ref_l), the implicit-reward margin over beta."""
    return (s.vals["lp_w"] - s.vals["ref_w"]) - (s.vals["lp_l"] - s.vals["ref_l"])


def _probabilities(s: _State) -> jax.Array:
    """pi over every response: the k actions, or the finished sequences up to the cut-off."""
    if is_single(s.fam):
        return s.fam.probabilities(s.params)
    if "enum" in s.pre:  # counts of every enumerated response against the log-softmax table
        return jnp.exp(s.pre["enum"].logp(_table_logp(s.fam, s.params)))
    return jnp.exp(s.fam.enumerate(s.params).logp)


def _reward_accuracy(s: _State) -> jax.Array:
    h = _margin(s)  # ties (h = 0 up to rounding, as at the start) count one half
    return (s.inp["data"]["weight"] * jnp.where(jnp.abs(h) <= 1e-9, 0.5, (h > 0).astype(jnp.float64))).sum()


def _expected_reward(s: _State) -> jax.Array:
    """E[r(y)]: over every response of the forced-stop distribution (finished and stopped, all in
    the table), or, for an unbounded family, the family's exact E[sum_t r(y_t)] over its chain."""
    if "enum_reward" in s.inp:
        return (_probabilities(s) * s.inp["enum_reward"]).sum()
    return s.fam.expected_reward(s.params, s.inp["token_reward"])


# The runner's own metrics (the family's methods are looked up by name); XLA merges the repeated
# enumerations of several metrics into one.
_METRIC_FNS = {
    "loss": lambda s: s.value,
    "lp_w": lambda s: s.vals["lp_w"],
    "lp_l": lambda s: s.vals["lp_l"],
    "margin": _margin,
    "reward_accuracy": _reward_accuracy,
    "probabilities": _probabilities,
    "expected_reward": lambda s: _expected_reward(s),
    "mass_outside_data": lambda s: 1.0 - (_probabilities(s) * s.inp["support"]).sum(),
}
_ENUMERATING = ("probabilities", "expected_reward", "mass_outside_data")  # need the response table


# Metrics computed here; any other name is looked up as a method of the family that takes only
# the parameters (expected_length, sequence_entropy, token_entropy, eos_probability, ...).
METRICS = (*_METRIC_FNS, "params")


def _metrics(static: Static, value_fn, params, inp, pre) -> dict[str, jax.Array]:
    """Only the requested metrics (the loss is evaluated once, for those that read it)."""
    vals = _pair_values(static, params, inp, pre)
    value = value_fn(vals, inp) if "loss" in static.metrics else None  # a loss's value only if recorded
    state = _State(static.fam, params, inp, value, vals, pre)
    out = {}
    for name in static.metrics:
        if name == "params":
            out.update({f"params.{k}": v for k, v in params.items()})
        elif name in _METRIC_FNS:
            out[name] = _METRIC_FNS[name](state)
        else:
            out[name] = getattr(static.fam, name)(params)
    return out


def _optimizer(static: Static, lr):
    import optax

    return getattr(optax, static.optimizer)(learning_rate=lr, **dict(static.optimizer_args))


@caches.memo(maxsize=64)
def _program(static: Static):
    """``jit(vmap(one_run, (runs, None)))``: train each run from ``inp`` with the loss
    ``static.losses[k]`` and return the metrics at ``record_steps``. The steps between two records
    are a ``fori_loop`` of the gradient step alone; the metrics are computed only at the records.
    Every loss of ``static.losses`` is in the one program, chosen by the index ``k`` (data, not a
    recompilation: issue 17), so a comparison across losses compiles once."""
    import optax

    fns = [_loss_fns(name, expr) for name, expr in static.losses]

    def one(inp, k):
        opt = _optimizer(static, inp["lr"])
        pre = _prepare(static, inp)  # once per run, outside the steps
        value = _chosen(fns, k, lambda f: functools.partial(_value, static, f))
        if _CLOSED_FORM:
            cotangent = _chosen(fns, k, lambda f: functools.partial(_cotangent, static, f))
            gradient = functools.partial(_gradient, static, cotangent)
        else:
            def gradient(params, inp, pre, idx):
                return jax.grad(lambda p: value(_pair_values(static, p, inp, pre, idx), inp, idx))(params)

        def batch(t):
            if static.batch_size is None:
                return None
            n = inp["data"]["w"].shape[0]
            key = jax.random.fold_in(inp["key"], t)
            return jax.random.choice(key, n, (static.batch_size,), replace=False)

        def step(carry):
            params, opt_state, t = carry
            grads = gradient(params, inp, pre, batch(t))
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, t + 1

        def record(carry, n):  # n steps (n varies between records, so a while loop), then metrics
            carry = jax.lax.fori_loop(0, n, lambda _, c: step(c), carry)
            return carry, _metrics(static, value, carry[0], inp, pre)

        params = inp["params"]
        # steps between records: 0 (the initial state), then record_every, ..., and the rest; one
        # copy of the step and of the metrics in the program (a smaller program compiles faster)
        gaps = np.diff(record_steps(static.steps, static.record_every), prepend=0)
        return jax.lax.scan(record, (params, opt.init(params), jnp.asarray(0)), jnp.asarray(gaps))[1]

    return _Tiered(jax.vmap(one, in_axes=(0, None)))


# How long a program must have run in the experiments after its first, as a multiple of the
# time it took in its first (compilation included), before it is compiled optimised: the optimised
# compile costs about 1.5-4x the fast one and saves ~2/3 of every later step.
_TIER_UP = 1.0


class _Tiered:
    """A training program as a JIT tiers code: compiled fast (XLA level 0) at first, so a one-off
    experiment or a figure pays the short compile; recompiled with XLA's optimisations once the
    experiments after its first have spent more than ``_TIER_UP`` times as long in it as the first
    did (a repeated sweep, a benchmark's warm runs), and optimised from then on. The tier changes
    only between experiments (``account``), never within one, so every run of one ``run`` or
    ``run_many`` call is computed by the same code. Both tiers compute the same arithmetic, but
    the optimised code contracts a * b + c into fused multiply-adds, so a repeated experiment may
    part from the first by rounding (~1e-12 relative)."""

    def __init__(self, fn):
        self.fn, self.dropped = fn, set()
        self._compile()
        self.first: float | None = None
        self.since = 0.0
        self.tiered = False

    def _compile(self) -> None:
        keep = lambda options: {k: v for k, v in options.items() if k not in self.dropped}  # noqa: E731
        self.fast = jax.jit(self.fn, compiler_options=keep(RUN_ONCE_OPTIONS))
        self.optimised = jax.jit(self.fn, compiler_options=keep(COMPILE_OPTIONS))

    def __call__(self, *args):
        while True:
            try:
                return (self.optimised if self.tiered else self.fast)(*args)
            except jax.errors.JaxRuntimeError as exc:  # an option this jaxlib does not have: without it
                unknown = runtime.unknown_compile_option(exc)
                if unknown is None or unknown in self.dropped or unknown not in RUN_ONCE_OPTIONS:
                    raise
                self.dropped.add(unknown)
                self._compile()

    def account(self, seconds: float) -> None:
        """One experiment's time in this program (its calls, compilation included)."""
        if self.tiered:
            return
        if self.first is None:
            self.first = seconds
        else:
            self.since += seconds
            self.tiered = self.since > _TIER_UP * self.first


def _shard(tree):
    """Shard the leading (run) axis across devices when several are present."""
    devices = jax.devices()
    leaves = jax.tree_util.tree_leaves(tree)
    batch = leaves[0].shape[0] if leaves else 0
    if len(devices) < 2 or batch % len(devices):
        return tree
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(np.array(devices), ("runs",)), PartitionSpec("runs"))
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree)


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One (setting, seed): ``metrics[name]`` has one entry per recorded step."""

    setting: dict[str, Any]
    seed: int
    steps: list[int]
    metrics: dict[str, np.ndarray]

    def as_dict(self) -> dict[str, Any]:
        return {"setting": self.setting, "seed": self.seed, "steps": self.steps,
                "metrics": {k: _json_values(v) for k, v in self.metrics.items()}}


@dataclass
class Result:
    """What ``gradlab run`` prints: the resolved configuration and every run."""

    config: dict[str, Any]
    runs: list[Run]

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "runs": [r.as_dict() for r in self.runs]}

    def series(self, name: str, setting: Mapping[str, Any] | None = None) -> np.ndarray:
        """``(seeds, records, ...)`` of one metric for one setting (the first by default)."""
        chosen = [r for r in self.runs if setting is None or r.setting == dict(setting)]
        first = chosen[0].setting
        return np.stack([r.metrics[name] for r in chosen if r.setting == first])


def _json_values(a: np.ndarray) -> list:
    """A list per recorded step; non-finite numbers become null (JSON has no NaN)."""

    def clean(x):
        return [clean(y) for y in x] if isinstance(x, list) else (x if math.isfinite(x) else None)

    return clean(np.asarray(a, dtype=float).tolist())


@caches.memo(maxsize=64)
def _init_program(fam):
    """One compiled program for a seed's random draws: ``seed, scale -> (policy init, seeded
    reference init, minibatch key)``, the same values as the eager calls ``fam.init(PRNGKey(seed),
    scale)``, ``fam.init(fold_in(PRNGKey(seed), 1), scale)`` and ``fold_in(PRNGKey(seed), 2)``,
    without compiling a dozen tiny eager programs (key, fold_in, normal, multiply, ...) in a cold
    process (issue 17)."""

    def draws(seed, scale):
        key = jax.random.PRNGKey(seed)
        return fam.init(key, scale), fam.init(jax.random.fold_in(key, 1), scale), jax.random.fold_in(key, 2)

    return _Tiered(draws)  # never accounted: it stays at level 0 (and drops options jaxlib lacks)


def _draws(fam, seed: int, scale: float) -> tuple[Any, Any, np.ndarray]:
    with jax.enable_x64(True):
        pol, ref, key = _init_program(fam)(np.int64(seed), np.float64(scale))
    host = lambda tree: jax.tree_util.tree_map(np.asarray, tree)  # noqa: E731
    return host(pol), host(ref), np.asarray(key)


def initial_params(exp: Experiment, fam, seed: int) -> tuple[Any, Any]:
    """(policy, reference) parameters of one seed. Seeded parameters use PRNGKey(seed) for the
    policy and a key folded from it for a seeded reference, so the two differ."""
    return _initial_params(exp, fam, seed)[:2]


def _initial_params(exp: Experiment, fam, seed: int) -> tuple[Any, Any, np.ndarray]:
    explicit = lambda table: {k: np.asarray(v, dtype=np.float64) for k, v in table.items()}  # noqa: E731
    seeded, seeded_ref, key = _draws(fam, seed, exp.policy.scale)
    pol, ref = exp.policy.init, exp.reference.params
    ref_params = None
    if isinstance(ref, Mapping):
        ref_params = explicit(ref)
    elif ref == "seed":
        ref_params = seeded_ref
    if isinstance(pol, Mapping):
        params = explicit(pol)
    elif pol == "reference":
        params = ref_params
    else:
        params = seeded
    return params, (params if ref == "policy" else ref_params), key


# A seed's draws and data are a deterministic function of the policy, reference and data tables
# and the seed: kept (read-only) for the other settings of a sweep that share them and for the
# next call, so a beta sweep builds each seed's dataset once and a repeated sweep not again.
_SEED_INPUTS: dict[tuple, tuple] = caches.Bounded(4096)


def _frozen(tree):
    def freeze(a):
        a = np.array(a, copy=True)
        a.flags.writeable = False
        return a

    return jax.tree_util.tree_map(freeze, tree)


def _seed_inputs(exp: Experiment, fam, seed: int) -> tuple[Any, Any, np.ndarray, datasets.PairData]:
    shared = (repr(exp.policy), repr(exp.reference), repr(exp.data), seed)
    if shared not in _SEED_INPUTS:
        params, ref_params, key = _initial_params(exp, fam, seed)
        data = datasets.build(exp.data, fam, seed, params, ref_params)
        _SEED_INPUTS[shared] = (_frozen(params), _frozen(ref_params), key,
                                data._replace(**{f: _frozen(getattr(data, f)) for f in
                                                 ("items", "lengths", "w", "l", "weight", "label")}))
    return _SEED_INPUTS[shared]


def _inputs(exp: Experiment, fam, seed: int) -> tuple[dict[str, Any], datasets.PairData, tuple]:
    """Every array one run needs, on the host (numpy), and the key of their shapes and dtypes
    (runs with equal keys stack into one program). The compiled program computes the rest (count
    matrices, the reference's values) once per call, so no eager JAX work runs here."""
    base, data, base_key = _run_arrays(exp, fam, seed)
    hvals = np.array(list(hyper_values(exp.loss, resolve_loss(exp.loss)).values()), dtype=np.float64)
    inp = {**base, "tau": np.float64(exp.reference.temperature), "hvals": hvals, "lr": np.float64(exp.train.lr)}
    return inp, data, base_key  # hvals are padded to the program's widest loss when runs are stacked


_RUN_ARRAYS: dict[tuple, tuple] = caches.Bounded(4096)


def _run_arrays(exp: Experiment, fam, seed: int) -> tuple[dict[str, Any], datasets.PairData, tuple]:
    """The arrays of a run that depend on the seed's draws and data and on which metrics are
    recorded (not on the loss's hyperparameters or the learning rate), with their shape key:
    kept, so the settings of a sweep that share a seed share them (issue 17: the host work of a
    128-run call was ~30 ms, about as long as its 500 steps)."""
    names = metric_names(exp)
    shared = (repr(exp.policy), repr(exp.reference), repr(exp.data), seed, names)
    if shared in _RUN_ARRAYS:
        return _RUN_ARRAYS[shared]
    params, ref_params, key, data = _seed_inputs(exp, fam, seed)
    base = {
        "params": params,
        "ref_params": ref_params,
        "data": {"items": np.asarray(data.items), "lengths": np.asarray(data.lengths), "w": np.asarray(data.w),
                 "l": np.asarray(data.l), "weight": np.asarray(data.weight, dtype=np.float64),
                 "label": np.asarray(data.label, dtype=np.float64)},
        "key": key,
    }
    if _enumerable(fam) and set(_ENUMERATING) & set(names):
        reward = datasets.token_reward(exp.data, fam)
        items_all, lengths_all = datasets.enumeration(fam)
        base["support"] = np.asarray(datasets.support(fam, data), dtype=np.float64)
        base["enum_reward"] = (datasets.item_rewards(reward, items_all, lengths_all) if reward is not None
                               else np.zeros(len(items_all)))
        if logit_table(fam) is not None:
            base["enum"] = (items_all, lengths_all)
    elif "expected_reward" in names and datasets.token_reward(exp.data, fam) is not None:
        base["token_reward"] = np.asarray(datasets.token_reward(exp.data, fam), dtype=np.float64)
    _RUN_ARRAYS[shared] = (base, data, _shape_key(base))
    return _RUN_ARRAYS[shared]


def _static(exp: Experiment, fam, on_policy: bool) -> Static:
    t = exp.train
    return Static(fam, ((exp.loss.name, exp.loss.expr),), resolve_loss(exp.loss).kind, t.optimizer,
                  tuple(sorted(t.optimizer_args.items())),
                  t.steps, t.record_every, t.batch_size, metric_names(exp), on_policy, exp.data.labels == "soft",
                  exp.reference.temperature != 1.0)


def _shape_key(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple((np.shape(x), np.result_type(x)) for x in leaves))


def run(source: str | Any, *, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Result:
    """Run an experiment (a TOML path, a dict, or a loaded :class:`Experiment`); ``overrides``
    replace keys before validation, e.g. ``{"train": {"steps": 10}}``."""
    with jax.enable_x64(True):  # float64 for this call only: no global state is changed
        return _run(source, overrides)


def _run(source, overrides) -> Result:
    return _run_all([_experiment(source, overrides)])[0]


def _experiment(source, overrides) -> Experiment:
    exp = source if isinstance(source, Experiment) else load(source)
    if overrides:
        raw = {k: dict(v) for k, v in exp.source.items()}
        for section, table in overrides.items():
            raw.setdefault(section, {}).update(table)
        exp = load(raw)
    return exp


def _jobs(exps: list[Experiment]) -> list[tuple]:
    """(experiment index, setting, seed, static, inputs, input shapes) of every run."""
    jobs = []
    for e, exp in enumerate(exps):
        for setting, point in settings(exp):
            fam = build_family(point.policy)
            for seed in point.train.seeds:
                inp, data, shapes = _inputs(point, fam, seed)
                jobs.append((e, setting, seed, _static(point, fam, data.on_policy), inp, shapes))
    return jobs


def _run_all(exps: list[Experiment]) -> list[Result]:
    """Every run of every experiment; runs with the same static structure and input shapes are
    one program, across experiments too."""
    jobs = _jobs(exps)
    results: dict[int, dict[str, np.ndarray]] = {}
    spent: dict[Static, float] = {}  # seconds in each program, accounted once at the end
    for static, members in _groups(jobs):
        program, start = _program(static), time.perf_counter()
        width = max(len(jobs[i][4]["hvals"]) for i in members)
        for k, loss in enumerate(static.losses):  # one call per loss: its index is the same for every run
            chosen = [i for i in members if jobs[i][3].losses[0] == loss]
            inps = [{**jobs[i][4], "hvals": np.pad(jobs[i][4]["hvals"], (0, width - len(jobs[i][4]["hvals"])))}
                    for i in chosen]
            stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *inps)
            records = jax.tree_util.tree_map(np.asarray, program(_shard(stacked), np.int32(k)))
            order = [key for m in static.metrics for key in records
                     if key == m or (m == "params" and key.startswith("params."))]
            for j, i in enumerate(chosen):
                results[i] = {key: records[key][j] for key in order}
        spent[static] = spent.get(static, 0.0) + time.perf_counter() - start
    for static, seconds in spent.items():
        _program(static).account(seconds)
    return [Result(resolved(exp), [Run(setting, seed, record_steps(static.steps, static.record_every), results[i])
                                   for i, (e2, setting, seed, static, _, _) in enumerate(jobs) if e2 == e])
            for e, exp in enumerate(exps)]


def _groups(jobs: list[tuple]) -> list[tuple[Static, list[int]]]:
    """(program, job indices) for ``_jobs``: jobs that differ only in their loss share a program,
    whose ``losses`` are theirs in first-seen order. Jobs with other input shapes are called apart
    (the same program may serve them: jit compiles it once per shape)."""
    by_key: dict[tuple, list[int]] = {}
    for i, (_, _, _, static, _, shapes) in enumerate(jobs):
        by_key.setdefault((static._replace(losses=()), shapes), []).append(i)
    return [(base._replace(losses=tuple(dict.fromkeys(jobs[i][3].losses[0] for i in members))), members)
            for (base, _), members in by_key.items()]


def program_count(exp: Experiment) -> int:
    """How many compiled programs ``run`` would execute (one per static structure, every loss of
    a sweep over losses in one)."""
    with jax.enable_x64(True):
        return len(_groups(_jobs([exp])))


def optimise(source: str | Any) -> None:
    """Compile the programs of an experiment (a path, a dict or a loaded one) with XLA's
    optimisations at their next call, as repeating the experiment does on its own (``_Tiered``):
    for a sweep about to be run many times, or to time the steady state."""
    with jax.enable_x64(True):
        for static, _ in _groups(_jobs([_experiment(source, None)])):
            _program(static).tiered = True


def run_many(sources: list[str | Any]) -> list[Result]:
    """Several experiments (paths, dicts or loaded ones) at once, one :class:`Result` each. Their
    runs share compiled programs wherever the static structure and the input shapes agree, so
    settings that are not a grid (e.g. gamma = rho * beta) still run as one vmapped program."""
    with jax.enable_x64(True):
        return _run_all([_experiment(s, None) for s in sources])
