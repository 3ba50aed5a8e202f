"""Prepared data: every file tokenized once into a memory-mapped cache that all ranks of a node share.

    store = prepare(paths, tok, options, cache_root)   # build on a miss (one process), open on a hit
    store[i] -> documents.Doc                           # token ids memory-mapped, labels from the target mask
    store.lengths, store.targets                        # per document, in RAM (what packing and the schedule need)

A cache entry is a directory named by the hash of everything that changes its contents: each file's bytes, the
tokenizer (its vocabulary, merges, specials and chat template), the truncation options and max_seq_len, and this
code's own source (documents.py, tokenization.py and this file). Inside it:

    ids.bin     int32 token ids of every kept document, end to end
    mask.bin    uint8, 1 where the token is a target (labels are ids there, -100 elsewhere)
    docs.npz    offsets (n+1), targets, file index and JSON line (or row) of each document
    meta.json   the files, their formats, the token ledger; written last, so its presence marks the entry complete

The entry is built in a temporary directory beside it and renamed into place. An exclusive lock on
`<key>.lock` serializes the processes that want the same entry: the first builds it, the rest wait on the lock
(a message says so), then open what it wrote. A builder that dies releases the lock with its process, so the next
one builds instead: nothing waits on a dead process. Files hashed before are recognized by path, size, mtime and
inode, so a warm start does not re-read them.

Tokenization runs in worker processes (`num_proc`, default: the host's cores), over slices of each file's
Arrow table; the parent writes their results in record order, so the entry does not depend on num_proc.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .documents import SHAREGPT_NOTE, Doc, Ledger, Source, open_source, tokenize_records
from .errors import LongctxError
from .tokenization import IGNORE

FORMAT_VERSION = 1
TASK_BYTES = 4 << 20          # text a worker tokenizes per task: its token lists stay small, the cores stay busy
TASK_RECORDS = 256            # at most, per task (chat records are not sized: their text is nested)
INDEX_BYTES_PER_DOC = 8 + 8 + 2 + 8 + 8   # offsets, targets, file index, line, lengths: held in RAM per document
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "longctx" / "data"


@dataclass(frozen=True)
class Options:
    """What, besides the files and the tokenizer, changes the prepared documents."""

    max_seq_len: int
    truncation: str
    sft_truncation: str


def cache_root(configured: str = "") -> Path:
    """--data-cache, else $LONGCTX_DATA_CACHE, else ~/.cache/longctx/data."""
    return Path(configured or os.environ.get("LONGCTX_DATA_CACHE") or DEFAULT_CACHE).expanduser()


# --------------------------------------------------------------------------------------------
# The key
# --------------------------------------------------------------------------------------------

def _file_digest(path: Path, memo_dir: Path) -> str:
    """sha256 of a file's bytes (of every file, for a directory), remembered by (path, size, mtime, inode)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [(str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino) for p in files for st in [p.stat()]]
    stamp = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    memo = memo_dir / "hashes" / stamp
    if memo.is_file():
        return memo.read_text()
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path)).encode() if path.is_dir() else b"")
        with p.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(digest)
    os.replace(tmp, memo)
    return digest


