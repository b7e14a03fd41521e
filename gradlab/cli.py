"""The ``gradlab`` command line: list, show, grad, eval, check, simulate, run, audit, logps, reproduce
and figures.

Human-readable output by default, JSON with ``--json`` (contracts in docs/architecture.md).

Exit codes, for every command: 0 success; 2 bad input (a message says what was wrong and what
is allowed; this includes exceeded budgets, see :mod:`gradlab.budgets`, and results that are
not finite, such as a diverged simulation); 1 an internal failure (a one-line message, no
traceback unless ``GRADLAB_DEBUG=1``); 130 interrupted (Ctrl-C).

Output is assembled in memory and written in one go once the command has finished, with
Ctrl-C held back during the write, so a JSON document is never truncated. JSON never contains
NaN or Infinity: such a result is refused (exit 2) and nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from gradlab import output, progress
from gradlab.errors import GradlabError
from gradlab.processes import exit_status, stop_on_signals

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




def _log10_abs(x: Any) -> float | None:
    import mpmath

    return None if x == 0 else float(mpmath.log10(abs(x)))


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from gradlab import answers

    doc = answers.list_document()
    if args.json:
        print(output.dumps(doc, indent=2))
    else:
        print(answers.list_text(doc), end="")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from gradlab import answers

    answer = answers.show(args.loss, args.expr)
    if answer is None:  # a group loss: advantage, per-token loss and normaliser, printed by their own view
        return _show_group(answers.loss_of(args.loss, args.expr), args)
    print(output.dumps(answer["json"], indent=2) if args.json else answer["text"], end="\n" if args.json else "")
    return 0


def cmd_grad(args: argparse.Namespace) -> int:
    from gradlab import answers

    answer = answers.grad(args.loss, args.expr, args.wrt, args.view)
    if answer is None:  # a group loss
        return _grad_group(answers.loss_of(args.loss, args.expr), args)
    print(output.dumps(answer["json"], indent=2) if args.json else answer["text"], end="\n" if args.json else "")
    return 0


def _group_variables(loss: Any, names: Sequence[str]) -> dict[str, str]:
    from gradlab.group_losses import HYPERPARAMETERS, SYMBOLS

    return {n: (SYMBOLS.get(n) or HYPERPARAMETERS[n]).meaning for n in names}


def _show_group(loss: Any, args: argparse.Namespace) -> int:
    """``gradlab show`` for a group loss: its three pieces and the per-token weight they give."""
    from gradlab import printing, symbolic
    from gradlab.group_losses import ADVANTAGES, LEVELS

    first = loss.first_step()
    # an infinite default (delta: no cap, TRL's None) is null in JSON
    hyper = {k: {"default": float(v) if v.is_finite else None, "meaning": _group_variables(loss, [k])[k],
                 "domain": str(loss.domain(k))} for k, v in loss.defaults.items()}
    if args.json:
        out = {
            "name": loss.name, "aliases": list(loss.aliases), "title": loss.title, "kind": loss.kind,
            "expr": str(symbolic.standard(loss.expr)), "readable": str(loss.expr), "latex": symbolic.latex(loss.expr),
            "first_step": {"expr": str(symbolic.standard(first)), "latex": symbolic.latex(first)},
            "per_token_loss": str(loss.loss_in_ratio), "normaliser": {"name": loss.normaliser,
                                                                       "expr": str(loss.normaliser_expr)},
            "level": {"name": loss.level, "meaning": LEVELS[loss.level]},
            "scale_rewards": {"default": loss.scale_rewards, "meaning": ADVANTAGES[loss.scale_rewards]},
            "defaults": {k: v["default"] for k, v in hyper.items()}, "hyperparameters": hyper,
            "variables": _group_variables(loss, [*loss.variables, *loss.hyperparameters]),
            "references": list(loss.references), "needs_reference": loss.needs_reference,
            "length_normalised": loss.length_normalised, "doc": loss.doc, "trl": loss.trl,
            "trl_variant": None if loss.trl_variant is None else {"loss": loss.trl_variant[0],
                                                                  "note": loss.trl_variant[1]},
            "paper_variant": None if loss.paper_variant is None else {"loss": loss.paper_variant[0],
                                                                      "note": loss.paper_variant[1]},
            "equation": loss.equation, "implementations": [str(i) for i in loss.sources],
        }
        print(output.dumps(out, indent=2))
        return 0
    print(f"{loss.name}: {loss.title}\n")
    print(f"TRL: {loss.trl}")
    for variant, what in ((loss.trl_variant, "TRL computes"), (loss.paper_variant, "the paper's form is")):
        if variant is not None:
            print(f"note: {what} '{variant[0]}' (gradlab show {variant[0]}): {variant[1]}.")
    print(f"\nper-token loss = {printing.text(loss.loss_in_ratio)}   (rho: {LEVELS[loss.level]})")
    print(f"normaliser N = {printing.text(loss.normaliser_expr)}")
    print(f"advantage (default scale_rewards=\"{loss.scale_rewards}\"): {ADVANTAGES[loss.scale_rewards]}")
    print(f"\nper-token weight on grad log pi of a token of response i:\n  w_i = {printing.text(loss.expr)}")
    print(f"at the first on-policy step (rho = kappa = 1, defaults): w_i = {printing.text(first)}\n")
    shown = [f"{k} = {'none' if v['default'] is None else format(v['default'], 'g')}  in {v['domain']}"
             for k, v in hyper.items()]
    print("hyperparameters: " + (", ".join(shown) or "none"))
    print("references: " + "; ".join(loss.references))
    print("source: " + "; ".join(str(i) for i in loss.sources))
    print("\n" + printing.plain_doc(loss.doc))
    return 0


def _grad_group(loss: Any, args: argparse.Namespace) -> int:
    """``gradlab grad`` for a group loss: a partial derivative of its per-token weight."""
    from gradlab import printing, symbolic

    view = args.view
    d = loss.derivative(args.wrt, view)
    expr = loss.in_view(view)
    names = _group_variables_names(loss, expr) + list(loss.hyperparameters)
    if args.json:
        out = {"loss": loss.name, "view": view, "wrt": args.wrt, "of": "per-token weight w_i",
               "expr": str(symbolic.standard(d)), "readable": str(d), "latex": symbolic.latex(d),
               "variables": _group_variables(loss, names)}
        print(output.dumps(out, indent=2))
        return 0
    print(f"d w_i / d {args.wrt}   (the per-token weight of {loss.name}; {view} view)\n")
    print(printing.text(d))
    return 0


def _group_variables_names(loss: Any, expr: Any) -> list[str]:
    from gradlab.group_losses import SYMBOLS

    return [n for n, s in SYMBOLS.items() if s.symbol in expr.free_symbols]


def _pairwise_only(loss: Any, command: str) -> None:
    if loss.kind == "group":
        raise GradlabError(f"gradlab {command} works on per-pair losses; '{loss.name}' is a group loss: see "
                           f"'gradlab show {loss.name}' and 'gradlab grad {loss.name} --wrt len_i'")


def cmd_eval(args: argparse.Namespace) -> int:
    from gradlab import answers

    at = _parse_pairs(args.at, "--at")
    values = _parse_pairs(args.set, "--set")
    found = answers.evaluate(args.loss, args.expr, at, values, args.view)  # the table, or derived
    if found is None:  # a group loss, refused here
        _pairwise_only(answers.loss_of(args.loss, args.expr), "eval")
    assert found is not None
    result = found["values"]
    if args.json:
        out = {
            "loss": found["loss"],
            "view": found["view"],
            "at": {k: output.number(_mpf(x)) for k, x in found["at"].items()},
            "hyperparameters": found["hyperparameters"],
            "value": output.number(result["loss"]),
            "gradient": {k: output.number(v) for k, v in result.items() if k != "loss"},
            # log-magnitudes: readable whatever the size (probability-view gradients overflow)
            "log10_abs": {k: _log10_abs(v) for k, v in result.items()},
        }
        print(output.dumps(out, indent=2))
        return 0
    import mpmath

    # values and derivatives are computed to 20 correct digits (gradlab._mpeval); 12 are shown
    print(f"{found['loss']} ({found['view']} view) at " + ", ".join(f"{k}={v}" for k, v in at.items()))
    params = found["hyperparameters"]
    print("hyperparameters: " + (", ".join(f"{k}={v:g}" for k, v in params.items()) or "none"))
    width = max(len(k) for k in result) + 3
    for k, v in result.items():
        label = "loss" if k == "loss" else f"d/d{k}"
        print(f"  {label:<{width}} {mpmath.nstr(v, 12)}")
    return 0


def _mpf(x: Any) -> Any:
    import mpmath

    with mpmath.workdps(30):
        return mpmath.mpf(x.numerator) / x.denominator


def cmd_check(args: argparse.Namespace) -> int:
    from gradlab import checks, runtime
    from gradlab.losses import get_loss

    runtime.configure()
    if args.points < 1:
        raise GradlabError(f"--points must be a positive whole number, not {args.points}")
    for n in args.losses:
        _pairwise_only(get_loss(n), "check")
    names = [get_loss(n).name for n in args.losses] or None
    with progress.counter("checking", unit="row") as report:
        rows = checks.run_matrix(names, args.family or None, points=args.points, progress=report)
    failed = [r for r in rows if not r.ok]
    if args.json:
        print(output.dumps({"tolerance": checks.TOLERANCE, "fd_tolerance": checks.FD_TOLERANCE,
                          "rows": [r.as_dict() for r in rows]}, indent=2))
    else:
        width = max(len("loss"), *(len(r.loss) for r in rows))
        fam_width = max(len("family"), *(len(r.family) for r in rows))
        print(f"{'loss':<{width}}  {'family':<{fam_width}} {'points':>6}  {'max rel err':>11}  {'fd rel err':>10}  "
              f"{'seconds':>7}")
        for r in rows:
            flag = ("" if r.ok else "  FAIL") + ("  *" if r.settled else "")
            print(f"{r.loss:<{width}}  {r.family:<{fam_width}} {r.points:>6}  {r.max_rel_error:>11.2e}  "
                  f"{r.fd_max_rel_error:>10.2e}  {r.seconds:>7.2f}{flag}")
        if any(r.settled for r in rows):
            print(f"* float64 missed the tolerance at a few points (near a zero of the gradient, where "
                  f"cancellation decides); they were recomputed in {checks.SETTLE_DIGITS}-digit arithmetic")
    for r in failed:
        print(f"gradlab: check failed: {r.loss} x {r.family}: max relative error {r.max_rel_error:.3g} "
              f"(tolerance {checks.TOLERANCE:g}), finite differences {r.fd_max_rel_error:.3g} "
              f"(tolerance {checks.FD_TOLERANCE:g})", file=sys.stderr)
    return 1 if failed else 0


def _count_or(word: str, allowed: str) -> Callable[[str], int | str]:
    """An argparse type: a positive whole number, or ``word`` (``--max-len K|none``,
    ``--batch-size N|full``); a refusal says ``allowed``."""

    def parse(text: str) -> int | str:
        if text.strip().lower() == word:
            return word
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be {allowed}, not {text!r}")
        return value

    return parse


_max_len = _count_or("none", "a positive whole number or 'none' (unbounded)")
_batch_size = _count_or("full", "a positive whole number of pairs or 'full'")


def cmd_simulate(args: argparse.Namespace) -> int:
    """A thin front end: the flags become an experiment (gradlab.experiments.simulate.table) that
    the experiment runner runs, as ``gradlab run`` runs a file."""
    from gradlab import runtime
    from gradlab.experiments import frontend

    runtime.configure()
    if (args.loss is None) == (args.expr is None):
        raise GradlabError("name a loss (see 'gradlab list') or give --expr FORMULA, not both")
    result = frontend.simulate(args.loss, expr=args.expr, policy=args.policy, vocab=args.vocab, max_len=args.max_len,
                               optimizer=args.optimizer, lr=args.lr, steps=args.steps, seeds=args.seeds,
                               batch_size=args.batch_size, dataset=args.dataset,
                               sets=frontend.parse_sets(args.set))
    print(output.dumps(frontend.document(result)) if args.json else frontend.text(result))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from gradlab import experiments, runtime

    from gradlab.experiments import config, frontend

    runtime.configure()  # float64 and the persistent compilation cache, as simulate
    sets = frontend.parse_sets(args.set)
    source = config.with_sets(config.read(args.experiment), sets) if sets else args.experiment
    if args.distributed:  # every process trains its share; process 0 alone prints (and draws progress)
        from gradlab.experiments import distributed

        distributed.initialize()
        with progress.shown(progress.active() and distributed.is_leader()):
            result = experiments.run(source, distributed=True)
        if not distributed.is_leader():
            return 0
    else:
        result = experiments.run(source)
    if args.json:
        print(output.dumps(result.as_dict()))
    else:
        print(experiments.summary(result))
    return 0


def _logps_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"batch_size": args.batch_size, "max_length": args.max_length, "truncation_mode": args.truncation_mode,
            "device": args.device, "dtype": args.dtype, "progress": not args.json and sys.stderr.isatty()}


def cmd_logps(args: argparse.Namespace) -> int:
    from gradlab.audit import logps

    summary = logps.logps(args.data, args.model, ref_model=args.ref_model, out=args.out, **_logps_options(args))
    if args.out is None:  # the rows themselves, as JSON Lines
        print("".join(output.dumps(r) + "\n" for r in summary.records), end="")
        print(summary.text(), file=sys.stderr)
    elif args.json:
        print(output.dumps(summary.as_dict(), indent=2))
    else:
        print(summary.text())
    return 0


def _is_rollout_log(args: argparse.Namespace) -> bool:
    """``--rollouts``, or a table whose columns are a rollout log's (prompt_id, completion_length, reward)."""
    from pathlib import Path

    from gradlab.audit import io, rollouts

    if args.rollouts:
        return True
    if args.model is not None or not Path(args.data).exists():
        return False
    return rollouts.is_rollout_table(io.open_table(Path(args.data))[0])


