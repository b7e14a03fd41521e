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
"""

from __future__ import annotations

import importlib
import inspect
import io
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from gradlab.errors import GradlabError

__all__ = ["FIGURES", "make", "save_all", "caption"]

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

FORMATS = ("png", "svg")

STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "svg.hashsalt": "gradlab",
    "svg.fonttype": "path",
    "path.simplify": False,
    "figure.dpi": 100,
    "savefig.dpi": 150,
}


def _module(name: str):
    if name not in FIGURES:
        raise GradlabError(f"unknown figure '{name}'; the figures are: {', '.join(FIGURES)}")
    return importlib.import_module(FIGURES[name])


def make(name: str, **kwargs):
    """The figure called ``name`` as a matplotlib ``Figure`` (no file is written)."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        return _module(name).make(**kwargs)


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


def _render(fig, fmt: str) -> bytes:
    buf = io.BytesIO()
    metadata = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
    fig.savefig(buf, format=fmt, metadata=metadata)
    return buf.getvalue()


def save_all(
    out: str | os.PathLike = "figures",
    names: Iterable[str] | None = None,
    *,
    progress: bool = False,
) -> list[Path]:
    """Render figures (all by default) into ``out`` as PNG and SVG, plus the gallery README."""
    import matplotlib

    from gradlab import runtime

    runtime.configure()  # figure regeneration is an entry point: float64, compilation cache
    matplotlib.use("Agg", force=True)
    names = list(names) if names is not None else list(FIGURES)
    for name in names:
        _module(name)  # fail on an unknown name before writing anything
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    _clean_stale(folder)
    written: list[Path] = []
    with matplotlib.rc_context(STYLE):
        for i, name in enumerate(names, 1):
            if progress:
                print(f"[{i}/{len(names)}] {name}", file=sys.stderr, flush=True)
            module = _module(name)
            data = module.compute() if hasattr(module, "compute") else None
            fig = module.make(data) if data is not None else module.make()
            # render everything in memory first, then publish: a failure leaves the old files
            outputs = {folder / f"{name}.{fmt}": _render(fig, fmt) for fmt in FORMATS}
            if hasattr(module, "markdown"):  # a table beside the figure, e.g. scorecard.md
                outputs[folder / f"{name}.md"] = module.markdown(data).encode("utf-8")
            for path, blob in outputs.items():
                _publish(path, blob)
                written.append(path)
    readme = folder / "README.md"
    _publish(readme, gallery().encode("utf-8"))
    written.append(readme)
    return written


def gallery(prefix: str = "") -> str:
    """The figure gallery as Markdown, generated from the figure modules' docstrings."""
    lines = [
        "# Figure gallery",
        "",
        "Generated by `gradlab figures` from the figure modules' docstrings; do not edit by hand.",
        "",
    ]
    for name in FIGURES:
        title, body = caption(name)
        lines += [f"## {title}", "", f"![{name}]({prefix}{name}.png)", "", body, ""]
        if hasattr(_module(name), "markdown"):
            lines += [f"Table: [{name}.md]({prefix}{name}.md)", ""]
    return "\n".join(lines)
