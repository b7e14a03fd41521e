"""Force against length for several losses: probability view and the per-token lever.

Left: log10 |dl/dpi(y_l)| in the probability view against the common length L of both
responses; right: the per-token lever |dl/dm_l| (length view). The gallery caption
(:func:`caption`) states the losses and settings drawn and what the curves show.
"""

from __future__ import annotations

import mpmath
import numpy as np
import sympy

from gradlab import symbolic
from gradlab.symbols import VIEWS, symbol

_FINDING = """What this shows (computed, not assumed): length normalisation does not remove the exponential
growth of the probability-view force, because the 1/pi(y_l) factor comes from the chain rule
d log p / d p, which every loss of log-probabilities shares; it only divides it by L. The
per-token lever is where normalisation matters: it grows linearly in L for DPO and IPO and
stays flat for the length-normalised losses."""

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


def compute(losses=LOSSES, m: float = -1.0, max_length: int = 200, values: dict | None = None) -> dict:
    """Both panels' curves, {"lengths", "m", "values", "curves": {loss: (log10 force, lever)}}."""
    from gradlab.figures import check_values_used

    check_values_used(losses, values)
    lengths = np.arange(1, max_length + 1)
    curves = {loss: (_curve(loss, "p_l", "probability", lengths, m, values),
                     10 ** _curve(loss, "m_l", "length", lengths, m, values)) for loss in losses}
    return {"lengths": lengths, "m": m, "values": dict(values or {}), "curves": curves}


def make(data: dict | None = None):
    data = data or compute()
    from gradlab.figures import style

    lengths, curves = data["lengths"], data["curves"]
    fig = style.figure(0.45, column_aspect=1.6)
    left, right = fig.subplots(*style.grid(2)).ravel()
    for i, group in enumerate(style.coinciding(curves)):
        force, lever = curves[group[0]]
        s = dict(label=" = ".join(style.display_name(loss) for loss in group),
                 **style.series(i, marker=True, markevery=25))
        left.plot(lengths, force, **s)
        right.plot(lengths, lever, **s)
    left.set(xlabel="length L of both responses (tokens)", ylabel=style.LABELS["log_force"],
             title=f"probability view, per-token mean $m = {style.number(data['m'])}$")
    right.set(xlabel="length L of both responses (tokens)", ylabel=style.LABELS["lever"],
              title=r"length view: per-token lever on $y_l$", yscale="log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(loc="upper left")  # the empty corner: every curve rises to the right
    return fig


def caption(data: dict) -> str:
    """The gallery caption, with the losses, hyperparameters and per-token mean drawn."""
    from gradlab.figures import hyperparameters_text, style

    curves, m = data["curves"], style.number(data["m"])
    settings = "; ".join(f"`{loss}`: {hyperparameters_text(loss, data['values'])}" for loss in curves)
    same = [g for g in style.coinciding(curves) if len(g) > 1]
    text = (f"Left: log10 |dl/dpi(y_l)| in the probability view against the common length L of both responses, "
            f"with pi(y) = exp(L m) at per-token mean m = {m} under policy and reference (so the pair is balanced). "
            f"Right: |dl/dm_l|, the derivative with respect to the rejected response's per-token mean log-prob at "
            f"fixed length (length view). Both are gradlab's derived closed forms, evaluated in arbitrary "
            f"precision, for L = 1 to {int(data['lengths'][-1])} ({settings}).")
    if same:
        text += (" Losses whose curves are identical here share one line, labelled with every name ("
                 + "; ".join(" = ".join(style.display_name(x) for x in g) for g in same)
                 + "): with equal lengths, a length term that compares the two responses is zero.")
    return text + "\n\n" + _FINDING


