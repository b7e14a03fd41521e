"""Feng et al. 2024 (arXiv:2404.04626): DPO's gradient field in the probabilities of the chosen
and rejected responses, its invariants, and where its flow ends.

Every number here comes from gradlab's derived closed forms (``gradlab.derivative`` in the
probability, log and logit views, compiled with ``gradlab.numeric``); nothing is differentiated by
hand. The flows are integrated with classical fourth-order Runge-Kutta.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import sympy

from gradlab import symbolic
from gradlab.losses import get_loss
from gradlab.reproduce import Entry, Outcome
from gradlab.reproduce import _common as c

BETA = 0.1
Q = 0.3  # the reference's probability of both responses (the field does not depend on it)


def _partials(view: str, names: tuple[str, ...], beta: float = BETA):
    """d loss / d name for each name, in ``view``, as numpy functions of the view's variables."""
    loss = get_loss("dpo")
    params = symbolic.parameter_values(loss, {"beta": beta})
    args = symbolic.variables(loss, view)
    fns = [symbolic.numeric(symbolic.derivative(loss, n, view).xreplace(params), args) for n in names]
    return args, fns


# ---------------------------------------------------------------------------------------------
# The ratio of the probability-view gradients
# ---------------------------------------------------------------------------------------------

GRID = np.linspace(0.01, 0.99, 99)
RATIO_TOL = 1e-12


def _ratio(quick: bool) -> Outcome:
    loss = get_loss("dpo")
    d_w = symbolic.derivative(loss, "p_w", "probability")
    d_l = symbolic.derivative(loss, "p_l", "probability")
    p_w, p_l = symbolic.symbol_of("p_w"), symbolic.symbol_of("p_l")
    paper = -p_l / p_w  # Feng et al.: (dL/dx_1) / (dL/dx_2) = -x_2 / x_1
    exact = bool(sympy.simplify(d_w / d_l - paper) == 0)
    args, (fw, fl) = _partials("probability", ("p_w", "p_l"))
    pw, pl = np.meshgrid(GRID, GRID, indexing="ij")
    point = {"p_w": pw, "p_l": pl, "q_w": np.full_like(pw, Q), "q_l": np.full_like(pw, Q)}
    gw, gl = fw(*(point[a] for a in args)), fl(*(point[a] for a in args))
    rel = np.abs(gw / gl - (-pl / pw)) / (pl / pw)
    off = pw != pl
    rejected_faster = np.abs(gl) > np.abs(gw)
    agree = (rejected_faster == (pw > pl))[off].mean()
    measured = {"ratio_symbolically_equal": exact, "max_relative_error_on_grid": float(rel.max()),
                "grid_points": int(pw.size),
                "fraction_rejected_pushed_harder_iff_p_w_gt_p_l": float(agree),
                "fraction_of_grid_rejected_pushed_harder": float(rejected_faster[off].mean())}
    return Outcome(measured, {"pw": pw, "pl": pl, "log_ratio": np.log10(np.abs(gl / gw))})


def _judge_ratio(m) -> bool:
    return (m["ratio_symbolically_equal"] and m["max_relative_error_on_grid"] < RATIO_TOL
            and m["fraction_rejected_pushed_harder_iff_p_w_gt_p_l"] == 1.0)


def _plot_ratio(fig, out: Outcome) -> None:
    ax = fig.subplots()
    s = out.series
    im = ax.contourf(s["pw"], s["pl"], s["log_ratio"], levels=21, cmap="RdBu_r")
    ax.plot([0, 1], [0, 1], color="k", lw=0.6, ls=":")
    fig.colorbar(im, ax=ax, label="log10 |dL/dp_l| / |dL/dp_w|")
    ax.set(xlabel="p_w = pi(y_w)", ylabel="p_l = pi(y_l)",
           title=f"DPO (beta={BETA:g}): rejected pushed harder below the diagonal")


