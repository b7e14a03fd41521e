"""Training claims on sequence policies: the posts' length pathology and the first post's proper
loss.

The length pathology runs here directly on an exact, unbounded unigram + EOS policy: every
token, EOS included, is drawn i.i.d. from softmax(theta), so a response's log-prob is a sum over
its tokens with no cut-off, and the expected length (EOS counted) is exactly 1 / pi(EOS), the
mean of a geometric law. No mass is dropped anywhere. When the experiment runner of issue 13
lands, this entry becomes an experiment file on it.

The proper-loss entry needs exact expectations over pairs drawn from the policy with a forced
stop (issue 12); until that exists it is registered as pending and never reports PASS.
"""

from __future__ import annotations

import numpy as np

from gradlab.reproduce import Entry, Outcome
from gradlab.reproduce import _common as c

VOCAB = 4  # EOS (token 0) + 3 content tokens; token 1 is favoured in chosen, token 2 in rejected
PAIRS = 64
MAX_CONTENT = 5  # content lengths i.i.d. uniform on 1..5, the same law for chosen and rejected
SEEDS = (0, 1, 2, 3)
LOSSES = {
    "dpo": {"beta": 0.1},
    "sigmoid_norm": {"beta": 0.1},
    "simpo": {},  # the paper's defaults, beta = 2, gamma = 1
    "ld_dpo": {"beta": 0.1, "ld_alpha": 0.5},
}
OPTIMIZERS = {"sgd": 0.5, "adam": 0.05}  # name -> learning rate
STEPS, QUICK_STEPS = 500, 150
GROWTH = 1.10  # the posts' claim for DPO: the expected length grows, here by more than 10%


VARIANTS = ("equal_length", "same_length_per_pair", "no_token_preference")


def _token_probs(favour: int | None) -> np.ndarray:
    """Content-token law: 0.5 on the favoured token, the rest shared equally (uniform if None)."""
    if favour is None:
        return np.full(VOCAB - 1, 1.0 / (VOCAB - 1))
    p = np.full(VOCAB - 1, 0.5 / (VOCAB - 2))
    p[favour - 1] = 0.5
    return p


def _responses(rng, favour: int | None, k: np.ndarray | None = None) -> np.ndarray:
    """PAIRS responses as token rows of width MAX_CONTENT + 1: content, then EOS (0), then -1."""
    k = rng.integers(1, MAX_CONTENT + 1, size=PAIRS) if k is None else k
    toks = rng.choice(np.arange(1, VOCAB), size=(PAIRS, MAX_CONTENT), p=_token_probs(favour))
    rows = np.full((PAIRS, MAX_CONTENT + 1), -1)
    for i, n in enumerate(k):
        rows[i, :n] = toks[i, :n]
        rows[i, n] = 0
    return rows


def dataset(seed: int, variant: str = "equal_length") -> tuple[np.ndarray, np.ndarray]:
    """Equal-length pairs: chosen and rejected lengths from the same law, the chosen favouring
    the good token and the rejected the bad one. Controls: ``same_length_per_pair`` gives both
    responses of a pair the same length (length cannot separate them); ``no_token_preference``
    draws both sides from one token law (no preference signal: whatever happens to the length
    comes from the finite sample and the optimiser alone)."""
    rng = np.random.default_rng(seed)
    if variant == "equal_length":
        return _responses(rng, 1), _responses(rng, 2)
    if variant == "same_length_per_pair":
        k = rng.integers(1, MAX_CONTENT + 1, size=PAIRS)
        return _responses(rng, 1, k), _responses(rng, 2, k)
    if variant == "no_token_preference":
        return _responses(rng, None), _responses(rng, None)
    raise ValueError(f"unknown variant '{variant}'; the variants are: {', '.join(VARIANTS)}")


def reference_logits(tw: np.ndarray, tl: np.ndarray) -> np.ndarray:
    """The maximum-likelihood unigram of every response in the data (an SFT reference): its
    expected length equals the data's mean length, so the start has no length bias of its own."""
    toks = np.concatenate([tw, tl]).ravel()
    counts = np.bincount(toks[toks >= 0], minlength=VOCAB).astype(float)
    return np.log(counts / counts.sum())


def _sums(logp, rows, start=None):
    """Sum of log pi over each row's tokens (from position ``start`` on, if given)."""
    import jax.numpy as jnp

    mask = rows >= 0
    if start is not None:
        mask = mask & (jnp.arange(rows.shape[-1]) >= start[..., None])
    return jnp.where(mask, logp[jnp.maximum(rows, 0)], 0.0).sum(-1)


