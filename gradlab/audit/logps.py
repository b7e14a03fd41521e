"""``gradlab logps``: the audit's TRL columns from a preference dataset and Hugging Face causal LMs.

A pair's log-prob is the sum over its completion's tokens of log pi(token | prompt, earlier
completion tokens), tokenised as TRL's ``DPOTrainer`` does at TRL 1.16.0 (``_prepare_dataset``
and ``DataCollatorForPreference``):

- **Prompt.** Without a ``prompt`` column it is extracted as TRL's ``extract_prompt`` does: the
  longest common prefix of ``chosen`` and ``rejected`` (messages, or characters).
- **Standard** rows (strings): the EOS token's text is appended to ``chosen`` and ``rejected``
  unless they end with it. ``prompt`` is tokenised alone and ``prompt + chosen`` as one string
  (special tokens such as a BOS added as the tokenizer does); the completion is what follows
  the two token lists' common prefix.
- **Conversational** rows (lists of ``{"role", "content"}`` messages): the tokenizer's chat
  template, the prompt with ``add_generation_prompt=True``; no EOS is appended (the template's
  end-of-turn tokens are part of the completion).
- **Truncation** (``max_length``), per sequence: ``keep_start`` keeps the first ``max_length``
  tokens of prompt + completion and drops the pairs whose prompt alone fills ``max_length``, as
  TRL does; ``keep_end`` keeps the last ``max_length`` tokens.

The first token of a sequence has no context and is never scored (TRL's labels are shifted by
one). So the summed tokens are the completion's tokens that survive truncation, the appended EOS
included, and the length written is their number. A pair with nothing left to score is not
written (the summary lists it).

Speed: pairs are taken a window at a time and sorted by length, so that a batch pads little.
Within a batch the prompts run once (left-padded, so that every prompt ends in the last column)
and their key-value cache serves the chosen and the rejected continuation together; pairs whose
truncated contexts differ (``keep_end``) run as full sequences. Each window is written in row
order and flushed, so an interrupted run keeps what it wrote, and a rerun skips those rows.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.audit import io
from gradlab.errors import GradlabError

__all__ = [
    "TRL_VERSION",
    "OUTPUT_COLUMNS",
    "LogpsError",
    "LogpsSummary",
    "Tokenized",
    "extract_prompt",
    "is_conversational",
    "tokenize_pair",
    "truncate",
    "Scorer",
    "load",
    "compute",
    "logps",
    "as_pairs",
]

TRL_VERSION = "1.16.0"
OUTPUT_COLUMNS = ("row", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                  "chosen_length", "rejected_length")
TRUNCATION_MODES = ("keep_start", "keep_end")
DTYPES = ("float32", "float64", "bfloat16", "float16", "auto")
WINDOW_BATCHES = 16  # batches sorted by length together (and written together)
INSTALL = "pip install 'gradlab[model]' (torch and transformers)"


class LogpsError(GradlabError):
    """Bad input to ``gradlab logps``: data, model, options or an output file it must not touch."""


# --------------------------------------------------------------------------------------------
# Tokenising as TRL 1.16.0's DPOTrainer does
# --------------------------------------------------------------------------------------------


def is_conversational(value: Any) -> bool:
    """A list of messages (dicts with a ``role``), as TRL's ``is_conversational`` tests it."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` from two completions that share an implicit prompt: TRL's
    ``extract_prompt``, its quirks kept (a space before the split goes to the completions; when
    one is a prefix of the other, the split is at the shorter one's last element)."""
    n = min(len(chosen), len(rejected))
    if n == 0:
        raise LogpsError("cannot extract a prompt: chosen or rejected is empty")
    idx = 0
    for idx in range(n):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    k = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        k += 1
    return k


def _ids(result: Any) -> list[int]:
    ids = result["input_ids"] if isinstance(result, Mapping) or hasattr(result, "keys") else result
    return [int(i) for i in ids]


def tokenize_pair(tokenizer: Any, example: Mapping[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, chosen_ids, rejected_ids)`` for one row, as TRL 1.16.0's ``tokenize_fn``."""
    chosen, rejected = example["chosen"], example["rejected"]
    prompt = example.get("prompt")
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if is_conversational(chosen) or is_conversational(prompt):
        tools = example.get("tools")
        kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools}

        def chat(messages: Any, **extra: Any) -> list[int]:
            return _ids(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs, **extra))

        prompt_ids = chat(prompt, add_generation_prompt=True)
        with_chosen, with_rejected = chat(list(prompt) + list(chosen)), chat(list(prompt) + list(rejected))
    else:
        eos = tokenizer.eos_token
        if eos is None:
            raise LogpsError("the tokenizer has no EOS token, which TRL appends to standard (non-chat) completions")
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = _ids(tokenizer(text=prompt))
        with_chosen, with_rejected = _ids(tokenizer(text=prompt + chosen)), _ids(tokenizer(text=prompt + rejected))
    # the completion starts where prompt and prompt + completion diverge (a template may render the
    # prompt alone differently, or tokens may merge across the boundary): TRL's common_prefix_length
    k = min(_common_prefix(prompt_ids, with_chosen), _common_prefix(prompt_ids, with_rejected))
    return prompt_ids[:k], with_chosen[k:], with_rejected[k:]


