"""Compiled programs kept between processes (private): a program traced and lowered once is
serialised with :mod:`jax.export` into gradlab's disk cache, together with the machine code XLA
compiled for it, and a later process loads that code and runs it: no tracing, no lowering, no
compilation (a fresh process's training sweep was ~0.3-0.5 CPU-s of lowering, the persistent
compilation cache's lookup and the LAPACK set-up jax's call lowering does for every CPU program).

:func:`jit` is a drop-in for ``jax.jit(fn, compiler_options=...)`` given a ``name`` that fixes
what ``fn`` computes (for a training program, the ``repr`` of its ``Static``). It knows nothing of
the program's signature: it calls ``fn(*args)`` for whatever arrays it is given.

**Two entries per program.** ``KEY.jaxexport`` holds the :mod:`jax.export` serialisation, the
program's portable form: its StableHLO and its input and output trees. ``KEY.xlaexe`` holds the
executable XLA compiled from it on this machine (``Client.serialize_executable``); it is written
only from a real compilation, never from one that XLA's persistent compilation cache served (an
executable read from that cache cannot be serialised again whole on CPU), so that compilation is
named after the key (no other program's cache entry can match it) and kept out of XLA's cache
(the ``.xlaexe`` file is its cache). A process that finds only the first entry, or whose jaxlib
cannot serialise or load executables, calls the exported program through ``jax.jit`` as before,
with XLA's persistent compilation cache (``gradlab.runtime.configure``) serving its compilation.

**The optimised tier ahead.** A ``jit`` given ``ahead`` (the compile options of another tier of
the same program) has that tier compiled on a background thread whenever it compiles or reads
back its own for new inputs and the other tier's executable is not on disk (``_compile_ahead``):
the first process of a program leaves both tiers to the next one at the cost of a compilation on
the other core. One worker compiles them, one after another; at exit the process drops those not
started and waits for the one under way (a thread still inside XLA when Python finalises aborts
it). Off unless ``$GRADLAB_COMPILE_AHEAD=1`` (:func:`compiles_ahead`).

**Facts.** ``KEY.json`` holds a few facts as JSON that a process would otherwise import a
library to learn (:func:`remembered`: the optimisers optax has, the shapes of an optimiser's
state), checked on read like the other entries and then for their shape by the caller.

**The key.** An entry is found by the SHA-256 of everything the program depends on: the bytes of
every gradlab source file, the versions of Python, jax, jaxlib, numpy, optax, ml_dtypes and
sympy, the backend, the kind and number of devices, the device this process runs a program on
(under ``jax.distributed`` each process its own), the host CPU (its model and feature flags:
the executable is machine code for it), the JAX settings that change tracing (float64 and the
rest of :data:`_CONFIG`), the program's ``name``, the tree, shapes and dtypes of its inputs, and
the compile options. Editing any source file or changing any of these parts gives another key,
so a stale program is never found. Inputs that are not plain arrays (a Python number, whose type
JAX weakens, or an array spread over several devices) are not served: the program is jitted as
usual.

**Trust nothing read back.** A compiled program cannot be checked cheaply against its source,
so a file is bound to its key instead: it holds the key it was written for and the SHA-256 and
length of its payload, recorded at write time and checked at every read; the deserialised
program's input tree and shapes must be the caller's, and the executable must take exactly the
exported program's inputs. Any mismatch, a truncated or damaged file, a file that is not the
user's own (``gradlab._cache``'s folder rules) or one jax cannot read is a miss: the program is
traced (or compiled) again and the entry rewritten. This detects accidents (a partial write, a
flipped byte, a file copied under another key); it cannot detect someone who can write to the
user's cache folder and recomputes the hashes, who could equally replace gradlab itself (or
XLA's own compilation cache, which holds executables too).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import platform
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from gradlab import _cache, caches

__all__ = ["AHEAD", "EXECUTABLE", "FACTS", "FORMAT", "compiles_ahead", "facts_key", "jit", "key", "load", "remembered",
           "signature", "source_digest", "store"]

FORMAT = "gradlab-program/1"  # an entry's kind and version: the exported program
EXECUTABLE = "gradlab-executable/1"  # the executable XLA compiled from it
FACTS = "gradlab-facts/1"  # a few facts, as JSON, a process would otherwise import a library to learn
_SUFFIXES = {FORMAT: ".jaxexport", EXECUTABLE: ".xlaexe", FACTS: ".json"}
_MAX_BYTES = 64_000_000  # a training program of 36 losses serialises to ~1 MB
_PACKAGE = Path(__file__).resolve().parents[1]
_VERSIONED = ("jax", "jaxlib", "numpy", "optax", "ml_dtypes", "sympy")
# JAX settings read while tracing: each changes the program a function lowers to
_CONFIG = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_dtype_promotion", "jax_numpy_rank_promotion",
           "jax_default_prng_impl", "jax_threefry_partitionable", "jax_enable_checks")


@caches.memo(maxsize=4)
def source_digest(package: Path = _PACKAGE) -> str:
    """SHA-256 over the relative path and bytes of every ``.py`` file of the gradlab package
    at ``package``."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\x00")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@caches.memo(maxsize=16)
