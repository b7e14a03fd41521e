"""Every loss against an independent transcription of its reference implementation.

gradlab's other tests check a derivation against autodiff of the *same* formula, so they cannot
catch a formula transcribed wrong. Here each loss is written again, by hand, the way its
reference implementation computes it (variable names and order of operations follow the cited
code, in mpmath instead of torch), and gradlab's value and every first partial derivative
(canonical variables and hyperparameters) are compared with the transcription's value and its
high-precision numerical derivatives, at fixed points and at two hyperparameter settings.

Sources, read at these commits (``git show COMMIT:PATH``):

- TRL1: huggingface/trl f2cd57710ae345ea6428ae95363267fcf38a3dc8 (v1.9.0-26):
  ``trl/trainer/dpo_trainer.py`` (``DPOTrainer._compute_loss``), ``trl/trainer/kto_trainer.py``
  (``_compute_loss``), ``trl/experimental/cpo/cpo_trainer.py`` (``cpo_loss``, ``concatenated_forward``),
  ``trl/experimental/orpo/orpo_trainer.py`` (``odds_ratio_loss``).
- TRL0: huggingface/trl 23a635ed61c47609c88fd0fd7bfc7b08c398742d (v0.16.0):
  ``trl/trainer/dpo_trainer.py`` (``dpo_loss``, ``concatenated_forward`` for ``rpo_alpha``).
- OAT: sail-sg/oat c1a074c320ff5ca9fe9a4f669bf05208e2f310be: ``oat/learners/loss.py``
  (``DPOLoss.forward``, ``SimPOLoss.forward``), ``oat/learners/dap.py`` (which algorithms average
  log-probs over tokens).
- SIMPO: princeton-nlp/SimPO 1b3e8f3528a23bce3da514a2dce8ea7490d4bc75: ``scripts/simpo_trainer.py``
  (``simpo_loss``; ``average_log_prob=True``).
- Papers and posts, where no implementation exists (gdpo, h_dpo, ld_dpo, ipo, slic, pdpo).

Batch averaging is left out: each transcription returns the per-pair loss (for KTO-type
trainers, the sum of the per-example losses of the pair's two examples). TRL's NLL/SFT term
is the cross-entropy averaged over the chosen tokens, i.e. ``-lp_w / len_w`` for one pair.
"""

from __future__ import annotations

from collections.abc import Callable

import mpmath
import pytest

import gradlab
from gradlab.losses import LOSSES

mp = mpmath.mp
DIGITS = 30


# --------------------------------------------------------------------------------------------
# torch.nn.functional, in mpmath
# --------------------------------------------------------------------------------------------


def logsigmoid(x):
    return -mpmath.log1p(mpmath.exp(-x)) if x > 0 else x - mpmath.log1p(mpmath.exp(x))


def sigmoid(x):
    return 1 / (1 + mpmath.exp(-x))


def relu(x):
    return max(x, 0)


def log1mexp(x):
    return mpmath.log(-mpmath.expm1(x))


# --------------------------------------------------------------------------------------------
# The transcriptions. ``v`` holds the per-pair quantities under TRL's names, ``hp`` the config.
# --------------------------------------------------------------------------------------------

Fn = Callable[[dict, dict], "mpmath.mpf"]


def _trl_names(c: dict) -> dict:
    """gradlab's canonical values under the names the reference code uses."""
    return {
        "policy_chosen_logps": c["lp_w"], "policy_rejected_logps": c["lp_l"],
        "ref_chosen_logps": c["ref_w"], "ref_rejected_logps": c["ref_l"],
        "chosen_len": c["len_w"], "rejected_len": c["len_l"],
        # LD-DPO splits each log-prob into the shared-length part and the tail past it
        "chosen_tail": c["tail_w"], "rejected_tail": c["tail_l"],
        "ref_chosen_tail": c["ref_tail_w"], "ref_rejected_tail": c["ref_tail_l"],
    }


def _logratios(v):
    return (v["policy_chosen_logps"] - v["ref_chosen_logps"], v["policy_rejected_logps"] - v["ref_rejected_logps"])


