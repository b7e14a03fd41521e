"""Likelihood displacement on Razin et al.'s model: where the embedding condition holds, and where it fails.

The model of Razin et al. (arXiv:2410.08847, Sec. 4): one context, logits = W h with the hidden
state h trained and the token unembeddings W fixed; a single preference pair (y+, y-) of tokens;
DPO with beta = 0.1, reference = the start, plain gradient descent on h. The draws are those of
`gradlab reproduce razin_displacement` (vocabulary 30, hidden size 8, W and h standard normal,
2000 draws, seed 11; control: orthonormal unembeddings W = I). (a) One small step (1e-4): the
change of log pi(y+) against CHES - <E_pi[W], W- - W+>, where CHES = <W+, W-> - ||W+||^2 is the
token-level CHES score; the chosen's log-prob falls exactly where this is > 0 (the condition
holds), rises where it fails, and the control never satisfies it. (b) 300 steps (lr 0.5): the
share of draws whose log pi(y+) is below its start, split by the condition at the start. The
condition is a first-order statement about the first step: where it holds the chosen keeps
falling, but where it failed at the start some draws end lower later on, as h moves. (c, d) The
probability / log-probability tension: over the same draws, the mean probability of y+ keeps
rising while the mean log-probability turns and falls, because the mean log-prob is dominated
by a heavy lower tail (a few draws lose tens of nats; Jensen: mean log <= log mean) while the
median draw gains. Caveats: a single-context toy with one pair per draw, one beta and one
learning rate, plain gradient descent; the numbers are the medians and means of these draws.
"""

from __future__ import annotations

import numpy as np

# The model and its draws (also those of `gradlab reproduce razin_displacement`)
VOCAB, DIM, DRAWS, SEED = 30, 8, 2000, 11
BETA, ETA = 0.1, 1e-4  # dpo's beta; the "small" first step (second-order term ~ETA times the first)
STEPS, LR, EVERY = 300, 0.5, 5


def sample(rng: np.random.Generator, n: int, vocab: int = VOCAB, dim: int | None = DIM):
    """n draws of (W, h, y+, y-): W and h standard normal, (y+, y-) distinct tokens; ``dim=None``
    is the control, orthonormal unembeddings W = I (d = V)."""
    if dim is None:
        W = np.broadcast_to(np.eye(vocab), (n, vocab, vocab)).copy()
        h = rng.standard_normal((n, vocab))
    else:
        W = rng.standard_normal((n, vocab, dim))
        h = rng.standard_normal((n, dim))
    pairs = np.array([rng.choice(vocab, 2, replace=False) for _ in range(n)])
    return W, h, pairs[:, 0], pairs[:, 1]


