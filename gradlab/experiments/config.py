"""The experiment-file schema: frozen dataclasses, parsing from TOML or a dict (every key's type
and range, naming the offending key and what is allowed), and sweep expansion.

An experiment file has six tables (``docs/experiments.md`` is the reference)::

    [policy]     family, vocab, max_len, init, scale, dim, context, W, w_seed, ...
    [reference]  params, temperature
    [data]       kind, chosen, rejected, weights, n_pairs, chosen_length, ..., labels, reward
    [loss]       name or expr, and hyperparameter values
    [train]      optimizer, lr, steps, seeds, batch_size, record_every, metrics
    [sweep]      "dotted.key" = [values, ...]   (a full grid)
                 zip = { "dotted.key" = [...], ... }   (equal-length lists stepped together)

This module only parses: unknown keys, wrong types and values out of range are refused here, one
table at a time. What needs several tables together (shapes that do not match the family, data
the family cannot hold, a loss that needs a variable the family cannot supply) is checked by
:mod:`gradlab.experiments.validate`, whose ``load`` is the one the package exports.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import pickle
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradlab import caches
from gradlab.errors import GradlabError, UnknownVariableError

if TYPE_CHECKING:  # the policy layer imports JAX; parsing a file must not
    from gradlab.policies import FamilyClass

__all__ = [
    "PolicyConfig",
    "ReferenceConfig",
    "DataConfig",
    "LossConfig",
    "TrainConfig",
    "Experiment",
    "load",
    "read",
    "parse",
    "settings",
    "from_flags",
    "with_sets",
    "PRESETS",
]

PRESETS = ("equal_length", "chosen_longer", "rejected_longer", "shared_prefix", "similar_embeddings",
           "on_policy", "reference_pairs", "population", "best_of_n")
LENGTH_PRESETS = PRESETS[:4]  # the presets drawn from length and token distributions
ENUMERATED_PRESETS = PRESETS[5:]  # every pair of the enumerated responses
CONTEXTS = ("single", "previous_token", "prefix")
SEED_LIMIT = 2**32 - 1  # seeds are PRNG keys' 32-bit seeds
POISSON_MEAN_LIMIT = 1e6  # content tokens: far beyond any toy, far below numpy's sampler limit
DTYPES = ("float16", "bfloat16", "float32", "float64")  # an optimiser argument named *dtype*

Array = tuple  # a nested tuple of floats: arrays are immutable in a frozen config


class ConfigError(UnknownVariableError):
    """An experiment file that cannot run: the message names the key and what is allowed."""


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyConfig:
    family: str = "unigram"
    vocab: int = 3  # content tokens 1..vocab (EOS is token 0), or actions for single-context families
    max_len: int | None = 6  # the family's cut-off (tokens including EOS); None is "none"
    init: str | Mapping[str, Array] = "seed"  # "seed", "reference", or explicit parameters
    scale: float = 0.5
    dim: int | None = None  # linear_head and hidden_state: 3, or the width of a given W
    context: str = "previous_token"  # hidden_state
    W: Array | None = None  # hidden_state's fixed matrix, when given
    w_seed: int = 0  # hidden_state's seeded W
    train_features: bool = False  # linear_head
    feature_seed: int = 0  # linear_head

    @property
    def hidden_dim(self) -> int:
        """``dim``, else the width of a given ``W``, else 3."""
        return self.dim if self.dim is not None else (len(self.W[0]) if self.W is not None else 3)

    def options(self) -> dict[str, Any]:
        """The family's own keys (its ``config_keys``) that are set, for ``from_config``."""
        from gradlab.policies import REGISTRY

        keys = REGISTRY[self.family].config_keys if self.family in REGISTRY else ()
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    @property
    def family_class(self) -> FamilyClass:
        """The policy class this table builds (``gradlab.policies.family_class``)."""
        from gradlab.policies import family_class

        return family_class(self.family, **self.options())

    @property
    def single_context(self) -> bool:
        return bool(self.family_class.single_context)


@dataclass(frozen=True)
class ReferenceConfig:
    params: str | Mapping[str, Array] = "policy"  # "policy", "seed", or explicit parameters
    temperature: float = 1.0


