"""The human summary of a run: one table, initial -> final for every metric and setting."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlab.experiments.runner import Result

__all__ = ["summary"]

MAX_SHOWN = 6  # vectors up to this length are printed in full, longer ones by their mean


def _fmt(v: np.ndarray) -> str:
    v = np.asarray(v, dtype=float)
    if v.ndim == 0:
        return f"{float(v):.6g}"
    flat = v.ravel()
    if flat.size <= MAX_SHOWN:
        return "[" + " ".join(f"{x:.4g}" for x in flat) + "]"
    return f"mean {np.nanmean(flat):.6g} (of {flat.size})"


def _setting_label(setting: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "-"


def summary(result: Result) -> str:
    """Mean over seeds of each metric at the first and the last recorded step, per setting."""
    cfg = result.config
    t = cfg["train"]
    keys = [k for k in cfg["sweep"] if k != "zip"] + list(cfg["sweep"].get("zip", {}))
    swept = {k.split(".")[1] for k in keys}
    loss = "(swept loss)" if swept & {"name", "expr"} else cfg["loss"]["resolved"]
    opt = t["optimizer"] + ("(" + ", ".join(f"{k}={v}" for k, v in t["optimizer_args"].items()) + ")"
                            if t["optimizer_args"] else "")
    opt = "(swept optimiser)" if "optimizer" in swept else opt
    lr = "swept" if "lr" in swept else f"{t['lr']:g}"
    seeds = len(t["seeds"])
    head = (f"{loss} on {cfg['policy']['family']} / {cfg['data']['kind']}: {opt}, lr={lr}, "
            f"{t['steps']} steps, batch {t['batch_size']}, {seeds} seed{'s' * (seeds > 1)} (mean over seeds)")
    settings: list[dict[str, Any]] = []
    for r in result.runs:
        if r.setting not in settings:
            settings.append(r.setting)
    rows = [("setting", "metric", "initial", "final")]
    for s in settings:
        runs = [r for r in result.runs if r.setting == s]
        for name in runs[0].metrics:
            series = np.stack([r.metrics[name] for r in runs])  # (seeds, records, ...)
            rows.append((_setting_label(s), name, _fmt(series[:, 0].mean(0)), _fmt(series[:, -1].mean(0))))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [head, ""]
    for i, (a, b, c, d) in enumerate(rows):
        arrow = "  ->  " if i else "      "
        lines.append(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}{arrow}{d}")
    return "\n".join(lines)
