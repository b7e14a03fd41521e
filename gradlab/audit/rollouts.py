r"""Auditing RL rollout logs: where a group loss's gradient goes, and which normaliser a log ran.

A rollout log has one row per sampled completion: ``prompt_id`` (the group: G completions of
one prompt), ``completion_length`` (|o_i|, the completion tokens TRL's mask counts: content and
EOS) and ``reward``; optionally ``logps``/``ref_logps`` (summed over the completion),
``token_logps`` (a list of |o_i| numbers) and a logged ``loss`` (per rollout, or per group: the
same value on every row of a group).

Every number comes from the group-loss registry (:mod:`gradlab.group_losses`): the advantages
from :func:`~gradlab.group_losses.advantages`, and the per-token weight w_i from each loss's
derived first-step closed form (:meth:`~gradlab.group_losses.GroupLoss.first_step`, ρ = κ = 1:
the first on-policy step from the reference). A response's total weight is |w_i| |o_i|, its
push summed over its tokens. For each ``loss_type`` and ``scale_rewards`` the audit reports:

- the share of silent groups (every reward equal: every advantage 0, no gradient);
- the share of the total weight that goes to incorrect responses (advantage below 0), by
  length decile;
- the per-token weight against length, for correct and incorrect responses;

and, given a logged loss, which normaliser (and advantage scaling) the numbers are consistent
with (:func:`configuration_check`). Whether the log itself is length-biased (incorrect responses
longer than the correct ones of the same prompt) is the Wilcoxon signed-rank test of
:func:`gradlab.audit.stats.length_test` over the groups.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import sympy

from gradlab import caches
from gradlab.audit import stats
from gradlab.audit.io import MISSING, RANGES, ROLLOUT_COLUMNS, AuditInputError, is_rollout_table, open_table, where
from gradlab.errors import GradlabError

__all__ = [
    "ROLLOUT_COLUMNS", "OPTIONAL_COLUMNS", "Rollouts", "RolloutReport", "is_rollout_table", "read_rollouts",
    "rollouts_from_arrays", "audit_rollouts", "configuration_check", "render_rollouts", "WEIGHT_DEFINITION",
]

OPTIONAL_COLUMNS = ("logps", "ref_logps", "token_logps", "loss")
SCALES = ("group", "batch", "none")  # GRPOTrainer's scale_rewards; RLOO has its own leave-one-out
DECILES = 10
SCATTER_BINS = 16
WEIGHT_DEFINITION = (
    "per rollout, |w_i| |o_i|: the per-token weight of the loss's first-step closed form (rho = kappa = 1) "
    "times the completion's tokens, the rollout's total push on its tokens' log-probs"
)
# The configuration check: a candidate matches when its residual is at most FIT of the log's
# scale, the runner-up's is at least SEPARATION times the match's and at least 2 FIT, and at
# least MIN_GROUPS groups carry a gradient.
FIT = 0.05
SEPARATION = 4.0
MIN_GROUPS = 8
ROUNDING = 1e-9  # below this fraction of the candidates' scale, a loss is 0 (float32 logs round at ~1e-7 of it)
LMAX_RANGE = 100.0  # a fitted constant normaliser's L_max lies in [longest completion, this many times it]


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollouts:
    """The per-rollout numbers of a log. ``group`` is the 0-based group of each row (groups
    numbered in order of first appearance; ``prompt_ids`` their ids); optional columns are None."""

    group: np.ndarray
    length: np.ndarray
    reward: np.ndarray
    prompt_ids: tuple[Any, ...]
    logps: np.ndarray | None = None
    ref_logps: np.ndarray | None = None
    token_logp_mean: np.ndarray | None = None
    loss: np.ndarray | None = None
    source: str = "<arrays>"
    columns: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        return int(self.length.size)

    @property
    def n_groups(self) -> int:
        return len(self.prompt_ids)


def _column_help() -> str:
    return (f"a rollout log needs the columns {', '.join(ROLLOUT_COLUMNS)}; optional: {', '.join(OPTIONAL_COLUMNS)} "
            "(docs/audit.md)")


def _ids(path: Path, values: Sequence[Any], start: int, lines: Sequence[int] | None,
         table: dict[Any, int]) -> np.ndarray:
    out = np.empty(len(values), dtype=np.int64)
    if isinstance(values, np.ndarray):
        values = values.tolist()  # numpy scalars -> Python ints, floats, strings
    for i, v in enumerate(values):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if v is MISSING or v is None or v == "" or not isinstance(v, str | int) or isinstance(v, bool):
            missing = v is MISSING or v is None or v == ""
            shown = "missing" if missing else f"{type(v).__name__}, not a text or whole number"
            raise AuditInputError(f"{path}: {where(path, start + i, lines, i)}: 'prompt_id' is {shown}; "
                                  "no output was written")
        out[i] = table.setdefault(v, len(table))
    return out


def _floats(path: Path, column: str, values: Sequence[Any], start: int, lines: Sequence[int] | None,
            rule: tuple[float, float, str]) -> np.ndarray:
    from gradlab.audit.io import _numbers

    x = _numbers(path, column, values, start, lines)
    low, high, text = rule
    bad = ~((x >= low) & (x <= high))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AuditInputError(f"{path}: {where(path, start + i, lines, i)}: '{column}' = {float(x[i])!r}; {text}; "
                              "no output was written")
    return x


_FINITE = (-1e300, 1e300, "it must be a finite number")
_COUNT = (1.0, RANGES["len"][1], "a completion length must be a whole number of tokens >= 1 (content and EOS)")


def _token_means(path: Path, values: Sequence[Any], lengths: np.ndarray, start: int,
                 lines: Sequence[int] | None) -> np.ndarray:
    """The mean of each row's per-token log-probs; a list must hold completion_length numbers <= 0."""
    out = np.empty(len(values))
    for i, v in enumerate(values):
        at = where(path, start + i, lines, i)
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                v = None
        if v is None or v is MISSING or isinstance(v, str | bytes | bool | int | float):
            raise AuditInputError(f"{path}: {at}: 'token_logps' must be a list of numbers (a JSON list in CSV); "
                                  "no output was written")
        try:
            x = np.asarray(v, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise AuditInputError(f"{path}: {at}: 'token_logps' holds a value that is not a number; "
                                  "no output was written") from None
        if x.size != lengths[i]:
            raise AuditInputError(f"{path}: {at}: 'token_logps' has {x.size} values, completion_length is "
                                  f"{lengths[i]:g}; they count the same tokens; no output was written")
        if not ((x <= 0) & (x >= RANGES["lp"][0])).all():
            raise AuditInputError(f"{path}: {at}: 'token_logps' holds a value outside [-1e9, 0]; {RANGES['lp'][2]}; "
                                  "no output was written")
        out[i] = x.mean()
    return out


def read_rollouts(path: str | os.PathLike) -> Rollouts:
    """Read and validate a rollout log (JSON Lines, CSV, Parquet; see the module docstring)."""
    p = Path(path)
    found, chunks_of = open_table(p)
    if not is_rollout_table(found):
        missing = [c for c in ROLLOUT_COLUMNS if c not in found]
        raise AuditInputError(f"{p}: no column {', '.join(map(repr, missing))}; {_column_help()}\n"
                              f"  found columns: {', '.join(found) or 'none'}")
    optional = [c for c in OPTIONAL_COLUMNS if c in found]
    wanted = [*ROLLOUT_COLUMNS, *optional]
    table: dict[Any, int] = {}
    parts: dict[str, list[np.ndarray]] = {c: [] for c in ("group", "length", "reward", *optional)}
    for start, cols in chunks_of(p, wanted):
        lines = cols.get("_line")
        parts["group"].append(_ids(p, cols["prompt_id"], start, lines, table))
        length = _floats(p, "completion_length", cols["completion_length"], start, lines, _COUNT)
        if (length != np.round(length)).any():
            i = int(np.flatnonzero(length != np.round(length))[0])
            raise AuditInputError(f"{p}: {where(p, start + i, lines, i)}: 'completion_length' = {length[i]!r}; "
                                  f"{_COUNT[2]}; no output was written")
        parts["length"].append(length)
        parts["reward"].append(_floats(p, "reward", cols["reward"], start, lines, _FINITE))
        for c in ("logps", "ref_logps"):
            if c in optional:
                parts[c].append(_floats(p, c, cols[c], start, lines, RANGES["lp"]))
        if "loss" in optional:
            parts["loss"].append(_floats(p, "loss", cols["loss"], start, lines, _FINITE))
        if "token_logps" in optional:
            parts["token_logps"].append(_token_means(p, cols["token_logps"], length, start, lines))
    if not parts["length"]:
        raise AuditInputError(f"{p}: it has a header but no rows")
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    return Rollouts(group=arrays["group"], length=arrays["length"], reward=arrays["reward"],
                    prompt_ids=tuple(table), logps=arrays.get("logps"), ref_logps=arrays.get("ref_logps"),
                    token_logp_mean=arrays.get("token_logps"), loss=arrays.get("loss"), source=str(p),
                    columns=tuple(found))


def rollouts_from_arrays(*, prompt_id: Any, completion_length: Any, reward: Any, loss: Any = None) -> Rollouts:
    """Validated :class:`Rollouts` from arrays in memory (the Python route, no file)."""
    ids = list(np.asarray(prompt_id).tolist())
    n = len(ids)
    cols: dict[str, Any] = {"completion_length": completion_length, "reward": reward}
    if loss is not None:
        cols["loss"] = loss
    arrays = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in cols.items()}
    for k, x in arrays.items():
        if x.size != n:
            raise AuditInputError(f"{k} has {x.size} values, prompt_id has {n}")
    if n == 0:
        raise AuditInputError("no rollouts")
    path = Path("<arrays>")
    table: dict[Any, int] = {}
    group = _ids(path, ids, 0, None, table)
    given = cast(dict[str, Sequence[Any]], arrays)  # _numbers takes a float64 array as it is
    length = _floats(path, "completion_length", given["completion_length"], 0, None, _COUNT)
    reward = _floats(path, "reward", given["reward"], 0, None, _FINITE)
    logged = _floats(path, "loss", given["loss"], 0, None, _FINITE) if "loss" in given else None
    return Rollouts(group=group, length=length, reward=reward, prompt_ids=tuple(table), loss=logged)


