"""Length drift in training when chosen and rejected lengths have the same distribution.

Expected generated length (exact, by enumeration) against training steps for each loss, on the
`equal_length` dataset: chosen and rejected lengths are drawn i.i.d. from the same law (1 to 5
content tokens, then EOS) and differ only in content (the chosen favour token 1, the rejected
token 2). Left: unigram + EOS policy (one EOS logit shared by every position); right: bigram
policy. The policy starts at its reference; Adam, lr 0.05, 64 pairs per seed, 8 seeds (line:
mean; band: min to max). The cut-off is 6 tokens, so 6 is the ceiling. The legend gives each
loss's mean drift factor (final / initial expected length), computed from these runs.
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
    from matplotlib.figure import Figure

    data = data or compute()
    families = list(dict.fromkeys(f for f, _ in data))
    fig = Figure(figsize=(10.0, 4.4), layout="constrained")
    axes = fig.subplots(1, len(families), squeeze=False)[0]
    for ax, fam in zip(axes, families, strict=True):
        for i, ((f, loss), sim) in enumerate((k, v) for k, v in data.items() if k[0] == fam):
            el = sim.series("expected_length")
            factor = float(dynamics.drift_factor(sim)[0].mean())
            ax.plot(sim.steps, el.mean(1), color=f"C{i}", ls=("-", "--", ":", "-.")[i % 4],
                    label=f"{loss} (x{factor:.2f})")
            ax.fill_between(sim.steps, el.min(1), el.max(1), color=f"C{i}", alpha=0.12, lw=0)
        ax.set(title=f"{fam} policy, equal-length data", xlabel="training step", ylabel="expected length (tokens)")
        ax.axhline(sim.config["max_len"], color="0.5", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="loss (drift factor)", title_fontsize=7)
    return fig
