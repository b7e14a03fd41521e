r"""The group-loss registry: GRPO and its variants, each written once from three pieces.

A group loss acts on a group of G responses :math:`o_1, \dots, o_G` sampled for one prompt from
:math:`\pi_{old}`, each with a reward :math:`r_i`. TRL's ``GRPOTrainer`` (and every paper it
follows) builds the loss from three separate pieces, and so does this module:

- the **advantage** :math:`A_i` (:data:`ADVANTAGES`): the group mean as baseline, scaled by the
  group's unbiased standard deviation plus 1e-4 (``scale_rewards="group"``), by the batch's
  (``"batch"``) or not at all (``"none"``); or RLOO's leave-one-out baseline;
- the **per-token loss** :math:`\ell(\rho, A)` (a function below, such as :func:`clipped`), in
  the importance ratio :math:`\rho = \pi/\pi_{old}` at the loss's level (one ratio per token, or
  one per sequence for GSPO, LUSPO, RLOO and VESPO); ``beta > 0`` adds TRL's k3 estimate of
  KL(π || π_ref) to every token;
- the **normaliser** :math:`N` (:data:`NORMALISERS`): the per-token losses of the group are
  summed and divided by it: :math:`G|o_i|` (per-sequence mean, then mean over the group),
  :math:`\sum_j |o_j|` (token mean over the group), :math:`G\cdot L_{max}` (a constant) or G.

A registered loss (:data:`GROUP_LOSSES`) is one line that names its three pieces. From that one
definition gradlab derives the **per-token weight** :math:`w_i`: the coefficient that the loss's
negative gradient puts on :math:`\nabla\log\pi` of one token of response i,

.. math:: -\nabla_\theta \mathcal{L} = \sum_i \sum_{t \le |o_i|} w_i\, \nabla_\theta \log\pi(o_{i,t} \mid o_{i,<t}),
          \qquad w_i = -\frac{1}{N_i}\,\frac{\partial \ell}{\partial \log\pi(o_{i,t})},

a closed form in :math:`A_i`, :math:`|o_i|`, :math:`\sum_j|o_j|`, G, ρ and κ = π_ref/π (the
token's reference ratio, for the KL term). ``gradlab show grpo`` prints it; ``gradlab grad grpo
--wrt len_i`` differentiates it (``--view length`` writes :math:`\sum_j|o_j| = |o_i| + \sum_{j \ne
i}|o_j|`, so that the group total grows with the response). For a sequence-level ratio the weight
has the same form: the loss of response i is its sequence loss counted once per token (TRL masks
and sums the broadcast (B, 1) loss), and the derivative of the ratio carries a matching factor.

|o| counts the completion tokens as TRL's completion mask does: the content tokens and the EOS.

Source: TRL 1.16.0 (the wheel on the package index), ``trl/trainer/grpo_trainer.py``
(``GRPOTrainer._compute_loss``, and the advantages in ``_generate_and_score_completions``),
``trl/trainer/grpo_config.py`` (defaults) and ``trl/trainer/rloo_trainer.py``
(``RLOOTrainer._compute_loss`` and its leave-one-out advantages). Where TRL and the paper
differ, both are registered and the docstring says how (``dr_grpo`` and ``dr_grpo_paper``).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any

import sympy
from sympy import Max, Min, Piecewise, Rational, Symbol, exp, log

from gradlab import caches
from gradlab.errors import DomainError, UnknownLossError, UnknownVariableError
from gradlab._loss import Expr, Hyper, Loss
from gradlab.symbols import Domain, SymbolInfo, sigmoid

__all__ = [
    "GroupLoss", "GROUP_LOSSES", "GROUP_ALIASES", "ADVANTAGES", "NORMALISERS", "LEVELS", "TRL_GRPO",
    "SYMBOLS", "HYPERPARAMETERS", "VIEWS", "STD_EPS", "TrlSource", "stop_gradient", "find", "get_group_loss",
    "group_loss_names", "advantages", "weight_function", "view_variables",
]

# --------------------------------------------------------------------------------------------
# Symbols: the group unit's variables, declared once with their assumptions
# --------------------------------------------------------------------------------------------

_REAL, _POSITIVE = Domain(), Domain(low=0.0)
_NONNEGATIVE = Domain(low=0.0, low_open=False)
_ABOVE_ONE = Domain(low=1.0)
_COUNT = Domain(low=1.0, low_open=False)


def _declare(table: dict[str, SymbolInfo], name: str, meaning: str, domain: Domain, **assumptions: bool) -> Symbol:
    sym = Symbol(name, **assumptions)
    table[name] = SymbolInfo(sym, meaning, domain)
    return sym


_symbols: dict[str, SymbolInfo] = {}
A = _declare(_symbols, "A", "A_i: the advantage of response i", _REAL, real=True)
len_i = _declare(_symbols, "len_i", "|o_i|: tokens of response i (content tokens plus the EOS)", _COUNT,
                 positive=True)
len_sum = _declare(_symbols, "len_sum", "sum_j |o_j|: tokens of the whole group (the batch of G responses)",
                   _COUNT, positive=True)
len_others = _declare(_symbols, "len_others", "sum_{j != i} |o_j|: tokens of the other G - 1 responses",
                      _NONNEGATIVE, nonnegative=True)
G = _declare(_symbols, "G", "group size: responses sampled per prompt (TRL's num_generations)", _COUNT,
             positive=True, integer=True)
rho = _declare(_symbols, "rho", "importance ratio pi/pi_old at the loss's level (token; sequence for GSPO, LUSPO, "
               "RLOO, VESPO); 1 at the first on-policy step", _POSITIVE, positive=True)
kappa = _declare(_symbols, "kappa", "pi_ref/pi of the token: the reference ratio of the k3 KL term", _POSITIVE,
                 positive=True)
SYMBOLS: Mapping[str, SymbolInfo] = MappingProxyType(_symbols)

# internal: the token log-probs the per-token loss is written in (differentiated, then replaced by rho, kappa)
_lp, _lp_old, _ref = Symbol("lp_token", real=True), Symbol("lp_old_token", real=True), Symbol("ref_token", real=True)

_hyper: dict[str, SymbolInfo] = {}
_declare(_hyper, "beta", "weight of the k3 KL term (TRL GRPOConfig.beta, default 0: no reference model)",
         _NONNEGATIVE, nonnegative=True)
_declare(_hyper, "epsilon", "lower clipping range: the ratio is clipped below at 1 - epsilon", _POSITIVE,
         positive=True)
_declare(_hyper, "epsilon_high", "upper clipping range (1 + epsilon_high); CISPO's cap on the ratio. TRL: None "
         "means epsilon", _POSITIVE, positive=True)
_declare(_hyper, "delta", "two-sided clipping: the ratio is capped at delta (INTELLECT-2; TRL None = no cap)",
         _ABOVE_ONE, positive=True)
_declare(_hyper, "max_completion_length", "L_max: Dr. GRPO's constant normaliser (TRL max_completion_length)",
         _COUNT, positive=True)
_declare(_hyper, "sapo_temperature_pos", "SAPO's gate temperature for A > 0", _POSITIVE, positive=True)
_declare(_hyper, "sapo_temperature_neg", "SAPO's gate temperature for A <= 0", _POSITIVE, positive=True)
_declare(_hyper, "vespo_k_pos", "VESPO's power exponent k for A >= 0", _NONNEGATIVE, nonnegative=True)
_declare(_hyper, "vespo_lambda_pos", "VESPO's decay lambda for A >= 0", _POSITIVE, positive=True)
_declare(_hyper, "vespo_k_neg", "VESPO's power exponent k for A < 0", _NONNEGATIVE, nonnegative=True)
_declare(_hyper, "vespo_lambda_neg", "VESPO's decay lambda for A < 0", _POSITIVE, positive=True)
HYPERPARAMETERS: Mapping[str, SymbolInfo] = MappingProxyType(_hyper)

# TRL adds 1e-4 to the standard deviation before dividing (grpo_trainer.py, _generate_and_score_completions)
STD_EPS = Rational(1, 10000)

# Views of the per-token weight: substitutions, as the pairwise views (gradlab.symbols.VIEWS)
VIEWS: Mapping[str, Mapping[Symbol, sympy.Expr]] = MappingProxyType({
    "log": MappingProxyType({}),
    # the group total grows with the response: d/d|o_i| at fixed lengths of the other responses
    "length": MappingProxyType({len_sum: len_i + len_others}),
    # the first on-policy step: pi = pi_old = pi_ref
    "first_step": MappingProxyType({rho: sympy.S.One, kappa: sympy.S.One}),
})


def view_variables(view: str) -> tuple[str, ...]:
    """The variables of a view: the weight's variables, less those the view substitutes, plus
    those it brings in (``length``: len_others for len_sum)."""
    subst = VIEWS[view]
    brought = set().union(*(e.free_symbols for e in subst.values())) if subst else set()
    return tuple(n for n, s in SYMBOLS.items()
                 if (s.symbol in brought or (n != "len_others" and s.symbol not in subst)))


class stop_gradient(sympy.Function):  # noqa: N801 - the name torch and JAX give it
    """The value of its argument, with zero derivative: torch's ``.detach()``."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return sympy.S.Zero

    def _latex(self, printer, exp=None):
        body = rf"\operatorname{{sg}}\left({printer._print(self.args[0])}\right)"
        return body if exp is None else f"{body}^{{{exp}}}"


