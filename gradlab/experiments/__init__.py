"""Experiments as data: a configuration (the experiment-file schema), the datasets, and a runner.

    from gradlab import experiments
    result = experiments.run("experiments/softmax_gradient_descent.toml")   # or a dict
    print(experiments.summary(result))   # initial -> final per metric and setting
    result.as_dict()        # {"config": ..., "runs": [{"setting", "seed", "steps", "metrics"}, ...]}

``gradlab run EXPERIMENT.toml [--json]`` is the command-line front end; ``docs/experiments.md``
documents the schema. Modules: ``config`` (the schema, parsing, sweeps), ``validate`` (checks
across tables, the resolved configuration), ``datasets`` (pairs, presets, labels, rewards),
``objective`` (the science: canonical variables, weights, the loss and its closed-form gradient,
metrics), ``runner`` (orchestration; its machinery is the private ``_engine``), ``report``,
``frontend`` (``gradlab simulate``'s flags as an experiment), ``analysis`` (closed forms and
summaries beside a run) and ``distributed`` (a sweep across processes, one per host:
``run(..., distributed=True)``, ``gradlab run FILE --distributed``).
"""

from gradlab.experiments.config import Experiment, from_flags, settings
from gradlab.experiments.validate import load, resolved
from gradlab.experiments.report import summary
from gradlab.experiments.runner import Result, Run, run
from gradlab.experiments.frontend import simulate

__all__ = ["Experiment", "Result", "Run", "from_flags", "load", "resolved", "run", "settings", "simulate", "summary"]
