r"""The loss registry: every preference loss, written once as a sympy expression.

A loss is a small pure function of the canonical variables it uses (positional, named as in
:mod:`gradlab.symbols`) and its hyperparameters (keyword-only, with defaults). The function's
signature *is* its metadata: the variables it reads and the hyperparameters with their defaults
are read from it, so they cannot drift apart. The rest (aliases, references, the source the
formula was matched against) sits in the one explicit table ``LOSSES`` at the bottom.

Notation in the docstrings: :math:`h = (lp_w - ref_w) - (lp_l - ref_l)` is the implicit-reward
margin, :math:`r_w = lp_w - ref_w` and :math:`r_l = lp_l - ref_l` the log-ratios, and
``softplus(-x) = -log sigmoid(x)``.

TRL versions: "TRL 1.x" means the trainers after the f-divergence "scores" refactor (the version
that has ``forward_kl`` and ``sigmoid_norm``), read at TRL 1.16.0 and run against gradlab by
``tests/test_trl_oracle.py``; "TRL 0.1x" means the 2024 trainers
(``DPOTrainer``/``CPOTrainer``/``ORPOTrainer``/``KTOTrainer`` of TRL 0.9-0.16).
"""

from __future__ import annotations

import difflib
import math
from types import MappingProxyType
from typing import Any
from collections.abc import Mapping, Sequence

import sympy
from sympy import Max, Rational, exp

from gradlab import caches
from gradlab._loss import Expr, Hyper, Implementation, Loss, Source
from gradlab.errors import ParseError, UnknownLossError
from gradlab.parsing import parse
from gradlab.trl import TRL_CONFIGS, resolve_config
from gradlab.symbols import CANONICAL, EXTRA, HYPERPARAMETERS, SYMBOLS, Domain, log1mexp, sigmoid, softplus

__all__ = [
    "Loss", "LOSSES", "ALIASES", "OUT_OF_SCOPE", "COMBINATIONS", "TRL_NAMES", "Implementation", "Source",
    "combine", "custom", "from_trl_config", "get_loss", "loss_names", "out_of_scope_reason",
]

BETA = 0.1  # TRL's DPOConfig default


def _margin(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr) -> Expr:
    return (lp_w - ref_w) - (lp_l - ref_l)


# ============================================================================================
# DPO family, with a reference model
# ============================================================================================


def dpo(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA) -> Expr:
    r"""Direct preference optimisation: logistic loss on the implicit-reward margin.

    .. math:: \ell = -\log\sigma(\beta h) = \operatorname{softplus}(-\beta h)

    Reference: Rafailov et al. 2023, arXiv:2305.18290, Eq. 7. Matches TRL ``loss_type="sigmoid"``
    with ``label_smoothing=0`` (TRL 0.1x and 1.x agree).
    """
    return softplus(-beta * _margin(lp_w, lp_l, ref_w, ref_l))


def gdpo(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA, gamma: Hyper = BETA) -> Expr:
    r"""Two-coefficient DPO: separate weights on the policy and the reference log-ratios.

    .. math:: \ell = \operatorname{softplus}\bigl(-[\beta (lp_w - lp_l) - \gamma (ref_w - ref_l)]\bigr)

    ``gamma = beta`` recovers DPO; ``gamma`` acts as the reference's inverse temperature.
    Reference: Cho 2024, "Continued musing on DPO" (second post in ``docs/background.md``).
    """
    return softplus(-(beta * (lp_w - lp_l) - gamma * (ref_w - ref_l)))


def cdpo(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA, label_smoothing: Hyper = 0.1) -> Expr:
    r"""Conservative DPO: DPO against labels flipped with probability epsilon.

    .. math:: \ell = (1-\epsilon)\operatorname{softplus}(-\beta h) + \epsilon\operatorname{softplus}(\beta h)

    Reference: Mitchell 2023, "A note on DPO with noisy preferences" (cDPO report). Matches TRL
    ``loss_type="sigmoid"`` with ``label_smoothing > 0``. TRL's default ``label_smoothing=0``
    makes it plain DPO, so we default to 0.1. Differs from ``robust`` in the sign of the
    smoothing term and the normalisation: cDPO *adds* the flipped-label loss.
    """
    eps = label_smoothing
    m = beta * _margin(lp_w, lp_l, ref_w, ref_l)
    return (1 - eps) * softplus(-m) + eps * softplus(m)


def robust(
    lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA, label_smoothing: Hyper = 0.1,
) -> Expr:
    r"""Robust DPO: an unbiased estimate of the clean DPO loss under label noise epsilon.

    .. math:: \ell = \frac{(1-\epsilon)\operatorname{softplus}(-\beta h)
              - \epsilon\operatorname{softplus}(\beta h)}{1 - 2\epsilon}

    Reference: Chowdhury et al. 2024, arXiv:2403.00409, Eq. 8. Matches TRL ``loss_type="robust"``
    (0.1x and 1.x). Unlike ``cdpo`` it *subtracts* the flipped-label loss, so it is unbounded
    below as the margin grows.

    The default epsilon = 0.1 is the value the paper recommends (and TRL's documentation quotes);
    it is *not* TRL's default. TRL's ``DPOConfig`` defaults ``label_smoothing`` to 0, where this
    loss is exactly ``dpo``. gradlab keeps 0.1: at 0 the loss would be DPO under another name, and
    every gradient, figure and scorecard row for ``robust`` would hide what the loss does. To
    reproduce a TRL run that left ``label_smoothing`` unset, pass ``label_smoothing=0``;
    ``gradlab show robust`` prints the difference.
    """
    eps = label_smoothing
    m = beta * _margin(lp_w, lp_l, ref_w, ref_l)
    return ((1 - eps) * softplus(-m) - eps * softplus(m)) / (1 - 2 * eps)


def hinge(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA) -> Expr:
    r"""Hinge loss on the implicit-reward margin (SLiC's hinge, keeping the reference).

    .. math:: \ell = \max(0, 1 - \beta h)

    Reference: Zhao et al. 2023, arXiv:2305.10425 (SLiC), as implemented by TRL
    ``loss_type="hinge"`` (0.1x and 1.x): beta is the reciprocal of the margin.
    Not differentiable at ``beta*h = 1``.
    """
    return Max(0, 1 - beta * _margin(lp_w, lp_l, ref_w, ref_l))


def ipo(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA) -> Expr:
    r"""Identity preference optimisation: regress the summed margin onto 1/(2 beta).

    .. math:: \ell = \bigl(h - \tfrac{1}{2\beta}\bigr)^2

    Reference: Azar et al. 2023, arXiv:2310.12036, Eq. 17 (beta is the paper's tau), with
    sequence log-probs summed over tokens as the paper writes them. TRL's ``loss_type="ipo"``
    averages over tokens instead: that is ``ipo_trl``.
    """
    return (_margin(lp_w, lp_l, ref_w, ref_l) - 1 / (2 * beta)) ** 2


def ipo_trl(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, len_w: Expr, len_l: Expr, *, beta: Hyper = BETA) -> Expr:
    r"""IPO on per-token averaged log-ratios, as TRL implements it.

    .. math:: \ell = \Bigl(\tfrac{r_w}{|y_w|} - \tfrac{r_l}{|y_l|} - \tfrac{1}{2\beta}\Bigr)^2

    Reference: Azar et al. 2023, arXiv:2310.12036, Eq. 17, with TRL's length averaging
    (``loss_type="ipo"``, TRL 0.1x and 1.x; TRL reports the IPO authors confirmed it). Differs
    from ``ipo``, which sums over tokens as the paper writes.
    """
    return ((lp_w - ref_w) / len_w - (lp_l - ref_l) / len_l - 1 / (2 * beta)) ** 2