def _h(name: str) -> Symbol:
    return HYPERPARAMETERS[name].symbol


# --------------------------------------------------------------------------------------------
# Per-token losses. ``ratio`` is pi/pi_old at the loss's level, ``lp`` the token's log-prob
# (what the gradient is taken in), ``A`` the advantage. TRL minimises the mean of these.
# --------------------------------------------------------------------------------------------


def clipped(
    ratio: Expr, lp: Expr, A: Expr, *, epsilon: Hyper = Rational(1, 5), epsilon_high: Hyper = Rational(1, 5),
    delta: Hyper = sympy.oo,
) -> Expr:
    r"""PPO's clipped surrogate, with DAPO's decoupled range and INTELLECT-2's two-sided cap.

    .. math:: \ell = -\min\bigl(\min(\rho, \delta)\,A,\
              \operatorname{clip}(\rho, 1-\epsilon, 1+\epsilon_{high})\,A\bigr)

    Reference: DeepSeekMath (Shao et al. 2024, arXiv:2402.03300), Eq. 3; DAPO's clip-higher
    (Yu et al. 2025, arXiv:2503.14476); delta from INTELLECT-2 (arXiv:2505.07291). TRL 1.16.0
    ``grpo_trainer.py``, ``_compute_loss``, ``loss_type`` in grpo, bnpo, dr_grpo, dapo, luspo:
    ``coef_2 = clamp(coef_1, 1 - epsilon, 1 + epsilon_high)``, ``coef_1 = clamp(coef_1, max=delta)``
    when delta is set, ``-min(coef_1 A, coef_2 A)``. Defaults are GRPOConfig's (epsilon 0.2,
    epsilon_high None = epsilon, delta None = no cap).
    """
    return -Min(Min(ratio, delta) * A, Max(1 - epsilon, Min(ratio, 1 + epsilon_high)) * A)


