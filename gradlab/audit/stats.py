"""The statistics of an audit: the dataset's lengths, and what each loss's weights do on it.

Every function takes arrays and returns plain numbers (``None`` where a number is undefined,
e.g. the correlation of a constant weight), so a report never carries a NaN.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "ALPHA",
    "length_statistics",
    "length_test",
    "average_ranks",
    "spearman",
    "loss_statistics",
    "lever_exponent",
]

ALPHA = 0.01  # significance level of the length test: a difference is reported when p < ALPHA
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)
BINS = 24  # length-difference bins for the figure data
HIST_BINS = 48  # log-weight histogram bins


def _f(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def summary(x: np.ndarray) -> dict[str, float | None]:
    """Mean, standard deviation, extremes and the quantiles in ``QUANTILES``."""
    qs = np.quantile(x, QUANTILES)
    out = {"mean": _f(x.mean()), "std": _f(x.std()), "min": _f(x.min())}
    out.update({f"q{round(100 * q):02d}": _f(v) for q, v in zip(QUANTILES, qs)})
    out["max"] = _f(x.max())
    return out


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


def length_test(len_w: np.ndarray, len_l: np.ndarray) -> dict[str, Any]:
    """Do the chosen and rejected lengths differ? The Wilcoxon signed-rank test of the paired
    differences ``len_w - len_l`` (two-sided; pairs of equal length dropped, Wilcoxon's rule).

    A pair's two responses answer the same prompt, so the paired test is the right one: it
    asks whether chosen responses are systematically longer or shorter than their rejected
    partner, the difference R-DPO and SimPO are meant to absorb. The effect size is the
    matched-pairs rank-biserial correlation (+1: every chosen is longer). scipy's exact null
    distribution is used for small samples without ties, the normal approximation otherwise.
    """
    from scipy import stats

    d = np.asarray(len_w, dtype=float) - np.asarray(len_l, dtype=float)
    nonzero = d[d != 0]
    out: dict[str, Any] = {"name": "Wilcoxon signed-rank, paired, two-sided", "n_nonzero": int(nonzero.size),
                           "alpha": ALPHA}
    if nonzero.size == 0:
        return out | {"statistic": None, "p_value": 1.0, "rank_biserial": 0.0,
                      "note": "every pair has equal lengths: no difference to test"}
    abs_d = np.abs(nonzero)
    ties = np.unique(abs_d).size < abs_d.size
    method = "exact" if nonzero.size <= 50 and not ties else "approx"
    res = stats.wilcoxon(nonzero, zero_method="wilcox", correction=False, method=method)
    ranks = average_ranks(abs_d)
    r_plus, r_minus = ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum()
    total = r_plus + r_minus
    return out | {
        "statistic": float(res.statistic),
        "p_value": float(res.pvalue),
        "method": method,
        "rank_biserial": float((r_plus - r_minus) / total),
    }


def length_statistics(len_w: np.ndarray, len_l: np.ndarray) -> dict[str, Any]:
    """The dataset's own length statistics, chosen against rejected, and the length test."""
    d = len_w - len_l
    test = length_test(len_w, len_l)
    reported = test["p_value"] < ALPHA
    return {
        "n_pairs": int(len_w.size),
        "chosen_length_mean": float(len_w.mean()),
        "rejected_length_mean": float(len_l.mean()),
        "chosen_length_median": float(np.median(len_w)),
        "rejected_length_median": float(np.median(len_l)),
        "chosen_length_std": float(len_w.std()),
        "rejected_length_std": float(len_l.std()),
        "length_difference_mean": float(d.mean()),
        "length_difference_median": float(np.median(d)),
        "pairs_chosen_longer": float((d > 0).mean()),
        "pairs_equal_length": float((d == 0).mean()),
        "length_test": test,
        "length_difference": ("chosen longer" if test["rank_biserial"] > 0 else "chosen shorter") if reported else None,
    }


# --------------------------------------------------------------------------------------------
# Ranks and correlation
# --------------------------------------------------------------------------------------------


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (what Spearman's correlation needs)."""
    order = np.argsort(x, kind="stable")
    s = x[order]
    new = np.empty(s.size, dtype=bool)
    new[0] = True
    np.not_equal(s[1:], s[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], s.size)
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks start+1 .. end
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return None if den == 0 else float(a @ b) / den


def spearman(ranks_a: np.ndarray, ranks_b: np.ndarray) -> float | None:
    """Spearman's rank correlation from average ranks; None when either side is constant."""
    return _pearson(ranks_a, ranks_b)


# --------------------------------------------------------------------------------------------
# One loss
# --------------------------------------------------------------------------------------------


def lever_exponent(lever: np.ndarray, length: np.ndarray) -> tuple[float | None, float | None]:
    """``b`` in |lever| ~ L^b (least squares of log|lever| on log L), and the ratio of the mean
    |lever| of the longest quarter of responses to that of the shortest quarter.

    ``b = 1`` is DPO's factor of L (every extra token adds a full token's push); ``b = 0`` is
    what length normalisation aims for. Responses with a zero lever (no push) are left out.
    """
    a = np.abs(lever)
    keep = a > 0
    if keep.sum() < 2:
        return None, None
    x, y = np.log(length[keep]), np.log(a[keep])
    x = x - x.mean()
    sxx = float(x @ x)
    b = None if sxx == 0 else float(x @ (y - y.mean())) / sxx
    lo, hi = np.quantile(length, [0.25, 0.75])
    short, long_ = a[length <= lo], a[length >= hi]
    ratio = None
    if hi > lo and short.size and long_.size and short.mean() > 0:
        ratio = float(long_.mean() / short.mean())
    return b, ratio


def _top_share(sorted_desc_cumsum: np.ndarray, total: float, fraction: float) -> float | None:
    k = max(1, math.ceil(fraction * sorted_desc_cumsum.size))
    return None if total <= 0 else float(sorted_desc_cumsum[k - 1] / total)


def _binned(d: np.ndarray, w: np.ndarray, mean_w: float) -> dict[str, list]:
    """Weight (relative to its mean) against length difference: quartiles per bin, for figures."""
    lo, hi = np.quantile(d, [0.01, 0.99])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, BINS + 1)
    idx = np.clip(np.searchsorted(edges, d, side="right") - 1, 0, BINS - 1)
    inside = (d >= lo) & (d <= hi)
    rel = w / mean_w if mean_w > 0 else w
    centres, q25, q50, q75, counts = [], [], [], [], []
    order = np.argsort(idx[inside], kind="stable")
    vals, bins = rel[inside][order], idx[inside][order]
    bounds = np.searchsorted(bins, np.arange(BINS + 1))
    for b in range(BINS):
        v = vals[bounds[b]:bounds[b + 1]]
        if v.size == 0:
            continue
        qa, qb, qc = np.quantile(v, [0.25, 0.5, 0.75])
        centres.append(float((edges[b] + edges[b + 1]) / 2))
        q25.append(float(qa))
        q50.append(float(qb))
        q75.append(float(qc))
        counts.append(int(v.size))
    return {"length_difference": centres, "q25": q25, "median": q50, "q75": q75, "count": counts}


def _histogram(w: np.ndarray, mean_w: float) -> dict[str, Any]:
    """Histogram of log10(weight / mean weight) over the pairs with a non-zero weight."""
    pos = w[w > 0]
    zero = int(w.size - pos.size)
    if pos.size == 0 or mean_w <= 0:
        return {"log10_relative_edges": [], "counts": [], "zero_weight_pairs": zero}
    x = np.log10(pos / mean_w)
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(x, bins=HIST_BINS, range=(lo, hi))
    return {"log10_relative_edges": [float(e) for e in edges], "counts": [int(c) for c in counts],
            "zero_weight_pairs": zero}


def loss_statistics(
    g_w: np.ndarray,
    g_l: np.ndarray,
    lever_w: np.ndarray,
    lever_l: np.ndarray,
    len_w: np.ndarray,
    len_l: np.ndarray,
    ranks: dict[str, np.ndarray],
    *,
    top: int = 10,
) -> dict[str, Any]:
    """Everything the audit reports about one loss on one dataset (see docs/audit.md)."""
    w = np.abs(g_w) + np.abs(g_l)
    n = w.size
    total = float(w.sum())
    order = np.argsort(w, kind="stable")
    desc = order[::-1]
    cum = np.cumsum(w[desc])
    d = len_w - len_l
    mean_w = total / n
    constant = bool(w.max() == w.min())
    rw = None if constant else average_ranks(w)
    corr = {
        key: None if rw is None else spearman(rw, ranks[name])
        for key, name in (("corr_weight_length_difference", "d"), ("corr_weight_chosen_length", "len_w"),
                          ("corr_weight_rejected_length", "len_l"))
    }
    longer = d > 0
    b, ratio = lever_exponent(np.concatenate([lever_w, lever_l]), np.concatenate([len_w, len_l]))
    top_rows = [
        {"row": int(i), "weight": float(w[i]), "share": (float(w[i] / total) if total > 0 else None),
         "g_w": float(g_w[i]), "g_l": float(g_l[i]), "chosen_length": float(len_w[i]),
         "rejected_length": float(len_l[i])}
        for i in desc[: min(top, n)]
    ]
    return {
        "weight": summary(w),
        "g_w": summary(g_w),
        "g_l": summary(g_l),
        "constant_weight": constant,
        "total_weight": total,
        "top1_share": _top_share(cum, total, 0.01),
        "top10_share": _top_share(cum, total, 0.10),
        # (sum w)^2 / (n sum w^2): 1 when every pair pushes equally, 1/n when one pair does all
        "effective_pairs_fraction": (total ** 2 / (n * float(w @ w))) if total > 0 else None,
        **corr,
        "share_from_chosen_longer": (float(w[longer].sum() / total) if total > 0 else None),
        "pairs_chosen_longer": float(longer.mean()),
        "lever_exponent": b,
        "lever_long_short_ratio": ratio,
        "lever_w": summary(np.abs(lever_w)),
        "lever_l": summary(np.abs(lever_l)),
        "top_pairs": top_rows,
        "by_length_difference": _binned(d, w, mean_w),
        "histogram": _histogram(w, mean_w),
    }
