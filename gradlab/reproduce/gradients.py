"""The gradient property each length-aware loss's paper states: R-DPO's weight, SimPO's 1/|y|
per-token gradient, LD-DPO's alpha on the tail tokens.

All numbers are gradlab's derived closed forms (``gradlab.derivative``) evaluated with
``gradlab.numeric``; each predicate is the paper's statement, typed from the paper.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sympy

from gradlab import symbolic
from gradlab.losses import get_loss
from gradlab.reproduce import Entry, Measured, Outcome, Versus


def _fn(loss_name: str, wrt: str, values: dict, view: str = "log"):
    loss = get_loss(loss_name)
    args = symbolic.variables(loss, view)
    expr = symbolic.derivative(loss, wrt, view).xreplace(symbolic.parameter_values(loss, values))
    f = symbolic.numeric(expr, args)
    return lambda **point: np.asarray(f(*(point[a] for a in args)), dtype=float)


def _sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


# ---------------------------------------------------------------------------------------------
# R-DPO
# ---------------------------------------------------------------------------------------------

RDPO_BETA = 0.1
RDPO_ALPHAS = (0.01, 0.05)
MARGINS = (-2.0, 0.0, 2.0)
LENGTH_DIFFS = np.arange(-20, 21)
WEIGHT_TOL = 1e-12


def _r_dpo(quick: bool) -> Outcome:
    rows, curves = {}, {}
    for alpha in RDPO_ALPHAS:
        d_lp_w = _fn("r_dpo", "lp_w", {"beta": RDPO_BETA, "alpha": alpha})
        errs, slopes = [], []
        for h in MARGINS:
            len_l = np.full(LENGTH_DIFFS.shape, 30.0)
            len_w = len_l + LENGTH_DIFFS
            # put the margin h on the chosen's log-ratio: lp_w - ref_w = h, the rest 0
            weight = -d_lp_w(lp_w=np.full(len_w.shape, -10.0 + h), lp_l=np.full(len_w.shape, -10.0),
                             ref_w=np.full(len_w.shape, -10.0), ref_l=np.full(len_w.shape, -10.0),
                             len_w=len_w, len_l=len_l) / RDPO_BETA
            paper = _sigmoid(-(RDPO_BETA * h + alpha * LENGTH_DIFFS))  # Park et al. Eq. 9
            errs.append(float(np.abs(weight - paper).max()))
            slopes.append(float(np.diff(weight).max()))  # < 0 everywhere: decreasing in |y_w| - |y_l|
            curves[(alpha, h)] = (weight, paper)
        rows[f"alpha_{alpha:g}"] = {"max_abs_error_vs_eq9": max(errs), "max_step_in_weight": max(slopes),
                                    "weight_at_h0_diff_minus20": float(curves[(alpha, 0.0)][0][0]),
                                    "weight_at_h0_diff_plus20": float(curves[(alpha, 0.0)][0][-1])}
    return Outcome(rows, {"curves": curves})


def _judge_r_dpo(m) -> bool:
    return all(r["max_abs_error_vs_eq9"] < WEIGHT_TOL and r["max_step_in_weight"] < 0 for r in m.values())


def _plot_r_dpo(fig, out: Outcome) -> None:
    ax = fig.subplots()
    for i, alpha in enumerate(RDPO_ALPHAS):
        weight, paper = out.series["curves"][(alpha, 0.0)]
        ax.plot(LENGTH_DIFFS, weight, color=f"C{i}", label=f"gradlab r_dpo, alpha={alpha:g}")
        ax.plot(LENGTH_DIFFS, paper, color=f"C{i}", ls="--", label=f"Park et al. Eq. 9, alpha={alpha:g}")
    ax.set(xlabel="|y_w| - |y_l| (tokens)", ylabel="gradient weight at h = 0")
    ax.legend()


R_DPO = Entry(
    name="r_dpo_weight",
    title="R-DPO: the weight against alpha and the length difference",
    source="Park et al. 2024, arXiv:2403.19159, Eq. 9 (R-DPO: -log sigma(beta h + alpha|y_w| - alpha|y_l|))",
    claim="R-DPO's per-pair gradient weight is sigma(-(beta h + alpha(|y_w| - |y_l|))): for alpha > 0 a pair "
          "whose chosen response is longer gets a smaller push, one whose chosen is shorter a larger one.",
    setting=f"gradlab's derived d r_dpo / d lp_w divided by -beta, at beta={RDPO_BETA}, alpha in {RDPO_ALPHAS}, "
            f"margins h in {MARGINS}, |y_l| = 30 and |y_w| - |y_l| from -20 to 20.",
    predicate=f"The weight equals sigma(-(beta h + alpha(|y_w| - |y_l|))) to {WEIGHT_TOL:g} and decreases strictly "
              f"as |y_w| - |y_l| grows, for every alpha and h.",
    experiment=_r_dpo,
    judge=_judge_r_dpo,
    plot=_plot_r_dpo,
    finding="If this fails with the weight increasing in |y_w| - |y_l|, the length term's sign is flipped "
            "(-alpha(|y_w| - |y_l|) instead of Eq. 9's +alpha(|y_w| - |y_l|)), which rewards longer chosen responses "
            "instead of penalising them. gradlab's r_dpo had exactly this bug until issue 11 fixed it; this entry "
            "failed on it (max error 0.46 at alpha 0.05).",
)

# ---------------------------------------------------------------------------------------------
# SimPO: the per-token gradient is proportional to 1/|y|
# ---------------------------------------------------------------------------------------------

LENGTHS = np.arange(1, 65, dtype=float)
M_W, M_L = -0.8, -1.2  # per-token mean log-probs held fixed while the length varies
PROPORTIONAL_TOL = 1e-12
DPO_CONTROL_MIN_SPREAD = 0.1


def _per_token_spread(loss: str, values: dict, side: str) -> tuple[float, np.ndarray]:
    """|y| times d loss / d lp over |y| = 1..64 at a fixed per-token mean: constant iff the
    per-token gradient is proportional to 1/|y|. Returns (relative spread, values)."""
    other = 20.0
    lp_w = (M_W * LENGTHS) if side == "w" else np.full(LENGTHS.shape, M_W * other)
    lp_l = (M_L * LENGTHS) if side == "l" else np.full(LENGTHS.shape, M_L * other)
    len_w = LENGTHS if side == "w" else np.full(LENGTHS.shape, other)
    len_l = LENGTHS if side == "l" else np.full(LENGTHS.shape, other)
    point = {"lp_w": lp_w, "lp_l": lp_l, "len_w": len_w, "len_l": len_l,
             "ref_w": np.zeros_like(lp_w), "ref_l": np.zeros_like(lp_w)}
    scaled = LENGTHS * _fn(loss, f"lp_{side}", values)(**point)
    return float(np.ptp(scaled) / np.abs(scaled).max()), scaled


def _simpo(quick: bool) -> Outcome:
    measured: Measured = {}
    series: dict[Any, Any] = {}
    for side in ("w", "l"):
        spread, scaled = _per_token_spread("simpo", {}, side)
        control, control_scaled = _per_token_spread("dpo", {"beta": 0.1}, side)
        measured[f"simpo_relative_spread_{side}"] = spread
        measured[f"dpo_relative_spread_{side}"] = control
        series[side] = (scaled, control_scaled)
    return Outcome(measured, series)


def _simpo_versus(m) -> list[Versus]:
    return [Versus(f"relative spread of |y| x d/dlp_{side} over |y| = 1..64: SimPO (< {PROPORTIONAL_TOL:g}) vs DPO "
                   f"(> {DPO_CONTROL_MIN_SPREAD:g})",
                   m[f"simpo_relative_spread_{side}"], m[f"dpo_relative_spread_{side}"],
                   m[f"simpo_relative_spread_{side}"] < PROPORTIONAL_TOL
                   and m[f"dpo_relative_spread_{side}"] > DPO_CONTROL_MIN_SPREAD) for side in ("w", "l")]


def _judge_simpo(m) -> bool:
    return (max(m["simpo_relative_spread_w"], m["simpo_relative_spread_l"]) < PROPORTIONAL_TOL
            and min(m["dpo_relative_spread_w"], m["dpo_relative_spread_l"]) > DPO_CONTROL_MIN_SPREAD)


def _plot_simpo(fig, out: Outcome) -> None:
    ax = fig.subplots()
    for i, side in enumerate(("w", "l")):
        simpo, dpo = out.series[side]
        ax.plot(LENGTHS, np.abs(simpo) / np.abs(simpo[0]), color=f"C{i}", label=f"simpo, y_{side}")
        ax.plot(LENGTHS, np.abs(dpo) / np.abs(dpo[0]), color=f"C{i}", ls="--", label=f"dpo (control), y_{side}")
    ax.set(xlabel="|y|", ylabel="|y| x per-token gradient (relative to |y|=1)", yscale="log")
    ax.legend()


SIMPO = Entry(
    name="simpo_per_token",
    title="SimPO: per-token gradient proportional to 1/|y|",
    source="Meng et al. 2024, arXiv:2405.14734, Eq. 6 and its gradient (Sec. 3 / Appendix, 'gradient analysis')",
    claim="SimPO's gradient on each token of a response is proportional to 1/|y| at a fixed per-token "
          "likelihood: the length-normalised reward divides every token's push by the response length.",
    setting=f"gradlab's derived d simpo / d lp (defaults beta=2, gamma=1) at a fixed per-token mean (m_w={M_W}, "
            f"m_l={M_L}) for |y| = 1..64, the other response 20 tokens long; dpo (beta=0.1) as the control.",
    predicate=f"|y| times the per-token gradient is constant in |y| to relative {PROPORTIONAL_TOL:g} for both "
              f"responses, while DPO's varies by more than {DPO_CONTROL_MIN_SPREAD:g} (relative).",
    experiment=_simpo,
    judge=_judge_simpo,
    versus=_simpo_versus,
    plot=_plot_simpo,
)

# ---------------------------------------------------------------------------------------------
# LD-DPO: the tail tokens' gradient is scaled by alpha
# ---------------------------------------------------------------------------------------------

LD_ALPHAS = (0.25, 0.5, 0.75)
LD_POINTS = 200
LD_SEED = 7
LD_TOL = 1e-12


def _ld_dpo(quick: bool) -> Outcome:
    rng = np.random.default_rng(LD_SEED)
    measured: Measured = {}
    series: dict[Any, Any] = {}
    for name in ("ld_dpo", "ld_dpo_trl"):
        loss = get_loss(name)
        for alpha in LD_ALPHAS:
            values = {"ld_alpha": alpha}
            symbolic_ok = {}
            for side in ("w", "l"):
                d_lp = symbolic.derivative(loss, f"lp_{side}")
                d_tail = symbolic.derivative(loss, f"tail_{side}")
                a = symbolic.symbol_of("ld_alpha")
                # a tail token enters lp and tail: its gradient is d/dlp + d/dtail
                symbolic_ok[side] = bool(sympy.simplify((d_lp + d_tail) / d_lp - a) == 0)
            args = symbolic.variables(loss, "log")
            point = {n: rng.uniform(-30, -1, LD_POINTS) for n in args}
            point["tail_w"] = point["lp_w"] * rng.uniform(0, 1, LD_POINTS)
            point["tail_l"] = point["lp_l"] * rng.uniform(0, 1, LD_POINTS)
            ratios = []
            for side in ("w", "l"):
                shared = _fn(name, f"lp_{side}", values)(**point)
                tail = shared + _fn(name, f"tail_{side}", values)(**point)
                ratios.append(tail / shared)
            r = np.concatenate(ratios)
            measured[f"{name}_alpha_{alpha:g}"] = {
                "symbolic_ratio_is_alpha": symbolic_ok["w"] and symbolic_ok["l"],
                "max_abs_error_of_ratio": float(np.abs(r - alpha).max())}
            series[(name, alpha)] = r
    return Outcome(measured, series)


def _judge_ld_dpo(m) -> bool:
    return all(v["symbolic_ratio_is_alpha"] and v["max_abs_error_of_ratio"] < LD_TOL
               for k, v in m.items() if k.startswith("ld_dpo_alpha"))


def _plot_ld_dpo(fig, out: Outcome) -> None:
    ax = fig.subplots()
    for i, alpha in enumerate(LD_ALPHAS):
        for j, name in enumerate(("ld_dpo", "ld_dpo_trl")):
            r = out.series[(name, alpha)]
            ax.plot(np.full(r.shape, alpha) + (j - 0.5) * 0.03, r, "o", ms=2, color=f"C{j}",
                    label=name if i == 0 else None)
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.6, ls=":")
    ax.set(xlabel="ld_alpha", ylabel="tail-token / shared-token gradient", xlim=(0, 1), ylim=(0, 1))
    ax.legend()


LD_DPO = Entry(
    name="ld_dpo_tail",
    title="LD-DPO: tail tokens scaled by alpha",
    source="Liu et al. 2024, arXiv:2409.06411, Eq. 12 (the desensitised likelihood: shared part plus alpha "
           "times the part past the shorter response)",
    claim="In LD-DPO the gradient on every token past the shorter response's length (the verbose tail) is "
          "alpha times the gradient a token of the shared part receives.",
    setting=f"gradlab's derived partials of ld_dpo (the paper's form; ld_dpo_trl, TRL's form, reported beside "
            f"it) for ld_alpha in {LD_ALPHAS}, symbolically and at {LD_POINTS} seeded random points.",
    predicate=f"For ld_dpo, (dL/dlp + dL/dtail) / (dL/dlp) simplifies to alpha for both responses and equals it "
              f"numerically to {LD_TOL:g}.",
    experiment=_ld_dpo,
    judge=_judge_ld_dpo,
    plot=_plot_ld_dpo,
)
