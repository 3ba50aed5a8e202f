"""longctx.documents, .tokenization and .batching: formats and label masks, truncation and the ledger, packing, the
batch schedule, collation."""

from __future__ import annotations

from functools import partial

import numpy as np

from helpers_train import chat_rows, load_rows, target_text, text_rows
from longctx import batching, documents
from longctx.tokenization import IGNORE


load = partial(load_rows, truncation="error")  # a document over max_len stops the load unless a test says otherwise


def test_text_every_token_but_the_first_is_a_target(tok, tmp_path):
    (doc,), _ = load(tok, [{"text": "apple anchor bottle"}], tmp_path)
    assert doc.input_ids[0] == tok.bos_token_id and doc.input_ids[-1] == tok.eos_token_id
    assert doc.labels[0] == IGNORE and (doc.labels[1:] == doc.input_ids[1:]).all()


def test_chat_targets_are_exactly_the_assistant_turns(tok, tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "apple?"},
            {"role": "assistant", "content": "anchor bottle"}, {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "candle"}]
    (doc,), _ = load(tok, [{"messages": msgs}], tmp_path)
    assert target_text(tok, doc) == "anchor bottle<|end|>\ncandle<|end|>\n"
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(doc.input_ids.tolist()) == full


def test_prompt_response_targets_are_the_response(tok, tmp_path):
    (doc,), _ = load(tok, [{"prompt": "Reverse: a b", "response": " b a"}], tmp_path)
    assert target_text(tok, doc) == " b a<|eos|>"


def test_truncation_policies_and_ledger(tok, tmp_path):
    rows = text_rows(4, seed=1, lo=3, hi=5) + text_rows(2, seed=2, lo=80, hi=90)
    docs, ledger = load(tok, rows, tmp_path, max_len=40, truncation="truncate")
    row = ledger.per_file["d.jsonl"]
    assert len(docs) == 6 and max(len(d) for d in docs) == 40
    assert row["docs_truncated"] == 2 and row["tokens_raw"] == row["tokens_kept"] + row["tokens_truncated"]
    docs, ledger = load(tok, rows, tmp_path, max_len=40, truncation="drop")
    row = ledger.per_file["d.jsonl"]
    assert len(docs) == 4 and row["docs_dropped_too_long"] == 2
    assert row["tokens_raw"] == row["tokens_kept"] + row["tokens_dropped"]
    assert "TOTAL" in ledger.format()


def test_truncation_that_removes_all_targets_drops_the_sample(tok, tmp_path):
    """With --sft-truncation end (the old behaviour: cut at the end like text) a long prompt loses the response."""
    rows = [{"prompt": "apple " * 80, "response": " anchor"}, {"prompt": "x", "response": " y"}]
    docs, ledger = load(tok, rows, tmp_path, max_len=32, truncation="truncate", sft_truncation="end")
    assert len(docs) == 1 and ledger.per_file["d.jsonl"]["docs_dropped_no_targets"] == 1


def test_other_file_formats_read_the_same(tok, tmp_path):
    import datasets

    rows = chat_rows(3) + []
    jsonl_docs, _ = load(tok, rows, tmp_path)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "arr.json").write_text(__import__("json").dumps(rows))
    for name in ("d.parquet", "arr.json"):
        docs = documents.load_docs([str(tmp_path / name)], tok, 4096, "error", documents.Ledger())
        assert [d.input_ids.tolist() for d in docs] == [d.input_ids.tolist() for d in jsonl_docs]
        assert [d.labels.tolist() for d in docs] == [d.labels.tolist() for d in jsonl_docs]


def test_pack_places_every_document_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500).tolist()
    rows = batching.pack(lengths, 512)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows)
    assert sum(lengths) / (len(rows) * 512) > 0.95  # best-fit decreasing packs tightly
    assert rows == batching.pack(lengths, 512)  # deterministic


def test_collate_restarts_positions_and_masks_document_starts(tok, tmp_path):
    docs, _ = load(tok, text_rows(5, seed=4, lo=3, hi=12), tmp_path)
    rows = [[0, 1, 2], [3, 4]]
    b = batching.collate(docs, rows, pad_id=0, packing=True, max_seq_len=64)
    for r, row in enumerate(rows):
        t = 0
        for d in row:
            n = len(docs[d])
            assert b["position_ids"][r, t:t + n].tolist() == list(range(n))
            assert b["labels"][r, t] == IGNORE
            assert b["labels"][r, t + 1:t + n].tolist() == docs[d].labels[1:].tolist()
            t += n
        assert (b["labels"][r, t:] == IGNORE).all() and b["position_ids"][r, t] == 0  # padding: own segment
    starts = b["cu_seq_lens"].tolist()
    assert starts[0] == 0 and starts[-1] == 2 * 64 and len(starts) == 5 + 2 + 1
    flat = batching.collate(docs, rows, pad_id=0, packing=True, max_seq_len=64, flatten=True)
    assert flat["input_ids"].shape == (1, 128) and flat["cu_seq_lens"].tolist() == starts
    assert b["n_targets"] == sum(d.n_supervised for d in docs)


def test_schedule_is_deterministic_disjoint_and_epoch_shuffled():
    rows = [[i] for i in range(50)]
    mk = lambda: batching.BatchSchedule(rows, [1] * 50, [1] * 50, micro=2, accum=3, world=2, seed=7)  # noqa: E731
    schedule = mk()
    assert schedule.global_batch == 12 and schedule.steps_per_epoch == 4
    for step in range(8):
        per_rank = [sum(schedule.micro_batches(step, r), []) for r in range(2)]
        assert sorted(per_rank[0] + per_rank[1]) == sorted(schedule.step_rows(step))
        assert not set(per_rank[0]) & set(per_rank[1])
    epoch0 = sum((schedule.step_rows(s) for s in range(4)), [])
    assert len(set(epoch0)) == 48
    assert epoch0 != sum((schedule.step_rows(s) for s in range(4, 8)), [])
    assert [mk().step_rows(s) for s in range(8)] == [schedule.step_rows(s) for s in range(8)]


def test_group_by_length_batches_similar_lengths():
    lengths = list(np.random.default_rng(1).integers(1, 1000, size=400))
    rows = [[i] for i in range(400)]
    schedule = batching.BatchSchedule(rows, lengths, [1] * 400, micro=4, accum=1, world=2, seed=0, group_by_length=True)
    spread = np.mean([np.ptp([lengths[r] for r in schedule.step_rows(s)]) for s in range(schedule.steps_per_epoch)])
    rand = batching.BatchSchedule(rows, lengths, [1] * 400, micro=4, accum=1, world=2, seed=0)
    spread_rand = np.mean([np.ptp([lengths[r] for r in rand.step_rows(s)]) for s in range(rand.steps_per_epoch)])
    assert spread < spread_rand / 4
