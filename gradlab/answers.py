"""What ``gradlab list``, ``show`` and ``grad`` print, answered from a shipped table when it is
current, and derived otherwise.

Importing sympy takes about 0.4 s on a quiet machine (seconds under load), more than these
commands need for everything else. So the answers for every registered loss are generated ahead
(``python -m gradlab.catalogue``, or ``python3 tasks.py docs``) into ``answers.jsonl`` beside
this module, by the same functions that derive them on demand (:func:`list_document`,
:func:`derive_show`, :func:`derive_grad`). A test fails when the shipped table differs from what
they produce now.

The table is used only while it is current. It records the SHA-256 of every source file its
answers depend on: the gradlab modules that define and derive the losses (the import closure of
``losses``, ``symbolic``, ``printing`` and ``symbols``, computed by the generator), this module,
and sympy's release file (the printed forms depend on sympy's version). When any of them differs
from what is installed, nothing in the table is served: every answer is derived, as for a
user-defined formula. The file's format, its freshness and reading it line by line live in
:mod:`gradlab._shipped` (re-exported here), which ``gradlab.symbolic`` imports too. A loss
name is looked up as written (registered names, aliases and TRL's ``trainer.loss_type`` names,
in lower case); any other spelling, a weighted combination or ``--expr`` is derived.

``gradlab.symbolic`` reads the same table for a registered loss's expression in each view and
its partial derivatives (:func:`gradlab._shipped.derivation`), as the derivation's own sympy expressions in the
disk cache's data-only trees (:func:`gradlab._cache.encode`), each filed under a key of the
expression, view and variable it was derived from, so that it is served only for exactly
those. The table is part of the installed package, generated and tested like the code, so
these are trusted without the numerical check that an entry of the user-writable disk cache
needs; and the generator derives them with the table off, so that the table never certifies
itself.

``gradlab eval`` for a registered loss reads the same table: each loss's value and partials in
every view, as trees of operations with exact rational constants (:mod:`gradlab._mpeval`), which
are evaluated with mpmath alone by the same error-bounded method as the derived path, or refused
as it refuses. The families of toy policies (for ``simulate --help`` and ``check --help``) are
in the table too, under the same rule with their own sources (``gradlab.policies`` and what it
imports), so that an edit to a policy does not make the loss answers stale. The head records the
SHA-256 of the lines after it as well: a table edited by hand is not served.

This module imports neither sympy nor JAX at import time; the derivations import them when run.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from gradlab import _mpeval
from gradlab._declared import Domain
from gradlab._shipped import (
    FAMILY_ROOTS,
    FORMAT,
    ROOTS,
    TABLE,
    decode,
    derivation,
    encode,
    fingerprint,
    head,
    is_current,
    line,
    source_files,
    table,
)

__all__ = ["TABLE", "FORMAT", "ROOTS", "FAMILY_ROOTS", "table", "list_document", "list_text", "views", "show", "grad",
           "evaluate", "families", "derivation", "loss_of", "derive_list", "derive_views", "derive_show", "derive_grad",
           "derive_eval", "derive_eval_entry", "derive_table", "source_files", "fingerprint", "is_current",
           "encode", "decode"]

# --------------------------------------------------------------------------------------------
# The answers: from the table, or derived
# --------------------------------------------------------------------------------------------


def list_document() -> dict[str, Any]:
    """``gradlab list --json``: every registered loss with its aliases, and the names known but
    out of scope."""
    found = table()
    return found["list"] if found is not None else derive_list()


def derive_list() -> dict[str, Any]:
    """:func:`list_document`, derived from the registry."""
    from gradlab.group_losses import GROUP_LOSSES
    from gradlab.losses import LOSSES, OUT_OF_SCOPE

    rows = [
        {"name": n, "aliases": list(l.aliases), "title": l.title, "kind": l.kind,
         "needs_reference": l.needs_reference, "length_normalised": l.length_normalised}
        for n, l in (*LOSSES.items(), *GROUP_LOSSES.items())
    ]
    return {"losses": rows, "out_of_scope": dict(OUT_OF_SCOPE)}


def list_text(doc: dict[str, Any]) -> str:
    """``gradlab list``'s text from :func:`list_document`'s document."""
    rows = doc["losses"]
    pairs, groups = [r for r in rows if r["kind"] != "group"], [r for r in rows if r["kind"] == "group"]
    width = max(len(r["name"]) for r in rows)
    lines = []
    for r in pairs:
        alias = f"  (aliases: {', '.join(r['aliases'])})" if r["aliases"] else ""
        lines.append(f"{r['name']:<{width}}  {r['title']}{alias}")
    if groups:
        lines.append('\nGroup losses (kind "group": groups of on-policy responses with rewards, '
                     'data.kind = "rollouts"):')
        lines += [f"{r['name']:<{width}}  {r['title']}  [group]" for r in groups]
    lines.append(f"\n{len(pairs)} pairwise and {len(groups)} group losses. Known but out of scope: "
                 f"{', '.join(doc['out_of_scope'])}.")
    return "\n".join(lines) + "\n"


def views() -> dict[str, str]:
    """The views' names and descriptions (for ``--view``'s help)."""
    found = table()
    return found["views"] if found is not None else derive_views()


def derive_views() -> dict[str, str]:
    from gradlab.symbols import VIEWS

    return {name: v.description for name, v in VIEWS.items()}


def _entry_of(kind: str, name: str | None) -> tuple[dict[str, Any], str] | None:
    """The table's ``kind`` line (``loss`` or ``eval``) for the registered loss spelled ``name``
    and its canonical name, if the table is current and knows that spelling."""
    found = table()
    if found is None or name is None or not isinstance(found.get("names"), dict):
        return None
    canonical = found["names"].get(name)
    entry = None if canonical is None else line(TABLE, kind, canonical)
    return None if entry is None else (entry, canonical)


def show(name: str | None, expr: str | None) -> dict[str, Any] | None:
    """``gradlab show``'s answer: ``{"json": document, "text": text}``; None for a group loss,
    which the command prints in its own form."""
    hit = _entry_of("loss", name) if expr is None else None
    if hit is not None:
        entry, _ = hit
        return entry["show"]
    if name is not None and expr is None:
        from gradlab.losses import out_of_scope_reason

        reason = out_of_scope_reason(name)
        if reason is not None:
            return {"json": {"name": name, "in_scope": False, "reason": reason},
                    "text": f"{name}: known, but out of scope.\n{reason}\n"}
    loss = loss_of(name, expr)
    return None if loss.kind == "group" else derive_show(loss)


def grad(name: str | None, expr: str | None, wrt: str, view: str) -> dict[str, Any] | None:
    """``gradlab grad``'s answer: ``{"json": document, "text": text}``; None for a group loss."""
    hit = _entry_of("loss", name) if expr is None else None
    if hit is not None:
        entry, canonical = hit
        part = entry["grad"].get(view, {}).get("partials", {}).get(wrt)
        if part is not None:
            return _grad_answer(canonical, view, wrt, part, entry["grad"][view]["variables"])
    loss = loss_of(name, expr)
    return None if loss.kind == "group" else derive_grad(loss, wrt, view)


