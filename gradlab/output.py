"""Output: results as JSON, and files written safely. Every JSON document and every file gradlab
writes goes through this module.

JSON numbers
------------
:func:`jsonable` turns a result (mappings, sequences, numpy arrays and scalars, Python, mpmath
and sympy numbers) into plain JSON types under one policy, and :func:`dumps` writes it:

- a finite float64 value (Python ``float``, numpy floating) is a JSON number, in the shortest
  form that reads back as the same float64;
- NaN, +inf and -inf, of any type, are ``null``: JSON never holds NaN or Infinity;
- a value computed in more precision than float64 (mpmath ``mpf``, a sympy number, ``Fraction``,
  ``Decimal``) is a JSON number where float64 holds it to full precision (zero, or inside
  float64's normal range), and otherwise (beyond float64's range, or below its smallest normal
  number) a decimal string with 17 significant digits, e.g. ``"1.2e+500"``;
- integers are exact JSON integers; booleans, strings and ``None`` are themselves; mapping keys
  become strings.

Anything else is a programming error (``TypeError``), never silently turned into a string.
A command that must refuse a non-finite result (a diverged simulation) checks it before output.

Files
-----
:func:`write_atomic` (and :func:`atomic_path`, for writers that need a path) put a file in place
atomically: the bytes go to a temporary file in the target's folder that this process created
under a unique name (``.gradlab-tmp-RANDOM-NAME.tmp``; on Linux an anonymous ``O_TMPFILE`` that
gets that name only once complete), which then replaces the target in one rename. Readers see the
old file or the new one, never a part. On an error or an interruption (Ctrl-C, and SIGTERM where
the entry point uses :func:`gradlab.processes.stop_on_signals`) the temporary file is removed.
gradlab removes no file that this process did not create.

:class:`Folder` writes named files into an output folder, with these rules:

- Refused as a folder: an empty path, the current directory, the home directory, a filesystem
  root, a project root (it holds ``.git``, ``pyproject.toml`` or ``setup.py``), a path that is
  not a folder.
- A folder of its own (``gradlab figures --out``, ``gradlab audit --out``, ``gradlab reproduce
  --figures``) must hold only files gradlab wrote there (and sub-folders that are themselves
  gradlab output folders); a shared folder (``docs/`` for the generated docs) may hold other
  files, which gradlab never touches.
- A manifest, ``.gradlab-manifest.json``, records the SHA-256 of every file gradlab wrote into
  the folder. An existing file is overwritten only when its current content has the hash the
  manifest recorded for it. A manifest gradlab did not write (one listing ``README.md``, say)
  therefore unlocks nothing, and a file edited since gradlab wrote it is kept. The hash is
  recorded before the file is replaced, so a run killed in between leaves a folder that the
  next run accepts.
- Each write holds an exclusive lock on the folder (``flock``), re-reading the manifest inside
  it, so concurrent runs into one folder take turns and lose no manifest entries; a run that
  cannot get the lock within :data:`LOCK_WAIT` seconds stops with a clear error.

What this cannot protect: a run killed by SIGKILL between naming its temporary file and the
rename (microseconds; or, without ``O_TMPFILE``, while the file is being written) leaves a
``.gradlab-tmp-*.tmp`` file, which later runs ignore and never remove. ``flock`` is advisory,
and is absent on Windows (no lock is taken there).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import re
import secrets
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from gradlab.errors import GradlabError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["jsonable", "number", "dumps", "write_atomic", "atomic_path", "Folder", "write_files", "adopt",
           "MANIFEST", "LOCK_WAIT"]

MANIFEST = ".gradlab-manifest.json"
LOCK_WAIT = 120.0  # seconds a write waits for another gradlab run to release the folder
_TMP_PREFIX = ".gradlab-tmp-"
_TMP_NAME = re.compile(r"\.gradlab-tmp-[0-9a-f]{16}-.*\.tmp\Z", re.DOTALL)
_PROJECT_MARKERS = (".git", "pyproject.toml", "setup.py")
_FORMAT = 2  # manifest format: {"files": {name: sha256}, "pending": {name: sha256}}


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def number(x: Any) -> float | int | bool | str | None:
    """One number under the module's JSON policy: a float, an int, a decimal string or None."""
    if isinstance(x, bool) or (type(x).__module__ == "numpy" and type(x).__name__ in ("bool", "bool_")):
        return bool(x)  # numpy's bool is not a number
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, float) or type(x).__module__ == "numpy":
        f = float(x)
        return f if math.isfinite(f) else None
    return _precise(x)


