"""A small on-disk cache for derived sympy expressions, in a format that cannot execute.

It serves what the shipped answers table does not hold: a registered loss's derivations come
from that table first (see :mod:`gradlab.symbolic`), so this cache holds users' formulas,
combinations of losses, and any loss while the table is stale. The table stores its trees in
this module's data-only format (:func:`encode`, :func:`decode`).

One JSON file per entry, named by a SHA-256 key that covers everything the result depends on:
the expression being differentiated (its ``srepr``), the view, the variable, and the versions
of sympy and of gradlab's derivation code. A changed loss definition therefore has a different
key and can never be served a stale result.

Safety, in three layers:

1. **Data only.** A file holds a JSON tree of a whitelisted vocabulary: canonical symbol names,
   integers, rationals, floats, a few named constants and the functions gradlab's losses use
   (``Add``, ``Mul``, ``Pow``, ``exp``, ``log``, ``sigmoid``, ...). Decoding builds sympy objects
   from that vocabulary directly; no text is ever passed to ``eval``, ``sympify`` or ``pickle``.
   Anything else (a pickle, a string of code, an unknown function) is a miss.
2. **Only folders you own.** The folder must belong to the current user and must not be
   writable by group or others (it is created with mode 0700), and its path must not pass
   through a symbolic link owned by anyone but you or root; each file must be a regular file
   with the same owner. Otherwise the cache is off, with one :class:`CacheWarning` that says why.
   ``cache_dir()`` applies the same rule for the XLA compilation cache kept in ``xla/`` and the
   serialised training programs in ``programs/`` (``gradlab.experiments._export``).
3. **Checked on use.** The caller checks every loaded expression numerically against the
   loss's own definition (see ``gradlab.symbolic._holds_at_spread_points``): at the two
   corners of the variables' whole domains (every variable at its low end, then at its high
   end: log-probs at -1e3 and 0, lengths at 1e-3 and 1e4, each hyperparameter at both ends of
   its range) and at fresh random points from the operating system's random source, spread
   over orders of magnitude. Gradients are compared with the exact forward-mode derivative of
   the loss along a random direction; a view with the canonical expression at the substituted
   values. Every value carries an error bound (``gradlab._mpeval``), so an entry cannot hide
   behind a cancellation: where it cannot be resolved at a face, it is refused.

   What this guarantees: an entry that is wrong everywhere outside some box (and right inside)
   is never served, because a box that misses any piece of the domain misses a corner; an
   entry wrong on a region is refused with probability 1 - (1 - f)^n for a region holding a
   share f of the sampling measure. What it cannot: an entry wrong only on a narrow region away
   from every face (a bump), by less than 1e-12 relative, or only beyond |x| = 1e3, can pass.

Writes go through :func:`gradlab.output.write_atomic` (a temporary file in the same folder moved
into place in one rename), so concurrent writers never expose a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from pathlib import Path
from typing import Any

__all__ = ["CacheWarning", "cache_dir", "xla_cache_dir", "subfolder", "folder_problem", "configured_problem",
           "make_key", "load", "store", "encode", "decode", "NotEncodable", "read_own_file"]

_FORMAT = "gradlab-derivation-cache/2"
_SUFFIX = ".json"
_MAX_FILE_BYTES = 4_000_000  # the largest derived gradient is about 10 kB of JSON
_MAX_INT_DIGITS = 1000
# A derived gradient has small integer powers (squares, the reciprocal of a sum) and a few
# hundred nodes: a power beyond this, or a tree past the ``expr_nodes`` budget, is a miss before
# anything builds it (a planted (x + 2)^(10^999) could otherwise stall an exact evaluation).
_MAX_EXPONENT = 1000


class CacheWarning(UserWarning):
    """The disk cache is off because its folder is not safe to use."""


def _configured() -> Path | None:
    """``$GRADLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradlab``, else ``~/.cache/gradlab``;
    ``GRADLAB_CACHE_DIR=off`` (or ``0``, ``none``, empty) disables the disk cache."""
    env = os.environ.get("GRADLAB_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in {"", "off", "0", "none"} else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradlab"


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` is not safe for a cache, or None when it is: it must be a folder, owned by
    the current user, and not writable by group or others."""
    try:
        st = os.stat(folder)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a folder"
    link = _foreign_link(folder)
    if link is not None:
        return link
    if hasattr(os, "getuid"):
        if st.st_uid != os.getuid():
            return f"it belongs to user id {st.st_uid}, not to you (user id {os.getuid()})"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return (f"other users can write to it (mode {stat.S_IMODE(st.st_mode):o}); "
                    f"run 'chmod go-w {folder}' or choose another folder")
    return None


def _foreign_link(folder: Path) -> str | None:
    """Why a path is unsafe because it passes through a symbolic link that neither you nor the
    system (root) owns: its owner could point it elsewhere at any time. None otherwise."""
    if not hasattr(os, "getuid"):
        return None
    path = Path(os.path.abspath(folder))
    for part in [*reversed(path.parents), path]:
        try:
            st = os.lstat(part)
        except OSError:
            return None  # reported as missing by the caller
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (os.getuid(), 0):
            return (f"it passes through the symbolic link {part}, which belongs to user id {st.st_uid}, "
                    f"not to you (user id {os.getuid()})")
    return None


