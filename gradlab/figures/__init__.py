"""Figures: one module per figure, each with a pure ``make(...) -> Figure``; ``save_all`` writes them.

A figure module's docstring gives its gallery title (first line) and its stock caption (the
rest). A module may split the work into ``compute() -> data`` and ``make(data) -> Figure``, and
may add ``markdown(data) -> str``, which ``save_all`` writes beside the figure as a Markdown file of the same name, and
``caption(data) -> str``, the caption generated from what it drew (the settings, ``--set`` values
included, and the numbers), which the gallery shows instead of the stock one. A figure redrawn
for chosen losses or hyperparameters without a ``caption`` of its own has the stock caption
followed by what it was drawn with. A figure not redrawn keeps the caption of its files.
Every figure is computed from gradlab's derived closed forms or simulations, never from a
typed-in curve. ``make`` does no I/O; ``save_all`` is the one writer. It renders with fixed
fonts, fixed SVG ids and no timestamps, so the same code gives byte-identical files; it renders
each figure in memory and then publishes its files atomically, so an interrupted or killed run
leaves the previous figures intact and no partial files.

Output safety is :class:`gradlab.output.Folder`'s: ``save_all`` writes only into a folder of its
own (not empty, not the current directory, not a project root, holding no file gradlab did not
write), records each file's SHA-256 in the folder's manifest (``.gradlab-manifest.json``) and
overwrites a file only while it has the recorded content; concurrent runs take turns. With
``jobs > 1`` the figures are drawn in a :class:`gradlab.processes.Pool`, whose workers stop with
the run (Ctrl-C, SIGTERM) and exit by themselves if the run is killed. Every figure is drawn in
the one style of :mod:`gradlab.figures.style`, at each size (``page``: NAME.*, ``column``:
NAME-column.*), as PNG, SVG (text kept as text) and PDF (fonts embedded).
"""

from __future__ import annotations

import importlib
import inspect
import io
import os
import sys
from dataclasses import dataclass
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradlab import output
from gradlab.errors import GradlabError

__all__ = ["FIGURES", "FORMATS", "SIZES", "make", "save_all", "default_jobs", "caption", "gallery",
           "options", "produced_files"]

# name -> module (in gradlab.figures). The one list of figures; the gallery follows its order.
FIGURES: dict[str, str] = {
    "gradient_field": "gradlab.figures.gradient_field",
    "force_vs_length": "gradlab.figures.force_vs_length",
    "gradient_atlas": "gradlab.figures.gradient_atlas",
    "length_force": "gradlab.figures.length_force",
    "length_drift": "gradlab.figures.length_drift",
    "entropy": "gradlab.figures.entropy",
    "displacement": "gradlab.figures.displacement",
    "proper_loss": "gradlab.figures.proper_loss",
    "scorecard": "gradlab.figures.scorecard",
    "group_weights": "gradlab.figures.group_weights",
    "grpo_length": "gradlab.figures.grpo_length",
}

FORMATS = ("png", "svg", "pdf")
SIZES = ("page", "column")
MANIFEST = output.MANIFEST


def _style():
    from gradlab.figures import style

    return style


# the page-size rc settings (kept for callers that render a figure themselves)
def __getattr__(name: str):
    if name == "STYLE":
        return _style().rc("page")
    raise AttributeError(name)


def _module(name: str):
    if name not in FIGURES:
        raise GradlabError(f"unknown figure '{name}'; the figures are: {', '.join(FIGURES)}")
    return importlib.import_module(FIGURES[name])


def make(name: str, size: str = "page", **kwargs):
    """The figure called ``name`` as a matplotlib ``Figure`` at ``size`` (no file is written);
    ``kwargs`` go to the module's ``compute`` where it has one, else to its ``make``."""
    module = _module(name)
    with _style().use(size):
        fig = module.make(module.compute(**kwargs)) if hasattr(module, "compute") else module.make(**kwargs)
        return _fit(_style().finish(fig), size)


