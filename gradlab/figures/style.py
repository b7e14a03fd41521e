"""The one figure style: every figure and every notebook view draws through this module.

- Sizes: ``column`` (3.3 in, a single column of a two-column paper) and ``page`` (6.8 in, the
  full text width). A figure asks for its width with :func:`figure` and never names inches.
- One font (DejaVu Sans, matplotlib's bundled font, for text and mathtext alike), so PNG, SVG
  (text kept as text) and PDF (TrueType embedded) agree.
- Okabe & Ito's colour-blind-safe palette, with a line style per series as a second channel
  (:func:`series`), so curves stay distinguishable in grey scale and where they overlap.
- Mathtext labels (:data:`LABELS`, :func:`hyper_label`) and display names for losses
  (:func:`display_name`).
- Numbers in text through :func:`number`, which rounds to what the figure can show, so no
  floating-point noise reaches a title or a legend.

The style is applied with :func:`use`, a context manager; importing this module changes nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["SIZES", "PALETTE", "LINESTYLES", "MARKERS", "LABELS", "rc", "use", "size", "figure", "series",
           "display_name", "hyper_label", "number", "finish", "log_colour_limits", "rounding_noise", "say"]

# width in inches of each size (a two-column paper's column and text width)
SIZES: dict[str, float] = {"column": 3.3, "page": 6.8}

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision
# deficiency. Black last: it is also the reference/annotation colour.
PALETTE: tuple[str, ...] = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
LINESTYLES: tuple[Any, ...] = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)), (0, (1, 1)),
                               (0, (3, 2, 1, 2)))
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*")
REFERENCE_COLOUR = "0.45"

_SIZE: contextvars.ContextVar[str] = contextvars.ContextVar("gradlab_figure_size", default="page")

# canonical variables and views, as mathtext
LABELS: dict[str, str] = {
    "p_w": r"$\pi(y_w)$", "p_l": r"$\pi(y_l)$",
    "q_w": r"$\pi_{\mathrm{ref}}(y_w)$", "q_l": r"$\pi_{\mathrm{ref}}(y_l)$",
    "lp_w": r"$\log\pi(y_w)$", "lp_l": r"$\log\pi(y_l)$",
    "ref_w": r"$\log\pi_{\mathrm{ref}}(y_w)$", "ref_l": r"$\log\pi_{\mathrm{ref}}(y_l)$",
    "len_w": r"$|y_w|$", "len_l": r"$|y_l|$", "m_l": r"$m_l$", "m_w": r"$m_w$",
    "force": r"$|\partial\ell/\partial\pi(y_l)|$",
    "log_force": r"$\log_{10}|\partial\ell/\partial\pi(y_l)|$",
    "lever": r"$|\partial\ell/\partial m_l|$",
    "speed": r"$\log_{10}\|\nabla\ell\|$",
    "pi0": r"$\pi_0$",
}

# display names of registered losses, as their papers (and TRL) write them
_DISPLAY: dict[str, str] = {
    "dpo": "DPO", "gdpo": "two-coefficient DPO", "cdpo": "cDPO", "robust": "robust DPO", "hinge": "hinge",
    "ipo": "IPO", "ipo_trl": "IPO (TRL)", "exo_pair": "EXO", "nca_pair": "NCA", "bco_pair": "BCO",
    "sppo_hard": "SPPO (hard)", "apo_zero": "APO-zero", "apo_down": "APO-down", "discopop": "DiscoPOP",
    "sigmoid_norm": "DPO (length-norm.)", "rpo": "RPO", "fdpo_fkl": "f-DPO (forward KL)",
    "fdpo_js": "f-DPO (JS)", "fdpo_alpha": r"f-DPO ($\alpha$-div.)", "fdpo_alpha_trl": r"f-DPO ($\alpha$-div., TRL)",
    "r_dpo": "R-DPO", "dpop": "DPOP", "h_dpo": "H-DPO", "ld_dpo": "LD-DPO", "ld_dpo_trl": "LD-DPO (TRL)",
    "simpo": "SimPO", "simpo_trl": "SimPO (TRL)", "cpo": "CPO", "orpo": "ORPO", "slic": "SLiC-HF",
    "kto": "KTO", "pdpo": "proper DPO", "cpo_hinge": "CPO (hinge)", "cpo_ipo": "CPO (IPO)", "alphapo": "AlphaPO",
    "sft": "SFT", "apo_zero_unpaired": "APO-zero (unpaired)",
}


def display_name(loss: Any) -> str:
    """How a paper names a loss: ``dpo`` -> DPO, ``ipo_trl`` -> IPO (TRL). A loss gradlab has no
    display name for (a custom one, a weighted combination) keeps its own name."""
    name = getattr(loss, "name", loss)
    if name in _DISPLAY:
        return _DISPLAY[name]
    return str(name).replace("_", r"\_") if "$" not in str(name) else str(name)


def hyper_label(name: str) -> str:
    """A hyperparameter as mathtext (``beta`` -> ``$\\beta$``), from the printing layer's table."""
    from gradlab.printing import latex_symbol

    return f"${latex_symbol(name)}$"


