"""longctx.datastore: data prepared once into a memory-mapped cache equals the in-memory path bit for bit, is reused
while nothing that shapes it changed, is rebuilt when something did, and never waits on a dead builder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from helpers_train import REPO, chat_rows, pr_rows, small_dataset, text_rows, write_jsonl
from longctx import batching, data as data_mod, datastore, documents, tokenization
from longctx.errors import LongctxError


def cfg_for(paths, cache, **kw) -> SimpleNamespace:
    base = dict(data=list(paths), eval_data=[], eval_fraction=0.1, max_seq_len=128, truncation="truncate",
                sft_truncation="context", sft_drop_limit=0.1, seed=3, packing=True, micro_batch_size=1, grad_accum=2,
                group_by_length=False, data_cache=str(cache), data_workers=2)
    return SimpleNamespace(**{**base, **kw})


def reference_bundle(cfg, tok, world: int):
    """Today's path written out plainly: every document tokenized in memory (load_docs), the eval split by the seeded
    permutation, best-fit-decreasing packing over the in-memory documents."""
    ledger = documents.Ledger()
    docs = documents.load_docs(cfg.data, tok, cfg.max_seq_len, cfg.truncation, ledger, cfg.sft_truncation)
    perm = np.random.default_rng([cfg.seed, 7]).permutation(len(docs))
    k = min(len(docs) - 1, max(1, round(cfg.eval_fraction * len(docs))))
    held = set(perm[:k].tolist())
    train = [d for i, d in enumerate(docs) if i not in held]
    evald = [d for i, d in enumerate(docs) if i in held]
    rows = batching.pack([len(d) for d in train], cfg.max_seq_len)
    return train, evald, rows, ledger


@pytest.mark.parametrize("truncation,sft_truncation", [("truncate", "context"), ("truncate", "end"), ("drop", "context")])
def test_prepared_data_equals_the_in_memory_path_bit_for_bit(tok, tmp_path, truncation, sft_truncation):
    paths = small_dataset(tmp_path / "d", n_text=50, n_chat=20, n_pr=20)
    write_jsonl(tmp_path / "d" / "long.jsonl", text_rows(6, seed=5, lo=150, hi=200))  # over max_seq_len
    paths.append(str(tmp_path / "d" / "long.jsonl"))
    cfg = cfg_for(paths, tmp_path / "cache", truncation=truncation, sft_truncation=sft_truncation,
                  sft_drop_limit=1.0)
    bundle = data_mod.build(cfg, tok, world_size=2, say=lambda m: None, announce=lambda m: None)
    train, evald, rows, ledger = reference_bundle(cfg, tok, 2)

    assert bundle.ledger.per_file == ledger.per_file and bundle.ledger.formats == ledger.formats
    for got, ref in ((bundle.train_docs, train), (bundle.eval_docs, evald)):
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert a.sample_id == b.sample_id
            assert a.input_ids.dtype == b.input_ids.dtype and np.array_equal(a.input_ids, b.input_ids)
            assert a.labels.dtype == b.labels.dtype and np.array_equal(a.labels, b.labels)
    assert bundle.schedule.rows == rows
    for step in range(bundle.schedule.steps_per_epoch):  # what the loop feeds the model: every micro-batch, every rank
        for rank in range(2):
            for mb in bundle.schedule.micro_batches(step, rank):
                got = batching.collate(bundle.train_docs, [rows[r] for r in mb], pad_id=0, packing=True,
                                       max_seq_len=cfg.max_seq_len)
                ref = batching.collate(train, [rows[r] for r in mb], pad_id=0, packing=True,
                                       max_seq_len=cfg.max_seq_len)
                for key in ("input_ids", "labels", "position_ids", "cu_seq_lens"):
                    assert np.array_equal(got[key].numpy(), ref[key].numpy()), key
                assert got["sample_ids"] == ref["sample_ids"]


def test_plain_encoding_equals_the_tokenizers_own_call(tok):
    """tokenization.encode skips character offsets for speed; the ids must be what tok() gives, special-token text
    too."""
    texts = [t["text"] for t in text_rows(20, seed=9)] + ["<|eos|> in the text", "", "  spaces\n\ttabs  "]
    assert tokenization.encode(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]


def test_the_entry_does_not_depend_on_the_number_of_workers(tok, tmp_path):
    paths = small_dataset(tmp_path / "d", n_text=30, n_chat=10, n_pr=0)
    opts = datastore.Options(96, "truncate", "context")
    one = datastore.prepare(paths, tok, opts, tmp_path / "c1", num_proc=1, say=print, announce=print)
    two = datastore.prepare(paths, tok, opts, tmp_path / "c2", num_proc=2, say=print, announce=print)
    for name in ("ids.bin", "mask.bin"):
        assert (one.path / name).read_bytes() == (two.path / name).read_bytes()
    assert one.path.name == two.path.name  # the key: the same inputs, whatever builds them


def test_a_warm_start_reuses_the_entry_and_any_change_rebuilds_it(tok, tmp_path, capsys):
    (path,) = small_dataset(tmp_path / "d", n_text=20, n_chat=0, n_pr=0)
    opts = datastore.Options(64, "truncate", "context")
    first = datastore.prepare([path], tok, opts, tmp_path / "c", num_proc=1)
    assert "preparing" in capsys.readouterr().out
    again = datastore.prepare([path], tok, opts, tmp_path / "c", num_proc=1)
    assert "reused, nothing tokenized" in capsys.readouterr().out and again.path == first.path

    other = datastore.prepare([path], tok, datastore.Options(32, "truncate", "context"), tmp_path / "c", num_proc=1)
    assert other.path != first.path  # max_seq_len shapes the documents
    with open(path, "a") as f:  # one more record: the content hash changes the key
        f.write(json.dumps({"text": "apple anchor"}) + "\n")
    grown = datastore.prepare([path], tok, opts, tmp_path / "c", num_proc=1)
    assert grown.path != first.path and len(grown) == len(first) + 1


def test_a_builder_killed_while_holding_the_lock_does_not_block_the_next(tok, tmp_path):
    """The lock dies with its holder (kill -9 here), so the next process builds instead of waiting forever; what the
    dead builder left half-written is not taken for an entry."""
    (path,) = small_dataset(tmp_path / "d", n_text=10, n_chat=0, n_pr=0)
    opts = datastore.Options(64, "truncate", "context")
    root = tmp_path / "c"
    root.mkdir()
    key = datastore.cache_key([path], tok, opts, root)
    (root / key).mkdir()
    (root / key / "ids.bin").write_bytes(b"partial")  # no meta.json: not complete
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(root / (key + '.lock'))!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    store = datastore.prepare([path], tok, opts, root, num_proc=1)
    assert store.path == root / key and len(store) == 10 and (store.path / "meta.json").is_file()


def test_sharegpt_conversations_read_as_messages(tok, tmp_path):
    msgs = chat_rows(6)
    share = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                                for m in r["messages"]]} for r in msgs]
    a = documents.load_docs([str(write_jsonl(tmp_path / "m.jsonl", msgs))], tok, 256, "truncate", documents.Ledger())
    store = datastore.prepare([str(write_jsonl(tmp_path / "s.jsonl", share))], tok,
                              datastore.Options(256, "truncate", "context"), tmp_path / "c", num_proc=1)
    assert [d.input_ids.tolist() for d in store] == [d.input_ids.tolist() for d in a]
    assert [d.labels.tolist() for d in store] == [d.labels.tolist() for d in a]
    assert documents.SHAREGPT_NOTE in store.ledger.format()


def test_a_save_to_disk_directory_is_a_dataset(tok, tmp_path):
    import datasets

    rows = pr_rows(12)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    ref = documents.load_docs([str(write_jsonl(tmp_path / "pr.jsonl", rows))], tok, 256, "truncate", documents.Ledger())
    store = datastore.prepare([str(tmp_path / "saved")], tok, datastore.Options(256, "truncate", "context"),
                              tmp_path / "c", num_proc=1)
    assert [d.sample_id for d in store] == [f"saved:row{i}" for i in range(12)]
    assert [d.labels.tolist() for d in store] == [d.labels.tolist() for d in ref]


def test_sampling_weights_share_the_training_tokens(tok, tmp_path):
    a = str(write_jsonl(tmp_path / "a.jsonl", text_rows(40, seed=1)))
    b = str(write_jsonl(tmp_path / "b.jsonl", text_rows(10, seed=2)))
    cfg = cfg_for([f"{a}:3", f"{b}:1"], tmp_path / "c", eval_fraction=0.0, grad_accum=1)
    bundle = data_mod.build(cfg, tok, world_size=1, say=lambda m: None, announce=lambda m: None)
    docs = bundle.train_docs
    tokens = {"a": 0, "b": 0}
    for d in docs:
        tokens[d.sample_id[0]] += len(d)
    total = sum(tokens.values())
    longest = max(len(d) for d in docs)
    assert abs(tokens["a"] - 0.75 * total) <= longest and abs(tokens["b"] - 0.25 * total) <= longest
    b_docs = [d.sample_id for d in docs if d.sample_id.startswith("b")]
    assert len(b_docs) > 10  # b is short of its share, so its documents repeat
    assert "sampling weight 3" in bundle.ledger.format()
    with pytest.raises(LongctxError, match="to every file or to none"):
        data_mod.parse_data_spec([f"{a}:3", b])


def test_bad_records_stop_before_tokenizing_with_their_line(tok, tmp_path):
    rows = text_rows(5) + [{"text": 7}] + text_rows(2)
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(LongctxError, match=r"bad.jsonl:6: 'text' must be a string"):
        datastore.prepare([str(path)], tok, datastore.Options(64, "truncate", "context"), tmp_path / "c",
                          num_proc=1, say=print, announce=print)
    assert not list((tmp_path / "c").glob("*/meta.json"))


def test_prepare_data_from_the_command_line_then_a_run_reuses_it(tmp_path):
    """train.py --prepare-data (no model, no GPU) tokenizes once; the same data then opens without tokenizing."""
    paths = small_dataset(tmp_path / "d", n_text=30, n_chat=0, n_pr=0)
    env_cache = ["--data-cache", str(tmp_path / "cache")]
    cmd = [sys.executable, str(REPO / "train.py"), "--prepare-data", "--data", *paths, "--max-seq-len", "256",
           *env_cache]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "preparing data" in first.stdout and "token ledger" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert second.returncode == 0 and "reused, nothing tokenized" in second.stdout


def test_the_memory_plan_counts_the_data_each_rank_holds(tok, tmp_path):
    """What a rank keeps of prepared data is its index (tokens stay memory-mapped): the plan's host items and the
    preflight's total carry it."""
    from longctx.flops import ModelShape
    from longctx.plan import plan
    from longctx.plan_types import Setup

    paths = small_dataset(tmp_path / "d", n_text=40, n_chat=0, n_pr=0)
    bundle = data_mod.build(cfg_for(paths, tmp_path / "c"), tok, world_size=1, say=lambda m: None,
                            announce=lambda m: None)
    held = bundle.resident_bytes()
    tokens = sum(len(d) for d in bundle.train_docs) * 5  # int32 ids + uint8 mask, on disk
    assert 0 < held < 400 * (len(bundle.train_docs) + len(bundle.eval_docs)) and held < 2 * tokens
    shape = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=2048)
    at_scale = held * 2000  # LongCite-45K's order of documents: the plan shows it (under 0.01 GiB it is left out)
    base = plan(Setup(shape=shape, seq_len=128))
    with_data = plan(Setup(shape=shape, seq_len=128, data_bytes=at_scale))
    assert with_data.host_per_rank - base.host_per_rank == at_scale
    assert any(i.name.startswith("data (") and i.bytes == at_scale for i in with_data.host)
    # before the data is read, --plan estimates it from the records: within a factor of two of what the build holds
    estimate = data_mod.estimate_resident_bytes(paths)
    assert held / 2 <= estimate <= 2 * held
