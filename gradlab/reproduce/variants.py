"""Claims about DPO's variants: SamPO's down-sampled log-probabilities (Lu et al. 2024) and
DPOP's chosen log-probability (Pal et al. 2024), with the two checks whose experiment gradlab
cannot run yet: Razin et al.'s sequence-level CHES and Tajwar et al.'s bandit.

SamPO's identity is checked by exact enumeration (every down-sampled subset, no sampling);
DPOP is trained by the experiment runner beside DPO, its control, on pairs that differ in one
token (the paper's low-edit-distance case).
"""

from __future__ import annotations

import itertools

import numpy as np

from gradlab.reproduce import Entry, Outcome, Versus
from gradlab.reproduce import _common as c

# ---------------------------------------------------------------------------------------------
# SamPO: the expected down-sampled log-probability
# ---------------------------------------------------------------------------------------------

S_LONG, S_SHORT = 8, 3  # tokens of the longer and the shorter response
S_DRAWS = 50
S_TOL = 1e-12
S_CONTROL_GAP = 1e-3  # the truncation control misses the identity by more than this (relative)
S_BETA = 0.1


def _sampo(quick: bool) -> Outcome:
    """Seeded per-token log-ratios (policy minus reference) of a long and a short response. SamPO
    keeps l_min = S_SHORT tokens of the longer one, drawn uniformly without replacement; the mean
    over every one of the C(S_LONG, S_SHORT) subsets is the exact expectation."""
    dpo = c.loss_function("dpo", {"beta": S_BETA})
    subsets = np.array(list(itertools.combinations(range(S_LONG), S_SHORT)))
    rel_err, control_err, margins, losses = [], [], [], []
    for d in range(S_DRAWS):
        tok_w = c.seeded(1000 + d, (S_LONG,))  # per-token log-ratio of the longer (chosen) response
        tok_l = c.seeded(2000 + d, (S_SHORT,))
        lp = tok_w.sum()
        expected = tok_w[subsets].sum(-1).mean()  # E over every subset of size l_min
        identity = S_SHORT / S_LONG * lp
        rel_err.append(abs(expected - identity) / max(abs(identity), 1e-300))
        truncated = tok_w[:S_SHORT].sum()  # the control: keep the first l_min tokens
        control_err.append(abs(truncated - identity) / max(abs(identity), 1e-300))
        h = tok_w[subsets].sum(-1) - tok_l.sum()  # SamPO's margin for each subset
        margins.append(float(h.mean() - (identity - tok_l.sum())))
        losses.append(float(np.mean(np.asarray(dpo(h, 0.0 * h, 0.0 * h, 0.0 * h)))))
    measured = {"draws": S_DRAWS, "subsets_per_draw": int(len(subsets)),
                "max_relative_error_of_identity": float(max(rel_err)),
                "control_truncation_fraction_off_by_more_than_gap":
                    float(np.mean(np.array(control_err) > S_CONTROL_GAP)),
                "control_truncation_median_relative_error": float(np.median(control_err)),
                "max_margin_identity_error": float(np.max(np.abs(margins))),
                "mean_sampo_loss": float(np.mean(losses))}
    return Outcome(measured, {"rel_err": np.array(rel_err), "control_err": np.array(control_err)})


def _sampo_versus(m) -> list[Versus]:
    return [Versus("relative error of E[down-sampled lp] = (l_min/L) lp: random subsets vs the first l_min tokens",
                   m["max_relative_error_of_identity"], m["control_truncation_median_relative_error"],
                   m["max_relative_error_of_identity"] < S_TOL
                   and m["control_truncation_fraction_off_by_more_than_gap"] >= 0.9)]


def _judge_sampo(m) -> bool:
    return m["max_relative_error_of_identity"] < S_TOL and m["max_margin_identity_error"] < S_TOL


def _plot_sampo(fig, out: Outcome) -> None:
    ax = fig.subplots()
    floor = 1e-18
    ax.semilogy(np.maximum(out.series["rel_err"], floor), "o", ms=3, label="random subsets (SamPO)")
    ax.semilogy(np.maximum(out.series["control_err"], floor), "s", ms=3, label="first l_min tokens (control)")
    ax.set(xlabel="draw", ylabel="relative error of (l_min/L) lp")
    ax.legend(fontsize=6)