def _audit_rollouts(args: argparse.Namespace, values: dict[str, float]) -> int:
    from gradlab.audit import rollout_figures, rollouts

    for flag, given in (("--expr", args.expr), ("--model", args.model), ("--tokenizer", args.tokenizer)):
        if given is not None:
            raise GradlabError(f"{flag} is for preference pairs; a rollout log is audited for the registered group "
                               "losses (--loss grpo dapo ...; gradlab list shows them)")
    report = rollouts.audit_rollouts(args.data, losses=args.loss, values=values, scale_rewards=args.scale_rewards)
    written = rollout_figures.save_figures(report, args.out) if args.out else []
    if args.json:
        print(output.dumps(report.as_dict() | {"figures": [str(p) for p in written]}, indent=2))
    else:
        print(rollouts.render_rollouts(report))
        for path in written:
            print(path)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from gradlab import audit

    values = {k: float(v) for k, v in _parse_pairs(args.set, "--set").items()}
    if _is_rollout_log(args):
        return _audit_rollouts(args, values)
    if args.scale_rewards:
        raise GradlabError("--scale-rewards is for rollout logs (columns prompt_id, completion_length, reward)")
    losses: list[Any] | None = list(args.loss) if args.loss else None
    if args.expr is not None:
        from gradlab.losses import custom

        losses = [*(losses or []), custom(args.expr, name="custom")]
    data = args.data
    if args.model is not None:  # gradlab logps first, into a file beside nothing of the user's
        from gradlab.audit import logps

        summary = logps.logps(args.data, args.model, ref_model=args.ref_model, out=args.logps_out,
                              **_logps_options(args))
        data = summary.out if summary.out is not None else logps.as_pairs(summary)
        if not args.json:
            print(summary.text(), file=sys.stderr)
    elif args.ref_model is not None:
        raise GradlabError("--ref-model needs --model (the policy): gradlab audit DATA --model M --ref-model R")
    report = audit.audit(data, losses=losses, values=values, tokenizer=args.tokenizer, top=args.top)
    written = audit.save_figures(report, args.out) if args.out else []
    if args.json:
        print(output.dumps(report.as_dict() | {"figures": [str(p) for p in written]}, indent=2))
    else:
        print(audit.render(report))
        for path in written:
            print(path)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from gradlab.reproduce import cli as reproduce_cli

    return reproduce_cli.main(args)


