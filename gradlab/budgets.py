"""Budgets: the one place that bounds the work a user's input can cause.

Every symbolic operation reachable from user input (parse, derive, simplify, limit, LaTeX,
evaluate) runs under a wall-clock budget, and the objects it builds under size budgets; numeric
arguments of the API and the command line (points, seeds, steps) have upper limits. When a
budget is exceeded the caller gets a :class:`BudgetError` that names the budget, its value and
how to raise it.

Raise a budget for one block of code::

    with gradlab.budgets.raised(derive_s=120):
        gradlab.derivative(big_loss, "lp_w")

or for a whole process with an environment variable, ``GRADLAB_BUDGET_DERIVE_S=120``.
A value of 0 switches a time budget, or a limit on an estimate (``settings``, ``work``,
``memory_bytes``), off.

Time budgets use ``SIGALRM`` and so apply in the main thread of a POSIX process (the command
line, scripts, Jupyter kernels). Elsewhere only the size budgets apply.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from gradlab.errors import DomainError, GradlabError

__all__ = ["BudgetError", "Budget", "BUDGETS", "get", "raised", "timed", "check_size", "check_count",
           "check_estimate"]


class BudgetError(GradlabError):
    """A computation would exceed one of gradlab's budgets (time, size or a numeric limit)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.budget = name


@dataclass(frozen=True)
class Budget:
    name: str
    default: float
    unit: str
    why: str


# The one table. Values are generous for every registered loss (its slowest full gradient,
# ld_dpo_trl in the length view, takes 0.4 s on one core, cold) and refuse hostile input quickly.
_TABLE: tuple[Budget, ...] = (
    Budget("parse_s", 5.0, "s", "parsing one formula (normal formulas take milliseconds)"),
    Budget("derive_s", 30.0, "s", "deriving and simplifying one partial derivative"),
    Budget("limit_s", 30.0, "s", "one symbolic limit"),
    Budget("latex_s", 10.0, "s", "printing one expression as LaTeX or text"),
    Budget("evaluate_s", 20.0, "s", "evaluating a loss and its gradient at one point"),
    Budget("simplify_s", 20.0, "s", "the exact check in gradlab.equivalent"),
    Budget("expr_nodes", 20_000, "nodes", "nodes in one derived expression"),
    Budget("max_args", 8, "arguments", "arguments of one max/min call (derivatives grow as n^2)"),
    Budget("constant_digits", 300, "digits",
           "decimal exponent of any constant in a formula: |log10 |c|| (float64 ends at 308)"),
    Budget("eval_digits", 1000, "digits", "the highest working precision gradlab eval may use"),
    Budget("exp_argument", 1e12, "",
           "|x| in any exp(x) while evaluating (beyond it the value's exponent has > 10^12 digits)"),
    Budget("points", 1_000_000, "points", "random points per loss and family in checks"),
    Budget("seeds", 1024, "seeds", "seeds in one simulation"),
    Budget("steps", 1_000_000, "steps", "optimisation steps in one simulation"),
    Budget("pairs", 100_000, "pairs", "preference pairs in one simulated dataset"),
    Budget("sequences", 100_000, "sequences",
           "sequences a toy policy enumerates: 1 + c + ... + c^(max_len-1), c = vocab - 1"),
    Budget("settings", 10_000, "settings",
           "settings of one sweep: the product of its lists' lengths (a zip of lists counts its length once)"),
    Budget("work", 1e11, "units",
           "the total work of one experiment, counted before it expands or compiles: over every run "
           "(setting x seed), steps x (parameters + logit-table cells + tokens of the pairs), plus the "
           "recorded steps x the tokens of the enumerated responses; about 1e8 units take a second on "
           "one CPU core"),
    Budget("memory_bytes", 8e9, "bytes",
           "the estimated memory of one experiment's compiled programs, its runs stacked: parameters "
           "and optimiser state, logit tables, the pairs' count matrices, the data and the records"),
    Budget("analyse_s", 120.0, "s", "one analysis of a custom loss in the notebook view"),
    Budget("field_bytes", 64 * 2**20, "bytes",
           "one line of a JSON Lines or CSV file, or one text value of a Parquet file, read by gradlab audit "
           "and gradlab logps (memory stays a small multiple of it)"),
)

