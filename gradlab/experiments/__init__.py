"""Experiments as data: a configuration (the experiment-file schema), the datasets, and a runner.

    from gradlab import experiments
    result = experiments.run("experiments/softmax_gradient_descent.toml")   # or a dict
    result.as_dict()        # {"config": ..., "runs": [{"setting", "seed", "steps", "metrics"}, ...]}

``gradlab run EXPERIMENT.toml [--json]`` is the command-line front end; ``docs/experiments.md``
documents the schema.
"""

from gradlab.experiments.config import Experiment, load, resolved, settings
from gradlab.experiments.runner import Result, Run, run

__all__ = ["Experiment", "Result", "Run", "load", "resolved", "run", "settings", "summary"]


def summary(result: Result) -> str:
    """The human summary: for every metric and setting, initial -> final (mean over seeds)."""
    from gradlab.experiments.report import summary as _summary

    return _summary(result)
