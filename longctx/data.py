"""Data: read files, tokenize with label masks, truncate, pack, plan batches, collate.

Formats (one per file, detected from the first record's keys):
  {"text": str}                                     plain LM; every token after the first is a target
  {"messages": [{"role", "content"}, ...]}          chat via the tokenizer's chat template; targets are
                                                    the assistant turns (content + end-of-turn tokens)
  {"prompt": str, "response": str}                  targets are the response (+ eos)

Chat roles must be ones the tokenizer's chat template knows (system, user, assistant and any role the
template names); anything else is an error naming file and line.

Documents longer than max_seq_len (--truncation truncate): plain text keeps its first max_seq_len
tokens. SFT documents (chat, prompt/response) by default keep what is supervised (--sft-truncation
context): a prompt loses its middle; a conversation loses the middle of its longest user turn when
that turn can absorb the excess, else its earliest non-system exchanges, then the middle of the
longest user turn. Only an answer that cannot fit at all is cut. The ledger counts every cut, drop,
conversation without an assistant turn and empty response, per file and with the reason; too many
unusable SFT documents in a file stop the run (--sft-drop-limit).

Labels use the Hugging Face convention that the loss shifts internally: labels[t] is the target for
the logits at t-1, so labels[t] == -100 means "token t is not predicted". The first token of every
document is always -100; in a packed row this is what stops the last token of one document from
being trained to predict the first token of the next. Attention is separated by position_ids, which
restart at 0 for every document (and for the padding tail of a packed row).

Batches are planned, not streamed: rows are fixed once (packing is deterministic), the row order of
epoch e is a permutation seeded by (seed, e), and optimizer step s uses the s-th slice of that order.
So the data position is just the step number, which makes resume exact.
"""

from __future__ import annotations

import bisect
import difflib
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import LongctxError

IGNORE = -100
FORMATS = {"text": ("text",), "messages": ("messages",), "prompt_response": ("prompt", "response")}
SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
SFT_FORMATS = ("messages", "prompt_response")
STANDARD_ROLES = ("system", "user", "assistant")
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


def _first_non_space(path: Path) -> bytes:
    with path.open("rb") as f:
        while chunk := f.read(65536):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1]
    return b""


def _json_lines_or_array(path: Path) -> list[int]:
    """A .json file may be JSON lines or one JSON array of objects."""
    if _first_non_space(path) != b"[":
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
# Tokenization
# --------------------------------------------------------------------------------------------

@dataclass
class Tokenized:
    """One tokenized document, before or after an SFT cut."""

    ids: Sequence[int]     # a list, or an int32 array (plain text: its documents can be millions of tokens)
    labels: Sequence[int]
    raw_len: int  # tokens before any cut
    cut: str | None = None  # None; "context" (over the limit, the answer kept whole); "answer" (some of it cut)


def _special(tok, name: str) -> list[int]:
    tid = getattr(tok, f"{name}_token_id", None)
    return [] if tid is None else [int(tid)]


