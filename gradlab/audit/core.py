"""``audit``: what each loss will do to a preference dataset, with a verdict per loss."""

from __future__ import annotations

import math
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradlab import progress, symbolic
from gradlab.audit import stats
from gradlab.audit.io import AuditInputError, Pairs, read_pairs
from gradlab.audit.gradients import Weights, closed_forms, evaluate
from gradlab.errors import GradlabError
from gradlab.losses import LOSSES, Loss, get_loss

__all__ = ["AuditReport", "audit", "verdict", "dominant_pair", "render", "select_losses", "WEIGHT_DEFINITION"]

WEIGHT_DEFINITION = (
    "per pair, |d loss/d lp_w| + |d loss/d lp_l| (closed forms, log view): the pair's total push on its "
    "chosen and rejected sequence log-likelihoods in one gradient step"
)


@dataclass(frozen=True)
class AuditReport:
    """The result of :func:`audit`. ``as_dict()`` is what ``gradlab audit --json`` prints."""

    source: str
    length_source: str
    policy: str
    reference: str
    dataset: dict[str, Any]
    losses: dict[str, dict[str, Any]]
    refused: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "length_source": self.length_source,
            "policy": self.policy,
            "reference": self.reference,
            "weight_definition": WEIGHT_DEFINITION,
            "dataset": self.dataset,
            "losses": self.losses,
            "refused": self.refused,
        }


# --------------------------------------------------------------------------------------------
# Which losses
# --------------------------------------------------------------------------------------------


def _refusal(loss: Loss, pairs: Pairs) -> str | None:
    if loss.kind != "pair":
        return ("an expectation over responses sampled from the policy being trained, not a loss on fixed "
                "pairs: a dataset of offline pairs cannot say what it does")
    if loss.needs_reference and not pairs.has_reference:
        return ("needs the reference model's log-probs (columns ref_chosen_logps, ref_rejected_logps); "
                "produce them with TRL's precompute_ref_log_probs=True (docs/audit.md)")
    return None


def select_losses(names: Sequence[str | Loss] | None, pairs: Pairs) -> tuple[list[Loss], dict[str, str]]:
    """The losses to audit and the ones refused, with the reason. ``names`` holds loss names
    (registered, aliases, TRL names, weighted combinations) or :class:`Loss` objects
    (``gradlab.custom(...)``, ``losses.combine(...)``). Named losses that cannot run on this data
    are an error; of all registered losses (no names), those are listed as refused."""
    if names:
        chosen: list[Loss] = []
        for name in names:
            loss = name if isinstance(name, Loss) else get_loss(name)
            same_name = [other for other in chosen if other.name == loss.name]
            if loss in chosen or any(other.expr == loss.expr for other in same_name):
                continue  # the same loss twice (a combination by name and as an object, say)
            if same_name:
                raise GradlabError(f"two audited losses are both called '{loss.name}'; name them apart "
                                   "(gradlab.custom(formula, name=...))")
            chosen.append(loss)
        problems = [(loss.name, why) for loss in chosen if (why := _refusal(loss, pairs))]
        if problems:
            runnable = [n for n, loss in LOSSES.items() if _refusal(loss, pairs) is None]
            lines = "; ".join(f"'{n}' {why}" for n, why in problems)
            raise AuditInputError(f"cannot audit {lines}. On this data these losses run: {', '.join(runnable)}")
        return chosen, {}
    run, refused = [], {}
    for name, loss in LOSSES.items():
        why = _refusal(loss, pairs)
        if why:
            refused[name] = why
        else:
            run.append(loss)
    if not run:
        reasons = "; ".join(f"{k}: {v}" for k, v in refused.items())
        raise AuditInputError(f"no registered loss can run on this data: {reasons}")
    return run, refused


