"""Numerically stable JAX forms of the special functions gradlab's losses are written with
(``gradlab.symbols``: sigmoid, softplus, log1mexp), without sympy: what a compiled loss calls,
whether lambdified now (``gradlab.symbolic``) or shipped as generated code
(``gradlab.experiments._loss_table``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["log1mexp", "sigmoid", "softplus"]

sigmoid = jax.nn.sigmoid
softplus = jax.nn.softplus


def log1mexp(x):
    """log(1 - exp(x)) for x < 0: log(-expm1(x)) near 0, log1p(-exp(x)) below -log 2 (Maechler's
    split; each branch is accurate where the other loses digits)."""
    safe_hi = jnp.minimum(x, -1e-300)
    return jnp.where(x > -0.6931471805599453, jnp.log(-jnp.expm1(safe_hi)), jnp.log1p(-jnp.exp(x)))
