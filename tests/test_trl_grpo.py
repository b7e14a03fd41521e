"""TRL as the oracle of the group losses: TRL's own ``GRPOTrainer._compute_loss`` and
``RLOOTrainer._compute_loss``, called on stand-in tensors with torch autograd in float64.

Each trainer method runs unchanged on a stand-in ``self`` that carries the config fields it
reads and returns our per-token log-probs (a leaf tensor) from ``_get_per_token_logps_and_entropies``.
The gradient of TRL's loss with respect to each token's log-prob is minus gradlab's per-token
weight w_i, evaluated from the derived closed form at that token's A_i, |o_i|, sum_j |o_j|, G,
ratio and reference ratio; the loss value is the group sum of gradlab's per-token loss over its
normaliser. The advantages are checked against TRL's formula with TRL's own ``nanstd``.

TRL's side runs in a process of its own (the ``apart`` fixture; one process for this module's and
``test_trl_oracle``'s cases, which share its import of TRL), once for every case, and hands
back plain numbers: no test process holds torch and TRL beside JAX.

Without torch and TRL (the ``trl`` extra) these tests skip locally, and fail where ``CI`` is set,
so that a CI run never passes by skipping them.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import trl_sides, unavailable
import sympy

from gradlab import group_losses as gl


# TRL's answers come from one process of TRL's own (tens of seconds), shared by test_trl_oracle and
# test_trl_grpo: one group, run first by one worker (conftest)
pytestmark = pytest.mark.long(seconds=13, group="trl")


def _unavailable(reason: str):
    unavailable("TRL oracle tests", f"torch and trl are needed: {reason}", "pip install -e '.[trl]'; CI installs it")


torch = None  # set in TRL's own process by _import_trl


def _import_trl():
    """TRL's trainers (in the separate process), or why not."""
    global torch
    try:
        import torch
        from trl.trainer.grpo_trainer import GRPOTrainer
        from trl.trainer.rloo_trainer import RLOOTrainer
        from trl.trainer.utils import nanstd
    except ImportError as exc:
        return str(exc)
    torch.set_num_threads(1)  # tiny tensors: threads only contend for the cores
    return SimpleNamespace(GRPOTrainer=GRPOTrainer, RLOOTrainer=RLOOTrainer, nanstd=nanstd)


# the group: G responses of lengths 2..5 (content tokens plus EOS), padded to T = 5
G, T = 4, 5
LENGTHS = np.array([2, 5, 3, 4])
MASK = (np.arange(T)[None, :] < LENGTHS[:, None]).astype(float)
MAX_COMPLETION_LENGTH = 7


class _Accelerator:
    num_processes = 1

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _stand_in(trainer_cls, logps, **fields):
    """A ``self`` for TRL's ``_compute_loss``: the config fields it reads, and our log-probs."""
    stub = SimpleNamespace(
        accelerator=_Accelerator(), model=SimpleNamespace(training=True),
        _metrics=defaultdict(lambda: defaultdict(list)),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        max_completion_length=MAX_COMPLETION_LENGTH, get_gamma_weights=trainer_cls.__dict__.get("get_gamma_weights"),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
    )
    if stub.get_gamma_weights is not None:
        stub.get_gamma_weights = stub.get_gamma_weights.__func__
    for k, v in fields.items():
        setattr(stub, k, v)
    return stub


def _inputs(logps, old, ref, advantages):
    b = logps.shape[0]
    mask = torch.tensor(MASK)
    return {
        "prompt_ids": torch.zeros((b, 1), dtype=torch.long), "prompt_mask": torch.ones((b, 1), dtype=torch.long),
        "completion_ids": torch.ones((b, T), dtype=torch.long), "completion_mask": mask,
        "advantages": torch.tensor(advantages), "old_per_token_logps": torch.tensor(old),
        "ref_per_token_logps": torch.tensor(ref), "num_items_in_batch": mask.sum(),
        "old_logps": torch.tensor((old * MASK).sum(-1)),
    }


