"""The audit's figures, each a pure ``make_*(report) -> Figure`` drawn from the report's numbers.

``save_figures`` renders every figure in memory in the project's figure style (fixed fonts, no
timestamps: byte-identical files for the same report) and then writes them with
:class:`gradlab.output.Folder`: atomically, into a folder of its own, with a manifest of content
hashes, so it never overwrites a file it did not write.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradlab.audit.core import AuditReport

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn
    from matplotlib.figure import Figure

__all__ = ["FIGURES", "make_weight_vs_length", "make_histogram", "make_comparison", "save_figures"]

_COLS = 4


def _grid(n: int, sharex: bool = True):
    import matplotlib.pyplot as plt

    cols = min(_COLS, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.0 * rows + 0.6), squeeze=False,
                             sharex=sharex, layout="constrained")
    flat = axes.ravel()
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def make_weight_vs_length(report: AuditReport) -> Figure:
    """Per loss: the pair weight (relative to its mean) against the length difference
    ``len_w - len_l``: median and interquartile band in bins of the length difference."""
    fig, axes = _grid(len(report.losses))
    for ax, (name, s) in zip(axes, report.losses.items(), strict=True):
        b = s["by_length_difference"]
        ax.fill_between(b["length_difference"], b["q25"], b["q75"], color="C0", alpha=0.25, linewidth=0)
        ax.plot(b["length_difference"], b["median"], color="C0", marker=".", markersize=3)
        ax.axhline(1.0, color="0.6", linewidth=0.6)
        ax.axvline(0.0, color="0.6", linewidth=0.6)
        rho = s["corr_weight_length_difference"]
        ax.set_title(f"{name}  (rho {rho:+.2f})" if rho is not None else f"{name}  (constant)", fontsize=8)
    fig.supxlabel("length difference len_w - len_l (tokens)")
    fig.supylabel("weight / mean weight")
    return fig


def make_histogram(report: AuditReport) -> Figure:
    """Per loss: histogram of log10(weight / mean weight) over the pairs with a non-zero weight;
    a spike at 0 is a loss that pushes every pair equally, a long tail to the right one that a
    few pairs dominate, a tail to the left pairs that barely move. Each panel has its own range
    (at least one decade either side of the mean)."""
    fig, axes = _grid(len(report.losses), sharex=False)
    for ax, (name, s) in zip(axes, report.losses.items(), strict=True):
        h = s["histogram"]
        edges, counts = h["log10_relative_edges"], h["counts"]
        if counts:
            total = sum(counts) + h["zero_weight_pairs"]
            ax.stairs([c / total for c in counts], edges, fill=True, color="C1", alpha=0.8)
            ax.set_xlim(min(edges[0], -1.0), max(edges[-1], 1.0))
        ax.axvline(0.0, color="0.6", linewidth=0.6)
        top10 = s["top10_share"]
        title = f"{name}  (top 10%: {top10:.0%})" if top10 is not None else name
        if h["zero_weight_pairs"]:
            title += f", {h['zero_weight_pairs']} at 0"
        ax.set_title(title, fontsize=8)
    fig.supxlabel("log10(weight / mean weight)")
    fig.supylabel("fraction of pairs")
    return fig


def make_comparison(report: AuditReport) -> Figure:
    """Every loss side by side: the share of the gradient carried by the top 10% of pairs, the
    Spearman correlation of the weight with the length difference, and the per-token lever's
    exponent b (lever ~ L^b; 1 is DPO's factor of L, 0 length-neutral)."""
    import matplotlib.pyplot as plt

    names = list(report.losses)
    y = list(range(len(names)))
    fig, axes = plt.subplots(1, 3, figsize=(10, 0.22 * len(names) + 1.4), sharey=True, layout="constrained")
    panels: list[tuple[str, str, float | None]] = [
        ("top10_share", "share of gradient, top 10% of pairs", 0.1),
        ("corr_weight_length_difference", "Spearman rho(weight, len_w - len_l)", 0.0),
        ("lever_exponent", "per-token lever exponent b", None),
    ]
    for ax, (key, label, ref) in zip(axes, panels, strict=True):
        values = [report.losses[n][key] for n in names]
        ax.barh(y, [0.0 if v is None else v for v in values], color=["C0" if v is not None else "0.8" for v in values])
        if ref is not None:
            ax.axvline(ref, color="0.4", linewidth=0.8, linestyle="--")
        else:
            for x in (0.0, 1.0):
                ax.axvline(x, color="0.4", linewidth=0.8, linestyle="--")
        ax.set_xlabel(label)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    n = report.dataset["n_pairs"]
    fig.suptitle(f"{Path(report.source).name}: {n:,} pairs", fontsize=10)
    return fig


FIGURES: dict[str, Any] = {
    "audit_weight_vs_length_difference": make_weight_vs_length,
    "audit_weight_histogram": make_histogram,
    "audit_loss_comparison": make_comparison,
}


def save_figures(report: Any, out: str | os.PathLike, figures: Mapping[str, Any] | None = None) -> list[Path]:
    """Write every audit figure (``figures``: name -> make, default :data:`FIGURES`) into ``out``
    as PNG and SVG (rendered first, then published)."""
    import matplotlib
    import matplotlib.pyplot as plt

    from gradlab import output
    from gradlab.figures import FORMATS, STYLE, _render

    matplotlib.use("Agg", force=True)
    folder = output.Folder(out)  # checked before anything is drawn
    blobs: dict[str, bytes] = {}
    with matplotlib.rc_context(STYLE):
        for name, make in (FIGURES if figures is None else figures).items():
            fig = make(report)
            for fmt in FORMATS:
                blobs[f"{name}.{fmt}"] = _render(fig, fmt)
            plt.close(fig)
    return folder.write(blobs)
