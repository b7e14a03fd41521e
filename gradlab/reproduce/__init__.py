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

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradlab.errors import GradlabError
from gradlab.output import jsonable

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn
    from matplotlib.figure import Figure

__all__ = ["Entry", "Outcome", "Result", "Versus", "ENTRIES", "get_entry", "run", "run_all", "make_figure"]

Measured = dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """What an experiment returns: the numbers the predicate reads, and what the figure draws."""

    measured: Measured
    series: Mapping[Any, Any] = field(default_factory=dict)  # keyed by name or by a tuple of settings


@dataclass(frozen=True)
class Versus:
    """One comparison of an effect with its control, as the predicate judges it: what is
    compared, the effect's number, the control's number, and whether the effect beats it."""

    comparison: str
    effect: float
    control: float
    holds: bool

    def as_dict(self) -> dict[str, Any]:
        return {"comparison": self.comparison, "effect": self.effect, "control": self.control,
                "holds": bool(self.holds)}


@dataclass(frozen=True)
class Entry:
    """One published claim and its reproduction.

    ``experiment(quick)`` runs it (``quick`` shortens training where the entry allows it; the
    predicate is the same); ``judge(measured)`` is the predicate, ``predicate`` its wording;
    ``plot(fig, outcome)`` draws the small figure. ``pending`` names what the experiment waits
    for, when it cannot run yet. ``finding`` records what we found when we investigated a
    failure (ours or the paper's), shown beside a FAIL. ``versus(measured)`` lists how the effect
    compared with each control, as the predicate judges it (:class:`Versus` rows); an entry with a
    control has one, and its predicate requires every row to hold.
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
    versus: Callable[[Measured], list[Versus]] | None = None
    options: Mapping[str, str] = field(default_factory=dict)  # keyword -> what it accepts (--set KEY=VALUE)

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
            "measured": jsonable(self.measured),  # NaN and infinities are null (gradlab.output)
            "quick": self.quick,
            "seconds": round(self.seconds, 3),
        }
        if e.versus is not None and self.status != "PENDING":
            out["controls"] = [jsonable(v.as_dict()) for v in e.versus(self.measured)]
        if e.pending:
            out["pending"] = e.pending
        if e.finding:
            out["finding"] = e.finding
        return out


def _registry() -> dict[str, Entry]:
    # the entry modules hold the experiments; this is the one list, in catalogue order
    from gradlab.reproduce import alignment, displacement, feng, gradients, grpo, optimum, training, variants

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
        variants.SAMPO,
        variants.DPOP,
        variants.CHES_SEQUENCE,
        variants.TAJWAR_BANDIT,
        variants.TAJWAR_NEGATIVE,
        grpo.LENGTH_BIAS,
        grpo.WEIGHTS,
        grpo.SILENT,
        grpo.ENTROPY,
        grpo.RANK,
        grpo.TRL_EQUIVALENCES,
        grpo.NEGATIVE,
        grpo.PSR_NSR,
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


def run(entry: Entry | str, *, quick: bool = False, options: Mapping[str, Any] | None = None) -> Result:
    """Run one entry and judge it. Float64 JAX is switched on for the run only. ``options`` are
    keywords of the entry's experiment (``Entry.options`` lists them; ``gradlab reproduce NAME --set
    KEY=VALUE``), e.g. the start points of ``feng_flow_endpoint``; the predicate is the same.

    Args:
        entry: the entry or its name in ``ENTRIES``.
        quick: shorten training where the entry allows it.
        options: keywords of the entry's experiment.

    Returns:
        The :class:`Result`: the verdict (``PASS``, ``FAIL`` or ``PENDING``), what was measured,
        the outcome the figure draws, and the seconds taken.
    """
    import jax

    entry = get_entry(entry) if isinstance(entry, str) else entry
    options = dict(options or {})
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        allowed = ", ".join(f"{k} ({v})" for k, v in entry.options.items()) or "none"
        raise GradlabError(f"'{entry.name}' has no option {', '.join(unknown)}; its options: {allowed}")
    start = time.perf_counter()
    if not entry.runnable:
        return Result(entry, "PENDING", {}, None, 0.0, quick)
    assert entry.experiment is not None and entry.judge is not None  # a runnable entry has both
    with jax.enable_x64(True):
        outcome = entry.experiment(quick, **options)
        passed = bool(entry.judge(outcome.measured))
        if entry.versus is not None:  # the effect must beat every control: passed is the conjunction
            passed = passed and all(v.holds for v in entry.versus(outcome.measured))
    return Result(entry, "PASS" if passed else "FAIL", outcome.measured, outcome,
                  time.perf_counter() - start, quick)


def run_all(names: Iterable[str] | None = None, *, quick: bool = False,
            progress: Callable[[Result], None] | None = None,
            options: Mapping[str, Any] | None = None) -> list[Result]:
    """Run and judge several entries, one after the other (see :func:`run`).

    Args:
        names: the entries (default: every entry of ``ENTRIES``, pending ones included).
        quick: shorten training where an entry allows it (the predicates stay the same).
        progress: called with each result as it is judged.
        options: keywords passed to every entry's experiment.

    Returns:
        One :class:`Result` per entry, in order.
    """
    from gradlab import progress as bars

    results = []
    chosen = list(names or ENTRIES)
    with bars.bar(len(chosen), "reproducing", unit="entry") as done:
        for name in chosen:
            result = run(name, quick=quick, options=options)
            if progress is not None:
                progress(result)
            results.append(result)
            done.update()
    return results


def make_figure(result: Result) -> Figure | None:
    """The entry's small figure (pure: no I/O), in the figure gallery's style at page width
    (:mod:`gradlab.figures.style`); ``None`` for a pending entry. Draw it, and render it, inside
    ``style.use("page")``, as :func:`gradlab.reproduce.docs.save_figures` does: the entries
    name colours by the style's cycle (``C0``, ``C1``, ...)."""
    from gradlab.figures import style

    if result.outcome is None or result.entry.plot is None:
        return None
    fig = style.figure(0.47)
    result.entry.plot(fig, result.outcome)
    status = result.status + (" (shortened run)" if result.quick and result.entry.shortened else "")
    fig.suptitle(f"{result.entry.title}: {status}")
    return style.finish(fig)
