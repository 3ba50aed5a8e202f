"""eval.py end to end on a tiny model saved with the shipped tokenizer: eval.json + PNGs; bad input fails early."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers_train import REPO, tiny_model_dir

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def qa_file(tmp_path):
    p = tmp_path / "qa.jsonl"
    rows = [{"context": "The harbor is north of the mill. " * 40, "question": "Where is the harbor?",
             "answers": ["north of the mill"]},
            {"context": "A short one.", "input": "What is it?", "answers": "short"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_eval_end_to_end(model_dir, qa_file, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, str(REPO / "eval.py"), "--model", str(model_dir), "--output-dir", str(out),
           "--lengths", "128,256", "--depths", "0,0.5,1", "--samples", "2", "--needles", "3", "--max-new-tokens", "4",
           "--ppl-seq-len", "200", "--ppl-docs", "2", "--ppl-buckets", "linear:4", "--logits-chunk", "33",
           "--longbench-data", str(qa_file), "--longbench-max-len", "96", "--longbench-max-new-tokens", "4"]
    r = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "eval.json").read_text())
    for task in ("passkey", "multi_needle"):
        t = res[task]
        assert t["lengths"] == [128, 256] and t["depths"] == [0.0, 0.5, 1.0]
        assert len(t["accuracy"]) == 3 and all(len(row) == 2 for row in t["accuracy"])
        assert all(0.0 <= a <= 1.0 for row in t["accuracy"] for a in row)
        assert len(t["cells"]) == 6 and all(c["n"] == 2 for c in t["cells"])
        assert (out / f"{task}_heatmap.png").read_bytes()[:8] == PNG
    assert res["multi_needle"]["needles"] == 3
    ppl = res["ppl"]
    assert ppl["corpus"] == "python-stdlib" and ppl["documents"] == 2 and ppl["seq_len"] == 200
    assert sum(b["tokens"] for b in ppl["buckets"]) == ppl["overall"]["tokens"] == 2 * 199
    assert 0 < ppl["overall"]["nll"] < 20
    assert (out / "ppl_by_position.png").read_bytes()[:8] == PNG
    lb = res["longbench"]
    assert lb["n"] == 2 and 0.0 <= lb["f1"] <= 1.0
    assert lb["samples"][0]["context_cut"] and lb["samples"][0]["prompt_tokens"] == 96
    assert set(res["seconds"]) == {"passkey", "multi_needle", "ppl", "longbench"}


def _eval(argv, capsys):
    sys.path.insert(0, str(REPO))
    import eval as eval_py

    code = eval_py.main(argv)
    return code, capsys.readouterr().err


def test_bad_inputs_fail_before_any_model_is_loaded(model_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    code, err = _eval(["--model", str(tmp_path / "nope"), "--output-dir", out], capsys)
    assert code == 2 and "not a directory" in err
    code, err = _eval(["--model", str(model_dir), "--depths", "0,1.5", "--output-dir", out], capsys)
    assert code == 2 and "--depths must be in [0, 1]" in err
    code, err = _eval(["--model", str(model_dir), "--tasks", "passkey,needles", "--output-dir", out], capsys)
    assert code == 2 and "unknown ['needles']" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "question": "q"}\n')
    code, err = _eval(["--model", str(model_dir), "--longbench-data", str(bad), "--output-dir", out], capsys)
    assert code == 2 and "bad.jsonl:1" in err and "answers" in err
    code, err = _eval(["--model", str(model_dir), "--ppl-data", str(tmp_path / "none.txt"), "--output-dir", out],
                      capsys)
    assert code == 2 and "--ppl-data" in err
    assert not (tmp_path / "o").exists(), "nothing is written before the inputs are checked"
