"""Shared pieces of the reproduction experiments: a loss as a JAX function of the canonical
variables (from gradlab's one sympy definition), population objectives on a K-action softmax,
gradient descent with any optax optimiser, and small numeric helpers.

Everything here is pure; JAX's float64 mode is switched on by :func:`gradlab.reproduce.run`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from gradlab import symbolic
from gradlab.losses import get_loss

__all__ = ["loss_function", "softmax_population_objective", "descend", "tv", "entropy", "closed_form",
           "seeded", "axes_style"]


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


def softmax_population_objective(loss: Callable[..., Any], ref_logits: np.ndarray, reward: np.ndarray,
                                 *, data_logits: np.ndarray | None = None) -> Callable[[Any], Any]:
    """Expected loss over every ordered pair (i, j) of K actions, drawn from the data
    distribution (softmax of ``data_logits``, default the reference) and labelled by
    Bradley-Terry soft labels sigma(r_i - r_j) (Rafailov et al. 2023, Eq. 1):

        J(theta) = sum_{i != j} pi_D(i) pi_D(j) sigma(r_i - r_j) loss(lp_i, lp_j, ref_i, ref_j).

    Every ordered pair appears once, so both labellings of an unordered pair are counted."""
    import jax
    import jax.numpy as jnp

    ref = jax.nn.log_softmax(jnp.asarray(ref_logits))
    data = jax.nn.softmax(jnp.asarray(ref_logits if data_logits is None else data_logits))
    r = jnp.asarray(reward)
    k = len(r)
    i, j = np.nonzero(~np.eye(k, dtype=bool))
    weight = data[i] * data[j] * jax.nn.sigmoid(r[i] - r[j])

    def objective(theta):
        lp = jax.nn.log_softmax(theta)
        return (weight * loss(lp[i], lp[j], ref[i], ref[j])).sum()

    return objective


def descend(objective: Callable[[Any], Any], theta0: Any, *, steps: int, lr: float,
            optimizer: str = "sgd", records: int = 100) -> tuple[np.ndarray, Any]:
    """Minimise ``objective`` from ``theta0`` with an optax optimiser (``sgd`` is plain
    gradient descent), compiled as one scan. Returns ``(recorded_steps, recorded_params)``:
    ``records`` evenly spaced states, the initial and the final state included."""
    import jax
    import optax

    opt = getattr(optax, optimizer)(lr)
    grad = jax.grad(objective)
    every = max(1, steps // records)
    chunks, rest = divmod(steps, every)

    def step(carry, _):
        theta, state = carry
        updates, state = opt.update(grad(theta), state, theta)
        return (optax.apply_updates(theta, updates), state), None

    def outer(carry, _):
        carry, _ = jax.lax.scan(step, carry, None, length=every)
        return carry, carry[0]

    @jax.jit
    def program(carry):
        carry, path = jax.lax.scan(outer, carry, None, length=chunks)
        if rest:
            carry, _ = jax.lax.scan(step, carry, None, length=rest)
        return carry[0], path

    final, path = program((theta0, opt.init(theta0)))
    at = [0, *range(every, chunks * every + 1, every)]
    path = jax.tree_util.tree_map(lambda p0, p: np.concatenate([np.asarray(p0)[None], np.asarray(p)]), theta0, path)
    if rest:
        at.append(steps)
        path = jax.tree_util.tree_map(lambda p, f: np.concatenate([p, np.asarray(f)[None]]), path, final)
    return np.asarray(at), path


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


def entropy(p: np.ndarray) -> float:
    p = np.asarray(p)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def seeded(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """Standard normal draws from numpy's PCG64 at ``seed`` (the same on every machine)."""
    return scale * np.random.default_rng(seed).standard_normal(shape)


def axes_style(ax) -> None:
    ax.grid(alpha=0.3, linewidth=0.5)
    ax.tick_params(labelsize=7)
