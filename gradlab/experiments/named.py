"""Named experiment settings, shared by the figures, the scorecard, the reproduction catalogue and
the notes: one computation per quantity.

A named setting is an experiment dict in the schema of ``docs/experiments.md`` (the same tables
as an experiment file), built by a function here and run by :func:`gradlab.experiments.run`.
Whatever quotes a number of a setting (a figure's legend, ``figures/scorecard.md``, a
reproduction entry) gets it from the same function, so the numbers cannot disagree.

``length_drift``: the posts' length pathology without a cut-off. An exact unbounded unigram +
EOS policy (3 content tokens; every token, EOS included, i.i.d. from softmax(theta), so the
expected length, EOS counted, is exactly 1 / pi(EOS)), starting at uniform logits (E[len] = 4,
equal to the data's mean length: content lengths uniform on 1..5, plus the EOS), the reference
a copy of the start, 64 equal-length pairs per seed (chosen and rejected lengths from the same
law; the chosen favour token 1, the rejected token 2), full batch, 300 steps, seeds 0..7. The
optimiser is part of the result, so there are two: plain gradient descent (``sgd``, lr 0.5) and
Adam (lr 0.05). Every loss that has a ``beta`` gets the common ``BETA``; its other
hyperparameters keep their defaults.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the runner imports JAX; these functions import it when they run
    from gradlab.experiments.runner import Result

__all__ = ["BETA", "OPTIMIZERS", "CONTROLS", "STEPS", "SEEDS", "length_drift_config", "length_drift",
           "length_drift_runs", "drift_factors", "setting_text", "spread_text", "PROPER_RUNS", "proper_loss_config",
           "proper_loss"]

BETA = 0.1  # the common beta of every comparison across losses
OPTIMIZERS: dict[str, float] = {"sgd": 0.5, "adam": 0.05}  # name -> learning rate
STEPS = 300
SEEDS = 8
RECORD_EVERY = 10
N_PAIRS = 64
# Controls of the length setting (DPO): what the data alone, or the token preference alone, does.
CONTROLS: dict[str, dict[str, Any]] = {
    # every response has 3 content tokens: length cannot separate any pair (and E[len] of the data = 4)
    "same_length": {"chosen_length": {"dist": "uniform", "low": 3, "high": 3},
                    "rejected_length": {"dist": "uniform", "low": 3, "high": 3}},
    # both sides from one token law: no preference signal at all
    "no_preference": {"chosen_token_probs": [1.0, 1.0, 1.0], "rejected_token_probs": [1.0, 1.0, 1.0]},
}
METRICS = ("expected_length", "sequence_entropy", "lp_w")


def _hyper(loss: str, values: Mapping[str, float] | None) -> dict[str, float]:
    """The common beta for a loss that has one, then ``values`` for the hyperparameters it has."""
    from gradlab import symbolic

    hyper = symbolic.as_loss(loss).hyperparameters
    out = {"beta": BETA} if "beta" in hyper else {}
    out.update({k: float(v) for k, v in (values or {}).items() if k in hyper})
    return out


def length_drift_config(loss: str = "dpo", optimizer: str = "adam", *, control: str | None = None,
                        values: Mapping[str, float] | None = None, steps: int = STEPS,
                        seeds: int = SEEDS) -> dict[str, Any]:
    """The ``length_drift`` setting for one loss and optimiser as an experiment dict (see the
    module docstring); ``control`` is one of ``CONTROLS`` (data changed, nothing else)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{optimizer}'; the length setting has: {', '.join(OPTIMIZERS)}")
    if control is not None and control not in CONTROLS:
        raise ValueError(f"unknown control '{control}'; the controls are: {', '.join(CONTROLS)}")
    data: dict[str, Any] = {"kind": "equal_length", "n_pairs": N_PAIRS}
    if control is not None:
        data.update(copy.deepcopy(CONTROLS[control]))
    return {
        "policy": {"family": "unigram", "vocab": 3, "max_len": "none", "init": {"theta": [0.0, 0.0, 0.0, 0.0]}},
        "reference": {"params": "policy"},
        "data": data,
        "loss": {"name": loss, **_hyper(loss, values)},
        "train": {"optimizer": optimizer, "lr": OPTIMIZERS[optimizer], "steps": steps, "seeds": seeds,
                  "record_every": RECORD_EVERY, "metrics": list(METRICS)},
    }


def length_drift(loss: str = "dpo", optimizer: str = "adam", **kwargs: Any) -> Result:
    """Run one loss and optimiser of the ``length_drift`` setting: a :class:`gradlab.experiments.Result`."""
    return length_drift_runs([{"loss": loss, "optimizer": optimizer, **kwargs}])[0]


