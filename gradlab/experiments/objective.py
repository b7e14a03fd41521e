"""The training objective: the science of a run, apart from the machinery that compiles it.

A loss is a function of the canonical variables of one *unit* of data. The objective over a
dataset is the weighted sum over its units,

.. math:: J(\\theta) = \\sum_i w_i \\, \\ell(v_i(\\theta)),

computed in four steps, each a method of the unit:

1. ``values``: the canonical variables v_i of every unit at the policy's parameters theta;
2. ``weights``: the units' weights w_i (summing to 1) and their soft labels;
3. ``losses`` and ``partials``: the loss of each unit, and its closed-form partial derivatives
   dl/dv in the variables that move with theta (sympy's derivatives of the loss, compiled once);
4. ``cotangent``: w_i dl/dv, pulled back through ``values`` by one vjp, which is dJ/dtheta.

The first unit is the preference pair (:class:`PairUnit`): a chosen and a rejected response, whose
variables are ``lp_w``, ``lp_l``, ``ref_w``, ``ref_l``, ``len_w``, ``len_l`` and the tails. The
second is the group of G on-policy responses with binary rewards (:class:`GroupUnit`, for the
group losses of :mod:`gradlab.group_losses`): its value is the joint law P(r, n) of one
response's reward and length, and its cotangent the expected weight -G c(r, n) of
:mod:`gradlab.experiments.groups`, so one vjp gives the exact expected gradient. Each unit is
registered in ``UNITS`` under the loss kind it serves; the compiled program (``_engine``) calls
only the functions of this module.

The metrics recorded along a run (``METRIC_FNS``) read the same values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab import caches
from gradlab.experiments import _loss_code
from gradlab.policies import Reference, has_logit_table, pair_variables, token_mask

if TYPE_CHECKING:
    from gradlab.losses import Loss

__all__ = ["METRICS", "UNITS", "GroupFns", "GroupUnit", "PairUnit", "abstract_params", "loss_inputs",
           "canonical_variables", "gradient", "loss_fns", "loss_of", "metrics", "registry_loss",
           "prepare", "reference_values", "value", "values", "cotangent"]


# --------------------------------------------------------------------------------------------
# The loss, compiled: its value and its closed-form partials
# --------------------------------------------------------------------------------------------


@caches.memo(maxsize=128)
def loss_of(name: str | None, expr: str | None) -> Loss | _loss_code.Facts:
    """A ``[loss]`` table's loss: a registered name (aliases, combinations), or a formula. A
    registered pair loss comes as its facts from the shipped table while that is current
    (``_loss_code.Facts``: its kind, variables and hyperparameters, without importing sympy);
    anything else from the registry (:func:`registry_loss`)."""
    found = _loss_code.facts(name) if expr is None else None
    return found if found is not None else registry_loss(name, expr)


@caches.memo(maxsize=128)
def registry_loss(name: str | None, expr: str | None) -> Loss:
    """A ``[loss]`` table's loss from the live registry (sympy): a registered name (aliases,
    combinations), or a formula."""
    from gradlab.losses import custom, get_loss

    if expr is not None:
        return custom(expr, name="custom")
    assert name is not None  # a [loss] table has a name or an expr (the schema)
    return get_loss(name)


class LossFns(NamedTuple):
    """One loss compiled for training: its variables, its hyperparameter count, its value per
    unit, and its partial derivatives in the variables that move with the parameters."""

    variables: list[str]
    n_hyper: int
    value: Any
    moving: list[str]
    partials: Any


class GroupFns(NamedTuple):
    """One group loss compiled for training: its hyperparameter count, its first-step weight
    ``weight(A, |o_i|, sum_j |o_j|, G, *hyperparameters)``, and whether that weight reads the
    group's total length (then its expectation is a convolution)."""

    n_hyper: int
    weight: Any
    reads_sum: bool


