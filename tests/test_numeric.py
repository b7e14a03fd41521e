"""Property-based check of every derived gradient against high-precision finite differences.

For each loss and view, hypothesis draws points in the variables' domains (and beta where the
loss has it); the float64 closed form (numpy) must match mpmath's numerical derivative of the
loss itself, computed at 40 digits.
"""

from __future__ import annotations

import functools
import math

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradlab
from gradlab.errors import UnknownVariableError
from helpers import FD_DIGITS, RTOL

RANGES = {
    "lp": (-8.0, -0.05), "ref": (-8.0, -0.05), "len": (1.0, 30.0), "tail": (-4.0, 0.0), "ref_tail": (-4.0, 0.0),
    "p": (0.02, 0.999), "q": (0.02, 0.999), "m": (-3.0, -0.05), "n": (-3.0, -0.05), "h": (-5.0, 5.0),
}


def _range(name: str) -> tuple[float, float]:
    return RANGES[name.rsplit("_", 1)[0]]


CASES = []
for _name in gradlab.LOSSES:
    for _view in ("log", "probability", "length", "margin"):
        try:
            gradlab.variables(_name, _view)
        except UnknownVariableError:
            continue
        CASES.append((_name, _view))


@functools.cache
def _compiled(name: str, view: str):
    """(variables, hyperparameters, mpmath loss, {variable: numpy gradient}), compiled once."""
    names = gradlab.variables(name, view)
    hyper = list(gradlab.get_loss(name).hyperparameters)
    args = names + hyper
    loss = gradlab.numeric(gradlab.in_view(name, view), args, "mpmath")
    grads = {n: gradlab.numeric(e, args) for n, e in gradlab.gradient(name, view).items() if n in names}
    return names, hyper, loss, grads


@pytest.mark.parametrize("name, view", CASES)
@settings(max_examples=8)
@given(data=st.data())
def test_gradient_matches_finite_differences(name, view, data):
    names, hyper, loss, grads = _compiled(name, view)
    point = {n: data.draw(st.floats(*_range(n)), label=n) for n in names}
    values = {}
    if "beta" in hyper:
        values["beta"] = data.draw(st.floats(0.05, 2.0), label="beta")
    params = [float(v) for v in gradlab.parameter_values(name, values).values()]
    # the mpmath reference may need exp of a huge argument at legal extreme points (a length times a
    # per-token mean): lift the evaluation budget for the reference only
    with mpmath.workdps(FD_DIGITS), gradlab.budgets.raised(exp_argument=1e300):
        x0 = [mpmath.mpf(point[n]) for n in names] + [mpmath.mpf(v) for v in params]
        for i, n in enumerate(names):
            def along(t, i=i):
                x = list(x0)
                x[i] = t
                return loss(*x)

            expected = float(mpmath.diff(along, x0[i]))
            got = float(grads[n](*[point[k] for k in names], *params))
            assert math.isfinite(got), f"{name}/{view} d/d{n} is not finite at {point}"
            assert np.isclose(got, expected, rtol=RTOL, atol=1e-12), (
                f"{name}/{view} d/d{n} at {point}: closed form {got!r}, finite differences {expected!r}"
            )
