"""The shipped answers table, ``answers.jsonl`` beside this module: its format, whether it is
current, and reading it one line at a time. :mod:`gradlab.answers` says what it holds and
answers the commands from it; :mod:`gradlab.symbolic` reads a registered loss's derivations from
it (:func:`derivation`). Both import this module, which imports neither of them (nor sympy, nor
JAX).

The table is used only while it is current. It records the SHA-256 of every source file its
answers depend on: the gradlab modules that define and derive the losses (the import closure of
:data:`ROOTS`, computed by the generator), and sympy's release file (the printed forms depend on
sympy's version). When any of them differs from what is installed, nothing in the table is
served. The head records the SHA-256 of the lines after it as well: a table edited by hand is
not served.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from gradlab import caches

__all__ = ["TABLE", "FORMAT", "ROOTS", "FAMILY_ROOTS", "source_files", "fingerprint", "is_current", "encode",
           "decode", "line", "head", "table", "derivation"]

TABLE = Path(__file__).with_name("answers.jsonl")
FORMAT = "gradlab-answers/4"
_PACKAGE = Path(__file__).resolve().parent
# the derivation's roots: the table depends on these modules and on everything they import
ROOTS = ("gradlab.losses", "gradlab.symbolic", "gradlab.printing", "gradlab.symbols", "gradlab.answers")
# the families' facts depend on these
FAMILY_ROOTS = ("gradlab.policies",)


# --------------------------------------------------------------------------------------------
# Freshness: the files the answers depend on, by content
# --------------------------------------------------------------------------------------------


def _sympy_release() -> Path | None:
    spec = importlib.util.find_spec("sympy")  # finds the package without importing it
    locations = spec.submodule_search_locations if spec is not None else None
    return Path(next(iter(locations))) / "release.py" if locations else None


def _resolve(name: str) -> Path | None:
    """The file of the gradlab module ``name``, or None where it is not one."""
    parts = name.split(".")
    if parts[0] != "gradlab":
        return None
    base = _PACKAGE.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def source_files(roots: tuple[str, ...] = ROOTS) -> dict[str, Path]:
    """Every file the table's answers depend on, by its key in the table: the gradlab modules
    that ``roots`` import, directly or through others (at module level or inside a function:
    a deferred import is still a dependency), read from the source without importing anything;
    and ``sympy/release.py``."""
    import ast

    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        path = _resolve(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package
                    for _ in range(node.level - 1):
                        up = up.rpartition(".")[0]
                    base = f"{up}.{base}" if base else up
                # ``from gradlab import caches`` names the module gradlab.caches, not the package
                todo += [f"{base}.{a.name}" if _resolve(f"{base}.{a.name}") else base for a in node.names]
    out = {f"gradlab/{path.relative_to(_PACKAGE).as_posix()}": path for path in seen.values()}
    release = _sympy_release()
    if release is not None:
        out["sympy/release.py"] = release
    return dict(sorted(out.items()))


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def fingerprint(files: dict[str, Path] | None = None) -> dict[str, str | None]:
    """The SHA-256 of each file in :func:`source_files` (None for one that cannot be read)."""
    return {key: _digest(path) for key, path in (source_files() if files is None else files).items()}


# The file is JSON Lines: the head (format, sources, views, the list, the names, the families,
# and the SHA-256 of the rest) on the first line, then one line per loss,
# {"loss": NAME, "show": ..., "grad": ...}, then one per loss for eval, {"eval": NAME, "entry": ...},
# then one per loss for gradlab.symbolic, {"derivation": NAME, "entry": ...}.
# A command parses the head and at most the one line it needs.


def _loss_line(name: str, entry: dict[str, Any]) -> str:
    return (f'{{"loss": {json.dumps(name)}, "show": {json.dumps(entry["show"], sort_keys=True, ensure_ascii=False)}, '
            f'"grad": {json.dumps(entry["grad"], sort_keys=True, ensure_ascii=False)}}}')


def _entry_line(kind: str, name: str, entry: dict[str, Any]) -> str:
    body = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    return f'{{{json.dumps(kind)}: {json.dumps(name)}, "entry": {body}}}'


def _body_digest(lines: list[str]) -> str:
    return hashlib.sha256("".join(line + "\n" for line in lines).encode("utf-8")).hexdigest()


_ENTRIES = ("eval", "derivation")  # the kinds of {kind: NAME, "entry": ...} lines, in the file's order


def encode(doc: dict[str, Any]) -> str:
    """The file's text for a table made by :func:`derive_table`."""
    body = [_loss_line(name, {"show": doc["show"][name], "grad": doc["grad"][name]}) for name in doc["show"]]
    body += [_entry_line(kind, name, entry) for kind in _ENTRIES for name, entry in doc[kind].items()]
    head = {k: v for k, v in doc.items() if k not in ("show", "grad", *_ENTRIES)} | {"body": _body_digest(body)}
    return "\n".join([json.dumps(head, sort_keys=True, ensure_ascii=False), *body]) + "\n"