def truncate(prompt_ids: Sequence[int], completion_ids: Sequence[int], max_length: int | None,
             mode: str = "keep_start") -> tuple[list[int], list[int]]:
    """``(context, scored)``: TRL's collator truncation of ``prompt + completion`` to ``max_length``,
    split before the first scored token. A sequence's first token has no context and is never
    scored, so ``scored`` is the completion tokens kept at positions >= 1 (possibly none)."""
    seq = list(prompt_ids) + list(completion_ids)
    start = len(prompt_ids)  # index of the first completion token
    if max_length is not None and len(seq) > max_length:
        if mode == "keep_start":
            seq = seq[:max_length]
        else:
            cut = len(seq) - max_length
            seq, start = seq[cut:], start - cut
    first = max(start, 1)
    return seq[:first], seq[first:]


@dataclass(frozen=True)
class Tokenized:
    """One pair ready to score: the contexts and the scored tokens of chosen and rejected."""

    row: int
    context_w: list[int]
    scored_w: list[int]
    context_l: list[int]
    scored_l: list[int]

    @property
    def shared(self) -> bool:
        return self.context_w == self.context_l

    @property
    def size(self) -> int:
        return len(self.context_w) + max(len(self.scored_w), len(self.scored_l))


# --------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------

_FIELDS = ("prompt", "chosen", "rejected", "tools")


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row, {prompt?, chosen, rejected, tools?})`` for every row of a TRL preference file."""
    found, chunks_of = io.open_table(path)
    missing = [c for c in ("chosen", "rejected") if c not in found]
    if missing:
        raise LogpsError(f"{path}: no column {', '.join(missing)}; a TRL preference dataset has prompt (optional), "
                         f"chosen and rejected (strings, or lists of messages). Found: {', '.join(found) or 'none'}")
    wanted = [c for c in _FIELDS if c in found]
    for start, cols in chunks_of(path, wanted):
        lines = cols.get("_line")
        for i in range(len(cols["chosen"])):
            example = {c: cols[c][i] for c in wanted if cols[c][i] is not io.MISSING}
            where = io.where(path, start + i, lines, i)
            for c in ("prompt", "chosen", "rejected"):
                v = example.get(c)
                if c in example and not (isinstance(v, str) or is_conversational(v)
                                         or (c == "prompt" and v is None)):
                    raise LogpsError(f"{path}: {where}: '{c}' should be text or a list of {{role, content}} "
                                     f"messages, not {type(v).__name__}")
            if "chosen" not in example or "rejected" not in example:
                raise LogpsError(f"{path}: {where}: chosen or rejected is missing")
            yield start + i, example


def count_rows(path: Path) -> int | None:
    """The number of rows, where it is cheap to know (Parquet metadata, lines of JSON Lines)."""
    fmt = io.table_format(path)
    if fmt == "parquet":
        return int(io.parquet_file(path).metadata.num_rows)
    if fmt == "jsonl":
        n, last = 0, b"\n"
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                n += block.count(b"\n")
                last = block[-1:]
        return n + (last != b"\n")
    return None


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _torch():
    try:
        import torch
        import transformers
    except ImportError:
        raise LogpsError(f"gradlab logps runs Hugging Face models, which needs torch and transformers: {INSTALL}") \
            from None
    return torch, transformers


def resolve_device(device: str | None) -> str:
    torch, _ = _torch()
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise LogpsError(f"--device {device!r}: use cpu, cuda, cuda:N, mps or auto")
    if kind == "cuda" and not torch.cuda.is_available():
        raise LogpsError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LogpsError(f"--device {device}: torch sees no MPS device here; use --device cpu")
    return device


def load(name: str, *, device: str = "cpu", dtype: str = "float32", tokenizer: bool = True) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a Hugging Face causal LM: a local folder, or a hub name where a
    network exists. The model is put in eval mode on ``device`` in ``dtype``."""
    torch, transformers = _torch()
    if dtype not in DTYPES:
        raise LogpsError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        tok = transformers.AutoTokenizer.from_pretrained(name) if tokenizer else None
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LogpsError(f"cannot load the causal LM {name!r}: {first}. Give a local folder with config.json, the "
                         "weights and the tokenizer files, or a hub name where a network exists") from None
    model.to(device)
    model.eval()
    return model, tok


