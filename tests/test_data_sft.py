"""SFT documents: truncation that keeps the answer, chat roles checked against the template, and the
ledger's account of what was cut, dropped or suspect (with the --sft-drop-limit stop)."""

from __future__ import annotations

import pytest

from helpers_train import WORDS, load_rows, target_text, text_rows, write_jsonl
from longctx import data as data_mod, tokenization
from longctx.errors import LongctxError


def text(tok, doc) -> str:
    return tok.decode([int(i) for i in doc.input_ids])


def filler(n: int, seed: int = 0) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n))


# ---- prompt / response --------------------------------------------------------------------------

def test_long_prompt_keeps_instruction_question_and_the_whole_answer(tok, tmp_path):
    row = {"prompt": "Read this. " + filler(300) + " Question: what is the key?", "response": " the key is 42"}
    (doc,), ledger = load_rows(tok, [row], tmp_path, max_len=64)
    assert len(doc) == 64
    assert target_text(tok, doc) == " the key is 42<|eos|>"
    assert text(tok, doc).startswith("<|bos|>Read this.")
    assert "Question: what is the key?" in text(tok, doc)
    r = ledger.per_file["d.jsonl"]
    assert r["docs_truncated"] == 1 and r["docs_context_cut"] == 1 and r["docs_answer_cut"] == 0
    assert r["tokens_raw"] == r["tokens_kept"] + r["tokens_truncated"]


def test_the_old_behaviour_cuts_the_answer_off(tok, tmp_path):
    row = {"prompt": "Read this. " + filler(300) + " Question: what is the key?", "response": " the key is 42"}
    docs, ledger = load_rows(tok, [row], tmp_path, max_len=64, sft_truncation="end")
    assert docs == [] and ledger.per_file["d.jsonl"]["docs_dropped_no_targets"] == 1


def test_an_answer_longer_than_the_row_is_cut_and_counted(tok, tmp_path):
    row = {"prompt": "Q: list the words.", "response": " " + filler(200)}
    (doc,), ledger = load_rows(tok, [row], tmp_path, max_len=64)
    assert len(doc) == 64 and text(tok, doc).startswith("<|bos|>Q:")
    assert ledger.per_file["d.jsonl"]["docs_answer_cut"] == 1
    assert "part of the answer cut" in ledger.format()


def test_middle_cut():
    assert tokenization.middle_cut(list(range(10)), 4) == [0, 1, 8, 9]
    assert tokenization.middle_cut(list(range(10)), 1) == [0]
    assert tokenization.middle_cut(list(range(3)), 5) == [0, 1, 2]


# ---- chat -----------------------------------------------------------------------------------------

def test_long_user_turn_loses_its_middle_and_keeps_the_question_and_answers(tok, tmp_path):
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "Document: " + filler(400) + " Question: the key?"},
            {"role": "assistant", "content": "42"},
            {"role": "user", "content": "and the lock?"},
            {"role": "assistant", "content": "7"}]
    (doc,), ledger = load_rows(tok, [{"messages": msgs}], tmp_path, max_len=96)
    assert len(doc) <= 96
    assert target_text(tok, doc) == "42<|end|>\n7<|end|>\n"
    t = text(tok, doc)
    assert t.startswith("<|bos|><|system|>\nbe brief<|end|>\n<|user|>\nDocument:") and "Question: the key?" in t
    assert ledger.per_file["d.jsonl"]["docs_context_cut"] == 1


def test_many_short_turns_lose_the_earliest_exchanges(tok, tmp_path):
    msgs = [{"role": "system", "content": "count"}]
    for i in range(30):
        msgs += [{"role": "user", "content": f"next after {i}?"}, {"role": "assistant", "content": f"{i + 1}"}]
    (doc,), ledger = load_rows(tok, [{"messages": msgs}], tmp_path, max_len=80)
    assert len(doc) <= 80
    t = text(tok, doc)
    assert t.startswith("<|bos|><|system|>\ncount<|end|>\n<|user|>\n") and t.endswith("next after 29?<|end|>\n"
                                                                                       "<|assistant|>\n30<|end|>\n")
    assert "next after 0?" not in t
    assert target_text(tok, doc).endswith("30<|end|>\n")
    assert ledger.per_file["d.jsonl"]["docs_context_cut"] == 1


