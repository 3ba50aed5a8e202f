"""The needle generator: exact length, the needle where it was asked for (+-1%), seeded, retokenizable.

Positions are found independently: the needle sentence is tokenized on its own and searched for in the
prompt's ids, rather than trusting the generator's own bookkeeping.
"""

from __future__ import annotations

import random

import pytest

from longctx.errors import LongctxError
from longctx.evaluation import needle


@pytest.fixture(scope="module")
def essay(tmp_path_factory):
    rng = random.Random(3)
    sents = [" ".join(rng.choice(needle.WORDS) for _ in range(rng.randint(4, 30))).capitalize() + "."
             for _ in range(300)]
    p = tmp_path_factory.mktemp("filler") / "essay.txt"
    p.write_text(" ".join(sents))
    return str(p)


def find_all(ids: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(ids) - len(sub) + 1) if ids[i:i + len(sub)] == sub]


def needle_ids(tok, key: str, value: str) -> list[int]:
    return tok(" " + needle.NeedleFormat().needle.format(key=key, value=value), add_special_tokens=False)["input_ids"]


def question_ids(tok, key: str) -> list[int]:
    return tok(" " + needle.NeedleFormat().question.format(key=key), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("filler", ["classic", "bank", "essay"])
@pytest.mark.parametrize("length", [300, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_passkey_needle_at_requested_depth_and_length(tok, essay, filler, length, depth):
    fill = needle.make_filler(essay if filler == "essay" else filler)
    s = needle.make_sample(tok, length, depth, rng=random.Random(11), filler=fill)
    ids = s.input_ids
    assert abs(len(ids) - length) <= 0.01 * length
    assert ids[0] == tok.bos_token_id
    q = question_ids(tok, s.key)
    assert ids[-len(q):] == q
    n = needle_ids(tok, s.key, s.answer)
    hits = find_all(ids, n)
    assert len(hits) == 1, "the needle sentence appears exactly once"
    haystack = len(ids) - 1 - len(q) - len(n)  # everything but bos, the question and the needle
    assert abs((hits[0] - 1) - depth * haystack) <= 0.01 * length
    assert s.needles[s.query].pos == hits[0]
    assert s.text.count(needle.NeedleFormat().needle.format(key=s.key, value=s.answer)) == 1
    assert len(s.answer) == 5 and s.answer.isdigit()


@pytest.mark.parametrize("length", [2000, 8192])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.6, 1.0])
def test_multi_needle_queried_needle_at_depth(tok, length, depth):
    s = needle.make_sample(tok, length, depth, rng=random.Random(5), filler=needle.make_filler("bank"), n_needles=4)
    ids = s.input_ids
    assert len(ids) == length
    assert len({n.key for n in s.needles}) == 4 and len({n.value for n in s.needles}) == 4
    for nd in s.needles:  # every needle is there once, where the sample says
        assert find_all(ids, needle_ids(tok, nd.key, nd.value)) == [nd.pos]
    q = question_ids(tok, s.key)
    assert ids[-len(q):] == q, "the question asks for the queried needle's key"
    stream = length - 1 - len(q) - s.needles[s.query].n_tokens  # haystack incl. distractors
    assert abs((s.needles[s.query].pos - 1) - depth * stream) <= 0.01 * length


@pytest.mark.parametrize("filler", ["classic", "bank"])
def test_text_retokenizes_to_the_same_ids(tok, filler):
    """Training files hold the text, which train.py tokenizes again: it must give the same tokens."""
    for i, depth in enumerate([0.0, 0.3, 1.0]):
        s = needle.make_sample(tok, 1500, depth, rng=random.Random(i), filler=needle.make_filler(filler),
                               n_needles=3)
        assert tok(s.text, add_special_tokens=False)["input_ids"] == s.input_ids[1:]


def test_grid_is_seeded_and_cells_are_independent(tok):
    fill = needle.make_filler("bank")
    a = needle.make_grid(tok, [256, 512], [0.0, 1.0], 2, seed=3, filler=fill)
    b = needle.make_grid(tok, [512], [1.0], 2, seed=3, filler=fill)
    c = needle.make_grid(tok, [512], [1.0], 2, seed=4, filler=fill)
    assert [x.input_ids for x in a[(512, 1.0)]] == [x.input_ids for x in b[(512, 1.0)]]
    assert [x.input_ids for x in a[(512, 1.0)]] != [x.input_ids for x in c[(512, 1.0)]]
    assert a[(256, 0.0)][0].input_ids != a[(256, 0.0)][1].input_ids


def test_bad_requests_are_clear_errors(tok):
    fill = needle.make_filler("classic")
    with pytest.raises(LongctxError, match="too short"):
        needle.make_sample(tok, 30, 0.5, rng=random.Random(0), filler=fill, n_needles=2)
    with pytest.raises(LongctxError, match="depth"):
        needle.make_sample(tok, 500, 1.5, rng=random.Random(0), filler=fill)
    with pytest.raises(LongctxError, match="filler"):
        needle.make_filler("/no/such/file.txt")
    with pytest.raises(LongctxError, match="bank"):
        needle.make_filler("bank:0")


def test_extract_answer():
    assert needle.extract_answer(" 48213.") == "48213"
    assert needle.extract_answer(" 48213 and 1") == "48213"
    assert needle.extract_answer(" 482139") == "482139"  # extra digits are wrong, not a match
    assert needle.extract_answer(" no digits") is None


def test_retrieval_counts_answers_taken_from_another_needle(tok, monkeypatch):
    """Multi-needle scoring tells a lookup that found *a* needle (another key's value) from one that found none.
    The generator is replaced by an answerer that, per prompt in turn, gives the asked value, another needle's
    value, or a number in no needle; the expected counts are derived here from the prompts themselves."""
    from longctx.evaluation import generate, runner

    cfg = runner.EvalConfig(model="unused", lengths=[256], depths=[0.5], samples=6, needles=3, filler="bank:8")
    grid = needle.make_grid(tok, cfg.lengths, cfg.depths, cfg.samples, seed=cfg.seed,
                            filler=needle.make_filler(cfg.filler), n_needles=3, task="multi_needle")
    prompts = grid[(256, 0.5)]
    plan = {}  # prompt ids -> the text answered
    for i, s in enumerate(prompts):
        other = next(n.value for n in s.needles if n.value != s.answer)
        plan[tuple(s.input_ids)] = [s.answer, other, "00000"][i % 3]
    monkeypatch.setattr(generate, "greedy_many", lambda model, prompts, n, stop=None, **kw:
                        [tok(" " + plan[tuple(ids)] + ".", add_special_tokens=False)["input_ids"] for ids in prompts])
    res = runner.retrieval(None, tok, cfg, needle.make_filler(cfg.filler), task="multi_needle", n_needles=3)
    assert res["mean_accuracy"] == pytest.approx(2 / 6)
    assert (res["wrong"], res["wrong_other_needle"]) == (4, 2)