BUDGETS: Mapping[str, Budget] = MappingProxyType({b.name: b for b in _TABLE})
_OVERRIDES: list[dict[str, float]] = []


def _env_name(name: str) -> str:
    return "GRADLAB_BUDGET_" + name.upper()


def get(name: str) -> float:
    """The budget's current value: the innermost ``raised`` block, else the environment
    variable ``GRADLAB_BUDGET_<NAME>``, else the default."""
    for layer in reversed(_OVERRIDES):
        if name in layer:
            return layer[name]
    budget = BUDGETS[name]
    env = os.environ.get(_env_name(name))
    if env:
        try:
            value = float(env)
        except ValueError:
            raise GradlabError(f"{_env_name(name)}={env!r} is not a number") from None
        if not value >= 0:
            raise GradlabError(f"{_env_name(name)}={env!r} must be zero or positive")
        return value
    return budget.default


def how_to_raise(name: str) -> str:
    return (f"raise it with the environment variable {_env_name(name)}=VALUE or, in Python, "
            f"'with gradlab.budgets.raised({name}=VALUE):'")


def _exceeded(name: str, what: str) -> BudgetError:
    b = BUDGETS[name]
    value = get(name)
    shown = f"{value:g} {b.unit}".strip()
    return BudgetError(name, f"{what} exceeds the '{name}' budget of {shown} ({b.why}); "
                             + how_to_raise(name))


@contextmanager
def raised(**values: float) -> Iterator[None]:
    """Temporarily set budgets (any of ``BUDGETS``), e.g. ``raised(derive_s=120, expr_nodes=1e5)``."""
    unknown = sorted(set(values) - set(BUDGETS))
    if unknown:
        raise GradlabError(f"unknown budget {', '.join(unknown)}; the budgets are: {', '.join(BUDGETS)}")
    for k, v in values.items():
        if not isinstance(v, int | float) or isinstance(v, bool) or not v >= 0:
            raise GradlabError(f"budget {k}={v!r} must be a number >= 0")
    _OVERRIDES.append({k: float(v) for k, v in values.items()})
    try:
        yield
    finally:
        _OVERRIDES.pop()


# --------------------------------------------------------------------------------------------
# Time budgets
# --------------------------------------------------------------------------------------------


class _Expired(BaseException):
    """Raised by the alarm inside the budgeted code. A BaseException, so that sympy's many
    ``except Exception`` blocks cannot swallow it; ``timed`` turns it into a BudgetError."""

    def __init__(self, token: object):
        super().__init__()
        self.token = token


_ACTIVE: list[tuple[object, float]] = []  # (token, deadline) of the enclosing timed blocks
_MACHINERY = frozenset({__file__, contextlib.__file__})  # the code of timed() and of its with statement


def _on_alarm(signum: int, frame: Any) -> None:
    if _ACTIVE:
        token, deadline = _ACTIVE[-1]
        if frame is not None and frame.f_code.co_filename in _MACHINERY:
            # landed in the entering or leaving of a block (a block that ends at its deadline):
            # raised there, the exception would skip the bookkeeping and leave the alarm armed
            # for whatever runs next; try again in a millisecond
            signal.setitimer(signal.ITIMER_REAL, 1e-3)
            return
        if time.monotonic() >= deadline - 1e-3:
            # re-armed first: raised inside a finaliser or a gc callback (jax has one), the
            # exception is lost ("ignored"), so the alarm repeats until one lands in the block
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            raise _Expired(token)
        signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 1e-3))


