"""Azar et al. 2023 (arXiv:2310.12036): with deterministic preferences DPO's optimum ignores
the reference and becomes deterministic, while IPO's stays in the interior.

Setting: one context, three actions with a uniform reference, and the three pairs of a total
order (a > b, b > c, a > c), each labelled deterministically. Trained on free logits with plain
gradient descent, for several beta (the paper's tau).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlab.reproduce import Entry, Measured, Outcome
from gradlab.reproduce import _common as c

PAIRS = ((0, 1), (1, 2), (0, 2))  # (chosen, rejected): the total order 0 > 1 > 2
BETAS = (0.1, 0.5, 1.0)
STEPS, QUICK_STEPS = 20000, 5000
DPO_MIN_PROB = 1e-3  # "deterministic": the least likely action's probability has fallen below this
IPO_TV_TOL = 1e-8  # IPO ends at its stationary point (computed by least squares below)


def _objective(loss: str, beta: float):
    """The runner's objective on this entry's data (the mean over the three pairs, uniform
    reference), for the step size only."""
    chosen, rejected = np.array([p[0] for p in PAIRS]), np.array([p[1] for p in PAIRS])
    return c.softmax_objective(c.loss_function(loss, {"beta": beta}), np.zeros(3), chosen, rejected,
                               np.full(len(PAIRS), 1 / len(PAIRS)))


def _ipo_stationary(beta: float) -> np.ndarray:
    """IPO regresses every pair's margin onto 1/(2 beta) (Azar et al. Eq. 17); with a uniform
    reference the margin is theta_w - theta_l, so the minimiser is the least-squares solution."""
    d = np.zeros((len(PAIRS), 3))
    for row, (w, l_) in enumerate(PAIRS):
        d[row, w], d[row, l_] = 1.0, -1.0
    theta, *_ = np.linalg.lstsq(d, np.full(len(PAIRS), 1 / (2 * beta)), rcond=None)
    return c.softmax(theta)


def experiment_config(loss: str, beta: float, lr: float, steps: int = STEPS) -> dict:
    """One (loss, beta) run of this entry as an experiment dict for :func:`gradlab.experiments.run`
    (``experiments/azar_dpo_vs_ipo.toml`` is the DPO, beta 0.1 one): a 3-action softmax from
    uniform logits, reference = the start, the three pairs of the total order, plain gradient
    descent at ``lr``, 100 records."""
    return {
        "policy": {"family": "softmax", "vocab": 3, "init": {"logits": [0.0, 0.0, 0.0]}},
        "reference": {"params": "policy"},
        "data": {"kind": "pairs", "chosen": [p[0] for p in PAIRS], "rejected": [p[1] for p in PAIRS]},
        "loss": {"name": loss, "beta": beta},
        "train": {"optimizer": "sgd", "lr": lr, "steps": steps, "seeds": 1, "record_every": max(1, steps // 100),
                  "metrics": ["probabilities"]},
    }


def _azar(quick: bool) -> Outcome:
    import jax.numpy as jnp

    from gradlab.experiments import run

    steps = QUICK_STEPS if quick else STEPS
    measured: Measured = {}
    series: dict[Any, Any] = {}
    for beta in BETAS:
        row = {}
        for loss in ("dpo", "ipo"):
            # the classical stable step 1/lambda_max of the Hessian at the start (IPO's objective is
            # quadratic in the logits, lambda_max = 2; a step of 2/lambda_max would oscillate forever)
            lr = c.stable_step(_objective(loss, beta), jnp.zeros(3))
            result = run(experiment_config(loss, beta, lr, steps))
            at, probs = np.asarray(result.runs[0].steps), result.series("probabilities")[0]
            series[(loss, beta)] = (at, probs)
            half = len(at) // 2
            row[loss] = {"final_probs": probs[-1].tolist(), "min_prob": float(probs[-1].min()),
                         "min_prob_falling_in_second_half": bool(np.all(np.diff(probs[half:].min(1)) < 0))}
        row["ipo"]["tv_to_stationary_point"] = c.tv(probs[-1], _ipo_stationary(beta))
        measured[f"beta_{beta:g}"] = row
    measured["steps"] = steps
    return Outcome(measured, series)


def _judge_azar(m) -> bool:
    ok = True
    for beta in BETAS:
        row = m[f"beta_{beta:g}"]
        ok &= row["dpo"]["min_prob"] < DPO_MIN_PROB and row["dpo"]["min_prob_falling_in_second_half"]
        ok &= row["ipo"]["tv_to_stationary_point"] < IPO_TV_TOL and row["ipo"]["min_prob"] > 0
    return bool(ok)


def _plot_azar(fig, out: Outcome) -> None:
    ax = fig.subplots()
    for i, beta in enumerate(BETAS):
        for loss, ls in (("dpo", "-"), ("ipo", "--")):
            at, probs = out.series[(loss, beta)]
            ax.semilogy(at, probs.min(1), color=f"C{i}", ls=ls, label=f"{loss}, beta={beta:g}")
    ax.axhline(DPO_MIN_PROB, color="k", lw=0.6, ls=":")
    ax.set(xlabel="step (gradient descent)", ylabel="smallest action probability")
    ax.legend(ncol=2)


AZAR_IPO = Entry(
    name="azar_dpo_vs_ipo",
    title="Azar: DPO goes deterministic, IPO stays interior",
    source="Azar et al. 2023, arXiv:2310.12036, Sec. 4.2 (DPO with deterministic preferences ignores the KL "
           "term) and Sec. 5.4 / Fig. 1 (illustrative three-action example; IPO, Eq. 17)",
    claim="With deterministic preferences the DPO loss keeps falling as the dispreferred actions' probability goes "
          "to 0, whatever beta, so training drives the policy towards a deterministic one; IPO's loss has a "
          "finite minimiser in the interior, set by beta.",
    setting=f"One context, 3 actions, uniform reference, pairs {PAIRS} (total order), deterministic labels; free "
            f"logits from the reference; plain gradient descent with step 1/lambda_max of the Hessian at the start, "
            f"run by the experiment runner (experiments/azar_dpo_vs_ipo.toml is the dpo, beta 0.1 run), "
            f"{STEPS} steps (tests: {QUICK_STEPS}); "
            f"beta in {BETAS}.",
    predicate=f"For every beta: DPO's smallest action probability ends below {DPO_MIN_PROB:g} and is still falling "
              f"over the second half of training; IPO ends within total variation {IPO_TV_TOL:g} of its "
              f"least-squares stationary point, where every probability is positive.",
    experiment=_azar,
    judge=_judge_azar,
    plot=_plot_azar,
    shortened=True,
)
