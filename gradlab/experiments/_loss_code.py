"""The numeric functions a training program calls for a loss (private): its value per unit, and
its closed-form partial derivatives in the variables that move with the parameters (sympy's
derivatives of the loss, printed as JAX code by ``lambdify``).

Deriving them costs sympy's import, the derivatives and the printing. So, for every registered
pair loss, the same code is generated ahead (``python -m gradlab.catalogue``, or ``python3
tasks.py docs``) into ``_loss_table.py`` beside this module, by the function that derives it on
demand (:func:`derive`), and a test fails when the shipped table differs from what it gives
now. The code is printed with the canonical variables' own names (``symbolic.numeric(...,
named=True)``), so the two paths run the same code and give the same bits.

The table is used only while it is current: it records the SHA-256 of every file its code
depends on (the import closure of :data:`ROOTS` and sympy's release file, as
``gradlab.answers`` does for its answers). When one differs from what is installed, nothing in
it is served and every loss is derived. It holds registered losses only, looked up by their
registered names and aliases as written: a formula (``expr``), a weighted combination or any
other spelling is derived, so a user's text never reaches generated code.

Beside the functions, the table holds what a run checks a registered loss against: its kind, and
its hyperparameters with their defaults and legal ranges (:class:`Facts`), so that validating
and running an experiment on a registered loss does not import sympy either. A value that is
not plainly valid is judged by the live registry, which gives the refusal and its message.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from gradlab import caches
from gradlab._declared import Domain

__all__ = ["FORMAT", "ROOTS", "TABLE", "Facts", "derive", "facts", "render", "served", "table"]

FORMAT = "gradlab-loss-code/2"
TABLE = Path(__file__).with_name("_loss_table.py")
_MODULE = "gradlab.experiments._loss_table"
# the code depends on these modules and on everything they import
ROOTS = ("gradlab.losses", "gradlab.symbolic", "gradlab.symbols", "gradlab.stable", "gradlab.experiments._loss_code")

# (variables, hyperparameter count, value, moving variables, partials): objective.LossFns' fields
Compiled = tuple[list[str], int, Any, list[str], Any]


def _forms(loss: Any) -> tuple[list[str], list[str], list[str], Any, Any]:
    """(variables, hyperparameters, moving variables, value expression, partials tuple)."""
    import sympy

    from gradlab import symbolic
    from gradlab.policies import POLICY_VARIABLES

    variables = list(loss.variables)
    moving = [v for v in variables if v in POLICY_VARIABLES]
    partials = sympy.Tuple(*[sympy.diff(loss.expr, symbolic.symbol_of(v)) for v in moving])
    return variables, list(loss.hyperparameters), moving, loss.expr, partials


def derive(loss: Any) -> Compiled:
    """The numeric functions of ``loss`` (a registered :class:`~gradlab.losses.Loss` or a
    formula's), derived now with sympy."""
    from gradlab import symbolic

    variables, hyper, moving, value, partials = _forms(loss)
    args = variables + hyper
    return (variables, len(hyper), symbolic.numeric(value, args, backend="jax", named=True), moving,
            symbolic.numeric(partials, args, backend="jax", cse=True, named=True))


# --------------------------------------------------------------------------------------------
# The shipped table
# --------------------------------------------------------------------------------------------


@caches.memo(maxsize=1)
def table() -> Any | None:
    """The generated module, or None when it is absent, of another format, or not current."""
    from gradlab import answers

    try:
        module = importlib.import_module(_MODULE)
    except ImportError:
        return None
    if getattr(module, "FORMAT", None) != FORMAT or not answers.is_current(getattr(module, "SOURCES", {"": None})):
        return None
    return module


def _current(module: Any) -> Any | None:
    """``module`` (a table; the shipped one when None) when it is of this format and current."""
    from gradlab import answers

    if module is None:
        return table()
    if getattr(module, "FORMAT", None) != FORMAT or not answers.is_current(getattr(module, "SOURCES", None)):
        return None
    return module


def served(name: str | None, *, module: Any = None) -> Compiled | None:
    """The shipped functions of the registered loss ``name`` (a registered name or alias, as
    written), or None: not in the table, or the table (``module``, the shipped one by default)
    not current."""
    module = None if name is None else _current(module)
    entry = None if module is None else module.LOSSES.get(module.ALIASES.get(name, name))
    if entry is None:
        return None
    variables, n_hyper, value, moving, partials = entry
    return list(variables), n_hyper, value, list(moving), partials


class Facts(NamedTuple):
    """A registered pair loss as a run checks it, read from the shipped table: its canonical
    name, its kind, the canonical variables it reads, and each hyperparameter with its default
    (None where the user must give one) and its legal range, in the registry's order. It answers
    what :class:`gradlab.losses.Loss` answers for these, without sympy."""

    name: str
    kind: str
    variables: tuple[str, ...]
    hyper: tuple[tuple[str, float | None, Domain], ...]

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        return tuple(k for k, _, _ in self.hyper)

    def values(self, given: Mapping[str, Any]) -> tuple[tuple[str, float], ...] | None:
        """Every hyperparameter with its value, ``given`` over the defaults, as floats: the
        numbers :func:`gradlab.symbolic.parameter_values` gives. None wherever ``given`` is not
        plainly valid (an unknown name, a value that is not a finite int or float in its range,
        a hyperparameter with no default left out): the live registry then judges it, and its
        refusal names what is allowed."""
        if not set(given) <= set(self.hyperparameters):
            return None
        out = []
        for name, default, domain in self.hyper:
            if name not in given:
                if default is None:
                    return None
                out.append((name, default))
                continue
            value = given[name]
            # an int is exact as a float64 up to 2**53; a larger one (or another type) goes to sympy
            if type(value) not in (int, float) or (type(value) is int and abs(value) > 2**53):
                return None
            if not domain.contains(float(value)):
                return None
            out.append((name, float(value)))
        return tuple(out)


def facts(name: str | None, *, module: Any = None) -> Facts | None:
    """The :class:`Facts` of the registered loss ``name`` (a registered name or alias, as
    written), or None: not in the table, or the table (``module``, the shipped one by default)
    not current."""
    module = None if name is None else _current(module)
    canonical = None if module is None else module.ALIASES.get(name, name)
    if canonical is None or canonical not in getattr(module, "FACTS", {}):
        return None
    kind, hyper = module.FACTS[canonical]
    return Facts(canonical, kind, tuple(module.LOSSES[canonical][0]),
                 tuple((k, default, _domain(interval)) for k, default, interval in hyper))


def _interval(domain: Domain) -> tuple[float | None, float | None, bool, bool]:
    """A domain as a literal ``(low, high, low_open, high_open)``, None for an infinite end."""
    return (None if math.isinf(domain.low) else domain.low, None if math.isinf(domain.high) else domain.high,
            domain.low_open, domain.high_open)


def _domain(interval: tuple[float | None, float | None, bool, bool]) -> Domain:
    low, high, low_open, high_open = interval
    return Domain(-math.inf if low is None else low, math.inf if high is None else high, low_open, high_open)


def _facts_entry(loss: Any) -> tuple[str, tuple[tuple[str, float | None, tuple], ...]]:
    """(kind, ((hyperparameter, default, interval), ...)) of a registered loss, the default as
    :func:`gradlab.symbolic.parameter_values` gives it (an exact number), turned to a float."""
    return loss.kind, tuple((k, None if v is None else float(v), _interval(loss.domain(k)))
                            for k, v in loss.defaults.items())


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------


def _source(fn: Any, name: str) -> tuple[str, dict[str, Any]]:
    """The code of a lambdified function renamed ``name``, and the module-level names it reads
    (with their objects)."""
    text = inspect.getsource(fn)
    tree = ast.parse(text)
    (node,) = tree.body
    assert isinstance(node, ast.FunctionDef)
    local = {a.arg for a in node.args.args} | {t.id for n in ast.walk(node) if isinstance(n, ast.Assign)
                                                for t in n.targets if isinstance(t, ast.Name)}
    reads = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    used = {r: fn.__globals__[r] for r in sorted(reads - local) if not hasattr(builtins, r) or r in fn.__globals__}
    return text.replace(f"def {node.name}(", f"def {name}(", 1), used


def _imports(used: dict[str, Any]) -> list[str]:
    """The import lines that bind every name the generated functions read to the same object."""
    import functools

    import jax
    import jax.numpy as jnp

    from gradlab import stable

    homes = {"gradlab.stable": stable, "jax.numpy": jnp, "functools": functools}  # what lambdify's JAX code reads
    lines = []
    for name, obj in sorted(used.items()):
        if name == "jax" and obj is jax:
            lines.append("import jax")
            continue
        home = next((m for m, module in homes.items() if getattr(module, name, None) is obj), None)
        if home is None:
            raise RuntimeError(f"the generated code reads {name!r}, which none of {', '.join(homes)} has")
        lines.append(f"from {home} import {name}")
    return lines


def render() -> str:
    """The text of ``_loss_table.py``: every registered loss's functions, derived by
    :func:`derive`, and the files they depend on."""
    from gradlab import answers
    from gradlab.losses import LOSSES

    functions, entries, used = [], [], {}
    for name, loss in LOSSES.items():
        assert name.isidentifier(), name  # a registered name (the registry's own), never a user's text
        variables, n_hyper, value, moving, partials = derive(loss)
        for suffix, fn in (("value", value), ("partials", partials)):
            text, reads = _source(fn, f"{name}_{suffix}")
            functions.append(text.rstrip() + "\n")
            used.update(reads)
        entries.append(f"    {name!r}: ({tuple(variables)!r}, {n_hyper}, {name}_value, {tuple(moving)!r}, "
                       f"{name}_partials),")
    aliases = [f"    {alias!r}: {name!r}," for name, loss in LOSSES.items() for alias in loss.aliases]
    known = [f"    {name!r}: {_facts_entry(loss)!r}," for name, loss in LOSSES.items()]
    sources = [f"    {k!r}: {v!r}," for k, v in answers.fingerprint(answers.source_files(ROOTS)).items()]
    head = [
        '"""The numeric functions of every registered pair loss, generated by ``python -m gradlab.catalogue``',
        "from the loss registry (``gradlab.experiments._loss_code`` says how they are used): do not edit.",
        '"""',
        "# ruff: noqa",
        "",
        *_imports(used),
        "",
        f"FORMAT = {FORMAT!r}",
        "# the SHA-256 of every file this code depends on: the table is served only while all agree",
        "SOURCES = {", *sources, "}",
        "",
    ]
    tail = ["", "# name: (variables, hyperparameter count, value, moving variables, partials)",
            "LOSSES = {", *entries, "}", "", "ALIASES = {", *aliases, "}", "",
            "# name: (kind, ((hyperparameter, default, (low, high, low_open, high_open)), ...)); None: no",
            "# default, or an infinite end",
            "FACTS = {", *known, "}"]
    return "\n".join(head) + "\n" + "\n\n".join(functions) + "\n".join(tail) + "\n"