def cmd_figures(args: argparse.Namespace) -> int:
    from gradlab.figures import default_jobs, save_all
    # save_all configures JAX itself (figure regeneration is an entry point)

    values = {k: float(v) for k, v in _parse_pairs(args.set, "--set").items()}
    written = save_all(args.out, names=args.names or None, progress=False,  # a bar in a terminal (gradlab.progress)
                       sizes=[args.size] if args.size else ("page", "column"),
                       formats=args.format or ("png", "svg", "pdf"), losses=args.loss, values=values or None,
                       exprs=args.expr, jobs=default_jobs())
    if args.quiet:
        return 0
    for path in written:
        print(path)
    return 0


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


class _LazyHelp(str):
    """A help text made when help is printed: the families' and the views' names come from
    ``gradlab.answers`` (the shipped table, or the registries, which import JAX and sympy);
    building the parser must do neither. argparse formats every help text with ``help % params``,
    which is where the text is made."""

    make: Callable[[], str]

    def __new__(cls, make: Callable[[], str]) -> _LazyHelp:
        self = super().__new__(cls, "policy family")
        self.make = make
        return self

    def __mod__(self, params: Any) -> str:
        return self.make() % params


def _families_help(sequence_only: bool) -> str:
    from gradlab import answers

    # the live registry once it is loaded (it holds any family registered at run time), else the
    # table while its families are current; else the registry (which imports JAX)
    rows = None if "gradlab.policies" in sys.modules else answers.families()
    if rows is None:
        from gradlab import policies

        rows = policies.facts()
    rows = [r for r in rows if not (sequence_only and r["single_context"])]
    names = [r["name"] for r in rows]
    unbounded = [r["name"] for r in rows if r["finite_state"] and not r["single_context"]]
    if sequence_only:
        return f"policy family (repeatable; default: every EOS family: {', '.join(names)})"
    return (f"policy family: {', '.join(names)} (default unigram); 'none' is the default --max-len for "
            f"{', '.join(unbounded)}")


