"""A safe parser for user-typed formulas.

The text is parsed by Python's ``ast`` module (which only builds a syntax tree and runs
nothing), then walked node by node against a whitelist: numbers, the known variable and
hyperparameter names, the operators ``+ - * / **`` and calls of whitelisted functions. Every
other node (attributes, subscripts, lambdas, comprehensions, strings, keywords, ...) is refused
with a message that says what is allowed. sympy objects are built directly from the tree, so no
text ever reaches ``eval``, ``exec`` or ``sympify``.

Limits keep hostile input cheap to refuse: the text length, the nesting depth (checked on the
raw text before ``ast`` sees it), the node count, and the size of numeric powers.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping

import sympy

from gradlab.errors import ParseError
from gradlab.symbols import HYPERPARAMETERS, SPECIAL_FUNCTIONS, SYMBOLS, to_special

__all__ = ["parse", "FUNCTIONS", "MAX_LENGTH", "MAX_DEPTH", "MAX_NODES"]

MAX_LENGTH = 20_000
MAX_DEPTH = 100
MAX_NODES = 10_000
MAX_POWER_DIGITS = 300  # refuse numeric powers whose value would have more digits than this

FUNCTIONS: Mapping[str, tuple[object, int]] = {
    "log": (sympy.log, 1),
    "exp": (sympy.exp, 1),
    "sqrt": (sympy.sqrt, 1),
    "tanh": (sympy.tanh, 1),
    "abs": (sympy.Abs, 1),
    "Abs": (sympy.Abs, 1),
    "max": (sympy.Max, 2),
    "Max": (sympy.Max, 2),
    "min": (sympy.Min, 2),
    "Heaviside": (sympy.Heaviside, 1),
    "Min": (sympy.Min, 2),
    **{name: (fn, 1) for name, fn in SPECIAL_FUNCTIONS.items()},
    "logsigmoid": (lambda x: -SPECIAL_FUNCTIONS["softplus"](-x), 1),
}

_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def _allowed_names(extra: Mapping[str, sympy.Symbol] | None) -> dict[str, sympy.Symbol]:
    names = {k: v.symbol for k, v in SYMBOLS.items()}
    names.update({k: v.symbol for k, v in HYPERPARAMETERS.items()})
    names.update(extra or {})
    return names


def _grammar() -> str:
    return (
        "numbers, variables, hyperparameters, + - * / ** and parentheses, and the functions "
        + ", ".join(sorted(FUNCTIONS))
    )


def parse(text: str, names: Mapping[str, sympy.Symbol] | None = None) -> sympy.Expr:
    """Parse ``text`` into a sympy expression, refusing anything outside the grammar.

    ``names`` adds symbols (for example user-declared hyperparameters) to the known ones.
    """
    if not isinstance(text, str):
        raise ParseError(f"a formula must be a string, not {type(text).__name__}")
    if not text.strip():
        raise ParseError("the formula is empty; write an expression such as "
                         "'log(1 + exp(-beta*(lp_w - lp_l)))'")
    if len(text) > MAX_LENGTH:
        raise ParseError(f"the formula is {len(text)} characters long; the limit is {MAX_LENGTH}")
    if any(c in text for c in "\\'\"`"):
        raise ParseError("quotes, backslashes and string escapes are not allowed; allowed: " + _grammar())
    depth = 0
    for c in text:
        depth += c in "([{"
        depth -= c in ")]}"
        if depth > MAX_DEPTH:
            raise ParseError(f"parentheses nest deeper than {MAX_DEPTH} levels")
        if depth < 0:
            raise ParseError("unbalanced parentheses: a ')' closes nothing")
    if depth:
        raise ParseError("unbalanced parentheses: a '(' is never closed")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ParseError(f"not a valid formula ({getattr(exc, 'msg', exc)}); allowed: {_grammar()}") from None
    count = sum(1 for _ in ast.walk(tree))
    if count > MAX_NODES:
        raise ParseError(f"the formula has {count} syntax nodes; the limit is {MAX_NODES}")
    return to_special(_Builder(_allowed_names(names)).build(tree.body))


class _Builder:
    def __init__(self, names: Mapping[str, sympy.Symbol]):
        self.names = names

    def build(self, node: ast.AST) -> sympy.Expr:
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise ParseError(
                f"'{_describe(node)}' is not allowed in a formula; allowed: {_grammar()}"
            )
        return method(node)

    def _Constant(self, node: ast.Constant) -> sympy.Expr:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParseError(f"only real numbers are allowed as constants, not {value!r}")
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ParseError(f"the constant {value!r} is not finite")
            return sympy.Rational(repr(value))  # exact decimal: 0.1 -> 1/10
        return sympy.Integer(value)

    def _Name(self, node: ast.Name) -> sympy.Expr:
        if node.id in self.names:
            return self.names[node.id]
        if node.id == "pi":
            return sympy.pi
        if node.id == "E":
            return sympy.E
        known = ", ".join(sorted(k for k in self.names if k in SYMBOLS))
        hyper = ", ".join(sorted(k for k in self.names if k not in SYMBOLS))
        raise ParseError(
            f"unknown name '{node.id}'. Variables: {known}. Hyperparameters: {hyper}. "
            "Constants: pi, E."
        )

    def _UnaryOp(self, node: ast.UnaryOp) -> sympy.Expr:
        operand = self.build(node.operand)
        if isinstance(node.op, ast.USub):
            return -operand
        if isinstance(node.op, ast.UAdd):
            return operand
        raise ParseError(f"the operator '{_describe(node)}' is not allowed; allowed: {_grammar()}")

    def _BinOp(self, node: ast.BinOp) -> sympy.Expr:
        left, right = self.build(node.left), self.build(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise ParseError(f"the operator in '{_describe(node)}' is not allowed; allowed: {_grammar()}")
        try:
            return op(left, right)
        except ZeroDivisionError:
            raise ParseError("division by zero in the formula") from None

    def _Call(self, node: ast.Call) -> sympy.Expr:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise ParseError(
                f"'{_describe(node.func)}' is not a function you can call; the functions are: "
                + ", ".join(sorted(FUNCTIONS))
            )
        if node.keywords:
            raise ParseError("keyword arguments are not allowed in a formula")
        fn, arity = FUNCTIONS[node.func.id]
        if len(node.args) != arity and not (arity == 2 and len(node.args) >= 2):
            raise ParseError(f"{node.func.id} takes {arity} argument(s), not {len(node.args)}")
        return fn(*(self.build(a) for a in node.args))  # type: ignore[operator]


def _power(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    # Refuse numeric towers such as 9**9**9**9 before sympy tries to compute them exactly.
    if base.is_Number and exponent.is_Number:
        b, e = abs(float(base)), float(exponent)
        if b not in (0.0, 1.0):
            digits = abs(e) * abs(math.log10(b)) if math.isfinite(e) else math.inf
            if digits > MAX_POWER_DIGITS:
                raise ParseError(
                    f"the number {base}**{exponent} is too large; numeric powers are limited to "
                    f"{MAX_POWER_DIGITS} digits"
                )
    return sympy.Pow(base, exponent)


def _describe(node: ast.AST) -> str:
    try:
        text = ast.unparse(node)
    except Exception:  # noqa: BLE001 - description only
        text = type(node).__name__
    return text if len(text) <= 60 else text[:57] + "..."
