"""The rollout audit's figure, a pure ``make_*(report) -> Figure`` drawn from the report's numbers,
written by the pair audit's writer (:func:`gradlab.audit.figures.save_figures`): rendered in the
shared style, then published through :class:`gradlab.output.Folder`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gradlab.audit.figures import _grid
from gradlab.audit.rollouts import RolloutReport

__all__ = ["FIGURES", "make_weight_vs_length", "save_figures"]


def _panels(report: RolloutReport) -> list[dict[str, Any]]:
    """One configuration per loss: the first scale_rewards audited for it (its default where audited)."""
    seen: dict[str, dict[str, Any]] = {}
    for s in report.configurations:
        seen.setdefault(s["loss_type"], s)
    return list(seen.values())


def make_weight_vs_length(report: RolloutReport):
    """Per loss: the median |per-token weight| against completion length (log-log), for correct
    (advantage > 0) and incorrect (advantage < 0) responses; a slope of -1 is grpo's 1/|o_i|, a
    flat line a length-neutral normaliser."""
    from matplotlib.ticker import NullFormatter

    panels = _panels(report)
    fig, axes = _grid(len(panels))
    for ax, s in zip(axes, panels, strict=True):
        d = s["by_length"]
        ax.plot(d["length"], d["correct"], color="C0", marker=".", markersize=3, label="correct")
        ax.plot(d["length"], d["incorrect"], color="C3", marker=".", markersize=3, label="incorrect")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # decades only: minor labels collide on a narrow panel
            axis.set_minor_formatter(NullFormatter())
        b = s["per_token_weight_exponent"]
        fit = f"|w/A| ~ L^{b:.2f}" if b is not None else "no fit"
        ax.set_title(f"{s['loss_type']} ({s['scale_rewards']}): {fit}", fontsize=8)
    axes[0].legend(fontsize=7, frameon=False)
    fig.supxlabel("completion length |o_i| (tokens)")
    fig.supylabel("median |per-token weight|")
    return fig


FIGURES: dict[str, Any] = {"audit_rollout_weight_vs_length": make_weight_vs_length}


def save_figures(report: RolloutReport, out: str | os.PathLike) -> list[Path]:
    """Write the rollout audit's figures into ``out`` as PNG and SVG, through the pair audit's writer."""
    from gradlab.audit import figures

    return figures.save_figures(report, out, FIGURES)
