"""Claims about the on-policy group losses (GRPO and its variants), settled by exact expected
gradients on the toys of :mod:`gradlab.experiments.groups`: no sampling, so every number is the
expectation over groups itself.

The measured rates are directional derivatives along the descent step of the expected loss (the
update -grad at learning rate -> 0), taken with ``jax.jvp`` of the quantity computed from the exact
law of (reward, length); the entropy entry compares with a finite difference of the exact entropy.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from gradlab.experiments import groups as gr
from gradlab.policies import Bigram, Softmax
from gradlab.reproduce import Entry, Outcome, Versus

ZERO = 1e-9  # an exactly vanishing effect: below this, relative to the effect it is compared with


def _chain() -> tuple[Bigram, dict, gr.Reward]:
    """The shared chain: a bigram + EOS, 3 content tokens, unbounded, seeded logits (scale 0.5);
    reward 1 when the first content token is token 1."""
    fam = Bigram(vocab=4, max_len=None)
    return fam, fam.init(jax.random.PRNGKey(1), scale=0.5), gr.first_token(1)


def _lengths(fam, reward, n):
    """theta -> (E[|o| | wrong], E[|o| | right], E[|o|], p) from the exact law, lengths <= n."""
    def f(theta):
        law, _ = gr.joint_law(fam, theta, reward, n)
        span = jnp.arange(n + 1)
        return jnp.stack([(law[0] * span).sum() / law[0].sum(), (law[1] * span).sum() / law[1].sum(),
                          (law * span).sum(), law[1].sum()])
    return f


def _rates(fam, params, reward, grad) -> np.ndarray:
    """d/d(lr) of (E[|o| | wrong], E[|o| | right], E[|o|], p) along the update -lr * grad."""
    f = _lengths(fam, reward, gr.horizon(fam, params))
    return np.asarray(jax.jvp(f, (params,), (jax.tree_util.tree_map(lambda g: -g, grad),))[1])


def _bars(fig, labels, values, ylabel):
    ax = fig.subplots()
    ax.bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
    ax.set_xticks(range(len(values)), labels, fontsize=6, rotation=20)
    ax.axhline(0, color="0.5", lw=0.5)
    ax.set(ylabel=ylabel)


# ---------------------------------------------------------------------------------------------
# Dr. GRPO: the length bias of 1/|o|
# ---------------------------------------------------------------------------------------------

L_GROUP = 8


def _length_bias(quick: bool) -> Outcome:
    fam, params, reward = _chain()
    out: dict[str, float] = {}
    for loss in ("grpo", "dr_grpo"):
        g = gr.exact_gradient(loss, fam, params, reward, group_size=L_GROUP, scale_rewards="group").grad
        wrong, right, _, dp = _rates(fam, params, reward, g)
        out |= {f"{loss}_wrong_rate": wrong / dp, f"{loss}_right_rate": right / dp}
    return Outcome(out, {"rates": out})


def _length_bias_versus(m) -> list[Versus]:
    return [Versus("d E[|o| | wrong] per unit of dp: grpo (effect) vs dr_grpo (control)", m["grpo_wrong_rate"],
                   m["dr_grpo_wrong_rate"], m["grpo_wrong_rate"] > 0 and abs(m["dr_grpo_wrong_rate"])
                   <= ZERO * abs(m["grpo_wrong_rate"])),
            Versus("d E[|o| | right] per unit of dp: grpo (effect) vs dr_grpo (control)", m["grpo_right_rate"],
                   m["dr_grpo_right_rate"], m["grpo_right_rate"] < 0 and abs(m["dr_grpo_right_rate"])
                   <= ZERO * abs(m["grpo_right_rate"]))]


LENGTH_BIAS = Entry(
    name="drgrpo_length_bias",
    title="Dr. GRPO: 1/|o| lengthens wrong answers and shortens right ones",
    source="Liu et al. 2025, 'Understanding R1-Zero-Like Training: A Critical Perspective', arXiv:2503.20783 "
           "(GRPO's response-length normalisation favours short correct and long incorrect responses; Dr. GRPO "
           "removes it). Read: the abstract",
    claim="Under GRPO's per-response mean (weight A_i/(G|o_i|)) the expected update makes incorrect responses longer "
          "and correct ones shorter; with a constant normaliser (Dr. GRPO) the length term vanishes.",
    setting=f"Exact unbounded bigram + EOS chain (3 content tokens, seeded logits, scale 0.5); reward 1 when the first "
            f"token is token 1; G = {L_GROUP}, scale_rewards 'group' for both; the exact expected gradient of grpo "
            "and of dr_grpo (the control); rates are d/d(lr) of the conditional expected lengths along the step, per "
            "unit of d p/d(lr).",
    predicate=f"grpo: d E[|o| | wrong] > 0 and d E[|o| | right] < 0; dr_grpo: both rates below {ZERO:g} times "
              "grpo's in magnitude (exactly zero up to rounding).",
    experiment=_length_bias,
    judge=lambda m: True,
    plot=lambda fig, out: _bars(fig, list(out.series["rates"]), list(out.series["rates"].values()),
                                "d E[|o|] / d p along the step"),
    versus=_length_bias_versus,
    finding="grpo behaves as the paper says: per unit of success gained, wrong answers lengthen (+3.5 tokens) and "
            "right ones shorten (-1.2). The control half fails as the predicate was written: under dr_grpo the right "
            "answers' rate is exactly 0, but the wrong answers' expected length still moves (-0.13). That is not a "
            "length term: the softmax gradient of the first token, pi_j (c_j - mean c), lowers the likelier wrong "
            "first tokens more in logit, so the mix of wrong answers (whose continuations differ in length) shifts. "
            "Conditioned on the first token, dr_grpo leaves every length unchanged (its gradient on the continuation "
            "logits is zero); the predicate, fixed on the unconditioned means, did not separate the two effects.",
)

# ---------------------------------------------------------------------------------------------
# The weight on grad p per prompt
# ---------------------------------------------------------------------------------------------

W_GROUP = 64
W_P = (0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9)
W_FLAT = 1.25  # max/min over p of kappa(p) sqrt(p (1 - p)) for the std-scaled loss


def _softmax_at(p: float, k: int = 4):
    fam = Softmax(k=k)
    probs = np.array([p] + [(1 - p) / (k - 1)] * (k - 1))
    return fam, {"logits": jnp.asarray(np.log(probs))}, gr.table([1] + [0] * (k - 1))


def _kappa(loss, scale, p) -> tuple[float, float]:
    """(kappa, residual): the update -grad = kappa grad_z p + r, r orthogonal; |r| / |kappa grad p|."""
    fam, params, reward = _softmax_at(p)
    probs = np.asarray(jax.nn.softmax(params["logits"]))
    grad_p = probs[0] * (np.eye(len(probs))[0] - probs)
    step = -np.asarray(gr.exact_gradient(loss, fam, params, reward, group_size=W_GROUP, scale_rewards=scale)
                       .grad["logits"])
    kappa = float(step @ grad_p / (grad_p @ grad_p))
    return kappa, float(np.linalg.norm(step - kappa * grad_p) / np.linalg.norm(kappa * grad_p))


def _weights(quick: bool) -> Outcome:
    rows = {"rloo": ("rloo", "leave_one_out"), "mean baseline": ("luspo", "none"), "std scaled": ("luspo", "group")}
    kap = {name: [_kappa(loss, scale, p) for p in W_P] for name, (loss, scale) in rows.items()}
    sq = np.sqrt(np.array(W_P) * (1 - np.array(W_P)))
    flat = {name: float(np.ptp(np.log(np.array([k for k, _ in v]) * sq))) for name, v in kap.items()}
    m = {"rloo_kappa_error": max(abs(k - 1) for k, _ in kap["rloo"]),
         "mean_kappa_error": max(abs(k - (W_GROUP - 1) / W_GROUP) for k, _ in kap["mean baseline"]),
         "largest_residual": max(r for v in kap.values() for _, r in v),
         "std_flatness": math.exp(flat["std scaled"]), "mean_flatness": math.exp(flat["mean baseline"])}
    return Outcome(m, {"p": list(W_P), **{k: [x for x, _ in v] for k, v in kap.items()}, "ml": [1 / p for p in W_P]})


def _plot_weights(fig, out: Outcome) -> None:
    ax = fig.subplots()
    for i, name in enumerate(("rloo", "mean baseline", "std scaled", "ml")):
        ax.plot(out.series["p"], out.series[name], marker="o", ms=2, color=f"C{i}", label=name)
    ax.set(xlabel="p = P(correct)", ylabel="weight on grad p", yscale="log")
    ax.legend(fontsize=6)


WEIGHTS = Entry(
    name="group_weight_on_grad_p",
    title="The per-prompt weight on grad p: 1, 1/sqrt(p(1-p)), 1/p",
    source="arXiv:2510.13651 and arXiv:2602.02710 (the expected GRPO update on a prompt is a weight times grad p: "
           "constant for RLOO and Dr. GRPO, 1/sqrt(p(1-p)) with std scaling, 1/p for maximum likelihood). Not read "
           "in the primary documents in this session: the claim as the issue states it",
    claim="On one prompt with a binary reward the expected update is kappa(p) grad p: kappa = 1 for RLOO's "
          "leave-one-out baseline, (G-1)/G for the group-mean baseline, about 1/sqrt(p(1-p)) with std scaling.",
    setting=f"A 4-action softmax, action 0 correct, P(action 0) = p in {W_P}; G = {W_GROUP}; the exact expected "
            "gradient of rloo, luspo with scale_rewards 'none' (the mean baseline, the control of the flatness "
            "test) and luspo with 'group' (weights A/G: std scaling alone); maximum likelihood's 1/p drawn for "
            "reference.",
    predicate=f"Every update is parallel to grad p (residual < 1e-9); rloo's kappa is 1 and the mean baseline's "
              f"(G-1)/G to 1e-9; with std scaling kappa sqrt(p(1-p)) varies by at most a factor {W_FLAT} over p, "
              f"where the mean baseline's (the control) varies by more.",
    experiment=_weights,
    judge=lambda m: m["rloo_kappa_error"] < 1e-9 and m["mean_kappa_error"] < 1e-9 and m["largest_residual"] < 1e-9,
    plot=_plot_weights,
    versus=lambda m: [Versus("max/min over p of kappa sqrt(p(1-p)): std scaled (effect) vs mean baseline (control)",
                             m["std_flatness"], m["mean_flatness"],
                             m["std_flatness"] <= W_FLAT < m["mean_flatness"])],
)

# ---------------------------------------------------------------------------------------------
# Silent groups
# ---------------------------------------------------------------------------------------------

S_GROUP = 4


def _silent(quick: bool) -> Outcome:
    fam = Softmax(k=3)
    params = fam.init(jax.random.PRNGKey(2), scale=1.0)
    pi = np.asarray(jax.nn.softmax(params["logits"]))
    r = np.array([1.0, 0.0, 0.0])
    p = float(pi @ r)
    eye = np.eye(3)
    silent_mass, parts = 0.0, {"grpo": [np.zeros(3), np.zeros(3)], "reinforce": [np.zeros(3), np.zeros(3)]}
    for group in itertools.product(range(3), repeat=S_GROUP):
        idx = np.array(group)
        prob, rewards = float(np.prod(pi[idx])), r[idx]
        silent = rewards.min() == rewards.max()
        silent_mass += prob * silent
        std = rewards.std(ddof=1)
        for name, adv in (("grpo", (rewards - rewards.mean()) / (std + 1e-4)), ("reinforce", rewards)):
            score = (adv[:, None] * (eye[idx] - pi)).sum(0) / S_GROUP  # sum_i w_i grad_z log pi(o_i)
            parts[name][int(silent)] += prob * score
    formula = p**S_GROUP + (1 - p) ** S_GROUP
    share = {k: float(np.linalg.norm(v[1]) / np.linalg.norm(v[0] + v[1])) for k, v in parts.items()}
    exact = -np.asarray(gr.exact_gradient("luspo", fam, params, gr.table(r), group_size=S_GROUP,
                                          scale_rewards="group").grad["logits"])
    m = {"p": p, "silent_enumerated": silent_mass, "silent_formula": formula,
         "grpo_silent_share": share["grpo"], "reinforce_silent_share": share["reinforce"],
         "exact_vs_enumeration": float(np.abs(exact - parts["grpo"][0] - parts["grpo"][1]).max())}
    return Outcome(m, {"share": share})


SILENT = Entry(
    name="silent_groups",
    title="Silent groups: probability p^G + (1-p)^G, and no update",
    source="The group-relative advantage of GRPO (Shao et al. 2024, arXiv:2402.03300, Eq. 3 with outcome "
           "supervision) is zero in a group whose rewards are all equal; DAPO (arXiv:2503.14476) drops such groups "
           "by dynamic sampling. Our statement of a consequence; read: the GRPO and DAPO objectives as registered",
    claim="A group of G i.i.d. responses is silent (all right or all wrong) with probability p^G + (1-p)^G, and a "
          "silent group contributes nothing to the expected GRPO update; a baseline-free REINFORCE (A = r) still "
          "moves on silent all-correct groups.",
    setting=f"A 3-action softmax (seeded logits, scale 1), action 0 correct; G = {S_GROUP}; every one of the 81 "
            "groups enumerated, with TRL's std-scaled advantage and weight A/G (|o| = 1), against A = r (the "
            "control); the enumeration's total is checked against groups.exact_gradient.",
    predicate="The enumerated silent mass equals p^G + (1-p)^G to 1e-12; the enumeration equals the exact gradient "
              "to 1e-12; the silent groups' share of the GRPO update is below 1e-12 while REINFORCE's exceeds 1e-2.",
    experiment=_silent,
    judge=lambda m: abs(m["silent_enumerated"] - m["silent_formula"]) < 1e-12 and m["exact_vs_enumeration"] < 1e-12,
    plot=lambda fig, out: _bars(fig, list(out.series["share"]), list(out.series["share"].values()),
                                "silent groups' share of |update|"),
    versus=lambda m: [Versus("silent groups' share of the update: grpo (effect) vs REINFORCE A = r (control)",
                             m["grpo_silent_share"], m["reinforce_silent_share"],
                             m["grpo_silent_share"] < 1e-12 and m["reinforce_silent_share"] > 1e-2)],
)

# ---------------------------------------------------------------------------------------------
# Entropy to first order
# ---------------------------------------------------------------------------------------------

E_EPS = 1e-4


def _entropy(z):
    logp = jax.nn.log_softmax(z)
    return -(jnp.exp(logp) * logp).sum()


def _entropy_change(quick: bool) -> Outcome:
    fam = Softmax(k=5)
    params = fam.init(jax.random.PRNGKey(4), scale=1.0)
    reward = gr.table([1, 0, 1, 0, 0])
    dz = -np.asarray(gr.exact_gradient("grpo", fam, params, reward, group_size=8).grad["logits"])
    z = np.asarray(params["logits"])
    pi = np.asarray(jax.nn.softmax(z))
    logp = np.log(pi)

    def cov(a, b):
        return float(pi @ (a * b) - (pi @ a) * (pi @ b))

    actual = float((_entropy(z + E_EPS * dz) - _entropy(z - E_EPS * dz)) / (2 * E_EPS))
    m = {"finite_difference": actual, "minus_cov_logp": -cov(logp, dz), "minus_cov_p": -cov(pi, dz)}
    m["error"] = abs(m["minus_cov_logp"] - actual) / abs(actual)
    m["control_error"] = abs(m["minus_cov_p"] - actual) / abs(actual)
    return Outcome(m, {"values": {k: m[k] for k in ("finite_difference", "minus_cov_logp", "minus_cov_p")}})


ENTROPY = Entry(
    name="entropy_covariance",
    title="Entropy change to first order: -Cov(log pi, dz)",
    source="Cui et al. 2025, 'The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models', "
           "arXiv:2505.22617 (the change in policy entropy is driven by the covariance between action log-probability "
           "and the change in logits). Read: the abstract",
    claim="For a softmax policy, the entropy change of a logit update dz is, to first order, -Cov_pi(log pi, dz).",
    setting="A 5-action softmax (seeded logits, scale 1), actions 0 and 2 correct; dz is the exact expected grpo "
            f"update (G = 8); the entropy's change is a central difference at step {E_EPS:g}; the control replaces "
            "log pi by pi in the covariance.",
    predicate="-Cov(log pi, dz) matches the entropy's derivative to 1e-6 (relative); the control misses by more "
              "than 10%.",
    experiment=_entropy_change,
    judge=lambda m: m["error"] < 1e-6,
    plot=lambda fig, out: _bars(fig, list(out.series["values"]), list(out.series["values"].values()),
                                "dH / d(lr)"),
    versus=lambda m: [Versus("relative error against dH: -Cov(log pi, dz) (effect) vs -Cov(pi, dz) (control)",
                             m["error"], m["control_error"], m["error"] < 1e-6 and m["control_error"] > 0.1)],
)

# ---------------------------------------------------------------------------------------------
# Rank bias
# ---------------------------------------------------------------------------------------------

R_SKEWED = (0.6, 0.05, 0.2, 0.15)  # a common and a rare correct action (0 and 1), two wrong
R_EVEN = (0.325, 0.325, 0.2, 0.15)  # the control: the same success, the correct actions equally likely


def _rank_rates(probs) -> tuple[float, float]:
    fam = Softmax(k=4)
    params = {"logits": jnp.log(jnp.asarray(probs))}
    reward = gr.table([1, 1, 0, 0])
    g = gr.exact_gradient("rloo", fam, params, reward, group_size=8).grad  # -grad: exactly grad p
    step = jax.tree_util.tree_map(lambda x: -x, g)
    _, d = jax.jvp(lambda th: jax.nn.softmax(th["logits"]), (params,), (step,))
    d = np.asarray(d)
    return float(d[1]), float(d[0] + d[1])


def _rank(quick: bool) -> Outcome:
    rare, dp = _rank_rates(R_SKEWED)
    rare_even, dp_even = _rank_rates(R_EVEN)
    m = {"rare_rate": rare, "success_rate": dp, "control_rare_rate": rare_even, "control_success_rate": dp_even}
    return Outcome(m, {"rates": m})


RANK = Entry(
    name="rank_bias",
    title="Rank bias: a rare correct action falls while success rises",
    source="arXiv:2506.02355 (under the policy gradient, probability concentrates on the already likely correct "
           "answers: a rare correct answer can lose probability while the success rate rises). Not read in the "
           "primary document in this session: the claim as the issue states it",
    claim="Under the plain policy gradient (the expected update is grad p), a rare correct action's probability "
          "falls while the probability of success rises.",
    setting=f"A 4-action softmax with probabilities {R_SKEWED}, actions 0 and 1 correct; the exact expected rloo "
            f"update (G = 8; its expectation is grad p exactly); control: the correct actions equally likely "
            f"{R_EVEN}, the same success.",
    predicate="Along the update, d P(rare) < 0 while d p > 0; in the control the same action's probability rises.",
    experiment=_rank,
    judge=lambda m: m["rare_rate"] < 0 < m["success_rate"],
    plot=lambda fig, out: _bars(fig, list(out.series["rates"]), list(out.series["rates"].values()), "d / d(lr)"),
    versus=lambda m: [Versus("d P(rare correct) along grad p: skewed (effect) vs even (control)", m["rare_rate"],
                             m["control_rare_rate"], m["rare_rate"] < 0 < m["control_rare_rate"])],
)

# ---------------------------------------------------------------------------------------------
# TRL's loss types: which carry the 1/|o| bias
# ---------------------------------------------------------------------------------------------

T_PER_SEQUENCE = {"grpo", "sapo", "gspo"}  # 1/|o_i|: TRL 1.16.0 grpo_trainer.py, per-sequence mean
T_GROUP_TOTAL = {"bnpo", "dapo", "cispo", "vespo"}  # 1/sum_j |o_j|: the token mean over the batch


def _spread(loss: str, g: int) -> float:
    """(max - min)/max over lengths n of |c(0, n)|, the expected weight of a wrong response of length n."""
    fam, params, reward = _chain()
    law = np.asarray(gr.joint_law(fam, params, reward, 64)[0])
    coef = np.abs(gr.coefficients(loss, law, g)[0, 1:41])
    return float((coef.max() - coef.min()) / coef.max())


def _trl(quick: bool) -> Outcome:
    from gradlab.experiments.groups import _weight_parts
    from gradlab.group_losses import GROUP_LOSSES

    parts = {name: _weight_parts(loss, None) for name, loss in GROUP_LOSSES.items()}
    per_seq = {n for n, (reads_len, _, _) in parts.items() if reads_len}
    total = {n for n, (_, reads_sum, _) in parts.items() if reads_sum}
    m = {"per_sequence": sorted(per_seq), "group_total": sorted(total),
         "sets_match": per_seq == T_PER_SEQUENCE and total == T_GROUP_TOTAL,
         "dapo_spread_g4": _spread("dapo", 4), "dapo_spread_g64": _spread("dapo", 64),
         "grpo_spread_g4": _spread("grpo", 4), "grpo_spread_g64": _spread("grpo", 64)}
    return Outcome(m, {"spread": {k: m[k] for k in m if "spread" in k}})


TRL_EQUIVALENCES = Entry(
    name="trl_length_bias_table",
    title="TRL's loss types: 1/|o| bias, and bias that fades with the batch",
    source="TRL 1.16.0 trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss (the loss_type branches, as "
           "transcribed in gradlab.group_losses); Dr. GRPO arXiv:2503.20783 for the bias. Read: the TRL source",
    claim="grpo, sapo and gspo divide each response by its own length (the 1/|o| bias); bnpo, dapo, cispo and vespo "
          "divide by the group's token count, whose length dependence fades as the group (batch) grows; dr_grpo, "
          "luspo and rloo have none.",
    setting="The first-step weights of every registered loss (sympy: which length they read); the expected weight "
            "c(wrong, n) of a wrong response of length n = 1..40 on the bigram chain at G = 4 and 64.",
    predicate="The losses reading |o_i| are exactly {grpo, sapo, gspo} and those reading sum_j |o_j| exactly "
              "{bnpo, dapo, cispo, vespo}; dapo's spread of c over n shrinks by more than 4x from G = 4 to 64, "
              "where grpo's (the control) shrinks by less than 2x.",
    experiment=_trl,
    judge=lambda m: bool(m["sets_match"]),
    plot=lambda fig, out: _bars(fig, list(out.series["spread"]), list(out.series["spread"].values()),
                                "spread of c(wrong, n) over n"),
    versus=lambda m: [Versus("spread shrink G=4 -> 64: dapo (effect) vs grpo (control)",
                             m["dapo_spread_g4"] / m["dapo_spread_g64"], m["grpo_spread_g4"] / m["grpo_spread_g64"],
                             m["dapo_spread_g4"] / m["dapo_spread_g64"] > 4
                             and m["grpo_spread_g4"] / m["grpo_spread_g64"] < 2)],
)

# ---------------------------------------------------------------------------------------------
# Negative rewards lengthen responses under a per-token average
# ---------------------------------------------------------------------------------------------


def _negative_rate(per_token: bool) -> float:
    """d E[|o|]/d(lr) under REINFORCE with reward -1 on every response, per-token averaged or summed."""
    fam, params, reward = _chain()
    n = gr.horizon(fam, params)
    span = np.arange(n + 1, dtype=float)
    span[0] = 1.0
    f = -1.0 / span if per_token else -np.ones(n + 1)  # the weight r f(|o|) of log pi(o), r = -1
    coef = jnp.asarray(np.stack([f, f]))
    grad = jax.grad(lambda th: -jnp.sum(coef * gr.joint_law(fam, th, reward, n)[0]))(params)
    return float(_rates(fam, params, reward, grad)[2])


def _negative(quick: bool) -> Outcome:
    m = {"per_token_mean_rate": _negative_rate(True), "token_sum_rate": _negative_rate(False)}
    return Outcome(m, {"rates": m})


NEGATIVE = Entry(
    name="negative_rewards_lengthen",
    title="Negative rewards lengthen responses under a per-token average",
    source="Fatemi et al. 2025, 'Concise Reasoning via Reinforcement Learning', arXiv:2504.05185 (with negative "
           "rewards a per-token normalised loss favours longer responses). Not read in the primary document in this "
           "session: the claim as the issue states it",
    claim="When every sampled response is penalised (reward -1), a loss averaged over each response's tokens "
          "penalises long responses less per token, so the expected update lengthens responses; summed over tokens "
          "it does not.",
    setting="The bigram chain; REINFORCE with reward -1 on every response, weight -1/|o| per token (per-token mean) "
            "or -1 (token sum, the control); the rate d E[|o|]/d(lr) of the exact expected update.",
    predicate="The per-token mean's rate is positive; the token sum's is zero (below 1e-9 times it in magnitude).",
    experiment=_negative,
    judge=lambda m: m["per_token_mean_rate"] > 0,
    plot=lambda fig, out: _bars(fig, list(out.series["rates"]), list(out.series["rates"].values()), "d E[|o|] / d(lr)"),
    versus=lambda m: [Versus("d E[|o|]: per-token mean (effect) vs token sum (control)", m["per_token_mean_rate"],
                             m["token_sum_rate"], m["per_token_mean_rate"] > 0
                             and abs(m["token_sum_rate"]) <= ZERO * m["per_token_mean_rate"])],
)

# ---------------------------------------------------------------------------------------------
# Positive and negative sample reinforcement
# ---------------------------------------------------------------------------------------------


def _psr_nsr(per_token: bool) -> float:
    """|g_PSR - g_NSR| / |g_PSR|: +1 on right responses only, against -1 on wrong ones only."""
    fam, params, reward = _chain()
    n = gr.horizon(fam, params)
    span = np.arange(n + 1, dtype=float)
    span[0] = 1.0
    f = 1.0 / span if per_token else np.ones(n + 1)
    grads = []
    for coef in (np.stack([0 * f, f]), np.stack([-f, 0 * f])):
        g = jax.grad(lambda th, k=jnp.asarray(coef): -jnp.sum(k * gr.joint_law(fam, th, reward, n)[0]))(params)
        grads.append(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)]))
    return float(np.linalg.norm(grads[0] - grads[1]) / np.linalg.norm(grads[0]))


def _psr(quick: bool) -> Outcome:
    m = {"token_sum_difference": _psr_nsr(False), "per_token_mean_difference": _psr_nsr(True)}
    return Outcome(m, {"differences": m})


PSR_NSR = Entry(
    name="psr_nsr_same_update",
    title="Reinforcing right answers only and penalising wrong ones only: one expected update",
    source="Zhu et al. 2025, 'The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning', "
           "arXiv:2506.01347 (RLVR's signal split into positive and negative sample reinforcement, PSR and NSR). "
           "Read: the abstract. The exact-gradient identity is the issue's statement: with binary rewards "
           "E[1{r=1} grad log pi] = grad p = -E[1{r=0} grad log pi]; the paper's differences in pass@k then come "
           "from finite samples and normalisation, not from the expected update",
    claim="With binary rewards and token-summed log-probabilities, PSR (+1 on correct responses only) and NSR (-1 "
          "on incorrect responses only) have the same expected gradient, grad p.",
    setting="The bigram chain; the exact expected gradients of PSR and NSR, token-summed, and (the control) "
            "averaged over each response's tokens.",
    predicate="The token-summed PSR and NSR gradients agree to 1e-10 (relative); the per-token-averaged ones differ "
              "by more than 1%.",
    experiment=_psr,
    judge=lambda m: m["token_sum_difference"] < 1e-10,
    plot=lambda fig, out: _bars(fig, list(out.series["differences"]), list(out.series["differences"].values()),
                                "|g_PSR - g_NSR| / |g_PSR|"),
    versus=lambda m: [Versus("|g_PSR - g_NSR| / |g_PSR|: token sum (effect) vs per-token mean (control)",
                             m["token_sum_difference"], m["per_token_mean_difference"],
                             m["token_sum_difference"] < 1e-10 < 0.01 < m["per_token_mean_difference"])],
)