def loss_of(name: str | None, expr: str | None):
    """The loss named ``name`` (see :func:`gradlab.losses.get_loss`), or the user-defined ``expr``."""
    from gradlab.errors import GradlabError
    from gradlab.losses import custom, get_loss

    if expr is not None and name is not None:
        raise GradlabError("give either a loss name or --expr, not both")
    if expr is not None:
        return custom(expr, name="custom")
    if name is None:
        raise GradlabError("name a loss (see 'gradlab list') or give --expr FORMULA")
    return get_loss(name)


def _variables_of(names: list[str]) -> dict[str, str]:
    from gradlab.symbols import info

    return {n: info(n).meaning for n in names}


def derive_show(loss) -> dict[str, Any]:
    """``gradlab show``'s answer for a :class:`~gradlab.losses.Loss`, derived."""
    from gradlab import printing, symbolic
    from gradlab.symbols import HYPERPARAMETERS

    expr = loss.expr
    hyper = {
        k: {"default": None if v is None else float(v), "meaning": HYPERPARAMETERS[k].meaning,
            "domain": str(loss.domain(k))}
        for k, v in loss.defaults.items()
    }
    doc = {
        "name": loss.name,
        "aliases": list(loss.aliases),
        "title": loss.title,
        "kind": loss.kind,
        "expr": str(symbolic.standard(expr)),
        "readable": str(expr),
        "latex": symbolic.latex(expr),
        "defaults": {k: v["default"] for k, v in hyper.items()},
        "hyperparameters": hyper,
        "variables": _variables_of([*loss.variables, *loss.hyperparameters]),
        "references": list(loss.references),
        "needs_reference": loss.needs_reference,
        "length_normalised": loss.length_normalised,
        "doc": loss.doc,
        "trl_variant": None if loss.trl_variant is None else
        {"loss": loss.trl_variant[0], "note": loss.trl_variant[1]},
        "trl_default_differences": {k: {"trl_field": f, "trl": trl, "gradlab": mine}
                                    for k, (f, trl, mine) in loss.trl_default_differences.items()},
        "components": {n: float(w) for n, w in loss.components} or None,
        "equation": loss.equation,
        "implementations": [str(i) for i in loss.implementations],
        "audit": loss.audit,
    }
    alias = f" (aliases: {', '.join(loss.aliases)})" if loss.aliases else ""
    lines = [f"{loss.name}{alias}: {loss.title}\n"]
    if loss.trl_variant is not None:
        other, why = loss.trl_variant
        lines.append(f"note: this is not what TRL computes under this name. {why}: that is '{other}' "
                     f"(gradlab show {other}).\n")
    for k, (trl_field, trl, mine) in loss.trl_default_differences.items():
        lines.append(f"note: TRL's default differs: {k} = {trl:g} in TRL ({trl_field}), {mine:g} here "
                     "(the description below says why).\n")
    lines.append(f"loss = {printing.text(expr)}\n")
    shown = [f"{printing.HYPER_TEXT.get(k, k)} ({k}) = {v['default']:g}  in {v['domain']}" if v["default"] is not None
             else f"{printing.HYPER_TEXT.get(k, k)} ({k}): no default" for k, v in hyper.items()]
    lines.append("hyperparameters: " + (", ".join(shown) or "none"))
    lines.append(f"needs a reference model: {'yes' if loss.needs_reference else 'no'}; "
                 f"length-normalised: {'yes' if loss.length_normalised else 'no'}")
    if loss.references:
        lines.append("references: " + "; ".join(loss.references))
    if loss.doc and loss.function is not None:
        lines.append("\n" + printing.plain_doc(loss.doc))
    return {"json": doc, "text": "\n".join(lines) + "\n"}