def _can_time() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def timed(name: str, what: str) -> Iterator[None]:
    """Run the block under the time budget ``name``; ``what`` names the work in the error.

    Nested blocks keep the earliest deadline: an inner budget never extends an outer one.
    """
    seconds = get(name)
    if seconds <= 0 or not math.isfinite(seconds) or not _can_time():
        yield
        return
    now = time.monotonic()
    deadline = now + seconds
    if _ACTIVE and _ACTIVE[-1][1] <= deadline:
        token, deadline = _ACTIVE[-1]  # the enclosing block's deadline comes first: it reports
        own = None
    else:
        token = own = object()
    previous = signal.getsignal(signal.SIGALRM) if not _ACTIVE else None
    if not _ACTIVE:
        signal.signal(signal.SIGALRM, _on_alarm)
    _ACTIVE.append((token, deadline))
    signal.setitimer(signal.ITIMER_REAL, max(deadline - now, 1e-3))
    try:
        yield
    except (_Expired, SystemError) as exc:
        # an alarm landing inside some C code (CPython's AST constructor) surfaces as a
        # SystemError that replaces the expiry: past this block's deadline, it is the expiry
        late = own is not None and time.monotonic() >= deadline - 1e-3
        mine = exc.token is own if isinstance(exc, _Expired) else late
        if not mine:
            raise
        raise _exceeded(name, f"{what} took longer than {seconds:g} s and was stopped; it") from None
    finally:
        _ACTIVE.pop()
        if _ACTIVE:
            signal.setitimer(signal.ITIMER_REAL, max(_ACTIVE[-1][1] - time.monotonic(), 1e-3))
        else:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


# --------------------------------------------------------------------------------------------
# Size budgets and numeric limits
# --------------------------------------------------------------------------------------------


def count_nodes(expr: Any, stop: int | None = None) -> int:
    """Nodes in a sympy tree, counted iteratively (no recursion), stopping early past ``stop``."""
    count, stack = 0, [expr]
    while stack:
        node = stack.pop()
        count += 1
        if stop is not None and count > stop:
            return count
        stack.extend(getattr(node, "args", ()))
    return count


def check_size(expr: Any, what: str) -> Any:
    """Refuse an expression with more nodes than the ``expr_nodes`` budget; return it otherwise."""
    limit = int(get("expr_nodes"))
    if limit > 0 and count_nodes(expr, stop=limit) > limit:
        raise _exceeded("expr_nodes", f"{what} has more than {limit} nodes; it")
    return expr


def check_count(name: str, value: Any, flag: str | None = None) -> int:
    """A whole number of points, seeds, steps or grid points: at least 1, at most the budget.

    Args:
        name: the budget (a key of ``BUDGETS``) that caps the count.
        value: the count as given (an int, or a float with a whole value).
        flag: the option it came from, named in the error (default: ``name``).

    Returns:
        The count as an int; anything else raises :class:`DomainError`, and a count past the
        budget :class:`BudgetError`.
    """
    label = flag or name
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise DomainError(f"{label} must be a positive whole number, not {value!r}")
    value = int(value)
    if value < 1:
        raise DomainError(f"{label} must be a positive whole number, not {value}")
    limit = get(name)
    if value > limit:
        raise _exceeded(name, f"{label}={value}")
    return value


def check_estimate(name: str, value: float, what: str) -> None:
    """Refuse a count or an estimate (settings, work, bytes) past its budget (0: no limit). The
    message reads ``what`` followed by the value, the limit and how to raise it, e.g. ``what =
    "the experiment's work is estimated at"``."""
    limit = get(name)
    if limit > 0 and value > limit:
        raise _exceeded(name, f"{what} {value:.3g} {BUDGETS[name].unit}, which")


def check_simulation(*, steps: Any, seeds: Any, n_pairs: Any, vocab: Any, max_len: Any) -> None:
    """The size arguments of a simulation, checked before anything is allocated."""
    check_count("steps", steps)
    check_count("seeds", seeds)
    check_count("pairs", n_pairs, "n_pairs")
    for name, value in (("vocab", vocab), ("max_len", max_len)):
        if name == "max_len" and value is None:
            return  # unbounded: the exact chain metrics enumerate nothing
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DomainError(f"{name} must be a positive whole number or None (unbounded), not {value!r}")
    content, total = vocab - 1, 0
    for k in range(max_len):
        total += content**k if (content or k == 0) else 0
        if total > get("sequences"):
            raise _exceeded("sequences", f"a policy with vocab={vocab} and max_len={max_len}")
