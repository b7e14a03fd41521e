"""A safe parser for user-typed formulas.

The text is parsed by Python's ``ast`` module (which only builds a syntax tree and runs
nothing), then walked node by node against a whitelist: numbers, the known variable and
hyperparameter names, the operators ``+ - * / **`` and calls of whitelisted functions. Every
other node (attributes, subscripts, lambdas, comprehensions, strings, keywords, ...) is refused
with a message that says what is allowed. sympy objects are built directly from the tree, so no
text ever reaches ``eval``, ``exec`` or ``sympify``.

Limits keep hostile input cheap to refuse: the text length, the nesting depth (checked on the
raw text before ``ast`` sees it, and on the syntax tree, where a chain ``a + b + c + ...`` counts
as one level), the node count, the number of arguments of ``max``/``min``, and the size of every
constant: each constant sub-expression (``E**E**E``, ``exp(exp(9))``, ``9**9**9``, a long integer
literal) must lie within 10^±``constant_digits`` (a budget, 300 by default), checked *before*
sympy computes it, so no tower of numbers or named constants can make sympy work for hours.
Parsing runs under the ``parse_s`` time budget (see :mod:`gradlab.budgets`). Results that are
undefined or infinite (``log(0)``, ``1/0``, ``zoo``) are refused.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping

import sympy

from gradlab import budgets
from gradlab.errors import ParseError
from gradlab.symbols import HYPERPARAMETERS, SPECIAL_FUNCTIONS, SYMBOLS, to_special

__all__ = ["parse", "FormulaBudgetError", "FUNCTIONS", "MAX_LENGTH", "MAX_DEPTH", "MAX_NODES"]

MAX_LENGTH = 20_000
MAX_DEPTH = 100
MAX_NODES = 10_000

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
    depth = _tree_depth(tree.body)
    if depth > MAX_DEPTH:
        raise ParseError(f"the formula nests {depth} levels deep (parentheses, powers, signs and "
                         f"function calls); the limit is {MAX_DEPTH}")
    try:
        with budgets.timed("parse_s", "parsing the formula"):
            try:
                expr = to_special(_Builder(_allowed_names(names), text.strip()).build(tree.body))
            except ZeroDivisionError:
                raise ParseError("division by zero in the formula") from None
            except RecursionError:
                raise ParseError(f"the formula nests too deeply; the limit is {MAX_DEPTH} levels") from None
            _check_result(expr)
    except budgets.BudgetError as exc:
        if isinstance(exc, ParseError):
            raise
        # a formula refused for its cost is a refused formula: keep parse's one error type
        raise FormulaBudgetError(exc.budget, str(exc)) from None
    return expr


class FormulaBudgetError(budgets.BudgetError, ParseError):
    """A formula refused by a budget while it is parsed (a constant too large, max of too
    many arguments): both a :class:`ParseError` and a :class:`~gradlab.budgets.BudgetError`."""


_CHAINS = ((ast.Add, ast.Sub), (ast.Mult, ast.Div))


def _chain_group(node: ast.AST) -> tuple[type, ...] | None:
    if isinstance(node, ast.BinOp):
        for group in _CHAINS:
            if isinstance(node.op, group):
                return group
    return None


def _tree_depth(root: ast.AST) -> int:
    """Nesting depth of the syntax tree, computed without recursion. A chain of the same
    operator family (``a + b - c + ...``, ``a * b / c * ...``) counts as one level, because the
    builder flattens it into one sympy ``Add`` or ``Mul``."""
    deepest = 0
    stack: list[tuple[ast.AST, int, tuple[type, ...] | None]] = [(root, 1, None)]
    while stack:
        node, depth, parent_group = stack.pop()
        deepest = max(deepest, depth)
        group = _chain_group(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.operator | ast.unaryop | ast.expr_context):
                continue
            same = group is not None and _chain_group(child) == group
            stack.append((child, depth if same else depth + 1, group))
    return deepest


def _decimal(text: str) -> sympy.Rational | None:
    """The exact rational a decimal literal denotes (``1e-400`` is 10^-400), or None."""
    import re

    m = re.fullmatch(r"(\d[\d_]*\.?[\d_]*|\.[\d_]+)(?:[eE]([+-]?\d{1,9}))?", text)
    if m is None:
        return None
    mantissa, exponent = m.group(1).replace("_", ""), int(m.group(2) or 0)
    if len(mantissa) > 1000:
        return None
    whole, _, frac = mantissa.partition(".")
    limit = int(budgets.get("constant_digits"))
    digits = len((whole + frac).lstrip("0")) or 1
    if abs(exponent) > 10 * limit + digits + len(frac):  # far out: refused below, without 10^(10^9)
        exponent = (1 if exponent > 0 else -1) * (10 * limit + digits + len(frac))
    return sympy.Rational(int(whole + frac or "0"), 10 ** len(frac)) * sympy.Rational(10) ** exponent


def _number_digits(n: sympy.Rational) -> float:
    """Decimal digits of the larger of a rational's numerator and denominator (no str())."""
    return max(abs(int(n.p)).bit_length(), int(n.q).bit_length()) * 0.30103


