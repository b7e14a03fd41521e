"""Interactive views for the notebooks: everything a notebook shows is computed here.

Each ``*_view`` function builds an ipywidgets panel and returns ``(panel, update)``: ``update``
is the callback the controls call, exposed so that tests (and benchmarks) can drive it
without a browser. Closed-form views prepare their numeric functions once, with the
hyperparameters as arguments, so a slider moves without any sympy work or recompilation.
Training views compile their program once per loss and report progress.

ipywidgets is imported only when a view is built (it is in the ``notebook`` extra).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradlab import symbolic
from gradlab.errors import GradlabError
from gradlab.losses import LOSSES, Loss

__all__ = [
    "FieldFunctions",
    "field_functions",
    "gradient_table",
    "posts_facts",
    "atlas_view",
    "length_view",
    "entropy_view",
    "displacement_view",
    "custom_loss_view",
]

FIXED = {"q_w": 0.3, "q_l": 0.3, "ref_w": float(np.log(0.3)), "ref_l": float(np.log(0.3)),
         "len_w": 1.0, "len_l": 1.0, "tail_w": 0.0, "tail_l": 0.0, "ref_tail_w": 0.0, "ref_tail_l": 0.0}


@dataclass(frozen=True)
class FieldFunctions:
    """Numeric gradient components of one loss in one view, hyperparameters as arguments."""

    loss: Loss
    view: str
    names: tuple[str, ...]
    dx: Callable[..., Any]
    dy: Callable[..., Any]

    def __call__(self, x: np.ndarray, y: np.ndarray, values: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        xname, yname = ("p_w", "p_l") if self.view == "probability" else ("lp_w", "lp_l")
        point = {**FIXED, xname: x, yname: y}
        from gradlab.checks import hyper_value

        hyper = [values.get(h, hyper_value(self.loss, h)) for h in self.loss.hyperparameters]
        args = [point[n] for n in self.names] + hyper
        return np.broadcast_to(self.dx(*args), x.shape), np.broadcast_to(self.dy(*args), x.shape)


@functools.cache
def field_functions(loss: str | Loss, view: str) -> FieldFunctions:
    """Compile (once) the two axis partials of a loss in the probability or log view."""
    loss = symbolic.as_loss(loss)
    names = tuple(symbolic.variables(loss, view))
    args = list(names) + list(loss.hyperparameters)
    xname, yname = ("p_w", "p_l") if view == "probability" else ("lp_w", "lp_l")
    dx = symbolic.numeric(symbolic.derivative(loss, xname, view), args)
    dy = symbolic.numeric(symbolic.derivative(loss, yname, view), args)
    return FieldFunctions(loss, view, names, dx, dy)


def gradient_table(loss: str | Loss, views=("log", "probability", "length")) -> str:
    """Markdown/LaTeX of the loss and all its first partials in each view."""
    loss = symbolic.as_loss(loss)
    lines = [f"**{loss.name}**: {loss.title}", "", f"$$\\ell = {symbolic.latex(loss.expr)}$$", ""]
    for view in views:
        lines.append(f"*{view} view*")
        lines.append("")
        for var, expr in symbolic.gradient(loss, view).items():
            lines.append(f"- $\\partial\\ell/\\partial {symbolic.latex(symbolic.symbol_of(var))} = {symbolic.latex(expr)}$")
        lines.append("")
    return "\n".join(lines)


def posts_facts() -> list[tuple[str, str, bool]]:
    """The facts of posts.md, derived with gradlab and checked numerically: (claim, LaTeX of the
    derived expression, whether a high-precision evaluation agrees with the hand formula)."""
    import mpmath

    point = {"p_w": 0.3, "p_l": 0.02, "q_w": 0.2, "q_l": 0.1}
    beta, gamma = 0.1, 0.3
    z = beta * mpmath.log(point["p_w"] / point["p_l"]) - gamma * mpmath.log(point["q_w"] / point["q_l"])
    sig = 1 / (1 + mpmath.exp(z))  # sigma(-z)
    vals = symbolic.evaluate("gdpo", point, {"beta": beta, "gamma": gamma}, "probability")
    lp = {"lp_w": float(mpmath.log(0.3)), "lp_l": float(mpmath.log(0.02)),
          "ref_w": float(mpmath.log(0.2)), "ref_l": float(mpmath.log(0.1))}
    lvals = symbolic.evaluate("gdpo", lp, {"beta": beta, "gamma": gamma}, "log")
    close = lambda a, b: bool(mpmath.almosteq(a, b, rel_eps=1e-12))  # noqa: E731
    d = lambda w, v: symbolic.latex(symbolic.derivative("gdpo", w, v))  # noqa: E731
    return [
        ("dl/dp+ = -beta sigma(-z) / p+", d("p_w", "probability"), close(vals["p_w"], -beta * sig / point["p_w"])),
        ("dl/dp- = +beta sigma(-z) / p-", d("p_l", "probability"), close(vals["p_l"], beta * sig / point["p_l"])),
        ("log view: equal and opposite", d("lp_w", "log"), close(lvals["lp_w"], -lvals["lp_l"])),
        ("dl/dbeta = -sigma(-z) log(p+/p-)", d("beta", "probability"),
         close(vals["beta"], -sig * mpmath.log(point["p_w"] / point["p_l"]))),
        ("dl/dgamma = sigma(-z) log(q+/q-)", d("gamma", "probability"),
         close(vals["gamma"], sig * mpmath.log(point["q_w"] / point["q_l"]))),
        ("dl/dL+ = -sigma(-z)(beta m+ - gamma n+)", d("len_w", "length"), _length_partial()),
        ("proper loss: d/dlp_w of p p' l = p p' (dl/dlp_w + l)",
         symbolic.latex(symbolic.derivative("pdpo", "lp_w")), _proper_loss_product_rule()),
    ]


def _length_partial() -> bool:
    import mpmath

    at = {"len_w": 7.0, "len_l": 4.0, "m_w": -0.8, "m_l": -1.3, "n_w": -1.0, "n_l": -0.9}
    beta, gamma = 0.2, 0.5
    got = symbolic.evaluate("gdpo", at, {"beta": beta, "gamma": gamma}, "length")["len_w"]
    z = at["len_w"] * (beta * at["m_w"] - gamma * at["n_w"]) - at["len_l"] * (beta * at["m_l"] - gamma * at["n_l"])
    return bool(mpmath.almosteq(got, -(beta * at["m_w"] - gamma * at["n_w"]) / (1 + mpmath.exp(z)), rel_eps=1e-12))


def _proper_loss_product_rule() -> bool:
    import jax
    from jax.flatten_util import ravel_pytree

    from gradlab.checks import pdpo_exact
    from gradlab.policies import make_family

    fam = make_family("bigram", vocab=3, max_len=3)
    _, autodiff, product_rule = pdpo_exact(fam, fam.init(jax.random.PRNGKey(0)), fam.init(jax.random.PRNGKey(1)),
                                           np.array([0.0, 1.0, -1.0]))
    a, b = ravel_pytree(autodiff)[0], ravel_pytree(product_rule)[0]
    return bool(np.linalg.norm(a - b) <= 1e-12 * np.linalg.norm(a))


# --------------------------------------------------------------------------------------------
# Widget views
# --------------------------------------------------------------------------------------------


def _show(out, fig) -> None:
    """Replace what an Output shows with the figure's current state."""
    from IPython import get_ipython
    from IPython.display import display

    if get_ipython() is None:  # driven from a script or a test: nothing to show
        return
    out.clear_output(wait=True)
    with out:
        display(fig)