# --------------------------------------------------------------------------------------------
# gradlab's side: the derived weight and per-token loss, evaluated numerically
# --------------------------------------------------------------------------------------------


def _numeric(expr, values):
    e = expr.xreplace(values)
    names = sorted(e.free_symbols, key=lambda s: s.name)
    fn = sympy.lambdify(names, e, modules=[{"sigmoid": lambda x: 1 / (1 + np.exp(-x)),
                                            "Heaviside": lambda x, h0=0.5: np.heaviside(x, h0),
                                            "stop_gradient": lambda x: x}, "numpy"])
    return lambda **kw: float(fn(*(kw[s.name] for s in names)))


def _ratios(loss, log_ratio):
    """The ratio gradlab's rho stands for, per token: the token's, or the sequence's."""
    per_seq = (log_ratio * MASK).sum(-1)
    if loss.level == "sequence":
        return np.repeat(np.exp(per_seq / LENGTHS)[:, None], T, axis=1)
    if loss.level == "sequence_product":
        return np.repeat(np.exp(per_seq)[:, None], T, axis=1)
    return np.exp(log_ratio)


def _gradlab(loss, hyper, adv, log_ratio, log_kappa, old):
    """(weights (G, T), loss value) from gradlab's closed forms."""
    values = loss.values(hyper)
    w = _numeric(loss.expr, values)
    rho, kappa = _ratios(loss, log_ratio), np.exp(log_kappa)
    weights = np.zeros((G, T))
    for i in range(G):
        for t in range(LENGTHS[i]):
            point = {"A": adv[i], "len_i": LENGTHS[i], "len_sum": LENGTHS.sum(), "G": G, "rho": rho[i, t],
                     "kappa": kappa[i, t]}
            weights[i, t] = w(**{k: v for k, v in point.items() if k in _names(loss.expr)})
    value = None
    if "lp_old_token" not in _names(loss.loss_in_ratio) or loss.level == "token":
        ell = _numeric(loss.loss_in_ratio, values)
        norm = _numeric(loss.normaliser_expr, values)
        value = 0.0
        for i in range(G):
            n_i = norm(**{k: v for k, v in {"len_i": LENGTHS[i], "len_sum": LENGTHS.sum(), "G": G}.items()
                          if k in _names(loss.normaliser_expr)})
            for t in range(LENGTHS[i]):
                point = {"A": adv[i], "rho": rho[i, t], "kappa": kappa[i, t], "lp_old_token": old[i, t]}
                value += ell(**{k: v for k, v in point.items() if k in _names(loss.loss_in_ratio)}) / n_i
    return weights, value


def _names(expr):
    return {s.name for s in expr.free_symbols}


# --------------------------------------------------------------------------------------------
# The oracle runs
# --------------------------------------------------------------------------------------------

GRPO_TYPES = ["grpo", "bnpo", "dr_grpo", "dr_grpo_paper", "dapo", "cispo", "sapo", "gspo", "luspo", "vespo"]
SCALES = ["group", "batch", "none"]
# TRL's config for each gradlab loss: loss_type and importance_sampling_level
TRL_CONFIG = {"gspo": ("grpo", "sequence"), "luspo": ("luspo", "sequence"), "dr_grpo_paper": ("dr_grpo", "token")}


def _case(seed, clip):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.2, 3.0, (G, T))
    spread = 0.5 if clip else 0.05  # 0.5: many tokens fall outside [1 - epsilon, 1 + epsilon_high]
    log_ratio = rng.uniform(-spread, spread, (G, T)) * MASK
    log_kappa = rng.uniform(-0.3, 0.3, (G, T)) * MASK
    rewards = rng.integers(0, 2, (3, G)).astype(float)
    rewards[0] = [1.0, 0.0, 1.0, 0.0]  # the group that is trained on: never all equal
    return logps, log_ratio, log_kappa, rewards


# TRL's nanstd multiplies a float64 variance by count / (count - 1) computed from integer tensors,
# i.e. in float32: its std is off by up to ~3e-8 relative (4/3 in float32 is 1.33333337).
# gradlab's advantages are the exact float64 formula, so they agree with TRL's to this tolerance.
ADV_RTOL = 1e-7


