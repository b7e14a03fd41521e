"""The static website: the repository's pages, the loss catalogue in every view, and an explorer
that computes in the reader's browser.

    python3 tasks.py site                              # the whole site into site/ (installs the site extra)
    python -m gradlab.website --out DIR                # the same, with the site extra installed
    python -m gradlab.website --out DIR --losses dpo,simpo   # a reduced build: only these losses

The pages are the repository's own Markdown (the README as the home page, ``docs/``, the figure
gallery, the benchmark results), built with MkDocs Material from ``site_src/mkdocs.yml``; the
loss catalogue is rendered here with every view's gradients. Maths is typeset by MathJax, copied
into the site from the ``django-static-mathjax`` package, so the site needs no network.

The explorer (``site_src/explorer/``) is plain JavaScript. Its numbers come from gradlab's closed
forms, printed as JavaScript by sympy's code printer at build time (``losses.js``), never from a
string evaluated in the browser or here. The self-test page compares them with gradlab's own
values, computed here in arbitrary precision and exported beside them (``selftest-data.js``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sympy
from sympy.printing.jscode import JavascriptCodePrinter

from gradlab import catalogue, symbolic
from gradlab.errors import GradlabError
from gradlab.losses import LOSSES, Loss
from gradlab.printing import latex_symbol
from gradlab.symbols import HYPERPARAMETERS, VIEWS
from gradlab.trl import TRAINERS, TRL_CONFIGS

__all__ = ["js_expr", "explorer_data", "selftest_data", "loss_page", "stage", "build", "main"]

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "site_src"

# The explorer's planes: the two closed-form views, and the logit view the browser derives from
# the log view by the chain rule through a three-way softmax (as the gradient_atlas figure does).
FIELD_VIEWS = {"probability": ("p_w", "p_l"), "log": ("lp_w", "lp_l")}
# The catalogue shows every view a loss has; the margin view exists for losses of the margin alone.
CATALOGUE_VIEWS = ("log", "probability", "length", "margin")

# Self-test points (p_w, p_l), read as exact decimals; the log view uses lp = log p at the same point.
SELFTEST_POINTS = ((0.3, 0.02), (0.7, 0.45), (0.05, 0.6))
SELFTEST_BETAS = (None, 2.5)  # None: the loss's default; 2.5 moves beta where a loss has one
SELFTEST_TOLERANCE = 1e-9  # |js - gradlab| <= tol * max(1, |gradlab|)

# Pages in the repository, by path, that the site includes when they exist; docs/*.md is
# globbed (docs/dev-notes/ is a work log and stays out).
PAGES = ("README.md", "figures/README.md", "figures/scorecard.md", "benchmarks/results.md")


class SiteError(GradlabError):
    """The site cannot be built as asked (bad arguments, a broken link, a missing tool)."""


# --------------------------------------------------------------------------------------------
# Closed forms as JavaScript
# --------------------------------------------------------------------------------------------


class _Printer(JavascriptCodePrinter):
    """sympy's JavaScript printer, reading variables from an object ``v`` and the stable special
    functions from ``G`` (defined in ``site_src/explorer/gradlab.js``)."""

    def __init__(self) -> None:
        super().__init__({"user_functions": {"sigmoid": "G.sigmoid", "softplus": "G.softplus",
                                             "log1mexp": "G.log1mexp", "Heaviside": "G.heaviside"},
                          "strict": True})

    def _print_Symbol(self, expr: sympy.Symbol) -> str:
        return f"v.{expr.name}"


def js_expr(expr: sympy.Expr) -> str:
    """``expr`` as one JavaScript expression of ``v.NAME`` variables, in the stable form the
    numpy and JAX backends use (``symbolic.stabilise``: products of exponentials in log space)."""
    return _Printer().doprint(symbolic.stabilise(symbolic.as_expr(expr)))


def _number(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _hyper(loss: Loss, name: str) -> dict[str, Any]:
    from gradlab.checks import hyper_value
    from gradlab.explore import slider_values

    d = loss.domain(name)
    return {
        "name": name,
        "latex": latex_symbol(name),
        "meaning": HYPERPARAMETERS[name].meaning,
        "default": hyper_value(loss, name),
        "low": _number(d.low), "high": _number(d.high), "low_open": d.low_open, "high_open": d.high_open,
        "domain": str(d),
        "slider": list(slider_values(loss, name)),
    }


def _trl_rows(loss: Loss) -> list[dict[str, str]]:
    return [{"trainer": TRAINERS[row.trainer], "loss_type": row.loss_type, "key": row.key,
             "values": ", ".join(f"{k}={v}" for k, v in row.values.items())}
            for row in TRL_CONFIGS if row.loss == loss.name]


def _view_entry(loss: Loss, view: str) -> dict[str, Any]:
    x, y = FIELD_VIEWS[view]
    return {
        "x": x, "y": y,
        "dx": js_expr(symbolic.derivative(loss, x, view)),
        "dy": js_expr(symbolic.derivative(loss, y, view)),
        "latex_x": symbolic.latex(symbolic.derivative(loss, x, view)),
        "latex_y": symbolic.latex(symbolic.derivative(loss, y, view)),
        "wrt_x": symbolic.latex(symbolic.symbol_of(x)),
        "wrt_y": symbolic.latex(symbolic.symbol_of(y)),
    }


def explorer_data(losses: Iterable[Loss]) -> dict[str, Any]:
    """What the explorer knows about each loss: metadata, hyperparameters with their slider
    positions, LaTeX, and the two axis partials of each field view as JavaScript source."""
    out = {}
    for loss in losses:
        out[loss.name] = {
            "name": loss.name,
            "title": loss.title,
            "aliases": list(loss.aliases),
            "trl": _trl_rows(loss),
            "latex": symbolic.latex(loss.expr),
            "hyper": [_hyper(loss, h) for h in loss.hyperparameters],
            "needs_reference": loss.needs_reference,
            "length_normalised": loss.length_normalised,
            "views": {view: _view_entry(loss, view) for view in FIELD_VIEWS},
        }
    return {"fixed": _fixed(), "losses": out}


def _js_literal(data: dict[str, Any]) -> str:
    """The explorer data as a JavaScript object literal: JSON, except that each view's ``dx`` and
    ``dy`` become functions of ``v`` whose bodies are the printed closed forms."""
    losses = []
    for name, entry in data["losses"].items():
        views = []
        for view, e in entry["views"].items():
            rest = {k: v for k, v in e.items() if k not in ("dx", "dy")}
            views.append(f"{json.dumps(view)}: Object.assign({json.dumps(rest)}, "
                         f"{{dx: (v) => {e['dx']}, dy: (v) => {e['dy']}}})")
        meta = {k: v for k, v in entry.items() if k != "views"}
        losses.append(f"{json.dumps(name)}: Object.assign({json.dumps(meta)}, {{views: {{{', '.join(views)}}}}})")
    body = ",\n  ".join(losses)
    fixed = json.dumps(data["fixed"])
    return (f"// Generated by gradlab.website from gradlab's closed forms; do not edit.\n"
            f"\"use strict\";\nwindow.GRADLAB_DATA = {{fixed: {fixed}, losses: {{\n  {body}\n}}}};\n")


def _fixed() -> dict[str, float]:
    """Every variable off the field views' axes at the neutral point (``View.neutral``): the
    reference's probabilities and log-probabilities, lengths 1, tails 0."""
    return {k: v for view in FIELD_VIEWS for k, v in VIEWS[view].neutral().items()}