def loss_fns(name: str | None, expr: str | None) -> LossFns | GroupFns:
    """The loss ``(name, expr)`` as JAX functions. Only the variables that move with the
    parameters (``policies.POLICY_VARIABLES``: log-probabilities and tails) have partials;
    ``ref_*`` and ``len_*`` are constants of a run. A group loss gives its first-step weight.
    A registered pair loss's functions come from the shipped generated code while it is current
    (``_loss_code``: the same code, derived ahead); anything else is derived now."""
    shipped = _loss_code.served(name) if expr is None else None
    if shipped is not None:
        return LossFns(*shipped)
    loss = registry_loss(name, expr)
    if loss.kind == "group":
        from gradlab.experiments.groups import _weight_parts
        from gradlab.group_losses import GroupLoss, hyper_weight_function

        assert isinstance(loss, GroupLoss)
        return GroupFns(len(loss.hyperparameters), hyper_weight_function(loss), _weight_parts(loss, None)[1])
    return LossFns(*_loss_code.derive(loss))


def _args(fns: LossFns, vals: Mapping[str, jax.Array], hvals) -> list:
    """The positional arguments of the loss's functions: its variables, then its hyperparameters
    (the first ``n_hyper`` entries of the run's padded ``hvals``)."""
    return [vals[v] for v in fns.variables] + [hvals[i] for i in range(fns.n_hyper)]


def uses_tails(static: Any) -> bool:
    """Whether any loss of the program reads a tail (LD-DPO's verbose part)."""
    return any(v.startswith(("tail_", "ref_tail_")) for n, e in static.losses for v in loss_of(n, e).variables)


# --------------------------------------------------------------------------------------------
# Canonical variables of the pairs, read off the policy
# --------------------------------------------------------------------------------------------


def reference_values(fam, ref_params, items, lengths, temperature,
                     tempered: bool | None = None) -> dict[str, jax.Array]:
    """The frozen reference's log-probabilities of every response (and per token, for the tails),
    computed once. With ``temperature`` tau the reference is the sequence-level tempered
    pi_0^(1/tau)/Z, Z over every response (finished sequences, or the k actions): per-token
    log-probs over tau, and ``log_z`` subtracted from their sums."""
    if fam.single_context:
        return {"lp": fam.tempered_logprobs(ref_params, temperature)[items]}
    tok = fam.per_token_logp(ref_params, items, lengths) / temperature
    tempered = temperature != 1.0 if tempered is None else tempered  # (a traced tau cannot be compared)
    log_z = fam.log_partition(ref_params, temperature) if tempered else jnp.zeros(())
    return {"tok": tok, "log_z": log_z}


def canonical_variables(fam, params, ref: Mapping[str, jax.Array], items, lengths, w, l) -> dict[str, jax.Array]:
    """The canonical variables of the pairs (w[i], l[i]) of a response table: for sequence
    families the policy layer's one map (``policies.pair_variables``), fed with the per-token
    log-probs of every response in the table, computed once per step."""
    if fam.single_context:
        lp = fam.logprob(params, items)
        return {"lp_w": lp[w], "lp_l": lp[l], "ref_w": ref["lp"][w], "ref_l": ref["lp"][l]}
    tok = fam.per_token_logp(params, items, lengths)
    reference = Reference(ref["tok"][w], ref["tok"][l], ref["log_z"])
    return pair_variables(tok[w], tok[l], reference, lengths[w], lengths[l])