def _slider(name: str, value: float, lo: float, hi: float, step: float | None = None):
    import ipywidgets as w

    return w.FloatSlider(value=value, min=lo, max=hi, step=step or (hi - lo) / 100, description=name,
                         continuous_update=True, readout_format=".3g")


def _hyper_sliders(loss: Loss) -> dict[str, Any]:
    from gradlab.checks import hyper_range, hyper_value

    out = {}
    for h in loss.hyperparameters:
        lo, hi = hyper_range(loss, h)
        out[h] = _slider(h, hyper_value(loss, h), lo, hi)
    return out


class _Blitter:
    """Redraw only some artists of a figure and encode the result as PNG: the axes, ticks and
    labels are drawn once and restored from a cached background, which makes a slider move an
    order of magnitude cheaper than a full matplotlib redraw."""

    def __init__(self, fig, artists):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        self.fig, self.artists = fig, list(artists)
        for a in self.artists:
            a.set_animated(True)
        self.canvas = FigureCanvasAgg(fig)
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(fig.bbox)

    def png(self) -> bytes:
        import io

        from PIL import Image

        self.canvas.restore_region(self.background)
        for a in self.artists:
            a.axes.draw_artist(a)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(self.canvas.buffer_rgba())).save(buf, format="png", compress_level=1)
        return buf.getvalue()