def _fit(fig, size: str):
    """Scale a figure to the width of ``size``; a column-wide figure gets relatively taller, so
    side-by-side panels keep a readable height."""
    width, height = fig.get_size_inches()
    target = _style().SIZES[size]
    stretch = 1.0 if size == "page" or width <= 1.2 * target else 1.6
    fig.set_size_inches(target, round(height * target / width * stretch, 3))
    return fig


def caption(name: str, data: Any = None, settings: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(title, body) of a figure's gallery caption. The title is the first line of the module's
    docstring. The body is generated from what the figure drew where the module has a
    ``caption(data)`` and ``data`` is given (the settings and numbers of that drawing, ``--set``
    values included); otherwise it is the rest of the docstring, followed, when the figure was
    redrawn for chosen losses or hyperparameters (``settings``: its ``losses``/``loss`` and
    ``values`` arguments), by the losses and hyperparameters it was drawn with."""
    module = _module(name)
    doc = inspect.getdoc(module) or name
    title, _, body = doc.partition("\n")
    if data is not None and hasattr(module, "caption"):
        return title.strip(), module.caption(data).strip()
    settings = settings or {}
    losses = settings.get("losses") or ((settings["loss"],) if "loss" in settings else ())
    if losses or settings.get("values"):
        drawn = "; ".join(f"`{getattr(loss, 'name', loss)}`: {hyperparameters_text(loss, settings.get('values'))}"
                          for loss in losses)
        body = body.strip() + "\n\n**Drawn here for** " + (drawn or _values_text(settings["values"])) + "."
    return title.strip(), body.strip()


def _values_text(values: Mapping[str, float]) -> str:
    from gradlab.figures import style

    return ", ".join(f"{k} = {style.number(float(v))}" for k, v in values.items())


def _freeze_layout(fig) -> None:
    """Keep the positions the layout engine just computed for the next formats of the same
    figure: constrained layout measures every tick label and title again at each ``savefig``,
    about half of a figure's rendering time, and gives the same positions each time."""
    fig.set_layout_engine("none")


def _render(fig, fmt: str) -> bytes:
    """The figure in one format with no timestamps, tool versions or random ids, so regenerating
    gives byte-identical files: dates and producers are left out of the metadata, and SVG ids are
    hashed with a fixed salt instead of a random one."""
    import matplotlib

    buf = io.BytesIO()
    metadata = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None},
                "pdf": {"CreationDate": None, "ModDate": None, "Creator": None, "Producer": None}}[fmt]
    with matplotlib.rc_context({"svg.hashsalt": "gradlab"}):
        fig.savefig(buf, format=fmt, metadata=metadata)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Drawing for user-chosen losses and hyperparameters
# --------------------------------------------------------------------------------------------


def options(name: str) -> dict[str, str]:
    """What a figure can be redrawn for: {'losses': param, 'values': param} for the parameters
    its ``compute`` (or ``make``) accepts."""
    module = _module(name)
    target = module.compute if hasattr(module, "compute") else module.make
    params = inspect.signature(target).parameters
    out = {}
    if "losses" in params:
        out["losses"] = "losses"
    elif "loss" in params:
        out["losses"] = "loss"
    if "values" in params:
        out["values"] = "values"
    return out


@dataclass(frozen=True)
class Formula:
    """A custom loss's formula text (``gradlab figures --expr``), sent to a worker process as
    text and parsed there by :func:`gradlab.losses.custom` (the safe parser; nothing is evaluated)."""

    text: str
    name: str = "custom"

    def loss(self) -> Any:
        from gradlab.losses import custom

        return custom(self.text, name=self.name)


def _formulas(exprs: Sequence[str] | None) -> tuple[Formula, ...]:
    """``--expr`` texts as :class:`Formula` items, named custom, custom2, ...; each is parsed here
    once, so a bad formula is refused before any figure is drawn."""
    out = tuple(Formula(text, "custom" if i == 0 else f"custom{i + 1}") for i, text in enumerate(exprs or ()))
    for formula in out:
        formula.loss()
    return out


