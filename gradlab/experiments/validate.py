"""Checking an experiment as a whole, before anything runs: every refusal names the key and what
is allowed.

``config`` parses one table at a time; this module checks what needs several tables together:
the keys that apply to the family and to the data, the sizes against ``gradlab.budgets``, the
family built from ``[policy]``, explicit parameters against its shapes, the data against the
family, the loss's variables against what the family supplies, and the training table (batch
size, metrics). It also resolves what a run records (``metric_names``) and the configuration
``gradlab run --json`` prints (``resolved``). :func:`load` parses and checks every sweep setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from gradlab import caches
from gradlab.errors import GradlabError
from gradlab.experiments import config, datasets
from gradlab.experiments.config import (
    ENUMERATED_PRESETS,
    LENGTH_PRESETS,
    ConfigError,
    DataConfig,
    Experiment,
    LengthDist,
    LossConfig,
    PolicyConfig,
    reworded,
    settings,
)
from gradlab.experiments.config import REWARD_KINDS
from gradlab.experiments._loss_code import Facts
from gradlab.experiments.objective import (
    DENSE_LIMIT,
    GROUP_METRICS,
    METRICS,
    abstract_params,
    loss_of,
    registry_loss,
)
from gradlab.policies import REGISTRY, AnyFamily

if TYPE_CHECKING:
    from gradlab.losses import Loss

__all__ = ["FAMILY_TABLE_MARKERS", "available_metrics", "build_family", "check", "check_data", "check_loss",
           "check_params", "check_train", "checked", "family_table", "hyper_values", "load", "metric_names",
           "policy_keys", "resolve_loss", "resolved", "write_family_table"]

PER_PAIR_DEFAULT_LIMIT = 256  # per-pair series are recorded by default up to this many pairs


def load(source: str | Path | Mapping[str, Any]) -> Experiment:
    """An experiment from a TOML file path or a dict with the same tables, every sweep setting
    parsed and checked here, before anything runs."""
    return checked(config.load(source))


def checked(exp: Experiment) -> Experiment:
    """``exp`` once every setting of its sweep has passed :func:`check` (a refusal names the
    setting)."""
    key = config.settings_key(exp)
    if key is not None and key in _CHECKED:
        return exp
    points = settings(exp)  # the sweep's size is checked before it expands
    work = memory = 0.0
    for setting, point in points:  # every setting's sizes before anything is built
        try:
            w, m = _check_sizes(point)
        except GradlabError as exc:
            if not setting:
                raise
            raise reworded(exc, f"sweep setting {setting}: {exc}") from None
        work, memory = work + w, memory + m
    if len(points) > 1:
        _check_estimates(work, memory, f"the sweep ({len(points)} settings)")
    for setting, point in points:
        try:
            check(point)
        except GradlabError as exc:
            if not setting:
                raise
            raise reworded(exc, f"sweep setting {setting}: {exc}") from None
    if key is not None:
        _CHECKED[key] = True
    return exp


# Experiments already checked, by the digest of their source and the size budgets (the checks are
# a pure function of the two): a repeated run checks each sweep setting once.
_CHECKED: dict[bytes, bool] = caches.Bounded(256)


# --------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------


def build_family(policy: PolicyConfig) -> Any:
    """The policy family of a ``[policy]`` table (``vocab`` counts content tokens; an EOS family
    adds EOS), built by its registered class (``gradlab.policies.REGISTRY``)."""
    try:
        return REGISTRY[policy.family].from_config(vocab=policy.vocab, max_len=policy.max_len, **policy.options())
    except (GradlabError, TypeError, ValueError) as exc:
        if str(exc).startswith("W "):
            raise ConfigError(f"policy.W: {exc}") from None
        if policy.max_len is None:
            raise ConfigError(f"policy.max_len = 'none' (unbounded) is not available for the '{policy.family}' "
                              f"family: {exc}") from None
        raise ConfigError(f"[policy]: {exc}") from None


@caches.memo(maxsize=128)
def _param_shapes(fam) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in abstract_params(fam).items()}


def check_params(exp: Experiment, fam: AnyFamily) -> None:
    """Explicit ``policy.init`` / ``reference.params`` tables must name every parameter of the
    family with its exact shape."""
    shapes = _param_shapes(fam)
    expected = ", ".join(f"{k} {list(s)}" for k, s in shapes.items())
    for key, table in (("policy.init", exp.policy.init), ("reference.params", exp.reference.params)):
        if not isinstance(table, Mapping):
            continue
        if set(table) != set(shapes):
            odd = sorted(set(table) ^ set(shapes))[0]
            raise ConfigError(f"{key}: parameter '{odd}' does not match the '{fam.name}' family, whose "
                              f"parameters are: {expected}")
        for name, value in table.items():
            if np.shape(value) != shapes[name]:
                raise ConfigError(f"{key}.{name} has shape {list(np.shape(value))}; the '{fam.name}' family here "
                                  f"needs {list(shapes[name])} (parameters: {expected})")


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def resolve_loss(cfg: LossConfig) -> Loss | Facts:
    """The ``[loss]`` table's loss: a name goes through gradlab's loss resolution (registered
    names, aliases, combinations), an ``expr`` through the safe formula parser. A registered
    pair loss comes as its facts from the shipped table (:func:`objective.loss_of`)."""
    key = "loss.expr" if cfg.expr is not None else "loss.name"
    try:
        return loss_of(cfg.name, cfg.expr)
    except GradlabError as exc:
        raise type(exc)(f"{key}: {exc}") from None


def hyper_values(cfg: LossConfig, loss: Loss | Facts) -> dict[str, float]:
    """Every hyperparameter of the loss with its value (defaults filled in), validated."""
    return dict(_hyper_values(loss, tuple(sorted(cfg.values.items()))))


@caches.memo(maxsize=1024)
def _hyper_values(loss: Loss | Facts, given: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
    if isinstance(loss, Facts):  # the shipped facts take plainly valid values; the registry judges the rest
        found = loss.values(dict(given))
        if found is not None:
            return found
        loss = registry_loss(loss.name, None)
    try:
        if loss.kind == "group":  # the group registry's own hyperparameters and domains
            from gradlab.group_losses import GroupLoss  # (imported by then: a group loss comes from it)

            assert isinstance(loss, GroupLoss)
            vals, symbols = loss.values(dict(given)), loss.hyper_symbols()
            return tuple((k, float(vals[symbols[k]])) for k in loss.hyperparameters)
        from gradlab import symbolic

        vals = symbolic.parameter_values(loss, dict(given))
    except GradlabError as exc:
        raise type(exc)(f"[loss]: {exc}") from None
    return tuple((s.name, float(v)) for s, v in vals.items())


def check_loss(exp: Experiment, fam: AnyFamily) -> None:
    loss = resolve_loss(exp.loss)
    rollouts = exp.data.kind == "rollouts"
    if loss.kind == "group" and not rollouts:
        raise ConfigError(f"loss '{loss.name}' is a group loss: it trains on groups of on-policy responses, so it "
                          f"needs data.kind = 'rollouts' (with data.group_size and a binary data.reward), not "
                          f"'{exp.data.kind}'")
    if rollouts and loss.kind != "group":
        from gradlab.group_losses import GROUP_LOSSES

        raise ConfigError(f"data.kind = 'rollouts' trains a group loss ({', '.join(GROUP_LOSSES)}); "
                          f"'{loss.name}' is a {loss.kind} loss")
    if exp.loss.scale_rewards is not None and loss.kind != "group":
        raise ConfigError(f"loss.scale_rewards applies to group losses; '{loss.name}' is a {loss.kind} loss")
    hyper_values(exp.loss, loss)
    if rollouts:
        return
    missing = [v for v in loss.variables if v not in fam.variables]
    if missing:
        raise ConfigError(f"loss '{loss.name}' needs {', '.join(missing)}, which the '{fam.name}' family "
                          f"(single context: no EOS, no length) cannot supply; it supplies "
                          f"{', '.join(fam.variables)}")


# --------------------------------------------------------------------------------------------
# Training and metrics
# --------------------------------------------------------------------------------------------


def n_pairs(exp: Experiment, fam: AnyFamily) -> int:
    d = exp.data
    if d.kind == "rollouts":
        return d.group_size
    if d.kind == "pairs":
        assert d.chosen is not None  # kind = "pairs" sets it (the schema)
        return len(d.chosen)
    if d.kind in ENUMERATED_PRESETS:
        n = len(datasets.enumeration(fam)[0])
        return n * n if d.kind in ("on_policy", "best_of_n") else n * (n - 1)
    return d.n_pairs


GROUP_DEFAULTS = ("success", "length_correct", "length_incorrect", "silent_groups", "tail_mass", "loss")


def available_metrics(exp: Experiment, fam: AnyFamily) -> list[str]:
    if exp.data.kind == "rollouts":  # the group unit's metrics, and the family's own
        return ["loss", "params", *GROUP_METRICS]
    out = ["loss", "lp_w", "lp_l", "margin", "reward_accuracy", "params"]
    if fam.single_context:
        out.append("probabilities")
    if fam.enumerable:
        out.append("mass_outside_data")
    if datasets.token_reward(exp.data, fam) is not None:  # unbounded: the family's exact chain expectation
        out.append("expected_reward")
    if not fam.single_context:
        out.append("stopped_mass")  # the family's own metric: 0 when unbounded
    return out


def metric_names(exp: Experiment) -> tuple[str, ...]:
    """The metrics recorded: ``train.metrics`` as given, or the defaults for the family and data
    (per-pair lp_w, lp_l and margin only up to ``PER_PAIR_DEFAULT_LIMIT`` pairs)."""
    if exp.train.metrics is not None:
        return exp.train.metrics
    fam = build_family(exp.policy)
    if exp.data.kind == "rollouts":
        return (*(m for m in fam.default_metrics if m != "probabilities"), *GROUP_DEFAULTS)
    avail = available_metrics(exp, fam)
    names = list(fam.default_metrics)
    names += [m for m in ("stopped_mass", "expected_reward") if m in avail]
    names += ["loss", "reward_accuracy"]
    if n_pairs(exp, fam) <= PER_PAIR_DEFAULT_LIMIT:
        names += ["lp_w", "lp_l", "margin"]
    return tuple(names)


def _family_metric(fam, name: str) -> bool:
    """Whether ``fam.<name>(params)`` computes something from the parameters alone."""
    # jax's Config declares its flags at run time, unseen by its stubs
    return _is_family_metric(fam, name, bool(jax.config.jax_enable_x64))  # type: ignore[attr-defined]


@caches.memo(maxsize=1024)
def _is_family_metric(fam, name: str, x64: bool) -> bool:  # x64: the dtypes of the abstract parameters
    method = getattr(fam, name, None)
    if name.startswith("_") or not callable(method) or name in ("init", "from_config", "variant"):
        return False
    try:
        jax.eval_shape(method, abstract_params(fam))
    except Exception:  # noqa: BLE001 - any failure means "not a metric of the parameters"
        return False
    return True


def check_train(exp: Experiment, fam: AnyFamily) -> None:
    t = exp.train
    n = n_pairs(exp, fam)
    given = set(exp.source.get("train", {}))
    if exp.data.kind != "rollouts" and given & {"expectation", "groups"}:
        raise ConfigError(f"train.{sorted(given & {'expectation', 'groups'})[0]} applies to data.kind = 'rollouts' "
                          "(group losses)")
    if exp.data.kind == "rollouts":
        if t.batch_size is not None:
            raise ConfigError("train.batch_size must be 'full' for data.kind = 'rollouts' (every step is the "
                              "expectation over groups drawn from the current policy)")
        if t.expectation == "sample":
            raise ConfigError("train.expectation = 'sample' is not available in gradlab run yet: its steps are exact. "
                              "Sampled groups are in Python: gradlab.experiments.groups.sample_gradient")
    if t.batch_size is not None:
        if exp.data.kind == "on_policy":
            raise ConfigError("train.batch_size must be 'full' for data.kind = 'on_policy' (its pair weights are "
                              "the current policy's probabilities of every pair)")
        if t.batch_size > n:
            raise ConfigError(f"train.batch_size = {t.batch_size} is larger than the data ({n} pairs); "
                              f"give at most {n}, or 'full'")
    if t.metrics is not None:
        avail = available_metrics(exp, fam)
        for m in t.metrics:
            # a family's own default metric is one by declaration (no trace needed to know it)
            if m not in avail and not (m not in METRICS and (m in fam.default_metrics or _family_metric(fam, m))):
                methods = sorted(n for n in dir(fam) if n not in avail and _family_metric(fam, n))
                raise ConfigError(f"train.metrics: '{m}' is not a metric of the '{fam.name}' family with this "
                                  f"data; allowed: {', '.join(avail + methods)}")


# --------------------------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------------------------


def check_data(cfg: DataConfig, policy: PolicyConfig, fam) -> None:
    """Refuse data that cannot go with this family, naming the key and what is allowed."""
    single = fam.single_context
    if cfg.kind == "pairs":
        _check_pairs(cfg, fam)
    if cfg.kind == "rollouts" or (isinstance(cfg.reward, Mapping) and set(cfg.reward) & set(REWARD_KINDS)):
        return _check_rollouts(cfg, policy, fam)
    if cfg.reward is not None:
        if isinstance(cfg.reward, dict):
            if cfg.kind != "pairs":
                raise ConfigError("data.reward as {chosen, rejected} (per-sequence values) needs data.kind = 'pairs'")
            assert cfg.chosen is not None  # kind = "pairs" sets it (the schema)
            for side in ("chosen", "rejected"):
                if len(cfg.reward[side]) != len(cfg.chosen):
                    raise ConfigError(f"data.reward.{side} has {len(cfg.reward[side])} values; it needs one per "
                                      f"pair ({len(cfg.chosen)})")
        elif len(cfg.reward) != (fam.k if single else policy.vocab):
            what = f"one per action ({fam.k})" if single else f"one per content token 1..{policy.vocab}"
            raise ConfigError(f"data.reward has {len(cfg.reward)} values; it needs {what}, or a table "
                              "{chosen = [...], rejected = [...]} of per-sequence values")
    needs_reward = cfg.labels == "soft" or cfg.kind in ENUMERATED_PRESETS + ("shared_prefix",)
    if needs_reward and cfg.reward is None and single:
        raise ConfigError(f"{'data.labels = soft' if cfg.labels == 'soft' else f'data.kind = {cfg.kind!r}'} needs "
                          "data.reward (one value per action) on a single-context family")
    if cfg.kind == "population" and cfg.labels == "soft":
        raise ConfigError("data.kind = 'population' already weights each pair by sigma(r(y) - r(y')); "
                          "data.labels must be 'hard' there")
    if cfg.kind in ENUMERATED_PRESETS and isinstance(cfg.reward, dict):
        raise ConfigError(f"data.kind = {cfg.kind!r} labels every pair by a per-token or per-action reward")
    if not single and fam.max_len is None and cfg.kind in ENUMERATED_PRESETS:
        raise ConfigError(f"data.kind = {cfg.kind!r} enumerates every response, which needs an integer "
                          "policy.max_len (not 'none')")
    if cfg.kind in LENGTH_PRESETS:
        for side in ("chosen_token_probs", "rejected_token_probs"):
            p = getattr(cfg, side)
            if p is not None and len(p) != policy.vocab:
                raise ConfigError(f"data.{side} has {len(p)} values; it needs one per content token "
                                  f"1..{policy.vocab}")
        for side in ("chosen_length", "rejected_length"):
            dist = getattr(cfg, side)
            if dist is not None and fam.max_len is not None:
                k_max = fam.max_len - 1
                if dist.dist == "uniform" and (dist.high or 0) > k_max:
                    raise ConfigError(f"data.{side}.high = {dist.high}: a response here has at most {k_max} "
                                      f"content tokens (policy.max_len = {fam.max_len} counts the EOS)")
    dist = cfg.chosen_length
    if cfg.kind == "shared_prefix" and dist is not None and dist.dist == "uniform" and (dist.low or 0) < 1:
        raise ConfigError("data.chosen_length.low must be at least 1 for data.kind = 'shared_prefix' (the two "
                          "responses differ in one position)")
    if cfg.kind in ("shared_prefix", "similar_embeddings") and policy.vocab < 2:
        raise ConfigError(f"data.kind = {cfg.kind!r} needs at least two content tokens (policy.vocab >= 2)")


def _check_rollouts(cfg: DataConfig, policy: PolicyConfig, fam) -> None:
    from gradlab.experiments import groups

    if cfg.kind != "rollouts":
        keys = ", ".join(map(str, cfg.reward or ()))
        raise ConfigError(f"data.reward = {{{keys} = ...}} is a rollout reward: it needs "
                          "data.kind = 'rollouts'")
    if not isinstance(fam, groups.EXACT_FAMILIES):
        raise ConfigError(f"data.kind = 'rollouts' computes the exact expected gradient, on the unigram, bigram, "
                          f"tabular and softmax families; not '{fam.name}'")
    if not isinstance(cfg.reward, Mapping) or not set(cfg.reward) & set(REWARD_KINDS):
        raise ConfigError("data.kind = 'rollouts' needs a binary data.reward: {first_token = [tokens]} (1 when the "
                          "first content token is one of them), {contains = [tokens]} (1 when the response has one), "
                          "or {table = [0/1 per enumerated response]} (integer policy.max_len, or one per action of "
                          "a softmax)")
    try:
        groups.reward_arrays(fam, datasets.rollout_reward(cfg))
    except GradlabError as exc:
        raise ConfigError(f"data.reward: {exc}") from None
    if "table" not in cfg.reward and any(t > policy.vocab for t in cfg.reward[next(iter(cfg.reward))]):
        raise ConfigError(f"data.reward: tokens are content tokens 1..{policy.vocab}")


def _check_pairs(cfg: DataConfig, fam) -> None:
    assert cfg.chosen is not None and cfg.rejected is not None  # kind = "pairs" sets both (the schema)
    n = len(cfg.chosen)
    if len(cfg.rejected) != n:
        raise ConfigError(f"data.chosen has {n} responses and data.rejected {len(cfg.rejected)}; "
                          "they pair up one to one")
    if cfg.weights is not None and len(cfg.weights) != n:
        raise ConfigError(f"data.weights has {len(cfg.weights)} values; it needs one per pair ({n})")
    for side in ("chosen", "rejected"):
        for i, y in enumerate(getattr(cfg, side)):
            _check_response(f"data.{side}[{i}]", y, fam)


def _check_response(key: str, y: Any, fam) -> None:
    if fam.single_context:
        if not isinstance(y, int) or not 0 <= y < fam.k:
            shown = list(y) if isinstance(y, tuple) else y
            raise ConfigError(f"{key} = {shown!r}: a response of this single-context family is an action index "
                              f"0..{fam.k - 1}")
        return
    if not isinstance(y, tuple):
        raise ConfigError(f"{key} = {y!r}: a response of an EOS family is a list of content tokens "
                          f"1..{fam.vocab - 1} (EOS implied; [] is the empty response)")
    bad = [t for t in y if not 1 <= t <= fam.vocab - 1]
    if bad:
        raise ConfigError(f"{key} = {list(y)}: token {bad[0]} is not a content token; they are 1..{fam.vocab - 1} "
                          "(EOS, token 0, is implied at the end and never written)")
    if fam.max_len is not None and len(y) + 1 > fam.max_len:
        raise ConfigError(f"{key} has {len(y)} content tokens; with policy.max_len = {fam.max_len} (EOS "
                          f"included) a response has at most {fam.max_len - 1}")


# --------------------------------------------------------------------------------------------
# Checks across tables
# --------------------------------------------------------------------------------------------

COMMON_POLICY_KEYS = ("family", "vocab", "max_len", "init", "scale")


def policy_keys(policy: PolicyConfig) -> set[str]:
    """The ``[policy]`` keys that apply: the common ones and the family's ``config_keys`` (no
    ``max_len`` for a single-context family, which has no length)."""
    cls = policy.family_class
    allowed = set(COMMON_POLICY_KEYS) | set(cls.config_keys)
    return allowed - {"max_len"} if cls.single_context else allowed


def check(exp: Experiment) -> None:
    """Everything that needs several tables together, for one (already expanded) experiment:
    the keys that apply to the family and the data, the sizes against the budgets, and, by
    building them, the family, its parameter shapes, the data, the loss and the training table."""
    given = set(exp.source.get("policy", {}))
    allowed = policy_keys(exp.policy)
    stray = sorted(given - allowed)
    if stray:
        raise ConfigError(f"policy.{stray[0]} does not apply to the '{exp.policy.family}' family"
                          f"{' (single context)' if exp.policy.single_context else ''}; "
                          f"its keys are: {', '.join(sorted(allowed))}")
    if exp.policy.init == "reference" and exp.reference.params == "policy":
        raise ConfigError("policy.init = 'reference' with reference.params = 'policy' defines neither; "
                          "give reference.params = 'seed' or explicit parameters, or policy.init = 'seed'")
    _check_data_keys(exp)
    _check_sizes(exp)
    fam = build_family(exp.policy)
    check_params(exp, fam)
    check_data(exp.data, exp.policy, fam)
    check_loss(exp, fam)
    check_train(exp, fam)


def _check_sizes(exp: Experiment) -> tuple[float, float]:
    """The size keys against ``gradlab.budgets`` (raisable by environment variable), before
    anything is allocated: steps, seeds, pairs, the number of responses a cut-off enumerates, and
    then the estimated work and memory of the experiment's runs (:func:`estimate`), returned."""
    from gradlab import budgets

    budgets.check_count("steps", exp.train.steps, "train.steps")
    budgets.check_count("seeds", len(exp.train.seeds), "train.seeds")
    budgets.check_count("pairs", exp.data.n_pairs, "data.n_pairs")
    if not exp.policy.single_context and exp.policy.max_len is not None:
        v, k = exp.policy.vocab, exp.policy.max_len
        try:
            budgets.check_simulation(steps=exp.train.steps, seeds=len(exp.train.seeds), n_pairs=exp.data.n_pairs,
                                     vocab=v + 1, max_len=k)
        except GradlabError as exc:  # the budget counts tokens with the EOS; the file counts content tokens
            raise reworded(exc, str(exc).replace(
                f"vocab={v + 1} and max_len={k}",
                f"policy.vocab = {v} content tokens (+ EOS) and policy.max_len = {k}")) from None
    work, memory = estimate(exp)
    _check_estimates(work, memory, "the experiment")
    return work, memory


