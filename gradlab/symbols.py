"""The canonical sympy symbols, the stable special functions, and the coordinate maps (views).

Every symbol gradlab uses is declared here, once, with its sympy assumptions and its numeric
domain. Everything else imports these objects; nothing re-declares a symbol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from collections.abc import Mapping

import sympy
from sympy import S, Symbol, exp, log

from gradlab._declared import EXTRA_NAMES, Domain

__all__ = [
    "Domain",
    "SymbolInfo",
    "SYMBOLS",
    "HYPERPARAMETERS",
    "View",
    "VIEWS",
    "NEUTRAL_REFERENCE",
    "sigmoid",
    "softplus",
    "log1mexp",
    "SPECIAL_FUNCTIONS",
    "to_special",
    "symbol",
]


# --------------------------------------------------------------------------------------------
# Stable special functions. Losses are written with these so that derivatives come out in the
# readable sigma/softplus form, and so that numeric code uses the overflow-free implementations.
# Each rewrites to standard sympy functions (``expr.rewrite(sympy.exp)``) for portable output.
# --------------------------------------------------------------------------------------------


class sigmoid(sympy.Function):  # noqa: N801 - mathematical function name
    r"""The logistic function :math:`\sigma(x) = 1 / (1 + e^{-x})`."""

    nargs = 1

    @classmethod
    def eval(cls, x):  # type: ignore[override]
        if x.is_zero:
            return S.Half
        if x is S.Infinity:
            return S.One
        if x is S.NegativeInfinity:
            return S.Zero
        return None

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        x = self.args[0]
        # sigma'(x) = sigma(x) sigma(-x): keeps the derivative in sigma form
        return sigmoid(x) * sigmoid(-x)

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + exp(-x))

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return self.args[0].is_extended_real

    def _latex(self, printer, exp=None):
        body = rf"\sigma\left({printer._print(self.args[0])}\right)"
        return body if exp is None else f"{body}^{{{exp}}}"


class softplus(sympy.Function):  # noqa: N801 - mathematical function name
    r"""The softplus function :math:`\operatorname{softplus}(x) = \log(1 + e^{x}) = -\log\sigma(-x)`."""

    nargs = 1

    @classmethod
    def eval(cls, x):  # type: ignore[override]
        if x.is_zero:
            return log(2)
        if x is S.Infinity:
            return S.Infinity
        if x is S.NegativeInfinity:
            return S.Zero
        return None

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return log(1 + exp(x))

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return self.args[0].is_extended_real

    def _latex(self, printer, exp=None):
        body = rf"\operatorname{{softplus}}\left({printer._print(self.args[0])}\right)"
        return body if exp is None else f"{body}^{{{exp}}}"


class log1mexp(sympy.Function):  # noqa: N801 - mathematical function name
    r""":math:`\log(1 - e^{x})` for :math:`x < 0`, the log-odds denominator of ORPO."""

    nargs = 1

    @classmethod
    def eval(cls, x):  # type: ignore[override]
        if x is S.NegativeInfinity:
            return S.Zero
        return None

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        x = self.args[0]
        # -e^x / (1 - e^x), written through log1mexp itself: exp(-x) - 1 would cancel near 0
        return -exp(x - log1mexp(x))

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return log(1 - exp(x))

    def _eval_is_real(self):
        return True if self.args[0].is_negative else None

    def _latex(self, printer, exp=None):
        body = rf"\log\left(1 - e^{{{printer._print(self.args[0])}}}\right)"
        return body if exp is None else rf"\left({body}\right)^{{{exp}}}"


SPECIAL_FUNCTIONS: Mapping[str, type[sympy.Function]] = MappingProxyType(
    {"sigmoid": sigmoid, "softplus": softplus, "log1mexp": log1mexp}
)


def _special_form(e: sympy.Expr) -> sympy.Expr | None:
    """The sigmoid/softplus/log1mexp form of one node, or None if it has none."""
    if isinstance(e, log) and e.args[0].is_Add and len(e.args[0].args) == 2:
        one, other = sorted(e.args[0].args, key=lambda a: not a.is_Number)
        if one == 1 and isinstance(other, exp):
            return softplus(other.args[0])  # log(1 + e^x)
        if one == 1 and other.is_Mul and other.args[0] == -1 and isinstance(other.args[1], exp):
            if len(other.args) == 2:
                return log1mexp(other.args[1].args[0])  # log(1 - e^x)
    if e.is_Pow and e.exp == -1 and e.base.is_Add and len(e.base.args) == 2:
        one, other = sorted(e.base.args, key=lambda a: not a.is_Number)
        if one == 1 and isinstance(other, exp):
            return sigmoid(-other.args[0])  # 1/(1 + e^x)
    if e.is_Mul:
        factors = list(e.args)
        for i, f in enumerate(factors):
            if isinstance(f, exp):
                for j, g in enumerate(factors):
                    if isinstance(g, sigmoid) and g.args[0] == -f.args[0]:
                        rest = [x for k, x in enumerate(factors) if k not in (i, j)]
                        return sympy.Mul(sigmoid(f.args[0]), *rest)  # e^x sigma(-x)
    return None


def to_special(e: sympy.Expr) -> sympy.Expr:
    """Rewrite log(1+e^x), log(1-e^x), 1/(1+e^x) and e^x sigma(-x) into the stable special
    functions, bottom-up. Exact: the result is the same function."""
    if not e.args:
        return e
    args = tuple(to_special(a) for a in e.args)
    if args != e.args:
        e = e.func(*args)
    found = _special_form(e)
    return e if found is None else to_special(found)



# --------------------------------------------------------------------------------------------
# Domains and symbols
# --------------------------------------------------------------------------------------------


REAL = Domain()
POSITIVE = Domain(low=0.0)
NONPOSITIVE = Domain(high=0.0, high_open=False)
NONNEGATIVE = Domain(low=0.0, low_open=False)
PROBABILITY = Domain(low=0.0, high=1.0, high_open=False)
HALF_OPEN_UNIT = Domain(low=0.0, high=0.5, low_open=False)  # smoothing: [0, 1/2)
UNIT = Domain(low=0.0, high=1.0, low_open=False, high_open=False)


@dataclass(frozen=True)
class SymbolInfo:
    """A declared symbol: the sympy object, what it means and the values it may take."""

    symbol: Symbol
    meaning: str
    domain: Domain

    @property
    def name(self) -> str:
        return self.symbol.name


_ASSUMPTIONS = {
    id(REAL): {"real": True},
    id(POSITIVE): {"positive": True},
    id(NONPOSITIVE): {"nonpositive": True},
    id(NONNEGATIVE): {"nonnegative": True},
    id(PROBABILITY): {"positive": True},
    id(HALF_OPEN_UNIT): {"nonnegative": True},
    id(UNIT): {"nonnegative": True},
}


def _declare(table: dict[str, SymbolInfo], name: str, meaning: str, domain: Domain) -> Symbol:
    sym = Symbol(name, **_ASSUMPTIONS[id(domain)])
    table[name] = SymbolInfo(sym, meaning, domain)
    return sym


_symbols: dict[str, SymbolInfo] = {}

# Canonical variables (docs/architecture.md, "Vocabulary and views").
lp_w = _declare(
    _symbols, "lp_w", "log pi(y_w|x): policy log-prob of the chosen response, summed over tokens", NONPOSITIVE
)
lp_l = _declare(
    _symbols, "lp_l", "log pi(y_l|x): policy log-prob of the rejected response, summed over tokens", NONPOSITIVE
)
ref_w = _declare(_symbols, "ref_w", "log pi_0(y_w|x): reference log-prob of the chosen response", NONPOSITIVE)
ref_l = _declare(_symbols, "ref_l", "log pi_0(y_l|x): reference log-prob of the rejected response", NONPOSITIVE)
len_w = _declare(_symbols, "len_w", "|y_w|: length of the chosen response in tokens", POSITIVE)
len_l = _declare(_symbols, "len_l", "|y_l|: length of the rejected response in tokens", POSITIVE)
# LD-DPO's extra variables: the log-prob of the part of the longer response past the shorter one.
tail_w = _declare(
    _symbols, "tail_w", "policy log-prob of the tokens of y_w past the length of the shorter response", NONPOSITIVE
)
tail_l = _declare(
    _symbols, "tail_l", "policy log-prob of the tokens of y_l past the length of the shorter response", NONPOSITIVE
)
ref_tail_w = _declare(
    _symbols, "ref_tail_w", "reference log-prob of the tokens of y_w past the length of the shorter response",
    NONPOSITIVE,
)
ref_tail_l = _declare(
    _symbols, "ref_tail_l", "reference log-prob of the tokens of y_l past the length of the shorter response",
    NONPOSITIVE,
)

# Probability view.
p_w = _declare(_symbols, "p_w", "pi(y_w|x): policy probability of the chosen response", PROBABILITY)
p_l = _declare(_symbols, "p_l", "pi(y_l|x): policy probability of the rejected response", PROBABILITY)
q_w = _declare(_symbols, "q_w", "pi_0(y_w|x): reference probability of the chosen response", PROBABILITY)
q_l = _declare(_symbols, "q_l", "pi_0(y_l|x): reference probability of the rejected response", PROBABILITY)

# Length view: per-token mean log-probs.
m_w = _declare(_symbols, "m_w", "per-token mean policy log-prob of y_w (lp_w = len_w * m_w)", NONPOSITIVE)
m_l = _declare(_symbols, "m_l", "per-token mean policy log-prob of y_l (lp_l = len_l * m_l)", NONPOSITIVE)
n_w = _declare(_symbols, "n_w", "per-token mean reference log-prob of y_w (ref_w = len_w * n_w)", NONPOSITIVE)
n_l = _declare(_symbols, "n_l", "per-token mean reference log-prob of y_l (ref_l = len_l * n_l)", NONPOSITIVE)

# Margin view.
h = _declare(_symbols, "h", "implicit-reward margin (lp_w - ref_w) - (lp_l - ref_l)", REAL)

SYMBOLS: Mapping[str, SymbolInfo] = MappingProxyType(_symbols)

CANONICAL: tuple[Symbol, ...] = (lp_w, lp_l, ref_w, ref_l, len_w, len_l)
EXTRA: tuple[Symbol, ...] = tuple(_symbols[n].symbol for n in EXTRA_NAMES)  # tail_w, tail_l, ref_tail_w, ref_tail_l

# Hyperparameters: TRL's config names where TRL has the loss, the paper's names otherwise.
# A loss's defaults live in its own signature; here are the symbols, meanings and legal ranges.
_hyper: dict[str, SymbolInfo] = {}
_declare(_hyper, "beta", "inverse temperature / KL strength of the implicit reward", POSITIVE)
_declare(_hyper, "gamma", "coefficient of the reference log-ratio (two-coefficient DPO)", NONNEGATIVE)
_declare(_hyper, "label_smoothing", "probability that a preference label is flipped", HALF_OPEN_UNIT)
_declare(_hyper, "simpo_gamma", "target reward margin of SimPO", NONNEGATIVE)
_declare(_hyper, "cpo_alpha", "weight of the NLL term on the chosen response", NONNEGATIVE)
_declare(_hyper, "rpo_alpha", "weight of the length-normalised NLL term of RPO", NONNEGATIVE)
_declare(_hyper, "discopop_tau", "temperature of DiscoPOP's log-ratio modulation", POSITIVE)
_declare(_hyper, "ld_alpha", "weight of the verbose tail in LD-DPO", UNIT)
_declare(_hyper, "alpha", "R-DPO: length-penalty strength; AlphaPO: reward-shape exponent", NONNEGATIVE)
_declare(_hyper, "dpop_lambda", "weight of DPO-positive's penalty on lowering the chosen log-ratio", NONNEGATIVE)
_declare(_hyper, "hdpo_alpha", "entropy coefficient of H-DPO (1 recovers DPO)", POSITIVE)
_declare(_hyper, "f_alpha_divergence_coef", "alpha of the alpha-divergence link of f-DPO", POSITIVE)
_declare(_hyper, "bco_delta", "BCO's reward shift (a running mean of rewards, held constant here)", REAL)
_declare(_hyper, "slic_delta", "SLiC-HF's calibration margin", NONNEGATIVE)
_declare(_hyper, "slic_lambda", "weight of SLiC-HF's regulariser on the chosen response", NONNEGATIVE)
_declare(_hyper, "desirable_weight", "KTO's weight on the desirable example (lambda_D)", NONNEGATIVE)
_declare(_hyper, "undesirable_weight", "KTO's weight on the undesirable example (lambda_U)", NONNEGATIVE)
_declare(_hyper, "kto_z0", "KTO's reference point z0 (a KL estimate, held constant here)", REAL)

HYPERPARAMETERS: Mapping[str, SymbolInfo] = MappingProxyType(_hyper)


def symbol(name: str) -> Symbol:
    """The declared sympy symbol called ``name`` (variable or hyperparameter)."""
    info = _symbols.get(name) or _hyper.get(name)
    if info is None:
        raise KeyError(name)
    return info.symbol


def info(name: str) -> SymbolInfo:
    """The declaration (symbol, meaning, domain) of ``name``."""
    found = _symbols.get(name) or _hyper.get(name)
    if found is None:
        raise KeyError(name)
    return found


# --------------------------------------------------------------------------------------------
# Views: coordinate systems, each a substitution from the canonical variables.
# --------------------------------------------------------------------------------------------


NEUTRAL_REFERENCE = 0.3  # the reference's probability of each response where a field is drawn


@dataclass(frozen=True)
class View:
    """A coordinate system. ``substitution`` maps canonical symbols to expressions in
    ``variables``; canonical symbols it does not mention are variables of the view as they are.

    ``coordinates`` is the other direction: each view variable that is not canonical, as an
    expression in the canonical variables (``p_w = exp(lp_w)``), so a point given in canonical
    variables can be read in the view (:meth:`at`). ``axes`` names the chosen and rejected
    coordinates a gradient field is drawn over (views without them draw no field), and
    :meth:`neutral` holds every other variable at one point: single-token responses, no LD-DPO
    tails, and a reference that gives each response probability ``NEUTRAL_REFERENCE``.
    """

    name: str
    description: str
    variables: tuple[Symbol, ...]
    substitution: Mapping[Symbol, sympy.Expr] = field(default_factory=dict)
    coordinates: Mapping[Symbol, sympy.Expr] = field(default_factory=dict)
    axes: tuple[str, str] | None = None

    def at(self, point: Mapping[str, object]) -> dict[str, sympy.Expr]:
        """The view's variables at a point given by canonical names (numbers or sympy
        expressions). A variable the point does not determine is left out."""
        subs = {_symbols[k].symbol: sympy.sympify(v) for k, v in point.items()}
        out = {}
        for v in self.variables:
            expr = self.coordinates.get(v, v)
            if expr.free_symbols <= set(subs):
                out[v.name] = expr.xreplace(subs)
        return out

    def neutral(self, reference: float | tuple[float, float] = NEUTRAL_REFERENCE) -> dict[str, float]:
        """Every variable off the view's axes at the neutral point: lengths 1, tails 0, and the
        reference's probability of y_w and y_l ``reference`` (one number for both, or a pair)."""
        if self.axes is None:
            raise ValueError(f"the {self.name} view has no axes to draw a field over; views with axes: "
                             f"{', '.join(k for k, v in VIEWS.items() if v.axes)}")
        q_w, q_l = (reference, reference) if isinstance(reference, int | float) else reference
        point = {"ref_w": log(sympy.nsimplify(q_w)), "ref_l": log(sympy.nsimplify(q_l)), "len_w": 1, "len_l": 1,
                 **{s.name: 0 for s in EXTRA}}
        return {k: float(v) for k, v in self.at(point).items() if k not in self.axes}


