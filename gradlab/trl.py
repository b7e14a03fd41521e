"""TRL's loss configurations and the gradlab losses that reproduce them.

Each row is one TRL trainer configuration: the trainer, its ``loss_type``, the config fields
that change the formula, and the gradlab loss (a name or a weighted combination) with the
hyperparameter values that give the same per-pair loss. In a row, a config value that also
appears among the gradlab values is a placeholder (``label_smoothing=eps`` sets gradlab's
``label_smoothing`` to TRL's); any other value is literal (``f_divergence_type=forward_kl``).
The rows are data: name resolution (:func:`gradlab.losses.get_loss`, which accepts
``trainer.loss_type``), the generated table ``docs/trl.md``, :func:`resolve_config` (a concrete
TRL configuration to a gradlab loss and its values) and :func:`trl_defaults` all read them.
``tests/test_trl_oracle.py`` runs TRL's own loss code against every 1.x row.

Read at TRL 1.16.0, the release on PyPI (``trl/trainer/dpo_trainer.py``,
``trl/trainer/kto_trainer.py``, ``trl/experimental/cpo/cpo_trainer.py``,
``trl/experimental/orpo/orpo_trainer.py`` and the config classes beside them), and at v0.16.0
(commit 23a635ed) for the 0.x names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from collections.abc import Mapping

from gradlab.errors import UnknownLossError

__all__ = ["TrlConfig", "TRL_CONFIGS", "TRAINERS", "BATCH_LEVEL", "TRL_VERSION", "TRL_DEFAULTS", "resolve_config",
           "trl_defaults"]

TRL_VERSION = "1.16.0"  # the release the 1.x rows and TRL_DEFAULTS were read at


@dataclass(frozen=True)
class TrlConfig:
    """One TRL configuration and the gradlab loss that reproduces it per pair."""

    trainer: str  # "dpo", "cpo", "kto", "orpo"
    loss_type: str  # TRL's loss_type ("" where the trainer has none)
    config: Mapping[str, str] = field(default_factory=dict)  # other config fields that change the formula
    loss: str = ""  # gradlab loss name or weighted combination; "" where out of scope
    values: Mapping[str, str] = field(default_factory=dict)  # gradlab hyperparameters to set
    versions: str = "0.x, 1.x"
    note: str = ""

    @property
    def key(self) -> str:
        """The name ``get_loss`` accepts for this row: ``trainer.loss_type``."""
        return f"{self.trainer}.{self.loss_type or self.trainer}"


TRAINERS: Mapping[str, str] = MappingProxyType(
    {"dpo": "DPOTrainer / DPOConfig", "cpo": "CPOTrainer / CPOConfig", "kto": "KTOTrainer / KTOConfig",
     "orpo": "ORPOTrainer / ORPOConfig"}
)

# TRL loss types that are functions of the whole batch, not of one pair.
BATCH_LEVEL = frozenset({"aot", "aot_pair", "aot_unpaired"})


def _c(trainer: str, loss_type: str, loss: str, config: dict[str, str] | None = None,
       values: dict[str, str] | None = None, versions: str = "0.x, 1.x", note: str = "") -> TrlConfig:
    return TrlConfig(trainer, loss_type, MappingProxyType(config or {}), loss, MappingProxyType(values or {}),
                     versions, note)


_BATCH_NLL = ("TRL's NLL is a token mean over every chosen token of the batch; for one pair that is "
              "-lp_w/|y_w|, for a batch it weights each pair by its length")
_KTO_MEAN = "TRL averages the desirable and the undesirable example: half of gradlab's sum"

_ROWS: tuple[TrlConfig, ...] = (
    # DPOTrainer: loss_type with f_divergence_type="reverse_kl" (the default)
    _c("dpo", "sigmoid", "dpo", note="`label_smoothing > 0` in 0.x: `cdpo`"),
    _c("dpo", "sigmoid", "cdpo", {"label_smoothing": "eps > 0"}, {"label_smoothing": "eps"}, versions="0.x",
       note="1.x ignores label_smoothing for sigmoid"),
    _c("dpo", "hinge", "hinge"),
    _c("dpo", "ipo", "ipo_trl", note="TRL averages over tokens; the paper's summed form is `ipo`"),
    _c("dpo", "exo_pair", "exo_pair", {"label_smoothing": "eps"}, {"label_smoothing": "eps"}),
    _c("dpo", "nca_pair", "nca_pair"),
    _c("dpo", "robust", "robust", {"label_smoothing": "eps"}, {"label_smoothing": "eps"},
       note="TRL's default `label_smoothing=0` makes it plain DPO; gradlab's default is 0.1"),
    _c("dpo", "bco_pair", "bco_pair", versions="1.x", note="0.x shifts by a running reward mean: `bco_delta`"),
    _c("dpo", "sppo_hard", "sppo_hard"),
    _c("dpo", "apo_zero", "apo_zero"),
    _c("dpo", "apo_down", "apo_down"),
    _c("dpo", "discopop", "discopop", {"discopop_tau": "tau"}, {"discopop_tau": "tau"}),
    _c("dpo", "sft", "sft", versions="1.x", note=_BATCH_NLL),
    _c("dpo", "sigmoid_norm", "sigmoid_norm", versions="1.x"),
    _c("dpo", "sigmoid", "rpo", {"rpo_alpha": "a"}, {"rpo_alpha": "a"}, versions="0.x",
       note="in 1.x write `sigmoid:1,sft:a`"),
    _c("dpo", "sigmoid", "fdpo_fkl", {"f_divergence_type": "forward_kl"}, versions="1.x"),
    _c("dpo", "sigmoid", "fdpo_js", {"f_divergence_type": "js_divergence"}),
    _c("dpo", "sigmoid", "fdpo_alpha", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": "a"},
       {"f_alpha_divergence_coef": "a"}, versions="0.x"),
    _c("dpo", "sigmoid", "fdpo_alpha_trl",
       {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": "a"},
       {"f_alpha_divergence_coef": "a"}, versions="1.x"),
    _c("dpo", "sigmoid", "ld_dpo_trl", {"ld_alpha": "a"}, {"ld_alpha": "a"}, versions="1.x",
       note="the paper's form (policy only) is `ld_dpo`"),
    _c("dpo", "sigmoid,bco_pair,sft", "sigmoid:0.8,bco_pair:0.2,sft:1", {"loss_weights": "[0.8, 0.2, 1.0]"},
       versions="1.x", note="MPO (arXiv:2411.10442); any list of loss types combines the same way"),
    _c("dpo", "kto_pair", "kto", versions="0.x (<= 0.9.3)",
       note="0.x estimated z0 from the other half of the batch; here a constant `kto_z0`"),
    _c("dpo", "aot", "", note="batch-level: sorts log-ratios across the batch"),
    _c("dpo", "aot_pair", "", versions="0.x", note="batch-level: sorts log-ratios across the batch"),
    _c("dpo", "aot_unpaired", "", versions="1.x", note="batch-level: sorts log-ratios across the batch"),
    # CPOTrainer: reference-free, plus cpo_alpha times the chosen NLL (default 1)
    _c("cpo", "sigmoid", "cpo", {"label_smoothing": "eps", "cpo_alpha": "c"},
       {"label_smoothing": "eps", "cpo_alpha": "c"}, note=f"`cpo_alpha`: {_BATCH_NLL}"),
    _c("cpo", "hinge", "cpo_hinge", {"cpo_alpha": "c"}, {"cpo_alpha": "c"}, note=f"`cpo_alpha`: {_BATCH_NLL}"),
    _c("cpo", "ipo", "cpo_ipo", {"cpo_alpha": "c"}, {"cpo_alpha": "c"}, note=f"`cpo_alpha`: {_BATCH_NLL}"),
    _c("cpo", "simpo", "simpo_trl", {"simpo_gamma": "g", "label_smoothing": "eps", "cpo_alpha": "c"},
       {"simpo_gamma": "g", "label_smoothing": "eps", "cpo_alpha": "c"}, note="`cpo_alpha=0` gives `simpo` "
       f"(with TRL's beta and gamma); `cpo_alpha`: {_BATCH_NLL}"),
    _c("cpo", "alphapo", "alphapo", {"alpha": "a", "simpo_gamma": "g", "label_smoothing": "eps"},
       {"alpha": "a", "simpo_gamma": "g", "label_smoothing": "eps"}, versions="1.x",
       note="CPOConfig turns it into loss_type='simpo' with cpo_alpha=0; `alpha=0` (TRL's default) is then "
       "`simpo_trl` with `cpo_alpha=0`. `alpha != 0` with sigmoid, hinge or ipo has no gradlab loss"),
    _c("cpo", "simpo", "alphapo", {"alpha": "a", "simpo_gamma": "g", "label_smoothing": "eps", "cpo_alpha": "c"},
       {"alpha": "a", "simpo_gamma": "g", "label_smoothing": "eps", "cpo_alpha": "c"}, versions="1.x",
       note=f"`alpha != 0`: the AlphaPO reward; `cpo_alpha`: {_BATCH_NLL}"),
    # KTOTrainer
    _c("kto", "kto", "kto", {"desirable_weight": "wd", "undesirable_weight": "wu"},
       {"desirable_weight": "wd", "undesirable_weight": "wu"},
       note=f"z0 (TRL's detached batch KL estimate, clamped at 0) is `kto_z0`; {_KTO_MEAN}"),
    _c("kto", "apo_zero_unpaired", "apo_zero_unpaired", {"desirable_weight": "wd", "undesirable_weight": "wu"},
       {"desirable_weight": "wd", "undesirable_weight": "wu"}, note=_KTO_MEAN),
    # ORPOTrainer (no loss_type)
    _c("orpo", "", "orpo", {"beta": "lambda"}, {"beta": "lambda"},
       note="TRL's NLL is a token mean over the prompt and the chosen response (gradlab's: the response, "
       "-lp_w/|y_w|); the odds-ratio term is computed in float32"),
)

TRL_CONFIGS: tuple[TrlConfig, ...] = _ROWS

# TRL 1.16.0's defaults for the config fields that change a per-pair formula (DPOConfig, CPOConfig,
# KTOConfig, ORPOConfig); tests/test_trl_oracle.py reads them back from TRL's config classes.
TRL_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "dpo": MappingProxyType({
        "loss_type": ("sigmoid",), "loss_weights": None, "beta": 0.1, "label_smoothing": 0.0,
        "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5, "ld_alpha": None,
        "discopop_tau": 0.05, "use_weighting": False}),
    "cpo": MappingProxyType({
        "loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "cpo_alpha": 1.0, "simpo_gamma": 0.5,
        "alpha": 0.0}),
    "kto": MappingProxyType({
        "loss_type": "kto", "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}),
    "orpo": MappingProxyType({"beta": 0.1}),
})

# Fields whose non-default value selects another row (another gradlab loss), with the value that
# selects none. A value no row accounts for has no gradlab loss.
_SELECTORS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "dpo": MappingProxyType({"f_divergence_type": "reverse_kl", "ld_alpha": None}),
    "cpo": MappingProxyType({"alpha": 0.0}),
    "kto": MappingProxyType({}),
    "orpo": MappingProxyType({}),
})


def _trainer(name: str) -> str:
    key = name.strip().lower().removesuffix("trainer").removesuffix("config")
    if key not in TRAINERS:
        raise UnknownLossError(f"unknown TRL trainer '{name}'; the trainers are {', '.join(TRAINERS)} "
                               "(DPOTrainer, DPOConfig and dpo all work)")
    return key


def _placeholders(row: TrlConfig) -> set[str]:
    return set(row.values.values())


def _row_values(row: TrlConfig, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """gradlab hyperparameter -> the TRL field's value, through the row's placeholders."""
    field_of = {ph: name for name, ph in row.config.items() if ph in _placeholders(row)}
    values = {"beta": cfg["beta"]}
    values.update({name: cfg[field_of[ph]] for name, ph in row.values.items()})
    return values


def _one(trainer: str, loss_type: str, cfg: Mapping[str, Any]) -> tuple[TrlConfig, dict[str, Any]]:
    """The 1.x row for one loss type under the config's selector fields."""
    selectors = _SELECTORS[trainer]
    active = {k for k, off in selectors.items() if cfg[k] != off}
    for row in TRL_CONFIGS:
        if row.trainer != trainer or row.loss_type != loss_type or "1.x" not in row.versions or not row.loss:
            continue
        mentioned = {k for k in row.config if k in selectors}
        literal_ok = all(row.config[k] in _placeholders(row) or row.config[k] == str(cfg[k]) for k in mentioned)
        if mentioned == active and literal_ok:
            return row, _row_values(row, cfg)
    known = any(r.trainer == trainer and r.loss_type == loss_type for r in TRL_CONFIGS)
    if not known:
        types = sorted({r.loss_type for r in TRL_CONFIGS
                        if r.trainer == trainer and "1.x" in r.versions and "," not in r.loss_type})
        raise UnknownLossError(f"{TRAINERS[trainer]} has no loss_type '{loss_type}' in TRL 1.x; it has "
                               f"{', '.join(types)}")
    if loss_type in BATCH_LEVEL:
        raise UnknownLossError(f"TRL's '{loss_type}' is batch-level (it sorts log-ratios across the batch): "
                               "not a per-pair function, so it has no gradlab loss")
    settings = ", ".join(f"{k}={cfg[k]!r}" for k in sorted(active)) or "the default settings"
    raise UnknownLossError(f"{TRAINERS[trainer]} loss_type '{loss_type}' with {settings} has no gradlab loss "
                           "(docs/trl.md lists the configurations gradlab reproduces)")