def _nll(v):
    # cross_entropy over the chosen completion tokens: the per-token mean negative log-prob
    return -v["policy_chosen_logps"] / v["chosen_len"]


def trl1_dpo(v, hp, loss_type):
    """TRL1 ``DPOTrainer._compute_loss`` with f_divergence_type='reverse_kl'."""
    chosen_scores, rejected_scores = _logratios(v)
    delta_score = chosen_scores - rejected_scores
    beta = hp["beta"]
    if loss_type == "sigmoid":
        return -logsigmoid(beta * delta_score)
    if loss_type == "hinge":
        return relu(1 - beta * delta_score)
    if loss_type == "ipo":
        ipo_delta = chosen_scores / v["chosen_len"] - rejected_scores / v["rejected_len"]
        return (ipo_delta - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        eps = hp["label_smoothing"]
        qw, log_qw = sigmoid(beta * delta_score), logsigmoid(beta * delta_score)
        ql, log_ql = sigmoid(-beta * delta_score), logsigmoid(-beta * delta_score)
        return qw * (log_qw - mpmath.log1p(-eps)) + ql * (log_ql - mpmath.log(eps))
    if loss_type == "nca_pair":
        cr, rr = beta * chosen_scores, beta * rejected_scores
        return -logsigmoid(cr) - 0.5 * logsigmoid(-cr) - 0.5 * logsigmoid(-rr)
    if loss_type == "robust":
        eps = hp["label_smoothing"]
        clean = -(1 - eps) * logsigmoid(beta * delta_score)
        flipped = -eps * logsigmoid(-beta * delta_score)
        return (clean - flipped) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -logsigmoid(beta * chosen_scores) - logsigmoid(-beta * rejected_scores)
    if loss_type == "sppo_hard":
        return (chosen_scores - 0.5 / beta) ** 2 + (rejected_scores + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return (1 - sigmoid(beta * chosen_scores)) + sigmoid(beta * rejected_scores)
    if loss_type == "apo_down":
        return sigmoid(beta * chosen_scores) + (1 - sigmoid(beta * delta_score))
    if loss_type == "discopop":
        logits = delta_score * beta
        modulation = sigmoid(logits / hp["discopop_tau"])
        return -logsigmoid(logits) * (1 - modulation) + mpmath.exp(-logits) * modulation
    if loss_type == "sigmoid_norm":
        delta = chosen_scores / v["chosen_len"] - rejected_scores / v["rejected_len"]
        return -logsigmoid(beta * delta)
    raise AssertionError(loss_type)


def trl1_fdiv(v, hp, f_divergence_type):
    """TRL1 ``DPOTrainer._compute_loss``, loss_type='sigmoid', the f-divergence scores."""
    chosen_logratios, rejected_logratios = _logratios(v)
    if f_divergence_type == "forward_kl":
        chosen_scores, rejected_scores = -mpmath.exp(-chosen_logratios), -mpmath.exp(-rejected_logratios)
    elif f_divergence_type == "js_divergence":
        chosen_scores, rejected_scores = logsigmoid(chosen_logratios), logsigmoid(rejected_logratios)
    else:  # alpha_divergence
        a = hp["f_alpha_divergence_coef"]
        coef = 1 / (a - 1)
        chosen_scores = mpmath.exp((a - 1) * chosen_logratios) * coef
        rejected_scores = mpmath.exp((a - 1) * rejected_logratios) * coef
    return -logsigmoid(hp["beta"] * (chosen_scores - rejected_scores))


def trl1_ld_dpo(v, hp):
    """TRL1 ``_compute_loss`` with ld_alpha: logps = shared + ld_alpha * tail, policy and reference."""
    a = hp["ld_alpha"]

    def desens(total, tail):
        shared = total - tail
        return shared + a * tail

    chosen = desens(v["policy_chosen_logps"], v["chosen_tail"]) - desens(v["ref_chosen_logps"], v["ref_chosen_tail"])
    rejected = desens(v["policy_rejected_logps"], v["rejected_tail"]) - desens(
        v["ref_rejected_logps"], v["ref_rejected_tail"])
    return -logsigmoid(hp["beta"] * (chosen - rejected))


def paper_ld_dpo(v, hp):
    """Liu et al. 2024, arXiv:2409.06411, Eq. 12: only the policy's likelihood is desensitised."""
    a = hp["ld_alpha"]
    pw = v["policy_chosen_logps"] - v["chosen_tail"] + a * v["chosen_tail"]
    pl = v["policy_rejected_logps"] - v["rejected_tail"] + a * v["rejected_tail"]
    return -logsigmoid(hp["beta"] * ((pw - v["ref_chosen_logps"]) - (pl - v["ref_rejected_logps"])))


def trl0_dpo(v, hp, loss_type):
    """TRL0 ``DPOTrainer.dpo_loss`` (and ``rpo_alpha`` in ``get_batch_loss_metrics``)."""
    beta, eps = hp["beta"], hp.get("label_smoothing", 0)
    chosen_logratios, rejected_logratios = _logratios(v)
    logits = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":  # cDPO when label_smoothing > 0
        return -logsigmoid(beta * logits) * (1 - eps) - logsigmoid(-beta * logits) * eps
    if loss_type == "bco_pair":  # delta: the running mean of rewards, a constant here
        delta = hp["bco_delta"]
        return -logsigmoid(beta * chosen_logratios - delta) - logsigmoid(-(beta * rejected_logratios - delta))
    if loss_type == "rpo":
        return -logsigmoid(beta * logits) + hp["rpo_alpha"] * _nll(v)
    if loss_type == "alpha_divergence":
        a = hp["f_alpha_divergence_coef"]
        logits = (mpmath.exp(rejected_logratios * -a) - mpmath.exp(chosen_logratios * -a)) / a
        return -logsigmoid(beta * logits)
    raise AssertionError(loss_type)


def oat_dpo(v, hp, *, len_reg_alpha=0, dpo_positive_lambda=0, label_smoothing=0):
    """OAT ``DPOLoss.forward`` (DAPAlgo.DPO: summed log-probs, ``dap.py``)."""
    beta = hp["beta"]
    pi_logratios = v["policy_chosen_logps"] - v["policy_rejected_logps"]
    ref_logratios = v["ref_chosen_logps"] - v["ref_rejected_logps"]
    logits = pi_logratios - ref_logratios
    if len_reg_alpha > 0:
        length_diff = v["chosen_len"] - v["rejected_len"]
        logits += len_reg_alpha / beta * length_diff  # Eq. 9 of arXiv:2403.19159
    if dpo_positive_lambda > 0:
        logits -= dpo_positive_lambda * relu(v["ref_chosen_logps"] - v["policy_chosen_logps"])
    return -logsigmoid(beta * logits) * (1 - label_smoothing) - logsigmoid(-beta * logits) * label_smoothing


def simpo_repo(v, hp):
    """SIMPO ``SimPOTrainer.simpo_loss`` on per-token averaged log-probs, gamma_beta_ratio = gamma/beta."""
    beta = hp["beta"]
    chosen = v["policy_chosen_logps"] / v["chosen_len"]
    rejected = v["policy_rejected_logps"] / v["rejected_len"]
    logits = (chosen - rejected) - hp["simpo_gamma"] / beta
    return -logsigmoid(beta * logits)


def trl_cpo(v, hp, loss_type):
    """TRL1 ``CPOTrainer.cpo_loss`` + ``cpo_alpha * nll``; ipo and simpo average log-probs."""
    beta, eps, alpha = hp["beta"], hp.get("label_smoothing", 0), hp.get("alpha", 0)
    average = loss_type in ("ipo", "simpo", "alphapo")
    chosen = v["policy_chosen_logps"] / (v["chosen_len"] if average else 1)
    rejected = v["policy_rejected_logps"] / (v["rejected_len"] if average else 1)
    if alpha != 0:  # AlphaPO reward on the per-token mean probability
        chosen_probs, rejected_probs = mpmath.exp(chosen), mpmath.exp(rejected)
        logits = (1 - chosen_probs ** (-alpha)) / alpha - (1 - rejected_probs ** (-alpha)) / alpha
    else:
        logits = chosen - rejected
    if loss_type in ("simpo", "alphapo"):
        logits = logits - hp["simpo_gamma"] / beta
        losses = -logsigmoid(beta * logits) * (1 - eps) - logsigmoid(-beta * logits) * eps
    elif loss_type == "sigmoid":
        losses = -logsigmoid(beta * logits) * (1 - eps) - logsigmoid(-beta * logits) * eps
    elif loss_type == "hinge":
        losses = relu(1 - beta * logits)
    else:  # ipo
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses + hp["cpo_alpha"] * _nll(v)


def trl_orpo(v, hp):
    """TRL1 ``ORPOTrainer``: nll - beta * logsigmoid(log_odds), log-probs averaged per token."""
    pc = v["policy_chosen_logps"] / v["chosen_len"]
    pr = v["policy_rejected_logps"] / v["rejected_len"]
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    return -pc - hp["beta"] * logsigmoid(log_odds)


def trl_kto(v, hp, loss_type):
    """TRL1 ``KTOTrainer._compute_loss``: per-example losses of the desirable and the undesirable example."""
    beta = hp["beta"]
    chosen_logratios, rejected_logratios = _logratios(v)
    if loss_type == "kto":
        kl = hp["kto_z0"]
        chosen_losses = 1 - sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - sigmoid(beta * (kl - rejected_logratios))
    else:  # apo_zero_unpaired
        chosen_losses = 1 - sigmoid(beta * chosen_logratios)
        rejected_losses = sigmoid(beta * rejected_logratios)
    return hp["desirable_weight"] * chosen_losses + hp["undesirable_weight"] * rejected_losses


def paper(name):
    """Losses with no implementation: transcribed from the paper's or post's equation."""
    def gdpo(v, hp):  # Cho 2024, second post: beta on the policy, gamma on the reference
        return -logsigmoid(hp["beta"] * (v["policy_chosen_logps"] - v["policy_rejected_logps"])
                           - hp["gamma"] * (v["ref_chosen_logps"] - v["ref_rejected_logps"]))

    def h_dpo(v, hp):  # Omura et al. 2024, arXiv:2411.07595: alpha scales the policy log-probs
        a = hp["hdpo_alpha"]
        return -logsigmoid(hp["beta"] * ((a * v["policy_chosen_logps"] - v["ref_chosen_logps"])
                                         - (a * v["policy_rejected_logps"] - v["ref_rejected_logps"])))

    def ipo(v, hp):  # Azar et al. 2023, arXiv:2310.12036, Eq. 17, summed log-probs, tau = beta
        chosen, rejected = _logratios(v)
        return (chosen - rejected - 1 / (2 * hp["beta"])) ** 2

    def slic(v, hp):  # Zhao et al. 2023, arXiv:2305.10425, Eq. 2, regulariser on y_w
        return relu(hp["slic_delta"] - v["policy_chosen_logps"] + v["policy_rejected_logps"]) \
            - hp["slic_lambda"] * v["policy_chosen_logps"]

    def pdpo(v, hp):  # Cho 2024, first post: pi(y) pi(y') times the DPO loss
        return mpmath.exp(v["policy_chosen_logps"] + v["policy_rejected_logps"]) * trl1_dpo(v, hp, "sigmoid")

    return {"gdpo": gdpo, "h_dpo": h_dpo, "ipo": ipo, "slic": slic, "pdpo": pdpo}[name]


TRANSCRIPTIONS: dict[str, tuple[str, Fn]] = {
    "dpo": ("TRL1 loss_type='sigmoid'", lambda v, hp: trl1_dpo(v, hp, "sigmoid")),
    "gdpo": ("Cho 2024 (post)", paper("gdpo")),
    "cdpo": ("OAT DPOLoss label_smoothing", lambda v, hp: oat_dpo(v, hp, label_smoothing=hp["label_smoothing"])),
    "robust": ("TRL1 loss_type='robust'", lambda v, hp: trl1_dpo(v, hp, "robust")),
    "hinge": ("TRL1 loss_type='hinge'", lambda v, hp: trl1_dpo(v, hp, "hinge")),
    "ipo": ("arXiv:2310.12036 Eq. 17", paper("ipo")),
    "ipo_trl": ("TRL1 loss_type='ipo'", lambda v, hp: trl1_dpo(v, hp, "ipo")),
    "exo_pair": ("TRL1 loss_type='exo_pair'", lambda v, hp: trl1_dpo(v, hp, "exo_pair")),
    "nca_pair": ("TRL1 loss_type='nca_pair'", lambda v, hp: trl1_dpo(v, hp, "nca_pair")),
    "bco_pair": ("TRL0 loss_type='bco_pair'", lambda v, hp: trl0_dpo(v, hp, "bco_pair")),
    "sppo_hard": ("TRL1 loss_type='sppo_hard'", lambda v, hp: trl1_dpo(v, hp, "sppo_hard")),
    "apo_zero": ("TRL1 loss_type='apo_zero'", lambda v, hp: trl1_dpo(v, hp, "apo_zero")),
    "apo_down": ("TRL1 loss_type='apo_down'", lambda v, hp: trl1_dpo(v, hp, "apo_down")),
    "discopop": ("TRL1 loss_type='discopop'", lambda v, hp: trl1_dpo(v, hp, "discopop")),
    "sigmoid_norm": ("TRL1 loss_type='sigmoid_norm'", lambda v, hp: trl1_dpo(v, hp, "sigmoid_norm")),
    "rpo": ("TRL0 rpo_alpha", lambda v, hp: trl0_dpo(v, hp, "rpo")),
    "fdpo_fkl": ("TRL1 forward_kl", lambda v, hp: trl1_fdiv(v, hp, "forward_kl")),
    "fdpo_js": ("TRL1 js_divergence", lambda v, hp: trl1_fdiv(v, hp, "js_divergence")),
    "fdpo_alpha": ("TRL0 alpha_divergence", lambda v, hp: trl0_dpo(v, hp, "alpha_divergence")),
    "fdpo_alpha_trl": ("TRL1 alpha_divergence", lambda v, hp: trl1_fdiv(v, hp, "alpha_divergence")),
    "r_dpo": ("OAT DPOLoss len_reg_alpha", lambda v, hp: oat_dpo(v, hp, len_reg_alpha=hp["alpha"])),
    "dpop": ("OAT DPOLoss dpo_positive_lambda", lambda v, hp: oat_dpo(v, hp, dpo_positive_lambda=hp["dpop_lambda"])),
    "h_dpo": ("arXiv:2411.07595", paper("h_dpo")),
    "ld_dpo": ("arXiv:2409.06411 Eq. 12", paper_ld_dpo),
    "ld_dpo_trl": ("TRL1 ld_alpha", trl1_ld_dpo),
    "simpo": ("SIMPO simpo_loss", simpo_repo),
    "simpo_trl": ("TRL1 CPO loss_type='simpo'", lambda v, hp: trl_cpo(v, hp, "simpo")),
    "cpo": ("TRL1 CPO loss_type='sigmoid'", lambda v, hp: trl_cpo(v, hp, "sigmoid")),
    "cpo_hinge": ("TRL1 CPO loss_type='hinge'", lambda v, hp: trl_cpo(v, hp, "hinge")),
    "cpo_ipo": ("TRL1 CPO loss_type='ipo'", lambda v, hp: trl_cpo(v, hp, "ipo")),
    "alphapo": ("TRL1 CPO loss_type='alphapo'", lambda v, hp: trl_cpo(v, hp, "alphapo")),
    "orpo": ("TRL1 ORPOTrainer", trl_orpo),
    "slic": ("arXiv:2305.10425 Eq. 2", paper("slic")),
    "sft": ("TRL1 loss_type='sft'", lambda v, hp: _nll(v)),
    "kto": ("TRL1 KTO loss_type='kto'", lambda v, hp: trl_kto(v, hp, "kto")),
    "apo_zero_unpaired": ("TRL1 KTO loss_type='apo_zero_unpaired'", lambda v, hp: trl_kto(v, hp, "apo_zero_unpaired")),
    "pdpo": ("Cho 2024 (post)", paper("pdpo")),
}

# Points away from every kink (hinge, max) and inside every domain; the longer response has a
# non-zero tail past the shorter one's length, the shorter one none.
POINTS = [
    {"lp_w": -12.5, "lp_l": -15.25, "ref_w": -13.0, "ref_l": -14.0, "len_w": 20.0, "len_l": 12.0,
     "tail_w": -4.5, "tail_l": 0.0, "ref_tail_w": -5.0, "ref_tail_l": 0.0},
    {"lp_w": -30.0, "lp_l": -22.0, "ref_w": -28.0, "ref_l": -25.0, "len_w": 9.0, "len_l": 15.0,
     "tail_w": 0.0, "tail_l": -7.0, "ref_tail_w": 0.0, "ref_tail_l": -6.5},
    {"lp_w": -3.25, "lp_l": -3.875, "ref_w": -3.5, "ref_l": -3.625, "len_w": 4.0, "len_l": 4.0,
     "tail_w": 0.0, "tail_l": 0.0, "ref_tail_w": 0.0, "ref_tail_l": 0.0},
]

# A second hyperparameter setting, away from every default, so each hyperparameter's role is tested.
OTHER_VALUES = {
    "beta": 0.37, "gamma": 0.21, "label_smoothing": 0.13, "simpo_gamma": 0.7, "cpo_alpha": 0.6, "rpo_alpha": 0.4,
    "discopop_tau": 0.3, "ld_alpha": 0.35, "alpha": 0.03, "dpop_lambda": 7.0, "hdpo_alpha": 0.8,
    "f_alpha_divergence_coef": 0.3, "bco_delta": 0.2, "slic_delta": 1.5, "slic_lambda": 0.3,
    "desirable_weight": 1.3, "undesirable_weight": 0.7, "kto_z0": 0.15,
}


def _settings(name):
    loss = LOSSES[name]
    defaults = {k: float(v) for k, v in loss.defaults.items()}
    other = {k: OTHER_VALUES[k] for k in loss.defaults}
    if name == "alphapo":  # AlphaPO's alpha is a reward-shape exponent, not R-DPO's length weight
        other["alpha"] = 0.6
    return [("defaults", defaults), ("other", other)]


def test_every_loss_has_a_transcription():
    assert set(TRANSCRIPTIONS) == set(LOSSES)


def _transcribed(name, point, hp):
    fn = TRANSCRIPTIONS[name][1]
    return fn(_trl_names(point), hp)


def _along(name, point, hp, var):
    """The transcription as a function of one variable or hyperparameter, the rest fixed."""
    if var in hp:
        return lambda x: _transcribed(name, point, {**hp, var: x})
    return lambda x: _transcribed(name, {**point, var: x}, hp)


@pytest.mark.parametrize("name", list(LOSSES))
def test_value_and_gradient_match_the_reference_implementation(name):
    loss = LOSSES[name]
    for label, hp in _settings(name):
        for i, point in enumerate(POINTS):
            at = {k: point[k] for k in loss.variables}
            got = gradlab.evaluate(loss, at, hp, digits=DIGITS)
            with mpmath.workdps(DIGITS):
                mp_point = {k: mpmath.mpf(x) for k, x in point.items()}
                mp_hp = {k: mpmath.mpf(x) for k, x in hp.items()}
                want = _transcribed(name, mp_point, mp_hp)
                where = f"{name} vs {TRANSCRIPTIONS[name][0]}, point {i}, {label} hyperparameters"
                assert mpmath.almosteq(got["loss"], want, rel_eps=1e-12, abs_eps=1e-15), (
                    f"{where}: value {got['loss']} != {want}")
                for var in [*loss.variables, *loss.hyperparameters]:
                    base = mp_hp[var] if var in mp_hp else mp_point[var]
                    d = mpmath.diff(_along(name, mp_point, mp_hp, var), base)
                    assert mpmath.almosteq(got[var], d, rel_eps=1e-12, abs_eps=1e-15), (
                        f"{where}: d/d{var} {got[var]} != {d}")
