"""The force on the rejected response grows exponentially with its length.

|dl/dpi(y_l)| of the two-coefficient loss `gdpo` (gamma = beta) in the probability view, with
the sequence probabilities written through the length view, pi(y) = exp(L m) and
pi_0(y) = exp(L n), for chosen and rejected responses of the same length L and the same
per-token mean log-prob m under the policy and the reference (so z = 0 and sigma(-z) = 1/2).
The closed form is derived by gradlab and evaluated in arbitrary precision (mpmath), so values
far beyond float64's range (1e308) are exact. With beta = 0.1 and m = -1 it is about 1e3 at
L = 10 and 1e42 at L = 100, as the first post says: the slope of log10|force| against L is
-m / ln 10, whatever beta is.
"""

from __future__ import annotations

import mpmath
import numpy as np
import sympy

from gradlab import symbolic
from gradlab.symbols import symbol


def log10_force(lengths, m: float, beta: float, loss: str = "gdpo") -> np.ndarray:
    """log10 |dl/dp_l| along ``lengths`` for equal-length, equal-quality pairs (z = 0)."""
    d = symbolic.derivative(loss, "p_l", "probability")
    L, M = sympy.Symbol("L", positive=True), sympy.Symbol("M", nonpositive=True)
    through_length = {
        symbol("p_w"): sympy.exp(L * M), symbol("p_l"): sympy.exp(L * M),
        symbol("q_w"): sympy.exp(L * M), symbol("q_l"): sympy.exp(L * M),
    }
    params = symbolic.parameter_values(loss, {"beta": beta, "gamma": beta})
    f = sympy.lambdify([L, M], symbolic.standard(d.xreplace(params).xreplace(through_length)), "mpmath")
    with mpmath.workdps(30):
        return np.array([float(mpmath.log10(abs(f(mpmath.mpf(float(x)), mpmath.mpf(m))))) for x in lengths])


def make(ms=(-0.5, -1.0, -2.0), betas=(0.1, 1.0), max_length: int = 400):

    from gradlab.figures import style

    lengths = np.arange(1, max_length + 1)
    fig = style.figure(0.62, column_aspect=0.85)
    ax = fig.subplots()
    styles = ["-", "--", ":"]
    for beta, ls in zip(betas, styles, strict=False):
        for m, color in zip(ms, [style.PALETTE[k] for k in (0, 1, 3)], strict=False):
            y = log10_force(lengths, m, beta)
            ax.plot(lengths, y, ls=ls, color=color, label=rf"$m = {m:g}$, $\beta = \gamma = {beta:g}$")
    ax.axhline(np.log10(np.finfo(float).max), color=style.REFERENCE_COLOUR, lw=0.8)
    ax.text(5, np.log10(np.finfo(float).max) + 6, "float64 overflow", color=style.REFERENCE_COLOUR)
    ax.set(
        xlabel="sequence length L (tokens)",
        ylabel=style.LABELS["log_force"],
        title="two-coefficient DPO: force on the rejected response",
    )
    # outside the axes: the curves fan out from the origin and cover every corner
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3 if style.size() == "page" else 2)
    return fig