def _values_for(losses: Iterable[Loss], values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    losses = list(losses)
    known = {h for loss in losses for h in loss.hyperparameters}
    unknown = sorted(set(values) - known)
    if unknown:
        raise GradlabError(f"--set {', '.join(unknown)}: no audited loss has such a hyperparameter; theirs: "
                           f"{', '.join(sorted(known)) or 'none'}")
    return {loss.name: {k: v for k, v in values.items() if k in loss.hyperparameters} for loss in losses}


# --------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------


def _strength(r: float) -> str:
    a = abs(r)
    return "strongly" if a >= 0.5 else "moderately" if a >= 0.3 else "weakly"


R2_MIN = 0.5  # a power law L^b is reported only where it explains at least this share of log|lever|'s variance
DOMINANT = 0.1  # one pair "dominates" when it carries more than this share of all the weight ...
DOMINANT_FAIR = 10.0  # ... and more than this many times its fair share 1/n


def dominant_pair(s: Mapping[str, Any], n: int) -> tuple[int, float] | None:
    """(row, share) of a single pair that carries a large part of all the weight, or None."""
    share = s.get("largest_share")
    if share is None or not s["top_pairs"] or share <= DOMINANT or share * n <= DOMINANT_FAIR:
        return None
    return int(s["top_pairs"][0]["row"]), float(share)


def verdict(s: Mapping[str, Any], n: int | None = None) -> str:
    """One sentence per finding (concentration, length dependence, per-token lever), each with
    the number that supports it; a finding the numbers do not support is refused, with why."""
    parts = []
    top10, top1 = s["top10_share"], s["top1_share"]
    dominant = dominant_pair(s, n) if n is not None else None
    if top10 is None:
        parts.append("no gradient on any pair")
    elif s["constant_weight"]:
        spread = s.get("weight_spread") or 0.0
        parts.append(f"every pair pushed equally (the weights differ by at most {spread:.1g} of the largest: "
                     "float64 rounding)" if spread else "every pair pushed equally (identical weights)")
    else:
        how = "concentrated" if top10 >= 0.5 else "uneven" if top10 >= 0.2 else "spread evenly"
        parts.append(f"{how}: the top 10% of pairs carry {top10:.0%} of the gradient (top 1%: {top1:.0%})")
        if dominant is not None:
            parts.append(f"one pair (row {dominant[0]}) carries {dominant[1]:.0%} of all the weight")
    rho = s["corr_weight_length_difference"]
    if rho is not None:
        if abs(rho) < 0.1:
            parts.append(f"weight independent of the length difference (rho {rho:+.2f})")
        else:
            more = "more" if rho > 0 else "less"
            parts.append(f"weight {_strength(rho)} tied to the length difference (rho {rho:+.2f}): pairs whose "
                         f"chosen is longer get {more} push")
    b, r2 = s["lever_exponent"], s.get("lever_r2")
    if b is None:
        parts.append("per-token lever undefined (no push, or one length)")
    elif dominant is not None:
        parts.append(f"no per-token lever verdict: one pair carries {dominant[1]:.0%} of the weight, so a fitted "
                     f"L^{b:.2f} would describe that pair rather than the data")
    elif r2 is not None and r2 < R2_MIN:
        ratio = s.get("lever_long_short_ratio")
        fit = f"the best fit, L^{b:.2f}, explains R^2 = {r2:.2f} of its variance"
        if ratio is not None and 0.5 <= ratio <= 2.0:  # flat: a slope near 0 explains nothing, rightly
            parts.append(f"per-token lever roughly length-neutral: the longest quarter of responses gets {ratio:.2f}x "
                         f"the shortest quarter's ({fit}, so no power law is claimed)")
        else:
            tail = f"; longest / shortest quarter {ratio:.2f}x" if ratio is not None else ""
            parts.append(f"per-token lever follows no power law of the length ({fit}{tail})")
    else:
        fit = f" (R^2 {r2:.2f})" if r2 is not None else ""
        if b > 0.5:
            parts.append(f"per-token lever ~ L^{b:.2f}{fit}: pushes per-token log-probs of long responses harder")
        elif b < -0.5:
            parts.append(f"per-token lever ~ L^{b:.2f}{fit}: pushes per-token log-probs of short responses harder")
        else:
            parts.append(f"per-token lever ~ L^{b:.2f}{fit}: roughly length-neutral")
    return "; ".join(parts)


def _length_sentence(ds: Mapping[str, Any]) -> str:
    t = ds["length_test"]
    p = t["p_value_text"]
    if ds["length_difference"] is None:
        return (f"no length difference between chosen and rejected (Wilcoxon signed-rank {p} >= "
                f"{t['alpha']:g})")
    return (f"length difference: {ds['length_difference']} (median difference {ds['length_difference_median']:+g}, "
            f"rank-biserial {t['rank_biserial']:+.2f}, Wilcoxon signed-rank {p})")


# --------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------


def _nonfinite(w: Weights, names: Sequence[str], data: Mapping[str, np.ndarray]) -> str | None:
    arrays = (w.g_w, w.g_l, w.lever_w, w.lever_l)
    if all(np.isfinite(a.sum()) for a in arrays):  # one pass each; a NaN or inf makes the sum so
        return None
    bad = ~np.isfinite(np.stack(arrays)).all(axis=0)
    if not bad.any():  # the sum overflowed, every value is finite
        return None
    i = int(np.flatnonzero(bad)[0])
    at = ", ".join(f"{k}={data[k][i]:g}" for k in names if k in data)
    return (f"its closed-form gradient is not finite in float64 at {int(bad.sum())} pair(s), first at row {i} "
            f"({at}): outside the loss's domain or beyond float64's range there")


def audit(
    data: str | os.PathLike | Pairs,
    losses: Sequence[str | Loss] | None = None,
    values: Mapping[str, Any] | None = None,
    *,
    tokenizer: str | os.PathLike | None = None,
    top: int = 10,
    workers: int | None = None,
) -> AuditReport:
    """Audit a preference dataset: per loss, how its gradient is spread over the pairs, how it
    depends on length, its per-token lever, and the dominating pairs; plus the dataset's own
    length statistics. ``data`` is a file (JSON Lines, CSV, Parquet; TRL's column names) or
    :class:`Pairs`. ``losses`` are names or :class:`Loss` objects (``gradlab.custom(...)``);
    ``values`` overrides hyperparameters, for every audited loss that has them.
    ``workers`` threads evaluate losses side by side (default: one per core).

    Args:
        data: a file of pairs, or :class:`Pairs` already in memory.
        losses: the losses to audit (default: every registered one).
        values: hyperparameter values, applied to each loss that has the hyperparameter.
        tokenizer: a local tokenizer file or folder that counts the lengths of text columns.
        top: how many of the heaviest pairs each loss lists.
        workers: threads that evaluate losses side by side.

    Returns:
        The :class:`AuditReport` (:func:`render` prints it; its ``as_dict`` is the JSON).
    """
    if top < 1:
        raise GradlabError(f"top must be a positive whole number, not {top}")
    pairs = data if isinstance(data, Pairs) else read_pairs(data, tokenizer=tokenizer)
    chosen, refused = select_losses(losses, pairs)
    per_loss_values = _values_for(chosen, dict(values or {}))
    arrays = _canonical(pairs)
    threads = max(1, min(workers or os.cpu_count() or 1, len(chosen)))

    buffers = threading.local()  # one (4, n) array per thread, reused loss after loss

    def one(loss: Loss, forms: Any, hyper: dict[str, float], lengths_ready: Future) -> dict[str, Any] | str:
        # numpy only (no sympy, which is not thread-safe): the closed forms are compiled already.
        # The statistics keep no array (plain numbers and lists), so the buffer is free afterwards.
        if not hasattr(buffers, "out"):
            buffers.out = np.empty((4, pairs.len_w.size))
        w = evaluate(forms, arrays, buffers.out)
        problem = _nonfinite(w, loss.variables, arrays)
        if problem:
            return problem
        s = stats.loss_statistics(w.g_w, w.g_l, w.lever_w, w.lever_l, lengths_ready.result(), top=top)
        s["hyperparameters"] = hyper
        s["notes"] = _notes(loss)
        s["verdict"] = verdict(s, pairs.n)
        return s

    # A pipeline: this thread compiles each loss's closed forms (sympy: Python, holds the GIL)
    # while the pool evaluates the losses compiled before it and their statistics (numpy: sorts
    # and ufuncs release the GIL), so compiling hides behind evaluating on a second core. A short
    # switch interval lets a worker back in as soon as its numpy call returns.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 5e-4))
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            lengths_ready = pool.submit(stats.Lengths.of, pairs.len_w, pairs.len_l)
            futures = []
            for loss in chosen:
                vals = per_loss_values[loss.name]
                try:
                    hyper = {k.name: float(v) for k, v in symbolic.parameter_values(loss, vals).items()}
                except GradlabError as exc:  # a custom loss's hyperparameter without a default, say
                    raise type(exc)(f"{exc} (gradlab audit: --set NAME=VALUE; Python: values={{NAME: VALUE}})") \
                        from None
                futures.append(pool.submit(one, loss, closed_forms(loss, vals), hyper, lengths_ready))
            dataset_ready = pool.submit(stats.length_statistics, pairs.len_w, pairs.len_l)
            outcomes = []
            with progress.bar(len(futures), "auditing", unit="loss") as done:
                for f in futures:
                    outcomes.append(f.result())
                    done.update()
            dataset = dataset_ready.result()
    finally:
        sys.setswitchinterval(interval)
    results: dict[str, dict[str, Any]] = {}
    for loss, outcome in zip(chosen, outcomes, strict=True):
        if isinstance(outcome, str):
            refused[loss.name] = outcome
        else:
            results[loss.name] = outcome
    if not results:
        raise AuditInputError("no loss could be audited: " + "; ".join(f"{k}: {v}" for k, v in refused.items()))
    dataset["summary"] = _length_sentence(dataset)
    return AuditReport(
        source=pairs.source,
        length_source=pairs.length_source,
        policy=(f"columns {pairs.used.get('lp_w', 'lp_w')}, {pairs.used.get('lp_l', 'lp_l')}" if pairs.has_policy
                else "missing: policy = reference, as at initialisation (the start of DPO training)"),
        reference=(f"columns {pairs.used.get('ref_w', 'ref_w')}, {pairs.used.get('ref_l', 'ref_l')}"
                   if pairs.has_reference else "missing: reference-based losses refused"),
        dataset=dataset,
        losses=results,
        refused=refused,
    )


def _canonical(pairs: Pairs) -> dict[str, np.ndarray]:
    out: dict[str, Any] = {"len_w": pairs.len_w, "len_l": pairs.len_l}  # has_*: which of the others are set
    if pairs.has_reference:
        out |= {"ref_w": pairs.ref_w, "ref_l": pairs.ref_l}
    # no policy log-probs: the policy is the reference, as at the start of training
    out |= {"lp_w": pairs.lp_w, "lp_l": pairs.lp_l} if pairs.has_policy else {"lp_w": pairs.ref_w, "lp_l": pairs.ref_l}
    return out


def _notes(loss: Loss) -> list[str]:
    notes = []
    if any(v.startswith("tail") or v.startswith("ref_tail") for v in loss.variables):
        notes.append("the tail log-probs (tokens past the shorter response) are estimated at the response's mean "
                     "per-token log-prob (the length view's assumption): no dataset column holds them")
    return notes


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "+.2f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def render(report: AuditReport) -> str:
    """The human-readable report: the dataset, a table, and a verdict per loss."""
    ds = report.dataset
    lines = [
        f"gradlab audit: {report.source}: {ds['n_pairs']:,} pairs",
        f"  lengths:   {report.length_source}",
        f"  policy:    {report.policy}",
        f"  reference: {report.reference}",
        f"  chosen length mean {ds['chosen_length_mean']:.4g} (median {ds['chosen_length_median']:g}), "
        f"rejected {ds['rejected_length_mean']:.4g} (median {ds['rejected_length_median']:g}); "
        f"chosen longer in {ds['pairs_chosen_longer']:.1%} of pairs",
        f"  {ds['summary']}",
        "",
    ]
    width = max([4, *map(len, report.losses)])
    head = (f"{'loss':<{width}}  {'top1%':>6} {'top10%':>6}  {'rho dlen':>8} {'rho len_w':>9} {'rho len_l':>9}  "
            f"{'from chosen-longer':>18}  {'lever L^b':>9}")
    lines += [head, "-" * len(head)]
    for name, s in report.losses.items():
        lines.append(
            f"{name:<{width}}  {_pct(s['top1_share']):>6} {_pct(s['top10_share']):>6}  "
            f"{_num(s['corr_weight_length_difference']):>8} {_num(s['corr_weight_chosen_length']):>9} "
            f"{_num(s['corr_weight_rejected_length']):>9}  {_pct(s['share_from_chosen_longer']):>18}  "
            f"{_num(s['lever_exponent'], '.2f'):>9}"
        )
    lines += ["", f"weight: {WEIGHT_DEFINITION}; rho: Spearman; '-': undefined (constant weight)", "", "verdicts:"]
    for name, s in report.losses.items():
        rows = ", ".join(str(r["row"]) for r in s["top_pairs"][:5])
        lines.append(f"  {name}: {s['verdict']}." + (f" Heaviest rows: {rows}" if rows else ""))
        for note in s["notes"]:
            lines.append(f"    note: {note}")
    if report.refused:
        lines += ["", "not audited:"]
        lines += [f"  {name}: {why}" for name, why in report.refused.items()]
    return "\n".join(lines)
