"""Length drift without a cut-off, under plain gradient descent and under Adam.

Exact expected length of an unbounded unigram + EOS policy against training steps, one panel per
optimiser, for several losses and two DPO controls (setting `length_drift` of
`gradlab.experiments.named`). The gallery caption, :data:`CAPTION` filled in by :func:`caption`,
gives the settings the runs used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from gradlab.experiments import named

CAPTION = """\
Exact expected length (EOS counted: 1 / pi(EOS) of an unbounded unigram + EOS policy, no forced
stop, no mass dropped) against training steps, log scale, one panel per optimiser with its own
y-range ({optimizers}). Setting `length_drift` of
`gradlab.experiments.named`, run by the experiment runner: 3 content tokens, uniform start
(E[len] = 4 = the data's mean length), reference = the start, 64 equal-length pairs per seed
(chosen and rejected content lengths both uniform on 1..5; the chosen favour token 1, the
rejected token 2), full batch, {steps} steps, {seeds} seeds, losses {losses}, common beta = {beta}
for every loss that has one (SimPO too: not its paper default of 2; its gamma and LD-DPO's alpha
at their defaults). Lines: median over seeds; whiskers: min to max over seeds, at steps staggered
per line so that none overlap. Legend: the drift factor (final / initial expected length) as
median [min, max] over the seeds; `figures/scorecard.md` quotes the same computation.{controls}
Caveats: a toy (one shared EOS logit); the optimiser changes the answer by orders of magnitude,
and under Adam even the no-preference control drifts, so a loss's growth under Adam is not a
property of the loss alone; {seeds} seeds give a range, not a distribution. `gradlab reproduce
length_pathology` judges DPO's growth on the same computation at beta 0.1."""
CONTROLS_TEXT = """ Grey: DPO controls on changed data, nothing else changed: every response has 3 content
tokens (length cannot separate any pair), and no token preference (both sides from one token law)."""
LOSSES = ("dpo", "sigmoid_norm", "simpo", "ld_dpo")
CONTROLS = {"same_length": "DPO control: all lengths 3", "no_preference": "DPO control: no token preference"}


def compute(losses: Sequence[str] = LOSSES, steps: int = named.STEPS, seeds: int = named.SEEDS,
            values: Mapping[str, float] | None = None, controls: bool = True) -> dict:
    """{"beta": the beta of the runs, "runs": {(optimizer, label): (steps, expected length (seeds,
    records), drift factor per seed)}}; the label is a loss name or a control's name (DPO, with
    the same ``values``)."""
    from gradlab.figures import check_values_used

    check_values_used(losses, values)
    todo: list[tuple[str, str, str, str | None]] = [(opt, loss, loss, None) for opt in named.OPTIMIZERS
                                                    for loss in losses]
    if controls:
        todo += [(opt, name, "dpo", name) for opt in named.OPTIMIZERS for name in CONTROLS]
    results = named.length_drift_runs([{"loss": loss, "optimizer": opt, "control": control, "steps": steps,
                                        "seeds": seeds, "values": values} for opt, _, loss, control in todo])
    runs = {}
    for (opt, label, _, _), result in zip(todo, results, strict=True):
        runs[(opt, label)] = (np.asarray(result.runs[0].steps), result.series("expected_length"),
                              named.drift_factors(result))
    return {"beta": float((values or {}).get("beta", named.BETA)), "runs": runs}


def _whiskers(n_records: int, k: int, per_series: int = 5) -> np.ndarray:
    """Record indices where series ``k`` draws its spread: ``per_series`` steps, shifted by one
    record per series, so no two series' whiskers share a step."""
    stride = max(1, n_records // per_series)
    return np.arange(1 + k % stride, n_records, stride)


def make(data: dict | None = None):
    data = data or compute()
    from gradlab.figures import style

    runs = data["runs"]
    optimizers = list(dict.fromkeys(o for o, _ in runs))
    fig = style.figure(0.62, column_aspect=1.25 * len(optimizers))
    # one y-range per optimiser: Adam's reaches 1e10, which would flatten the gradient-descent panel
    axes = fig.subplots(*style.grid(len(optimizers)), squeeze=False).ravel()
    for ax, opt in zip(axes, optimizers, strict=True):
        i = 0
        drawn = [(label, *run) for (o, label), run in runs.items() if o == opt]
        for k, (label, at, el, factor) in enumerate(drawn):
            if label in CONTROLS:
                s = {"color": style.REFERENCE_COLOUR, "linestyle": "--" if label == "same_length" else ":"}
                name = CONTROLS[label]
            else:
                s = style.series(i, marker=True, markevery=max(1, len(at) // 6))
                name = style.display_name(label)
                i += 1
            median = np.median(el, 0)
            ax.plot(at, median, label=f"{name} (×{named.spread_text(factor, seeds=False)})", **s)
            # the spread over seeds as min-max whiskers at staggered steps: filled bands of six
            # series that span up to ten decades overlap into one grey area
            at_k = _whiskers(len(at), k)
            ax.errorbar(at[at_k], median[at_k], yerr=(median[at_k] - el.min(0)[at_k], el.max(0)[at_k] - median[at_k]),
                        fmt="none", ecolor=s["color"], elinewidth=0.8, capsize=1.5, capthick=0.8)
        ax.set_yscale("log")
        ax.axhline(4.0, color="0.7", lw=0.6)  # the start and the data's mean length
        lr = named.OPTIMIZERS[opt]
        ax.set(title=f"{'plain gradient descent' if opt == 'sgd' else 'Adam'}, lr {lr:g}",
               xlabel="training step", ylabel="exact expected length (log)")
        ax.legend(title=rf"drift factor: median [min, max] over seeds, $\beta={style.number(data['beta'])}$",
                  fontsize=6, title_fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=1)
    return fig


def caption(data: dict) -> str:
    """The gallery caption, with the beta, steps and seeds the runs used."""
    from gradlab.figures import style

    runs = data["runs"]
    at, el, _ = next(iter(runs.values()))
    losses = list(dict.fromkeys(label for _, label in runs if label not in CONTROLS))
    beta = style.number(data["beta"])
    optimizers = "; ".join(f"{'plain gradient descent' if o == 'sgd' else 'Adam'}, lr {named.OPTIMIZERS[o]:g}"
                           for o in dict.fromkeys(o for o, _ in runs))
    controls = CONTROLS_TEXT if any(label in CONTROLS for _, label in runs) else ""
    return CAPTION.format(optimizers=optimizers, losses=", ".join(f"`{x}`" for x in losses), beta=beta,
                          steps=int(at[-1]), seeds=el.shape[0], controls=controls)