def _with_losses(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The figure's arguments with each :class:`Formula` parsed into its loss (in the process
    that draws the figure)."""
    def resolve(x: Any) -> Any:
        return x.loss() if isinstance(x, Formula) else x

    out = dict(kwargs)
    if "loss" in out:
        out["loss"] = resolve(out["loss"])
    if "losses" in out:
        out["losses"] = tuple(resolve(x) for x in out["losses"])
    return out


def _arguments(name: str, losses: Sequence[str] | None, values: Mapping[str, Any] | None,
               exprs: Sequence[Formula] = ()) -> dict[str, Any]:
    from gradlab import symbolic

    kwargs: dict[str, Any] = {}
    opts = options(name)
    if losses or exprs:
        if "losses" not in opts:
            able = [n for n in FIGURES if "losses" in options(n)]
            raise GradlabError(f"figure '{name}' draws fixed losses; --loss and --expr work with: {', '.join(able)}")
        resolved: tuple[Any, ...] = tuple(symbolic.as_loss(loss).name if isinstance(loss, str) else loss
                                          for loss in losses or ())
        resolved += tuple(exprs)
        if opts["losses"] == "loss":
            if len(resolved) != 1:
                raise GradlabError(f"figure '{name}' draws one loss; got {len(resolved)}")
            kwargs["loss"] = resolved[0]
        else:
            kwargs["losses"] = resolved
    if values:
        if "values" not in opts:
            able = [n for n in FIGURES if "values" in options(n)]
            raise GradlabError(f"figure '{name}' uses fixed hyperparameters; --set works with: {', '.join(able)}")
        kwargs["values"] = {k: float(v) for k, v in values.items()}
    return kwargs


def values_for(loss: Any, values: Mapping[str, float] | None) -> dict[str, float]:
    """The subset of ``values`` that ``loss`` has as hyperparameters (a figure of several losses
    applies --set beta=... to each loss that has a beta)."""
    from gradlab import symbolic

    hyper = symbolic.as_loss(loss).hyperparameters
    return {k: v for k, v in (values or {}).items() if k in hyper}


def hyperparameters_text(loss: Any, values: Mapping[str, float] | None = None) -> str:
    """The hyperparameters ``loss`` is drawn with, for a caption: 'beta = 0.5, gamma = 0.1'
    (its defaults overridden by the ``values`` it has); 'no hyperparameters' for none."""
    from gradlab import symbolic
    from gradlab.figures import style

    settled = symbolic.parameter_values(loss, values_for(loss, values))
    return ", ".join(f"{k} = {style.number(float(v))}" for k, v in settled.items()) or "no hyperparameters"


def check_values_used(losses: Sequence[Any], values: Mapping[str, float] | None) -> None:
    """Refuse a --set name that none of the drawn losses has (a typo would otherwise be ignored)."""
    from gradlab import symbolic

    known = {h for loss in losses for h in symbolic.as_loss(loss).hyperparameters}
    unused = sorted(set(values or {}) - known)
    if unused:
        raise GradlabError(f"--set {', '.join(unused)}: no drawn loss has this hyperparameter; "
                           f"they have: {', '.join(sorted(known)) or 'none'}")


def produced_files(names: Iterable[str] | None = None) -> list[str]:
    """The files ``gradlab figures`` writes into its output folder (all figures by default), as
    names relative to it: every figure at every size and format, the tables, and the gallery."""
    out = []
    for name in names if names is not None else FIGURES:
        out += [_file_name(name, size, fmt) for size in SIZES for fmt in FORMATS]
        if hasattr(_module(name), "markdown"):
            out.append(f"{name}.md")
    return out + ["README.md"]


def _render_figure(name: str, kwargs: dict[str, Any], sizes: tuple[str, ...],
                   formats: tuple[str, ...]) -> tuple[dict[str, bytes], tuple[str, str]]:
    """One figure computed and rendered in memory at every size and format: ({file name: bytes},
    its caption) (nothing is written: a failure leaves the previous files)."""
    style = _style()
    module = _module(name)
    kwargs = _with_losses(kwargs)
    data = module.compute(**kwargs) if hasattr(module, "compute") else None
    outputs: dict[str, bytes] = {}
    for size in sizes:
        with style.use(size):
            fig = module.make(data) if data is not None else module.make(**kwargs)
            _fit(style.finish(fig), size)
            for k, fmt in enumerate(formats):
                outputs[_file_name(name, size, fmt)] = _render(fig, fmt)
                if k == 0:
                    _freeze_layout(fig)
    if hasattr(module, "markdown"):  # a table beside the figure, e.g. scorecard.md
        outputs[f"{name}.md"] = module.markdown(data).encode("utf-8")
    return outputs, caption(name, data, kwargs)


def _worker_setup() -> None:
    import matplotlib

    from gradlab import runtime

    runtime.configure()
    matplotlib.use("Agg", force=True)


# Seconds each figure took from a cold start (fresh process, empty caches; issue 17, 2 busy cores):
# only the order in which the processes start them depends on these.
_COLD_SECONDS = {"scorecard": 37.0, "length_drift": 18.0, "proper_loss": 15.0, "displacement": 15.0,
                 "gradient_atlas": 15.0, "entropy": 13.0, "gradient_field": 9.0, "length_force": 9.0,
                 "force_vs_length": 8.0}


def _render_in_processes(names, arguments, sizes, formats, workers: int, publish, progress: bool) -> None:
    """Figures computed and rendered in ``workers`` fresh processes (a
    :class:`gradlab.processes.Pool`), published here in the gallery's order as each one is ready; the first
    failure stops the rest and is raised, leaving the figures not yet published as they were."""
    from gradlab.processes import Pool

    with Pool(workers, initializer=_worker_setup) as pool:  # an exception or a signal stops every worker
        # the longest first (LPT scheduling): a long figure started last would finish alone
        futures = {name: pool.submit(_render_figure, name, arguments[name], sizes, formats)
                   for name in sorted(names, key=lambda n: -_COLD_SECONDS.get(n, 0.0))}
        for i, name in enumerate(names, 1):
            rendered = futures[name].result()
            if progress:
                print(f"[{i}/{len(names)}] {name}", file=sys.stderr, flush=True)
            publish(name, rendered)


def default_jobs() -> int:
    """Processes for ``gradlab figures``: one per CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _file_name(name: str, size: str, fmt: str) -> str:
    return f"{name}.{fmt}" if size == "page" else f"{name}-{size}.{fmt}"