def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def _host_cpu() -> str:
    """The host CPU's model and feature flags (an executable is machine code for them)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            lines = fh.read(1 << 16).splitlines()
    except OSError:
        return platform.machine() + " " + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    return json.dumps(sorted({line.strip() for line in lines if line.startswith(wanted)}))


@caches.memo(maxsize=1)
def _platform() -> str:
    """The versions, the backend, the devices, the device this process runs a program on (an
    executable is bound to it: under ``jax.distributed`` each process has its own) and the host
    CPU (fixed once JAX has started)."""
    devices = jax.devices()
    return json.dumps([sys.version, *(_version(n) for n in _VERSIONED), jax.default_backend(),
                       [d.device_kind for d in devices], len(devices), jax.process_count(),
                       jax.local_devices()[0].id, _host_cpu()])


def environment() -> str:
    """The parts of the key outside the program: versions, backend, devices and JAX settings."""
    config = {name: str(getattr(jax.config, name, None)) for name in _CONFIG}
    return json.dumps([_platform(), config], sort_keys=True)


def signature(args: tuple) -> str | None:
    """The tree, shapes and dtypes of ``args``, or None when one leaf is not a plain array on
    one device (a Python number, or an array sharded across devices)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    parts = []
    for leaf in leaves:
        if isinstance(leaf, jax.Array):
            if len(leaf.sharding.device_set) != 1:
                return None
        elif not isinstance(leaf, np.ndarray | np.generic):
            return None
        parts.append((tuple(np.shape(leaf)), _dtype(leaf).str))
    return repr((str(tree), parts))


def key(name: str, sig: str, options: Mapping[str, Any], *, package: Path = _PACKAGE) -> str:
    """The SHA-256 naming the program ``name`` compiled with ``options`` for inputs of signature
    ``sig``, in this environment and gradlab source (read from ``package``)."""
    parts = [FORMAT, source_digest(package), environment(), name, sig, json.dumps(sorted(options.items()))]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() + b"\x00")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Files: a JSON head line (format, key, payload SHA-256 and length), then the payload
# --------------------------------------------------------------------------------------------


def _folder() -> Path | None:
    return _cache.subfolder("programs")