def _pad_id(tokenizer: Any) -> int:
    # TRL: pad_token, else eos_token; padded positions are masked, so the value only has to exist
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


class Scorer:
    """Summed completion log-probs of batches of :class:`Tokenized` pairs under one model."""

    def __init__(self, model: Any, pad_id: int, *, share_prompt: bool = True) -> None:
        self.torch, _ = _torch()
        self.model = model
        self.pad_id = pad_id
        self.share_prompt = share_prompt
        self.device = next(model.parameters()).device
        import inspect

        params = inspect.signature(model.forward).parameters
        # transformers 5.2x names the key-value cache `cache`; earlier releases `past_key_values`
        self._cache = "cache" if "cache" in params else "past_key_values"
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def __call__(self, batch: Sequence[Tokenized]) -> np.ndarray:
        """(len(batch), 2): chosen and rejected summed log-probs, in float64."""
        out = np.empty((len(batch), 2))
        shared = [i for i, t in enumerate(batch) if self.share_prompt and t.shared]
        full = [i for i in range(len(batch)) if i not in set(shared)]
        with self.torch.inference_mode():
            if shared:
                out[shared] = self._shared([batch[i] for i in shared])
            if full:
                seqs = [s for i in full for s in ((batch[i].context_w, batch[i].scored_w),
                                                  (batch[i].context_l, batch[i].scored_l))]
                out[full] = self._full(seqs).reshape(-1, 2)
        return out

    def _tensor(self, rows: Sequence[Sequence[int]], width: int, *, left: bool) -> tuple[Any, Any]:
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, sl], mask[i, sl] = r, 1
        t = self.torch
        return t.from_numpy(ids).to(self.device), t.from_numpy(mask).to(self.device)

    def _token_logps(self, logits: Any, targets: Any) -> Any:
        """log softmax(logits)[target] per position, in float32 or wider (the model's own
        logits may be half precision)."""
        t = self.torch
        x = logits.float() if logits.dtype in (t.float16, t.bfloat16) else logits
        return x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - t.logsumexp(x, dim=-1)

    def _sum(self, token_logps: Any, mask: Any) -> np.ndarray:
        # where, not a product: a padded position's value may be anything, even NaN
        t = self.torch
        s = t.where(mask.bool(), token_logps, t.zeros((), dtype=token_logps.dtype, device=token_logps.device))
        return s.double().sum(-1).cpu().numpy()  # summed in float64 whatever the model's dtype

    def _full(self, seqs: Sequence[tuple[list[int], list[int]]]) -> np.ndarray:
        """Each (context, scored) as one right-padded sequence."""
        t = self.torch
        width = max(len(c) + len(s) for c, s in seqs)
        ids, mask = self._tensor([c + s for c, s in seqs], width, left=False)
        scored = t.zeros_like(mask)
        for i, (c, s) in enumerate(seqs):
            scored[i, len(c):len(c) + len(s)] = 1
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return self._sum(self._token_logps(logits[:, :-1], ids[:, 1:]), scored[:, 1:])

    def _shared(self, pairs: Sequence[Tokenized]) -> np.ndarray:
        """One prompt forward per pair; its key-value cache serves chosen and rejected."""
        t = self.torch
        n = len(pairs)
        width = max(len(p.context_w) for p in pairs)
        ctx, ctx_mask = self._tensor([p.context_w for p in pairs], width, left=True)
        positions = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
        first = self.model(input_ids=ctx, attention_mask=ctx_mask, position_ids=positions, use_cache=True,
                           **self._keep_last)  # the last position's logits only, where supported
        cache = first.get(self._cache)
        last = first.logits[:, -1:]  # every prompt ends in the last column: its next-token logits
        comps = [s for p in pairs for s in (p.scored_w, p.scored_l)]  # rows 2i, 2i + 1
        cwidth = max(len(s) for s in comps)
        comp, comp_mask = self._tensor(comps, cwidth, left=False)
        if cwidth > 1:
            cache.batch_repeat_interleave(2)
            lengths = ctx_mask.sum(-1).repeat_interleave(2)
            pos = lengths.unsqueeze(-1) + t.arange(cwidth - 1, device=self.device)
            mask = t.cat([ctx_mask.repeat_interleave(2, dim=0), comp_mask[:, :-1]], dim=-1)
            rest = self.model(input_ids=comp[:, :-1], attention_mask=mask, position_ids=pos,
                              use_cache=True, **{self._cache: cache}).logits
            logits = t.cat([last.repeat_interleave(2, dim=0), rest], dim=1)
        else:
            logits = last.repeat_interleave(2, dim=0)
        return self._sum(self._token_logps(logits, comp), comp_mask).reshape(n, 2)


