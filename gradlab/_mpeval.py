"""Evaluating an expression in mpmath with a bound on its error, and its derivative along a line.

:func:`walk` computes the value of a sympy expression at a point by walking its tree (a fraction
of a millisecond, where ``lambdify`` costs a tenth of a second), and with it:

- a bound on the absolute error of that value, from a running error analysis: every operation
  at working precision ``p`` (unit roundoff ``u = 2^-p``) adds ``|value| u``, and each function
  passes on its input's error times its derivative (``exp`` multiplies it by ``|value|``, ``log``
  divides it by ``|x|``, a sum adds its terms' errors). A sum that cancels keeps the error of
  its large terms, so ``exp(x) - 1`` at ``x = -1e-990`` computed at 30 digits gives ``0`` with an
  error bound of ``2e-30``: the caller sees that not one digit is known. The bound is
  first-order, which is exact enough wherever it is small, the only case in which a caller
  accepts a value;
- optionally, the exact derivative along a direction (forward-mode differentiation: each node
  carries d/dt of its value), for checking a claimed gradient against the expression itself.

The vocabulary is that of gradlab's losses and their derivatives: rationals, floats, pi, E,
``+ * **``, exp, log, tanh, Abs, Max, Min, Heaviside, sign, DiracDelta and the special functions
of :mod:`gradlab.symbols`. Anything else raises :class:`Unsupported`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import sympy

from gradlab import caches
from gradlab.errors import DomainError

__all__ = ["Unsupported", "walk", "value", "resolved"]


class Unsupported(ValueError):
    """The expression holds a function outside the evaluator's vocabulary."""


_LN2 = 0.6931471805599453


@caches.memo(maxsize=1)
def _table() -> dict[Any, str]:
    from gradlab.symbols import SPECIAL_FUNCTIONS

    table = {sympy.exp: "exp", sympy.log: "log", sympy.tanh: "tanh", sympy.Abs: "abs", sympy.Max: "max",
             sympy.Min: "min", sympy.Heaviside: "heaviside", sympy.sign: "sign", sympy.DiracDelta: "dirac"}
    table.update({f: name for name, f in SPECIAL_FUNCTIONS.items()})
    return table


@caches.memo(maxsize=1)
def _functions() -> Mapping[str, Callable[..., Any]]:
    return mp_modules()[0]


def _budget() -> float:
    from gradlab import budgets

    return budgets.get("exp_argument")


