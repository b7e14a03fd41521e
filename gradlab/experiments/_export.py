"""Compiled programs kept between processes (private): a program traced and lowered once is
serialised with :mod:`jax.export` into gradlab's disk cache, and a later process deserialises
and calls it instead of tracing and lowering it again (about a second for a training program);
XLA's persistent compilation cache (``gradlab.runtime.configure``) then serves its compilation.

:func:`jit` is a drop-in for ``jax.jit(fn, compiler_options=...)`` given a ``name`` that fixes
what ``fn`` computes (for a training program, the ``repr`` of its ``Static``). It knows nothing of
the program's signature: it calls ``fn(*args)`` for whatever arrays it is given.

**The key.** An entry is found by the SHA-256 of everything the program depends on: the bytes of
every gradlab source file, the versions of Python, jax, jaxlib, numpy, optax, ml_dtypes and
sympy, the backend, the kind and number of devices, the JAX settings that change tracing
(float64 and the rest of :data:`_CONFIG`), the program's ``name``, the tree, shapes and dtypes of
its inputs, and the compile options. Editing any source file or changing any of these parts
gives another key, so a stale program is never found. Inputs that are not plain arrays (a Python
number, whose type JAX weakens, or an array spread over several devices) are not served: the
program is jitted as usual.

**Trust nothing read back.** A compiled program cannot be checked cheaply against its source,
so a file is bound to its key instead: it holds the key it was written for and the SHA-256 and
length of its payload, recorded at write time and checked at every read, and the deserialised
program's input tree and shapes must be the caller's. Any mismatch, a truncated or damaged file,
a file that is not the user's own (``gradlab._cache``'s folder rules) or one jax cannot read is
a miss: the program is traced again and the entry rewritten. This detects accidents (a partial
write, a flipped byte, a file copied under another key); it cannot detect someone who can write
to the user's cache folder and recomputes the hashes, who could equally replace gradlab itself.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gradlab import _cache, caches

__all__ = ["FORMAT", "jit", "key", "load", "signature", "source_digest", "store"]

FORMAT = "gradlab-program/1"
_SUFFIX = ".jaxexport"
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


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


@caches.memo(maxsize=1)
def _platform() -> str:
    """The versions, the backend and the devices (fixed once JAX has started)."""
    devices = jax.devices()
    return json.dumps([sys.version, *(_version(n) for n in _VERSIONED), jax.default_backend(),
                       [d.device_kind for d in devices], len(devices), jax.process_count()])


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


def store(key: str, payload: bytes, *, folder: Path | None = None) -> bool:
    """Write ``payload`` (a serialised program) under ``key`` atomically; True if written."""
    folder = _folder() if folder is None else folder
    if folder is None:
        return False
    head = {"format": FORMAT, "key": key, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    from gradlab.output import write_atomic

    try:
        write_atomic(folder / f"{key}{_SUFFIX}", json.dumps(head, sort_keys=True).encode() + b"\n" + bytes(payload))
    except OSError:
        return False
    return True


def load(key: str, *, folder: Path | None = None) -> bytes | None:
    """The payload stored under ``key``, or None on a miss: absent, not the user's own file,
    written for another key, or not the bytes whose SHA-256 and length were recorded."""
    folder = _folder() if folder is None else folder
    if folder is None:
        return None
    blob = _cache.read_own_file(folder / f"{key}{_SUFFIX}", limit=_MAX_BYTES)
    if blob is None:
        return None
    first, newline, payload = blob.partition(b"\n")
    try:
        head = json.loads(first.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    if (not newline or not isinstance(head, dict) or head.get("format") != FORMAT or head.get("key") != key
            or head.get("size") != len(payload) or head.get("sha256") != hashlib.sha256(payload).hexdigest()):
        return None
    return payload


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
              folder: Path | None = None) -> Callable | None:
    """``fn`` for ``args``, under the disk key ``k``: from the disk cache, or exported into it
    now; None when jax.export cannot serialise it."""
    if k in _LOADED:
        return _LOADED[k]
    from jax import export

    exported = None
    payload = load(k, folder=folder)
    if payload is not None:
        try:
            exported = export.deserialize(bytearray(payload))
        except Exception:  # noqa: BLE001 - whatever a damaged payload makes jax raise, it is a miss
            exported = None
        if exported is not None and not _matches(exported, args):
            exported = None
    if exported is None:
        try:
            exported = export.export(jax.jit(fn))(*_specs(args))
            written = bytes(exported.serialize())
        except Exception:  # noqa: BLE001 - not exportable (flatbuffers absent, an unserialisable tree): jit as usual
            _LOADED[k] = None
            return None
        store(k, written, folder=folder)
    _LOADED[k] = jax.jit(exported.call, compiler_options=dict(options))
    return _LOADED[k]


class jit:  # noqa: N801 - named for what it replaces
    """``jax.jit(fn, compiler_options=...)`` whose compiled programs outlive the process:
    ``name`` must fix what ``fn`` computes (see the module docstring for the rest of the key).
    Inputs it cannot serve go to the plain jitted ``fn``; both give the same bits."""

    def __init__(self, fn: Callable, name: str, *, compiler_options: Mapping[str, Any],
                 folder: Path | None = None):
        self.fn, self.name, self.options, self.folder = fn, name, dict(compiler_options), folder
        self.plain = jax.jit(fn, compiler_options=self.options)
        self.served: set[str] = set()  # keys of the signatures called so far

    def __call__(self, *args):
        sig = signature(args)
        if sig is None:
            return self.plain(*args)
        k = key(self.name, sig, self.options)
        program = _compiled(self.fn, k, args, self.options, folder=self.folder)
        if program is None:
            return self.plain(*args)
        self.served.add(k)
        return program(*args)

    def _cache_size(self) -> int:
        """How many input signatures this program has compiled (as ``jax.jit``'s)."""
        return len(self.served) + self.plain._cache_size()  # type: ignore[attr-defined]  # jit's own count
