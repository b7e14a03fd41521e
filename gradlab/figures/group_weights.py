"""Group losses: the per-prompt weight on the gradient of the success probability, and silent groups.

A prompt whose responses succeed with probability p, each response one token long, a group of
G = 8: the exact expected update of every group loss is a multiple of grad p, and the figure
draws that multiple against p (left) for each advantage scaling (``scale_rewards`` group, batch
and none, and RLOO's leave-one-out) and each normaliser (per-sequence G|o_i|, group total
sum_j |o_j|, G; the constant G L_max of ``dr_grpo`` is drawn with L_max = 1, since any other
L_max only divides it), with maximum likelihood's 1/p for comparison. Right: the probability
that a group is silent, all right or all wrong, p^G + (1 - p)^G, where every advantage is zero.

The weights are gradlab's exact first-step coefficients (``gradlab.experiments.groups``): the
update is G (c(1) - c(0)) grad p, c(r) the expected weight of a response with reward r over the
other G - 1. Without std scaling the weight is flat ((G - 1)/G for the group mean, 1 for RLOO).
The batch's std, sqrt(p(1 - p)) for many groups of this prompt, makes it grow like
1/sqrt(p(1 - p)) towards both ends. The group's std does not: near p = 0 (or 1) the groups that
are not silent have one response unlike the rest, whose advantage is (1 - 1/G) sqrt(G) (2.47
for G = 8), so the weight levels off there, U-shaped with its minimum at p = 1/2.

With one-token responses some scalings give the same weight: dapo's group total sum_j |o_j| is
G, as is grpo's G|o_i| (the computed weights agree to 1e-7, relative), and dr_grpo's G L_max with L_max = 1 is G.
Curves equal to 1e-6, relative, share one line labelled with every name.
"""

from __future__ import annotations

import numpy as np

G = 8
CURVES = (  # (loss, scale_rewards, label)
    ("grpo", "group", "grpo, group std"),
    ("grpo", "batch", "grpo, batch std"),
    ("grpo", "none", "grpo, no std"),
    ("dapo", "group", "dapo, group std"),
    ("dr_grpo", "none", r"dr_grpo ($L_{max}=1$)"),
    ("rloo", "leave_one_out", "rloo"),
)


def compute(group_size: int = G, points: int = 199) -> dict:
    from gradlab.experiments.groups import coefficients

    p = np.linspace(0.005, 0.995, points)
    out: dict = {"p": p, "group_size": group_size, "weights": {}}
    for loss, scale, label in CURVES:
        values = {"max_completion_length": 1} if loss == "dr_grpo" else None
        w = []
        for x in p:
            law = np.array([[0.0, 1.0 - x], [0.0, x]])  # (reward, length): every response one token
            c = coefficients(loss, law, group_size, scale_rewards=scale, values=values)
            w.append(group_size * (c[1, 1] - c[0, 1]))
        out["weights"][label] = np.array(w)
    out["silent"] = {g: p**g + (1 - p) ** g for g in (4, 8, 16)}
    return out


def make(data: dict | None = None):
    from gradlab.figures import style

    d = data or compute()
    fig = style.figure(0.45, column_aspect=1.6)
    left, right = fig.subplots(*style.grid(2)).ravel()
    for i, group in enumerate(style.coinciding(d["weights"], rtol=1e-6)):  # equal weights share one line
        left.plot(d["p"], d["weights"][group[0]], label=" = ".join(group), **style.series(i))
    left.plot(d["p"], 1 / d["p"], color=style.REFERENCE_COLOUR, ls=":", label=r"maximum likelihood, $1/p$")
    left.set(xlabel="success probability $p$", ylabel=r"weight on $\nabla p$", yscale="log", ylim=(0.1, 300),
             title=f"per-prompt weight, $G = {d['group_size']}$, first on-policy step")
    left.legend(fontsize=5.5, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)  # below: no curve hidden
    for i, (g, silent) in enumerate(d["silent"].items()):
        right.plot(d["p"], silent, label=f"$G = {g}$", **style.series(i))
    right.set(xlabel="success probability $p$", ylabel="P(silent group)", ylim=(0, 1),
              title=r"silent groups: $p^G + (1-p)^G$")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return fig
