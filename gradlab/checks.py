"""Numeric verification: every closed form, composed through a toy policy, against autodiff.

For a loss and a policy family, at many random points (policy and reference parameters, a pair
of sequences, hyperparameters in their legal ranges) the gradient with respect to the policy's
parameters is computed twice, in float64:

(a) the sympy closed form in the log view (``gradlab.gradient``), lambdified to JAX, composed by
    the chain rule with the policy's Jacobian of the policy-dependent canonical variables
    (``lp_w``, ``lp_l`` and, for LD-DPO, the tails ``tail_w``, ``tail_l``);
(b) ``jax.grad`` of the loss computed directly from the policy.

Central finite differences along a random direction are a third opinion on a subset.
Everything is vectorised: one ``jit(vmap(...))`` per (loss, family), compiled once.

The first post's proper loss gets its own exact checks here: ``pdpo_exact`` enumerates every
pair of sequences, and ``importance_weighted_pdpo`` estimates the same gradient from reference
samples.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gradlab import budgets, symbolic
from gradlab.errors import DomainError
from gradlab.losses import LOSSES, Loss
from gradlab.policies import (
    FAMILIES,
    POLICY_VARIABLES,
    Family,
    all_sequences,
    canonical_variables,
    make_family,
    reference_values,
)
from gradlab.runtime import require_x64

__all__ = [
    "TOLERANCE",
    "CheckRow",
    "hyper_range",
    "hyper_value",
    "check",
    "check_family",
    "run_matrix",
    "pdpo_exact",
    "importance_weighted_pdpo",
    "dpo_step_single_context",
    "PairExpectation",
    "pair_expectation",
]

TOLERANCE = 1e-9  # relative error allowed between closed form and autodiff
FD_TOLERANCE = 1e-5  # central differences in float64 are accurate to about 1e-8 .. 1e-6

POLICY_VARS = POLICY_VARIABLES  # the canonical variables the policy's parameters move

# The check programs are large and run once: XLA's backend optimisations cost far more compile
# time than they save in run time here (measured: see the note on issue 4).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclass(frozen=True)
class CheckRow:
    loss: str
    family: str
    points: int
    max_rel_error: float
    fd_points: int
    fd_max_rel_error: float
    seconds: float

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= TOLERANCE and self.fd_max_rel_error <= FD_TOLERANCE

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def hyper_range(loss: Loss, name: str) -> tuple[float, float]:
    """A range of legal values of a hyperparameter to sample checks from, inside its domain.

    Around the default where there is one; a custom loss's hyperparameter without a default is
    sampled from its declared domain (bounded sides as they are, an unbounded side one unit
    past the other bound, or around 0 where both are unbounded).
    """
    d, default = loss.domain(name), loss.defaults.get(name)
    if default is None:
        lo = d.low if math.isfinite(d.low) else (d.high - 2.0 if math.isfinite(d.high) else -1.0)
        hi = d.high if math.isfinite(d.high) else lo + 2.0
    else:
        x = float(default)
        lo = d.low if math.isfinite(d.low) else x - 1.0
        hi = d.high if math.isfinite(d.high) else max(2.0 * x, lo + 1.0)
    pad = 0.05 * (hi - lo)
    return (lo + pad if d.low_open else lo), (hi - pad if d.high_open else hi)


def hyper_value(loss: Loss, name: str) -> float:
    """The default of a hyperparameter, or, for a custom loss's hyperparameter without one, the
    middle of ``hyper_range``: a legal value to start a slider or a check from."""
    default = loss.defaults.get(name)
    if default is not None:
        return float(default)
    lo, hi = hyper_range(loss, name)
    return 0.5 * (lo + hi)


def _jax_fn(loss: Loss, expr, args: Sequence[str]) -> Callable:
    return symbolic.numeric(expr, args, backend="jax")


def _canonical_values(fam: Family, params, ref_params, seq_w, len_w, seq_l, len_l) -> dict:
    ref = reference_values(fam, ref_params, seq_w, len_w, seq_l, len_l)
    return canonical_variables(fam, params, ref, seq_w, len_w, seq_l, len_l)


def _compiled_checker(losses: Sequence[Loss], fam: Family, example_params) -> tuple[Callable, int]:
    """One ``jit(vmap(...))`` for every loss on one family (compiled once; the policy's values
    and Jacobian are shared by the losses inside one XLA program).

    For each point and loss it returns the relative error between (a) the closed form composed
    with the policy's Jacobian and (b) ``jax.grad`` of the loss computed from the policy, and
    the relative error of central finite differences along ``direction``.
    """
    flat0, unravel = ravel_pytree(example_params)
    compiled = []
    for loss in losses:
        variables, hyper = list(loss.variables), list(loss.hyperparameters)
        args = variables + hyper
        grads = symbolic.gradient(loss, "log")
        policy_vars = [v for v in POLICY_VARS if v in variables]
        compiled.append((
            variables,
            _jax_fn(loss, loss.expr, args),
            policy_vars,
            [_jax_fn(loss, grads[v], args) for v in policy_vars],
        ))

    def values_at(flat, ref_flat, pair):
        return _canonical_values(fam, unravel(flat), unravel(ref_flat), *pair)

    def one(flat, ref_flat, pair, hvals_per_loss, direction):
        def losses_at(f):
            v = values_at(f, ref_flat, pair)
            return jnp.stack([
                loss_fn(*[v[n] for n in variables], *hvals)
                for (variables, loss_fn, _, _), hvals in zip(compiled, hvals_per_loss, strict=True)
            ])

        def policy_vector(f):
            v = values_at(f, ref_flat, pair)
            return jnp.stack([v[n] for n in POLICY_VARS]), v

        # (b): autodiff of every loss straight through the policy, one batched reverse pass
        autodiff, loss_values = jax.jacrev(lambda f: (losses_at(f), losses_at(f)), has_aux=True)(flat)
        # (a): closed-form partials chained with the policy's Jacobian of lp_w, lp_l, tails
        jac, vals = jax.jacrev(policy_vector, has_aux=True)(flat)
        closed, terms = [], []
        for (variables, _, policy_vars, partial_fns), hvals in zip(compiled, hvals_per_loss, strict=True):
            argv = [vals[n] for n in variables] + list(hvals)
            if policy_vars:
                coeffs = jnp.stack([f(*argv) for f in partial_fns])
                jacs = jac[jnp.asarray([POLICY_VARS.index(v) for v in policy_vars])]
                closed.append(coeffs @ jacs)
                terms.append(jnp.abs(coeffs) @ jnp.linalg.norm(jacs, axis=-1))
            else:
                closed.append(jnp.zeros_like(flat))
                terms.append(jnp.zeros(()))
        closed, terms = jnp.stack(closed), jnp.stack(terms)
        # Relative to the largest chain-rule term, not to the sum: when y_w = y_l the terms
        # cancel and the true gradient is zero, where a plain relative error is undefined.
        scale = jnp.maximum(terms, jnp.linalg.norm(autodiff, axis=-1))
        err = jnp.linalg.norm(closed - autodiff, axis=-1)
        rel = jnp.where(err == 0, 0.0, err / jnp.maximum(scale, 1e-300))
        # third opinion: central differences of the losses computed from the policy
        eps = 1e-6
        fd = (losses_at(flat + eps * direction) - losses_at(flat - eps * direction)) / (2 * eps)
        # floor: a generous bound on the rounding error of the difference quotient itself
        rounding = 1e3 * jnp.finfo(jnp.float64).eps * (jnp.abs(loss_values) + 1.0) / eps
        fd_rel = jnp.abs(fd - closed @ direction) / (scale + rounding)
        return rel, fd_rel

    return jax.jit(jax.vmap(one), compiler_options=_FAST_COMPILE), flat0.shape[0]


def _family(name: str | Family, vocab: int, max_len: int) -> Family:
    return name if isinstance(name, Family) else make_family(name, vocab=vocab, max_len=max_len)


def check_family(
    losses: Sequence[str | Loss],
    family: str | Family = "unigram",
    *,
    points: int = 1000,
    fd_points: int = 32,
    seed: int = 0,
    vocab: int = 4,
    max_len: int = 5,
) -> list[CheckRow]:
    """Check several losses on one family at ``points`` random points each: random policy and
    reference parameters, a random pair of finished sequences, and hyperparameters drawn from
    their legal ranges (``hyper_range``)."""
    require_x64()
    losses = [symbolic.as_loss(loss) for loss in losses]
    fam = _family(family, vocab, max_len)
    if not fam.forced_stop:
        raise DomainError("the checks draw their pairs from the enumerated responses: give the family a forced stop")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    fn, dim = _compiled_checker(losses, fam, fam.init(jax.random.PRNGKey(seed)))
    flat = rng.normal(size=(points, dim))
    ref_flat = rng.normal(size=(points, dim))
    seqs, lengths = all_sequences(fam.vocab, fam.max_len)
    iw, il = rng.integers(0, len(seqs), points), rng.integers(0, len(seqs), points)
    pair = (seqs[iw], lengths[iw], seqs[il], lengths[il])
    hvals = [tuple(rng.uniform(*hyper_range(loss, h), points) for h in loss.hyperparameters) for loss in losses]
    direction = rng.normal(size=(points, dim))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    rel, fd_rel = (np.asarray(x) for x in fn(flat, ref_flat, pair, hvals, direction))
    seconds = (time.perf_counter() - start) / len(losses)
    n_fd = min(fd_points, points)
    return [
        CheckRow(
            loss=loss.name,
            family=fam.name,
            points=points,
            max_rel_error=float(rel[:, i].max()),
            fd_points=n_fd,
            fd_max_rel_error=float(fd_rel[:n_fd, i].max()),
            seconds=seconds,
        )
        for i, loss in enumerate(losses)
    ]


def check(loss: str | Loss, family: str | Family = "unigram", **kwargs) -> CheckRow:
    """Check one loss on one family; see ``check_family``."""
    return check_family([loss], family, **kwargs)[0]


def run_matrix(
    losses: Iterable[str] | None = None,
    families: Iterable[str] | None = None,
    *,
    points: int = 1000,
    progress: Callable[[int, int, str], None] | None = None,
    **kwargs,
) -> list[CheckRow]:
    """``check_family`` for every family, over every loss; ``progress(done, total, label)``
    after each family. Each row's ``seconds`` is its share of the family's wall time."""
    points = budgets.check_count("points", points)
    loss_objs = [symbolic.as_loss(name) for name in (losses or LOSSES)]
    families = list(families) if families else list(FAMILIES)
    for f in families:
        make_family(f)  # validates every name before any work
    rows: list[CheckRow] = []
    for i, fam in enumerate(families, 1):
        rows += check_family(loss_objs, fam, points=points, **kwargs)
        if progress:
            progress(i, len(families), fam)
    return rows


# --------------------------------------------------------------------------------------------
# Expectations over pairs drawn from the policy: the proper loss and on-policy DPO
# --------------------------------------------------------------------------------------------


def _oracle_rewards(reward: jax.Array, seqs, lengths):
    """The oracle's reward of each response: the sum of per-token rewards over its tokens
    (traceable: ``reward`` may be a JAX array; ``policies.sequence_sums`` is the numpy twin)."""
    seqs, lengths = jnp.asarray(seqs), jnp.asarray(lengths)
    return (jnp.asarray(reward)[seqs] * (jnp.arange(seqs.shape[-1]) < lengths[:, None])).sum(-1)


def _order(r, a, b):
    """(winner, loser) index arrays: the oracle prefers the higher reward, ties go to the lower
    index (a fixed total order, so every ordered pair has exactly one labelling)."""
    a_wins = (r[a] > r[b]) | ((r[a] == r[b]) & (a <= b))
    return jnp.where(a_wins, a, b), jnp.where(a_wins, b, a)


def _precedes(seq_a, len_a, seq_b, len_b):
    """a <= b in the order of ``all_sequences`` rows: shorter first, then lexicographically
    (EOS = 0 sorts first, so at equal length a finished response precedes a stopped one). The
    tie-break of ``_order`` for responses that are not enumerated."""
    differ = seq_a != seq_b
    first = jnp.argmax(differ, axis=-1)
    lex = jnp.take_along_axis(seq_a, first[:, None], -1)[:, 0] <= jnp.take_along_axis(seq_b, first[:, None], -1)[:, 0]
    return (len_a < len_b) | ((len_a == len_b) & (~differ.any(-1) | lex))


def _pair_terms(fam: Family, reward: jax.Array):
    """Every ordered pair of responses of the forced-stop distribution, labelled by the oracle."""
    seqs, lengths = (jnp.asarray(x) for x in all_sequences(fam.vocab, fam.max_len))
    r = _oracle_rewards(reward, seqs, lengths)
    n = len(seqs)
    a, b = (jnp.asarray(x.ravel()) for x in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    w, l = _order(r, a, b)
    return seqs, lengths, w, l


@functools.partial(jax.jit, static_argnums=0)
def pdpo_exact(fam: Family, params, ref_params, reward: jax.Array, beta: float = 0.1):
    """J_PDPO and its gradient, exactly, by enumerating every pair of responses (forced stop:
    stopped responses included, so the pairs' probabilities sum to 1).

    Returns ``(J, grad_autodiff, grad_product_rule)``: ``grad_autodiff`` is ``jax.grad`` of the
    exact expectation; ``grad_product_rule`` is the closed form of ``pdpo``'s per-pair
    integrand (which carries the score-function term L (grad log p(y) + grad log p(y'))),
    composed through the policy and summed over pairs. They must agree.
    """
    fam._need_forced_stop("the exact proper loss")
    loss = LOSSES["pdpo"]
    seqs, lengths, w, l = _pair_terms(fam, reward)
    args = list(loss.variables) + list(loss.hyperparameters)
    integrand = _jax_fn(loss, loss.expr, args)
    grads = symbolic.gradient(loss, "log")
    d_w, d_l = _jax_fn(loss, grads["lp_w"], args), _jax_fn(loss, grads["lp_l"], args)
    ref_lp = fam.logprob(ref_params, seqs, lengths)

    def objective(p):
        lp = fam.logprob(p, seqs, lengths)
        return integrand(lp[w], lp[l], ref_lp[w], ref_lp[l], beta).sum()

    lp = fam.logprob(params, seqs, lengths)
    jac = jax.jacrev(lambda p: fam.logprob(p, seqs, lengths))(params)
    cw = d_w(lp[w], lp[l], ref_lp[w], ref_lp[l], beta)
    cl = d_l(lp[w], lp[l], ref_lp[w], ref_lp[l], beta)
    per_seq = jnp.zeros_like(lp).at[w].add(cw).at[l].add(cl)
    product_rule = jax.tree_util.tree_map(lambda J: jnp.tensordot(per_seq, J, axes=1), jac)
    return objective(params), jax.grad(objective)(params), product_rule


@functools.partial(jax.jit, static_argnums=(0, 5))
def importance_weighted_pdpo(
    fam: Family, params, ref_params, reward: jax.Array, key: jax.Array, n: int, beta: float = 0.1
):
    """Estimate grad J_PDPO from ``n`` pairs drawn from the *reference* (every response of the
    forced-stop distribution, nothing renormalised), each term weighted by
    pi(y)pi(y')/(pi_0(y)pi_0(y')) as posts.md describes: ``w [grad L + L (grad log pi(y) + grad log pi(y'))]``.

    Returns ``(mean, terms)``: the estimate (flattened like ``ravel_pytree(params)``) and the
    ``n`` individual weighted terms, whose spread gives the estimator's variance.
    """
    loss = LOSSES["dpo"]
    args = list(loss.variables) + list(loss.hyperparameters)
    dpo_fn = _jax_fn(loss, loss.expr, args)
    e = fam._enumerate(ref_params)
    q = e.logp  # the reference's probabilities of every response sum to 1
    k1, k2 = jax.random.split(key)
    a = jax.random.choice(k1, len(q), (n,), p=jnp.exp(q))
    b = jax.random.choice(k2, len(q), (n,), p=jnp.exp(q))
    w, l = _order(_oracle_rewards(reward, e.seqs, e.lengths), a, b)
    flat, unravel = ravel_pytree(params)

    def logps(f, i, j):
        idx = jnp.stack([i, j])
        return fam.logprob(unravel(f), e.seqs[idx], e.lengths[idx])

    def pair_loss(f, i, j):
        lp = logps(f, i, j)
        return dpo_fn(lp[0], lp[1], e.logp[i], e.logp[j], beta), lp

    def term(i, j):
        (value, lp), grad = jax.value_and_grad(pair_loss, has_aux=True)(flat, i, j)
        score = jax.grad(lambda f: logps(f, i, j).sum())(flat)
        weight = jnp.exp(lp.sum() - q[i] - q[j])
        return weight * (grad + value * score)

    terms = jax.vmap(term)(w, l)
    return terms.mean(0), terms


@dataclass(frozen=True)
class PairExpectation:
    """E_{y, y' ~ pi}[l] over pairs drawn from the policy (labelled by the oracle) and its
    gradient, with how they were computed.

    ``method`` is ``"exact"`` (every pair of the forced-stop distribution enumerated; ``mass``,
    the pairs' total probability, is 1 up to rounding and the standard errors are 0),
    ``"score_function"`` (pairs sampled from pi) or ``"importance_weights"`` (pairs sampled
    from pi_0, weighted by pi(y)pi(y')/(pi_0(y)pi_0(y'))); the estimates are unbiased and carry
    their standard errors. ``grad`` is flattened like ``ravel_pytree(params)``.
    """

    value: float
    grad: np.ndarray
    value_se: float
    grad_se: np.ndarray
    method: str
    pairs: int
    mass: float
    score_term: bool

    def as_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}


METHODS = ("auto", "exact", "score_function", "importance_weights")


def pair_expectation(
    fam: Family,
    params,
    ref_params,
    token_reward,
    *,
    loss: str | Loss = "dpo",
    values: dict | None = None,
    score_term: bool = True,
    method: str = "auto",
    key: jax.Array | None = None,
    n: int = 4096,
    max_pairs: int = 250_000,
) -> PairExpectation:
    """J = E_{y, y' ~ pi_theta}[l(y_w, y_l)] and its gradient in theta.

    ``l`` is a registered pair loss (default ``dpo``: then J is the first post's proper loss
    J_PDPO); each pair is labelled by the oracle, the sum of ``token_reward`` over the tokens
    (ties: the shorter, then lexicographically smaller, is chosen). With ``score_term`` the
    gradient is the full one, E[grad l + l (grad log pi(y) + grad log pi(y'))] (the product
    rule of posts.md); without, it is on-policy DPO's, E[grad l] with the pairs' probabilities
    held fixed.

    ``method="auto"`` is exact when the family has a forced stop and at most ``max_pairs``
    ordered pairs; otherwise a score-function estimate from ``n`` pairs sampled from pi (with
    ``key``), with a leave-one-out baseline as control variate: each term is
    ``grad l_i + (l_i - b_i) s_i``, b_i the mean of the other pairs' losses (independent of pair
    i, so unbiased since E[s] = 0). ``"importance_weights"`` samples from the reference instead.
    Unbounded policies are never truncated: ``Family.sample`` draws whole responses.
    """
    require_x64()
    loss = symbolic.as_loss(loss)
    if loss.kind != "pair":
        raise DomainError(f"'{loss.name}' is not a per-pair loss; the expectation takes a pair loss such as dpo")
    if method not in METHODS:
        raise DomainError(f"unknown method '{method}'; the methods are: {', '.join(METHODS)}")
    hyper = [float(v) for v in symbolic.parameter_values(loss, values or {}).values()]
    variables = list(loss.variables)
    fn = _jax_fn(loss, loss.expr, variables + list(loss.hyperparameters))
    reward = jnp.asarray(token_reward, dtype=jnp.float64)
    n_resp = (sum((fam.vocab - 1) ** k for k in range(fam.max_len)) + (fam.vocab - 1) ** fam.max_len
              if fam.forced_stop else math.inf)
    exact_ok = fam.forced_stop and n_resp**2 <= max_pairs
    if method == "auto":
        method = "exact" if exact_ok else "score_function"
    if method == "exact":
        if not exact_ok:
            raise DomainError(f"exact enumeration needs a forced stop and at most {max_pairs} ordered pairs "
                              f"(this policy has {n_resp}**2); use method='score_function'")
        return _exact_expectation(fam, params, ref_params, reward, fn, variables, tuple(hyper), score_term)
    if n < 2:
        raise DomainError(f"an estimate needs at least 2 pairs (its standard error), not n={n}")
    key = jax.random.PRNGKey(0) if key is None else key
    source = params if method == "score_function" else ref_params
    seqs, lengths = fam.sample(source, key, 2 * n)
    return _sampled_expectation(fam, params, ref_params, reward, fn, variables, tuple(hyper), score_term,
                                seqs, lengths, method)


def _loss_of_pairs(fam, fn, variables, hyper, params, ref_params, seqs_w, len_w, seqs_l, len_l):
    v = _canonical_values(fam, params, ref_params, seqs_w, len_w, seqs_l, len_l)
    return fn(*[v[k] for k in variables], *hyper), v["lp_w"] + v["lp_l"]


def _exact_expectation(fam, params, ref_params, reward, fn, variables, hyper, score_term) -> PairExpectation:
    seqs, lengths, w, l = _pair_terms(fam, reward)
    flat, unravel = ravel_pytree(params)

    def objective(f):
        ell, lp = _loss_of_pairs(fam, fn, variables, hyper, unravel(f), ref_params,
                                 seqs[w], lengths[w], seqs[l], lengths[l])
        weight = jnp.exp(lp) if score_term else jax.lax.stop_gradient(jnp.exp(lp))
        return (weight * ell).sum(), jnp.exp(lp).sum()

    (value, mass), grad = jax.jit(jax.value_and_grad(objective, has_aux=True))(flat)
    return PairExpectation(float(value), np.asarray(grad), 0.0, np.zeros_like(np.asarray(grad)), "exact",
                           int(len(w)), float(mass), score_term)


def _sampled_expectation(fam, params, ref_params, reward, fn, variables, hyper, score_term, seqs, lengths,
                         method) -> PairExpectation:
    n = seqs.shape[0] // 2
    a_s, a_l, b_s, b_l = seqs[:n], lengths[:n], seqs[n:], lengths[n:]
    r_a, r_b = _oracle_rewards(reward, a_s, a_l), _oracle_rewards(reward, b_s, b_l)
    a_wins = ((r_a > r_b) | ((r_a == r_b) & _precedes(a_s, a_l, b_s, b_l)))[:, None]
    sw, lw = jnp.where(a_wins, a_s, b_s), jnp.where(a_wins[:, 0], a_l, b_l)
    sl, ll = jnp.where(a_wins, b_s, a_s), jnp.where(a_wins[:, 0], b_l, a_l)
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def values_and_jacobians(f, ref_params, sw, lw, sl, ll):  # arrays as arguments: no constant folding
        def per_pair(f):
            return _loss_of_pairs(fam, fn, variables, hyper, unravel(f), ref_params, sw, lw, sl, ll)

        return per_pair(f), jax.jacrev(per_pair)(f)

    (ell, lp), (d_ell, score) = values_and_jacobians(flat, ref_params, sw, lw, sl, ll)
    if method == "importance_weights":
        ref_lp = fam.logprob(ref_params, sw, lw) + fam.logprob(ref_params, sl, ll)
        weight = jnp.exp(lp - ref_lp)
    else:
        weight = jnp.ones_like(ell)
    baseline = (ell.sum() - ell) / (n - 1)  # leave-one-out: independent of pair i
    terms = d_ell + ((ell - baseline)[:, None] * score if score_term else 0.0)
    terms = weight[:, None] * terms
    values = weight * ell
    sqrt_n = math.sqrt(n)
    return PairExpectation(float(values.mean()), np.asarray(terms.mean(0)), float(values.std(ddof=1) / sqrt_n),
                           np.asarray(terms.std(0, ddof=1) / sqrt_n), method, n, float("nan"), score_term)


def dpo_step_single_context(theta: jax.Array, chosen: int, rejected: int, beta: float = 0.1,
                            lr: float = 1.0, ref_theta: jax.Array | None = None) -> jax.Array:
    """One gradient-descent step of DPO on a single-context softmax over atomic responses,
    using the closed form of ``dpo``'s log-view partials composed with d log_softmax/d theta."""
    loss = LOSSES["dpo"]
    args = list(loss.variables) + list(loss.hyperparameters)
    grads = symbolic.gradient(loss, "log")
    ref_theta = theta if ref_theta is None else ref_theta
    lp, ref = jax.nn.log_softmax(theta), jax.nn.log_softmax(ref_theta)
    argv = (lp[chosen], lp[rejected], ref[chosen], ref[rejected], beta)
    cw = _jax_fn(loss, grads["lp_w"], args)(*argv)
    cl = _jax_fn(loss, grads["lp_l"], args)(*argv)
    p = jnp.exp(lp)
    eye = jnp.eye(theta.shape[0])
    grad = cw * (eye[chosen] - p) + cl * (eye[rejected] - p)
    return theta - lr * grad
