"""The proper (on-policy) loss against DPO, by exact expectations on a small toy.

A tabular policy (vocabulary 3, forced stop at 3 tokens: 15 responses, 7 ended by EOS and 8
stopped; oracle reward +1 per token 1 and -1 per token 2) trained three ways, all with exact
expectations over every ordered pair of responses: DPO on pairs drawn from the reference (J_0
of the first post, offline); DPO on pairs drawn from the current policy but without the
score-function term (the first term of the product rule only); and the proper loss `pdpo`, whose
integrand pi(y)pi(y')l carries the full product-rule gradient. Left: expected oracle reward of
the policy across training. Right: the final distribution over the 15 responses (all the mass:
nothing is renormalised), ordered by reward, with the reference for comparison.
"""

from __future__ import annotations

import jax
import numpy as np

from gradlab import dynamics
from gradlab.policies import Tabular, all_sequences

FAMILY = Tabular(vocab=3, max_len=3)
RUNS = (
    ("dpo", "reference_pairs", r"DPO, pairs from $\pi_0$ (offline)"),
    ("dpo", "on_policy", r"DPO, pairs from $\pi$ (no score term)"),
    ("pdpo", "on_policy", "proper DPO (full gradient)"),
)


def _distribution(params) -> np.ndarray:
    logp = np.asarray(FAMILY.enumerate(params).logp)
    p = np.exp(logp - logp.max())
    return p / p.sum()


def _running(sim) -> float:
    """Probability that the forced stop at the cut-off ends the response, at the last recorded step."""
    return float(sim.series("stopped_mass")[-1, 0])


def compute(steps: int = 400, beta: float = 0.5, lr: float = 0.05) -> dict:
    reward = dynamics.sequence_rewards(FAMILY)
    ref = FAMILY.init(jax.random.PRNGKey(0), 0.5)
    out = {"reward": reward, "reference": _distribution(ref), "runs": {}}
    for loss, dataset, label in RUNS:
        sim = dynamics.simulate(loss, FAMILY, dataset, steps=steps, seeds=1, values={"beta": beta}, lr=lr)
        final = jax.tree_util.tree_map(lambda x: x[0], sim.final_params)
        out["runs"][label] = (sim, _distribution(final))
    return out


def make(data: dict | None = None):

    d = data or compute()
    from gradlab.figures import style

    fig = style.figure(0.5, column_aspect=1.8)
    left, right = fig.subplots(*style.grid(2)).ravel()
    order = np.argsort(d["reward"], kind="stable")
    seqs, lengths = all_sequences(FAMILY.vocab, FAMILY.max_len)
    names = ["".join(str(t) for t in s[:n]).replace("0", "<eos>") for s, n in zip(seqs, lengths, strict=True)]
    width = 0.8 / (len(d["runs"]) + 1)
    x = np.arange(len(order))
    right.bar(x - 0.4 + width / 2, d["reference"][order], width, color="0.7", label=r"reference $\pi_0$")
    left.axhline(float(d["reference"] @ d["reward"]), color=style.REFERENCE_COLOUR, ls=":", label=r"reference $\pi_0$")
    for i, (label, (sim, dist)) in enumerate(d["runs"].items(), 1):
        s = style.series(i - 1, marker=True, markevery=max(1, len(sim.steps) // 6))
        left.plot(sim.steps, sim.series("expected_reward")[:, 0], label=label, **s)
        right.bar(
            x - 0.4 + width / 2 + i * width,
            dist[order],
            width,
            color=s["color"],
            hatch=("", "//", "..")[(i - 1) % 3],
            edgecolor="white",
            lw=0,
            label=f"{label}; stopped at the cut-off: {_running(sim):.2f}",
        )
    # one line per tick, vertical: the responses (stopped ones included) are many and short
    right.set_xticks(x, [f"{names[k]}  $r={d['reward'][k]:+.0f}$" for k in order], fontsize=5, rotation=90)
    right.set(ylabel="probability (every response)", title="final distribution over sequences", ylim=(0, 1.45))
    right.legend(fontsize=6)
    left.set(xlabel="training step", title="expected oracle reward under the policy")
    left.legend()
    return fig
