"""TRL as an oracle: TRL's own loss code, run on stand-in objects, against gradlab's closed forms.

For every DPO, CPO and KTO ``loss_type`` of TRL (1.16.0 or newer), TRL's trainer method that
computes the loss (``DPOTrainer._compute_loss``, ``CPOTrainer.get_batch_loss_metrics``,
``KTOTrainer._compute_loss``) runs on an object of the trainer's class that carries only what
that method reads: the real config object (``DPOConfig(...)``), the attributes ``__init__``
copies from it, and a stand-in language model that returns fixed per-token log-probabilities
(no weights, no tokenizer, no data set). The per-token log-probabilities are built from torch
leaves in float64, so autograd gives TRL's gradient with respect to the chosen and rejected
log-probs. gradlab's side is :func:`gradlab.losses.from_trl_config` (the TRL config to a gradlab loss
and its values) and :func:`gradlab.evaluate` (value and partials to 20 digits), never TRL.

Where TRL's own arithmetic is not accurate, the test says so and compares where it is:
- TRL's float64 ``sigmoid(x)`` (``apo_zero``, ``apo_down``, ``exo_pair``, KTO) carries
  ``1 - sigmoid(x)`` and its derivative ``sigmoid(x)(1 - sigmoid(x))`` as a difference of numbers
  near 1: their relative error is ~2^-53 e^x, which passes the 1e-9 tolerance at x = 16 (and is
  1e-7 at x = 20): points with such an x are left out, saying so
  (``test_trl_sigmoid_saturates`` shows the loss of digits);
- TRL builds EXO's epsilon as a float32 tensor, so log(epsilon) carries float32 rounding:
  EXO is compared at float32 tolerance;
- TRL's alpha-divergence computes exp in float32 (and has no float64 path: it looks the clamp
  up by dtype), clamping the exponent at 80: it runs in float32, where (alpha-1) r <= 80.

TRL's side runs in a process of its own (the ``apart`` fixture; one process for this module's and
``test_trl_grpo``'s cases, which share its import of TRL), once for every case, and hands
back plain numbers: no test process holds torch and TRL beside JAX.

Skipped locally when TRL is missing, with the reason; with ``CI`` set a missing TRL fails, so
a CI run can never pass by skipping (``.ci/run`` installs the ``trl`` extra through tasks.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import warnings
from collections import defaultdict
from contextlib import nullcontext

import pytest
from helpers import trl_sides, unavailable

import gradlab
from gradlab.losses import from_trl_config
from gradlab.trl import BATCH_LEVEL, TRL_DEFAULTS

# TRL's answers come from one process of TRL's own (tens of seconds), shared by test_trl_oracle and
# test_trl_grpo: one group, run first by one worker (conftest)
pytestmark = pytest.mark.long(seconds=13, group="trl")


MIN_TRL = (1, 16)

# Relative tolerances, float64 TRL against 20-digit gradlab: TRL's own rounding (sums of per-token
# log-probs, the margin's cancellation) is ~1e-13 relative; float32 paths (EXO's epsilon, the
# alpha-divergence) ~1e-7, with cancellation in exp(t) - 1. Every nonzero partial is compared
# relatively, however small; a partial gradlab finds exactly zero (a variable the loss does not
# read) is compared against the point's largest partial.
RTOL = {"float64": 1e-9, "float32": 2e-5}
# TRL's 1 - sigmoid(x), and torch's derivative sigmoid(x)(1 - sigmoid(x)), come from a float64
# sigmoid(x) near 1: their relative error is ~2^-53 e^x, past RTOL beyond x = ln(RTOL / 2^-53) = 16.
SATURATES = math.log(RTOL["float64"] / 2.0**-53)


def _unavailable(reason: str):
    unavailable("TRL oracle tests", reason, "pip install -e '.[trl]'; CI installs it")


def _import_trl():
    """TRL's classes (in the separate process: importing TRL takes seconds), or why not."""
    try:
        import torch
        import trl
        from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
        from trl.trainer.utils import FusedCausalLMOutput

        with warnings.catch_warnings():  # "APIs here are unstable": CPO lives in trl.experimental
            warnings.simplefilter("ignore")
            from trl.experimental.cpo import CPOConfig, CPOTrainer
    except ImportError as exc:
        return f"TRL is not installed ({exc})"
    version = tuple(int(p) for p in re.findall(r"\d+", trl.__version__)[:2])
    if version < MIN_TRL:
        return f"TRL {trl.__version__} is older than {'.'.join(map(str, MIN_TRL))}"
    return types.SimpleNamespace(
        torch=torch, version=trl.__version__, Output=FusedCausalLMOutput,
        config={"dpo": DPOConfig, "cpo": CPOConfig, "kto": KTOConfig},
        trainer={"dpo": DPOTrainer, "cpo": CPOTrainer, "kto": KTOTrainer},
    )