def exo_pair(
    lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA, label_smoothing: Hyper = Rational(1, 1000),
) -> Expr:
    r"""EXO (efficient exact optimisation), pairwise: reverse KL to the smoothed label.

    .. math:: \ell = \sigma(\beta h)\bigl[\log\sigma(\beta h) - \log(1-\epsilon)\bigr]
              + \sigma(-\beta h)\bigl[\log\sigma(-\beta h) - \log\epsilon\bigr]

    Reference: Ji et al. 2024, arXiv:2402.00856, Eq. 16. Matches TRL ``loss_type="exo_pair"``
    (0.1x and 1.x); epsilon = 1e-3 is the paper's recommendation (TRL 0.1x's default for EXO).
    TRL 1.x's ``label_smoothing`` defaults to 0, which it refuses for EXO, so a TRL run always
    sets it. TRL builds epsilon as a float32 tensor: its log(epsilon) has float32 rounding.
    """
    eps = label_smoothing
    m = beta * _margin(lp_w, lp_l, ref_w, ref_l)
    return sigmoid(m) * (-softplus(-m) - sympy.log(1 - eps)) + sigmoid(-m) * (
        -softplus(m) - sympy.log(eps)
    )


def nca_pair(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA) -> Expr:
    r"""Noise-contrastive alignment, pairwise.

    .. math:: \ell = \operatorname{softplus}(-\beta r_w) + \tfrac12\operatorname{softplus}(\beta r_w)
              + \tfrac12\operatorname{softplus}(\beta r_l)

    Reference: Chen et al. 2024, arXiv:2402.05369. Matches TRL ``loss_type="nca_pair"``.
    """
    rw, rl = beta * (lp_w - ref_w), beta * (lp_l - ref_l)
    return softplus(-rw) + softplus(rw) / 2 + softplus(rl) / 2


def bco_pair(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA, bco_delta: Hyper = 0) -> Expr:
    r"""Binary classifier optimisation, pairwise: classify chosen vs rejected rewards.

    .. math:: \ell = \operatorname{softplus}(-(\beta r_w - \delta)) + \operatorname{softplus}(\beta r_l - \delta)

    Reference: Jung et al. 2024, arXiv:2404.04656. TRL 0.1x's ``bco_pair`` shifts by delta, a
    running mean of the batch rewards; here it is held constant (``bco_delta``). TRL 1.x drops
    the shift (delta = 0, our default).
    """
    rw, rl = beta * (lp_w - ref_w), beta * (lp_l - ref_l)
    return softplus(-(rw - bco_delta)) + softplus(rl - bco_delta)


def sppo_hard(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA) -> Expr:
    r"""Self-play preference optimisation with hard win probabilities.

    .. math:: \ell = \bigl(r_w - \tfrac{1}{2\beta}\bigr)^2 + \bigl(r_l + \tfrac{1}{2\beta}\bigr)^2

    Reference: Wu et al. 2024, arXiv:2405.00675, Eq. 4.7 with P = 1 for the winner and 0 for
    the loser, as TRL ``loss_type="sppo_hard"``.
    """
    return (lp_w - ref_w - 1 / (2 * beta)) ** 2 + (lp_l - ref_l + 1 / (2 * beta)) ** 2


def apo_zero(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA) -> Expr:
    r"""Anchored preference optimisation, zero variant: raise chosen, lower rejected.

    .. math:: \ell = 1 - \sigma(\beta r_w) + \sigma(\beta r_l)

    Reference: D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7; TRL ``loss_type="apo_zero"``.
    """
    return 1 - sigmoid(beta * (lp_w - ref_w)) + sigmoid(beta * (lp_l - ref_l))


def apo_down(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA) -> Expr:
    r"""Anchored preference optimisation, down variant: lower chosen, lower rejected more.

    .. math:: \ell = \sigma(\beta r_w) + 1 - \sigma(\beta h)

    Reference: D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8; TRL ``loss_type="apo_down"``.
    """
    return sigmoid(beta * (lp_w - ref_w)) + 1 - sigmoid(beta * _margin(lp_w, lp_l, ref_w, ref_l))


def discopop(
    lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA, discopop_tau: Hyper = Rational(1, 20),
) -> Expr:
    r"""DiscoPOP (log-ratio modulated loss): a sigmoid blend of logistic and exponential losses.

    .. math:: \ell = (1 - \sigma(\beta h/\tau))\operatorname{softplus}(-\beta h) + \sigma(\beta h/\tau)\, e^{-\beta h}

    Reference: Lu et al. 2024, arXiv:2406.08414, Eq. 5; TRL ``loss_type="discopop"`` with
    ``discopop_tau=0.05``. Non-convex: at h = 0 its slope in m = beta h is
    (1 - log 2)/(4 tau) - 3/4, positive for tau < (1 - log 2)/3 = 0.102, so at tau = 0.05
    descent from the reference point first *lowers* the margin.
    """
    m = beta * _margin(lp_w, lp_l, ref_w, ref_l)
    mod = sigmoid(m / discopop_tau)
    return (1 - mod) * softplus(-m) + mod * exp(-m)


def sigmoid_norm(
    lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, len_w: Expr, len_l: Expr, *, beta: Hyper = BETA,
) -> Expr:
    r"""Length-normalised DPO: DPO on per-token averaged log-ratios.

    .. math:: \ell = \operatorname{softplus}\bigl(-\beta(r_w/|y_w| - r_l/|y_l|)\bigr)

    Reference: TRL 1.x ``loss_type="sigmoid_norm"`` (the LN-DPO baseline of Meng et al. 2024,
    arXiv:2405.14734, Sec. 4). Keeps the reference, unlike SimPO.
    """
    return softplus(-beta * ((lp_w - ref_w) / len_w - (lp_l - ref_l) / len_l))


def rpo(
    lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, len_w: Expr, *, beta: Hyper = BETA, rpo_alpha: Hyper = 1,
) -> Expr:
    r"""Iterative reasoning preference optimisation: DPO plus a length-normalised NLL on y_w.

    .. math:: \ell = \operatorname{softplus}(-\beta h) - \alpha\, lp_w / |y_w|

    Reference: Pang et al. 2024, arXiv:2404.19733, Eq. 1 (alpha = 1 in the paper). TRL adds
    ``rpo_alpha`` times the per-token NLL of the chosen response (0.1x and 1.x; default None).
    """
    return softplus(-beta * _margin(lp_w, lp_l, ref_w, ref_l)) - rpo_alpha * lp_w / len_w


def fdpo_fkl(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA) -> Expr:
    r"""f-DPO with the forward-KL link: the reward is -pi_0/pi.

    .. math:: \ell = \operatorname{softplus}\bigl(-\beta(e^{-r_l} - e^{-r_w})\bigr)

    Reference: Wang et al. 2023, arXiv:2309.16240, Table 1 (f'(u) = -1/u up to a constant);
    TRL 1.x ``f_divergence_type="forward_kl"`` with ``loss_type="sigmoid"``.
    """
    return softplus(-beta * (exp(-(lp_l - ref_l)) - exp(-(lp_w - ref_w))))


def fdpo_js(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA) -> Expr:
    r"""f-DPO with the Jensen-Shannon link: the reward is log sigma(r).

    .. math:: \ell = \operatorname{softplus}\bigl(-\beta(\log\sigma(r_w) - \log\sigma(r_l))\bigr)

    Reference: Wang et al. 2023, arXiv:2309.16240, Table 1 (f'(u) = log(2u/(1+u))); TRL
    ``f_divergence_type="js_divergence"`` (0.1x writes it as h - softplus(r_w) + softplus(r_l),
    1.x as log sigma; the two are equal).
    """
    return softplus(-beta * (softplus(-(lp_l - ref_l)) - softplus(-(lp_w - ref_w))))


def fdpo_alpha(
    lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA,
    f_alpha_divergence_coef: Hyper = Rational(1, 2),
) -> Expr:
    r"""f-DPO with the alpha-divergence link, in the paper's (and TRL 0.1x's) convention.

    .. math:: \ell = \operatorname{softplus}\bigl(-\beta\,(e^{-\alpha r_l} - e^{-\alpha r_w})/\alpha\bigr)

    Reference: Wang et al. 2023, arXiv:2309.16240, Table 1, f'(u) = (1 - u^{-alpha})/alpha:
    alpha -> 0 is reverse KL (DPO), alpha = 1 forward KL. TRL 0.1x
    (``f_alpha_divergence_coef``, default 1.0) uses this convention. TRL 1.x uses
    f'(t) = (t^{alpha-1} - 1)/(alpha - 1), i.e. its alpha is this alpha's ``1 - alpha``:
    see ``fdpo_alpha_trl``. 0.5 is the value where both conventions agree.
    """
    a = f_alpha_divergence_coef
    return softplus(-beta * (exp(-a * (lp_l - ref_l)) - exp(-a * (lp_w - ref_w))) / a)