def _check_estimates(work: float, memory: float, what: str) -> None:
    from gradlab import budgets

    budgets.check_estimate("memory_bytes", memory, f"{what}: its memory (runs stacked in one program) is "
                                                   "estimated at")
    budgets.check_estimate("work", work, f"{what}: its work (steps x runs x the family's size) is estimated at")


def estimate(exp: Experiment) -> tuple[float, float]:
    """(work units, bytes) of one expanded experiment, by arithmetic on its tables and the
    family's shapes (abstract: nothing is allocated), for the ``work`` and ``memory_bytes``
    budgets. Per run, with P parameters, C logit-table cells, N pairs of T tokens, S enumerated
    responses and R recorded steps:

    - work: steps x (P + C + both sides' count matrices, or the per-position logits 2 N T V
      without a table) + R x (S T, or the cube of an unbounded chain's states);
    - floats: 6 P (parameters, gradient, optimiser state, update) + 4 C (the table, its
      log-softmax, their cotangent, the reference's) + four count matrices of the lean path
      (chosen, rejected and their tails: N x C each, or N x T indices and a mask past
      ``objective.DENSE_LIMIT`` entries) or, without a table, the per-position logits
      (6 N T V) + the enumeration's counts + the data (2 N T) + R x (4 N + 64, + P when the
      parameters are recorded);

    times the seeds (every run of an experiment may be stacked in one program), 8 bytes a float.
    An estimate of the order of magnitude, to refuse what cannot run, not a measurement."""
    p, c, vocab, seqs = _family_size(exp.policy)
    t = _width(exp)
    n = _n_pairs(exp, seqs)
    train = exp.train
    records = train.steps // train.record_every + 2
    def counts(rows: int) -> float:
        return rows * c if rows * c <= DENSE_LIMIT else 2 * rows * t

    states = c // vocab if c and exp.policy.max_len is None else 0  # an unbounded chain's solve
    work = train.steps * (p + c + 2 * (counts(n) if c else n * t * vocab)) + records * (seqs * t + states**3)

    if c:
        pairs = 4 * counts(n) + counts(seqs)
    else:
        pairs = 6 * n * t * vocab
    recorded = records * (4 * n + 64 + (p if "params" in (train.metrics or ()) else 0))
    floats = 6 * p + 4 * c + pairs + 2 * n * t + recorded
    runs = len(train.seeds)
    return float(runs * work), float(runs * 8 * floats)


