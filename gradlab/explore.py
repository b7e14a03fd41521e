"""Interactive views for the notebooks: everything a notebook shows is computed here.

Each ``*_view`` function builds an ipywidgets panel and returns ``(panel, update)``: ``update``
is the callback the controls call, exposed so that tests (and benchmarks) can drive it
without a browser. Closed-form views prepare their numeric functions once, with the
hyperparameters as arguments, so a slider moves without any sympy work or recompilation.
Training views compile their program once per loss and report progress.

ipywidgets is imported only when a view is built (it is in the ``notebook`` extra).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gradlab import budgets, symbolic
from gradlab.errors import GradlabError
from gradlab.losses import LOSSES, Loss
from gradlab.symbols import VIEWS

__all__ = [
    "gradient_table",
    "posts_facts",
    "atlas_view",
    "length_view",
    "entropy_view",
    "displacement_view",
    "custom_loss_view",
    "limit_view",
    "setup",
    "slider_values",
    "hyper_slider",
]

def gradient_table(loss: str | Loss, views=("log", "probability", "length")) -> str:
    """Markdown/LaTeX of the loss and all its first partials in each view."""
    loss = symbolic.as_loss(loss)
    lines = [f"**{loss.name}**: {loss.title}", "", f"$$\\ell = {symbolic.latex(loss.expr)}$$", ""]
    for view in views:
        lines.append(f"*{view} view*")
        lines.append("")
        for var, expr in symbolic.gradient(loss, view).items():
            lines.append(
                f"- $\\partial\\ell/\\partial {symbolic.latex(symbolic.symbol_of(var))} = {symbolic.latex(expr)}$"
            )
        lines.append("")
    return "\n".join(lines)


def posts_facts() -> list[tuple[str, str, bool]]:
    """The facts of docs/background.md, derived with gradlab and checked numerically: (claim, LaTeX of the
    derived expression, whether a high-precision evaluation agrees with the hand formula)."""
    import mpmath

    point = {"p_w": 0.3, "p_l": 0.02, "q_w": 0.2, "q_l": 0.1}
    beta, gamma = 0.1, 0.3
    z = beta * mpmath.log(point["p_w"] / point["p_l"]) - gamma * mpmath.log(point["q_w"] / point["q_l"])
    sig = 1 / (1 + mpmath.exp(z))  # sigma(-z)
    vals = symbolic.evaluate("gdpo", point, {"beta": beta, "gamma": gamma}, "probability")
    lp = {
        "lp_w": float(mpmath.log(0.3)),
        "lp_l": float(mpmath.log(0.02)),
        "ref_w": float(mpmath.log(0.2)),
        "ref_l": float(mpmath.log(0.1)),
    }
    lvals = symbolic.evaluate("gdpo", lp, {"beta": beta, "gamma": gamma}, "log")
    close = lambda a, b: bool(mpmath.almosteq(a, b, rel_eps=1e-12))  # noqa: E731
    d = lambda w, v: symbolic.latex(symbolic.derivative("gdpo", w, v))  # noqa: E731
    return [
        ("dl/dp+ = -beta sigma(-z) / p+", d("p_w", "probability"), close(vals["p_w"], -beta * sig / point["p_w"])),
        ("dl/dp- = +beta sigma(-z) / p-", d("p_l", "probability"), close(vals["p_l"], beta * sig / point["p_l"])),
        ("log view: equal and opposite", d("lp_w", "log"), close(lvals["lp_w"], -lvals["lp_l"])),
        (
            "dl/dbeta = -sigma(-z) log(p+/p-)",
            d("beta", "probability"),
            close(vals["beta"], -sig * mpmath.log(point["p_w"] / point["p_l"])),
        ),
        (
            "dl/dgamma = sigma(-z) log(q+/q-)",
            d("gamma", "probability"),
            close(vals["gamma"], sig * mpmath.log(point["q_w"] / point["q_l"])),
        ),
        ("dl/dL+ = -sigma(-z)(beta m+ - gamma n+)", d("len_w", "length"), _length_partial()),
        (
            "proper loss: d/dlp_w of p p' l = p p' (dl/dlp_w + l)",
            symbolic.latex(symbolic.derivative("pdpo", "lp_w")),
            _proper_loss_product_rule(),
        ),
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
    _, autodiff, product_rule = pdpo_exact(
        fam, fam.init(jax.random.PRNGKey(0)), fam.init(jax.random.PRNGKey(1)), np.array([0.0, 1.0, -1.0])
    )
    a, b = ravel_pytree(autodiff)[0], ravel_pytree(product_rule)[0]
    return bool(np.linalg.norm(a - b) <= 1e-12 * np.linalg.norm(a))


# --------------------------------------------------------------------------------------------
# Widget views
# --------------------------------------------------------------------------------------------


def setup() -> None:
    """The one setup call a notebook makes (a notebook is an entry point): float64 in JAX (the
    toy-policy training and checks compare closed forms at 1e-12) and the compilation cache,
    through :func:`gradlab.runtime.configure`. Idempotent; every view calls it too."""
    from gradlab import runtime

    runtime.configure()


def _nice(x: float) -> float:
    """The 1-2-5 number at or above ``x`` (a slider step)."""
    e = math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        if m * 10.0**e >= x * (1 - 1e-12):
            return float(f"{m * 10.0**e:.12g}")
    return 10.0 ** (e + 1)  # pragma: no cover - the loop always returns


def suggested_default(name: str) -> float | None:
    """A hyperparameter's default: the one of the first registered loss that uses it, or None."""
    for loss in LOSSES.values():
        value = loss.defaults.get(name)
        if value is not None:
            return float(value)
    return None