def fdpo_alpha_trl(
    lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA,
    f_alpha_divergence_coef: Hyper = Rational(1, 2),
) -> Expr:
    r"""f-DPO with the alpha-divergence link, in TRL 1.x's convention.

    .. math:: \ell = \operatorname{softplus}\bigl(-\beta\,(e^{(\alpha-1) r_w} - e^{(\alpha-1) r_l})/(\alpha-1)\bigr)

    Reference: TRL 1.x ``f_divergence_type="alpha_divergence"`` (default alpha 0.5), from Wang
    et al. 2023, arXiv:2309.16240, with f'(t) = (t^{alpha-1} - 1)/(alpha - 1): alpha -> 1 is
    reverse KL (DPO). Equals ``fdpo_alpha`` at the paper's alpha = 1 - this alpha.
    """
    a = f_alpha_divergence_coef - 1
    return softplus(-beta * (exp(a * (lp_w - ref_w)) - exp(a * (lp_l - ref_l))) / a)


def r_dpo(
    lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, len_w: Expr, len_l: Expr, *, beta: Hyper = BETA,
    alpha: Hyper = Rational(1, 100),
) -> Expr:
    r"""Length-regularised DPO: the length difference enters the margin inside the sigmoid.

    .. math:: \ell = \operatorname{softplus}\bigl(-(\beta h + \alpha(|y_w| - |y_l|))\bigr)

    Reference: Park et al. 2024, arXiv:2403.19159, Eq. 9, and sail-sg/oat
    ``oat/learners/loss.py`` ``DPOLoss.forward`` (commit c1a074c3), which adds
    ``len_reg_alpha / beta * (|y_w| - |y_l|)`` to the margin before multiplying by beta. The
    sign is a *plus*: when the chosen response is the longer one the margin grows with alpha,
    so the gradient weight sigma(-margin) on a longer chosen response *shrinks* as alpha grows
    (and grows on a longer rejected one), which is how the regulariser stops DPO from
    rewarding length. gradlab 0.1.0 had the sign reversed. Not in TRL. The paper sweeps
    alpha between 0.005 and 0.05; 0.01 is our default.
    """
    return softplus(-(beta * _margin(lp_w, lp_l, ref_w, ref_l) + alpha * (len_w - len_l)))


def dpop(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA, dpop_lambda: Hyper = 50) -> Expr:
    r"""DPO-positive (Smaug): penalise pushing the chosen log-ratio below zero.

    .. math:: \ell = \operatorname{softplus}\bigl(-\beta[h - \lambda\max(0, ref_w - lp_w)]\bigr)

    Reference: Pal et al. 2024, arXiv:2402.13228, Eq. 3 (lambda = 50 in the paper). Not in TRL.
    Not differentiable where ``lp_w = ref_w``.
    """
    return softplus(
        -beta * (_margin(lp_w, lp_l, ref_w, ref_l) - dpop_lambda * Max(0, ref_w - lp_w))
    )


def h_dpo(
    lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA, hdpo_alpha: Hyper = Rational(9, 10),
) -> Expr:
    r"""Entropy-controllable DPO: scale the policy's log-probs by alpha.

    .. math:: \ell = \operatorname{softplus}\bigl(-\beta[(\alpha\, lp_w - ref_w) - (\alpha\, lp_l - ref_l)]\bigr)

    Reference: Omura et al. 2024, arXiv:2411.07595 (H-DPO loss). alpha = 1 is DPO; alpha < 1
    sharpens the optimum, which is pi_0^{1/alpha} exp(r/(alpha beta)) normalised. Equal to
    ``gdpo`` with beta -> alpha beta and gamma -> beta. Not in TRL; 0.9 is our default.
    """
    return softplus(-beta * ((hdpo_alpha * lp_w - ref_w) - (hdpo_alpha * lp_l - ref_l)))


def ld_dpo(
    lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, tail_w: Expr, tail_l: Expr, *, beta: Hyper = BETA,
    ld_alpha: Hyper = Rational(1, 2),
) -> Expr:
    r"""Length-desensitised DPO: down-weight the policy's log-prob past the shorter response.

    .. math:: \hat{lp} = lp - (1-\alpha)\,tail, \qquad
              \ell = \operatorname{softplus}\bigl(-\beta[(\hat{lp}_w - ref_w) - (\hat{lp}_l - ref_l)]\bigr)

    ``tail`` is the log-prob of the tokens past the shorter response's length (zero for the
    shorter one), so ``lp - (1 - alpha) tail = shared + alpha tail``. Reference: Liu et al.
    2024, arXiv:2409.06411, Eq. 12, where only the policy's likelihood is desensitised. TRL 1.x
    (``ld_alpha``) desensitises the reference too: see ``ld_dpo_trl``.
    """
    hat_w = lp_w - (1 - ld_alpha) * tail_w
    hat_l = lp_l - (1 - ld_alpha) * tail_l
    return softplus(-beta * _margin(hat_w, hat_l, ref_w, ref_l))


def ld_dpo_trl(
    lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, tail_w: Expr, tail_l: Expr, ref_tail_w: Expr, ref_tail_l: Expr, *,
    beta: Hyper = BETA, ld_alpha: Hyper = Rational(1, 2),
) -> Expr:
    r"""Length-desensitised DPO as TRL implements it: policy and reference both desensitised.

    .. math:: \ell = \operatorname{softplus}\bigl(-\beta[(\hat{lp}_w - \hat{ref}_w) - (\hat{lp}_l - \hat{ref}_l)]\bigr),
              \quad \hat x = x - (1-\alpha)\,tail_x

    Reference: TRL 1.x ``DPOConfig.ld_alpha`` (applied in the forward pass of both models), from
    Liu et al. 2024, arXiv:2409.06411. Differs from ``ld_dpo`` in the reference term.
    """
    c = 1 - ld_alpha
    return softplus(
        -beta
        * _margin(lp_w - c * tail_w, lp_l - c * tail_l, ref_w - c * ref_tail_w, ref_l - c * ref_tail_l)
    )


# ============================================================================================
# Reference-free losses
# ============================================================================================


def simpo(lp_w: Expr, lp_l: Expr, len_w: Expr, len_l: Expr, *, beta: Hyper = 2, simpo_gamma: Hyper = 1) -> Expr:
    r"""Simple preference optimisation: length-normalised, reference-free, with a target margin.

    .. math:: \ell = \operatorname{softplus}\bigl(-(\beta\, lp_w/|y_w| - \beta\, lp_l/|y_l| - \gamma)\bigr)

    Reference: Meng et al. 2024, arXiv:2405.14734, Eq. 6 (beta = 2, gamma = 1 as in the paper's
    Llama-3 settings). TRL's CPOTrainer ``loss_type="simpo"`` adds an NLL term by default:
    see ``simpo_trl``.
    """
    return softplus(-(beta * lp_w / len_w - beta * lp_l / len_l - simpo_gamma))


def _smoothed(m: Expr, label_smoothing: Hyper) -> Expr:
    """cDPO's label-smoothed logistic loss on a logit ``m``: TRL's sigmoid-type losses."""
    return (1 - label_smoothing) * softplus(-m) + label_smoothing * softplus(m)