def _views_help() -> str:
    from gradlab import answers

    return f"coordinates: {', '.join(answers.views())} (default log)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradlab",
        description="Closed-form, numerically verified gradients of preference-optimisation losses.",
    )
    from gradlab import __version__

    p.add_argument("--version", action="version", version=f"gradlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def loss_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("loss", nargs="?", help="a registered loss, alias or TRL name (see 'gradlab list'), or a "
                        "weighted combination such as sigmoid:0.8,bco_pair:0.2,sft:1")
        sp.add_argument("--expr", help="a user-defined loss formula in the canonical variables")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    def model_args(sp: argparse.ArgumentParser, *, audit: bool) -> None:
        g = sp.add_argument_group("models (gradlab logps; needs pip install 'gradlab[model]')")
        g.add_argument("--model", required=not audit, help="the policy: a Hugging Face causal LM (local folder or "
                       "hub name)" + ("; computes the log-prob columns first, as gradlab logps" if audit else ""))
        g.add_argument("--ref-model", help="the frozen reference model (adds ref_chosen_logps, ref_rejected_logps)")
        if audit:
            g.add_argument("--logps-out", help="also keep the computed log-prob columns in this JSONL or CSV file")
        g.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass (default 8)")
        g.add_argument("--max-length", type=int, default=None,
                       help="truncate prompt + completion to this many tokens, as TRL's max_length (default: none)")
        g.add_argument("--truncation-mode", default="keep_start", choices=("keep_start", "keep_end"),
                       help="TRL's truncation_mode (default keep_start)")
        g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
        g.add_argument("--dtype", default="float32", help="float32 (default), float64, bfloat16, float16 or auto")

    sp = sub.add_parser("list", help="every loss with its aliases")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("show", help="a loss's formula, hyperparameters and references")
    loss_args(sp)
    sp.set_defaults(func=cmd_show)

    sp = sub.add_parser("grad", help="the closed-form partial derivative of a loss")
    loss_args(sp)
    sp.add_argument("--wrt", required=True, help="the variable or hyperparameter to differentiate by")
    sp.add_argument("--view", default="log", help=_LazyHelp(_views_help))
    sp.set_defaults(func=cmd_grad)

    sp = sub.add_parser(
        "eval",
        help="the loss and every first partial derivative at a point",
        description="The loss and every first partial derivative at a point, each correct to 20 "
        "significant digits (12 are printed) or refused with a message. Values are read as exact "
        "decimals, so probabilities below float64's range (p_l=1e-400) work. In --json output a "
        "value is a number where float64 holds it exactly enough, otherwise a decimal string such "
        "as \"1.2e+500\" or \"3.5e-320\"; log10_abs gives log10|value| (null for 0).",
    )
    loss_args(sp)
    sp.add_argument("--at", action="append", required=True, help="the point, e.g. lp_w=-1,lp_l=-2,ref_w=-1,ref_l=-1")
    sp.add_argument("--set", action="append", help="hyperparameter values, e.g. beta=0.5")
    sp.add_argument("--view", default="log", help=_LazyHelp(_views_help))
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("check", help="verify closed forms against JAX autodiff on toy policies")
    sp.add_argument("losses", nargs="*", help="losses to check (default: all)")
    sp.add_argument("--family", action="append", help=_LazyHelp(lambda: _families_help(sequence_only=True)))
    sp.add_argument("--points", type=int, default=1000, help="random points per loss and family (default 1000)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_check)

    # names are validated by gradlab.experiments (whose refusals list the allowed ones); importing
    # it here would load JAX for every command
    sp = sub.add_parser("simulate", help="train a loss on a toy policy and report the metrics",
                        description="Train a loss on a toy policy: the flags are the common keys of an "
                        "experiment file (docs/experiments.md), run by the same runner as 'gradlab run'.")
    sp.add_argument("loss", nargs="?", help="a registered loss, alias or TRL name, or a weighted combination")
    sp.add_argument("--expr", help="a user-defined loss formula in the canonical variables (instead of a name)")
    sp.add_argument("--policy", default="unigram", help=_LazyHelp(lambda: _families_help(sequence_only=False)))
    sp.add_argument("--dataset", default=None,
                    help="preference data (hyphens or underscores): equal_length, chosen_longer, rejected_longer, "
                         "shared_prefix, similar_embeddings, on_policy, reference_pairs, population "
                         "(default equal_length)")
    sp.add_argument("--steps", type=int, default=300, help="optimisation steps (default 300)")
    sp.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1, run together (default 8)")
    sp.add_argument("--optimizer", default=None,
                    help="any optax optimiser that takes a learning rate, by name; sgd is plain gradient "
                         "descent (default adam)")
    sp.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    sp.add_argument("--batch-size", type=_batch_size, default=None, metavar="N|full",
                    help="pairs per step, drawn without replacement by a seeded sampler, or 'full' (default full)")
    sp.add_argument("--vocab", type=int, default=None,
                    help="content tokens 1..V; EOS (token 0) comes on top and is not counted. For softmax, "
                         "the number of actions (default 3)")
    sp.add_argument("--max-len", type=_max_len, default=None, metavar="K|none",
                    help="cut-off after K tokens (EOS included), or 'none' for unbounded responses. Default: "
                         "none for the finite-state families listed under --policy (exact; a cut-off would cap "
                         "the length drift), 6 for the others")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="a loss hyperparameter (beta=0.5), or any experiment key as section.key=VALUE "
                         "(policy.scale=0.5 for a seeded random start instead of the uniform one, "
                         "'train.metrics=[\"params\"]'); repeatable")
    sp.add_argument("--json", action="store_true",
                    help="machine-readable: loss, policy, dataset, seeds, hyperparameters, the resolved "
                         "config (as gradlab run --json) and every metric per step and seed")
    sp.set_defaults(func=cmd_simulate)

    sp = sub.add_parser("run", help="run an experiment file (docs/experiments.md has the schema)")
    sp.add_argument("experiment", help="an experiment file, e.g. experiments/softmax_gradient_descent.toml")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a key of the file, as simulate's --set: a dotted key (train.steps=100, "
                         "data.kind=population) or a loss hyperparameter (beta=0.5); repeatable")
    sp.add_argument("--json", action="store_true", help="the resolved configuration and every recorded series")
    sp.add_argument("--distributed", action="store_true",
                    help="one of several processes (one per host) of a jax.distributed job: the same command on "
                         "each; the coordinator from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, "
                         "torchrun's MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK, or SLURM; process 0 prints")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("audit", help="what each loss will do to a preference dataset or an RL rollout log "
                        "(JSONL, CSV, Parquet)")
    sp.add_argument("data", help="one row per pair, TRL's column names; or one row per rollout (prompt_id, "
                    "completion_length, reward; docs/audit.md)")
    sp.add_argument("--loss", nargs="+", help="losses to audit (default: every registered loss the data allows; "
                    "for a rollout log, every group loss)")
    sp.add_argument("--rollouts", action="store_true",
                    help="read DATA as a rollout log (the default when it has the columns prompt_id, "
                         "completion_length and reward)")
    sp.add_argument("--scale-rewards", nargs="+", choices=("group", "batch", "none", "leave_one_out"),
                    help="rollout logs: the advantage scalings to audit (default: each that the loss takes)")
    sp.add_argument("--set", action="append", help="hyperparameter values, e.g. beta=0.5")
    sp.add_argument("--tokenizer", help="a local tokenizer.json to count tokens of chosen/rejected text")
    sp.add_argument("--top", type=int, default=10, help="dominating pairs listed per loss (default 10)")
    sp.add_argument("--expr", help="also audit a user-defined loss formula in the canonical variables")
    sp.add_argument("--out", help="write the audit's figures into this folder")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    model_args(sp, audit=True)
    sp.set_defaults(func=cmd_audit)

    sp = sub.add_parser("logps", help="the audit's log-prob columns from a preference dataset and Hugging Face models",
                        description="Sequence log-probs of chosen and rejected under a causal LM (and a reference), "
                        "tokenised as TRL's DPOTrainer does; writes the columns gradlab audit reads (docs/audit.md).")
    sp.add_argument("data", help="TRL preference data: prompt (optional), chosen, rejected; JSONL, CSV or Parquet")
    sp.add_argument("--out", help="JSON Lines or CSV file to append to (rows already there are skipped: resume); "
                    "default: JSON Lines on stdout")
    sp.add_argument("--json", action="store_true", help="with --out: a machine-readable summary; no progress bar")
    model_args(sp, audit=False)
    sp.set_defaults(func=cmd_logps)

    sp = sub.add_parser("reproduce", help="rerun published claims: the reproduction catalogue")
    sp.add_argument("names", nargs="*", metavar="NAME", help="entries to run (see --list)")
    sp.add_argument("--all", action="store_true", help="run every entry")
    sp.add_argument("--list", action="store_true", help="list the entries without running them")
    sp.add_argument("--quick", action="store_true", help="the shortened runs the test suite uses")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="an option of the named entry, as a TOML value, e.g. feng_flow_endpoint "
                         "--set 'start=[[0.3, 0.2], [0.1, 0.6]]'")
    sp.add_argument("--figures", metavar="DIR", help="also write each entry's figure as DIR/NAME.png")
    sp.add_argument("--strict", action="store_true",
                    help="exit 3 when any entry's verdict is FAIL (for CI); without it a FAIL is a finding, exit 0")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_reproduce)

    sp = sub.add_parser("figures", help="regenerate figures (all of them by default)")
    sp.add_argument("names", nargs="*", help="figure names (default: all)")
    sp.add_argument("--out", default="figures",
                    help="output folder (default figures/); gradlab refuses folders holding files it did not write")
    sp.add_argument("--size", choices=("column", "page"),
                    help="only this width: column (3.3 in) or page (6.8 in); default both")
    sp.add_argument("--format", action="append", choices=("png", "svg", "pdf"), help="only these formats (repeatable)")
    sp.add_argument("--loss", nargs="+", help="redraw for these losses (registered names, aliases or combinations)")
    sp.add_argument("--expr", action="append", metavar="FORMULA",
                    help="redraw for a custom loss formula in the canonical variables, as in 'gradlab show --expr' "
                         "(repeatable; named custom, custom2, ...)")
    sp.add_argument("--set", action="append", help="hyperparameter values for the redrawn losses, e.g. beta=0.5")
    sp.add_argument("--quiet", action="store_true", help="print nothing")
    sp.set_defaults(func=cmd_figures)
    return p