def atlas_view(loss: str = "dpo", n: int = 13):
    """Gradient atlas: a loss dropdown, hyperparameter sliders, the formula and gradients, and
    the gradient field in the probability and log views (descent directions, unit arrows,
    colour = log10 speed). Returns ``(panel, update)``; ``update(**values)`` redraws and
    returns the PNG it shows."""
    import ipywidgets as w
    from IPython import get_ipython
    from IPython.display import Markdown, display
    from matplotlib.figure import Figure

    dropdown = w.Dropdown(options=list(LOSSES), value=symbolic.as_loss(loss).name, description="loss")
    sliders_box = w.VBox()
    formula = w.Output()
    label = w.Label()
    image = w.Image(format="png")
    fig = Figure(figsize=(9, 4), dpi=72)
    axes = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.9, wspace=0.25)
    ps, lps = np.linspace(0.05, 1.0, n), np.linspace(-4.0, -0.05, n)
    grids = {"probability": np.meshgrid(ps, ps), "log": np.meshgrid(lps, lps)}
    quivers = {}
    for ax, (view, (X, Y)) in zip(axes, grids.items(), strict=True):
        quivers[view] = ax.quiver(X, Y, np.zeros_like(X), np.zeros_like(Y), np.zeros_like(X),
                                  cmap="viridis", pivot="mid", scale=25)
        ax.set_title(f"{view} view: descent direction (colour: log10 speed)", fontsize=9)
        ax.set_xlabel("pi(y_w)" if view == "probability" else "log pi(y_w)")
        ax.set_ylabel("pi(y_l)" if view == "probability" else "log pi(y_l)")
    blitter = _Blitter(fig, quivers.values())
    state: dict[str, Any] = {}

    def update(change: Any = None, **values: float) -> bytes:
        """Redraw for the current (or given) hyperparameter values: numpy only, no sympy."""
        current = {k: s.value for k, s in state["sliders"].items()}
        current.update(values)
        for view, (X, Y) in grids.items():
            gx, gy = field_functions(state["loss"], view)(X, Y, current)
            mag = np.hypot(gx, gy)
            with np.errstate(divide="ignore", invalid="ignore"):
                C = np.log10(mag)
                quivers[view].set_UVC(-gx / mag, -gy / mag, C)
            finite = C[np.isfinite(C)]
            if finite.size:
                quivers[view].set_clim(finite.min(), finite.max() + 1e-12)
        label.value = f"{state['loss']}: " + ", ".join(f"{k} = {v:.3g}" for k, v in current.items())
        png = blitter.png()
        image.value = png
        return png

    def select(change: Any = None) -> None:
        state["loss"] = dropdown.value
        loss_obj = symbolic.as_loss(dropdown.value)
        for view in grids:
            field_functions(loss_obj.name, view)  # compile once per loss
        state["sliders"] = _hyper_sliders(loss_obj)
        for s in state["sliders"].values():
            s.observe(update, names="value")
        sliders_box.children = tuple(state["sliders"].values())
        if get_ipython() is not None:
            formula.clear_output()
            with formula:
                display(Markdown(gradient_table(loss_obj, views=("log", "probability"))))
        update()

    dropdown.observe(select, names="value")
    select()
    return w.VBox([dropdown, sliders_box, label, image, formula]), update


