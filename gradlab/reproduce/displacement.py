"""Likelihood displacement, squeezing and gradient entanglement: what one small gradient step of
a preference loss does to the chosen and rejected log-probabilities on shared-parameter toys.

Every step is gradient descent through gradlab's loss (``gradlab.numeric`` of the registered
sympy expression, composed with the toy's log-probabilities by JAX), with the reference equal to
the policy before the step. "Small" means a step of ``ETA``: the predicates are first-order
statements, and at this step the second-order term is about ETA times smaller than the first.

Razin et al.'s model, its draws and its batch trainer live with the ``displacement`` figure
(:mod:`gradlab.figures.displacement`); the longer trace of one draw runs through
:func:`gradlab.experiments.run` (:func:`razin_config`).
"""

from __future__ import annotations

import numpy as np

from gradlab.figures import displacement as razin_model
from gradlab.reproduce import Entry, Outcome, Versus
from gradlab.reproduce import _common as c

BETA = razin_model.BETA
ETA = razin_model.ETA
AGREE_MIN = 0.99  # a first-order sign condition must predict the measured sign in >= 99% of draws


def _pair_step(lp_pair, loss: str = "dpo", beta: float = BETA, eta: float = ETA):
    """``params -> params after one gradient-descent step`` of ``loss`` on one pair, where
    ``lp_pair(params) = (lp_w, lp_l)`` and the reference is the policy before the step.

    Independent of the experiment runner on purpose: the step is ``jax.grad`` of the whole
    composition (a cross-check of the runner's closed-form partials pulled back by a vjp), it can
    hold lp_w fixed (the squeezing entry's rejected term alone), and the entries judge it against
    the log-probs' parameter gradients (Gram entries), which the runner does not expose."""
    import jax

    f = c.loss_function(loss, {"beta": beta})

    def step(params):
        ref_w, ref_l = jax.lax.stop_gradient(lp_pair(params))

        def objective(p):
            lp_w, lp_l = lp_pair(p)
            return f(lp_w, lp_l, ref_w, ref_l)

        g = jax.grad(objective)(params)
        return jax.tree_util.tree_map(lambda p, d: p - eta * d, params, g)

    return step


# ---------------------------------------------------------------------------------------------
# Razin et al.: the embedding condition on the hidden-state model
# ---------------------------------------------------------------------------------------------

# The model, its draws and its batch trainer live with the figure that draws them (the
# ``displacement`` figure); this entry judges them and trains one draw through the runner.
R_VOCAB, R_DIM, R_DRAWS, R_SEED = razin_model.VOCAB, razin_model.DIM, razin_model.DRAWS, razin_model.SEED
R_QUICK_DRAWS = 300
R_TRAIN_STEPS, R_TRAIN_LR = razin_model.STEPS, razin_model.LR


def _razin(quick: bool) -> Outcome:
    n = R_QUICK_DRAWS if quick else R_DRAWS
    draws = razin_model.razin_draws(n)
    W, h, zp, zm, d_w, ches, thr = (draws[k] for k in ("W", "h", "zp", "zm", "d_w", "ches", "thr"))
    c_w, c_ches, c_thr = draws["control_d_w"], draws["control_ches"], draws["control_thr"]
    predicted = ches > thr  # the condition says: the chosen's log-prob falls
    displaced = d_w < 0
    q1, q3 = np.quantile(ches, [0.25, 0.75])
    measured = {
        "draws": n,
        "fraction_displaced": float(displaced.mean()),
        "condition_agrees_with_measured_sign": float((predicted == displaced).mean()),
        "displaced_rate_top_quartile_ches": float(displaced[ches >= q3].mean()),
        "displaced_rate_bottom_quartile_ches": float(displaced[ches <= q1].mean()),
        "control_fraction_displaced": float((c_w < 0).mean()),
        "control_fraction_condition_holds": float((c_ches > c_thr).mean()),
    }
    series = {"ches": ches, "thr": thr, "d_w": d_w}
    i = int(np.argmax(displaced))  # one displaced draw (the first), trained for longer, for the figure
    series["trace"] = _razin_trace(W[i], h[i], int(zp[i]), int(zm[i]))
    return Outcome(measured, series)


