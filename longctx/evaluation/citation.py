"""Answer from many real documents and cite the source (LongCite-style), built from the Python standard library.

    python -m longctx.evaluation.citation --tokenizer models/smollm2-135m-32k --context-len 16384 \\
        --n-train 2000 --n-eval 50 --out data/citation

A context is several whole module sources, each under a header that names it, packed to a target token length:

    [doc 1] Lib/colorsys.py
    <the file, verbatim>

    [doc 2] Lib/json/decoder.py
    ...

    Question: Which document defines `py_scanstring`, and what is its signature?

The answer cites the document (tag and path on the first line) and quotes the signature exactly as written in the
source, from `def`/`class` to the colon that ends the header (decorators not included, continuation lines as in
the file):

    [doc 2] Lib/json/decoder.py
    def py_scanstring(s, end, strict=True,
            _b=BACKSLASH_MAP, _m=STRINGCHUNK.match):

What is asked: a top-level def or class of the cited document that is defined nowhere else in the context (no other
def/class of that name at any depth, no top-level assignment of it, in any document, the cited one included), whose
header has no comment and at most --max-signature-chars characters. Distractor documents are drawn so that none
defines the asked name. Every document fills at most --max-doc-frac of the context; the cited one sits at a uniform
position among them.

Split, by module: a module is long_text_data's stdlib group (a top-level module or package), held out by the same
hash of the same name (long_text_data.held_out), so with long_text_data's --eval-share at least this --eval-share the
held-out modules are absent from the long text too. Training examples use training modules only (the question and
every document); eval questions are about held-out modules, their other documents from any module.

Files: train.jsonl (train.py's {"messages": [system, user, assistant]}: the loss is on the answer; a context over
--max-seq-len keeps the answer under --sft-truncation context), eval_<len>.jsonl per --eval-lengths (the same
messages, the assistant turn the gold answer, so a file also serves as train.py's --eval-data; plus the gold fields
the scorer reads), stats.json. Deterministic for a seed, a tokenizer and a standard library: example i of a split
and length is the same whatever --n-train / --n-eval are.

Scoring (eval.py --citation-data DIR, `score`): the prediction is parsed into a citation (the first "[doc N]" and
the path after it, or a Lib/...py path alone) and a signature (from the first def/class to the first ':' outside
brackets, strings and comments). answer: the signature equals the gold one after whitespace normalization (runs of
whitespace collapsed, none around brackets and commas). citation: the cited document is the gold one (every part
given, number and path, must match). both: the two together.
"""

from __future__ import annotations

import argparse
import ast
import random
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LongctxError
from ..models import long_text_data as ltd

SYSTEM = ("The user's message holds numbered documents, each under a line \"[doc N] path\", and a question. Answer "
          "with the tag and path of the document that defines the asked name on the first line, then its signature "
          "exactly as written there.")
QUESTION = "Which document defines `{name}`, and what is its signature?"
PATH_PREFIX = "Lib/"  # CPython's layout: the same names on every machine, wherever the stdlib is installed
DEFAULT_EVAL_LENGTHS = (8192, 16384, 32768)


# --------------------------------------------------------------------------------------------
# Signatures: the header of a def/class, scanned from its source
# --------------------------------------------------------------------------------------------

def header_end(s: str, start: int) -> tuple[int, bool, bool]:
    """Scan s from `start` (a def/class keyword) to the ':' that ends the header, skipping brackets, strings and
    comments. Returns (end, found, comment): end is just past the ':' when found, else where the header stopped (a
    newline outside brackets, or the end of s); comment: a comment was passed."""
    depth, i, n, comment = 0, start, len(s), False
    while i < n:
        c = s[i]
        if c == "#":
            comment = True
            j = s.find("\n", i)
            i = n if j < 0 else j
            continue
        if c in "\"'":
            q = s[i:i + 3] if s[i:i + 3] in ('"""', "'''") else c
            j = i + len(q)
            while j < n and not s.startswith(q, j):
                if len(q) == 1 and s[j] == "\n":
                    break
                j += 2 if s[j] == "\\" else 1
            i = j + len(q)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        elif c == ":" and depth == 0:
            return i + 1, True, comment
        elif c == "\n" and depth == 0 and not s[:i].endswith("\\"):
            return i, False, comment
        i += 1
    return n, False, comment


def normalize_signature(s: str) -> str:
    return re.sub(r"\s*([()\[\]{},])\s*", r"\1", " ".join(s.split()))


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------

@dataclass
class Definition:
    name: str
    kind: str        # def | class
    signature: str   # verbatim from the source


