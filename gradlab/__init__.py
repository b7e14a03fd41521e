"""gradlab: closed-form, numerically verified gradients of preference-optimisation losses.

The public API mirrors the command line::

    import gradlab
    gradlab.list_losses()                                  # gradlab list
    gradlab.get_loss("dpo").expr                           # gradlab show dpo
    gradlab.derivative("gdpo", "p_l", view="probability")  # gradlab grad gdpo --wrt p_l --view probability
    gradlab.evaluate("dpo", {"lp_w": -1, ...})             # gradlab eval dpo --at ...
    gradlab.custom("log(1 + exp(-beta*(lp_w - lp_l)))")    # --expr
"""

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

__version__ = "0.1.0"


def list_losses() -> list[str]:
    """The registered loss names (what ``gradlab list`` prints)."""
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