def resolve_config(trainer: str, config: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The gradlab loss and the values of every field a TRL 1.x configuration sets for it, ``beta``
    included even where the loss has none (:func:`gradlab.losses.from_trl_config` keeps only the
    loss's own hyperparameters: this module sits below the loss registry).

    ``trainer`` is ``dpo``, ``cpo``, ``kto`` or ``orpo`` (``DPOTrainer`` and ``DPOConfig`` work too);
    ``config`` holds the config's fields (a dict, or ``vars(DPOConfig(...))``): fields it leaves
    out take TRL's defaults (:data:`TRL_DEFAULTS`), and fields that do not change the per-pair
    formula are ignored. Returns the loss name (a weighted combination for a list of DPO loss
    types) and the values to pass as ``values=`` wherever gradlab takes hyperparameters, with
    TRL's ``beta`` among them. TRL's batch means are left out, as everywhere in gradlab: KTO
    averages its two examples (half of gradlab's sum) and the SFT and CPO NLL terms are token
    means over the batch (for one pair, gradlab's ``-lp_w/|y_w|``).

    >>> resolve_config("dpo", {"loss_type": "robust"})
    ('robust', {'beta': 0.1, 'label_smoothing': 0.0})

    A configuration with no gradlab loss (``use_weighting=True``, ``f_divergence_type`` with
    ``bco_pair``, ``alpha != 0`` with CPO's ``hinge``, a batch-level ``aot``) raises
    :class:`~gradlab.errors.UnknownLossError` saying so.
    """
    trainer = _trainer(trainer)
    defaults = TRL_DEFAULTS[trainer]
    if config is not None and not isinstance(config, Mapping):
        raise UnknownLossError(f"a TRL config is a mapping of field names to values, not {type(config).__name__}")
    cfg = {**defaults, **{k: v for k, v in (config or {}).items() if k in defaults}}
    if trainer == "cpo" and cfg["loss_type"] == "alphapo":  # CPOConfig.__post_init__'s shorthand
        cfg.update(loss_type="simpo", cpo_alpha=0.0)
    if cfg.get("f_divergence_type") == "alpha_divergence" and abs(cfg["f_alpha_divergence_coef"] - 1) < 1e-6:
        cfg["f_divergence_type"] = "reverse_kl"  # DPOTrainer's own fallback: the alpha -> 1 limit is reverse KL
    if cfg.get("use_weighting"):
        raise UnknownLossError("DPOConfig(use_weighting=True) (WPO) weights each pair by its policy probabilities; "
                               "gradlab has no loss for it")
    loss_type = cfg.get("loss_type", "")  # ORPOConfig has none
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = cfg.get("loss_weights") or [1.0] * len(types)
    if len(weights) != len(types):
        raise UnknownLossError(f"loss_weights has {len(weights)} weights for {len(types)} loss types")
    parts = [_one(trainer, t, cfg) for t in types]
    name = (parts[0][0].loss if len(parts) == 1 and weights[0] == 1 else
            ",".join(f"{row.loss}:{float(w)!r}" for (row, _), w in zip(parts, weights, strict=True)))
    return name, {k: v for _, values in parts for k, v in values.items()}


def trl_defaults(loss: str) -> dict[str, tuple[str, Any]]:
    """TRL 1.x's defaults for the hyperparameters of a gradlab loss that a TRL config sets.

    Reads the first 1.x row that computes ``loss``: gradlab hyperparameter -> (the TRL config
    field, written ``DPOConfig.label_smoothing``, and TRL's default). Empty for a loss no 1.x
    row computes, and fields whose TRL default is None (off) are left out.
    """
    for row in TRL_CONFIGS:
        if row.loss != loss or "1.x" not in row.versions:
            continue
        config = TRAINERS[row.trainer].split(" / ")[1]
        field_of = {ph: name for name, ph in row.config.items() if ph in _placeholders(row)}
        fields = {"beta": "beta", **{name: field_of[ph] for name, ph in row.values.items()}}
        return {name: (f"{config}.{f}", TRL_DEFAULTS[row.trainer][f]) for name, f in fields.items()
                if TRL_DEFAULTS[row.trainer].get(f) is not None}
    return {}
