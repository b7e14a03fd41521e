"""``docs/reproductions.md`` and the catalogue's figures, generated from the registry and a run.

    python -m gradlab.reproduce.docs [docs/reproductions.md] [figures/reproductions]

runs every entry (full length), writes each entry's figure as PNG into the figure folder (the
figure style of :mod:`gradlab.figures`, deterministic) and the Markdown page, both through
:class:`gradlab.output.Folder` (atomic; the figure folder is gradlab's own, ``docs/`` is shared
and only the page gradlab wrote there is replaced). A test fails when the committed page differs
from what the registry and a run give (see ``tests/test_reproduce.py``).

Exit status as ``gradlab reproduce --all``: a FAIL verdict is a finding the page reports, so the
page is written and the command exits 0 whatever the verdicts; 2 for a folder it may not write,
130 (or 143) when interrupted, 1 only for a bug.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gradlab.reproduce import ENTRIES, Entry, Result, make_figure, run_all

__all__ = ["render", "static_section", "result_section", "save_figures", "main", "FIGURE_DIR"]

FIGURE_DIR = "figures/reproductions"
ROUNDING = 1e-12  # numbers below this are shown as "< 1e-12": their digits are float64 rounding


def _number(x: Any) -> str:
    if x is None:  # a non-finite number (gradlab.output's JSON policy)
        return "not finite"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return "< 1e-12" if abs(x) < ROUNDING and x != 0 else f"{x:.4g}"
    if isinstance(x, list):
        return "[" + ", ".join(_number(v) for v in x) + "]"
    return str(x)


def _measured_lines(measured: Mapping[str, Any], indent: int = 0) -> list[str]:
    lines = []
    pad = "  " * indent
    for k, v in measured.items():
        if isinstance(v, Mapping):
            lines.append(f"{pad}- {k}:")
            lines += _measured_lines(v, indent + 1)
        elif isinstance(v, list) and v and isinstance(v[0], Mapping):
            lines.append(f"{pad}- {k}:")
            for i, item in enumerate(v):
                lines.append(f"{pad}  - [{i}]")
                lines += _measured_lines(item, indent + 2)
        else:
            lines.append(f"{pad}- {k}: {_number(v)}")
    return lines


def static_section(entry: Entry) -> str:
    """The part of an entry's section that does not depend on a run."""
    lines = [
        f"## `{entry.name}`: {entry.title}",
        "",
        f"- **Source**: {entry.source}",
        f"- **Claim**: {entry.claim}",
        f"- **Setting**: {entry.setting}",
        f"- **Predicate** (fixed before running): {entry.predicate}",
    ]
    if entry.pending:
        lines.append(f"- **Not yet runnable**: needs {entry.pending}. It reports no result and never PASS.")
    return "\n".join(lines) + "\n"


def result_section(result: Result, figure_prefix: str = "../" + FIGURE_DIR + "/") -> str:
    """The part that a run gives: status, measured numbers, figure, and what a failure means."""
    if result.status == "PENDING":
        return "**Result**: PENDING (not run)\n"
    from gradlab.output import jsonable

    lines = [f"**Result**: {result.status}", "", "Measured:", ""]
    lines += _measured_lines(jsonable(result.measured))
    if result.entry.versus is not None:
        lines += ["", "Effect against its controls (the predicate requires every row to hold):", "",
                  "| comparison | effect | control | holds |", "| --- | --- | --- | --- |"]
        lines += [f"| {_cell(v.comparison)} | {_number(v.effect)} | {_number(v.control)} | {_number(v.holds)} |"
                  for v in result.entry.versus(result.measured)]
    lines += ["", f"![{result.entry.name}]({figure_prefix}{result.entry.name}.png)", ""]
    if result.status == "FAIL" and result.entry.finding:
        lines += [f"**Why it fails**: {result.entry.finding}", ""]
    return "\n".join(lines)