def _log(x: float) -> float:
    return float(sympy.log(sympy.Rational(str(x))).evalf(30))


def selftest_data(losses: Iterable[Loss]) -> list[dict[str, Any]]:
    """gradlab's values of each exported partial at the self-test points, each to 20 significant
    digits (``symbolic.evaluate``: mpmath at rising precision), for the browser to compare with."""
    fixed = _fixed()
    records = []
    for loss in losses:
        for beta in SELFTEST_BETAS:
            if beta is not None and "beta" not in loss.hyperparameters:
                continue
            values = {} if beta is None else {"beta": beta}
            for pw, pl in SELFTEST_POINTS:
                for view, (x, y) in FIELD_VIEWS.items():
                    at = {**fixed, "p_w": pw, "p_l": pl, "lp_w": _log(pw), "lp_l": _log(pl)}
                    names = symbolic.variables(loss, view)
                    at = {k: at[k] for k in names}
                    got = symbolic.evaluate(loss, at, values, view)
                    # a variable the loss does not read (sft has no lp_l) is absent: its partial is 0
                    records.append({"loss": loss.name, "view": view, "at": at, "values": values,
                                    "dx": float(got.get(x, 0)), "dy": float(got.get(y, 0))})
    return records


# --------------------------------------------------------------------------------------------
# The loss catalogue page
# --------------------------------------------------------------------------------------------