_WARNED: set[str] = set()


def _problem_of(folder: Path) -> str | None:
    """Why ``folder`` cannot hold the cache, after creating it (mode 0700) if it is absent."""
    try:
        if not folder.exists():
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        pass  # reported by folder_problem below
    return folder_problem(folder)


def configured_problem() -> str | None:
    """Why the folder the user named in ``$GRADLAB_CACHE_DIR`` cannot be used, or None (unset,
    'off', or safe). The command line refuses such a folder (exit 2) instead of running with the
    cache off: the user chose it, so a silent fallback would hide their mistake. The default
    folder keeps the warning, and so does the Python API."""
    env = os.environ.get("GRADLAB_CACHE_DIR")
    folder = _configured()
    if env is None or folder is None:
        return None
    problem = _problem_of(folder)
    return None if problem is None else (
        f"GRADLAB_CACHE_DIR={env} cannot hold gradlab's cache, because {problem}. "
        "Set it to a folder only you can write, or to 'off'")


def _safe_folder(folder: Path) -> Path | None:
    problem = _problem_of(folder)
    if problem is None:
        return folder
    if str(folder) not in _WARNED:
        _WARNED.add(str(folder))
        warnings.warn(
            f"gradlab's disk cache is off: the cache folder {folder} is not safe to use, because "
            f"{problem}. Set GRADLAB_CACHE_DIR to a folder only you can write, or to 'off'.",
            CacheWarning,
            stacklevel=3,
        )
    return None


def cache_dir() -> Path | None:
    """The cache folder, created (mode 0700) if absent, or None when the cache is off or the
    folder is unsafe (not yours, or writable by others; a :class:`CacheWarning` says which).

    Other caches kept beside the derivation cache (the XLA compilation cache) must use this
    function, or :func:`xla_cache_dir`, so that they follow the same rule.
    """
    folder = _configured()
    return None if folder is None else _safe_folder(folder)


def subfolder(name: str) -> Path | None:
    """``<cache_dir>/name``, under the same ownership rule as :func:`cache_dir`, or None when
    the cache is off or that folder is unsafe."""
    folder = cache_dir()
    return None if folder is None else _safe_folder(folder / name)


def xla_cache_dir() -> Path | None:
    """The folder for JAX's persistent compilation cache (``<cache_dir>/xla``), under the same
    ownership rule as :func:`cache_dir`, or None when that cache must stay off."""
    return subfolder("xla")


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


# --------------------------------------------------------------------------------------------
# The data-only format
# --------------------------------------------------------------------------------------------


class NotEncodable(Exception):
    """An expression outside the data-only vocabulary."""