def _family_size(policy: PolicyConfig) -> tuple[int, int, int, int]:
    """(parameters, logit-table cells or 0, vocabulary with EOS, enumerated responses or 0) of
    the family ``policy`` builds, from abstract shapes (``jax.eval_shape``: nothing allocated)."""
    return _family_size_of(PolicyConfig(family=policy.family, vocab=policy.vocab, max_len=policy.max_len,
                                        **policy.options()))


@caches.memo(maxsize=256)
def _family_size_of(policy: PolicyConfig) -> tuple[int, int, int, int]:
    fam = build_family(policy)
    params = abstract_params(fam)
    p = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
    table = getattr(fam, "table_logits", None)
    shape = jax.eval_shape(table, params) if table is not None else None
    c = int(np.prod(shape.shape)) if shape is not None else 0
    if fam.single_context:
        return p, c, fam.k, fam.k
    seqs = 0
    if fam.max_len is not None:
        content = fam.vocab - 1
        seqs = sum(content**k for k in range(fam.max_len))
    return p, c, fam.vocab, seqs


def _width(exp: Experiment) -> int:
    """Tokens per response (EOS included) of the pairs, estimated from the tables: the cut-off,
    else the longest given response, else the length distributions' reach."""
    if exp.policy.single_context:
        return 1
    if exp.policy.max_len is not None:
        return exp.policy.max_len
    d = exp.data
    if d.kind == "pairs":
        assert d.chosen is not None and d.rejected is not None  # kind = "pairs" sets both (the schema)
        return 1 + max((len(y) if isinstance(y, tuple) else 1) for y in (*d.chosen, *d.rejected))
    reach = 6  # the presets' default lengths: up to 5 content tokens
    for dist in (d.chosen_length, d.rejected_length):
        if dist is None:
            continue
        if dist.dist == "uniform":
            reach = max(reach, (dist.high if dist.high is not None else 5) + 1)
        else:  # a poisson mean: its largest draw of a dataset, generously
            assert dist.mean is not None  # a poisson length has its mean (the schema)
            reach = max(reach, int(dist.mean + 10 * dist.mean**0.5 + 10))
    return reach


