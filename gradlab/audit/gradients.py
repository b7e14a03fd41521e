"""Per-pair gradient weights of a loss on a dataset, from gradlab's derived closed forms.

For each pair the audit needs four numbers, all partial derivatives that :mod:`gradlab.symbolic`
derives from the loss's one expression (nothing here is differentiated by hand):

- ``g_w = d loss / d lp_w`` and ``g_l = d loss / d lp_l`` in the log view: how hard one step of
  gradient descent pushes the chosen and the rejected sequence log-likelihood (descent moves
  ``lp_w`` by ``-lr * g_w``);
- ``lever_w = d loss / d m_w`` and ``lever_l = d loss / d m_l`` in the length view (``lp = len * m``):
  the per-token lever, how hard the same step pushes each *per-token* log-prob of the response.
  For a loss of summed log-probs it carries a factor of the length (``docs/background.md``: dl/dm+ =
  -beta L+ sigma(-z)); length normalisation removes it.

The levers follow from the log view's partials by the chain rule through the length view's
substitution, d loss/d m_w = sum_v d loss/d v * d v/d m_w (``lp_w = len_w m_w``: a factor
``len_w``; LD-DPO's ``tail_w = (len_w - min len) m_w``), with the Jacobian derived from the view
(:func:`lever_jacobian`): the same function as differentiating in the length view, and
tests/test_audit_fast.py checks that it is, loss by loss. LD-DPO's tail log-probs, which no dataset
column holds, come from the view's substitution solved for ``m = lp / len`` (the tokens past the
shorter response at the response's mean per-token log-prob). The four forms are compiled into
one straight-line numpy program with every common subexpression computed once
(:mod:`gradlab.audit.program`) and evaluated in chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy

from gradlab import caches, symbolic
from gradlab.audit import program
from gradlab.errors import GradlabError
from gradlab.losses import Loss
from gradlab.symbols import CANONICAL, EXTRA, VIEWS, symbol

__all__ = ["Weights", "WEIGHT_NAMES", "closed_forms", "weights", "evaluate", "estimated_tails", "lever_jacobian"]

WEIGHT_NAMES = ("g_w", "g_l", "lever_w", "lever_l")
_DATA = tuple(s.name for s in CANONICAL)  # lp_w, lp_l, ref_w, ref_l, len_w, len_l
_EVAL_CHUNK = 1 << 16  # temporaries of a chunk stay in cache: ~2x faster than whole arrays


@dataclass(frozen=True)
class Weights:
    """Per-pair partial derivatives of one loss on one dataset (arrays of length n)."""

    g_w: np.ndarray
    g_l: np.ndarray
    lever_w: np.ndarray
    lever_l: np.ndarray

    @property
    def weight(self) -> np.ndarray:
        """The pair's total push on its two log-likelihoods: |g_w| + |g_l|."""
        return np.abs(self.g_w) + np.abs(self.g_l)


@caches.memo(maxsize=None)
def _inverse_length_map() -> dict[sympy.Symbol, sympy.Expr]:
    """m_w -> lp_w / len_w and the like: the length view's substitution, solved for its variables.

    Each canonical variable's image is linear in its one length-view variable (lp_w = len_w m_w),
    so the solution is the canonical variable over the image's coefficient; anything else goes
    to ``sympy.solve``."""
    view = VIEWS["length"]
    out = {}
    for canonical, image in view.substitution.items():
        if canonical in CANONICAL:
            (var,) = [s for s in image.free_symbols if s not in CANONICAL]
            slope = sympy.diff(image, var)
            if var not in slope.free_symbols and image.xreplace({var: 0}) == 0:
                out[var] = canonical / slope
            else:
                out[var] = sympy.solve(sympy.Eq(canonical, image), var)[0]
    return out


@caches.memo(maxsize=None)
def estimated_tails() -> dict[sympy.Symbol, sympy.Expr]:
    """LD-DPO's tail variables in the data's variables: the length view's substitution with
    ``m = lp / len`` (the tokens past the shorter response at the response's mean log-prob)."""
    inverse = _inverse_length_map()
    return {s: VIEWS["length"].substitution[s].xreplace(inverse) for s in EXTRA}