@dataclass(frozen=True)
class LengthDist:
    dist: str = "uniform"  # "uniform" (low..high content tokens, inclusive) or "poisson" (mean)
    low: int | None = None
    high: int | None = None
    mean: float | None = None


@dataclass(frozen=True)
class DataConfig:
    kind: str = "equal_length"
    chosen: tuple | None = None  # pairs: token lists (EOS families) or action indices
    rejected: tuple | None = None
    weights: tuple[float, ...] | None = None
    n_pairs: int = 64
    best_of: int = 10  # best_of_n: reference samples per pair (the best is chosen, the worst rejected)
    chosen_length: LengthDist | None = None  # presets: None is the preset's own default
    rejected_length: LengthDist | None = None
    chosen_token_probs: tuple[float, ...] | None = None  # over content tokens 1..vocab
    rejected_token_probs: tuple[float, ...] | None = None
    seed: int | None = None  # None: each run seed draws its own data
    labels: str = "hard"  # or "soft": sigma(r(y_w) - r(y_l))
    reward: tuple | Mapping[str, tuple] | None = None  # per token/action, or {chosen, rejected}; rollouts:
    # {first_token}, {contains} or {table}
    group_size: int = 8  # rollouts: G, the responses drawn per group
    horizon: int | None = None  # rollouts on an unbounded chain: lengths summed exactly (None: from the policy)


@dataclass(frozen=True)
class LossConfig:
    name: str | None = "dpo"
    expr: str | None = None
    values: Mapping[str, float] = field(default_factory=dict)  # hyperparameters
    scale_rewards: str | None = None  # a group loss's advantage scaling; None: the loss's own


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adam"
    optimizer_args: Mapping[str, Any] = field(default_factory=dict)
    lr: float = 0.05
    steps: int = 300
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    batch_size: int | None = None  # None is "full"
    record_every: int = 1
    metrics: tuple[str, ...] | None = None  # None: the defaults for the family and data
    expectation: str = "exact"  # rollouts: the exact expected gradient, or "sample" (Monte Carlo groups)
    groups: int = 64  # rollouts with expectation = "sample": the groups drawn per step


@dataclass(frozen=True)
class Experiment:
    """One fully specified experiment; ``sweep`` lists the dotted keys it varies and
    ``source`` is the (normalised) table it was parsed from, to expand the sweep."""

    policy: PolicyConfig = PolicyConfig()
    reference: ReferenceConfig = ReferenceConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    sweep: tuple[tuple[str, tuple], ...] = ()
    zip: tuple[tuple[str, tuple], ...] = ()  # swept together: the i-th values of every list form one point
    source: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


# --------------------------------------------------------------------------------------------
# Checkers: each returns the normalised value or raises ConfigError naming the key
# --------------------------------------------------------------------------------------------


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key} = {value!r} is not allowed: {key} must be {allowed}")


def _int(lo: int = 1, hi: int | None = None) -> Callable[[str, Any], int]:
    def check(key, v):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise _fail(key, v, f"a whole number >= {lo}" if hi is None else f"a whole number in {lo}..{hi}")
        return v

    return check


def _number(positive: bool = False, hi: float | None = None) -> Callable[[str, Any], float]:
    def check(key, v):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or (positive and v <= 0) \
                or (hi is not None and v > hi):
            what = "a positive finite number" if positive else "a finite number"
            raise _fail(key, v, what if hi is None else f"{what} at most {hi:g}")
        return float(v)

    return check


def _choice(options: Sequence[str]) -> Callable[[str, Any], str]:
    def check(key, v):
        if isinstance(v, str):
            v2 = v.replace("-", "_")
            if v2 in options:
                return v2
        raise _fail(key, v, "one of " + ", ".join(repr(o) for o in options))

    return check


def _bool(key, v):
    if not isinstance(v, bool):
        raise _fail(key, v, "true or false")
    return v


def _string(key, v):
    if not isinstance(v, str) or not v.strip():
        raise _fail(key, v, "a non-empty string")
    return v


