"""The loss type: one registered (or user-defined) loss with its metadata, and the sources its
formula was audited against.

Both registries build on it: the pairwise losses (:mod:`gradlab.losses`) and the group losses
(:mod:`gradlab.group_losses`), whose :class:`~gradlab.group_losses.GroupLoss` is a subclass.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

import sympy

from gradlab.symbols import HYPERPARAMETERS, SYMBOLS, Domain
from gradlab.trl import trl_defaults

__all__ = ["Expr", "Hyper", "Implementation", "Loss", "Source"]

# The loss functions' types (both registries): the canonical variables and the value are sympy
# expressions; a hyperparameter is a symbol when the registry builds the loss, or a number where
# one is given.
Expr = sympy.Expr
Hyper = sympy.Expr | float


@dataclass(frozen=True)
class Source:
    """A repository at a pinned commit (or release tag) that a loss was audited against."""

    repo: str
    commit: str
    version: str

    def __str__(self) -> str:
        return f"{self.repo}@{self.commit[:8]} ({self.version})"


@dataclass(frozen=True)
class Implementation:
    """One reference implementation of a loss: the function, its file, and the pinned source."""

    source: Source
    path: str
    function: str

    def __str__(self) -> str:
        return f"{self.source.repo} `{self.path}` `{self.function}` @ {self.source.commit[:8]} ({self.source.version})"


@dataclass(frozen=True, eq=False)
class Loss:
    """A registered (or user-defined) loss and its metadata.

    ``expr`` is the canonical sympy expression with symbolic hyperparameters; ``defaults`` maps
    each hyperparameter name to its default (a sympy number, or None where the user must give a
    value); ``variables`` are the canonical variables it reads. ``implementations`` are the
    reference implementations the formula was audited against, ``audit`` what the audit found,
    and ``trl_variant`` names the gradlab loss that reproduces what TRL computes under this
    loss's name, where that differs from this one.
    """

    name: str
    title: str
    doc: str
    variables: tuple[str, ...]
    defaults: Mapping[str, sympy.Expr | None]
    function: Callable[..., sympy.Expr] | None = None
    custom_expr: sympy.Expr | None = None
    aliases: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    length_normalised: bool = False
    kind: str = "pair"  # "pair", or "expectation" for the on-policy pdpo
    domains: Mapping[str, Domain] = field(default_factory=dict)
    equation: str = ""
    implementations: tuple[Implementation, ...] = ()
    audit: str = ""
    trl_variant: tuple[str, str] | None = None  # (gradlab loss TRL computes, what differs)
    components: tuple[tuple[str, sympy.Expr], ...] = ()  # (loss name, weight) of a weighted combination

    @classmethod
    def of(cls, function: Callable[..., sympy.Expr], **metadata: Any) -> Loss:
        """Build a ``Loss`` from its function: variables and defaults come from the signature."""
        sig = inspect.signature(function)
        variables, defaults = [], {}
        for p in sig.parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                defaults[p.name] = sympy.nsimplify(p.default, rational=True)
            else:
                variables.append(p.name)
        doc = inspect.getdoc(function) or ""
        return cls(
            name=function.__name__,
            title=doc.splitlines()[0] if doc else "",
            doc=doc,
            variables=tuple(variables),
            defaults=MappingProxyType(defaults),
            function=function,
            **metadata,
        )

    @cached_property
    def expr(self) -> sympy.Expr:
        """The loss as a sympy expression, hyperparameters left symbolic."""
        if self.custom_expr is not None:
            return self.custom_expr
        assert self.function is not None
        args = [SYMBOLS[v].symbol for v in self.variables]
        kwargs = {k: HYPERPARAMETERS[k].symbol for k in self.defaults}
        return sympy.sympify(self.function(*args, **kwargs))

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        return tuple(self.defaults)

    @property
    def needs_reference(self) -> bool:
        return any(v.startswith("ref") for v in self.variables)

    def domain(self, name: str) -> Domain:
        """The legal range of a hyperparameter or variable for this loss."""
        if name in self.domains:
            return self.domains[name]
        return (HYPERPARAMETERS.get(name) or SYMBOLS[name]).domain

    def hyper_symbols(self) -> dict[str, sympy.Symbol]:
        return {k: HYPERPARAMETERS[k].symbol for k in self.defaults}

    @property
    def trl_default_differences(self) -> dict[str, tuple[str, float, float]]:
        """The hyperparameters whose default here is not TRL 1.x's default for the config field
        that sets them: name -> (TRL field, TRL's default, gradlab's default). ``robust`` gives
        ``{"label_smoothing": ("DPOConfig.label_smoothing", 0.0, 0.1)}``."""
        out = {}
        for name, (trl_field, trl_value) in trl_defaults(self.name).items():
            mine = self.defaults.get(name)
            if mine is not None and float(mine) != float(trl_value):
                out[name] = (trl_field, float(trl_value), float(mine))
        return out