def _grad_part(loss, wrt: str, view: str) -> dict[str, str]:
    from gradlab import printing, symbolic

    d = symbolic.derivative(loss, wrt, view, table=None)
    return {"expr": str(symbolic.standard(d)), "readable": str(d), "latex": symbolic.latex(d),
            "text": printing.text(d)}


def _grad_variables(loss, view: str) -> dict[str, str]:
    from gradlab import symbolic

    return _variables_of([*symbolic.variables(loss, view, table=None), *loss.hyperparameters])


def _grad_answer(name: str, view: str, wrt: str, part: dict[str, str], variables: dict[str, str]) -> dict[str, Any]:
    doc = {"loss": name, "view": view, "wrt": wrt, "expr": part["expr"], "readable": part["readable"],
           "latex": part["latex"], "variables": variables}
    return {"json": doc, "text": f"d {name} / d {wrt}   ({view} view)\n\n{part['text']}\n"}


def derive_grad(loss, wrt: str, view: str) -> dict[str, Any]:
    """``gradlab grad``'s answer for a :class:`~gradlab.losses.Loss`, derived."""
    part = _grad_part(loss, wrt, view)  # first: it refuses an unknown view or variable
    return _grad_answer(loss.name, view, wrt, part, _grad_variables(loss, view))


# --------------------------------------------------------------------------------------------
# eval: the numbers, from the table's trees or derived
# --------------------------------------------------------------------------------------------