# --------------------------------------------------------------------------------------------
# Output: JSON Lines or CSV, appended a window at a time
# --------------------------------------------------------------------------------------------


def _out_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise LogpsError(f"--out {path}: write JSON Lines (.jsonl) or CSV (.csv), which can be appended to and so "
                     "resumed; convert to Parquet afterwards if needed")


def _done_rows(path: Path, columns: Sequence[str]) -> set[int]:
    """The rows an earlier run wrote to ``path`` (which must be a file this command wrote with the
    same columns). A line cut off by a kill is removed."""
    if not path.exists() or path.stat().st_size == 0:
        return set()
    with open(path, "rb+") as f:  # drop a partial last line (the process was killed mid-write)
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1))
        if f.read(1) != b"\n":
            f.seek(0)
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
    done: set[int] = set()
    fmt = _out_format(path)
    foreign = LogpsError(f"--out {path} exists and is not a gradlab logps file with the columns "
                         f"{', '.join(columns)}: it is left untouched; choose another file, or delete it to start "
                         "again")
    with open(path, encoding="utf-8", newline="") as text:
        records: Iterator[Any]
        if fmt == "csv":
            reader = csv.reader(text)
            if next(reader, None) != list(columns):
                raise foreign
            records = (r[0] for r in reader if r)
        else:
            def keys() -> Iterator[Any]:
                for line in text:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        raise foreign from None
                    if not isinstance(obj, dict) or list(obj) != list(columns):
                        raise foreign
                    yield obj["row"]
            records = keys()
        for r in records:
            try:
                done.add(int(r))
            except (TypeError, ValueError):
                raise foreign from None
    return done


class _Writer:
    """Appends windows of records to a JSON Lines or CSV file, each flushed to disk."""

    def __init__(self, path: Path, columns: Sequence[str], fresh: bool) -> None:
        self.path, self.columns = path, list(columns)
        self.fmt = _out_format(path)
        if fresh and self.fmt == "csv":
            with open(path, "w", encoding="utf-8", newline="") as f:
                csv.writer(f).writerow(self.columns)

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        if self.fmt == "csv":
            buf = StringIO()
            w = csv.writer(buf)
            for rec in records:
                w.writerow([_text(rec[c]) for c in self.columns])
            text = buf.getvalue()
        else:
            text = "".join(json.dumps({c: rec[c] for c in self.columns}) + "\n" for rec in records)
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _text(x: Any) -> str:
    return repr(x) if isinstance(x, float) else str(x)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