def _gradients(loss: Loss, view: str) -> list[str]:
    try:
        grads = symbolic.gradient(loss, view)
    except GradlabError:
        return []  # the margin view exists only for losses of the margin alone
    lines = [f"Gradients, {view} view:", ""]
    for var, expr in grads.items():
        if var not in loss.hyperparameters:
            wrt = symbolic.latex(symbolic.symbol_of(var))
            lines.append(f"- $\\partial \\ell / \\partial {wrt} = {symbolic.latex(expr)}$")
    return [*lines, ""]


def _loss_section(loss: Loss) -> list[str]:
    trl = _trl_rows(loss)
    trl_text = "; ".join(f"{r['trainer']} `loss_type={r['loss_type'] or '-'}`"
                         + (f" with {r['values']}" if r["values"] else "") for r in trl) or "none"
    lines = catalogue.entry(loss, views=())
    lines += [
        f"- TRL: {trl_text}",
        f"- [Open `{loss.name}` in the explorer](../explorer/index.html?loss={loss.name})",
        "",
        "| audit: paper equation | reference implementations | differences found |",
        "| --- | --- | --- |",
        "| " + " | ".join(catalogue.audit_cells(loss)) + " |",
        "",
    ]
    for view in CATALOGUE_VIEWS:
        lines += _gradients(loss, view)
    return lines


def loss_page(losses: Sequence[Loss]) -> str:
    """The site's loss catalogue: ``docs/losses.md``'s entries, with the gradients in every view,
    the TRL names and the audit row of each loss, and a link into the explorer."""
    lines = [
        "# Loss catalogue",
        "",
        f"{len(losses)} losses, generated from gradlab's registry when the site was built. "
        "Notation: $h = (lp_w - ref_w) - (lp_l - ref_l)$, $r = lp - ref$; views: "
        "log (canonical), probability ($lp = \\log p$, $ref = \\log q$), length at fixed per-token means "
        "($lp = len \\cdot m$, $ref = len \\cdot n$) and, for losses of the margin alone, margin ($h$).",
        "",
        "| loss | summary | reference model | length-normalised |",
        "| --- | --- | --- | --- |",
        *[f"| [`{loss.name}`](#{loss.name}) | {loss.title} | {'yes' if loss.needs_reference else 'no'} "
          f"| {'yes' if loss.length_normalised else 'no'} |" for loss in losses],
        "",
    ]
    for loss in losses:
        lines += _loss_section(loss)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Staging the MkDocs sources, and building
# --------------------------------------------------------------------------------------------

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_HEADING = re.compile(r"^(#{2,6}) `([A-Za-z0-9_.-]+)`(.*?)\s*$", re.MULTILINE)


def _anchored(text: str) -> str:
    """Give a heading that starts with a code name (``## `dpo` ...``) that name as its anchor,
    the convention the generated pages link by (``[dpo](#dpo)``)."""
    return _CODE_HEADING.sub(lambda m: m.group(0) if "{#" in m.group(3)
                             else f"{m.group(1)} `{m.group(2)}`{m.group(3)} {{#{m.group(2)}}}", text)


def _local_targets(page: Path, text: str) -> list[Path]:
    """The files a page links to or shows, inside the repository."""
    out = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the same page
        out.append((page.parent / target.split("#", 1)[0].split("?", 1)[0]).resolve())
    return out


def _pages(root: Path) -> list[Path]:
    docs = sorted(p for p in (root / "docs").glob("*.md"))
    return [root / p for p in PAGES if (root / p).exists()] + docs


def _mathjax() -> Path:
    try:
        import mathjax  # django-static-mathjax: MathJax 3's release files
    except ImportError as exc:
        raise SiteError("MathJax is not installed: the site extra provides it "
                        "(python3 tasks.py site, or pip install -e '.[site]')") from exc
    path = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5" / "tex-svg-full.js"
    if not path.exists():
        raise SiteError(f"the installed MathJax package has no {path.name}")
    return path


