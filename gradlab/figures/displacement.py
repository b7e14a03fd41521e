"""Likelihood displacement and squeezing on the shared-parameter linear head.

A linear-head policy (logits = W h(previous token), W shared by every context, 2-dimensional
features) trained on the `similar_embeddings` dataset: single-token responses whose unembedding
rows are the most similar pair at initialisation, the oracle-better one chosen. Top row: the
chosen and rejected log-probabilities and the implicit-reward margin (mean over 8 seeds, band
min to max). Bottom row: where the probability mass is at the start and the end of training
(mean over seeds): the chosen response, the rejected response, the other single-token
responses, longer responses, and responses stopped at the cut-off.
"""

from __future__ import annotations

import jax
import numpy as np

from gradlab import dynamics
from gradlab.policies import LinearHead, all_sequences, response_index

LOSSES = ("dpo", "ipo", "simpo")
FAMILY = LinearHead(vocab=5, max_len=4, dim=2)
CATEGORIES = ("chosen", "rejected", "other single tokens", "longer responses", "stopped at the cut-off")


def _mass(fam, params, w, l) -> np.ndarray:
    e = fam.enumerate(params)
    p = np.exp(np.asarray(e.logp))
    stopped = np.asarray(e.stopped)
    _, lengths = all_sequences(fam.vocab, fam.max_len)
    single = (lengths == 2) & ~stopped
    other = single.copy()
    other[[w, l]] = False
    return np.array([p[w], p[l], p[other].sum(), p[~single & ~stopped].sum(), p[stopped].sum()])


def compute(losses=LOSSES, steps: int = 300, seeds: int = 8) -> dict:
    out = {}
    for loss in losses:
        sim = dynamics.simulate(loss, FAMILY, "similar_embeddings", steps=steps, seeds=seeds, lr=0.05)
        starts, ends = [], []
        for s in range(seeds):
            init = FAMILY.init(jax.random.PRNGKey(s), 0.5)
            pairs = dynamics.make_dataset("similar_embeddings", FAMILY, s, 1, init)
            w, l = response_index(FAMILY.vocab, FAMILY.max_len, pairs.seqs, pairs.lengths)[[pairs.w[0], pairs.l[0]]]
            final = jax.tree_util.tree_map(lambda x, s=s: x[s], sim.final_params)
            starts.append(_mass(FAMILY, init, w, l))
            ends.append(_mass(FAMILY, final, w, l))
        out[loss] = (sim, np.mean(starts, 0), np.mean(ends, 0))
    return out


def make(data: dict | None = None):
    from matplotlib.figure import Figure

    data = data or compute()
    fig = Figure(figsize=(3.6 * len(data), 6.6), layout="constrained")
    axes = fig.subplots(2, len(data), squeeze=False)
    for col, (loss, (sim, start, end)) in enumerate(data.items()):
        ax = axes[0, col]
        for name, color in (("lp_w", "C2"), ("lp_l", "C3")):
            y = sim.series(name)
            ax.plot(sim.steps, y.mean(1), color=color, label=f"{name} (log pi(y_{name[-1]}))")
            ax.fill_between(sim.steps, y.min(1), y.max(1), color=color, alpha=0.15, lw=0)
        twin = ax.twinx()
        twin.plot(sim.steps, sim.series("margin").mean(1), color="0.3", ls="--", label="margin beta*h")
        twin.set_ylabel("implicit-reward margin", fontsize=8)
        ax.set(title=f"{loss}: similar-embedding pair", xlabel="training step", ylabel="log-probability")
        ax.legend(fontsize=7, loc="lower left")
        twin.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
        bx = axes[1, col]
        x = np.arange(len(CATEGORIES))
        bx.bar(x - 0.2, start, 0.4, label="start", color="0.6")
        bx.bar(x + 0.2, end, 0.4, label="end", color="C0")
        bx.set_xticks(x, CATEGORIES, rotation=30, ha="right", fontsize=7)
        bx.set(ylabel="probability mass", title=f"{loss}: where the mass goes")
        bx.legend(fontsize=7)
    return fig