@dataclass
class SourceDoc:
    name: str                  # "Lib/json/decoder.py"
    module: str                # the split unit: long_text_data's group, "stdlib/json"
    text: str
    defined: dict[str, int]    # name -> how many defs/classes (any depth) and top-level assignments define it
    askable: list[Definition]  # top-level defs/classes defined once in this file, header verbatim
    held_out: bool = False
    tokens: int | None = field(default=None, repr=False)  # of its block in a context, counted when first needed


def _definitions(text: str, max_signature_chars: int) -> tuple[dict[str, int], list[Definition]] | None:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    defined: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined[node.name] = defined.get(node.name, 0) + 1
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Name):
                    defined[n.id] = defined.get(n.id, 0) + 1
    line_start = [0]
    for line in text.splitlines(keepends=True):
        line_start.append(line_start[-1] + len(line))
    askable = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or defined[node.name] != 1:
            continue
        start = line_start[node.lineno - 1] + node.col_offset  # top level: col_offset 0, bytes == characters
        end, found, comment = header_end(text, start)
        sig = text[start:end]
        if not found or comment or len(sig) > max_signature_chars:
            continue
        try:  # the scan found the real header: it parses as one with a body
            ok = ast.parse(sig + " pass").body[0].name == node.name
        except SyntaxError:
            ok = False
        if ok:
            askable.append(Definition(node.name, "class" if isinstance(node, ast.ClassDef) else "def", sig))
    return defined, askable


def stdlib_documents(root: Path, *, eval_share: float, max_signature_chars: int = 200) -> list[SourceDoc]:
    """Every parseable .py file of the standard library at `root` (tests excluded, as long_text_data reads it),
    named as in CPython's tree, with the names it defines and its askable definitions."""
    docs = []
    for g in ltd.stdlib_groups(root):
        held = ltd.held_out(g.name, eval_share)
        for path, text in g.files:
            found = _definitions(text, max_signature_chars)
            if found is not None:
                docs.append(SourceDoc(PATH_PREFIX + path, g.name, text, found[0], found[1], held))
    return docs


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------

def block(i: int, doc: SourceDoc) -> str:
    return f"[doc {i}] {doc.name}\n{doc.text.rstrip()}"


def user_message(blocks: list[str], name: str) -> str:
    return "\n\n".join(blocks) + "\n\nQuestion: " + QUESTION.format(name=name)


def format_answer(doc_id: int, doc_name: str, signature: str) -> str:
    return f"[doc {doc_id}] {doc_name}\n{signature}"


def conversation(blocks: list[str], name: str, answer: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_message(blocks, name)},
            {"role": "assistant", "content": answer}]


def n_tokens(tok, messages: list[dict]) -> int:
    """Tokens of the rendered conversation, as train.py tokenizes it (the template supplies bos)."""
    return len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])


class Builder:
    """Examples from `docs`: training ones from training modules only, eval ones about held-out modules. Token
    counts of the documents are made once, when first needed."""

    def __init__(self, tok, docs: list[SourceDoc], *, max_doc_frac: float = 0.5, seed: int = 0):
        self.tok, self.docs, self.max_doc_frac, self.seed = tok, docs, max_doc_frac, seed
        self.train_docs = [d for d in docs if not d.held_out]
        self.targets = {"train": [d for d in self.train_docs if d.askable],
                        "eval": [d for d in docs if d.held_out and d.askable]}

    def cost(self, doc: SourceDoc) -> int:
        """Tokens of the document's block and its separator (a two-digit tag; the exact count is checked after)."""
        if doc.tokens is None:
            doc.tokens = len(self.tok(block(10, doc) + "\n\n", add_special_tokens=False)["input_ids"])
        return doc.tokens

    def example(self, split: str, context_len: int, i: int) -> dict:
        """Example i of `split` (train | eval) at `context_len` tokens: the same whatever else is built."""
        rng = random.Random(f"citation|{self.seed}|{split}|{context_len}|{i}")
        cap = int(context_len * self.max_doc_frac)
        targets, pool = self.targets[split], (self.train_docs if split == "train" else self.docs)
        if not targets:
            raise LongctxError(f"no {'held-out' if split == 'eval' else 'training'} module has an askable "
                               "definition: change --eval-share or --stdlib")
        for _ in range(200):
            target = rng.choice(targets)
            # a file over 12 characters per token of room cannot fit (source code averages 3-4): not tokenized
            if len(target.text) <= 12 * cap and self.cost(target) <= cap:
                break
        else:
            raise LongctxError(f"no {split} document with a definition to ask about fits in {cap:,} tokens "
                               f"({self.max_doc_frac:g} of {context_len:,}); raise the context length or "
                               "--max-doc-frac")
        d = rng.choice(target.askable)
        answer_probe = conversation([], d.name, format_answer(10, target.name, d.signature))
        budget = context_len - n_tokens(self.tok, answer_probe) - 8
        chosen, used = [target], self.cost(target)
        order = list(range(len(pool)))
        rng.shuffle(order)
        seen = 0
        for k in order:
            cand = pool[k]
            room = min(cap, budget - used)
            if room < 64 or seen >= 400:
                break
            if cand is target or d.name in cand.defined or len(cand.text) > 12 * room:
                continue
            seen += 1
            if self.cost(cand) <= room:
                chosen.append(cand)
                used += cand.tokens
        if used > budget:
            raise LongctxError(f"{target.name} alone does not fit in {context_len:,} tokens with the question")
        while True:
            docs = chosen[1:]
            rng.shuffle(docs)
            at = rng.randint(0, len(docs))
            docs.insert(at, target)
            answer = format_answer(at + 1, target.name, d.signature)
            messages = conversation([block(j + 1, doc) for j, doc in enumerate(docs)], d.name, answer)
            total = n_tokens(self.tok, messages)
            if total <= context_len or len(chosen) == 1:
                break
            chosen.pop()  # the estimate was a little short: one distractor fewer
        if total > context_len:
            raise LongctxError(f"{target.name} alone does not fit in {context_len:,} tokens with the question")
        return {"messages": messages, "id": f"{split}-{context_len}-{i:05d}", "context_len": context_len,
                "tokens": total, "name": d.name, "kind": d.kind, "signature": d.signature, "doc_id": at + 1,
                "doc_name": target.name, "module": target.module, "docs": [doc.name for doc in docs],
                "modules": sorted({doc.module for doc in docs})}