def stage(staging: Path, losses: Sequence[Loss], root: Path = ROOT) -> Path:
    """Lay out the MkDocs sources in ``staging``: the repository's pages at their own paths (so
    every relative link keeps working), every local file they link, the generated pages and the
    explorer. Returns the MkDocs configuration file. A link to a missing file is an error."""
    import yaml

    docs = staging / "docs"
    pages = []
    for page in _pages(root):
        rel = page.relative_to(root)
        text = loss_page(losses) if rel.as_posix() == "docs/losses.md" else page.read_text(encoding="utf-8")
        out = docs / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(_anchored(text), encoding="utf-8")
        pages.append(out)

    explorer = docs / "explorer"
    shutil.copytree(SOURCES / "explorer", explorer)
    (explorer / "losses.js").write_text(_js_literal(explorer_data(losses)), encoding="utf-8")
    selftest = json.dumps({"tolerance": SELFTEST_TOLERANCE, "records": selftest_data(losses)})
    (explorer / "selftest-data.js").write_text(
        "// Generated by gradlab.website: gradlab's values (mpmath, 20 digits); do not edit.\n"
        f"window.GRADLAB_SELFTEST = {selftest};\n", encoding="utf-8")
    assets = docs / "assets"
    shutil.copytree(SOURCES / "assets", assets)
    (assets / "mathjax").mkdir(exist_ok=True)
    shutil.copyfile(_mathjax(), assets / "mathjax" / "tex-svg-full.js")

    # every file a page links or shows: already staged, or copied from the same path in the repository
    missing = []
    for page in pages:
        for target in _local_targets(page, page.read_text(encoding="utf-8")):
            if target.exists() and target.is_relative_to(docs):
                continue
            source = root / target.relative_to(docs) if target.is_relative_to(docs) else None
            if source is None or not source.is_file():
                missing.append(f"{page.relative_to(docs)} -> {target.relative_to(docs) if source else target.name}")
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    if missing:
        raise SiteError("pages link to files that are not in the repository:\n  " + "\n  ".join(missing))

    config = yaml.safe_load((SOURCES / "mkdocs.yml").read_text(encoding="utf-8"))
    config["nav"] = _present(config["nav"], docs)
    config["docs_dir"] = "docs"
    path = staging / "mkdocs.yml"
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML
    return path


def _present(nav: list, docs: Path) -> list:
    """The navigation without the pages this checkout lacks (docs/background.md may be absent)."""
    out = []
    for item in nav:
        (title, target), = item.items()
        if isinstance(target, list):
            target = _present(target, docs)
            if target:
                out.append({title: target})
        elif (docs / target).exists():
            out.append({title: target})
    return out


def build(out: Path, losses: Sequence[Loss] | None = None, *, root: Path = ROOT) -> Path:
    """Build the site into ``out`` (replaced whole). ``losses`` limits the catalogue, the explorer
    and the self-test to those losses (a reduced build, for tests); the default is every loss."""
    try:
        from mkdocs.commands.build import build as mkdocs_build
        from mkdocs.config import load_config
        from mkdocs.exceptions import MkDocsException
    except ImportError as exc:
        raise SiteError("MkDocs is not installed: the site extra provides it "
                        "(python3 tasks.py site, or pip install -e '.[site]')") from exc
    losses = list(LOSSES.values()) if losses is None else list(losses)
    out = Path(out).resolve()
    if out == root or root.is_relative_to(out) or out == Path.home():
        raise SiteError(f"refusing to build into {out}: it holds the repository; name a folder of its own")
    with tempfile.TemporaryDirectory(prefix="gradlab-site-") as tmp:
        config_file = stage(Path(tmp), losses, root)
        try:
            config = load_config(config_file=str(config_file), site_dir=str(out), strict=True)
            mkdocs_build(config)
        except MkDocsException as exc:
            raise SiteError(f"MkDocs could not build the site: {exc}") from exc
    return out


def _losses(text: str | None) -> list[Loss] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOSSES]
    if not names or unknown:
        raise SiteError(f"--losses takes registered loss names separated by commas; unknown: "
                        f"{', '.join(unknown) or '(none given)'}; known: {', '.join(LOSSES)}")
    return [LOSSES[n] for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradlab.website", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="site", help="the folder to build into (replaced whole; default site/)")
    parser.add_argument("--losses", help="only these losses, comma-separated (a reduced build)")
    args = parser.parse_args(argv)
    try:
        out = build(Path(args.out), _losses(args.losses))
    except SiteError as exc:
        print(f"gradlab.website: {exc}", file=sys.stderr)
        return 2
    print(f"built {out}; open {out / 'index.html'} through any static web server, for example:\n"
          f"  python3 -m http.server --directory {args.out} 8000   # then http://127.0.0.1:8000/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