def _advantages(trl, rewards, scale):
    """TRL's advantages (grpo_trainer.py, _generate_and_score_completions), for three groups."""
    r = torch.tensor(rewards.ravel())
    mean = r.view(-1, G).mean(dim=1).repeat_interleave(G)
    std = trl.nanstd(r.view(-1, G), dim=1).repeat_interleave(G) if scale != "batch" else trl.nanstd(r).expand_as(r)
    adv = r - mean
    return (adv if scale == "none" else adv / (std + 1e-4)).numpy()


def _hyper(name: str, beta: float) -> dict:
    """The hyperparameters of a GRPO run, as TRL's config sets them (those the loss has)."""
    hyper = {"epsilon": 0.2, "epsilon_high": 0.28 if name != "cispo" else 1.1, "beta": beta,
             "max_completion_length": MAX_COMPLETION_LENGTH}
    # TRL builds SAPO's temperatures with torch.where on Python floats: a float32 tensor, so its
    # 1.05 is float32(1.05); the loss value (a sum with much cancellation) sees the difference
    hyper |= {"sapo_temperature_pos": 1.0, "sapo_temperature_neg": float(np.float32(1.05))}
    return {k: v for k, v in hyper.items() if k in gl.GROUP_LOSSES[name].defaults}


def _trl_advantages(trl, scale: str) -> list:
    rewards = np.random.default_rng(3).normal(size=(3, G))
    if scale == "leave_one_out":  # rloo_trainer.py: (grouped_sum - grouped_rewards) / (count - 1)
        r = torch.tensor(rewards)
        return (r - (r.sum(1, keepdim=True) - r) / (G - 1)).numpy().tolist()
    return _advantages(trl, rewards, scale).reshape(3, G).tolist()


def _trl_grpo(trl, name: str, scale: str, seed: int, clip: bool, beta: float) -> dict:
    """TRL's advantages, and GRPOTrainer._compute_loss's value and gradient for the first group."""
    logps_np, log_ratio, log_kappa, rewards = _case(seed, clip)
    adv_all = _advantages(trl, rewards, scale)
    hyper = _hyper(name, beta)
    loss_type, level = TRL_CONFIG.get(name, (name, "token"))
    logps = torch.tensor(logps_np, requires_grad=True)
    old = logps_np - log_ratio
    stub = _stand_in(
        trl.GRPOTrainer, logps, loss_type=loss_type, importance_sampling_level=level, beta=beta,
        epsilon_low=hyper.get("epsilon", 0.2), epsilon_high=hyper.get("epsilon_high", 0.2),
        args=SimpleNamespace(delta=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
                             vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
                             use_bias_correction_kl=False, steps_per_generation=1),
    )
    value = trl.GRPOTrainer._compute_loss(stub, None, _inputs(logps, old, logps_np + log_kappa, adv_all[:G]))
    value.backward()
    return {"advantages": adv_all.tolist(), "value": float(value.detach()), "grad": logps.grad.numpy().tolist()}


def _trl_rloo(trl, seed: int, clip: bool) -> dict:
    """RLOOTrainer._compute_loss's value and gradient (gradlab's leave-one-out advantages in)."""
    logps_np, log_ratio, _, rewards = _case(seed, clip)
    log_ratio = log_ratio * (1 if clip else 4)  # the sequence ratio multiplies the token ratios
    adv = gl.advantages(rewards[:1], "leave_one_out").ravel()
    logps = torch.tensor(logps_np, requires_grad=True)
    stub = _stand_in(trl.RLOOTrainer, logps, epsilon_low=0.2, epsilon_high=0.2, beta=0.0)
    value = trl.RLOOTrainer._compute_loss(stub, None, _inputs(logps, logps_np - log_ratio, logps_np, adv))
    value.backward()
    return {"value": float(value.detach()), "grad": logps.grad.numpy().tolist()}