def build(tok, docs: list[SourceDoc], *, context_len: int, n_train: int, n_eval: int,
          eval_lengths=DEFAULT_EVAL_LENGTHS, max_doc_frac: float = 0.5, seed: int = 0,
          train_lengths: dict[int, int] | None = None) -> dict:
    """{"train": [record], "eval": {length: [record]}, "stats": {...}}. train_lengths {length: count}: training
    examples at several context lengths (then n_train and context_len do not apply to training), shuffled."""
    b = Builder(tok, docs, max_doc_frac=max_doc_frac, seed=seed)
    if train_lengths:
        train = [b.example("train", L, i) for L, n in sorted(train_lengths.items()) for i in range(n)]
        random.Random(f"citation|{seed}|mix").shuffle(train)
    else:
        train = [b.example("train", context_len, i) for i in range(n_train)]
    evals = {L: [b.example("eval", L, i) for i in range(n_eval)] for L in eval_lengths}

    def summary(rows):
        n = max(1, len(rows))
        return {"examples": len(rows), "docs_mean": sum(len(r["docs"]) for r in rows) / n,
                "tokens_mean": sum(r["tokens"] for r in rows) / n,
                "distinct_names": len({(r["doc_name"], r["name"]) for r in rows})}

    stats = {"documents": len(docs), "modules": len({d.module for d in docs}),
             "held_out_modules": sorted({d.module for d in docs if d.held_out}),
             "askable": {"train": sum(len(d.askable) for d in b.targets["train"]),
                         "eval": sum(len(d.askable) for d in b.targets["eval"])},
             "context_len": context_len, "max_doc_frac": max_doc_frac, "seed": seed, "train": summary(train),
             "eval": {str(L): summary(rows) for L, rows in evals.items()}}
    return {"train": train, "eval": evals, "stats": stats}


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ltd.write_jsonl(out / "train.jsonl", result["train"])
    for L, rows in result["eval"].items():
        ltd.write_jsonl(out / f"eval_{L}.jsonl", rows)
    ltd.write_stats(out, result["stats"])


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------

@dataclass
class Parsed:
    doc_id: int | None
    doc_name: str | None
    signature: str | None


TAG = re.compile(r"\[doc\s*(\d+)\]\s*([^\s:]+\.py(?!\w))?")
PATH = re.compile(r"(?<![\w/])(" + re.escape(PATH_PREFIX) + r"[^\s:]+\.py)(?!\w)")
KEYWORD = re.compile(r"^[ \t]*(async\s+def|def|class)\s", re.MULTILINE)


def parse_answer(text: str) -> Parsed:
    doc_id = doc_name = sig = None
    m = TAG.search(text)
    if m:
        doc_id, doc_name = int(m.group(1)), m.group(2)
    else:
        p = PATH.search(text)
        doc_name = p.group(1) if p else None
    k = KEYWORD.search(text) or re.search(r"\b(async\s+def|def|class)\s", text)
    if k:
        start = k.start(1)
        end, _, _ = header_end(text, start)
        sig = text[start:end]
    return Parsed(doc_id, doc_name, sig)


