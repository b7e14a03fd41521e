"""Bring your own data: what each loss will do to a real preference dataset.

``gradlab audit DATA`` (and :func:`audit`) reads a JSON Lines, CSV or Parquet file with one row
per pair and TRL's column names, evaluates every loss's closed-form gradients at every pair
(:mod:`gradlab.audit.gradients`), and reports which pairs dominate, how the push depends on
length, the per-token lever, and the dataset's own length statistics (:mod:`gradlab.audit.stats`).
:func:`generate` writes a dataset whose right answer is known. RL rollout logs (GRPO family) are
audited by :func:`audit_rollouts` (:mod:`gradlab.audit.rollouts`), and :func:`generate_rollouts`
writes one with a known answer. See ``docs/audit.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

from gradlab.audit.core import AuditReport, audit, render, verdict
from gradlab.audit.generate import generate, generate_rollouts, write
from gradlab.audit.io import AuditInputError, Pairs, pairs_from_arrays, read_pairs
from gradlab.audit.gradients import Weights, weights
from gradlab.audit.rollouts import RolloutReport, Rollouts, audit_rollouts, read_rollouts, render_rollouts

__all__ = [
    "AuditInputError",
    "AuditReport",
    "Pairs",
    "RolloutReport",
    "Rollouts",
    "Weights",
    "audit",
    "audit_rollouts",
    "generate",
    "generate_rollouts",
    "pairs_from_arrays",
    "read_pairs",
    "read_rollouts",
    "render",
    "render_rollouts",
    "save_figures",
    "verdict",
    "weights",
    "write",
]


def save_figures(report: AuditReport, out: str | os.PathLike) -> list[Path]:
    """Write the audit's figures into ``out`` (see :mod:`gradlab.audit.figures`)."""
    from gradlab.audit.figures import save_figures as _save

    return _save(report, out)