def _interval(domain: Any) -> list[Any]:
    """A domain as ``[low, high, low_open, high_open]`` (None for an infinite end)."""
    return [None if math.isinf(domain.low) else domain.low, None if math.isinf(domain.high) else domain.high,
            domain.low_open, domain.high_open]


def _within(x: Fraction, interval: list[Any], *, as_float: bool = False) -> bool:
    """Whether ``x`` is in the domain ``interval``: read at 30 digits for a variable (as
    :func:`gradlab.symbolic.exact_point` reads it), as a float64 for a hyperparameter (as
    :func:`gradlab.symbolic.parameter_values` does)."""
    low, high, low_open, high_open = interval
    domain = Domain(-math.inf if low is None else low, math.inf if high is None else high, low_open, high_open)
    if not as_float:
        return _mpeval.within(x, domain.low, domain.high, low_open, high_open)
    try:
        return domain.contains(float(x))
    except OverflowError:
        return False


def derive_eval_entry(loss) -> dict[str, Any]:
    """What ``gradlab eval`` needs of a registered loss, for the table: its hyperparameters (in
    order, with exact defaults and domains) and, in every view that applies to it, its
    variables with their domains and the trees of its value and its partials
    (:func:`gradlab._mpeval.to_json`)."""
    from gradlab import symbolic
    from gradlab.errors import GradlabError
    from gradlab.symbols import SYMBOLS, VIEWS

    hyper = [[k, None if v is None else str(v), _interval(loss.domain(k))] for k, v in loss.defaults.items()]
    views: dict[str, Any] = {}
    for view in VIEWS:
        try:
            partials = symbolic.gradient(loss, view, table=None)
        except GradlabError:
            continue  # a view that does not apply
        names = symbolic.variables(loss, view, table=None)
        doc = _mpeval.to_json({"loss": symbolic.in_view(loss, view, table=None), **partials})
        views[view] = {"variables": [[n, _interval(loss.domains.get(n, SYMBOLS[n].domain))] for n in names],
                       "nodes": doc["nodes"], "roots": [[k, i] for k, i in doc["roots"].items()]}
    return {"hyperparameters": hyper, "views": views}


def evaluate(name: str | None, expr: str | None, at: dict[str, str], values: dict[str, str],
             view: str) -> dict[str, Any] | None:
    """``gradlab eval``'s numbers: ``{"loss", "view", "at" (name to Fraction), "hyperparameters"
    (name to float), "values" ({"loss": value, variable: partial, ...}, mpmath numbers correct
    to 20 significant digits)}``, from the table for a registered loss at a valid point, derived
    otherwise (a refusal is always the derived path's, which says what is allowed). None for a
    group loss. ``at`` and ``values`` are decimal strings, read exactly."""
    hit = _entry_of("eval", name) if expr is None else None
    if hit is not None:
        found = _evaluate_entry(hit[1], hit[0]["entry"], at, values, view)
        if found is not None:
            return found
    loss = loss_of(name, expr)
    return None if loss.kind == "group" else derive_eval(loss, at, values, view)


def _evaluate_entry(name: str, entry: dict[str, Any], at: dict[str, str], values: dict[str, str],
                    view: str) -> dict[str, Any] | None:
    """:func:`evaluate` from the table's entry; None wherever the input is not plainly valid
    (the derived path then gives the refusal and its message)."""
    from gradlab import budgets
    from gradlab.errors import DomainError

    spec = entry["views"].get(view)
    hyper = entry["hyperparameters"]
    if spec is None or set(at) != {n for n, _ in spec["variables"]} or not set(values) <= {k for k, *_ in hyper}:
        return None
    point: dict[str, Fraction] = {}
    try:
        for n, _ in spec["variables"]:
            point[n] = _mpeval.exact_decimal(n, at[n])
        for k, default, _ in hyper:
            if k not in values and default is None:
                return None
            point[k] = _mpeval.exact_decimal(k, values[k]) if k in values else Fraction(default)
    except DomainError:
        return None
    if not (all(_within(point[n], interval) for n, interval in spec["variables"])
            and all(_within(point[k], interval, as_float=True) for k, _, interval in hyper)):
        return None
    names = {n for n, _ in spec["variables"]} | {k for k, *_ in hyper}
    try:
        roots = _mpeval.from_json({"nodes": spec["nodes"], "roots": dict(spec["roots"])}, names)
    except ValueError:
        return None
    with budgets.timed("evaluate_s", f"evaluating {name} at the point"):
        result = _mpeval.evaluate(roots, point)
    return {"loss": name, "view": view, "at": {k: point[k] for k in at},
            "hyperparameters": {k: float(point[k]) for k, *_ in hyper}, "values": result}


