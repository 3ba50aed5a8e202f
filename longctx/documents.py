"""Documents: read dataset files, tokenize and truncate their records, and count every token in the ledger.

Formats (one per file, detected from the first record's keys):
  {"text": str}                                     plain LM
  {"messages": [{"role", "content"}, ...]}          chat ({"conversations": [{"from", "value"}]}: ShareGPT's shape)
  {"prompt": str, "response": str}                  prompt and response

What each format trains on, and how an SFT document keeps its answer when cut, is longctx.tokenization.

Documents longer than max_seq_len (--truncation truncate): plain text keeps its first max_seq_len
tokens; SFT documents (chat, prompt/response) by default keep what is supervised (--sft-truncation
context). The ledger counts every cut, drop, conversation without an assistant turn and empty response,
per file and with the reason; too many unusable SFT documents in a file stop the run (--sft-drop-limit).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import LongctxError
from .tokenization import IGNORE, chat_roles, check_roles, tokenize_messages, tokenize_prompt_response, tokenize_text

FORMATS = {"text": ("text",), "messages": ("messages",), "prompt_response": ("prompt", "response")}
SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
SFT_FORMATS = ("messages", "prompt_response")
# (magic bytes, what the file is, the command that undoes it)
COMPRESSED = ((b"\x1f\x8b", "gzip-compressed", "gunzip -k"), (b"BZh", "bzip2-compressed", "bunzip2 -k"),
              (b"\xfd7zXZ\x00", "xz-compressed", "unxz -k"), (b"\x28\xb5\x2f\xfd", "zstd-compressed", "zstd -d"),
              (b"PK\x03\x04", "a zip archive", "unzip"))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def _json_error(path, line: int, e: json.JSONDecodeError) -> LongctxError:
    # json's own messages may end in "at" ("Unterminated string starting at", "Invalid control character at")
    where = f"{e.msg} column {e.colno}" if e.msg.endswith(" at") else f"{e.msg} at column {e.colno}"
    return LongctxError(f"{path}:{line}: malformed JSON ({where}). Fix or remove that record.")


def _not_utf8(path, line: int, raw: bytes, e: UnicodeDecodeError) -> LongctxError:
    return LongctxError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}). "
                        "Datasets must be UTF-8 JSON; re-encode the file (e.g. iconv -t UTF-8) or fix that line.")


def sniff(path: Path) -> None:
    """Refuse a compressed or binary file by its first bytes, before a parser chokes on it, saying what the
    file is and what to do."""
    with path.open("rb") as f:
        head = f.read(8192)
    suffix = path.suffix.lower()
    for magic, what, undo in COMPRESSED:
        if head.startswith(magic):
            raise LongctxError(f"{path}: the file is {what}, not a plain {suffix} file. Decompress it first "
                               f"({undo} {path.name}) and pass the decompressed file.")
    if SUFFIXES.get(suffix) == "json":
        if head.startswith(b"PAR1"):
            raise LongctxError(f"{path}: this is a Parquet file, not JSON text; rename it to {path.stem}.parquet")
        if head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff"):
            raise LongctxError(f"{path}: this is an Arrow file, not JSON text; rename it to {path.stem}.arrow")
        if b"\x00" in head:
            raise LongctxError(f"{path}: a binary file (NUL bytes in its first {len(head):,} bytes), not UTF-8 JSON "
                               "text. Pass a .jsonl/.json file in UTF-8, or a .parquet/.arrow file under its own "
                               "suffix.")
    elif suffix == ".parquet" and not head.startswith(b"PAR1"):
        hint = (f"; it starts like JSON text: rename it to {path.stem}.jsonl"
                if head.lstrip()[:1] in (b"{", b"[") else "")
        raise LongctxError(f"{path}: not a Parquet file (no PAR1 header){hint}")


def iter_json_lines(path: Path):
    """(line number, object) of each record of a JSON-lines file; a bad line stops with file:line and why."""
    with Path(path).open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, n, raw, e) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _json_error(path, n, e) from None
            if not isinstance(obj, dict):
                raise LongctxError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def _scan_json_lines(path: Path) -> list[int]:
    """Validate a JSON-lines file line by line; return the line number of each record."""
    return [n for n, _ in iter_json_lines(path)]


def first_non_space(path: Path) -> bytes:
    with path.open("rb") as f:
        while chunk := f.read(65536):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1]
    return b""


def _json_lines_or_array(path: Path) -> list[int]:
    """A .json file may be JSON lines or one JSON array of objects."""
    if first_non_space(path) != b"[":
        return _scan_json_lines(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        bad = UnicodeDecodeError(e.encoding, e.object, e.start - line_start, e.end - line_start, e.reason)
        raise _not_utf8(path, raw.count(b"\n", 0, e.start) + 1, raw[line_start:], bad) from None
    try:
        arr = json.loads(text)
    except json.JSONDecodeError as e:
        raise _json_error(path, e.lineno, e) from None
    for i, obj in enumerate(arr):
        if not isinstance(obj, dict):
            raise LongctxError(f"{path}: element {i} is {type(obj).__name__}, expected an object")
    return list(range(1, len(arr) + 1))


# ShareGPT's speaker names that are not chat-template roles; any other "from" is kept as the role.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "bot": "assistant"}
SHAREGPT_NOTE = "ShareGPT conversations ({from, value}) read as messages: human -> user, gpt -> assistant"


@dataclass
class Source:
    """One dataset file (or `datasets.save_to_disk` directory) as an Arrow-backed, memory-mapped table: records
    are read in slices, never all at once."""

    name: str                      # shown in the ledger and in sample ids ("name:line")
    fmt: str                       # text | messages | prompt_response
    table: Any                     # a datasets.Dataset holding only the format's columns
    lines: Optional[np.ndarray]    # the JSON line of each record; None: records are rows ("name:rowN")
    sharegpt: bool = False

    @property
    def num_rows(self) -> int:
        return len(self.table)

    @property
    def arrow(self):
        """The pyarrow Table behind the dataset (memory-mapped or in memory)."""
        data = self.table.data
        return data.table if hasattr(data, "table") else data

    def where(self, i: int) -> str:
        return f"{self.name}:{self.lines[i]}" if self.lines is not None else f"{self.name}:row{i}"

    def read(self, start: int, stop: int) -> tuple[list[dict], list[str]]:
        """Records start..stop-1 as dicts, and their locations."""
        cols = self.table[start:stop]
        keys = list(cols)
        records = [dict(zip(keys, vals)) for vals in zip(*(cols[k] for k in keys))]
        where = [self.where(i) for i in range(start, stop)]
        if self.sharegpt:
            records = [{"messages": sharegpt_messages(r["conversations"], loc)} for r, loc in zip(records, where)]
        return records, where

    def check(self, tok, batch: int = 4096) -> None:
        """Stop on a bad record before anything is tokenized. Arrow's schema and null counts settle most files at
        once; otherwise (and for unknown chat roles) the records are scanned for the first bad one's location."""
        import pyarrow as pa
        import pyarrow.compute as pc

        arrow = self.arrow
        clean = not self.sharegpt and all(arrow.column(k).null_count == 0 for k in FORMATS[self.fmt])
        if clean and self.fmt == "messages":
            col = arrow.column("messages")
            typ = col.type
            clean = (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_struct(typ.value_type) \
                and all(typ.value_type.get_field_index(f) >= 0 and pa.types.is_string(typ.value_type.field(f).type)
                        for f in ("role", "content"))
            if clean:
                flat = pc.list_flatten(col)
                clean = all(pc.struct_field(flat, f).null_count == 0 for f in ("role", "content")) \
                    and flat.null_count == 0
        elif clean:
            clean = all(pa.types.is_string(arrow.column(k).type) or pa.types.is_large_string(arrow.column(k).type)
                        for k in FORMATS[self.fmt])
        unknown_roles = False
        if self.fmt == "messages":
            if not getattr(tok, "chat_template", None):
                raise LongctxError(f"{self.where(0)}: chat data ({{'messages'}}) needs a tokenizer with a chat "
                                   "template")
            if clean:
                found = pc.unique(pc.struct_field(pc.list_flatten(arrow.column("messages")), "role")).to_pylist()
                unknown_roles = not set(found) <= chat_roles(tok)
        if clean and not unknown_roles:
            return
        for start in range(0, self.num_rows, batch):
            records, where = self.read(start, min(self.num_rows, start + batch))
            validate_records(records, where, self.fmt)
            if self.fmt == "messages":
                check_roles([r["messages"] for r in records], where, chat_roles(tok))

def sharegpt_messages(turns, loc: str) -> list[dict]:
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("from"), str)
                                              and isinstance(t.get("value"), str) for t in turns):
        raise LongctxError(f"{loc}: 'conversations' must be a list of {{'from': str, 'value': str}}")
    return [{"role": SHAREGPT_ROLES.get(t["from"], t["from"]), "content": t["value"]} for t in turns]