def _precise(x: Any) -> float | int | str | None:
    """A number carried in more precision than float64 (mpmath, sympy, Fraction, Decimal)."""
    import mpmath

    with mpmath.workdps(40):  # keep the digits the value has: no re-rounding to 53 bits first
        try:
            if type(x).__module__.startswith("sympy"):
                x = x.evalf(40)
                if not x.is_finite:  # nan, oo, zoo
                    return None
            value = mpmath.mpf(x.numerator) / x.denominator if isinstance(x, numbers.Rational) else mpmath.mpf(
                str(x) if isinstance(x, Decimal) else x)
        except (TypeError, ValueError, AttributeError):
            raise TypeError(f"cannot write {type(x).__name__} {x!r} as a JSON number") from None
        if not mpmath.isfinite(value):
            return None
        if value == 0:
            return 0.0
        f = float(value)
        if math.isinf(f) or abs(f) < sys.float_info.min:
            return mpmath.nstr(value, 17, min_fixed=1, max_fixed=0)
        return f


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON types under the module's policy (numbers: see :func:`number`)."""
    if x is None or isinstance(x, str | bool):
        return x
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if type(x).__module__ == "numpy":
        import numpy as np

        if isinstance(x, np.ndarray):
            return jsonable(x.tolist())
        if isinstance(x, np.str_):
            return str(x)
    return number(x)


def dumps(x: Any, *, indent: int | None = None) -> str:
    """``x`` as a JSON document (see :func:`jsonable`); never NaN or Infinity."""
    return json.dumps(jsonable(x), indent=indent, allow_nan=False)


# --------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------