def store(key: str, payload: bytes, *, folder: Path | None = None, kind: str = FORMAT) -> bool:
    """Write ``payload`` (a serialised program, or with ``kind=EXECUTABLE`` its executable)
    under ``key`` atomically; True if written."""
    folder = _folder() if folder is None else folder
    if folder is None:
        return False
    head = {"format": kind, "key": key, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    from gradlab.output import write_atomic

    try:
        write_atomic(folder / f"{key}{_SUFFIXES[kind]}",
                     json.dumps(head, sort_keys=True).encode() + b"\n" + bytes(payload))
    except OSError:
        return False
    return True


def load(key: str, *, folder: Path | None = None, kind: str = FORMAT) -> bytes | None:
    """The payload of ``kind`` stored under ``key``, or None on a miss: absent, not the user's
    own file, written for another key or kind, or not the bytes whose SHA-256 and length were
    recorded."""
    folder = _folder() if folder is None else folder
    if folder is None:
        return None
    blob = _cache.read_own_file(folder / f"{key}{_SUFFIXES[kind]}", limit=_MAX_BYTES)
    if blob is None:
        return None
    first, newline, payload = blob.partition(b"\n")
    try:
        head = json.loads(first.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    if (not newline or not isinstance(head, dict) or head.get("format") != kind or head.get("key") != key
            or head.get("size") != len(payload) or head.get("sha256") != hashlib.sha256(payload).hexdigest()):
        return None
    return payload


def facts_key(name: str) -> str:
    """The key of the facts ``name`` that depend on gradlab's source, Python and the versions of
    JAX's companions only (not on the devices: no JAX backend is started to compute it)."""
    digest = hashlib.sha256()
    for part in (FACTS, source_digest(), sys.version, *(_version(n) for n in _VERSIONED), name):
        digest.update(part.encode() + b"\x00")
    return digest.hexdigest()


def remembered(k: str, derive: Callable[[], Any], fits: Callable[[Any], bool], *, folder: Path | None = None) -> Any:
    """``derive()`` (JSON data), kept under the key ``k`` in the disk cache: read back where an
    earlier process wrote it and ``fits`` it (an entry checked as every entry is, then its shape
    by ``fits``), else derived now and written. For facts that cost an import to learn (the
    optimisers optax has; the shapes of an optimiser's state)."""
    payload = load(k, folder=folder, kind=FACTS)
    if payload is not None:
        try:
            value = json.loads(payload.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            value = None
        if value is not None and fits(value):
            return value
    value = derive()
    store(k, json.dumps(value, sort_keys=True).encode(), folder=folder, kind=FACTS)
    return value


# --------------------------------------------------------------------------------------------
# The drop-in for jax.jit
# --------------------------------------------------------------------------------------------

# disk key -> the deserialised program, jitted with its compile options (or None: not exportable)
_LOADED: dict[str, Callable | None] = caches.Bounded(64)


def _dtype(x) -> np.dtype:
    """An input's dtype (read off the array: numpy's inference from a JAX array is deprecated)."""
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)


def _specs(args: tuple) -> tuple:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x)), args)


def _matches(exported: Any, args: tuple) -> bool:
    """Whether a deserialised program takes exactly ``args``' tree, shapes and dtypes."""
    leaves, tree = jax.tree_util.tree_flatten((args, {}))
    return exported.in_tree == tree and [(tuple(a.shape), a.dtype) for a in exported.in_avals] == [
        (tuple(np.shape(x)), _dtype(x)) for x in leaves]


def _compiled(fn: Callable, k: str, args: tuple, options: Mapping[str, Any], *,
              folder: Path | None = None, client: Any = None,
              ahead: tuple[str, Mapping[str, Any]] | None = None) -> Callable | None:
    """``fn`` for ``args``, under the disk key ``k``: its executable from the disk cache, or the
    exported program (from the disk cache, or exported into it now) compiled now, its executable
    stored; None when jax.export cannot serialise it. ``client`` is the XLA client that
    (de)serialises executables (None: the default device's). ``ahead`` is ``(key, options)`` of
    another tier of the same program: unless its executable is at hand, it is compiled on a
    background thread and stored (:func:`_compile_ahead`)."""
    if k in _LOADED:
        return _LOADED[k]
    _wait(_executable_path(k, folder))  # this tier compiling in the background: its entry is read back below
    from jax import export

    exported, serialised = None, None
    payload = load(k, folder=folder)
    if payload is not None:
        try:
            exported, serialised = export.deserialize(bytearray(payload)), payload
        except Exception:  # noqa: BLE001 - whatever a damaged payload makes jax raise, it is a miss
            exported = None
        if exported is not None and not _matches(exported, args):
            exported = None
    if exported is None:
        try:
            exported = export.export(jax.jit(fn))(*_specs(args))
            serialised = bytes(exported.serialize())
        except Exception:  # noqa: BLE001 - not exportable (flatbuffers absent, an unserialisable tree): jit as usual
            _LOADED[k] = None
            return None
        store(k, serialised, folder=folder)
    device = jax.local_devices()[0]  # where jit places unsharded inputs (this process's first device)
    client = device.client if client is None else client
    if ahead is not None and serialised is not None:
        _compile_ahead(exported, serialised, *ahead, args, device, client, folder=folder)
    _LOADED[k] = (_load_executable(exported, k, device, client, options, folder=folder)
                  or _compile_and_store(exported, k, args, options, device, client, folder=folder))
    return _LOADED[k]