def razin_config(W: np.ndarray, h: np.ndarray, zp: int, zm: int, *, steps: int = R_TRAIN_STEPS, lr: float = R_TRAIN_LR,
                 every: int = 5) -> dict:
    """One draw of the Razin model trained for longer, as an experiment dict for
    :func:`gradlab.experiments.run`: a single-context ``hidden_state`` with the draw's fixed W and
    starting h, the one pair (y+, y-), dpo at beta ``BETA`` with the reference at the start, plain
    gradient descent on h, lp(y+) and lp(y-) recorded every ``every`` steps."""
    W = np.asarray(W)
    return {
        "policy": {"family": "hidden_state", "context": "single", "vocab": W.shape[0], "dim": W.shape[1],
                   "W": W.tolist(), "init": {"h": [np.asarray(h).tolist()]}},
        "reference": {"params": "policy"},
        "data": {"kind": "pairs", "chosen": [int(zp)], "rejected": [int(zm)]},
        "loss": {"name": "dpo", "beta": BETA},
        "train": {"optimizer": "sgd", "lr": lr, "steps": steps, "seeds": 1, "record_every": every,
                  "metrics": ["lp_w", "lp_l"]},
    }


def _razin_trace(W, h, zp, zm):
    from gradlab.experiments import run

    result = run(razin_config(W, h, zp, zm))
    return np.asarray(result.runs[0].steps), result.series("lp_w")[0, :, 0], result.series("lp_l")[0, :, 0]


def _razin_versus(m) -> list[Versus]:
    return [Versus("fraction of draws whose chosen log-prob falls (control W = identity: none may)",
                   m["fraction_displaced"], m["control_fraction_displaced"],
                   m["fraction_displaced"] > 0 and m["control_fraction_displaced"] == 0.0)]


def _judge_razin(m) -> bool:
    return (m["condition_agrees_with_measured_sign"] >= AGREE_MIN and m["fraction_displaced"] > 0
            and m["displaced_rate_top_quartile_ches"] > m["displaced_rate_bottom_quartile_ches"]
            and m["control_fraction_displaced"] == 0.0)


def _plot_razin(fig, out: Outcome) -> None:
    left, right = fig.subplots(1, 2)
    s = out.series
    x = s["ches"] - s["thr"]
    left.scatter(x, s["d_w"] / ETA, s=3, c=np.where(s["d_w"] < 0, "C3", "C0"))
    left.axvline(0, color="k", lw=0.6)
    left.axhline(0, color="k", lw=0.6)
    left.set(xlabel="CHES - <E_pi W, W- - W+>  (> 0: condition holds)", ylabel="d lp(y+) / step")
    at, w, l_ = s["trace"]
    right.plot(at, w, color="C0", label="lp(y+) (chosen)")
    right.plot(at, l_, color="C3", label="lp(y-) (rejected)")
    right.set(xlabel="step", ylabel="log-prob", title="a draw where the condition holds")
    right.legend()


RAZIN = Entry(
    name="razin_displacement",
    title="Razin: displacement decided by the embedding condition",
    source="Razin et al. 2024, arXiv:2410.08847, Sec. 4 (Theorem 4: single-token responses, trainable hidden "
           "state, fixed token unembeddings) and Sec. 5 (the CHES score). The threshold term below is our first-order "
           "derivation in this model; we could not check it against the theorem's exact wording",
    claim="When the hidden state trains and the unembeddings stay fixed, one step of DPO lowers the preferred "
          "token's log-prob exactly when the preferred and dispreferred unembeddings are similar enough: "
          "<W+, W-> - ||W+||^2 (the token-level CHES score) exceeds <E_pi[W], W- - W+>. Higher CHES, more "
          "displacement. Control: with orthonormal unembeddings the condition never holds and nothing is "
          "displaced.",
    setting=f"Vocabulary {R_VOCAB}, hidden size {R_DIM}; W and h seeded normal, (y+, y-) random distinct tokens; "
            f"dpo, beta={BETA}, reference = the model before the step, one gradient step of {ETA:g} on h; "
            f"{R_DRAWS} draws (tests: {R_QUICK_DRAWS}); control W = identity (d = V).",
    predicate=f"The condition predicts the sign of the change in lp(y+) in at least {AGREE_MIN:.0%} of draws, "
              f"some draws are displaced, draws in the top CHES quartile are displaced more often than in the "
              f"bottom quartile, and no control draw is displaced.",
    experiment=_razin,
    judge=_judge_razin,
    versus=_razin_versus,
    plot=_plot_razin,
    shortened=True,
)