def _array(key: str, v: Any) -> Array:
    """A nested list of finite numbers -> nested tuple of floats (rectangular)."""
    import numpy as np

    try:
        a = np.asarray(v, dtype=float)
    except (TypeError, ValueError):
        raise _fail(key, v, "a (nested) array of numbers of rectangular shape") from None
    if a.ndim == 0 or not np.all(np.isfinite(a)):
        raise _fail(key, v, "a (nested) array of finite numbers")
    return _to_tuple(a)


def _to_tuple(a) -> tuple:
    return tuple(_to_tuple(x) for x in a) if getattr(a, "ndim", 0) > 1 else tuple(float(x) for x in a)


def _params_table(key: str, v: Any, words: Sequence[str]) -> str | dict[str, Array]:
    if isinstance(v, str):
        return _choice(words)(key, v)
    if isinstance(v, Mapping) and v:
        return {name: _array(f"{key}.{name}", x) for name, x in v.items()}
    raise _fail(key, v, "one of " + ", ".join(repr(w) for w in words) + ", or a table of parameter arrays")


def _max_len(key, v):
    if isinstance(v, str) and v.lower() == "none":
        return None
    return _int(1)(key, v)


def _length(key, v) -> LengthDist:
    if not isinstance(v, Mapping):
        raise _fail(key, v, 'a table, {dist = "poisson", mean = 5} or {dist = "uniform", low = 1, high = 5}')
    dist = _choice(("uniform", "poisson"))(f"{key}.dist", v.get("dist", "uniform"))
    allowed = {"dist", "low", "high"} if dist == "uniform" else {"dist", "mean"}
    _unknown(key, v, allowed)
    if dist == "poisson":
        if "mean" not in v:
            raise ConfigError(f"{key}: a poisson length needs mean (the mean number of content tokens)")
        return LengthDist("poisson", mean=_number(True, POISSON_MEAN_LIMIT)(f"{key}.mean", v["mean"]))
    lo, hi = _int(0)(f"{key}.low", v.get("low", 0)), v.get("high")
    hi = None if hi is None else _int(0)(f"{key}.high", hi)
    if hi is not None and hi < lo:
        raise ConfigError(f"{key}: high ({hi}) must be at least low ({lo})")
    return LengthDist("uniform", low=lo, high=hi)


def _responses(key, v):
    if not isinstance(v, list) or not v:
        raise _fail(key, v, "a non-empty list of responses")
    out: list[tuple[int, ...] | int] = []
    for i, item in enumerate(v):
        if isinstance(item, list):
            if any(isinstance(t, bool) or not isinstance(t, int) for t in item):
                raise _fail(f"{key}[{i}]", item, "a list of content-token integers")
            out.append(tuple(item))
        elif isinstance(item, int) and not isinstance(item, bool):
            out.append(item)
        else:
            raise _fail(f"{key}[{i}]", item, "a list of content tokens, or an action index")
    return tuple(out)


def _weights(key, v):
    a = _array(key, v)
    if any(isinstance(x, tuple) for x in a) or any(x < 0 for x in a) or sum(a) <= 0:
        raise _fail(key, v, "a flat list of non-negative numbers with a positive sum")
    return a


def _probs(key, v):
    return _weights(key, v)


REWARD_KINDS = ("first_token", "contains", "table")  # the binary rewards of rollouts


def _reward(key, v):
    if isinstance(v, Mapping) and set(v) & set(REWARD_KINDS):
        if len(v) != 1:
            raise ConfigError(f"{key}: a rollout reward is one of {{first_token = [...]}}, {{contains = [...]}} or "
                              f"{{table = [...]}}, not {sorted(v)}")
        (kind, values), = v.items()
        if kind != "table" and (not isinstance(values, list) or not values
                                or any(isinstance(t, bool) or not isinstance(t, int) for t in values)):
            raise _fail(f"{key}.{kind}", values, "a non-empty list of content tokens (integers 1..vocab)")
        return {kind: _flat(f"{key}.{kind}", values)}
    if isinstance(v, Mapping):
        _unknown(key, v, {"chosen", "rejected"})
        if set(v) != {"chosen", "rejected"}:
            raise ConfigError(f"{key}: per-sequence rewards need both chosen and rejected (one value per pair)")
        return {k: _flat(f"{key}.{k}", v[k]) for k in ("chosen", "rejected")}
    return _flat(key, v)


