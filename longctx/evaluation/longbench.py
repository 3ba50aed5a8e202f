"""LongBench-style question answering on a local jsonl: {context, question, answers}.

Each line: {"context": str, "question": str, "answers": [str, ...] or str} (LongBench's own files name the
question "input"; that works too, as does an optional "_id"/"id"). The prompt is the template with the
context and question filled in; a context that does not fit in max_len tokens is cut in the middle
(first and last halves kept), as LongBench's pred.py does. The prediction is the first non-empty line
of the greedy continuation.

Scores (LongBench metrics.py / SQuAD conventions): both strings are normalized (lower case, punctuation
and the articles a/an/the removed, whitespace collapsed); exact match is 1 if they are then equal; F1 is
the token-overlap F1 (qa_f1_score), partial credit for a partially right answer. A sample scores the max
over its reference answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..documents import iter_json_lines
from ..errors import LongctxError

DEFAULT_TEMPLATE = ("Read the text below and answer the question.\n\n{context}\n\n"
                    "Question: {question}\nAnswer:")


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def qa_f1_score(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, answers: list[str]) -> dict[str, float]:
    return {"em": max(exact_match(prediction, a) for a in answers),
            "f1": max(qa_f1_score(prediction, a) for a in answers)}


def first_line(generated: str) -> str:
    for line in generated.strip().split("\n"):
        if line.strip():
            return line.strip()
    return ""


@dataclass
class QASample:
    id: str
    context: str
    question: str
    answers: list[str]


def read(path: str) -> list[QASample]:
    p = Path(path)
    if not p.is_file():
        raise LongctxError(f"--longbench-data {path}: file not found")
    out = []
    for n, rec in iter_json_lines(p):
        loc = f"{path}:{n}"
        question = rec.get("question", rec.get("input"))
        answers = rec.get("answers")
        if isinstance(answers, str):
            answers = [answers]
        missing = [k for k, ok in (("context", isinstance(rec.get("context"), str)),
                                   ("question (or input)", isinstance(question, str)),
                                   ("answers", isinstance(answers, list) and bool(answers)
                                    and all(isinstance(a, str) for a in answers))) if not ok]
        if missing:
            raise LongctxError(f"{loc}: missing or invalid {', '.join(missing)} (expected context: str, "
                               "question: str, answers: [str, ...])")
        out.append(QASample(str(rec.get("_id", rec.get("id", n))), rec["context"], question, answers))
    if not out:
        raise LongctxError(f"--longbench-data {path}: no records")
    return out


def check_template(template: str) -> None:
    if "{context}" not in template or "{question}" not in template:
        raise LongctxError("--longbench-template must contain {context} and {question}")


def prompt_ids(tok, sample: QASample, template: str, max_len: int) -> tuple[list[int], bool]:
    """Token ids of the filled template; the context is cut in the middle to fit max_len. Returns (ids, cut)."""
    head, tail = template.split("{context}", 1)
    head, tail = head.replace("{question}", sample.question), tail.replace("{question}", sample.question)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    h = bos + list(tok(head, add_special_tokens=False)["input_ids"]) if head else bos
    t = list(tok(tail, add_special_tokens=False)["input_ids"])
    c = list(tok(sample.context, add_special_tokens=False)["input_ids"])
    budget = max_len - len(h) - len(t)
    if budget < 2:
        raise LongctxError(f"sample {sample.id}: the template and question alone take {len(h) + len(t)} tokens "
                           f"> --longbench-max-len {max_len}")
    if len(c) <= budget:
        return h + c + t, False
    half = budget // 2
    return h + c[:half] + c[len(c) - (budget - half):] + t, True