def _n_pairs(exp: Experiment, seqs: int) -> int:
    d = exp.data
    if d.kind == "pairs":
        assert d.chosen is not None  # kind = "pairs" sets it (the schema)
        return len(d.chosen)
    if d.kind in ENUMERATED_PRESETS:
        return max(1, seqs) ** 2  # at most every pair of the enumerated responses
    return d.n_pairs


_DATA_KEYS = {
    "pairs": {"chosen", "rejected", "weights"},
    **{p: {"n_pairs", "chosen_length", "rejected_length", "chosen_token_probs", "rejected_token_probs"}
       for p in LENGTH_PRESETS},
    "shared_prefix": {"n_pairs", "chosen_length"},
    "similar_embeddings": {"n_pairs"},
    **{p: set() for p in ENUMERATED_PRESETS},
    "best_of_n": {"best_of"},
    "rollouts": {"group_size", "horizon"},
}


def _check_data_keys(exp: Experiment) -> None:
    d = exp.data
    given = set(exp.source.get("data", {})) - {"kind", "labels", "reward", "seed"}
    allowed = _DATA_KEYS[d.kind]
    stray = sorted(given - allowed)
    if stray:
        raise ConfigError(f"data.{stray[0]} does not apply to data.kind = '{d.kind}'; "
                          f"its keys are: {', '.join(sorted(allowed | {'kind', 'labels', 'reward', 'seed'}))}")
    if d.kind == "pairs" and (d.chosen is None or d.rejected is None):
        raise ConfigError("data.kind = 'pairs' needs data.chosen and data.rejected (one response per pair each)")
    if exp.policy.single_context and d.kind not in ("pairs", "rollouts") + ENUMERATED_PRESETS:
        raise ConfigError(f"data.kind = '{d.kind}' draws token sequences, which a single-context family does "
                          f"not have; use 'pairs' or one of {', '.join(ENUMERATED_PRESETS)}")