def _flat(key, v):
    a = _array(key, v)
    if any(isinstance(x, tuple) for x in a):
        raise _fail(key, v, "a flat list of numbers")
    return a


def _seeds(key, v):
    if isinstance(v, list):
        if not v or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= SEED_LIMIT for s in v) \
                or len(set(v)) < len(v):
            raise _fail(key, v, f"a count (whole number >= 1) or a list of distinct seeds in 0..{SEED_LIMIT}")
        return tuple(v)
    return tuple(range(_int(1)(key, v)))


def _batch(key, v):
    if v == "full":
        return None
    return _int(1)(key, v)


def _metrics(key, v):
    if not isinstance(v, list) or not all(isinstance(m, str) for m in v):
        raise _fail(key, v, "a list of metric names")
    return tuple(dict.fromkeys(v))


def _optimizer(key, v):
    """``"adam"`` or ``{name = "adam", b1 = 0.8}`` -> (name, args)."""
    if isinstance(v, str):
        return optimizer_spec(key, v, {})
    if isinstance(v, Mapping) and "name" in v:
        return optimizer_spec(key, v["name"], {k: x for k, x in v.items() if k != "name"})
    raise _fail(key, v, 'an optax optimiser name, or a table {name = "...", arg = value, ...}')


# take a learning rate but are not optimisers this runner can step: lbfgs's update needs the
# loss function itself (a line search); scale_by_learning_rate is a building block
_NOT_OPTIMISERS = ("lbfgs", "scale_by_learning_rate")


@caches.memo(maxsize=1)
def _optimisers() -> dict[str, list[str]]:
    """Every optax optimiser this runner can step (a function of optax that takes a
    ``learning_rate``, less ``_NOT_OPTIMISERS``), by name, with the arguments it takes besides
    the learning rate, in its signature's order. Learning them imports optax (~0.05 s), so they
    are kept in the disk cache under a key of gradlab's source, Python and optax's version
    (``_export.remembered``) and read back by a later process."""
    from gradlab.experiments import _export

    return _export.remembered(_export.facts_key("optax optimisers"), _optax_optimisers, _is_optimiser_table)


def _optax_optimisers() -> dict[str, list[str]]:
    import inspect

    import optax

    table = {}
    for n in dir(optax):
        f = getattr(optax, n)
        if n.startswith("_") or not inspect.isfunction(f) or n in _NOT_OPTIMISERS:
            continue
        try:
            params = list(inspect.signature(f).parameters)
        except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
            continue
        if "learning_rate" in params:
            table[n] = [p for p in params if p != "learning_rate"]
    return table


def _is_optimiser_table(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(args, list) and all(isinstance(a, str) for a in args) for args in value.values())