# --------------------------------------------------------------------------------------------
# Groups and advantages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Groups:
    """Per-row group facts: the group's size G, its token total sum_j |o_j|, whether it is silent."""

    size: np.ndarray
    len_sum: np.ndarray
    silent: np.ndarray  # per row
    silent_groups: np.ndarray  # per group
    log_len: np.ndarray = field(default_factory=lambda: np.zeros(0))
    decile: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))  # per row; -1 in a silent group
    decile_edges: list[float] = field(default_factory=list)
    length_bin: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))  # the figure's bins; -1 silent

    @classmethod
    def of(cls, r: Rollouts) -> Groups:
        k = r.n_groups
        size = np.bincount(r.group, minlength=k)
        lo = np.full(k, np.inf)
        hi = np.full(k, -np.inf)
        np.minimum.at(lo, r.group, r.reward)
        np.maximum.at(hi, r.group, r.reward)
        silent_groups = (lo == hi) | (size < 2)  # a group of one has no baseline: A = 0
        silent = silent_groups[r.group]
        live = ~silent
        decile = np.full(r.n, -1)
        decile[live], edges = _deciles(r.length[live])
        return cls(size=size[r.group].astype(float), len_sum=np.bincount(r.group, r.length, k)[r.group],
                   silent=silent, silent_groups=silent_groups, log_len=np.log(r.length), decile=decile,
                   decile_edges=edges, length_bin=_bins(r.length, live))


