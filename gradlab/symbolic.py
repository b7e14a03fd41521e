"""Derivations: gradients in any view, readable forms, LaTeX, limits and numeric functions.

Every gradient is computed from a loss's one canonical expression: the view's substitution is
applied, then sympy differentiates (the chain rule is sympy's job, never ours). Results are
cached in memory and on disk (see :mod:`gradlab._cache`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import sympy
from sympy import Symbol, exp

from gradlab import _cache, budgets, caches
from gradlab.errors import DomainError, GradlabError, ParseError, UnknownVariableError
from gradlab.losses import Loss, get_loss
from gradlab.parsing import parse
from gradlab.symbols import (
    HYPERPARAMETERS,
    NEUTRAL_REFERENCE,
    SPECIAL_FUNCTIONS,
    SYMBOLS,
    VIEWS,
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
    loss, v = as_loss(loss), get_view(view)
    memo_key = (loss.expr, v.name)
    expr = _VIEW_MEMO.get(memo_key)
    if expr is None:
        expr = _view_expr(loss.expr, v)
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


def _view_expr(canonical: sympy.Expr, v: View) -> sympy.Expr:
    """``canonical`` in the view's variables. Substituting re-evaluates the whole tree (sympy
    asks assumptions of every argument of every softplus and sigmoid, ~10 ms per loss), so the
    result is kept in the disk cache, under the same rules as derivatives: a loaded entry is
    used only if it agrees with the substitution at a random point (:func:`_is_view_of`)."""
    if not v.substitution:
        return canonical
    key = _cache.make_key("in_view", v.name, _key_text(canonical))
    found = _cache.load(key)
    if found is not None and _is_view_of(found, canonical, v):
        return found
    expr = canonical.xreplace(dict(v.substitution))
    _cache.store(key, expr)
    return expr


def _is_view_of(candidate: sympy.Expr, canonical: sympy.Expr, v: View) -> bool:
    """Whether a cached ``candidate`` is ``canonical`` with the view's substitution applied: it
    may read only symbols the substitution leaves or brings in, and at a random point (from the
    operating system's random source, 30 digits, up to six tries where the functions cannot be
    evaluated) its value must equal the canonical expression's at the substituted values to
    1e-12 relative. A failure to evaluate counts as a mismatch (the caller substitutes again)."""
    import mpmath

    subst = {k: e for k, e in v.substitution.items() if k in canonical.free_symbols}
    allowed = (canonical.free_symbols - set(subst)).union(*(e.free_symbols for e in subst.values()))
    if not candidate.free_symbols <= allowed:
        return False
    syms = sorted(allowed, key=lambda s: s.name)
    rng = random.SystemRandom()
    try:
        with mpmath.workdps(30):
            for _ in range(6):
                point = {s: _sample(s, rng) for s in syms}
                try:
                    env = {**point, **{k: _mp_eval(e, point) for k, e in subst.items()}}
                    a, b = _mp_eval(candidate, point), _mp_eval(canonical, env)
                except (ZeroDivisionError, ValueError, OverflowError, GradlabError):
                    continue
                if isinstance(a, mpmath.mpc) or isinstance(b, mpmath.mpc):
                    continue
                if not (mpmath.isfinite(a) and mpmath.isfinite(b)):
                    continue
                return bool(abs(a - b) <= mpmath.mpf(10) ** -12 * max(1, abs(a), abs(b)))
    except Exception:  # noqa: BLE001 - any failure to compare means: do not trust the entry
        return False
    return False


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
    return _field(as_loss(loss), get_view(view).name)


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
    loss, v = as_loss(loss), get_view(view)
    wrt = [*variables(loss, v), *loss.hyperparameters]
    return _partials(loss, v, wrt)


def derivative(loss: LossLike, wrt: str, view: str | View = "log") -> sympy.Expr:
    """The partial derivative of the loss with respect to ``wrt`` in ``view`` (readable form).

    Only this one partial is derived. Results are cached in memory and on disk; a disk entry
    is used only if it agrees with a numerical derivative of the loss at random points.
    """
    loss, v = as_loss(loss), get_view(view)
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
            if len(loaded) > 1 and _are_derivatives(candidates, expr):
                wrong: list[str] = []
            else:  # one check per entry: only the wrong ones are derived again
                wrong = [n for n, (_, e) in loaded.items() if not _is_derivative(e, expr, symbol_of(n))]
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


def _is_derivative(candidate: sympy.Expr, expr: sympy.Expr, sym: Symbol) -> bool:
    """Whether a cached ``candidate`` is d expr / d sym (see :func:`_are_derivatives`)."""
    return _are_derivatives({sym: candidate}, expr)


def _are_derivatives(candidates: Mapping[Symbol, sympy.Expr], expr: sympy.Expr) -> bool:
    """Whether every cached ``candidates[s]`` is d expr / d s, checked together: at a random
    point p and a random direction u, the directional derivative d/dt expr(p + t u) at t = 0
    (mpmath's numerical derivative at 30 digits, error far below the tolerance) must equal
    sum_s u_s candidates[s](p) to 1e-12 relative to max(1, sum_s |u_s candidates[s](p)|, |lhs|).
    u_s = r_s / max(1, |candidates[s](p)|) with |r_s| in [1, 2] and a random sign, so every term
    is at most 2 in size and each entry is checked to about 2 k 1e-12 of max(1, its value) for k
    entries (the one-entry check: 1e-12).

    One numerical derivative serves every partial (two evaluations of ``expr`` instead of two
    per partial). The point and the direction come from the
    operating system's random source, so wrong entries cannot be crafted to cancel each other
    or to pass; at a random point a wrong entry passes with probability zero. Up to six points
    are tried where the functions cannot be evaluated; a failure to evaluate counts as a
    mismatch (the caller then checks each entry alone and re-derives the ones that fail)."""
    import mpmath

    syms = sorted(expr.free_symbols, key=lambda s: s.name)
    if not candidates or any(s not in syms or not c.free_symbols <= set(syms) for s, c in candidates.items()):
        return False
    rng = random.SystemRandom()
    try:
        with mpmath.workdps(30):
            for _ in range(6):
                point = {s: _sample(s, rng) for s in syms}
                try:
                    values = {s: _mp_eval(c, point) for s, c in candidates.items()}
                except (ZeroDivisionError, ValueError, OverflowError, GradlabError):
                    continue
                if not all(not isinstance(x, mpmath.mpc) and mpmath.isfinite(x) for x in values.values()):
                    continue
                # each component divided by its entry's size, so that every entry weighs about
                # the same in the sum: a small partial beside a huge one is still checked to
                # ~1e-11 of its own size, as when each is checked alone
                direction = {s: rng.choice((-1, 1)) * (1 + rng.random()) / max(1, abs(x)) for s, x in values.items()}

                def along(t, point=point, direction=direction):
                    return _mp_eval(expr, {s: x + t * direction[s] if s in direction else x for s, x in point.items()})

                try:
                    b = mpmath.diff(along, 0)
                except (ZeroDivisionError, ValueError, OverflowError, GradlabError):
                    continue
                if isinstance(b, mpmath.mpc) or not mpmath.isfinite(b):
                    continue
                terms = [direction[s] * x for s, x in values.items()]
                a = mpmath.fsum(terms)
                scale = max(mpmath.mpf(1), mpmath.fsum(abs(x) for x in terms), abs(b))
                return bool(abs(a - b) <= mpmath.mpf(10) ** -12 * scale)
    except Exception:  # noqa: BLE001 - any failure to compare means: do not trust the entries
        return False
    return False


@caches.memo(maxsize=1)
def _mp_table() -> dict[Any, Callable[..., Any]]:
    import mpmath

    fns = _mp_modules()[0]
    return {
        sympy.log: mpmath.log,
        sympy.tanh: mpmath.tanh,
        sympy.Abs: abs,
        sympy.Max: max,
        sympy.Min: min,
        sympy.exp: fns["exp"],
        sympy.Heaviside: fns["Heaviside"],
        sympy.sign: mpmath.sign,
        sympy.DiracDelta: fns["DiracDelta"],
        **{f: fns[name] for name, f in SPECIAL_FUNCTIONS.items()},
    }


def _mp_eval(expr: sympy.Expr, env: Mapping[Symbol, Any]) -> Any:
    """The value of ``expr`` at ``env`` in mpmath, by walking the tree: a fraction of a
    millisecond where ``lambdify`` costs a tenth of a second. Covers the vocabulary of derived
    expressions; anything else raises ValueError."""
    import mpmath

    if expr.is_Symbol:
        return env[expr]
    if expr.is_Rational:
        return mpmath.mpf(expr.p) / expr.q
    if expr.is_Float:
        return mpmath.mpf(expr._mpf_)
    if expr is sympy.pi:
        return +mpmath.pi
    if expr is sympy.E:
        return mpmath.e + 0
    args = [_mp_eval(a, env) for a in expr.args]
    if expr.is_Add:
        return mpmath.fsum(args)
    if expr.is_Mul:
        return mpmath.fprod(args)
    if expr.is_Pow:
        return mpmath.power(args[0], args[1])
    fn = _mp_table().get(expr.func)
    if fn is None:
        raise ValueError(f"cannot evaluate {expr.func}")
    return fn(*args)


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
    loss = as_loss(loss)
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
    import jax
    import jax.numpy as jnp

    def jax_log1mexp(x):
        safe_hi = jnp.minimum(x, -1e-300)
        return jnp.where(x > -0.6931471805599453, jnp.log(-jnp.expm1(safe_hi)), jnp.log1p(-jnp.exp(x)))

    return [
        {"sigmoid": jax.nn.sigmoid, "softplus": jax.nn.softplus, "log1mexp": jax_log1mexp},
        "jax",
    ]


def _mp_modules():
    """mpmath versions of the special functions in their stable forms (log1p/expm1 instead of
    log(1 + e^x)), so no cancellation at any precision, and an ``exp`` that refuses arguments
    beyond the ``exp_argument`` budget instead of working for minutes on a number whose
    exponent alone has billions of digits."""
    import mpmath

    def mp_exp(x):
        if abs(x) > budgets.get("exp_argument"):
            raise budgets.BudgetError(
                "exp_argument",
                f"evaluating needs exp(x) at x = {mpmath.nstr(x, 5)}, beyond the 'exp_argument' budget "
                f"of {budgets.get('exp_argument'):g} (the result's decimal exponent would have more "
                f"than 12 digits); " + budgets.how_to_raise("exp_argument"),
            )
        return mpmath.exp(x)

    def negligible(x):
        # e^-x < 2^-(prec + 16) relative to 1: the correction is below the working precision
        return x > (mpmath.mp.prec + 16) * 0.6931471805599453

    def mp_softplus(x):
        if x > 0:
            return x if negligible(x) else x + mpmath.log1p(mp_exp(-x))
        return mpmath.log1p(mp_exp(x))

    def mp_sigmoid(x):
        if x >= 0:
            return mpmath.mpf(1) if negligible(x) else 1 / (1 + mp_exp(-x))
        e = mp_exp(x)
        return e / (1 + e)

    def mp_log1mexp(x):
        # Maechler's split: log(-expm1(x)) near 0, log1p(-exp(x)) below -log 2
        if x > -0.6931471805599453:
            return mpmath.log(-mpmath.expm1(x))
        return mpmath.log1p(-mp_exp(x))

    def mp_heaviside(x, h0=mpmath.mpf(1) / 2):
        return mpmath.mpf(1) if x > 0 else mpmath.mpf(0) if x < 0 else mpmath.mpf(h0)

    def mp_dirac(x, *k):
        if x != 0:
            return mpmath.mpf(0)
        raise DomainError(
            "the derivative has a Dirac delta at this point (a kink of max, min, abs "
            "or Heaviside): it is not defined here"
        )

    return [
        {
            "exp": mp_exp,
            "sigmoid": mp_sigmoid,
            "softplus": mp_softplus,
            "log1mexp": mp_log1mexp,
            "Heaviside": mp_heaviside,
            "DiracDelta": mp_dirac,
            "sign": mpmath.sign,
        },
        "mpmath",
    ]


def numeric(
    expr: sympy.Expr,
    args: Iterable[str | Symbol],
    backend: str = "numpy",
    *,
    strict: bool = False,
    cse: bool = False,
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
    """
    if backend not in ("numpy", "jax", "mpmath"):
        raise GradlabError(f"unknown backend {backend!r}; use numpy, jax or mpmath")
    if isinstance(args, str | Symbol):
        args = [args]
    syms = tuple(a if isinstance(a, Symbol) else symbol_of(a) for a in args)
    expr = budgets.check_size(as_expr(expr), "the expression to compile")
    f = _numeric(expr, syms, backend, cse)
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
def _numeric(expr: sympy.Expr, syms: tuple[Symbol, ...], backend: str, cse: bool = False) -> Callable[..., Any]:
    # lambdify costs milliseconds per call; figures, checks and notebooks reuse the same forms
    if backend == "numpy":
        return sympy.lambdify(syms, stabilise(expr), modules=_np_modules(), cse=cse)
    if backend == "jax":
        return sympy.lambdify(syms, stabilise(expr), modules=_jax_modules(), cse=cse)
    if backend == "mpmath":
        return sympy.lambdify(syms, expr, modules=_mp_modules(), cse=cse)
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
    """
    loss, v = as_loss(loss), get_view(view)
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 100:
        raise DomainError(f"digits={digits!r} must be a whole number from 1 to 100")
    names = variables(loss, v)
    point = exact_point(names, at, loss)
    params = parameter_values(loss, values)
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
        x = _exact_number(n, at[n])
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


_DECIMAL_EXPONENT_LIMIT = 10**6  # |exponent| of a decimal input; beyond it the digits alone are megabytes


def _exact_number(name: str, value: Any) -> sympy.Rational:
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
            return _exact_number(name, float(value))  # numpy scalars and the like
        except (TypeError, ValueError, OverflowError):
            raise DomainError(f"{name}={value!r} is not a number") from None
    import re

    m = re.fullmatch(r"\s*([+-]?)(\d+\.?\d*|\.\d+)(?:[eE]([+-]?\d{1,9}))?\s*", text)
    if m is None:
        raise DomainError(f"{name}={value!r} is not a decimal number")
    sign, mantissa, exponent = m.group(1), m.group(2), int(m.group(3) or 0)
    if len(mantissa) > 1000 or abs(exponent) > _DECIMAL_EXPONENT_LIMIT:
        raise DomainError(
            f"{name}={text.strip()[:40]}: numbers are limited to 1000 digits and decimal "
            f"exponents of at most {_DECIMAL_EXPONENT_LIMIT}"
        )
    whole, _, frac = mantissa.partition(".")
    q = sympy.Rational(int(whole + frac or "0"), 10 ** len(frac)) * sympy.Rational(10) ** exponent
    return -q if sign == "-" else q


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
            with mpmath.workdps(digits + 20):
                return mpmath.mpf(exact.p) / exact.q
        f, names = numeric(exact, [], "mpmath"), []
    else:
        f = numeric(expr, syms, "mpmath")
    previous, dps, top = None, 30, int(budgets.get("eval_digits"))
    while True:
        with mpmath.workdps(dps):
            args = [mpmath.mpf(point[n].p) / point[n].q for n in names]
            try:
                value = f(*args)
            except GradlabError:
                raise
            except (ZeroDivisionError, OverflowError, ValueError) as exc:
                raise DomainError(f"{label} is undefined at this point ({exc or type(exc).__name__})") from None
            if isinstance(value, mpmath.mpc):
                if value.imag and abs(value.imag) > abs(value) * mpmath.mpf(10) ** (-dps // 2):
                    raise DomainError(f"{label} is not real at this point")
                value = value.real
            value = mpmath.mpf(value)
            if mpmath.isnan(value):
                raise DomainError(f"{label} is undefined (NaN) at this point")
            if mpmath.isinf(value):
                raise DomainError(f"{label} is infinite at this point (the edge of its domain)")
            # a zero is only trusted where it persists up to the top precision: cancellation
            # deeper than the working precision also gives 0
            if previous is not None and _agree(previous, value, digits) and (value != 0 or dps * 2 > top):
                return value
        if dps * 2 > top:
            raise budgets.BudgetError(
                "eval_digits",
                f"{label} could not be computed to {digits} correct digits: results at {dps // 2} and "
                f"{dps} digits of precision disagree ({mpmath.nstr(previous, 8)} vs {mpmath.nstr(value, 8)}), "
                f"and the 'eval_digits' budget is {top}; " + budgets.how_to_raise("eval_digits"),
            )
        previous, dps = value, dps * 2


def _agree(a: Any, b: Any, digits: int) -> bool:
    import mpmath

    if a == b:
        return True
    return abs(a - b) <= mpmath.mpf(10) ** (-digits) * max(abs(a), abs(b))


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
    seed: int = 0,
    min_points: int | None = None,
) -> bool:
    """Whether ``a`` and ``b`` are the same function: exact simplification first, then a
    comparison at random points in the variables' domains with ``digits`` of precision.

    The numeric comparison draws up to ``4 * samples`` points and stops after ``samples`` of them
    evaluate to finite numbers. Points where either side fails to evaluate (a pole, a log of a
    negative number, a non-finite value) are skipped, but if fewer than ``min_points`` (default
    ``samples // 2``, at least 1) evaluate the answer is False: a comparison at too few points
    has not shown anything.
    Strings go through the safe parser; simplification runs under the
    ``simplify_s`` budget (running out of it is not an error: the numbers decide).
    """
    import mpmath

    a, b = as_expr(a, "the first expression"), as_expr(b, "the second expression")
    for name, n, hi in (("samples", samples, 10_000), ("digits", digits, 10_000)):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= hi:
            raise GradlabError(f"{name}={n!r} must be a whole number from 1 to {hi}")
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
    f = numeric(diff, syms, "mpmath")
    g = numeric(standard(a), syms, "mpmath")
    rng = random.Random(seed)
    evaluated = 0
    with budgets.timed("evaluate_s", "comparing the expressions at random points"), mpmath.workdps(digits):
        for _ in range(4 * samples):
            if evaluated >= samples:
                break
            point = [_sample(s, rng) for s in syms]
            try:
                d, scale = f(*point), g(*point)
            except (ZeroDivisionError, ValueError, TypeError, OverflowError, DomainError):
                continue
            if not (_finite_real(d) and _finite_real(scale)):
                continue
            evaluated += 1
            if abs(d) > mpmath.mpf(10) ** (-(digits // 2)) * max(1, abs(scale)):
                return False
    return evaluated >= needed


def _finite_real(x: Any) -> bool:
    import mpmath

    try:
        return bool(mpmath.isfinite(x)) and (not isinstance(x, mpmath.mpc) or x.imag == 0)
    except TypeError:
        return False


def _sample(sym: Symbol, rng: random.Random):
    import mpmath

    info = SYMBOLS.get(sym.name) or HYPERPARAMETERS.get(sym.name)
    if info is not None:
        d = info.domain
        lo = d.low if math.isfinite(d.low) else -3.0
        hi = d.high if math.isfinite(d.high) else lo + 3.0 if math.isfinite(d.low) else 3.0
        if sym.name.startswith("len"):
            lo, hi = 1.0, 20.0
        x = lo + (hi - lo) * (0.05 + 0.9 * rng.random())
    elif sym.is_positive:
        x = 0.1 + 2.0 * rng.random()
    elif sym.is_nonpositive:
        x = -0.1 - 2.0 * rng.random()
    else:
        x = -2.0 + 4.0 * rng.random()
    return mpmath.mpf(x)
