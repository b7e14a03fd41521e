"""Derivations: gradients in any view, readable forms, LaTeX, limits and numeric functions.

Every gradient is computed from a loss's one canonical expression: the view's substitution is
applied, then sympy differentiates (the chain rule is sympy's job, never ours). Results are
cached in memory and on disk (see :mod:`gradlab._cache`).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import sympy
from sympy import Symbol, exp

from gradlab import _cache
from gradlab.errors import DomainError, UnknownVariableError
from gradlab.losses import Loss, get_loss
from gradlab.symbols import (
    HYPERPARAMETERS,
    SPECIAL_FUNCTIONS,
    SYMBOLS,
    VIEWS,
    View,
    sigmoid,
    softplus,
    to_special,
)

__all__ = [
    "as_loss",
    "get_view",
    "in_view",
    "variables",
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
    return get_loss(loss) if isinstance(loss, str) else loss


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
    expr = loss.expr.xreplace(dict(v.substitution)) if v.substitution else loss.expr
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


def variables(loss: LossLike, view: str | View = "log") -> list[str]:
    """The view variables the loss depends on, in the view's order."""
    expr, v = in_view(loss, view), get_view(view)
    return [s.name for s in v.variables if s in expr.free_symbols]


def _wrt_allowed(loss: Loss, view: View) -> list[str]:
    return [s.name for s in view.variables] + list(loss.hyperparameters)


# --------------------------------------------------------------------------------------------
# Readable and standard forms
# --------------------------------------------------------------------------------------------

def readable(expr: sympy.Expr) -> sympy.Expr:
    """Rewrite exp/log patterns into sigmoid, softplus and log1mexp, then pull out common factors.

    The result is deterministic (it depends only on the expression), so it prints stably.
    """
    expr = sympy.sympify(expr)
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
    return sympy.sympify(expr).rewrite(exp) if _has_special(expr) else sympy.sympify(expr)


def _has_special(expr: sympy.Expr) -> bool:
    return any(expr.has(f) for f in SPECIAL_FUNCTIONS.values())


def latex(expr: sympy.Expr) -> str:
    """LaTeX as people write it: grouped log-ratios, Greek hyperparameters (gradlab.printing)."""
    from gradlab import printing

    return printing.latex(expr)


# --------------------------------------------------------------------------------------------
# Derivatives, cached
# --------------------------------------------------------------------------------------------

_MEMO: dict[str, dict[str, sympy.Expr]] = {}


def gradient(loss: LossLike, view: str | View = "log") -> dict[str, sympy.Expr]:
    """Every first partial derivative of the loss in ``view``: with respect to each view
    variable the loss depends on, and each of its hyperparameters. Readable forms, cached."""
    loss, v = as_loss(loss), get_view(view)
    expr = in_view(loss, v)
    key = _cache.make_key("gradient", v.name, sympy.srepr(expr))
    found = _MEMO.get(key)
    if found is None:
        found = _cache.load(key)
        if not isinstance(found, dict):
            wrt = [SYMBOLS[n].symbol for n in variables(loss, v)]
            wrt += [HYPERPARAMETERS[n].symbol for n in loss.hyperparameters]
            found = {s.name: readable(sympy.diff(expr, s)) for s in wrt}
            _cache.store(key, found)
        _MEMO[key] = found
    return dict(found)


def derivative(loss: LossLike, wrt: str, view: str | View = "log") -> sympy.Expr:
    """The partial derivative of the loss with respect to ``wrt`` in ``view``."""
    loss, v = as_loss(loss), get_view(view)
    allowed = _wrt_allowed(loss, v)
    if wrt not in allowed:
        raise UnknownVariableError(
            f"cannot differentiate '{loss.name}' with respect to '{wrt}' in the {v.name} view; "
            f"allowed: {', '.join(allowed)}"
        )
    return gradient(loss, v).get(wrt, sympy.S.Zero)


def clear_memory_cache() -> None:
    _MEMO.clear()


# --------------------------------------------------------------------------------------------
# Values of hyperparameters and variables
# --------------------------------------------------------------------------------------------