def open_source(path_str: str, workdir: str) -> Source:
    """Open one dataset file, or a directory written by `datasets.save_to_disk`, checking it first; the Arrow
    copy `datasets` makes of a JSON or Parquet file goes under `workdir`, which must outlive the Source."""
    path = Path(path_str)
    if not path.exists():
        raise LongctxError(f"dataset not found: {path_str}")
    import datasets

    datasets.disable_progress_bars()
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise LongctxError(f"dataset {path_str}: a directory must be one written by datasets' save_to_disk; "
                               "otherwise pass its .jsonl/.json/.parquet/.arrow files")
        try:
            table = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - datasets' errors: report the directory, keep the cause
            raise LongctxError(f"dataset {path_str}: cannot load it with datasets.load_from_disk "
                               f"({type(e).__name__}: {e})") from None
        if isinstance(table, datasets.DatasetDict):
            if "train" not in table:
                raise LongctxError(f"dataset {path_str}: a DatasetDict without a 'train' split "
                                   f"(splits: {', '.join(table)}); save the split to train on by itself")
            table = table["train"]
        lines = None
    else:
        if path.suffix.lower() not in SUFFIXES:
            raise LongctxError(f"dataset {path_str}: expected a .jsonl, .json, .parquet or .arrow file, or a "
                               "directory written by datasets' save_to_disk")
        builder = SUFFIXES[path.suffix.lower()]
        sniff(path)
        lines = _json_lines_or_array(path) if builder == "json" else None
        if lines is not None and not lines:
            raise LongctxError(f"dataset {path_str} is empty (no records)")
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=workdir)
        except Exception as e:  # pyarrow/datasets errors: report the file, keep the cause
            cause = e.__cause__ or e
            raise LongctxError(f"dataset {path_str}: cannot read ({type(cause).__name__}: {cause})") from None
    if len(table) == 0:
        raise LongctxError(f"dataset {path_str} is empty (no records)")
    if lines is not None and len(lines) != len(table):
        lines = None
    lines = None if lines is None else np.asarray(lines, dtype=np.int64)
    name = path.name
    first = table[0]
    fmt, sharegpt = detect_format(first, f"{name}:{lines[0] if lines is not None else 'row0'}", path_str)
    columns = ["conversations"] if sharegpt else list(FORMATS[fmt])
    return Source(name, fmt, table.select_columns(columns), lines, sharegpt)