def number(x: float, digits: int = 3) -> str:
    """``x`` with at most ``digits`` significant digits and no trailing noise: 0.1 -> '0.1',
    2.0 -> '2', 5.6e-16 -> '6e-16'. Use it for every number that reaches a text element."""
    if not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return f"{x:.{digits}g}"


def rc(which: str | None = None) -> dict[str, Any]:
    """The matplotlib rc settings of the style at a size (the current one by default)."""
    from cycler import cycler

    which = which or _SIZE.get()
    base = 8.0 if which == "page" else 7.0
    return {
        "font.family": "DejaVu Sans",
        "mathtext.fontset": "dejavusans",
        "font.size": base,
        "axes.titlesize": base,
        "axes.labelsize": base,
        "xtick.labelsize": base - 1,
        "ytick.labelsize": base - 1,
        "legend.fontsize": base - 1,
        "legend.title_fontsize": base - 1,
        "legend.handlelength": 2.8,  # long enough to show a dash-dot pattern
        "legend.framealpha": 0.9,
        "figure.titlesize": base + 1,
        "axes.prop_cycle": cycler(color=list(PALETTE)) + cycler(linestyle=list(LINESTYLES)),
        "axes.grid": True,
        "grid.alpha": 0.3,
        "grid.linewidth": 0.5,
        "lines.linewidth": 1.3,
        "lines.markersize": 4,
        "axes.formatter.limits": (-3, 4),
        "axes.formatter.use_mathtext": True,
        "image.cmap": "viridis",
        # deterministic output: fixed SVG ids, text kept as text, fonts embedded as TrueType
        "svg.hashsalt": "gradlab",
        "svg.fonttype": "none",
        "pdf.fonttype": 42,
        "ps.fonttype": 42,
        "path.simplify": False,
        "figure.dpi": 100,
        "savefig.dpi": 200,
    }


@contextlib.contextmanager
def use(which: str = "page") -> Iterator[None]:
    """Draw in the style at size ``which`` ('column' or 'page') inside the block."""
    import matplotlib

    if which not in SIZES:
        from gradlab.errors import GradlabError

        raise GradlabError(f"unknown figure size '{which}'; the sizes are: {', '.join(SIZES)}")
    token = _SIZE.set(which)
    try:
        with matplotlib.rc_context(rc(which)):  # type: ignore[arg-type]  # matplotlib's stubs list rc keys as literals
            yield
    finally:
        _SIZE.reset(token)


def size() -> str:
    """The size being drawn: 'column' or 'page'."""
    return _SIZE.get()


def figure(aspect: float = 0.45, *, column_aspect: float | None = None):
    """A new constrained-layout ``Figure`` at the current width; height = width * aspect (a
    figure may ask for a different aspect when it is drawn a column wide)."""
    from matplotlib.figure import Figure

    width = SIZES[size()]
    if size() == "column" and column_aspect is not None:
        aspect = column_aspect
    return Figure(figsize=(width, round(width * aspect, 3)), layout="constrained")


def grid(n: int) -> tuple[int, int]:
    """Rows and columns for ``n`` side-by-side panels: one row on a page, one column in a column."""
    return (1, n) if size() == "page" else (n, 1)


