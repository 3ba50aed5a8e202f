"""recipes/smollm2_32k/report.py renders the RESULTS.md section and the figures from gpu_run.py's results.json alone
(here a synthetic one with the shapes eval.py's runner and train.py write): every number in the tables is one of
results.json's, the short-text change is computed against the native model, nothing else is needed."""

from __future__ import annotations

import pytest

from recipes.smollm2_32k import report


def _grid(acc):
    return {"lengths": [4096, 32768], "depths": [0.0, 1.0], "accuracy": acc, "samples_per_cell": 2, "needles": 4,
            "mean_accuracy": sum(map(sum, acc)) / 4}


def _ppl(nlls, seq_len):
    edges = [1, 64, seq_len]
    return {"buckets": [{"start": a, "end": b, "tokens": b - a, "nll": n, "ppl": 2.0} for a, b, n in
                        zip(edges, edges[1:], nlls)], "overall": {"nll": sum(nlls) / 2, "ppl": 2.0, "tokens": seq_len},
            "documents": 3, "seq_len": seq_len, "bucket_spec": "log"}


def _side(acc, long_nll, short_nll):
    return {"passkey": _grid(acc), "multi_needle": _grid(acc), "ppl_long": _ppl(long_nll, 32768),
            "ppl_short": _ppl([short_nll, short_nll], 2048)}


@pytest.fixture
def results():
    return {"args": {"target_len": 32768}, "environment": {"gpus": ["NVIDIA H200"], "torch": "2.11"},
            "phases": {"convert": {"ok": True, "seconds": 20.0}, "train": {"ok": True, "seconds": 250.0}},
            "total_seconds": 270.0,
            "eval": {"native_before": _side([[1, 0], [1, 0.5]], [3.0, 2.5], 2.0),
                     "extended_before": _side([[1, 0.5], [1, 0.5]], [3.1, 2.4], 2.1),
                     "after": _side([[1, 1], [1, 0.75]], [3.0, 2.2], 2.05)},
            "train": {"metrics": [{"step": 1, "loss": 2.5, "tokens": 131072, "tokens_per_s": 20000.0, "tflops": 90.0},
                                  {"step": 2, "loss": 2.25, "tokens": 131072, "tokens_per_s": 25000.0,
                                   "tflops": 110.0, "eval_loss": 2.3}]}}


def test_section_holds_the_numbers(results):
    text = report.section(results)
    assert "| 32K | 25% | 50% | 88% |" in text  # mean over depths per length, per side
    assert "| 64–32,768 | 2.500 | 2.400 | 2.200 |" in text
    assert "2.1000 (+5.0%)" in text and "2.0500 (+2.5%)" in text  # short text against the native model
    assert "train loss 2.500 → 2.250" in text and "held-out loss 2.300" in text


def test_figures_are_written(results, tmp_path):
    pytest.importorskip("matplotlib")
    paths = report.figures(results, tmp_path)
    assert sorted(p.name for p in paths) == ["multi_needle_before_after.png", "passkey_before_after.png",
                                             "ppl_before_after.png", "train_loss.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