def _attach_dash_values(argv: Sequence[str]) -> list[str]:
    """``--expr -logsigmoid(...)`` -> ``--expr=-logsigmoid(...)``: argparse takes a value that
    starts with '-' for an option and reports "expected one argument"."""
    out, items = [], list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        nxt = items[i + 1] if i + 1 < len(items) else None
        if item in _VALUE_OPTIONS and nxt is not None and nxt.startswith("-") and not nxt.startswith("--") \
                and nxt not in ("-h",):
            out.append(f"{item}={nxt}")
            i += 2
            continue
        out.append(item)
        i += 1
    return out


_VALUE_OPTIONS = frozenset({"--expr", "--at", "--set"})


# --------------------------------------------------------------------------------------------
# One error path and one output path
# --------------------------------------------------------------------------------------------

_COUNT_FLAGS = ("points", "seeds", "steps")  # whole-number arguments, bounded by gradlab.budgets
_BAD_PATH_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
                    FileExistsError)


def _check_arguments(args: argparse.Namespace) -> None:
    """Limits on numeric arguments, for every command that has them, and the cache folder the user
    named (before any work starts)."""
    from gradlab import _cache, budgets

    problem = _cache.configured_problem()
    if problem is not None:
        raise GradlabError(problem)

    for name in _COUNT_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            budgets.check_count(name, value, f"--{name}")
    lr = getattr(args, "lr", None)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise GradlabError(f"--lr must be a positive finite number, not {lr}")
    # output folders and figure names, checked here so that a refusal comes before the seconds
    # of importing JAX and matplotlib (gradlab.figures itself imports neither)
    command = getattr(args, "command", "")
    if command == "figures" or (command == "reproduce" and args.figures):
        from gradlab import figures

        output.Folder(args.out if command == "figures" else args.figures, create=False,
                      flag="--out" if command == "figures" else "--figures")
        unknown = [n for n in (args.names if command == "figures" else []) if n not in figures.FIGURES]
        if unknown:
            raise GradlabError(f"unknown figure '{unknown[0]}'; the figures are: {', '.join(figures.FIGURES)}")