def _short_source(source: str) -> str:
    """'Authors year, arXiv:id' (or 'Authors year, docs/background.md'): the first item and the paper's id."""
    import re

    found = re.search(r"arXiv:\d{4}\.\d{4,5}", source)
    where = found.group(0) if found else ("docs/background.md" if "docs/background.md" in source else "")
    return ", ".join(x for x in (source.split(",")[0], where) if x)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a literal | would end a Markdown table cell


def _table(results: Iterable[Result]) -> list[str]:
    lines = ["| entry | claim | source | result |", "| --- | --- | --- | --- |"]
    for r in results:
        e = r.entry
        lines.append(f"| [`{e.name}`](#{e.name}) | {_cell(e.title)} | {_cell(_short_source(e.source))} | {r.status} |")
    return lines


def render(results: list[Result]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "PENDING")}
    lines = [
        "# Reproductions",
        "",
        "Generated by `python -m gradlab.reproduce.docs` from the catalogue in `gradlab/reproduce/` and a full "
        "run; do not edit by hand. Rerun any entry with `gradlab reproduce NAME` (`--json` for the numbers).",
        "",
        "Each entry states a published claim in our words, the setting we run it in, and a predicate written "
        "from the paper's statement before the run. A FAIL is reported as a FAIL, with what we found about it. "
        "Entries that need parts of gradlab that do not exist yet are listed as PENDING and never pass. "
        f"Numbers below {ROUNDING:g} in absolute value are shown as '< 1e-12' (float64 rounding); "
        "`--json` has them exactly.",
        "",
        f"{counts['PASS']} pass, {counts['FAIL']} fail, {counts['PENDING']} pending.",
        "",
        *_table(results),
        "",
    ]
    for r in results:
        lines += [static_section(r.entry), result_section(r)]
    return "\n".join(lines)


def save_figures(results: Iterable[Result], out: str | os.PathLike = FIGURE_DIR) -> list[Path]:
    """Write each run entry's figure as ``out/NAME.png`` (byte-identical across runs) into a
    folder of gradlab's own (:class:`gradlab.output.Folder`: atomic, hashed manifest, lock)."""
    import matplotlib

    from gradlab import output
    from gradlab.figures import _render, style

    matplotlib.use("Agg", force=True)
    folder = output.Folder(out, flag="--figures")  # checked before the figures are drawn
    outputs = {}
    with style.use("page"):  # the gallery's style, drawn and rendered at a page's width
        for r in results:
            fig = make_figure(r)
            if fig is not None:
                outputs[f"{r.entry.name}.png"] = _render(fig, "png")
    return folder.write(outputs)


def produced_files() -> list[str]:
    """The reproduction figures ``save_figures`` writes for a full run (names in FIGURE_DIR)."""
    return [f"{name}.png" for name, entry in ENTRIES.items() if entry.plot is not None and not entry.pending]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    doc = Path(argv[0] if argv else "docs/reproductions.md")
    figures = Path(argv[1] if len(argv) > 1 else FIGURE_DIR)
    from gradlab import output
    from gradlab.errors import GradlabError
    from gradlab.processes import exit_status, stop_on_signals

    try:
        with stop_on_signals():
            pages = output.Folder(doc.parent, shared=True, flag="the page's folder")
            pages.check([doc.name])  # both folders are checked before the minutes of running
            output.Folder(figures, flag="the figure folder")
            results = run_all(list(ENTRIES), progress=lambda r: print(
                f"{r.status:<7} {r.entry.name} ({r.seconds:.1f} s)", file=sys.stderr, flush=True))
            for path in [*save_figures(results, figures), *pages.write({doc.name: render(results).encode("utf-8")})]:
                print(f"wrote {path}")
    except GradlabError as exc:
        print(f"gradlab.reproduce.docs: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: nothing partial was written
        print("gradlab.reproduce.docs: interrupted", file=sys.stderr)
        return exit_status(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
