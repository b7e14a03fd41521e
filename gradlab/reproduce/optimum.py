"""Closed-form optima reached by training: DPO's pi_0 exp(r/beta)/Z, the posts' tempering
equivalence, and H-DPO's entropy control.

Setting shared by the three entries: one context with K = 6 actions (a softmax over free
logits), the reference pi_0 = softmax of seeded normal logits, a seeded normal reward r, and the
population objective: every ordered pair drawn from pi_0 and labelled with Bradley-Terry soft
labels sigma(r_i - r_j). With full support the population minimiser is unique (up to the
softmax's shift), so the closed form is the only place training can end. Plain gradient descent
uses the step 1/lambda_max of the objective's Hessian at the start (the classical stable step),
not a step tuned to the result. Every run is an experiment (:func:`experiment_config`: the
``population`` data of the experiment schema) trained by :mod:`gradlab.experiments`.
"""

from __future__ import annotations

import numpy as np

from gradlab.reproduce import Entry, Outcome
from gradlab.reproduce import _common as c

K = 6
REF_SEED, REWARD_SEED = 0, 1
STEPS = 2000
ADAM_STEPS = 8000  # Adam is run longer: it reaches the optimum, then can leave it (reported, not judged)
ADAM_LR = 0.05
TV_TOL = 1e-8  # "reached": total variation to the closed form below 1e-8 (float64 has ~1e-16)


def _setting():
    ref_logits = c.seeded(REF_SEED, (K,))
    reward = c.seeded(REWARD_SEED, (K,))
    log_ref = np.log(c.softmax(ref_logits))
    return ref_logits, reward, log_ref