def _vocabulary() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(functions, constants, symbols) by name: the only things a cache file can name."""
    import sympy

    from gradlab.symbols import HYPERPARAMETERS, SPECIAL_FUNCTIONS, SYMBOLS

    functions: dict[str, Any] = {
        "Add": sympy.Add, "Mul": sympy.Mul, "Pow": sympy.Pow, "exp": sympy.exp, "log": sympy.log,
        "Abs": sympy.Abs, "Max": sympy.Max, "Min": sympy.Min, "Heaviside": sympy.Heaviside,
        "DiracDelta": sympy.DiracDelta, "sign": sympy.sign, "tanh": sympy.tanh,
        **dict(SPECIAL_FUNCTIONS),
    }
    constants = {"pi": sympy.pi, "E": sympy.E, "oo": sympy.oo, "-oo": sympy.S.NegativeInfinity}
    symbols = {k: v.symbol for k, v in {**SYMBOLS, **HYPERPARAMETERS}.items()}
    return functions, constants, symbols


def encode(expr: Any) -> Any:
    """A JSON-compatible tree for ``expr``; raises ``NotEncodable`` outside the vocabulary."""
    functions, constants, symbols = _vocabulary()
    names = {v: k for k, v in constants.items()}

    def enc(e: Any) -> Any:
        if e.is_Symbol:
            if symbols.get(e.name) != e:
                raise NotEncodable(e)
            return ["S", e.name]
        if e.is_Integer:
            return ["I", str(int(e))]
        if e.is_Rational:
            return ["Q", str(int(e.p)), str(int(e.q))]
        if e.is_Float:
            sign, man, exp_, bc = e._mpf_
            return ["F", int(sign), hex(int(man)), int(exp_), int(bc), int(e._prec)]
        if e in names:
            return ["C", names[e]]
        name = type(e).__name__
        if e.is_Function or e.is_Add or e.is_Mul or e.is_Pow:
            if functions.get(name) is not type(e) and functions.get(name) is not e.func:
                raise NotEncodable(e)
            return ["f", name, [enc(a) for a in e.args]]
        raise NotEncodable(e)

    return enc(expr)


def decode(tree: Any) -> Any:
    """The sympy expression for a tree made by :func:`encode`; ValueError for anything else."""
    import sympy

    from gradlab import budgets

    functions, constants, symbols = _vocabulary()
    limit = int(budgets.get("expr_nodes"))
    if limit > 0 and _tree_nodes(tree, limit) > limit:
        raise ValueError(f"not a cache tree: more than {limit} nodes (the 'expr_nodes' budget)")

    def dec(t: Any) -> Any:
        if not isinstance(t, list) or not t or not isinstance(t[0], str):
            raise ValueError("malformed node")
        tag, rest = t[0], t[1:]
        if tag == "S" and len(rest) == 1 and rest[0] in symbols:
            return symbols[rest[0]]
        if tag == "I" and len(rest) == 1 and _digits(rest[0]):
            return sympy.Integer(int(rest[0]))
        if tag == "Q" and len(rest) == 2 and all(map(_digits, rest)) and int(rest[1]) > 0:
            return sympy.Rational(int(rest[0]), int(rest[1]))
        if tag == "F" and len(rest) == 5 and all(isinstance(x, int) and not isinstance(x, bool) for x in
                                                  (rest[0], rest[2], rest[3], rest[4])):
            sign, man, exp_, bc, prec = rest
            if sign not in (0, 1) or not isinstance(man, str) or not 0 < prec <= 10_000:
                raise ValueError("malformed float")
            if abs(exp_) > 10**6 or not 0 <= bc <= 10_000:
                raise ValueError("float out of range")
            m = int(man, 16)
            if m.bit_length() != bc:
                raise ValueError("malformed float")
            return sympy.Float._new((sign, m, exp_, bc), prec)
        if tag == "C" and len(rest) == 1 and rest[0] in constants:
            return constants[rest[0]]
        if tag == "f" and len(rest) == 2 and rest[0] in functions and isinstance(rest[1], list):
            # unevaluated: the stored tree is already in canonical form (store() checks that it
            # decodes to an equal expression), and evaluating Max/Min again costs seconds
            args = [dec(a) for a in rest[1]]
            if rest[0] == "Pow" and len(args) == 2 and _huge_power(args[1]):
                raise ValueError(f"a power beyond {_MAX_EXPONENT}")
            return functions[rest[0]](*args, evaluate=False)
        raise ValueError(f"unknown node {tag!r}")

    try:
        return dec(tree)
    except (RecursionError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"not a cache tree: {exc}") from None


def _tree_nodes(tree: Any, stop: int) -> int:
    """Nodes of a JSON tree, counted iteratively, stopping early past ``stop``."""
    count, stack = 0, [tree]
    while stack and count <= stop:
        t = stack.pop()
        count += 1
        if isinstance(t, list) and len(t) == 3 and t[0] == "f" and isinstance(t[2], list):
            stack.extend(t[2])
    return count


def _huge_power(exponent: Any) -> bool:
    """Whether a decoded exponent is a number of magnitude beyond ``_MAX_EXPONENT`` (or a
    rational whose numerator or denominator is)."""
    if exponent.is_Rational:
        return abs(exponent.p) > _MAX_EXPONENT or exponent.q > _MAX_EXPONENT
    if exponent.is_Float:
        return not abs(exponent) <= _MAX_EXPONENT
    return False


def _digits(text: Any) -> bool:
    if not isinstance(text, str) or not 0 < len(text) <= _MAX_INT_DIGITS:
        return False
    body = text[1:] if text.startswith("-") else text
    return body.isdigit() and body.isascii()


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def read_own_file(path: Path, *, limit: int = _MAX_FILE_BYTES) -> bytes | None:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes, owned by the
    current user, not writable by others and not a symbolic link; None otherwise."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def load(key: str) -> Any | None:
    """The cached expression for ``key``, or None on a miss (absent, unsafe, corrupted, or
    anything outside the data-only vocabulary)."""
    folder = cache_dir()
    if folder is None:
        return None
    blob = read_own_file(folder / f"{key}{_SUFFIX}")
    if blob is None:
        return None
    try:
        doc = json.loads(blob.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get("key") != key:
        return None
    try:
        return decode(doc.get("expr"))
    except ValueError:
        return None


def store(key: str, value: Any) -> bool:
    """Write ``value`` under ``key`` atomically; True if written. An expression outside the
    vocabulary, or one that does not survive the round trip exactly, is not cached."""
    folder = cache_dir()
    if folder is None:
        return False
    try:
        tree = encode(value)
        if decode(tree) != value:
            return False
        text = json.dumps({"format": _FORMAT, "key": key, "expr": tree}, separators=(",", ":"))
    except (NotEncodable, ValueError, RecursionError):
        return False
    from gradlab.output import write_atomic

    try:
        write_atomic(folder / f"{key}{_SUFFIX}", text.encode("utf-8"))
    except OSError:
        return False
    return True