def slider_values(loss: Loss, name: str, default: float | None = None) -> tuple[float, ...]:
    """The positions of a hyperparameter's slider: logarithmic (1, 2, 3, 5, 7 per decade, two
    decades either side) for a scale parameter (domain (0, inf)), linear with a 1-2-5 step
    otherwise; always inside the domain, and always containing the default exactly."""
    d = loss.domain(name)
    if default is None:
        default = loss.defaults.get(name)
    default = float(default) if default is not None else suggested_default(name)
    if default is None:
        default = 1.0 if d.contains(1.0) else (0.0 if d.contains(0.0) else d.low + 0.5)
    if d.low == 0 and d.high == math.inf:
        if d.low_open:  # a scale: log slider
            e = math.floor(math.log10(default))
            grid = [float(f"{m * 10.0**k:.12g}") for k in range(e - 2, e + 2) for m in (1, 2, 3, 5, 7)]
        else:  # a non-negative weight or margin: 0 .. about twice the default
            hi = _nice(max(2.0 * default, 1.0))
            grid = _linear(0.0, hi)
    elif math.isfinite(d.low) and math.isfinite(d.high):
        grid = _linear(d.low, d.high)
    else:
        span = _nice(max(1.0, 2.0 * abs(default)))
        lo = d.low if math.isfinite(d.low) else default - span
        hi = d.high if math.isfinite(d.high) else default + span
        grid = _linear(lo, hi)
    values = {v for v in grid if d.contains(v)}
    if d.contains(default):
        values.add(default)
    return tuple(sorted(values))


def _linear(lo: float, hi: float, n: int = 40) -> list[float]:
    step = _nice((hi - lo) / n)
    k0, k1 = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [float(f"{k * step:.12g}") for k in range(k0, k1 + 1)]