def simpo_trl(
    lp_w: Expr, lp_l: Expr, len_w: Expr, len_l: Expr, *, beta: Hyper = BETA, simpo_gamma: Hyper = Rational(1, 2),
    label_smoothing: Hyper = 0, cpo_alpha: Hyper = 1,
) -> Expr:
    r"""SimPO as TRL's CPOTrainer runs it: SimPO plus ``cpo_alpha`` times the chosen NLL.

    .. math:: \ell = (1-\epsilon)\operatorname{softplus}(-m) + \epsilon\operatorname{softplus}(m)
              - \alpha\, lp_w/|y_w|, \quad m = \beta(lp_w/|y_w| - lp_l/|y_l|) - \gamma

    Reference: TRL ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` (``trl/trainer/cpo_trainer.py``
    at v0.16.0, ``trl/experimental/cpo/cpo_trainer.py`` at 1.16.0): defaults beta = 0.1,
    simpo_gamma = 0.5, label_smoothing = 0, cpo_alpha = 1.0; the log-probs are per-token means
    and the NLL is the per-token mean cross-entropy of the chosen response (in TRL a token mean
    over every chosen token of the batch, as for ``cpo``). Differs from ``simpo`` (Meng et al.
    2024, arXiv:2405.14734, Eq. 6), which has no NLL term.
    """
    m = beta * (lp_w / len_w - lp_l / len_l) - simpo_gamma
    return _smoothed(m, label_smoothing) - cpo_alpha * lp_w / len_w


def cpo(
    lp_w: Expr, lp_l: Expr, len_w: Expr, *, beta: Hyper = BETA, label_smoothing: Hyper = 0, cpo_alpha: Hyper = 1,
) -> Expr:
    r"""Contrastive preference optimisation: reference-free DPO plus an NLL on the chosen.

    .. math:: \ell = (1-\epsilon)\operatorname{softplus}(-\beta(lp_w - lp_l))
              + \epsilon\operatorname{softplus}(\beta(lp_w - lp_l)) - \alpha\, lp_w/|y_w|

    Reference: Xu et al. 2024, arXiv:2401.08417, Eq. 6, as TRL's ``CPOTrainer.cpo_loss``
    (``loss_type="sigmoid"``, with ``label_smoothing`` as in cDPO; v0.16.0 and 1.16.0) computes
    it: the log-probs are summed over tokens and the NLL term is the per-token mean. The paper
    writes the NLL of the whole sequence (no 1/|y_w|) and has no label smoothing (epsilon = 0,
    our default and TRL's).

    TRL's NLL (``CPOTrainer.concatenated_forward``, an ``nn.CrossEntropyLoss`` over the chosen
    half of the batch) is a token mean over *every chosen token of the batch*, as for ``sft``:
    for one pair it is -lp_w/|y_w|, for a batch sum(lp_w)/sum(|y_w|), which weights each pair by
    its length, while the preference term is a mean over pairs. The same holds for every CPO
    loss type (``cpo_hinge``, ``cpo_ipo``, ``simpo_trl``, ``alphapo`` with ``cpo_alpha``).
    """
    return _smoothed(beta * (lp_w - lp_l), label_smoothing) - cpo_alpha * lp_w / len_w


def cpo_hinge(lp_w: Expr, lp_l: Expr, len_w: Expr, *, beta: Hyper = BETA, cpo_alpha: Hyper = 1) -> Expr:
    r"""CPOTrainer's reference-free hinge: SLiC's hinge on the summed log-prob margin, plus the NLL.

    .. math:: \ell = \max(0, 1 - \beta(lp_w - lp_l)) - \alpha\, lp_w/|y_w|

    Reference: TRL ``CPOTrainer.cpo_loss`` with ``loss_type="hinge"`` (v0.16.0 and 1.16.0), from
    Zhao et al. 2023, arXiv:2305.10425. Unlike DPOTrainer's ``hinge`` it has no reference model,
    and TRL adds ``cpo_alpha`` (default 1) times the chosen NLL to every CPO loss type.
    """
    return Max(0, 1 - beta * (lp_w - lp_l)) - cpo_alpha * lp_w / len_w


def cpo_ipo(lp_w: Expr, lp_l: Expr, len_w: Expr, len_l: Expr, *, beta: Hyper = BETA, cpo_alpha: Hyper = 1) -> Expr:
    r"""CPOTrainer's reference-free IPO on per-token mean log-probs, plus the NLL.

    .. math:: \ell = \bigl(lp_w/|y_w| - lp_l/|y_l| - \tfrac{1}{2\beta}\bigr)^2 - \alpha\, lp_w/|y_w|

    Reference: TRL ``CPOTrainer.cpo_loss`` with ``loss_type="ipo"`` (v0.16.0 and 1.16.0; the
    log-probs are averaged over tokens for ``ipo`` and ``simpo``), from Azar et al. 2023,
    arXiv:2310.12036, Eq. 17 without the reference model.
    """
    return (lp_w / len_w - lp_l / len_l - 1 / (2 * beta)) ** 2 - cpo_alpha * lp_w / len_w


def alphapo(
    lp_w: Expr, lp_l: Expr, len_w: Expr, len_l: Expr, *, beta: Hyper = BETA, simpo_gamma: Hyper = Rational(1, 2),
    alpha: Hyper = Rational(1, 4), label_smoothing: Hyper = 0, cpo_alpha: Hyper = 0,
) -> Expr:
    r"""AlphaPO: SimPO with the reward reshaped by an alpha-power of the per-token probability.

    .. math:: r = \frac{1 - e^{-\alpha\, lp/|y|}}{\alpha}, \quad m = \beta(r_w - r_l) - \gamma, \quad
              \ell = (1-\epsilon)\operatorname{softplus}(-m) + \epsilon\operatorname{softplus}(m) - c\, lp_w/|y_w|

    Reference: Gupta et al. 2025, arXiv:2501.03884; TRL ``CPOConfig(loss_type="alphapo")``,
    which sets ``loss_type="simpo"`` and ``cpo_alpha=0`` and applies ``r = (1 - p^(-alpha))/alpha``
    to the per-token mean probabilities (``trl/experimental/cpo/cpo_trainer.py``, 1.16.0).
    ``alpha -> 0`` gives ``log p``, i.e. SimPO. TRL's ``alpha`` defaults to 0 (plain SimPO); we
    default to 0.25 so that the loss differs from ``simpo_trl``. gradlab takes alpha > 0.
    """
    rw = (1 - exp(-alpha * lp_w / len_w)) / alpha
    rl = (1 - exp(-alpha * lp_l / len_l)) / alpha
    return _smoothed(beta * (rw - rl) - simpo_gamma, label_smoothing) - cpo_alpha * lp_w / len_w


def sft(lp_w: Expr, len_w: Expr) -> Expr:
    r"""Supervised fine-tuning on the chosen response: its per-token negative log-likelihood.

    .. math:: \ell = -lp_w/|y_w|

    Reference: TRL ``DPOTrainer`` ``loss_type="sft"`` (1.16.0: minus the mean log-prob of the
    chosen completion tokens), used in weighted combinations such as MPO
    (Wang et al. 2024, arXiv:2411.10442: ``sigmoid:0.8,bco_pair:0.2,sft:1``). TRL averages
    over all chosen tokens of the batch; for one pair that is this per-token mean.
    """
    return -lp_w / len_w


def orpo(lp_w: Expr, lp_l: Expr, len_w: Expr, len_l: Expr, *, beta: Hyper = BETA) -> Expr:
    r"""Odds-ratio preference optimisation: NLL plus a log-odds-ratio term, reference-free.

    .. math:: \ell = -\bar{lp}_w
              + \beta\operatorname{softplus}\bigl(
              -[\operatorname{lo}(\bar{lp}_w) - \operatorname{lo}(\bar{lp}_l)]\bigr),
              \quad \operatorname{lo}(a) = a - \log(1 - e^{a}),\ \bar{lp} = lp/|y|

    Reference: Hong et al. 2024, arXiv:2403.07691, Eqs. 6-7 (beta is the paper's lambda), with
    per-token averaged log-probs as in TRL's ORPOTrainer (0.1x and 1.x). TRL's NLL term is a
    token mean over the prompt *and* the chosen response (its comment: "computed over the full
    prompt and response"), over the whole batch; gradlab's is the response's, -lp_w/|y_w|.
    TRL computes the odds-ratio term in float32.
    """
    aw, al = lp_w / len_w, lp_l / len_l
    log_odds = (aw - log1mexp(aw)) - (al - log1mexp(al))
    return -aw + beta * softplus(-log_odds)