# --------------------------------------------------------------------------------------------
# The cases: TRL configurations and points
# --------------------------------------------------------------------------------------------

# (trainer, config fields, note). Every TRL loss_type appears (test_every_trl_loss_type_is_covered).
CASES = [
    ("dpo", {"loss_type": "sigmoid"}),
    ("dpo", {"loss_type": "sigmoid", "beta": 0.5}),
    ("dpo", {"loss_type": "hinge"}),
    ("dpo", {"loss_type": "ipo"}),
    ("dpo", {"loss_type": "exo_pair", "label_smoothing": 1e-3}),
    ("dpo", {"loss_type": "exo_pair", "label_smoothing": 0.2, "beta": 0.3}),
    ("dpo", {"loss_type": "nca_pair"}),
    ("dpo", {"loss_type": "robust"}),  # TRL's default label_smoothing 0: plain DPO
    ("dpo", {"loss_type": "robust", "label_smoothing": 0.1}),
    ("dpo", {"loss_type": "robust", "label_smoothing": 0.3}),
    ("dpo", {"loss_type": "bco_pair"}),
    ("dpo", {"loss_type": "sppo_hard"}),
    ("dpo", {"loss_type": "apo_zero"}),
    ("dpo", {"loss_type": "apo_down"}),
    ("dpo", {"loss_type": "discopop"}),
    ("dpo", {"loss_type": "discopop", "discopop_tau": 0.3}),
    ("dpo", {"loss_type": "sft"}),
    ("dpo", {"loss_type": "sigmoid_norm"}),
    ("dpo", {"loss_type": "sigmoid", "f_divergence_type": "forward_kl"}),
    ("dpo", {"loss_type": "sigmoid", "f_divergence_type": "js_divergence"}),
    ("dpo", {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    ("dpo", {"loss_type": "sigmoid", "ld_alpha": 0.5}),
    ("dpo", {"loss_type": "sigmoid", "ld_alpha": 0.0}),
    ("dpo", {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}),  # MPO
    ("cpo", {"loss_type": "sigmoid"}),
    ("cpo", {"loss_type": "sigmoid", "label_smoothing": 0.1, "cpo_alpha": 0.5}),
    ("cpo", {"loss_type": "hinge"}),
    ("cpo", {"loss_type": "ipo"}),
    ("cpo", {"loss_type": "simpo"}),
    ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0, "label_smoothing": 0.1, "simpo_gamma": 1.0, "beta": 2.0}),
    ("cpo", {"loss_type": "simpo", "alpha": 0.25}),
    ("cpo", {"loss_type": "alphapo", "alpha": 0.25}),
    ("cpo", {"loss_type": "alphapo"}),  # TRL's default alpha 0: SimPO without the NLL
    ("kto", {"loss_type": "kto"}),  # the KL estimate comes out negative: TRL clamps it to z0 = 0
    ("kto", {"loss_type": "kto", "desirable_weight": 1.5, "undesirable_weight": 0.5, "kl": 0.7}),
    ("kto", {"loss_type": "apo_zero_unpaired"}),
    ("kto", {"loss_type": "apo_zero_unpaired", "desirable_weight": 0.5, "undesirable_weight": 2.0}),
]