ADVANTAGE_SCALES = SCALES + ["leave_one_out"]
GRPO_RUNS = [(0, False, 0.0), (1, True, 0.04)]  # seed, clip, beta
RLOO_RUNS = [(0, False), (1, True)]  # seed, clip
_RUNNERS = {"advantages": _trl_advantages, "grpo": _trl_grpo, "rloo": _trl_rloo}


def trl_side(jobs: list[list]) -> dict:
    """Run in a separate process by the ``trl`` fixture: each job ``[kind, *arguments]``'s answer."""
    trl = _import_trl()
    if isinstance(trl, str):
        return {"unavailable": trl}
    return {"answers": {json.dumps(job): _RUNNERS[job[0]](trl, *job[1:]) for job in jobs}}


def trl_jobs() -> list[list]:
    """Every case the tests below ask TRL."""
    jobs: list[list] = [["advantages", scale] for scale in ADVANTAGE_SCALES]
    jobs += [["grpo", name, scale, *run] for name in GRPO_TYPES for scale in SCALES for run in GRPO_RUNS]
    jobs += [["rloo", *run] for run in RLOO_RUNS]
    return jobs


@pytest.fixture(scope="module")
def trl(apart):
    """TRL's answer to every case below, computed once in a process of TRL's own (shared with
    tests/test_trl_oracle.py's)."""
    _, out = trl_sides(apart)
    if "unavailable" in out:
        _unavailable(out["unavailable"])
    return lambda *job: out["answers"][json.dumps(list(job))]


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_advantages_match_trl(trl, scale):
    rewards = np.random.default_rng(3).normal(size=(3, G))
    ours = gl.advantages(rewards, scale)
    np.testing.assert_allclose(ours, trl("advantages", scale), rtol=ADV_RTOL, atol=1e-14)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", GRPO_TYPES)
@pytest.mark.parametrize("seed,clip,beta", GRPO_RUNS)
def test_grpo_trainer_weights_and_value(trl, name, scale, seed, clip, beta):
    loss = gl.GROUP_LOSSES[name]
    logps_np, log_ratio, log_kappa, rewards = _case(seed, clip)
    theirs = trl("grpo", name, scale, seed, clip, beta)
    adv_all = np.array(theirs["advantages"])
    np.testing.assert_allclose(gl.advantages(rewards, scale).ravel(), adv_all, rtol=ADV_RTOL, atol=1e-14)
    adv = adv_all[:G]
    old = logps_np - log_ratio
    weights, ours = _gradlab(loss, _hyper(name, beta), adv, log_ratio, log_kappa, old)
    np.testing.assert_allclose(-np.array(theirs["grad"]), weights, rtol=1e-10, atol=1e-13)
    if ours is not None:
        assert math.isclose(theirs["value"], ours, rel_tol=1e-10, abs_tol=1e-13)


@pytest.mark.parametrize("seed,clip", RLOO_RUNS)
def test_rloo_trainer_weights_and_value(trl, seed, clip):
    loss = gl.GROUP_LOSSES["rloo"]
    logps_np, log_ratio, log_kappa, rewards = _case(seed, clip)
    log_ratio = log_ratio * (1 if clip else 4)  # the sequence ratio multiplies the token ratios
    adv = gl.advantages(rewards[:1], "leave_one_out").ravel()
    old = logps_np - log_ratio
    theirs = trl("rloo", seed, clip)
    weights, _ = _gradlab(loss, {}, adv, log_ratio, log_kappa * 0, old)
    np.testing.assert_allclose(-np.array(theirs["grad"]), weights, rtol=1e-10, atol=1e-13)
    seq = np.exp((log_ratio * MASK).sum(-1))
    clipped = np.clip(seq, 0.8, 1.2)
    assert math.isclose(theirs["value"], float(np.mean(-np.minimum(seq * adv, clipped * adv))), rel_tol=1e-12)
    # the clipped run clips some sequences and not others
    assert not clip or ((np.abs(seq - 1) > 0.2).any() and (np.abs(seq - 1) < 0.2).any())
