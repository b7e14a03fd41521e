"""Formulas as people write them: a printing layer over gradlab's expressions.

The loss expressions are never changed; only their printed forms are. Two things differ from
sympy's own printers:

- Log-ratios are grouped the way papers write them. sympy stores DPO's margin as the flat sum
  ``-lp_l + lp_w + ref_l - ref_w``; printed, it reads ``((lp_w - ref_w) - (lp_l - ref_l))``.
  Likewise ``lp_w - ref_w`` (a log-ratio), ``lp_w - lp_l`` (the policy margin) and
  ``ref_w - ref_l``. Grouping happens on the printed tree only: every term of a sum that forms
  such a pattern with a common coefficient is replaced by a placeholder that prints as the group.
- Hyperparameters are Greek letters: ``beta`` -> beta, ``label_smoothing`` -> epsilon,
  ``simpo_gamma`` -> gamma_SimPO, and so on (:data:`HYPER_LATEX`).

:func:`text` is for terminals (Unicode, no markup), :func:`latex` for LaTeX.
"""

from __future__ import annotations

import re
from typing import Any

import sympy
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

__all__ = ["HYPER_LATEX", "HYPER_TEXT", "latex_symbol", "group", "ungroup", "text", "latex", "plain_doc"]

# hyperparameter -> LaTeX. Subscripts name the paper where two losses use the same letter.
HYPER_LATEX: dict[str, str] = {
    "beta": r"\beta", "gamma": r"\gamma", "label_smoothing": r"\epsilon", "alpha": r"\alpha",
    "simpo_gamma": r"\gamma_{\mathrm{SimPO}}", "cpo_alpha": r"\alpha_{\mathrm{CPO}}",
    "rpo_alpha": r"\alpha_{\mathrm{RPO}}", "discopop_tau": r"\tau", "ld_alpha": r"\alpha_{\mathrm{LD}}",
    "dpop_lambda": r"\lambda_{\mathrm{DPOP}}", "hdpo_alpha": r"\alpha_{\mathrm{H}}",
    "f_alpha_divergence_coef": r"\alpha_{f}", "bco_delta": r"\delta_{\mathrm{BCO}}",
    "slic_delta": r"\delta", "slic_lambda": r"\lambda_{\mathrm{SLiC}}",
    "desirable_weight": r"\lambda_{D}", "undesirable_weight": r"\lambda_{U}", "kto_z0": r"z_{0}",
}
_GREEK = {r"\alpha": "α", r"\beta": "β", r"\gamma": "γ", r"\delta": "δ", r"\epsilon": "ε", r"\lambda": "λ",
          r"\tau": "τ"}


def _to_text(tex: str) -> str:
    """``\\gamma_{\\mathrm{SimPO}}`` -> ``γ_SimPO``: the LaTeX table read as plain Unicode."""
    out = tex
    for k, v in _GREEK.items():
        out = out.replace(k, v)
    return out.replace(r"\mathrm{", "").replace("{", "").replace("}", "")


HYPER_TEXT: dict[str, str] = {k: _to_text(v) for k, v in HYPER_LATEX.items()}


def latex_symbol(name: str) -> str:
    """LaTeX of a hyperparameter or variable name (``beta`` -> ``\\beta``; others as sympy prints them)."""
    return HYPER_LATEX.get(name) or sympy.latex(sympy.Symbol(name))


class _Group(sympy.Symbol):
    """A placeholder for a grouped sum; sorts after every other factor, so beta*(...) reads that way."""

    @classmethod
    def class_key(cls):
        return 10, 0, "Group"


# the groups, most specific first: (name, {variable: sign}, text, LaTeX)
_PATTERNS: tuple[tuple[str, dict[str, int], str, str], ...] = (
    ("margin", {"lp_w": 1, "ref_w": -1, "lp_l": -1, "ref_l": 1},
     "((lp_w - ref_w) - (lp_l - ref_l))",
     r"\left(\left(lp_{w} - ref_{w}\right) - \left(lp_{l} - ref_{l}\right)\right)"),
    ("ratio_w", {"lp_w": 1, "ref_w": -1}, "(lp_w - ref_w)", r"\left(lp_{w} - ref_{w}\right)"),
    ("ratio_l", {"lp_l": 1, "ref_l": -1}, "(lp_l - ref_l)", r"\left(lp_{l} - ref_{l}\right)"),
    ("policy", {"lp_w": 1, "lp_l": -1}, "(lp_w - lp_l)", r"\left(lp_{w} - lp_{l}\right)"),
    ("reference", {"ref_w": 1, "ref_l": -1}, "(ref_w - ref_l)", r"\left(ref_{w} - ref_{l}\right)"),
)
_PLACEHOLDERS = {name: _Group(f"_group_{name}") for name, *_ in _PATTERNS}
_TEXT = {_PLACEHOLDERS[n]: t for n, _, t, _ in _PATTERNS}
_LATEX = {_PLACEHOLDERS[n]: tex for n, _, _, tex in _PATTERNS}