def test_a_user_turn_is_not_gutted_while_earlier_exchanges_can_go(tok, tmp_path):
    """Cutting the longest user turn alone would leave 5 of its 62 tokens: dropping the earlier exchange is better."""
    msgs = [{"role": "user", "content": filler(60, 1) + " first?"}, {"role": "assistant", "content": "one"},
            {"role": "user", "content": filler(31, 2) + " second?"}, {"role": "assistant", "content": "two"}]
    (doc,), _ = load_rows(tok, [{"messages": msgs}], tmp_path, max_len=64)
    t = text(tok, doc)
    assert "first?" not in t and t.endswith(" second?<|end|>\n<|assistant|>\ntwo<|end|>\n")
    assert target_text(tok, doc) == "two<|end|>\n"


def test_turns_after_the_last_answer_go_first(tok, tmp_path):
    msgs = [{"role": "user", "content": "the key?"}, {"role": "assistant", "content": "42"},
            {"role": "user", "content": filler(300)}]
    (doc,), _ = load_rows(tok, [{"messages": msgs}], tmp_path, max_len=32)
    assert text(tok, doc) == "<|bos|><|user|>\nthe key?<|end|>\n<|assistant|>\n42<|end|>\n"


def test_unknown_role_is_an_error_naming_file_and_line(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}]
    with pytest.raises(LongctxError) as e:
        load_rows(tok, rows, tmp_path, name="chat.jsonl")
    assert "chat.jsonl:2" in str(e.value) and "'robot'" in str(e.value) and "assistant" in str(e.value)


def test_misspelled_assistant_is_an_error_with_a_suggestion(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "yo"}]}]
    with pytest.raises(LongctxError, match=r"d.jsonl:1: message 1 has role 'asistant' \(did you mean 'assistant'\?\)"):
        load_rows(tok, rows, tmp_path)


def test_roles_the_template_names_are_known():
    class Tok:  # the role tests of Llama 3's template
        chat_template = ("{%- if messages[0]['role'] == 'system' %}{%- for message in messages %}"
                         "{%- if not (message.role == 'ipython' or message.role == \"tool\") %}{%- endif %}"
                         "{%- endfor %}")

    assert tokenization.chat_roles(Tok()) == {"system", "user", "assistant", "ipython", "tool"}


# ---- the ledger's account and the limit --------------------------------------------------------------

def no_answer_rows(n):
    return [{"messages": [{"role": "user", "content": f"hello {i}"}]} for i in range(n)]


def answer_rows(n):
    return [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(n)]


def test_missing_assistant_and_empty_responses_are_counted_and_explained(tok, tmp_path):
    rows = answer_rows(6) + no_answer_rows(2) + [
        {"messages": [{"role": "user", "content": "say nothing"}, {"role": "assistant", "content": ""}]}]
    docs, ledger = load_rows(tok, rows, tmp_path, name="chat.jsonl")
    r = ledger.per_file["chat.jsonl"]
    assert len(docs) == 7 and r["docs_no_assistant"] == 2 and r["docs_dropped_no_targets"] == 2
    assert r["docs_empty_response"] == 1
    out = ledger.format()
    assert "chat.jsonl (messages): 2 without an assistant turn: dropped; 1 with an empty response" in out
    ledger.check_sft(0.5)  # 3 of 9 is within 50%
    with pytest.raises(LongctxError) as e:
        ledger.check_sft(0.1)
    assert "chat.jsonl: 3 of 9 documents (33%)" in str(e.value) and "--sft-drop-limit 1" in str(e.value)


def test_empty_responses_of_prompt_response_are_counted(tok, tmp_path):
    rows = [{"prompt": "a", "response": " b"}, {"prompt": "c", "response": ""}, {"prompt": "d", "response": "  "}]
    docs, ledger = load_rows(tok, rows, tmp_path)
    assert len(docs) == 3 and ledger.per_file["d.jsonl"]["docs_empty_response"] == 2
    with pytest.raises(LongctxError, match="2 with an empty response"):
        ledger.check_sft(0.5)


