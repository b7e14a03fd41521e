"""A few sympy expressions compiled into one straight-line numpy program.

The audit evaluates the same handful of closed forms at a million pairs, once per loss per
run. ``sympy.lambdify`` with ``cse=True`` costs most of a second of sympy time per loss zoo in
printing and common-subexpression search; this module walks the expression graph once
instead. Every distinct subexpression (sympy's structural equality) becomes one step, so the
forms share the margin, its sigmoid and the like, and ``bindings`` (LD-DPO's estimated tails)
and hyperparameter values are compiled in place rather than substituted with ``xreplace``.
Constants are folded as sympy would fold them (``0 * x = 0``, ``x + 0 = x``), so a term
multiplied by a zero hyperparameter is not evaluated, as after substitution.

The numerics are those of ``gradlab.numeric``'s numpy backend: the same stable special
functions (``symbolic._np_modules``), applied to ``symbolic.stabilise``-d expressions by the
caller. A node outside the vocabulary raises :class:`Unsupported`; the caller then falls back
to ``gradlab.numeric``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import sympy

from gradlab import caches, symbolic

__all__ = ["Program", "Unsupported", "compile_program"]


class Unsupported(Exception):  # noqa: N818 - an internal signal, never shown to a user
    """A node this compiler does not know; use ``gradlab.numeric`` instead."""


@caches.memo(maxsize=None)
def _functions() -> dict[Any, Callable[..., Any]]:
    special = symbolic._np_modules()[0]  # the stable sigmoid, softplus, log1mexp of gradlab.numeric
    table: dict[Any, Callable[..., Any]] = {
        sympy.exp: np.exp,
        sympy.log: np.log,
        sympy.Abs: np.abs,
        sympy.tanh: np.tanh,
        sympy.sign: np.sign,
    }
    for name, fn in special.items():
        table[symbolic.SPECIAL_FUNCTIONS[name]] = fn
    return table


def _heaviside(x: Any, at_zero: float) -> Any:
    return np.heaviside(x, at_zero)


def _reciprocal(x: Any) -> Any:
    return 1.0 / x


def _power(exponent: float) -> Callable[[Any], Any]:
    if exponent == 2:
        return np.square
    if exponent == 0.5:
        return np.sqrt
    if exponent == -1:
        return _reciprocal

    def power(x: Any) -> Any:
        return np.power(x, exponent)

    return power


class Program:
    """``program(*arrays)`` returns the values of the compiled expressions (arrays of the
    inputs' shape, or a float for a constant expression). Temporaries are released after
    their last use, so a chunk's working set stays small."""

    def __init__(self, inputs: Sequence[str], steps: list[tuple[Callable[..., Any], tuple[Any, ...]]],
                 outputs: Sequence[Any]) -> None:
        self.inputs = tuple(inputs)
        self.steps = steps
        self.outputs = tuple(outputs)
        n_in = len(self.inputs)
        last: dict[int, int] = {}
        for i, (_, args) in enumerate(steps):
            for a in args:
                if isinstance(a, int):
                    last[a] = i
        keep = {o for o in self.outputs if isinstance(o, int)}
        self._release = [tuple(s for s, at in last.items() if at == i and s >= n_in and s not in keep)
                         for i in range(len(steps))]

    def __call__(self, *arrays: Any) -> list[Any]:
        regs: list[Any] = [*arrays, *([None] * len(self.steps))]
        base = len(arrays)
        for i, (fn, args) in enumerate(self.steps):
            regs[base + i] = fn(*[regs[a] if isinstance(a, int) else a.value for a in args])
            for s in self._release[i]:
                regs[s] = None
        return [regs[o] if isinstance(o, int) else o.value for o in self.outputs]


class _Const:
    """A folded constant operand (kept apart from register numbers)."""

    __slots__ = ("value",)

    def __init__(self, value: float) -> None:
        self.value = value


def compile_program(
    exprs: Sequence[sympy.Expr],
    inputs: Sequence[str],
    *,
    constants: Mapping[sympy.Symbol, float] | None = None,
    bindings: Mapping[sympy.Symbol, sympy.Expr] | None = None,
) -> Program:
    """Compile ``exprs`` into a :class:`Program` of the variables named ``inputs``.

    ``constants`` gives symbols a number (hyperparameters); ``bindings`` gives symbols an
    expression of the inputs, compiled once and shared. Any other symbol raises
    :class:`Unsupported`.
    """
    constants = dict(constants or {})
    bindings = dict(bindings or {})
    by_name = {name: i for i, name in enumerate(inputs)}
    steps: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
    memo: dict[sympy.Expr, Any] = {}
    n_in = len(inputs)
    fns = _functions()

    def emit(fn: Callable[..., Any], *args: Any) -> Any:
        if all(isinstance(a, _Const) for a in args):  # fold: every operand is a number
            with np.errstate(all="ignore"):
                return _Const(float(fn(*[a.value for a in args])))
        key = (fn, tuple(("c", a.value) if isinstance(a, _Const) else a for a in args))
        found = memo.get(key)
        if found is None:
            steps.append((fn, args))
            found = memo[key] = n_in + len(steps) - 1
        return found

    def is_const(a: Any, value: float | None = None) -> bool:
        return isinstance(a, _Const) and (value is None or a.value == value)

    def node(e: sympy.Expr) -> Any:
        found = memo.get(e)
        if found is not None:
            return found
        out = build(e)
        memo[e] = out
        return out

    def build(e: sympy.Expr) -> Any:
        if e.is_Symbol:
            if e.name in by_name:
                return by_name[e.name]
            if e in constants:
                return _Const(float(constants[e]))
            if e in bindings:
                return node(bindings[e])
            raise Unsupported(f"free symbol {e}")
        if e.is_Number or e.is_NumberSymbol:
            try:
                return _Const(float(e))
            except TypeError:  # complex infinity and the like: leave it to lambdify
                raise Unsupported(f"number {e}") from None
        if e.is_Add:
            acc = None
            for a in e.args:
                v = node(a)
                if is_const(v, 0.0):
                    continue
                acc = v if acc is None else emit(np.add, acc, v)
            return _Const(0.0) if acc is None else acc
        if e.is_Mul:
            # a factor of numbers and hyperparameters alone first: if it is zero, the product is
            # zero (sympy's 0 * x = 0) and the other factors are never evaluated
            if any(a.free_symbols <= constants.keys() and is_const(node(a), 0.0) for a in e.args):
                return _Const(0.0)
            num, den = [], []
            for a in e.args:
                if a.is_Pow and a.exp.is_Number and a.exp < 0:  # x / y, as lambdify prints it
                    den.append(node(a.base ** -a.exp))
                else:
                    num.append(node(a))
            if any(is_const(v, 0.0) for v in num):
                return _Const(0.0)
            acc = None
            for v in num:
                if is_const(v, 1.0):
                    continue
                acc = v if acc is None else emit(np.multiply, acc, v)
            for v in den:
                acc = emit(np.divide, _Const(1.0) if acc is None else acc, v)
            return _Const(1.0) if acc is None else acc
        if e.is_Pow:
            if not e.exp.is_Number:
                return emit(np.power, node(e.base), node(e.exp))
            return emit(_power(float(e.exp)), node(e.base))
        if isinstance(e, sympy.Max | sympy.Min):
            pick: Callable[..., Any] = np.maximum if isinstance(e, sympy.Max) else np.minimum
            acc = None
            for a in e.args:
                v = node(a)
                acc = v if acc is None else emit(pick, acc, v)
            return acc
        if isinstance(e, sympy.Heaviside):
            at_zero = e.args[1] if len(e.args) > 1 else sympy.S.Half  # sympy's default H(0) = 1/2
            if not at_zero.is_Number:
                raise Unsupported(f"Heaviside at zero = {at_zero}")
            return emit(_heaviside, node(e.args[0]), _Const(float(at_zero)))
        fn = fns.get(e.func)
        if fn is None or len(e.args) != 1:
            raise Unsupported(f"function {e.func}")
        return emit(fn, node(e.args[0]))

    outputs = [node(e) for e in exprs]
    return Program(inputs, steps, outputs)