def slic(lp_w: Expr, lp_l: Expr, *, slic_delta: Hyper = 1, slic_lambda: Hyper = Rational(1, 10)) -> Expr:
    r"""SLiC-HF: a calibration hinge on the log-likelihood margin plus a regulariser on y_w.

    .. math:: \ell = \max(0, \delta - lp_w + lp_l) - \lambda\, lp_w

    Reference: Zhao et al. 2023, arXiv:2305.10425, Eq. 2, with the chosen response as the
    regularisation target (SLiC-HF with SFT on the chosen). The paper tunes delta and lambda;
    1 and 0.1 are our defaults. TRL's ``hinge`` is the reference-keeping variant (``hinge``).
    """
    return Max(0, slic_delta - lp_w + lp_l) - slic_lambda * lp_w


# ============================================================================================
# Unpaired
# ============================================================================================


def kto(
    lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA, desirable_weight: Hyper = 1,
    undesirable_weight: Hyper = 1, kto_z0: Hyper = 0,
) -> Expr:
    r"""Kahneman-Tversky optimisation on one desirable (y_w) and one undesirable (y_l) response.

    .. math:: \ell = \lambda_D\bigl(1 - \sigma(\beta(r_w - z_0))\bigr)
              + \lambda_U\bigl(1 - \sigma(\beta(z_0 - r_l))\bigr)

    Reference: Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 8; TRL ``KTOTrainer`` (``kto_loss``
    in v0.16.0, ``_compute_loss`` in 1.16.0; ``loss_type="kto"``) with
    ``desirable_weight``/``undesirable_weight``. The
    reference point z0 (in TRL a detached, clamped-at-0 batch estimate of KL(pi || pi_0) from
    mismatched completions) is a constant here. TRL averages over the examples of the batch;
    for one pair that is this sum divided by 2, a constant factor. TRL 0.x's DPOTrainer
    ``kto_pair`` (v0.9.3 and before; v0.9.6 refuses it) took z0 from the other half of the
    batch; it is an alias here.
    """
    return desirable_weight * (1 - sigmoid(beta * (lp_w - ref_w - kto_z0))) + undesirable_weight * (
        1 - sigmoid(beta * (kto_z0 - (lp_l - ref_l)))
    )


def apo_zero_unpaired(
    lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA, desirable_weight: Hyper = 1,
    undesirable_weight: Hyper = 1,
) -> Expr:
    r"""Anchored preference optimisation, zero variant, on unpaired desirable/undesirable data.

    .. math:: \ell = \lambda_D\bigl(1 - \sigma(\beta r_w)\bigr) + \lambda_U\,\sigma(\beta r_l)

    Reference: D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7 applied per example; TRL
    ``KTOTrainer`` with ``loss_type="apo_zero_unpaired"`` (v0.16.0 and 1.16.0), which
    computes no KL estimate. Equals ``apo_zero`` at unit weights.
    """
    return desirable_weight * (1 - sigmoid(beta * (lp_w - ref_w))) + undesirable_weight * sigmoid(beta * (lp_l - ref_l))


# ============================================================================================
# The first post's proper loss
# ============================================================================================


def pdpo(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA) -> Expr:
    r"""Proper (on-policy) DPO: the per-pair integrand of the expectation over policy samples.

    .. math:: J = \sum_{y, y'} \pi(y)\pi(y')\,\ell_{dpo}, \qquad
              \text{integrand} = e^{lp_w + lp_l}\operatorname{softplus}(-\beta h)

    The pair (y, y') is drawn from the policy being trained, and an oracle reward decides which
    one is y_w. The gradient of the integrand is
    ``pi(y) pi(y') [grad l + l (grad log pi(y) + grad log pi(y'))]``: DPO keeps only the first
    term, and from reference samples each term carries the weight pi(y)pi(y')/(pi_0(y)pi_0(y')).
    Exact expectations over a toy policy live in ``gradlab.checks``.
    Reference: Cho 2024, "Fixing DPO but I have a dinner reservation" (first post in ``docs/background.md``).
    """
    return exp(lp_w + lp_l) * dpo(lp_w, lp_l, ref_w, ref_l, beta=beta)


# ============================================================================================
# The registry
# ============================================================================================


# The sources every loss was audited against (read in full at these commits).
TRL_1 = Source("huggingface/trl", "v1.16.0", "the 1.16.0 release")
TRL_0 = Source("huggingface/trl", "23a635ed61c47609c88fd0fd7bfc7b08c398742d", "v0.16.0")
OAT = Source("sail-sg/oat", "c1a074c320ff5ca9fe9a4f669bf05208e2f310be", "main, 2025-10-31")
SIMPO_REPO = Source("princeton-nlp/SimPO", "1b3e8f3528a23bce3da514a2dce8ea7490d4bc75", "main")


def _impl(source: Source, path: str, function: str) -> Implementation:
    return Implementation(source, path, function)


_DPO1 = _impl(TRL_1, "trl/trainer/dpo_trainer.py", "DPOTrainer._compute_loss")
_DPO0 = _impl(TRL_0, "trl/trainer/dpo_trainer.py", "DPOTrainer.dpo_loss")
_CPO1 = _impl(TRL_1, "trl/experimental/cpo/cpo_trainer.py", "CPOTrainer.cpo_loss")
_CPO0 = _impl(TRL_0, "trl/trainer/cpo_trainer.py", "CPOTrainer.cpo_loss")
_KTO1 = _impl(TRL_1, "trl/trainer/kto_trainer.py", "KTOTrainer._compute_loss")
_KTO0 = _impl(TRL_0, "trl/trainer/kto_trainer.py", "KTOTrainer.kto_loss")
_ORPO1 = _impl(TRL_1, "trl/experimental/orpo/orpo_trainer.py", "ORPOTrainer.odds_ratio_loss")
_ORPO0 = _impl(TRL_0, "trl/trainer/orpo_trainer.py", "ORPOTrainer.odds_ratio_loss")
_OAT_DPO = _impl(OAT, "oat/learners/loss.py", "DPOLoss.forward")
_OAT_SIMPO = _impl(OAT, "oat/learners/loss.py", "SimPOLoss.forward")
_SIMPO = _impl(SIMPO_REPO, "scripts/simpo_trainer.py", "SimPOTrainer.simpo_loss")

_AGREES = "agrees with every implementation read"
_NO_IMPL = "no public reference implementation found; checked against the equation only"

_OPEN_UNIT = Domain(low=0.0, high=1.0)
_EXO_SMOOTHING = Domain(low=0.0, high=0.5)

_POSITIVE = Domain(low=0.0)
_ORPO_DOMAINS = {"lp_w": Domain(high=0.0), "lp_l": Domain(high=0.0), "p_w": Domain(low=0.0, high=1.0),
                 "p_l": Domain(low=0.0, high=1.0)}