def _swapped(vals: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The same pair with chosen and rejected exchanged (the other label of a soft pair)."""
    return {_other(k): v for k, v in vals.items()}


def _other(name: str) -> str:
    return name[:-1] + {"w": "l", "l": "w"}[name[-1]]


# The lean form, for a family that supplies the optional fast path (``Family.table_logits``):
#     log pi(y) = sum_{t < len(y)} log_softmax(table)[row_t, y_t] = n(y) . vec(log_softmax(table)),
# with n(y) the counts of the (row, token) cells that y's first len(y) positions visit (of the rows
# a response can read at all, ``Family.table_reach``: a row no response reads adds only zeros to
# every product, and the bigram's 16 of 20 cells took ~18% off its sweep's step). A step then
# takes one log-softmax of the (rows, V) table, not one per position of every pair, and one
# contraction of each side's (pairs, rows * V) count matrix, instead of per-token gathers, which
# XLA:CPU runs element by element under vmap (6.8 ms -> ~0.2 ms per step for 128 unigram runs).
# The counts are built once per run inside the compiled program (one scatter-add, before the
# steps). Where a count matrix would be too large the step gathers the log-softmax table per token
# instead (still one log-softmax per step). A family without the fast path, or a program compiled
# with ``lean=False``, takes the per-position form (``canonical_variables``).

DENSE_LIMIT = 1 << 20  # count-matrix entries per run above which the gather form is used


def is_lean(static: Any) -> bool:
    return static.lean and has_logit_table(static.fam)


def _table_logp(fam, params) -> jax.Array:
    """vec(log_softmax(table)): the log-probability of every (row, token) cell a response can
    read (the rows of ``Family.table_reach``), flattened."""
    return jax.nn.log_softmax(fam.table_logits(params)[fam.table_reach()], axis=-1).reshape(-1)


class _Side(NamedTuple):
    """How to read one side's (w or l) log-probabilities off the flattened log-softmax table:
    dense counts ``(P, K)`` (``lp = counts @ table``), or flat cell indices ``(P, T)`` with a
    mask of the positions that count (``lp = sum(table[index] * mask)``)."""

    counts: jax.Array | None
    index: jax.Array | None  # type: ignore[assignment]  # mypy: the field shadows tuple.index, unused here
    mask: jax.Array | None

    def logp(self, table: jax.Array, idx=None) -> jax.Array:
        pick = (lambda a: a) if idx is None else (lambda a: a[idx])  # noqa: E731
        if self.counts is not None:
            return pick(self.counts) @ table
        return (table[pick(self.index)] * pick(self.mask)).sum(-1)


def _side(fam, items, rows_of, mask) -> _Side:
    """The ``_Side`` of the responses ``rows_of`` (``(P,)`` indices into the table ``items``),
    counting the positions where the boolean ``(P, T)`` ``mask`` holds."""
    first, rows = _reach(fam)
    # (P, T) cells of the rows in reach; masked past the end (where a row out of reach can be read)
    flat = (jnp.clip(fam.table_rows(items) - first, 0, rows - 1) * fam.vocab + items)[rows_of]
    n, k = flat.shape[0], rows * fam.vocab
    if n * k > DENSE_LIMIT:
        return _Side(None, flat, mask.astype(jnp.float64))
    counts = jnp.zeros((n, k), jnp.float64).at[jnp.arange(n)[:, None], flat].add(mask.astype(jnp.float64))
    return _Side(counts, None, None)


def abstract_params(fam) -> Any:
    """The family's parameter tree as ``jax.ShapeDtypeStruct`` leaves (traced once per family and
    float64 setting: nothing allocated)."""
    # jax's Config declares its flags at run time, unseen by its stubs
    return _abstract_params(fam, bool(jax.config.jax_enable_x64))  # type: ignore[attr-defined]


@caches.memo(maxsize=256)
def _abstract_params(fam, x64: bool) -> Any:  # x64: the dtypes of the leaves
    return jax.eval_shape(lambda: fam.init(jax.random.PRNGKey(0)))


@caches.memo(maxsize=64)
def _reach(fam) -> tuple[int, int]:
    """(first row, rows) of the family's logit table that a response can read
    (``Family.table_reach``, a contiguous slice)."""
    first, stop, step = fam.table_reach().indices(jax.eval_shape(fam.table_logits, abstract_params(fam)).shape[0])
    assert step == 1, "table_reach is a contiguous slice of rows"
    return first, stop - first


# --------------------------------------------------------------------------------------------
# The pair unit
# --------------------------------------------------------------------------------------------


class PairUnit:
    """A preference pair (y_w, y_l) of a response table, weighted, with a soft label p (the
    probability that y_w is preferred; 1 for hard labels)."""

    @staticmethod
    def prepare(static: Any, inp: Mapping[str, Any]) -> dict[str, Any]:
        """The constants of one run, computed once per call before the steps: how to read each
        pair's log-probabilities off the policy, and the frozen reference's values of the pairs.

        With temperature tau the reference is the sequence-level tempered pi_0^(1/tau)/Z, Z over
        every response: per-token log-probs over tau, and ``log_z`` subtracted from their sums."""
        fam, d = static.fam, inp["data"]
        items, lengths, w, l = d["items"], d["lengths"], d["w"], d["l"]
        tau = inp["tau"]
        if fam.single_context:
            return {"ref_lp": fam.tempered_logprobs(inp["ref_params"], tau)[items]}
        if not is_lean(static):
            return {"ref": reference_values(fam, inp["ref_params"], items, lengths, tau, static.tempered)}
        width = items.shape[-1]
        inside = token_mask(lengths, width)
        past = jnp.arange(width) >= jnp.minimum(lengths[w], lengths[l])[:, None]  # the longer one's tail
        sw, sl = _side(fam, items, w, inside[w]), _side(fam, items, l, inside[l])
        ref_table = _table_logp(fam, inp["ref_params"]) / tau
        log_z = fam.log_partition(inp["ref_params"], tau) if static.tempered else jnp.zeros(())
        pre = {"w": sw, "l": sl, "ref_w": sw.logp(ref_table) - log_z, "ref_l": sl.logp(ref_table) - log_z,
               "len_w": lengths[w].astype(jnp.float64), "len_l": lengths[l].astype(jnp.float64)}
        if uses_tails(static):
            tw, tl = _side(fam, items, w, inside[w] & past), _side(fam, items, l, inside[l] & past)
            pre.update(tail_w=tw, tail_l=tl, ref_tail_w=tw.logp(ref_table), ref_tail_l=tl.logp(ref_table))
        if "enum" in inp:  # every response of the family, for the metrics over the distribution
            e_items, e_lengths = inp["enum"]
            pre["enum"] = _side(fam, e_items, jnp.arange(e_items.shape[0]), token_mask(e_lengths, e_items.shape[-1]))
        return pre

    @staticmethod
    def values(static: Any, params, inp, pre, idx=None) -> dict[str, jax.Array]:
        """The canonical variables of the pairs (or of the minibatch ``idx``) at ``params``."""
        fam, d = static.fam, inp["data"]
        w, l = (d["w"], d["l"]) if idx is None else (d["w"][idx], d["l"][idx])
        pick = (lambda a: a) if idx is None else (lambda a: a[idx])  # noqa: E731
        if fam.single_context:
            lp = fam.logprob(params, d["items"])
            return {"lp_w": lp[w], "lp_l": lp[l], "ref_w": pre["ref_lp"][w], "ref_l": pre["ref_lp"][l]}
        if "ref" in pre:  # the per-position form
            return canonical_variables(fam, params, pre["ref"], d["items"], d["lengths"], w, l)
        table = _table_logp(fam, params)
        vals = {"lp_w": pre["w"].logp(table, idx), "lp_l": pre["l"].logp(table, idx)}
        vals.update({k: pick(pre[k]) for k in ("ref_w", "ref_l", "len_w", "len_l")})
        if "tail_w" in pre:
            vals.update(tail_w=pre["tail_w"].logp(table, idx), tail_l=pre["tail_l"].logp(table, idx),
                        ref_tail_w=pick(pre["ref_tail_w"]), ref_tail_l=pick(pre["ref_tail_l"]))
        return vals

    @staticmethod
    def weights(static: Any, inp, vals, idx=None) -> tuple[jax.Array, jax.Array]:
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

    @staticmethod
    def losses(static: Any, fns: LossFns, vals, hvals, label) -> jax.Array:
        """The loss of each pair. A soft label p is Bradley-Terry's: p l(y_w, y_l) + (1 - p) l(y_l, y_w)."""
        per_pair = fns.value(*_args(fns, vals, hvals))
        if static.soft:
            per_pair = label * per_pair + (1 - label) * fns.value(*_args(fns, _swapped(vals), hvals))
        return per_pair

    @staticmethod
    def value(static: Any, fns: LossFns, vals, inp, idx=None) -> jax.Array:
        """J = sum_i w_i l(v_i) over the pairs (or the minibatch ``idx``)."""
        weight, label = PairUnit.weights(static, inp, vals, idx)
        return (weight * PairUnit.losses(static, fns, vals, inp["hvals"], label)).sum()

    @staticmethod
    def cotangent(static: Any, fns: LossFns, vals, inp, idx=None) -> dict[str, jax.Array]:
        """dJ/d(values): w_i dl/dv at each pair; 0 for the constants (``ref_*``, ``len_*``)."""
        weight, label = PairUnit.weights(static, inp, vals, idx)
        dl = PairUnit.partials(static, fns, vals, inp["hvals"], label)
        return {k: weight * jnp.broadcast_to(dl[k], weight.shape) if k in dl else jnp.zeros_like(x)
                for k, x in vals.items()}

    @staticmethod
    def partials(static: Any, fns: LossFns, vals, hvals, label) -> dict[str, jax.Array]:
        """name -> dl/d name of each pair's loss, for the variables that move with the parameters.
        With a soft label, the term (1 - p) l(swap v) has d/dv = (1 - p) dl/d(swap v) at the swapped
        pair: its partials land on the other side's variables (SFT's swapped term moves lp_l)."""

        def at(v):
            return dict(zip(fns.moving, fns.partials(*_args(fns, v, hvals)), strict=True))

        dl = at(vals)
        if static.soft:
            swapped = at(_swapped(vals))
            dl = {v: label * dl.get(v, 0.0) + (1 - label) * swapped.get(_other(v), 0.0)
                  for v in {*fns.moving, *map(_other, fns.moving)}}
        return dl