def save_all(
    out: str | os.PathLike = "figures",
    names: Iterable[str] | None = None,
    *,
    sizes: Sequence[str] = SIZES,
    formats: Sequence[str] = FORMATS,
    losses: Sequence[str] | None = None,
    values: Mapping[str, Any] | None = None,
    exprs: Sequence[str] | None = None,
    progress: bool = False,
    jobs: int = 1,
) -> list[Path]:
    """Render figures (all by default) into ``out`` at each size and format, plus the gallery
    README; ``losses`` and ``values`` redraw them for other losses and hyperparameters, and
    ``exprs`` for custom loss formulas (named custom, custom2, ...; parsed safely, in each
    worker process from their text).

    ``jobs > 1`` computes and renders the figures in that many fresh processes (the files are
    the same; the work is independent per figure and mostly single-threaded Python). They do
    not see changes made to this process (monkeypatches, ``budgets.raised``), so it is off by
    default; ``gradlab figures`` uses ``default_jobs()``."""
    import matplotlib

    from gradlab import progress as bars
    from gradlab import runtime

    runtime.configure()  # figure regeneration is an entry point: float64, compilation cache
    matplotlib.use("Agg", force=True)
    names = list(names) if names is not None else list(FIGURES)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise GradlabError(f"jobs must be a whole number of processes >= 1, not {jobs!r}")
    style = _style()
    for name in names:
        _module(name)  # fail on an unknown name before writing anything
    for size in sizes:
        if size not in style.SIZES:
            raise GradlabError(f"unknown figure size '{size}'; the sizes are: {', '.join(style.SIZES)}")
    for fmt in formats:
        if fmt not in FORMATS:
            raise GradlabError(f"unknown format '{fmt}'; the formats are: {', '.join(FORMATS)}")
    formulas = _formulas(exprs)
    arguments = {name: _arguments(name, losses, values, formulas) for name in names}
    folder = output.Folder(out)
    written: list[Path] = []
    captions: dict[str, tuple[str, str]] = {}

    def publish(name: str, rendered: tuple[dict[str, bytes], tuple[str, str]]) -> None:
        outputs, captions[name] = rendered
        written.extend(folder.write(outputs))
        done.update()

    workers = max(1, min(jobs, len(names)))
    with bars.bar(len(names), "figures", unit="figure") as done:
        if workers == 1:
            for i, name in enumerate(names, 1):
                if progress:
                    print(f"[{i}/{len(names)}] {name}", file=sys.stderr, flush=True)
                publish(name, _render_figure(name, arguments[name], tuple(sizes), tuple(formats)))
        else:
            _render_in_processes(names, arguments, tuple(sizes), tuple(formats), workers, publish, progress)
    written.extend(folder.write({"README.md": gallery(folder=folder.path, captions=captions).encode("utf-8")}))
    return written