def _check_result(expr: sympy.Expr) -> None:
    """Refuse undefined or infinite results and max/min calls with too many arguments (sympy
    merges nested max(max(a, b), c), so the arity is checked on the result), without recursion."""
    limit = int(budgets.get("max_args"))
    digits = budgets.get("constant_digits")
    budgets.check_size(expr, "the parsed formula")
    stack = [expr]
    while stack:
        e = stack.pop()
        if e in (sympy.zoo, sympy.nan, sympy.oo, -sympy.oo) or e.is_infinite:
            raise ParseError("the formula is undefined or infinite somewhere it is written "
                             "(for example log(0), 0**-1 or 1/(x - x)); write a finite expression")
        if isinstance(e, sympy.Max | sympy.Min) and len(e.args) > limit:
            raise _too_many_args(len(e.args))
        if e.is_Rational and _number_digits(e) > digits + 1:
            # sympy merges (x**a)**b into x**(a*b) and 10*(10*x) into 100*x: numbers that no
            # literal wrote, bounded here like the literals
            raise _too_large(f"a number with {int(_number_digits(e)) + 1} digits (from nested powers or products)")
        stack.extend(e.args)


def _too_many_args(n: int) -> ParseError:
    limit = int(budgets.get("max_args"))
    return FormulaBudgetError(
        "max_args",
        f"a max/min of {n} arguments exceeds the 'max_args' budget of {limit} (the derivative grows "
        "with the square of the argument count); " + budgets.how_to_raise("max_args"),
    )


class _Builder:
    def __init__(self, names: Mapping[str, sympy.Symbol], text: str = ""):
        self.names = names
        self.lines = text.splitlines()

    def _source(self, node: ast.AST) -> str | None:
        """The text of a one-line node as the user wrote it."""
        if not isinstance(node, ast.expr):
            return None
        line, end = node.lineno, node.end_lineno
        if line != end or line > len(self.lines):
            return None
        return self.lines[line - 1].encode()[node.col_offset:node.end_col_offset].decode()

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
            # the literal as written, read exactly: float64 would round 1e-400 to 0 and 1e400 to inf
            text = self._source(node)
            exact = _decimal(text) if text is not None else None
            if exact is None:
                if not math.isfinite(value):
                    raise ParseError(f"the constant {value!r} is not finite")
                exact = sympy.Rational(repr(value))  # exact decimal: 0.1 -> 1/10
            return _checked(exact)
        if abs(value) >= 10 ** int(budgets.get("constant_digits") + 1):
            raise _too_large(f"the integer with {len(str(abs(value)))} digits")
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
            return _checked(-operand)
        if isinstance(node.op, ast.UAdd):
            return operand
        raise ParseError(f"the operator '{_describe(node)}' is not allowed; allowed: {_grammar()}")

    def _BinOp(self, node: ast.BinOp) -> sympy.Expr:
        group = _chain_group(node)
        if group is not None:
            return self._chain(node, group)
        left, right = self.build(node.left), self.build(node.right)
        if isinstance(node.op, ast.Pow):
            return _checked(_power(left, right))
        raise ParseError(f"the operator in '{_describe(node)}' is not allowed; allowed: {_grammar()}")

    def _chain(self, node: ast.BinOp, group: tuple[type, ...]) -> sympy.Expr:
        """``a + b - c + ...`` (or ``a * b / c ...``) as one flat sympy Add (Mul), built
        iteratively: a sum of thousands of terms must not recurse thousands of levels."""
        operands: list[tuple[bool, ast.AST]] = []
        while _chain_group(node) == group:
            operands.append((isinstance(node.op, ast.Sub | ast.Div), node.right))
            node = node.left  # type: ignore[assignment]
        operands.append((False, node))
        operands.reverse()
        terms = []
        for inverted, operand in operands:
            value = self.build(operand)
            if inverted and group[0] is ast.Mult:
                if value == 0:
                    raise ParseError("division by zero in the formula")
                value = 1 / value
            elif inverted:
                value = -value
            terms.append(value)
        combine = sympy.Add if group[0] is ast.Add else sympy.Mul
        # constants pairwise, so that each partial result is checked before it can grow
        constant = sympy.Integer(0 if combine is sympy.Add else 1)
        rest = []
        for t in terms:
            if t.is_number:
                constant = _checked(combine(constant, t))
            else:
                rest.append(t)
        return _checked(combine(constant, *rest))

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
        if arity == 2 and len(node.args) > budgets.get("max_args"):
            raise _too_many_args(len(node.args))  # before sympy compares every pair
        args = [self.build(a) for a in node.args]
        if node.func.id == "exp" and not args[0].free_symbols:
            _check_digits(abs(_value(args[0])) * _LOG10_E, f"exp({args[0]})")
        try:
            value = fn(*args)  # type: ignore[operator]
        except (TypeError, ValueError) as exc:  # e.g. max of constants sympy cannot compare
            raise ParseError(f"{node.func.id}({', '.join(_short(a) for a in args)}) is not defined: {exc}") from None
        return _checked(value)


