"""Evaluating an expression in mpmath with a bound on its error, and its derivative along a line.

An expression is evaluated as a small tree of operations (:func:`tree` makes one from a sympy
expression; :func:`to_json` and :func:`from_json` carry one through a JSON table, as data: an
operation's name from a fixed vocabulary, its children, and exact rational constants; nothing
in it is ever executed). :func:`walk` computes the value of a sympy expression at a point by
walking its tree (a fraction of a millisecond, where ``lambdify`` costs a tenth of a second),
and with it:

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

:func:`evaluate` is ``gradlab eval`` without sympy, for a tree read from the shipped table: it
first settles the tree at the exact rational point (:func:`settle`: rational arithmetic, like
terms and factors collected, ``exp(0) = 1``, ``log(1) = 0``, ``Heaviside(0) = 1/2``, so equal
terms that cancel give an exact 0 and a kink its midpoint, as sympy's automatic evaluation does
for the derived path), then evaluates what is left at 30, 60, 120, ... digits until the error
bound shows the wanted digits are known, or refuses (:func:`converged`, shared with
:func:`gradlab.symbolic.evaluate`).

The vocabulary is that of gradlab's losses and their derivatives: rationals, floats, pi, E,
``+ * **``, exp, log, tanh, Abs, Max, Min, Heaviside, sign, DiracDelta and the special functions
of :mod:`gradlab.symbols`. Anything else raises :class:`Unsupported`.

This module imports sympy only inside the functions that take a sympy expression.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

from gradlab import budgets, caches
from gradlab.errors import DomainError, GradlabError

__all__ = ["Unsupported", "Undefined", "OPS", "supported", "tree", "walk", "walk_tree", "value", "resolved",
           "mp_modules", "to_json", "from_json", "settle", "converged", "evaluate", "exact_decimal", "exact_value",
           "within"]


class Unsupported(ValueError):
    """The expression holds a function outside the evaluator's vocabulary."""


# An operation's name and how many children it takes (None: any number). A tree is a rational
# constant (a Fraction), ("sym", key), ("float", mpmath number) or (op, *children).
OPS: Mapping[str, tuple[int, int | None]] = {
    "add": (1, None), "mul": (1, None), "pow": (2, 2), "exp": (1, 1), "log": (1, 1), "sigmoid": (1, 1),
    "softplus": (1, 1), "log1mexp": (1, 1), "tanh": (1, 1), "abs": (1, 1), "max": (1, None),
    "min": (1, None), "heaviside": (1, 2), "sign": (1, 1), "dirac": (1, None), "pi": (0, 0), "e": (0, 0),
}

_LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------------
# Trees: from sympy, and through JSON
# --------------------------------------------------------------------------------------------


@caches.memo(maxsize=1)
def _sympy_ops() -> dict[Any, str]:
    import sympy

    from gradlab.symbols import SPECIAL_FUNCTIONS

    table = {sympy.exp: "exp", sympy.log: "log", sympy.tanh: "tanh", sympy.Abs: "abs", sympy.Max: "max",
             sympy.Min: "min", sympy.Heaviside: "heaviside", sympy.sign: "sign", sympy.DiracDelta: "dirac"}
    table.update({f: name for name, f in SPECIAL_FUNCTIONS.items()})
    return table


def supported(func: Any) -> bool:
    """Whether the sympy function ``func`` is in the vocabulary."""
    return func in _sympy_ops()


@caches.memo(maxsize=512)
def tree(expr: Any) -> Any:
    """The tree of a sympy expression; a subtree that repeats (sigmoid of the margin) is one
    object, so a walk computes it once. Symbols stay sympy symbols (the key of ``env``)."""
    import sympy

    ops = _sympy_ops()
    made: dict[Any, Any] = {}

    def go(e):
        found = made.get(e)
        if found is None:
            found = made[e] = node(e)
        return found

    def node(e):
        if e.is_Symbol:
            return ("sym", e)
        if e.is_Rational:
            return Fraction(int(e.p), int(e.q))
        if e.is_Float:
            import mpmath

            return ("float", mpmath.mpf(e._mpf_))
        if e is sympy.pi:
            return ("pi",)
        if e is sympy.E:
            return ("e",)
        if e.is_Add:
            return ("add", *map(go, e.args))
        if e.is_Mul:
            return ("mul", *map(go, e.args))
        if e.is_Pow:
            return ("pow", go(e.base), go(e.exp))
        name = ops.get(e.func)
        if name is None:
            raise Unsupported(f"cannot evaluate {e.func}")
        return (name, *map(go, e.args))

    return go(expr)