def length_drift_runs(specs: Sequence[Mapping[str, Any]]) -> list:
    """Several runs of the ``length_drift`` setting at once, each spec the keyword arguments of
    :func:`length_drift_config`: one Result each, in order. Runs that differ only in the loss
    share one compiled program (``gradlab.experiments.runner.run_many``), so a comparison of every
    loss compiles once per optimiser and data shape, not once per loss. A run that diverges (one
    learning rate serves every loss) is returned marked, not raised: :func:`drift_factors` says so."""
    from gradlab.experiments.runner import run_many

    return run_many([length_drift_config(**spec) for spec in specs], allow_divergence=True)


def drift_factors(result: Result) -> np.ndarray:
    """Per seed: final over initial exact expected length (EOS counted), the drift factor; NaN for
    a seed whose run diverged (see ``gradlab.experiments.runner``'s divergence bound)."""
    el = result.series("expected_length")
    diverged = np.array([run.diverged is not None for run in result.runs])  # one setting: a run per seed
    return np.where(diverged, np.nan, el[:, -1] / el[:, 0])


def spread_text(x: np.ndarray, fmt: str = ".3g", seeds: bool = True) -> str:
    """'median [min, max] (n seeds)' in 3 significant figures: the way every figure and table
    quotes a per-seed number (never more digits than the seeds support). A run that diverged
    (a non-finite value) is said so, never averaged in."""
    x = np.asarray(x, dtype=float)
    tail = f" ({len(x)} seeds)" if seeds else ""
    bad = int((~np.isfinite(x)).sum())
    if bad:
        return f"diverged in {bad} of {len(x)} seeds"
    return f"{np.median(x):{fmt}} [{x.min():{fmt}}, {x.max():{fmt}}]{tail}"


def setting_text(optimizer: str | None = None, steps: int = STEPS, seeds: int = SEEDS) -> str:
    """The caveats of the length setting in one line, for captions."""
    opt = (f"{optimizer} lr {OPTIMIZERS[optimizer]:g}" if optimizer else
           ", ".join(f"{o} lr {lr:g}" for o, lr in OPTIMIZERS.items()))
    return (f"exact unbounded unigram + EOS (3 content tokens, no cut-off), uniform start, {N_PAIRS} equal-length "
            f"pairs per seed, full batch, {opt}, {steps} steps, {seeds} seeds, beta {BETA:g} where a loss has one")


# ---------------------------------------------------------------------------------------------
# proper_loss: the first post's proper loss against offline and on-policy DPO, with no leak
# ---------------------------------------------------------------------------------------------

PROPER_RUNS: dict[str, tuple[str, str]] = {  # name -> (loss, data kind)
    "offline_dpo": ("dpo", "reference_pairs"),  # J_0: pairs drawn from the reference
    "on_policy_dpo": ("dpo", "on_policy"),  # pairs from the current policy, weights not differentiated
    "proper": ("pdpo", "on_policy"),  # J_PDPO = E_{y,y' ~ pi}[L_dpo], the full product-rule gradient
}
PROPER_STEPS = 400


def proper_loss_config(run: str = "proper", *, steps: int = PROPER_STEPS) -> dict[str, Any]:
    """The ``proper_loss`` setting as an experiment dict: a unigram + EOS policy (content tokens
    1 and 2, token rewards +1 and -1) with a forced stop at 4 tokens (a response that reaches it
    ends there, so all 31 responses are finished and enumerated: no mass is left out), starting
    at the reference logits (0, 0.5, 0.5), DPO's beta 0.1, Adam lr 0.05, ``steps`` steps, one run
    (exact expectations: nothing is sampled). ``run`` is one of ``PROPER_RUNS``."""
    if run not in PROPER_RUNS:
        raise ValueError(f"unknown run '{run}'; the runs are: {', '.join(PROPER_RUNS)}")
    loss, kind = PROPER_RUNS[run]
    return {
        "policy": {"family": "unigram", "vocab": 2, "max_len": 4, "init": {"theta": [0.0, 0.5, 0.5]}},
        "reference": {"params": "policy"},
        "data": {"kind": kind, "reward": [1.0, -1.0]},
        "loss": {"name": loss, "beta": BETA},
        "train": {"optimizer": "adam", "lr": 0.05, "steps": steps, "seeds": 1, "record_every": 10,
                  "metrics": ["expected_reward", "stopped_mass", "mass_outside_data", "params"]},
    }


def proper_loss(run: str = "proper", **kwargs: Any) -> Result:
    """Run one of ``PROPER_RUNS``: a :class:`gradlab.experiments.Result`."""
    from gradlab.experiments.runner import run as run_experiment

    return run_experiment(proper_loss_config(run, **kwargs))
