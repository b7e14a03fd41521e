"""Shared test helpers. Tolerances live here, in one place."""

from __future__ import annotations

import sympy

import gradlab

RTOL = 1e-9  # closed form vs autodiff / high-precision finite differences
FD_DIGITS = 40  # mpmath precision for finite-difference references


def assert_same(a, b, msg: str = "") -> None:
    """Exact symbolic equality where simplify decides it, else high-precision random points."""
    assert gradlab.equivalent(sympy.sympify(a), sympy.sympify(b)), f"{msg}\n  {a}\n  !=\n  {b}"


def assert_differ(a, b) -> None:
    assert not gradlab.equivalent(sympy.sympify(a), sympy.sympify(b)), f"unexpectedly equal: {a} == {b}"