SAMPO = Entry(
    name="sampo_identity",
    title="SamPO: the expected down-sampled log-probability",
    source="Lu et al. 2024, 'Eliminating Biased Length Reliance of Direct Preference Optimization via Down-Sampled "
           "KL Divergence', arXiv:2406.10957 (the down-sampled KL: both responses' token log-ratios summed over "
           "l_min = min(|y_w|, |y_l|) tokens drawn at random). Read: the abstract; the identity is the linearity of "
           "the expectation, our statement",
    claim="SamPO sums the longer response's per-token log-ratios over l_min tokens drawn uniformly without "
          "replacement, so in expectation its log-ratio is (l_min/L) times the full one: the length reliance of "
          "DPO's sequence-level margin is removed in expectation, and the loss is DPO's on that margin.",
    setting=f"Seeded per-token log-ratios, a chosen response of {S_LONG} tokens and a rejected one of {S_SHORT}; "
            f"{S_DRAWS} draws; the expectation is the exact mean over all C({S_LONG}, {S_SHORT}) = 56 subsets; "
            f"SamPO's loss is gradlab's dpo (beta {S_BETA}) on each subset's margin. Control: keep the first "
            f"l_min tokens (a deterministic truncation).",
    predicate=f"In every draw the mean over subsets equals (l_min/L) lp to {S_TOL:g} (relative), and the mean SamPO "
              f"margin equals (l_min/L)(lp_w - ref_w) - (lp_l - ref_l) to {S_TOL:g}; the truncation control misses "
              f"the identity by more than {S_CONTROL_GAP:g} (relative) in at least 90% of draws.",
    experiment=_sampo,
    judge=_judge_sampo,
    plot=_plot_sampo,
    versus=_sampo_versus,
)

# ---------------------------------------------------------------------------------------------
# DPOP: does the chosen log-probability stay up?
# ---------------------------------------------------------------------------------------------

D_STEPS, D_QUICK_STEPS = 300, 100
D_LR = 0.5
D_SEEDS = 4