def series(i: int, *, marker: bool = False, markevery: int | None = None) -> dict[str, Any]:
    """Colour, line style (and optionally a marker) of the ``i``-th series. Markers are placed
    at staggered positions, so curves that lie on top of each other stay visible."""
    style: dict[str, Any] = {"color": PALETTE[i % len(PALETTE)], "linestyle": LINESTYLES[i % len(LINESTYLES)]}
    if marker:
        style["marker"] = MARKERS[i % len(MARKERS)]
        style["markersize"] = 3.5
        if markevery:
            style["markevery"] = (i * max(1, markevery // 5) % markevery, markevery)
    return style


def coinciding(curves: dict[str, Any], rtol: float = 1e-9) -> list[list[str]]:
    """The keys of ``curves`` grouped by identical curves, in order: a curve is an array or a tuple
    of arrays (one per panel), identical when every array agrees to ``rtol``, relative. A line drawn
    over an identical one would hide it, so each group is drawn once, labelled with every name."""
    import numpy as np

    def parts(curve: Any) -> tuple:
        return tuple(curve) if isinstance(curve, tuple) else (curve,)

    groups: list[list[str]] = []
    for key, curve in curves.items():
        for group in groups:
            first = parts(curves[group[0]])
            if len(first) == len(parts(curve)) and all(
                    np.allclose(a, b, rtol=rtol, atol=0) for a, b in zip(parts(curve), first, strict=True)):
                group.append(key)
                break
        else:
            groups.append([key])
    return groups


def log_colour_limits(values: Any, min_span: float = 1.0) -> tuple[float, float]:
    """Colour limits for log10 data: whole (or half) decades around the finite values, at least
    ``min_span`` decades wide, so a colourbar never spans a meaningless 0.008 decades."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = math.floor(float(v.min()) * 2) / 2, math.ceil(float(v.max()) * 2) / 2
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = math.floor(mid - min_span / 2), math.floor(mid - min_span / 2) + min_span
        if float(v.max()) > hi:
            lo, hi = lo + 1, hi + 1
    return lo, hi


def rounding_noise(values: Any, scale: float = 1.0, ulps: float = 1000.0) -> float | None:
    """The largest |value| when every value is float64 rounding noise for quantities of size
    ``scale`` (within ``ulps`` units in the last place of it, 2.2e-13 at scale 1), else None.
    Such values are said in words (:func:`say`), never plotted as if they were signal."""
    import numpy as np

    v = np.abs(np.asarray(values, dtype=float))
    if v.size == 0 or not np.all(np.isfinite(v)):
        return None
    largest = float(v.max())
    return largest if largest <= ulps * float(np.finfo(float).eps) * scale else None


def say(ax, text: str) -> None:
    """A panel that states its finding in words instead of plotting it (no axes, no ticks)."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)


def finish(fig) -> Any:
    """Last touches shared by every figure: log axes keep only labelled decades (no 3x10^-1 minor
    labels), and legends that would show an empty handle get one drawn. Ticks a figure placed
    itself (``set_xticks``: the values it drew at) are kept, labelled with :func:`number`."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    for ax in fig.axes:
        for axis, scale, lims in ((ax.xaxis, ax.get_xscale(), ax.get_xlim()),
                                  (ax.yaxis, ax.get_yscale(), ax.get_ylim())):
            if scale != "log":
                continue
            axis.set_minor_formatter(NullFormatter())
            lo, hi = sorted(lims)
            if isinstance(axis.get_major_locator(), FixedLocator):
                axis.set_major_formatter(FuncFormatter(lambda v, _: number(v)))
            elif lo > 0 and math.log10(hi / lo) < 2:
                # under two decades: label 1-2-5 positions with plain numbers (0.2, 0.5, 1, 2)
                axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(FuncFormatter(lambda v, _: number(v)))
            else:
                axis.set_major_locator(LogLocator(base=10, numticks=6))
    return fig


def colourbar(fig, mappable, ax: Any, label: str, **kwargs: Any):
    """A colourbar with the style's label, integer-decade ticks where the range allows."""
    from matplotlib.ticker import MaxNLocator

    cb = fig.colorbar(mappable, ax=ax, **kwargs)
    cb.set_label(label)
    cb.locator = MaxNLocator(nbins=5, steps=[1, 2, 5, 10])
    cb.update_ticks()
    return cb


def sequence_tail(items: Sequence[str]) -> str:
    """'a, b and c' for captions and titles."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