def derive_eval(loss, at: dict[str, str], values: dict[str, str], view: str) -> dict[str, Any]:
    """:func:`evaluate`'s answer for a :class:`~gradlab.losses.Loss`, derived with sympy."""
    from gradlab import symbolic

    result = symbolic.evaluate(loss, at, values, view)
    point = symbolic.exact_point(list(at), at)
    params = symbolic.parameter_values(loss, {k: symbolic.exact_number(k, v) for k, v in values.items()})
    return {"loss": loss.name, "view": view, "at": {k: Fraction(int(point[k].p), int(point[k].q)) for k in at},
            "hyperparameters": {s.name: float(v) for s, v in params.items()}, "values": result}


# --------------------------------------------------------------------------------------------
# The families of toy policies (simulate --help, check --help)
# --------------------------------------------------------------------------------------------


def families() -> list[dict[str, Any]] | None:
    """Every registered family of toy policies (:func:`gradlab.policies.facts`), from the table
    while the sources of its families are current; None otherwise (then ask ``gradlab.policies``,
    which imports JAX: this module does not import it, so that an edit to a policy leaves the
    loss answers current)."""
    found = head(TABLE)
    found = found.get("families") if found is not None else None
    if isinstance(found, dict) and is_current(found.get("sources")) and isinstance(found.get("rows"), list):
        return found["rows"]
    return None


def derive_table(family_facts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The whole table, derived from the registry with the table itself off (``table=None``
    throughout, so that it never certifies itself): every registered loss's ``show`` answer
    and, in every view that applies to it, its partial derivatives by each variable it depends
    on and each hyperparameter (the ones ``gradlab.symbolic.gradient`` gives), what ``eval``
    needs (:func:`derive_eval_entry`), and the derivations themselves for
    ``gradlab.symbolic`` (:func:`gradlab.symbolic.shipped_entry`); with ``family_facts``
    (:func:`gradlab.policies.facts`, which the generator passes), the families too."""
    from gradlab import symbolic
    from gradlab.errors import GradlabError
    from gradlab.losses import ALIASES, LOSSES, TRL_NAMES, get_loss
    from gradlab.symbols import VIEWS

    names = {}
    for spelling in sorted({*LOSSES, *ALIASES, *TRL_NAMES}):
        loss = get_loss(spelling)
        if loss.name in LOSSES and spelling == spelling.strip().lower():
            names[spelling] = loss.name
    grads: dict[str, Any] = {}
    for name, loss in LOSSES.items():
        grads[name] = {}
        for view in VIEWS:
            try:
                partials = symbolic.gradient(loss, view, table=None)
            except GradlabError:
                continue  # a view that does not apply (the margin view of a loss not of h alone)
            grads[name][view] = {"variables": _grad_variables(loss, view),
                                 "partials": {wrt: _grad_part(loss, wrt, view) for wrt in partials}}
    return {
        "format": FORMAT,
        "sources": fingerprint(),
        "views": derive_views(),
        "list": derive_list(),
        "names": names,
        "show": {name: derive_show(loss) for name, loss in LOSSES.items()},
        "grad": grads,
        "eval": {name: derive_eval_entry(loss) for name, loss in LOSSES.items()},
        "derivation": {name: symbolic.shipped_entry(loss) for name, loss in LOSSES.items()},
    } | ({} if family_facts is None else
         {"families": {"sources": fingerprint(source_files(FAMILY_ROOTS)), "rows": family_facts}})