def length_view(losses=("dpo", "sigmoid_norm", "simpo", "ipo")):
    """Force against length (closed form, mpmath) and the equal-length training experiment."""
    import ipywidgets as w
    from matplotlib.figure import Figure

    from gradlab import dynamics
    from gradlab.figures.length_force import _curve

    loss_pick = w.SelectMultiple(options=list(LOSSES), value=tuple(losses), description="losses")
    m = _slider("m (per-token)", -1.0, -3.0, -0.1)
    max_k = w.IntSlider(value=5, min=2, max=7, description="max content")
    steps = w.IntSlider(value=150, min=10, max=600, step=10, description="steps")
    run = w.Button(description="train on equal-length data")
    progress = w.IntProgress(min=0, max=1, description="training")
    out = w.Output()
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    lengths = np.arange(1, 101)

    def update(change: Any = None) -> Figure:
        left.clear()
        for i, loss in enumerate(loss_pick.value):
            left.plot(lengths, _curve(loss, "p_l", "probability", lengths, m.value), label=loss, color=f"C{i}")
        left.set(xlabel="length L", ylabel="log10 |dl/dpi(y_l)|", title=f"probability-view force, m = {m.value:.2f}")
        left.legend(fontsize=7)
        _show(out, fig)
        return fig

    def train(_: Any = None) -> Figure:
        right.clear()
        chosen = list(loss_pick.value)
        progress.max, progress.value = len(chosen), 0
        for i, loss in enumerate(chosen):
            sim = dynamics.simulate(loss, "unigram", "equal_length", steps=steps.value, seeds=4, max_len=max_k.value + 1)
            el = sim.series("expected_length")
            right.plot(sim.steps, el.mean(1), color=f"C{i}", label=f"{loss} (x{dynamics.drift_factor(sim)[0].mean():.2f})")
            right.fill_between(sim.steps, el.min(1), el.max(1), color=f"C{i}", alpha=0.15, lw=0)
            progress.value = i + 1
        right.set(xlabel="step", ylabel="expected length", title="equal-length data, unigram policy")
        right.legend(fontsize=7)
        _show(out, fig)
        return fig

    for control in (loss_pick, m):
        control.observe(update, names="value")
    run.on_click(train)
    update()
    return w.VBox([loss_pick, m, w.HBox([max_k, steps, run, progress]), out]), update, train


def entropy_view():
    """Entropy of the closed-form optimum pi* against beta, gamma/beta and H-DPO's alpha."""
    import ipywidgets as w
    import jax
    from matplotlib.figure import Figure

    from gradlab import dynamics
    from gradlab.policies import make_family

    fam = make_family("tabular", vocab=3, max_len=3)
    ref = fam.init(jax.random.PRNGKey(0), 0.5)
    betas = np.geomspace(0.1, 5, 60)
    ratio = _slider("gamma/beta", 1.0, 0.1, 3.0)
    alpha = _slider("H-DPO alpha", 1.0, 0.5, 1.5)
    out = w.Output()
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()

    def update(change: Any = None) -> Figure:
        ax.clear()
        h = [dynamics.entropy(dynamics.optimal_policy(fam, ref, b, ratio.value * b)) for b in betas]
        ha = [dynamics.entropy(dynamics.optimal_policy(fam, ref, alpha.value * b, b)) for b in betas]
        ax.plot(betas, h, label=f"gdpo optimum, gamma/beta = {ratio.value:.2f}")
        ax.plot(betas, ha, "--", label=f"H-DPO optimum, alpha = {alpha.value:.2f}")
        ax.set(xscale="log", xlabel="beta", ylabel="sequence entropy (nats)")
        ax.legend(fontsize=8)
        _show(out, fig)
        return fig

    for s in (ratio, alpha):
        s.observe(update, names="value")
    update()
    return w.VBox([ratio, alpha, out]), update


