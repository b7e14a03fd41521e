"""TRL's loss configurations and the gradlab losses that reproduce them.

Each row is one TRL trainer configuration: the trainer, its ``loss_type``, the config fields
that change the formula, and the gradlab loss (a name or a weighted combination) with the
hyperparameter values that give the same per-pair loss. The rows are data only: name
resolution (:func:`gradlab.losses.get_loss`, which accepts ``trainer.loss_type``) and the
generated table ``docs/trl.md`` both read them, and a test derives every row.

Audited against huggingface/trl at v1.9.0-26-gf2cd5771 (``trl/trainer/dpo_trainer.py``,
``trl/trainer/kto_trainer.py``, ``trl/experimental/cpo/cpo_trainer.py``,
``trl/experimental/orpo/orpo_trainer.py``) and v0.16.0 (commit 23a635ed, the 0.x names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from collections.abc import Mapping

__all__ = ["TrlConfig", "TRL_CONFIGS", "TRAINERS", "BATCH_LEVEL"]


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


_ROWS: tuple[TrlConfig, ...] = (
    # DPOTrainer: loss_type with f_divergence_type="reverse_kl" (the default)
    _c("dpo", "sigmoid", "dpo", note="`label_smoothing > 0` in 0.x: `cdpo`"),
    _c("dpo", "sigmoid", "cdpo", {"label_smoothing": "eps > 0"}, {"label_smoothing": "eps"}, versions="0.x",
       note="1.x ignores label_smoothing for sigmoid"),
    _c("dpo", "hinge", "hinge"),
    _c("dpo", "ipo", "ipo_trl", note="TRL averages over tokens; the paper's summed form is `ipo`"),
    _c("dpo", "exo_pair", "exo_pair", {"label_smoothing": "eps"}, {"label_smoothing": "eps"}),
    _c("dpo", "nca_pair", "nca_pair"),
    _c("dpo", "robust", "robust", {"label_smoothing": "eps"}, {"label_smoothing": "eps"}),
    _c("dpo", "bco_pair", "bco_pair", versions="1.x", note="0.x shifts by a running reward mean: `bco_delta`"),
    _c("dpo", "sppo_hard", "sppo_hard"),
    _c("dpo", "apo_zero", "apo_zero"),
    _c("dpo", "apo_down", "apo_down"),
    _c("dpo", "discopop", "discopop", {"discopop_tau": "tau"}, {"discopop_tau": "tau"}),
    _c("dpo", "sft", "sft", versions="1.x"),
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
       {"label_smoothing": "eps", "cpo_alpha": "c"}),
    _c("cpo", "hinge", "cpo_hinge", {"cpo_alpha": "c"}, {"cpo_alpha": "c"}),
    _c("cpo", "ipo", "cpo_ipo", {"cpo_alpha": "c"}, {"cpo_alpha": "c"}),
    _c("cpo", "simpo", "simpo_trl", {"simpo_gamma": "g", "label_smoothing": "eps", "cpo_alpha": "c"},
       {"simpo_gamma": "g", "label_smoothing": "eps", "cpo_alpha": "c"}, note="`cpo_alpha=0` gives `simpo` "
       "(with TRL's beta and gamma)"),
    _c("cpo", "alphapo", "alphapo", {"alpha": "a", "simpo_gamma": "g"}, {"alpha": "a", "simpo_gamma": "g"},
       versions="1.x", note="TRL sets loss_type='simpo' and cpo_alpha=0; `alpha != 0` with other loss types "
       "has no gradlab loss"),
    # KTOTrainer
    _c("kto", "kto", "kto", {"desirable_weight": "wd", "undesirable_weight": "wu"},
       {"desirable_weight": "wd", "undesirable_weight": "wu"}, note="z0 (TRL's batch KL estimate) is `kto_z0`"),
    _c("kto", "apo_zero_unpaired", "apo_zero_unpaired", {"desirable_weight": "wd", "undesirable_weight": "wu"},
       {"desirable_weight": "wd", "undesirable_weight": "wu"}),
    # ORPOTrainer (no loss_type)
    _c("orpo", "", "orpo", {"beta": "lambda"}, {"beta": "lambda"}),
)

TRL_CONFIGS: tuple[TrlConfig, ...] = _ROWS
