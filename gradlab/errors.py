"""gradlab's typed errors. Every error a user can cause is a ``GradlabError`` with a message
that says what was wrong and what is allowed; the CLI prints it and exits with status 2."""

from __future__ import annotations

__all__ = ["GradlabError", "UnknownLossError", "UnknownVariableError", "DomainError", "ParseError"]


class GradlabError(ValueError):
    """Base class of every error caused by user input."""


class UnknownLossError(GradlabError, KeyError):
    """A loss name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnknownVariableError(GradlabError):
    """A variable, view or hyperparameter name that does not apply."""


class DomainError(GradlabError):
    """A value outside the domain of its variable or hyperparameter."""


class ParseError(GradlabError):
    """A formula outside gradlab's expression grammar."""
