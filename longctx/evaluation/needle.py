"""Passkey and multi-needle retrieval prompts, generated locally over lengths x depths with a fixed seed.

A prompt is  [bos] haystack-with-needles question  and is exactly `length` tokens long:

    ... filler ... The value of quartz is 48213. ... filler ...  What is the value of quartz? The value of quartz is

The model should continue with " 48213". The question ends by repeating the needle's own prefix (as the
passkey test of Mohtashami & Jaggi does), so answering is a copy from the context, not a formatting task.

Depth: the queried needle sits at fraction `depth` of the haystack (0: right after bos, 1: right before
the question), snapped to the nearest sentence boundary, or split into a sentence when no boundary is
within 0.5% of the length. Multi-needle prompts add n-1 distractor needles (other keys, other values) at
random boundaries; only the needle at the cell's depth is asked for.

Prompts are assembled from token ids, sentence by sentence, so lengths and positions are exact for the
tokenizer under test; `text` is their decoding (what a training file holds, see bench/learning_proof/).

Fillers: "classic" (the repeated passkey sentences), "bank[:N]" (each prompt draws its own bank of N
random sentences and repeats them: the learning proof's filler), or a path to a text file (its sentences,
from a random offset).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import LongctxError

CLASSIC_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
# Plain English words (single tokens in longctx/default_data/tokenizer, so the synthetic task stays small).
WORDS = tuple("""about along amber anchor apple badger bank beetle birch black blue bottle bridge candle cedar
cobalt copper counted crane crossed dark day desk east ember engine exactly falcon feather fed field first fox
from garden gecko gold golden green grey grove harbor hare heard heron hollow ibis island jacket kettle lagoon
lantern list lower lynx marble marsh marten meadow mill mirror moth near needle nested newt north notes observer
old orchard otter pale pillow quarry quartz raven record red rested ribbon ridge saddle salmon salt seen silver
stone thistle total tunnel umbrella velvet violet vole was weir white willow window wolf word yarn zephyr""".split())
KEYS = tuple("""apple anchor badger beetle birch bottle bridge candle cedar crane desk engine falcon feather fox
garden gecko harbor hare heron ibis island jacket kettle lagoon lantern lynx marble marten meadow mirror moth newt
orchard otter pillow quarry quartz raven ribbon saddle salmon thistle tunnel umbrella velvet vole willow window
wolf yarn zephyr""".split())


@dataclass(frozen=True)
class NeedleFormat:
    needle: str = "The value of {key} is {value}."
    question: str = "What is the value of {key}? The value of {key} is"
    digits: int = 5

    def value(self, rng: random.Random) -> str:
        return str(rng.randrange(10 ** (self.digits - 1), 10 ** self.digits))


# --------------------------------------------------------------------------------------------
# Fillers: an endless stream of sentences for one prompt
# --------------------------------------------------------------------------------------------

class Filler:
    name = "filler"

    def sentences(self, rng: random.Random) -> Iterator[str]:
        raise NotImplementedError


class ClassicFiller(Filler):
    name = "classic"

    def sentences(self, rng: random.Random) -> Iterator[str]:
        while True:
            yield from CLASSIC_FILLER


def random_sentence(rng: random.Random, words: Sequence[str] = WORDS, lo: int = 5, hi: int = 10) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) + "."


class BankFiller(Filler):
    """Each prompt gets its own bank of random sentences, repeated in random order: the filler is
    predictable only by copying from earlier in the same context."""

    def __init__(self, bank_size: int = 32, words: Sequence[str] = WORDS):
        self.bank_size, self.words = bank_size, tuple(words)
        self.name = f"bank:{bank_size}"

    def sentences(self, rng: random.Random) -> Iterator[str]:
        bank = [random_sentence(rng, self.words) for _ in range(self.bank_size)]
        while True:
            yield rng.choice(bank)


class TextFiller(Filler):
    def __init__(self, path: str):
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        self.items = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n{2,}", text) if s.strip()]
        if len(self.items) < 2:
            raise LongctxError(f"--filler {path}: fewer than 2 sentences in the file")
        self.name = f"file:{Path(path).name}"

    def sentences(self, rng: random.Random) -> Iterator[str]:
        i = rng.randrange(len(self.items))
        while True:
            yield self.items[i]
            i = (i + 1) % len(self.items)


def make_filler(spec: str) -> Filler:
    if spec == "classic":
        return ClassicFiller()
    if spec == "bank" or spec.startswith("bank:"):
        try:
            n = int(spec.split(":", 1)[1]) if ":" in spec else 32
        except ValueError:
            n = 0
        if n < 1:
            raise LongctxError(f"--filler {spec}: expected bank or bank:N with N >= 1")
        return BankFiller(n)
    if not Path(spec).is_file():
        raise LongctxError(f"--filler {spec}: expected classic, bank, bank:N or a text file")
    return TextFiller(spec)


# --------------------------------------------------------------------------------------------
# Token-exact assembly
# --------------------------------------------------------------------------------------------

class PieceTokenizer:
    """Token ids of " " + sentence, cached. Each piece starts with a space, so byte-level BPE and
    SentencePiece tokenizers split the joined text at the same places (merges never cross the space)."""

    def __init__(self, tok):
        self.tok = tok
        self.cache: dict[str, list[int]] = {}
        bos = getattr(tok, "bos_token_id", None)
        self.bos = [int(bos)] if bos is not None else []

    def __call__(self, sentence: str) -> list[int]:
        ids = self.cache.get(sentence)
        if ids is None:
            ids = list(self.tok(" " + sentence, add_special_tokens=False)["input_ids"])
            if len(self.cache) < 200_000:
                self.cache[sentence] = ids
        return ids


@dataclass
class Needle:
    key: str
    value: str
    pos: int  # index of its first token in input_ids
    n_tokens: int


@dataclass
class NeedleSample:
    input_ids: list[int]
    text: str
    length: int  # requested (== len(input_ids))
    depth: float  # requested
    actual_depth: float  # where the queried needle's first token is, as a fraction of the haystack
    needles: list[Needle] = field(default_factory=list)  # in prompt order
    query: int = 0  # index into needles of the one asked for

    @property
    def answer(self) -> str:
        return self.needles[self.query].value

    @property
    def key(self) -> str:
        return self.needles[self.query].key


def _filler_pieces(ptok: PieceTokenizer, filler: Filler, rng: random.Random, n_tokens: int) -> list[list[int]]:
    pieces, total = [], 0
    for s in filler.sentences(rng):
        if total >= n_tokens:
            break
        ids = ptok(s)
        if not ids:
            continue
        pieces.append(ids[:n_tokens - total])
        total += len(pieces[-1])
    return pieces


def make_sample(tok, length: int, depth: float, *, rng: random.Random, filler: Filler,
                fmt: NeedleFormat = NeedleFormat(), n_needles: int = 1, keys: Sequence[str] = KEYS,
                ptok: PieceTokenizer | None = None) -> NeedleSample:
    """One prompt of exactly `length` tokens with the queried needle at `depth` of the haystack."""
    if not 0.0 <= depth <= 1.0:
        raise LongctxError(f"needle depth must be in [0, 1], got {depth}")
    if not 1 <= n_needles <= len(keys):
        raise LongctxError(f"number of needles must be in [1, {len(keys)}], got {n_needles}")
    ptok = ptok or PieceTokenizer(tok)
    chosen = rng.sample(list(keys), n_needles)
    values: list[str] = []
    while len(values) < n_needles:
        v = fmt.value(rng)
        if v not in values:
            values.append(v)
    needle_ids = [ptok(fmt.needle.format(key=k, value=v)) for k, v in zip(chosen, values)]
    question = ptok(fmt.question.format(key=chosen[0]))
    fixed = len(ptok.bos) + len(question) + sum(len(n) for n in needle_ids)
    n_filler = length - fixed
    if n_filler < 1:
        raise LongctxError(f"context length {length} is too short for {n_needles} needle(s) and the question "
                           f"(they take {fixed} tokens)")

    # haystack stream: filler sentences plus the distractor needles at random sentence boundaries
    stream: list[tuple[list[int], int]] = [(p, -1) for p in _filler_pieces(ptok, filler, rng, n_filler)]
    for j in range(1, n_needles):
        stream.insert(rng.randint(0, len(stream)), (needle_ids[j], j))
    starts, t = [], 0
    for p, _ in stream:
        starts.append(t)
        t += len(p)
    h = t
    target = round(depth * h)
    # nearest boundary; split a filler sentence when none is within 0.5% of the length
    bounds = starts + [h]
    k = min(range(len(bounds)), key=lambda i: abs(bounds[i] - target))
    at = bounds[k]
    if abs(at - target) > max(1, 0.005 * length):
        i = max(i for i in range(len(starts)) if starts[i] <= target)
        p, who = stream[i]
        cut = target - starts[i]
        if who < 0 and 0 < cut < len(p):  # a distractor needle is never split: it keeps the nearest boundary
            stream[i:i + 1] = [(p[:cut], -1), (p[cut:], -1)]
            k, at = i + 1, target
    stream.insert(k, (needle_ids[0], 0))

    ids = list(ptok.bos)
    found: dict[int, Needle] = {}
    for p, who in stream:
        if who >= 0:
            found[who] = Needle(chosen[who], values[who], len(ids), len(p))
        ids.extend(p)
    ids.extend(question)
    assert len(ids) == length, (len(ids), length)
    order = sorted(found, key=lambda j: found[j].pos)
    needles = [found[j] for j in order]
    return NeedleSample(input_ids=ids, text=tok.decode(ids, skip_special_tokens=True), length=length,
                        depth=depth, actual_depth=at / h if h else 0.0, needles=needles, query=order.index(0))


def cell_rng(seed: int, length: int, depth: float, i: int, task: str) -> random.Random:
    """The same prompt for a cell whatever else is in the grid."""
    return random.Random(f"{task}|{seed}|{length}|{depth:.6f}|{i}")


def make_grid(tok, lengths: Sequence[int], depths: Sequence[float], samples: int, *, seed: int, filler: Filler,
              n_needles: int = 1, fmt: NeedleFormat = NeedleFormat(), task: str = "passkey"):
    """{(length, depth): [NeedleSample, ...]}"""
    ptok = PieceTokenizer(tok)
    return {(L, d): [make_sample(tok, L, d, rng=cell_rng(seed, L, d, i, task), filler=filler, fmt=fmt,
                                 n_needles=n_needles, ptok=ptok) for i in range(samples)]
            for L in lengths for d in depths}


def extract_answer(generated: str, digits: int = 5) -> str | None:
    """The first run of digits in the continuation (the model may add a period, a newline, ...)."""
    m = re.search(r"\d+", generated)
    return m.group(0) if m else None


def answer_complete(generated: str) -> bool:
    """Whether extract_answer's value can no longer change: a run of digits has been followed by something else."""
    return re.search(r"\d\D", generated) is not None