def decode(text: str) -> dict[str, Any]:
    """The whole table from the file's text (the inverse of :func:`encode`)."""
    first, *rest = text.splitlines()
    doc = {k: v for k, v in json.loads(first).items() if k != "body"}
    entries = [json.loads(line) for line in rest]
    losses = [e for e in entries if "loss" in e]
    return doc | {"show": {e["loss"]: e["show"] for e in losses}, "grad": {e["loss"]: e["grad"] for e in losses}} | {
        kind: {e[kind]: e["entry"] for e in entries if kind in e} for kind in _ENTRIES}


@caches.memo(maxsize=128)
def line(path: Path, kind: str, name: str) -> dict[str, Any] | None:
    """The line ``{kind: name, ...}`` of the table at ``path``."""
    prefix = f'{{{json.dumps(kind)}: {json.dumps(name)}, '.encode()
    try:
        with open(path, "rb") as fh:  # bytes: only the line wanted is decoded
            for line in fh:
                if line.startswith(prefix):
                    return json.loads(line.decode("utf-8"))
    except (OSError, ValueError):
        return None
    return None


@caches.memo(maxsize=4)
def head(path: Path) -> dict[str, Any] | None:
    """The head of the table at ``path`` when the file is whole: the format is this module's,
    and the lines after the head are those it was written with."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.loads(fh.readline())
            body = fh.read()
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("sources"), dict):
        return None
    if doc.get("body") != hashlib.sha256(body.encode("utf-8")).hexdigest():
        return None
    return doc


def is_current(recorded: Any) -> bool:
    """Whether every file in ``recorded`` (the ``sources`` of a generated table: a :func:`fingerprint`
    taken when it was written) has the same SHA-256 now."""
    if not isinstance(recorded, dict):
        return False
    files: dict[str, Path] = {}
    for key in recorded:
        if key == "sympy/release.py":
            found = _sympy_release()
        else:
            found = _PACKAGE.joinpath(*key.split("/")[1:]) if key.startswith("gradlab/") else None
        if found is None:
            return False
        files[key] = found
    return fingerprint(files) == recorded


@caches.memo(maxsize=4)
def table(path: Path = TABLE) -> dict[str, Any] | None:
    """The head of the table at ``path`` (the shipped one by default), or None when it is absent,
    malformed, edited, or not current: a file it depends on differs from the one it was generated
    from."""
    doc = head(path)
    return doc if doc is not None and is_current(doc["sources"]) else None


def derivation(name: str, path: Path = TABLE) -> dict[str, Any] | None:
    """The derivations of the registered loss ``name`` (its canonical name) for
    :mod:`gradlab.symbolic`, by view: ``{"expr": [key, tree], "partials": {variable: [key,
    tree]}}`` (made by :func:`gradlab.symbolic.shipped_entry`, which says what the keys are),
    from the table at ``path`` while it is current; None otherwise."""
    if table(path) is None:
        return None
    found = line(path, "derivation", name)
    return found.get("entry") if isinstance(found, dict) else None