# Points: near the reference (|lp - ref| <= 1) and far from it (|lp - ref| from 70 to 170, so that
# beta*h reaches 25 at beta 0.1). tail is the log-prob past the shorter response (0 for it).
POINTS = {
    "at_reference": dict(lp_w=-5.0, lp_l=-5.0, ref_w=-5.0, ref_l=-5.0, len_w=4, len_l=4),
    "near": dict(lp_w=-12.0, lp_l=-15.0, ref_w=-12.5, ref_l=-14.2, len_w=8, len_l=11,
                 tail_l=-4.0, ref_tail_l=-3.1),
    "near_losing": dict(lp_w=-30.0, lp_l=-22.0, ref_w=-29.3, ref_l=-22.6, len_w=20, len_l=12,
                        tail_w=-13.0, ref_tail_w=-11.5),
    "far_winning": dict(lp_w=-40.0, lp_l=-260.0, ref_w=-120.0, ref_l=-90.0, len_w=30, len_l=60,
                        tail_l=-150.0, ref_tail_l=-40.0),
    "far_parallel": dict(lp_w=-240.0, lp_l=-222.0, ref_w=-140.0, ref_l=-110.0, len_w=40, len_l=35,
                         tail_w=-30.0, ref_tail_w=-12.0),  # both log-ratios far below 0, a moderate margin
    "far_losing": dict(lp_w=-300.0, lp_l=-80.0, ref_w=-150.0, ref_l=-150.0, len_w=50, len_l=25,
                       tail_w=-170.0, ref_tail_w=-70.0),
}
for _p in POINTS.values():
    for _k in ("tail_w", "tail_l", "ref_tail_w", "ref_tail_l"):
        _p.setdefault(_k, 0.0)
PROMPT = 2  # prompt tokens before each completion


def _case_id(case) -> str:
    trainer, config = case
    return f"{trainer}-" + "-".join(f"{k}={v}" for k, v in config.items() if k != "loss_weights").replace(" ", "")


def _gradlab(trainer: str, config: dict, point: dict) -> tuple[gradlab.Loss, dict, dict]:
    """gradlab's loss, values and evaluate() output for a TRL configuration at a point."""
    fields = {k: v for k, v in config.items() if k != "kl"}
    name, values = from_trl_config(trainer, fields)
    loss = gradlab.get_loss(name)
    if "kto_z0" in loss.hyperparameters:  # TRL's batch KL estimate, clamped at 0, is kto_z0
        values["kto_z0"] = max(config.get("kl", -0.4), 0.0)
    at = {v: point[v] for v in loss.variables}
    with gradlab.budgets.raised(exp_argument=1e80):  # forward KL's pi_0/pi is e^170 at the far points
        return loss, values, gradlab.evaluate(loss, at, values)


def _float32(trainer: str, config: dict) -> str | None:
    """Why TRL computes this configuration in float32, or None."""
    if config.get("loss_type") == "exo_pair":
        return "TRL builds EXO's epsilon with torch.tensor(label_smoothing): float32 log(epsilon)"
    if config.get("f_divergence_type") == "alpha_divergence":
        return "TRL's alpha-divergence computes exp in float32 (no float64 path)"
    return None


def _ill_conditioned(trainer: str, config: dict, point: dict) -> str | None:
    """Why TRL's own arithmetic is not accurate at this point, or None."""
    beta = config.get("beta", TRL_DEFAULTS[trainer]["beta"])
    rw, rl = point["lp_w"] - point["ref_w"], point["lp_l"] - point["ref_l"]
    z0 = max(config.get("kl", -0.4), 0.0)
    sigmoid_args = {  # the x of every sigmoid(x) TRL computes (not logsigmoid)
        "apo_zero": [beta * rw, beta * rl], "apo_down": [beta * rw, beta * (rw - rl)],
        "exo_pair": [beta * (rw - rl), beta * (rl - rw)],
        "kto": [beta * (rw - z0), beta * (z0 - rl)], "apo_zero_unpaired": [beta * rw, beta * rl],
    }.get(str(config.get("loss_type")), [])
    worst = max(sigmoid_args, default=-math.inf)
    if worst > SATURATES:
        return (f"TRL's float64 sigmoid({worst:.1f}) saturates: 1 - sigmoid and its derivative keep fewer digits "
                f"than the tolerance past x = {SATURATES:.1f}")
    if config.get("f_divergence_type") == "alpha_divergence":
        t = (config["f_alpha_divergence_coef"] - 1) * min(rw, rl)
        if t > 80:
            return f"TRL clamps the alpha-divergence exponent (alpha-1)*r = {t:.0f} at 80 (float32 exp range)"
    return None


# --------------------------------------------------------------------------------------------
# Stand-ins: the trainer without its model, and a model without weights
# --------------------------------------------------------------------------------------------