def score(prediction: str, gold: dict) -> dict[str, float]:
    """{"answer", "citation", "both"}: 1.0 or 0.0 each. `gold`: an eval record (signature, doc_id, doc_name)."""
    p = parse_answer(prediction)
    answer = p.signature is not None and normalize_signature(p.signature) == normalize_signature(gold["signature"])
    cited = (p.doc_id is not None or p.doc_name is not None) and \
        (p.doc_id is None or p.doc_id == gold["doc_id"]) and (p.doc_name is None or p.doc_name == gold["doc_name"])
    return {"answer": float(answer), "citation": float(cited), "both": float(answer and cited)}


def score_all(predictions: list[str], golds: list[dict]) -> dict:
    rows = [score(p, g) for p, g in zip(predictions, golds, strict=True)]
    n = max(1, len(rows))
    return {"n": len(rows), **{k: sum(r[k] for r in rows) / n for k in ("answer", "citation", "both")},
            "rows": rows}


# --------------------------------------------------------------------------------------------
# Reading eval files (eval.py)
# --------------------------------------------------------------------------------------------

GOLD = ("messages", "signature", "doc_id", "doc_name", "context_len")


def read(path: str) -> dict[int, list[dict]]:
    """The eval records of a directory (its eval_*.jsonl) or one file, grouped by context length."""
    from ..documents import iter_json_lines

    p = Path(path)
    files = sorted(p.glob("eval_*.jsonl")) if p.is_dir() else [p] if p.is_file() else []
    if not files:
        raise LongctxError(f"--citation-data {path}: no eval_*.jsonl there (python -m longctx.evaluation.citation "
                           "writes them)")
    out: dict[int, list[dict]] = {}
    for f in files:
        for n, rec in iter_json_lines(f):
            missing = [k for k in GOLD if k not in rec]
            msgs = rec.get("messages")
            if missing or not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
                raise LongctxError(f"{f}:{n}: not a citation eval record (needs {', '.join(GOLD)}, the messages "
                                   "ending with the gold assistant turn)")
            out.setdefault(int(rec["context_len"]), []).append(rec)
    return dict(sorted(out.items()))


def prompt_ids(tok, rec: dict) -> list[int]:
    """The conversation up to the answer, with the template's generation prompt."""
    text = tok.apply_chat_template(rec["messages"][:-1], tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def stop_ids(tok) -> set[int]:
    """eos and the token the chat template closes an assistant turn with (<|im_end|>, <|eot_id|>, ...)."""
    from ..tokenization import assistant_char_spans

    stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    try:
        text, [(start, end)] = assistant_char_spans(tok, msgs, "chat template")
    except (LongctxError, ValueError):
        return stop
    close = text[text.index("a", start) + 1:end]
    ids = tok(close, add_special_tokens=False)["input_ids"] if close.strip() else []
    return stop | ({ids[0]} if ids else set())


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _lengths(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = ltd.builder_parser("longctx.evaluation.citation", __doc__,
                           out="directory for train.jsonl, eval_<len>.jsonl, stats.json",
                           tokenizer="tokenizer (model) directory with a chat template")
    p.add_argument("--context-len", type=int, default=16384, help="tokens of a training conversation at most "
                   "(train.py's --max-seq-len)")
    p.add_argument("--eval-lengths", type=_lengths, default=list(DEFAULT_EVAL_LENGTHS),
                   help="tokens of an eval conversation (gold answer included), one file per length")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=50, help="eval examples per length")
    p.add_argument("--eval-share", type=float, default=0.1, help="share of modules held out (by a hash of the "
                   "name, as long_text_data's --eval-share)")
    p.add_argument("--max-doc-frac", type=float, default=0.5, help="a document fills at most this share of a "
                   "context")
    p.add_argument("--max-signature-chars", type=int, default=200)
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="standard library root")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def build_result() -> dict:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        if not getattr(tok, "chat_template", None):
            raise LongctxError(f"--tokenizer {args.tokenizer}: no chat template (the examples are conversations)")
        docs = stdlib_documents(Path(args.stdlib), eval_share=args.eval_share,
                                max_signature_chars=args.max_signature_chars)
        if not docs:
            raise LongctxError(f"--stdlib {args.stdlib}: no Python sources found")
        return build(tok, docs, context_len=args.context_len, n_train=args.n_train, n_eval=args.n_eval,
                     eval_lengths=args.eval_lengths, max_doc_frac=args.max_doc_frac, seed=args.seed)

    return ltd.build_and_write(args.out, build_result, write)


if __name__ == "__main__":
    sys.exit(main())
