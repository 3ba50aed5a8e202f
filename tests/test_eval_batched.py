"""Batched greedy decoding (longctx.evaluation.generate.greedy_many) against the one-prompt decoder it replaces in
eval.py's generation tasks: a tiny random Llama in fp32 on CPU, prompts of equal and of different lengths (the
left-padded, masked decode path), with stop tokens and an early `done`; then eval.py's retrieval and chat tasks
through it, checked against greedy() prompt by prompt."""

from __future__ import annotations

import pytest
import torch

from helpers_train import tiny_lm, tiny_model_dir
from longctx.evaluation import generate, needle


@pytest.fixture(scope="module")
def model():
    return tiny_lm(seed=0, attn_implementation="sdpa").eval()


def prompts(model, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("batch_tokens", [0, 100, 1])
def test_same_tokens_as_one_prompt_at_a_time(model, batch_tokens):
    ps = prompts(model, (37, 37, 50, 12, 64, 37, 12))
    reference = [generate.greedy(model, p, 9) for p in ps]
    assert generate.greedy_many(model, ps, 9, batch_tokens=batch_tokens) == reference
    stop = {reference[0][3], reference[2][2]}  # some rows stop early, the batch goes on for the others
    reference = [generate.greedy(model, p, 9, stop) for p in ps]
    assert any(len(r) < 9 for r in reference) and any(len(r) == 9 for r in reference)
    assert generate.greedy_many(model, ps, 9, stop, batch_tokens=batch_tokens) == reference


def test_done_cuts_each_continuation_where_it_says(model):
    ps = prompts(model, (20, 20, 33))
    full = [generate.greedy(model, p, 8) for p in ps]
    got = generate.greedy_many(model, ps, 8, done=lambda ids: len(ids) >= 3 and ids[-1] % 2 == 0)
    for g, f in zip(got, full):
        k = next((i + 1 for i in range(2, 8) if f[i] % 2 == 0), 8)
        assert g == f[:k]


def test_batches_group_equal_lengths_within_the_budget():
    assert generate.batches([5, 3, 5, 3, 9], 10) == [[1, 3], [0, 2], [4]]
    assert generate.batches([5, 3, 5], 0) == [[1, 0, 2]]
    assert generate.batches([5, 3], 1) == [[1], [0]]


def test_answer_complete():
    assert not needle.answer_complete(" 4821") and not needle.answer_complete(" ")
    assert needle.answer_complete(" 48213.") and needle.answer_complete("48\n")


def test_retrieval_and_chat_tasks_answer_as_greedy(tok, tmp_path):
    from longctx.evaluation import chat, citation, runner

    model_dir = tiny_model_dir(tmp_path / "m", max_position_embeddings=1024)
    cfg = runner.parse(["--model", model_dir, "--tasks", "passkey,chat", "--lengths", "128,256", "--depths", "0,1",
                        "--samples", "3", "--batch-tokens", "512", "--chat-max-new-tokens", "6"])
    m = generate.load_model(model_dir, precision="fp32", attn_impl="sdpa", device=torch.device("cpu"))
    filler = needle.make_filler(cfg.filler)
    res = runner.retrieval(m, tok, cfg, filler, task="passkey", n_needles=1)
    grid = needle.make_grid(tok, cfg.lengths, cfg.depths, cfg.samples, seed=cfg.seed, filler=filler)
    ref = {(L, d): sum(needle.extract_answer(tok.decode(generate.greedy(m, s.input_ids, cfg.max_new_tokens,
                                                                          {tok.eos_token_id}),
                                                         skip_special_tokens=True)) == s.answer
                       for s in rows) / len(rows) for (L, d), rows in grid.items()}
    assert res["accuracy"] == [[ref[(L, d)] for L in cfg.lengths] for d in cfg.depths]
    out = runner.run_task("chat", m, tok, cfg, filler, None)
    stop = citation.stop_ids(tok)
    assert [r["prompt"] for r in out["answers"]] == list(chat.PROMPTS)
    for r in out["answers"]:
        ids = generate.greedy(m, chat.prompt_ids(tok, r["prompt"]), 6, stop)
        assert r["answer"] == tok.decode(ids, skip_special_tokens=True).strip() and r["tokens"] == len(ids)
