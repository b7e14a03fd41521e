"""Figures: one module per figure, each with a pure ``make(...) -> Figure``; ``save_all`` writes them.

A figure module's docstring is its gallery caption (first line: title; the rest: what it shows).
A module may split the work into ``compute() -> data`` and ``make(data) -> Figure``, and may add
``markdown(data) -> str``, which ``save_all`` writes beside the figure as ``NAME.md``.
Every figure is computed from gradlab's derived closed forms or simulations, never from a
typed-in curve. ``make`` does no I/O; ``save_all`` is the one writer. It renders with fixed
fonts, fixed SVG ids and no timestamps, so the same code gives byte-identical files; it renders
each figure in memory and then publishes each file atomically (an anonymous file linked into
place, then renamed), so an interrupted or killed run leaves the previous figures intact and no
partial files.

Output safety: ``save_all`` writes only into a folder of its own. It refuses an empty ``out``,
the current directory, a project root and any folder holding a file it did not write; it keeps
a manifest (``.gradlab-manifest.json``) of the files it wrote there and never overwrites a
file that is not in it (a foreign ``README.md`` included). Every figure is drawn in the one
style of :mod:`gradlab.figures.style`, at each size (``page``: NAME.*, ``column``:
NAME-column.*), as PNG, SVG (text kept as text) and PDF (fonts embedded).
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradlab.errors import GradlabError

__all__ = ["FIGURES", "FORMATS", "SIZES", "make", "save_all", "default_jobs", "caption", "gallery",
           "check_output_folder", "options", "write_owned", "produced_files"]

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
}

FORMATS = ("png", "svg", "pdf")
SIZES = ("page", "column")
MANIFEST = ".gradlab-manifest.json"


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
    """The figure called ``name`` as a matplotlib ``Figure`` at ``size`` (no file is written)."""
    with _style().use(size):
        return _fit(_style().finish(_module(name).make(**kwargs)), size)


def _fit(fig, size: str):
    """Scale a figure to the width of ``size``; a column-wide figure gets relatively taller, so
    side-by-side panels keep a readable height."""
    width, height = fig.get_size_inches()
    target = _style().SIZES[size]
    stretch = 1.0 if size == "page" or width <= 1.2 * target else 1.6
    fig.set_size_inches(target, round(height * target / width * stretch, 3))
    return fig


def caption(name: str) -> tuple[str, str]:
    """(title, body) of a figure's gallery caption: its module docstring."""
    doc = inspect.getdoc(_module(name)) or name
    title, _, body = doc.partition("\n")
    return title.strip(), body.strip()


_TMP_PREFIX = ".gradlab-"


