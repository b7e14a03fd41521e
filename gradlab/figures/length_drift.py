"""Length drift without a cut-off, under plain gradient descent and under Adam.

Exact expected length (EOS counted: 1 / pi(EOS) of an unbounded unigram + EOS policy, no forced
stop, no mass dropped) against training steps, log scale, one panel per optimiser (left: plain
gradient descent, lr 0.5; right: Adam, lr 0.05). Setting `length_drift` of
`gradlab.experiments.named`, run by the experiment runner: 3 content tokens, uniform start
(E[len] = 4 = the data's mean length), reference = the start, 64 equal-length pairs per seed
(chosen and rejected content lengths both uniform on 1..5; the chosen favour token 1, the
rejected token 2), full batch, 300 steps, 8 seeds, common beta = 0.1 for every loss (SimPO too:
not its paper default of 2; its gamma and LD-DPO's alpha = 0.5 at their defaults). Lines: median
over seeds; band: min to max. Legend: the drift factor (final / initial expected length) as
median [min, max] over the 8 seeds; `figures/scorecard.md` quotes the same computation. Grey:
DPO controls on changed data, nothing else changed: every response has 3 content tokens (length
cannot separate any pair), and no token preference (both sides from one token law). Caveats: a
toy (one shared EOS logit); the optimiser changes the answer by orders of magnitude, and under
Adam even the no-preference control drifts, so a loss's growth under Adam is not a property of
the loss alone; 8 seeds give a range, not a distribution. `gradlab reproduce length_pathology`
judges DPO's growth on the same computation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from gradlab.experiments import named

LOSSES = ("dpo", "sigmoid_norm", "simpo", "ld_dpo")
CONTROLS = {"same_length": "DPO control: all lengths 3", "no_preference": "DPO control: no token preference"}


def compute(losses: Sequence[str] = LOSSES, steps: int = named.STEPS, seeds: int = named.SEEDS,
            values: Mapping[str, float] | None = None, controls: bool = True) -> dict:
    """{"beta": the beta of the runs, "runs": {(optimizer, label): (steps, expected length (seeds,
    records), drift factor per seed)}}; the label is a loss name or a control's name (DPO, with
    the same ``values``)."""
    from gradlab.figures import check_values_used

    check_values_used(losses, values)
    todo = [(opt, loss, loss, None) for opt in named.OPTIMIZERS for loss in losses]
    if controls:
        todo += [(opt, name, "dpo", name) for opt in named.OPTIMIZERS for name in CONTROLS]
    results = named.length_drift_runs([{"loss": loss, "optimizer": opt, "control": control, "steps": steps,
                                        "seeds": seeds, "values": values} for opt, _, loss, control in todo])
    runs = {}
    for (opt, label, _, _), result in zip(todo, results, strict=True):
        runs[(opt, label)] = (np.asarray(result.runs[0].steps), result.series("expected_length"),
                              named.drift_factors(result))
    return {"beta": float((values or {}).get("beta", named.BETA)), "runs": runs}


def make(data: dict | None = None):
    data = data or compute()
    from gradlab.figures import style

    runs = data["runs"]
    optimizers = list(dict.fromkeys(o for o, _ in runs))
    fig = style.figure(0.62, column_aspect=1.25 * len(optimizers))
    axes = fig.subplots(*style.grid(len(optimizers)), squeeze=False, sharey=True).ravel()
    for ax, opt in zip(axes, optimizers, strict=True):
        i = 0
        for (o, label), (at, el, factor) in runs.items():
            if o != opt:
                continue
            if label in CONTROLS:
                s = {"color": style.REFERENCE_COLOUR, "linestyle": "--" if label == "same_length" else ":"}
                name = CONTROLS[label]
            else:
                s = style.series(i, marker=True, markevery=max(1, len(at) // 6))
                name = style.display_name(label)
                i += 1
            ax.plot(at, np.median(el, 0), label=f"{name} (×{named.spread_text(factor, seeds=False)})", **s)
            ax.fill_between(at, el.min(0), el.max(0), color=s["color"], alpha=0.12, lw=0)
        ax.set_yscale("log")
        ax.axhline(4.0, color="0.7", lw=0.6)  # the start and the data's mean length
        lr = named.OPTIMIZERS[opt]
        ax.set(title=f"{'plain gradient descent' if opt == 'sgd' else 'Adam'}, lr {lr:g}",
               xlabel="training step", ylabel="exact expected length (log)")
        ax.legend(title=rf"drift factor: median [min, max] over seeds, $\beta={data['beta']:g}$", fontsize=6,
                  title_fontsize=6,
                  loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=1)
    return fig