_TABLE: tuple[Loss, ...] = (
    Loss.of(dpo, aliases=("sigmoid",), references=("arXiv:2305.18290",), equation="Rafailov et al. 2023, Eq. 7",
            implementations=(_DPO1, _DPO0, _OAT_DPO), audit=_AGREES),
    Loss.of(gdpo, references=("https://kyunghyuncho.me/ (Cho 2024, 'Continued musing on DPO')",),
            equation="Cho 2024 (second post)",
            audit="gradlab's own loss from the post; no implementation exists. gamma = beta gives dpo (tested)"),
    Loss.of(cdpo, references=("https://ericmitchell.ai/cdpo.pdf",), equation="Mitchell 2023, Eq. 3",
            implementations=(_DPO0, _OAT_DPO),
            audit="agrees with TRL 0.x and oat (`sigmoid` with `label_smoothing`). TRL 1.x dropped label smoothing "
            "from `sigmoid`; default 0.1 is gradlab's (TRL's 0 is plain DPO)"),
    Loss.of(robust, references=("arXiv:2403.00409",), equation="Chowdhury et al. 2024, Eq. 8",
            implementations=(_DPO1, _DPO0),
            audit=_AGREES + ". Default label_smoothing 0.1 is the paper's and gradlab's; TRL's default 0 makes it "
            "plain DPO (`gradlab show robust` says so)"),
    Loss.of(hinge, references=("arXiv:2305.10425",), equation="Zhao et al. 2023 (SLiC), Eq. 2 with the reference",
            implementations=(_DPO1, _DPO0, _OAT_DPO),
            audit=_AGREES + " (oat's DAPAlgo.SLiC is this reference-keeping hinge). CPOTrainer's `hinge` is "
            "reference-free: `cpo_hinge`"),
    Loss.of(ipo, references=("arXiv:2310.12036",), equation="Azar et al. 2023, Eq. 17",
            implementations=(_DPO1, _OAT_DPO),
            audit="the paper's summed log-probs. TRL (0.x and 1.x) and oat (DAPAlgo.IPO) both average the "
            "log-probs over tokens: that is `ipo_trl`; TRL says the IPO authors confirmed the averaged form",
            trl_variant=("ipo_trl", "TRL's DPOTrainer `loss_type=\"ipo\"` averages the log-ratios over tokens")),
    Loss.of(ipo_trl, references=("arXiv:2310.12036",), length_normalised=True,
            equation="Azar et al. 2023, Eq. 17, per-token averaged", implementations=(_DPO1, _DPO0, _OAT_DPO),
            audit=_AGREES),
    Loss.of(exo_pair, references=("arXiv:2402.00856",), domains={"label_smoothing": _EXO_SMOOTHING},
            equation="Ji et al. 2024, Eq. 16", implementations=(_DPO1, _DPO0),
            audit=_AGREES + "; TRL 0.x silently replaces epsilon = 0 by 1e-3, TRL 1.x refuses 0"),
    Loss.of(nca_pair, references=("arXiv:2402.05369",), equation="Chen et al. 2024 (NCA), pairwise loss",
            implementations=(_DPO1, _DPO0), audit=_AGREES),
    Loss.of(bco_pair, references=("arXiv:2404.04656",), equation="Jung et al. 2024 (BCO), pairwise loss",
            implementations=(_DPO1, _DPO0),
            audit="TRL 0.x shifts both rewards by delta, a running mean of batch rewards (held constant here as "
            "`bco_delta`); TRL 1.x drops the shift (delta = 0, the default)"),
    Loss.of(sppo_hard, references=("arXiv:2405.00675",), equation="Wu et al. 2024, Eq. 4.7 with hard P",
            implementations=(_DPO1, _DPO0), audit=_AGREES),
    Loss.of(apo_zero, references=("arXiv:2408.06266",), equation="D'Oosterlinck et al. 2024, Eq. 7",
            implementations=(_DPO1, _DPO0), audit=_AGREES),
    Loss.of(apo_down, references=("arXiv:2408.06266",), equation="D'Oosterlinck et al. 2024, Eq. 8",
            implementations=(_DPO1, _DPO0), audit=_AGREES),
    Loss.of(discopop, references=("arXiv:2406.08414",), equation="Lu et al. 2024, Eq. 5",
            implementations=(_DPO1, _DPO0), audit=_AGREES),
    Loss.of(sigmoid_norm, references=("arXiv:2405.14734",), length_normalised=True,
            equation="TRL 1.x `sigmoid_norm` (LN-DPO of Meng et al. 2024, Sec. 4)",
            implementations=(_DPO1, _impl(OAT, "oat/learners/loss.py", "DPOLoss.forward (DAPAlgo.LR_DPO)")),
            audit=_AGREES + " (oat's LR_DPO averages the log-probs, then runs DPOLoss)"),
    Loss.of(rpo, references=("arXiv:2404.19733",), equation="Pang et al. 2024, Eq. 1 (NLL per token)",
            implementations=(_DPO0, _OAT_DPO),
            audit="agrees with TRL 0.x `rpo_alpha` and oat `sft_weight` (per-token NLL of the chosen). TRL 1.x "
            "removed `rpo_alpha`: write `sigmoid:1,sft:ALPHA` (equal, tested)"),
    Loss.of(fdpo_fkl, aliases=("forward_kl",), references=("arXiv:2309.16240",),
            equation="Wang et al. 2023, Table 1 (forward KL)", implementations=(_DPO1,),
            audit=_AGREES + " (TRL 0.x has no forward_kl)"),
    Loss.of(fdpo_js, aliases=("js_divergence",), references=("arXiv:2309.16240",),
            equation="Wang et al. 2023, Table 1 (Jensen-Shannon)", implementations=(_DPO1, _DPO0),
            audit=_AGREES + " (0.x writes h - softplus(r_w) + softplus(r_l), 1.x log sigma(r_w) - log sigma(r_l): "
            "equal)"),
    Loss.of(fdpo_alpha, references=("arXiv:2309.16240",), equation="Wang et al. 2023, Table 1 (alpha-divergence)",
            implementations=(_DPO0,),
            audit="agrees with TRL 0.x; TRL 1.x uses alpha' = 1 - alpha: `fdpo_alpha_trl`",
            trl_variant=("fdpo_alpha_trl", "TRL 1.x's `f_divergence_type=\"alpha_divergence\"` uses "
                         "f'(t) = (t^(alpha-1) - 1)/(alpha - 1), i.e. alpha' = 1 - alpha")),
    Loss.of(fdpo_alpha_trl, aliases=("alpha_divergence",), references=("arXiv:2309.16240",),
            equation="Wang et al. 2023, Table 1, TRL 1.x's convention", implementations=(_DPO1,),
            audit=_AGREES + "; TRL computes the exponential in float32 with the exponent clamped at 80, and "
            "raises KeyError on float64 log-probs (1.16.0 looks the clamp up by dtype)"),
    Loss.of(r_dpo, aliases=("rdpo",), references=("arXiv:2403.19159",), equation="Park et al. 2024, Eq. 9",
            implementations=(_OAT_DPO,),
            audit="FIXED: gradlab 0.1.0 had -alpha(|y_w| - |y_l|); the paper and oat add +alpha(|y_w| - |y_l|)"),
    Loss.of(dpop, aliases=("dpo_positive",), references=("arXiv:2402.13228",), equation="Pal et al. 2024, Eq. 3",
            implementations=(_OAT_DPO,), audit=_AGREES + " (oat `dpo_positive_lambda`)"),
    Loss.of(h_dpo, aliases=("hdpo",), references=("arXiv:2411.07595",), equation="Omura et al. 2024, H-DPO loss",
            audit=_NO_IMPL),
    Loss.of(ld_dpo, aliases=("lddpo",), references=("arXiv:2409.06411",), equation="Liu et al. 2024, Eq. 12",
            implementations=(_DPO1,),
            audit="the paper desensitises the policy only; TRL 1.x also the reference: `ld_dpo_trl`",
            trl_variant=("ld_dpo_trl", "TRL's `ld_alpha` desensitises the reference log-probs too")),
    Loss.of(ld_dpo_trl, references=("arXiv:2409.06411",), equation="Liu et al. 2024, Eq. 12, TRL's form",
            implementations=(_DPO1,), audit=_AGREES + " (TRL 0.16 has no `ld_alpha`)"),
    Loss.of(simpo, references=("arXiv:2405.14734",), length_normalised=True, equation="Meng et al. 2024, Eq. 6",
            implementations=(_SIMPO, _OAT_SIMPO),
            audit=_AGREES + " (they write gamma as `gamma_beta_ratio` = gamma/beta; defaults are the Llama-3-8B "
            "base config, beta 2, gamma/beta 0.5)",
            trl_variant=("simpo_trl", "TRL's CPOTrainer `loss_type=\"simpo\"` adds `cpo_alpha` (default 1) times "
                         "the chosen NLL, with TRL's defaults beta 0.1, simpo_gamma 0.5")),
    Loss.of(simpo_trl, references=("arXiv:2405.14734",), length_normalised=True,
            equation="Meng et al. 2024, Eq. 6, plus TRL's NLL", implementations=(_CPO1, _CPO0),
            audit="agrees; `label_smoothing` added after gradlab 0.1.0 (TRL smooths simpo like sigmoid)"),
    Loss.of(cpo, references=("arXiv:2401.08417",), equation="Xu et al. 2024, Eq. 6 (NLL per token, as TRL)",
            implementations=(_CPO1, _CPO0),
            audit="agrees; `label_smoothing` added after gradlab 0.1.0. The paper's NLL is summed, TRL's per token"),
    Loss.of(cpo_hinge, references=("arXiv:2305.10425", "arXiv:2401.08417"),
            equation="Zhao et al. 2023, Eq. 2, reference-free, plus TRL's NLL", implementations=(_CPO1, _CPO0),
            audit="added after gradlab 0.1.0; " + _AGREES),
    Loss.of(cpo_ipo, references=("arXiv:2310.12036", "arXiv:2401.08417"), length_normalised=True,
            equation="Azar et al. 2023, Eq. 17, reference-free and per token, plus TRL's NLL",
            implementations=(_CPO1, _CPO0), audit="added after gradlab 0.1.0; " + _AGREES),
    Loss.of(alphapo, references=("arXiv:2501.03884",), length_normalised=True, domains={"alpha": _POSITIVE},
            equation="Gupta et al. 2025 (AlphaPO reward in SimPO)", implementations=(_CPO1,),
            audit="added after gradlab 0.1.0; agrees with TRL 1.x `alpha` (TRL 0.16 has no AlphaPO)"),
    # the odds p/(1-p) of the per-token mean probability need p < 1, i.e. lp < 0 strictly
    Loss.of(orpo, references=("arXiv:2403.07691",), length_normalised=True, domains=_ORPO_DOMAINS,
            equation="Hong et al. 2024, Eqs. 6-7", implementations=(_ORPO1, _ORPO0),
            audit="the odds-ratio term agrees (TRL computes it in float32); TRL's NLL is a token mean over the "
            "prompt and the chosen response, gradlab's over the response only"),
    Loss.of(slic, aliases=("slic_hf",), references=("arXiv:2305.10425",), equation="Zhao et al. 2023, Eq. 2",
            audit=_NO_IMPL + " (oat's SLiC and TRL's hinge are the reference-keeping `hinge`)"),
    Loss.of(sft, references=("arXiv:2411.10442",), equation="per-token NLL of the chosen response",
            implementations=(_DPO1,), audit="added after gradlab 0.1.0; " + _AGREES),
    Loss.of(kto, aliases=("kto_pair",), references=("arXiv:2402.01306",), equation="Ethayarajh et al. 2024, Eq. 8",
            implementations=(_KTO1, _KTO0),
            audit="agrees with z0 held constant (TRL: a detached batch KL estimate) and the two examples summed "
            "(TRL averages them: a factor 1/2)"),
    Loss.of(apo_zero_unpaired, references=("arXiv:2408.06266",),
            equation="D'Oosterlinck et al. 2024, Eq. 7, per example", implementations=(_KTO1, _KTO0),
            audit="added after gradlab 0.1.0; agrees (examples summed; TRL averages them)"),
    Loss.of(
        pdpo,
        aliases=("proper_dpo",),
        references=("https://kyunghyuncho.me/ (Cho 2024, 'Fixing DPO but I have a dinner reservation')",),
        kind="expectation",
        equation="Cho 2024 (first post)",
        audit="gradlab's own loss from the post; no implementation exists",
    ),
)

