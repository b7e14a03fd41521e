"""Reading a preference dataset: JSON Lines, CSV or Parquet, one row per pair, TRL's column names.

The file is read in chunks of ``CHUNK`` rows and only the per-pair numbers are kept (six
float64 columns, 48 bytes a pair): the text of the responses, which is most of a real file,
is turned into lengths chunk by chunk and dropped. So a file much larger than memory can be
audited as long as its numbers fit (about 50 MB per million pairs).

Every row is validated before anything is reported: a log-prob above 0, a NaN or infinite
value, a non-number or a non-positive length raises :class:`AuditInputError` naming the row
(0-based, as ``datasets`` and pandas count) and, for text formats, the line of the file.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradlab import budgets, caches
from gradlab.errors import GradlabError

__all__ = [
    "AuditInputError",
    "CHUNK",
    "COLUMNS",
    "Pairs",
    "read_pairs",
    "pairs_from_arrays",
    "whitespace_length",
]

CHUNK = 65536  # rows per chunk: large enough for numpy, small enough that text chunks stay small


class AuditInputError(GradlabError):
    """A data file that cannot be audited: not a table, missing columns or an invalid value."""


# Canonical variable -> the column names that provide it (TRL's names first). TRL 1.x writes
# ``ref_chosen_logps``/``ref_rejected_logps`` with ``precompute_ref_log_probs=True``; TRL 0.7-0.8
# wrote ``reference_chosen_logps``/``reference_rejected_logps``. ``chosen_logps``/``rejected_logps``
# are the names TRL gives the policy's sums over completion tokens.
COLUMNS: Mapping[str, tuple[str, ...]] = {
    "lp_w": ("chosen_logps", "policy_chosen_logps"),
    "lp_l": ("rejected_logps", "policy_rejected_logps"),
    "ref_w": ("ref_chosen_logps", "reference_chosen_logps"),
    "ref_l": ("ref_rejected_logps", "reference_rejected_logps"),
    "len_w": ("chosen_length",),
    "len_l": ("rejected_length",),
}
# Where lengths come from when there are no length columns: token ids (TRL 1.x ``chosen_ids``,
# TRL 0.1x ``chosen_input_ids``), else the text (``chosen``, plain or conversational).
IDS: Mapping[str, tuple[str, ...]] = {"len_w": ("chosen_ids", "chosen_input_ids"),
                                      "len_l": ("rejected_ids", "rejected_input_ids")}
TEXT: Mapping[str, tuple[str, ...]] = {"len_w": ("chosen",), "len_l": ("rejected",)}
ACCEPTED: tuple[str, ...] = tuple(
    name for table in (COLUMNS, IDS, TEXT) for names in table.values() for name in names
)
LOGPROBS = ("lp_w", "lp_l", "ref_w", "ref_l")
# A table with these columns is an RL rollout log (gradlab.audit.rollouts), not preference pairs.
ROLLOUT_COLUMNS = ("prompt_id", "completion_length", "reward")


def is_rollout_table(columns: Iterable[str]) -> bool:
    """Whether a table's columns are a rollout log's (``prompt_id``, ``completion_length``, ``reward``)."""
    return set(ROLLOUT_COLUMNS) <= set(columns)
WHITESPACE = "whitespace words (no length columns, token ids or tokenizer given)"


@dataclass(frozen=True)
class Pairs:
    """The per-pair numbers of a dataset, in gradlab's canonical variables.

    ``lp_w``/``lp_l`` are None where the file has no policy log-probs and ``ref_w``/``ref_l``
    where it has no reference log-probs. ``length_source`` says where the lengths came from.
    """

    len_w: np.ndarray
    len_l: np.ndarray
    lp_w: np.ndarray | None = None
    lp_l: np.ndarray | None = None
    ref_w: np.ndarray | None = None
    ref_l: np.ndarray | None = None
    length_source: str = "columns chosen_length, rejected_length"
    source: str = "<arrays>"
    columns: tuple[str, ...] = ()
    used: Mapping[str, str] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.len_w.shape[0])

    @property
    def has_policy(self) -> bool:
        return self.lp_w is not None

    @property
    def has_reference(self) -> bool:
        return self.ref_w is not None


# --------------------------------------------------------------------------------------------
# Formats: each yields chunks, a chunk being (first row, {column: list or array})
# --------------------------------------------------------------------------------------------

Chunk = tuple[int, dict[str, Sequence[Any]]]


def table_format(path: Path) -> str:
    if path.is_dir():  # a Hugging Face datasets folder (Dataset.save_to_disk)
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
            raise AuditInputError(f"{path} is a DatasetDict folder; give one split's folder"
                                  + (f": {', '.join(str(path / s) for s in splits)}" if splits else ""))
        if not (path / "state.json").is_file():
            raise AuditInputError(f"{path} is a folder but not a Hugging Face datasets folder (no state.json); give "
                                  "a JSON Lines, CSV or Parquet file, or a folder written by Dataset.save_to_disk")
        return "arrow"
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.lstrip().startswith(b"{"):
        return "jsonl"
    return "csv"


def _not_a_table(path: Path, why: str) -> AuditInputError:
    return AuditInputError(
        f"{path} is not a table of preference pairs: {why}. gradlab audit reads JSON Lines (one JSON "
        "object per line), CSV with a header row, or Parquet, with one row per pair"
    )


def _too_long(path: Path, what: str, size: int | None, limit: int) -> AuditInputError:
    shown = f"is {size:,} bytes, past" if size is not None else "is longer than"
    return AuditInputError(f"{path}: {what} {shown} the limit of {limit:,} bytes for one line or value "
                           f"(field_bytes); nothing was read further and no output was written. If the file is "
                           f"right, {budgets.how_to_raise('field_bytes')}")


def _lines(path: Path, header: int = 0) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a text file, each line read only up to the ``field_bytes``
    budget: a longer one (a 1 GB file with no newline, say) is refused with its line and row
    number instead of being read whole. A UTF-8 byte order mark is dropped. ``header``: lines
    before the first row (the row number in messages counts non-blank lines after them)."""
    limit = int(budgets.get("field_bytes"))
    with open(path, "rb") as f:
        number = row = 0
        while raw := (f.readline(limit + 1) if limit else f.readline()):
            number += 1
            if limit and len(raw) > limit and not (len(raw) == limit + 1 and raw.endswith(b"\n")):
                what = f"line {number}" + (f" (row {row})" if number > header else "")
                raise _too_long(path, what, None, limit)
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if number > header and raw.strip():
                row += 1
            yield number, raw.decode("utf-8")


