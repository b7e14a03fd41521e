"""Shared pieces of the reproduction experiments: a loss as a JAX function of the canonical
variables (from gradlab's one sympy definition), the step size of plain gradient descent on a
K-action softmax, and small numeric helpers. Training runs through :mod:`gradlab.experiments`;
the entropy of a distribution is :func:`gradlab.experiments.analysis.entropy`.

Everything here is pure; JAX's float64 mode is switched on by :func:`gradlab.reproduce.run`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from gradlab import symbolic
from gradlab.losses import get_loss

__all__ = ["loss_function", "softmax_objective", "population_pairs", "stable_step", "tv", "closed_form",
           "seeded"]


def loss_function(name: str, values: Mapping[str, float] | None = None,
                  args: tuple[str, ...] = ("lp_w", "lp_l", "ref_w", "ref_l")) -> Callable[..., Any]:
    """The registered loss as a JAX function of ``args`` (each loss reads a subset of them),
    hyperparameters fixed to the loss's defaults overridden by ``values``."""
    loss = get_loss(name)
    missing = sorted(set(loss.variables) - set(args))
    if missing:
        raise ValueError(f"loss '{name}' also needs {', '.join(missing)}")
    expr = loss.expr.xreplace(symbolic.parameter_values(loss, values))
    return symbolic.numeric(expr, list(args), backend="jax")


def softmax_objective(loss: Callable[..., Any], ref_logits: np.ndarray, chosen: np.ndarray, rejected: np.ndarray,
                      weight: np.ndarray, *, temperature: float = 1.0) -> Callable[[Any], Any]:
    """The full-batch objective the experiment runner trains on a one-context softmax, transcribed
    to read its curvature (the runner does not expose its objective):

        J(theta) = sum_k weight_k loss(lp[w_k], lp[l_k], ref[w_k], ref[l_k]),
        lp = log_softmax(theta), ref = log_softmax(ref_logits / temperature).

    The entries train through :func:`gradlab.experiments.run`; this function only gives them the
    classical step :func:`stable_step`."""
    import jax
    import jax.numpy as jnp

    ref = jax.nn.log_softmax(jnp.asarray(ref_logits) / temperature)
    w, l_, weights = jnp.asarray(chosen), jnp.asarray(rejected), jnp.asarray(weight)

    def objective(theta):
        lp = jax.nn.log_softmax(theta)
        return (weights * loss(lp[w], lp[l_], ref[w], ref[l_])).sum()

    return objective


def population_pairs(ref_logits: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(chosen, rejected, weight)`` of the runner's ``population`` data on K actions: every ordered
    pair (i, j), i != j, weighted pi_0(i) pi_0(j) sigma(r_i - r_j) (Rafailov et al. 2023, Eq. 1:
    both labellings of an unordered pair counted with their Bradley-Terry probabilities),
    normalised to sum 1 as the runner does."""
    q, r = softmax(ref_logits), np.asarray(reward, dtype=float)
    i, j = np.nonzero(~np.eye(len(r), dtype=bool))
    weight = q[i] * q[j] / (1.0 + np.exp(-(r[i] - r[j])))
    return i, j, weight / weight.sum()


def stable_step(objective: Callable[[Any], Any], theta0: Any) -> float:
    """The classical stable step of plain gradient descent, 1 / lambda_max of the objective's
    Hessian at ``theta0`` (a step of 2 / lambda_max would oscillate forever on a quadratic)."""
    import jax

    return 1.0 / float(np.linalg.eigvalsh(np.asarray(jax.hessian(objective)(theta0))).max())


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=float)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def closed_form(log_weights: np.ndarray) -> np.ndarray:
    """A distribution from unnormalised log-weights, e.g. ``log pi_0 + r / beta``."""
    return softmax(log_weights)


def tv(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance, max over events of |p(A) - q(A)|."""
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(-1).max())


def seeded(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """Standard normal draws from numpy's PCG64 at ``seed`` (the same on every machine)."""
    return scale * np.random.default_rng(seed).standard_normal(shape)