LOSSES: Mapping[str, Loss] = MappingProxyType({loss.name: loss for loss in _TABLE})
ALIASES: Mapping[str, str] = MappingProxyType(
    {alias: loss.name for loss in _TABLE for alias in loss.aliases}
)

# Names users bring from TRL that are not per-pair functions, so gradlab cannot derive them.
OUT_OF_SCOPE: Mapping[str, str] = MappingProxyType(
    {
        "aot": "TRL's AOT (arXiv:2406.05882) sorts the policy and reference log-ratios across the "
        "whole batch before pairing them, so the loss of one pair depends on every other pair; "
        "it is not a per-pair function of (lp_w, lp_l, ref_w, ref_l).",
        "aot_pair": "TRL's paired AOT sorts log-ratios across the batch (arXiv:2406.05882); it is "
        "batch-level, not a per-pair function.",
        "aot_unpaired": "TRL's unpaired AOT sorts chosen and rejected log-ratios separately across "
        "the batch (arXiv:2406.05882); it is batch-level, not a per-pair function.",
    }
)

# Named weighted combinations (TRL's loss_type lists with loss_weights).
COMBINATIONS: Mapping[str, str] = MappingProxyType({"mpo": "sigmoid:0.8,bco_pair:0.2,sft:1"})


def _trl_names() -> dict[str, str]:
    """``trainer.loss_type`` -> gradlab loss, from the first TRL row with that key."""
    out: dict[str, str] = {}
    for row in TRL_CONFIGS:
        if row.loss and "," not in row.key:
            out.setdefault(row.key, row.loss)
    return out


TRL_NAMES: Mapping[str, str] = MappingProxyType(_trl_names())


def loss_names() -> list[str]:
    """Every single-loss name ``get_loss`` accepts (case-insensitively): registered names,
    aliases, named combinations and TRL's ``trainer.loss_type`` names."""
    return sorted({*LOSSES, *ALIASES, *COMBINATIONS, *TRL_NAMES})