def _finite(name: str, value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DomainError(f"{name}={value!r} is not a number") from None
    if not math.isfinite(x):
        raise DomainError(f"{name}={value!r} is not finite")
    return x


def parameter_values(loss: LossLike, values: Mapping[str, Any] | None = None) -> dict[Symbol, Any]:
    """Hyperparameter symbols mapped to numbers: the loss's defaults overridden by ``values``.

    Unknown names and values outside a hyperparameter's legal range raise a clear error.
    """
    loss = as_loss(loss)
    values = dict(values or {})
    unknown = sorted(set(values) - set(loss.hyperparameters))
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
        return jnp.where(
            x > -0.6931471805599453, jnp.log(-jnp.expm1(safe_hi)), jnp.log1p(-jnp.exp(x))
        )

    return [
        {"sigmoid": jax.nn.sigmoid, "softplus": jax.nn.softplus, "log1mexp": jax_log1mexp},
        "jax",
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
    syms = tuple(a if isinstance(a, Symbol) else symbol_of(a) for a in args)
    f = _numeric(sympy.sympify(expr), syms, backend, cse)
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
    expr = sympy.sympify(expr)
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


@functools.lru_cache(maxsize=4096)
def _numeric(expr: sympy.Expr, syms: tuple[Symbol, ...], backend: str, cse: bool = False) -> Callable[..., Any]:
    # lambdify costs milliseconds per call; figures, checks and notebooks reuse the same forms
    if backend == "numpy":
        return sympy.lambdify(syms, stabilise(expr), modules=_np_modules(), cse=cse)
    if backend == "jax":
        return sympy.lambdify(syms, stabilise(expr), modules=_jax_modules(), cse=cse)
    if backend == "mpmath":
        return sympy.lambdify(syms, standard(expr), modules="mpmath", cse=cse)
    raise ValueError(f"unknown backend '{backend}'; use numpy, jax or mpmath")


def symbol_of(name: str) -> Symbol:
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
    digits: int = 30,
) -> dict[str, Any]:
    """The loss value and every first partial derivative at a point, in ``view``.

    Evaluation uses mpmath at ``digits`` significant digits, so probabilities far below float64's
    range and gradients far above it are exact; the results are mpmath numbers (convert with
    ``float`` where they fit).
    """
    import mpmath

    loss, v = as_loss(loss), get_view(view)
    names = variables(loss, v)
    point = check_point(names, at, loss)
    params = parameter_values(loss, values)
    grads = gradient(loss, v)
    args = [SYMBOLS[n].symbol for n in names]
    out: dict[str, Any] = {}
    with mpmath.workdps(digits):
        mp_point = [mpmath.mpf(point[n]) for n in names]
        for name, expr in [("loss", in_view(loss, v)), *grads.items()]:
            f = numeric(expr.xreplace(params), args, "mpmath")
            value = f(*mp_point)
            if isinstance(value, mpmath.mpc) or (hasattr(value, "imag") and value.imag):
                raise DomainError(f"{name} is not real at this point")
            out[name] = mpmath.mpf(value)
            if mpmath.isnan(out[name]):
                raise DomainError(f"{name} is undefined (NaN) at this point")
    return out


# --------------------------------------------------------------------------------------------
# Limits and equivalence
# --------------------------------------------------------------------------------------------


def limit(
    expr: sympy.Expr,
    var: str | Symbol,
    point: Any,
    direction: str = "+",
    values: Mapping[str | Symbol, Any] | None = None,
) -> sympy.Expr:
    """``lim expr`` as ``var -> point`` from ``direction``, after substituting ``values``."""
    sym = var if isinstance(var, Symbol) else symbol_of(var)
    subs = {(k if isinstance(k, Symbol) else symbol_of(k)): sympy.sympify(v) for k, v in (values or {}).items()}
    e = standard(sympy.sympify(expr).xreplace(subs))
    e = sympy.powsimp(sympy.expand_log(e, force=True), force=True)
    return sympy.limit(e, sym, point, direction)


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
    """
    import mpmath

    a, b = sympy.sympify(a), sympy.sympify(b)
    diff = standard(a) - standard(b)
    if diff == 0:
        return True
    try:
        if sympy.simplify(diff) == 0:
            return True
    except Exception:  # noqa: BLE001 - simplify can fail on exotic forms; fall back to numbers
        pass
    needed = max(1, samples // 2) if min_points is None else max(1, min_points)
    syms = sorted(diff.free_symbols, key=lambda s: s.name)
    f = sympy.lambdify(syms, diff, modules="mpmath")
    g = sympy.lambdify(syms, standard(a), modules="mpmath")
    rng = random.Random(seed)
    evaluated = 0
    with mpmath.workdps(digits):
        for _ in range(4 * samples):
            if evaluated >= samples:
                break
            point = [_sample(s, rng) for s in syms]
            try:
                d, scale = f(*point), g(*point)
            except (ZeroDivisionError, ValueError, TypeError, OverflowError):
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