class _Executable:
    """An executable read back from the disk cache, called as the jitted exported program is:
    the inputs' leaves placed on its device, its outputs built into the exported output tree.
    Inputs it was not compiled for (which ``_matches`` rules out, unless JAX's float64 setting
    changed since) go to the jitted exported program."""

    def __init__(self, loaded: Any, exported: Any, device: Any, options: Mapping[str, Any]):
        self.loaded, self.exported, self.device = loaded, exported, device
        self.avals = [(tuple(a.shape), np.dtype(a.dtype)) for a in exported.in_avals]
        self.jitted = jax.jit(exported.call, compiler_options=dict(options))

    def __call__(self, *args):
        leaves = jax.tree_util.tree_leaves(args)
        # placed only where not on the device already (a repeated sweep's inputs are, ``_engine._stacked``)
        here = {self.device}
        away = [i for i, x in enumerate(leaves) if not (isinstance(x, jax.Array) and x.sharding.device_set == here)]
        for i, x in zip(away, jax.device_put([leaves[i] for i in away], self.device), strict=True):
            leaves[i] = x
        if [(tuple(x.shape), x.dtype) for x in leaves] != self.avals:
            return self.jitted(*args)
        outs = self.loaded.execute_sharded(leaves).disassemble_into_single_device_arrays()
        return jax.tree_util.tree_unflatten(self.exported.out_tree, [out[0] for out in outs])


def _executable_fits(loaded: Any, exported: Any) -> bool:
    """Whether an executable takes exactly the exported program's inputs (no input dropped, no
    constant hoisted into an extra one) and gives its outputs, and the program has no effects
    (no token to thread)."""
    return (not exported.ordered_effects and not exported.unordered_effects
            and len(loaded.get_parameter_layouts()) == len(exported.in_avals)
            and len(loaded.get_output_layouts()) == len(exported.out_avals))


def _load_executable(exported: Any, k: str, device: Any, client: Any, options: Mapping[str, Any], *,
                     folder: Path | None, initialise: Callable[[], bool] | None = None) -> Callable | None:
    """The executable stored under ``k``, loaded onto ``device``, or None (a miss, or a jaxlib
    that cannot load it: the caller compiles the exported program instead). A program with a
    custom call (LAPACK: an LU solve) needs jaxlib's LAPACK kernels set up first, which jax's
    call lowering does for every CPU program and a loaded executable skips: ``initialise``
    (default :func:`_initialise_lapack`) does it, and where it cannot, the program is not
    served (its kernels' addresses would be unset)."""
    blob = load(k, folder=folder, kind=EXECUTABLE)
    if blob is None:
        return None
    first, _, code = blob.partition(b"\n")
    try:
        facts = json.loads(first.decode("utf-8"))
        if not isinstance(facts, dict) or not isinstance(facts.get("custom_calls"), bool):
            return None
        if facts["custom_calls"] and not (initialise or _initialise_lapack)():
            return None
        loaded = client.deserialize_executable(code, (device,))
        if not _executable_fits(loaded, exported):
            return None
    except Exception:  # noqa: BLE001 - a jaxlib without the API, or bytes XLA refuses: compile instead
        return None
    return _Executable(loaded, exported, device, options)