def experiment_config(loss: str, values: dict, lr: float, *, optimizer: str = "sgd", steps: int | None = None,
                      temperature: float = 1.0) -> dict:
    """One run of these entries as an experiment dict for :func:`gradlab.experiments.run`: a
    K-action softmax starting at its reference pi_0 (seeded logits, tempered by ``temperature``
    in the loss only), population data from pi_0 with the seeded reward, 100 records."""
    ref_logits, reward, _ = _setting()
    steps = STEPS if steps is None else steps
    return {
        "policy": {"family": "softmax", "vocab": K, "init": "reference"},
        "reference": {"params": {"logits": ref_logits.tolist()}, "temperature": temperature},
        "data": {"kind": "population", "reward": reward.tolist()},
        "loss": {"name": loss, **values},
        "train": {"optimizer": optimizer, "lr": lr, "steps": steps, "seeds": 1, "record_every": max(1, steps // 100),
                  "metrics": ["probabilities"]},
    }


def gd_step(loss: str, values: dict, *, temperature: float = 1.0) -> float:
    """Plain gradient descent's step: 1/lambda_max of the population objective's Hessian at the
    start (the reference)."""
    import jax.numpy as jnp

    ref_logits, reward, _ = _setting()
    objective = c.softmax_objective(c.loss_function(loss, values), ref_logits, *c.population_pairs(ref_logits, reward),
                                    temperature=temperature)
    return c.stable_step(objective, jnp.asarray(ref_logits))


def _train(runs: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(recorded steps, probabilities (records, K))`` of each experiment dict, run together by
    the experiment runner (runs of one structure share a compiled program)."""
    from gradlab.experiments.runner import run_many

    return [(np.asarray(r.runs[0].steps), r.series("probabilities")[0]) for r in run_many(runs)]


# ---------------------------------------------------------------------------------------------
# DPO's optimum
# ---------------------------------------------------------------------------------------------

DPO_BETAS = (0.1, 0.5)


def _dpo_optimum(quick: bool) -> Outcome:
    _, reward, log_ref = _setting()
    lrs = {beta: gd_step("dpo", {"beta": beta}) for beta in DPO_BETAS}
    runs = _train([experiment_config("dpo", {"beta": beta}, lrs[beta]) for beta in DPO_BETAS]
                  + [experiment_config("dpo", {"beta": beta}, ADAM_LR, optimizer="adam", steps=ADAM_STEPS)
                     for beta in DPO_BETAS])
    measured, series = {}, {}
    for k, beta in enumerate(DPO_BETAS):
        star = c.closed_form(log_ref + reward / beta)
        (at, probs), (adam_at, adam_probs) = runs[k], runs[len(DPO_BETAS) + k]
        adam_tv = [c.tv(p, star) for p in adam_probs]
        measured[f"tv_gd_beta_{beta:g}"] = c.tv(probs[-1], star)
        # Adam's exact distance in its epsilon regime is rounding-driven chaos (it differs between
        # machines); whether it stays at the optimum is robust, and the figure shows the curve
        measured[f"adam_within_tol_over_second_half_beta_{beta:g}"] = max(adam_tv[len(adam_tv) // 2:]) < TV_TOL
        measured[f"gd_lr_beta_{beta:g}"] = lrs[beta]
        series[beta] = {"at": at, "gd": [c.tv(p, star) for p in probs], "adam_at": adam_at,
                        "adam": adam_tv, "star": star, "final": probs[-1]}
    measured["steps"] = int(at[-1])
    return Outcome(measured, {"runs": series, "ref": np.exp(log_ref)})


def _judge_dpo_optimum(m) -> bool:
    return all(m[f"tv_gd_beta_{b:g}"] < TV_TOL for b in DPO_BETAS)


def _plot_dpo_optimum(fig, out: Outcome) -> None:
    left, right = fig.subplots(1, 2)
    runs = out.series["runs"]
    for i, (beta, s) in enumerate(runs.items()):
        right.semilogy(s["at"], np.maximum(s["gd"], 1e-17), color=f"C{i}", label=f"GD, beta={beta:g}")
        right.semilogy(s["adam_at"], np.maximum(s["adam"], 1e-17), color=f"C{i}", ls="--", lw=0.8,
                       label=f"Adam, beta={beta:g}")
    right.axhline(TV_TOL, color="k", lw=0.6, ls=":")
    right.set(xlabel="step", ylabel="TV(pi_theta, pi*)")
    right.legend()
    beta = DPO_BETAS[-1]
    x = np.arange(K)
    left.bar(x - 0.3, out.series["ref"], 0.3, label="pi_0", color="0.6")
    left.bar(x, runs[beta]["star"], 0.3, label=f"pi* (closed form, beta={beta:g})", color="C1")
    left.bar(x + 0.3, runs[beta]["final"], 0.3, label="GD, final", color="C0")
    left.set(xlabel="action", ylabel="probability")
    left.legend()


DPO_OPTIMUM = Entry(
    name="dpo_optimum",
    title="DPO's optimum pi_0 exp(r/beta)/Z",
    source="Rafailov et al. 2023, arXiv:2305.18290, Eq. 4 (optimum of the KL-regularised objective) and "
           "Sec. 5 / Eq. 7 (DPO's loss is minimised by it under Bradley-Terry preferences)",
    claim="Under Bradley-Terry preferences with full data support, minimising the DPO loss gives the "
          "policy pi_0(y) exp(r(y)/beta) / Z, the optimum of the KL-regularised reward objective.",
    setting=f"One context, K={K} actions, free logits starting at the reference; pi_0 and r seeded normal; "
            f"population DPO loss over every ordered pair with soft labels sigma(r_i - r_j); plain gradient "
            f"descent ({STEPS} steps, step 1/lambda_max of the Hessian at the start), beta in {DPO_BETAS}. "
            f"Adam (lr {ADAM_LR}, {ADAM_STEPS} steps) is reported beside it, not judged: whether it stays within the "
            f"tolerance over the second half of its run.",
    predicate=f"Gradient descent ends within total variation {TV_TOL:g} of pi_0 exp(r/beta)/Z for every beta.",
    experiment=_dpo_optimum,
    judge=_judge_dpo_optimum,
    plot=_plot_dpo_optimum,
)

# ---------------------------------------------------------------------------------------------
# Tempering the reference == rescaling gamma (docs/background.md)
# ---------------------------------------------------------------------------------------------

T_BETA, T_GAMMA, TAU = 0.5, 0.5, 2.0
SAME_TOL = 1e-12  # the two objectives are the same function: trajectories agree to rounding


def _tempering(quick: bool) -> Outcome:
    from gradlab.experiments.analysis import entropy

    _, reward, log_ref = _setting()
    # the pairs are drawn from pi_0 in both runs; only the loss's reference changes:
    # (a) gamma with the reference pi_0^(1/tau)/Z, (b) gamma/tau with pi_0
    tempered = {"beta": T_BETA, "gamma": T_GAMMA}, TAU
    rescaled = {"beta": T_BETA, "gamma": T_GAMMA / TAU}, 1.0
    (at, pt), (_, pr) = _train([experiment_config("gdpo", values, gd_step("gdpo", values, temperature=tau),
                                                  temperature=tau) for values, tau in (tempered, rescaled)])
    star = c.closed_form((T_GAMMA / (TAU * T_BETA)) * log_ref + reward / T_BETA)
    measured = {
        "max_trajectory_difference": float(np.abs(pt - pr).max()),
        "tv_tempered_to_closed_form": c.tv(pt[-1], star),
        "tv_rescaled_to_closed_form": c.tv(pr[-1], star),
        "entropy_final": entropy(pt[-1]),
        "entropy_pi0": entropy(np.exp(log_ref)),
    }
    series = {"at": at, "H_t": [entropy(p) for p in pt], "H_r": [entropy(p) for p in pr], "star": entropy(star)}
    return Outcome(measured, series)


def _judge_tempering(m) -> bool:
    return (m["max_trajectory_difference"] < SAME_TOL and m["tv_tempered_to_closed_form"] < TV_TOL
            and m["tv_rescaled_to_closed_form"] < TV_TOL)


def _plot_tempering(fig, out: Outcome) -> None:
    ax = fig.subplots()
    s = out.series
    ax.plot(s["at"], s["H_t"], color="C0", lw=2.5, label=f"reference tempered, tau={TAU:g}, gamma={T_GAMMA:g}")
    ax.plot(s["at"], s["H_r"], color="C1", ls="--", label=f"gamma -> gamma/tau = {T_GAMMA / TAU:g}")
    ax.axhline(s["star"], color="k", lw=0.6, ls=":", label="entropy of pi_0^(gamma/beta) exp(r/beta)/Z")
    ax.set(xlabel="step (gradient descent)", ylabel="entropy (nats)")
    ax.legend()


TEMPERING = Entry(
    name="tempering_is_gamma",
    title="Tempering pi_0 = rescaling gamma",
    source="Cho 2024, 'Continued musing on DPO' (second post, docs/background.md): the two-coefficient "
           "loss and its optimum pi_0^(gamma/beta) exp(r/beta)/Z",
    claim="In the two-coefficient loss, replacing the reference by its tempered version pi_0^(1/tau)/Z is "
          "the same as replacing gamma by gamma/tau; training reaches pi_0^(gamma/beta) exp(r/beta)/Z.",
    setting=f"As dpo_optimum (K={K}, population pairs from pi_0, soft labels), loss gdpo with beta={T_BETA:g}; "
            f"run (a): gamma={T_GAMMA:g} and the reference pi_0^(1/{TAU:g})/Z; run (b): gamma={T_GAMMA / TAU:g} "
            f"and pi_0. Plain gradient descent, {STEPS} steps, step 1/lambda_max at the start.",
    predicate=f"The two runs' probabilities agree at every recorded step to {SAME_TOL:g}, and both end within "
              f"total variation {TV_TOL:g} of pi_0^(gamma/(tau beta)) exp(r/beta)/Z.",
    experiment=_tempering,
    judge=_judge_tempering,
    plot=_plot_tempering,
)

# ---------------------------------------------------------------------------------------------
# H-DPO: entropy of the optimum against alpha
# ---------------------------------------------------------------------------------------------

H_BETA = 0.5
ALPHAS = (0.5, 0.75, 1.0, 1.25, 1.5)


def _h_dpo(quick: bool) -> Outcome:
    from gradlab.experiments.analysis import entropy

    _, reward, log_ref = _setting()
    values = [{"beta": H_BETA, "hdpo_alpha": a} for a in ALPHAS]
    runs = _train([experiment_config("h_dpo", v, gd_step("h_dpo", v)) for v in values])
    trained, closed, tvs = [], [], []
    for a, (_, probs) in zip(ALPHAS, runs, strict=True):
        star = c.closed_form((log_ref + reward / H_BETA) / a)
        trained.append(entropy(probs[-1]))
        closed.append(entropy(star))
        tvs.append(c.tv(probs[-1], star))
    measured = {"alphas": list(ALPHAS), "entropy_trained": trained, "entropy_closed_form": closed,
                "tv_to_closed_form": tvs, "entropy_pi0": entropy(np.exp(log_ref))}
    return Outcome(measured, {})


def _judge_h_dpo(m) -> bool:
    h = m["entropy_trained"]
    one = ALPHAS.index(1.0)
    increasing = all(b > a for a, b in zip(h, h[1:], strict=False))
    return increasing and h[0] < h[one] < h[-1] and max(m["tv_to_closed_form"]) < TV_TOL


def _plot_h_dpo(fig, out: Outcome) -> None:
    ax = fig.subplots()
    m = out.measured
    ax.plot(m["alphas"], m["entropy_closed_form"], color="C1", label="closed form (pi_0 exp(r/beta))^(1/alpha)/Z")
    ax.plot(m["alphas"], m["entropy_trained"], "o", color="C0", label="h_dpo trained by gradient descent")
    ax.axvline(1.0, color="0.5", lw=0.6, ls=":")
    ax.set(xlabel="H-DPO alpha", ylabel="entropy of the optimum (nats)")
    ax.legend()


H_DPO = Entry(
    name="h_dpo_entropy",
    title="H-DPO: entropy of the optimum against alpha",
    source="Omura et al. 2024, arXiv:2411.07595, Sec. 3 (the H-DPO objective and loss: alpha < 1 sharpens, "
           "alpha > 1 flattens the optimum)",
    claim="H-DPO's alpha controls the entropy of the optimum: it is (pi_0 exp(r/beta))^(1/alpha)/Z, so "
          "alpha < 1 gives lower entropy than DPO (alpha = 1) and alpha > 1 higher.",
    setting=f"As dpo_optimum (K={K}, population pairs from pi_0, soft labels), loss h_dpo with beta={H_BETA:g}, "
            f"alpha in {ALPHAS}; plain gradient descent, {STEPS} steps, step 1/lambda_max at the start.",
    predicate=f"The trained policy's entropy increases strictly with alpha, is below DPO's for alpha < 1 and "
              f"above for alpha > 1, and each trained policy is within total variation {TV_TOL:g} of the "
              f"closed form.",
    experiment=_h_dpo,
    judge=_judge_h_dpo,
    plot=_plot_h_dpo,
)
