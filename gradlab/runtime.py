"""Global JAX configuration, set by entry points only (the CLI, figure regeneration, notebooks'
setup cell, the test configuration); importing a library module never changes it.

``configure()`` turns on float64 (``jax_enable_x64``: every number gradlab compares is float64)
and, unless the disk cache is off, keeps XLA's compiled programs beside the derivation cache
(``gradlab._cache.cache_dir()``), so a sweep, a check or a notebook view compiled once is not
compiled again in the next process. It also gives JAX one CPU device per core this process may
use (``jax_num_cpu_devices``), so that a sweep of several blocks of runs trains them on every
core (``gradlab.experiments._engine``; a run's results are the same bits on any number of
devices); a program that is not spread runs on one device as before. A device count the user
chose wins: ``JAX_NUM_CPU_DEVICES``, ``--xla_force_host_platform_device_count`` in
``XLA_FLAGS``, or ``jax.config.update("jax_num_cpu_devices", n)`` before ``configure``; and
JAX started before ``configure`` keeps the devices it has. Its first call also moves the objects
then alive (the imported modules: jax's, numpy's, gradlab's) out of reach of Python's cyclic
garbage collector (``gc.freeze``): they live as long as the process does, and the collections a
process runs as it exits scanned them all (~0.2 CPU-s of a ~1.3 CPU-s ``gradlab simulate`` on
filled caches). Library functions that need float64 call ``require_x64``, which refuses to run in
a session that has not enabled it instead of silently computing in float32.
"""

from __future__ import annotations

import gc
import os
import re

from gradlab.errors import GradlabError

__all__ = ["configure", "require_x64", "unknown_compile_option"]

_UNKNOWN_OPTION = re.compile(r"No such compile option: '(\w+)'")


def unknown_compile_option(exc: Exception) -> str | None:
    """The XLA compile option an error names as unknown to this jaxlib, or None. gradlab's compile
    options only trade compile time for run time, so a caller drops such an option and compiles
    again (an older or newer jaxlib may not have it)."""
    found = _UNKNOWN_OPTION.search(str(exc))
    return found.group(1) if found else None


def configure(*, x64: bool = True, compilation_cache: bool = True) -> None:
    """Enable float64 and the persistent XLA compilation cache (idempotent), and freeze the
    objects alive at the first call out of the cyclic garbage collector's scans."""
    import jax

    from gradlab import _cache

    if not gc.get_freeze_count():  # the first call only: later objects (caches, programs) stay collectable
        gc.freeze()

    if x64:
        jax.config.update("jax_enable_x64", True)
    _cpu_devices(jax)
    # jax's Config declares its flags at run time, unseen by its stubs (here and below)
    if not compilation_cache or jax.config.jax_compilation_cache_dir:  # type: ignore[attr-defined]
        return  # off, or already chosen by the user (JAX_COMPILATION_CACHE_DIR)
    folder = _cache.xla_cache_dir()  # refuses a folder others could plant compiled code in
    if folder is None:
        return
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # compilation is most of the cold time of gradlab's programs, and most of them are small: a
    # figure, a check or a notebook compiles hundreds of 10-100 ms programs, which a later process
    # reads back in ~3 ms each. Below 10 ms, reading an entry costs about what compiling it does
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.01)


def _cpu_devices(jax) -> None:
    """One JAX CPU device per core this process may use, unless the user chose a count or JAX
    has started (its devices are fixed then)."""
    chosen = ("JAX_NUM_CPU_DEVICES" in os.environ or "xla_force_host_platform_device_count" in os.environ.get(
        "XLA_FLAGS", "") or jax.config.jax_num_cpu_devices != -1)  # type: ignore[attr-defined]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if chosen or cores < 2:
        return
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except RuntimeError:  # JAX has started: its devices stay as they are
        pass


def require_x64() -> None:
    """Raise unless JAX runs in float64 (``configure()`` or ``JAX_ENABLE_X64=1``)."""
    import jax

    if not jax.config.jax_enable_x64:  # type: ignore[attr-defined]  # a flag unseen by jax's stubs
        raise GradlabError("gradlab's numerics need float64: call gradlab.runtime.configure() (or set "
                           "JAX_ENABLE_X64=1) before using JAX")