RATIO = Entry(
    name="feng_gradient_ratio",
    title="Feng: ratio of the probability-view gradients",
    source="Feng et al. 2024, arXiv:2404.04626, Sec. 3 (partial derivatives of the DPO loss in x_1 = pi(y_w), "
           "x_2 = pi(y_l), and their ratio)",
    claim="The DPO loss's partial derivatives in the two probabilities have the ratio "
          "(dL/dp_w)/(dL/dp_l) = -p_l/p_w at every point, so where the chosen is the more probable response "
          "the rejected one's probability is pushed down harder than the chosen's is pushed up.",
    setting=f"gradlab's derived probability-view partials of dpo (any beta; measured on a {len(GRID)}x{len(GRID)} "
            f"grid of p_w, p_l in [0.01, 0.99] at beta={BETA}, q_w = q_l = {Q}).",
    predicate=f"sympy simplifies (dL/dp_w)/(dL/dp_l) + p_l/p_w to 0; on the grid the numeric ratio matches to "
              f"relative error {RATIO_TOL:g}; and |dL/dp_l| > |dL/dp_w| exactly where p_w > p_l.",
    experiment=_ratio,
    judge=_judge_ratio,
    plot=_plot_ratio,
)

# ---------------------------------------------------------------------------------------------
# Invariants of the gradient flow in the probability, log and logit views
# ---------------------------------------------------------------------------------------------

START = {"p_w": 0.3, "p_l": 0.2}
FLOW_TIME = {"probability": 0.3, "log": 20.0, "logit": 20.0}
RK4_STEPS = 4000
INVARIANT_TOL = 1e-9  # relative drift allowed (RK4's local error at this step size is far smaller)
MOVE_MIN = 0.05  # the flow must actually move: some coordinate changes by at least this (relative)
K = 5
LOGIT_SEED = 3


def rk4(field: Callable[[np.ndarray], np.ndarray], x0: np.ndarray, t_end: float, steps: int) -> np.ndarray:
    """Classical Runge-Kutta path of dx/dt = field(x), ``steps + 1`` states.

    Not a trainer, so not the experiment runner's: Feng et al.'s claims are about the continuous
    gradient flow in a view's own coordinates (p_w, p_l), which no policy's parameters are."""
    x = np.asarray(x0, dtype=float)
    dt = t_end / steps
    path = [x]
    for _ in range(steps):
        k1 = field(x)
        k2 = field(x + 0.5 * dt * k1)
        k3 = field(x + 0.5 * dt * k2)
        k4 = field(x + dt * k3)
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        path.append(x)
    return np.array(path)


def _view_field(view: str, a: str, b: str, fixed: dict):
    args, (fa, fb) = _partials(view, (a, b))

    def field(x):
        point = {a: x[0], b: x[1], **fixed}
        vals = [point[n] for n in args]
        return -np.array([fa(*vals), fb(*vals)])

    return field


def _logit_field():
    """dtheta/dt = -(dL/dlp_w grad lp_w + dL/dlp_l grad lp_l) on a K-action softmax, with
    grad_theta lp_y = e_y - softmax(theta) (the chain rule through the policy)."""
    args, (fw, fl) = _partials("log", ("lp_w", "lp_l"))
    ref = np.log(c.softmax(c.seeded(LOGIT_SEED + 1, (K,))))

    def field(theta):
        p = c.softmax(theta)
        lp = np.log(p)
        point = {"lp_w": lp[0], "lp_l": lp[1], "ref_w": ref[0], "ref_l": ref[1]}
        vals = [point[n] for n in args]
        e0, e1 = np.eye(K)[0], np.eye(K)[1]
        return -(fw(*vals) * (e0 - p) + fl(*vals) * (e1 - p))

    return field


def _invariants(quick: bool) -> Outcome:
    ref = {"q_w": Q, "q_l": Q}
    prob = rk4(_view_field("probability", "p_w", "p_l", ref), np.array([START["p_w"], START["p_l"]]),
               FLOW_TIME["probability"], RK4_STEPS)
    logv = rk4(_view_field("log", "lp_w", "lp_l", {"ref_w": np.log(Q), "ref_l": np.log(Q)}),
               np.log([START["p_w"], START["p_l"]]), FLOW_TIME["log"], RK4_STEPS)
    theta = rk4(_logit_field(), c.seeded(LOGIT_SEED, (K,)), FLOW_TIME["logit"], RK4_STEPS)
    inv = {
        "probability: p_w^2 + p_l^2": (prob**2).sum(1),
        "log: lp_w + lp_l": logv.sum(1),
        "logit: theta_w + theta_l": theta[:, 0] + theta[:, 1],
        "logit: other logits (max change)": np.abs(theta[:, 2:] - theta[0, 2:]).max(1) + 1.0,
    }
    drift = {k: float(np.abs(v - v[0]).max() / abs(v[0])) for k, v in inv.items()}
    moved = {
        "probability": float(np.abs(prob[-1] - prob[0]).max() / np.abs(prob[0]).max()),
        "log": float(np.abs(logv[-1] - logv[0]).max() / np.abs(logv[0]).max()),
        "logit": float(np.abs(theta[-1, :2] - theta[0, :2]).max() / np.abs(theta[0, :2]).max()),
    }
    measured = {"relative_drift": drift, "relative_move": moved, "rk4_steps": RK4_STEPS,
                "flow_time": dict(FLOW_TIME)}
    t = {k: np.linspace(0, v, RK4_STEPS + 1) for k, v in FLOW_TIME.items()}
    return Outcome(measured, {"prob": prob, "log": logv, "theta": theta, "t": t})