_LOG10_E = math.log10(math.e)


def _too_large(what: str) -> ParseError:
    limit = int(budgets.get("constant_digits"))
    return FormulaBudgetError(
        "constant_digits",
        f"{what} is too large or too small: constants in a formula must lie within 10^-{limit} and "
        f"10^{limit} in size (the 'constant_digits' budget); " + budgets.how_to_raise("constant_digits"),
    )


def _check_digits(digits: float, what: str) -> None:
    if not digits <= budgets.get("constant_digits"):
        raise _too_large(what)


def _value(constant: sympy.Expr) -> float:
    """The float value of a constant whose parts are already known to be of bounded size (so
    the evaluation is cheap); its absolute value for complex constants, 0.0 if it has none."""
    try:
        value = complex(constant.rewrite(sympy.exp).evalf(17))
    except (TypeError, ValueError, ArithmeticError):
        return 0.0
    return abs(value) if value.imag else value.real


def _log10_abs(constant: sympy.Expr) -> float | None:
    """log10 |constant| without leaving the exponent range (1e-600 is not 0 here), or None for
    zero or a constant that cannot be evaluated."""
    import mpmath

    try:
        v = constant.rewrite(sympy.exp).evalf(17)
        re, im = (mpmath.mpf(x._mpf_) if x.is_Float else mpmath.mpf(int(x)) for x in v.as_real_imag())
    except (TypeError, ValueError, ArithmeticError, AttributeError):
        return None
    m = mpmath.hypot(re, im)
    return None if m == 0 or not mpmath.isfinite(m) else float(mpmath.log10(m))


def _checked(expr: sympy.Expr) -> sympy.Expr:
    """``expr``, after checking that it is not a constant beyond the ``constant_digits`` budget
    and not a complex one (a negative number to a fractional power): a loss is real."""
    if expr.is_number and expr not in (sympy.zoo, sympy.nan) and not expr.is_infinite:
        digits = _log10_abs(expr)
        if digits is not None and abs(digits) > budgets.get("constant_digits"):
            raise _too_large(f"the constant {_short(expr)}")
        if expr.is_real is not True and _imaginary(expr):
            raise ParseError(f"the constant {_short(expr)} is not a real number (a negative number to a "
                             "fractional power?); every constant in a formula must be real")
    return expr


def _imaginary(constant: sympy.Expr) -> bool:
    """Whether a bounded constant has an imaginary part beyond rounding."""
    try:
        value = complex(constant.rewrite(sympy.exp).evalf(30))
    except (TypeError, ValueError, ArithmeticError):
        return False
    return abs(value.imag) > 1e-20 * max(1.0, abs(value))


def _power(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    # Refuse towers such as 9**9**9**9 or E**E**E**E**E before sympy tries to compute them:
    # every constant built so far is bounded, so their float values exist and are cheap.
    if base.is_number and exponent.is_number:
        log_b, e = _log10_abs(base), _value(exponent)
        if base == 0 and e < 0:
            raise ParseError("division by zero in the formula (zero to a negative power)")
        if log_b is not None and log_b != 0.0:
            _check_digits(abs(e) * abs(log_b), f"the number {_short(base)}**{_short(exponent)}")
    return sympy.Pow(base, exponent)


def _short(expr: sympy.Expr) -> str:
    text = str(expr)
    return text if len(text) <= 40 else text[:37] + "..."


def _describe(node: ast.AST) -> str:
    try:
        text = ast.unparse(node)
    except Exception:  # noqa: BLE001 - description only
        text = type(node).__name__
    return text if len(text) <= 60 else text[:57] + "..."
