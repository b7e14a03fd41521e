"""Gradient field of a loss over (pi(y_w), pi(y_l)), in the probability and log-probability views.

Arrows point along the descent direction -grad(loss), normalised to unit length; colour is
log10 of the gradient's magnitude. Both panels come from the same derived closed form
(`gradlab.derivative`) of the two-coefficient loss `gdpo` (beta = gamma = 0.1, reference
probabilities 0.1 for both responses). In probabilities the push on y_l is inversely
proportional to pi(y_l), so the field blows up along the bottom edge; in log-probabilities the
two partials are equal and opposite, so every arrow points along the same diagonal.
"""

from __future__ import annotations

import numpy as np

from gradlab import symbolic


def _field(loss, view, values, xs, ys, reference):
    X, Y = np.meshgrid(xs, ys)
    return (X, Y, *symbolic.field(loss, view)(X, Y, values, reference=reference))


def _panel(ax, X, Y, gx, gy, title, xlabel, ylabel):
    mag = np.hypot(gx, gy)
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = -gx / mag, -gy / mag
    q = ax.quiver(X, Y, u, v, np.log10(mag), cmap="viridis", pivot="mid", scale=22, width=0.006)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.set_aspect("equal", adjustable="box")
    return q


def make(loss: str = "gdpo", values: dict | None = None, q_w: float = 0.1, q_l: float = 0.1, n: int = 15):
    """Two panels: the probability view over (p_w, p_l) and the log view over (lp_w, lp_l)."""
    from gradlab.figures import style

    fig = style.figure(0.5, column_aspect=1.85)
    axes = fig.subplots(*style.grid(2)).ravel()
    ps = np.linspace(0.05, 1.0, n)
    field = _field(loss, "probability", values, ps, ps, (q_w, q_l))
    inside = field[0] + field[1] <= 1  # pi(y_w) + pi(y_l) <= 1: the rest is impossible
    field = tuple(np.where(inside, a, np.nan) for a in field)
    qa = _panel(axes[0], *field, r"probability view: $-\partial\ell/\partial\pi$",
                style.LABELS["p_w"], style.LABELS["p_l"])
    lps = np.linspace(-4.0, 0.0, n)
    field = _field(loss, "log", values, lps, lps, (q_w, q_l))
    qb = _panel(axes[1], *field, r"log view: $-\partial\ell/\partial\log\pi$",
                style.LABELS["lp_w"], style.LABELS["lp_l"])
    for q, ax in ((qa, axes[0]), (qb, axes[1])):
        q.set_clim(*style.log_colour_limits(q.get_array()))
        style.colourbar(fig, q, ax, style.LABELS["speed"])
    fig.suptitle(rf"{style.display_name(loss)}: where the loss pushes "
                 rf"($\pi_{{\mathrm{{ref}}}}(y_w) = \pi_{{\mathrm{{ref}}}}(y_l) = {style.number(q_w)}$)"
                 if q_w == q_l else rf"{style.display_name(loss)}: where the loss pushes")
    return fig