# --------------------------------------------------------------------------------------------
# The resolved configuration
# --------------------------------------------------------------------------------------------


def resolved(exp: Experiment) -> dict[str, Any]:
    """Every key with its value after defaults (JSON-ready), the sweep as given."""

    def plain(x):
        if isinstance(x, LengthDist):
            return {k: v for k, v in plain_dc(x).items() if v is not None}
        if isinstance(x, Mapping):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, tuple | list):
            return [plain(v) for v in x]
        return x

    def plain_dc(dc):
        return {f.name: getattr(dc, f.name) for f in fields(dc)}

    out = {name: plain(plain_dc(getattr(exp, name))) for name in ("policy", "reference", "data", "train")}
    # only the keys that apply to this family and this data
    out["policy"] = {k: v for k, v in out["policy"].items() if k in policy_keys(exp.policy)}
    if "dim" in out["policy"]:
        out["policy"]["dim"] = exp.policy.hidden_dim
    if out["policy"].get("max_len", 0) is None:
        out["policy"]["max_len"] = "none"
    keep = _DATA_KEYS[exp.data.kind] | {"kind", "labels", "reward", "seed"}
    out["data"] = {k: v for k, v in out["data"].items() if k in keep}
    if exp.data.reward is None and not exp.policy.single_context and exp.data.kind != "rollouts":  # the oracle
        oracle = datasets.token_reward(exp.data, build_family(exp.policy))
        assert oracle is not None  # an EOS family with no reward given has the default oracle
        out["data"]["reward"] = oracle[1:].tolist()
    out["train"]["batch_size"] = out["train"]["batch_size"] or "full"
    out["train"]["metrics"] = list(metric_names(exp))
    loss = resolve_loss(exp.loss)
    values = hyper_values(exp.loss, loss)
    out["loss"] = {"name": exp.loss.name, "expr": exp.loss.expr, "resolved": loss.name, **values}
    if loss.kind == "group":
        from gradlab.group_losses import GroupLoss

        assert isinstance(loss, GroupLoss)
        out["loss"]["scale_rewards"] = exp.loss.scale_rewards or loss.scale_rewards
    else:  # the rollouts' training keys
        for key in ("expectation", "groups"):
            out["train"].pop(key)
    out["sweep"] = {k: list(v) for k, v in exp.sweep}
    if exp.zip:
        out["sweep"]["zip"] = {k: list(v) for k, v in exp.zip}
    return out




