"""The proper (on-policy) loss against DPO, by exact expectations on a forced-stop toy with no leak.

Setting `proper_loss` of `gradlab.experiments.named`, run by the experiment runner (the same
computation as `gradlab reproduce proper_loss`'s training): a unigram + EOS policy over content
tokens 1 (reward +1) and 2 (reward -1) with a forced stop at 4 tokens: a response that reaches
4 content tokens ends there, as with max_new_tokens, so every one of the 31 responses is
finished and enumerated and the probabilities sum to 1 at every step (no mass leaks, nothing is
renormalised). The policy starts at the reference (logits 0, 0.5, 0.5 for EOS, 1, 2) and is
trained with Adam (lr 0.05, 400 steps, beta 0.1, one deterministic run: every expectation is
exact) three ways: DPO on every ordered pair drawn from the reference (offline, J_0 of the first
post); DPO on pairs drawn from the current policy without the score-function term (weights not
differentiated); and the proper loss `pdpo`, whose integrand pi(y) pi(y') l carries the full
product-rule gradient. Every pair is labelled by the oracle (higher reward wins). Left: expected
oracle reward. Right: the final probability of every response, ordered by reward, with the
reference. Caveat: in this toy a higher reward means more good tokens, hence a longer response,
and the best response (four 1s) is one the forced stop ends; offline and on-policy DPO put almost
all the mass there, which is also a length effect bounded by the stop. The proper loss keeps a
spread: J_PDPO is log 2 at every deterministic policy, so its minimiser is not deterministic.
"""

from __future__ import annotations

import numpy as np

from gradlab.experiments import named

LABELS = {"offline_dpo": r"DPO, pairs from $\pi_0$ (offline)",
          "on_policy_dpo": r"DPO, pairs from $\pi$ (no score term)",
          "proper": "proper DPO (full gradient)"}


def _family():
    from gradlab.experiments.config import load
    from gradlab.experiments.runner import build_family

    return build_family(load(named.proper_loss_config()).policy)


def compute(steps: int = named.PROPER_STEPS) -> dict:
    """Each run's recorded steps, expected reward, stopped mass, and the final and initial
    probability of every response (with the responses' rewards and names)."""
    import jax

    fam = _family()
    out: dict = {"runs": {}}
    with jax.enable_x64(True):
        for name in named.PROPER_RUNS:
            result = named.proper_loss(name, steps=steps)
            run = result.runs[0]
            theta = {k.removeprefix("params."): v for k, v in run.metrics.items() if k.startswith("params.")}
            first = {k: np.asarray(v[0]) for k, v in theta.items()}
            last = {k: np.asarray(v[-1]) for k, v in theta.items()}
            enum = fam.enumerate(last)
            out["runs"][name] = {"steps": np.asarray(run.steps), "expected_reward": run.metrics["expected_reward"],
                                 "stopped_mass": run.metrics["stopped_mass"],
                                 "final": np.exp(np.asarray(enum.logp))}
            out["reference"] = np.exp(np.asarray(fam.enumerate(first).logp))
            order_seqs, lengths = np.asarray(enum.seqs), np.asarray(enum.lengths)
    reward_of = np.array([0.0, 1.0, -1.0])
    out["reward"] = (reward_of[order_seqs] * (np.arange(order_seqs.shape[1]) < lengths[:, None])).sum(1)
    out["names"] = ["".join("·" if t == 0 else str(t) for t in s[:n]) or "·"
                    for s, n in zip(order_seqs.tolist(), lengths.tolist(), strict=True)]
    return out


def make(data: dict | None = None):
    d = data or compute()
    from gradlab.figures import style

    fig = style.figure(0.5, column_aspect=1.8)
    left, right = fig.subplots(*style.grid(2)).ravel()
    order = np.argsort(d["reward"], kind="stable")
    width = 0.8 / (len(d["runs"]) + 1)
    x = np.arange(len(order))
    right.bar(x - 0.4 + width / 2, d["reference"][order], width, color="0.7", label=r"reference $\pi_0$")
    left.axhline(float(d["reference"] @ d["reward"]), color=style.REFERENCE_COLOUR, ls=":", label=r"reference $\pi_0$")
    for i, (name, run) in enumerate(d["runs"].items(), 1):
        s = style.series(i - 1, marker=True, markevery=max(1, len(run["steps"]) // 6))
        left.plot(run["steps"], run["expected_reward"], label=f"{LABELS[name]}: {run['expected_reward'][-1]:.2f}", **s)
        right.bar(x - 0.4 + width / 2 + i * width, run["final"][order], width, color=s["color"],
                  hatch=("", "//", "..")[(i - 1) % 3], edgecolor="white", lw=0,
                  label=f"{LABELS[name]}; total {run['final'].sum():.3f}")
    # one line per tick, vertical: the responses are many and short ('·' is the EOS)
    right.set_xticks(x, [f"{d['names'][k]}  $r={d['reward'][k]:+.0f}$" for k in order], fontsize=4.5, rotation=90)
    right.set(ylabel="probability (every response)", title="final distribution over all 31 responses", ylim=(0, 1.45))
    right.legend(fontsize=5.5, loc="upper left")
    left.set(xlabel="Adam step (lr 0.05)", ylabel="expected oracle reward",
             title=r"expected oracle reward, $\beta=0.1$ (final value in legend)")
    left.legend(fontsize=6)
    return fig
