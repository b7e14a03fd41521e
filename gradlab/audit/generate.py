"""A preference dataset whose right answer is known: pairs from a toy policy, labelled by a known reward.

The toy is a unigram policy with an EOS token (the ``unigram`` family of :mod:`gradlab.policies`,
here sampled with numpy so a million pairs take a second). A response is ``k`` content tokens
followed by EOS, so its length ``k + 1`` is geometric and its log-probability is exact:
``sum_t log q(y_t) + k log(1 - e) + log e``.

- The reference pi_0 has per-step EOS probability ``eos`` and content tokens in pairs of equal
  probability; the token rewards are ``+c`` and ``-c`` within each pair, so the reward
  ``r(y) = sum_t u(y_t) + length_bias * |y|`` is symmetric in sign when ``length_bias = 0``.
- Two responses are drawn independently from pi_0 (as in DPO's offline data), and the first is
  chosen with the Bradley-Terry probability sigma(r(y) - r(y')).
- The policy being trained is pi_0 with its content tokens tilted by the reward,
  pi(k) ~ q(k) exp(tilt * u(k)), the direction DPO moves it in; ``tilt = 0`` is the start of training.

Truth: with ``length_bias = 0`` the sign symmetry of the reward makes the chosen and rejected
lengths identically distributed and the paired difference symmetric about 0, so a correct
length test reports no difference (its false-positive rate is its level); with
``length_bias > 0`` longer responses win more often and the chosen are longer.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.errors import GradlabError

__all__ = ["generate", "generate_rollouts", "write", "TOKEN_REWARDS", "TOKEN_PROBS"]

# Content tokens: three pairs of equal probability, rewards +c and -c within a pair.
TOKEN_PROBS = np.array([0.25, 0.25, 0.15, 0.15, 0.1, 0.1])
TOKEN_REWARDS = np.array([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
WORDS = ("good", "bad", "fine", "poor", "great", "awful")


def _responses(rng: np.random.Generator, n: int, eos: float, probs: np.ndarray):
    k = rng.geometric(eos, size=n) - 1  # content tokens before EOS (0, 1, 2, ...)
    counts = rng.multinomial(k, probs)  # (n, V): a unigram's log-prob depends only on the counts
    return k, counts


def generate(
    n_pairs: int,
    *,
    length_bias: float = 0.0,
    eos: float = 0.05,
    tilt: float = 0.3,
    policy: bool = True,
    text: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Columns of a dataset (TRL's names) of ``n_pairs`` pairs; see the module docstring.

    ``policy=False`` leaves out the policy's log-probs (the audit then takes policy = reference);
    ``text=True`` adds ``prompt``, ``chosen`` and ``rejected`` text (one word per token, EOS
    written ``</s>``, so whitespace words = tokens) and is meant for small files.

    Args:
        n_pairs: pairs drawn.
        length_bias: reward per token of length; 0 makes the true length effect nil.
        eos: the reference's EOS probability per step (mean length 1/eos tokens).
        tilt: how far the policy is tilted toward the reward (0: the policy is the reference).
        policy: include the policy's log-probs.
        text: include text columns.
        seed: the random seed.

    Returns:
        TRL column name to its values (an array, or a list of texts), one per pair; :func:`write`
        saves them.
    """
    if n_pairs < 1:
        raise GradlabError(f"n_pairs must be positive, not {n_pairs}")
    if not 0 < eos < 1:
        raise GradlabError(f"eos must be in (0, 1), not {eos}")
    rng = np.random.default_rng(seed)
    log_q = np.log(TOKEN_PROBS)
    tilted = TOKEN_PROBS * np.exp(tilt * TOKEN_REWARDS)
    log_p = np.log(tilted / tilted.sum())
    k_a, c_a = _responses(rng, n_pairs, eos, TOKEN_PROBS)
    k_b, c_b = _responses(rng, n_pairs, eos, TOKEN_PROBS)
    len_a, len_b = k_a + 1.0, k_b + 1.0
    r_a = c_a @ TOKEN_REWARDS + length_bias * len_a
    r_b = c_b @ TOKEN_REWARDS + length_bias * len_b
    # Bradley-Terry label: P(a preferred) = sigma(r_a - r_b), in the overflow-free form
    a_wins = rng.random(n_pairs) < np.exp(-np.logaddexp(0.0, -(r_a - r_b)))

    def logp(counts, k, log_tokens):
        return counts @ log_tokens + k * np.log1p(-eos) + np.log(eos)

    def pick(x, y):
        m = a_wins.reshape((-1,) + (1,) * (np.ndim(x) - 1))
        return np.where(m, x, y), np.where(m, y, x)

    out: dict[str, Any] = {}
    if text:
        out["prompt"] = [f"Prompt {i}: describe the weather." for i in range(n_pairs)]
        ca, cb = pick(c_a, c_b)
        out["chosen"] = [_words(rng, c) for c in ca]
        out["rejected"] = [_words(rng, c) for c in cb]
    if policy:
        out["chosen_logps"], out["rejected_logps"] = pick(logp(c_a, k_a, log_p), logp(c_b, k_b, log_p))
    out["ref_chosen_logps"], out["ref_rejected_logps"] = pick(logp(c_a, k_a, log_q), logp(c_b, k_b, log_q))
    out["chosen_length"], out["rejected_length"] = pick(len_a, len_b)
    out["chosen_reward"], out["rejected_reward"] = pick(r_a, r_b)
    return out