def group_advantages(r: Rollouts, scale_rewards: str) -> np.ndarray:
    """Each rollout's advantage, by :func:`gradlab.group_losses.advantages` applied to the
    groups of each size (TRL's ``"batch"`` std: over every reward of the log)."""
    from gradlab.group_losses import advantages

    out = np.zeros(r.n)
    size = np.bincount(r.group, minlength=r.n_groups)
    batch_std = float(np.std(r.reward, ddof=1)) if r.n > 1 else 0.0
    order = np.argsort(r.group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(size)])
    for g in np.unique(size):
        if g < 2:
            continue  # one response: no baseline, no gradient
        groups = np.flatnonzero(size == g)
        rows = order[(starts[groups][:, None] + np.arange(g)[None, :])]
        out[rows] = advantages(r.reward[rows], scale_rewards, batch_std=batch_std)
    return out


@caches.memo(maxsize=64)
def _weight_program(loss: Any, items: tuple[tuple[str, Any], ...]) -> Any:
    from gradlab.audit.program import compile_program

    return compile_program([loss.first_step(dict(items))], ("A", "len_i", "len_sum", "G"))


def _configurations(losses: Sequence[str] | None, scales: Sequence[str] | None) -> list[tuple[Any, str]]:
    from gradlab.group_losses import GROUP_LOSSES, get_group_loss

    chosen = [get_group_loss(n) for n in losses] if losses else list(GROUP_LOSSES.values())
    for s in scales or ():
        if s not in (*SCALES, "leave_one_out"):
            raise GradlabError(f"unknown scale_rewards '{s}'; allowed: {', '.join(SCALES)}, leave_one_out")
    out = []
    for loss in chosen:
        own = SCALES if loss.scale_rewards == "group" else (loss.scale_rewards,)
        picked = [s for s in own if not scales or s in scales]
        out += [(loss, s) for s in picked]
    if not out:
        raise GradlabError(f"no loss runs with scale_rewards {', '.join(scales or ())}: GRPOTrainer's losses take "
                           f"{', '.join(SCALES)}, rloo takes leave_one_out")
    return out


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def _deciles(length: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Each row's length decile (0 shortest) and the deciles' upper edges; ties share a decile."""
    edges = np.quantile(length, np.linspace(0, 1, DECILES + 1)[1:-1]) if length.size else np.zeros(DECILES - 1)
    return np.searchsorted(edges, length, side="left"), [float(e) for e in edges] + [float(length.max(initial=0))]


def _bins(length: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Each row's bin of SCATTER_BINS log-spaced length bins over the rows with a gradient (-1 elsewhere)."""
    out = np.full(length.size, -1)
    if not live.any():
        return out
    lo, hi = float(length[live].min()), float(length[live].max())
    edges = np.unique(np.geomspace(lo, hi, SCATTER_BINS + 1)) if hi > lo else np.array([lo, lo + 1])
    out[live] = np.clip(np.searchsorted(edges, length[live], side="right") - 1, 0, len(edges) - 2)
    return out


def _power_law(log_len: np.ndarray, w: np.ndarray) -> tuple[float | None, float | None]:
    """b and R^2 of log|w| ~ b log L + c over the rows with a non-zero weight."""
    keep = w != 0
    if keep.sum() < 2:
        return None, None
    x, y = log_len[keep], np.log(np.abs(w[keep]))
    x, y = x - x.mean(), y - y.mean()
    sxx, syy = float(x @ x), float(y @ y)
    if sxx <= 0:
        return None, None
    b = float(x @ y) / sxx
    r2 = min(1.0, (float(x @ y) ** 2) / (sxx * syy)) if syy > 1e-24 * max(1.0, sxx) else 1.0
    return b, r2


def _median(x: np.ndarray) -> float | None:
    return float(np.median(x)) if x.size else None


def config_statistics(r: Rollouts, groups: Groups, loss: Any, scale: str, values: Mapping[str, Any],
                      a: np.ndarray | None = None) -> dict[str, Any]:
    """One (loss, scale_rewards): silent groups, the incorrect responses' share of the weight by
    length decile, and the per-token weight against length. ``a``: the advantages for
    ``scale``, where the caller has them."""
    a = group_advantages(r, scale) if a is None else a
    hyper = {k: v for k, v in values.items() if k in loss.defaults}
    w = np.asarray(_weight_program(loss, tuple(sorted(hyper.items())))(a, r.length, groups.len_sum, groups.size)[0],
                   dtype=float) * np.ones(r.n)
    total = np.abs(w) * r.length
    mass = float(total.sum())
    incorrect, correct = a < 0, a > 0
    live = ~groups.silent
    dec, edges = groups.decile, groups.decile_edges
    rows = []
    for d in range(DECILES):
        at = dec == d
        n_at = int(at.sum())
        rows.append({
            "decile": d + 1,
            "max_length": edges[d],
            "rollouts": n_at,
            "incorrect_rollouts": int((at & incorrect).sum()),
            "incorrect_weight_share": float(total[at & incorrect].sum() / mass) if mass > 0 else None,
            "correct_weight_share": float(total[at & correct].sum() / mass) if mass > 0 else None,
            "per_token_weight_incorrect": _median(np.abs(w[at & incorrect])),
            "per_token_weight_correct": _median(np.abs(w[at & correct])),
        })
    unit = np.divide(np.abs(w), np.abs(a), out=np.zeros(r.n), where=a != 0)  # the normaliser's part: |w / A|
    b, r2 = _power_law(groups.log_len, unit)
    b_all, r2_all = _power_law(groups.log_len, w)
    short, long_ = rows[0]["per_token_weight_incorrect"], rows[-1]["per_token_weight_incorrect"]
    return {
        "loss_type": loss.name,
        "scale_rewards": scale,
        "normaliser": loss.normaliser,
        "hyperparameters": {str(k): float(v) for k, v in loss.values(hyper).items() if v.is_finite},
        "silent_groups": int(groups.silent_groups.sum()),
        "silent_group_share": float(groups.silent_groups.mean()),
        "zero_weight_groups": int((np.bincount(r.group, total, r.n_groups) == 0).sum()),
        "incorrect_weight_share": float(total[incorrect].sum() / mass) if mass > 0 else None,
        "incorrect_rollout_share": float(incorrect[live].mean()) if live.any() else None,
        "by_length_decile": rows,
        "per_token_weight_exponent": b,
        "per_token_weight_r2": r2,
        "per_token_weight_exponent_with_advantage": b_all,
        "per_token_weight_r2_with_advantage": r2_all,
        "incorrect_long_short_ratio": (long_ / short) if short and long_ is not None else None,
        "by_length": _scatter(groups, w, a),
    }


def _scatter(groups: Groups, w: np.ndarray, a: np.ndarray) -> dict[str, list[float]]:
    """Median |per-token weight| per length bin (at most SCATTER_BINS log-spaced bins), correct
    and incorrect: the figure's data."""
    out: dict[str, list[float]] = {"length": [], "correct": [], "incorrect": []}
    signs = (("correct", a > 0), ("incorrect", a < 0))
    for i in range(int(groups.length_bin.max(initial=-1)) + 1):
        at = groups.length_bin == i
        if not at.any():
            continue
        out["length"].append(float(np.exp(groups.log_len[at].mean())))
        for key, sign in signs:
            m = _median(np.abs(w[at & sign]))
            out[key].append(float("nan") if m is None else m)
    return out


def length_bias(r: Rollouts, groups: Groups) -> dict[str, Any]:
    """Are incorrect responses longer than the correct ones of the same prompt? Per group with a
    gradient, the mean log-length of its below-mean responses minus that of its above-mean
    responses; the Wilcoxon signed-rank test of these differences against 0 (two-sided)."""
    k = r.n_groups
    mean_r = np.bincount(r.group, r.reward, k) / np.bincount(r.group, minlength=k)
    below = r.reward < mean_r[r.group]
    above = r.reward > mean_r[r.group]
    log_len = np.log(r.length)

    def group_mean(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        count = np.bincount(r.group, mask.astype(float), k)
        return np.divide(np.bincount(r.group, log_len * mask, k), count, out=np.zeros(k), where=count > 0), count

    m_below, n_below = group_mean(below)
    m_above, n_above = group_mean(above)
    use = (~groups.silent_groups) & (n_below > 0) & (n_above > 0)
    d = (m_below - m_above)[use]
    test = stats.length_test(d, np.zeros_like(d))
    test["name"] = "Wilcoxon signed-rank over groups, two-sided"
    reported = bool(d.size) and test["p_value"] < stats.ALPHA
    median = float(np.median(d)) if d.size else None
    out = {"groups_tested": int(d.size), "median_log_length_ratio": median,
           "median_length_ratio": math.exp(median) if median is not None else None, "test": test,
           "biased": reported}
    ratio = out["median_length_ratio"]
    if d.size < MIN_GROUPS:
        out["biased"] = False
        out["summary"] = (f"no verdict on length bias: only {d.size} group(s) have both correct and incorrect "
                          f"responses (at least {MIN_GROUPS} are needed)")
    elif reported:
        longer = "longer" if median is not None and median > 0 else "shorter"
        out["summary"] = (f"length-biased: incorrect responses are {longer} than the correct ones of the same prompt "
                          f"(median ratio {ratio:.2f}x over {d.size} groups, rank-biserial "
                          f"{test['rank_biserial']:+.2f}, Wilcoxon {test['p_value_text']} < {stats.ALPHA:g})")
    else:
        out["summary"] = (f"no length bias detected: incorrect and correct responses of the same prompt have similar "
                          f"lengths "
                          f"(median ratio {ratio:.2f}x over {d.size} groups, Wilcoxon {test['p_value_text']} >= "
                          f"{stats.ALPHA:g})")
    return out


def config_verdict(s: Mapping[str, Any], n_groups: int) -> str:
    """The configuration's findings in words, each with its number."""
    parts = [f"{s['silent_groups']} of {n_groups} groups silent ({s['silent_group_share']:.0%}, no gradient)"]
    share = s["incorrect_weight_share"]
    if share is None:
        return parts[0] + "; no gradient at all"
    rows = s["by_length_decile"]
    last = rows[-1]
    live = sum(row["rollouts"] for row in rows)
    parts.append(f"incorrect responses get {share:.0%} of the weight ({s['incorrect_rollout_share']:.0%} of the "
                 f"rollouts with a gradient); the incorrect responses of the longest decile get "
                 f"{last['incorrect_weight_share']:.0%} ({last['incorrect_rollouts'] / live:.0%} of the rollouts)")
    b, r2 = s["per_token_weight_exponent"], s["per_token_weight_r2"]
    if b is None:
        parts.append("per-token weight against length undefined (one length)")
    elif r2 is not None and r2 < 0.5:
        parts.append(f"per-token weight per unit advantage follows no power law of the length (best fit L^{b:.2f}, "
                     f"R^2 {r2:.2f})")
    elif abs(b) < 0.1:
        parts.append(f"per-token weight independent of the length (L^{b:.2f}, R^2 {r2:.2f})")
    else:
        who = "short" if b < 0 else "long"
        parts.append(f"per-token weight ~ L^{b:.2f} per unit advantage (R^2 {r2:.2f}): {who} responses' tokens "
                     "are pushed harder")
    ratio = s["incorrect_long_short_ratio"]
    if ratio is not None:
        parts.append(f"a token of an incorrect response in the longest decile is pushed down {ratio:.2f}x as hard as "
                     "one in the shortest decile")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# The configuration check
# --------------------------------------------------------------------------------------------


@caches.memo(maxsize=None)
def _surrogate_value() -> tuple[Any, str]:
    """The clipped surrogate's per-token value at rho = 1 as a function of A (derived: -A)."""
    from gradlab.group_losses import A, clipped

    value = sympy.simplify(clipped(sympy.S.One, sympy.Symbol("lp"), A))
    return sympy.lambdify(A, value, "numpy"), str(value)


def _candidate_losses(normaliser: str, scale: str) -> list[str]:
    from gradlab.group_losses import GROUP_LOSSES, clipped

    return [n for n, loss in GROUP_LOSSES.items() if loss.normaliser == normaliser and loss.token_loss is clipped
            and (scale == "leave_one_out") == (loss.scale_rewards == "leave_one_out")]


def configuration_check(r: Rollouts, groups: Groups | None = None, *,
                        max_completion_length: float | None = None) -> dict[str, Any]:
    """Which normaliser and advantage scaling a logged loss is consistent with.

    The log's loss is compared with each candidate's value at the first on-policy step: the
    clipped surrogate (-A per token at rho = 1; beta's k3 term is 0 there) summed over the
    rollout's tokens and divided by the normaliser N_i (:data:`gradlab.group_losses.NORMALISERS`),
    per rollout, or summed over the group when the log holds one value per group. Each group is
    taken as its own batch (sum_j |o_j| over the group). The constant normaliser G L_max fits
    L_max by least squares in [longest completion, 100x it] unless ``max_completion_length`` is
    given. Residuals are root-mean-square, relative to the largest of the log's and the
    candidates' own scales. A verdict needs MIN_GROUPS groups with a gradient, a best residual
    at most FIT, and a runner-up (another normaliser) at least SEPARATION times worse.
    """
    from gradlab.group_losses import NORMALISERS

    if r.loss is None:
        return {"available": False, "summary": "no logged loss (column 'loss'): no configuration check"}
    groups = groups or Groups.of(r)
    per_group = _constant_within_groups(r, groups)
    value, value_text = _surrogate_value()
    live_groups = int((~groups.silent_groups).sum())
    y = _unit(r, r.loss, per_group)
    candidates = []
    for scale in (*SCALES, "leave_one_out"):
        a = group_advantages(r, scale)
        for name, fn in NORMALISERS.items():
            if name == "constant":
                n_i = groups.size  # times L_max, fitted below
            else:
                n_i = np.asarray(fn(r.length, groups.len_sum, groups.size), dtype=float) * np.ones(r.n)
            pred = _unit(r, np.asarray(value(a), dtype=float) * r.length / n_i, per_group)
            entry: dict[str, Any] = {"normaliser": name, "scale_rewards": scale,
                                     "losses": _candidate_losses(name, scale)}
            if name == "constant":
                longest = float(r.length.max())
                if max_completion_length is not None:
                    c = 1.0 / float(max_completion_length)
                else:
                    pp = float(pred @ pred)
                    c = float(y @ pred) / pp if pp > 0 else 1.0 / longest
                    c = min(max(c, 1.0 / (LMAX_RANGE * longest)), 1.0 / longest)
                entry["max_completion_length"] = 1.0 / c
                pred = pred * c
            entry["_pred"] = pred
            candidates.append(entry)
    floor = ROUNDING * max(_rms(entry["_pred"]) for entry in candidates)
    for entry in candidates:
        entry["residual"] = _residual(y, entry.pop("_pred"), floor)
    candidates.sort(key=lambda entry: entry["residual"])
    best = candidates[0]
    other = next(c for c in candidates if c["normaliser"] != best["normaliser"])
    same = [c for c in candidates[1:] if c["normaliser"] == best["normaliser"]]
    out: dict[str, Any] = {
        "available": True, "level": "group" if per_group else "rollout", "groups_with_gradient": live_groups,
        "per_token_value": f"{value_text} (the clipped surrogate at rho = 1)",
        "candidates": candidates, "best": best, "runner_up": other, "decided": False,
        "thresholds": {"fit": FIT, "separation": SEPARATION, "min_groups": MIN_GROUPS},
    }
    name = _describe(best)
    if live_groups < MIN_GROUPS:
        out["summary"] = (f"no verdict: only {live_groups} group(s) carry a gradient (at least {MIN_GROUPS} are needed "
                          f"to tell normalisers apart); closest: {name}, residual {best['residual']:.2g}")
    elif best["residual"] > FIT:
        out["summary"] = (f"no verdict: no candidate matches the logged loss (the closest, {name}, leaves a residual "
                          f"of {best['residual']:.2g} of its scale, above {FIT:g}): the log is noisy, or its loss is "
                          "not the clipped surrogate at the first on-policy step")
    elif other["residual"] < max(SEPARATION * best["residual"], 2 * FIT):
        out["summary"] = (f"no verdict: {name} (residual {best['residual']:.2g}) and {_describe(other)} (residual "
                          f"{other['residual']:.2g}) fit about equally well on this log")
    else:
        out["decided"] = True
        scale_known = not same or same[0]["residual"] >= max(SEPARATION * best["residual"], 2 * FIT)
        out["scale_rewards_decided"] = scale_known
        scale_text = (f"scale_rewards=\"{best['scale_rewards']}\"" if scale_known else
                      f"scale_rewards not determined ({same[0]['scale_rewards']} fits as well)")
        out["summary"] = (f"your logged loss matches {name} (residual {best['residual']:.2g} of its scale; "
                          f"{scale_text}), not {_describe(other)} (residual {other['residual']:.2g})")
    return out


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def _residual(y: np.ndarray, pred: np.ndarray, floor: float) -> float:
    """RMS(y - pred) relative to the larger of the two scales: 0 for a perfect match, 1 for a
    prediction of 0 against a non-zero log (or the reverse). ``floor`` keeps two values that
    are both 0 to rounding (grpo's per-group loss at the first step) a match."""
    scale = max(_rms(y), _rms(pred), floor)
    if scale <= 1e-300:
        return 0.0
    return _rms(y - pred) / scale


def _describe(c: Mapping[str, Any]) -> str:
    who = "/".join(c["losses"]) or f"no registered loss with {c['scale_rewards']}"
    formula = {"per_sequence": "1/|o_i|", "group_tokens": "sum_j |o_j|", "sequences": "1/G",
               "constant": f"G L_max (L_max {c.get('max_completion_length', 0):.0f})"}[c["normaliser"]]
    return f"the {formula} normaliser ({c['normaliser']}: {who})"


def _constant_within_groups(r: Rollouts, groups: Groups) -> bool:
    """A logged loss with one value per group: equal on every row of each group with a gradient."""
    assert r.loss is not None
    k = r.n_groups
    lo = np.full(k, np.inf)
    hi = np.full(k, -np.inf)
    np.minimum.at(lo, r.group, r.loss)
    np.maximum.at(hi, r.group, r.loss)
    live = ~groups.silent_groups
    return bool(live.any()) and bool(np.all((hi - lo)[live] <= 1e-12 * np.maximum(1.0, np.abs(hi[live]))))


def _unit(r: Rollouts, x: np.ndarray, per_group: bool) -> np.ndarray:
    """Per rollout, or summed per group (a per-group log holds the group's value on every row)."""
    if not per_group:
        return x
    if x is r.loss:
        first = np.unique(r.group, return_index=True)[1]
        out = np.zeros(r.n_groups)
        out[r.group[first]] = x[first]
        return out
    return np.bincount(r.group, x, r.n_groups)


# --------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutReport:
    """The result of :func:`audit_rollouts`. ``as_dict()`` is what ``gradlab audit --json`` prints."""

    source: str
    dataset: dict[str, Any]
    configurations: list[dict[str, Any]]
    configuration_check: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "rollouts", "source": self.source, "weight_definition": WEIGHT_DEFINITION,
                "dataset": self.dataset, "configurations": self.configurations,
                "configuration_check": self.configuration_check, "notes": self.notes}


def audit_rollouts(
    data: str | os.PathLike | Rollouts,
    losses: Sequence[str] | None = None,
    values: Mapping[str, Any] | None = None,
    *,
    scale_rewards: Sequence[str] | None = None,
) -> RolloutReport:
    """Audit a rollout log: per group loss (all by default) and ``scale_rewards`` (each the loss
    takes, by default), where the gradient goes; whether the log is length-biased; and, with a
    logged loss, which normaliser it matches. ``values`` overrides hyperparameters (e.g.
    ``max_completion_length``), for every loss that has them."""
    r = data if isinstance(data, Rollouts) else read_rollouts(data)
    values = dict(values or {})
    configs = _configurations(losses, scale_rewards)
    known = {h for loss, _ in configs for h in loss.defaults}
    unknown = sorted(set(values) - known)
    if unknown:
        raise GradlabError(f"--set {', '.join(unknown)}: no audited group loss has such a hyperparameter; theirs: "
                           f"{', '.join(sorted(known)) or 'none'}")
    groups = Groups.of(r)
    sizes = np.bincount(r.group, minlength=r.n_groups)
    out = []
    advantages = {scale: group_advantages(r, scale) for scale in dict.fromkeys(scale for _, scale in configs)}
    for loss, scale in configs:
        s = config_statistics(r, groups, loss, scale, values, advantages[scale])
        s["verdict"] = config_verdict(s, r.n_groups)
        out.append(s)
    bias = length_bias(r, groups)
    dataset = {
        "n_rollouts": r.n, "n_groups": r.n_groups,
        "group_size": {"min": int(sizes.min()), "max": int(sizes.max()), "median": float(np.median(sizes))},
        "silent_groups": int(groups.silent_groups.sum()), "silent_group_share": float(groups.silent_groups.mean()),
        "rollouts_in_silent_groups": int(groups.silent.sum()),
        "completion_length": stats.summary(r.length), "reward": stats.summary(r.reward),
        "length_bias": bias,
        "columns_used": [c for c in (*ROLLOUT_COLUMNS, *OPTIONAL_COLUMNS) if c in r.columns] or list(ROLLOUT_COLUMNS),
    }
    if r.logps is not None:
        dataset["mean_token_logp"] = float((r.logps / r.length).mean())
    if r.logps is not None and r.ref_logps is not None:
        dataset["mean_token_log_ratio_to_reference"] = float(((r.logps - r.ref_logps) / r.length).mean())
    if r.token_logp_mean is not None:
        dataset["token_logps_mean"] = float(r.token_logp_mean.mean())
    notes = ["weights at the first on-policy step (rho = kappa = 1: policy = pi_old = reference), where beta's KL "
             "term has no gradient; log-prob columns are summarised, not used in the weights",
             "incorrect: a reward below its group's mean (advantage < 0); correct: above"]
    lmax = values.get("max_completion_length")
    check = configuration_check(r, groups, max_completion_length=float(lmax) if lmax is not None else None)
    return RolloutReport(source=r.source, dataset=dataset, configurations=out, configuration_check=check, notes=notes)


def render_rollouts(report: RolloutReport) -> str:
    """The human-readable rollout audit."""
    ds = report.dataset
    gs = ds["group_size"]
    size = f"{gs['min']}" if gs["min"] == gs["max"] else f"{gs['min']}-{gs['max']}"
    lines = [
        f"gradlab audit: {report.source}: {ds['n_rollouts']:,} rollouts in {ds['n_groups']:,} groups of {size}",
        f"  silent groups (every reward equal, no gradient): {ds['silent_groups']} ({ds['silent_group_share']:.1%})",
        f"  completion length median {ds['completion_length']['q50']:g} (1%-99%: "
        f"{ds['completion_length']['q01']:g}-{ds['completion_length']['q99']:g})",
        f"  {ds['length_bias']['summary']}",
        f"  configuration check: {report.configuration_check['summary']}",
        "",
    ]
    width = max(9, *(len(names) for names, _ in _alike(report.configurations)))
    head = (f"{'loss_type':<{width}}  {'scale':<13}  {'silent':>6}  {'wrong%':>6}  {'wrong% longest':>14}  "
            f"{'w ~ L^b':>7}  {'R^2':>4}")
    lines += [head, "-" * len(head)]
    for names, s in _alike(report.configurations):
        b, r2 = s["per_token_weight_exponent"], s["per_token_weight_r2"]
        last = s["by_length_decile"][-1]["incorrect_weight_share"]
        lines.append(f"{names:<{width}}  {s['scale_rewards']:<13}  {s['silent_group_share']:>6.1%}  "
                     f"{_pct(s['incorrect_weight_share']):>6}  {_pct(last):>14}  {_num(b):>7}  {_num(r2):>4}")
    lines += ["", f"weight: {WEIGHT_DEFINITION}; wrong%: incorrect responses' share of it (longest: the longest "
              "length decile's); w ~ L^b: the per-token weight per unit advantage against length; losses whose "
              "numbers are all equal share a row (--json lists each)", "", "verdicts:"]
    for names, s in _alike(report.configurations):
        lines.append(f"  {names} (scale_rewards={s['scale_rewards']}): {s['verdict']}.")
    check = report.configuration_check
    if check.get("available"):
        lines += ["", f"configuration check ({check['level']} losses; residual: RMS misfit / scale):"]
        for c in check["candidates"][:6]:
            lines.append(f"  {c['residual']:>9.3g}  {_describe(c)}, scale_rewards={c['scale_rewards']}")
    lines += ["", *(f"note: {n}" for n in report.notes)]
    return "\n".join(lines)


def _alike(configurations: Sequence[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """Configurations with the same scale_rewards and the same verdict (every reported number the
    same: the weights differ by a constant factor at most, as dapo's and cispo's), as one row."""
    rows: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for s in configurations:
        rows.setdefault((s["scale_rewards"], s["verdict"]), []).append(s)
    return [(", ".join(s["loss_type"] for s in alike), alike[0]) for alike in rows.values()]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:+.2f}"