_CONSTANT = re.compile(r"-?\d{1,400}(/\d{1,400})?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,40}")


def to_json(roots: Mapping[str, Any]) -> dict[str, Any]:
    """Sympy expressions, by label, as ``{"nodes": [...], "roots": {label: index}}``: each node is
    ``["q", "p/q"]`` (an exact rational), ``["sym", name]`` or ``[op, child, ...]`` with children
    given by their index among the nodes before it; a subtree shared by several expressions is
    stored once. Floats are refused (:class:`Unsupported`): a table holds exact numbers only."""
    nodes: list[list[Any]] = []
    by_item: dict[tuple[Any, ...], int] = {}  # equal nodes, within one tree or across them, once
    done: dict[int, int] = {}
    keep: list[Any] = []  # the trees stay alive while their ids are keys

    def put(t):
        found = done.get(id(t))
        if found is not None:
            return found
        if isinstance(t, Fraction):
            item = ("q", str(t))
        elif t[0] == "sym":
            item = ("sym", t[1].name)
        elif t[0] == "float":
            raise Unsupported("a float constant: the table holds exact rationals only")
        else:
            item = (t[0], *map(put, t[1:]))
        if item not in by_item:
            by_item[item] = len(nodes)
            nodes.append(list(item))
        keep.append(t)
        done[id(t)] = by_item[item]
        return done[id(t)]

    return {"nodes": nodes, "roots": {label: put(tree(e)) for label, e in roots.items()}}


def from_json(doc: Mapping[str, Any], names: frozenset[str] | set[str]) -> dict[str, Any]:
    """The trees of :func:`to_json`'s document, by label, checked: every operation is in the
    vocabulary with its number of children, every child comes before its parent, every symbol is
    one of ``names``, every constant is an integer or a fraction of integers (at most 400
    digits each). Raises ``ValueError`` on anything else. Nothing read is executed."""
    nodes, roots = doc.get("nodes"), doc.get("roots")
    if not isinstance(nodes, list) or not isinstance(roots, dict):
        raise ValueError("not a tree document")
    built: list[Any] = []
    for item in nodes:
        if not isinstance(item, list) or not item or not isinstance(item[0], str):
            raise ValueError("malformed node")
        op, args = item[0], item[1:]
        if op == "q":
            if len(args) != 1 or not isinstance(args[0], str) or not _CONSTANT.fullmatch(args[0]):
                raise ValueError("malformed constant")
            built.append(Fraction(args[0]))
        elif op == "sym":
            if len(args) != 1 or args[0] not in names:
                raise ValueError("unknown symbol")
            built.append(("sym", args[0]))
        elif op in OPS:
            low, high = OPS[op]
            if len(args) < low or (high is not None and len(args) > high):
                raise ValueError(f"{op} takes {low}..{high} arguments")
            if not all(type(a) is int and 0 <= a < len(built) for a in args):
                raise ValueError("a child must come before its parent")
            built.append((op, *(built[a] for a in args)))
        else:
            raise ValueError(f"unknown operation {op!r}")
    out = {}
    for label, i in roots.items():
        if not isinstance(label, str) or type(i) is not int or not 0 <= i < len(built):
            raise ValueError("malformed root")
        out[label] = built[i]
    return out


# --------------------------------------------------------------------------------------------
# The walk: value, error bound and directional derivative
# --------------------------------------------------------------------------------------------


@caches.memo(maxsize=1)
def _functions() -> Mapping[str, Callable[..., Any]]:
    return mp_modules()[0]


