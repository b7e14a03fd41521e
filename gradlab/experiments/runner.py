"""Run an experiment: any optax optimiser, full or minibatch gradients, metrics recorded every
``record_every`` steps and always after the last one.

Every (sweep setting, seed) of an experiment becomes one *run*. A run's path through the package:

1. ``validate.load`` parses the experiment (``config``) and checks every sweep setting whole;
2. ``_engine.jobs`` builds each run's family (its registered class) and host inputs (seeded
   parameters, the dataset of ``datasets``), and ``_engine.groups`` stacks the runs whose static
   structure agrees into one compiled program, ``jit(vmap(...))`` over the runs;
3. the program trains each run on the objective of ``objective`` (the loss's closed-form
   partials in its canonical variables, pulled back through the policy by one vjp) and records
   its metrics;
4. this module gathers the records into a :class:`Result`: the resolved configuration and one
   :class:`Run` per (setting, seed), and refuses a run that diverged.

Divergence. At every recorded step the program also evaluates the objective J and the largest
parameter magnitude |theta|_max. A run has diverged at the first record where either is not
finite, or where |J| > ``GROWTH`` * max(1, |J at step 0|), or |theta|_max > ``GROWTH`` *
max(1, |theta|_max at step 0). A legitimate run of a preference loss moves its logits by tens, not
by a factor of a million (DPO's logits grow like log(steps)); a step too large for the
curvature multiplies them every step. :func:`run` then raises :class:`Diverged` (``gradlab run``
and ``gradlab simulate`` exit 2), naming the run, the recorded step and the quantity; with
``allow_divergence=True`` it returns the result and each :class:`Run` carries its ``diverged``
message (None for a run that stayed within the bounds).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from gradlab import progress
from gradlab.errors import GradlabError
from gradlab.experiments import _engine
from gradlab.experiments._engine import initial_params
from gradlab.experiments.config import Experiment
from gradlab.experiments.distributed import joined
from gradlab.experiments.objective import METRICS, canonical_variables
from gradlab.experiments.validate import build_family, checked, load, metric_names, resolved
from gradlab.output import jsonable

__all__ = ["Run", "Result", "Diverged", "GROWTH", "divergence", "run", "run_many", "build_family",
           "canonical_variables", "initial_params", "METRICS", "metric_names", "optimise", "program_count"]


@dataclass
class Run:
    """One (setting, seed): ``metrics[name]`` has one entry per recorded step."""

    setting: dict[str, Any]
    seed: int
    steps: list[int]
    metrics: dict[str, np.ndarray]
    diverged: str | None = None  # why the run counts as diverged (see the module docstring), or None

    def as_dict(self) -> dict[str, Any]:
        return {"setting": self.setting, "seed": self.seed, "steps": self.steps,
                "metrics": {k: jsonable(np.asarray(v, dtype=float)) for k, v in self.metrics.items()}}


@dataclass
class Result:
    """What ``gradlab run`` prints: the resolved configuration and every run."""

    config: dict[str, Any]
    runs: list[Run]

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "runs": [r.as_dict() for r in self.runs]}

    def series(self, name: str, setting: Mapping[str, Any] | None = None) -> np.ndarray:
        """``(seeds, records, ...)`` of one metric for one setting (the first by default)."""
        chosen = [r for r in self.runs if setting is None or r.setting == dict(setting)]
        first = chosen[0].setting
        return np.stack([r.metrics[name] for r in chosen if r.setting == first])


GROWTH = 1e6  # the divergence bound: growth of |J| or of the largest |parameter| past max(1, start)


class Diverged(GradlabError):
    """A run's objective or parameters grew past the divergence bound (or stopped being finite)."""


def past_bound(guards: np.ndarray) -> np.ndarray:
    """Where runs are past the divergence bound: ``guards`` is ``(..., records, 2)`` (J and
    |theta|_max at each recorded step, for any number of runs at once); True where a value is
    not finite or grew past ``GROWTH`` * max(1, |its value at step 0|) (every value is past a
    start that is not finite)."""
    guards = np.asarray(guards, dtype=float)
    start = guards[..., :1, :]
    with np.errstate(invalid="ignore"):  # a start that is not finite gives the bound 0 (below)
        bound = np.where(np.isfinite(start), GROWTH * np.maximum(1.0, np.abs(start)), 0.0)
        return ~np.isfinite(guards) | (np.abs(guards) > bound)


def divergence(steps: list[int], guard: np.ndarray) -> str | None:
    """Why a run with this guard (``(records, 2)``: J and |theta|_max at each recorded step)
    diverged, naming the first recorded step past the bound and the quantity, or None."""
    bad = past_bound(guard)
    for col, what in ((0, "the objective J"), (1, "the largest |parameter|")):
        if bad[:, col].any():
            series = np.asarray(guard[:, col], dtype=float)
            t = int(np.argmax(bad[:, col]))
            value = "not finite" if not math.isfinite(series[t]) else f"{series[t]:.3g}"
            return (f"{what} is {value} at step {steps[t]} (started at {series[0]:.3g}; the bound is "
                    f"{GROWTH:.0e} x max(1, |start|))")
    return None


