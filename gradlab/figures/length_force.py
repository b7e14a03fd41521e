"""Force against length for several losses: probability view and the per-token lever.

Left: log10 |dl/dpi(y_l)| in the probability view against the common length L of both
responses, with pi(y) = exp(L m) at per-token mean m = -1 under policy and reference (so the
pair is balanced). Right: |dl/dm_l|, the derivative with respect to the rejected response's
per-token mean log-prob at fixed length (length view). Both are gradlab's derived closed
forms, evaluated in arbitrary precision.

What this shows (computed, not assumed): length normalisation does not remove the exponential
growth of the probability-view force, because the 1/pi(y_l) factor comes from the chain rule
d log p / d p, which every loss of log-probabilities shares; it only divides it by L. The
per-token lever is where normalisation matters: it grows linearly in L for DPO and IPO and
stays flat for the length-normalised losses.
"""

from __future__ import annotations

import mpmath
import numpy as np
import sympy

from gradlab import symbolic
from gradlab.symbols import VIEWS, symbol

LOSSES = ("dpo", "ipo", "sigmoid_norm", "ipo_trl", "simpo", "r_dpo", "ld_dpo")


def _curve(loss: str, var: str, view: str, lengths, m: float, values: dict | None = None) -> np.ndarray:
    L = sympy.Symbol("L", positive=True)
    from gradlab.figures import values_for

    expr = symbolic.derivative(loss, var, view).xreplace(symbolic.parameter_values(loss, values_for(loss, values)))
    # both responses of length L at per-token log-prob m under the policy and the reference
    point = {"lp_w": L * m, "lp_l": L * m, "ref_w": L * m, "ref_l": L * m, "len_w": L, "len_l": L,
             "tail_w": 0, "tail_l": 0, "ref_tail_w": 0, "ref_tail_l": 0}
    subs = {symbol(n): v for n, v in VIEWS[view].at(point).items()}
    f = sympy.lambdify([L], symbolic.standard(expr.xreplace(subs)), "mpmath")
    with mpmath.workdps(30):
        vals = [abs(f(mpmath.mpf(float(x)))) for x in lengths]
        return np.array([float(mpmath.log10(v)) if v > 0 else -np.inf for v in vals])


def make(losses=LOSSES, m: float = -1.0, max_length: int = 200, values: dict | None = None):

    from gradlab.figures import check_values_used, style

    check_values_used(losses, values)
    lengths = np.arange(1, max_length + 1)
    fig = style.figure(0.45, column_aspect=1.6)
    left, right = fig.subplots(*style.grid(2)).ravel()
    for i, loss in enumerate(losses):
        s = dict(label=style.display_name(loss), **style.series(i, marker=True, markevery=25))
        left.plot(lengths, _curve(loss, "p_l", "probability", lengths, m, values), **s)
        right.plot(lengths, 10 ** _curve(loss, "m_l", "length", lengths, m, values), **s)
    left.set(xlabel="length L of both responses (tokens)", ylabel=style.LABELS["log_force"],
             title=f"probability view, per-token mean $m = {m:g}$")
    right.set(xlabel="length L of both responses (tokens)", ylabel=style.LABELS["lever"],
              title=r"length view: per-token lever on $y_l$", yscale="log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(loc="upper left")  # the empty corner: every curve rises to the right
    return fig