def cispo(ratio: Expr, lp: Expr, A: Expr, *, epsilon_high: Hyper = Rational(1, 5)) -> Expr:
    r"""CISPO: the clipped, detached importance weight times the REINFORCE term.

    .. math:: \ell = -\operatorname{sg}\bigl(\min(\rho, \epsilon_{high})\bigr)\,A\,\log\pi

    Reference: MiniMax-M1 (arXiv:2506.13585), the CISPO objective, which clips the weight to
    [1 - eps_low^IS, 1 + eps_high^IS]; TRL 1.16.0 ``grpo_trainer.py`` (``loss_type="cispo"``)
    clamps only from above, at ``epsilon_high`` itself (ScaleRL's epsilon_max,
    arXiv:2510.13786, recommended 5.0; TRL's default is epsilon_high = epsilon = 0.2, so on the
    first on-policy step, ρ = 1, TRL's default weight is 0.2 A, not A). This is TRL's form.
    """
    return -stop_gradient(Min(ratio, epsilon_high)) * A * lp


def sapo(
    ratio: Expr, lp: Expr, A: Expr, *, sapo_temperature_pos: Hyper = 1, sapo_temperature_neg: Hyper = Rational(21, 20),
) -> Expr:
    r"""SAPO: a smooth, temperature-controlled sigmoid gate in place of the hard clip.

    .. math:: \ell = -\frac{4}{\tau}\,\sigma\bigl(\tau(\rho - 1)\bigr)\,A, \qquad
              \tau = \tau_{pos} \text{ if } A > 0 \text{ else } \tau_{neg}

    Its slope in log ρ is :math:`4\rho\,\sigma(1-\sigma)\,A`, which is A at ρ = 1. Reference:
    Soft Adaptive Policy Optimization (arXiv:2511.20347); TRL 1.16.0 ``grpo_trainer.py``
    (``loss_type="sapo"``: ``sigmoid(t (coef_1 - 1)) * 4 / t``), defaults 1.0 and 1.05.
    """
    tau = Piecewise((sapo_temperature_pos, A > 0), (sapo_temperature_neg, True))
    return -sigmoid(tau * (ratio - 1)) * 4 / tau * A


def vespo(
    ratio: Expr, lp: Expr, A: Expr, *, vespo_k_pos: Hyper = 2, vespo_lambda_pos: Hyper = 3, vespo_k_neg: Hyper = 3,
    vespo_lambda_neg: Hyper = 2,
) -> Expr:
    r"""VESPO: a detached Gamma-shaped weight of the sequence ratio times the REINFORCE term.

    .. math:: \ell = -\operatorname{sg}\bigl(\phi(\rho)\bigr)\,A\,\log\pi, \qquad
              \phi(w) = e^{\lambda}\, w^{k} e^{-\lambda w}

    with (k, λ) the positive pair for A >= 0 and the negative pair otherwise; φ(1) = 1.
    ρ is the *product* of the token ratios of the sequence (TRL sums the clamped log-ratios).
    Reference: VESPO (arXiv:2602.10693); TRL 1.16.0 ``grpo_trainer.py``,
    ``GRPOTrainer.get_gamma_weights`` and ``loss_type="vespo"`` (defaults 2, 3, 3, 2). TRL clamps
    log w to [log 1e-8, 20]; the clamp is left out here.
    """
    k = Piecewise((vespo_k_pos, A >= 0), (vespo_k_neg, True))
    lam = Piecewise((vespo_lambda_pos, A >= 0), (vespo_lambda_neg, True))
    return -stop_gradient(exp(lam + k * log(ratio) - lam * ratio)) * A * lp