class _Accelerator:
    """One process on the CPU: gathering is the identity."""

    def __init__(self, torch):
        self.device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def autocast(self):
        return nullcontext()


class _FusedLM:
    """A causal LM with TRL's fused LM head (``model(..., labels=, fused_lm_head=True)``) that
    returns fixed per-token log-probs: one (rows, T-1) tensor per input_ids, zero where the
    label is -100, as TRL's head returns them."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, T, table):
        self.T, self.table = T, table  # [(input_ids, per-token log-probs)]

    def __call__(self, input_ids=None, labels=None, fused_lm_head=False, **kwargs):
        assert fused_lm_head, "TRL 1.16's trainers ask for the fused head"
        same = (lp for ids, lp in self.table if ids.shape == input_ids.shape and bool((ids == input_ids).all()))
        per_token = next(same)
        mask = labels[:, 1:] != -100
        log_probs = per_token.masked_fill(~mask, 0.0)
        zeros = self.T.torch.zeros_like(log_probs)
        return self.T.Output(loss=-log_probs.sum() / mask.sum(), log_probs=log_probs, entropy=zeros,
                             log_sum_sq_probs=zeros, mean_logits=zeros, is_top1=mask & False, label_mask=mask)


class _LogitsLM:
    """A causal LM that returns logits (CPOTrainer's path): over a two-token vocabulary, the logits
    [t, log(1 - e^t)] give the label token 0 the log-prob t exactly (their logsumexp is 0)."""

    training = True

    def __init__(self, T, per_token):
        self.T, self.per_token = T, per_token  # (rows, T-1): the log-prob of token j+1

    def __call__(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        torch = self.T.torch
        t = torch.cat([self.per_token, torch.full_like(self.per_token[:, :1], -1.0)], dim=1)
        logits = torch.stack([t, torch.log(-torch.expm1(t))], dim=-1)
        return types.SimpleNamespace(logits=logits)


def _config(T, trainer: str, config: dict):
    """TRL's own config object (its __post_init__ runs: DPO's loss_type list, CPO's alphapo)."""
    fields = {k: v for k, v in config.items() if k != "kl"}
    with warnings.catch_warnings():  # transformers' TrainingArguments deprecations
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return T.config[trainer](output_dir="unused", report_to=[], bf16=False, use_cpu=True, **fields)


def _stand_in(T, trainer: str, args, **attrs):
    """An instance of TRL's trainer class with only what its loss method reads, set as its
    __init__ sets it from ``args``: no model, optimiser, tokenizer or data set."""
    obj = object.__new__(T.trainer[trainer])
    obj.__dict__.update(args=args, accelerator=_Accelerator(T.torch), aux_loss_enabled=False, beta=args.beta,
                        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                        _total_train_tokens=0, _tp_size=1, **attrs)
    return obj


def _leaf(T, value: float, dtype):
    return T.torch.tensor(value, dtype=dtype, requires_grad=True)


def _row(T, shared, tail, n_shared: int, n: int, width: int, dtype):
    """One row of per-token log-probs (width = T-1 positions): the completion's first n_shared
    tokens share ``shared``, the rest share ``tail``; prompt and padding positions are 0."""
    torch = T.torch
    row = [torch.zeros((), dtype=dtype)] * (PROMPT - 1)
    row += [shared / n_shared] * n_shared + ([tail / (n - n_shared)] * (n - n_shared) if n > n_shared else [])
    row += [torch.zeros((), dtype=dtype)] * (width - len(row))
    return torch.stack(row)


def _masks(T, lengths, width: int):
    """input_ids, attention_mask and completion_mask for completions of these lengths."""
    torch = T.torch
    completion = torch.zeros((len(lengths), width), dtype=torch.long)
    attention = torch.zeros_like(completion)
    for i, n in enumerate(lengths):
        completion[i, PROMPT:PROMPT + n] = 1
        attention[i, :PROMPT + n] = 1
    return attention, completion


def _run_dpo(T, config: dict, point: dict, dtype):
    torch = T.torch
    args = _config(T, "dpo", config)
    n_w, n_l = int(point["len_w"]), int(point["len_l"])
    m, width = min(n_w, n_l), PROMPT + max(n_w, n_l)
    leaves = {k: _leaf(T, point[k] - point[t], dtype) for k, t in (("lp_w", "tail_w"), ("lp_l", "tail_l"))}
    tails = {k: _leaf(T, point[k], dtype) for k in ("tail_w", "tail_l")}
    policy = torch.stack([_row(T, leaves["lp_w"], tails["tail_w"], m, n_w, width - 1, dtype),
                          _row(T, leaves["lp_l"], tails["tail_l"], m, n_l, width - 1, dtype)])
    ref = torch.stack([
        _row(T, torch.tensor(point["ref_w"] - point["ref_tail_w"], dtype=dtype),
             torch.tensor(point["ref_tail_w"], dtype=dtype), m, n_w, width - 1, dtype),
        _row(T, torch.tensor(point["ref_l"] - point["ref_tail_l"], dtype=dtype),
             torch.tensor(point["ref_tail_l"], dtype=dtype), m, n_l, width - 1, dtype)])
    attention, completion = _masks(T, [n_w, n_l], width)
    ids = torch.ones_like(completion)
    model, ref_model = _FusedLM(T, [(ids, policy)]), _FusedLM(T, [(ids, ref)])
    trainer = _stand_in(
        T, "dpo", args, model=model, ref_model=ref_model, precompute_ref_logps=False,
        loss_types=args.loss_type, loss_weights=args.loss_weights or [1.0] * len(args.loss_type),
        ld_alpha=args.ld_alpha, f_divergence_type=args.f_divergence_type,
        f_alpha_divergence_coef=args.f_alpha_divergence_coef, label_smoothing=args.label_smoothing,
        use_weighting=args.use_weighting)
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    loss = T.trainer["dpo"]._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, leaves, tails


def _run_cpo(T, config: dict, points: list[dict], dtype):
    """CPOTrainer on a batch of pairs; the leaves are each pair's lp_w and lp_l."""
    torch = T.torch
    args = _config(T, "cpo", config)
    width = PROMPT + int(max(max(p["len_w"], p["len_l"]) for p in points))
    leaves, rows, batch = [], {"chosen": [], "rejected": []}, {}
    for p in points:
        lw, ll = _leaf(T, p["lp_w"], dtype), _leaf(T, p["lp_l"], dtype)
        leaves.append((lw, ll))
        rows["chosen"].append(_row(T, lw, None, int(p["len_w"]), int(p["len_w"]), width - 1, dtype))
        rows["rejected"].append(_row(T, ll, None, int(p["len_l"]), int(p["len_l"]), width - 1, dtype))
    for side, key in (("chosen", "len_w"), ("rejected", "len_l")):
        attention, completion = _masks(T, [int(p[key]) for p in points], width)
        batch[f"{side}_input_ids"] = torch.zeros_like(completion)
        batch[f"{side}_attention_mask"] = attention
        batch[f"{side}_labels"] = torch.zeros_like(completion).masked_fill(completion == 0, -100)
    per_token = torch.cat([torch.stack(rows["chosen"]), torch.stack(rows["rejected"])])
    trainer = _stand_in(
        T, "cpo", args, label_smoothing=args.label_smoothing, loss_type=args.loss_type, cpo_alpha=args.cpo_alpha,
        simpo_gamma=args.simpo_gamma, alpha=args.alpha, is_encoder_decoder=False, pad_token_id=0)
    loss, _ = T.trainer["cpo"].get_batch_loss_metrics(trainer, _LogitsLM(T, per_token), batch)
    return loss, leaves


def _run_kto(T, config: dict, point: dict, dtype):
    torch = T.torch
    args = _config(T, "kto", config)
    n_w, n_l = int(point["len_w"]), int(point["len_l"])
    width = PROMPT + max(n_w, n_l)
    leaves = {k: _leaf(T, point[k], dtype) for k in ("lp_w", "lp_l")}

    def rows(w, l):
        return torch.stack([_row(T, w, None, n_w, n_w, width - 1, dtype), _row(T, l, None, n_l, n_l, width - 1, dtype)])

    attention, completion = _masks(T, [n_w, n_l], width)
    ids, kl_ids = torch.ones_like(completion), 2 * torch.ones_like(completion)
    # the mismatched completions' log-ratios average to config["kl"] (TRL's z0 before its clamp)
    kl = config.get("kl", -0.4)
    t = lambda x: torch.tensor(x, dtype=dtype)  # noqa: E731
    policy = _FusedLM(T, [(ids, rows(leaves["lp_w"], leaves["lp_l"])),
                          (kl_ids, rows(t(-9.0 + kl + 0.3), t(-11.0 + kl - 0.3)))])
    ref = _FusedLM(T, [(ids, rows(t(point["ref_w"]), t(point["ref_l"]))), (kl_ids, rows(t(-9.0), t(-11.0)))])
    trainer = _stand_in(
        T, "kto", args, model=policy, ref_model=ref, precompute_ref_logps=False, loss_type=args.loss_type,
        desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
        calculate_KL=args.loss_type != "apo_zero_unpaired")
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
              "label": torch.tensor([True, False]), "KL_input_ids": kl_ids, "KL_attention_mask": attention,
              "KL_completion_mask": completion}
    loss = T.trainer["kto"]._compute_loss(trainer, policy, inputs, return_outputs=False)
    return loss, leaves