def hyper_slider(loss: Loss, name: str, default: float | None = None):
    """A slider over :func:`slider_values` whose readout is the exact value."""
    import ipywidgets as w

    from gradlab.printing import HYPER_TEXT

    values = slider_values(loss, name, default)
    start = default if default is not None else loss.defaults.get(name)
    start = float(start) if start is not None else suggested_default(name)
    if start not in values:
        start = values[len(values) // 2]
    return w.SelectionSlider(
        options=[(f"{v:g}", v) for v in values],
        value=start,
        description=f"{HYPER_TEXT.get(name, name)} ({name})",
        continuous_update=True,
        style={"description_width": "initial"},
        layout=w.Layout(width="60%"),
    )


# Notebook images are rendered at this many pixels per inch and shown one image pixel per CSS
# pixel: 1.5 times a paper figure's nominal size on screen, and never scaled (never blurred).
SCREEN_DPI = 144


def _png(fig) -> bytes:
    """The figure as PNG bytes (what the notebook's Image widget shows)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(SCREEN_DPI)
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf, metadata={"Software": None})
    return buf.getvalue()


def _image(width_in: float):
    """An Image widget as wide as a figure of ``width_in`` inches at :data:`SCREEN_DPI`."""
    import ipywidgets as w

    return w.Image(
        format="png", layout=w.Layout(width=f"{round(width_in * SCREEN_DPI)}px", max_width="100%", height="auto")
    )


class _Blitter:
    """Redraw only some artists of a figure and encode the result as PNG: the axes, ticks and
    labels are drawn once and restored from a cached background, which makes a slider move an
    order of magnitude cheaper than a full matplotlib redraw.

    ``keyed`` artists (colourbars) change only when a key changes (their colour limits, which
    :func:`gradlab.figures.style.log_colour_limits` rounds to half-decades): each is drawn
    once per key over the background, and its pixels (tick labels included) are kept and
    restored while the key stays the same. The result is the same image, pixel for pixel, as
    drawing every artist every time (tested)."""

    def __init__(self, fig, artists, keyed: Sequence[tuple[Any, Callable[[], Any]]] = ()):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        self.fig, self.artists = fig, list(artists)
        self.keyed = list(keyed)
        for a in [*self.artists, *(k[0] for k in self.keyed)]:
            a.set_animated(True)
        self.canvas = FigureCanvasAgg(fig)
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(fig.bbox)
        self._regions: list[dict[Any, Any]] = [{} for _ in self.keyed]

    def _draw_keyed(self, i: int, use_cache: bool) -> None:
        artist, key_of = self.keyed[i]
        key = key_of()
        region = self._regions[i].get(key) if use_cache else None
        if region is not None:
            self.canvas.restore_region(region)
            return
        self.fig.draw_artist(artist)
        if use_cache:
            # every pixel the artist touched: its full extent (tick labels, colourbar label)
            # plus a margin for antialiasing, clipped to the figure
            from matplotlib.transforms import Bbox

            box = Bbox.intersection(artist.get_tightbbox(self.canvas.get_renderer()).padded(2), self.fig.bbox)
            self._regions[i][key] = self.canvas.copy_from_bbox(box)

    def rgba(self, use_cache: bool = True) -> np.ndarray:
        """The redrawn canvas as an (height, width, 4) uint8 array (a view of the canvas)."""
        self.canvas.restore_region(self.background)
        for i in range(len(self.keyed)):  # before the other artists: restoring overwrites
            self._draw_keyed(i, use_cache)
        for a in self.artists:
            self.fig.draw_artist(a)
        return np.asarray(self.canvas.buffer_rgba())

    def png(self, use_cache: bool = True) -> bytes:
        import io

        from PIL import Image

        pixels = self.rgba(use_cache)
        image = Image.fromarray(pixels)
        if pixels[..., 3].min() == 255:  # opaque (the figure's face is): RGB is the same picture, 25% less to encode
            image = image.convert("RGB")
        buf = io.BytesIO()
        image.save(buf, format="png", compress_level=1)
        return buf.getvalue()


def atlas_view(loss: str = "dpo", n: int = 13):
    """Gradient atlas: a loss dropdown, hyperparameter sliders, the formula and gradients, and
    the gradient field in the probability (pi(y_w) + pi(y_l) <= 1) and log views (descent
    directions, unit arrows, colour = log10 speed, with colourbars). Returns ``(panel, update)``;
    ``update(**values)`` redraws, returns the PNG it shows, and moves the sliders to the given
    values, so a value set from code stays set."""
    import ipywidgets as w
    from IPython import get_ipython
    from IPython.display import Markdown, display

    from gradlab.figures import style

    setup()
    dropdown = w.Dropdown(
        options=[(f"{style.display_name(k)} ({k})", k) for k in LOSSES],
        value=symbolic.as_loss(loss).name,
        description="loss",
    )
    sliders_box = w.VBox()
    formula = w.Output()
    label = w.Label()
    image = _image(style.SIZES["page"])
    ps = np.linspace(0.025, 0.975, n)
    P = np.meshgrid(ps, ps)
    inside = P[0] + P[1] <= 1.0
    lps = np.linspace(-4.0, -0.05, n)
    grids = {
        "probability": (np.where(inside, P[0], np.nan), np.where(inside, P[1], np.nan)),
        "log": np.meshgrid(lps, lps),
    }
    with style.use("page"):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(style.SIZES["page"], 2.9), dpi=SCREEN_DPI)
        fig.subplots_adjust(left=0.08, right=0.93, bottom=0.15, top=0.9, wspace=0.75)
        axes = fig.subplots(1, 2)
        quivers, bars = {}, {}
        for ax, (view, (X, Y)) in zip(axes, grids.items(), strict=True):
            quivers[view] = ax.quiver(
                X,
                Y,
                np.zeros_like(X),
                np.zeros_like(Y),
                np.zeros_like(X),
                cmap="viridis",
                pivot="mid",
                scale=17,
                width=0.007,
                clim=(0, 1),
            )
            axes_xy = VIEWS[view].axes
            assert axes_xy is not None  # the field views have axes
            x, y = axes_xy
            ax.set(title=f"{view} view: descent direction", xlabel=style.LABELS[x], ylabel=style.LABELS[y])
            if view == "probability":  # the axes are two probabilities of one distribution: x + y <= 1
                ax.plot([0, 1], [1, 0], color=style.REFERENCE_COLOUR, lw=0.8, ls="--")
                ax.set(xlim=(0, 1), ylim=(0, 1))
            ax.set_aspect("equal", adjustable="box")
            bars[view] = style.colourbar(fig, quivers[view], ax, style.LABELS["speed"], shrink=0.9, pad=0.04)
        blitter = _Blitter(fig, quivers.values(), keyed=[(b.ax, b.mappable.get_clim) for b in bars.values()])
    state: dict[str, Any] = {}

    def update(change: Any = None, **values: float) -> bytes:
        """Redraw for the current (or given) hyperparameter values: numpy only, no sympy."""
        for k, v in values.items():
            slider = state["sliders"].get(k)
            if slider is None:
                raise GradlabError(
                    f"{state['loss']} has no hyperparameter {k!r}; it has: {', '.join(state['sliders']) or 'none'}"
                )
            options = dict(slider.options).values()
            # moving the slider from code must not call update again (that drew every frame
            # twice): new options also move the value, so both happen while it is unobserved
            slider.unobserve(update, names="value")
            try:
                if float(v) not in options:  # keep the slider on its grid: add the value as a position
                    slider.options = [(f"{o:g}", o) for o in sorted({*options, float(v)})]
                with slider.hold_trait_notifications():
                    slider.value = float(v)
            finally:
                slider.observe(update, names="value")
        current = {k: float(s.value) for k, s in state["sliders"].items()}
        with style.use("page"):
            for view, (X, Y) in grids.items():
                gx, gy = symbolic.field(state["loss"], view)(X, Y, current)
                mag = np.hypot(gx, gy)
                with np.errstate(divide="ignore", invalid="ignore"):
                    C = np.log10(mag)
                    quivers[view].set_UVC(-gx / mag, -gy / mag, C)
                quivers[view].set_clim(*style.log_colour_limits(C))
            label.value = f"{style.display_name(state['loss'])}: " + ", ".join(
                f"{k} = {style.number(v)}" for k, v in current.items()
            )
            png = blitter.png()
        image.value = png
        return png

    def select(change: Any = None) -> None:
        state["loss"] = dropdown.value
        loss_obj = symbolic.as_loss(dropdown.value)
        for view in grids:
            symbolic.field(loss_obj.name, view)  # compile once per loss
        state["sliders"] = {h: hyper_slider(loss_obj, h) for h in loss_obj.hyperparameters}
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


def limit_view(loss: str = "gdpo"):
    """|dl/dpi(y_l)| against pi(y_l) on log axes, with a beta slider: the slope is beta - 1, so
    the force diverges as pi(y_l) -> 0 for every beta < 1. Returns ``(panel, update)``."""
    import ipywidgets as w

    from gradlab.checks import hyper_value
    from gradlab.figures import style

    setup()
    loss_obj = symbolic.as_loss(loss)
    args = [*symbolic.variables(loss_obj, "probability"), *loss_obj.hyperparameters]
    f = symbolic.numeric(symbolic.derivative(loss_obj, "p_l", "probability"), args)
    beta = hyper_slider(loss_obj, "beta")
    image = _image(style.SIZES["column"])
    p_l = np.geomspace(1e-8, 0.5, 200)

    def update(change: Any = None) -> bytes:
        values = {h: hyper_value(loss_obj, h) for h in loss_obj.hyperparameters}
        values.update(beta=float(beta.value), gamma=float(beta.value)) if "gamma" in values else values.update(
            beta=float(beta.value)
        )
        point = {"p_w": 0.5, "p_l": p_l, "q_w": 0.5, "q_l": 0.5, **values}
        g = np.abs(np.broadcast_to(f(*[point[a] for a in args]), p_l.shape))
        with style.use("column"):
            fig = style.figure(0.75)
            ax = fig.subplots()
            ax.loglog(p_l, g, **style.series(0))
            b = values["beta"]
            ax.set(
                xlabel=style.LABELS["p_l"],
                ylabel=style.LABELS["force"],
                title=rf"{style.display_name(loss_obj)}, $\beta=\gamma={style.number(b)}$: slope $\beta-1$",
            )
            style.finish(fig)
            png = _png(fig)
        image.value = png
        return png

    beta.observe(update, names="value")
    update()
    return w.VBox([beta, image]), update


def length_view(losses=("dpo", "sigmoid_norm", "simpo", "ipo")):
    """Force against length (closed form, mpmath) and the equal-length training experiment."""
    import ipywidgets as w

    from gradlab import experiments
    from gradlab.experiments import analysis, named
    from gradlab.figures import style
    from gradlab.figures.length_force import _curve

    setup()
    loss_pick = w.SelectMultiple(
        options=[(f"{style.display_name(k)} ({k})", k) for k in LOSSES],
        value=tuple(losses),
        description="losses",
        rows=6,
    )
    m = w.SelectionSlider(
        options=[(f"{v:g}", v) for v in np.round(np.arange(-3.0, -0.05, 0.1), 10)],
        value=-1.0,
        description="per-token mean m",
        style={"description_width": "initial"},
    )
    wide = {"description_width": "initial"}  # the whole label, never cut to "max conte..."
    max_k = w.IntSlider(value=5, min=2, max=7, description="max content tokens", style=wide)
    steps = w.IntSlider(value=150, min=10, max=600, step=10, description="training steps", style=wide)
    run = w.Button(description="train on equal-length data", layout=w.Layout(width="auto"))
    progress = w.IntProgress(min=0, max=1, description="training")
    left_image, right_image = _image(style.SIZES["column"]), _image(style.SIZES["column"])
    lengths = np.arange(1, 101)

    def update(change: Any = None) -> bytes:
        with style.use("column"):
            fig = style.figure(1.0)
            ax = fig.subplots()
            for i, loss in enumerate(loss_pick.value):
                ax.plot(
                    lengths,
                    _curve(loss, "p_l", "probability", lengths, float(m.value)),
                    label=style.display_name(loss),
                    **style.series(i, marker=True, markevery=20),
                )
            ax.set(
                xlabel="length $L$ of both responses",
                ylabel=style.LABELS["log_force"],
                title=f"probability-view force, $m = {style.number(float(m.value))}$",
            )
            fig.legend(loc="outside lower center", ncols=2)  # below the axes: the curves fill them
            png = _png(fig)
        left_image.value = png
        return png

    def train(_: Any = None) -> bytes:
        chosen = list(loss_pick.value)
        progress.max, progress.value = len(chosen), 0
        with style.use("column"):
            fig = style.figure(1.0)
            ax = fig.subplots()
            for i, loss in enumerate(chosen):
                # the experiment runner, as `gradlab simulate LOSS --max-len K --steps N` runs it
                result = experiments.simulate(loss, policy="unigram", dataset="equal_length", steps=steps.value,
                                              seeds=4, max_len=max_k.value + 1,
                                              sets={"train.metrics": ["expected_length"]})
                el = result.series("expected_length").T  # (records, seeds)
                at = result.runs[0].steps
                # median [min, max] over seeds, as the length_drift figure quotes its factors
                factor = named.spread_text(analysis.drift_factor(result), seeds=False)
                s = style.series(i, marker=True, markevery=max(1, len(at) // 6))
                ax.plot(at, np.median(el, 1), label=f"{style.display_name(loss)} (×{factor})", **s)
                for edge in (el.min(1), el.max(1)):  # seed range as thin lines: fills would overlap
                    ax.plot(at, edge, color=s["color"], ls=s["linestyle"], lw=0.5, alpha=0.6)
                progress.value = i + 1
            # the setting the factors come from, read back from the run: the cut-off caps the length
            # (and so the drift factor) at max_k + 1 tokens; the uncapped drift is the length_drift figure's
            train_cfg = result.config["train"]
            ax.set(xlabel="training step", ylabel="expected length (tokens)",
                   title=f"{train_cfg['optimizer']} lr {style.number(train_cfg['lr'])}, {train_cfg['steps']} steps, "
                         f"{len(train_cfg['seeds'])} seeds, cut-off at {max_k.value + 1} tokens\n"
                         "(the cut-off caps the drift)")
            fig.legend(title="loss (drift factor: median [min, max] over seeds)", loc="outside lower center")
            png = _png(fig)
        right_image.value = png
        return png

    for control in (loss_pick, m):
        control.observe(update, names="value")
    run.on_click(train)
    update()
    return (
        w.VBox([loss_pick, m, w.HBox([max_k, steps]), w.HBox([run, progress]), w.HBox([left_image, right_image])]),
        update,
        train,
    )


def entropy_view():
    """Entropy of the closed-form optimum pi* against beta, gamma/beta and H-DPO's alpha."""
    import ipywidgets as w
    import jax

    from gradlab.experiments.analysis import entropy, optimal_policy
    from gradlab.figures import style
    from gradlab.policies import make_family

    setup()
    fam = make_family("tabular", vocab=3, max_len=3)
    ref = fam.init(jax.random.PRNGKey(0), 0.5)
    betas = np.geomspace(0.1, 5, 60)
    grid = [float(f"{v:.12g}") for v in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)]
    ratio = w.SelectionSlider(
        options=[(f"{v:g}", v) for v in grid], value=1.0, description="γ/β", style={"description_width": "initial"}
    )
    alpha = w.SelectionSlider(
        options=[(f"{v:g}", v) for v in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5)],
        value=1.0,
        description="H-DPO α",
        style={"description_width": "initial"},
    )
    image = _image(style.SIZES["column"])

    def update(change: Any = None) -> bytes:
        h = [entropy(optimal_policy(fam, ref, b, ratio.value * b)) for b in betas]
        ha = [entropy(optimal_policy(fam, ref, alpha.value * b, b)) for b in betas]
        with style.use("column"):
            fig = style.figure(0.8)
            ax = fig.subplots()
            ax.plot(betas, h, label=rf"optimum, $\gamma/\beta = {style.number(ratio.value)}$", **style.series(0))
            ax.plot(betas, ha, label=rf"H-DPO optimum, $\alpha = {style.number(alpha.value)}$", **style.series(1))
            ax.set(xscale="log", xlabel=r"$\beta$", ylabel="sequence entropy (nats)")
            ax.legend()
            style.finish(fig)
            png = _png(fig)
        image.value = png
        return png

    for s in (ratio, alpha):
        s.observe(update, names="value")
    update()
    return w.VBox([ratio, alpha, image]), update


