"""Gradient field of a loss over (pi(y_w), pi(y_l)), in the probability and log-probability views.

Arrows point along the descent direction -grad(loss), normalised to unit length; colour is log10
of the gradient's magnitude. Both panels come from the same derived closed form
(`gradlab.derivative`), by default of the two-coefficient loss `gdpo`. The gallery caption
(:func:`caption`) states the loss, its hyperparameters and what the grid drawn shows.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from gradlab import symbolic


def _field(loss, view, values, xs, ys, reference):
    X, Y = np.meshgrid(xs, ys)
    return (X, Y, *symbolic.field(loss, view)(X, Y, values, reference=reference))


def compute(loss: str = "gdpo", values: Mapping[str, float] | None = None, q_w: float = 0.1, q_l: float = 0.1,
            n: int = 15) -> dict:
    """Both views' fields on an ``n`` x ``n`` grid: the probability view over (p_w, p_l) in
    [0.05, 1] with p_w + p_l <= 1 (the rest is impossible), the log view over [-4, 0]^2."""
    ps = np.linspace(0.05, 1.0, n)
    prob = _field(loss, "probability", values, ps, ps, (q_w, q_l))
    inside = prob[0] + prob[1] <= 1  # pi(y_w) + pi(y_l) <= 1
    prob = tuple(np.where(inside, a, np.nan) for a in prob)
    lps = np.linspace(-4.0, 0.0, n)
    return {"loss": loss, "values": dict(values or {}), "q": (q_w, q_l),
            "probability": prob, "log": _field(loss, "log", values, lps, lps, (q_w, q_l))}


def quiver_panel(ax, X, Y, gx, gy, title, xlabel, ylabel):
    """Unit arrows along -(gx, gy) at (X, Y), coloured by log10 of the magnitude, in the
    gallery's arrow size (the notebooks' fields use it too). Returns the quiver."""
    mag = np.hypot(gx, gy)
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v, colour = -gx / mag, -gy / mag, np.log10(mag)
    q = ax.quiver(X, Y, u, v, colour, cmap="viridis", pivot="mid", scale=22, width=0.006)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.set_aspect("equal", adjustable="box")
    return q


def make(data: dict | None = None):
    """Two panels: the probability view over (p_w, p_l) and the log view over (lp_w, lp_l)."""
    data = data or compute()
    from gradlab.figures import style

    fig = style.figure(0.5, column_aspect=1.85)
    axes = fig.subplots(*style.grid(2)).ravel()
    (px, py, pgx, pgy), (lx, ly, lgx, lgy) = data["probability"], data["log"]  # (X, Y, gx, gy) each
    qa = quiver_panel(axes[0], px, py, pgx, pgy, r"probability view: $-\partial\ell/\partial\pi$",
                style.LABELS["p_w"], style.LABELS["p_l"])
    qb = quiver_panel(axes[1], lx, ly, lgx, lgy, r"log view: $-\partial\ell/\partial\log\pi$",
                style.LABELS["lp_w"], style.LABELS["lp_l"])
    for q, ax in ((qa, axes[0]), (qb, axes[1])):
        q.set_clim(*style.log_colour_limits(q.get_array()))
        style.colourbar(fig, q, ax, style.LABELS["speed"])
    name, (q_w, q_l) = style.display_name(data["loss"]), data["q"]
    fig.suptitle(rf"{name}: where the loss pushes "
                 rf"($\pi_{{\mathrm{{ref}}}}(y_w) = \pi_{{\mathrm{{ref}}}}(y_l) = {style.number(q_w)}$)"
                 if q_w == q_l else rf"{name}: where the loss pushes")
    return fig


def facts(data: dict) -> dict:
    """What the drawn grid shows, computed from it: the lowest pi(y_l) drawn, how much larger
    |dl/dpi(y_l)| is there than at the top of the same column (the left one, where the grid
    is tallest), the range of log10 |grad| in each view, and whether the log view's two
    partials are equal and opposite everywhere."""
    X, Y, gx, gy = data["probability"]
    column = np.isfinite(gy[:, 0])
    push = np.abs(gy[column, 0])
    speed = {view: np.log10(np.hypot(*data[view][2:])) for view in ("probability", "log")}
    _, _, lx, ly = data["log"]
    return {"lowest_p_l": float(Y[column, 0].min()), "highest_p_l": float(Y[column, 0].max()),
            "growth": float(push[np.argmin(Y[column, 0])] / push[np.argmax(Y[column, 0])]),
            "speed_range": {view: (float(np.nanmin(v)), float(np.nanmax(v))) for view, v in speed.items()},
            "log_opposite": bool(np.allclose(lx, -ly, rtol=1e-12, atol=0))}


def caption(data: dict) -> str:
    """The gallery caption: the loss and hyperparameters drawn, and what the grid shows."""
    from gradlab.figures import hyperparameters_text, style

    f, (q_w, q_l) = facts(data), data["q"]
    lo, hi = (style.number(x, 2) for x in f["speed_range"]["probability"])
    text = (f"Arrows point along the descent direction -grad(loss), normalised to unit length; colour is "
            f"log10 of the gradient's magnitude. Both panels come from the same derived closed form "
            f"(`gradlab.derivative`) of `{symbolic.as_loss(data['loss']).name}` "
            f"({hyperparameters_text(data['loss'], data['values'])}; reference probabilities "
            f"{style.number(q_w)} and {style.number(q_l)}). In probabilities the push on y_l carries the "
            f"chain rule's factor 1/pi(y_l): on this grid it is {style.number(f['growth'], 2)} times larger at "
            f"pi(y_l) = {style.number(f['lowest_p_l'])}, the lowest row drawn, than at "
            f"pi(y_l) = {style.number(f['highest_p_l'])} (left column), and log10 |grad| spans {lo} to {hi}. "
            f"It diverges only as pi(y_l) goes to 0, which no finite grid reaches.")
    if f["log_opposite"]:
        text += (" In log-probabilities the two partials are equal and opposite at every grid point, so every "
                 "arrow points along the same diagonal.")
    return text
