"""Closed forms and summaries to set beside a run: the optimum pi* of docs/background.md, the entropy of
a distribution, and the length drift factor of a :class:`~gradlab.experiments.runner.Result`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gradlab.experiments.datasets import sequence_rewards
from gradlab.experiments.runner import Result

__all__ = ["optimal_policy", "entropy", "drift_factor"]


def optimal_policy(fam: Any, ref_params: Any, beta: float, gamma: float,
                   rewards: np.ndarray | None = None) -> np.ndarray:
    """The closed-form optimum pi* ~ pi_0^(gamma/beta) exp(r/beta) (docs/background.md) over every
    response of the forced-stop distribution (``fam.enumerate``'s rows), r the oracle reward
    unless ``rewards`` (one per row) is given. Normalised in log space (max subtracted)."""
    q = np.asarray(fam.enumerate(ref_params).logp)
    r = sequence_rewards(fam) if rewards is None else np.asarray(rewards, dtype=float)
    logits = (gamma / beta) * q + r / beta
    p = np.exp(logits - logits.max())
    return p / p.sum()


def entropy(p: np.ndarray) -> float:
    """-sum p log p in nats (zero-probability entries contribute 0)."""
    p = np.asarray(p, dtype=float)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def drift_factor(result: Result, setting: Mapping[str, Any] | None = None) -> np.ndarray:
    """Expected length after the last step over expected length at the start, one per seed of a
    setting (the first by default)."""
    el = result.series("expected_length", setting)  # (seeds, records)
    return el[:, -1] / el[:, 0]