def k3(lp: Expr, ref: Expr, *, beta: Hyper = 0) -> Expr:
    r"""TRL's per-token KL(π || π_ref) estimate, Schulman's k3, weighted by beta.

    .. math:: \beta\,\bigl(e^{ref - \log\pi} - (ref - \log\pi) - 1\bigr)

    Its slope in log π is :math:`\beta(1 - \kappa)`, κ = π_ref/π: zero where the policy is the
    reference. Reference: DeepSeekMath (arXiv:2402.03300), Eq. 4; TRL 1.16.0
    ``grpo_trainer.py`` (``per_token_kl``, added to every token when ``beta != 0``; default 0).
    """
    return beta * (exp(ref - lp) - (ref - lp) - 1)


# --------------------------------------------------------------------------------------------
# Normalisers: what the sum over the group's tokens is divided by (for response i's tokens)
# --------------------------------------------------------------------------------------------


def per_sequence(len_i: Expr, len_sum: Expr, G: Expr) -> Expr:
    """Mean over each response's tokens, then over the G responses: ``G |o_i|`` (TRL grpo, sapo)."""
    return G * len_i


def group_tokens(len_i: Expr, len_sum: Expr, G: Expr) -> Expr:
    """Mean over every token of the group: ``sum_j |o_j|`` (TRL bnpo, dapo, cispo, vespo)."""
    return len_sum


def constant(len_i: Expr, len_sum: Expr, G: Expr, *, max_completion_length: Hyper = 512) -> Expr:
    """A constant: ``G L_max`` (TRL dr_grpo: ``B * max_completion_length``; default 512)."""
    return G * max_completion_length


def sequences(len_i: Expr, len_sum: Expr, G: Expr) -> Expr:
    """Sum over each response's tokens, mean over the G responses: ``G`` (TRL luspo, RLOO)."""
    return G


NORMALISERS: Mapping[str, Callable[..., sympy.Expr]] = MappingProxyType(
    {f.__name__: f for f in (per_sequence, group_tokens, constant, sequences)}
)

# where the ratio is taken: the meaning of rho in the weight
LEVELS: Mapping[str, str] = MappingProxyType({
    "token": "one ratio per token, pi(o_t)/pi_old(o_t)",
    "sequence": "one ratio per sequence, the geometric mean of its token ratios (GSPO: exp of the mean log-ratio)",
    "sequence_product": "one ratio per sequence, the product of its token ratios (RLOO, VESPO)",
})

# --------------------------------------------------------------------------------------------
# Advantages (numeric: they read the group's rewards)
# --------------------------------------------------------------------------------------------

ADVANTAGES: Mapping[str, str] = MappingProxyType({
    "group": "A_i = (r_i - mean_j r_j) / (std_j r_j + 1e-4), std unbiased over the group (TRL's default)",
    "batch": "A_i = (r_i - mean_j r_j) / (std + 1e-4), std unbiased over the whole batch (PPO Lite, "
             "arXiv:2508.08221)",
    "none": "A_i = r_i - mean_j r_j (Dr. GRPO)",
    "leave_one_out": "A_i = r_i - mean_{j != i} r_j (RLOO: Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740)",
})


def advantages(rewards: Any, scale_rewards: str, *, batch_std: Any = None) -> Any:
    """The advantages of groups of rewards, ``(..., G)`` -> ``(..., G)`` (numpy or JAX arrays).

    ``scale_rewards``: ``"group"``, ``"batch"``, ``"none"`` (TRL 1.16.0 ``grpo_trainer.py``,
    ``_generate_and_score_completions``: group mean baseline, divided by the unbiased std plus
    1e-4 unless ``"none"``) or ``"leave_one_out"`` (``rloo_trainer.py``: the mean of the other
    G - 1 rewards; ``normalize_advantages=False``, TRL's default). ``"batch"`` divides by
    ``batch_std``, the unbiased std of every reward of the batch (TRL's ``nanstd(rewards)``);
    without it, by the std of the rewards given (all axes).
    """
    import numpy as np

    xp = np if isinstance(rewards, np.ndarray | list | tuple | float | int) else _jnp()
    r = xp.asarray(rewards, dtype=float)
    g = r.shape[-1]
    mean = r.mean(-1, keepdims=True)
    if scale_rewards == "leave_one_out":
        if g < 2:
            raise DomainError("RLOO's leave-one-out baseline needs a group of at least 2 responses")
        return r - (r.sum(-1, keepdims=True) - r) / (g - 1)
    if scale_rewards not in ("group", "batch", "none"):
        raise DomainError(f"unknown scale_rewards {scale_rewards!r}; allowed: {', '.join(ADVANTAGES)}")
    if scale_rewards == "none":
        return r - mean
    if scale_rewards == "group":
        std = xp.sqrt(((r - mean) ** 2).sum(-1, keepdims=True) / max(g - 1, 1)) if g > 1 else xp.zeros_like(mean)
    else:
        std = xp.std(r, ddof=1) if batch_std is None else batch_std
    return (r - mean) / (std + float(STD_EPS))