def _normalise(name: str) -> str:
    """Case- and dash-insensitive spelling: ``SimPO`` -> ``simpo``, ``R-DPO`` -> ``r_dpo``."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _resolve_one(name: str) -> Loss | str:
    """A registered loss, or the text of a named combination, for one loss name."""
    key = _normalise(name)
    if key in LOSSES:
        return LOSSES[key]
    if key in ALIASES:
        return LOSSES[ALIASES[key]]
    if key in COMBINATIONS:
        return COMBINATIONS[key]
    if key in TRL_NAMES:
        return _resolve_one(TRL_NAMES[key])
    trainer, dot, loss_type = key.partition(".")
    if dot and trainer.removesuffix("trainer").removesuffix("config") in ("dpo", "cpo", "kto", "orpo"):
        short = f"{trainer.removesuffix('trainer').removesuffix('config')}.{loss_type}"
        if short in TRL_NAMES:
            return _resolve_one(TRL_NAMES[short])
        key = loss_type
    from gradlab import group_losses  # deriving the group registry costs ~0.4 s: only when a name needs it

    group = group_losses.find(name)
    if group is not None:
        return group
    out_of_scope = out_of_scope_reason(key)
    if out_of_scope:
        raise UnknownLossError(f"'{name}' is known but out of scope: {out_of_scope}")
    close = difflib.get_close_matches(key, loss_names() + group_losses.group_loss_names(), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownLossError(
        f"unknown loss '{name}'.{hint} Run 'gradlab list' for all {len(LOSSES)} losses; a weighted "
        "combination is written like sigmoid:0.8,bco_pair:0.2,sft:1."
    )


def out_of_scope_reason(name: str) -> str | None:
    """Why a known TRL name (``aot``, ``AOT``, ``dpo.aot_pair``) is out of scope; None otherwise."""
    return OUT_OF_SCOPE.get(_normalise(name).rpartition(".")[2])


def _weight(text: str, item: str) -> sympy.Rational:
    try:
        w = float(text)
    except ValueError:
        raise UnknownLossError(
            f"'{item}': the weight '{text}' is not a number (write NAME:WEIGHT, e.g. sigmoid:0.8)"
        ) from None
    if not math.isfinite(w) or w <= 0:
        raise UnknownLossError(f"'{item}': a weight must be a finite positive number, not {text}")
    return sympy.nsimplify(w, rational=True)


def _parse_combination(text: str) -> tuple[tuple[Loss, sympy.Rational], ...]:
    """``"sigmoid:0.8,bco_pair:0.2,sft"`` -> ((dpo, 4/5), (bco_pair, 1/5), (sft, 1))."""
    parts: list[tuple[Loss, sympy.Rational]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise UnknownLossError(f"empty entry in the loss combination '{text}'")
        name, colon, weight = item.partition(":")
        w = _weight(weight.strip(), item) if colon else sympy.Integer(1)
        found = _resolve_one(name)
        if isinstance(found, str):  # a named combination inside a combination: scale its parts
            parts += [(loss, w * inner) for loss, inner in _parse_combination(found)]
        else:
            parts.append((found, w))
    return tuple(parts)


def _intersect(a: Domain, b: Domain) -> Domain:
    low, low_open = max((a.low, a.low_open), (b.low, b.low_open))
    high, high_open = min((a.high, not a.high_open), (b.high, not b.high_open))
    return Domain(low=low, high=high, low_open=low_open, high_open=not high_open)


def combine(parts: Sequence[tuple[Loss, Any]]) -> Loss:
    """The weighted sum of losses as one ``Loss``: TRL's ``loss_type`` list with ``loss_weights``.

    Hyperparameters with the same name are *one* hyperparameter of the combination, as in TRL,
    where one config gives every loss type the same ``beta``: its default is the first
    component's, and where components' defaults differ the combination's ``doc`` says so. Its
    legal range is the intersection of the components' ranges.

    Args:
        parts: ``(loss, weight)`` pairs; a weight is a number or a sympy rational.

    Returns:
        The combination, named ``"name:weight,..."`` as :func:`get_loss` reads it back.
    """
    if not parts:
        raise UnknownLossError("an empty loss combination")
    kinds = {loss.kind for loss, _ in parts}
    if kinds != {"pair"}:
        raise UnknownLossError(
            "only per-pair losses can be combined; " + ", ".join(l.name for l, _ in parts if l.kind != "pair")
            + " is an expectation over policy samples"
        )
    weights = [sympy.nsimplify(w, rational=True) for _, w in parts]
    name = ",".join(f"{loss.name}:{float(w):g}" for (loss, _), w in zip(parts, weights, strict=True))
    defaults: dict[str, sympy.Expr | None] = {}
    domains: dict[str, Domain] = {}
    notes = []
    for loss, _ in parts:
        for k, v in loss.defaults.items():
            if k not in defaults:
                defaults[k], domains[k] = v, loss.domain(k)
                continue
            domains[k] = _intersect(domains[k], loss.domain(k))
            if v != defaults[k]:
                notes.append(f"{k}: {loss.name}'s default {v} differs; the first default, {defaults[k]}, is used")
    expr = sympy.Add(*[w * loss.expr for (loss, _), w in zip(parts, weights, strict=True)])
    used = set(expr.free_symbols)
    variables = tuple(v for v in SYMBOLS if SYMBOLS[v].symbol in used and any(v in l.variables for l, _ in parts))
    terms = " + ".join(f"{float(w):g}*{loss.name}" for (loss, _), w in zip(parts, weights, strict=True))
    doc = (
        f"Weighted combination {terms} (TRL's loss_type list with loss_weights). Hyperparameters "
        "with the same name are shared, as in TRL's single config."
        + ("\n" + "\n".join(notes) if notes else "")
    )
    return Loss(
        name=name,
        title=f"weighted combination: {terms}",
        doc=doc,
        variables=variables,
        defaults=MappingProxyType(defaults),
        custom_expr=expr,
        references=tuple(dict.fromkeys(r for loss, _ in parts for r in loss.references)),
        length_normalised=any(loss.length_normalised for loss, _ in parts),
        domains=MappingProxyType(domains),
        implementations=tuple(dict.fromkeys(i for loss, _ in parts for i in loss.implementations)),
        components=tuple((loss.name, w) for (loss, _), w in zip(parts, weights, strict=True)),
    )


@caches.memo(maxsize=256)
def _combination(canonical: str) -> Loss:
    return combine(_parse_combination(canonical))


def get_loss(name: str) -> Loss:
    """The loss called ``name``: a registered name or alias, a TRL name (``ipo``, ``DPO``,
    ``cpo.hinge``, ``kto.apo_zero_unpaired``), any case; or a weighted combination of them,
    ``"sigmoid:0.8,bco_pair:0.2,sft:1"`` (a missing weight is 1). A group loss (``grpo``,
    ``dr_grpo``, ``grpo.dapo``, ``rloo``: :mod:`gradlab.group_losses`) is a ``Loss`` of kind
    ``"group"`` whose ``expr`` is its per-token weight."""
    if not isinstance(name, str):
        raise UnknownLossError(f"a loss name is a string, not {type(name).__name__}")
    if "," not in name and ":" not in name:
        found = _resolve_one(name)
        if isinstance(found, Loss):
            return found
        name = found
    parts = _parse_combination(name)
    canonical = ",".join(f"{loss.name}:{float(w)!r}" for loss, w in parts)
    return _combination(canonical)


def from_trl_config(trainer: str, config: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The gradlab loss and hyperparameter values that reproduce a TRL 1.x configuration per pair.

    Args:
        trainer: ``dpo``, ``cpo``, ``kto`` or ``orpo`` (``DPOTrainer`` and ``DPOConfig`` work too).
        config: the config's fields (a dict, or ``vars(DPOConfig(...))``); fields left out take
            TRL's defaults (:data:`gradlab.trl.TRL_DEFAULTS`), and fields that do not change the
            per-pair formula are ignored.

    Returns:
        The loss name (a weighted combination for a list of DPO loss types) and the values of its
        hyperparameters to pass as ``values=`` wherever gradlab takes them. TRL's batch means are
        left out, as everywhere in gradlab (see :func:`gradlab.trl.resolve_config`).

    >>> from_trl_config("dpo", {"loss_type": "robust"})
    ('robust', {'beta': 0.1, 'label_smoothing': 0.0})

    A configuration with no gradlab loss raises :class:`~gradlab.errors.UnknownLossError` saying so.
    """
    name, values = resolve_config(trainer, config)
    hyper = get_loss(name).hyperparameters
    return name, {k: v for k, v in values.items() if k in hyper}


def custom(
    formula: str,
    *,
    name: str = "custom",
    defaults: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Loss:
    """A user-defined loss from a formula in the canonical variables and hyperparameter names.

    The formula is parsed safely (see :mod:`gradlab.parsing`); everything that works for a
    registered loss (gradients in every view, LaTeX, evaluation, checks) then works for it.
    ``defaults`` gives default values for the hyperparameters it uses; without one, a value
    must be given when the loss is evaluated.

    Args:
        formula: the loss in the canonical variables (``lp_w``, ``len_l``, ...) and hyperparameter
            names (``beta``, ...).
        name: the name it is shown under.
        defaults: default values of its hyperparameters.
        title: a one-line description (default: "user-defined loss" and the formula).

    Returns:
        The loss, usable wherever a registered one is.

    >>> custom("log(1 + exp(-beta*(lp_w - lp_l)))", defaults={"beta": 0.1}).variables
    ('lp_w', 'lp_l')
    """
    expr = parse(formula)
    if defaults is not None and not isinstance(defaults, Mapping):
        raise ParseError(f"defaults must be a mapping of hyperparameter names to numbers, not "
                         f"{type(defaults).__name__}")
    allowed = {s for s in CANONICAL + EXTRA}
    hyper = {info.symbol for info in HYPERPARAMETERS.values()}
    outside = sorted(s.name for s in expr.free_symbols - allowed - hyper)
    if outside:
        raise ParseError(
            f"a loss is written in the canonical variables ({', '.join(s.name for s in CANONICAL + EXTRA)}); "
            f"{', '.join(outside)} belong to a view, not to the canonical form"
        )
    used_hyper = [k for k, v in HYPERPARAMETERS.items() if v.symbol in expr.free_symbols]
    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - set(used_hyper))
    if unknown:
        raise ParseError(
            f"defaults given for {', '.join(unknown)}, which the formula does not use "
            f"(it uses: {', '.join(used_hyper) or 'no hyperparameters'})"
        )
    for k, v in defaults.items():
        try:
            if isinstance(v, bool):
                raise TypeError
            x = float(v)
        except (TypeError, ValueError, OverflowError):
            raise ParseError(f"default {k}={v!r} is not a number") from None
        defaults[k] = v if isinstance(v, int | sympy.Rational) else x  # never sympify a string
        if not HYPERPARAMETERS[k].domain.contains(x):
            raise ParseError(f"default {k}={v} is outside its domain {HYPERPARAMETERS[k].domain}")
    return Loss(
        name=name,
        title=title or f"user-defined loss {formula}",
        doc=f"User-defined loss: {formula}",
        variables=tuple(s.name for s in CANONICAL + EXTRA if s in expr.free_symbols),
        defaults=MappingProxyType(
            {k: sympy.nsimplify(defaults[k], rational=True) if k in defaults else None for k in used_hyper}
        ),
        custom_expr=expr,
    )