def _kept_captions(folder: Path) -> dict[str, str]:
    """The caption bodies in the gallery README that gradlab wrote into ``folder`` before, by
    figure: a figure that is not redrawn keeps the caption of the drawing its files hold."""
    try:
        text = (folder / "README.md").read_text("utf-8")
    except OSError:
        return {}
    kept = {}
    for section in text.split("\n## ")[1:]:
        for name in FIGURES:
            image = f"![{name}]("
            if image in section and "\nFiles: " in section:
                after_image = section[section.index(image):].partition("\n\n")[2]
                kept[name] = after_image.partition("\n\nFiles: ")[0].strip()
    return kept


def gallery(prefix: str = "", folder: str | os.PathLike | None = None,
            captions: Mapping[str, tuple[str, str]] | None = None) -> str:
    """The figure gallery as Markdown. Each caption is the one ``captions`` gives (those of the
    figures just drawn), else the one the folder's gallery already holds for the files there,
    else the module's docstring. With a ``folder``, it lists only the figures present there and
    links only to files that exist."""
    present = None if folder is None else {p.name for p in Path(folder).iterdir()}
    kept = {} if folder is None else _kept_captions(Path(folder))
    captions = captions or {}
    lines = [
        "# Figure gallery",
        "",
        "Generated by `gradlab figures` from the figure modules and what each drew; do not edit by hand.",
        "Each figure is drawn a page wide (NAME.png, .svg, .pdf) and a column wide (NAME-column.*).",
        "",
    ]
    for name in FIGURES:
        files = [_file_name(name, size, fmt) for size in SIZES for fmt in FORMATS]
        if present is not None:
            files = [f for f in files if f in present]
            if not files:
                continue
        title, body = captions.get(name) or caption(name)
        if name not in captions and name in kept:
            body = kept[name]
        shown = next((f for f in files if f.endswith(".png")), None)
        lines += [f"## {title}", ""]
        if shown:
            lines += [f"![{name}]({prefix}{shown})", ""]
        lines += [body, "", "Files: " + ", ".join(f"[{f}]({prefix}{f})" for f in files), ""]
        table = f"{name}.md"
        if hasattr(_module(name), "markdown") and (present is None or table in present):
            lines += [f"Table: [{table}]({prefix}{table})", ""]
    return "\n".join(lines)