def _initialise_lapack() -> bool:
    """Set up jaxlib's LAPACK kernels (from scipy's) as jax's lowering of a CPU program does;
    False where this jax has no such entry point (a private one: an upgrade that moves it
    makes gradlab compile such programs again, never run them unset)."""
    if jax.default_backend() != "cpu":
        return True  # only the CPU lowering sets anything up (jax.export's _ensure_backends_initialized)
    try:
        from jax._src.lax import linalg

        linalg.initialize_lapack()
    except Exception:  # noqa: BLE001 - moved or renamed in this jax
        return False
    return True


def _lowered(exported: Any, k: str, args: tuple, options: Mapping[str, Any]) -> Any:
    """The exported program lowered for ``args`` with ``options``, ready to compile: named after
    the key, so that XLA's persistent cache holds no entry its compilation can hit."""

    def program(*a):
        return exported.call(*a)

    program.__name__ = program.__qualname__ = f"gradlab_{k[:24]}"
    return jax.jit(program, keep_unused=True, compiler_options=dict(options)).lower(*_specs(args))


def _compile_and_store(exported: Any, k: str, args: tuple, options: Mapping[str, Any], device: Any, client: Any, *,
                       folder: Path | None) -> Callable:
    """The exported program compiled for ``args`` with ``options``; its executable is stored
    under ``k`` when the compilation was XLA's own work (not a persistent-cache hit, whose
    executable cannot be serialised again whole) and the client can serialise it."""
    folder = _folder() if folder is None else folder
    return _compile(_lowered(exported, k, args, options), exported, k, client, folder=folder)


def _compile(lowered: Any, exported: Any, k: str, client: Any, *, folder: Path | None) -> Any:
    """Compile ``lowered`` and store its executable under ``k`` in ``folder`` (None: nowhere)."""
    hits = _xla_cache_hits()
    # with no folder of gradlab's to keep it (the disk cache off), XLA's cache may keep it
    with _outside_xla_cache() if folder is not None else contextlib.nullcontext():
        compiled = lowered.compile()
    if folder is not None and _xla_cache_hits() == hits:
        try:
            executable = compiled.runtime_executable()
            if _executable_fits(executable, exported):
                facts = json.dumps({"custom_calls": "custom_call" in exported.mlir_module()}).encode()
                store(k, facts + b"\n" + bytes(client.serialize_executable(executable)), folder=folder,
                      kind=EXECUTABLE)
        except Exception:  # noqa: BLE001 - a jaxlib without the API: the exported program serves later processes
            pass
    return compiled


# --------------------------------------------------------------------------------------------
# Compiling another tier in the background
# --------------------------------------------------------------------------------------------

AHEAD = "GRADLAB_COMPILE_AHEAD"  # 1: compile the optimised tier ahead; 0 or unset: do not


def compiles_ahead() -> bool:
    """Whether a training program compiled here also compiles its optimised tier in the
    background for later processes (``$GRADLAB_COMPILE_AHEAD``: ``1``, yes; ``0`` or unset, no).
    Off unless asked for: the later processes then compute with the optimised code, whose
    rounding differs from level 0's, so a result would depend on what the cache held (a second
    ``reproduce.docs`` run redrew one committed figure).
    Never in a worker of a process pool (:class:`gradlab.processes.Pool`, or any process that
    ``multiprocessing`` started): its parent has given every core a worker, so there is no core
    to spare (the figures' pool took 80 s cold against 60 s without it)."""
    value = os.environ.get(AHEAD, "0").strip()
    if value not in ("0", "1", ""):
        from gradlab.errors import GradlabError

        raise GradlabError(f"{AHEAD}={value!r} is not understood: set it to 1 (compile the optimised tier of a new "
                           "training program in the background) or 0 (do not, the default)")
    started = sys.modules.get("multiprocessing")  # imported in every process multiprocessing starts
    return value == "1" and (started is None or started.parent_process() is None)


class _Job(NamedTuple):
    """A compilation ahead: the executable's file, the work that compiles and stores it, and
    whether it has ended."""

    path: Path
    work: Callable[[], None]
    done: threading.Event


