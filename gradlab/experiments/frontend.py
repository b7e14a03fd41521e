"""``gradlab simulate``: the common command-line flags as an experiment, run by the runner.

``simulate`` is a front end and nothing else: the flags become an experiment table
(:func:`table`), which :func:`gradlab.experiments.run` validates and runs exactly as it runs an
experiment file. So ``gradlab simulate dpo --lr 0.1`` and ``gradlab run`` on a file with
``[loss] name = "dpo"`` and ``[train] lr = 0.1`` give the same numbers.

Three defaults differ from an experiment file's, and all are written into the resolved
configuration that ``--json`` prints:

- ``max_len``: ``"none"`` (unbounded, exact) for the chain families (``finite_state``: unigram,
  bigram, linear_head, and hidden_state with its default context ``previous_token``). A cut-off caps the
  length a policy can drift to, so a bounded default would hide the drift these runs measure; the
  other sequence families (tabular, a ``prefix`` hidden_state) need a cut-off and keep the file's 6.
- ``policy.scale`` 0 (a uniform start) and ``train.seeds`` 8: with the other defaults this makes
  ``gradlab simulate LOSS`` the Adam run of the named ``length_drift`` setting
  (:mod:`gradlab.experiments.named`) wherever the loss's own beta is the common one (DPO's is), so
  the command line prints the same drift factor as the ``length_drift`` figure and the scorecard.
  ``--set policy.scale=0.5`` gives a seeded random start.

``vocab`` counts content tokens 1..V (EOS, token 0, comes on top), as in a file.

A group loss (``gradlab simulate grpo``, ``dr_grpo``, ...) trains on ``data.kind = "rollouts"``:
groups of G = 8 responses drawn on-policy, rewarded 1 when the first content token is token 1
(``GROUP_REWARD``), each step the exact expected gradient; a run whose responses outgrow the
lengths summed exactly is refused (``TAIL_LIMIT``). ``--set data.group_size=16`` or
``--set 'data.reward={contains=[2]}'`` change them, and ``--set loss.scale_rewards=none`` the
advantage.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradlab.errors import GradlabError
from gradlab.experiments import _loss_code, named
from gradlab.experiments.config import ConfigError, from_flags, with_sets
from gradlab.experiments.runner import Result, run

__all__ = ["FLAGS", "default_max_len", "table", "simulate", "document", "text", "parse_sets"]

# schema key -> the simulate flag that sets it (refusals name the flag)
FLAGS = {
    "policy.family": "--policy",
    "policy.vocab": "--vocab",
    "policy.max_len": "--max-len",
    "train.optimizer": "--optimizer",
    "train.lr": "--lr",
    "train.steps": "--steps",
    "train.seeds": "--seeds",
    "train.batch_size": "--batch-size",
    "data.kind": "--dataset",
    "loss.name": "LOSS",
}
PER_PAIR = ("lp_w", "lp_l", "margin")  # metrics with one value per training pair
GROUP_REWARD = {"first_token": [1]}  # a group loss's default reward under simulate
TAIL_LIMIT = 1e-3  # rollouts: the largest P(length > N) a simulation may end with (the steps ignore it)


def default_max_len(family: str, context: str = "previous_token") -> str | None:
    """``"none"`` for a finite-state (chain) family, whose unbounded metrics are exact closed forms
    (so nothing caps the drift), else None (the file's default cut-off; single-context families
    have none). The family's class says which it is (``finite_state``)."""
    from gradlab.policies import REGISTRY

    family = family.replace("-", "_")
    if family not in REGISTRY:
        return None  # the schema refuses it, naming the families
    cls = REGISTRY[family].variant(context=context.replace("-", "_"))
    return "none" if cls.finite_state and not cls.single_context else None


def parse_sets(items: Sequence[str] | None) -> dict[str, Any]:
    """``--set`` items, ``KEY=VALUE`` (several per item separated by commas outside brackets).
    A plain KEY is a loss hyperparameter and needs a number; a dotted ``section.key`` sets any key
    of the experiment schema, its VALUE read as a TOML value (a number, ``true``, a quoted string or
    a ``[list]``; a bare word is a string). Nothing is evaluated."""
    out: dict[str, Any] = {}
    for text_item in items or []:
        for item in _split_commas(text_item):
            key, sep, raw = (s.strip() for s in item.partition("="))
            if not sep or not key or not raw:
                raise GradlabError(f"malformed --set item {item!r}: expected KEY=VALUE, e.g. --set beta=0.5 "
                                   "or --set policy.scale=0")
            if key in out:
                raise GradlabError(f"--set gives '{key}' twice")
            value = _toml_value(raw)
            if "." not in key and (isinstance(value, bool) or not isinstance(value, int | float)
                                   or not math.isfinite(value)):
                raise GradlabError(f"--set {key}={raw}: a loss hyperparameter needs a finite number")
            out[key] = value
    return out