def _publish(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` atomically: readers see the old file or the new one, never a
    partial one. The bytes go to an anonymous file (O_TMPFILE, Linux) that gets a name only
    once complete, so even a killed process leaves nothing behind; elsewhere a named temporary
    file is used and removed on failure."""
    tmp = path.parent / f"{_TMP_PREFIX}{path.name}.{os.getpid()}.tmp"
    if _publish_anonymous(path, tmp, data):
        return
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _publish_anonymous(path: Path, tmp: Path, data: bytes) -> bool:
    """The O_TMPFILE route; False where the platform or filesystem does not support it."""
    o_tmpfile = getattr(os, "O_TMPFILE", None)
    if o_tmpfile is None:
        return False
    try:
        fd = os.open(path.parent, o_tmpfile | os.O_WRONLY, 0o644)
    except OSError:
        return False
    root = os.open("/", os.O_RDONLY)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        # linkat(AT_SYMLINK_FOLLOW) names the anonymous file; a src_dir_fd makes Python use linkat
        os.link(f"/proc/self/fd/{fd}", tmp, src_dir_fd=root, follow_symlinks=True)
    except OSError:
        return False
    finally:
        os.close(fd)
        os.close(root)
    os.replace(tmp, path)
    return True


def _clean_stale(folder: Path) -> None:
    """Remove temporary files a killed earlier run may have left (named-file fallback only)."""
    for stale in folder.glob(f"{_TMP_PREFIX}*.tmp"):
        stale.unlink(missing_ok=True)


def _freeze_layout(fig) -> None:
    """Keep the positions the layout engine just computed for the next formats of the same
    figure: constrained layout measures every tick label and title again at each ``savefig``,
    about half of a figure's rendering time, and gives the same positions each time."""
    fig.set_layout_engine("none")


def _render(fig, fmt: str) -> bytes:
    """The figure in one format with no timestamps or tool versions, so output is reproducible."""
    buf = io.BytesIO()
    metadata = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None},
                "pdf": {"CreationDate": None, "ModDate": None, "Creator": None, "Producer": None}}[fmt]
    fig.savefig(buf, format=fmt, metadata=metadata)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Output folder safety and the manifest
# --------------------------------------------------------------------------------------------


def _read_manifest(folder: Path) -> set[str]:
    path = folder / MANIFEST
    if not path.exists():
        return set()
    try:
        data = json.loads(path.read_text("utf-8"))
        files = data["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) and "/" not in f for f in files):
            raise ValueError("bad file list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GradlabError(f"{path} is not a gradlab manifest ({exc}); remove it or choose another --out") from None
    return set(files)


def _manifest_bytes(files: set[str]) -> bytes:
    doc = {"written_by": "gradlab figures", "note": "files gradlab may overwrite here; do not edit",
           "files": sorted(files)}
    return (json.dumps(doc, indent=1) + "\n").encode("utf-8")


def check_output_folder(out: str | os.PathLike) -> tuple[Path, set[str]]:
    """The folder ``out`` if gradlab may write figures there, with the files it wrote before.

    Refused: an empty path; the current directory, the home directory or a filesystem root;
    a project root (it holds ``.git``, ``pyproject.toml`` or ``setup.py``); a path that is not a
    folder; and a folder holding any file that is not in gradlab's manifest there."""
    text = os.fspath(out)
    if not str(text).strip():
        raise GradlabError("--out is empty; name a folder for the figures, e.g. --out figures")
    folder = Path(text).expanduser()
    resolved = folder.resolve()
    if resolved == Path.cwd().resolve():
        raise GradlabError(f"--out {text!r} is the current directory; name a folder of its own, e.g. --out figures")
    if resolved == Path.home().resolve() or resolved == Path(resolved.anchor):
        raise GradlabError(f"--out {text!r} is the home directory or a filesystem root; name a folder of its own")
    if folder.exists() and not folder.is_dir():
        raise GradlabError(f"--out {text!r} exists and is not a folder")
    if not folder.exists():
        return folder, set()
    markers = [m for m in (".git", "pyproject.toml", "setup.py") if (folder / m).exists()]
    if markers:
        raise GradlabError(f"--out {text!r} is a project root (it holds {', '.join(markers)}); "
                           "gradlab writes figures only into a folder of its own")
    owned = _read_manifest(folder)
    # a sub-folder that is itself a gradlab output folder (it holds a manifest, e.g. the
    # reproduction figures in figures/reproductions/) is gradlab's, not foreign
    foreign = sorted(p.name for p in folder.iterdir()
                     if p.name != MANIFEST and p.name not in owned and not p.name.startswith(_TMP_PREFIX)
                     and not (p.is_dir() and (p / MANIFEST).is_file()))
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise GradlabError(f"--out {text!r} holds files gradlab did not write ({listed}); gradlab never "
                           "overwrites or mixes with them: choose an empty or new folder")
    return folder, owned


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


def _arguments(name: str, losses: Sequence[str] | None, values: Mapping[str, Any] | None) -> dict[str, Any]:
    from gradlab import symbolic

    kwargs: dict[str, Any] = {}
    opts = options(name)
    if losses:
        if "losses" not in opts:
            able = [n for n in FIGURES if "losses" in options(n)]
            raise GradlabError(f"figure '{name}' draws fixed losses; --loss works with: {', '.join(able)}")
        resolved = tuple(symbolic.as_loss(loss).name if isinstance(loss, str) else loss for loss in losses)
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


def check_values_used(losses: Sequence[Any], values: Mapping[str, float] | None) -> None:
    """Refuse a --set name that none of the drawn losses has (a typo would otherwise be ignored)."""
    from gradlab import symbolic

    known = {h for loss in losses for h in symbolic.as_loss(loss).hyperparameters}
    unused = sorted(set(values or {}) - known)
    if unused:
        raise GradlabError(f"--set {', '.join(unused)}: no drawn loss has this hyperparameter; "
                           f"they have: {', '.join(sorted(known)) or 'none'}")


def write_owned(out: str | os.PathLike, outputs: Mapping[str, bytes]) -> list[Path]:
    """Write ``{file name: bytes}`` into the gradlab output folder ``out`` with the same safety
    as :func:`save_all`: the folder is checked, every file is recorded in its manifest before it
    is published atomically. For other writers of figures (e.g. ``gradlab reproduce --figures``)."""
    folder, owned = check_output_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    _clean_stale(folder)
    written = []
    for name, blob in outputs.items():
        if "/" in name or name in ("", MANIFEST):
            raise GradlabError(f"cannot write '{name}': a plain file name is needed")
        owned.add(name)
        _publish(folder / MANIFEST, _manifest_bytes(owned))
        _publish(folder / name, blob)
        written.append(folder / name)
    return written


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
                   formats: tuple[str, ...]) -> dict[str, bytes]:
    """One figure computed and rendered in memory at every size and format: {file name: bytes}
    (nothing is written: a failure leaves the previous files)."""
    style = _style()
    module = _module(name)
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
    return outputs


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
    """Figures computed and rendered in ``workers`` fresh processes (spawned: JAX's threads
    make fork unsafe), published here in the gallery's order as each one is ready; the first
    failure stops the rest and is raised, leaving the figures not yet published as they were."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_setup)
    try:
        # the longest first (LPT scheduling): a long figure started last would finish alone
        futures = {name: pool.submit(_render_figure, name, arguments[name], sizes, formats)
                   for name in sorted(names, key=lambda n: -_COLD_SECONDS.get(n, 0.0))}
        for i, name in enumerate(names, 1):
            outputs = futures[name].result()
            if progress:
                print(f"[{i}/{len(names)}] {name}", file=sys.stderr, flush=True)
            publish(name, outputs)
    finally:
        pool.shutdown(cancel_futures=True)


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
    progress: bool = False,
    jobs: int = 1,
) -> list[Path]:
    """Render figures (all by default) into ``out`` at each size and format, plus the gallery
    README; ``losses`` and ``values`` redraw them for other losses and hyperparameters.

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
    arguments = {name: _arguments(name, losses, values) for name in names}
    folder, owned = check_output_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    _clean_stale(folder)
    written: list[Path] = []

    def record(path: Path) -> None:
        owned.add(path.name)
        _publish(folder / MANIFEST, _manifest_bytes(owned))  # before the file: a killed run stays owned

    def publish(name: str, outputs: dict[str, bytes]) -> None:
        for file_name, blob in outputs.items():
            path = folder / file_name
            record(path)
            _publish(path, blob)
            written.append(path)
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
    readme = folder / "README.md"
    record(readme)
    _publish(readme, gallery(folder=folder).encode("utf-8"))
    written.append(readme)
    return written


def gallery(prefix: str = "", folder: str | os.PathLike | None = None) -> str:
    """The figure gallery as Markdown, generated from the figure modules' docstrings. With a
    ``folder``, it lists only the figures present there and links only to files that exist."""
    present = None if folder is None else {p.name for p in Path(folder).iterdir()}
    lines = [
        "# Figure gallery",
        "",
        "Generated by `gradlab figures` from the figure modules' docstrings; do not edit by hand.",
        "Each figure is drawn a page wide (NAME.png, .svg, .pdf) and a column wide (NAME-column.*).",
        "",
    ]
    for name in FIGURES:
        files = [_file_name(name, size, fmt) for size in SIZES for fmt in FORMATS]
        if present is not None:
            files = [f for f in files if f in present]
            if not files:
                continue
        title, body = caption(name)
        shown = next((f for f in files if f.endswith(".png")), None)
        lines += [f"## {title}", ""]
        if shown:
            lines += [f"![{name}]({prefix}{shown})", ""]
        lines += [body, "", "Files: " + ", ".join(f"[{f}]({prefix}{f})" for f in files), ""]
        table = f"{name}.md"
        if hasattr(_module(name), "markdown") and (present is None or table in present):
            lines += [f"Table: [{table}]({prefix}{table})", ""]
    return "\n".join(lines)
