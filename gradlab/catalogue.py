"""Generated docs: the loss catalogue, the audit table and the TRL -> gradlab table; and the
answers table that ``gradlab list``, ``show`` and ``grad`` read (``gradlab/answers.jsonl``).

    python -m gradlab.catalogue                    # all of them (or: python3 tasks.py docs)
    python -m gradlab.catalogue docs/losses.md     # one of them, chosen by file name

``docs/losses.md`` (every loss, its formula and gradients), ``docs/loss_audit.md`` (every loss
against its paper and reference implementations) and ``docs/trl.md`` (each TRL configuration
and the gradlab loss that reproduces it) are rendered from the registry and ``gradlab.trl``.
A test fails when a committed file differs from what this renders. The docs are written with
:class:`gradlab.output.Folder` into a shared folder: atomically, and only over a file whose
content gradlab recorded in that folder's manifest when it wrote it. ``gradlab/answers.jsonl``
holds every registered loss's ``show`` and ``grad`` answers, derived by :mod:`gradlab.answers`
(which says when it is used); it is package data, written atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gradlab import symbolic
from gradlab.losses import LOSSES, OUT_OF_SCOPE, TRL_1, Loss
from gradlab.printing import latex_symbol
from gradlab.symbols import HYPERPARAMETERS
from gradlab.trl import TRAINERS, TRL_CONFIGS, TRL_VERSION

__all__ = ["render", "render_audit", "render_trl", "render_answers", "ANSWERS", "entry", "audit_cells", "DOCS", "main"]


def entry(loss: Loss, views: tuple[str, ...] = ("probability", "length")) -> list[str]:
    """A loss's section of the catalogue: formula, hyperparameters, references, audit, and its
    gradients in each of ``views`` (the site's catalogue adds views and TRL names to the same)."""
    aliases = f" (aliases: {', '.join(f'`{a}`' for a in loss.aliases)})" if loss.aliases else ""
    hyper = ", ".join(
        f"${latex_symbol(k)}$ (`{k}`) = {'given by the user' if v is None else f'{float(v):g}'} "
        f"({HYPERPARAMETERS[k].meaning}; domain {loss.domain(k)})"
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
        f"- audited against: {loss.equation}"
        + "".join(f"; {impl}" for impl in loss.implementations) + f". Finding: {loss.audit}",
    ]
    if loss.trl_variant is not None:
        lines.append(f"- TRL computes a different variant under this name: `{loss.trl_variant[0]}` "
                     f"({loss.trl_variant[1]})")
    lines.append("")
    for view in views:
        lines += [f"Gradients, {view} view:", ""]
        for var, expr in symbolic.gradient(loss, view).items():
            if var in loss.hyperparameters:
                continue
            wrt = symbolic.latex(symbolic.symbol_of(var))
            lines.append(f"- $\\partial \\ell / \\partial {wrt} = {symbolic.latex(expr)}$")
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
        lines += entry(loss)
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def audit_cells(loss: Loss) -> tuple[str, str, str]:
    """The audit table's cells for one loss: paper equation, reference implementations, findings."""
    impls = "<br>".join(_cell(str(i)) for i in loss.implementations) or "none"
    return f"{_cell(loss.equation)} ({', '.join(loss.references)})", impls, _cell(loss.audit)


def render_audit() -> str:
    """``docs/loss_audit.md``: one row per loss, its equation, implementations and findings."""
    sources = sorted({impl.source for loss in LOSSES.values() for impl in loss.implementations},
                     key=lambda s: (s.repo, s.version))
    lines = [
        "# Loss audit",
        "",
        "Generated from the registry by `python3 tasks.py docs`; do not edit by hand.",
        "",
        "Every loss was compared with its primary source (the equation below) and with the reference",
        "implementations listed, read at the pinned commits. `tests/test_reference_impls.py` holds an",
        "independent transcription of each implementation's formula and checks gradlab's value and every",
        "first partial derivative against it; `tests/test_loss_properties.py` checks what each loss is for",
        "(descent direction at the reference point, R-DPO's and LD-DPO's length terms, label smoothing at",
        "0, reference-free losses).",
        "",
        "Sources:",
        "",
        *[f"- {s.repo} at `{s.commit}` ({s.version})" for s in sources],
        "",
        "| loss | paper equation | reference implementations | differences found |",
        "| --- | --- | --- | --- |",
    ]
    for loss in LOSSES.values():
        lines.append(f"| `{loss.name}` | {' | '.join(audit_cells(loss))} |")
    lines.append("")
    return "\n".join(lines)


def render_trl() -> str:
    """``docs/trl.md``: each TRL configuration and the gradlab loss that reproduces it."""
    lines = [
        "# TRL -> gradlab",
        "",
        "Generated from `gradlab.trl` by `python3 tasks.py docs`; do not edit by hand.",
        f"Read from huggingface/trl at `{TRL_1.commit}` ({TRL_1.version}) and v0.16.0 for the 0.x names.",
        f"`tests/test_trl_oracle.py` runs TRL's own loss code (TRL {TRL_VERSION} or newer) against every 1.x",
        "DPO, CPO and KTO row: values and both gradients, at points near and far from the reference.",
        "",
        "Name resolution: any TRL `loss_type` works as a loss name, in any case (`DPO`, `SimPO`, `R-DPO`).",
        "A plain name means DPOTrainer's loss of that name; `trainer.loss_type` picks another trainer's",
        "(`cpo.hinge`, `cpo.ipo`, `kto.apo_zero_unpaired`; `CPOTrainer.hinge` works too). A list of loss",
        "types with `loss_weights` is written `sigmoid:0.8,bco_pair:0.2,sft:1` (a missing weight is 1) and",
        "is a loss wherever a loss name is accepted. As in TRL's single config, hyperparameters with the",
        "same name are shared by every term; the default is the first term's that has it.",
        "",
        "Set the gradlab hyperparameters with `--set NAME=VALUE` (CLI) or `values={...}` (API). Batch",
        "averages are left out: gradlab's losses are per pair (KTOTrainer's two examples are summed).",
        "TRL's NLL terms (`sft`, CPOTrainer's `cpo_alpha`, ORPO's) are token means over the whole batch, so",
        "TRL weights each pair by its length; for one pair `sft`'s and CPO's are gradlab's -lp_w/|y_w|, while",
        "ORPO's also counts the prompt's tokens.",
        "",
        "In Python, `gradlab.losses.from_trl_config(trainer, config)` picks the row for a concrete TRL 1.x config",
        "(fields left out take TRL's defaults) and returns the gradlab loss and values, TRL's `beta`",
        "included. Configurations with no row raise an error that says so: `f_divergence_type` other than",
        "`reverse_kl` or `ld_alpha` with a loss type other than `sigmoid` (TRL accepts them for several),",
        "`use_weighting=True` (WPO), CPOTrainer's `alpha != 0` with `sigmoid`, `hinge` or `ipo`, and the",
        "batch-level `aot` types.",
        "",
        "| trainer | `loss_type` | config that changes the formula | TRL | gradlab loss | gradlab hyperparameters "
        "| note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in TRL_CONFIGS:
        config = ", ".join(f"`{k}={v}`" for k, v in row.config.items()) or "defaults"
        values = ", ".join(f"`{k}={v}`" for k, v in row.values.items()) or "defaults"
        loss = f"`{row.loss}`" if row.loss else "out of scope"
        lines.append(f"| {TRAINERS[row.trainer]} | `{row.loss_type or '-'}` | {config} | {row.versions} | {loss} "
                     f"| {values if row.loss else '-'} | {_cell(row.note)} |")
    lines += ["", "gradlab losses whose default differs from what TRL computes under the same name:", ""]
    lines += [f"- `{loss.name}`: TRL computes `{loss.trl_variant[0]}`. {loss.trl_variant[1]}."
              for loss in LOSSES.values() if loss.trl_variant is not None]
    lines += ["", "gradlab defaults that differ from TRL's defaults (`gradlab show` prints them; the loss's",
              "docstring says why):", ""]
    lines += [f"- `{loss.name}`: `{k}` = {mine:g} in gradlab, {trl:g} in TRL (`{trl_field}`)"
              for loss in LOSSES.values() for k, (trl_field, trl, mine) in loss.trl_default_differences.items()]
    lines.append("")
    return "\n".join(lines + _render_group_trl())


def _render_group_trl() -> list[str]:
    """GRPOTrainer and RLOOTrainer: every loss_type x scale_rewards and the gradlab group loss."""
    from gradlab.group_losses import ADVANTAGES, GROUP_LOSSES

    trl_name = {"gspo": 'grpo`, `importance_sampling_level="sequence"',
                "luspo": 'luspo`, `importance_sampling_level="sequence"'}
    lines = [
        "## GRPOTrainer and RLOOTrainer (group losses)",
        "",
        "Read from TRL 1.16.0 (`trl/trainer/grpo_trainer.py`, `GRPOTrainer._compute_loss` and the advantages in",
        "`_generate_and_score_completions`; `trl/trainer/rloo_trainer.py`). A group loss is three pieces: the",
        "advantage (`scale_rewards`), the per-token loss in the ratio rho = pi/pi_old, and the normaliser; see",
        "`gradlab show NAME`. The weight column is the per-token weight w_i on grad log pi of a token of",
        "response i at the first on-policy step (rho = 1, default hyperparameters), with A_i the advantage,",
        "`len_i` = |o_i|, `len_sum` = sum_j |o_j| (the batch taken as the group) and G the group size.",
        "",
        "TRL's `loss_type=\"dr_grpo\"` changes only the normaliser. Dr. GRPO's other half, dropping the std",
        "from the advantage, is `scale_rewards=\"none\"`: `dr_grpo` with `scale_rewards=\"none\"` is",
        "`dr_grpo_paper`, the paper's Dr. GRPO.",
        "",
        "| config | `loss_type` | `scale_rewards` | gradlab loss | w_i at rho = 1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, loss in GROUP_LOSSES.items():
        if name in ("rloo", "dr_grpo_paper"):
            continue
        weight = f"`{loss.first_step()}`"
        for scale in ("group", "batch", "none"):
            gradlab = f"`{name}`" + ("" if scale == loss.scale_rewards else f", `scale_rewards=\"{scale}\"`")
            if name == "dr_grpo" and scale == "none":
                gradlab += " (= `dr_grpo_paper`)"
            trl = trl_name.get(name, name)
            lines.append(f"| `GRPOConfig` | `{trl}` | `{scale}` | {gradlab} | {weight} |")
    rloo = GROUP_LOSSES["rloo"]
    lines += [f"| `RLOOConfig` | - | - (leave-one-out, `normalize_advantages=False`) | `rloo` "
              f"| `{rloo.first_step()}` |", "", "The advantages:", ""]
    lines += [f"- `{k}`: {v}" for k, v in ADVANTAGES.items()]
    lines += [
        "",
        "Numerics of TRL noted by the oracle tests: `nanstd` multiplies by its Bessel factor count/(count - 1) in",
        "float32 (the group std is off by up to ~3e-8 relative), and SAPO's temperatures are a float32 tensor.",
        "",
    ]
    return lines


def render_answers() -> str:
    """``gradlab/answers.jsonl``: :func:`gradlab.answers.derive_table` with the families' facts
    (:func:`gradlab.policies.facts`), one line per loss (so a diff shows which loss changed)."""
    from gradlab import answers, policies

    return answers.encode(answers.derive_table(policies.facts()))


DOCS = {"losses.md": render, "loss_audit.md": render_audit, "trl.md": render_trl}
ANSWERS = Path(__file__).with_name("answers.jsonl")


def main(argv: list[str] | None = None) -> int:
    from gradlab import output
    from gradlab.errors import GradlabError
    from gradlab.processes import exit_status, stop_on_signals

    argv = sys.argv[1:] if argv is None else argv
    paths = [Path(a) for a in argv] or [*(Path("docs") / name for name in DOCS), ANSWERS]
    known = {**DOCS, ANSWERS.name: render_answers}
    unknown = [p for p in paths if p.name not in known]
    if unknown:
        print(f"gradlab.catalogue: unknown doc {unknown[0]}; the docs are: {', '.join(known)}", file=sys.stderr)
        return 2
    try:
        with stop_on_signals():
            folders: dict[Path, output.Folder] = {}
            docs = [p for p in paths if p.name in DOCS]
            for path in docs:  # every target is checked before the (slow) rendering
                folders.setdefault(path.parent, output.Folder(path.parent, shared=True, flag="docs folder"))
                folders[path.parent].check([path.name])
            for path in paths:
                text = known[path.name]().encode("utf-8")
                written = folders[path.parent].write({path.name: text}) if path in docs else \
                    [output.write_atomic(path, text)]
                for w in written:
                    print(f"wrote {w}")
    except GradlabError as exc:
        print(f"gradlab.catalogue: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: no doc is half-written
        print("gradlab.catalogue: interrupted", file=sys.stderr)
        return exit_status(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