def _judge_invariants(m) -> bool:
    return (max(m["relative_drift"].values()) < INVARIANT_TOL
            and min(m["relative_move"].values()) > MOVE_MIN)


def _plot_invariants(fig, out: Outcome) -> None:
    a, b, d = fig.subplots(1, 3)
    s = out.series
    phi = np.linspace(0, np.pi / 2, 100)
    r = np.hypot(*s["prob"][0])
    a.plot(r * np.cos(phi), r * np.sin(phi), color="0.7", lw=3, label="p_w^2 + p_l^2 = const")
    a.plot(s["prob"][:, 0], s["prob"][:, 1], color="C0", label="flow")
    a.set(xlabel="p_w", ylabel="p_l", title="probability view", aspect="equal")
    b.plot(s["log"][:, 0], s["log"][:, 1], color="C0")
    b.plot(s["log"][:, 0], s["log"][0].sum() - s["log"][:, 0], color="0.7", lw=3, zorder=0)
    b.set(xlabel="lp_w", ylabel="lp_l", title="log view: lp_w + lp_l const")
    for k in range(s["theta"].shape[1]):
        d.plot(s["t"]["logit"], s["theta"][:, k], label=("y_w", "y_l", "other", "other", "other")[k] if k < 3 else None,
               color=f"C{min(k, 2)}")
    d.set(xlabel="time", ylabel="logit", title="logit view: two logits move")
    a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3))  # below the narrow square panel
    d.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the panel: the logits fill it


INVARIANTS = Entry(
    name="feng_flow_invariants",
    title="Feng: invariants of DPO's gradient flow",
    source="Feng et al. 2024, arXiv:2404.04626, Sec. 3 (the gradient vector field of the DPO loss over "
           "x_1 = pi(y_w), x_2 = pi(y_l)); the log and logit views are the same field in gradlab's other "
           "coordinates (docs/architecture.md, 'Vocabulary and views'). The paper draws the field; the "
           "invariants are our first integrals of it",
    claim="Along DPO's gradient flow p_w^2 + p_l^2 is conserved in the probability view (the flow moves on "
          "circles), lp_w + lp_l is conserved in the log view, and on a single-context softmax only the "
          "chosen and rejected logits move, with their sum conserved.",
    setting=f"dpo, beta={BETA}; probability and log views: free coordinates from p_w={START['p_w']}, "
            f"p_l={START['p_l']} (q = {Q}); logit view: K={K} actions with seeded logits, y_w = action 0, "
            f"y_l = action 1. RK4, {RK4_STEPS} steps over times {FLOW_TIME}.",
    predicate=f"Each invariant's relative drift stays below {INVARIANT_TOL:g} while every flow moves its "
              f"coordinates by more than {MOVE_MIN:g} (relative).",
    experiment=_invariants,
    judge=_judge_invariants,
    plot=_plot_invariants,
)

# ---------------------------------------------------------------------------------------------
# Where the free-coordinate flow ends
# ---------------------------------------------------------------------------------------------

STARTS = ((0.3, 0.2), (0.2, 0.3), (0.05, 0.5))
END_P_L = 1e-10  # "ends": the rejected probability is below this
RELATIVE_STEP = 1e-2  # adaptive step: each step changes each coordinate by at most 1% (RK4)
END_TOL = 1e-6
T_MAX = 100.0


def _flow_to_end(field, x0):
    x, t, path, times = np.asarray(x0, dtype=float), 0.0, [np.asarray(x0, float)], [0.0]
    while x[1] > END_P_L and t < T_MAX:
        dt = RELATIVE_STEP * float(np.min(np.abs(x) / np.maximum(np.abs(field(x)), 1e-300)))
        k1 = field(x)
        k2 = field(x + 0.5 * dt * k1)
        k3 = field(x + 0.5 * dt * k2)
        k4 = field(x + dt * k3)
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t += dt
        path.append(x)
        times.append(t)
    return np.array(path), np.array(times)


