"""Group losses: the expected length of right and wrong answers in training, per normaliser.

The exact unbounded bigram + EOS chain (3 content tokens, uniform start), rewarded 1 when the first
content token is token 1, trained by Adam on the exact expected gradient of each loss over groups of
G = 8 drawn on-policy at every step (the experiment runner; the three losses are one compiled
program): GRPO's per-response mean (weight A_i/(G|o_i|)), DAPO's token mean over the group
(A_i/sum_j|o_j|) and Dr. GRPO's constant normaliser (A_i/(G L_max)), all with the group's std
scaling. Lengths count the content tokens and the EOS, as TRL's completion mask does; lengths up
to 6,144 are summed exactly (the mass beyond stays below 1e-4). Under GRPO's 1/|o_i| the wrong
answers grow longer while the right ones first shorten (Dr. GRPO, arXiv:2503.20783). DAPO's token
total is no cure on this toy: a long wrong answer raises sum_j |o_j| and so dilutes the penalty
of every token in its group, and the wrong answers grow longer still. Dr. GRPO's constant
normaliser has no length term: conditioned on the first token nothing moves, and both lengths stay
where they started while the success probability rises as fast.
"""

from __future__ import annotations

import numpy as np

LABELS = {"grpo": r"grpo: $1/(G|o_i|)$", "dapo": r"dapo: $1/\sum_j|o_j|$", "dr_grpo": r"dr_grpo: $1/(G L_{max})$"}
EXPERIMENT = {
    "policy": {"family": "bigram", "vocab": 3, "max_len": "none", "scale": 0.0},
    "data": {"kind": "rollouts", "group_size": 8, "reward": {"first_token": [1]}, "horizon": 6144},
    "loss": {"name": "grpo", "scale_rewards": "group"},
    "train": {"optimizer": "adam", "lr": 0.05, "steps": 80, "record_every": 4, "seeds": [0],
              "metrics": ["success", "length_correct", "length_incorrect", "tail_mass"]},
    "sweep": {"loss.name": list(LABELS)},  # the three normalisers in one compiled program
}


def compute(steps: int = 80) -> dict:
    from gradlab.experiments.runner import run

    result = run(EXPERIMENT, overrides={"train": {"steps": steps}})
    out: dict = {"steps": None, "curves": {}, "tail": 0.0}
    for r in result.runs:
        out["steps"] = np.asarray(r.steps)
        out["curves"][r.setting["loss.name"]] = {k: np.asarray(r.metrics[k])
                                                 for k in ("length_correct", "length_incorrect", "success")}
        out["tail"] = max(out["tail"], float(np.max(r.metrics["tail_mass"])))
    return out


def make(data: dict | None = None):
    from gradlab.figures import style

    d = data or compute()
    fig = style.figure(0.45, column_aspect=1.6)
    left, right = fig.subplots(*style.grid(2)).ravel()
    for i, (name, c) in enumerate(d["curves"].items()):
        colour = style.series(i)["color"]
        left.plot(d["steps"], c["length_incorrect"], color=colour, ls="-", label=f"{LABELS.get(name, name)}, wrong")
        left.plot(d["steps"], c["length_correct"], color=colour, ls="--",
                  label=f"{LABELS.get(name, name)}, right")
        right.plot(d["steps"], c["success"], label=LABELS.get(name, name), **style.series(i))
    left.set(xlabel="step (Adam, exact expected gradient)", ylabel=r"expected length $E[|o|]$ (tokens + EOS)",
             yscale="log", title="right (dashed) and wrong (solid) answers, $G = 8$")
    left.legend(fontsize=5.5)
    right.set(xlabel="step (Adam, exact expected gradient)", ylabel="success probability $p$", ylim=(0, 1),
              title="success")
    right.legend(fontsize=6)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return fig