_shorter = sympy.Min(len_w, len_l)

VIEWS: Mapping[str, View] = MappingProxyType(
    {
        "log": View(
            "log",
            "canonical log-probabilities and lengths",
            CANONICAL + EXTRA,
            axes=("lp_w", "lp_l"),
        ),
        "probability": View(
            "probability",
            "sequence probabilities: lp = log p, ref = log q",
            (p_w, p_l, q_w, q_l, len_w, len_l) + EXTRA,
            {lp_w: log(p_w), lp_l: log(p_l), ref_w: log(q_w), ref_l: log(q_l)},
            {p_w: exp(lp_w), p_l: exp(lp_l), q_w: exp(ref_w), q_l: exp(ref_l)},
            axes=("p_w", "p_l"),
        ),
        "length": View(
            "length",
            "lengths at fixed per-token mean log-probs: lp = len * m, ref = len * n",
            (len_w, len_l, m_w, m_l, n_w, n_l),
            {
                lp_w: len_w * m_w,
                lp_l: len_l * m_l,
                ref_w: len_w * n_w,
                ref_l: len_l * n_l,
                tail_w: (len_w - _shorter) * m_w,
                tail_l: (len_l - _shorter) * m_l,
                ref_tail_w: (len_w - _shorter) * n_w,
                ref_tail_l: (len_l - _shorter) * n_l,
            },
            {m_w: lp_w / len_w, m_l: lp_l / len_l, n_w: ref_w / len_w, n_l: ref_l / len_l},
        ),
        "margin": View(
            "margin",
            "the reference-adjusted margin h = (lp_w - ref_w) - (lp_l - ref_l) with lp_l, ref_w, "
            "ref_l held fixed; only for losses that depend on the pair through h alone",
            (h, lp_l, ref_w, ref_l, len_w, len_l),
            {lp_w: h + ref_w + lp_l - ref_l},
            {h: (lp_w - ref_w) - (lp_l - ref_l)},
        ),
    }
)