def _starts(start) -> tuple[tuple[float, float], ...]:
    """The user's start points: one [p_w, p_l] or a list of them, each probability in (0, 1) and
    p_w + p_l <= 1 (two responses of one distribution)."""
    import math

    from gradlab.errors import GradlabError

    points = [start] if start and not isinstance(start[0], list) else list(start or [])
    out = []
    for point in points:
        ok = (isinstance(point, list) and len(point) == 2
              and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in point))
        if not ok or not (0 < point[0] < 1 and 0 < point[1] < 1 and point[0] + point[1] <= 1):
            raise GradlabError(f"start {point!r}: each start is [p_w, p_l] with both in (0, 1) and p_w + p_l <= 1, "
                               "e.g. --set 'start=[[0.3, 0.2], [0.1, 0.6]]'")
        out.append((float(point[0]), float(point[1])))
    if not out or len(out) > 20:
        raise GradlabError("start takes 1 to 20 points [p_w, p_l]")
    return tuple(out)


def _endpoint(quick: bool, start=None) -> Outcome:
    field = _view_field("probability", "p_w", "p_l", {"q_w": Q, "q_l": Q})
    rows, paths = [], []
    for pw0, pl0 in (STARTS if start is None else _starts(start)):
        path, times = _flow_to_end(field, (pw0, pl0))
        predicted = float(np.hypot(pw0, pl0))
        rows.append({"start": [pw0, pl0], "end": path[-1].tolist(), "end_time": float(times[-1]),
                     "predicted_p_w": predicted,
                     "relative_error": float(abs(path[-1][0] - predicted) / predicted),
                     "gain_of_p_w": float(path[-1][0] / pw0)})
        paths.append(path)
    return Outcome({"runs": rows, "beta": BETA}, {"paths": paths})


def _judge_endpoint(m) -> bool:
    return all(r["end"][1] <= END_P_L and r["end_time"] < T_MAX and r["relative_error"] < END_TOL for r in m["runs"])


def _plot_endpoint(fig, out: Outcome) -> None:
    ax = fig.subplots()
    phi = np.linspace(0, np.pi / 2, 100)
    for i, (path, run) in enumerate(zip(out.series["paths"], out.measured["runs"], strict=True)):
        r = run["predicted_p_w"]
        ax.plot(r * np.cos(phi), r * np.sin(phi), color="0.85", lw=3, zorder=0)
        label = f"from {tuple(run['start'])}: ends at p_w={path[-1, 0]:.4f}"
        ax.plot(path[:, 0], path[:, 1], color=f"C{i}", label=label)
        ax.plot([r], [0], "o", color=f"C{i}")
    ax.set(xlabel="p_w", ylabel="p_l", aspect="equal")
    ax.legend()


ENDPOINT = Entry(
    name="feng_flow_endpoint",
    title="Feng: where the free-coordinate flow ends",
    source="Feng et al. 2024, arXiv:2404.04626, Sec. 3 (the flow of the gradient field over x_1, x_2 drives "
           "x_2 to 0 faster than it raises x_1). The end point sqrt(p_w0^2 + p_l0^2) follows from the invariant of "
           "feng_flow_invariants; it is our statement, not the paper's",
    claim="With the two probabilities as free coordinates, DPO's gradient flow reaches p_l = 0 in finite time "
          "(for beta < 1) and stops on the p_w axis at sqrt(p_w0^2 + p_l0^2): the chosen response gains at most "
          "that much while the rejected one is driven to zero.",
    setting=f"dpo, beta={BETA}, q = {Q}; probability view, starts {STARTS} (or the user's: --set "
            f"'start=[[p_w, p_l], ...]'); RK4 with steps that change each coordinate "
            f"by at most {RELATIVE_STEP:g} (relative), until p_l < {END_P_L:g} or t = {T_MAX:g}.",
    predicate=f"Every flow reaches p_l < {END_P_L:g} before t = {T_MAX:g} with p_w within relative "
              f"{END_TOL:g} of sqrt(p_w0^2 + p_l0^2).",
    experiment=_endpoint,
    judge=_judge_endpoint,
    plot=_plot_endpoint,
    options={"start": "one [p_w, p_l] or a list of them, each in (0, 1) with p_w + p_l <= 1; default the three "
                      "starts of the setting"},
)
