"""The learning-proof kit (bench/learning_proof/): its documents pose the task they claim to, and run.sh
goes end to end on the CPU at toy size (the real run is one GPU, see bench/learning_proof/README.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from helpers_train import REPO, TOKENIZER

NEEDLE = re.compile(r"The value of (\w+) is (\d+)\.")
QA = re.compile(r"What is the value of (\w+)\? The value of \1 is (\d+)\.")


def test_training_documents_pose_the_task(tmp_path):
    from transformers import AutoTokenizer

    from bench.learning_proof import make_data

    assert make_data.main(["--out", str(tmp_path), "--docs", "60", "--ppl-docs", "2", "--max-len", "1024",
                           "--repeat", "0.25", "--numbers", "0.25", "--workers", "1",
                           "--ppl-kinds", "recall,bank,numbers"]) == 0
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    docs = [json.loads(x)["text"] for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    kinds = {"needle": 0, "recall": 0, "repeat": 0, "numbers": 0}
    for text in docs:
        assert len(tok(text)["input_ids"]) + 2 <= 1024  # bos + eos: nothing is truncated by train.py
        qas = QA.findall(text)
        if qas:
            kinds["needle"] += 1
            head = text[:text.index("What is the value of")]
            facts = dict(NEEDLE.findall(head))
            assert len(facts) == len(NEEDLE.findall(head)), "keys are distinct"
            assert sorted(qas) == sorted(facts.items()), "every needle is asked for once, with its own value"
            assert all(len(v) == 5 for v in facts.values())
        elif text.replace(" ", "").isdigit():  # a run of 5-digit values repeated in order
            kinds["numbers"] += 1
            values = text.split()
            assert all(len(v) == 5 for v in values)
            period = next(p for p in range(2, len(values)) if values[p:] == values[:-p])
            assert len(values) >= 2 * period and period <= 1024 // 6
        elif "." not in text:  # a run of words repeated in order
            kinds["repeat"] += 1
            words = text.split()
            period = next(p for p in range(8, 65) if words[p:] == words[:-p])
            assert len(words) >= 2 * period
        else:
            kinds["recall"] += 1
            sents = [s.strip() for s in text.split(".") if s.strip()]
            half = len(sents) // 2
            assert len(sents) % 2 == 0 and sorted(sents[:half]) == sorted(sents[half:])
    assert kinds["needle"] >= 10 and kinds["recall"] >= 3 and kinds["repeat"] >= 5 and kinds["numbers"] >= 5, kinds
    ppl = {name: [json.loads(x)["text"] for x in (tmp_path / f).read_text().splitlines()]
           for name, f in (("recall", "ppl_eval.jsonl"), ("bank", "ppl_bank.jsonl"), ("numbers", "ppl_numbers.jsonl"))}
    for name, texts in ppl.items():
        assert len(texts) == 2 and all(len(tok(t)["input_ids"]) >= 1024 for t in texts), name
        assert len(set(texts)) == 2, f"{name}: two different documents"
    for text in ppl["numbers"]:  # a run of values, then the same run: the second half of the tokens is a copy
        values = text.split()
        half = len(values) // 2
        assert len(values) % 2 == 0 and values[:half] == values[half:] and all(len(v) == 5 for v in values)
        first = len(tok(" " + " ".join(values[:half]), add_special_tokens=False)["input_ids"])
        assert abs(first - len(tok(text, add_special_tokens=False)["input_ids"]) / 2) <= 1
    for text in ppl["bank"]:  # sentences drawn from a bank of 256: some seen again, even in 1K tokens
        sents = [x.strip() for x in text.split(".") if x.strip()][:-1]  # the last may be cut
        assert len(set(sents)) < len(sents) and all(5 <= len(x.split()) <= 10 for x in sents)
    assert ppl["recall"][0] not in ppl["bank"] + ppl["numbers"]


@pytest.mark.slow
def test_run_sh_end_to_end_on_cpu(tmp_path):
    cfg = json.loads((REPO / "bench" / "learning_proof" / "model.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16)
    (tmp_path / "model.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, STAGES="256:2:1e-3,512:1", STAGE_TOKENS="1", MIN_DOCS="24", ROW_TOKENS="1024", PROBE_SAMPLES="1",
               LENGTHS="256,512", SAMPLES="1", PPL_DOCS="2", WORKERS="1", MODEL_CONFIG=str(tmp_path / "model.json"))
    keep = tmp_path / "keep"
    r = subprocess.run(["bash", str(REPO / "bench" / "learning_proof" / "run.sh"), str(out), str(keep)], cwd=str(tmp_path),
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["train"]["steps"] == 3 and s["train"]["max_seq_len"] == 512  # both stages: 2 on 256-token rows, 1 on 512
    assert s["train"]["stages"] == [{"max_seq_len": 256, "steps": 2}, {"max_seq_len": 512, "steps": 1}]
    for side in ("before", "after"):
        assert 0.0 <= s[side]["passkey"] <= 1.0 and len(s[side]["nll_by_bucket"]) == 8
    assert list(s["timing_s"])[:5] == ["data_first", "train_256", "train_512", "eval_before", "eval_after"]
    assert set(s["ppl_sets"]) == {"recall", "bank", "numbers"}  # PPL_SETS' default, evaluated before and after
    assert all(len(v["before"]) == len(v["after"]) == 8 for v in s["ppl_sets"].values())
    stage2 = json.loads((out / "train" / "run.json").read_text())
    assert stage2["config"]["model"].endswith("train_256/final_model"), "stage 2 starts from stage 1"
    probes = s["probes"]  # teacher-forced retrieval after each stage, at its length and twice it
    assert [(p["label"], p["model"].split("/")[-2]) for p in probes] == [("256", "train_256"), ("512", "train")]
    assert all(0.0 <= probes[1][k] <= 1.0 for k in ("passkey@512", "passkey@1024", "multi@512", "multi@1024"))
    stage1 = json.loads((out / "train_256" / "run.json").read_text())
    assert stage1["config"]["micro_batch_size"] == 1024 // 256  # the same tokens per step at every stage
    assert stage1["config"]["lr"] == 1e-3 and stage2["config"]["lr"] == 2e-3  # STAGES' LR, else train.yaml's
    assert s["after"]["ppl_overall"] < s["before"]["ppl_overall"], "3 steps already move the unigram statistics"

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "RESULTS.md").write_text("# Results\n\nhand-written text\n")
    from bench.learning_proof import report

    assert len(list(keep.iterdir())) == 8, "what a GPU call can bring back: 8 files"
    report.publish(out, docs)
    report.publish(keep, docs)  # from the collected files too; idempotent: the region is replaced, not appended again
    text = (docs / "RESULTS.md").read_text()
    assert text.startswith("# Results\n\nhand-written text\n") and text.count(report.BEGIN) == 1
    assert "Learning proof" in text and "| 256 | " in text  # the per-stage probe table
    for name in report.FIGURES:
        assert (docs / "learning_proof" / name).read_bytes()[:4] == b"\x89PNG"