def _split(term: sympy.Expr) -> tuple[str, sympy.Expr] | None:
    """(variable, coefficient) when ``term`` is a coefficient times one canonical log-prob."""
    for sym in term.free_symbols:
        if sym.name in ("lp_w", "lp_l", "ref_w", "ref_l"):
            coeff, rest = term.as_independent(sym, as_Add=False)
            if rest == sym:
                return sym.name, coeff
    return None


def _group_add(e: sympy.Add) -> sympy.Expr:
    terms = list(e.args)
    split = {i: s for i, t in enumerate(terms) if (s := _split(t)) is not None}
    for name, signs, _, _ in _PATTERNS:
        while True:
            # candidate coefficient: that of the pattern's first (positive) variable
            first = next(iter(signs))
            found = None
            for i, (var, coeff) in split.items():
                if var != first:
                    continue
                picks = {i}
                for v, sign in signs.items():
                    if v == first:
                        continue
                    j = next((j for j, (vv, cc) in split.items()
                              if vv == v and j not in picks and sympy.expand(cc - sign * coeff) == 0), None)
                    if j is None:
                        break
                    picks.add(j)
                if len(picks) == len(signs):
                    found = (coeff, picks)
                    break
            if found is None:
                # the negated pattern: -(lp_w - ref_w) etc.
                break
            coeff, picks = found
            for j in picks:
                split.pop(j)
            terms = [t for k, t in enumerate(terms) if k not in picks] + [coeff * _PLACEHOLDERS[name]]
            # re-index what is left
            split = {k: s for k, t in enumerate(terms) if (s := _split(t)) is not None}
    return sympy.Add(*terms, evaluate=True) if len(terms) != len(e.args) else e


def group(expr: sympy.Expr) -> sympy.Expr:
    """``expr`` with its log-ratio sums replaced by placeholders (for printing only)."""
    if not expr.args:
        return expr
    args = [group(a) for a in expr.args]
    rebuilt = expr.func(*args) if args != list(expr.args) else expr
    if rebuilt.is_Add:
        out = _group_add(rebuilt)
        if out is rebuilt:  # a negated pattern, e.g. lp_l - lp_w: group -(sum) and negate
            neg = _group_add(-rebuilt)
            if neg is not -rebuilt and neg.has(*_PLACEHOLDERS.values()):
                return sympy.Mul(-1, neg, evaluate=False) if neg.is_Add else -neg
        return out
    return rebuilt


class _Text(StrPrinter):
    def _print_Symbol(self, expr):  # noqa: N802 - sympy's printer protocol
        if expr in _TEXT:
            return _TEXT[expr]
        return HYPER_TEXT.get(expr.name, expr.name)

    _print_Dummy = _print_Symbol

    def _print_Max(self, expr):  # noqa: N802
        return "max({})".format(", ".join(self._print(a) for a in expr.args))

    def _print_Min(self, expr):  # noqa: N802
        return "min({})".format(", ".join(self._print(a) for a in expr.args))


class _Latex(LatexPrinter):
    def _print_Symbol(self, expr, style="plain"):  # noqa: N802 - sympy's printer protocol
        if expr in _LATEX:
            return _LATEX[expr]
        if expr.name in HYPER_LATEX:
            return HYPER_LATEX[expr.name]
        return super()._print_Symbol(expr, style)


def plain_doc(doc: str) -> str:
    """A docstring for a terminal: reST math blocks dropped (the formula is printed already),
    ``code`` and :role:`x` markup reduced to their text."""
    lines: list[str] = []
    skipping = False
    for line in doc.splitlines():
        if line.lstrip().startswith(".. math::"):
            skipping = True
            continue
        if skipping and (line.startswith((" ", "\t")) or not line.strip()):
            if not line.strip():
                skipping = False
                if lines and lines[-1].strip():
                    lines.append("")
            continue
        skipping = False
        line = re.sub(r":\w+:`([^`]*)`", r"\1", line)
        lines.append(line.replace("``", ""))
    out = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", out).strip()


def text(expr: Any) -> str:
    """A formula for a terminal: grouped log-ratios, Greek hyperparameters, ``·`` for products."""
    out = _Text().doprint(group(sympy.sympify(expr)))
    return out.replace("**", "^").replace("*", "·")


def latex(expr: Any) -> str:
    """LaTeX with grouped log-ratios and Greek hyperparameters."""
    return _Latex().doprint(group(sympy.sympify(expr)))


def ungroup(expr: sympy.Expr) -> sympy.Expr:
    """Inverse of :func:`group`: the placeholders replaced by the sums they stand for."""
    from gradlab.symbols import symbol

    subs = {_PLACEHOLDERS[name]: sympy.Add(*(sign * symbol(v) for v, sign in signs.items()))
            for name, signs, _, _ in _PATTERNS}
    return expr.xreplace(subs)