def _trl(T, trainer: str, config: dict, point: dict, dtype) -> dict[str, float]:
    """TRL's per-pair loss and its partials in gradlab's variables (KTO's mean of two examples
    is doubled to gradlab's sum)."""
    if trainer == "dpo":
        loss, leaves, tails = _run_dpo(T, config, point, dtype)
    elif trainer == "cpo":
        loss, (pair,) = _run_cpo(T, config, [point], dtype)
        leaves, tails = {"lp_w": pair[0], "lp_l": pair[1]}, {}
    else:
        loss, leaves = _run_kto(T, config, point, dtype)
        loss, tails = 2 * loss, {}
    loss.backward()
    out = {"loss": loss.item()}
    for k, leaf in leaves.items():
        out[k] = 0.0 if leaf.grad is None else leaf.grad.item()
    for k, leaf in tails.items():  # d/dtail at fixed lp = d/d(tail leaf) - d/d(shared leaf)
        if leaf.grad is not None:
            out[k] = leaf.grad.item() - out["lp_" + k[-1]]
    return out


def _close(got: float, want: float, precision: str, scale: float = 0.0) -> bool:
    """``got`` within the relative tolerance of ``want``; ``scale`` for a ``want`` of zero."""
    return abs(got - want) <= RTOL[precision] * (abs(want) if want else scale)