def _jsonl_header(path: Path) -> list[str]:
    for number, line in _lines(path):
        if line.strip():
            return list(_json_object(path, line, number))
    raise _not_a_table(path, "the file is empty")


def _json_object(path: Path, line: str, number: int) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        if number == 1 and line.lstrip().startswith("["):
            raise _not_a_table(path, "it is one JSON array, not JSON Lines (write it with "
                                     "datasets' to_json(..., lines=True))") from None
        raise _not_a_table(path, f"line {number} is not JSON ({exc.msg})") from None
    if isinstance(obj, list) and number == 1:
        raise _not_a_table(path, "it is one JSON array, not JSON Lines (write it with datasets' "
                                 "to_json(..., lines=True))")
    if not isinstance(obj, dict):
        raise _not_a_table(path, f"line {number} is a JSON {type(obj).__name__}, not an object with named columns")
    return obj


def _chunks(records: Iterator[tuple[int, Sequence[Any]]], wanted: Sequence[str]) -> Iterator[Chunk]:
    """``CHUNK``-row chunks of ``(line number, values of wanted)`` records: the first row's index
    and ``{column: values, "_line": line numbers}``."""
    start, rows = 0, []
    for record in records:
        rows.append(record)
        if len(rows) == CHUNK:
            yield start, _columns(rows, wanted)
            start, rows = start + CHUNK, []
    if rows:
        yield start, _columns(rows, wanted)


def _columns(rows: list[tuple[int, Sequence[Any]]], wanted: Sequence[str]) -> dict[str, Sequence[Any]]:
    lines, values = zip(*rows, strict=True)
    return {**{c: [v[i] for v in values] for i, c in enumerate(wanted)}, "_line": list(lines)}


def _jsonl_chunks(path: Path, wanted: Sequence[str]) -> Iterator[Chunk]:
    def records():
        for number, line in _lines(path):
            if line.strip():
                obj = _json_object(path, line, number)
                yield number, [obj.get(c, MISSING) for c in wanted]

    return _chunks(records(), wanted)


