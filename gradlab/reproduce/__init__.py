"""The reproduction catalogue: published claims about preference losses, rerun in gradlab.

Each :class:`Entry` holds a claim in our own words, where it comes from (paper and equation,
figure or section), an experiment, and a predicate that was written down *before* the
experiment was run, from the paper's statement, with its thresholds as constants in the
entry's module. Running an entry gives a :class:`Result`: the measured numbers the predicate
read, PASS or FAIL, and the series its figure draws. A failing entry is reported as a failure;
where we investigated why, the entry says whether the difference is ours (a bug, a setting) or
the paper's. Entries whose experiment needs infrastructure that is not in gradlab yet are
registered as ``pending``: they never report PASS.

    gradlab reproduce --list
    gradlab reproduce NAME [--json]
    gradlab reproduce --all [--json] [--figures DIR]

``ENTRIES`` below is the one registry; the CLI, ``docs/reproductions.md`` (see
:mod:`gradlab.reproduce.docs`) and the tests iterate over it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gradlab.errors import GradlabError

__all__ = ["Entry", "Outcome", "Result", "ENTRIES", "get_entry", "run", "run_all", "make_figure"]

Measured = dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """What an experiment returns: the numbers the predicate reads, and what the figure draws."""

    measured: Measured
    series: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    """One published claim and its reproduction.

    ``experiment(quick)`` runs it (``quick`` shortens training where the entry allows it; the
    predicate is the same); ``judge(measured)`` is the predicate, ``predicate`` its wording;
    ``plot(fig, outcome)`` draws the small figure. ``pending`` names what the experiment waits
    for, when it cannot run yet. ``finding`` records what we found when we investigated a
    failure (ours or the paper's), shown beside a FAIL.
    """

    name: str
    title: str
    source: str
    claim: str
    setting: str
    predicate: str
    experiment: Callable[[bool], Outcome] | None
    judge: Callable[[Measured], bool] | None
    plot: Callable[[Any, Outcome], None] | None
    shortened: bool = False  # quick mode changes the numbers (training shortened)
    pending: str | None = None
    finding: str | None = None

    @property
    def runnable(self) -> bool:
        return self.pending is None


@dataclass(frozen=True)
class Result:
    entry: Entry
    status: str  # "PASS", "FAIL" or "PENDING"
    measured: Measured
    outcome: Outcome | None
    seconds: float
    quick: bool

    @property
    def passed(self) -> bool:
        return self.status == "PASS"

    def as_dict(self) -> dict[str, Any]:
        e = self.entry
        out = {
            "name": e.name,
            "title": e.title,
            "source": e.source,
            "claim": e.claim,
            "setting": e.setting,
            "predicate": e.predicate,
            "passed": self.passed,
            "status": self.status,
            "measured": _jsonable(self.measured),
            "quick": self.quick,
            "seconds": round(self.seconds, 3),
        }
        if e.pending:
            out["pending"] = e.pending
        if e.finding:
            out["finding"] = e.finding
        return out


def _jsonable(x: Any) -> Any:
    """Plain JSON types; a non-finite float is an error (no silent NaN in a report)."""
    import numpy as np

    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        f = float(x)
        if not math.isfinite(f):
            raise GradlabError(f"a measured number is not finite ({f}); the experiment is broken")
        return f
    if x is None or isinstance(x, str):
        return x
    raise TypeError(f"cannot report {type(x).__name__} as a measured number")


def _registry() -> dict[str, Entry]:
    # the entry modules hold the experiments; this is the one list, in catalogue order
    from gradlab.reproduce import alignment, displacement, feng, gradients, optimum, training

    table = (
        optimum.DPO_OPTIMUM,
        optimum.TEMPERING,
        feng.RATIO,
        feng.INVARIANTS,
        feng.ENDPOINT,
        alignment.AZAR_IPO,
        displacement.RAZIN,
        displacement.SQUEEZE,
        displacement.NO_SQUEEZE,
        displacement.SHARED_CONTEXT,
        displacement.ENTANGLEMENT,
        gradients.R_DPO,
        gradients.SIMPO,
        gradients.LD_DPO,
        optimum.H_DPO,
        training.LENGTH_PATHOLOGY,
        training.PROPER_LOSS,
    )
    return {e.name: e for e in table}


class _Entries(Mapping[str, Entry]):
    """``ENTRIES``: the registry, built on first use (no JAX or sympy work at import)."""

    _table: dict[str, Entry] | None = None

    def _get(self) -> dict[str, Entry]:
        if self._table is None:
            self._table = _registry()
        return self._table

    def __getitem__(self, name: str) -> Entry:
        return self._get()[name]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


ENTRIES: Mapping[str, Entry] = _Entries()


def get_entry(name: str) -> Entry:
    if name not in ENTRIES:
        import difflib

        close = difflib.get_close_matches(name, list(ENTRIES), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise GradlabError(f"unknown reproduction '{name}'.{hint} The entries are: {', '.join(ENTRIES)}")
    return ENTRIES[name]


def run(entry: Entry | str, *, quick: bool = False) -> Result:
    """Run one entry and judge it. Float64 JAX is switched on for the run only."""
    import jax

    entry = get_entry(entry) if isinstance(entry, str) else entry
    start = time.perf_counter()
    if not entry.runnable:
        return Result(entry, "PENDING", {}, None, 0.0, quick)
    with jax.enable_x64(True):
        outcome = entry.experiment(quick)
        passed = bool(entry.judge(outcome.measured))
    return Result(entry, "PASS" if passed else "FAIL", outcome.measured, outcome,
                  time.perf_counter() - start, quick)


def run_all(names: Iterable[str] | None = None, *, quick: bool = False,
            progress: Callable[[Result], None] | None = None) -> list[Result]:
    from gradlab import progress as bars

    results = []
    chosen = list(names or ENTRIES)
    with bars.bar(len(chosen), "reproducing", unit="entry") as done:
        for name in chosen:
            result = run(name, quick=quick)
            if progress is not None:
                progress(result)
            results.append(result)
            done.update()
    return results


def make_figure(result: Result):
    """The entry's small figure (pure: no I/O). ``None`` for a pending entry."""
    from matplotlib.figure import Figure

    if result.outcome is None or result.entry.plot is None:
        return None
    fig = Figure(figsize=(6.4, 3.2), layout="constrained")
    result.entry.plot(fig, result.outcome)
    status = result.status + (" (shortened run)" if result.quick and result.entry.shortened else "")
    fig.suptitle(f"{result.entry.title}: {status}", fontsize=10)
    return fig