# The compilations ahead, run one at a time by one worker thread (so a command that compiles many
# programs, the figures', queues them rather than compiling them all at once), in order. Not a
# cache: work under way, guarded by _LOCK.
_LOCK = threading.Lock()
_QUEUED: list[_Job] = []  # not started
_STARTED: dict[Path, _Job] = {}  # started, not ended
_WORKER: list[threading.Thread] = []  # the worker, while it runs
_WAITING: list[bool] = []  # whether the exit-time wait is registered


def _compile_ahead(exported: Any, serialised: bytes, k: str, options: Mapping[str, Any], args: tuple, device: Any,
                   client: Any, *, folder: Path | None) -> None:
    """Compile ``exported`` for ``args`` with ``options`` on the background worker and store both
    entries under ``k`` (the exported program, then its executable), unless that executable is
    at hand, queued or under way, or there is no folder to keep it. XLA compiles without
    holding Python's lock, so this runs beside the caller's own compilation and steps, on
    another core.

    The program is lowered here, in the caller's thread (lowering reads JAX's settings, some of
    them per thread, as the key did); only the compilation and the writes run in the background.
    Each write is atomic (:func:`store`), so a process that ends mid-way leaves no entry, or
    only the exported program, never a partial file. At exit a process drops the compilations
    not started and waits for the one under way (:func:`_finish`): a thread still inside XLA
    when Python finalises aborts the process."""
    folder = _folder() if folder is None else folder
    path = _executable_path(k, folder)
    if path is None or _LOADED.get(k) is not None or path.is_file():
        return
    with _LOCK:
        if path in _STARTED or any(job.path == path for job in _QUEUED):
            return
    lowered = _lowered(exported, k, args, options)

    def work() -> None:
        try:
            store(k, serialised, folder=folder)
            _compile(lowered, exported, k, client, folder=folder)
        except Exception:  # noqa: BLE001 - an option this jaxlib lacks, a full disk: nothing stored, compiled when needed
            pass

    with _LOCK:
        _QUEUED.append(_Job(path, work, threading.Event()))
        if not _WORKER:
            _WORKER.append(threading.Thread(target=_work, name="gradlab compiles ahead", daemon=True))
            _WORKER[0].start()
        if not _WAITING:
            atexit.register(_finish)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=_forget)
            _WAITING.append(True)


def _forget() -> None:
    """In a child forked from this process: the parent's compilations ahead are not its own (the
    worker thread does not survive a fork, and the lock may have been held when it happened)."""
    global _LOCK
    _LOCK = threading.Lock()
    _QUEUED.clear()
    _STARTED.clear()
    _WORKER.clear()


def _work() -> None:
    """The worker: the queued compilations, one after another, until none is left."""
    while True:
        with _LOCK:
            if not _QUEUED:
                _WORKER.clear()
                return
            job = _QUEUED.pop(0)
            _STARTED[job.path] = job
        try:
            job.work()
        finally:
            job.done.set()
            with _LOCK:
                _STARTED.pop(job.path, None)


def _executable_path(k: str, folder: Path | None) -> Path | None:
    """Where the executable of ``k`` is kept in ``folder`` (None: the disk cache's), or None
    with the disk cache off."""
    folder = _folder() if folder is None else folder
    return None if folder is None else folder / f"{k}{_SUFFIXES[EXECUTABLE]}"


def _wait(path: Path | None) -> None:
    """Before compiling or reading the executable at ``path``: a compilation of it queued is
    dropped (the caller compiles it now), one under way is waited for (its entry is read back)."""
    if path is None:
        return
    with _LOCK:
        _QUEUED[:] = [job for job in _QUEUED if job.path != path]
        started = _STARTED.get(path)
    if started is not None:
        started.done.wait()


def _settle() -> None:
    """Wait until every compilation ahead, queued or under way, has ended."""
    while True:
        with _LOCK:
            jobs = [*_STARTED.values(), *_QUEUED]
        if not jobs:
            return
        jobs[0].done.wait()