# --------------------------------------------------------------------------------------------
# The documentation's table of families, derived from the registry
# --------------------------------------------------------------------------------------------

FAMILY_TABLE_MARKERS = ("<!-- family table: generated from gradlab.policies.REGISTRY -->",
                        "<!-- end of the family table -->")


def family_table() -> str:
    """The markdown table of the registered families (``docs/experiments.md`` holds it between
    ``FAMILY_TABLE_MARKERS``; ``write_family_table`` rewrites it there)."""
    rows = ["| `family` | what it is | single context | `max_len = \"none\"` | its own `[policy]` keys |",
            "| --- | --- | --- | --- | --- |"]
    for name, cls in REGISTRY.items():
        forms = [cls.variant(context=c) for c in config.CONTEXTS] if "context" in cls.config_keys else [cls]
        single = "with `context = \"single\"`" if len({f.single_context for f in forms}) > 1 else \
            ("yes" if cls.single_context else "no")
        chains = [f for f in forms if f.finite_state and not f.single_context]
        unbounded = "no" if not chains else ("yes" if len(chains) == len(forms) else
                                             "with `context = \"previous_token\"`")
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        keys = ", ".join(f"`{k}`" for k in cls.config_keys) or "none"
        rows.append(f"| `{name}` | {summary} | {single} | {unbounded} | {keys} |")
    return "\n".join(rows)


def write_family_table(path: str | Path) -> bool:
    """Rewrite the family table between the markers of the markdown file ``path``; True if it
    changed."""
    path = Path(path)
    text = path.read_text()
    start, end = (text.index(m) for m in FAMILY_TABLE_MARKERS)
    new = text[: start + len(FAMILY_TABLE_MARKERS[0])] + "\n" + family_table() + "\n" + text[end:]
    if new != text:
        path.write_text(new)
    return new != text