# --------------------------------------------------------------------------------------------
# TRL's side, in its own process: the jobs in, plain numbers out
# --------------------------------------------------------------------------------------------


def _pair_job(trainer: str, config: dict, point: dict, precision: str) -> dict:
    return {"kind": "pair", "trainer": trainer, "config": config, "point": point, "precision": precision}


def _cpo_batch_job(config: dict, points: list[dict]) -> dict:
    return {"kind": "cpo_batch", "config": config, "points": points}


def _key(job: dict) -> str:
    return json.dumps(job, sort_keys=True)


def trl_side(jobs: list[dict]) -> dict:
    """Run in a separate process by the ``trl`` fixture: TRL's version, its config defaults for
    the fields gradlab.trl names, the loss types its configs offer, and each job's loss and
    partials (``_trl``'s, or a CPO batch's loss and its chosen leaves' gradients)."""
    T = _import_trl()
    if isinstance(T, str):
        return {"unavailable": T}
    T.torch.set_num_threads(1)  # scalars and tiny tensors: threads only contend for the cores
    defaults = {}
    for trainer, names in TRL_DEFAULTS.items():
        if trainer == "orpo":
            continue  # ORPO is read from the source, not run here
        fields = {f.name: f for f in dataclasses.fields(T.config[trainer])}
        defaults[trainer] = {name: fields[name].default_factory() if fields[name].default is dataclasses.MISSING
                             else fields[name].default for name in names}
    answers = {}
    for job in jobs:
        if job["kind"] == "pair":
            dtype = getattr(T.torch, job["precision"])
            answers[_key(job)] = _trl(T, job["trainer"], job["config"], job["point"], dtype)
        else:
            loss, leaves = _run_cpo(T, job["config"], job["points"], T.torch.float64)
            loss.backward()
            answers[_key(job)] = {"loss": loss.item(), "lp_w": [lw.grad.item() for lw, _ in leaves]}
    return {"version": T.version, "defaults": defaults, "answers": answers,
            "loss_types": {trainer: sorted(_trl_loss_types(T, trainer)) for trainer in T.config}}