def _csv_header(path: Path) -> list[str]:
    header = next(csv.reader((line for _, line in _lines(path, 1)), dialect=_dialect(path)), None)
    if not header:
        raise _not_a_table(path, "the file is empty")
    return [h.strip() for h in header]


def _dialect(path: Path):
    return csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel


def _csv_chunks(path: Path, wanted: Sequence[str]) -> Iterator[Chunk]:
    def records():
        reader = csv.reader((line for _, line in _lines(path, 1)), dialect=_dialect(path))
        header = [h.strip() for h in next(reader)]
        index = [header.index(c) for c in wanted]
        for record in reader:
            if not record:
                continue
            if len(record) != len(header):
                raise _not_a_table(path, f"line {reader.line_num} has {len(record)} fields, the header has "
                                         f"{len(header)}")
            yield reader.line_num, [record[i] for i in index]

    return _chunks(records(), wanted)


def parquet_file(path: Path) -> Any:  # a pyarrow.parquet.ParquetFile (pyarrow is optional)
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - depends on the environment
        raise AuditInputError("reading Parquet needs pyarrow: pip install 'gradlab[audit]'") from None
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise _not_a_table(path, f"it could not be read as Parquet ({exc})") from None


def _parquet_header(path: Path) -> list[str]:
    return list(parquet_file(path).schema_arrow.names)


