"""Training and evaluation data for the learning proof, and the untrained model it starts from.

    python -m bench.learning_proof.make_data --out DIR/data --init-model DIR/init_model

Writes
  train.jsonl     {"text"} documents, every token a target (train.py's plain-LM format):
                    repeat documents (--repeat of them): a random run of 8-64 words repeated in order;
                    of the rest, needle documents (70%): a haystack of bank filler (each document repeats
                      its own bank of 4-256 random sentences) holding 1-8 needles "The value of KEY is 12345."
                      (up to one per 64 tokens), then one question per needle, each followed by its answer:
                      "What is the value of KEY? The value of KEY is 12345."
                    and recall documents (30%): random sentences, then the same sentences again, shuffled.
                  number documents (--numbers of them): a run of random 5-digit values (2 values to a sixth of the
                    document, log-uniform) repeated in order.
                  Half the documents are max_len long (less a little slack), the rest log-uniform in
                  [--min-len, max_len]; train.py packs them into max_len rows with no attention across documents.
  calib.jsonl     the first --calib-docs training documents (for timing a few steps: diag/steptime.sh)
  ppl_eval.jsonl  held-out recall documents of max_len tokens (another seed): the second half is
                  predictable only from the first, up to max_len/2 tokens back (sentences shuffled, so a
                  sentence's first words are not).
  ppl_bank.jsonl  with --ppl-kinds bank: held-out bank-filler documents (the haystack of the retrieval prompts,
                  a bank of 256 random sentences repeated in random order): the first sight of each sentence is
                  unpredictable, so the more context, the more of the bank is known.
  ppl_numbers.jsonl  with --ppl-kinds numbers: held-out number documents whose run of values fills half the
                  document: the second half is a copy from max_len/2 tokens back, the first predictable by nothing.
  init_model/     the randomly initialized model (config from --model-config) + the shipped tokenizer:
                  evaluated as "before", then trained by train.py.

Why this design: the retrieval answer is a copy from far back in the context (an induction-style
lookup: find the question's "KEY is" earlier, copy what followed). A from-scratch model has to form
that mechanism (a previous-token head feeding an induction head) before it can score at all, and the
loss barely rewards the pieces on their own, so training sits on a plateau first. Repeat documents
reward the lookup at every token with the least ambiguity; bank filler and recall documents reward it
at every sentence; the answers alone would give five supervised tokens per needle. run.sh also trains
on short documents first (--max-len 512), where the plateau is far shorter than at 8K.
The evaluation (eval.py --filler bank) uses the same needle/question wording with fresh keys, values,
banks and positions (another seed), so memorizing training documents cannot score.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from longctx.evaluation import needle  # noqa: E402

BANK_SIZES = (4, 8, 16, 32, 64, 128, 256)
FMT = needle.NeedleFormat()
_TOK = None
_PTOK = None


def _init(tokenizer: str) -> None:
    global _TOK, _PTOK
    from transformers import AutoTokenizer

    _TOK = AutoTokenizer.from_pretrained(tokenizer)
    _PTOK = needle.PieceTokenizer(_TOK)


def doc_length(rng: random.Random, max_len: int, min_len: int = 256) -> int:
    top = max_len - max(32, max_len // 128)  # slack: the text is re-tokenized whole by train.py
    if rng.random() < 0.5 or min_len >= top:
        return top
    return int(math.exp(rng.uniform(math.log(min_len), math.log(top))))


def needle_doc(rng: random.Random, length: int) -> str:
    n = rng.randint(1, max(1, min(8, length // 64)))  # short documents hold several needles too
    tail = 30 * (n - 1) + 8  # tokens of the answers and the other questions, appended below
    s = needle.make_sample(_TOK, length - tail, rng.random(), rng=rng, filler=needle.BankFiller(rng.choice(BANK_SIZES)),
                           n_needles=n, ptok=_PTOK)
    text = s.text + " " + s.answer + "."
    others = [nd for i, nd in enumerate(s.needles) if i != s.query]
    rng.shuffle(others)
    for nd in others:
        text += " " + FMT.question.format(key=nd.key) + " " + nd.value + "."
    return text


def recall_doc(rng: random.Random, length: int) -> str:
    first, n = [], 0
    while n < length // 2:
        sent = needle.random_sentence(rng)
        first.append(sent)
        n += len(_PTOK(sent))
    second = first[:]
    rng.shuffle(second)
    return " " + " ".join(first + second)


def repeat_doc(rng: random.Random, length: int) -> str:
    """A random run of 8-64 words, repeated in the same order to the end: the plainest copy task, where
    an induction head (find the current word earlier, predict what followed it) pays off at every token."""
    run = [rng.choice(needle.WORDS) for _ in range(rng.randint(8, 64))]
    words = (run * (length // len(run) + 1))[:length]
    return " " + " ".join(words)


def number_doc(rng: random.Random, length: int) -> str:
    """A run of random values (the needles' 5-digit format), repeated in the same order to the end. Nothing but
    a copy predicts a value's digits, so the lookup pays ~10 nats per value, and it copies the very tokens (the
    tokenizer's digit chunks) a retrieval answer is made of. The run is log-uniform from 2 values to a sixth of
    the document (a value is 2-3 tokens, so the run repeats at least once): the copy distance spans every scale
    up to half the document, which is what stretches the lookup to long range."""
    k = int(math.exp(rng.uniform(math.log(2), math.log(max(2, length // 6)))))
    run = [FMT.value(rng) for _ in range(k)]
    values = (run * (length // (3 * len(run)) + 1))[:length // 3]
    return " " + " ".join(values)


def train_doc(args: tuple[int, int, int, int, float, float]) -> str:
    seed, i, max_len, min_len, repeat, numbers = args
    rng = random.Random(f"train|{seed}|{max_len}|{i}")
    length = doc_length(rng, max_len, min_len)
    u = rng.random()
    if u < repeat:
        return repeat_doc(rng, length)
    if u < repeat + numbers:
        return number_doc(rng, length)
    rest = 1 - repeat - numbers
    return needle_doc(rng, length) if u < repeat + numbers + 0.7 * rest else recall_doc(rng, length)


def bank_doc(rng: random.Random, length: int, bank_size: int = 256) -> str:
    pieces = needle._filler_pieces(_PTOK, needle.BankFiller(bank_size), rng, length)
    return _TOK.decode([t for p in pieces for t in p])


def half_numbers_doc(rng: random.Random, length: int) -> str:
    """A run of values as long as half the document, then the run again: a copy from length/2 tokens back."""
    run, n = [], 0
    while n < length // 2:
        run.append(FMT.value(rng))
        n += len(_PTOK(run[-1]))  # PieceTokenizer counts " " + value
    return " " + " ".join(run + run)


PPL_KINDS = {"recall": ("ppl_eval.jsonl", recall_doc), "bank": ("ppl_bank.jsonl", bank_doc),
             "numbers": ("ppl_numbers.jsonl", half_numbers_doc)}


def ppl_doc(args: tuple[int, int, int, str]) -> str:
    seed, i, max_len, kind = args
    rng = random.Random(f"ppl|{seed}|{i}" if kind == "recall" else f"ppl|{kind}|{seed}|{i}")
    return PPL_KINDS[kind][1](rng, max_len + 64)  # a little over: one window per document


def write_jsonl(path: Path, texts) -> int:
    n = 0
    with path.open("w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
            n += 1
    return n


def init_model(config_path: str, tokenizer: str, out: Path, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = json.loads(Path(config_path).read_text())
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(str(out))
    print(f"init model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters -> {out}", flush=True)


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="Directory for train.jsonl and ppl_eval.jsonl.")
    p.add_argument("--docs", type=int, default=6000, help="Training documents.")
    p.add_argument("--calib-docs", type=int, default=300, help="Documents of calib.jsonl.")
    p.add_argument("--ppl-docs", type=int, default=16, help="Held-out perplexity documents (of each kind).")
    p.add_argument("--ppl-kinds", default="recall", help=f"Held-out perplexity sets, comma-separated: "
                   f"{', '.join(PPL_KINDS)} (files {', '.join(f for f, _ in PPL_KINDS.values())}).")
    p.add_argument("--max-len", type=int, default=8192, help="Longest document (train.py's --max-seq-len).")
    p.add_argument("--min-len", type=int, default=256, help="Shortest document.")
    p.add_argument("--repeat", type=float, default=0.0, help="Share of repeat documents (the rest: 70%% needle, "
                   "30%% recall).")
    p.add_argument("--numbers", type=float, default=0.0, help="Share of number documents (repeated runs of values).")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=min(8, mp.cpu_count()))
    p.add_argument("--tokenizer", default=str(ROOT / "longctx" / "default_data" / "tokenizer"))
    p.add_argument("--init-model", default="", help="Also write the randomly initialized model here.")
    p.add_argument("--model-config", default=str(here / "model.json"))
    a = p.parse_args(argv)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (0 <= a.repeat and 0 <= a.numbers and a.repeat + a.numbers <= 1):
        p.error(f"--repeat {a.repeat} and --numbers {a.numbers}: shares in [0, 1] that sum to at most 1")
    kinds = [k for k in a.ppl_kinds.split(",") if k]
    if not kinds or any(k not in PPL_KINDS for k in kinds):
        p.error(f"--ppl-kinds {a.ppl_kinds!r}: a comma-separated subset of {', '.join(PPL_KINDS)}")
    jobs = [(a.seed, i, a.max_len, a.min_len, a.repeat, a.numbers) for i in range(a.docs)]
    ppl_jobs = {k: [(a.seed, i, a.max_len, k) for i in range(a.ppl_docs)] for k in kinds}
    pool = mp.get_context("fork").Pool(a.workers, initializer=_init, initargs=(a.tokenizer,)) if a.workers > 1 else None
    if pool is None:
        _init(a.tokenizer)
    imap = (lambda f, xs: pool.imap(f, xs, chunksize=16)) if pool else map
    try:
        n = write_jsonl(out / "train.jsonl", imap(train_doc, jobs))
        m = sum(write_jsonl(out / PPL_KINDS[k][0], imap(ppl_doc, js)) for k, js in ppl_jobs.items())
    finally:
        if pool:
            pool.close()
    with (out / "train.jsonl").open() as src, (out / "calib.jsonl").open("w") as dst:
        for _, line in zip(range(a.calib_docs), src):
            dst.write(line)
    print(f"wrote {n} training documents and {m} perplexity documents (max {a.max_len} tokens) to {out}", flush=True)
    if a.init_model:
        init_model(a.model_config, a.tokenizer, Path(a.init_model), a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