def _budget() -> float:
    return budgets.get("exp_argument")


def walk(expr: Any, env: Mapping[Any, Any], tangent: Mapping[Any, Any] | None = None, *, underflow: bool = False):
    """``(value, error, derivative)`` of the sympy expression ``expr`` at ``env`` (symbols to
    numbers) at mpmath's working precision; see :func:`walk_tree`."""
    return walk_tree(tree(expr), env, tangent, underflow=underflow)


def walk_tree(root: Any, env: Mapping[Any, Any], tangent: Mapping[Any, Any] | None = None, *,
              underflow: bool = False):
    """``(value, error, derivative)`` of a tree at ``env`` (each ``("sym", key)`` is
    ``env[key]``) at mpmath's working precision.

    ``error`` bounds the absolute error of ``value`` (``inf`` where a branch of Heaviside, sign
    or max cannot be decided); ``derivative`` is d/dt tree(env + t tangent) at t = 0, or None
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

    seen: dict[int, Any] = {}  # trees repeat subtrees (sigmoid of the margin): each once

    def go(t):
        found = seen.get(id(t))
        if found is None:
            found = seen[id(t)] = node(t)
        return found

    def node(t):
        if isinstance(t, Fraction):
            x = mpmath.mpf(t.numerator) / t.denominator
            exact = t.denominator == 1 and abs(t.numerator) < 2**mpmath.mp.prec
            return x, (zero if exact else abs(x) * u), zero
        name = t[0]
        if name == "sym":
            return env[t[1]], zero, (tangent.get(t[1], zero) if tangent is not None else None)
        if name == "float":
            x = +t[1]  # rounded to the working precision
            return x, abs(x) * u, zero
        if name == "pi":
            return +mpmath.pi, mpmath.pi * u, zero
        if name == "e":
            return mpmath.e + 0, 3 * u, zero
        args = [go(a) for a in t[1:]]
        if name == "add":
            v = mpmath.fsum(a[0] for a in args)
            err = mpmath.fsum(a[1] for a in args) + abs(v) * u
            return v, err, (mpmath.fsum(a[2] for a in args) if with_d else None)
        if name == "mul":
            v = mpmath.fprod(a[0] for a in args)
            err, d = zero, zero
            for i, (_, ex, dx) in enumerate(args):
                rest = mpmath.fprod(a[0] for j, a in enumerate(args) if j != i)
                err += ex * abs(rest)
                if with_d:
                    d += dx * rest
            return v, err + abs(v) * u * len(args), (d if with_d else None)
        if name == "pow":
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
            sign = 1 if name == "max" else -1
            # decided where the pick stays ahead of every other argument within their errors: then
            # the pick's error is the result's; otherwise the largest error bounds it (max is
            # 1-Lipschitz in each argument)
            decided = all(a is pick or sign * (pick[0] - a[0]) > pick[1] + a[1] for a in args)
            return pick[0], (pick[1] if decided else max(a[1] for a in args)), pick[2]
        undecided = ex > 0 and abs(x) <= ex
        if name == "heaviside":
            h0 = more[0][0] if more else mpmath.mpf(1) / 2
            v = mpmath.mpf(1) if x > 0 else zero if x < 0 else h0
            return v, (inf if undecided else zero), zero
        if name == "sign":
            return mpmath.sign(x), (inf if undecided else zero), zero
        # DiracDelta: zero away from its point, undefined at it
        return fns["DiracDelta"](x, *(a[0] for a in more)), (inf if undecided else zero), zero

    return go(root)


def value(expr: Any, env: Mapping[Any, Any]) -> Any:
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
        return x > (mpmath.mp.prec + 16) * _LN2

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
        if x > -_LN2:
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


# --------------------------------------------------------------------------------------------
# Exact numbers in, and the precision loop
# --------------------------------------------------------------------------------------------

_DECIMAL = re.compile(r"\s*([+-]?)(\d+\.?\d*|\.\d+)(?:[eE]([+-]?\d{1,9}))?\s*")
DECIMAL_EXPONENT_LIMIT = 10**6  # |exponent| of a decimal input; beyond it the digits alone are megabytes


def exact_decimal(name: str, text: str) -> Fraction:
    """The exact rational that the decimal ``text`` denotes (``"1e-400"`` is 10^-400, not
    float64's 0.0), or :class:`DomainError` saying what is allowed."""
    m = _DECIMAL.fullmatch(text)
    if m is None:
        raise DomainError(f"{name}={text!r} is not a decimal number")
    sign, mantissa, exponent = m.group(1), m.group(2), int(m.group(3) or 0)
    if len(mantissa) > 1000 or abs(exponent) > DECIMAL_EXPONENT_LIMIT:
        raise DomainError(
            f"{name}={text.strip()[:40]}: numbers are limited to 1000 digits and decimal "
            f"exponents of at most {DECIMAL_EXPONENT_LIMIT}"
        )
    whole, _, frac = mantissa.partition(".")
    q = Fraction(int(whole + frac or "0"), 10 ** len(frac)) * Fraction(10) ** exponent
    return -q if sign == "-" else q


def within(x: Fraction, low: float, high: float, low_open: bool, high_open: bool) -> bool:
    """Whether the exact ``x``, read at 30 digits, lies in the interval (how ``gradlab eval``
    checks a point against a variable's domain)."""
    import mpmath

    with mpmath.workdps(30):
        m = mpmath.mpf(x.numerator) / x.denominator
        above = m > low if low_open else m >= low
        below = m < high if high_open else m <= high
    return bool(above and below)


def converged(compute: Callable[[int], tuple[Any, Any]], label: str, digits: int) -> Any:
    """A value known to ``digits`` significant digits: ``compute(dps)`` gives ``(value, error
    bound)`` at ``dps`` digits of working precision (the bound None where it is unknown: then two
    successive precisions must agree, and a zero must persist to the top precision). Tried at
    30, 60, 120, ... digits up to the ``eval_digits`` budget, whose refusal says why. Failures of
    the arithmetic are :class:`DomainError` naming ``label``."""
    import mpmath

    previous, dps, top = None, 30, int(budgets.get("eval_digits"))
    while True:
        with mpmath.workdps(dps):
            try:
                value, err = compute(dps)
                if isinstance(value, mpmath.mpc):
                    if value.imag and abs(value.imag) > abs(value) * mpmath.mpf(10) ** (-dps // 2):
                        raise DomainError(f"{label} is not real at this point")
                    value = value.real
                value = mpmath.mpf(value)
                if mpmath.isnan(value):
                    raise DomainError(f"{label} is undefined (NaN) at this point")
                if mpmath.isinf(value):
                    raise DomainError(f"{label} is infinite at this point (the edge of its domain)")
            except GradlabError:
                raise
            except (ZeroDivisionError, OverflowError, ValueError) as exc:
                raise DomainError(f"{label} is undefined at this point ({exc or type(exc).__name__})") from None
            if err is not None:
                if resolved(value, err, mpmath.mpf(10) ** -(digits + 1)):
                    return value
            # a zero is only trusted where it persists up to the top precision: cancellation
            # deeper than the working precision also gives 0
            elif previous is not None and _agree(previous, value, digits) and (value != 0 or dps * 2 > top):
                return value
        if dps * 2 > top:
            raise budgets.BudgetError(
                "eval_digits",
                f"{label} could not be computed to {digits} correct digits: "
                + (f"at {dps} digits of precision its terms still cancel too deeply to know them (the "
                   f"computed value {mpmath.nstr(value, 8)} is not to be trusted)" if err is not None else
                   f"results at {dps // 2} and {dps} digits of precision disagree ({mpmath.nstr(previous, 8)} "
                   f"vs {mpmath.nstr(value, 8)})")
                + f", and the 'eval_digits' budget is {top}; " + budgets.how_to_raise("eval_digits"),
            )
        previous, dps = value, dps * 2


def _agree(a: Any, b: Any, digits: int) -> bool:
    import mpmath

    if a == b:
        return True
    return abs(a - b) <= mpmath.mpf(10) ** (-digits) * max(abs(a), abs(b))


def exact_value(q: Fraction, digits: int) -> Any:
    """A rational result as an mpf, rounded at ``digits + 20`` digits."""
    import mpmath

    with mpmath.workdps(digits + 20):
        return mpmath.mpf(q.numerator) / q.denominator


# --------------------------------------------------------------------------------------------
# Settling a tree at an exact point
# --------------------------------------------------------------------------------------------


class Undefined(DomainError):
    """The expression is undefined or infinite at the exact point (1/0, log 0)."""


class _Atom:
    """An irreducible factor at the point, made once per distinct (op, arguments): equal atoms
    are the same object, so terms that cancel are found by identity."""

    __slots__ = ("op", "args", "serial", "__weakref__")

    def __init__(self, op: str, args: tuple[Any, ...], serial: int) -> None:
        self.op, self.args, self.serial = op, args, serial


# A settled value is a Fraction, or a sum (constant, ((product, coefficient), ...)) with at
# least one term, each product ((atom, exponent), ...) ordered by the atoms' serial numbers.
# Sums are linear combinations of products, products collect equal atoms' exponents, and the
# exp atoms of a product merge into one (exp(a) exp(b) = exp(a + b)): a polynomial identity over
# the atoms, so a sum that settles to 0 is exactly 0 (the converse need not hold: an identity
# between atoms, such as log 4 = 2 log 2, is left to the numbers).

_EXACT_POWER_BITS = 100_000  # a rational power larger than this is left to the numbers


class _Settler:
    def __init__(self, point: Mapping[Any, Fraction]) -> None:
        self.point = point
        self.atoms: dict[tuple[Any, ...], _Atom] = {}
        self.memo: dict[int, Any] = {}

    # -- building blocks ---------------------------------------------------------------------

    def atom(self, op: str, *args: Any) -> Any:
        key = (op, *args)
        a = self.atoms.get(key)
        if a is None:
            a = self.atoms[key] = _Atom(op, args, len(self.atoms))
        return (Fraction(0), ((((a, Fraction(1)),), Fraction(1)),))

    @staticmethod
    def single(v: Any) -> tuple[Fraction, tuple[tuple[_Atom, Fraction], ...]] | None:
        """``(coefficient, product)`` when ``v`` is one term with no constant."""
        if isinstance(v, Fraction) or v[0] != 0 or len(v[1]) != 1:
            return None
        prod, coef = v[1][0]
        return coef, prod

    def add(self, values: list[Any]) -> Any:
        const = Fraction(0)
        terms: dict[Any, Fraction] = {}
        for v in values:
            if isinstance(v, Fraction):
                const += v
                continue
            const += v[0]
            for prod, coef in v[1]:
                terms[prod] = terms.get(prod, Fraction(0)) + coef
        kept = tuple(sorted(((p, c) for p, c in terms.items() if c != 0),
                            key=lambda pc: tuple((a.serial, e) for a, e in pc[0])))
        return (const, kept) if kept else const

    def scale(self, v: Any, c: Fraction) -> Any:
        if isinstance(v, Fraction) or c == 0:
            return v * c if isinstance(v, Fraction) else Fraction(0)
        return (v[0] * c, tuple((p, coef * c) for p, coef in v[1]))

    def product(self, coef: Fraction, factors: dict[_Atom, Fraction]) -> Any:
        exps = [(a, e) for a, e in factors.items() if a.op == "exp"]
        if len(exps) > 1 or (exps and exps[0][1] != 1):  # exp(a)^i exp(b)^j = exp(i a + j b)
            for a, _ in exps:
                del factors[a]
            merged = self.add([self.scale(a.args[0], e) for a, e in exps])
            if merged != 0:
                (_, ((prod, _),)) = self.atom("exp", merged)
                factors[prod[0][0]] = Fraction(1)
        kept = tuple(sorted(((a, e) for a, e in factors.items() if e != 0), key=lambda ae: ae[0].serial))
        if coef == 0 or not kept:
            return coef
        return (Fraction(0), ((kept, coef),))

    def mul(self, values: list[Any]) -> Any:
        coef, sums = Fraction(1), []
        factors: dict[_Atom, Fraction] = {}
        for v in values:
            if isinstance(v, Fraction):
                coef *= v
                continue
            one = self.single(v)
            if one is None:
                sums.append(v)
                continue
            coef *= one[0]
            for a, e in one[1]:
                factors[a] = factors.get(a, Fraction(0)) + e
        if coef == 0:
            return Fraction(0)
        if len(sums) == 1 and not factors:
            return self.scale(sums[0], coef)  # a number times a sum: distributed, as sympy does
        for s in sums:
            (_, ((prod, _),)) = self.atom("sum", s)
            factors[prod[0][0]] = factors.get(prod[0][0], Fraction(0)) + 1
        return self.product(coef, factors)

    def power(self, base: Any, e: Any) -> Any:
        if not isinstance(e, Fraction):
            if base == 1:
                return Fraction(1)
            return self.atom("pow", base, e)
        if e == 0:
            return Fraction(1)
        if isinstance(base, Fraction):
            if base == 0:
                if e < 0:
                    raise Undefined("division by zero")
                return Fraction(0)
            root = self.rational_power(base, e)
            return root if root is not None else self.atom("pow", base, e)
        one = self.single(base)
        if e.denominator == 1 and one is not None:
            coef, prod = one
            c = self.rational_power(coef, e)
            if c is not None:
                return self.product(c, {a: x * e for a, x in prod})
        # (x^a)^e is x^(a e) only for whole e; anything else is a factor of its own
        inner = one[1][0][0] if one is not None and one[0] == 1 and len(one[1]) == 1 and one[1][0][1] == 1 else None
        if inner is None:
            (_, ((prod, _),)) = self.atom("sum", base)
            inner = prod[0][0]
        return self.product(Fraction(1), {inner: e})

    @staticmethod
    def rational_power(q: Fraction, e: Fraction) -> Fraction | None:
        """q^e where it is rational and small enough to compute; None otherwise."""
        bits = max(q.numerator.bit_length(), q.denominator.bit_length())
        if bits * abs(e) > _EXACT_POWER_BITS:
            return None
        if e.denominator == 1:
            return q ** int(e)
        if q < 0:
            raise ValueError("not real")
        root = []
        for n in (q.numerator, q.denominator):
            r = round(n ** (1 / e.denominator)) if n.bit_length() < 1000 else None
            if r is None or r ** e.denominator != n:
                return None
            root.append(r)
        return Fraction(root[0], root[1]) ** e.numerator

    # -- functions -------------------------------------------------------------------------

    def function(self, op: str, args: list[Any]) -> Any:
        x = args[0]
        rational = isinstance(x, Fraction)
        if op == "exp":
            if rational and x == 0:
                return Fraction(1)
            one = self.single(x)
            if one is not None and one[0].denominator == 1 and len(one[1]) == 1:
                (a, power), k = one[1][0], one[0]
                if a.op == "log" and power == 1 and isinstance(a.args[0], Fraction):
                    found = self.rational_power(a.args[0], k)  # exp(k log q) = q^k
                    if found is not None:
                        return found
            return self.atom("exp", x)
        if op == "log":
            if rational:
                if x == 0:
                    raise Undefined("log of 0")
                if x < 0:
                    raise ValueError("not real")
                if x == 1:
                    return Fraction(0)
                if x < 1:
                    return self.scale(self.atom("log", 1 / x), Fraction(-1))  # log(1/n) = -log(n)
                return self.atom("log", x)
            one = self.single(x)
            if one is not None and one[0] == 1 and len(one[1]) == 1 and one[1][0][0].op == "exp" \
                    and one[1][0][1] == 1:
                return one[1][0][0].args[0]  # log(exp(a)) = a for real a
            return self.atom("log", x)
        if not rational:
            return self.atom(op, *args)
        if op == "sigmoid" and x == 0:
            return Fraction(1, 2)
        if op == "softplus" and x == 0:
            return self.atom("log", Fraction(2))
        if op == "tanh" and x == 0:
            return Fraction(0)
        if op == "abs":
            return abs(x)
        if op in ("max", "min"):
            if all(isinstance(a, Fraction) for a in args):
                return (max if op == "max" else min)(args)
            return self.atom(op, *args)
        if op == "heaviside":
            h0 = args[1] if len(args) > 1 else Fraction(1, 2)
            return Fraction(1) if x > 0 else Fraction(0) if x < 0 else h0
        if op == "sign":
            return Fraction((x > 0) - (x < 0))
        if op == "dirac" and x != 0:
            return Fraction(0)
        return self.atom(op, *args)

    # -- the walk --------------------------------------------------------------------------

    def settle(self, t: Any) -> Any:
        found = self.memo.get(id(t))
        if found is None:
            found = self.memo[id(t)] = self.node(t)
        return found

    def node(self, t: Any) -> Any:
        if isinstance(t, Fraction):
            return t
        op = t[0]
        if op == "sym":
            return self.point[t[1]]
        if op in ("pi", "e"):
            return self.atom(op)
        if op == "float":
            raise Unsupported("a float constant cannot be settled exactly")
        args = [self.settle(a) for a in t[1:]]
        if op == "add":
            return self.add(args)
        if op == "mul":
            return self.mul(args)
        if op == "pow":
            return self.power(*args)
        return self.function(op, args)

    # -- back to a tree, for the numbers ------------------------------------------------------

    def as_tree(self, v: Any, made: dict[int, Any] | None = None) -> Any:
        made = {} if made is None else made
        if isinstance(v, Fraction):
            return v
        terms = [v[0]] if v[0] != 0 else []
        for prod, coef in v[1]:
            factors = [self.atom_tree(a, made) if e == 1 else ("pow", self.atom_tree(a, made), e) for a, e in prod]
            terms.append(("mul", coef, *factors) if coef != 1 else factors[0] if len(factors) == 1 else
                         ("mul", *factors))
        return terms[0] if len(terms) == 1 else ("add", *terms)

    def atom_tree(self, a: _Atom, made: dict[int, Any]) -> Any:
        found = made.get(id(a))
        if found is None:
            if a.op == "sum":
                found = self.as_tree(a.args[0], made)
            else:
                found = (a.op, *(self.as_tree(x, made) for x in a.args))
            made[id(a)] = found
        return found


def settle(root: Any, point: Mapping[Any, Fraction]) -> Any:
    """The tree evaluated exactly at ``point`` as far as rational arithmetic and collecting like
    terms go: a Fraction where the value is rational (0 where equal terms cancel exactly), else a
    tree of what is left, with the point's values in it. Raises :class:`Undefined` where the
    value is undefined or infinite (1/0, log 0) and ``ValueError`` where it is not real."""
    s = _Settler(point)
    return s.as_tree(s.settle(root))


def evaluate(roots: Mapping[str, Any], point: Mapping[str, Fraction], *, digits: int = 20) -> dict[str, Any]:
    """Each tree of ``roots`` at the exact ``point`` (symbol name to Fraction, hyperparameters
    included), to ``digits`` correct significant digits or refused: as
    :func:`gradlab.symbolic.evaluate` computes a derived expression."""
    out: dict[str, Any] = {}
    for name, root in roots.items():
        label = "the loss" if name == "loss" else f"d/d{name}"
        try:
            left = settle(root, point)
        except Undefined:
            raise DomainError(f"{label} is undefined or infinite at this point (the edge of its domain)") from None
        except ValueError:
            raise DomainError(f"{label} is not real at this point") from None
        if isinstance(left, Fraction):
            out[name] = exact_value(left, digits)
            continue

        def compute(dps: int, left: Any = left) -> tuple[Any, Any]:
            v, err, _ = walk_tree(left, {})
            return v, err

        out[name] = converged(compute, label, digits)
    return out