def displacement_view():
    """Likelihood displacement on the shared-parameter linear head, per loss."""
    import ipywidgets as w
    from matplotlib.figure import Figure

    from gradlab import dynamics
    from gradlab.figures.displacement import FAMILY

    pick = w.Dropdown(options=list(LOSSES), value="dpo", description="loss")
    steps = w.IntSlider(value=200, min=10, max=600, step=10, description="steps")
    out = w.Output()
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()

    def update(change: Any = None) -> Figure:
        ax.clear()
        sim = dynamics.simulate(pick.value, FAMILY, "similar_embeddings", steps=steps.value, seeds=4)
        for name, color in (("lp_w", "C2"), ("lp_l", "C3")):
            y = sim.series(name)
            ax.plot(sim.steps, y.mean(1), color=color, label=name)
            ax.fill_between(sim.steps, y.min(1), y.max(1), color=color, alpha=0.15, lw=0)
        ax.set(title=f"{pick.value}: similar-embedding pair", xlabel="step", ylabel="log-probability")
        ax.legend()
        _show(out, fig)
        return fig

    for c in (pick, steps):
        c.observe(update, names="value")
    update()
    return w.VBox([w.HBox([pick, steps]), out]), update


def custom_loss_view(formula: str = "log(1 + exp(-beta*((lp_w - ref_w) - (lp_l - ref_l))))", beta: float = 0.1):
    """Bring your own loss: parse safely, derive, check on toy policies, place in the scorecard."""
    import ipywidgets as w
    from IPython.display import Markdown, display

    from gradlab import checks, dynamics, losses
    from gradlab.figures import scorecard

    text = w.Text(value=formula, description="loss =", layout=w.Layout(width="90%"))
    go = w.Button(description="analyse")
    out = w.Output()

    def update(_: Any = None) -> dict[str, Any]:
        out.clear_output()
        result: dict[str, Any] = {}
        with out:
            try:
                loss = losses.custom(text.value, name="yours")
                # a hyperparameter the formula leaves open gets a stated value: beta the view's,
                # any other the middle of its legal sampling range (checks.hyper_value)
                chosen = {h: beta if h == "beta" else checks.hyper_value(loss, h)
                          for h, v in loss.defaults.items() if v is None}
                if chosen:
                    loss = losses.custom(text.value, name="yours", defaults=chosen)
                    display(Markdown("No default in the formula for " + ", ".join(
                        f"`{h}`; analysed at {h} = {v:.3g}" for h, v in chosen.items())
                        + " (write a number into the formula to choose another value)."))
            except GradlabError as exc:  # shown to the user, never raised into the kernel
                display(Markdown(f"**Not accepted:** {exc}"))
                return {"error": str(exc)}
            display(Markdown(gradient_table(loss, views=("log", "probability"))))
            rows = [checks.check(loss, fam, points=64) for fam in ("unigram", "bigram")]
            result["checks"] = rows
            display(Markdown("\n".join(f"- check on {r.family}: max relative error {r.max_rel_error:.1e} "
                                       f"({'ok' if r.ok else 'FAIL'})" for r in rows)))
            if set(loss.variables) <= {"lp_w", "lp_l", "ref_w", "ref_l", "len_w", "len_l"}:
                sim = dynamics.simulate(loss, "unigram", "equal_length", steps=150, seeds=4)
                row = {"force exponent s": scorecard.force_exponent(loss) if "p_l" in symbolic.variables(loss, "probability") else float("nan"),
                       "length drift factor": float(dynamics.drift_factor(sim)[0].mean()),
                       "change in lp_w": float((sim.series("lp_w")[-1] - sim.series("lp_w")[0]).mean())}
                result["scorecard"] = row
                display(Markdown("Scorecard row (compare with `figures/scorecard.md`): "
                                 + ", ".join(f"{k} = {v:.3f}" for k, v in row.items())))
        return result

    go.on_click(update)
    return w.VBox([w.HBox([text, go]), out]), update
