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


def compute(losses=LOSSES, steps: int = 300, seeds: int = 8, values: dict | None = None) -> dict:
    from gradlab.figures import check_values_used, values_for

    check_values_used(losses, values)
    out = {}
    for loss in losses:
        extra = {"values": values_for(loss, values)} if values_for(loss, values) else {}
        sim = dynamics.simulate(loss, FAMILY, "similar_embeddings", steps=steps, seeds=seeds, lr=0.05, **extra)
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

    data = data or compute()
    from gradlab.figures import style

    n = len(data)
    if style.size() == "page":
        fig = style.figure(0.62)
        grid = fig.subplots(2, n, squeeze=False)
        tops, bottoms = list(grid[0]), list(grid[1])
    else:
        fig = style.figure(0.85 * n)
        grid = fig.subplots(2 * n, 1, squeeze=False)[:, 0]
        tops, bottoms = list(grid[0::2]), list(grid[1::2])
    for col, (loss, (sim, start, end)) in enumerate(data.items()):
        ax = tops[col]
        for i, name in enumerate(("lp_w", "lp_l")):
            y = sim.series(name)
            s = style.series(i)
            ax.plot(sim.steps, y.mean(1), label=style.LABELS[name], **s)
            ax.fill_between(sim.steps, y.min(1), y.max(1), color=s["color"], alpha=0.15, lw=0)
        twin = ax.twinx()
        twin.plot(sim.steps, sim.series("margin").mean(1), color=style.REFERENCE_COLOUR, ls="--",
                  label=r"margin $\beta h$")
        twin.set_ylabel("implicit-reward margin")
        twin.grid(False)
        ax.set(title=f"{style.display_name(loss)}: similar-embedding pair", xlabel="training step",
               ylabel="log-probability")
        ax.legend(loc="lower left")
        twin.legend(loc="upper right")
        bx = bottoms[col]
        x = np.arange(len(CATEGORIES))
        bx.bar(x - 0.2, start, 0.4, label="start", color="0.7")
        bx.bar(x + 0.2, end, 0.4, label="end", color=style.PALETTE[0])
        bx.set_xticks(x, CATEGORIES, rotation=30, ha="right", fontsize=6)
        bx.set(ylabel="probability mass", title=f"{style.display_name(loss)}: where the mass goes")
        bx.legend()
    return fig
