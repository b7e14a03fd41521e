"""The statistics of an audit: the dataset's lengths, and what each loss's weights do on it.

Every function takes arrays and returns plain numbers (``None`` where a number is undefined,
e.g. the correlation of a constant weight), so a report never carries a NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradlab import caches

__all__ = [
    "ALPHA",
    "length_statistics",
    "length_test",
    "average_ranks",
    "tie_ranks",
    "spearman",
    "loss_statistics",
    "lever_exponent",
    "Lengths",
]

ALPHA = 0.01  # significance level of the length test: a difference is reported when p < ALPHA
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)
BINS = 24  # length-difference bins for the figure data
HIST_BINS = 48  # log-weight histogram bins
HIST_FLOOR = 12.0  # decades below the mean weight that the histogram resolves
LEVER_SAMPLE = 1 << 17  # pairs in the lever regression's systematic sample
TIES = 1e-10  # weights closer than this fraction of the largest are float64 rounding apart: ties


def _f(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def summary(x: np.ndarray) -> dict[str, float | None]:
    """Mean, standard deviation, extremes and the quantiles in ``QUANTILES``."""
    qs = np.quantile(x, QUANTILES)
    out = {"mean": _f(x.mean()), "std": _f(x.std()), "min": _f(x.min())}
    out.update({f"q{round(100 * q):02d}": _f(v) for q, v in zip(QUANTILES, qs, strict=True)})
    out["max"] = _f(x.max())
    return out


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


P_FLOOR = 1e-300  # p-values below this are printed as a bound: float64 cannot hold them reliably


def p_text(p: float) -> str:
    """``p = 0.0123``, or a bound, ``p < 1e-300``, where the value underflows (a 0 is never printed)."""
    return f"p < {P_FLOOR:g}" if p < P_FLOOR else f"p = {p:.3g}"


def length_test(len_w: np.ndarray, len_l: np.ndarray) -> dict[str, Any]:
    """Do the chosen and rejected lengths differ? The Wilcoxon signed-rank test of the paired
    differences ``len_w - len_l`` (two-sided; pairs of equal length dropped, Wilcoxon's rule).

    A pair's two responses answer the same prompt, so the paired test is the right one: it
    asks whether chosen responses are systematically longer or shorter than their rejected
    partner, the difference R-DPO and SimPO are meant to absorb. The effect size is the
    matched-pairs rank-biserial correlation (+1: every chosen is longer). scipy's exact null
    distribution is used for small samples without ties, the normal approximation otherwise.
    """
    d = np.asarray(len_w, dtype=float) - np.asarray(len_l, dtype=float)
    nonzero = d[d != 0]
    n = nonzero.size
    out: dict[str, Any] = {"name": "Wilcoxon signed-rank, paired, two-sided", "n_nonzero": int(n), "alpha": ALPHA}
    if n == 0:
        return out | {"statistic": None, "p_value": 1.0, "p_value_text": p_text(1.0), "rank_biserial": 0.0,
                      "note": "every pair has equal lengths: no difference to test"}
    abs_d = np.abs(nonzero)
    ranks = average_ranks(abs_d)
    r_plus = float(ranks[nonzero > 0].sum())
    total = n * (n + 1) / 2.0  # the ranks' sum, ties averaged or not
    r_minus = total - r_plus
    statistic = min(r_plus, r_minus)
    ties = np.unique(abs_d, return_counts=True)[1]
    if n <= 50 and ties.max() == 1:
        from scipy import stats  # the exact null distribution of T for small samples

        p = float(stats.wilcoxon(nonzero, zero_method="wilcox", correction=False, method="exact").pvalue)
        method = "exact"
    else:
        # normal approximation with the tie correction: var T = n(n+1)(2n+1)/24 - sum(t^3 - t)/48
        var = n * (n + 1) * (2 * n + 1) / 24.0 - float((ties.astype(float) ** 3 - ties).sum()) / 48.0
        z = (statistic - total / 2.0) / math.sqrt(var) if var > 0 else 0.0
        p = min(1.0, math.erfc(abs(z) / math.sqrt(2.0)))
        method = "normal approximation"
        if n < 10:
            out["note"] = "fewer than 10 pairs differ in length and some tie: the p-value is a rough approximation"
    return out | {"statistic": statistic, "p_value": p, "p_value_text": p_text(p), "method": method,
                  "rank_biserial": (r_plus - r_minus) / total}


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
        "length_difference": (
            ("chosen longer" if test["rank_biserial"] > 0 else "chosen shorter") if reported else None
        ),
    }


# --------------------------------------------------------------------------------------------
# Ranks and correlation
# --------------------------------------------------------------------------------------------


@caches.memo(maxsize=4)
def _count(n: int, dtype: type, start: int = 0) -> np.ndarray:
    """start, start + 1, ..., start + n - 1 (read-only, shared by every loss and thread)."""
    out: np.ndarray = np.arange(start, start + n, dtype=dtype)
    out.flags.writeable = False
    return out


def _ranks_sorted(s: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Ranks 1..n of the values whose sorted sequence is ``s = x[order]``, ties averaged.

    Positions get ranks 1..n; only the tied runs (usually few) are then set to their average,
    so the common case is one comparison pass and one scatter."""
    n = s.size
    ranks = np.empty(n)
    ranks[order] = _count(n, np.float64, 1)
    dup = np.flatnonzero(s[1:] == s[:-1])  # position dup + 1 repeats its predecessor
    if dup.size:
        mark = np.zeros(n, dtype=bool)
        mark[dup] = True
        mark[dup + 1] = True
        tied = np.flatnonzero(mark)  # every position of every run of two or more, ascending
        v = s[tied]
        first = np.empty(tied.size, dtype=bool)
        first[0] = True
        # a new run where the value changes (two tied runs can be neighbours)
        np.not_equal(v[1:], v[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        ends = np.append(starts[1:], tied.size)
        avg = (tied[starts] + tied[ends - 1] + 2) / 2.0  # mean of the 1-based ranks of the run
        ranks[order[tied]] = np.repeat(avg, ends - starts)
    return ranks


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (what Spearman's correlation needs).

    Whole numbers in a range not much wider than n (lengths and their differences) are ranked
    by counting, in O(n); anything else by sorting.
    """
    if x.size and np.isfinite(x).all():
        lo, hi = float(x.min()), float(x.max())
        if hi - lo < 4 * x.size + 1024 and np.array_equal(x, np.round(x)):
            idx = (x - lo).astype(np.int64)
            counts = np.bincount(idx, minlength=int(hi - lo) + 1)
            ends = np.cumsum(counts)
            return ((ends - counts + ends + 1) / 2.0)[idx]  # mean of ranks start+1 .. end
    order = np.argsort(x)
    return _ranks_sorted(x[order], order)


def _standardised(x: np.ndarray) -> np.ndarray | None:
    """(x - mean) / norm, or None for a constant x: Pearson's r is then one dot product."""
    c = x - x.mean()
    norm = math.sqrt(float(c @ c))
    return None if norm == 0 else c / norm


def spearman(ranks_a: np.ndarray, ranks_b: np.ndarray) -> float | None:
    """Spearman's rank correlation from average ranks; None when either side is constant."""
    a, b = _standardised(ranks_a), _standardised(ranks_b)
    return None if a is None or b is None else float(a @ b)


# --------------------------------------------------------------------------------------------
# What every loss shares: the dataset's lengths, prepared once
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lengths:
    """Per-dataset arrays that every loss's statistics reuse (computed once, not per loss)."""

    len_w: np.ndarray
    len_l: np.ndarray
    std_ranks: dict[str, np.ndarray | None]  # standardised average ranks of d, len_w, len_l
    rank_matrix: np.ndarray | None  # the std_ranks that are defined, stacked (k, n): one pass per loss
    rank_keys: tuple[str, ...]  # which std_ranks the rows of rank_matrix are
    stride: int  # the lever regression uses pairs 0, stride, 2 stride, ...
    log_len: np.ndarray  # log of those len_w then len_l (the lever regression's x), centred
    log_len_raw: np.ndarray
    log_len_sxx: float
    quarter_w: np.ndarray | None  # per chosen response 0, or 1 in the shortest quarter, 2 in the longest
    quarter_l: np.ndarray | None  # ... per rejected response (None when all lengths are equal)
    quarter_size: tuple[int, int]  # responses (of the 2n) in the shortest and in the longest quarter
    bin_of: np.ndarray  # each pair's bin of d (uint8); BINS for pairs outside the central 98%
    bin_bounds: np.ndarray  # counts per bin, cumulated: bin b holds positions bounds[b]:bounds[b+1]
    bin_order: np.ndarray  # the pairs grouped by bin (a stable radix sort of bin_of, done once)
    bin_edges: np.ndarray
    chosen_longer: np.ndarray
    chosen_longer_f: np.ndarray  # the same as 0.0/1.0: a share is then one dot product

    @classmethod
    def of(cls, len_w: np.ndarray, len_l: np.ndarray) -> Lengths:
        d = len_w - len_l
        both = np.concatenate([len_w, len_l])
        stride = max(1, math.ceil(len_w.size / LEVER_SAMPLE))
        log_len = np.log(np.concatenate([len_w[::stride], len_l[::stride]]))
        lo, hi = np.quantile(both, [0.25, 0.75])
        quarter = None
        if hi > lo:  # a sum over each quarter is then one bincount per loss
            quarter = (both <= lo).astype(np.uint8) + 2 * (both >= hi).astype(np.uint8)
        dlo, dhi = np.quantile(d, [0.01, 0.99])
        if dhi <= dlo:
            dlo, dhi = dlo - 0.5, dhi + 0.5
        edges = np.linspace(dlo, dhi, BINS + 1)
        idx = np.clip(np.searchsorted(edges, d, side="right") - 1, 0, BINS - 1).astype(np.uint8)
        idx[(d < dlo) | (d > dhi)] = BINS
        bounds = np.concatenate([[0], np.cumsum(np.bincount(idx, minlength=BINS + 1))])
        std_ranks = {"d": _standardised(average_ranks(d)), "len_w": _standardised(average_ranks(len_w)),
                     "len_l": _standardised(average_ranks(len_l))}
        keys = tuple(k for k, v in std_ranks.items() if v is not None)
        n = len_w.size
        return cls(
            len_w=len_w,
            len_l=len_l,
            std_ranks=std_ranks,
            rank_matrix=np.stack([r for r in std_ranks.values() if r is not None]) if keys else None,
            rank_keys=keys,
            stride=stride,
            log_len=log_len - log_len.mean(),
            log_len_raw=log_len,
            log_len_sxx=float(((log_len - log_len.mean()) ** 2).sum()),
            quarter_w=None if quarter is None else quarter[:n],
            quarter_l=None if quarter is None else quarter[n:],
            quarter_size=(0, 0) if quarter is None else (int((quarter == 1).sum()), int((quarter == 2).sum())),
            bin_of=idx,
            bin_bounds=bounds,
            bin_order=np.argsort(idx, kind="stable"),
            bin_edges=edges,
            chosen_longer=d > 0,
            chosen_longer_f=(d > 0).astype(float),
        )


# --------------------------------------------------------------------------------------------
# One loss
# --------------------------------------------------------------------------------------------


def lever_exponent(
    lever_w: np.ndarray, lever_l: np.ndarray, lengths: Lengths
) -> tuple[float | None, float | None, float | None]:
    """``b`` in |lever| ~ L^b (least squares of log|lever| on log L over the responses, chosen
    and rejected), the ratio of the mean |lever| of the longest quarter of responses to that of
    the shortest quarter, and the fit's R^2 (the share of the variance of log|lever| that log L
    explains: near 1 where the power law describes the lever, near 0 where it does not).

    ``b = 1`` is DPO's factor of L (every extra token adds a full token's push); ``b = 0`` is
    what length normalisation aims for. Responses with a zero lever (no push) are left out.
    The regression uses every ``lengths.stride``-th pair (at most ``LEVER_SAMPLE`` of them, a
    fixed systematic sample: its slope's error is far below the two decimals reported); the
    ratio uses every response.
    """
    step = lengths.stride
    a = np.abs(np.concatenate([lever_w[::step], lever_l[::step]]))
    b = r2 = None
    if a.all():  # the common case: x is centred already
        x, y, sxx = lengths.log_len, np.log(a), lengths.log_len_sxx
    else:
        keep = a > 0
        x, y = lengths.log_len_raw[keep], np.log(a[keep])
        x = x - x.mean() if x.size else x
        sxx = float(x @ x)
    if y.size >= 2 and sxx > 0:
        sxy = float(x @ y)
        b = sxy / sxx
        yc = y - y.mean()
        syy = float(yc @ yc)
        # a lever that is exactly a power of L (syy equal to the explained part) has R^2 = 1
        r2 = min(1.0, sxy * sxy / (sxx * syy)) if syy > 0 else 1.0
    ratio = None
    if lengths.quarter_w is not None and lengths.quarter_l is not None:
        sums = np.bincount(lengths.quarter_w, weights=np.abs(lever_w), minlength=3)
        sums += np.bincount(lengths.quarter_l, weights=np.abs(lever_l), minlength=3)
        short, long_ = sums[1] / lengths.quarter_size[0], sums[2] / lengths.quarter_size[1]
        ratio = float(long_ / short) if short > 0 else None
    return b, ratio, r2


def _summary_sorted(s: np.ndarray) -> dict[str, float | None]:
    """``summary`` of an already sorted array (quantiles by linear interpolation, as numpy's)."""
    mean = float(s.sum()) / s.size
    c = s - mean
    out = {"mean": _f(mean), "std": _f(math.sqrt(float(c @ c) / s.size)), "min": _f(s[0])}
    for q in QUANTILES:
        out[f"q{round(100 * q):02d}"] = _f(_sorted_quantile(s, q))
    out["max"] = _f(s[-1])
    return out


def _binned(w: np.ndarray, mean_w: float, lengths: Lengths) -> dict[str, list]:
    """Weight (relative to its mean) against length difference: quartiles per bin, for figures.

    The pairs come grouped by bin (``lengths.bin_order``, one stable sort per dataset, shared by
    every loss); each bin's weights are sorted on their own (O(n log n) in all, in pieces that
    fit in cache), so its quantiles are exact and read off by index."""
    grouped = w[lengths.bin_order]
    e, bounds = lengths.bin_edges, lengths.bin_bounds
    out: dict[str, list] = {"length_difference": [], "q25": [], "median": [], "q75": [], "count": []}
    for b in range(BINS):
        v = np.sort(grouped[bounds[b]:bounds[b + 1]])
        if v.size == 0:
            continue
        if mean_w > 0:
            v /= mean_w
        out["length_difference"].append(float((e[b] + e[b + 1]) / 2))
        for key, q in (("q25", 0.25), ("median", 0.5), ("q75", 0.75)):
            out[key].append(_sorted_quantile(v, q))
        out["count"].append(int(v.size))
    return out


def _sorted_quantile(s: np.ndarray, q: float) -> float:
    """numpy's default (linear) quantile of an ascending array."""
    pos = q * (s.size - 1)
    i = int(math.floor(pos))
    j = min(i + 1, s.size - 1)
    return float(s[i] + (pos - i) * (s[j] - s[i]))


def _histogram(ws: np.ndarray, mean_w: float) -> dict[str, Any]:
    """Histogram of log10(weight / mean weight) over the pairs with a non-zero weight, from the
    sorted weights ``ws`` (bin counts by bisection); values more than ``HIST_FLOOR`` decades
    below the mean are counted in the lowest bin."""
    first = int(np.searchsorted(ws, 0.0, side="right"))
    pos = ws[first:]
    zero = first
    if pos.size == 0 or mean_w <= 0:
        return {"log10_relative_edges": [], "counts": [], "zero_weight_pairs": zero, "below_floor": 0}
    log_mean = math.log10(mean_w)  # a ratio of two tiny weights would underflow first
    hi = math.log10(pos[-1]) - log_mean
    clipped = math.log10(pos[0]) - log_mean < -HIST_FLOOR
    lo = -HIST_FLOOR if clipped else math.log10(pos[0]) - log_mean
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    cut = np.searchsorted(pos, 10.0 ** (edges + log_mean), side="left")
    cut[0], cut[-1] = 0, pos.size  # the lowest bin takes what lies below the floor, the top one its edge
    below = int(np.searchsorted(pos, 10.0 ** (lo + log_mean), side="left")) if clipped else 0
    return {"log10_relative_edges": [float(e) for e in edges], "counts": [int(c) for c in np.diff(cut)],
            "zero_weight_pairs": zero, "below_floor": below}


def _top_share(ws: np.ndarray, total: float, fraction: float) -> float | None:
    """The share of the total weight carried by the heaviest ``fraction`` of pairs (at least one)."""
    k = max(1, math.ceil(fraction * ws.size))
    return None if total <= 0 else float(ws[ws.size - k:].sum()) / total


def tie_ranks(w: np.ndarray, tol: float, *, largest: float | None = None) -> np.ndarray:
    """Average ranks 1..n of ``w`` (finite, >= 0) where values in the same multiple of ``tol``
    (``round(w / tol)``) are ties, as Spearman's correlation with ties needs.

    One sort: each quantised value (below 2^34 for ``tol = TIES * max``) is packed with its
    row index into one int64 key, ``q << bits | row``, so a plain (SIMD) sort of the keys gives
    the sorted values and the permutation together, 4-5x faster than ``argsort``. Rounding is
    monotone, so the runs of equal keys are exactly the runs of the weights sorted and then
    quantised. Keys that would not fit in 63 bits fall back to ``argsort``. ``largest``, the
    largest weight when the caller knows it, saves a pass.
    """
    q = w / tol
    np.rint(q, out=q)
    n = w.size
    bits = max(1, (n - 1).bit_length())
    top = float(q.max()) if largest is None else round(largest / tol)
    if n and top < 2.0 ** (63 - bits):
        key = q.astype(np.int64)
        key <<= bits
        key |= _count(n, np.int64)
        key.sort()
        order = key & ((1 << bits) - 1)
        key >>= bits  # now the quantised values, ascending
        return _ranks_sorted(key, order)
    order = np.argsort(q, kind="stable")
    return _ranks_sorted(q[order], order)


def _heaviest(w: np.ndarray, ws: np.ndarray, k: int) -> np.ndarray:
    """The rows of the ``k`` largest weights, heaviest first and, among equal weights, the lower
    row first (what a stable sort of -w gives), without sorting all of ``w``: every row above
    the k-th largest value, then the first rows equal to it."""
    t = ws[w.size - k]
    above = np.flatnonzero(w > t)
    tied = np.flatnonzero(w == t)[: k - above.size]
    rows = np.concatenate([above, tied])
    return rows[np.lexsort((rows, -w[rows]))]


def _sorted_parts(g_w: np.ndarray, g_l: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """g_w, g_l and w = |g_w| + |g_l|, each sorted. For a loss of the margin alone (DPO, IPO,
    ...) g_l = -g_w at every pair and g_w has one sign; then one sort gives all three, exactly
    (negation, |.| and doubling are exact in floating point)."""
    sorted_w = np.sort(g_w)
    if not np.array_equal(g_l, -g_w):
        return sorted_w, np.sort(g_l), np.sort(w)
    sorted_l = -sorted_w[::-1]
    if sorted_w[-1] <= 0:  # w = 2 |g_w| = -2 g_w: ascending where g_w descends
        return sorted_w, sorted_l, 2.0 * np.abs(sorted_w[::-1])
    if sorted_w[0] >= 0:
        return sorted_w, sorted_l, 2.0 * np.abs(sorted_w)  # |.|: -0.0 becomes 0.0, as in w
    return sorted_w, sorted_l, np.sort(w)


_CORR_KEYS = {"d": "corr_weight_length_difference", "len_w": "corr_weight_chosen_length",
              "len_l": "corr_weight_rejected_length"}


def loss_statistics(
    g_w: np.ndarray,
    g_l: np.ndarray,
    lever_w: np.ndarray,
    lever_l: np.ndarray,
    lengths: Lengths,
    *,
    top: int = 10,
) -> dict[str, Any]:
    """Everything the audit reports about one loss on one dataset (see docs/audit.md).

    Exact, with two sorts of the weights: one of the values (quantiles, top shares, histogram)
    and one of the tie-quantised values packed with their rows (the ranks, see
    :func:`tie_ranks`). The dominating pairs come from a threshold, the quantiles of g_w and g_l
    from their sorted values; everything about the lengths comes prepared in ``lengths``.
    """
    w = np.abs(g_w)
    w += np.abs(g_l)
    n = w.size
    sorted_w, sorted_l, ws = _sorted_parts(g_w, g_l, w)
    total = float(ws.sum())
    mean_w = total / n
    # Weights that differ by less than TIES * max are equal up to float64 rounding: at
    # initialisation DPO's margin is (lp_w - ref_w) - (lp_l - ref_l) = 0 exactly, but computed
    # from log-probs of size |lp| it carries noise ~1e-16 |lp|, and ranking that noise would
    # invent a correlation with length (|lp| grows with length). They are ranked as ties.
    tol = TIES * float(ws[-1])
    constant = bool(ws[-1] - ws[0] <= tol)
    corr: dict[str, float | None] = dict.fromkeys(_CORR_KEYS.values())
    if not constant and lengths.rank_matrix is not None:
        c = tie_ranks(w, tol, largest=float(ws[-1]))
        c -= (n + 1) / 2.0  # the mean rank, ties averaged or not; the lengths' ranks are centred too
        norm = math.sqrt(float(c @ c))
        if norm > 0:
            for name, r in zip(lengths.rank_keys, lengths.rank_matrix @ c, strict=True):
                corr[_CORR_KEYS[name]] = float(r) / norm
    b, ratio, r2 = lever_exponent(lever_w, lever_l, lengths)
    # weights equal to within rounding: no pair is heavier than another, so none is listed
    heaviest: list[int] | np.ndarray = [] if constant else _heaviest(w, ws, min(top, n))
    top_rows = [
        {"row": int(i), "weight": float(w[i]), "share": (float(w[i] / total) if total > 0 else None),
         "g_w": float(g_w[i]), "g_l": float(g_l[i]), "chosen_length": float(lengths.len_w[i]),
         "rejected_length": float(lengths.len_l[i])}
        for i in heaviest
    ]
    return {
        "weight": _summary_sorted(ws),
        "g_w": _summary_sorted(sorted_w),
        "g_l": _summary_sorted(sorted_l),
        "constant_weight": constant,
        "total_weight": total,
        "top1_share": _top_share(ws, total, 0.01),
        "top10_share": _top_share(ws, total, 0.10),
        # (sum w)^2 / (n sum w^2): 1 when every pair pushes equally, 1/n when one pair does all
        "effective_pairs_fraction": (total ** 2 / (n * float(ws @ ws))) if total > 0 else None,
        **corr,
        "share_from_chosen_longer": (float(w @ lengths.chosen_longer_f) / total if total > 0 else None),
        "pairs_chosen_longer": float(lengths.chosen_longer.mean()),
        "lever_exponent": b,
        "lever_r2": r2,
        "lever_long_short_ratio": ratio,
        "largest_share": float(ws[-1]) / total if total > 0 else None,
        "weight_spread": (float(ws[-1] - ws[0]) / float(ws[-1])) if ws[-1] > 0 else None,
        "top_pairs": top_rows,
        "by_length_difference": _binned(w, mean_w, lengths),
        "histogram": _histogram(ws, mean_w),
    }