def optimizer_spec(key: str, name: Any, args: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Validate an optax optimiser and its arguments against its signature."""
    optimisers = _optimisers()
    if not isinstance(name, str) or name not in optimisers:
        raise _fail(key, name, "an optax optimiser that takes a learning rate: " + ", ".join(optimisers))
    settable = optimisers[name]
    for arg, value in args.items():
        if arg not in settable:
            raise ConfigError(f"{key}: optax.{name} has no argument '{arg}'; its arguments: {', '.join(settable)}")
        if not (value is None or isinstance(value, bool | int | float | str)):
            raise _fail(f"{key}.{arg}", value, "a number, a boolean or a string")
        if "dtype" in arg and value is not None and value not in DTYPES:
            raise _fail(f"{key}.{arg}", value, "a floating-point dtype: " + ", ".join(repr(d) for d in DTYPES))
    return name, dict(args)


def _unknown(where: str, table: Mapping[str, Any], allowed: Collection[str]) -> None:
    extra = [k for k in table if k not in allowed]
    if extra:
        raise ConfigError(f"unknown key '{where}.{extra[0]}'; the keys of [{where}] are: {', '.join(sorted(allowed))}")


# section -> key -> checker; the dataclass field defaults fill the rest
def _family(key, v):
    from gradlab.policies import REGISTRY  # the registry of families, read at each check

    return _choice(tuple(REGISTRY))(key, v)


_POLICY = {"family": _family, "vocab": _int(1), "max_len": _max_len,
           "init": lambda k, v: _params_table(k, v, ("seed", "reference")), "scale": _number(),
           "dim": _int(1), "context": _choice(CONTEXTS), "W": _array, "w_seed": _int(0, SEED_LIMIT),
           "train_features": _bool, "feature_seed": _int(0, SEED_LIMIT)}
_REFERENCE = {"params": lambda k, v: _params_table(k, v, ("policy", "seed")), "temperature": _number(True)}
_DATA = {"kind": _choice(("pairs", "rollouts") + PRESETS), "group_size": _int(2), "horizon": _int(1),
         "chosen": _responses, "rejected": _responses, "weights": _weights,
         "n_pairs": _int(1), "best_of": _int(2), "chosen_length": _length, "rejected_length": _length,
         "chosen_token_probs": _probs, "rejected_token_probs": _probs, "seed": _int(0, SEED_LIMIT),
         "labels": _choice(("hard", "soft")), "reward": _reward}
_TRAIN = {"optimizer": _optimizer, "lr": _number(True), "steps": _int(1), "seeds": _seeds,
          "batch_size": _batch, "record_every": _int(1), "metrics": _metrics,
          "expectation": _choice(("exact", "sample")), "groups": _int(2)}
SECTIONS = ("policy", "reference", "data", "loss", "train", "sweep")


def _section(raw: Mapping[str, Any], name: str, schema: Mapping[str, Callable]) -> dict[str, Any]:
    table = raw.get(name, {})
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{name}] must be a table of keys, not {table!r}")
    _unknown(name, table, schema)
    return {k: schema[k](f"{name}.{k}", v) for k, v in table.items()}


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def load(source: str | Path | Mapping[str, Any]) -> Experiment:
    """An experiment parsed from a TOML file path or a dict with the same tables, every sweep
    setting parsed too (``gradlab.experiments.load`` also validates them together)."""
    exp = parse(read(source))
    settings(exp)  # parses every point of the sweep up front
    return exp


def read(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The experiment's table, unparsed: a TOML file read, or a copy of a dict."""
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    path = Path(source)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise GradlabError(f"no experiment file at {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise GradlabError(f"{path} is not valid TOML: {exc}") from None


def parse(raw: Mapping[str, Any]) -> Experiment:
    """Parse one table (sweep not expanded) into an :class:`Experiment`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"an experiment is a table of tables ({', '.join(SECTIONS)}), not {raw!r}")
    _unknown("experiment", raw, SECTIONS)
    policy = PolicyConfig(**_section(raw, "policy", _POLICY))
    reference = ReferenceConfig(**_section(raw, "reference", _REFERENCE))
    data = DataConfig(**_section(raw, "data", _DATA))
    loss = _loss_section(raw.get("loss", {}))
    train_kw = _section(raw, "train", _TRAIN)
    if "optimizer" in train_kw:
        train_kw["optimizer"], train_kw["optimizer_args"] = train_kw["optimizer"]
    train = TrainConfig(**train_kw)
    sweep, zipped = _sweep_section(raw.get("sweep", {}))
    return Experiment(policy, reference, data, loss, train, sweep, zipped, source=raw)


def _loss_section(table: Any) -> LossConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"[loss] must be a table, not {table!r}")
    if "name" in table and "expr" in table:
        raise ConfigError("[loss] takes either name (a registered loss, alias or combination) or expr "
                          "(a formula), not both")
    name = _string("loss.name", table["name"]) if "name" in table else (None if "expr" in table else "dpo")
    expr = _string("loss.expr", table["expr"]) if "expr" in table else None
    scale = _scale_rewards("loss.scale_rewards", table["scale_rewards"]) if "scale_rewards" in table else None
    values = {}
    for k, v in table.items():
        if k in ("name", "expr", "scale_rewards"):
            continue
        values[k] = _number()(f"loss.{k}", v)
    return LossConfig(name=name, expr=expr, values=values, scale_rewards=scale)


def _scale_rewards(key, v):
    from gradlab.group_losses import ADVANTAGES  # a group loss's advantage options, in one place

    return _choice(tuple(ADVANTAGES))(key, v)


def _sweep_section(table: Any) -> tuple[tuple[tuple[str, tuple], ...], tuple[tuple[str, tuple], ...]]:
    """(grid keys, zipped keys). ``zip`` is a table of lists of one common length, stepped
    together (the i-th value of each is one point); with grid keys beside it, the grid runs over
    every combination of their values and of the zipped points."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"[sweep] must be a table of dotted keys to lists, not {table!r}")
    table = dict(table)
    zipped = table.pop("zip", {})
    if not isinstance(zipped, Mapping):
        raise ConfigError(f"sweep.zip must be a table of dotted keys to lists of equal length, not {zipped!r}")
    grid, zipped = _sweep_keys(table, "sweep"), _sweep_keys(zipped, "sweep.zip")
    lengths = {key: len(values) for key, values in zipped}
    if len(set(lengths.values())) > 1:
        raise ConfigError("the lists of sweep.zip must have equal lengths (they are stepped together), not "
                          + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
    both = {k for k, _ in grid} & set(lengths)
    if both:
        raise ConfigError(f"sweep key {', '.join(sorted(both))} is both in the grid and in sweep.zip; give it once")
    return grid, zipped


def _sweep_keys(table: Mapping[str, Any], where: str) -> tuple[tuple[str, tuple], ...]:
    out = []
    for key, values in _flatten(table):
        if not isinstance(values, list) or not values:
            raise _fail(f"{where}.{key}", values, "a non-empty list of values")
        section = key.split(".", 1)[0]
        if section not in SECTIONS[:-1] or "." not in key:
            raise ConfigError(f"{where} key '{key}' must be a dotted key into one of "
                              f"{', '.join(SECTIONS[:-1])}, e.g. \"loss.beta\" or \"train.optimizer\"")
        out.append((key, tuple(values)))
    return tuple(out)


def _flatten(table: Mapping[str, Any], prefix: str = ""):
    """TOML reads ``loss.beta = [...]`` (unquoted) as a nested table: flatten it back."""
    for k, v in table.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _set(raw: dict[str, Any], key: str, value: Any, what: str = "sweep key") -> None:
    *path, last = key.split(".")
    node = raw
    for p in path:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what} '{key}': '{p}' is not a table")
    node[last] = value


def with_sets(raw: Mapping[str, Any], sets: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the experiment table ``raw`` with ``--set`` items applied: a dotted
    ``section.key`` sets that key (nested tables as needed), a plain name is a loss
    hyperparameter (``loss.NAME``). ``gradlab run --set`` and ``gradlab simulate --set`` share it."""
    out = copy.deepcopy(dict(raw))
    for key, value in sets.items():
        dotted = key if "." in key else f"loss.{key}"
        if dotted.split(".", 1)[0] not in SECTIONS:
            raise ConfigError(f"--set key '{key}' must be a loss hyperparameter or a dotted key into one of "
                              f"{', '.join(SECTIONS)}, e.g. beta=0.5 or train.steps=100")
        _set(out, dotted, value, "--set key")
    return out


def settings(exp: Experiment) -> list[tuple[dict[str, Any], Experiment]]:
    """The points of the sweep: one (setting, experiment) per combination of the grid's values
    and the zipped points (the first grid key varies slowest, the zipped points fastest); a single
    ``({}, exp)`` when nothing is swept."""
    if not exp.sweep and not exp.zip:
        return [({}, exp)]
    _check_sizes(exp)
    key = settings_key(exp)
    if key is None:  # a source pickle cannot hold: expanded every time
        return _expand(exp)
    if key not in _SETTINGS:
        _SETTINGS[key] = _expand(exp)
    return [(dict(setting), point) for setting, point in _SETTINGS[key]]


# The points of a sweep are a pure function of the source table: kept by content, so the runner's
# expansion after ``load`` and a repeated run parse each point once (issue 17: 5-10 ms of every
# call). The key also holds the size budgets, which ``validate`` reads beside it (``settings_key``).
_SETTINGS: dict[bytes, list[tuple[dict[str, Any], Experiment]]] = caches.Bounded(256)


def sweep_size(exp: Experiment) -> int:
    """How many settings the sweep has, counted from its lists without expanding them: the
    product of the grid lists' lengths, times the length of a ``zip`` (lists stepped together,
    counted by the longest)."""
    table = exp.source.get("sweep") or {}
    if not isinstance(table, Mapping):
        return 1
    count = 1
    for key, values in table.items():
        if key == "zip" and isinstance(values, Mapping):
            count *= max((len(v) for _, v in _flatten(values) if isinstance(v, list | tuple)), default=1)
        elif isinstance(values, Mapping):
            for _, v in _flatten(values):
                count *= len(v) if isinstance(v, list | tuple) else 1
        elif isinstance(values, list | tuple):
            count *= len(values)
    return count


def _check_sizes(exp: Experiment) -> None:
    """The sweep's size against the ``settings`` budget, before it expands (its points are
    parsed one by one, and each is checked against the other budgets)."""
    from gradlab import budgets

    budgets.check_estimate("settings", sweep_size(exp), "the sweep has")


def settings_key(exp: Experiment) -> bytes | None:
    """A digest of the experiment's source and the size budgets, or None if it cannot be made."""
    from gradlab import budgets

    limits = tuple(budgets.get(name) for name in budgets.BUDGETS)
    try:
        return hashlib.sha256(pickle.dumps((dict(exp.source), limits))).digest()
    except (pickle.PicklingError, TypeError, AttributeError):
        return None


def _expand(exp: Experiment) -> list[tuple[dict[str, Any], Experiment]]:
    axes: list[list[tuple[tuple[str, Any], ...]]] = [[((k, v),) for v in values] for k, values in exp.sweep]
    if exp.zip:  # one axis whose points set every zipped key at once
        axes.append([tuple((k, values[i]) for k, values in exp.zip) for i in range(len(exp.zip[0][1]))])
    out = []
    for combo in itertools.product(*axes):
        raw = copy.deepcopy(dict(exp.source))
        raw.pop("sweep", None)
        setting = dict(item for point in combo for item in point)
        for k, v in setting.items():
            _set(raw, k, v)
        try:
            point = parse(raw)
        except GradlabError as exc:
            raise reworded(exc, f"sweep setting {setting}: {exc}") from None
        out.append((setting, point))
    return out


def reworded(exc: GradlabError, message: str) -> GradlabError:
    """The same kind of error with a new message (a budget error keeps the budget's name)."""
    from gradlab.budgets import BudgetError

    return BudgetError(exc.budget, message) if isinstance(exc, BudgetError) else type(exc)(message)


def from_flags(
    loss: str | None = None,
    *,
    expr: str | None = None,
    policy: str | None = None,
    vocab: int | None = None,
    max_len: int | str | None = None,
    optimizer: str | None = None,
    lr: float | None = None,
    steps: int | None = None,
    seeds: int | None = None,
    batch_size: int | str | None = None,
    dataset: str | None = None,
    values: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The experiment table of the common command-line flags (``gradlab simulate``'s): a flag left
    at None keeps the schema's default. ``max_len`` and ``batch_size`` take their text forms
    (``"none"``, ``"full"``) or integers; dataset names accept hyphens.

    Args:
        loss, expr: ``[loss] name`` (a registered name, alias or combination) or ``expr`` (a formula).
        policy, vocab, max_len: ``[policy] family``, ``vocab`` and ``max_len``.
        optimizer, lr, steps, seeds, batch_size: the ``[train]`` keys of those names.
        dataset: ``[data] kind``.
        values: the loss's hyperparameters, added to ``[loss]``.

    Returns:
        The experiment as a dict of tables, for :func:`gradlab.experiments.load` or ``run``.
    """

    def given(**kw):
        return {k: v for k, v in kw.items() if v is not None}

    def number(text):
        return int(text) if isinstance(text, str) and text.isdigit() else text

    loss_table: dict[str, Any] = given(name=loss, expr=expr)
    loss_table.update(values or {})
    return {
        "policy": given(family=policy, vocab=vocab, max_len=number(max_len)),
        "data": given(kind=dataset),
        "loss": loss_table,
        "train": given(optimizer=optimizer, lr=lr, steps=steps, seeds=seeds, batch_size=number(batch_size)),
    }
