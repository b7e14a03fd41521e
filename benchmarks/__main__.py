"""python -m benchmarks [--quick] [--json] [--only NAME ...]

Runs every benchmark, each against its baseline in the same run. A full run (no --quick)
writes benchmarks/results.md with the machine description."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.suite import BENCHMARKS, machine

TARGETS = {
    "train_speedup_vs_torch_eager": (">=", 20.0),
    "zoo_derivation_warm_s": ("<", 1.0),
    "slider_update_s": ("<", 0.1),
    "import_s": ("<", 1.0),
    "audit_1m_pairs_s": ("<", 10.0),
}


def summarise(results: dict) -> dict:
    flat = {}
    for section in results.values():
        for key, value in section.items():
            if isinstance(value, int | float) or value is None:
                flat[key] = value
    return flat


def markdown(results: dict, summary: dict, info: dict, seconds: float) -> str:
    lines = ["# Benchmark results", "",
             f"Full run of `python -m benchmarks` ({seconds:.0f} s). Machine: {info['cpu']}, {info['cores']} cores, "
             f"Python {info['python']}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()), "",
             "## Targets", "", "| measure | value | target | met |", "| --- | --- | --- | --- |"]
    for key, (op, bound) in TARGETS.items():
        v = summary.get(key)
        met = v is not None and (v >= bound if op == ">=" else v < bound)
        lines.append(f"| `{key}` | {v if v is None else f'{v:.4g}'} | {op} {bound:g} | {'yes' if met else 'no'} |")
    for name, section in results.items():
        lines += ["", f"## {name}", "", "```json", json.dumps(section, indent=2), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short version (a few minutes on 2 cores)")
    p.add_argument("--tiny", action="store_true", help="smallest sizes (used by the test suite)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.add_argument("--only", nargs="*", choices=list(BENCHMARKS), help="run only these")
    args = p.parse_args(argv)
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    from gradlab import runtime

    runtime.configure()  # an entry point: float64 JAX, compilation cache
    info = machine()
    results = {}
    start = time.perf_counter()
    for name in args.only or BENCHMARKS:
        print(f"[benchmarks] {name} ({size})", file=sys.stderr, flush=True)
        results[name] = BENCHMARKS[name](size)
    seconds = time.perf_counter() - start
    summary = summarise(results)
    if size == "full" and not args.only:
        out = Path(__file__).resolve().parent / "results.md"
        out.write_text(markdown(results, summary, info, seconds), encoding="utf-8")
        print(f"[benchmarks] wrote {out}", file=sys.stderr)
    if args.json:
        out_json = {"size": size, "machine": info, "seconds": seconds, "summary": summary, "results": results}
        print(json.dumps(out_json, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:>36}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
