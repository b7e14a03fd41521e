"""``gradlab reproduce``: the command-line front end of the catalogue (wired in :mod:`gradlab.cli`).

Exit status: a FAIL verdict is a finding, not an error, so the command exits 0 once every entry
named has run and been judged, whatever the verdicts (pending entries are reported as pending);
2 is a usage error or bad input, 1 an internal failure (a bug), 130 an interrupt. For CI,
``--strict`` exits ``STRICT_FAIL`` (3) when any entry FAILs, a code no crash or usage error
gives, so that a script can tell a failed claim from a broken run.
"""

from __future__ import annotations

import argparse
import sys

from gradlab import output
from gradlab.errors import GradlabError
from gradlab.reproduce import ENTRIES, Result, get_entry, run_all

__all__ = ["main", "STRICT_FAIL"]

STRICT_FAIL = 3  # --strict: at least one entry's verdict was FAIL


def _selection(args: argparse.Namespace) -> list[str]:
    modes = sum([bool(args.names), args.all, args.list])
    if modes != 1:
        raise GradlabError("give entry names, --all or --list (exactly one of them); see 'gradlab reproduce --list'")
    if args.list or args.all:
        return list(ENTRIES)
    return [get_entry(n).name for n in args.names]  # unknown names fail before anything runs


def _list(names: list[str], as_json: bool) -> int:
    entries = [ENTRIES[n] for n in names]
    if as_json:
        print(output.dumps([{"name": e.name, "title": e.title, "source": e.source, "claim": e.claim,
                           "setting": e.setting, "predicate": e.predicate, "runnable": e.runnable,
                           **({"pending": e.pending} if e.pending else {})} for e in entries], indent=2))
        return 0
    width = max(len(e.name) for e in entries)
    for e in entries:
        flag = "" if e.runnable else "  (pending)"
        print(f"{e.name:<{width}}  {e.title}{flag}")
    print(f"\n{len(entries)} entries; 'gradlab reproduce NAME' runs one, '--all' runs them all.")
    return 0


def _print_result(r: Result) -> None:
    from gradlab.reproduce.docs import _measured_lines

    print(f"{r.status:<7} {r.entry.name}: {r.entry.title}" + (f"  ({r.seconds:.1f} s)" if r.outcome else ""))
    print(f"        source: {r.entry.source}")
    print(f"        predicate: {r.entry.predicate}")
    if r.entry.pending:
        print(f"        not yet runnable: needs {r.entry.pending}")
    for line in _measured_lines(r.as_dict()["measured"]):
        print("        " + line)
    if r.status == "FAIL" and r.entry.finding:
        print(f"        why it fails: {r.entry.finding}")


def _options(items: list[str] | None) -> dict:
    """``--set KEY=VALUE`` items, VALUE read as a TOML value (nothing is evaluated)."""
    import tomllib

    out = {}
    for item in items or []:
        key, sep, raw = (x.strip() for x in item.partition("="))
        if not sep or not key or not raw:
            raise GradlabError(f"malformed --set item {item!r}: expected KEY=VALUE, e.g. --set 'start=[[0.3, 0.2]]'")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            raise GradlabError(f"--set {key}: {raw!r} is not a TOML value (a number or a [list])") from None
    return out


def main(args: argparse.Namespace) -> int:
    names = _selection(args)
    if args.list:
        return _list(names, args.json)
    from gradlab import runtime

    runtime.configure()  # the persistent compilation cache, as every other entry point
    progress = None
    if not args.json:
        progress = _print_result
    elif sys.stderr.isatty():
        def progress(r: Result) -> None:
            print(f"{r.status:<7} {r.entry.name}", file=sys.stderr, flush=True)
    options = _options(args.set)
    if options and len(names) != 1:
        raise GradlabError("--set applies to one entry: name it, e.g. gradlab reproduce feng_flow_endpoint "
                           "--set 'start=[[0.3, 0.2]]'")
    results = run_all(names, quick=args.quick, progress=progress, options=options)
    if args.figures:
        from gradlab.reproduce.docs import save_figures

        for path in save_figures(results, args.figures):
            if not args.json:
                print(f"wrote {path}")
    if args.json:
        print(output.dumps([r.as_dict() for r in results], indent=2))
    else:
        counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "PENDING")}
        print(f"\n{counts['PASS']} pass, {counts['FAIL']} fail, {counts['PENDING']} pending")
    failed = any(r.status == "FAIL" for r in results)
    return STRICT_FAIL if failed and getattr(args, "strict", False) else 0