def _batch_columns(batch, wanted: Sequence[str], path: Path | None = None, start: int = 0) -> dict[str, Sequence[Any]]:
    """An Arrow record batch as numpy arrays (numeric columns without nulls) or Python lists.

    A dictionary-encoded text column (Parquet's, read as such) is decoded once per distinct
    value: its rows share one Python string each, so a 16 MB value repeated on every row costs
    16 MB, not 16 MB a row. A text value past the ``field_bytes`` budget is refused with its row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    limit = int(budgets.get("field_bytes"))
    cols: dict[str, Sequence[Any]] = {}
    for c in wanted:
        column = batch.column(c)
        if pa.types.is_dictionary(column.type):
            values = column.dictionary
            if limit and _is_text(values.type) and len(values):
                sizes = pc.binary_length(values).to_numpy(zero_copy_only=False)
                if sizes.max() > limit:
                    big = int(np.argmax(sizes))
                    rows = np.flatnonzero(column.indices.fill_null(-1).to_numpy(zero_copy_only=False) == big)
                    if rows.size:
                        raise _too_long(path or Path("<table>"), f"row {start + int(rows[0])}: '{c}'",
                                        int(sizes[big]), limit)
            decoded = values.to_pylist()
            index = column.indices.to_pylist()
            cols[c] = [None if i is None else decoded[i] for i in index]
            continue
        if limit and _is_text(column.type) and len(column):
            sizes = pc.binary_length(column).fill_null(0).to_numpy(zero_copy_only=False)
            if sizes.max() > limit:
                i = int(np.argmax(sizes > limit))
                raise _too_long(path or Path("<table>"), f"row {start + i}: '{c}'", int(sizes[i]), limit)
        numeric = column.type.id in _arrow_numeric_ids() and column.null_count == 0
        cols[c] = column.to_numpy(zero_copy_only=False) if numeric else column.to_pylist()
    return cols


def _is_text(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) \
        or pa.types.is_large_binary(t)


PARQUET_BATCH_BYTES = 64 * 2**20  # a Parquet batch holds about this much data (encoded), however long its rows


def _parquet_chunks(path: Path, wanted: Sequence[str]) -> Iterator[Chunk]:
    """Record batches of at most ``CHUNK`` rows and about ``PARQUET_BATCH_BYTES``, sized from the
    row groups' metadata; text columns are read dictionary-encoded where the file stores them so."""
    import pyarrow.parquet as pq

    plain = parquet_file(path)
    schema = plain.schema_arrow
    text = [c for c in wanted if _is_text(schema.field(c).type)]
    pf = pq.ParquetFile(path, read_dictionary=text) if text else plain
    md = pf.metadata
    names = [md.schema.column(j).path.split(".")[0] for j in range(md.num_columns)]
    per_row = 0.0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        size = sum(rg.column(j).total_uncompressed_size for j in range(md.num_columns) if names[j] in wanted)
        per_row = max(per_row, size / max(1, rg.num_rows))
    rows = max(1, min(CHUNK, int(PARQUET_BATCH_BYTES // max(per_row, 1.0))))
    row = 0
    for batch in pf.iter_batches(batch_size=rows, columns=list(wanted)):
        yield row, _batch_columns(batch, wanted, path, row)
        row += batch.num_rows


def _arrow_text_chunks(path: Path, fmt: str, wanted: Sequence[str]) -> Iterator[Chunk]:
    """CSV or JSON Lines through pyarrow's streaming C++ readers: about ten times faster than
    the standard library on a million rows. Rows come without file line numbers, so a failure
    here makes ``read_pairs`` read the file again the slow way for an exact message."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    block = 1 << 22
    if fmt == "csv":
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=block),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(include_columns=list(wanted), strings_can_be_null=True),
        )
    else:
        reader = pajson.open_json(path, read_options=pajson.ReadOptions(block_size=block))
    row = 0
    for batch in reader:
        yield row, _batch_columns(batch, wanted, path, row)
        row += batch.num_rows


@caches.memo(maxsize=None)
def _arrow_numeric_ids() -> frozenset[int]:
    import pyarrow as pa

    return frozenset(pa.type_for_alias(t).id for t in ("int8", "int16", "int32", "int64", "uint8", "uint16",
                                                       "uint32", "uint64", "float16", "float32", "float64"))


def _arrow_files(path: Path) -> list[Path]:
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        files = [path / Path(f["filename"]).name for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise _not_a_table(path, "its state.json does not list the data files as datasets writes it") from None
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise _not_a_table(path, f"its data files are missing ({', '.join(missing) or 'none listed'})")
    return files


def _arrow_stream(file: Path):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        return ipc.open_stream(pa.memory_map(str(file)))  # zero-copy: only the batch being read is touched
    except (OSError, pa.ArrowInvalid) as exc:
        raise _not_a_table(file, f"it is not an Arrow stream as datasets writes ({exc})") from None


def _arrow_header(path: Path) -> list[str]:
    return list(_arrow_stream(_arrow_files(path)[0]).schema.names)


def _arrow_chunks(path: Path, wanted: Sequence[str]) -> Iterator[Chunk]:
    row = 0
    for file in _arrow_files(path):
        for batch in _arrow_stream(file):
            yield row, _batch_columns(batch.select(list(wanted)), wanted, path, row)
            row += batch.num_rows


FORMATS: Mapping[str, tuple[Callable[[Path], list[str]], Callable[[Path, Sequence[str]], Iterator[Chunk]]]] = {
    "jsonl": (_jsonl_header, _jsonl_chunks),
    "csv": (_csv_header, _csv_chunks),
    "parquet": (_parquet_header, _parquet_chunks),
    "arrow": (_arrow_header, _arrow_chunks),  # a Hugging Face datasets folder
}


# --------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------


def _resolve(found: Sequence[str]) -> dict[str, str]:
    """Canonical variable (or length source) -> the column that provides it."""
    present = set(found)
    used: dict[str, str] = {}
    for var, names in COLUMNS.items():
        hit = [n for n in names if n in present]
        if hit:
            used[var] = hit[0]
    for kind, table in (("ids", IDS), ("text", TEXT)):
        for var, names in table.items():
            hit = [n for n in names if n in present]
            if hit:
                used[f"{var}:{kind}"] = hit[0]
    return used


def _column_error(path: Path, found: Sequence[str], problem: str) -> AuditInputError:
    hints = []
    for name in found:
        if name in ACCEPTED:
            continue
        close = difflib.get_close_matches(name, ACCEPTED, n=1, cutoff=0.75)
        if close:
            hints.append(f"'{name}' -> '{close[0]}'?")
    hint = f" Did you mean: {', '.join(hints)}" if hints else ""
    return AuditInputError(
        f"{path}: {problem}.{hint}\n  found columns: {', '.join(found) or 'none'}\n"
        "  accepted: chosen_logps, rejected_logps (policy log-probs, summed over tokens; optional: "
        "missing means at initialisation, policy = reference); ref_chosen_logps, ref_rejected_logps "
        "(or reference_chosen_logps, reference_rejected_logps; needed by reference-based losses); "
        "chosen_length, rejected_length (tokens), or chosen_ids, rejected_ids / chosen_input_ids, "
        "rejected_input_ids (token ids), or chosen, rejected (text)"
    )


def _check_columns(path: Path, found: Sequence[str], used: Mapping[str, str]) -> None:
    misnamed = [
        (name, close[0])
        for name in found
        if name not in ACCEPTED
        for close in [difflib.get_close_matches(name, ACCEPTED, n=1, cutoff=0.75)]
        if close and close[0] not in found
    ]
    if misnamed:
        name, meant = misnamed[0]
        raise _column_error(path, found, f"column '{name}' is not one gradlab reads (is it '{meant}'?); "
                                         "rename it, so that its values are not silently ignored")
    for a, b, what in (("lp_w", "lp_l", "policy log-probs"), ("ref_w", "ref_l", "reference log-probs")):
        if (a in used) != (b in used):
            have, lack = (a, b) if a in used else (b, a)
            raise _column_error(path, found, f"{what} need both columns: found '{used[have]}' but not "
                                             f"'{COLUMNS[lack][0]}'")
    if "lp_w" not in used and "ref_w" not in used:
        raise _column_error(path, found, "no log-prob columns (neither the policy's nor the reference's)")
    if not _length_kind(used):
        raise _column_error(path, found, "no lengths: give chosen_length and rejected_length, token ids, or "
                                         "the chosen and rejected text")


def _length_kind(used: Mapping[str, str]) -> str | None:
    for kind in ("", ":ids", ":text"):
        if f"len_w{kind}" in used and f"len_l{kind}" in used:
            return kind or "columns"
    return None


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------

MISSING = object()


def where(path: Path, row: int, lines: Sequence[int] | None, offset: int) -> str:
    where = f"row {row}"
    if lines is not None:
        where += f" (line {lines[offset]} of {path.name})"
    return where


def _numbers(path: Path, column: str, values: Sequence[Any], start: int, lines: Sequence[int] | None) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiu":
        return values.astype(np.float64, copy=False)
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if isinstance(v, bool) or v is None or v is MISSING or v == "":
            what = "missing" if v is MISSING or v is None or v == "" else f"{v!r}, not a number"
            raise AuditInputError(f"{path}: {where(path, start + i, lines, i)}: '{column}' is {what}; "
                                  "no output was written")
        try:
            out[i] = float(v)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer of hundreds of digits
            shown = _short(v)
            rule = RANGES["len" if column in COLUMNS["len_w"] + COLUMNS["len_l"] else "lp"][2]
            raise AuditInputError(f"{path}: {where(path, start + i, lines, i)}: '{column}' is {shown}, not a "
                                  f"number in float64's range; {rule}; no output was written") from None
    return out


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


# The legal range of each kind of value: (low, high, the rule as a message says it). Wider than any
# real dataset (a length is a count of tokens; a summed log-prob of 10^9 tokens at -1 per token is
# -10^9), and narrow enough that every closed form and statistic stays finite in float64.
RANGES: Mapping[str, tuple[float, float, str]] = {
    "len": (1e-3, 1e9, "a length must be a number of tokens in [0.001, 1e9]"),
    "lp": (-1e9, 0.0, "a log-probability must be in [-1e9, 0] (the log of a probability, summed over tokens)"),
}


def _validate(path: Path, var: str, column: str, x: np.ndarray, start: int, lines: Sequence[int] | None) -> None:
    low, high, rule = RANGES["len" if var.startswith("len") else "lp"]
    bad = ~((x >= low) & (x <= high))  # NaN fails both comparisons
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AuditInputError(f"{path}: {where(path, start + i, lines, i)}: '{column}' = {float(x[i])!r}; {rule}. "
                              f"{int(bad.sum())} row(s) of this chunk are invalid; no output was written")


def _text(value: Any) -> str:
    """The response text; conversational responses (a list of messages) join their contents."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(str(m["content"]) for m in value)
    raise TypeError(type(value).__name__)


def whitespace_length(text: str) -> int:
    """Length in whitespace-separated words: the labelled fallback when no tokenizer is named.
    A long text is counted without building its list of words (which costs ~50 bytes a word)."""
    if len(text) < 1 << 20:
        return len(text.split())
    return sum(1 for _ in _WORD.finditer(text))


_WORD = re.compile(r"\S+")


Tokenizer = Callable[[list[str]], list[int]]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A local tokenizer file (``tokenizer.json``, or a folder holding one) as a function from
    texts to token counts. Uses the optional ``tokenizers`` package; nothing is downloaded."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise AuditInputError(f"tokenizer file {p} does not exist; give a local tokenizer.json (or a folder with one)")
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:  # pragma: no cover - depends on the environment
        raise AuditInputError("counting tokens with a tokenizer needs the tokenizers package: "
                              "pip install 'gradlab[audit]'") from None
    try:
        tok = HFTokenizer.from_file(str(p))
    except Exception as exc:  # noqa: BLE001 - the Rust library raises its own exception type
        raise AuditInputError(f"{p} is not a tokenizers tokenizer file ({exc})") from None

    def count(texts: list[str]) -> list[int]:
        return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]

    return count


def _lengths(path: Path, column: str, values: Sequence[Any], kind: str, start: int, lines, tokenizer) -> np.ndarray:
    if kind == "ids":
        out = []
        for i, v in enumerate(values):
            if not isinstance(v, list | tuple | np.ndarray):
                raise AuditInputError(f"{path}: {where(path, start + i, lines, i)}: '{column}' should be a list "
                                      f"of token ids, not {type(v).__name__}; no output was written")
            out.append(len(v))
        return np.asarray(out, dtype=np.float64)
    texts = []
    for i, v in enumerate(values):
        try:
            texts.append(_text(v))
        except TypeError as exc:
            raise AuditInputError(f"{path}: {where(path, start + i, lines, i)}: '{column}' should be text or a "
                                  f"list of messages, not {exc}; no output was written") from None
    # Rows that share one text object (a Parquet dictionary value) are counted once
    first: dict[int, int] = {}
    unique = [first.setdefault(id(t), len(first)) for t in texts]
    distinct = list({id(t): t for t in texts}.values())
    counts = tokenizer(distinct) if tokenizer is not None else [whitespace_length(t) for t in distinct]
    return np.asarray(counts, dtype=np.float64)[unique]


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------


def open_table(p: Path) -> tuple[list[str], Callable[[Path, Sequence[str]], Iterator[Chunk]]]:
    """The column names of a table file (or datasets folder) and its chunk reader
    (``reader(path, columns)``)."""
    if not (p.is_file() or p.is_dir()):
        raise AuditInputError(f"{p} does not exist")
    fmt = table_format(p)
    header_of, chunks_of = FORMATS[fmt]
    try:
        if fmt not in ("parquet", "arrow"):  # text: its start must be UTF-8 (a last character may be cut)
            with open(p, "rb") as f:
                codecs.getincrementaldecoder("utf-8")().decode(f.read(1 << 16), final=False)
        found = header_of(p)
    except UnicodeDecodeError:
        raise _not_a_table(p, "it is not UTF-8 text (nor Parquet)") from None
    except csv.Error as exc:
        raise _not_a_table(p, f"it is not CSV ({exc})") from None
    if fmt == "csv" and len(found) < 2:
        raise _not_a_table(p, f"its first line has {len(found)} field(s), not a header of column names")
    return found, chunks_of


def read_pairs(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None) -> Pairs:
    """Read and validate a dataset of preference pairs (see the module docstring)."""
    p = Path(path)
    found, chunks_of = open_table(p)
    fmt = table_format(p)
    used = _resolve(found)
    if not used and is_rollout_table(found):
        raise AuditInputError(f"{p} is a rollout log (columns prompt_id, completion_length, reward), not preference "
                              "pairs: gradlab audit FILE, or gradlab.audit.audit_rollouts(FILE) in Python")
    if not used and not any(difflib.get_close_matches(c, ACCEPTED, n=1, cutoff=0.75) for c in found):
        raise _not_a_table(p, f"its first line ({', '.join(map(repr, found[:6]))}) names none of the columns gradlab "
                              f"reads ({', '.join(ACCEPTED)})")
    _check_columns(p, found, used)
    kind = _length_kind(used)
    assert kind is not None  # _check_columns refused a file without lengths
    count = load_tokenizer(tokenizer) if tokenizer is not None and kind == ":text" else None
    numeric = [v for v in (*LOGPROBS, "len_w", "len_l") if v in used]
    sources = {v: used[v] for v in numeric}
    if kind != "columns":
        sources.update({f"len_w:{kind[1:]}": used[f"len_w{kind}"], f"len_l:{kind[1:]}": used[f"len_l{kind}"]})
    wanted = list(dict.fromkeys(sources.values()))
    fast = fmt in ("csv", "jsonl") and _has_pyarrow()
    try:
        parts = _read_columns(p, _arrow_text_chunks(p, fmt, wanted) if fast else chunks_of(p, wanted), sources, count)
    except Exception as exc:  # noqa: BLE001 - any failure of the fast reader: read again, exactly
        if not fast:
            if isinstance(exc, UnicodeDecodeError):
                raise _not_a_table(p, "it is not UTF-8 text") from None
            if isinstance(exc, csv.Error):
                raise _not_a_table(p, f"it is not valid CSV ({exc})") from None
            raise
        try:
            parts = _read_columns(p, chunks_of(p, wanted), sources, count)
        except UnicodeDecodeError:
            raise _not_a_table(p, "it is not UTF-8 text") from None
        except csv.Error as err:
            raise _not_a_table(p, f"it is not valid CSV ({err})") from None
    if not parts["len_w"]:
        raise _not_a_table(p, "it has a header but no rows")
    arrays = {v: np.concatenate(xs) for v, xs in parts.items()}
    length_source = {
        "columns": f"columns {used.get('len_w')}, {used.get('len_l')}",
        ":ids": f"token ids ({used.get('len_w:ids')}, {used.get('len_l:ids')})",
        ":text": f"tokenizer {tokenizer}" if count is not None else WHITESPACE,
    }[kind]
    return Pairs(**arrays, length_source=length_source, source=str(p), columns=tuple(found),
                 used={v: c for v, c in sources.items()})


def _has_pyarrow() -> bool:
    try:
        import pyarrow.csv  # noqa: F401
        import pyarrow.json  # noqa: F401
    except ImportError:
        return False
    return True


def _read_columns(
    path: Path, chunks: Iterator[Chunk], sources: Mapping[str, str], count: Tokenizer | None
) -> dict[str, list[np.ndarray]]:
    """Per-pair numbers from a stream of chunks, validated chunk by chunk."""
    parts: dict[str, list[np.ndarray]] = {v.split(":")[0]: [] for v in sources}
    for start, cols in chunks:
        lines = cols.get("_line")
        for var, column in sources.items():
            if ":" in var:
                var, kind = var.split(":")
                x = _lengths(path, column, cols[column], kind, start, lines, count)
            else:
                x = _numbers(path, column, cols[column], start, lines)
            _validate(path, var, column, x, start, lines)
            parts[var].append(x)
    return parts


def pairs_from_arrays(
    *,
    len_w: Any,
    len_l: Any,
    lp_w: Any = None,
    lp_l: Any = None,
    ref_w: Any = None,
    ref_l: Any = None,
    length_source: str = "given",
) -> Pairs:
    """Validated ``Pairs`` from arrays already in memory (the Python route, no file)."""
    given = {"lp_w": lp_w, "lp_l": lp_l, "ref_w": ref_w, "ref_l": ref_l, "len_w": len_w, "len_l": len_l}
    arrays: dict[str, Any] = {k: None if v is None else np.asarray(v, dtype=np.float64).ravel()
                              for k, v in given.items()}
    n = arrays["len_w"].shape[0]
    for a, b in (("lp_w", "lp_l"), ("ref_w", "ref_l")):
        if (arrays[a] is None) != (arrays[b] is None):
            raise AuditInputError(f"give both {a} and {b}, or neither")
    if arrays["lp_w"] is None and arrays["ref_w"] is None:
        raise AuditInputError("give the policy's log-probs (lp_w, lp_l), the reference's (ref_w, ref_l), or both")
    path = Path("<arrays>")
    for k, x in arrays.items():
        if x is None:
            continue
        if x.shape[0] != n:
            raise AuditInputError(f"{k} has {x.shape[0]} values, len_w has {n}")
        _validate(path, k, k, x, 0, None)
    if n == 0:
        raise AuditInputError("no pairs")
    return Pairs(**arrays, length_source=length_source)
