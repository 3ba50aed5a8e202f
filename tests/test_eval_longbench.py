"""LongBench-style scoring: exact match and token-F1 partial credit, against values worked out by hand."""

from __future__ import annotations

import json

import pytest

from helpers_train import TOKENIZER
from longctx.errors import LongctxError
from longctx.evaluation import longbench as lb


def test_normalization_makes_exact_match_forgiving_of_case_punctuation_articles():
    assert lb.normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"
    assert lb.exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert lb.exact_match("An apple", "apple") == 1.0
    assert lb.exact_match("Eiffel", "eiffel tower") == 0.0
    assert lb.exact_match("theatre", "atre") == 0.0  # articles only as whole words


@pytest.mark.parametrize("pred,gold,expected", [
    ("Paris", "Paris", 1.0),
    ("Paris, France", "Paris", 2 * (1 / 2) * 1 / (1 / 2 + 1)),           # P=1/2, R=1 -> 2/3
    ("a cat sat on the mat", "the cat on a hat", 2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3)),  # 4 vs 3 tokens, 2 common
    ("paris paris", "paris", 2 * (1 / 2) * 1 / (1 / 2 + 1)),               # a repeated token counts once
    ("London", "Paris", 0.0),
    ("", "Paris", 0.0),
    ("the", "a", 0.0),                                                    # both normalize to nothing
])
def test_qa_f1_partial_credit(pred, gold, expected):
    assert lb.qa_f1_score(pred, gold) == pytest.approx(expected)


def test_sample_score_is_the_best_reference():
    s = lb.score("Barack Obama", ["Obama", "Barack Hussein Obama", "Michelle"])
    assert s["em"] == 0.0
    assert s["f1"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))  # vs "barack hussein obama": P=1, R=2/3
    assert lb.score("obama.", ["Michelle", "Obama"]) == {"em": 1.0, "f1": 1.0}


def test_prediction_is_the_first_nonempty_line():
    assert lb.first_line("\n\n Paris \nQuestion: next") == "Paris"
    assert lb.first_line("   ") == ""


def test_read_accepts_longbench_fields_and_reports_bad_lines(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text(json.dumps({"context": "c", "question": "q", "answers": ["a"]}) + "\n\n" +
                 json.dumps({"context": "c2", "input": "q2", "answers": "b", "_id": "x7"}) + "\n")
    a, b = lb.read(str(p))
    assert (a.question, a.answers, a.id) == ("q", ["a"], "1")
    assert (b.question, b.answers, b.id) == ("q2", ["b"], "x7")
    p.write_text(json.dumps({"context": "c", "question": "q", "answers": []}) + "\n")
    with pytest.raises(LongctxError, match=r"qa.jsonl:1: .*answers"):
        lb.read(str(p))
    p.write_text('{"context": "c", \n')
    with pytest.raises(LongctxError, match=r"qa.jsonl:1: malformed JSON"):
        lb.read(str(p))
    with pytest.raises(LongctxError, match="not found"):
        lb.read(str(tmp_path / "missing.jsonl"))


def test_long_context_is_cut_in_the_middle():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    words = " ".join(f"w{i}" for i in range(400))
    s = lb.QASample("1", words, "which?", ["w1"])
    template = "{context}\nQ: {question}\nA:"
    full, cut = lb.prompt_ids(tok, s, template, 10_000)
    assert not cut
    assert tok.decode(full, skip_special_tokens=True) == words + "\nQ: which?\nA:"
    ids, cut = lb.prompt_ids(tok, s, template, 120)
    assert cut and len(ids) == 120
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.startswith("w0 w1 ") and text.endswith("w399\nQ: which?\nA:") and "w200 " not in text