def walk(expr: sympy.Expr, env: Mapping[sympy.Symbol, Any], tangent: Mapping[sympy.Symbol, Any] | None = None,
         *, underflow: bool = False):
    """``(value, error, derivative)`` of ``expr`` at ``env`` at mpmath's working precision.

    ``error`` bounds the absolute error of ``value`` (``inf`` where a branch of Heaviside, sign
    or max cannot be decided); ``derivative`` is d/dt expr(env + t tangent) at t = 0, or None
    without a ``tangent``. The point's values are taken as exact.
    """
    import mpmath

    fns = _functions()
    u = mpmath.eps
    inf = mpmath.inf
    zero = mpmath.mpf(0)
    with_d = tangent is not None

    def tiny(fn, x):
        # a slope that is e^x far below 0: 0 where e^x is beyond the exp_argument budget (it
        # only scales an error bound, by less than e^-budget)
        return zero if x < -_budget() else fn(x)

    seen: dict[Any, Any] = {}  # derived trees repeat subtrees (sigmoid of the margin): each once

    def go(e):
        found = seen.get(e)
        if found is None:
            found = seen[e] = node(e)
        return found

    def node(e):
        if e.is_Symbol:
            x = env[e]
            return x, zero, (tangent.get(e, zero) if tangent is not None else None)
        if e.is_Rational:
            x = mpmath.mpf(e.p) / e.q
            return x, (zero if e.is_Integer and abs(e.p) < 2**mpmath.mp.prec else abs(x) * u), zero
        if e.is_Float:
            x = mpmath.mpf(e._mpf_)
            return +x, abs(x) * u, zero
        if e is sympy.pi:
            return +mpmath.pi, mpmath.pi * u, zero
        if e is sympy.E:
            return mpmath.e + 0, 3 * u, zero
        args = [go(a) for a in e.args]
        if e.is_Add:
            v = mpmath.fsum(a[0] for a in args)
            err = mpmath.fsum(a[1] for a in args) + abs(v) * u
            return v, err, (mpmath.fsum(a[2] for a in args) if with_d else None)
        if e.is_Mul:
            v = mpmath.fprod(a[0] for a in args)
            err, d = zero, zero
            for i, (_, ex, dx) in enumerate(args):
                rest = mpmath.fprod(a[0] for j, a in enumerate(args) if j != i)
                err += ex * abs(rest)
                if with_d:
                    d += dx * rest
            return v, err + abs(v) * u * len(args), (d if with_d else None)
        if e.is_Pow:
            (a, ea, da), (b, eb, db) = args
            v = mpmath.power(a, b)
            if isinstance(v, mpmath.mpc):
                raise ValueError("not real")
            if a == 0:
                if ea:
                    return v, inf, zero
                return v, zero, zero
            ln = mpmath.log(abs(a))
            err = abs(v) * (abs(b) * ea / abs(a) + abs(ln) * eb + u)
            d = v * (db * ln + b * da / a) if with_d else None
            return v, err, d
        name = _table().get(e.func)
        if name is None:
            raise Unsupported(f"cannot evaluate {e.func}")
        (x, ex, dx), *more = args
        if underflow and name in ("exp", "sigmoid", "softplus", "log1mexp") and x < -_budget():
            # each is e^x to first order there, below e^-budget: 0, with that as its error
            return zero, fns["exp"](-_budget()), zero
        if name == "exp":
            v = fns["exp"](x)
            return v, v * (ex + u), (v * dx if with_d else None)
        if name == "log":
            if x <= 0:
                raise ValueError("log of a number <= 0")
            v = mpmath.log(x)
            return v, ex / x + abs(v) * u, (dx / x if with_d else None)
        if name == "sigmoid":
            v = fns["sigmoid"](x)
            slope = v * tiny(fns["sigmoid"], -x)  # not v (1 - v): 1 - v is 0 at the working precision for x >> 1
            return v, slope * ex + v * u, (slope * dx if with_d else None)
        if name == "softplus":
            v = fns["softplus"](x)
            slope = tiny(fns["sigmoid"], x)
            return v, slope * ex + abs(v) * u, (slope * dx if with_d else None)
        if name == "log1mexp":
            if x >= 0:
                raise ValueError("log1mexp of a number >= 0")
            v = fns["log1mexp"](x)
            slope = -1 / mpmath.expm1(-x)
            return v, abs(slope) * ex + abs(v) * u, (slope * dx if with_d else None)
        if name == "tanh":
            v = mpmath.tanh(x)
            slope = mpmath.sech(x) ** 2  # not 1 - v^2, which is 0 at the working precision for |x| >> 1
            return v, slope * ex + abs(v) * u, (slope * dx if with_d else None)
        if name == "abs":
            return abs(x), ex, ((dx if x > 0 else -dx) if with_d else None)
        if name in ("max", "min"):
            pick = (max if name == "max" else min)(args, key=lambda a: a[0])
            return pick[0], max(a[1] for a in args), pick[2]
        undecided = ex > 0 and abs(x) <= ex
        if name == "heaviside":
            h0 = more[0][0] if more else mpmath.mpf(1) / 2
            v = mpmath.mpf(1) if x > 0 else zero if x < 0 else h0
            return v, (inf if undecided else zero), zero
        if name == "sign":
            return mpmath.sign(x), (inf if undecided else zero), zero
        # DiracDelta: zero away from its point, undefined at it
        return fns["DiracDelta"](x, *(a[0] for a in more)), (inf if undecided else zero), zero

    return go(expr)


def value(expr: sympy.Expr, env: Mapping[sympy.Symbol, Any]) -> Any:
    """The value alone (see :func:`walk`)."""
    return walk(expr, env)[0]


def resolved(v: Any, err: Any, rel: Any) -> bool:
    """Whether a value with error bound ``err`` is known to relative accuracy ``rel`` (an exact
    zero, with no error, counts)."""
    return err == 0 or err <= rel * abs(v)


def mp_modules() -> list[Any]:
    """mpmath versions of the special functions in their stable forms (log1p/expm1 instead of
    log(1 + e^x)), so no cancellation at any precision, and an ``exp`` that refuses arguments
    beyond the ``exp_argument`` budget instead of working for minutes on a number whose
    exponent alone has billions of digits."""
    import mpmath

    from gradlab import budgets

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