# ---------------------------------------------------------------------------------------------
# Ren & Sutherland: the squeezing effect of a negative gradient
# ---------------------------------------------------------------------------------------------

S_VOCAB, S_DRAWS, S_SCALE, S_SEED = 50, 500, 3.0, 21


def _squeeze_draws(n: int, both: bool):
    """Single-context softmax with seeded logits; y+ and y- drawn from the actions that are not
    the most likely. ``both``: the DPO pair (y+, y-) in that one context; else the rejected term
    alone (lp_w held at its reference value). Returns (p_before, p_after, argmax, y+, y-)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(S_SEED)
    z = S_SCALE * rng.standard_normal((n, S_VOCAB))
    top = np.argmax(z, axis=1)
    pairs = np.array([rng.choice(np.delete(np.arange(S_VOCAB), t), 2, replace=False) for t in top])
    zp, zm = pairs[:, 0], pairs[:, 1]

    def one(theta, zp, zm):
        def lp_pair(t):
            lp = jax.nn.log_softmax(t)
            return (lp[zp] if both else jax.lax.stop_gradient(lp[zp])), lp[zm]

        return _pair_step(lp_pair)(theta)

    new = np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(z), jnp.asarray(zp), jnp.asarray(zm)))
    return c.softmax(z), c.softmax(new), top, zp, zm


def _squeeze(quick: bool) -> Outcome:
    gains_top, fell, peak, squeeze, others_fell = [], [], [], [], []
    for p0, p1, top, _zp, zm in zip(*_squeeze_draws(S_DRAWS, both=False), strict=True):
        d = p1 - p0
        gains_top.append(d[top] > 0)
        fell.append(d[zm] < 0)
        peak.append(p0.max())
        squeeze.append(d[top] / -d[zm])
        rest = np.delete(np.arange(S_VOCAB), [top, zm])
        others_fell.append(float((d[rest] < 0).mean()))
    peaks, shares, others = np.array(peak), np.array(squeeze), np.array(others_fell)
    peaked = peaks >= np.median(peaks)
    measured = {
        "draws": S_DRAWS,
        "fraction_rejected_falls": float(np.mean(fell)),
        "fraction_argmax_gains": float(np.mean(gains_top)),
        "median_share_of_freed_mass_to_argmax_peaked_half": float(np.median(shares[peaked])),
        "median_share_of_freed_mass_to_argmax_flat_half": float(np.median(shares[~peaked])),
        "mean_fraction_of_other_tokens_losing_mass": float(others.mean()),
    }
    return Outcome(measured, {"peak": peaks, "squeeze": shares, "others_fell": others})


def _judge_squeeze(m) -> bool:
    return (m["fraction_rejected_falls"] == 1.0 and m["fraction_argmax_gains"] == 1.0
            and m["median_share_of_freed_mass_to_argmax_peaked_half"]
            > m["median_share_of_freed_mass_to_argmax_flat_half"])


def _plot_squeeze(fig, out: Outcome) -> None:
    left, right = fig.subplots(1, 2)
    s = out.series
    left.scatter(s["peak"], s["squeeze"], s=3, color="C0")
    left.axhline(1.0, color="k", lw=0.6, ls=":")
    left.set(xlabel="max probability before the step", ylabel="argmax gain / mass freed from y-")
    right.scatter(s["peak"], s["others_fell"], s=3, color="C3")
    right.set(xlabel="max probability before the step", ylabel="fraction of other tokens losing mass")


SQUEEZE = Entry(
    name="ren_squeezing",
    title="Ren & Sutherland: the squeezing effect",
    source="Ren & Sutherland 2024, arXiv:2407.10490, Sec. 3.3 (the squeezing effect of a negative gradient on "
           "a softmax)",
    claim="A negative gradient on an unlikely response of a softmax does not spread the freed mass: it moves it to "
          "the most likely response, whose probability always rises, and more so the more peaked the softmax is.",
    setting=f"One context, {S_VOCAB} actions, logits {S_SCALE:g} x seeded normal; y- drawn among the non-argmax "
            f"actions; the rejected term of dpo (beta={BETA}) alone, one gradient step of {ETA:g} on the logits; "
            f"{S_DRAWS} draws.",
    predicate="In every draw y-'s probability falls and the argmax's rises, and the share of the freed mass that "
              "goes to the argmax is larger (median) in the more peaked half of the draws than in the flatter half.",
    experiment=_squeeze,
    judge=_judge_squeeze,
    plot=_plot_squeeze,
)

NO_SQUEEZE_TOL = 1e-12


def _no_squeeze(quick: bool) -> Outcome:
    worst, chosen_up, top_rel = 0.0, [], []
    for p0, p1, top, zp, zm in zip(*_squeeze_draws(S_DRAWS, both=True), strict=True):
        rest = np.delete(np.arange(S_VOCAB), [zp, zm])
        change = np.log(p1[rest]) - np.log(p0[rest])  # every other token scales by the same factor
        worst = max(worst, float(np.ptp(change)))
        chosen_up.append(p1[zp] > p0[zp])
        top_rel.append(float(change[np.searchsorted(rest, top)] - change.mean()))
    measured = {"draws": S_DRAWS, "max_spread_of_log_change_over_other_tokens": worst,
                "fraction_chosen_rises": float(np.mean(chosen_up))}
    return Outcome(measured, {"top_rel": np.array(top_rel)})


def _judge_no_squeeze(m) -> bool:
    return m["max_spread_of_log_change_over_other_tokens"] < NO_SQUEEZE_TOL and m["fraction_chosen_rises"] == 1.0


def _plot_no_squeeze(fig, out: Outcome) -> None:
    from gradlab.figures import style

    ax = fig.subplots()
    top_rel = out.series["top_rel"]
    noise = style.rounding_noise(top_rel)
    if noise is not None:  # a histogram of rounding errors would look like a finding
        style.say(ax, f"In all {len(top_rel)} draws the argmax's log-change equals the other tokens' mean change\n"
                      f"to within {style.number(noise, 1)}, float64 rounding: no token is squeezed, so there is "
                      "no distribution to plot.")
        return
    ax.hist(top_rel, bins=30, color="C0")
    ax.set(xlabel="argmax's log-change minus the other tokens' mean (0: no squeeze)", ylabel="draws")


NO_SQUEEZE = Entry(
    name="ren_no_squeeze_shared_context",
    title="Ren & Sutherland: no squeeze when both responses share one context",
    source="Ren & Sutherland 2024, arXiv:2407.10490, Sec. 3.3 (the positive gradient on y+ in the same context "
           "cancels the squeezing term)",
    claim="When the chosen and the rejected response are two outcomes of one softmax, the DPO step moves only "
          "their two logits: every other outcome's probability is multiplied by the same factor, so no mass is "
          "squeezed towards the most likely one, and the chosen's probability rises.",
    setting=f"As ren_squeezing ({S_VOCAB} actions, {S_DRAWS} draws), with the full DPO pair (y+, y-) in the one "
            f"context, one gradient step of {ETA:g}.",
    predicate=f"In every draw the log-change of all tokens other than y+ and y- is the same to {NO_SQUEEZE_TOL:g}, "
              f"and y+'s probability rises.",
    experiment=_no_squeeze,
    judge=_judge_no_squeeze,
    plot=_plot_no_squeeze,
)

# ---------------------------------------------------------------------------------------------
# Shared parameters across contexts: one pair can lower the chosen log-prob
# ---------------------------------------------------------------------------------------------

U_VOCAB, U_MAX_CONTENT, U_SEED = 4, 3, 5


def _responses(vocab: int, max_content: int):
    """Every response of 0..max_content content tokens (tokens 1..vocab-1), EOS-terminated,
    as (seqs, lengths) padded to max_content + 1."""
    import itertools

    rows = []
    for k in range(max_content + 1):
        rows += [list(t) for t in itertools.product(range(1, vocab), repeat=k)]
    seqs = np.zeros((len(rows), max_content + 1), dtype=np.int64)
    for i, r in enumerate(rows):
        seqs[i, : len(r)] = r
    return seqs, np.array([len(r) + 1 for r in rows])


def _pair_steps(family_name: str, loss: str, seed: int, pairs: int | None = None):
    """For ordered pairs (y_w, y_l) of distinct responses under a seeded policy (all of them, or
    ``pairs`` drawn at random): the measured change of lp_w and lp_l after one small step on that
    pair alone, and the Gram entries of the log-prob gradients. Rows:
    (d lp_w, d lp_l, ||g_w||^2, ||g_l||^2, <g_w, g_l>, dL/dlp_w, dL/dlp_l)."""
    import jax
    import jax.numpy as jnp

    from gradlab.policies import make_family

    seqs, lengths = _responses(U_VOCAB, U_MAX_CONTENT)
    fam = make_family(family_name, vocab=U_VOCAB, max_len=U_MAX_CONTENT + 1)
    params = fam.init(jax.random.PRNGKey(seed), 1.0)
    seqs_j, len_j = jnp.asarray(seqs), jnp.asarray(lengths)
    rng = np.random.default_rng(seed)
    idx = np.array([(i, j) for i in range(len(seqs)) for j in range(len(seqs)) if i != j])
    if pairs is not None and pairs < len(idx):
        idx = idx[rng.choice(len(idx), pairs, replace=False)]
    f = c.loss_function(loss, {"beta": BETA})

    def lp_pair(p, i, j):
        lp = fam.logprob(p, seqs_j[jnp.stack([i, j])], len_j[jnp.stack([i, j])])
        return lp[0], lp[1]

    def one(i, j):
        before = lp_pair(params, i, j)
        after = lp_pair(_pair_step(lambda p: lp_pair(p, i, j), loss)(params), i, j)
        g_w, g_l = (jax.flatten_util.ravel_pytree(g)[0] for g in
                    (jax.grad(lambda p: lp_pair(p, i, j)[0])(params), jax.grad(lambda p: lp_pair(p, i, j)[1])(params)))
        a, b = jax.grad(f, argnums=(0, 1))(before[0], before[1], before[0], before[1])
        return jnp.stack([after[0] - before[0], after[1] - before[1], g_w @ g_w, g_l @ g_l, g_w @ g_l, a, b])

    import jax.flatten_util  # noqa: F401  (ravel_pytree)

    return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(idx[:, 0]), jnp.asarray(idx[:, 1])))


ZERO = 1e-12  # a change (or a gap between Gram entries) below this is rounding: exactly zero


def _sign(x: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """Sign with exact ties: |x| <= ZERO * scale counts as 0. Pairs whose two responses have the
    same gradient (under a unigram policy, any two orderings of the same tokens) have a first-order
    change of exactly 0, and their measured change is rounding (about 1e-15)."""
    return np.where(np.abs(x) <= ZERO * np.asarray(scale), 0.0, np.sign(x))


def _shared_context(quick: bool) -> Outcome:
    rows = _pair_steps("unigram", "dpo", U_SEED)
    d_w, ww, wl = rows[:, 0], rows[:, 2], rows[:, 4]
    # Yuan et al.'s condition for the chosen to fall (DPO: dL/dlp_w = -dL/dlp_l < 0): <g_w, g_l> > ||g_w||^2
    predicted = _sign(wl - ww, np.maximum(ww, np.abs(wl))) > 0
    p0, p1, _top, zp, _zm = _squeeze_draws(S_DRAWS, both=True)
    rows_ = np.arange(len(zp))
    measured = {"pairs": int(len(rows)), "fraction_chosen_falls": float((d_w < 0).mean()),
                "condition_agrees_with_measured_sign": float((predicted == (d_w < 0)).mean()),
                "single_context_fraction_chosen_falls": float(np.mean(p1[rows_, zp] < p0[rows_, zp]))}
    return Outcome(measured, {"ww": ww, "wl": wl, "d_w": d_w})


def _shared_context_versus(m) -> list[Versus]:
    return [Versus("fraction of pairs whose chosen log-prob falls (control: one context, where none may)",
                   m["fraction_chosen_falls"], m["single_context_fraction_chosen_falls"],
                   m["fraction_chosen_falls"] > 0 and m["single_context_fraction_chosen_falls"] == 0.0)]


def _judge_shared_context(m) -> bool:
    return (m["fraction_chosen_falls"] > 0 and m["condition_agrees_with_measured_sign"] >= AGREE_MIN
            and m["single_context_fraction_chosen_falls"] == 0.0)


def _plot_shared_context(fig, out: Outcome) -> None:
    ax = fig.subplots()
    s = out.series
    falls = s["d_w"] < 0
    ax.scatter(s["ww"][~falls], s["wl"][~falls], s=3, color="C0", label="lp_w rises")
    ax.scatter(s["ww"][falls], s["wl"][falls], s=5, color="C3", label="lp_w falls")
    lim = [min(s["ww"].min(), s["wl"].min()), max(s["ww"].max(), s["wl"].max())]
    ax.plot(lim, lim, color="k", lw=0.6, ls=":", label="<g_w, g_l> = ||g_w||^2")
    ax.set(xlabel="||grad lp_w||^2", ylabel="<grad lp_w, grad lp_l>")
    ax.legend()


SHARED_CONTEXT = Entry(
    name="ren_shared_parameters_lower_chosen",
    title="Ren & Sutherland: shared parameters can lower the chosen with one pair",
    source="Ren & Sutherland 2024, arXiv:2407.10490, Sec. 3 (the one-step decomposition: the change of log pi(y+) "
           "includes the rejected response's negative gradient through the shared parameters, the eNTK term). The "
           "unigram + EOS toy is ours",
    claim="On a model whose contexts share parameters, a single DPO pair can lower the chosen response's "
          "log-prob, through the rejected response's negative gradient; on a single-context softmax (the pair in "
          "one context, no sharing beyond it) it never does.",
    setting=f"Unigram + EOS policy (every position shares one softmax), vocabulary {U_VOCAB} (EOS + "
            f"{U_VOCAB - 1} content tokens), seeded logits; every ordered pair of distinct responses with "
            f"0..{U_MAX_CONTENT} "
            f"content tokens; dpo, beta={BETA}, one gradient step of {ETA:g}. Control: the single-context draws of "
            f"ren_no_squeeze_shared_context.",
    predicate=f"At least one pair lowers lp_w, the first-order condition <grad lp_w, grad lp_l> > ||grad lp_w||^2 "
              f"predicts which in at least {AGREE_MIN:.0%} of pairs, and no single-context draw lowers the chosen.",
    experiment=_shared_context,
    judge=_judge_shared_context,
    versus=_shared_context_versus,
    plot=_plot_shared_context,
)

# ---------------------------------------------------------------------------------------------
# Gradient entanglement (Yuan et al.)
# ---------------------------------------------------------------------------------------------

E_FAMILIES = ("unigram", "bigram")
E_LOSSES = ("dpo", "ipo")
E_PAIRS, E_QUICK_PAIRS = 600, 150


def _entanglement(quick: bool) -> Outcome:
    n = E_QUICK_PAIRS if quick else E_PAIRS
    measured, series = {}, {}
    for fam in E_FAMILIES:
        for loss in E_LOSSES:
            rows = _pair_steps(fam, loss, U_SEED + 1, pairs=n)
            d_w, d_l, ww, ll, wl, a, b = rows.T
            # first order: dlp_w = -eta (a ||g_w||^2 + b <g_w, g_l>), dlp_l = -eta (a <g_w, g_l> + b ||g_l||^2);
            # for margin losses b = -a with a < 0, so the signs are those of ||g_w||^2 - <.,.> and <.,.> - ||g_l||^2
            scale = np.maximum(np.maximum(ww, ll), np.abs(wl))
            pred_w = _sign(ww - wl, scale)
            pred_l = _sign(wl - ll, scale)
            key = f"{fam}_{loss}"
            measured[key] = {
                "pairs": int(len(rows)),
                "agree_w": float((pred_w == _sign(d_w)).mean()),
                "agree_l": float((pred_l == _sign(d_l)).mean()),
                "exact_ties": int((pred_w == 0).sum()),
                "agree_w_without_tie_handling": float((np.sign(ww - wl) == np.sign(d_w)).mean()),
                "both_up": float(((_sign(d_w) > 0) & (_sign(d_l) > 0)).mean()),
                "both_down": float(((_sign(d_w) < 0) & (_sign(d_l) < 0)).mean()),
                "w_up_l_down": float(((_sign(d_w) > 0) & (_sign(d_l) < 0)).mean()),
                "margin_derivative_signs_ok": bool(np.all(a < 0) and np.all(b > 0)),
            }
            series[key] = (ww, ll, wl, d_w, d_l)
    return Outcome(measured, series)


def _judge_entanglement(m) -> bool:
    return all(v["agree_w"] >= AGREE_MIN and v["agree_l"] >= AGREE_MIN for v in m.values())


def _plot_entanglement(fig, out: Outcome) -> None:
    ax = fig.subplots()
    for i, (key, (ww, ll, wl, d_w, d_l)) in enumerate(out.series.items()):
        x = wl / np.minimum(ww, ll)
        regime = np.where((d_w > 0) & (d_l < 0), 0, np.where(d_w < 0, 1, 2))
        ax.scatter(x, regime + (i - 1.5) * 0.08, s=3, color=f"C{i}", label=key)
    ax.axvline(1.0, color="k", lw=0.6, ls=":")
    ax.set_yticks([0, 1, 2], ["w up, l down", "w falls", "l rises"])
    ax.set(xlabel="<grad lp_w, grad lp_l> / min(||grad lp_w||^2, ||grad lp_l||^2)")
    ax.legend()


ENTANGLEMENT = Entry(
    name="gradient_entanglement",
    title="Gradient entanglement: first-order sign conditions",
    source="Yuan et al. 2024, arXiv:2410.13828, Sec. 3 (the gradient inner-product condition for margin-based "
           "losses)",
    claim="Under a small gradient step on a margin-based loss, the chosen log-prob falls exactly when "
          "<grad lp_w, grad lp_l> > ||grad lp_w||^2, and the rejected log-prob rises exactly when "
          "<grad lp_w, grad lp_l> > ||grad lp_l||^2; both move the intended way only when the inner product is "
          "below both squared norms.",
    setting=f"Unigram + EOS and bigram policies (vocabulary {U_VOCAB}, seeded), {E_PAIRS} random ordered pairs of "
            f"responses with 0..{U_MAX_CONTENT} content tokens (tests: {E_QUICK_PAIRS}); dpo and ipo, beta={BETA}, "
            f"reference = the policy before the step, one gradient step of {ETA:g}.",
    predicate=f"For each family and loss, both sign conditions predict the measured signs of the changes of lp_w and "
              f"lp_l in at least {AGREE_MIN:.0%} of pairs (a first-order tie, identical gradients, predicts no "
              f"change; a change or gap below {ZERO:g} (relative) counts as zero).",
    experiment=_entanglement,
    judge=_judge_entanglement,
    plot=_plot_entanglement,
    shortened=True,
)
