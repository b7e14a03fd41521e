"""Processes that end cleanly: worker pools that die with their parent, and entry points that stop
on SIGTERM as they do on Ctrl-C.

- :func:`stop_on_signals` (for entry points such as the CLI's ``main``): while it is active,
  SIGTERM raises :class:`Terminated` in the main thread, as SIGINT raises ``KeyboardInterrupt``.
  Every ``finally`` then runs: a :class:`Pool` stops its workers and
  :mod:`gradlab.output` removes its temporary files, and the process exits 128 + the signal's
  number.
- :class:`Pool`: a process pool (spawned: JAX's threads make fork unsafe) whose workers
  ignore SIGINT (the parent decides, and stops them), watch their parent and exit on their own
  when it is gone (even when it was killed by SIGKILL), and are terminated rather than waited for
  when the block that holds the pool ends by an exception.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # concurrent.futures (and the logging it imports) only where a pool is used
    from concurrent.futures import Future

__all__ = ["Terminated", "stop_on_signals", "exit_status", "Pool", "PARENT_POLL"]

PARENT_POLL = 0.2  # seconds between a worker's checks that its parent is still alive
_STOP_GRACE = 1.0  # seconds a worker has to exit after SIGTERM before it is killed


class Terminated(KeyboardInterrupt):  # noqa: N818 - named after the signal, as KeyboardInterrupt
    """SIGTERM (or another stop signal) arrived; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def exit_status(exc: KeyboardInterrupt) -> int:
    """The shell's exit status for a process stopped by ``exc``: 128 + the signal's number
    (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` inside the block (main thread only; elsewhere a
    no-op), restoring the previous handler after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM ignored inside the block (main thread only): the process is already
    stopping."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:  # re-parented: the parent is gone, however it died
            os._exit(1)
        time.sleep(PARENT_POLL)


def _start_worker(parent: int, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), name="gradlab-parent-watch", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


class Pool:
    """``workers`` spawned processes running submitted calls; use it as a context manager.

    A block that ends normally waits for the submitted work; one that ends by an exception
    (a failure, ``KeyboardInterrupt``, :class:`Terminated`) cancels what has not started and
    terminates the workers at once (:meth:`stop`)."""

    def __init__(self, workers: int, initializer: Callable[..., Any] | None = None, initargs: tuple = ()):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(os.getpid(), initializer, initargs))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._executor.submit(fn, *args, **kwargs)

    def pids(self) -> list[int]:
        """The process ids of the workers started so far."""
        return [p.pid for p in self._processes() if p.pid is not None]

    def _processes(self) -> list[Any]:
        # concurrent.futures keeps its workers here (Python 3.14 adds terminate_workers() for this)
        return list((getattr(self._executor, "_processes", None) or {}).values())

    def stop(self) -> None:
        """Cancel the work not yet started and end every worker now: SIGTERM, then SIGKILL for
        one still alive after a second."""
        processes = self._processes()
        with _signals_held():  # a second Ctrl-C or SIGTERM must not cut the stopping short
            self._executor.shutdown(wait=False, cancel_futures=True)
            for p in processes:
                with contextlib.suppress(OSError, ValueError):
                    p.terminate()
            deadline = time.monotonic() + _STOP_GRACE
            for p in processes:
                with contextlib.suppress(OSError, ValueError):
                    p.join(max(0.0, deadline - time.monotonic()))
                    if p.is_alive():
                        p.kill()
                        p.join()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self._executor.shutdown(wait=True)
        else:
            self.stop()