def _trl_loss_types(T, trainer: str) -> set[str]:
    field = {f.name: f for f in dataclasses.fields(T.config[trainer])}["loss_type"]
    if "choices" in field.metadata:
        return set(field.metadata["choices"])
    return set(re.findall(r"`'([a-z_]+)'`", field.metadata["help"]))


# the points of test_trl_sigmoid_saturates (beta * r_w = 15 and 30) and the CPO batch of two pairs
SATURATION = {"inside": dict(POINTS["near"], ref_w=-400.0, lp_w=-250.0),
              "outside": dict(POINTS["near"], ref_w=-400.0, lp_w=-100.0)}
CPO_BATCH = ({"loss_type": "sigmoid", "cpo_alpha": 1.0}, [POINTS["near"], POINTS["far_winning"]])


def trl_jobs() -> list[dict]:
    """Every job the tests below ask TRL."""
    jobs = [_pair_job(trainer, config, point, "float32" if _float32(trainer, config) else "float64")
            for trainer, config in CASES for point in POINTS.values()
            if _ill_conditioned(trainer, config, point) is None]
    jobs += [_pair_job("dpo", {"loss_type": "apo_zero"}, p, "float64") for p in SATURATION.values()]
    jobs += [_pair_job("dpo", {"loss_type": "robust"}, POINTS["near"], "float64"), _cpo_batch_job(*CPO_BATCH)]
    return jobs


@pytest.fixture(scope="module")
def trl(apart):
    """TRL's answers to every job below, computed once in a process of TRL's own (shared with
    tests/test_trl_grpo.py's)."""
    out, _ = trl_sides(apart)
    if "unavailable" in out:
        _unavailable(out["unavailable"])
    answers = out.pop("answers")
    return types.SimpleNamespace(**out, answer=lambda job: answers[_key(job)])


def _got(trl, trainer: str, config: dict, point: dict, precision: str = "float64") -> dict[str, float]:
    return trl.answer(_pair_job(trainer, config, point, precision))


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_trl_defaults_are_trl_s(trl):
    """gradlab.trl's TRL_DEFAULTS, which from_trl_config and `show` rely on, are the config classes'."""
    for trainer, defaults in TRL_DEFAULTS.items():
        if trainer == "orpo":
            continue  # ORPO is read from the source, not run here
        for name, value in defaults.items():
            theirs = trl.defaults[trainer][name]
            want = list(value) if isinstance(value, tuple) else value
            assert theirs == want, (
                f"{trainer}.{name}: TRL {trl.version} defaults to {theirs!r}, gradlab.trl says {value!r}")


@pytest.mark.parametrize("trainer", ["dpo", "cpo", "kto"])
def test_every_trl_loss_type_is_covered(trl, trainer):
    """Each loss_type TRL's config offers is run below, or is batch-level (no per-pair form)."""
    offered = set(trl.loss_types[trainer])
    assert len(offered) >= 2, f"could not read {trainer}'s loss types from TRL {trl.version}"
    run = {t for tr, c in CASES if tr == trainer for t in ([c["loss_type"]] if isinstance(c["loss_type"], str)
                                                          else c["loss_type"])}
    missing = offered - run - BATCH_LEVEL
    assert not missing, f"TRL {trl.version} offers {trainer} loss types the oracle does not run: {sorted(missing)}"
    for loss_type in offered & BATCH_LEVEL:
        with pytest.raises(gradlab.UnknownLossError, match="batch-level"):
            from_trl_config(trainer, {"loss_type": loss_type})


def test_every_1x_row_is_run():
    """Every DPO, CPO and KTO row of gradlab.trl that TRL 1.x has is reached by some case."""
    from gradlab.trl import TRL_CONFIGS

    reached = {gradlab.get_loss(from_trl_config(tr, {k: v for k, v in c.items() if k != "kl"})[0]).name
               for tr, c in CASES}
    rows = {gradlab.get_loss(r.loss).name for r in TRL_CONFIGS
            if r.loss and r.trainer in ("dpo", "cpo", "kto") and "1.x" in r.versions}
    assert rows <= reached, f"rows no case runs: {sorted(rows - reached)}"


