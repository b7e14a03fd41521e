"""Progress bars for long work (runs trained, figures drawn, entries reproduced, losses audited).

Library code marks its long loops with :func:`bar`; nothing is shown unless an entry point
asked for it with :func:`shown`. The command line does so only when stderr is a terminal and
``--json`` is not given, so piped and JSON output never change; a notebook does so with
``with gradlab.progress.shown(): ...`` and gets a widget (``tqdm.auto``). Bars are tqdm's: the
count done, the rate and an estimate of the time left, on stderr.

The switch is a context variable, set for the length of a ``with`` block, not a module flag:
importing a library module never turns progress on.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["bar", "counter", "shown", "active", "wanted"]

_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("gradlab_progress", default=False)


def wanted(json_output: bool, stream: Any = None) -> bool:
    """The command line's rule: progress when ``stream`` (stderr by default) is a terminal and
    the output is not JSON."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not json_output and bool(isatty and isatty())


@contextlib.contextmanager
def shown(on: bool = True) -> Iterator[None]:
    """Show progress bars inside the block (``on=False``: hide them)."""
    token = _ON.set(on)
    try:
        yield
    finally:
        _ON.reset(token)


def active() -> bool:
    """Whether a bar made now would be shown."""
    return _ON.get()


class _Silent:
    """What :func:`bar` gives when progress is off: the same calls, doing nothing (and tqdm is
    not imported)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def bar(total: int, desc: str, unit: str = "it") -> Any:
    """A progress bar over ``total`` units (use it as a context manager; ``update(n)`` after each
    ``n`` done), shown on stderr only inside :func:`shown`."""
    if not _ON.get():
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def counter(desc: str, unit: str = "it") -> Iterator[Any]:
    """A callback ``report(done, total, label)`` for library code that reports its own progress
    (``gradlab.checks.run_matrix``), drawn as a :func:`bar` (and a no-op outside :func:`shown`)."""
    if not _ON.get():
        yield lambda done, total, label="": None
        return
    from tqdm.auto import tqdm

    with tqdm(total=0, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True) as shown_bar:
        def report(done: int, total: int, label: str = "") -> None:
            shown_bar.set_postfix_str(label, refresh=False)
            if shown_bar.total != total:  # the first report: draw the bar with its total at once
                shown_bar.total = total
                shown_bar.refresh()
            shown_bar.update(done - shown_bar.n)

        yield report