def tokenizer_fingerprint(tok) -> str:
    """Everything of the tokenizer that decides token ids: the fast tokenizer's full serialization (vocabulary,
    merges, normalizer, pre-tokenizer, added tokens), the chat template and the special tokens."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    extra = json.dumps({"class": type(tok).__name__, "chat_template": getattr(tok, "chat_template", None),
                        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
                        "bos": tok.bos_token_id, "eos": tok.eos_token_id}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode() + extra.encode()).hexdigest()


def _code_version() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256(str(FORMAT_VERSION).encode())
    for name in ("documents.py", "tokenization.py", "datastore.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()


def files_digest(paths: Sequence[str], root: Path) -> list[list[str]]:
    """[name, sha256 of the bytes] of each file: the part of the key that identifies the data itself (a resume
    compares it, longctx/resume.py)."""
    return [[Path(p).name, _file_digest(Path(p), root)] for p in paths]


def cache_key(paths: Sequence[str], tok, options: Options, root: Path) -> str:
    what = {"files": files_digest(paths, root),
            "tokenizer": tokenizer_fingerprint(tok), "options": options.__dict__, "code": _code_version()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------

class DocStore:
    """The documents of one cache entry (or a selection of them: `subset`), as a sequence of documents.Doc."""

    def __init__(self, path: Path, index: Optional[np.ndarray] = None):
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        self.meta = meta
        self.names: list[str] = [f["name"] for f in meta["files"]]
        arrays = np.load(self.path / "docs.npz")
        self._offsets = arrays["offsets"]
        self._targets = arrays["targets"]
        self._file = arrays["file_index"]
        self._line = arrays["line"]
        self._row_style = np.array([f["lines"] is None for f in meta["files"]], dtype=bool)
        n_tokens = int(self._offsets[-1])
        self._ids = np.memmap(self.path / "ids.bin", dtype=np.int32, mode="r", shape=(n_tokens,)) \
            if n_tokens else np.zeros(0, np.int32)
        self._mask = np.memmap(self.path / "mask.bin", dtype=np.uint8, mode="r", shape=(n_tokens,)) \
            if n_tokens else np.zeros(0, np.uint8)
        self.index = np.arange(len(self._targets), dtype=np.int64) if index is None else np.asarray(index, np.int64)
        self.lengths = np.diff(self._offsets)[self.index]
        self.targets = self._targets[self.index]

    def subset(self, index) -> "DocStore":
        """The documents at positions `index` of this store (repeats allowed), sharing its memory maps."""
        sub = object.__new__(DocStore)
        sub.__dict__.update(self.__dict__)
        sub.index = self.index[np.asarray(index, dtype=np.int64)]
        sub.lengths, sub.targets = np.diff(self._offsets)[sub.index], self._targets[sub.index]
        return sub

    def __len__(self) -> int:
        return len(self.index)

    def file_of(self) -> np.ndarray:
        """The file index (into self.names) of each document."""
        return self._file[self.index]

    def sample_id(self, i: int) -> str:
        d = self.index[i]
        f = int(self._file[d])
        return f"{self.names[f]}:{'row' if self._row_style[f] else ''}{int(self._line[d])}"

    def __getitem__(self, i: int) -> Doc:
        d = self.index[i]
        a, b = int(self._offsets[d]), int(self._offsets[d + 1])
        ids = self._ids[a:b]
        labels = np.where(self._mask[a:b].astype(bool), ids, IGNORE).astype(np.int32)
        return Doc(self.sample_id(i), ids, labels)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def resident_bytes(self) -> int:
        """RAM this store holds per process outside the shared page cache: its per-document index."""
        return len(self._targets) * INDEX_BYTES_PER_DOC + len(self.index) * 24

    @property
    def ledger(self) -> Ledger:
        led = Ledger()
        led.per_file = {k: dict(v) for k, v in self.meta["ledger"]["per_file"].items()}
        led.formats = dict(self.meta["ledger"]["formats"])
        led.notes = {k: list(v) for k, v in self.meta["ledger"].get("notes", {}).items()}
        return led


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------

# The sources and options a forked worker reads; set in the parent just before the pool forks.
_WORK: dict = {}


def _tokenize_task(task: tuple[int, int, int]):
    """Worker: tokenize records start..stop-1 of source `f`; the kept documents as flat arrays plus the ledger."""
    f, start, stop = task
    source, tok, opts = _WORK["sources"][f], _WORK["tok"], _WORK["options"]
    records, where = source.read(start, stop)
    ledger = Ledger()
    docs = tokenize_records(tok, records, where, source.fmt, source.name, opts.max_seq_len, opts.truncation,
                            opts.sft_truncation, ledger)
    record_of = {loc: start + i for i, loc in enumerate(where)}
    kept_at = [int(source.lines[r]) if source.lines is not None else r
               for r in (record_of[d.sample_id] for d in docs)]  # what follows "name:" in the sample id
    ids = np.concatenate([d.input_ids for d in docs]) if docs else np.zeros(0, np.int32)
    labels = np.concatenate([d.labels for d in docs]) if docs else np.zeros(0, np.int32)
    mask = labels != IGNORE
    if not np.array_equal(labels[mask], ids[mask]):  # the mask form holds only if every target is its own token
        raise LongctxError(f"{where[0]}..: a label differs from its token; the cache cannot represent it")
    return (f, np.asarray([len(d) for d in docs], np.int64), np.asarray([d.n_supervised for d in docs], np.int64),
            np.asarray(kept_at, np.int64), ids.astype(np.int32), mask.astype(np.uint8), ledger.per_file, stop - start)


class Progress:
    """One line per ~5% of the records (and at least every 30 s): records, tokens, rate and ETA."""

    def __init__(self, total: int, say: Callable[[str], None]):
        self.total, self.say, self.t0 = total, say, time.monotonic()
        self.done = self.tokens = 0
        self.next_pct, self.last = 5, self.t0

    def add(self, records: int, tokens: int) -> None:
        self.done += records
        self.tokens += tokens
        now = time.monotonic()
        pct = 100 * self.done / max(1, self.total)
        if pct >= self.next_pct or now - self.last >= 30 or self.done == self.total:
            el = now - self.t0
            rate = self.tokens / el if el > 0 else 0.0
            eta = el * (self.total - self.done) / self.done if self.done else 0.0
            self.say(f"  preparing data: {self.done:,}/{self.total:,} records ({pct:.0f}%), "
                     f"{self.tokens / 1e6:,.1f}M tokens tokenized, {rate / 1e6:.2f}M tokens/s, "
                     f"{el:.0f} s elapsed, ETA {eta:.0f} s")
            self.next_pct = 5 * (int(pct) // 5 + 1)
            self.last = now


def _slices(source: Source) -> list[tuple[int, int]]:
    """Record ranges of about TASK_BYTES of text (TASK_RECORDS at most; one record at least)."""
    import pyarrow.compute as pc

    n = source.num_rows
    cols = [c for c in ("text", "prompt", "response") if c in source.table.column_names]
    if not cols:
        return [(a, min(n, a + TASK_RECORDS)) for a in range(0, n, TASK_RECORDS)]
    sizes = sum(pc.binary_length(source.arrow.column(c)).to_numpy(zero_copy_only=False) for c in cols)
    out, a, acc = [], 0, 0
    for i, size in enumerate(sizes):
        acc += int(size)
        if acc >= TASK_BYTES or i + 1 - a >= TASK_RECORDS or i + 1 == n:
            out.append((a, i + 1))
            a, acc = i + 1, 0
    return out


def _build(paths: Sequence[str], tok, options: Options, dest: Path, num_proc: int,
           say: Callable[[str], None]) -> None:
    """Write the entry for `paths` into the empty directory `dest` (meta.json last)."""
    sources = [open_source(p, str(dest / "arrow")) for p in paths]
    for s in sources:
        s.check(tok)
    ledger = Ledger()
    for s in sources:
        ledger.formats[s.name] = s.fmt
        if s.sharegpt:
            ledger.notes.setdefault(s.name, []).append(SHAREGPT_NOTE)
        ledger.add(s.name, docs_no_assistant=0, docs_empty_response=0, docs_context_cut=0, docs_answer_cut=0)
    tasks = [(f, a, b) for f, s in enumerate(sources) for a, b in _slices(s)]
    progress = Progress(sum(s.num_rows for s in sources), say)
    lens, tgts, files, lines = [], [], [], []
    _WORK.update(sources=sources, tok=tok, options=options)
    procs = max(1, min(num_proc, len(tasks)))
    try:
        with open(dest / "ids.bin", "wb") as fids, open(dest / "mask.bin", "wb") as fmask:
            if procs > 1:
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker: no oversubscription
                pool = multiprocessing.get_context("fork").Pool(procs)
                results = pool.imap(_tokenize_task, tasks, chunksize=1)
            else:
                pool, results = None, map(_tokenize_task, tasks)
            try:
                for f, ln, tg, at, ids, mask, counts, n_records in results:
                    fids.write(ids.tobytes())
                    fmask.write(mask.tobytes())
                    lens.append(ln), tgts.append(tg), lines.append(at)
                    files.append(np.full(len(ln), f, np.int16))
                    for name, row in counts.items():
                        ledger.add(name, **row)
                    progress.add(n_records, sum(row.get("tokens_raw", 0) for row in counts.values()))
            finally:
                if pool is not None:
                    pool.terminate()
                    pool.join()
    finally:
        _WORK.clear()
    cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
    lengths = cat(lens, np.int64)
    np.savez(dest / "docs.npz", offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
             targets=cat(tgts, np.int64), file_index=cat(files, np.int16), line=cat(lines, np.int64))
    shutil.rmtree(dest / "arrow", ignore_errors=True)
    meta = {"format_version": FORMAT_VERSION, "options": options.__dict__,
            "files": [{"path": str(Path(p).resolve()), "name": s.name, "format": s.fmt, "records": s.num_rows,
                       "lines": None if s.lines is None else "json"} for p, s in zip(paths, sources)],
            "documents": int(len(lengths)), "tokens": int(lengths.sum()),
            "prepare_s": round(time.monotonic() - progress.t0, 1),
            "ledger": {"per_file": ledger.per_file, "formats": ledger.formats, "notes": ledger.notes}}
    tmp = dest / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, dest / "meta.json")


def check_disk(paths: Sequence[str], root: Path) -> None:
    """Refuse up front when the cache's disk cannot hold the entry: the Arrow copy of the files while building
    (about their size) plus 5 bytes per token (at most about one token per byte of text)."""
    need = sum(sum(p.stat().st_size for p in Path(x).rglob("*") if p.is_file()) if Path(x).is_dir()
               else Path(x).stat().st_size for x in paths) * 6
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if need > free:
        raise LongctxError(f"the data cache {root} has {free / 2**30:.1f} GiB free; preparing these files needs up "
                           f"to {need / 2**30:.1f} GiB. Free space there, or point --data-cache (or "
                           "LONGCTX_DATA_CACHE) at a larger disk.")


def prepare(paths: Sequence[str], tok, options: Options, root: Path, *, num_proc: int = 0,
            say: Callable[[str], None] = print, announce: Callable[[str], None] = print) -> DocStore:
    """The cache entry for these files and options: opened if it exists, else built (one process at a time).
    `say` tells that an entry was reused; `announce` reports a build and its progress (from whichever process
    builds)."""
    for p in paths:
        if not Path(p).exists():
            raise LongctxError(f"dataset not found: {p}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, tok, options, root)
    entry = root / key
    names = ", ".join(Path(p).name for p in paths)
    if (entry / "meta.json").is_file():
        say(f"data: prepared {names} found in {entry} (reused, nothing tokenized)")
        return DocStore(entry)
    with open(root / f"{key}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"data: another process is preparing {names} into {entry}; waiting for it", file=sys.stderr,
                  flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when that process finishes or dies
        if not (entry / "meta.json").is_file():
            check_disk(paths, root)
            procs = num_proc or len(os.sched_getaffinity(0))
            announce(f"data: preparing {names} once into {entry} ({procs} processes); later runs and resumes "
                     "reuse it")
            tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=root))
            try:
                _build(paths, tok, options, tmp, procs, announce)
                shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry (no meta.json) left by a crash
                os.replace(tmp, entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            say(f"data: prepared {names} found in {entry} (built by another process)")
    return DocStore(entry)