def _non_finite_path(obj: Any, path: str = "") -> str | None:
    """Where the first NaN or infinity sits in a JSON-like object, or None."""
    stack = [(path, obj)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return where or "the result"
        if isinstance(item, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in reversed(item.items()))
        elif isinstance(item, list | tuple):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(item))))
    return None


def _refuse_non_finite(where: str, command: str) -> GradlabError:
    if command == "simulate":
        return GradlabError(f"the simulation diverged: {where} is NaN or infinite. Nothing was written; "
                            "lower --lr (or the hyperparameters that scale the loss) and run again")
    return GradlabError(f"the result is not finite at {where} (NaN or infinity); nothing was written")


def _validated(text: str, args: argparse.Namespace) -> str:
    """The captured output, checked: JSON must parse and hold only finite numbers; a
    simulation's table must hold no nan or inf."""
    command = getattr(args, "command", "")
    if getattr(args, "json", False) and text.strip():
        def no_constants(token: str) -> Any:
            raise _NonFinite(token)

        try:
            json.loads(text, parse_constant=no_constants)
        except _NonFinite:
            # find where, for the message
            doc = json.loads(text)
            raise _refuse_non_finite(_non_finite_path(doc) or "the result", command) from None
        except ValueError:
            pass  # several documents or plain text: not ours to judge here
    elif command == "simulate":
        bad = re.search(r"^\s*(\S+).*?(?<![\w.])[-+]?(nan|inf)\b", text, re.IGNORECASE | re.MULTILINE)
        if bad:
            raise _refuse_non_finite(f"the metric {bad.group(1)}", command)
    return text


