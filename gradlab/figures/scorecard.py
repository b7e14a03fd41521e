"""Pathology scorecard: every registered loss, measured the same way, at matched beta.

Four panels, each computed. (1) Rejected-side force as pi(y_l) -> 0, as a function of beta: the
exponent s in |dl/dpi(y_l)| ~ pi(y_l)^s, read off the derived probability-view closed form in
arbitrary precision at pi(y_l) = 1e-100 and 1e-200 (pi(y_w) = 0.5, reference 0.5, lengths 1,
other hyperparameters at their defaults), one marker per beta in {0.1, 0.5, 1, 2} (colour and
marker shape = beta; black x: a loss without beta). s < 0: the force diverges; s >= 0: bounded;
a force that vanishes faster than any power is drawn at the right edge. At equal beta DPO and
SimPO have the same exponent, beta - 1: the old "DPO diverges, SimPO is bounded" was a
comparison of beta = 0.1 against beta = 2. (2, 3) Length drift factor (final / initial exact
expected length, log scale) in the `length_drift` setting of `gradlab.experiments.named`, the
same computation as the `length_drift` figure: exact unbounded unigram + EOS, no cut-off, 64
equal-length pairs per seed, 300 full-batch steps, beta = 0.1 for every loss that has one (other
hyperparameters at defaults), 8 seeds; (2) plain gradient descent, lr 0.5; (3) Adam, lr 0.05.
Dot: median over seeds; bar: min to max. Grey band: the same run for DPO on data with no token
preference (min to max), i.e. what the optimiser and the finite sample do with no signal at all.
Red x: the run diverged in some seed (its objective or parameters grew past the divergence bound,
10^6 times their start, or stopped being finite; e.g. a squared loss such as IPO overshoots under
gradient descent at lr 0.5, one learning rate for all); it is not drawn.
(4) Change of the mean chosen log-prob log pi(y_w) over the 64 pairs in the same runs (median
and min-max over seeds; blue circles: gradient descent; orange squares: Adam). Caveats: one toy,
one learning rate per optimiser, 300 steps, 8 seeds. The same numbers, with their ranges, are
in `scorecard.md`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mpmath
import numpy as np

from gradlab import budgets, symbolic
from gradlab.experiments import named
from gradlab.losses import LOSSES
from gradlab.symbols import symbol

BETAS = (0.1, 0.5, 1.0, 2.0)
POINT = {"p_w": 0.5, "q_w": 0.5, "q_l": 0.5, "len_w": 1, "len_l": 1,
         "tail_w": 0, "tail_l": 0, "ref_tail_w": 0, "ref_tail_l": 0}
INF_AT = 2.4  # where a force that vanishes faster than any power is drawn


def force_exponent(loss: symbolic.LossLike, values: dict | None = None) -> float:
    """s such that |dl/dp_l| ~ p_l^s as p_l -> 0 (from the closed form, mpmath), hyperparameters
    at their defaults overridden by ``values``."""
    expr = symbolic.derivative(loss, "p_l", "probability").xreplace(symbolic.parameter_values(loss, values))
    expr = symbolic.standard(expr.xreplace({symbol(k): v for k, v in POINT.items()}))
    f = symbolic.numeric(expr, ["p_l"], "mpmath")
    # our own fixed points, not user input: AlphaPO's p^(-alpha) at p_l = 1e-200 needs exp of
    # about 1e98, which mpmath represents at once (a big exponent, not big work)
    with mpmath.workdps(50), budgets.raised(exp_argument=1e300):
        a, b = abs(f(mpmath.mpf("1e-100"))), abs(f(mpmath.mpf("1e-200")))
        if a == 0 or b == 0:
            return float("inf")  # (numerically) zero there: bounded
        s = float(
            (mpmath.log(b) - mpmath.log(a)) / (mpmath.log(mpmath.mpf("1e-200")) - mpmath.log(mpmath.mpf("1e-100")))
        )
    return float("inf") if s > 10 else s  # decays faster than any power we would draw


def force_exponents(loss: str, betas: Sequence[float] = BETAS) -> dict[float | None, float]:
    """{beta: s} for a loss with a beta; {None: s} for one without."""
    if "beta" not in symbolic.as_loss(loss).hyperparameters:
        return {None: force_exponent(loss)}
    return {b: force_exponent(loss, {"beta": b}) for b in betas}


def _mean_chosen_logprob(result) -> np.ndarray:
    """Per seed: change of the mean over pairs of log pi(y_w), start to end."""
    lp = result.series("lp_w")  # (seeds, records, pairs)
    return lp[:, -1].mean(-1) - lp[:, 0].mean(-1)


def compute(steps: int = named.STEPS, seeds: int = named.SEEDS, losses: Sequence[str] | None = None,
            betas: Sequence[float] = BETAS) -> dict:
    """{"rows": {loss: {"force": {beta: s}, "drift": {opt: per seed}, "dlp_w": {opt: per seed}}},
    "control": {opt: per-seed drift of DPO with no token preference}}."""
    names = list(losses or LOSSES)
    specs = [{"loss": name, "optimizer": opt} for name in names for opt in named.OPTIMIZERS]
    specs += [{"loss": "dpo", "optimizer": opt, "control": "no_preference"} for opt in named.OPTIMIZERS]
    results = iter(named.length_drift_runs([{**spec, "steps": steps, "seeds": seeds} for spec in specs]))
    rows = {}
    for name in names:
        row: dict[str, dict[Any, Any]] = {"force": force_exponents(name, betas), "drift": {}, "dlp_w": {}}
        for opt in named.OPTIMIZERS:
            result = next(results)
            row["drift"][opt] = named.drift_factors(result)
            row["dlp_w"][opt] = _mean_chosen_logprob(result)
        rows[name] = row
    control = {opt: named.drift_factors(next(results)) for opt in named.OPTIMIZERS}
    return {"rows": rows, "control": control, "steps": steps, "seeds": seeds}


def _s_text(s: float) -> str:
    return "vanishes" if s == float("inf") else f"{s:+.2f}"


def markdown(data: dict) -> str:
    betas = sorted({b for r in data["rows"].values() for b in r["force"] if b is not None})
    opts = list(named.OPTIMIZERS)
    head = ([f"s at beta={b:g}" for b in betas] + [f"drift factor, {o} lr {named.OPTIMIZERS[o]:g}" for o in opts]
            + [f"change in mean lp_w, {o}" for o in opts])
    lines = [
        "# Pathology scorecard",
        "",
        "Generated by `gradlab figures`; the caption of `scorecard.png` in the gallery says how each column is",
        "measured. Force exponent s: |dl/dpi(y_l)| ~ pi(y_l)^s as pi(y_l) -> 0 at the given beta (s < 0: diverges;",
        "a loss without beta has one value). Drift factor and change in the mean chosen log-prob: the",
        f"`length_drift` setting ({named.setting_text(steps=data['steps'], seeds=data['seeds'])}); each cell is",
        "median [min, max] over the seeds.",
        "",
        "Control (DPO, no token preference in the data): "
        + "; ".join(f"{o}: {named.spread_text(data['control'][o])}" for o in opts) + ".",
        "",
        "| loss | " + " | ".join(head) + " |",
        "| --- |" + " --- |" * len(head),
    ]
    for name, row in data["rows"].items():
        force = row["force"]
        s = [_s_text(force[None]) if None in force else _s_text(force[b]) for b in betas]
        if None in force:
            s = [f"{s[0]} (no beta)"] + ["" for _ in betas[1:]]
        cells = (s + [named.spread_text(row["drift"][o], seeds=False) for o in opts]
                 + [named.spread_text(np.where(np.isfinite(row["drift"][o]), row["dlp_w"][o], np.nan), fmt="+.3g",
                                      seeds=False) for o in opts])
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _whiskers(ax, y, per_seed: Sequence[np.ndarray], **kw) -> np.ndarray:
    """Median dot and min-max bar per row; rows with a non-finite seed (a diverged run) are left
    out and returned, so the caller marks them."""
    ok = np.array([np.all(np.isfinite(x)) for x in per_seed])
    med = np.array([np.median(x) if good else np.nan for x, good in zip(per_seed, ok, strict=True)])
    lo = np.array([np.min(x) if good else np.nan for x, good in zip(per_seed, ok, strict=True)])
    hi = np.array([np.max(x) if good else np.nan for x, good in zip(per_seed, ok, strict=True)])
    y = np.asarray(y, dtype=float)
    ax.errorbar(med[ok], y[ok], xerr=[med[ok] - lo[ok], hi[ok] - med[ok]], fmt=kw.pop("fmt", "o"), ms=3, lw=0.8,
                capsize=0, **kw)
    return y[~ok]


def _mark_diverged(ax, ys: np.ndarray) -> list:
    """A red x at the right edge for rows whose run diverged; the legend handle if any."""
    from matplotlib.lines import Line2D

    if not len(ys):
        return []
    ax.scatter(np.full(len(ys), 0.97), ys, transform=ax.get_yaxis_transform(), marker="x", color="#D55E00",
               s=14, zorder=4, clip_on=False)
    return [Line2D([], [], color="#D55E00", marker="x", ls="", label="diverged")]


def make(data: dict | None = None):
    data = data or compute()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from gradlab.figures import style

    rows = data["rows"]
    names = list(rows)
    opts = list(named.OPTIMIZERS)
    page = style.size() == "page"
    fig = style.figure((0.17 * len(names) + 1.4) / style.SIZES["page"],
                       column_aspect=(0.32 * len(names) + 2.0) / style.SIZES["column"])
    axes = fig.subplots(*((1, 4) if page else (2, 2)), sharey=True).ravel()
    y = np.arange(len(names))
    below = {"fontsize": 5.5, "loc": "upper center", "bbox_to_anchor": (0.5, -0.09 if page else -0.05), "ncols": 2}

    # (1) force exponent as a function of beta
    ax = axes[0]
    betas = sorted({b for r in rows.values() for b in r["force"] if b is not None})
    handles = []
    for k, b in enumerate(betas):
        xs = [rows[n]["force"].get(b, np.nan) for n in names]
        xs = [INF_AT if x == float("inf") else x for x in xs]
        ax.scatter(xs, y, s=10, color=style.PALETTE[k], marker=style.MARKERS[k], zorder=3)
        handles.append(Line2D([], [], color=style.PALETTE[k], marker=style.MARKERS[k], ls="", label=rf"$\beta={b:g}$"))
    nob = [(i, rows[n]["force"][None]) for i, n in enumerate(names) if None in rows[n]["force"]]
    if nob:
        ax.scatter([INF_AT if s == float("inf") else s for _, s in nob], [i for i, _ in nob], s=14, color="k",
                   marker="x", zorder=3)
        handles.append(Line2D([], [], color="k", marker="x", ls="", label=r"no $\beta$"))
    ax.axvline(0, color="0.3", lw=0.8)
    ax.axvspan(-1.6, 0, color=style.PALETTE[1], alpha=0.06, lw=0)
    ax.set_xlim(-1.6, INF_AT + 0.2)
    ax.set_title("(1) force exponent $s$", fontsize=7)
    ax.set_xlabel(r"$|\partial\ell/\partial\pi(y_l)| \sim \pi(y_l)^s$" "\n" r"$s<0$: diverges; right edge: vanishes",
                  fontsize=6)
    ax.legend(handles=handles, **below)

    # (2, 3) drift factors with seed ranges, the no-preference control as a band
    for ax, opt in zip(axes[1:3], opts, strict=True):
        ctl = data["control"][opt]
        ax.axvspan(ctl.min(), ctl.max(), color="0.85", lw=0)
        ax.axvline(1.0, color="0.3", lw=0.8)
        bad = _whiskers(ax, y, [rows[n]["drift"][opt] for n in names], color=style.PALETTE[0])
        ax.set_xscale("log")
        title = "gradient descent" if opt == "sgd" else "Adam"
        ax.set_title(f"({2 if opt == 'sgd' else 3}) drift, {title}", fontsize=7)
        ax.set_xlabel(f"final / initial $E[|y|]$ (log)\nlr {named.OPTIMIZERS[opt]:g}", fontsize=6)
        ax.legend(handles=[Line2D([], [], color=style.PALETTE[0], marker="o", ms=3, label="median, min-max"),
                           Patch(color="0.85", label="DPO, no preference"), *_mark_diverged(ax, bad)],
                  **(below | {"ncols": 1}))

    # (4) change of the mean chosen log-prob under both optimisers
    ax = axes[3]
    ax.axvline(0.0, color="0.3", lw=0.8)
    for k, opt in enumerate(opts):
        # a diverged run's log-probs are meaningless: its row is left out here too
        per_seed = [np.where(np.isfinite(rows[n]["drift"][opt]), rows[n]["dlp_w"][opt], np.nan) for n in names]
        _whiskers(ax, y + (k - 0.5) * 0.3, per_seed, color=style.PALETTE[k],
                  fmt=style.MARKERS[k], label="gradient descent" if opt == "sgd" else "Adam")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_title(r"(4) change in mean $\log\pi(y_w)$", fontsize=7)
    ax.set_xlabel("end - start (symlog)\nsame runs", fontsize=6)
    ax.legend(**(below | {"ncols": 1}))

    for ax in axes:
        ax.grid(axis="y", visible=False)
        ax.tick_params(axis="y", labelsize=6)
    axes[0].set_yticks(y, [style.display_name(n) for n in names])
    if not page:
        axes[2].set_yticks(y, [style.display_name(n) for n in names])
    axes[0].invert_yaxis()
    return fig
