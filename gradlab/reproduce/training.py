"""Training claims on sequence policies: the posts' length pathology and the first post's proper
loss, both run by the experiment runner on the named settings of :mod:`gradlab.experiments.named`
(experiment files ``experiments/length_pathology_{sgd,adam}.toml`` and
``experiments/proper_loss.toml``), the same computations the ``length_drift``, ``scorecard`` and
``proper_loss`` figures draw.

The length pathology uses an exact, unbounded unigram + EOS policy: every token, EOS included,
is drawn i.i.d. from softmax(theta), so the expected length (EOS counted) is exactly
1 / pi(EOS), the mean of a geometric law; nothing is truncated. The proper loss uses a forced
stop (every response is finished and enumerated: no mass is dropped); this module keeps its own
exact log-probabilities only to check, independently of the runner, that no mass leaks and that
the pdpo closed form's product-rule gradient equals autodiff.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlab.reproduce import Entry, Measured, Outcome, Versus
from gradlab.reproduce import _common as c

GROWTH = 1.10  # the posts' claim for DPO: the expected length grows, here by more than 10%
LOSSES = ("dpo", "sigmoid_norm", "simpo", "ld_dpo")
QUICK_STEPS = 150


def _length_pathology(quick: bool) -> Outcome:
    """Every run is the ``length_drift`` setting of :mod:`gradlab.experiments.named` (experiment
    files ``experiments/length_pathology_{sgd,adam}.toml``), run by the experiment runner: the
    same computation as the ``length_drift`` figure and the scorecard."""
    from gradlab.experiments import named

    steps = QUICK_STEPS if quick else named.STEPS
    todo = [(opt, loss, control) for opt in named.OPTIMIZERS
            for loss, control in [*((loss, None) for loss in LOSSES), *(("dpo", c) for c in named.CONTROLS)]]
    results = named.length_drift_runs([{"loss": loss, "optimizer": opt, "control": control, "steps": steps}
                                       for opt, loss, control in todo])
    measured: Measured = {}
    series: dict[Any, Any] = {}
    for (opt, loss, control), result in zip(todo, results, strict=True):
        if control is not None:  # DPO on the control data, judged against DPO on the real data
            measured[f"{opt}_dpo_control_{control}"] = {"growth_per_seed": named.drift_factors(result).tolist()}
            continue
        el = result.series("expected_length")  # (seeds, records)
        measured[f"{opt}_{loss}"] = {"initial_expected_length": float(el[:, 0].mean()),
                                     "final_expected_length": float(el[:, -1].mean()),
                                     "growth_per_seed": named.drift_factors(result).tolist()}
        series[(opt, loss)] = (np.asarray(result.runs[0].steps), el)
    measured["steps"] = steps
    return Outcome(measured, series)


def _judge_length(m) -> bool:
    from gradlab.experiments import named

    return all(min(m[f"{opt}_dpo"]["growth_per_seed"]) > GROWTH for opt in named.OPTIMIZERS)


def _length_versus(m) -> list[Versus]:
    """Under each optimiser: DPO's median drift factor against each control's largest one."""
    from gradlab.experiments import named

    rows = []
    for opt in named.OPTIMIZERS:
        effect = float(np.median(m[f"{opt}_dpo"]["growth_per_seed"]))
        for control in named.CONTROLS:
            worst = float(max(m[f"{opt}_dpo_control_{control}"]["growth_per_seed"]))
            rows.append(Versus(f"{opt}: DPO median drift vs control '{control}' max drift", effect, worst,
                               effect > worst))
    return rows


def _plot_length(fig, out: Outcome) -> None:
    from gradlab.experiments import named

    axes = fig.subplots(1, len(named.OPTIMIZERS), sharey=True)
    for ax, opt in zip(axes, named.OPTIMIZERS, strict=True):
        for i, loss in enumerate(LOSSES):
            at, el = out.series[(opt, loss)]
            ax.plot(at, np.median(el, 0), color=f"C{i}", label=loss)
            ax.fill_between(at, el.min(0), el.max(0), color=f"C{i}", alpha=0.15, lw=0)
        ax.set(xlabel="step", title=f"{opt}, lr {named.OPTIMIZERS[opt]:g}", yscale="log")
    axes[0].set_ylabel("exact expected length (EOS counted)")
    axes[0].legend()


LENGTH_PATHOLOGY = Entry(
    name="length_pathology",
    title="The posts' length pathology on equal-length data",
    source="Cho 2024, 'Fixing DPO but I have a dinner reservation' (first post, docs/background.md): "
           "an unreasonable preference for long responses even when chosen and rejected lengths have the same "
           "statistics",
    claim="On preference data whose chosen and rejected lengths follow the same law, DPO lengthens the policy's "
          "responses. The length fixes (length-normalised DPO, SimPO, LD-DPO) are reported beside it: whether "
          "they remove the drift is measured, not assumed.",
    setting="The `length_drift` setting of gradlab.experiments.named (experiment files "
            "experiments/length_pathology_sgd.toml and _adam.toml, run by the experiment runner; the same "
            "computation as the length_drift figure and the scorecard): exact unbounded unigram + EOS policy "
            "(3 content tokens, no cut-off, expected length 1/pi(EOS)), uniform start (E[len] = 4 = the data's "
            "mean length), reference = the start; 64 equal-length pairs per seed (content lengths uniform on 1..5 "
            "for both sides, chosen favour token 1, rejected token 2), seeds 0..7; losses dpo, sigmoid_norm, simpo, "
            "ld_dpo, all at beta 0.1 (SimPO's gamma and LD-DPO's alpha 0.5 at their defaults); full-batch "
            "plain gradient descent (lr 0.5) and Adam (lr 0.05), 300 steps (tests: 150). Controls for DPO, "
            "judged, same optimiser and seeds: every response of 3 content tokens (length cannot separate any "
            "pair); no token preference (both sides from one token law).",
    predicate=f"Under SGD and under Adam: DPO's exact expected length grows by more than {GROWTH - 1:.0%} in every "
              f"seed, and DPO's median drift factor exceeds the largest drift factor of each control under the "
              f"same optimiser. (The fixes are reported, not judged.)",
    experiment=_length_pathology,
    judge=_judge_length,
    plot=_plot_length,
    shortened=True,
    versus=_length_versus,
    finding="The controls explain the drift. With every response exactly 3 content tokens, so that length "
            "separates no pair, DPO lengthens the toy as much as on the equal-length data (300 steps: SGD median "
            "x5.45 against the control's largest x7.93; Adam median x228 against x486). What lengthens this toy "
            "is the token preference (the chosen favour token 1, the rejected token 2), not a preference for "
            "length. Without a token preference the drift is small under SGD (largest x1.77), but under Adam "
            "the optimiser alone lengthens the toy (up to x94). The posts' claim is not supported on this toy.",
)

# ---------------------------------------------------------------------------------------------
# The first post's proper loss, exactly, with a forced stop (no mass left out)
# ---------------------------------------------------------------------------------------------

P_VOCAB = 3  # EOS + token 1 (reward +1) + token 2 (reward -1)
P_STOP = 4  # forced stop after 4 content tokens: such a response ends there, with no EOS factor
P_BETA = 0.1
P_REF_LOGITS = (0.0, 0.5, 0.5)  # the reference: pi(EOS) = 0.27, the two content tokens equally likely
P_STEPS, P_QUICK_STEPS = 400, 150
P_LR = 0.05  # Adam
GRAD_TOL = 1e-10
MASS_TOL = 1e-12
TOKEN_REWARD = (0.0, 1.0, -1.0)


def forced_stop_responses() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every response of 0..P_STOP content tokens: (rows of width P_STOP with -1 padding, number of
    content tokens, ends with EOS). A response of P_STOP tokens ends by the forced stop."""
    import itertools

    rows, ks = [], []
    for k in range(P_STOP + 1):
        for t in itertools.product(range(1, P_VOCAB), repeat=k):
            rows.append(list(t) + [-1] * (P_STOP - k))
            ks.append(k)
    table, lengths = np.array(rows), np.array(ks)
    return table, lengths, lengths < P_STOP