@caches.memo(maxsize=None)
def lever_jacobian() -> dict[str, dict[str, sympy.Expr]]:
    """For ``m_w`` and ``m_l``: each log-view variable v whose length-view image depends on it,
    with d image(v) / d m in the data's variables (``lp_w``: ``len_w``; LD-DPO's ``tail_w``:
    ``len_w - min(len_w, len_l)``). Derived from the view's substitution, so the lever is the
    chain rule d loss/d m = sum_v d loss/d v * d v/d m, equal to differentiating the loss in the
    length view."""
    view, inverse = VIEWS["length"], _inverse_length_map()
    out: dict[str, dict[str, sympy.Expr]] = {}
    for m in ("m_w", "m_l"):
        ms = symbol(m)
        out[m] = {v.name: sympy.diff(image, ms).xreplace(inverse)
                  for v, image in view.substitution.items() if ms in image.free_symbols}
    return out


@caches.memo(maxsize=256)
def _compiled(loss: Loss, params: tuple[tuple[str, Any], ...]):
    """(data variables read, numpy function of them returning the four forms).

    ``g_w``, ``g_l`` and the lever's other partials come from gradlab's derivation cache
    (data-only, never code); the levers follow by the chain rule (:func:`lever_jacobian`). The
    forms are compiled into one program in this process (:mod:`gradlab.audit.program`, sharing
    every common subexpression); keeping generated source on disk and executing it on the next
    run would let a planted cache file run code (issue 15), so it is not done.
    """
    values = {symbol(k): v for k, v in params}
    tails = estimated_tails()
    jac = lever_jacobian()
    partial: dict[str, sympy.Expr] = {}

    def d(name: str) -> sympy.Expr:
        if name not in partial:
            partial[name] = symbolic.derivative(loss, name, "log")
        return partial[name]

    g_w, g_l = d("lp_w"), d("lp_l")
    levers = [sympy.Add(*[factor * d(v) for v, factor in jac[m].items()]) for m in ("m_w", "m_l")]
    forms = [g_w, g_l, *levers]
    free = set().union(*(f.free_symbols for f in forms)) - set(values)
    free = set().union(*((tails[s].free_symbols if s in tails else {s}) for s in free))
    names = [n for n in _DATA if symbol(n) in free]
    outside = sorted(s.name for s in free - {symbol(n) for n in names})
    if outside:
        raise GradlabError(f"'{loss.name}' needs {', '.join(outside)}, which a dataset does not provide")
    stable = [symbolic.stabilise(form) for form in forms]
    f: Callable[..., Any]
    try:
        f = program.compile_program(stable, names, constants=values, bindings=tails)
    except program.Unsupported:  # a function the program compiler does not know: lambdify it
        substituted = [form.xreplace(tails).xreplace(values) for form in forms]
        f = symbolic.numeric(sympy.Tuple(*substituted), names, "numpy", cse=True)
    return names, f


def closed_forms(loss: Loss, values: Mapping[str, Any] | None = None) -> tuple[list[str], Any]:
    """The data variables the loss's four weights read, and one numpy function returning them."""
    params = symbolic.parameter_values(loss, values)
    return _compiled(loss, tuple(sorted((s.name, v) for s, v in params.items())))


def weights(loss: Loss, data: Mapping[str, np.ndarray], values: Mapping[str, Any] | None = None) -> Weights:
    """Evaluate the four closed forms at every pair. ``data`` maps the canonical variables
    (``lp_w, lp_l, ref_w, ref_l, len_w, len_l``) to arrays of one length; values that are not
    finite in float64 are returned as they come (the caller reports them).

    Args:
        loss: the loss whose gradient is weighed.
        data: the canonical variables the loss reads, as arrays of one length.
        values: hyperparameters that differ from the loss's defaults.

    Returns:
        :class:`Weights`: the four closed forms at every pair, the partials ``g_w``, ``g_l`` with
        respect to lp_w and lp_l and the per-token levers ``lever_w``, ``lever_l``.
    """
    return evaluate(closed_forms(loss, values), data)


def evaluate(forms: tuple[list[str], Any], data: Mapping[str, np.ndarray], out: np.ndarray | None = None) -> Weights:
    """:func:`weights` from forms compiled by :func:`closed_forms` (numpy only: safe in a thread
    while another compiles). ``out``, a (4, n) float array, is filled and reused if given: the
    returned arrays are its rows."""
    names, f = forms
    n = len(next(iter(data.values())))
    if out is None or out.shape != (4, n) or out.dtype != np.float64:
        out = np.empty((4, n))
    args = [data[k] for k in names]
    with np.errstate(all="ignore"):
        for i in range(0, n, _EVAL_CHUNK):
            chunk = f(*(a[i:i + _EVAL_CHUNK] for a in args))
            for j, value in enumerate(chunk):
                out[j, i:i + _EVAL_CHUNK] = value  # broadcasts a constant form
    return Weights(*out)
