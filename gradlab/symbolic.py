"""Derivations: gradients in any view, readable forms, LaTeX, limits and numeric functions.

Every gradient is computed from a loss's one canonical expression: the view's substitution is
applied, then sympy differentiates (the chain rule is sympy's job, never ours). Results are
cached in memory and on disk (see :mod:`gradlab._cache`).
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import sympy
from sympy import Symbol, exp

from gradlab import _cache, _mpeval, budgets, caches
from gradlab.errors import DomainError, GradlabError, ParseError, UnknownVariableError
from gradlab.losses import Loss, get_loss
from gradlab.parsing import parse
from gradlab.symbols import (
    HYPERPARAMETERS,
    NEUTRAL_REFERENCE,
    SPECIAL_FUNCTIONS,
    SYMBOLS,
    VIEWS,
    Domain,
    View,
    sigmoid,
    softplus,
    to_special,
)

__all__ = [
    "as_expr",
    "as_loss",
    "get_view",
    "in_view",
    "variables",
    "Field",
    "field",
    "gradient",
    "derivative",
    "readable",
    "standard",
    "latex",
    "limit",
    "numeric",
    "stabilise",
    "parameter_values",
    "pair_loss",
    "evaluate",
    "equivalent",
]

LossLike = Loss | str


def as_loss(loss: LossLike) -> Loss:
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        return get_loss(loss)
    raise GradlabError(f"a loss must be a registered name or a gradlab.Loss, not {type(loss).__name__}")


def pair_loss(loss: LossLike, what: str) -> Loss:
    """``as_loss``, refusing a group loss with a clear error: ``what`` (a function of this
    module) works on the pairwise losses' canonical variables, which a group loss does not have."""
    loss = as_loss(loss)
    if loss.kind == "group":
        raise GradlabError(
            f"gradlab.{what} works on pairwise losses; '{loss.name}' is a group loss (GRPO family), whose expression "
            f"is a per-token weight in A, |o|, sum|o|, G and rho. Use gradlab.get_loss('{loss.name}').in_view(...) or "
            f".derivative(...) for its weight, or gradlab.experiments.groups.exact_gradient for its expected gradient")
    return loss