def _words(rng: np.random.Generator, counts: np.ndarray) -> str:
    tokens = np.repeat(np.arange(counts.size), counts)
    rng.shuffle(tokens)
    return " ".join([*(WORDS[t] for t in tokens), "</s>"])


def write(path: str | os.PathLike, columns: dict[str, Any]) -> Path:
    """Write columns as JSON Lines, CSV or Parquet (by the file's extension); atomically."""
    from gradlab.output import atomic_path

    p = Path(path)
    fmt = p.suffix.lower()
    if fmt not in (".jsonl", ".json", ".csv", ".parquet", ".pq"):
        raise GradlabError(f"unknown format '{fmt}': write .jsonl, .csv or .parquet")
    names = list(columns)
    n = len(columns[names[0]])
    plain = {c: [_plain(x) for x in v.tolist()] if isinstance(v, np.ndarray) else list(v) for c, v in columns.items()}
    with atomic_path(p) as tmp:
        if fmt in (".jsonl", ".json"):
            with open(tmp, "w", encoding="utf-8") as f:
                for i in range(n):
                    f.write(json.dumps({c: plain[c][i] for c in names}) + "\n")
        elif fmt == ".csv":
            import csv

            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(names)
                for i in range(n):
                    w.writerow([plain[c][i] for c in names])
        elif fmt in (".parquet", ".pq"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({c: (np.asarray(v) if isinstance(v, np.ndarray) else v) for c, v in columns.items()})
            pq.write_table(table, tmp)
    return p


def main(argv: list[str] | None = None, prog: str = "python -m gradlab.audit") -> int:
    """python -m gradlab.audit OUT [--pairs N | --rollouts PROMPTS] [--length-bias X] [--seed S] [...]"""
    import argparse

    p = argparse.ArgumentParser(prog=prog,
                                description="Write a preference dataset with a known answer (see the module docs).")
    p.add_argument("out", help="the file to write: .jsonl, .csv or .parquet")
    p.add_argument("--pairs", type=int, default=1000, help="number of pairs (default 1000)")
    p.add_argument("--length-bias", type=float, default=0.0, help="reward per token of length (default 0: none)")
    p.add_argument("--tilt", type=float, default=0.3, help="how far the policy is tilted by the reward (default 0.3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-policy", action="store_true", help="leave out the policy log-probs (at initialisation)")
    p.add_argument("--text", action="store_true", help="add prompt, chosen and rejected text")
    g = p.add_argument_group("rollout logs (GRPO family; see generate_rollouts)")
    g.add_argument("--rollouts", type=int, metavar="PROMPTS", help="write a rollout log of this many groups instead "
                   "of pairs (--length-bias: log-odds of a correct answer lost per standard deviation of log-length)")
    g.add_argument("--group-size", type=int, default=8, help="responses per prompt (default 8)")
    g.add_argument("--loss", default="dapo", help="the group loss whose logged value is written (default dapo; "
                   "'none': no loss column)")
    g.add_argument("--loss-level", choices=("rollout", "group"), default="rollout",
                   help="one logged loss per rollout (default) or per group")
    g.add_argument("--loss-noise", type=float, default=0.0, help="noise on the logged loss, times its RMS (default 0)")
    args = p.parse_args(argv)
    try:
        if args.rollouts is not None:
            cols = generate_rollouts(args.rollouts, group_size=args.group_size, length_bias=args.length_bias,
                                     loss=None if args.loss == "none" else args.loss, loss_level=args.loss_level,
                                     loss_noise=args.loss_noise, seed=args.seed)
        else:
            cols = generate(args.pairs, length_bias=args.length_bias, tilt=args.tilt, policy=not args.no_policy,
                            text=args.text, seed=args.seed)
        print(write(args.out, cols))
    except GradlabError as exc:
        print(f"gradlab: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _plain(x: Any) -> Any:
    """Whole numbers (lengths) as integers, so text files say 12 rather than 12.0."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 2**53:
        return int(x)
    return x


# --------------------------------------------------------------------------------------------
# Rollout logs (GRPO family)
# --------------------------------------------------------------------------------------------


def generate_rollouts(
    n_prompts: int,
    *,
    group_size: int = 8,
    length_bias: float = 0.0,
    loss: str | None = "dapo",
    scale_rewards: str | None = None,
    loss_level: str = "rollout",
    loss_noise: float = 0.0,
    mean_length: float = 200.0,
    max_completion_length: int = 1024,
    logps: bool = False,
    token_logps: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Columns of a rollout log (``prompt_id``, ``completion_length``, ``reward``, optionally
    ``loss``, ``logps``, ``token_logps``) with a known answer.

    Each prompt has a difficulty: its responses are correct (reward 1, else 0) with probability
    p ~ Beta(1, 1). Lengths are log-normal about ``mean_length`` (capped at
    ``max_completion_length``), independent of the prompt. With ``length_bias = b`` the
    log-odds of a correct answer fall by ``b`` per standard deviation of log-length, so that
    incorrect responses are longer; ``b = 0`` makes correctness independent of length (the
    control). ``loss`` (a group loss of the clipped surrogate: grpo, dr_grpo, dapo, ...) writes
    the loss that its normaliser gives at the first on-policy step (-A per token, summed over
    the rollout's tokens, divided by N_i; each group its own batch), per rollout or summed per
    ``loss_level="group"``, with Gaussian noise of ``loss_noise`` times its RMS; ``scale_rewards``
    defaults to the loss's own. ``loss=None`` writes no loss column.
    """
    from gradlab.group_losses import NORMALISERS, advantages, clipped, get_group_loss

    if n_prompts < 1 or group_size < 2:
        raise GradlabError(f"need n_prompts >= 1 and group_size >= 2, not {n_prompts} and {group_size}")
    if loss_level not in ("rollout", "group"):
        raise GradlabError(f"loss_level must be 'rollout' or 'group', not {loss_level!r}")
    rng = np.random.default_rng(seed)
    n = n_prompts * group_size
    sigma = 0.6
    length = np.minimum(np.ceil(mean_length * np.exp(sigma * rng.standard_normal(n) - sigma**2 / 2)),
                        max_completion_length).reshape(n_prompts, group_size)
    z = (np.log(length) - np.log(mean_length) + sigma**2 / 2) / sigma
    p = rng.beta(1.0, 1.0, size=(n_prompts, 1))
    logit = np.log(p) - np.log1p(-p) - length_bias * z
    reward = (rng.random((n_prompts, group_size)) < 1.0 / (1.0 + np.exp(-logit))).astype(float)
    out: dict[str, Any] = {"prompt_id": np.repeat(np.arange(n_prompts), group_size),
                           "completion_length": length.ravel(), "reward": reward.ravel()}
    if loss is not None:
        spec = get_group_loss(loss)
        if spec.token_loss is not clipped:
            raise GradlabError(f"'{spec.name}' logs a value that depends on the token log-probs, not only on A; "
                               "generate a log for a loss of the clipped surrogate (grpo, bnpo, dr_grpo, dapo, gspo, "
                               "luspo, rloo)")
        a = advantages(reward, scale_rewards or spec.scale_rewards)
        norm = NORMALISERS[spec.normaliser]
        kw = {"max_completion_length": max_completion_length} if spec.normaliser == "constant" else {}
        n_i = np.asarray(norm(length, length.sum(-1, keepdims=True), float(group_size), **kw), dtype=float)
        per_rollout = -a * length / n_i  # -A per token at rho = 1 (the clipped surrogate), over |o_i| tokens
        logged = (np.repeat(per_rollout.sum(-1, keepdims=True), group_size, -1) if loss_level == "group"
                  else per_rollout)
        if loss_noise:
            scale = float(np.sqrt(np.mean(np.square(logged)))) or 1.0
            noise = rng.standard_normal(logged.shape[0] if loss_level == "group" else logged.shape) * loss_noise * scale
            logged = logged + (noise[:, None] if loss_level == "group" else noise)
        out["loss"] = logged.ravel()
    if logps or token_logps:
        tokens = [rng.normal(-1.0, 0.3, int(k)).clip(max=0.0) for k in length.ravel()]
        if logps:
            out["logps"] = np.array([t.sum() for t in tokens])
        if token_logps:
            out["token_logps"] = [t.round(6).tolist() for t in tokens]
    return out