@pytest.mark.parametrize("point_name", list(POINTS))
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_trl_agrees_with_gradlab(trl, case, point_name):
    """TRL's value and partials (chosen and rejected log-probs; LD-DPO's tails) equal gradlab's."""
    trainer, config = case
    point = POINTS[point_name]
    reason = _ill_conditioned(trainer, config, point)
    if reason is not None:  # documented exclusion, not a failure: TRL's own number is not accurate here
        pytest.skip(reason)
    precision = "float32" if _float32(trainer, config) else "float64"
    got = _got(trl, trainer, config, point, precision)
    loss, values, want = _gradlab(trainer, config, point)
    assert {"loss", "lp_w", "lp_l"} <= set(got), got
    scale = max(abs(float(v)) for k, v in want.items() if k != "loss")
    for var in got:  # a variable the loss does not read (sft's lp_l, DPO's tails) has partial 0
        w = float(want.get(var, 0.0))
        assert _close(got[var], w, precision, scale), (
            f"{loss.name} {values} at {point_name}: {var} is {got[var]!r} in TRL {trl.version} ({precision}"
            f"{': ' + _float32(trainer, config) if precision == 'float32' else ''}), {w!r} in gradlab")


def test_trl_sigmoid_saturates(trl):
    """Why points with a TRL sigmoid argument past SATURATES are left out: there TRL's float64
    gradient is off by more than the tolerance, while a point inside the limit agrees."""
    config = {"loss_type": "apo_zero"}
    inside, outside = SATURATION["inside"], SATURATION["outside"]
    assert _ill_conditioned("dpo", config, inside) is None and _ill_conditioned("dpo", config, outside)
    for point, agrees in ((inside, True), (outside, False)):
        got = _got(trl, "dpo", config, point)
        _, _, want = _gradlab("dpo", config, point)
        assert _close(got["lp_w"], float(want["lp_w"]), "float64") is agrees, (got, want)


def test_cpo_nll_is_a_token_mean_over_the_batch(trl):
    """TRL's CPO NLL is sum(lp_w)/sum(|y_w|) over the batch, not the mean of the pairs' -lp_w/|y_w|:
    the documented difference, on two pairs of different lengths."""
    config, pairs = CPO_BATCH
    got = trl.answer(_cpo_batch_job(config, pairs))
    name, values = from_trl_config("cpo", config)
    pref = [gradlab.evaluate(name, {k: p[k] for k in ("lp_w", "lp_l", "len_w")}, {**values, "cpo_alpha": 0})
            for p in pairs]
    tokens = sum(p["len_w"] for p in pairs)
    batch_nll = -sum(p["lp_w"] for p in pairs) / tokens
    want = sum(float(e["loss"]) for e in pref) / len(pairs) + batch_nll
    assert _close(got["loss"], want, "float64")
    for grad, e in zip(got["lp_w"], pref, strict=True):  # each chosen token weighs 1/tokens
        assert _close(grad, float(e["lp_w"]) / len(pairs) - 1 / tokens, "float64")
    per_pair = sum(float(gradlab.evaluate(name, {k: p[k] for k in ("lp_w", "lp_l", "len_w")}, values)["loss"])
                   for p in pairs) / len(pairs)
    assert not _close(got["loss"], per_pair, "float64"), "the batch token mean should differ from the pair mean"


def test_robust_at_trl_default_is_dpo_and_gradlab_flags_its_own(trl):
    """TRL's robust with its default label_smoothing (0) is plain DPO; gradlab's robust keeps 0.1
    and says so (Loss.trl_default_differences, printed by `gradlab show`)."""
    point = POINTS["near"]
    got = _got(trl, "dpo", {"loss_type": "robust"}, point)
    at = {k: point[k] for k in ("lp_w", "lp_l", "ref_w", "ref_l")}
    dpo = gradlab.evaluate("dpo", at)
    assert all(_close(got[k], float(dpo[k]), "float64") for k in ("loss", "lp_w", "lp_l"))
    robust = gradlab.evaluate("robust", at)  # gradlab's default, 0.1
    assert not _close(got["loss"], float(robust["loss"]), "float64")
    assert gradlab.get_loss("robust").trl_default_differences == {
        "label_smoothing": ("DPOConfig.label_smoothing", 0.0, 0.1)}