def _finish() -> None:
    """At exit: drop the compilations not started and wait for the one under way. What the
    process printed is flushed first, and Ctrl-C or SIGTERM during the wait end the process at
    once (the entries' writes are atomic), rather than leave a thread inside XLA while Python
    finalises, which aborts it."""
    with _LOCK:
        _QUEUED.clear()
        worker = _WORKER[0] if _WORKER else None
    if worker is None or not worker.is_alive():
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(ValueError, OSError):  # not the main thread: signals stay as they are
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_DFL)
    worker.join()


_HITS = threading.local()  # persistent compilation cache hits JAX reported in each thread since gradlab began counting
_COUNTING: list[bool] = []


def _xla_cache_hits() -> int:
    """The persistent-cache hits JAX has reported in this thread (it reports each in the thread
    that compiles)."""
    if not _COUNTING:
        from jax import monitoring

        def count(event: str, **_: Any) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                _HITS.count = getattr(_HITS, "count", 0) + 1

        monitoring.register_event_listener(count)
        _COUNTING.append(True)
    return getattr(_HITS, "count", 0)


@contextlib.contextmanager
def _outside_xla_cache():
    """No entry written to XLA's persistent compilation cache by this thread's compilations (the
    ``.xlaexe`` file is the program's cache). JAX's setting is changed for this thread only where
    this jax allows it (a private entry point); elsewhere it is changed for the process, from the
    main thread only (a background compilation may then leave a spare entry in XLA's cache)."""
    try:
        from jax._src import config as jax_config

        setting = jax_config.persistent_cache_min_compile_time_secs
    except (ImportError, AttributeError):  # moved or renamed in this jax
        setting = None
    if setting is not None:
        with setting(float("inf")):
            yield
        return
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    name = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, name)
    jax.config.update(name, float("inf"))
    try:
        yield
    finally:
        jax.config.update(name, before)


class jit:  # noqa: N801 - named for what it replaces
    """``jax.jit(fn, compiler_options=...)`` whose compiled programs outlive the process:
    ``name`` must fix what ``fn`` computes (see the module docstring for the rest of the key).
    Inputs it cannot serve go to the plain jitted ``fn``; both give the same bits.

    ``ahead`` names the compile options of another tier of the same program (``name`` with
    those options): whenever this one is compiled or loaded for new inputs and that tier's
    executable is not at hand, that tier is compiled on a background thread and stored, so a
    later process (or this one's next ``jit`` with those options) finds it."""

    def __init__(self, fn: Callable, name: str, *, compiler_options: Mapping[str, Any],
                 folder: Path | None = None, ahead: Mapping[str, Any] | None = None):
        self.fn, self.name, self.options, self.folder = fn, name, dict(compiler_options), folder
        self.ahead = None if ahead is None else dict(ahead)
        self.plain = jax.jit(fn, compiler_options=self.options)
        self.served: set[str] = set()  # keys of the signatures called so far

    def __call__(self, *args):
        sig = signature(args)
        if sig is None:
            return self.plain(*args)
        k = key(self.name, sig, self.options)
        also = None if self.ahead is None else (key(self.name, sig, self.ahead), self.ahead)
        program = _compiled(self.fn, k, args, self.options, folder=self.folder, ahead=also)
        if program is None:
            return self.plain(*args)
        self.served.add(k)
        return program(*args)

    def stored(self, *args) -> bool:
        """Whether this program's executable for ``args`` is at hand: loaded in this process, or
        in the disk cache (read and checked when called)."""
        sig = signature(args)
        if sig is None:
            return False
        k = key(self.name, sig, self.options)
        if _LOADED.get(k) is not None:
            return True
        path = _executable_path(k, self.folder)
        return path is not None and path.is_file()

    def _cache_size(self) -> int:
        """How many input signatures this program has compiled (as ``jax.jit``'s)."""
        return len(self.served) + self.plain._cache_size()  # type: ignore[attr-defined]  # jit's own count
