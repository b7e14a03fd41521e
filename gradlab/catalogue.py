"""The loss catalogue, ``docs/losses.md``, generated from the registry.

    python -m gradlab.catalogue docs/losses.md     # or: python3 tasks.py docs

A test fails when the committed file differs from what this renders.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gradlab import symbolic
from gradlab.losses import LOSSES, OUT_OF_SCOPE, Loss
from gradlab.printing import latex_symbol
from gradlab.symbols import HYPERPARAMETERS

__all__ = ["render", "main"]


def _entry(loss: Loss) -> list[str]:
    aliases = f" (aliases: {', '.join(f'`{a}`' for a in loss.aliases)})" if loss.aliases else ""
    hyper = ", ".join(
        f"${latex_symbol(k)}$ (`{k}`) = {float(v):g} ({HYPERPARAMETERS[k].meaning}; domain {loss.domain(k)})"
        for k, v in loss.defaults.items()
    ) or "none"
    lines = [
        f"## `{loss.name}`{aliases}",
        "",
        loss.title,
        "",
        f"$$\\ell = {symbolic.latex(loss.expr)}$$",
        "",
        f"- hyperparameters: {hyper}",
        f"- needs a reference model: {'yes' if loss.needs_reference else 'no'}; "
        f"length-normalised: {'yes' if loss.length_normalised else 'no'}"
        + ("; an expectation over policy samples (per-pair integrand shown)" if loss.kind == "expectation" else ""),
        f"- references: {', '.join(loss.references)}",
        "",
    ]
    for view in ("probability", "length"):
        lines += [f"Gradients, {view} view:", ""]
        for var, expr in symbolic.gradient(loss, view).items():
            if var in loss.hyperparameters:
                continue
            lines.append(f"- $\\partial \\ell / \\partial {symbolic.latex(symbolic.symbol_of(var))} = {symbolic.latex(expr)}$")
        lines.append("")
    doc_body = loss.doc.split("\n", 1)[1].strip() if "\n" in loss.doc else ""
    if doc_body:
        lines += ["<details><summary>Docstring</summary>", "", "```text", doc_body, "```", "", "</details>", ""]
    return lines


def render() -> str:
    lines = [
        "# Loss catalogue",
        "",
        "Generated from the registry by `python3 tasks.py docs`; do not edit by hand.",
        f"{len(LOSSES)} losses. Notation: $h = (lp_w - ref_w) - (lp_l - ref_l)$, $r = lp - ref$;",
        "probability view $lp = \\log p$, $ref = \\log q$; length view $lp = len \\cdot m$, $ref = len \\cdot n$.",
        "",
        "| loss | summary | reference model | length-normalised |",
        "| --- | --- | --- | --- |",
    ]
    for loss in LOSSES.values():
        lines.append(
            f"| [`{loss.name}`](#{loss.name}) | {loss.title} | {'yes' if loss.needs_reference else 'no'} "
            f"| {'yes' if loss.length_normalised else 'no'} |"
        )
    lines += ["", "Known but out of scope:", ""]
    lines += [f"- `{name}`: {reason}" for name, reason in OUT_OF_SCOPE.items()]
    lines.append("")
    for loss in LOSSES.values():
        lines += _entry(loss)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else "docs/losses.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(), encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