class _NonFinite(Exception):
    pass


def _write_all(text: str) -> None:
    """Write ``text`` to stdout in one go. A Ctrl-C during the write is held back until the
    write is complete (then it interrupts as usual, exit 130), so a document is never cut off.
    Python runs signal handlers in the main thread whichever thread the signal reaches, so a
    recording handler is reliable where masking the signal in one thread is not."""
    held: list[int] = []
    hold = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum)) if hold else None
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    finally:
        if hold:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 2000 else text[:1997] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_attach_dash_values(sys.argv[1:] if argv is None else argv))  # usage errors exit 2
    buffer = io.StringIO()
    try:
        with stop_on_signals():  # SIGTERM unwinds like Ctrl-C: workers stopped, temporary files removed
            _check_arguments(args)
            quiet = getattr(args, "json", False) or getattr(args, "quiet", False)
            with contextlib.redirect_stdout(buffer), progress.shown(progress.wanted(quiet)):
                code = args.func(args)
            _write_all(_validated(buffer.getvalue(), args))
        return code
    except GradlabError as exc:
        print(f"gradlab: error: {_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C (130) or SIGTERM (143)
        print("gradlab: interrupted", file=sys.stderr)
        return exit_status(exc)
    except RecursionError:
        print("gradlab: error: the input is nested too deeply to process; simplify the formula",
              file=sys.stderr)
        return 2
    except MemoryError:
        print("gradlab: error: out of memory; use smaller sizes (--points, --steps, --seeds) or a "
              "simpler formula", file=sys.stderr)
        return 2
    except BrokenPipeError:
        with contextlib.suppress(OSError):  # the reader went away (e.g. '| head'): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except _BAD_PATH_ERRORS as exc:
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"gradlab: error: cannot use{where}: {exc.strerror or _message(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into a short message
        if os.environ.get("GRADLAB_DEBUG"):
            raise
        print(f"gradlab: internal error: {type(exc).__name__}: {_message(exc)}\n"
              "This is a bug in gradlab; run again with GRADLAB_DEBUG=1 for the traceback and please "
              "report it.", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