def read_records(path_str: str) -> tuple[list[dict], list[str]]:
    """All records of one dataset file and their locations ("file:line"), in memory (small files)."""
    with tempfile.TemporaryDirectory(prefix="longctx-ds-") as tmp:
        source = open_source(path_str, tmp)
        return source.read(0, source.num_rows)


def detect_format(first: dict, where: str, path: str) -> tuple[str, bool]:
    """The file's format from its first record's keys: (format, whether it is ShareGPT's shape of chat)."""
    keys = {k for k, v in first.items() if v is not None}
    for fmt, need in FORMATS.items():
        if set(need) <= keys:
            return fmt, False
    if "conversations" in keys:
        return "messages", True
    raise LongctxError(f"{where}: cannot tell the format of {path}: expected keys 'text', 'messages', "
                       f"'prompt'+'response' or 'conversations' (ShareGPT), found {sorted(keys)}")


def validate_records(records: list[dict], where: Sequence[str], fmt: str) -> None:
    for rec, loc in zip(records, where):
        for k in FORMATS[fmt]:
            if rec.get(k) is None:
                raise LongctxError(f"{loc}: missing '{k}' (the file's format is {fmt!r}, from its first record)")
        if fmt == "messages":
            msgs = rec["messages"]
            if not isinstance(msgs, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise LongctxError(f"{loc}: 'messages' must be a list of {{'role': str, 'content': str}}")
        else:
            for k in FORMATS[fmt]:
                if not isinstance(rec[k], str):
                    raise LongctxError(f"{loc}: '{k}' must be a string, got {type(rec[k]).__name__}")


# --------------------------------------------------------------------------------------------
# Documents, ledger
# --------------------------------------------------------------------------------------------

@dataclass
class Doc:
    sample_id: str
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where not a target

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_supervised(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass
class Ledger:
    """Token accounting, printed at start and saved in the run directory.

    Per file: documents, tokens_raw, tokens_kept, tokens_truncated, tokens_dropped, targets_kept;
    docs_truncated (over max_seq_len and cut: docs_context_cut of them kept their answer whole,
    docs_answer_cut lost part of it, the rest are plain text cut at the end), docs_dropped_too_long
    (--truncation drop), docs_dropped_no_targets (nothing supervised: docs_no_assistant of them are
    conversations without an assistant turn), docs_empty_response (an empty response or assistant turn,
    kept: only the end-of-turn tokens are targets).
    """

    per_file: dict[str, dict[str, int]] = field(default_factory=dict)
    packing: dict[str, Any] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)  # per file: how it was read (ShareGPT, sampling)

    def add(self, name: str, **counts: int) -> None:
        row = self.per_file.setdefault(name, {})
        for k, v in counts.items():
            row[k] = row.get(k, 0) + int(v)

    def total(self) -> dict[str, int]:
        tot: dict[str, int] = {}
        for row in self.per_file.values():
            for k, v in row.items():
                tot[k] = tot.get(k, 0) + v
        return tot

    def why(self, name: str) -> list[str]:
        """What happened to the documents of one file that were cut, dropped or are suspect, and why."""
        r = self.per_file.get(name, {})
        g = lambda k: r.get(k, 0)  # noqa: E731
        end_cut = g("docs_truncated") - g("docs_context_cut") - g("docs_answer_cut")
        parts = [
            (g("docs_context_cut"), "over --max-seq-len: context cut, answer kept"),
            (g("docs_answer_cut"), "over --max-seq-len: part of the answer cut"),
            (end_cut, "over --max-seq-len: cut at the end"),
            (g("docs_dropped_too_long"), "over --max-seq-len: dropped (--truncation drop)"),
            (g("docs_no_assistant"), "without an assistant turn: dropped"),
            (g("docs_dropped_no_targets") - g("docs_no_assistant"), "with no supervised token left: dropped"),
            (g("docs_empty_response"), "with an empty response: kept, only the end-of-turn tokens are targets"),
        ]
        return [f"{n:,} {what}" for n, what in parts if n]

    def format(self) -> str:
        cols = ["documents", "tokens_raw", "tokens_kept", "tokens_truncated", "tokens_dropped",
                "docs_truncated", "docs_dropped_too_long", "docs_dropped_no_targets", "targets_kept"]
        head = f"{'source':<28}" + "".join(f"{c:>14}" for c in ["docs", "raw", "kept", "truncated", "dropped",
                                                                  "docs_trunc", "drop_long", "drop_notgt",
                                                                  "targets"])
        lines = ["token ledger", head]
        for name, row in list(self.per_file.items()) + [("TOTAL", self.total())]:
            lines.append(f"{name[:27]:<28}" + "".join(f"{row.get(c, 0):>14,}" for c in cols))
        whys = [(name, self.why(name)) for name in self.per_file]
        if any(w for _, w in whys):
            lines.append("documents cut, dropped or suspect, and why:")
            for name, w in whys:
                if w:
                    fmt = f" ({self.formats[name]})" if name in self.formats else ""
                    lines.append(f"  {name}{fmt}: " + "; ".join(w))
        else:
            lines.append("documents cut, dropped or suspect: none")
        for name, notes in self.notes.items():
            lines += [f"  {name}: {n}" for n in notes]
        for k, v in self.packing.items():
            lines.append(f"  {k}: {v:.2%}" if isinstance(v, float) else f"  {k}: {v:,}" if isinstance(v, int)
                         else f"  {k}: {v}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"per_file": self.per_file, "total": self.total(), "packing": self.packing, "formats": self.formats,
                "notes": self.notes, "why": {name: self.why(name) for name in self.per_file}}

    def check_sft(self, limit: float, what: str = "training") -> None:
        """Stop when more than `limit` of an SFT file's documents are unusable: dropped (too long, no assistant
        turn, nothing supervised left) or with an empty response."""
        problems = []
        for name, r in self.per_file.items():
            if self.formats.get(name) not in SFT_FORMATS or not r.get("documents"):
                continue
            bad = sum(r.get(k, 0) for k in ("docs_dropped_too_long", "docs_dropped_no_targets",
                                            "docs_empty_response"))
            if bad / r["documents"] > limit:
                problems.append(f"{name}: {bad:,} of {r['documents']:,} documents ({bad / r['documents']:.0%}): "
                                + "; ".join(self.why(name)))
        if problems:
            raise LongctxError(
                f"too many unusable SFT documents in the {what} data (more than --sft-drop-limit {limit:g} of a "
                "file):\n  " + "\n  ".join(problems) + "\nFix the data (roles, empty responses), raise "
                "--max-seq-len, or pass --sft-drop-limit 1 to train on what is left.")


def load_docs(paths: Sequence[str], tok, max_seq_len: int, truncation: str, ledger: Ledger,
              sft_truncation: str = "context") -> list[Doc]:
    """Read, tokenize and truncate every file in memory; count everything in the ledger. The training path
    (datastore.prepare) runs the same `tokenize_records` batch by batch into a memory-mapped cache; this is
    for small files (tests, tools).

    truncation (over max_seq_len): truncate | drop | error. sft_truncation (with truncate, for chat and
    prompt/response): context (keep the answer, cut the context) | end (keep the first max_seq_len tokens)."""
    docs: list[Doc] = []
    for path in paths:
        with tempfile.TemporaryDirectory(prefix="longctx-ds-") as tmp:
            source = open_source(path, tmp)
            source.check(tok)
            ledger.formats[source.name] = source.fmt
            ledger.add(source.name, docs_no_assistant=0, docs_empty_response=0, docs_context_cut=0,
                       docs_answer_cut=0)
            records, where = source.read(0, source.num_rows)
        docs += tokenize_records(tok, records, where, source.fmt, source.name, max_seq_len, truncation,
                                 sft_truncation, ledger)
    return docs


def tokenize_records(tok, records: list[dict], where: Sequence[str], fmt: str, name: str, max_seq_len: int,
                     truncation: str, sft_truncation: str, ledger: Ledger) -> list[Doc]:
    """Tokenize, truncate and label one batch of a file's records (of format `fmt`, checked by Source.check first);
    count them in the ledger under `name`. Documents left without a target are counted and dropped."""
    fit = max_seq_len if truncation == "truncate" and sft_truncation == "context" else None
    flags: list[dict[str, int]] = [{} for _ in records]
    if fmt == "text":
        items = tokenize_text(tok, [r["text"] for r in records])
    elif fmt == "prompt_response":
        items = tokenize_prompt_response(tok, [r["prompt"] for r in records], [r["response"] for r in records],
                                         fit=fit)
        for f, r in zip(flags, records):
            if not r["response"].strip():
                f["docs_empty_response"] = 1
    else:
        items = tokenize_messages(tok, [r["messages"] for r in records], where, fit=fit)
        for f, r in zip(flags, records):
            answers = [m for m in r["messages"] if m["role"] == "assistant"]
            if not answers:
                f["docs_no_assistant"] = 1
            elif any(not m["content"].strip() for m in answers):
                f["docs_empty_response"] = 1
    docs: list[Doc] = []
    for item, loc, flag in zip(items, where, flags):
        ids, labels, n = item.ids, item.labels, item.raw_len
        ledger.add(name, documents=1, tokens_raw=n, **flag)
        if item.cut:
            ledger.add(name, tokens_truncated=n - len(ids), docs_truncated=1, **{f"docs_{item.cut}_cut": 1})
        elif n > max_seq_len:
            if truncation == "error":
                raise LongctxError(f"{loc}: document has {n:,} tokens > --max-seq-len {max_seq_len:,} "
                                   "(--truncation error); use --truncation truncate or drop")
            if truncation == "drop":
                ledger.add(name, tokens_dropped=n, docs_dropped_too_long=1)
                continue
            ledger.add(name, tokens_truncated=n - max_seq_len, docs_truncated=1)
            if fmt != "text" and any(t != IGNORE for t in labels[max_seq_len:]):
                ledger.add(name, docs_answer_cut=1)
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        doc = Doc(loc, np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32))
        if doc.n_supervised == 0:
            ledger.add(name, tokens_dropped=len(doc), docs_dropped_no_targets=1)
            continue
        ledger.add(name, tokens_kept=len(doc), targets_kept=doc.n_supervised)
        docs.append(doc)
    return docs