def _objective(loss: str, tw, tl, ref_logits):
    import jax
    import jax.numpy as jnp

    f = c.loss_function(loss, LOSSES[loss], args=("lp_w", "lp_l", "ref_w", "ref_l", "len_w", "len_l",
                                                   "tail_w", "tail_l"))
    len_w, len_l = (jnp.asarray((t >= 0).sum(-1), dtype=float) for t in (tw, tl))
    shared = jnp.minimum(len_w, len_l)  # LD-DPO's tail: the tokens past the shorter response (EOS counted)
    ref = jax.nn.log_softmax(ref_logits)
    ref_w, ref_l = _sums(ref, tw), _sums(ref, tl)

    def objective(theta):
        logp = jax.nn.log_softmax(theta)
        return f(_sums(logp, tw), _sums(logp, tl), ref_w, ref_l, len_w, len_l,
                 _sums(logp, tw, shared), _sums(logp, tl, shared)).mean()

    return objective


def expected_length(theta) -> np.ndarray:
    """E[length] of the unbounded unigram + EOS policy, EOS counted: 1 / pi(EOS), exactly."""
    return 1.0 / c.softmax(theta)[..., 0]


def _train(loss: str, optimizer: str, steps: int, variant: str = "equal_length"):
    """Every seed's run (vmapped), recording theta every few steps."""
    import jax
    import jax.numpy as jnp
    import optax

    data = [dataset(s, variant) for s in SEEDS]
    tw = jnp.asarray(np.stack([d[0] for d in data]))
    tl = jnp.asarray(np.stack([d[1] for d in data]))
    refs = jnp.asarray(np.stack([reference_logits(*d) for d in data]))
    opt = getattr(optax, optimizer)(OPTIMIZERS[optimizer])
    every = max(1, steps // 50)

    def run(tw, tl, ref):
        grad = jax.grad(_objective(loss, tw, tl, ref))

        def step(carry, _):
            theta, state = carry
            updates, state = opt.update(grad(theta), state, theta)
            return (optax.apply_updates(theta, updates), state), None

        def outer(carry, _):
            carry, _ = jax.lax.scan(step, carry, None, length=every)
            return carry, carry[0]

        _, path = jax.lax.scan(outer, (ref, opt.init(ref)), None, length=steps // every)
        return jnp.concatenate([ref[None], path])

    paths = np.asarray(jax.jit(jax.vmap(run))(tw, tl, refs))  # (seeds, records, vocab)
    return np.arange(paths.shape[1]) * every, paths


def _length_pathology(quick: bool) -> Outcome:
    steps = QUICK_STEPS if quick else STEPS
    measured, series = {}, {}
    for opt in OPTIMIZERS:
        for loss in LOSSES:
            at, paths = _train(loss, opt, steps)
            el = expected_length(paths)  # (seeds, records)
            factor = el[:, -1] / el[:, 0]
            measured[f"{opt}_{loss}"] = {"initial_expected_length": float(el[:, 0].mean()),
                                         "final_expected_length": float(el[:, -1].mean()),
                                         "growth_per_seed": factor.tolist(),
                                         "eos_probability_final": float(c.softmax(paths[:, -1])[:, 0].mean())}
            series[(opt, loss)] = (at, el)
        for variant in VARIANTS[1:]:  # controls, DPO only: reported, not judged
            _, paths = _train("dpo", opt, steps, variant)
            el = expected_length(paths)
            measured[f"{opt}_dpo_control_{variant}"] = {"growth_per_seed": (el[:, -1] / el[:, 0]).tolist()}
    measured["steps"] = steps
    return Outcome(measured, series)


def _judge_length(m) -> bool:
    return all(min(m[f"{opt}_dpo"]["growth_per_seed"]) > GROWTH for opt in OPTIMIZERS)


def _plot_length(fig, out: Outcome) -> None:
    axes = fig.subplots(1, len(OPTIMIZERS), sharey=True)
    for ax, opt in zip(axes, OPTIMIZERS, strict=True):
        for i, loss in enumerate(LOSSES):
            at, el = out.series[(opt, loss)]
            ax.plot(at, el.mean(0), color=f"C{i}", label=loss)
            ax.fill_between(at, el.min(0), el.max(0), color=f"C{i}", alpha=0.15, lw=0)
        ax.set(xlabel="step", title=f"{opt}, lr {OPTIMIZERS[opt]:g}", yscale="log")
        ax.title.set_fontsize(8)
        c.axes_style(ax)
    axes[0].set_ylabel("exact expected length (EOS counted)")
    axes[0].legend(fontsize=6)


LENGTH_PATHOLOGY = Entry(
    name="length_pathology",
    title="The posts' length pathology on equal-length data",
    source="Cho 2024, 'Fixing DPO but I have a dinner reservation' (first post, /work/shared/posts.md): "
           "an unreasonable preference for long responses even when chosen and rejected lengths have the same "
           "statistics",
    claim="On preference data whose chosen and rejected lengths follow the same law, DPO lengthens the policy's "
          "responses. The length fixes (length-normalised DPO, SimPO, LD-DPO) are reported beside it: whether "
          "they remove the drift is measured, not assumed.",
    setting=f"Unbounded unigram + EOS policy (vocabulary {VOCAB}: EOS and 3 content tokens; no cut-off; expected "
            f"length 1/pi(EOS), exact), starting at the reference = the maximum-likelihood unigram of the data; "
            f"{PAIRS} pairs per seed, seeds {SEEDS}, content lengths i.i.d. uniform on 1..{MAX_CONTENT} for both "
            f"sides, chosen tokens favour token 1, rejected token 2; losses {dict(LOSSES)}; full-batch SGD and Adam "
            f"(learning rates {OPTIMIZERS}), {STEPS} steps (tests: {QUICK_STEPS}). Controls for DPO, reported: both "
            f"responses of each pair of equal length; no token preference (both sides from one token law).",
    predicate=f"DPO's exact expected length grows by more than {GROWTH - 1:.0%} in every seed, under SGD and under "
              f"Adam. (The fixes are reported, not judged.)",
    experiment=_length_pathology,
    judge=_judge_length,
    plot=_plot_length,
    shortened=True,
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


def forced_stop_responses():
    """Every response of 0..P_STOP content tokens: (rows of width P_STOP with -1 padding, number of
    content tokens, ends with EOS). A response of P_STOP tokens ends by the forced stop."""
    import itertools

    rows, ks = [], []
    for k in range(P_STOP + 1):
        for t in itertools.product(range(1, P_VOCAB), repeat=k):
            rows.append(list(t) + [-1] * (P_STOP - k))
            ks.append(k)
    rows, ks = np.array(rows), np.array(ks)
    return rows, ks, ks < P_STOP


def _forced_logprobs(theta, rows, eos):
    """Exact log-probabilities under the forced stop: content tokens, plus log pi(EOS) for a
    response that ends before the stop. They sum to probability 1 over all responses."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(theta)
    content = jnp.where(rows >= 0, logp[jnp.maximum(rows, 0)], 0.0).sum(-1)
    return content + jnp.where(eos, logp[0], 0.0)


def labelled_pairs(rewards: np.ndarray):
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

    steps = P_QUICK_STEPS if quick else P_STEPS
    rows, eos, rewards, *_ = _proper_setting()
    objectives = _proper_objectives()
    theta0 = jnp.asarray(P_REF_LOGITS)
    logprobs = jax.jit(lambda theta: _forced_logprobs(theta, rows, eos))
    j_pdpo = jax.jit(objectives["proper"])

    def metrics(theta):
        p = np.exp(np.asarray(logprobs(jnp.asarray(theta))))
        return {"total_mass": float(p.sum()), "expected_reward": float(p @ rewards),
                "stopped_by_cutoff": float(p[~np.asarray(eos)].sum()),
                "J_pdpo": float(j_pdpo(jnp.asarray(theta)))}

    measured, series = {}, {}
    for name, objective in objectives.items():
        at, path = c.descend(objective, theta0, steps=steps, lr=P_LR, optimizer="adam")
        m = [metrics(t) for t in path]
        measured[name] = {"initial": m[0], "final": m[-1],
                          "max_mass_error": float(max(abs(x["total_mass"] - 1.0) for x in m))}
        series[name] = (at, m)
    exact = jax.grad(objectives["proper"])
    errs = []
    for theta in (theta0, jnp.asarray(path[len(path) // 2]), jnp.asarray(path[-1])):  # path: the proper run
        g = np.asarray(exact(theta))
        pr, scale = _product_rule_gradient(theta)
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
    left.legend(fontsize=6)
    for ax in (left, right):
        c.axes_style(ax)


PROPER_LOSS = Entry(
    name="proper_loss",
    title="The proper loss against offline and on-policy DPO",
    source="Cho 2024, 'Fixing DPO but I have a dinner reservation' (first post, /work/shared/posts.md): "
           "J_PDPO = E_{y,y'~p_theta}[L_dpo] and its product-rule gradient",
    claim="The proper loss draws both responses from the policy being trained and lets an oracle label them; its "
          "gradient is sum p(y)p(y')[grad L + L (grad log p(y) + grad log p(y'))], of which DPO keeps only the first "
          "term. Minimising it moves the policy towards responses the oracle prefers.",
    setting=f"Unigram + EOS policy with a forced stop after {P_STOP} content tokens (a response that reaches it ends "
            f"there, as with max_new_tokens: every response is finished and all {2 ** (P_STOP + 1) - 1} of them are "
            f"enumerated, so no mass is left out); vocabulary {P_VOCAB}, token rewards {TOKEN_REWARD} (a response's "
            f"reward is the sum); every ordered pair labelled by the oracle (ties: both labellings at 1/2); dpo "
            f"integrand, beta={P_BETA}; reference logits {P_REF_LOGITS}; offline DPO (pairs from pi_0), on-policy "
            f"DPO (pairs from pi_theta, weights not differentiated) and J_PDPO trained with Adam (lr {P_LR}), "
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