def _forced_logprobs(theta, rows, eos):
    """Exact log-probabilities under the forced stop: content tokens, plus log pi(EOS) for a
    response that ends before the stop. They sum to probability 1 over all responses."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(theta)
    content = jnp.where(rows >= 0, logp[jnp.maximum(rows, 0)], 0.0).sum(-1)
    return content + jnp.where(eos, logp[0], 0.0)


def labelled_pairs(rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ordered pair (y, y') of responses, y = y' included (the first post's sum), as
    (winner, loser, weight): the oracle prefers the higher reward; a tie is both labellings at
    weight 1/2 (no preference either way)."""
    n = len(rewards)
    i, j = (x.ravel() for x in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    win = rewards[i] > rewards[j]
    lose = rewards[i] < rewards[j]
    tie = ~(win | lose)
    w = np.concatenate([np.where(lose, j, i)[~tie], i[tie], j[tie]])
    l_ = np.concatenate([np.where(lose, i, j)[~tie], j[tie], i[tie]])
    c_ = np.concatenate([np.ones((~tie).sum()), np.full(tie.sum(), 0.5), np.full(tie.sum(), 0.5)])
    return w, l_, c_


def _proper_setting():
    import jax.numpy as jnp

    rows, ks, eos = forced_stop_responses()
    rewards = np.where(rows >= 0, np.asarray(TOKEN_REWARD)[np.maximum(rows, 0)], 0.0).sum(-1)
    w, l_, cw = labelled_pairs(rewards)
    return jnp.asarray(rows), jnp.asarray(eos), rewards, jnp.asarray(w), jnp.asarray(l_), jnp.asarray(cw)


def _proper_objectives():
    """(offline DPO, on-policy DPO, J_PDPO) as functions of theta, each an exact sum over pairs."""
    import jax
    import jax.numpy as jnp

    rows, eos, _r, w, l_, cw = _proper_setting()
    dpo = c.loss_function("dpo", {"beta": P_BETA})
    ref = _forced_logprobs(jnp.asarray(P_REF_LOGITS), rows, eos)

    def pair_losses(lp):
        return dpo(lp[w], lp[l_], ref[w], ref[l_])

    def offline(theta):  # J_0: pairs drawn from the reference
        return (cw * jnp.exp(ref[w] + ref[l_]) * pair_losses(_forced_logprobs(theta, rows, eos))).sum()

    def on_policy(theta):  # pairs drawn from the current policy, weights not differentiated (DPO's gradient)
        lp = _forced_logprobs(theta, rows, eos)
        weight = jax.lax.stop_gradient(jnp.exp(lp[w] + lp[l_]))
        return (cw * weight * pair_losses(lp)).sum()

    def proper(theta):  # J_PDPO = E_{y, y' ~ pi_theta}[L_dpo], weights differentiated
        lp = _forced_logprobs(theta, rows, eos)
        return (cw * jnp.exp(lp[w] + lp[l_]) * pair_losses(lp)).sum()

    return {"offline_dpo": offline, "on_policy_dpo": on_policy, "proper": proper}


def _product_rule_gradient(theta):
    """The first post's product-rule gradient, from gradlab's derived closed form of the ``pdpo``
    integrand pi(y) pi(y') L_dpo: sum over pairs of d/dlp_w grad lp_w + d/dlp_l grad lp_l."""
    import jax
    import jax.numpy as jnp

    from gradlab import symbolic
    from gradlab.losses import get_loss

    rows, eos, _r, w, l_, cw = _proper_setting()
    loss = get_loss("pdpo")
    params = symbolic.parameter_values(loss, {"beta": P_BETA})
    args = ["lp_w", "lp_l", "ref_w", "ref_l"]
    d_w, d_l = (symbolic.numeric(symbolic.derivative(loss, v).xreplace(params), args, "jax") for v in ("lp_w", "lp_l"))

    @jax.jit
    def gradient(theta):
        ref = _forced_logprobs(jnp.asarray(P_REF_LOGITS), rows, eos)
        lp = _forced_logprobs(theta, rows, eos)
        jac = jax.jacobian(_forced_logprobs)(theta, rows, eos)  # (responses, vocab)
        a = cw * d_w(lp[w], lp[l_], ref[w], ref[l_])
        b = cw * d_l(lp[w], lp[l_], ref[w], ref[l_])
        terms = a[:, None] * jac[w] + b[:, None] * jac[l_]
        # the error scale of a sum is the size of its terms: near a stationary point the sum
        # itself is ~0 and a comparison relative to it would measure rounding
        return terms.sum(0), jnp.abs(terms).sum(0).max()

    return gradient(theta)


def _proper_loss(quick: bool) -> Outcome:
    import jax
    import jax.numpy as jnp

    from gradlab.experiments import named

    steps = P_QUICK_STEPS if quick else P_STEPS
    rows, eos, rewards, *_ = _proper_setting()
    objectives = _proper_objectives()
    logprobs = jax.jit(lambda theta: _forced_logprobs(theta, rows, eos))
    j_pdpo = jax.jit(objectives["proper"])

    def metrics(theta):
        p = np.exp(np.asarray(logprobs(jnp.asarray(theta))))
        return {"total_mass": float(p.sum()), "expected_reward": float(p @ rewards),
                "stopped_by_cutoff": float(p[~np.asarray(eos)].sum()),
                "J_pdpo": float(j_pdpo(jnp.asarray(theta)))}

    measured: Measured = {}
    series: dict[Any, Any] = {}
    for name in named.PROPER_RUNS:  # trained by the runner; measured here by this module's own toy
        run = named.proper_loss(name, steps=steps).runs[0]
        path = np.asarray(run.metrics["params.theta"])
        m = [metrics(t) for t in path]
        runner_reward = np.asarray(run.metrics["expected_reward"], dtype=float)
        measured[name] = {"initial": m[0], "final": m[-1],
                          "max_mass_error": float(max(abs(x["total_mass"] - 1.0) for x in m)),
                          "runner_reward_max_difference": float(np.abs(runner_reward - [x["expected_reward"]
                                                                                        for x in m]).max())}
        series[name] = (np.asarray(run.steps), m)
    exact = jax.grad(objectives["proper"])
    errs = []
    for theta in (path[0], path[len(path) // 2], path[-1]):  # path: the proper run
        g = np.asarray(exact(jnp.asarray(theta)))
        pr, scale = _product_rule_gradient(jnp.asarray(theta))
        errs.append(float(np.abs(g - np.asarray(pr)).max() / float(scale)))
    measured["product_rule_max_relative_error"] = max(errs)
    measured["steps"] = steps
    return Outcome(measured, series)


def _judge_proper(m) -> bool:
    p = m["proper"]
    no_leak = all(m[k]["max_mass_error"] < MASS_TOL for k in ("offline_dpo", "on_policy_dpo", "proper"))
    return (no_leak and m["product_rule_max_relative_error"] < GRAD_TOL
            and p["final"]["expected_reward"] > p["initial"]["expected_reward"]
            and p["final"]["J_pdpo"] < p["initial"]["J_pdpo"])


def _plot_proper(fig, out: Outcome) -> None:
    left, right = fig.subplots(1, 2)
    for i, (name, (at, m)) in enumerate(out.series.items()):
        left.plot(at, [x["expected_reward"] for x in m], color=f"C{i}", label=name)
        right.plot(at, [x["J_pdpo"] for x in m], color=f"C{i}", label=name)
    left.set(xlabel="step (Adam)", ylabel="expected oracle reward")
    right.set(xlabel="step (Adam)", ylabel="J_PDPO (exact)")
    left.legend()


PROPER_LOSS = Entry(
    name="proper_loss",
    title="The proper loss against offline and on-policy DPO",
    source="Cho 2024, 'Fixing DPO but I have a dinner reservation' (first post, docs/background.md): "
           "J_PDPO = E_{y,y'~p_theta}[L_dpo] and its product-rule gradient",
    claim="The proper loss draws both responses from the policy being trained and lets an oracle label them; its "
          "gradient is sum p(y)p(y')[grad L + L (grad log p(y) + grad log p(y'))], of which DPO keeps only the first "
          "term. Minimising it moves the policy towards responses the oracle prefers.",
    setting=f"Unigram + EOS policy with a forced stop after {P_STOP} content tokens (a response that reaches it ends "
            f"there, as with max_new_tokens: every response is finished and all {2 ** (P_STOP + 1) - 1} of them are "
            f"enumerated, so no mass is left out); vocabulary {P_VOCAB}, token rewards {TOKEN_REWARD} (a response's "
            f"reward is the sum); every ordered pair labelled by the oracle (ties: both labellings at 1/2); dpo "
            f"integrand, beta={P_BETA}; reference logits {P_REF_LOGITS}; offline DPO (pairs from pi_0), on-policy "
            f"DPO (pairs from pi_theta, weights not differentiated) and J_PDPO trained by the experiment runner "
            f"(the proper_loss setting of gradlab.experiments.named, experiments/proper_loss.toml) with Adam "
            f"(lr {P_LR}), "
            f"{P_STEPS} steps (tests: {P_QUICK_STEPS}).",
    predicate=f"Total probability stays 1 to {MASS_TOL:g} in every run (no leak); the product-rule gradient from "
              f"gradlab's pdpo closed form equals autodiff of the exact J_PDPO to {GRAD_TOL:g} relative to the "
              f"size of the summed per-pair terms "
              f"(at the start, midway and at the end); training on "
              f"J_PDPO lowers J_PDPO and raises the expected oracle reward.",
    experiment=_proper_loss,
    judge=_judge_proper,
    plot=_plot_proper,
    shortened=True,
)