def train(W, h, zp, zm, *, steps: int = STEPS, lr: float = LR,
          every: int = EVERY) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain gradient descent on h of dpo (beta ``BETA``, reference = the start), for every draw at
    once: ``(steps recorded, lp(y+) (draws, records), lp(y-) (draws, records))``.

    Kept beside the experiment runner on purpose: the runner compiles a hidden_state's fixed W
    into its program, so thousands of draws, each with its own W, would compile thousands of
    programs; here they are one vmapped program (one draw of it is cross-checked against the
    runner by ``gradlab reproduce razin_displacement``'s trace and by the tests)."""
    import jax
    import jax.numpy as jnp

    from gradlab import symbolic
    from gradlab.losses import get_loss

    dpo = get_loss("dpo")
    f = symbolic.numeric(dpo.expr.xreplace(symbolic.parameter_values(dpo, {"beta": BETA})),
                         ["lp_w", "lp_l", "ref_w", "ref_l"], backend="jax")

    def one(W, h, zp, zm):
        lp = lambda hh: jax.nn.log_softmax(W @ hh)  # noqa: E731
        ref = lp(h)
        grad = jax.grad(lambda hh: f(lp(hh)[zp], lp(hh)[zm], ref[zp], ref[zm]))

        def chunk(hh, _):
            hh = jax.lax.fori_loop(0, every, lambda _i, x: x - lr * grad(x), hh)
            v = lp(hh)
            return hh, (v[zp], v[zm])

        _, (a, b) = jax.lax.scan(chunk, h, None, length=steps // every)
        return jnp.concatenate([ref[zp][None], a]), jnp.concatenate([ref[zm][None], b])

    with jax.enable_x64(True):
        a, b = jax.jit(jax.vmap(one))(*(jnp.asarray(x) for x in (W, h, zp, zm)))
    return np.arange(steps // every + 1) * every, np.asarray(a), np.asarray(b)


def _one_step(W, h, zp, zm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The change of lp(y+) after one step of ``ETA``, the token-level CHES score <W+, W-> - ||W+||^2
    and the threshold <E_pi[W], W- - W+> (the condition holds where ches > thr), per draw."""
    _, lp_w, _ = train(W, h, zp, zm, steps=1, lr=ETA, every=1)
    rows = np.arange(len(zp))
    wp, wm = W[rows, zp], W[rows, zm]
    logits = np.einsum("nkd,nd->nk", W, h)
    pi = np.exp(logits - logits.max(1, keepdims=True))
    pi /= pi.sum(1, keepdims=True)
    mean_w = np.einsum("nk,nkd->nd", pi, W)
    return lp_w[:, 1] - lp_w[:, 0], (wp * wm).sum(1) - (wp * wp).sum(1), (mean_w * (wm - wp)).sum(1)


def razin_draws(n: int = DRAWS) -> dict[str, np.ndarray]:
    """The draws and their one-step outcome: ``W, h, zp, zm`` (the model and pair), ``d_w``,
    ``ches`` and ``thr``, and the control's ``control_d_w``, ``control_ches``, ``control_thr``
    (orthonormal unembeddings)."""
    rng = np.random.default_rng(SEED)
    W, h, zp, zm = sample(rng, n)
    d_w, ches, thr = _one_step(W, h, zp, zm)
    cW, ch, czp, czm = sample(rng, n, dim=None)
    c_w, c_ches, c_thr = _one_step(cW, ch, czp, czm)
    return {"W": W, "h": h, "zp": zp, "zm": zm, "d_w": d_w, "ches": ches, "thr": thr,
            "control_d_w": c_w, "control_ches": c_ches, "control_thr": c_thr}


def compute(draws: int | None = None, steps: int = STEPS) -> dict:
    d = razin_draws(draws or DRAWS)
    at, lp_w, lp_l = train(d["W"], d["h"], d["zp"], d["zm"], steps=steps)
    holds = d["ches"] > d["thr"]
    return {"eta": ETA, "x": d["ches"] - d["thr"], "d_w": d["d_w"],
            "control_x": d["control_ches"] - d["control_thr"], "control_d_w": d["control_d_w"],
            "holds": holds, "steps": at, "lp_w": lp_w, "lp_l": lp_l}


def summary(data: dict) -> dict[str, float]:
    """The numbers the caption and the panels quote, all computed from ``data``."""
    holds, d_w, lp = data["holds"], data["d_w"], data["lp_w"]
    below = lp < lp[:, :1]
    mean_p, mean_lp = np.exp(lp).mean(0), lp.mean(0)
    peak = int(np.argmax(mean_lp))
    return {
        "draws": float(len(holds)),
        "holds": float(holds.mean()),
        "sign_agreement": float(((d_w < 0) == holds).mean()),
        "control_holds": float((data["control_x"] > 0).mean()),
        "control_displaced": float((data["control_d_w"] < 0).mean()),
        "final_below_given_holds": float(below[holds, -1].mean()) if holds.any() else float("nan"),
        "final_below_given_fails": float(below[~holds, -1].mean()),
        "mean_p_start": float(mean_p[0]), "mean_p_end": float(mean_p[-1]),
        "mean_lp_start": float(mean_lp[0]), "mean_lp_peak": float(mean_lp[peak]), "mean_lp_end": float(mean_lp[-1]),
        "peak_step": float(data["steps"][peak]),
        "median_change_end": float(np.median(lp[:, -1] - lp[:, 0])),
        "min_change_end": float((lp[:, -1] - lp[:, 0]).min()),
    }


def make(data: dict | None = None):
    data = data or compute()
    from gradlab.figures import style

    m = summary(data)
    page = style.size() == "page"
    fig = style.figure(0.7, column_aspect=2.4)
    axes = fig.subplots(*((2, 2) if page else (4, 1))).ravel()
    hold_c, fail_c = style.PALETTE[1], style.PALETTE[0]

    ax = axes[0]
    cases = ((~data["holds"], fail_c, "condition fails"), (data["holds"], hold_c, "condition holds"))
    for mask, colour, label in cases:
        ax.scatter(data["x"][mask], data["d_w"][mask] / data["eta"], s=2, color=colour, label=label)
    # the control on top (it lies on the same line, all on the 'fails' side)
    ax.scatter(data["control_x"], data["control_d_w"] / data["eta"], s=1, marker="x", color="0.2", alpha=0.5,
               lw=0.4, label=f"control $W = I$: holds in {m['control_holds']:.0%}")
    ax.axvline(0, color="0.3", lw=0.6)
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set(xlabel=r"CHES $- \langle E_\pi[W], W_- - W_+\rangle$", ylabel=r"$\Delta\log\pi(y_+)$ per unit step",
           title=f"(a) one step: sign predicted in {m['sign_agreement']:.1%}")
    ax.legend(fontsize=6, markerscale=3, loc="upper right")

    ax = axes[1]
    below = data["lp_w"] < data["lp_w"][:, :1]
    for mask, colour, label, ls in ((data["holds"], hold_c, "holds at the start", "-"),
                                    (~data["holds"], fail_c, "fails at the start", "--")):
        ax.plot(data["steps"], below[mask].mean(0), color=colour, ls=ls,
                label=f"{label} ({int(mask.sum())} draws)")
    ax.set(xlabel="gradient-descent step on $h$", ylabel=r"share with $\log\pi(y_+)$ below its start",
           title="(b) 300 steps, by the condition at the start", ylim=(-0.03, 1.03))
    ax.legend(fontsize=6, loc="center right")

    ax = axes[2]
    ax.plot(data["steps"], np.exp(data["lp_w"]).mean(0), color=style.PALETTE[2], label=r"mean $\pi(y_+)$")
    ax.set(xlabel="gradient-descent step on $h$", ylabel=r"mean $\pi(y_+)$",
           title="(c) mean probability vs mean log-prob")
    twin = ax.twinx()
    twin.plot(data["steps"], data["lp_w"].mean(0), color=style.PALETTE[3], ls="--", label=r"mean $\log\pi(y_+)$")
    twin.axvline(m["peak_step"], color="0.6", lw=0.6, ls=":")
    twin.set_ylabel(r"mean $\log\pi(y_+)$")
    twin.grid(False)
    lines = ax.get_lines() + twin.get_lines()[:1]
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=6, loc="center right")

    ax = axes[3]
    change = data["lp_w"][:, -1] - data["lp_w"][:, 0]
    ax.hist(change, bins=60, color="0.6")
    ax.axvline(np.median(change), color=style.PALETTE[2], lw=1, label=f"median {np.median(change):+.2f}")
    ax.axvline(change.mean(), color=style.PALETTE[3], lw=1, ls="--", label=f"mean {change.mean():+.2f}")
    ax.set_yscale("log")
    ax.set(xlabel=r"$\log\pi(y_+)$: end - start (300 steps)", ylabel="draws (log)",
           title=f"(d) heavy lower tail (min {m['min_change_end']:+.1f})")
    ax.legend(fontsize=6, loc="upper left")
    return fig