def dpop_config(loss: str, steps: int = D_STEPS) -> dict:
    """Unbounded unigram + EOS, uniform start = the reference; 32 shared-prefix pairs per seed
    (same length, one token differs, the oracle's better token chosen); plain gradient descent."""
    return {"policy": {"family": "unigram", "vocab": 3, "max_len": "none", "init": {"theta": [0.0] * 4}},
            "reference": {"params": "policy"},
            "data": {"kind": "shared_prefix", "n_pairs": 32},
            "loss": {"name": loss, "beta": 0.1},
            "train": {"optimizer": "sgd", "lr": D_LR, "steps": steps, "seeds": D_SEEDS,
                      "record_every": max(1, steps // 20), "metrics": ["lp_w", "lp_l"]}}


def _dpop(quick: bool) -> Outcome:
    from gradlab.experiments.runner import run_many

    steps = D_QUICK_STEPS if quick else D_STEPS
    measured, series = {"steps": steps}, {}
    for loss, result in zip(("dpop", "dpo"), run_many([dpop_config("dpop", steps), dpop_config("dpo", steps)]),
                            strict=True):
        lp_w = result.series("lp_w").mean(-1)  # (seeds, records): mean over the pairs
        measured[loss] = {"initial_mean_lp_w": lp_w[:, 0].tolist(), "final_mean_lp_w": lp_w[:, -1].tolist(),
                          "change_per_seed": (lp_w[:, -1] - lp_w[:, 0]).tolist()}
        series[loss] = (np.asarray(result.runs[0].steps), lp_w)
        if loss == "dpop":
            measured["dpop_lambda"] = result.config["loss"]["dpop_lambda"]
    return Outcome(measured, series)


def _dpop_versus(m) -> list[Versus]:
    return [Versus("smallest change of the mean chosen log-prob over seeds: DPOP (>= 0) vs DPO (control, < 0)",
                   float(min(m["dpop"]["change_per_seed"])), float(max(m["dpo"]["change_per_seed"])),
                   min(m["dpop"]["change_per_seed"]) >= 0 and max(m["dpo"]["change_per_seed"]) < 0)]


def _judge_dpop(m) -> bool:
    return min(m["dpop"]["change_per_seed"]) >= 0


def _plot_dpop(fig, out: Outcome) -> None:
    ax = fig.subplots()
    for i, (loss, (at, lp_w)) in enumerate(out.series.items()):
        for k, row in enumerate(lp_w):
            ax.plot(at, row, color=f"C{i}", alpha=0.8, label=loss if k == 0 else None)
    ax.set(xlabel="step (plain gradient descent)", ylabel="mean chosen log-prob")
    ax.legend(fontsize=6)


DPOP = Entry(
    name="dpop_chosen_stays_up",
    title="DPOP: the chosen log-probability stays up where DPO's falls",
    source="Pal et al. 2024, 'Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive', "
           "arXiv:2402.13228 (DPO can lower the preferred completion's likelihood, especially on pairs of small edit "
           "distance; DPOP's penalty lambda max(0, log pi_ref(y_w) - log pi(y_w)) avoids this failure mode). Read: "
           "the abstract; the loss is gradlab's registered dpop",
    claim="On pairs that differ in a few tokens, DPO lowers the chosen response's log-probability; DPOP keeps it "
          "from falling below where it started.",
    setting=f"Exact unbounded unigram + EOS policy (3 content tokens), uniform start = the reference; 32 shared-prefix "
            f"pairs per seed (equal lengths, one position differs, the oracle's better token chosen), seeds "
            f"0..{D_SEEDS - 1}; dpop (beta 0.1, dpop_lambda 50, its default) and dpo (beta 0.1, the control) "
            f"trained by the experiment runner with plain gradient descent (lr {D_LR}), {D_STEPS} steps "
            f"(tests: {D_QUICK_STEPS}).",
    predicate="In every seed DPOP's mean chosen log-prob (over the pairs) ends at or above its start, while DPO's "
              "(the control, same data and optimiser) ends below its start.",
    experiment=_dpop,
    judge=_judge_dpop,
    plot=_plot_dpop,
    shortened=True,
    versus=_dpop_versus,
    finding="DPOP slows the fall but does not stop it on this toy: over 300 steps the mean chosen log-prob falls "
            "by 1.1 to 2.2 nats under DPOP (lambda 50) against 7.5 to 9 under DPO. With one softmax shared by "
            "every position, the rejected token's push lowers every chosen sequence's other tokens too, and the "
            "penalty, active only once lp_w is below the reference, balances that push instead of undoing it. "
            "The control behaves as the paper says (DPO lowers the chosen); the claim about DPOP does not hold "
            "here. Not tuned: lambda is the paper's default as registered.",
)

# ---------------------------------------------------------------------------------------------
# Registered, not yet runnable
# ---------------------------------------------------------------------------------------------

CHES_SEQUENCE = Entry(
    name="razin_ches_sequence",
    title="Razin: sequence-level CHES and its length-normalised form",
    source="Razin et al. 2024, 'Unintentional Unalignment: Likelihood Displacement in Direct Preference "
           "Optimization', arXiv:2410.08847 (CHES over the sums of hidden embeddings of a response, and its "
           "length-normalised variant). Not read in the primary document in this session",
    claim="Across pairs, a higher sequence-level CHES score (and more so its length-normalised form) goes with a "
          "larger drop of the chosen response's log-probability under DPO.",
    setting="Planned: the hidden_state (previous_token) and bigram toys, every pair of responses of up to 3 content "
            "tokens, one DPO step; CHES from the per-position hidden states the policy exposes.",
    predicate="Planned, fixed before running: the rank correlation between the length-normalised CHES and the "
              "measured drop of lp_w exceeds 0.5 on both toys, and exceeds that of a control score with the "
              "rejected response's embeddings replaced by the chosen's own.",
    experiment=None,
    judge=None,
    plot=None,
    pending="the per-position hidden states of a sequence policy (gradlab's families expose log-probabilities, not "
            "their hidden embeddings per position), and the primary document read for the score's exact form",
)

TAJWAR_BANDIT = Entry(
    name="tajwar_bandit",
    title="Tajwar: on-policy sampling and negative gradients on a bandit",
    source="Tajwar et al. 2024, 'Preference Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy Data', "
           "arXiv:2404.14367 (the bandit experiment: on-policy sampling and a negative gradient against offline "
           "DPO and filtered MLE). Not read in the primary document in this session",
    claim="When the reward's peak lies where the reference puts little mass, on-policy methods with a negative "
          "gradient reach it faster than offline DPO, which reaches it faster than maximum likelihood on filtered "
          "samples.",
    setting="Planned: a K-action softmax bandit with the reward's peak in the reference's low-probability region; "
            "on_policy DPO, reference_pairs DPO (offline) and sft on the best reference samples, same optimiser.",
    predicate="Planned, fixed before running: the expected reward after a fixed number of steps orders on-policy "
              "DPO > offline DPO > filtered MLE in every seed; control: with the peak where the reference's mass "
              "is, the ordering must not hold strictly.",
    experiment=None,
    judge=None,
    plot=None,
    pending="a filtered-MLE data preset (the best of n reference samples) and the paper's bandit setting read in the "
            "primary document",
)