def middle_cut(seq: list, keep: int) -> list:
    """`seq` without its middle: the first half and the last half of `keep` elements (the first element, e.g. a
    BOS token, always stays when keep >= 1)."""
    if keep >= len(seq):
        return list(seq)
    if keep <= 0:
        return []
    head = max(1, keep // 2)
    tail = keep - head
    return list(seq[:head]) + (list(seq[len(seq) - tail:]) if tail else [])


def encode(tok, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without special tokens: what tok(texts, add_special_tokens=False) gives, through the
    Rust tokenizer's encode_batch_fast where there is one (no character offsets computed: 2.5x faster measured on
    the embedded tokenizer)."""
    backend = getattr(tok, "backend_tokenizer", None)
    plain = (backend is not None and hasattr(backend, "encode_batch_fast") and getattr(tok, "is_fast", False)
             and backend.truncation is None and backend.padding is None  # what tok() would switch off first
             and backend.encode_special_tokens == bool(getattr(tok, "split_special_tokens", False)))
    if plain:
        return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]
    return tok(list(texts), add_special_tokens=False)["input_ids"]


def tokenize_text(tok, texts: Sequence[str]) -> list[Tokenized]:
    bos, eos = _special(tok, "bos"), _special(tok, "eos")
    out = []
    for ids in encode(tok, texts):
        ids = np.asarray(bos + ids + eos, dtype=np.int32)
        labels = ids.copy()
        labels[0] = IGNORE
        out.append(Tokenized(ids, labels, len(ids)))
    return out


def fit_prompt_response(prompt: list[int], resp: list[int], max_len: int) -> tuple[list[int], list[int], str | None]:
    """Make bos+prompt (`prompt`) and response+eos (`resp`) fit in max_len tokens, keeping what is supervised:
    the prompt loses its middle (its start, usually the instruction, and its end, usually the question,
    stay). Only when the response leaves less than max_len/8 tokens for the prompt is the response cut too."""
    if len(prompt) + len(resp) <= max_len:
        return prompt, resp, None
    keep_min = min(len(prompt), max(1, max_len // 8))
    if len(resp) <= max_len - keep_min:
        return middle_cut(prompt, max_len - len(resp)), resp, "context"
    return middle_cut(prompt, keep_min), resp[:max_len - keep_min], "answer"


def tokenize_prompt_response(tok, prompts: Sequence[str], responses: Sequence[str],
                             fit: int | None = None) -> list[Tokenized]:
    """fit=max_len: documents over it keep their response (fit_prompt_response); None: no cut here."""
    bos, eos = _special(tok, "bos"), _special(tok, "eos")
    p_ids, r_ids = encode(tok, prompts), encode(tok, responses)
    out = []
    for p, r in zip(p_ids, r_ids):
        prompt, resp, cut = bos + list(p), list(r) + eos, None
        raw = len(prompt) + len(resp)
        if fit is not None:
            prompt, resp, cut = fit_prompt_response(prompt, resp, fit)
        out.append(Tokenized(prompt + resp, [IGNORE] * len(prompt) + resp, raw, cut))
    return out


def chat_roles(tok) -> set[str]:
    """The roles the chat template knows: system, user, assistant, and every role it compares against
    (e.g. 'tool', 'ipython' in Llama 3's)."""
    tpl = getattr(tok, "chat_template", None) or ""
    if isinstance(tpl, dict):
        tpl = "\n".join(str(v) for v in tpl.values())
    named = set(re.findall(r"""role['"]?\]?\s*(?:==|!=)\s*['"]([A-Za-z_][\w-]*)['"]""", tpl))
    named |= set(re.findall(r"""['"]([A-Za-z_][\w-]*)['"]\s*(?:==|!=)\s*[\w.\[\]'"]*role\b""", tpl))
    return set(STANDARD_ROLES) | named


def check_roles(conversations: Sequence[list[dict]], where: Sequence[str], roles: set[str]) -> None:
    for msgs, loc in zip(conversations, where):
        for i, m in enumerate(msgs):
            if m["role"] not in roles:
                close = difflib.get_close_matches(m["role"], sorted(roles), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise LongctxError(
                    f"{loc}: message {i} has role {m['role']!r}{hint}, which the tokenizer's chat template does not "
                    f"know (it knows {', '.join(sorted(roles))}). Fix the role in the data, or use a tokenizer "
                    "whose template has it.")


def assistant_char_spans(tok, messages: list[dict], loc: str) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return the text and the character spans of the assistant turns.

    The span of assistant turn i runs from the end of the prefix rendered with a generation prompt to
    the end of the conversation rendered through turn i, so it covers the content and whatever the
    template closes a turn with (e.g. <|eot_id|>). Works with any template that renders prefixes as
    prefixes (all common ones do); otherwise this is an error rather than a silent mis-mask.
    """
    def render(msgs, gen):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    try:
        full = render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(render(messages[:i], True)) if i else 0
            upto = render(messages[: i + 1], False)
            if not full.startswith(upto) or start > len(upto):
                raise LongctxError(f"{loc}: the chat template does not render conversation prefixes as "
                                   "prefixes, so assistant turns cannot be located")
            spans.append((start, len(upto)))
    except LongctxError:
        raise
    except Exception as e:
        raise LongctxError(f"{loc}: the tokenizer's chat template failed: {e}") from None
    return full, spans


def chat_tokens(tok, msgs: list[dict], loc: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation: the assistant turns are the targets."""
    text, spans = assistant_char_spans(tok, msgs, loc)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for t, (s, _) in enumerate(enc["offset_mapping"]):
        if t > 0 and any(a <= s < b for a, b in spans):
            labels[t] = ids[t]
    return ids, labels


def _cut_longest_user_turn(tok, msgs: list[dict], excess: int, min_keep: int = 2) -> list[dict] | None:
    """`msgs` with `excess` (+2 for merges at the joint) tokens cut from the middle of the longest user turn;
    None if that turn is too short to give them and keep `min_keep` of its tokens."""
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    if not users:
        return None
    u = max(users, key=lambda i: len(msgs[i]["content"]))
    content = msgs[u]["content"]
    offsets = tok(content, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    n = len(offsets)
    keep = n - excess - 2
    if keep < max(2, min_keep):
        return None
    head = keep // 2
    tail = keep - head
    cut = content[:offsets[head - 1][1]] + content[offsets[n - tail][0]:]
    return msgs[:u] + [{**msgs[u], "content": cut}] + msgs[u + 1:]


def _drop_first_exchange(msgs: list[dict]) -> list[dict] | None:
    """`msgs` without its first non-system exchange (up to the next user turn after an assistant turn); None if
    only one exchange is left."""
    first = next((i for i, m in enumerate(msgs) if m["role"] != "system"), None)
    if first is None:
        return None
    answered = False
    for j in range(first, len(msgs)):
        if msgs[j]["role"] == "assistant":
            answered = True
        elif msgs[j]["role"] == "user" and answered:
            return msgs[:first] + msgs[j:]
    return None


def fit_conversation(tok, msgs: list[dict], loc: str, max_len: int) -> Tokenized:
    """Tokenize a conversation so that it fits in max_len tokens, keeping its answers.

    In order, until it fits: drop the turns after the last assistant turn (they carry no target); cut the
    middle of the longest user turn if that turn alone can give the excess and keep max_len/8 tokens (every
    answer stays); drop the earliest non-system exchanges, keeping at least the last one; cut the middle of
    the longest user turn.
    Only if the last exchange still does not fit (a system prompt or an answer longer than the row) is the
    conversation cut at the end ("answer" when that loses targets)."""
    ids, labels = chat_tokens(tok, msgs, loc)
    raw = len(ids)
    answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if raw <= max_len or not answers:
        return Tokenized(ids, labels, raw)

    cur = msgs[:answers[-1] + 1]
    ids, labels = chat_tokens(tok, cur, loc)

    def cut_user_turn(cur, ids, labels, tries, min_keep=2):
        for _ in range(tries):
            if len(ids) <= max_len:
                break
            shorter = _cut_longest_user_turn(tok, cur, len(ids) - max_len, min_keep)
            if shorter is None:
                break
            cur = shorter
            ids, labels = chat_tokens(tok, cur, loc)
        return cur, ids, labels

    if len(ids) > max_len:
        cut = cut_user_turn(cur, ids, labels, tries=3, min_keep=max_len // 8)
        if len(cut[1]) <= max_len:
            cur, ids, labels = cut
    while len(ids) > max_len:
        shorter = _drop_first_exchange(cur)
        if shorter is None:
            break
        cur = shorter
        ids, labels = chat_tokens(tok, cur, loc)
    cur, ids, labels = cut_user_turn(cur, ids, labels, tries=3)
    if len(ids) <= max_len:
        return Tokenized(ids, labels, raw, "context")
    lost = any(t != IGNORE for t in labels[max_len:])
    return Tokenized(ids[:max_len], labels[:max_len], raw, "answer" if lost else "context")


def tokenize_messages(tok, conversations: Sequence[list[dict]], where: Sequence[str],
                      fit: int | None = None) -> list[Tokenized]:
    """fit=max_len: conversations over it keep their answers (fit_conversation); None: no cut here."""
    if not getattr(tok, "chat_template", None):
        raise LongctxError(f"{where[0]}: chat data ({{'messages'}}) needs a tokenizer with a chat template")
    check_roles(conversations, where, chat_roles(tok))
    out = []
    for msgs, loc in zip(conversations, where):
        if fit is not None:
            out.append(fit_conversation(tok, msgs, loc, fit))
        else:
            ids, labels = chat_tokens(tok, msgs, loc)
            out.append(Tokenized(ids, labels, len(ids)))
    return out


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


# --------------------------------------------------------------------------------------------
# Packing and the batch plan
# --------------------------------------------------------------------------------------------

def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each document (longest first) goes into the fullest row it fits in.

    Deterministic (ties broken by index). Returns rows as lists of document indices.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row id)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"document of {n} tokens exceeds row capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            rem, rid = free.pop(k)
        else:
            rid, rem = len(rows), capacity
            rows.append([])
        rows[rid].append(i)
        if rem - n > 0:
            bisect.insort(free, (rem - n, rid))
    return rows


class BatchPlan:
    """Which rows every rank uses at every optimizer step; a pure function of (rows, seed, sizes)."""

    def __init__(self, rows: list[list[int]], row_lengths: Sequence[int], row_targets: Sequence[int], *,
                 micro: int, accum: int, world: int, seed: int, group_by_length: bool = False):
        self.rows, self.row_lengths, self.row_targets = rows, list(row_lengths), list(row_targets)
        self.micro, self.accum, self.world, self.seed = micro, accum, world, seed
        self.group_by_length = group_by_length
        self.global_batch = micro * accum * world
        self.steps_per_epoch = len(rows) // self.global_batch
        self._order_cache: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._order_cache:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            if self.group_by_length:
                mega = self.global_batch * 16
                chunks = [order[i:i + mega] for i in range(0, len(order), mega)]
                order = np.concatenate([sorted(c, key=lambda r: -self.row_lengths[r]) for c in chunks])
            if epoch == 0:  # the longest rows make up the first step: a batch that cannot fit fails at step 0
                order = longest_first(order, self.row_lengths, self.global_batch)
            self._order_cache = {epoch: np.asarray(order)}  # keep one epoch in memory
        return self._order_cache[epoch]

    def step_rows(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        return [int(r) for r in order[i * self.global_batch:(i + 1) * self.global_batch]]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        g = self.step_rows(step)
        out = []
        for m in range(self.accum):
            start = (m * self.world + rank) * self.micro
            out.append(g[start:start + self.micro])
        return out

    def step_targets(self, step: int) -> int:
        return sum(self.row_targets[r] for r in self.step_rows(step))


def longest_first(order, lengths, k: int) -> list[int]:
    """`order` with the `k` longest rows (ties: earlier in `order`) moved to the front, longest first, the
    rest in their given (seeded) order. Deterministic, so an exact resume replays the same sequence."""
    order = [int(i) for i in order]
    pos = {r: n for n, r in enumerate(order)}
    head = sorted(order, key=lambda r: (-lengths[r], pos[r]))[:max(0, k)]
    chosen = set(head)
    return head + [r for r in order if r not in chosen]


def make_rows(lengths: Sequence[int], max_seq_len: int, packing: bool) -> list[list[int]]:
    """Rows of document indices: packed (best-fit decreasing) or one document each."""
    if packing:
        return pack(lengths, max_seq_len)
    return [[i] for i in range(len(lengths))]


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------

def collate(docs: list[Doc], rows: list[list[int]], *, pad_id: int, packing: bool, max_seq_len: int,
            flatten: bool = False) -> dict:
    """Build one micro-batch (B rows) as CPU tensors plus varlen metadata.

    Packed rows are max_seq_len long; unpacked rows are padded to the longest row in the batch.
    Padding is at the end of a row with label -100; causal attention keeps real tokens from seeing it.
    flatten=True (varlen backends) returns the B rows as one (1, B*L) row: every row starts a new
    segment (position 0), so this changes nothing for attention or loss, and transformers' own
    flash-attention path then also recognizes the packing from position_ids alone.
    """
    import torch

    lengths = [sum(len(docs[d]) for d in row) for row in rows]
    L = max_seq_len if packing else max(lengths)
    B = len(rows)
    ids = np.full((B, L), pad_id, dtype=np.int64)
    labels = np.full((B, L), IGNORE, dtype=np.int64)
    pos = np.zeros((B, L), dtype=np.int64)
    doc_lens, sample_ids = [], []
    seg_starts = []  # flattened starts of attention segments (documents and padding tails)
    for b, row in enumerate(rows):
        t = 0
        for d in row:
            doc = docs[d]
            n = len(doc)
            ids[b, t:t + n] = doc.input_ids
            labels[b, t:t + n] = doc.labels
            labels[b, t] = IGNORE  # never predict a document's first token from the previous document
            pos[b, t:t + n] = np.arange(n)
            seg_starts.append(b * L + t)
            doc_lens.append(n)
            sample_ids.append(doc.sample_id)
            t += n
        if t < L:
            pos[b, t:] = np.arange(L - t) if packing else np.arange(t, L)
            if packing:
                seg_starts.append(b * L + t)
    cu = np.asarray(seg_starts + [B * L], dtype=np.int32)
    if flatten:
        ids, labels, pos = ids.reshape(1, -1), labels.reshape(1, -1), pos.reshape(1, -1)
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(pos),
        "cu_seq_lens": torch.from_numpy(cu),
        "max_length": int(np.diff(cu).max()),
        "doc_lens": doc_lens,
        "sample_ids": sample_ids,
        "n_tokens": int(sum(lengths)),
        "n_targets": int((labels != IGNORE).sum()),
    }


# --------------------------------------------------------------------------------------------
# Everything train.py needs
# --------------------------------------------------------------------------------------------

@dataclass
class DataBundle:
    train_docs: Sequence[Doc]   # a datastore.DocStore (train.py) or a list (the benchmark's synthetic rows)
    eval_docs: Sequence[Doc]
    plan: BatchPlan
    eval_rows: list[list[int]]
    ledger: Ledger

    def step_sample_ids(self, step: int) -> list[str]:
        return [self.train_docs[d].sample_id for r in self.plan.step_rows(step) for d in self.plan.rows[r]]

    def resident_bytes(self) -> int:
        """Host RAM the data holds per rank beyond the shared, reclaimable page cache of the memory-mapped tokens:
        the documents' index and the rows (Python lists: ~100 bytes a document); in-memory documents whole."""
        def held(docs) -> int:
            if hasattr(docs, "resident_bytes"):
                return docs.resident_bytes()
            return sum(d.input_ids.nbytes + d.labels.nbytes + 200 for d in docs)
        n_rows = len(self.plan.rows) + len(self.eval_rows)
        return held(self.train_docs) + held(self.eval_docs) + 100 * (len(self.train_docs) + len(self.eval_docs)) \
            + 64 * n_rows


# RAM a rank holds per training document of prepared data (datastore index ~60 B, its place in the rows ~100 B, the
# row lists): DataBundle.resident_bytes counts it exactly once the data is built; this is for estimates before that.
RESIDENT_BYTES_PER_DOC = 250


def estimate_resident_bytes(entries: Sequence[str]) -> int:
    """What a rank will hold of these files once prepared, before they are read: records (JSON lines, Parquet rows)
    x RESIDENT_BYTES_PER_DOC. Files it cannot count cheaply (a JSON array, Arrow, a save_to_disk directory) add 0."""
    records = 0
    for path in (Path(p) for p in parse_data_spec(entries)[0]):
        suffix = path.suffix.lower()
        try:
            if suffix == ".jsonl" or (suffix == ".json" and _first_non_space(path) != b"["):
                with path.open("rb") as f:
                    records += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))
            elif suffix == ".parquet":
                import pyarrow.parquet as pq

                records += pq.ParquetFile(path).metadata.num_rows
        except (OSError, ValueError):
            continue
    return records * RESIDENT_BYTES_PER_DOC


def doc_lengths(docs: Sequence[Doc]) -> list[int]:
    return [int(n) for n in docs.lengths] if hasattr(docs, "lengths") else [len(d) for d in docs]


def doc_targets(docs: Sequence[Doc]) -> list[int]:
    return [int(n) for n in docs.targets] if hasattr(docs, "targets") else [d.n_supervised for d in docs]


def parse_data_spec(entries: Sequence[str]) -> tuple[list[str], Optional[list[float]]]:
    """`--data a.jsonl:0.7 b.parquet:0.3`: the paths, and their sampling weights (None when none is given). A
    weight is what follows the last ':' when that is a number and the path before it exists."""
    paths, weights = [], []
    for e in entries:
        head, sep, tail = str(e).rpartition(":")
        try:
            w = float(tail) if sep and Path(head).exists() and not Path(e).exists() else None
        except ValueError:
            w = None
        if w is not None and not (w > 0 and np.isfinite(w)):
            raise LongctxError(f"--data {e}: a sampling weight must be a positive number")
        paths.append(head if w is not None else str(e))
        weights.append(w)
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        raise LongctxError("--data: give a sampling weight to every file or to none (e.g. --data a.jsonl:0.7 "
                           f"b.jsonl:0.3); missing for {', '.join(p for p, g in zip(paths, given) if not g)}")
    return paths, (weights if all(given) else None)


def mix(docs, files: np.ndarray, names: Sequence[str], weights: Sequence[float], seed: int,
        ledger: Ledger) -> np.ndarray:
    """The positions of `docs` one epoch trains on when file f gets weights[f] / sum(weights) of the training
    tokens: each file's documents in a seeded order, repeated as often as its share needs (whole documents, so
    the share is met to within one document). Noted per file in the ledger."""
    lengths = np.asarray(doc_lengths(docs), dtype=np.int64)
    total, wsum = int(lengths.sum()), float(sum(weights))
    chosen = []
    for f, (name, w) in enumerate(zip(names, weights)):
        own = np.flatnonzero(files == f)
        if not len(own):
            continue
        target = w / wsum * total
        order = own[np.random.default_rng([seed, 11, f]).permutation(len(own))]
        cum = np.cumsum(lengths[order])
        reps, rest = divmod(target, float(cum[-1]))
        head = order[:int(np.searchsorted(cum, rest)) + 1] if rest > 0 or not reps else order[:0]
        pick = np.concatenate([np.tile(order, int(reps)), head])
        chosen.append(pick)
        ledger.notes.setdefault(name, []).append(
            f"sampling weight {w:g}: {len(pick):,} documents, {int(lengths[pick].sum()):,} tokens per epoch "
            f"({lengths[pick].sum() / max(1, total):.1%} of the training tokens; {len(own):,} documents available)")
    return np.concatenate(chosen)


def build(cfg, tok, world_size: int, say=print, announce=print) -> DataBundle:
    """The training (and evaluation) documents, prepared once into the data cache (datastore), the eval split,
    per-file sampling weights, rows and the batch plan. `say` prints on rank 0; `announce` prints from whichever
    process prepares the data."""
    from . import datastore

    paths, weights = parse_data_spec(cfg.data)
    opts = datastore.Options(cfg.max_seq_len, cfg.truncation, cfg.sft_truncation)
    root = datastore.cache_root(cfg.data_cache)
    store = datastore.prepare(paths, tok, opts, root, num_proc=cfg.data_workers, say=say, announce=announce)
    ledger = store.ledger
    tot = ledger.total()
    if not len(store):
        raise LongctxError(
            f"no usable training documents in {', '.join(paths)}: {tot.get('documents', 0)} read, "
            f"{tot.get('docs_dropped_no_targets', 0)} without any supervised token, "
            f"{tot.get('docs_dropped_too_long', 0)} dropped as too long")
    ledger.check_sft(cfg.sft_drop_limit)
    if cfg.eval_data:
        eval_paths, _ = parse_data_spec(cfg.eval_data)
        eval_docs = datastore.prepare(eval_paths, tok, opts, root, num_proc=cfg.data_workers, say=say,
                                      announce=announce)
        eval_docs.ledger.check_sft(cfg.sft_drop_limit, "evaluation")
        train_docs = store
    elif cfg.eval_fraction > 0 and len(store) >= 2:
        perm = np.random.default_rng([cfg.seed, 7]).permutation(len(store))
        k = min(len(store) - 1, max(1, round(cfg.eval_fraction * len(store))))
        held = np.zeros(len(store), dtype=bool)
        held[perm[:k]] = True
        eval_docs, train_docs = store.subset(np.flatnonzero(held)), store.subset(np.flatnonzero(~held))
    else:
        eval_docs, train_docs = store.subset(np.arange(0)), store
    if weights is not None:
        train_docs = train_docs.subset(mix(train_docs, train_docs.file_of(), store.names, weights, cfg.seed, ledger))

    lengths, targets = doc_lengths(train_docs), doc_targets(train_docs)
    rows = make_rows(lengths, cfg.max_seq_len, cfg.packing)
    row_len = [sum(lengths[d] for d in r) for r in rows]
    row_tgt = [sum(targets[d] for d in r) for r in rows]
    plan = BatchPlan(rows, row_len, row_tgt, micro=cfg.micro_batch_size, accum=cfg.grad_accum,
                     world=world_size, seed=cfg.seed, group_by_length=cfg.group_by_length and not cfg.packing)
    if plan.steps_per_epoch == 0:
        raise LongctxError(
            f"the training data gives {len(rows)} rows but one optimizer step needs {plan.global_batch} "
            f"(micro_batch_size {cfg.micro_batch_size} x grad_accum {cfg.grad_accum} x {world_size} ranks); "
            "add data or lower the batch size")
    eval_len = doc_lengths(eval_docs)
    eval_rows = make_rows(eval_len, cfg.max_seq_len, cfg.packing)
    # longest first: train.py runs the first eval batch before step 0, so an eval OOM shows at once
    eval_rows = [eval_rows[i] for i in longest_first(range(len(eval_rows)),
                                                      [sum(eval_len[d] for d in r) for r in eval_rows],
                                                      len(eval_rows))]

    kept = sum(row_len)
    if cfg.packing:
        padded = len(rows) * cfg.max_seq_len
    else:  # what an epoch actually pads to: the longest row of each micro-batch
        padded, order = 0, plan.epoch_order(0)
        for i in range(0, len(order), plan.micro):
            chunk = [row_len[r] for r in order[i:i + plan.micro]]
            padded += max(chunk) * len(chunk)
    ledger.packing = {
        "train documents": len(train_docs), "eval documents": len(eval_docs),
        "rows": len(rows), "row capacity (max_seq_len)": cfg.max_seq_len,
        "documents per row (mean)": f"{len(train_docs) / max(1, len(rows)):.2f}",
        "packing" if cfg.packing else "padding": "on" if cfg.packing else "per micro-batch",
        "efficiency (real tokens / row tokens)": kept / max(1, padded),
        "steps per epoch": plan.steps_per_epoch,
        "rows unused per epoch (incomplete last step)": len(rows) - plan.steps_per_epoch * plan.global_batch,
        "data cache": str(store.path),
    }
    return DataBundle(train_docs, eval_docs, plan, eval_rows, ledger)