def displacement_view():
    """Likelihood displacement on the shared-parameter linear head, per loss."""
    import ipywidgets as w

    from gradlab import experiments
    from gradlab.figures import style

    setup()
    pick = w.Dropdown(options=[(f"{style.display_name(k)} ({k})", k) for k in LOSSES], value="dpo", description="loss")
    steps = w.IntSlider(value=200, min=10, max=600, step=10, description="steps", continuous_update=False)
    image = _image(style.SIZES["column"])

    def update(change: Any = None) -> bytes:
        # a linear head (4 content tokens + EOS, 2-dimensional features, cut-off 4) on the pair of
        # single-token responses with the most similar unembeddings; an exploration, not
        # Razin et al.'s condition (that is the displacement figure and its reproduction entry)
        result = experiments.simulate(pick.value, policy="linear_head", vocab=4, max_len=4,
                                      dataset="similar_embeddings", steps=steps.value, seeds=4,
                                      sets={"policy.dim": 2, "policy.scale": 0.5, "train.metrics": ["lp_w", "lp_l"]})
        at = result.runs[0].steps
        with style.use("column"):
            fig = style.figure(0.8)
            ax = fig.subplots()
            for i, name in enumerate(("lp_w", "lp_l")):
                y = result.series(name).mean(-1).T  # (records, seeds): the mean over the (identical) pairs
                s = style.series(i)
                ax.plot(at, y.mean(1), label=style.LABELS[name], **s)
                ax.fill_between(at, y.min(1), y.max(1), color=s["color"], alpha=0.12, lw=0)
            ax.set(
                title=f"{style.display_name(pick.value)}: similar-embedding pair",
                xlabel="training step",
                ylabel="log-probability",
            )
            ax.legend()
            png = _png(fig)
        image.value = png
        return png

    for c in (pick, steps):
        c.observe(update, names="value")
    update()
    return w.VBox([w.HBox([pick, steps]), image]), update