def _split_commas(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _toml_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if re.fullmatch(r"[A-Za-z_][\w\-]*", raw):
            return raw  # a bare word: a name such as sgd or population
        raise GradlabError(f"--set value {raw!r} is not a number, a word or a TOML value") from None


def table(
    loss: str | None = None,
    *,
    policy: str = "unigram",
    max_len: int | str | None = None,
    seeds: int | None = None,
    sets: Mapping[str, Any] | None = None,
    **flags: Any,
) -> dict[str, Any]:
    """The experiment table of ``gradlab simulate``'s flags (``flags``: the other keywords of
    :func:`gradlab.experiments.config.from_flags`). A flag left at None keeps the schema's
    default, except ``max_len`` (see :func:`default_max_len`), ``policy.scale`` and ``seeds``
    (the module docstring). ``sets`` are ``--set`` items: plain names are loss hyperparameters,
    dotted keys any schema key (applied last)."""
    sets = dict(sets or {})
    hyper = {k: v for k, v in sets.items() if "." not in k}
    if max_len is None:
        max_len = default_max_len(policy, str(sets.get("policy.context", "previous_token")))
    sets.setdefault("policy.scale", 0.0)  # a uniform start, as the named length_drift setting
    if seeds is None:
        seeds = named.SEEDS
    if flags.get("dataset") is None and _is_group_loss(loss):
        flags["dataset"] = "rollouts"
    raw = from_flags(loss, policy=policy, max_len=max_len, seeds=seeds, values=hyper, **flags)
    if raw["data"].get("kind") == "rollouts":
        raw["data"]["reward"] = dict(GROUP_REWARD)
    raw = with_sets(raw, {k: v for k, v in sets.items() if "." in k})
    return {k: v for k, v in raw.items() if v}


def _is_group_loss(loss: str | None) -> bool:
    if loss is None or _loss_code.facts(loss) is not None:  # a registered pair loss, by the shipped table
        return False
    from gradlab.losses import ALIASES, LOSSES

    if loss in LOSSES or loss in ALIASES:  # a pair loss by its registered name: the group
        return False  # registry (slow to derive) is not needed
    from gradlab.group_losses import find

    return find(loss) is not None


def simulate(loss: str | None = None, **flags: Any) -> Result:
    """Run the flags' experiment (see :func:`table`) and check that every value is finite. A
    refusal names the flag that set the offending key.

    Args:
        loss: the loss's name (or give ``expr=`` for a formula).
        **flags: the other keywords of :func:`table` (``policy``, ``max_len``, ``seeds``, ``sets``)
            and of :func:`gradlab.experiments.config.from_flags`.

    Returns:
        The run's :class:`Result`; a NaN or infinite metric raises :class:`GradlabError` instead.
    """
    exp = table(loss, **flags)
    try:
        result = run(exp)
    except ConfigError as exc:
        raise type(exc)(_name_flag(str(exc))) from None
    _refuse_non_finite(result)
    _refuse_truncated(result)
    return result


def _refuse_truncated(result: Result) -> None:
    """Rollouts on an unbounded chain sum lengths up to N exactly and ignore the rest: refuse a
    run whose mass past N (``tail_mass``) grew beyond ``TAIL_LIMIT``."""
    for r in result.runs:
        tail = np.asarray(r.metrics.get("tail_mass", [0.0]), dtype=float)
        if tail.max() > TAIL_LIMIT:
            step = r.steps[int(np.argmax(tail > TAIL_LIMIT))]
            raise GradlabError(
                f"the responses outgrew the lengths summed exactly: P(length > N) = {tail.max():.2g} (over "
                f"{TAIL_LIMIT:g} from step {step}, seed {r.seed}), so the later steps are not the exact expected "
                "gradient. Give --set data.horizon=N with a larger N, a cut-off --max-len K, fewer --steps, or "
                "--policy bigram (a unigram's one token distribution makes every reward on a token a length reward)")


def _name_flag(message: str) -> str:
    for key, flag in FLAGS.items():
        if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message):
            return f"{flag}: {message}"
    return message


