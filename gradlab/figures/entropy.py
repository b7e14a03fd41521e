"""Entropy and the reference's scale: the closed-form optimum against trained policies.

Left: entropy of pi* ~ pi_0^(gamma/beta) exp(r/beta) over the finished sequences of a small
tabular toy (vocabulary 3, cut-off 3 tokens: 7 sequences) against beta, for several ratios
gamma/beta (lines: the closed form of docs/background.md; dots: the two-coefficient loss `gdpo` trained
to convergence on Bradley-Terry population data drawn from pi_0 with the oracle reward r).
H-DPO's alpha (dashed, squares) targets pi_0^(1/alpha) exp(r/(alpha beta)), i.e. gamma/beta = 1/alpha
at the effective beta alpha*beta. Right: the tempered-reference equivalence. Training `gdpo` with
the reference replaced by pi_0^(1/tau)/Z (solid) and training with gamma -> gamma/tau (dots)
give the same entropy trajectory; the title reports the largest difference.
"""

from __future__ import annotations

import jax
import numpy as np

from gradlab.experiments import analysis, runner
from gradlab.policies import make_family

BETAS = (0.25, 0.5, 1.0, 2.0)
RATIOS = (0.5, 1.0, 2.0)
ALPHAS = (0.8, 1.25)
FAMILY = dict(vocab=3, max_len=3)  # tokens including EOS (2 content tokens), cut-off 3


def _experiment(loss: str, steps: int, temperature: float = 1.0, **values: float) -> dict:
    """The figure's run as an experiment: tabular policy starting at its seed-0 reference, Adam at
    0.05, Bradley-Terry population data with the oracle reward, one seed."""
    return {"policy": {"family": "tabular", "vocab": FAMILY["vocab"] - 1, "max_len": FAMILY["max_len"]},
            "reference": {"temperature": temperature},
            "data": {"kind": "population"},
            "loss": {"name": loss, **values},
            "train": {"optimizer": "adam", "lr": 0.05, "steps": steps, "seeds": [0],
                      "metrics": ["sequence_entropy"]}}


def _final_entropy(results: list[runner.Result]) -> list[float]:
    return [float(r.series("sequence_entropy")[0, -1]) for r in results]


def compute(steps: int = 1500) -> dict:
    fam = make_family("tabular", **FAMILY)
    ref = fam.init(jax.random.PRNGKey(0), 0.5)  # the runner's seed-0 initial policy (= reference)
    grid = np.geomspace(BETAS[0], BETAS[-1], 40)
    entropy, optimum = analysis.entropy, analysis.optimal_policy
    closed = {rho: [entropy(optimum(fam, ref, b, rho * b)) for b in grid] for rho in RATIOS}
    # every (beta, gamma) setting of a loss runs in one vmapped program
    final = _final_entropy(runner.run_many([_experiment("gdpo", steps, beta=b, gamma=rho * b)
                                            for rho in RATIOS for b in BETAS]))
    trained = {rho: final[i * len(BETAS):(i + 1) * len(BETAS)] for i, rho in enumerate(RATIOS)}
    hdpo_closed = {a: [entropy(optimum(fam, ref, a * b, b)) for b in grid] for a in ALPHAS}
    final = _final_entropy(runner.run_many([_experiment("h_dpo", steps, beta=b, hdpo_alpha=a)
                                            for a in ALPHAS for b in BETAS]))
    hdpo_trained = {a: final[i * len(BETAS):(i + 1) * len(BETAS)] for i, a in enumerate(ALPHAS)}
    tau, beta, gamma = 2.0, 0.5, 0.5
    tempered, rescaled = runner.run_many([_experiment("gdpo", 300, tau, beta=beta, gamma=gamma),
                                          _experiment("gdpo", 300, beta=beta, gamma=gamma / tau)])
    p0 = np.exp(np.asarray(fam.enumerate(ref).logp))
    return {"grid": grid, "closed": closed, "trained": trained, "hdpo_closed": hdpo_closed,
            "hdpo_trained": hdpo_trained, "tempered": tempered, "rescaled": rescaled, "tau": tau,
            "ref_entropy": entropy(p0 / p0.sum())}


def make(data: dict | None = None):

    d = data or compute()
    from gradlab.figures import style

    fig = style.figure(0.48, column_aspect=1.7)
    left, right = fig.subplots(*style.grid(2)).ravel()
    for i, rho in enumerate(RATIOS):
        s = style.series(i)
        left.plot(d["grid"], d["closed"][rho], label=rf"$\pi^*$, $\gamma/\beta = {rho:g}$", **s)
        left.plot(BETAS, d["trained"][rho], ls="none", marker=style.MARKERS[i], color=s["color"], ms=4)
    for j, a in enumerate(ALPHAS):
        s = style.series(len(RATIOS) + j)
        left.plot(d["grid"], d["hdpo_closed"][a], label=rf"H-DPO optimum, $\alpha = {a:g}$", **s)
        left.plot(BETAS, d["hdpo_trained"][a], ls="none", marker=style.MARKERS[len(RATIOS) + j], color=s["color"],
                  ms=4, mfc="none")
    left.axhline(d["ref_entropy"], color=style.REFERENCE_COLOUR, lw=0.8, ls=":", label=r"reference $\pi_0$")
    left.set(xscale="log", xlabel=r"$\beta$", ylabel="sequence entropy (nats)",
             title="optimum (lines) vs trained (markers)")
    left.set_xticks(BETAS)  # a label at every beta trained, the smallest included
    left.legend()
    t, r = d["tempered"], d["rescaled"]
    h_t, h_r = t.series("sequence_entropy")[0], r.series("sequence_entropy")[0]  # (records,) of seed 0
    steps_t, steps_r = np.asarray(t.runs[0].steps), np.asarray(r.runs[0].steps)
    diff = float(np.abs(h_t - h_r).max())
    right.plot(steps_t, h_t, label=rf"reference tempered, $\tau = {d['tau']:g}$", **style.series(0))
    right.plot(steps_r[::15], h_r[::15], ls="none", marker="o", ms=4,
               color=style.PALETTE[1], label=rf"$\gamma \to \gamma / {d['tau']:g}$")
    right.set(xlabel="training step", ylabel="sequence entropy (nats)",
              title=(r"tempering $\pi_0$ = rescaling $\gamma$ "
                     + ("(agree within $10^{-12}$)" if diff < 1e-12 else f"(max difference {diff:.1e})")))
    right.legend()
    return fig