def custom_loss_view(formula: str = "log(1 + exp(-beta*((lp_w - ref_w) - (lp_l - ref_l))))", **values: float):
    """Bring your own loss: parse safely, build a control for each hyperparameter the formula
    uses (pre-filled with the value a registered loss uses, empty where none does), derive,
    draw the gradient field, check on toy policies and place the loss in the scorecard.

    Every failure is shown as a message in the panel, never raised into the kernel.
    Returns ``(panel, analyse)``; ``analyse()`` returns what it showed as a dict."""
    import ipywidgets as w
    from IPython import get_ipython
    from IPython.display import Markdown, display

    from gradlab import checks, experiments, losses
    from gradlab.experiments import named
    from gradlab.figures import style
    from gradlab.figures.gradient_field import quiver_panel
    from gradlab.printing import HYPER_TEXT

    setup()
    text = w.Text(value=formula, description="loss =", layout=w.Layout(width="80%"))
    go = w.Button(description="analyse")
    controls = w.VBox()
    message = w.HTML()
    image = _image(style.SIZES["page"])
    out = w.Output()
    fields: dict[str, Any] = {}
    remembered: dict[str, str] = {k: f"{v:g}" for k, v in values.items()}

    def _say(title: str = "", detail: str = "") -> None:
        """Show a message: every text is escaped here, the one place the widget's HTML is made
        (a field value or an error message may hold markup)."""
        message.value = f"<b>{html.escape(title)}</b> {html.escape(detail)}" if title else ""

    def _controls_for(names: list[str]) -> None:
        for k, f in fields.items():
            remembered[k] = f.value
        fields.clear()
        for name in names:
            known = remembered.get(name)
            if known is None:
                d = suggested_default(name)
                known = "" if d is None else f"{d:g}"
            fields[name] = w.Text(
                value=known,
                description=f"{HYPER_TEXT.get(name, name)} ({name})",
                placeholder="value required",
                style={"description_width": "initial"},
                continuous_update=False,
            )  # a committed edit (Enter or leaving the field)
            fields[name].observe(lambda _: analyse(), names="value")
        controls.children = tuple(fields.values())

    def _values(loss: Loss) -> dict[str, float] | None:
        missing, bad, got = [], [], {}
        for name, field in fields.items():
            raw = field.value.strip()
            if not raw:
                missing.append(name)
                continue
            try:
                v = float(raw)
            except ValueError:
                bad.append(f"{name} = {raw!r} is not a number")
                continue
            if not loss.domain(name).contains(v):
                bad.append(f"{name} = {v:g} is outside its range {loss.domain(name)}")
                continue
            got[name] = v
        if missing or bad:
            _say(*(("Enter a value for:", ", ".join(missing)) if missing else ("Not accepted:", "; ".join(bad))))
            return None
        return got

    def analyse(_: Any = None) -> dict[str, Any]:
        out.clear_output()
        _say()
        try:
            with budgets.timed("analyse_s", "analysing the custom loss"):  # a huge formula is stopped
                return _analyse()
        except GradlabError as exc:  # shown to the user, never raised into the kernel
            _say("Not accepted:", str(exc))
            return {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a notebook shows every failure as a message
            _say("gradlab could not analyse this formula", f"({type(exc).__name__}): {exc}")
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _analyse() -> dict[str, Any]:
        parsed = losses.custom(text.value, name="yours")
        if sorted(fields) != sorted(parsed.hyperparameters):
            _controls_for(list(parsed.hyperparameters))
        chosen = _values(parsed)
        if chosen is None:
            return {"error": "missing or invalid hyperparameter values", "needs": sorted(fields)}
        loss = losses.custom(text.value, name="yours", defaults=chosen)
        result: dict[str, Any] = {"loss": loss, "values": chosen}
        result["png"] = image.value = _field_png(loss)
        rows = [checks.check(loss, fam, points=64) for fam in ("unigram", "bigram")]
        result["checks"] = rows
        lines = [
            f"- check on {r.family}: max relative error {r.max_rel_error:.1e} ({'ok' if r.ok else 'FAIL'})"
            for r in rows
        ]
        if set(loss.variables) <= {"lp_w", "lp_l", "ref_w", "ref_l", "len_w", "len_l"}:
            from gradlab.figures import scorecard

            # gradlab simulate's defaults: the Adam run of the named length_drift setting that the
            # scorecard's Adam column quotes (exact unbounded unigram, 300 steps, 8 seeds), here at
            # the hyperparameters chosen above (the scorecard uses beta 0.1 for every loss)
            trained = experiments.simulate(expr=text.value,
                                           sets={**chosen, "train.metrics": ["expected_length", "lp_w"]})
            lp_w = trained.series("lp_w").mean(-1)  # (seeds, records): the mean over the equally weighted pairs
            has_p_l = "p_l" in symbolic.variables(loss, "probability")
            row = {
                "force exponent s": scorecard.force_exponent(loss) if has_p_l else float("nan"),
                "length drift factor (Adam, median over seeds)": float(np.median(named.drift_factors(trained))),
                "change in lp_w": float((lp_w[:, -1] - lp_w[:, 0]).mean()),
            }
            result["scorecard"] = row
            lines.append(
                "\nScorecard row (compare with `figures/scorecard.md`): "
                + ", ".join(f"{k} = {v:.3f}" for k, v in row.items())
            )
        if get_ipython() is not None:
            with out:
                display(Markdown(gradient_table(loss, views=("log", "probability"))))
                display(Markdown("\n".join(lines)))
        return result

    def _field_png(loss: Loss) -> bytes:
        n = 11
        ps = np.linspace(0.04, 0.96, n)
        X, Y = np.meshgrid(ps, ps)
        X, Y = np.where(X + Y <= 1, X, np.nan), np.where(X + Y <= 1, Y, np.nan)
        lps = np.linspace(-4.0, -0.05, n)
        LX, LY = np.meshgrid(lps, lps)
        with style.use("page"):
            fig = style.figure(0.42)
            axes = fig.subplots(1, 2)
            for ax, view, (A, B) in zip(axes, ("probability", "log"), ((X, Y), (LX, LY)), strict=True):
                # a custom loss is new each time: its field is compiled here, not kept
                defaults = {h: checks.hyper_value(loss, h) for h in loss.hyperparameters}
                gx, gy = symbolic.Field(loss, VIEWS[view])(A, B, defaults)
                axes_xy = VIEWS[view].axes
                assert axes_xy is not None  # the field views have axes
                x, y = axes_xy
                # the gallery's arrows (gradient_field): thin default arrows read as faint
                q = quiver_panel(ax, A, B, gx, gy, f"{view} view: descent direction", style.LABELS[x],
                                 style.LABELS[y])
                q.set_clim(*style.log_colour_limits(q.get_array()))
                style.colourbar(fig, q, ax, style.LABELS["speed"], shrink=0.9)
            return _png(fig)

    go.on_click(analyse)
    return w.VBox([w.HBox([text, go]), controls, message, image, out]), analyse


