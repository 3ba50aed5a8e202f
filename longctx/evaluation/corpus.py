"""Text for the perplexity evaluation.

  --ppl-data FILE.jsonl   one document per {"text": ...} record
  --ppl-data FILE         a text file (one document)
  --ppl-data DIR          every .txt/.md/.rst/.py file under it, sorted by path (one document each)
  (nothing)               the Python standard library's own .py sources (sysconfig's "stdlib" path),
                          sorted by path: text every machine already has, read at run time, never committed

Documents are then cut into windows of exactly seq_len tokens (bos first, where the tokenizer has one).
A document shorter than seq_len is continued by the next ones (joined by a blank line), so a window is a
long stretch of contiguous text even when the files are short.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from ..documents import iter_json_lines
from ..errors import LongctxError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py"}
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def texts(path: str = "") -> Iterator[str]:
    """The documents of --ppl-data (or of the standard library), lazily, in a fixed order."""
    if not path:
        files = stdlib_files()
        if not files:
            raise LongctxError(f"no .py files under the standard library path {sysconfig.get_paths()['stdlib']}; "
                               "give --ppl-data")
        yield from (_read(p) for p in files)
        return
    p = Path(path)
    if p.is_dir():
        files = sorted((f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES),
                       key=lambda f: f.relative_to(p).as_posix())
        yield from (_read(f) for f in files)
    elif p.suffix.lower() == ".jsonl":
        with p.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    yield json.loads(line)["text"]
    else:
        yield _read(p)


def check(path: str) -> None:
    """Cheap checks before any model is loaded."""
    if not path:
        return
    p = Path(path)
    if not p.exists():
        raise LongctxError(f"--ppl-data {path}: not found")
    if p.is_dir():
        if not any(f.suffix.lower() in TEXT_SUFFIXES for f in p.rglob("*") if f.is_file()):
            raise LongctxError(f"--ppl-data {path}: no {'/'.join(sorted(TEXT_SUFFIXES))} files in the directory")
    elif p.suffix.lower() == ".jsonl":
        for n, rec in iter_json_lines(p):
            if not isinstance(rec.get("text"), str):
                raise LongctxError(f"{path}:{n}: expected an object with a string 'text'")


def windows(docs: Iterable[str], tok, seq_len: int, n: int) -> list[list[int]]:
    """Up to n windows of exactly seq_len tokens, each from one document or a run of consecutive ones."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    sep = list(tok("\n\n", add_special_tokens=False)["input_ids"])
    out: list[list[int]] = []
    buf: list[int] = []
    for text in docs:
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        buf = buf + sep + ids if buf else bos + ids
        if len(buf) >= seq_len:
            out.append(buf[:seq_len])
            buf = []
            if len(out) == n:
                break
    if not out:
        raise LongctxError(f"the perplexity corpus has fewer than {seq_len:,} tokens in all; lower --ppl-seq-len")
    return out