def _refuse_non_finite(result: Result) -> None:
    for r in result.runs:
        for name, series in r.metrics.items():
            bad = ~np.isfinite(np.asarray(series, dtype=float))
            if bad.any():
                step = r.steps[int(np.argwhere(bad)[0][0])]
                raise GradlabError(
                    f"the simulation diverged: {name} is NaN or infinite at step {step} (seed {r.seed}). Nothing "
                    "was written; lower --lr (or the hyperparameters that scale the loss). On an unbounded "
                    "policy this also happens when its EOS probability falls so low that its exact metrics are "
                    "refused: then give --max-len K")


def document(result: Result) -> dict[str, Any]:
    """``gradlab simulate --json``: the loss, policy, dataset, seed count and hyperparameters; the
    resolved configuration (``config``, the same object as ``gradlab run --json``'s); and every
    metric as a list over recorded steps of a list over seeds (per-pair metrics: a list over pairs
    for each seed), with the recorded step numbers under ``metrics.step``."""
    cfg = result.config
    runs = result.runs
    series: dict[str, Any] = {"step": list(runs[0].steps)}
    for name in runs[0].metrics:
        stacked = np.stack([np.asarray(r.metrics[name], dtype=float) for r in runs], axis=1)  # (records, seeds, ...)
        series[name] = stacked.tolist()
    hyper = {k: v for k, v in cfg["loss"].items() if k not in ("name", "expr", "resolved")}
    return {"loss": cfg["loss"]["resolved"], "policy": cfg["policy"]["family"], "dataset": cfg["data"]["kind"],
            "seeds": len(runs), "hyperparameters": hyper, "config": cfg, "metrics": series}


def _number(x: float, width: int = 10) -> str:
    """Four decimals, and never "-0.0000" for a value that rounds to zero; from 1e4 on, five
    significant figures in scientific notation (float64 holds ~16, the toys' numbers mean fewer),
    so no value prints more digits than mean something."""
    x = float(x)
    if abs(x) >= 1e4:
        return f"{x:>{width}.4e}"
    return f"{0.0 if round(x, 4) == 0 else x:>{width}.4f}"


def text(result: Result) -> str:
    """The human summary: one line per metric, initial -> final (mean over seeds) with the final
    minimum and maximum over seeds, and the length drift factor quoted as the figures quote it."""
    cfg = result.config
    p, t = cfg["policy"], cfg["train"]
    if "max_len" in p:
        mode = "unbounded" if p["max_len"] == "none" else f"cut-off at {p['max_len']} tokens"
        shape = f"{p['vocab']} content tokens + EOS, {mode}"
    else:
        shape = f"{p['vocab']} actions"
    hyper = ", ".join(f"{k}={_hyper_text(v)}" for k, v in document(result)["hyperparameters"].items())
    runs = result.runs
    lines = [f"{cfg['loss']['resolved']} on {p['family']} ({shape}) / {cfg['data']['kind']}: {t['optimizer']} "
             f"lr={t['lr']:g}, {t['steps']} steps, batch {t['batch_size']}, {len(runs)} seed{'s' * (len(runs) > 1)}"
             + (f", {hyper}" if hyper else "")]
    for name in runs[0].metrics:
        s = np.stack([np.asarray(r.metrics[name], dtype=float) for r in runs])  # (seeds, records, ...)
        note = ""
        if s.ndim > 2:
            if name not in PER_PAIR and s[0, 0].size <= 6:
                for j in range(s[0, 0].size):
                    lines.append(_line(f"{name}[{j}]", s.reshape(*s.shape[:2], -1)[:, :, j], ""))
                continue
            note = f"; mean over {s[0, 0].size} {'pairs' if name in PER_PAIR else 'entries'}"
            s = s.reshape(*s.shape[:2], -1).mean(-1)
        lines.append(_line(name, s, note))
    if "expected_length" in runs[0].metrics:
        lines.append(f"  length drift factor (final / initial expected length, median [min, max] over seeds) "
                     f"{named.spread_text(named.drift_factors(result))}")
    return "\n".join(lines)


def _hyper_text(v: Any) -> str:
    """A hyperparameter's value: a number, "none" for an infinite cap (TRL's delta=None), or a
    word (scale_rewards)."""
    if isinstance(v, bool) or not isinstance(v, float | int):
        return str(v)
    return f"{v:g}" if math.isfinite(v) else "none"


def _line(name: str, s: np.ndarray, note: str) -> str:
    first, last = s[:, 0], s[:, -1]
    return (f"  {name:<18} {_number(first.mean())} -> {_number(last.mean())}   (mean over seeds{note}; final "
            f"min {_number(last.min(), 0)}, max {_number(last.max(), 0)})")