@dataclass
class LogpsSummary:
    """What a run did. ``as_dict()`` is what ``gradlab logps --json`` prints."""

    source: str
    out: str | None
    model: str
    ref_model: str | None
    trl_version: str = TRL_VERSION
    eos: str = ""
    rows_written: int = 0
    rows_resumed: int = 0
    skipped: dict[int, str] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "out": self.out, "model": self.model, "ref_model": self.ref_model,
            "tokenisation": f"TRL {self.trl_version} DPOTrainer", "eos": self.eos,
            "rows_written": self.rows_written, "rows_resumed": self.rows_resumed,
            "rows_skipped": {str(k): v for k, v in self.skipped.items()},
            "tokens": self.tokens, "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds > 0 else None,
            "settings": self.settings,
        }

    def text(self) -> str:
        d = self.as_dict()
        lines = [f"gradlab logps: {self.source} -> {self.out or 'stdout'}",
                 f"  model {self.model}" + (f", reference {self.ref_model}" if self.ref_model else ""),
                 f"  tokenised as {d['tokenisation']}; {self.eos}",
                 f"  {self.rows_written} row(s) written, {self.rows_resumed} kept from an earlier run, "
                 f"{len(self.skipped)} skipped; {self.tokens:,} tokens scored in {self.seconds:.1f} s"
                 + (f" ({d['tokens_per_second']:,.0f} tokens/s)" if d["tokens_per_second"] else "")]
        for row, why in list(self.skipped.items())[:10]:
            lines.append(f"  skipped row {row}: {why}")
        if len(self.skipped) > 10:
            lines.append(f"  ... and {len(self.skipped) - 10} more skipped rows")
        return "\n".join(lines)


def _eos_note(tokenizer: Any) -> str:
    return (f"standard rows: TRL appends EOS ({tokenizer.eos_token!r}) and it is counted in the sums and lengths; "
            "conversational rows: the chat template's end-of-turn tokens are counted, no EOS is appended")