def _temporary_name(path: Path) -> Path:
    # keep the name within the 255 bytes a file name may have
    return path.with_name(f"{_TMP_PREFIX}{secrets.token_hex(8)}-{path.name[:180]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` to write into; when the block ends normally it
    replaces ``path`` in one rename, and otherwise it is removed. The name is created here
    (``O_EXCL``), so no other file is ever taken for it."""
    target = Path(path)
    while True:
        tmp = _temporary_name(target)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            break
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Put ``data`` at ``path`` atomically (see the module docstring); returns the path."""
    target = Path(path)
    if not _write_anonymous(target, data):
        with atomic_path(target) as tmp, open(tmp, "wb") as f:
            f.write(data)
    return target


def _write_anonymous(target: Path, data: bytes) -> bool:
    """The O_TMPFILE route (Linux): the bytes go to a file without a name, which is linked under
    a fresh temporary name once complete and renamed over the target at once. False where the
    platform or the filesystem does not support it."""
    o_tmpfile = getattr(os, "O_TMPFILE", None)
    if o_tmpfile is None:
        return False
    try:
        fd = os.open(target.parent, o_tmpfile | os.O_WRONLY, 0o644)
    except OSError:
        return False
    tmp = None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        root = os.open("/", os.O_RDONLY)
        try:
            for _ in range(8):
                tmp = _temporary_name(target)
                try:
                    # linkat(AT_SYMLINK_FOLLOW) names the anonymous file; src_dir_fd makes Python use linkat
                    os.link(f"/proc/self/fd/{fd}", tmp, src_dir_fd=root, follow_symlinks=True)
                    break
                except FileExistsError:  # pragma: no cover - 64 random bits
                    tmp = None
        finally:
            os.close(root)
        if tmp is None:  # pragma: no cover
            return False
        os.replace(tmp, target)
        tmp = None
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Output folders
# --------------------------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: Path) -> str | None:
    """The SHA-256 of a regular file's content; None for anything else (a link, a folder)."""
    if path.is_symlink() or not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..", MANIFEST) and "/" not in name and "\\" not in name \
        and "\0" not in name and not name.startswith(_TMP_PREFIX)


class Folder:
    """A folder gradlab writes into, under the rules in the module docstring.

    ``Folder(out)`` checks the path, creates the folder and (``shared=False``) refuses it if it
    holds anything gradlab did not write; :meth:`write` then adds or replaces files. ``flag`` names
    the option the folder came from, for messages. ``create=False`` makes the same checks and
    creates nothing (a command's arguments are checked so, before any slow work)."""

    def __init__(self, out: str | os.PathLike, *, shared: bool = False, flag: str = "--out",
                 lock_wait: float = LOCK_WAIT, create: bool = True):
        self.flag = flag
        self.shared = shared
        self.lock_wait = lock_wait
        self.path = self._checked(out)
        if not create:  # the checks alone, for arguments validated before any work: nothing is made
            if self.path.is_dir() and not shared:
                self._refuse_foreign(self._read_manifest())
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if not shared:
            with self._locked():
                self._refuse_foreign(self._read_manifest())

    # -- the checks --------------------------------------------------------------------------

    def _checked(self, out: str | os.PathLike) -> Path:
        text = os.fspath(out)
        shown = f"{self.flag} {text!r}"
        if not str(text).strip():
            raise GradlabError(f"{self.flag} is empty; name a folder of its own, e.g. {self.flag} figures")
        folder = Path(text).expanduser()
        resolved = folder.resolve()
        if resolved == Path.cwd().resolve():
            raise GradlabError(f"{shown} is the current directory; name a folder of its own, e.g. {self.flag} figures")
        if resolved == Path.home().resolve() or resolved == Path(resolved.anchor):
            raise GradlabError(f"{shown} is the home directory or a filesystem root; name a folder of its own")
        if folder.exists() and not folder.is_dir():
            raise GradlabError(f"{shown} exists and is not a folder")
        markers = [m for m in _PROJECT_MARKERS if (folder / m).exists()]
        if markers:
            raise GradlabError(f"{shown} is a project root (it holds {', '.join(markers)}); "
                               "gradlab writes only into a folder of its own")
        return folder

    def _read_manifest(self) -> dict[str, dict[str, str]]:
        path = self.path / MANIFEST
        if not path.exists() and not path.is_symlink():
            return {"files": {}, "pending": {}}
        where = f"{path} is not a gradlab manifest"
        if path.is_symlink() or not path.is_file():
            raise GradlabError(f"{where} (not a plain file); remove it or choose another {self.flag}")
        try:
            doc = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise GradlabError(f"{where} ({exc}); remove it or choose another {self.flag}") from None
        if isinstance(doc, dict) and isinstance(doc.get("files"), list):
            raise GradlabError(f"{path} was written by an earlier gradlab and records no content hashes, so it "
                               f"vouches for no file; empty the folder or choose another {self.flag}")
        tables: dict[str, dict[str, str]] = {}
        for key in ("files", "pending"):
            table = doc.get(key, {}) if isinstance(doc, dict) else None
            if not isinstance(table, dict) or not all(
                    isinstance(k, str) and _plain_name(k) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
                    for k, v in table.items()):
                raise GradlabError(f"{where} (its '{key}' must map file names to SHA-256 hashes); remove it or "
                                   f"choose another {self.flag}")
            tables[key] = table
        return tables

    def _save_manifest(self, manifest: dict[str, dict[str, str]]) -> None:
        self._save_manifest_at(self.path, manifest)

    @staticmethod
    def _save_manifest_at(folder: Path, manifest: Mapping[str, Mapping[str, str]]) -> None:
        doc = {"written_by": "gradlab", "format": _FORMAT,
               "note": "the files gradlab wrote here and their SHA-256; gradlab overwrites a file only while it "
                       "still has the recorded content. Do not edit.",
               "files": dict(sorted(manifest["files"].items()))}
        if manifest["pending"]:
            doc["pending"] = dict(sorted(manifest["pending"].items()))
        write_atomic(folder / MANIFEST, (json.dumps(doc, indent=1) + "\n").encode("utf-8"))

    @staticmethod
    def _trusted(path: Path, manifest: dict[str, dict[str, str]]) -> bool:
        recorded = {manifest["files"].get(path.name), manifest["pending"].get(path.name)} - {None}
        return bool(recorded) and _file_digest(path) in recorded

    def _refuse_foreign(self, manifest: dict[str, dict[str, str]]) -> None:
        foreign = []
        for p in sorted(self.path.iterdir()):
            if p.name == MANIFEST or _TMP_NAME.match(p.name):
                continue
            if p.is_dir() and not p.is_symlink() and (p / MANIFEST).is_file():
                continue  # a gradlab output folder inside this one (e.g. figures/reproductions)
            if not self._trusted(p, manifest):
                foreign.append(p.name)
        if foreign:
            listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise GradlabError(f"{self.flag} {os.fspath(self.path)!r} holds files gradlab did not write or that "
                               f"changed since ({listed}); gradlab never overwrites or mixes with them: choose an "
                               "empty or new folder")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            deadline = time.monotonic() + self.lock_wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise GradlabError(
                            f"another gradlab run has been writing into {os.fspath(self.path)!r} for "
                            f"{self.lock_wait:g} s; wait for it to finish or choose another {self.flag}") from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- writing -----------------------------------------------------------------------------

    def write(self, files: Mapping[str, bytes]) -> list[Path]:
        """Add or replace ``{file name: bytes}`` in the folder, atomically each, in one turn of
        the lock. An existing file is replaced only if the manifest vouches for its content."""
        for name in files:
            if not isinstance(name, str) or not _plain_name(name):
                raise GradlabError(f"cannot write {name!r}: a plain file name is needed")
        if not files:
            return []
        digests = {name: _digest(blob) for name, blob in files.items()}
        with self._locked():
            manifest = self._read_manifest()
            self._refuse_untrusted(files, manifest)
            manifest["pending"].update(digests)
            self._save_manifest(manifest)  # before the files: a run killed now leaves them trusted
            written = [write_atomic(self.path / name, blob) for name, blob in files.items()]
            manifest["files"].update(digests)
            for name in files:
                manifest["pending"].pop(name)
            self._save_manifest(manifest)
        return written

    def check(self, names: Iterable[str]) -> None:
        """Refuse now, before any work, if a file ``names`` lists could not be written later."""
        for name in names:
            if not _plain_name(name):
                raise GradlabError(f"cannot write {name!r}: a plain file name is needed")
        with self._locked():
            self._refuse_untrusted(names, self._read_manifest())

    def _refuse_untrusted(self, names: Iterable[str], manifest: dict[str, dict[str, str]]) -> None:
        for name in names:
            path = self.path / name
            if (path.exists() or path.is_symlink()) and not self._trusted(path, manifest):
                raise GradlabError(f"{path} exists and gradlab did not write it (or it changed since); it is "
                                   f"not overwritten: move it away or choose another {self.flag}")

    def files(self) -> dict[str, str]:
        """``{file name: SHA-256}`` of the files the manifest vouches for (whose content matches)."""
        with self._locked():
            manifest = self._read_manifest()
        return {name: digest for name, digest in manifest["files"].items() if self._trusted(self.path / name, manifest)}


def write_files(out: str | os.PathLike, files: Mapping[str, bytes], *, shared: bool = False,
                flag: str = "--out") -> list[Path]:
    """Write ``{file name: bytes}`` into the folder ``out`` under :class:`Folder`'s rules.

    Args:
        out: the folder (created if missing).
        files: file name (no folders) to its content.
        shared: allow files gradlab did not write beside these (a folder such as ``docs/``);
            otherwise such a folder is refused.
        flag: the option the folder came from, named in messages.

    Returns:
        The paths written.
    """
    return Folder(out, shared=shared, flag=flag).write(files)


def adopt(out: str | os.PathLike, names: Iterable[str]) -> None:
    """Record the files ``names`` in ``out`` as gradlab's, with their content's hash as it is now.

    For a maintainer who knows the files are gradlab's output although this manifest did not
    record them: after version control merged regenerated files, or to take over a folder written
    by a gradlab whose manifest held no hashes. gradlab itself never calls it."""
    folder = Path(out)
    names = list(names)
    for name in names:
        if not _plain_name(name) or _file_digest(folder / name) is None:
            raise GradlabError(f"cannot adopt {name!r}: a plain, existing file in {os.fspath(folder)!r} is needed")
    path = folder / MANIFEST
    old = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    files = old.get("files") if isinstance(old, dict) else None
    kept = {k: v for k, v in files.items() if isinstance(k, str) and _plain_name(k) and isinstance(v, str)} \
        if isinstance(files, dict) else {}
    kept.update({name: _file_digest(folder / name) or "" for name in names})
    Folder._save_manifest_at(folder, {"files": kept, "pending": {}})
