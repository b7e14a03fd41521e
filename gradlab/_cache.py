"""A small on-disk cache for derived sympy expressions.

One file per entry, named by a SHA-256 key that covers everything the result depends on: the
expression being differentiated (its ``srepr``), the view, the variable, the versions of sympy
and of gradlab's derivation code (a hash of the source of ``symbols.py`` and ``symbolic.py``).
A changed loss definition therefore has a different key and can never be served a stale result.

Each file holds a magic header, the SHA-256 of its payload and the pickled payload. A file that
is truncated, corrupted or unreadable fails the digest check and counts as a miss. Writes go to
a temporary file in the same folder and are moved into place with ``os.replace``, which is
atomic, so concurrent writers (which write identical bytes for the same key) never expose a
partial file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

_MAGIC = b"GLC1"
_DIGEST = 32


def cache_dir() -> Path | None:
    """``$GRADLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradlab``, else ``~/.cache/gradlab``.

    ``GRADLAB_CACHE_DIR=off`` disables the disk cache.
    """
    env = os.environ.get("GRADLAB_CACHE_DIR")
    if env is not None:
        return None if env.lower() in {"", "off", "0", "none"} else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradlab"


def _code_fingerprint() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in ("symbols.py", "symbolic.py", "_cache.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


_FINGERPRINT: str | None = None


def make_key(*parts: str) -> str:
    global _FINGERPRINT
    if _FINGERPRINT is None:
        import sympy

        _FINGERPRINT = _code_fingerprint() + sympy.__version__
    digest = hashlib.sha256(_FINGERPRINT.encode())
    for part in parts:
        digest.update(b"\x00" + part.encode())
    return digest.hexdigest()


def load(key: str) -> Any | None:
    """The cached value for ``key``, or None on a miss (absent, truncated or corrupted)."""
    folder = cache_dir()
    if folder is None:
        return None
    try:
        blob = (folder / f"{key}.pkl").read_bytes()
    except OSError:
        return None
    if len(blob) < len(_MAGIC) + _DIGEST or not blob.startswith(_MAGIC):
        return None
    digest, payload = blob[len(_MAGIC) : len(_MAGIC) + _DIGEST], blob[len(_MAGIC) + _DIGEST :]
    if hashlib.sha256(payload).digest() != digest:
        return None
    try:
        # The payload is our own pickle, verified by its digest above.
        return pickle.loads(payload)
    except Exception:  # noqa: BLE001 - any unreadable payload is a miss
        return None


def store(key: str, value: Any) -> None:
    """Write ``value`` under ``key`` atomically. Failures to write are ignored (cache only)."""
    folder = cache_dir()
    if folder is None:
        return
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    blob = _MAGIC + hashlib.sha256(payload).digest() + payload
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, folder / f"{key}.pkl")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass
