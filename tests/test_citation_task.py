"""The cite-the-source task (longctx.evaluation.citation) at small scale: the embedded tokenizer, 2K-4K contexts, a
source tree of real stdlib files. Checked against the files themselves:

* every gold signature is verbatim in its cited document's block of the context, and the asked name is defined in
  no other document of the context; contexts fit their length (tokens, as train.py counts them);
* training examples use training modules only; eval questions are about held-out modules; deterministic per example;
* the scorer: 1.0 on gold answers, citation 0 on a wrong document whatever the signature;
* the files load through longctx.documents.load_docs as chat, the answer (and only it) the target;
* eval.py's citation task: --citation-data parsed, prompts generated and scored (a tiny random model, and a
  stand-in model that answers the gold).
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from helpers_train import TOKENIZER, target_text
from longctx import documents
from longctx.errors import LongctxError
from longctx.evaluation import citation as cit
from longctx.models import long_text_data as ltd

SHARE = 0.3
TRAIN_LEN, EVAL_LENGTHS = 4096, (2048, 4096)
FILES = [  # (path, held out at SHARE): small real modules, so that a 2K context holds several
    "encodings/utf_8.py", "encodings/utf_16_be.py", "encodings/hz.py", "encodings/ascii.py", "encodings/latin_1.py",
    "tty.py", "secrets.py", "asyncio/exceptions.py", "asyncio/base_futures.py", "zoneinfo/__init__.py",
    "concurrent/futures/__init__.py", "tkinter/dialog.py",
    "turtledemo/yinyang.py", "turtledemo/chaos.py", "turtledemo/paint.py", "turtledemo/tree.py",
    "importlib/metadata/_collections.py", "importlib/metadata/_meta.py", "email/encoders.py", "wsgiref/types.py",
    "token.py"]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = tmp_path_factory.mktemp("lib")
    for f in FILES:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(stdlib / f, root / f)
    return root


@pytest.fixture(scope="module")
def docs(lib):
    return cit.stdlib_documents(lib, eval_share=SHARE)


@pytest.fixture(scope="module")
def built(tok, docs):
    return cit.build(tok, docs, context_len=TRAIN_LEN, n_train=6, n_eval=4, eval_lengths=EVAL_LENGTHS, seed=0)


def records(built):
    return built["train"] + [r for rows in built["eval"].values() for r in rows]


def doc_block(user: str, doc_id: int, doc_name: str) -> str:
    head = f"[doc {doc_id}] {doc_name}\n"
    assert user.count(head) == 1
    start = user.index(head)
    ends = [e for e in (user.find(f"\n\n[doc {doc_id + 1}] ", start), user.rfind("\n\nQuestion: ")) if e > start]
    return user[start:min(ends)]


def test_the_split_holds_both_sides():
    held = {ltd.held_out(f"stdlib/{Path(f).parts[0].removesuffix('.py')}", SHARE) for f in FILES}
    assert held == {True, False}  # the tree has training and held-out modules


def test_gold_signature_is_in_the_cited_document_and_contexts_fit(tok, docs, built):
    by_name = {d.name: d for d in docs}
    several = 0
    for r in records(built):
        system, user, answer = (m["content"] for m in r["messages"])
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert answer == f"[doc {r['doc_id']}] {r['doc_name']}\n{r['signature']}"
        assert r["doc_name"] == r["docs"][r["doc_id"] - 1] and r["doc_name"].startswith("Lib/")
        block = doc_block(user, r["doc_id"], r["doc_name"])
        source = by_name[r["doc_name"]].text
        assert block.endswith(source.rstrip())  # the whole module, verbatim
        assert block.count(r["signature"]) == 1 and r["signature"].startswith(("def ", "class ", "async def "))
        assert user.endswith(f"Question: Which document defines `{r['name']}`, and what is its signature?")
        for j, name in enumerate(r["docs"], 1):  # every document is in the context, in order, under its tag
            assert f"[doc {j}] {name}\n" in user
            if name != r["doc_name"]:
                assert r["name"] not in by_name[name].defined
        assert by_name[r["doc_name"]].defined[r["name"]] == 1
        assert r["tokens"] == cit.n_tokens(tok, r["messages"]) <= r["context_len"]
        several += len(r["docs"]) >= 3
    assert several > 0
    assert all(r["context_len"] == L for L, rows in built["eval"].items() for r in rows)
    assert {r["context_len"] for r in built["train"]} == {TRAIN_LEN}


def test_training_examples_use_training_modules_and_eval_asks_held_out_ones(docs, built):
    held = {d.module for d in docs if d.held_out}
    assert held and {d.module for d in docs} - held
    for r in built["train"]:
        assert r["module"] not in held and not set(r["modules"]) & held
    for rows in built["eval"].values():
        for r in rows:
            assert r["module"] in held
    assert built["stats"]["held_out_modules"] == sorted(held)


def test_deterministic_per_example(tok, lib, docs, built):
    again = cit.build(tok, cit.stdlib_documents(lib, eval_share=SHARE), context_len=TRAIN_LEN, n_train=3, n_eval=2,
                      eval_lengths=EVAL_LENGTHS, seed=0)
    assert again["train"] == built["train"][:3]
    assert all(again["eval"][L] == built["eval"][L][:2] for L in EVAL_LENGTHS)
    other = cit.build(tok, docs, context_len=TRAIN_LEN, n_train=3, n_eval=0, eval_lengths=(), seed=1)
    assert other["train"] != again["train"]


# ---- scoring ----------------------------------------------------------------------------------------

GOLD = {"signature": "def f(a, b=')', *,\n      c: dict[str, int] = {'x': 1}) -> int:", "doc_id": 3,
        "doc_name": "Lib/json/decoder.py"}
GOLD_ANSWER = cit.format_answer(3, "Lib/json/decoder.py", GOLD["signature"])


@pytest.mark.parametrize("prediction,expected", [
    (GOLD_ANSWER, (1, 1)),
    (GOLD_ANSWER + "\n    \"\"\"Docstring: with a colon.\"\"\"\n    return 1", (1, 1)),     # text after the header
    ("[doc 3] Lib/json/decoder.py\ndef f(a, b=')', *, c: dict[str, int] = {'x': 1}) -> int:", (1, 1)),  # reflowed
    ("[doc 3]\ndef f( a, b=')', *,\n c: dict[str, int]={'x': 1} ) -> int:", (1, 1)),  # tag alone, spacing
    ("It is in Lib/json/decoder.py:\ndef f(a, b=')', *, c: dict[str, int] = {'x': 1}) -> int:", (1, 1)),  # path
    ("[doc 4] Lib/json/decoder.py\n" + GOLD["signature"], (1, 0)),     # the right signature, the wrong document
    ("[doc 3] Lib/json/scanner.py\n" + GOLD["signature"], (1, 0)),     # right number, wrong path
    ("Lib/json/scanner.py\n" + GOLD["signature"], (1, 0)),
    (GOLD["signature"], (1, 0)),                                       # no citation at all
    ("[doc 3] Lib/json/decoder.py\ndef f(a, b=')', *, c: dict[str, int] = {'x': 1}):", (0, 1)),  # return type lost
    ("[doc 3] Lib/json/decoder.py\ndef f(a, b)", (0, 1)),             # no colon: the header never ends
    ("", (0, 0)),
])
def test_scorer(prediction, expected):
    s = cit.score(prediction, GOLD)
    assert (s["answer"], s["citation"]) == expected and s["both"] == float(all(expected))


def test_scorer_on_every_gold_answer(docs, built):
    recs = records(built)
    golds = [r["messages"][-1]["content"] for r in recs]
    s = cit.score_all(golds, recs)
    assert s["n"] == len(recs) and s["answer"] == s["citation"] == s["both"] == 1.0
    wrong = [a.replace(f"[doc {r['doc_id']}]", f"[doc {r['doc_id'] + 1}]", 1) for a, r in zip(golds, recs)]
    s = cit.score_all(wrong, recs)
    assert s["answer"] == 1.0 and s["citation"] == 0.0 == s["both"]
    for d in docs:  # the scan finds every askable header exactly, so a gold answer always parses back to itself
        for a in d.askable:
            assert cit.parse_answer(cit.format_answer(1, d.name, a.signature)).signature == a.signature


def test_header_scan_skips_strings_brackets_and_comments():
    s = "def g(x=\"a:b\", y=lambda z: z, # c: d\n      w='''q)''') -> A[1:2]:\n    pass\n"
    end, found, comment = cit.header_end(s, 0)
    assert found and comment and s[:end].endswith("-> A[1:2]:")
    end, found, _ = cit.header_end("def h(x)\n    y = {1: 2}\n", 0)
    assert not found and end == len("def h(x)")


# ---- files: train.py's chat format, eval.py ----------------------------------------------------------

@pytest.fixture(scope="module")
def out(lib, tmp_path_factory):
    d = tmp_path_factory.mktemp("citation")
    rc = cit.main(["--tokenizer", str(TOKENIZER), "--stdlib", str(lib), "--out", str(d), "--context-len",
                   str(TRAIN_LEN), "--eval-lengths", ",".join(map(str, EVAL_LENGTHS)), "--n-train", "6",
                   "--n-eval", "4", "--eval-share", str(SHARE)])
    assert rc == 0
    return d


def test_written_files_load_as_chat_with_the_answer_as_target(tok, out, built):
    assert sorted(p.name for p in out.iterdir()) == ["eval_2048.jsonl", "eval_4096.jsonl", "stats.json",
                                                     "train.jsonl"]
    for name, rows in [("train.jsonl", built["train"])] + [(f"eval_{L}.jsonl", built["eval"][L])
                                                          for L in EVAL_LENGTHS]:
        written = [json.loads(x) for x in (out / name).read_text().splitlines()]
        assert written == rows
        ledger = documents.Ledger()
        loaded = documents.load_docs([str(out / name)], tok, TRAIN_LEN, "truncate", ledger)
        assert len(loaded) == len(rows) and ledger.total().get("docs_truncated", 0) == 0
        for doc, r in zip(loaded, rows):
            assert target_text(tok, doc) == r["messages"][-1]["content"] + "<|end|>\n"
            assert len(doc) == r["tokens"]


def test_eval_task_generates_and_scores(tok, out, tmp_path, monkeypatch):
    import torch

    from helpers_train import tiny_model_dir
    from longctx.evaluation import generate, runner

    model_dir = tiny_model_dir(tmp_path / "model", max_position_embeddings=4096)
    cfg = runner.parse(["--model", model_dir, "--tasks", "citation", "--citation-data", str(out),
                        "--citation-samples", "2", "--citation-max-new-tokens", "3"])
    tok2, _, _, lb, cites = runner.check_inputs(cfg)
    assert lb is None and sorted(cites) == list(EVAL_LENGTHS) and all(len(v) == 2 for v in cites.values())
    assert cit.stop_ids(tok) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")}
    # --citation-lengths: a subset of the data's lengths (a native model is asked only within its context); a
    # length the data lacks is refused before the model is loaded
    only = runner.parse(["--model", model_dir, "--tasks", "citation", "--citation-data", str(out),
                         "--citation-lengths", str(EVAL_LENGTHS[0])])
    assert sorted(runner.check_inputs(only)[4]) == [EVAL_LENGTHS[0]]
    wrong = runner.parse(["--model", model_dir, "--tasks", "citation", "--citation-data", str(out),
                          "--citation-lengths", "12345"])
    with pytest.raises(LongctxError, match="--citation-lengths 12345: not in --citation-data"):
        runner.check_inputs(wrong)
    model = generate.load_model(model_dir, precision="fp32", attn_impl="sdpa", device=torch.device("cpu"))
    res = runner.cite(model, tok2, cfg, cites)  # a random model: some output, scored
    assert set(res["by_length"]) == {"2048", "4096"} and len(res["samples"]) == 4
    assert all(0.0 <= res[k] <= 1.0 for k in ("answer", "citation", "both"))
    assert all(0 < v["prompt_tokens_mean"] < int(L) for L, v in res["by_length"].items())

    gold = {tuple(cit.prompt_ids(tok, r)): r["messages"][-1]["content"] for rows in cites.values() for r in rows}

    def answers_gold(model, prompts, max_new_tokens, stop_ids=None, **kw):  # a prompt is its gold conversation's start
        return [tok(gold[tuple(ids)] + "<|end|>", add_special_tokens=False)["input_ids"] for ids in prompts]
    monkeypatch.setattr(generate, "greedy_many", answers_gold)
    res = runner.cite(model, tok2, cfg, cites)
    assert res["answer"] == res["citation"] == res["both"] == 1.0
    assert all(v == {"n": 2, "answer": 1.0, "citation": 1.0, "both": 1.0,
                     "prompt_tokens_mean": v["prompt_tokens_mean"]} for v in res["by_length"].values())


def test_gpu_run_evaluates_the_citation_task_only_when_asked(tmp_path, monkeypatch):
    """recipes/smollm2_32k/gpu_run.py --citation-eval N: one more eval.py run (the citation task at the lengths it
    is given, on the questions its data phase wrote); with 0, none. eval.py's runner is stubbed."""
    from longctx.evaluation import runner
    from recipes.smollm2_32k import gpu_run, recipe_data

    seen = []

    def fake_run(cfg):
        seen.append(cfg)
        return {"device": "cpu", "precision": "fp32", "attention": "sdpa",
                "seconds": {t: 1.0 for t in cfg.tasks}, **{t: {"task": t, "examples": [], "samples": []}
                                                          for t in cfg.tasks}}
    monkeypatch.setattr(runner, "run", fake_run)
    for flags in (["--citation-eval", "0"], ["--citation-eval", "3"]):
        seen.clear()
        args = gpu_run.parse(["--out", str(tmp_path / "out"), "--target-len", "4096", "--heldout-prose", "none"]
                             + flags)
        res = gpu_run.evaluate(tmp_path / "model", tmp_path, "after", args, [512, 1024],
                               recipe_data.citation_lengths(4096))
        assert [c.tasks for c in seen][:2] == [["passkey", "multi_needle", "ppl", "chat"], ["ppl"]]
        if flags[-1] == "0":
            assert len(seen) == 2 and "citation" not in res
            continue
        cfg = seen[2]
        assert cfg.tasks == ["citation"] and cfg.citation_data == str(tmp_path / "data" / "citation")
        assert cfg.lengths == recipe_data.citation_lengths(4096) == [1024, 2048, 4096]
        assert cfg.citation_lengths == cfg.lengths  # only these of the data's lengths (the native model: its own)
        assert res["citation"]["task"] == "citation" and res["seconds"]["citation"] == 1.0
