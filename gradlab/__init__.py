"""gradlab: closed-form, numerically verified gradients of preference-optimisation losses.

The public API mirrors the command line::

    import gradlab
    gradlab.list_losses()                                  # gradlab list
    gradlab.get_loss("dpo").expr                           # gradlab show dpo
    gradlab.derivative("gdpo", "p_l", view="probability")  # gradlab grad gdpo --wrt p_l --view probability
    gradlab.evaluate("dpo", {"lp_w": -1, ...})             # gradlab eval dpo --at ...
    gradlab.custom("log(1 + exp(-beta*(lp_w - lp_l)))")    # --expr
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it. ``import gradlab`` imports none of them (sympy alone takes
# about 0.4 s to import); each is imported on first use of one of its names (PEP 562).
_EXPORTS: dict[str, str] = {
    "budgets": "gradlab.budgets",
    "BudgetError": "gradlab.budgets",
    "DomainError": "gradlab.errors",
    "GradlabError": "gradlab.errors",
    "ParseError": "gradlab.errors",
    "UnknownLossError": "gradlab.errors",
    "UnknownVariableError": "gradlab.errors",
    "ALIASES": "gradlab.losses",
    "LOSSES": "gradlab.losses",
    "OUT_OF_SCOPE": "gradlab.losses",
    "Loss": "gradlab.losses",
    "custom": "gradlab.losses",
    "get_loss": "gradlab.losses",
    "loss_names": "gradlab.losses",
    "parse": "gradlab.parsing",
    **{name: "gradlab.symbolic" for name in (
        "derivative", "equivalent", "evaluate", "gradient", "in_view", "latex", "limit", "numeric",
        "parameter_values", "readable", "standard", "variables")},
    **{name: "gradlab.symbols" for name in ("HYPERPARAMETERS", "SYMBOLS", "VIEWS", "View", "symbol")},
}

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs only
    from gradlab import budgets
    from gradlab.budgets import BudgetError
    from gradlab.errors import DomainError, GradlabError, ParseError, UnknownLossError, UnknownVariableError
    from gradlab.losses import ALIASES, LOSSES, OUT_OF_SCOPE, Loss, custom, get_loss, loss_names
    from gradlab.parsing import parse
    from gradlab.symbolic import (
        derivative,
        equivalent,
        evaluate,
        gradient,
        in_view,
        latex,
        limit,
        numeric,
        parameter_values,
        readable,
        standard,
        variables,
    )
    from gradlab.symbols import HYPERPARAMETERS, SYMBOLS, VIEWS, View, symbol


def __getattr__(name: str) -> Any:
    """Import the defining module of a public name on first use, and keep the name here; a
    submodule (``gradlab.symbols``, ``gradlab.experiments``...) is imported on first access too."""
    module = _EXPORTS.get(name)
    if module is None:
        if not name.startswith("__") and importlib.util.find_spec(f"gradlab.{name}") is not None:
            return importlib.import_module(f"gradlab.{name}")  # the import binds it here
        raise AttributeError(f"module 'gradlab' has no attribute '{name}'")
    mod = importlib.import_module(module)
    value = mod if module == f"gradlab.{name}" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def list_losses() -> list[str]:
    """The registered loss names (what ``gradlab list`` prints)."""
    from gradlab.losses import LOSSES

    return list(LOSSES)


__all__ = [
    "ALIASES",
    "BudgetError",
    "DomainError",
    "GradlabError",
    "HYPERPARAMETERS",
    "LOSSES",
    "Loss",
    "OUT_OF_SCOPE",
    "ParseError",
    "SYMBOLS",
    "UnknownLossError",
    "UnknownVariableError",
    "VIEWS",
    "View",
    "custom",
    "derivative",
    "equivalent",
    "evaluate",
    "get_loss",
    "gradient",
    "in_view",
    "latex",
    "limit",
    "list_losses",
    "loss_names",
    "numeric",
    "parameter_values",
    "parse",
    "readable",
    "standard",
    "budgets",
    "symbol",
    "variables",
]