def _windows(rows: Iterator[tuple[int, dict[str, Any]]], size: int) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    window: list[tuple[int, dict[str, Any]]] = []
    for item in rows:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def compute(
    rows: Iterator[tuple[int, dict[str, Any]]],
    tokenizer: Any,
    scorers: Sequence[Callable[[Sequence[Tokenized]], np.ndarray]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    skip: set[int] | frozenset[int] = frozenset(),
    window_batches: int = WINDOW_BATCHES,
) -> Iterator[tuple[list[dict[str, Any]], dict[int, str], int]]:
    """Per window of rows: (records in row order, skipped rows with the reason, rows consumed).
    Each scorer gives two columns per pair (the policy's, then the reference's)."""
    for window in _windows((r for r in rows if r[0] not in skip), batch_size * window_batches):
        pairs: list[Tokenized] = []
        skipped: dict[int, str] = {}
        for row, example in window:
            p, c, r = tokenize_pair(tokenizer, example)
            if max_length is not None and truncation_mode == "keep_start" and len(p) >= max_length:
                skipped[row] = (f"its prompt alone has {len(p)} >= max_length = {max_length} tokens (TRL drops "
                                "such pairs)")
                continue
            cw, sw = truncate(p, c, max_length, truncation_mode)
            cl, sl = truncate(p, r, max_length, truncation_mode)
            if not sw or not sl:
                skipped[row] = "no completion token is left to score after truncation"
                continue
            pairs.append(Tokenized(row, cw, sw, cl, sl))
        order = sorted(range(len(pairs)), key=lambda i: pairs[i].size)
        values = np.empty((len(pairs), 2 * len(scorers)))
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            batch = [pairs[i] for i in idx]
            for k, scorer in enumerate(scorers):
                values[idx, 2 * k:2 * k + 2] = scorer(batch)
        records = []
        for i, pair in enumerate(pairs):
            rec: dict[str, Any] = {"row": pair.row, "chosen_length": len(pair.scored_w),
                                   "rejected_length": len(pair.scored_l)}
            names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
            rec.update({name: float(values[i, k]) for k, name in enumerate(names[:values.shape[1]])})
            records.append(rec)
        yield records, skipped, len(window)


def logps(
    data: str | os.PathLike,
    model: str,
    *,
    ref_model: str | None = None,
    out: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    device: str | None = None,
    dtype: str = "float32",
    progress: bool = False,
    share_prompt: bool = True,
    window_batches: int = WINDOW_BATCHES,
) -> LogpsSummary:
    """Compute the audit's TRL columns for a preference file (see the module docstring). With
    ``out`` the rows are appended to that JSON Lines or CSV file a window at a time, and rows
    it already holds are skipped; without it they are returned in ``records``. Pairs are sorted
    by length and written ``window_batches`` batches at a time; ``share_prompt=False`` runs every
    sequence whole (the reference the shared-prompt path is tested against)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LogpsError(f"--batch-size must be a whole number >= 1, not {batch_size!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 2):
        raise LogpsError(f"--max-length must be a whole number >= 2 (tokens), not {max_length!r}")
    if truncation_mode not in TRUNCATION_MODES:
        raise LogpsError(f"--truncation-mode {truncation_mode!r}: use {' or '.join(TRUNCATION_MODES)}")
    path = Path(data)
    columns = [c for c in OUTPUT_COLUMNS if ref_model is not None or not c.startswith("ref_")]
    out_path = Path(out) if out is not None else None
    done: set[int] = set()
    if out_path is not None:
        _out_format(out_path)
        if out_path.resolve() == path.resolve():
            raise LogpsError("--out is the input file; choose another file")
        done = _done_rows(out_path, columns)
    rows = _rows(path)  # the header is read and checked before any model is loaded
    first = next(rows, None)
    if first is None:
        raise LogpsError(f"{path}: no rows")
    dev = resolve_device(device)
    policy, tokenizer = load(model, device=dev, dtype=dtype)
    scorers = [Scorer(policy, _pad_id(tokenizer), share_prompt=share_prompt)]
    if ref_model is not None:
        reference, _ = load(ref_model, device=dev, dtype=dtype, tokenizer=False)
        scorers.append(Scorer(reference, _pad_id(tokenizer), share_prompt=share_prompt))
    summary = LogpsSummary(source=str(path), out=None if out_path is None else str(out_path), model=model,
                           ref_model=ref_model, eos=_eos_note(tokenizer), rows_resumed=len(done),
                           settings={"batch_size": batch_size, "max_length": max_length,
                                     "truncation_mode": truncation_mode, "device": dev, "dtype": dtype})
    writer = None if out_path is None else _Writer(out_path, columns, fresh=not done)
    bar = _bar(path, len(done)) if progress else None
    start = time.perf_counter()
    try:
        for records, skipped, consumed in compute(
            _chain(first, rows), tokenizer, scorers, batch_size=batch_size, max_length=max_length,
            truncation_mode=truncation_mode, skip=done, window_batches=window_batches,
        ):
            _check_finite(records)
            if writer is not None:
                writer.write(records)
            summary.rows_written += len(records)
            summary.skipped.update(skipped)
            summary.tokens += sum(r["chosen_length"] + r["rejected_length"] for r in records)
            if out_path is None:
                summary.records.extend(records)
            if bar is not None:
                bar.update(consumed)
    finally:
        summary.seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
    return summary


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _bar(path: Path, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return None
    total = None
    with contextlib.suppress(OSError, GradlabError):
        total = count_rows(path)
    return tqdm(total=total, initial=initial, unit="pair", desc="gradlab logps", file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def _check_finite(records: Sequence[Mapping[str, Any]]) -> None:
    """A non-finite log-prob (a half-precision model overflowing, say) stops the run before its
    window is written: the rows already written stay valid."""
    for rec in records:
        for k, v in rec.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise LogpsError(f"row {rec['row']}: {k} is {v}; nothing of this window was written. Try "
                                 "--dtype float32")


def as_pairs(summary: LogpsSummary) -> io.Pairs:
    """The rows a run returned (``out=None``) as the audit's :class:`~gradlab.audit.io.Pairs`."""
    recs = summary.records
    if not recs:
        raise LogpsError(f"{summary.source}: no pair could be scored, so there is nothing to audit")
    col = {k: np.array([r[k] for r in recs], dtype=np.float64) for k in recs[0] if k != "row"}
    pairs = io.pairs_from_arrays(
        len_w=col["chosen_length"], len_l=col["rejected_length"], lp_w=col["chosen_logps"],
        lp_l=col["rejected_logps"], ref_w=col.get("ref_chosen_logps"), ref_l=col.get("ref_rejected_logps"),
        length_source=f"tokens scored by gradlab logps (TRL {TRL_VERSION} tokenisation)",
    )
    return replace(pairs, source=summary.source)