def as_expr(value: Any, what: str = "the expression") -> sympy.Expr:
    """A sympy expression from a sympy object, a real number, or a formula string.

    Strings go through the safe parser (:func:`gradlab.parsing.parse`); nothing a user types is
    ever passed to ``sympify`` or ``eval``.
    """
    if isinstance(value, sympy.Basic):
        return value
    if isinstance(value, str):
        return parse(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return parse(repr(value))  # the parser's number rules: finite, bounded size, exact
    raise ParseError(
        f"{what} must be a sympy expression, a number or a formula string, not {type(value).__name__}"
    )


def get_view(name: str | View) -> View:
    if isinstance(name, View):
        return name
    try:
        return VIEWS[name]
    except KeyError:
        raise UnknownVariableError(
            f"unknown view '{name}'; the views are: {', '.join(VIEWS)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


def in_view(loss: LossLike, view: str | View = "log") -> sympy.Expr:
    """The loss's expression in the view's variables (hyperparameters symbolic)."""
    loss, v = pair_loss(loss, "in_view"), get_view(view)
    memo_key = (loss.expr, v.name)
    expr = _VIEW_MEMO.get(memo_key)
    if expr is None:
        expr = _view_expr(loss.expr, v, loss.domains)
        _VIEW_MEMO[memo_key] = expr
    if v.name == "margin":
        hyper = {s.symbol for s in HYPERPARAMETERS.values()}
        extra = expr.free_symbols - hyper - {SYMBOLS["h"].symbol}
        if extra:
            raise UnknownVariableError(
                f"loss '{loss.name}' does not depend on the pair through the margin h alone "
                f"(it also reads {', '.join(sorted(s.name for s in extra))}); use the log, "
                "probability or length view"
            )
    return expr


_VIEW_MEMO: dict[tuple[sympy.Expr, str], sympy.Expr] = caches.Bounded(4096)


def _view_expr(canonical: sympy.Expr, v: View, domains: Mapping[str, Domain] | None = None) -> sympy.Expr:
    """``canonical`` in the view's variables. Substituting re-evaluates the whole tree (sympy
    asks assumptions of every argument of every softplus and sigmoid, ~10 ms per loss), so the
    result is kept in the disk cache, under the same rules as derivatives: a loaded entry is
    used only if it agrees with the substitution over the whole domain (:func:`_is_view_of`)."""
    if not v.substitution:
        return canonical
    key = _cache.make_key("in_view", v.name, _key_text(canonical))
    found = _cache.load(key)
    if found is not None and _is_view_of(found, canonical, v, domains):
        return found
    expr = canonical.xreplace(dict(v.substitution))
    _cache.store(key, expr)
    return expr


def _is_view_of(candidate: sympy.Expr, canonical: sympy.Expr, v: View,
                domains: Mapping[str, Domain] | None = None) -> bool:
    """Whether a cached ``candidate`` is ``canonical`` with the view's substitution applied: it
    may read only symbols the substitution leaves or brings in, and at every point of the
    read-back design (:func:`_holds_at_spread_points`) its value must equal the canonical
    expression's at the substituted values to 1e-12 relative, beyond both sides' error bounds."""
    subst = {k: e for k, e in v.substitution.items() if k in canonical.free_symbols}
    allowed = (canonical.free_symbols - set(subst)).union(*(e.free_symbols for e in subst.values()))
    if not candidate.free_symbols <= allowed:
        return False

    def agree(point):
        try:
            env = {**point, **{k: _mpeval.value(e, point) for k, e in subst.items()}}
            b, b_err, _ = _mpeval.walk(canonical, env)
        except _REFERENCE_FAILURES:
            return None
        if not _usable(b, b_err):
            return None
        found = _untrusted(candidate, point)
        if found is None:
            return False
        return _verdict(*found, b, b_err, max(abs(found[0]), abs(b)))

    return _holds_at_spread_points(sorted(allowed, key=lambda s: s.name), agree, domains)


def variables(loss: LossLike, view: str | View = "log") -> list[str]:
    """The view variables the loss depends on, in the view's order."""
    expr, v = in_view(loss, view), get_view(view)
    return [s.name for s in v.variables if s in expr.free_symbols]


class Field:
    """A loss's gradient over a view's two axes, compiled once with the hyperparameters as
    arguments, so redrawing it for new values does no sympy work.

    ``field(x, y, values)`` is ``(dl/dx, dl/dy)`` at every point of the grids ``x``, ``y`` of the
    view's axes (``view.axes``: ``(p_w, p_l)`` or ``(lp_w, lp_l)``), every other variable at the
    view's neutral point (``View.neutral(reference)``), the hyperparameters at the loss's
    defaults overridden by ``values``. NaN in ``x`` or ``y`` marks a point outside the drawn
    region and gives NaN there.
    """

    def __init__(self, loss: Loss, view: View) -> None:
        if view.axes is None:
            raise UnknownVariableError(f"the {view.name} view has no axes to draw a field over; views with axes: "
                                       f"{', '.join(k for k, v in VIEWS.items() if v.axes)}")
        self.loss, self.view = loss, view
        self.axes: tuple[str, str] = view.axes
        self.names = tuple(variables(loss, view))
        args = list(self.names) + list(loss.hyperparameters)
        self.dx, self.dy = (numeric(derivative(loss, name, view), args) for name in self.axes)

    def __call__(self, x: Any, y: Any, values: Mapping[str, float] | None = None, *,
                 reference: float | tuple[float, float] = NEUTRAL_REFERENCE) -> tuple[Any, Any]:
        import numpy as np

        hyper = [float(v) for v in parameter_values(self.loss, values).values()]
        xname, yname = self.axes
        point = {**_neutral(self.view.name, reference), xname: x, yname: y}
        args = [point[n] for n in self.names] + hyper
        shape = np.broadcast_shapes(np.shape(x), np.shape(y))
        with np.errstate(invalid="ignore"):  # NaN marks grid points outside the drawn region
            return np.broadcast_to(self.dx(*args), shape), np.broadcast_to(self.dy(*args), shape)


@caches.memo(maxsize=128)
def _field(loss: Loss, view: str) -> Field:
    return Field(loss, get_view(view))


def field(loss: LossLike, view: str | View = "log") -> Field:
    """The loss's :class:`Field` over the axes of ``view``, compiled once per loss and view."""
    return _field(pair_loss(loss, "field"), get_view(view).name)


@caches.memo(maxsize=64)
def _neutral(view: str, reference: float | tuple[float, float]) -> dict[str, float]:
    return get_view(view).neutral(reference)


def _wrt_allowed(loss: Loss, view: View) -> list[str]:
    return [s.name for s in view.variables] + list(loss.hyperparameters)


# --------------------------------------------------------------------------------------------
# Readable and standard forms
# --------------------------------------------------------------------------------------------

def readable(expr: sympy.Expr) -> sympy.Expr:
    """Rewrite exp/log patterns into sigmoid, softplus and log1mexp, then pull out common factors.

    The result is deterministic (it depends only on the expression), so it prints stably.
    """
    expr = as_expr(expr)
    with budgets.timed("simplify_s", "rewriting the expression in readable form"):
        budgets.check_size(expr, "the expression to rewrite")
        if expr.has(exp):
            expr = to_special(expr)
        return _rebuild(sympy.factor_terms(expr))


def _rebuild(e: sympy.Expr) -> sympy.Expr:
    """Re-evaluate the tree bottom-up. factor_terms can leave unevaluated products such as
    -(a + 1); rebuilding gives the fixed point that pickling (and the disk cache) reproduces."""
    if not e.args:
        return e
    return e.func(*(_rebuild(a) for a in e.args))


def standard(expr: sympy.Expr) -> sympy.Expr:
    """The same expression with only standard sympy functions (for ``sympy.sympify``)."""
    expr = as_expr(expr)
    return expr.rewrite(exp) if _has_special(expr) else expr


def _has_special(expr: sympy.Expr) -> bool:
    return any(expr.has(f) for f in SPECIAL_FUNCTIONS.values())


def latex(expr: sympy.Expr) -> str:
    """LaTeX as people write it: grouped log-ratios, Greek hyperparameters (gradlab.printing)."""
    from gradlab import printing

    expr = budgets.check_size(as_expr(expr), "the expression to print")
    with budgets.timed("latex_s", "printing the expression as LaTeX"):
        return printing.latex(expr)


# --------------------------------------------------------------------------------------------
# Derivatives, cached
# --------------------------------------------------------------------------------------------

_MEMO: dict[tuple[str, str, sympy.Expr], sympy.Expr] = caches.Bounded()
_KEY_TEXT: dict[sympy.Expr, str] = caches.Bounded(4096)


def gradient(loss: LossLike, view: str | View = "log") -> dict[str, sympy.Expr]:
    """Every first partial derivative of the loss in ``view``: with respect to each view
    variable the loss depends on, and each of its hyperparameters. Readable forms, cached."""
    loss, v = pair_loss(loss, "gradient"), get_view(view)
    wrt = [*variables(loss, v), *loss.hyperparameters]
    return _partials(loss, v, wrt)


def derivative(loss: LossLike, wrt: str, view: str | View = "log") -> sympy.Expr:
    """The partial derivative of the loss with respect to ``wrt`` in ``view`` (readable form).

    Only this one partial is derived. Results are cached in memory and on disk; a disk entry
    is used only if it agrees with a numerical derivative of the loss at random points.

    Args:
        loss: a registered name, alias or weighted combination, or a :class:`Loss`.
        wrt: the variable, named as in ``view`` (``lp_l`` in the log view, ``p_l`` in the
            probability view, ...).
        view: ``"log"``, ``"probability"``, ``"length"`` or ``"margin"``, or a :class:`View`.

    Returns:
        The closed form, in the view's variables and the loss's hyperparameter symbols.
    """
    loss, v = pair_loss(loss, "derivative"), get_view(view)
    if not isinstance(wrt, str):
        raise UnknownVariableError(f"the variable to differentiate by must be a name, not {type(wrt).__name__}")
    allowed = _wrt_allowed(loss, v)
    if wrt not in allowed:
        raise UnknownVariableError(
            f"cannot differentiate '{loss.name}' with respect to '{wrt}' in the {v.name} view; "
            f"allowed: {', '.join(allowed)}"
        )
    return _partials(loss, v, [wrt])[wrt]


def _key_text(expr: sympy.Expr) -> str:
    """A canonical text of ``expr`` for the disk cache's key, once per expression: the
    data-only cache tree (a plain walk over sympy's canonically ordered arguments, ~100x
    cheaper than ``srepr``, which sorts every sum for printing), or ``srepr`` for anything
    outside the cache's vocabulary. The tree and srepr are prefixed differently, so the two
    can never give the same text."""
    text = _KEY_TEXT.get(expr)
    if text is None:
        import json

        try:
            text = "tree:" + json.dumps(_cache.encode(expr), separators=(",", ":"))
        except Exception:  # noqa: BLE001 - _cache._NotEncodable or anything sympy raises
            text = "srepr:" + sympy.srepr(expr)
        _KEY_TEXT[expr] = text
    return text


def _partials(loss: Loss, v: View, wrt: list[str]) -> dict[str, sympy.Expr]:
    """The partials of ``loss`` in ``v`` with respect to the (validated) names ``wrt``: from
    memory, else from disk after one numerical check of every entry loaded together
    (:func:`_are_derivatives`), else derived (and stored)."""
    expr = in_view(loss, v)
    out: dict[str, sympy.Expr] = {}
    loaded: dict[str, tuple[str, sympy.Expr]] = {}
    missing: dict[str, str] = {}
    for name in wrt:
        sym = symbol_of(name)
        if sym not in expr.free_symbols:
            out[name] = sympy.S.Zero
            continue
        found = _MEMO.get((v.name, name, expr))
        if found is not None:
            out[name] = found
            continue
        key = _cache.make_key("derivative", v.name, name, _key_text(expr))
        with budgets.timed("derive_s", f"reading d {loss.name} / d {name} ({v.name} view) from the cache"):
            entry = _cache.load(key)
        if entry is None:
            missing[name] = key
        else:
            loaded[name] = (key, entry)
    if loaded:
        what = f"checking the cached gradient of {loss.name} ({v.name} view)"
        with budgets.timed("derive_s", what):
            candidates = {symbol_of(n): e for n, (_, e) in loaded.items()}
            if len(loaded) > 1 and _are_derivatives(candidates, expr, loss.domains):
                wrong: list[str] = []
            else:  # one check per entry: only the wrong ones are derived again
                wrong = [n for n, (_, e) in loaded.items() if not _is_derivative(e, expr, symbol_of(n), loss.domains)]
        for name, (key, entry) in loaded.items():
            if name in wrong:
                missing[name] = key
            else:
                out[name] = _MEMO[(v.name, name, expr)] = entry
    for name, key in missing.items():
        with budgets.timed("derive_s", f"deriving d {loss.name} / d {name} ({v.name} view)"):
            raw = budgets.check_size(sympy.diff(expr, symbol_of(name)), f"the derivative d {loss.name} / d {name}")
            found = budgets.check_size(readable(raw), f"the derivative d {loss.name} / d {name}")
            _cache.store(key, found)
        out[name] = _MEMO[(v.name, name, expr)] = found
    return {name: out[name] for name in wrt}


def _is_derivative(candidate: sympy.Expr, expr: sympy.Expr, sym: Symbol,
                   domains: Mapping[str, Domain] | None = None) -> bool:
    """Whether a cached ``candidate`` is d expr / d sym (see :func:`_are_derivatives`)."""
    return _are_derivatives({sym: candidate}, expr, domains)


def _are_derivatives(candidates: Mapping[Symbol, sympy.Expr], expr: sympy.Expr,
                     domains: Mapping[str, Domain] | None = None) -> bool:
    """Whether every cached ``candidates[s]`` is d expr / d s, checked together at every point
    p of the read-back design (:func:`_holds_at_spread_points`), each with a fresh random
    direction u: sum_s u_s candidates[s](p) must equal the exact directional derivative
    d/dt expr(p + t u) at t = 0 (forward-mode differentiation of ``expr`` itself, which comes
    from the loss's definition, never from the cache) to 1e-12 relative, beyond the error
    bounds of both sides. u_s = r_s / max(1, |candidates[s](p)|) with |r_s| in [1, 2] and a
    random sign, so every term is at most 2 in size and a small wrong partial beside a huge
    right one is still seen; the random signs keep two wrong entries from cancelling.

    The caller checks each entry alone where the joint check fails, and derives again the ones
    that fail."""
    import mpmath

    syms = sorted(expr.free_symbols, key=lambda s: s.name)
    if not candidates or any(s not in syms or not c.free_symbols <= set(syms) for s, c in candidates.items()):
        return False
    rng = random.SystemRandom()

    def agree(point):
        values = {}
        for s, c in candidates.items():
            found = _untrusted(c, point)
            if found is None:
                return False
            values[s] = found
        direction = {s: rng.choice((-1, 1)) * (1 + rng.random()) / max(1, abs(x)) for s, (x, _) in values.items()}
        try:  # the reference at two precisions: their difference bounds its rounding error
            b = _mpeval.walk(expr, point, direction)[2]
            with mpmath.workdps(2 * mpmath.mp.dps):
                fine = _mpeval.walk(expr, point, direction)[2]
        except _REFERENCE_FAILURES:
            return None
        if not (_usable(b, 0) and _usable(fine, 0)) or not _mpeval.resolved(fine, abs(fine - b), 1e-15):
            return None
        terms = [direction[s] * x for s, (x, _) in values.items()]
        a = mpmath.fsum(terms)
        a_err = mpmath.fsum(abs(direction[s]) * e for s, (_, e) in values.items())
        scale = max(mpmath.fsum(abs(t) for t in terms), abs(fine))
        return _verdict(a, a_err, fine, 10 * abs(fine - b), scale)

    return _holds_at_spread_points(syms, agree, domains)


# --------------------------------------------------------------------------------------------
# The read-back design: where a cached expression (and gradlab.equivalent) is checked
# --------------------------------------------------------------------------------------------

_TOLERANCE = 1e-12
_CHECK_DPS = 40  # working precision of the checks; an unresolved candidate gets more
_MAX_CHECK_DPS = 600  # beyond it a candidate that still cancels is not trusted
_RANDOM_POINTS = 4  # fresh random points per check, besides the two corners
_REACH = 1e3  # log-probs, margins and hyperparameters are checked out to |x| = 1e3
_LENGTH_REACH = 1e4  # lengths out to 1e4 tokens
_SMALL = 1e-3  # the smallest magnitude drawn on an unbounded side
_REFERENCE_FAILURES = (ZeroDivisionError, ValueError, OverflowError, TypeError, GradlabError)


BLIND = "blind"  # a verdict: the candidate's value at this point is not known well enough to judge


def _verdict(a: Any, a_err: Any, b: Any, b_err: Any, scale: Any) -> bool | str:
    """False where a candidate ``a`` and the reference ``b`` differ by more than the tolerance
    beyond both error bounds; True where they agree and ``a`` is known to 15 digits; else
    ``BLIND`` (the candidate cancels too deeply here to be judged)."""
    if abs(a - b) > _TOLERANCE * scale + a_err + b_err:
        return False
    return True if _mpeval.resolved(a, a_err, 1e-15) or a_err <= _TOLERANCE * scale else BLIND


def _usable(x: Any, err: Any) -> bool:
    import mpmath

    return (not isinstance(x, mpmath.mpc) and mpmath.isfinite(x) and mpmath.isfinite(err)
            and _mpeval.resolved(x, err, 1e-15))


def _untrusted(expr: sympy.Expr, point: Mapping[Symbol, Any]) -> tuple[Any, Any] | None:
    """``(value, error bound)`` of a cached expression at ``point``, computed in as much
    precision as it takes to know 15 digits, up to ``_MAX_CHECK_DPS`` (``e^1000 + 42 -
    e^1000`` is 0 at 40 digits, and its error bound says so: at 460 digits it is 42); the
    error bound stays large where even that is not enough. None where it cannot be evaluated
    or is not a finite real."""
    import mpmath

    dps = mpmath.mp.dps
    while True:
        try:
            with mpmath.workdps(dps):
                x, err, _ = _mpeval.walk(expr, point, underflow=True)
        except Exception:  # noqa: BLE001 - any failure to evaluate means: do not trust the entry
            return None
        if isinstance(x, mpmath.mpc) or not mpmath.isfinite(x) or mpmath.isnan(err):
            return None
        if _mpeval.resolved(x, err, 1e-15) or dps >= _MAX_CHECK_DPS:
            return x, err
        lost = int(mpmath.log10(err / abs(x))) + 1 if x and mpmath.isfinite(err) else dps
        dps = min(_MAX_CHECK_DPS, max(2 * dps, dps + lost + 20))


def _domain_of(sym: Symbol, domains: Mapping[str, Domain] | None) -> Domain:
    """The values ``sym`` may take: a loss's own narrower domain where it declares one, else
    its declaration's, else what its sympy assumptions allow."""
    if domains and sym.name in domains:
        return domains[sym.name]
    info = SYMBOLS.get(sym.name) or HYPERPARAMETERS.get(sym.name)
    if info is not None and info.symbol == sym:
        return info.domain
    if sym.is_positive:
        return Domain(low=0.0)
    if sym.is_nonpositive:
        return Domain(high=0.0, high_open=False)
    if sym.is_nonnegative:
        return Domain(low=0.0, low_open=False)
    return Domain()


def _spread(sym: Symbol, domain: Domain, rng: random.Random) -> tuple[list[list[Any]], Callable[[random.Random], Any]]:
    """(ends, draw) for one variable, as mpmath numbers. ``ends`` holds, for each end of its
    checked range, the values to try in order (the end itself, then ever further inside, for a
    function undefined at the very end); ``draw`` gives a fresh random value. Each end is
    moved inside by a random 1e-7 to 1e-6 of the range's width (the same for every variable
    would make a corner degenerate: every log-prob equal, every margin exactly 0).

    The checked range is the whole domain, cut at +-1e3 (lengths at 1e4): log-probs from -1e3
    to 0, lengths from 1e-3 to 1e4, beta from 1e-3 to 1e3, a margin from -1e3 to 1e3, bounded
    hyperparameters over their whole interval, probabilities from e^-1000 to 1. Draws spread
    evenly over orders of magnitude (from 1e-3 to the reach, on each side the domain allows),
    so the tails are drawn as often as the middle; a bounded interval is drawn uniformly."""
    import mpmath

    reach = _LENGTH_REACH if sym.name.startswith("len") else _REACH
    lo, hi = domain.low, domain.high
    inside = (1e-7 * (1 + 9 * rng.random()), 1e-4, 1e-2)
    if lo == 0 and hi == 1 and domain.low_open:  # a probability: e^lp for a log-prob lp in [-1e3, 0]
        ends = [[mpmath.exp(-reach * (1 - inside[0]))], [1 - mpmath.mpf(f) for f in inside]]
        return ends, lambda rng: mpmath.exp(_magnitude(rng, _SMALL, reach, -1))
    lo_c, hi_c = max(lo, -reach), min(hi, reach)
    width = max(hi_c - lo_c, 1.0) if hi_c - lo_c > 10 else hi_c - lo_c

    def approach(end: float, towards: int, open_: bool) -> list[Any]:
        if open_ and end == 0:  # (0, ...): the smallest magnitude drawn stands for the end
            return [mpmath.mpf(towards * _SMALL * (1 + inside[0]))]
        return [mpmath.mpf(end + towards * f * width) for f in inside]

    ends = [approach(lo_c, 1, lo == lo_c and domain.low_open), approach(hi_c, -1, hi == hi_c and domain.high_open)]
    if hi_c - lo_c <= 10:
        return ends, lambda rng: mpmath.mpf(lo_c + (hi_c - lo_c) * (1e-9 + (1 - 2e-9) * rng.random()))
    sides = [side for side in (-1, 1) if (lo_c < -_SMALL if side < 0 else hi_c > _SMALL)]

    def draw(rng):
        side = rng.choice(sides)
        bottom = max(_SMALL, lo_c if side > 0 and lo_c > 0 else -hi_c if side < 0 and hi_c < 0 else _SMALL)
        top = hi_c if side > 0 else -lo_c
        return _magnitude(rng, bottom, top, side)

    return ends, draw


def _magnitude(rng: random.Random, bottom: float, top: float, side: int) -> Any:
    import mpmath

    return mpmath.mpf(side * 10 ** (math.log10(bottom) + (math.log10(top) - math.log10(bottom)) * rng.random()))


def _holds_at_spread_points(
    syms: list[Symbol],
    agree: Callable[[dict[Symbol, Any]], bool | str | None],
    domains: Mapping[str, Domain] | None = None,
    *,
    random_points: int = _RANDOM_POINTS,
    rng: random.Random | None = None,
    needed: int | None = None,
    dps: int = _CHECK_DPS,
) -> bool:
    """Whether ``agree(point)`` holds over the variables' whole checked ranges (see
    :func:`_spread`): at the two corners (every variable at its low end, then at its high end;
    where the reference is undefined at a corner, each variable's face alone, the others
    random), then at ``random_points`` fresh random points. ``agree`` returns True, False,
    None where the *reference* is undefined or unresolved there (a corner or face then moves
    inside, a random point is drawn again), or ``BLIND`` where the candidate cannot be judged:
    a face where it is blind refuses it, so an entry cannot hide its error behind a
    cancellation too deep to resolve.

    What this guarantees: an expression that is wrong everywhere outside some box and right
    inside it is refused unless the box holds the whole checked range (a box that misses a piece
    of the range misses one end of some variable's interval, so it misses one of the two
    corners), and a wrong expression that differs from the truth on a region of the checked
    range is refused with probability at least 1 - (1 - f)^n, for f the region's share of the
    sampling measure and n the points checked. The points come from the operating system's
    random source unless ``rng`` is given, so they cannot be known in advance. What it cannot
    guarantee: an expression wrong only on a small region away from every face (a narrow bump)
    can pass; so can one that differs by less than the tolerance (1e-12 relative), or one wrong
    only outside the checked range (|lp| > 1e3)."""
    import mpmath

    rng = rng or random.SystemRandom()
    spreads = {s: _spread(s, _domain_of(s, domains), rng) for s in syms}

    def fresh():
        return {s: spreads[s][1](rng) for s in syms}

    def at_end(which: int, s: Symbol | None = None) -> bool | str | None:
        # the corner with every variable (or only s) at one end, moved inside step by step
        # only where the reference is undefined or unresolved there
        depth = max(len(spreads[t][0][which]) for t in syms)
        for k in range(depth):
            point = fresh()
            for t in syms if s is None else [s]:
                tries = spreads[t][0][which]
                point[t] = tries[min(k, len(tries) - 1)]
            verdict = agree(point)
            if verdict is not None:
                return verdict
        return None

    ok = 0
    try:  # exp of a huge argument is legal here (a far point of a legal domain): it costs
        # milliseconds at these magnitudes, and only the budget on time applies
        with mpmath.workdps(dps), budgets.raised(exp_argument=1e300):
            for which in (0, 1):
                verdict = at_end(which)
                if verdict is False:
                    return False
                if verdict is not True:  # each variable's face alone; every one must be judged
                    for s in syms:
                        face = at_end(which, s)
                        if face is False or face == BLIND:
                            return False
            for _ in range(4 * random_points):
                if ok >= random_points:
                    break
                verdict = agree(fresh())
                if verdict is False:
                    return False
                ok += verdict is True
    except Exception:  # noqa: BLE001 - any failure to compare means: do not trust the entry
        return False
    return ok >= (max(1, random_points // 2) if needed is None else needed)


def _mp_eval(expr: sympy.Expr, env: Mapping[Symbol, Any]) -> Any:
    """The value of ``expr`` at ``env`` in mpmath (see :mod:`gradlab._mpeval`)."""
    return _mpeval.value(expr, env)


# --------------------------------------------------------------------------------------------
# Values of hyperparameters and variables
# --------------------------------------------------------------------------------------------


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or value is None:
        raise DomainError(f"{name}={value!r} is not a number")
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise DomainError(f"{name}={value!r} is not a number within float64's range") from None
    if not math.isfinite(x):
        raise DomainError(f"{name}={value!r} is not finite")
    return x


def parameter_values(loss: LossLike, values: Mapping[str, Any] | None = None) -> dict[Symbol, Any]:
    """Hyperparameter symbols mapped to numbers: the loss's defaults overridden by ``values``.

    Unknown names and values outside a hyperparameter's legal range raise a clear error.
    """
    loss = pair_loss(loss, "parameter_values")
    if values is not None and not isinstance(values, Mapping):
        raise UnknownVariableError(
            f"hyperparameter values must be a mapping of names to numbers, not {type(values).__name__}"
        )
    values = dict(values or {})
    unknown = sorted(set(map(str, values)) - set(loss.hyperparameters))
    if unknown:
        allowed = ", ".join(loss.hyperparameters) or "none"
        raise UnknownVariableError(
            f"'{loss.name}' has no hyperparameter {', '.join(unknown)}; its hyperparameters: {allowed}"
        )
    out: dict[Symbol, Any] = {}
    for name in loss.hyperparameters:
        if name in values:
            x = _finite(name, values[name])
            domain = loss.domain(name)
            if not domain.contains(x):
                raise DomainError(f"{name}={values[name]} is outside its domain {domain}")
            exact = isinstance(values[name], int | sympy.Basic)
            out[HYPERPARAMETERS[name].symbol] = sympy.sympify(values[name]) if exact else sympy.Float(x)
        elif loss.defaults.get(name) is not None:
            out[HYPERPARAMETERS[name].symbol] = loss.defaults[name]
        else:
            raise DomainError(f"hyperparameter '{name}' of '{loss.name}' has no default; give a value")
    return out


def check_point(names: Iterable[str], at: Mapping[str, Any], loss: Loss | None = None) -> dict[str, float]:
    """Validate a point: every name present, no extras, each value in its variable's domain
    (the loss's own narrower domain where it declares one, e.g. ORPO's lp < 0)."""
    names = list(names)
    missing = [n for n in names if n not in at]
    extra = sorted(set(at) - set(names))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"not a variable here: {', '.join(extra)}")
        raise UnknownVariableError(f"{'; '.join(parts)}. This needs exactly: {', '.join(names)}")
    point = {}
    for n in names:
        x = _finite(n, at[n])
        info = SYMBOLS[n]
        domain = loss.domains.get(n, info.domain) if loss is not None else info.domain
        if not domain.contains(x):
            raise DomainError(f"{n}={at[n]} is outside its domain {domain} ({info.meaning})")
        point[n] = x
    return point


# --------------------------------------------------------------------------------------------
# Numeric functions
# --------------------------------------------------------------------------------------------


def _np_modules():
    import numpy as np

    def np_sigmoid(x):
        return np.exp(-np.logaddexp(0.0, -x))  # no overflow at either end

    def np_softplus(x):
        return np.logaddexp(0.0, x)

    def np_log1mexp(x):
        # Maechler's split: log(-expm1(x)) near 0, log1p(-exp(x)) far below
        x = np.asarray(x, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(x > -0.6931471805599453, np.log(-np.expm1(x)), np.log1p(-np.exp(x)))

    return [{"sigmoid": np_sigmoid, "softplus": np_softplus, "log1mexp": np_log1mexp}, "numpy"]


def _jax_modules():
    from gradlab import stable

    return [{"sigmoid": stable.sigmoid, "softplus": stable.softplus, "log1mexp": stable.log1mexp}, "jax"]


def numeric(
    expr: sympy.Expr,
    args: Iterable[str | Symbol],
    backend: str = "numpy",
    *,
    strict: bool = False,
    cse: bool = False,
    named: bool = False,
) -> Callable[..., Any]:
    """Compile ``expr`` to a function of ``args`` (positional, in order).

    ``backend`` is ``"numpy"`` or ``"jax"`` (stable sigmoid/softplus/log1mexp, products of
    exponentials in log space) or ``"mpmath"`` (arbitrary precision and exponent range).

    With ``strict=True`` a result that is not finite in float64 (an intermediate overflow, or a
    point on the boundary of the function's domain) raises :class:`DomainError` instead of
    returning inf or NaN; ``gradlab.evaluate`` then computes the exact value. For JAX the check
    uses ``jax.experimental.checkify``, so it also raises from inside ``jit``.

    ``expr`` may be a ``sympy.Tuple`` of expressions (the function then returns a tuple). With
    ``cse=True`` their common subexpressions are computed once: several gradients of one loss
    share the same sigmoid of the margin, which on large arrays is most of the cost.

    Args:
        expr: the expression, or a ``sympy.Tuple`` of them.
        args: the symbols (or names) the function takes, in order; every free symbol of
            ``expr`` must be one of them.
        backend: ``"numpy"``, ``"jax"`` or ``"mpmath"``.
        strict: raise :class:`DomainError` on a result that is not finite in float64.
        cse: compute the common subexpressions of a tuple once.
        named: write the arguments under their own names in the generated code, instead of
            numbered dummies whose order can change the order of a sum's terms between
            processes: the same expression then always gives the same code and the same bits
            (the names are gradlab's canonical symbols, never a user's text).

    Returns:
        A function of ``len(args)`` positional arrays (numbers for mpmath) that broadcasts them.
    """
    if backend not in ("numpy", "jax", "mpmath"):
        raise GradlabError(f"unknown backend {backend!r}; use numpy, jax or mpmath")
    if isinstance(args, str | Symbol):
        args = [args]
    syms = tuple(a if isinstance(a, Symbol) else symbol_of(a) for a in args)
    if named and any(symbol_of(s.name) != s for s in syms):
        raise GradlabError("named=True writes the arguments' names into code: only gradlab's own symbols may be")
    expr = budgets.check_size(as_expr(expr), "the expression to compile")
    _check_source_safe(expr, syms)
    f = _numeric(expr, syms, backend, cse, named)
    if not strict or backend == "mpmath":
        return f
    names = [s.name for s in syms]
    message = (
        "the value is not finite in float64 at this point (an overflow, or the edge of the "
        "function's domain); gradlab.evaluate computes it in arbitrary precision"
    )
    if backend == "jax":
        import jax.numpy as jnp
        from jax.experimental import checkify

        def checked(*a):
            out = f(*a)
            checkify.check(jnp.all(jnp.isfinite(out)), message)
            return out

        checked_fn = checkify.checkify(checked)

        def jax_strict(*a):
            err, out = checked_fn(*a)
            try:
                err.throw()
            except checkify.JaxRuntimeError as exc:
                raise DomainError(f"{message} (args {', '.join(names)})") from exc
            return out

        return jax_strict

    import numpy as np

    def numpy_strict(*a):
        with np.errstate(all="ignore"):
            out = f(*a)
        if not np.all(np.isfinite(out)):
            raise DomainError(f"{message} (args {', '.join(names)} = {a})")
        return out

    return numpy_strict


def _check_source_safe(expr: sympy.Basic, syms: tuple[Symbol, ...]) -> None:
    """Refuse what ``lambdify`` would write into generated source as text: a free symbol that
    is not an argument (arguments are replaced by dummies, so their names never are), and an
    applied function that is not one of sympy's own or gradlab's (its class name would be
    written). A Symbol named ``__import__('os').system(...)`` therefore runs nothing."""
    extra = expr.free_symbols - set(syms)
    if extra:
        names = ", ".join(sorted(repr(s.name)[:40] for s in extra))
        raise UnknownVariableError(f"the expression reads symbols that are not among its arguments: {names}")
    for f in expr.atoms(sympy.Function):
        module = getattr(type(f), "__module__", "") or ""
        foreign = not module.startswith(("sympy.", "gradlab."))
        if foreign or isinstance(f, sympy.core.function.AppliedUndef):
            raise GradlabError(f"cannot compile the function {repr(type(f).__name__)[:40]}: only sympy's "
                               "functions and gradlab's (sigmoid, softplus, log1mexp) can be compiled")


def stabilise(expr: sympy.Expr) -> sympy.Expr:
    """The same function, rewritten for float64: every product of exponentials and sigmoids
    becomes one exponential of a sum, exp(b) sigma(a) -> exp(b - softplus(-a)), so that an
    underflowing sigmoid times an overflowing exponential (0 * inf = NaN) is computed in log
    space instead. Exact; used by ``numeric`` for the numpy and JAX backends."""
    expr = as_expr(expr)
    if not expr.args:
        return expr
    args = tuple(stabilise(a) for a in expr.args)
    if args != expr.args:
        expr = expr.func(*args)
    if expr.is_Mul:
        logs, rest = [], []
        for f in expr.args:
            base, power = f.as_base_exp() if f.is_Pow and f.exp.is_Integer and f.exp > 0 else (f, 1)
            if isinstance(base, exp):
                logs.append(power * base.args[0])
            elif isinstance(base, sigmoid):
                logs.append(-power * softplus(-base.args[0]))
            else:
                rest.append(f)
        if len(logs) >= 2:
            return sympy.Mul(exp(sympy.Add(*logs)), *rest)
    return expr


@caches.memo(maxsize=4096)
def _numeric(expr: sympy.Expr, syms: tuple[Symbol, ...], backend: str, cse: bool = False,
             named: bool = False) -> Callable[..., Any]:
    # lambdify costs milliseconds per call; figures, checks and notebooks reuse the same forms
    dummify = not named
    if backend == "numpy":
        return sympy.lambdify(syms, stabilise(expr), modules=_np_modules(), cse=cse, dummify=dummify)
    if backend == "jax":
        return sympy.lambdify(syms, stabilise(expr), modules=_jax_modules(), cse=cse, dummify=dummify)
    if backend == "mpmath":
        return sympy.lambdify(syms, expr, modules=_mpeval.mp_modules(), cse=cse, dummify=dummify)
    raise ValueError(f"unknown backend '{backend}'; use numpy, jax or mpmath")


def symbol_of(name: str) -> Symbol:
    if not isinstance(name, str):
        raise UnknownVariableError(f"a variable must be given by name, not {type(name).__name__}")
    if name in SYMBOLS:
        return SYMBOLS[name].symbol
    if name in HYPERPARAMETERS:
        return HYPERPARAMETERS[name].symbol
    raise UnknownVariableError(f"unknown symbol '{name}'")


def evaluate(
    loss: LossLike,
    at: Mapping[str, Any],
    values: Mapping[str, Any] | None = None,
    view: str | View = "log",
    *,
    digits: int = 20,
) -> dict[str, Any]:
    """The loss value and every first partial derivative at a point, in ``view``, to ``digits``
    correct significant digits, or a clear error.

    The point's values may be numbers or decimal strings; strings are read exactly, so
    probabilities far below float64's range (``"1e-400"``) work. Each value is computed with
    mpmath at increasing precision (30, 60, 120, ... digits, up to the ``eval_digits`` budget)
    until two successive results agree to ``digits`` digits; a value that is exactly zero at
    the exact point (say, two equal terms that cancel) is returned as zero. If no two results
    agree within the budgets, :class:`~gradlab.budgets.BudgetError` says so. A numerical zero
    is accepted only if it stays zero up to the ``eval_digits`` precision. The results are
    ``mpmath.mpf`` numbers (convert with ``float`` where they fit); they are never NaN or
    infinite: such points raise :class:`DomainError`.

    Args:
        loss: a registered name, alias or weighted combination, or a :class:`Loss`.
        at: every variable of the view, by name (numbers or decimal strings).
        values: hyperparameters that differ from the loss's defaults, read exactly as ``at`` is
            (a decimal string as the decimal it denotes, a float as its binary value).
        view: the view whose variables ``at`` names and whose partials are returned.
        digits: the correct significant digits wanted.

    Returns:
        ``{"loss": value, name: partial, ...}``: the loss and its partial with respect to each
        variable of the view, as ``mpmath.mpf``.
    """
    loss, v = pair_loss(loss, "evaluate"), get_view(view)
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 100:
        raise DomainError(f"digits={digits!r} must be a whole number from 1 to 100")
    names = variables(loss, v)
    point = exact_point(names, at, loss)
    params = parameter_values(loss, values)
    # the values given, read exactly as the point is: 0.1 is 1/10, not float64's nearest
    params.update({HYPERPARAMETERS[k].symbol: exact_number(k, x) for k, x in (values or {}).items()})
    exprs = [("loss", in_view(loss, v)), *gradient(loss, v).items()]
    out: dict[str, Any] = {}
    with budgets.timed("evaluate_s", f"evaluating {loss.name} at the point"):
        for name, expr in exprs:
            label = "the loss" if name == "loss" else f"d/d{name}"
            out[name] = _converged(expr.xreplace(params), names, point, label, digits)
    return out


def exact_point(names: Iterable[str], at: Mapping[str, Any], loss: Loss | None = None) -> dict[str, sympy.Rational]:
    """Validate a point like :func:`check_point`, but keep each value exact: a decimal string
    becomes the exact rational it denotes (``"1e-400"`` is 10^-400, not float64's 0.0)."""
    import mpmath

    if not isinstance(at, Mapping):
        raise UnknownVariableError(f"the point must be a mapping of variable names to numbers, not {type(at).__name__}")
    names = list(names)
    missing = [n for n in names if n not in at]
    extra = sorted(map(str, set(at) - set(names)))
    if missing or extra:
        parts = [f"missing {', '.join(missing)}"] if missing else []
        parts += [f"not a variable here: {', '.join(extra)}"] if extra else []
        raise UnknownVariableError(f"{'; '.join(parts)}. This needs exactly: {', '.join(names)}")
    point = {}
    for n in names:
        x = exact_number(n, at[n])
        info = SYMBOLS[n]
        domain = loss.domains.get(n, info.domain) if loss is not None else info.domain
        with mpmath.workdps(30):
            m = mpmath.mpf(x.p) / x.q
            above = m > domain.low if domain.low_open else m >= domain.low
            below = m < domain.high if domain.high_open else m <= domain.high
        if not (above and below):
            raise DomainError(f"{n}={at[n]} is outside its domain {domain} ({info.meaning})")
        point[n] = x
    return point


def exact_number(name: str, value: Any) -> sympy.Rational:
    """``value`` as the exact rational it denotes: a decimal string as its decimal (``"1e-400"``
    is 10^-400), a float as its binary value; a clear error for anything else."""
    if isinstance(value, bool) or value is None:
        raise DomainError(f"{name}={value!r} is not a number")
    if isinstance(value, sympy.Rational):
        return value
    if isinstance(value, int):
        if abs(value) > 10**308:
            raise DomainError(f"{name} is too large (more than 308 digits)")
        return sympy.Integer(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DomainError(f"{name}={value!r} is not finite")
        return sympy.Rational(value)  # the float's exact binary value
    text = value if isinstance(value, str) else str(value) if type(value).__module__.startswith("mpmath") else None
    if text is None:
        try:
            return exact_number(name, float(value))  # numpy scalars and the like
        except (TypeError, ValueError, OverflowError):
            raise DomainError(f"{name}={value!r} is not a number") from None
    q = _mpeval.exact_decimal(name, text)
    return sympy.Rational(q.numerator, q.denominator)


def _converged(expr: sympy.Expr, names: list[str], point: Mapping[str, sympy.Rational], label: str, digits: int) -> Any:
    """The value of ``expr`` at ``point`` to ``digits`` significant digits (see ``evaluate``)."""
    import mpmath

    syms = [SYMBOLS[n].symbol for n in names]
    try:
        exact = expr.xreplace({s: point[n] for s, n in zip(syms, names, strict=False)})
    except (ZeroDivisionError, ValueError, TypeError):
        exact = None
    if exact is not None:
        # sympy's automatic evaluation at the exact point resolves what floating point cannot:
        # equal terms that cancel, kinks (Heaviside(0) = 1/2, the midpoint of the one-sided
        # derivatives), and values that are plain rationals
        if exact == 0:
            return mpmath.mpf(0)
        if exact.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
            raise DomainError(f"{label} is undefined or infinite at this point (the edge of its domain)")
        if exact.is_Rational:
            return _mpeval.exact_value(Fraction(int(exact.p), int(exact.q)), digits)
        names, target = [], exact
    else:
        target = expr
    target_syms = [SYMBOLS[n].symbol for n in names]
    # the error-bounded walk (gradlab._mpeval) gives the value and a bound that decides when
    # enough digits are known; for functions outside its vocabulary, a lambdified function at
    # two precisions that agree is the fallback
    if all(_mpeval.supported(a.func) for a in target.atoms(sympy.Function)):
        def compute(dps: int) -> tuple[Any, Any]:
            args = [mpmath.mpf(point[n].p) / point[n].q for n in names]
            v, err, _ = _mpeval.walk(target, dict(zip(target_syms, args, strict=True)))
            return v, err
    else:
        f = numeric(target, target_syms, "mpmath")

        def compute(dps: int) -> tuple[Any, Any]:
            return f(*(mpmath.mpf(point[n].p) / point[n].q for n in names)), None

    return _mpeval.converged(compute, label, digits)


# --------------------------------------------------------------------------------------------
# Limits and equivalence
# --------------------------------------------------------------------------------------------


_INFINITIES = {
    "oo": sympy.oo,
    "+oo": sympy.oo,
    "inf": sympy.oo,
    "+inf": sympy.oo,
    "infinity": sympy.oo,
    "-oo": -sympy.oo,
    "-inf": -sympy.oo,
    "-infinity": -sympy.oo,
}


def _as_constant(value: Any, what: str) -> sympy.Expr:
    """A number, ±oo, or a constant formula (no variables), through the safe parser."""
    if isinstance(value, str) and value.strip().lower() in _INFINITIES:
        return _INFINITIES[value.strip().lower()]
    if isinstance(value, float) and math.isinf(value):
        return sympy.oo if value > 0 else -sympy.oo
    expr = as_expr(value, what)
    if expr.free_symbols:
        raise ParseError(
            f"{what} must be a number, not an expression in {', '.join(sorted(map(str, expr.free_symbols)))}"
        )
    return expr


def limit(
    expr: sympy.Expr,
    var: str | Symbol,
    point: Any,
    direction: str = "+",
    values: Mapping[str | Symbol, Any] | None = None,
) -> sympy.Expr:
    """``lim expr`` as ``var -> point`` from ``direction``, after substituting ``values``.

    Strings (the expression, the point, the values) go through the safe parser; the point may
    also be ``"oo"`` or ``"-oo"``. The work runs under the ``limit_s`` budget.

    Args:
        expr: the expression, or its text.
        var: the variable that tends to ``point`` (a symbol or its name).
        point: a number, an expression, or its text.
        direction: ``"+"`` (from above), ``"-"`` (from below) or ``"+-"`` (both, which must agree).
        values: numbers substituted first, by symbol or name.

    Returns:
        The limit as sympy states it: a number, ``oo``, ``-oo``, or an expression in the
        symbols left.
    """
    sym = var if isinstance(var, Symbol) else symbol_of(var)
    if direction not in ("+", "-", "+-"):
        raise GradlabError(f"direction={direction!r} must be '+', '-' or '+-'")
    if values is not None and not isinstance(values, Mapping):
        raise UnknownVariableError(f"values must be a mapping of names to numbers, not {type(values).__name__}")
    subs = {
        (k if isinstance(k, Symbol) else symbol_of(k)): _as_constant(v, f"the value of {k}")
        for k, v in (values or {}).items()
    }
    target = _as_constant(point, "the limit point")
    e = budgets.check_size(standard(as_expr(expr).xreplace(subs)), "the expression")
    with budgets.timed("limit_s", f"the limit as {sym} -> {target}"):
        e = sympy.powsimp(sympy.expand_log(e, force=True), force=True)
        return sympy.limit(e, sym, target, direction)


def equivalent(
    a: sympy.Expr,
    b: sympy.Expr,
    *,
    samples: int = 12,
    digits: int = 40,
    seed: int | None = None,
    min_points: int | None = None,
) -> bool:
    """Whether ``a`` and ``b`` are the same function: exact simplification first, then a
    comparison with ``digits`` of precision at the read-back design's points (the same as the
    disk cache's check, :func:`_holds_at_spread_points`): one point for each end of each
    variable's whole domain (log-probs from -1e3 to 0, lengths to 1e4, every hyperparameter
    across its range), then ``samples`` random points spread over orders of magnitude.

    The random points are fresh each call (the operating system's random source); give ``seed``
    to repeat a comparison exactly. Points where a side cannot be evaluated (a pole, a log of a
    negative number, a non-finite value) are skipped, but if fewer than ``min_points`` random
    points (default ``samples // 2``, at least 1) evaluate the answer is False: a comparison at
    too few points has not shown anything. Two sides count as different at a point where they
    differ by more than ``10^-(digits/2)`` of max(1, |a|) beyond the difference's error bound.

    What a True answer guarantees: ``a - b`` vanishes, to that tolerance, at every point
    checked, so a difference on a region that touches a face of the domain (``max(0, -lp_w -
    3)``) or holds a fair share of the points is found. It cannot guarantee equality on a
    narrow region away from every face, nor beyond |x| = 1e3. Strings go through the safe
    parser; simplification runs under the ``simplify_s`` budget (running out of it is not an
    error: the numbers decide).

    Args:
        a, b: the two expressions, or their text.
        samples: random points compared after the domain's ends.
        digits: working precision of the comparison.
        seed: makes the random points repeatable.
        min_points: random points that must evaluate for a True answer.

    Returns:
        True when the two sides agree at every point checked (see above for what that covers).
    """
    import mpmath

    a, b = as_expr(a, "the first expression"), as_expr(b, "the second expression")
    for name, n, hi in (("samples", samples, 10_000), ("digits", digits, 10_000)):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= hi:
            raise GradlabError(f"{name}={n!r} must be a whole number from 1 to {hi}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise GradlabError(f"seed={seed!r} must be a whole number or None (fresh randomness)")
    diff = budgets.check_size(standard(a) - standard(b), "the difference of the expressions")
    if diff == 0:
        return True
    try:
        with budgets.timed("simplify_s", "simplifying the difference"):
            if sympy.simplify(diff) == 0:
                return True
    except budgets.BudgetError:
        pass  # undecided symbolically: the numeric comparison below decides
    except Exception:  # noqa: BLE001 - simplify can fail on exotic forms; fall back to numbers
        pass
    needed = max(1, samples // 2) if min_points is None else max(1, min_points)
    syms = sorted(diff.free_symbols, key=lambda s: s.name)
    side = standard(a)
    try:
        _mpeval.walk(diff, {s: mpmath.mpf(-1) if s.is_nonpositive else mpmath.mpf(1) for s in syms})
        compiled = None
    except _mpeval.Unsupported:  # functions beyond gradlab's vocabulary: lambdify them
        compiled = numeric(diff, syms, "mpmath"), numeric(side, syms, "mpmath")
    except Exception:  # noqa: BLE001 - undefined at that one point: the walker will do
        compiled = None
    tolerance = mpmath.mpf(10) ** (-(digits // 2))

    def agree(point):
        try:
            if compiled is None:
                d, d_err, _ = _mpeval.walk(diff, point)
                scale = _mpeval.value(side, point)
            else:
                args = [point[s] for s in syms]
                d, d_err, scale = compiled[0](*args), 0, compiled[1](*args)
        except (ZeroDivisionError, ValueError, TypeError, OverflowError, DomainError):
            return None
        if not (_finite_real(d) and _finite_real(scale) and _finite_real(d_err)):
            return None
        return abs(d) <= tolerance * max(1, abs(scale)) + d_err

    rng = random.SystemRandom() if seed is None else random.Random(seed)
    with budgets.timed("evaluate_s", "comparing the expressions at points over their domains"):
        return _holds_at_spread_points(syms, agree, random_points=samples, rng=rng, needed=needed, dps=digits)


def _finite_real(x: Any) -> bool:
    import mpmath

    try:
        return bool(mpmath.isfinite(x)) and (not isinstance(x, mpmath.mpc) or x.imag == 0)
    except TypeError:
        return False
