"""Gradient atlas: where each loss pushes (pi(y_w), pi(y_l)), in three coordinate systems.

One row per loss, three columns. Probability view: -(dl/dp_w, dl/dp_l). Log view:
-(dl/dlp_w, dl/dlp_l). Logit view: a single-context softmax over three responses (y_w, y_l and
one other), so the grid covers p_w + p_l < 1; the arrows are the velocity of (p_w, p_l) under a
gradient-descent step on the logits, dp = -J (J^T grad_lp l) with J = diag(p) - p p^T, the
only one of the three views in which probability mass is conserved. Arrows are unit length;
colour is log10 of the speed. All three come from the same derived log-view/probability-view
closed forms, at reference probabilities 0.3 and single-token responses (lengths 1).
"""

from __future__ import annotations

import numpy as np

from gradlab import symbolic

LOSSES = ("dpo", "ipo", "simpo", "orpo", "apo_zero")
Q = 0.3


def partials(
    loss: str, view: str, x: np.ndarray, y: np.ndarray, values: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(dl/dx, dl/dy) on a grid of the view's axes, (p_w, p_l) or (lp_w, lp_l), at the neutral
    point with reference probabilities ``Q``."""
    from gradlab.figures import values_for

    return symbolic.field(loss, view)(x, y, values_for(loss, values), reference=Q)


def logit_velocity(
    loss: str, pw: np.ndarray, pl: np.ndarray, values: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(dp_w, dp_l) of one gradient-descent step on the logits of a 3-way softmax."""
    gw, gl = partials(loss, "log", np.log(pw), np.log(pl), values)
    p = np.stack([pw, pl, 1.0 - pw - pl])
    g = np.stack([gw, gl, np.zeros_like(gw)])
    grad_logits = g - p * g.sum(0)  # J^T grad_lp, J = diag(p) - p p^T is symmetric
    dp = -(p * grad_logits - p * (p * grad_logits).sum(0))
    return dp[0], dp[1]


def _quiver(ax, X, Y, U, V, title):
    mag = np.hypot(U, V)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = ax.quiver(X, Y, U / mag, V / mag, np.log10(mag), cmap="viridis", pivot="mid", scale=16, width=0.01)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(3))
    ax.yaxis.set_major_locator(MaxNLocator(3))
    ax.set_title(title)
    ax.set_aspect("equal", adjustable="box")
    return q


def make(losses=LOSSES, n: int = 11, values: dict | None = None):

    from gradlab.figures import check_values_used, style

    check_values_used(losses, values)
    page = style.size() == "page"
    fig = style.figure(0.31 * len(losses), column_aspect=0.36 * len(losses))
    axes = fig.subplots(len(losses), 3, squeeze=False)
    ps = np.linspace(0.05, 0.95, n)
    X, Y = np.meshgrid(ps, ps)
    for row, loss in zip(axes, losses, strict=True):
        gx, gy = partials(loss, "probability", np.where(X + Y <= 1, X, np.nan), np.where(X + Y <= 1, Y, np.nan), values)
        name = style.display_name(loss)
        quivers = [_quiver(row[0], X, Y, -gx, -gy, f"{name}: probability" if page else name)]
        lps = np.linspace(-4.0, -0.05, n)
        LX, LY = np.meshgrid(lps, lps)
        gx, gy = partials(loss, "log", LX, LY, values)
        quivers.append(_quiver(row[1], LX, LY, -gx, -gy, f"{name}: log" if page else "log view"))
        inside = X + Y < 0.97
        U, V = logit_velocity(loss, np.where(inside, X, 0.3), np.where(inside, Y, 0.3), values)
        U, V = np.where(inside, U, np.nan), np.where(inside, V, np.nan)
        quivers.append(_quiver(row[2], X, Y, U, V, f"{name}: logit (softmax)" if page else "logit view"))
        for q, ax in zip(quivers, row, strict=True):
            q.set_clim(*style.log_colour_limits(q.get_array()))
            if page:  # a column is too narrow for a colourbar per panel; the caption gives the scale
                style.colourbar(fig, q, ax, "", shrink=0.8)
        row[0].set(xlabel=style.LABELS["p_w"], ylabel=style.LABELS["p_l"])
        row[1].set(xlabel=style.LABELS["lp_w"], ylabel=style.LABELS["lp_l"])
        row[2].set(xlabel=style.LABELS["p_w"], ylabel=style.LABELS["p_l"])
    fig.suptitle(r"Descent directions (unit arrows; colour: $\log_{10}$ speed)")
    return fig
