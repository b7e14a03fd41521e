"""Length drift in training when chosen and rejected lengths have the same distribution.

Expected generated length (exact, by enumeration) against training steps for each loss, on the
`equal_length` dataset: chosen and rejected lengths are drawn i.i.d. from the same law (1 to 5
content tokens, then EOS) and differ only in content (the chosen favour token 1, the rejected
token 2). Left: unigram + EOS policy (one EOS logit shared by every position); right: bigram
policy. The policy starts at its reference; Adam, lr 0.05, 64 pairs per seed, 8 seeds (line:
mean; band: min to max). Caveat: the policy has a forced stop at 6 tokens (dotted line), so 6 is
the ceiling and the drift factors in the legend (final / initial expected length, computed from
these runs) are capped by the toy: for DPO most of the mass ends at the stop. Without the stop
(an unbounded unigram + EOS policy, exact) the same kind of run lengthens by orders of magnitude;
`gradlab reproduce length_pathology` measures that, under SGD and Adam.
"""

from __future__ import annotations


from gradlab import dynamics

LOSSES = ("dpo", "sigmoid_norm", "simpo", "r_dpo", "ld_dpo", "ipo", "ipo_trl", "orpo")
FAMILIES = ("unigram", "bigram")


def compute(losses=LOSSES, families=FAMILIES, steps: int = 300, seeds: int = 8, values: dict | None = None) -> dict:
    from gradlab.figures import check_values_used, values_for

    check_values_used(losses, values)
    return {
        (fam, loss): dynamics.simulate(loss, fam, "equal_length", steps=steps, seeds=seeds,
                                       **({"values": values_for(loss, values)} if values_for(loss, values) else {}))
        for fam in families for loss in losses
    }


def make(data: dict | None = None):

    data = data or compute()
    families = list(dict.fromkeys(f for f, _ in data))
    from gradlab.figures import style

    fig = style.figure(0.62, column_aspect=1.25 * len(families))
    axes = fig.subplots(*style.grid(len(families)), squeeze=False).ravel()
    for ax, fam in zip(axes, families, strict=True):
        for i, ((_f, loss), sim) in enumerate((k, v) for k, v in data.items() if k[0] == fam):
            el = sim.series("expected_length")
            factor = float(dynamics.drift_factor(sim)[0].mean())
            s = style.series(i, marker=True, markevery=max(1, len(sim.steps) // 6))
            ax.plot(sim.steps, el.mean(1), label=f"{style.display_name(loss)} (×{factor:.2f})", **s)
            for edge in (el.min(1), el.max(1)):  # seed range as thin lines: overlapping fills are unreadable
                ax.plot(sim.steps, edge, color=s["color"], ls=s["linestyle"], lw=0.4, alpha=0.35)
        ax.set(title=f"{fam} policy, equal-length data", xlabel="training step", ylabel="expected length (tokens)")
        ax.axhline(sim.config["max_len"], color=style.REFERENCE_COLOUR, lw=0.8, ls=":")
        # below the axes: inside, it would hide curves or the cut-off line
        ax.legend(title="loss (drift factor)", ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    return fig