def _jnp():
    import jax.numpy as jnp

    return jnp


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrlSource:
    """Where TRL computes a group loss: file and function at a released version."""

    path: str
    function: str
    version: str = "1.16.0"

    def __str__(self) -> str:
        return f"huggingface/trl `{self.path}` `{self.function}` ({self.version})"


TRL_GRPO = TrlSource("trl/trainer/grpo_trainer.py", "GRPOTrainer._compute_loss")
TRL_RLOO = TrlSource("trl/trainer/rloo_trainer.py", "RLOOTrainer._compute_loss")


def _keywords(fn: Callable[..., Any]) -> dict[str, sympy.Expr]:
    return {p.name: sympy.sympify(p.default) for p in inspect.signature(fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY}


def _keywords_of(*fns: Callable[..., Any]) -> dict[str, sympy.Expr]:
    out: dict[str, sympy.Expr] = {}
    for fn in fns:
        out |= _keywords(fn)
    return out


@dataclass(frozen=True, eq=False, kw_only=True)
class GroupLoss(Loss):
    """A registered group loss (``kind="group"``): its three pieces and its metadata.

    ``token_loss`` is a per-token loss function above, ``normaliser`` a key of
    :data:`NORMALISERS`, ``level`` a key of :data:`LEVELS`, ``scale_rewards`` the default
    advantage (a key of :data:`ADVANTAGES`), ``kl`` whether beta's k3 term is added per token
    (GRPOTrainer; RLOO puts its KL in the reward instead). ``expr`` is the derived per-token
    weight w_i. ``trl`` is how TRL selects it; ``sources`` where TRL computes it;
    ``paper_variant`` names the registered loss that is the paper's form where TRL's differs
    (``trl_variant``, inherited, the other way round).
    """

    token_loss: Callable[..., sympy.Expr]
    normaliser: str
    level: str = "token"
    scale_rewards: str = "group"
    kl: bool = True
    trl: str = ""
    sources: tuple[TrlSource, ...] = ()
    paper_variant: tuple[str, str] | None = None

    @property
    def needs_reference(self) -> bool:
        return self.kl

    def domain(self, name: str) -> Domain:
        return (HYPERPARAMETERS.get(name) or SYMBOLS[name]).domain

    def hyper_symbols(self) -> dict[str, Symbol]:
        return {k: _h(k) for k in self.defaults}

    @cached_property
    def per_token_loss(self) -> sympy.Expr:
        """The per-token loss in the token's log-probs (internal symbols), hyperparameters symbolic."""
        return _per_token_loss(self.token_loss, self.kl)

    @cached_property
    def loss_in_ratio(self) -> sympy.Expr:
        """The per-token loss written in rho, kappa, A and log pi_old (for printing)."""
        return _in_ratios(self.per_token_loss)

    @cached_property
    def normaliser_expr(self) -> sympy.Expr:
        return _normaliser_expr(self.normaliser)

    def in_view(self, view: str = "log") -> sympy.Expr:
        """The weight in a view of :data:`VIEWS` (``log``: as derived; ``length``: the group
        total written |o_i| + the others'; ``first_step``: rho = kappa = 1)."""
        if view not in VIEWS:
            raise UnknownVariableError(f"unknown view '{view}' for a group loss; the views are: {', '.join(VIEWS)}")
        e = self.expr.xreplace(dict(VIEWS[view]))
        # delta's domain is (1, inf): at rho = 1 the cap is inactive
        inactive = {Min(1, _h("delta")): sympy.S.One, sympy.Heaviside(_h("delta") - 1): sympy.S.One}
        return e.xreplace(inactive) if view == "first_step" else e

    def first_step(self, values: Mapping[str, Any] | None = None) -> sympy.Expr:
        """The weight at the first on-policy step (rho = kappa = 1) with the defaults (or
        ``values``) substituted: the closed form the exact toys use."""
        return _first_step(self, tuple(sorted((values or {}).items())))

    def derivative(self, wrt: str, view: str = "log") -> sympy.Expr:
        """d w_i / d ``wrt`` in ``view`` (``log``, ``length`` or ``first_step``)."""
        expr = self.in_view(view)
        allowed = list(view_variables(view)) + list(self.hyperparameters)
        if wrt not in allowed:
            raise UnknownVariableError(
                f"cannot differentiate the per-token weight of '{self.name}' with respect to '{wrt}' in the {view} "
                f"view; allowed: {', '.join(allowed)}")
        sym = (SYMBOLS.get(wrt) or HYPERPARAMETERS[wrt]).symbol
        return sympy.factor_terms(sympy.diff(expr, sym))

    def values(self, given: Mapping[str, Any] | None = None) -> dict[Symbol, sympy.Expr]:
        """Hyperparameter symbols -> numbers: defaults overridden by ``given`` (checked)."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise UnknownVariableError(f"'{self.name}' has no hyperparameter {', '.join(unknown)}; its "
                                       f"hyperparameters: {', '.join(self.defaults) or 'none'}")
        out = {}
        for k, default in self.defaults.items():
            if k not in given:
                out[_h(k)] = default
                continue
            v = given[k]
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise DomainError(f"{k}={v!r} is not a number") from None
            if not (self.domain(k).contains(x) or (x == float("inf") and k == "delta")):
                raise DomainError(f"{k}={v} is outside its domain {self.domain(k)}")
            out[_h(k)] = sympy.oo if x == float("inf") else sympy.nsimplify(v, rational=True)
        return out


def _per_token_loss(token_loss: Callable[..., sympy.Expr], kl: bool) -> sympy.Expr:
    kw = {k: _h(k) for k in _keywords(token_loss)}
    loss = token_loss(exp(_lp - _lp_old), _lp, A, **kw)
    return loss + k3(_lp, _ref, beta=_h("beta")) if kl else loss


def _normaliser_expr(normaliser: str) -> sympy.Expr:
    fn = NORMALISERS[normaliser]
    return fn(len_i, len_sum, G, **{k: _h(k) for k in _keywords(fn)})


def _weight(token_loss: Callable[..., sympy.Expr], normaliser: str, kl: bool) -> sympy.Expr:
    """w_i = -(1/N) d loss / d log pi, in rho and kappa; the detached factors keep their values."""
    slope = sympy.diff(_per_token_loss(token_loss, kl), _lp)
    w = _in_ratios(-slope / _normaliser_expr(normaliser)).replace(stop_gradient, lambda x: x)
    return sympy.piecewise_fold(w) if w.has(Piecewise) else w


def _in_ratios(e: sympy.Expr) -> sympy.Expr:
    """Token log-probs -> ratios: log pi = log rho + log pi_old, ref = log kappa + log pi."""
    return e.xreplace({_ref: log(kappa) + _lp}).xreplace({_lp: log(rho) + _lp_old})


@caches.memo(maxsize=256)
def _first_step(loss: GroupLoss, items: tuple[tuple[str, Any], ...]) -> sympy.Expr:
    e = loss.in_view("first_step").xreplace(loss.values(dict(items)))
    return sympy.simplify(e)


def weight_function(loss: GroupLoss, values: Mapping[str, Any] | None = None) -> Callable[..., Any]:
    """The first-step weight as a numeric function ``w(A, len_i, len_sum, G)`` of arrays
    (numpy or JAX): lambdified from :meth:`GroupLoss.first_step`, so the toys use the one
    derived closed form."""
    return _weight_function(loss, tuple(sorted((values or {}).items())))


@caches.memo(maxsize=256)
def _weight_function(loss: GroupLoss, items: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    given = loss.values(dict(items))
    hyper = [float(given[_h(k)]) for k in loss.hyperparameters]
    fn = hyper_weight_function(loss)

    def w(a, n, s, g):
        return fn(a, n, s, g, *hyper)

    return w


@caches.memo(maxsize=256)
def hyper_weight_function(loss: GroupLoss) -> Callable[..., Any]:
    """The first-step weight ``w(A, len_i, len_sum, G, *hyperparameters)`` (in the order of
    ``loss.hyperparameters``), hyperparameters as arguments: the form a compiled sweep over
    them takes. JAX arrays in, broadcast to the shape of (A, len_i, len_sum)."""
    import jax.numpy as jnp

    e = sympy.simplify(loss.in_view("first_step"))
    e = e.replace(sympy.Heaviside, lambda x, *rest: Piecewise((1, x > 0), (sympy.S.Half, sympy.Eq(x, 0)), (0, True)))
    args = (A, len_i, len_sum, G, *(_h(k) for k in loss.hyperparameters))
    fn = sympy.lambdify(args, e, modules=[{"sigmoid": lambda x: 1 / (1 + jnp.exp(-x))}, "jax"])

    def w(a, n, s, g, *hyper):
        return jnp.broadcast_to(fn(a, n, s, g, *hyper), jnp.broadcast_shapes(jnp.shape(a), jnp.shape(n), jnp.shape(s)))

    return w


def _of(name: str, token_loss: Callable[..., sympy.Expr], normaliser: str, *, doc: str,
        overrides: Mapping[str, Any] | None = None, kl: bool = True, **meta: Any) -> GroupLoss:
    """One registry line: the pieces, and the metadata; defaults and the weight are derived."""
    pieces = (token_loss, NORMALISERS[normaliser], *((k3,) if kl else ()))
    defaults = _keywords_of(*pieces) | {k: sympy.sympify(v) for k, v in (overrides or {}).items()}
    weight = _weight(token_loss, normaliser, kl)
    meta.setdefault("sources", (TRL_GRPO,))
    return GroupLoss(
        name=name, title=doc.splitlines()[0], doc=inspect.cleandoc(doc),
        variables=tuple(n for n, s in SYMBOLS.items() if s.symbol in weight.free_symbols),
        defaults=MappingProxyType(defaults), custom_expr=weight, kind="group",
        length_normalised=normaliser in ("per_sequence", "group_tokens"),
        token_loss=token_loss, normaliser=normaliser, kl=kl, **meta,
    )


_GRPO_PAPER = "arXiv:2402.03300"
_TABLE: tuple[GroupLoss, ...] = (
    _of("grpo", clipped, "per_sequence", references=(_GRPO_PAPER,), equation="Shao et al. 2024, Eq. 3 (KL: Eq. 4)",
        trl='GRPOConfig(loss_type="grpo")',
        doc="""GRPO: clipped surrogate, mean over each response's tokens, then over the group.

        TRL 1.16.0 ``loss_type="grpo"``: ``((per_token_loss * mask).sum(-1) / mask.sum(-1)).mean()``.
        The paper (DeepSeekMath, Eq. 3) has the same 1/G sum of 1/|o_i| sums; it divides by "std"
        without saying which (TRL: unbiased, plus 1e-4) and uses beta = 0.04 (TRL's default is 0).
        The 1/|o_i| makes the weight A_i/(G|o_i|): short correct and long wrong answers are
        favoured (Dr. GRPO, arXiv:2503.20783)."""),
    _of("bnpo", clipped, "group_tokens", references=(_GRPO_PAPER,), equation="TRL's token mean over the local batch",
        trl='GRPOConfig(loss_type="bnpo")',
        doc="""TRL's bnpo: clipped surrogate, mean over every token of the local batch.

        TRL 1.16.0 ``loss_type="bnpo"``: ``(per_token_loss * mask).sum() / mask.sum()`` over the
        per-device batch. With the batch taken as the group, the normaliser is sum_j |o_j|, as for
        ``dapo`` (which counts the tokens of the global generation batch). Not the Beta-normalisation
        BNPO of arXiv:2506.02864: TRL's name only."""),
    _of("dr_grpo", clipped, "constant", references=("arXiv:2503.20783",),
        equation="Liu et al. 2025 (Dr. GRPO), normaliser only", trl='GRPOConfig(loss_type="dr_grpo")',
        paper_variant=("dr_grpo_paper", "Dr. GRPO also drops the std scaling: TRL's scale_rewards=\"none\""),
        doc="""TRL's dr_grpo: clipped surrogate summed over tokens, divided by G * max_completion_length.

        TRL 1.16.0 ``loss_type="dr_grpo"``: ``(per_token_loss * mask).sum() / (B * max_completion_length)``.
        This changes only the normaliser. Dr. GRPO (Liu et al. 2025, arXiv:2503.20783) also removes
        the std from the advantage; in TRL that is the separate ``scale_rewards="none"``, whose
        default is "group". ``dr_grpo_paper`` is both halves."""),
    _of("dr_grpo_paper", clipped, "constant", scale_rewards="none", references=("arXiv:2503.20783",),
        equation="Liu et al. 2025, the Dr. GRPO objective", trl='GRPOConfig(loss_type="dr_grpo", scale_rewards="none")',
        trl_variant=("dr_grpo", "TRL's loss_type=\"dr_grpo\" keeps the default scale_rewards=\"group\""),
        doc="""Dr. GRPO as the paper writes it: no 1/|o_i| and no std, a constant normaliser.

        Liu et al. 2025 (arXiv:2503.20783): the advantage is r_i - mean_j r_j and the token sum is
        divided by a constant (the paper's code: the generation budget), so the weight is
        A_i/(G L_max), the same for every length. TRL 1.16.0: ``loss_type="dr_grpo"`` with
        ``scale_rewards="none"``."""),
    _of("dapo", clipped, "group_tokens", references=("arXiv:2503.14476",),
        equation="Yu et al. 2025, the DAPO objective (token-level loss)", trl='GRPOConfig(loss_type="dapo")',
        doc="""DAPO: clipped surrogate (clip-higher), mean over every token of the group.

        Yu et al. 2025 (arXiv:2503.14476) divide the group's token sum by sum_i |o_i| and recommend
        epsilon_high = 0.28; TRL 1.16.0 ``loss_type="dapo"`` (TRL's default loss) divides by
        ``num_items_in_batch``, the completion tokens of the global generation batch, and keeps
        epsilon_high = epsilon unless set. DAPO's dynamic sampling (dropping groups whose rewards
        are all equal) and overlong shaping act on the data, not on this loss."""),
    _of("cispo", cispo, "group_tokens", references=("arXiv:2506.13585", "arXiv:2510.13786"),
        equation="MiniMax-M1 (Chen et al. 2025), the CISPO objective; TRL's one-sided cap",
        trl='GRPOConfig(loss_type="cispo")',
        doc="""CISPO: REINFORCE with a clipped, detached importance weight; token mean over the group.

        TRL 1.16.0 ``loss_type="cispo"``: ``-clamp(coef_1, max=epsilon_high).detach() * A * logp``,
        normalised like ``dapo``. The paper clips the weight to [1 - eps_low, 1 + eps_high]; TRL
        caps it at epsilon_high (ScaleRL's epsilon_max, recommended 5.0)."""),
    _of("sapo", sapo, "per_sequence", references=("arXiv:2511.20347",),
        equation="Soft Adaptive Policy Optimization, the SAPO objective", trl='GRPOConfig(loss_type="sapo")',
        doc="""SAPO: a soft sigmoid gate on the ratio; per-sequence mean, then mean over the group.

        TRL 1.16.0 ``loss_type="sapo"`` is normalised as ``grpo``; the gate's slope at ρ = 1 is 1, so
        on the first on-policy step SAPO's weight is grpo's, A_i/(G|o_i|)."""),
    _of("gspo", clipped, "per_sequence", level="sequence", references=("arXiv:2507.18071",),
        equation="Zheng et al. 2025 (GSPO), s_i = (pi/pi_old)^(1/|o_i|)",
        trl='GRPOConfig(loss_type="grpo", importance_sampling_level="sequence")',
        doc="""GSPO: the clipped surrogate on the sequence ratio (geometric mean of the token ratios).

        Zheng et al. 2025 (arXiv:2507.18071); TRL 1.16.0 ``importance_sampling_level="sequence"``
        with ``loss_type="grpo"``: ``exp((log_ratio * mask).sum(-1) / mask.sum(-1))``, one ratio per
        sequence, normalised as ``grpo``. At ρ = 1 its weight equals grpo's; they differ once the
        policy moves away from pi_old (clipping acts on the whole sequence)."""),
    _of("luspo", clipped, "sequences", level="sequence", references=("arXiv:2602.05261",),
        equation="LUSPO: GSPO's sequence loss scaled by the length",
        trl='GRPOConfig(loss_type="luspo", importance_sampling_level="sequence")',
        doc="""LUSPO: GSPO's clipped sequence loss times |o_i|, mean over the group.

        TRL 1.16.0 ``loss_type="luspo"``: ``(per_token_loss * mask).sum(-1).mean()``; with
        ``importance_sampling_level="sequence"`` (required by TRL's warning) the (B, 1) loss summed
        over the mask is |o_i| times the sequence loss. The weight A_i/G does not depend on the
        length."""),
    _of("vespo", vespo, "group_tokens", level="sequence_product", references=("arXiv:2602.10693",),
        equation="VESPO: the Gamma-weighted sequence objective", trl='GRPOConfig(loss_type="vespo")',
        doc="""VESPO: a detached Gamma weight of the sequence ratio times REINFORCE; token mean over the group.

        TRL 1.16.0 ``loss_type="vespo"`` (``importance_sampling_level="token"``, as TRL requires;
        the weight itself is sequence-level), normalised like ``dapo``. φ(1) = 1, so on the first
        on-policy step its weight is dapo's, A_i/sum_j |o_j|."""),
    _of("rloo", clipped, "sequences", level="sequence_product", scale_rewards="leave_one_out", kl=False,
        references=("arXiv:2402.14740",), sources=(TRL_RLOO,),
        equation="Ahmadian et al. 2024, the RLOO estimator (Kool et al. 2019)", trl="RLOOTrainer / RLOOConfig",
        doc="""RLOO: leave-one-out baseline, clipped surrogate on the sequence ratio, mean over the group.

        TRL 1.16.0 ``rloo_trainer.py``: the advantage is r_i minus the mean of the other G - 1
        rewards (``normalize_advantages=False`` by default), the ratio is the product of the token
        ratios (``exp(logps - old_logps)`` of the summed log-probs), and the loss is the mean over
        sequences. RLOOTrainer's ``beta`` (default 0.05) is a penalty beta * sum_t log(pi_old/pi_ref)
        on the reward, not a per-token loss term: zero at the first step from the reference, and
        left out here."""),
)

GROUP_LOSSES: Mapping[str, GroupLoss] = MappingProxyType({loss.name: loss for loss in _TABLE})
GROUP_ALIASES: Mapping[str, str] = MappingProxyType({a: loss.name for loss in _TABLE for a in loss.aliases})


def group_loss_names() -> list[str]:
    return sorted({*GROUP_LOSSES, *GROUP_ALIASES})


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def find(name: str) -> GroupLoss | None:
    """The group loss called ``name`` (any case; ``grpo.dapo`` and ``GRPOTrainer.dapo`` work), or None."""
    key = _normalise(name)
    trainer, dot, rest = key.partition(".")
    if dot and trainer.removesuffix("trainer").removesuffix("config") in ("grpo", "rloo"):
        key = rest if trainer.startswith("grpo") else "rloo"
    key = GROUP_ALIASES.get(key, key)
    return GROUP_LOSSES.get(key)


def get_group_loss(name: str | GroupLoss) -> GroupLoss:
    """The group loss called ``name``; a clear error listing close names otherwise."""
    if isinstance(name, GroupLoss):
        return name
    found = find(name) if isinstance(name, str) else None
    if found is None:
        close = difflib.get_close_matches(_normalise(str(name)), group_loss_names(), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownLossError(f"unknown group loss {name!r}.{hint} The group losses are: "
                               f"{', '.join(GROUP_LOSSES)}")
    return found
