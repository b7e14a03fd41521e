"""The ``gradlab`` command line: list, show, grad, eval and figures.

Human-readable output by default, JSON with ``--json`` (contracts in DESIGN.md). Every error a
user can cause exits with status 2 and a message that says what was wrong and what is allowed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from gradlab.errors import GradlabError

__all__ = ["main"]


def _parse_pairs(text_items: Sequence[str] | None, flag: str) -> dict[str, str]:
    """``["a=1,b=2", "c=3"]`` -> ``{"a": "1", "b": "2", "c": "3"}``, with clear errors."""
    out: dict[str, str] = {}
    for text in text_items or []:
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, value = item.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not name or not value:
                raise GradlabError(f"malformed {flag} item '{item}': expected NAME=NUMBER, e.g. {flag} lp_w=-1.5")
            if name in out:
                raise GradlabError(f"{flag} gives '{name}' twice")
            try:
                x = float(value)
            except ValueError:
                raise GradlabError(f"{flag} {name}={value}: '{value}' is not a number") from None
            if not math.isfinite(x):
                raise GradlabError(f"{flag} {name}={value}: the value must be finite")
            out[name] = value
    return out


def _loss_from(args: argparse.Namespace):
    from gradlab.losses import custom, get_loss

    if args.expr is not None and args.loss is not None:
        raise GradlabError("give either a loss name or --expr, not both")
    if args.expr is not None:
        return custom(args.expr, name="custom")
    if args.loss is None:
        raise GradlabError("name a loss (see 'gradlab list') or give --expr FORMULA")
    return get_loss(args.loss)


def _json_number(x: Any) -> float | str:
    """A float where it fits float64; otherwise the exact decimal string (e.g. '1.2e+500')."""
    import mpmath

    f = float(x)
    if math.isinf(f) and mpmath.isfinite(x):
        return mpmath.nstr(x, 17)
    return f


def _log10_abs(x: Any) -> float | None:
    import mpmath

    return None if x == 0 else float(mpmath.log10(abs(x)))


def _variables_of(names: Sequence[str]) -> dict[str, str]:
    from gradlab.symbols import info

    return {n: info(n).meaning for n in names}


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from gradlab.losses import LOSSES, OUT_OF_SCOPE

    if args.json:
        rows = [
            {"name": n, "aliases": list(l.aliases), "title": l.title, "kind": l.kind,
             "needs_reference": l.needs_reference, "length_normalised": l.length_normalised}
            for n, l in LOSSES.items()
        ]
        print(json.dumps({"losses": rows, "out_of_scope": dict(OUT_OF_SCOPE)}, indent=2))
        return 0
    width = max(map(len, LOSSES))
    for n, l in LOSSES.items():
        alias = f"  (aliases: {', '.join(l.aliases)})" if l.aliases else ""
        print(f"{n:<{width}}  {l.title}{alias}")
    print(f"\n{len(LOSSES)} losses. Known but out of scope: {', '.join(OUT_OF_SCOPE)}.")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import sympy

    from gradlab import symbolic
    from gradlab.losses import OUT_OF_SCOPE
    from gradlab.symbols import HYPERPARAMETERS

    if args.loss in OUT_OF_SCOPE and args.expr is None:
        if args.json:
            print(json.dumps({"name": args.loss, "in_scope": False, "reason": OUT_OF_SCOPE[args.loss]}, indent=2))
        else:
            print(f"{args.loss}: known, but out of scope.\n{OUT_OF_SCOPE[args.loss]}")
        return 0
    loss = _loss_from(args)
    expr = loss.expr
    hyper = {
        k: {"default": None if v is None else float(v), "meaning": HYPERPARAMETERS[k].meaning,
            "domain": str(loss.domain(k))}
        for k, v in loss.defaults.items()
    }
    if args.json:
        out = {
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
        }
        print(json.dumps(out, indent=2))
        return 0
    alias = f" (aliases: {', '.join(loss.aliases)})" if loss.aliases else ""
    print(f"{loss.name}{alias}: {loss.title}\n")
    print(sympy.pretty(expr, use_unicode=True))
    print(f"\ntext:  {expr}")
    print(f"LaTeX: {symbolic.latex(expr)}\n")
    print("hyperparameters: " + (", ".join(f"{k} = {v['default']}  {v['domain']}" for k, v in hyper.items()) or "none"))
    print(f"needs a reference model: {'yes' if loss.needs_reference else 'no'}; "
          f"length-normalised: {'yes' if loss.length_normalised else 'no'}")
    if loss.references:
        print("references: " + "; ".join(loss.references))
    if loss.doc and loss.function is not None:
        print("\n" + loss.doc)
    return 0


def cmd_grad(args: argparse.Namespace) -> int:
    import sympy

    from gradlab import symbolic

    loss = _loss_from(args)
    d = symbolic.derivative(loss, args.wrt, args.view)
    names = [*symbolic.variables(loss, args.view), *loss.hyperparameters]
    if args.json:
        out = {
            "loss": loss.name,
            "view": args.view,
            "wrt": args.wrt,
            "expr": str(symbolic.standard(d)),
            "readable": str(d),
            "latex": symbolic.latex(d),
            "variables": _variables_of(names),
        }
        print(json.dumps(out, indent=2))
        return 0
    print(f"d {loss.name} / d {args.wrt}   ({args.view} view)\n")
    print(sympy.pretty(d, use_unicode=True))
    print(f"\ntext:  {d}")
    print(f"LaTeX: {symbolic.latex(d)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gradlab import symbolic

    loss = _loss_from(args)
    at = _parse_pairs(args.at, "--at")
    values = _parse_pairs(args.set, "--set")
    result = symbolic.evaluate(loss, at, values, args.view)
    params = {s.name: float(v) for s, v in symbolic.parameter_values(loss, values).items()}
    if args.json:
        out = {
            "loss": loss.name,
            "view": args.view,
            "at": {k: float(v) for k, v in at.items()},
            "hyperparameters": params,
            "value": _json_number(result["loss"]),
            "gradient": {k: _json_number(v) for k, v in result.items() if k != "loss"},
            # log-magnitudes: readable whatever the size (probability-view gradients overflow)
            "log10_abs": {k: _log10_abs(v) for k, v in result.items()},
        }
        print(json.dumps(out, indent=2))
        return 0
    import mpmath

    print(f"{loss.name} ({args.view} view) at " + ", ".join(f"{k}={v}" for k, v in at.items()))
    print("hyperparameters: " + (", ".join(f"{k}={v:g}" for k, v in params.items()) or "none"))
    width = max(len(k) for k in result) + 3
    for k, v in result.items():
        label = "loss" if k == "loss" else f"d/d{k}"
        print(f"  {label:<{width}} {mpmath.nstr(v, 12)}")
    return 0


def _progress_bar(done: int, total: int, label: str) -> None:
    width = 30
    filled = round(width * done / total)
    end = "\n" if done == total else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<20}", end=end, file=sys.stderr, flush=True)


def cmd_check(args: argparse.Namespace) -> int:
    from gradlab import checks, runtime
    from gradlab.losses import get_loss

    runtime.configure()
    if args.points < 1:
        raise GradlabError(f"--points must be a positive whole number, not {args.points}")
    names = [get_loss(n).name for n in args.losses] or None
    progress = None if args.json or not sys.stderr.isatty() else _progress_bar
    rows = checks.run_matrix(names, args.family or None, points=args.points, progress=progress)
    failed = [r for r in rows if not r.ok]
    if args.json:
        print(json.dumps({"tolerance": checks.TOLERANCE, "fd_tolerance": checks.FD_TOLERANCE,
                          "rows": [r.as_dict() for r in rows]}, indent=2))
    else:
        width = max(len(r.loss) for r in rows)
        print(f"{'loss':<{width}}  {'family':<11} {'points':>6}  {'max rel err':>11}  {'fd rel err':>10}  {'seconds':>7}")
        for r in rows:
            flag = "" if r.ok else "  FAIL"
            print(f"{r.loss:<{width}}  {r.family:<11} {r.points:>6}  {r.max_rel_error:>11.2e}  "
                  f"{r.fd_max_rel_error:>10.2e}  {r.seconds:>7.2f}{flag}")
    for r in failed:
        print(f"gradlab: check failed: {r.loss} x {r.family}: max relative error {r.max_rel_error:.3g} "
              f"(tolerance {checks.TOLERANCE:g}), finite differences {r.fd_max_rel_error:.3g} "
              f"(tolerance {checks.FD_TOLERANCE:g})", file=sys.stderr)
    return 1 if failed else 0


def _max_len(text: str) -> int | None:
    """``--max-len``: a positive whole number (the forced stop) or ``none`` (unbounded)."""
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number or 'none' (unbounded), not {text!r}")
    return value


def cmd_simulate(args: argparse.Namespace) -> int:
    from gradlab import dynamics, runtime
    from gradlab.losses import get_loss

    runtime.configure()
    loss = get_loss(args.loss)
    values = {k: float(v) for k, v in _parse_pairs(args.set, "--set").items()}
    progress = None
    if not args.json and sys.stderr.isatty():
        progress = lambda done, total: _progress_bar(done, total, "steps")  # noqa: E731
    sim = dynamics.simulate(loss, args.policy, args.dataset, steps=args.steps, seeds=args.seeds,
                            values=values, lr=args.lr, vocab=args.vocab, max_len=args.max_len, progress=progress)
    series = {"step": sim.steps.tolist()}
    for name in dynamics.METRICS:
        series[name] = sim.series(name).tolist()
    if args.json:
        out = {"loss": sim.loss, "policy": sim.family, "dataset": sim.dataset, "seeds": sim.seeds,
               "hyperparameters": sim.settings[0], "config": sim.config,
               "interrupted": sim.interrupted, "metrics": series}
        print(json.dumps(out))
        return 130 if sim.interrupted else 0
    el = sim.series("expected_length")
    mode = "unbounded" if sim.config["max_len"] is None else f"forced stop at {sim.config['max_len']} tokens"
    print(f"{sim.loss} on {sim.family} (vocab {sim.config['vocab']}, {mode}) / {sim.dataset}: {len(sim.steps)} steps, "
          f"{sim.seeds} seeds, " + ", ".join(f"{k}={v:g}" for k, v in sim.settings[0].items()))
    if sim.interrupted:
        print("(interrupted: metrics up to the last completed chunk)")
    if len(sim.steps):
        for name in dynamics.METRICS:
            first, last = sim.series(name)[0], sim.series(name)[-1]
            print(f"  {name:<18} {first.mean():>10.4f} -> {last.mean():>10.4f}   (mean over seeds; final "
                  f"min {last.min():.4f}, max {last.max():.4f})")
        print(f"  length drift factor {(el[-1] / el[0]).mean():.3f}")
    return 130 if sim.interrupted else 0


def cmd_figures(args: argparse.Namespace) -> int:
    from gradlab.figures import save_all
    # save_all configures JAX itself (figure regeneration is an entry point)

    written = save_all(args.out, names=args.names or None, progress=not args.quiet)
    if args.quiet:
        return 0
    for path in written:
        print(path)
    return 0


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from gradlab.symbols import VIEWS

    p = argparse.ArgumentParser(
        prog="gradlab",
        description="Closed-form, numerically verified gradients of preference-optimisation losses.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def loss_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("loss", nargs="?", help="a registered loss or alias (see 'gradlab list')")
        sp.add_argument("--expr", help="a user-defined loss formula in the canonical variables")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser("list", help="every loss with its aliases")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("show", help="a loss's formula, hyperparameters and references")
    loss_args(sp)
    sp.set_defaults(func=cmd_show)

    views = ", ".join(VIEWS)
    sp = sub.add_parser("grad", help="the closed-form partial derivative of a loss")
    loss_args(sp)
    sp.add_argument("--wrt", required=True, help="the variable or hyperparameter to differentiate by")
    sp.add_argument("--view", default="log", help=f"coordinates: {views} (default log)")
    sp.set_defaults(func=cmd_grad)

    sp = sub.add_parser("eval", help="the loss and every first partial derivative at a point")
    loss_args(sp)
    sp.add_argument("--at", action="append", required=True, help="the point, e.g. lp_w=-1,lp_l=-2,ref_w=-1,ref_l=-1")
    sp.add_argument("--set", action="append", help="hyperparameter values, e.g. beta=0.5")
    sp.add_argument("--view", default="log", help=f"coordinates: {views} (default log)")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("check", help="verify closed forms against JAX autodiff on toy policies")
    sp.add_argument("losses", nargs="*", help="losses to check (default: all)")
    sp.add_argument("--family", action="append", help="policy family (repeatable; default: all four)")
    sp.add_argument("--points", type=int, default=1000, help="random points per loss and family (default 1000)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_check)

    # names are validated by gradlab.dynamics (which lists the allowed ones); importing it here
    # would load JAX for every command
    sp = sub.add_parser("simulate", help="train a loss on a toy policy and report the metrics")
    sp.add_argument("loss", help="a registered loss or alias")
    sp.add_argument("--policy", default="unigram",
                    help="policy family: unigram, tabular, bigram, linear_head (default unigram)")
    sp.add_argument("--dataset", default="equal_length",
                    help="preference data: equal_length, chosen_longer, rejected_longer, shared_prefix, "
                         "similar_embeddings, on_policy, reference_pairs, population (default equal_length)")
    sp.add_argument("--steps", type=int, default=300, help="optimisation steps (default 300)")
    sp.add_argument("--seeds", type=int, default=4, help="seeds run together (default 4)")
    sp.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    sp.add_argument("--vocab", type=int, default=4, help="vocabulary size, EOS included (default 4)")
    sp.add_argument("--max-len", type=_max_len, default=6, metavar="K|none",
                    help="forced stop after K tokens, or 'none' for unbounded responses (unigram, bigram, "
                         "linear_head); default 6")
    sp.add_argument("--set", action="append", help="hyperparameter values, e.g. beta=0.5")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_simulate)

    sp = sub.add_parser("figures", help="regenerate figures (all of them by default)")
    sp.add_argument("names", nargs="*", help="figure names (default: all)")
    sp.add_argument("--out", default="figures", help="output folder (default figures/)")
    sp.add_argument("--quiet", action="store_true", help="print nothing")
    sp.set_defaults(func=cmd_figures)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GradlabError as exc:
        print(f"gradlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