def test_text_files_do_not_count_toward_the_limit(tok, tmp_path):
    docs, ledger = load_rows(tok, text_rows(5, lo=200, hi=220), tmp_path, max_len=32)
    assert ledger.per_file["d.jsonl"]["docs_truncated"] == 5
    assert "5 over --max-seq-len: cut at the end" in ledger.format()
    ledger.check_sft(0.0)


class Cfg:
    max_seq_len, truncation, sft_truncation, sft_drop_limit = 64, "truncate", "context", 0.1
    eval_data, eval_fraction, seed, packing, micro_batch_size, grad_accum, group_by_length = [], 0.0, 0, True, 1, 1, False
    data_cache, data_workers = "", 1


def test_build_mixed_with_text_keeps_the_long_sft_documents(tok, tmp_path):
    """The issue's case: long SFT rows mixed with text. Cut at the end, every SFT row lost its answer and was
    dropped while the run went on; now each keeps its answer and the ledger says its context was cut."""
    sft = [{"prompt": "Context: " + filler(200, i) + f" Question {i}?", "response": f" answer {i}"} for i in range(8)]
    cfg = Cfg()
    cfg.data = [str(write_jsonl(tmp_path / "text.jsonl", text_rows(8))),
                str(write_jsonl(tmp_path / "sft.jsonl", sft))]
    bundle = data_mod.build(cfg, tok, 1)
    r = bundle.ledger.per_file["sft.jsonl"]
    assert r["documents"] == 8 and r["docs_context_cut"] == 8 and r.get("docs_dropped_no_targets", 0) == 0
    assert "sft.jsonl (prompt_response): 8 over --max-seq-len: context cut, answer kept" in bundle.ledger.format()
    kept = [target_text(tok, d) for d in bundle.train_docs if d.sample_id.startswith("sft.jsonl")]
    assert sorted(kept) == sorted(f" answer {i}<|eos|>" for i in range(8))

    cfg.sft_truncation = "end"  # the old behaviour drops every SFT document: now a stop, not a silent run
    with pytest.raises(LongctxError) as e:
        data_mod.build(cfg, tok, 1)
    assert "sft.jsonl: 8 of 8 documents (100%)" in str(e.value)


def test_context_is_the_default_and_end_the_old_behaviour(tmp_path):
    import json

    from longctx import config, runs

    assert config.parse([]).sft_truncation == "context"
    assert config.parse(["--sft-truncation", "end"]).sft_truncation == "end"
    with pytest.raises(LongctxError, match="--sft-drop-limit must be in"):
        config.parse(["--sft-drop-limit", "1.5"])
    # a run recorded before the option existed cut SFT rows at the end: resuming it with the new default would
    # change its data, so it is refused with the difference; with --sft-truncation end it resumes
    cfg = config.parse(["--output-dir", str(tmp_path)])
    old = {k: v for k, v in cfg.to_dict().items() if k != "sft_truncation"}
    (tmp_path / "run.json").write_text(json.dumps({"config": old, "world_size": 1}))
    with pytest.raises(LongctxError, match="sft_truncation: 'end' -> 'context'"):
        runs.check_resume_compatible(cfg)
    runs.check_resume_compatible(config.parse(["--output-dir", str(tmp_path), "--sft-truncation", "end"]))


@pytest.mark.slow
def test_the_run_header_shows_what_truncation_did(tmp_path):
    """train.py end to end (one process, 1 step): long SFT rows keep their answers, and the ledger printed at the
    start and saved in the run directory say so."""
    import json
    import subprocess
    import sys

    from helpers_train import REPO, fast_args, tiny_config_file

    sft = [{"prompt": "Context: " + filler(200, i) + f" Question {i}?", "response": f" answer {i}"} for i in range(6)]
    data = [str(write_jsonl(tmp_path / "text.jsonl", text_rows(10))), str(write_jsonl(tmp_path / "sft.jsonl", sft))]
    out = tmp_path / "o"
    args = fast_args(out, data, tiny_config_file(tmp_path / "m"), steps=1, extra=["--no-save-final-model"])
    p = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sft.jsonl (prompt_response): 6 over --max-seq-len: context cut, answer kept" in p.stdout
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["per_file"]["sft.jsonl"]["docs_context_cut"] == 6
    assert ledger["why"]["sft.jsonl"] == ["6 over --max-seq-len: context cut, answer kept"]