def run(source: str | Any, *, overrides: Mapping[str, Mapping[str, Any]] | None = None, lean: bool = True,
        closed_form: bool = True, allow_divergence: bool = False, distributed: bool = False) -> Result:
    """Run an experiment (a TOML path, a dict, or a loaded :class:`Experiment`).

    Args:
        source: the experiment.
        overrides: keys replaced before validation, e.g. ``{"train": {"steps": 10}}``.
        lean: read log-probabilities through a family's fast path (``table_logits``) where it has
            one; False computes them position by position, an independent cross-check.
        closed_form: the gradient from the loss's closed-form partials; False takes ``jax.grad``
            of the objective's value, an independent cross-check.
        allow_divergence: return runs that diverged (each marked by ``Run.diverged``) instead of
            raising :class:`Diverged`.
        distributed: run across the processes of a ``jax.distributed`` job, one per host, the
            runs split across every process's devices (:mod:`~gradlab.experiments.distributed`
            connects them from the environment, unless already connected). Every process must
            call ``run`` with the same experiment; every one returns the whole result, and only
            process 0 (``distributed.is_leader()``) should write it.

    Returns:
        The resolved configuration and every run.
    """
    with jax.enable_x64(True), _joined(distributed):  # float64 for this call only: no global state is changed
        return _run_all([_experiment(source, overrides)], lean=lean, closed_form=closed_form,
                        allow_divergence=allow_divergence)[0]


def run_many(sources: Sequence[str | Any], *, lean: bool = True, closed_form: bool = True,
             allow_divergence: bool = False, distributed: bool = False) -> list[Result]:
    """Several experiments (paths, dicts or loaded ones) at once, one :class:`Result` each. Their
    runs share compiled programs wherever the static structure and the input shapes agree, so
    settings that are not a grid (e.g. gamma = rho * beta) still run as one vmapped program.
    ``lean``, ``closed_form``, ``allow_divergence`` and ``distributed`` are :func:`run`'s."""
    with jax.enable_x64(True), _joined(distributed):
        return _run_all([_experiment(s, None) for s in sources], lean=lean, closed_form=closed_form,
                        allow_divergence=allow_divergence)


def _joined(distributed: bool) -> contextlib.AbstractContextManager:
    return joined() if distributed else contextlib.nullcontext()


def _experiment(source, overrides) -> Experiment:
    exp = checked(source) if isinstance(source, Experiment) else load(source)
    if overrides:
        raw = {k: dict(v) for k, v in exp.source.items()}
        for section, table in overrides.items():
            raw.setdefault(section, {}).update(table)
        exp = load(raw)
    return exp


def _run_all(exps: list[Experiment], *, lean: bool = True, closed_form: bool = True,
             allow_divergence: bool = False) -> list[Result]:
    """Every run of every experiment; runs with the same static structure and input shapes are
    one program, across experiments too."""
    jobs = _engine.jobs(exps, lean=lean, closed_form=closed_form)
    results: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}
    spent: dict[_engine.Static, float] = {}  # seconds in each program, accounted once at the end
    suspects: set[int] = set()  # the jobs whose guard is past the divergence bound
    with progress.bar(len(jobs), "training", unit="run") as done:
        for static, members in _engine.groups(jobs):
            start = time.perf_counter()
            records = _engine.call(_engine.program(static), static, [jobs[i] for i in members])
            spent[static] = spent.get(static, 0.0) + time.perf_counter() - start
            results.update(zip(members, records, strict=True))
            # every run's guard checked at once; a message only for those past the bound
            flagged = np.flatnonzero(past_bound(np.stack([guard for _, guard in records])).any(axis=(1, 2)))
            suspects.update(members[r] for r in flagged)
            done.update(len(members))
    for static, seconds in spent.items():
        _engine.program(static).account(seconds)
    marks: dict[tuple[int, int], list[int]] = {}  # the recorded steps of each (steps, record_every)
    out = []
    for e, exp in enumerate(exps):
        runs = []
        for i, job in enumerate(jobs):
            if job.experiment != e:
                continue
            every = (job.static.steps, job.static.record_every)
            if every not in marks:
                marks[every] = _engine.record_steps(*every)
            steps = list(marks[every])  # each run its own list
            metrics, guard = results[i]
            runs.append(Run(job.setting, job.seed, steps, metrics, divergence(steps, guard) if i in suspects else None))
            if runs[-1].diverged and not allow_divergence:
                where = f"setting {job.setting}, seed {job.seed}" if job.setting else f"seed {job.seed}"
                raise Diverged(f"the run ({where}) diverged: {runs[-1].diverged}. Nothing was written; lower the "
                               "learning rate (train.lr, --lr) or the hyperparameters that scale the loss")
        out.append(Result(resolved(exp), runs))
    return out


def program_count(exp: Experiment) -> int:
    """How many compiled programs ``run`` would execute (one per static structure, every loss of
    a sweep over losses in one)."""
    with jax.enable_x64(True):
        return len(_engine.groups(_engine.jobs([exp])))


def optimise(source: str | Any) -> None:
    """Compile the programs of an experiment (a path, a dict or a loaded one) with XLA's
    optimisations at their next call, as repeating the experiment does on its own
    (``_engine.Tiered``): for a sweep about to be run many times, or to time the steady state."""
    with jax.enable_x64(True):
        for static, _ in _engine.groups(_engine.jobs([_experiment(source, None)])):
            _engine.program(static).optimise()