# --------------------------------------------------------------------------------------------
# The group unit
# --------------------------------------------------------------------------------------------


def loss_inputs(exp: Any) -> dict[str, Any]:
    """The per-run inputs a loss adds beyond its hyperparameter values: a group loss's
    ``scale_rewards`` as an index into ``groups.SCALES`` (data, so that a sweep over it is one
    program). Nothing for a pair loss."""
    loss = loss_of(exp.loss.name, exp.loss.expr)
    if loss.kind != "group":  # a pair loss: the group registry (slow to derive) is not imported
        return {}
    from gradlab.experiments.groups import SCALES
    from gradlab.group_losses import GroupLoss

    assert isinstance(loss, GroupLoss)

    return {"scale": np.int32(SCALES.index(exp.loss.scale_rewards or loss.scale_rewards))}


class GroupUnit:
    r"""A group of G responses drawn on-policy for one prompt, each with a binary reward, at the
    first on-policy step of every optimiser step (rho = 1: the rollouts are redrawn from the
    current policy, and the gradient is the exact expectation over them).

    By symmetry over the G responses (:mod:`gradlab.experiments.groups`),

    .. math:: \nabla \mathbb{E}[\mathcal{L}] = -G \sum_{r, n} c(r, n)\, \nabla P_\theta(r, n),

    with c(r, n) = E[w_1 | r_1 = r, |o_1| = n] held fixed (TRL detaches advantages and
    normalisers). The unit's value is the law P (``law``, (2, N + 1)) and the mass past N
    (``tail_mass``); its cotangent is -G c, so the engine's one vjp is this gradient. The
    objective's value is the surrogate -G sum c P: -E[sum_i w_i], whose gradient with the
    weights held is the step."""

    @staticmethod
    def prepare(static: Any, inp: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    @staticmethod
    def values(static: Any, params, inp, pre, idx=None) -> dict[str, jax.Array]:
        from gradlab.experiments.groups import law_of

        d = inp["data"]
        law, beyond = law_of(static.fam, params, d, d["span"].shape[0] - 1)
        return {"law": law, "tail_mass": beyond.sum()}

    @staticmethod
    def cotangent(static: Any, fns: GroupFns, vals, inp, idx=None) -> dict[str, jax.Array]:
        """-G c(r, n): the expected weight of one response given its reward and length, from the
        law at these parameters (not differentiated)."""
        from gradlab.experiments.groups import SCALES, advantage_table, expected_weight

        g = inp["data"]["group"].shape[0]
        law = jnp.maximum(jax.lax.stop_gradient(vals["law"]), 0.0)
        p = law[1].sum() / law.sum()
        adv = jnp.stack([jnp.asarray(advantage_table(g, s, p)) for s in SCALES])[inp["scale"]]
        hyper = [inp["hvals"][i] for i in range(fns.n_hyper)]

        def w(a, n, s, gg):
            return fns.weight(a, n, s, gg, *hyper)

        c = expected_weight(w, law, adv, g, fns.reads_sum, jnp)
        return {"law": -g * c, "tail_mass": jnp.zeros_like(vals["tail_mass"])}

    @staticmethod
    def value(static: Any, fns: GroupFns, vals, inp, idx=None) -> jax.Array:
        """The surrogate -G sum_{r,n} c(r, n) P(r, n), c held: its gradient is the step."""
        return (GroupUnit.cotangent(static, fns, vals, inp)["law"] * vals["law"]).sum()


# loss kind -> its unit; the proper (on-policy expectation) loss is a pair loss whose integrand
# carries pi(y)pi(y') itself
UNITS: dict[str, Any] = {"pair": PairUnit, "expectation": PairUnit, "group": GroupUnit}


def unit_of(static: Any) -> Any:
    return UNITS[static.kind]


# --------------------------------------------------------------------------------------------
# The objective and its gradient, for any unit
# --------------------------------------------------------------------------------------------


def prepare(static: Any, inp) -> dict[str, Any]:
    """A run's constants, once per call (see the unit's ``prepare``)."""
    return unit_of(static).prepare(static, inp)


def values(static: Any, params, inp, pre, idx=None) -> dict[str, jax.Array]:
    """The canonical variables of every unit (or of the minibatch ``idx``) at ``params``."""
    return unit_of(static).values(static, params, inp, pre, idx)


def value(static: Any, fns: Any, vals, inp, idx=None) -> jax.Array:
    """J = sum_i w_i l(v_i) over the units (or the minibatch ``idx``) with these values."""
    return unit_of(static).value(static, fns, vals, inp, idx)


# The training step's gradient. With J = sum_i w_i l(v_i),
#     dJ/dtheta = sum_i w_i sum_v dl/dv(v_i) dv_i/dtheta,
# the closed-form partials dl/dv (sympy's derivative of the loss, one cse-compiled function)
# pulled back through the policy by one vjp of the values. This is the gradient jax.grad of the
# value computes (tested to rounding), without differentiating the loss's own arithmetic at every
# step: for DPO, one sigmoid per pair instead of softplus, its derivative and the loss's value
# (4x fewer transcendentals per step). Weights are not differentiated (on-policy weights are
# treated as data of the step, as the data of any other step).


def cotangent(static: Any, fns: Any, vals, inp, idx=None) -> dict[str, jax.Array]:
    """dJ/d(values): for pairs w_i dl/dv at each pair, 0 for the constants (``ref_*``,
    ``len_*``); for groups -G c(r, n) on the law (see the unit)."""
    return unit_of(static).cotangent(static, fns, vals, inp, idx)


def gradient(static: Any, cotangent_fn, params, inp, pre, idx=None):
    """dJ/dtheta: ``cotangent_fn(vals, inp, idx)`` pulled back through the values by one vjp;
    the value itself is not computed."""
    vals, pullback = jax.vjp(lambda p: values(static, p, inp, pre, idx), params)
    return pullback(cotangent_fn(vals, inp, idx))[0]


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


class State(NamedTuple):
    """What a metric may read: the family, the parameters, the run's inputs, the objective's
    value, the units' canonical variables at these parameters and the run's constants."""

    fam: Any
    params: Any
    inp: dict
    value: jax.Array | None
    vals: dict
    pre: dict


def _margin(s: State) -> jax.Array:
    """h = (lp_w - ref_w) - (lp_l - ref_l), the implicit-reward margin over beta."""
    return (s.vals["lp_w"] - s.vals["ref_w"]) - (s.vals["lp_l"] - s.vals["ref_l"])


def _probabilities(s: State) -> jax.Array:
    """pi over every response: the k actions, or the finished sequences up to the cut-off."""
    if s.fam.single_context:
        return s.fam.probabilities(s.params)
    if "enum" in s.pre:  # counts of every enumerated response against the log-softmax table
        return jnp.exp(s.pre["enum"].logp(_table_logp(s.fam, s.params)))
    return jnp.exp(s.fam.enumerate(s.params).logp)


def _reward_accuracy(s: State) -> jax.Array:
    h = _margin(s)  # ties (h = 0 up to rounding, as at the start) count one half
    return (s.inp["data"]["weight"] * jnp.where(jnp.abs(h) <= 1e-9, 0.5, (h > 0).astype(jnp.float64))).sum()


def _expected_reward(s: State) -> jax.Array:
    """E[r(y)]: over every response of the forced-stop distribution (finished and stopped, all in
    the table), or, for an unbounded family, the family's exact E[sum_t r(y_t)] over its chain."""
    if "enum_reward" in s.inp:
        return (_probabilities(s) * s.inp["enum_reward"]).sum()
    return s.fam.expected_reward(s.params, s.inp["token_reward"])


def _success(s: State) -> jax.Array:
    """p = P(reward = 1) of one on-policy response."""
    law = s.vals["law"]
    return law[1].sum() / law.sum()


def _length_given(r: int):
    def metric(s: State) -> jax.Array:
        """E[|o| | reward = r] (EOS included), over the lengths summed exactly."""
        law = s.vals["law"][r]
        return (law * s.inp["data"]["span"]).sum() / law.sum()

    return metric


def _silent_groups(s: State) -> jax.Array:
    """P(all G rewards equal) = p^G + (1 - p)^G: the groups whose advantages are all 0."""
    p, g = _success(s), s.inp["data"]["group"].shape[0]
    return p**g + (1 - p) ** g


GROUP_METRICS = {
    "success": _success,
    "length_correct": _length_given(1),
    "length_incorrect": _length_given(0),
    "silent_groups": _silent_groups,
    "tail_mass": lambda s: s.vals["tail_mass"],
}

# The objective's own metrics (the family's methods are looked up by name); XLA merges the
# repeated enumerations of several metrics into one.
METRIC_FNS = {
    "loss": lambda s: s.value,
    "lp_w": lambda s: s.vals["lp_w"],
    "lp_l": lambda s: s.vals["lp_l"],
    "margin": _margin,
    "reward_accuracy": _reward_accuracy,
    "probabilities": _probabilities,
    "expected_reward": _expected_reward,
    "mass_outside_data": lambda s: 1.0 - (_probabilities(s) * s.inp["support"]).sum(),
    **GROUP_METRICS,
}
ENUMERATING = ("probabilities", "expected_reward", "mass_outside_data")  # need the response table

# Metrics computed here; any other name is looked up as a method of the family that takes only
# the parameters (expected_length, sequence_entropy, token_entropy, eos_probability, ...).
METRICS = (*METRIC_FNS, "params")


def metrics(static: Any, params, inp, pre, vals, value) -> dict[str, jax.Array]:
    """Only the requested metrics, from the units' values ``vals`` at ``params`` and the
    objective's value J there (both computed once per record, and shared with the divergence
    guard)."""
    state = State(static.fam, params, inp, value, vals, pre)
    out = {}
    for name in static.metrics:
        if name == "params":
            out.update({f"params.{k}": v for k, v in params.items()})
        elif name in METRIC_FNS:
            out[name] = METRIC_FNS[name](state)
        else:
            out[name] = getattr(static.fam, name)(params)
    return out
