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


def _side(acc, long_nll, short_nll, cite=None, chat="Paris."):
    out = {"passkey": _grid(acc), "multi_needle": _grid(acc), "ppl_long": _ppl(long_nll, 32768),
           "ppl_short": _ppl([short_nll, short_nll], 2048), "ppl_prose": _ppl([short_nll + 1, short_nll + 1], 2048),
           "chat": {"answers": [{"prompt": "What is the capital of France?", "answer": chat}]}}
    if cite is not None:
        out["citation"] = {"by_length": {str(L): {"n": 20, "answer": a, "citation": c, "both": b}
                                         for L, (a, c, b) in cite.items()}}
    return out


@pytest.fixture
def results():
    return {"args": {"target_len": 32768}, "environment": {"gpus": ["NVIDIA H200"], "torch": "2.11"},
            "phases": {"convert": {"ok": True, "seconds": 20.0}, "train": {"ok": True, "seconds": 250.0}},
            "total_seconds": 270.0,
            "eval": {"native_before": _side([[1, 0], [1, 0.5]], [3.0, 2.5], 2.0, {8192: (0.1, 0.2, 0.05)}),
                     "extended_before": _side([[1, 0.5], [1, 0.5]], [3.1, 2.4], 2.1,
                                              {8192: (0.1, 0.2, 0.05), 32768: (0.0, 0.05, 0.0)}, "Paris | France"),
                     "after": _side([[1, 1], [1, 0.75]], [3.0, 2.2], 2.05,
                                    {8192: (0.6, 0.7, 0.55), 32768: (0.45, 0.5, 0.4)}, "Paris.\nIt is.")},
            "train": {"metrics": [{"step": 1, "loss": 2.5, "tokens": 131072, "tokens_per_s": 20000.0, "tflops": 90.0},
                                  {"step": 2, "loss": 2.25, "tokens": 131072, "tokens_per_s": 25000.0,
                                   "tflops": 110.0, "eval_loss": 2.3}]}}


def test_section_holds_the_numbers(results):
    text = report.section(results)
    assert "| 32K | 25% | 50% | 88% |" in text  # mean over depths per length, per side
    assert "| 64–32,768 | 2.500 | 2.400 | 2.200 |" in text
    assert "2.1000 (+5.0%)" in text and "2.0500 (+2.5%)" in text  # short text against the native model
    assert "train loss 2.500 → 2.250" in text and "passkey-probe answer NLL 2.300" in text


def test_section_names_the_rope(results):
    """The 32K config's RoPE from the converter's facts; a factor beyond the extension is called headroom; a
    results.json from before --rope-factor (no factor recorded) was scaled by the extension."""
    results["convert"] = {"changed": {"max_position_embeddings": [8192, 32768], "rope_theta": [100000.0, 856000.0]},
                          "rope_factor": 8.0}
    assert ("RoPE of the 32K config: NTK-aware base: rope_theta 100,000 → 856,000, made for 8x the native context "
            "(2x the 4x extension: headroom).") in report.section(results)
    del results["convert"]["rope_factor"]
    results["convert"]["changed"]["rope_theta"] = [100000.0, 418000.0]
    assert "rope_theta 100,000 → 418,000, made for 4x the native context." in report.section(results)


def test_section_shows_the_rope_probe(results):
    """The probe's table (accuracy by depth and mean per candidate) and the chosen RoPE named above the tables; when
    nothing was chosen, the converted config's RoPE with a word that the probe found nothing."""
    results["convert"] = {"changed": {"max_position_embeddings": [8192, 32768], "rope_theta": [100000.0, 856000.0]},
                          "rope_factor": 8.0}
    results["rope_probe"] = {"length": 32768, "depths": [0.0, 0.25, 0.5, 0.75], "samples": 10, "rule": "highest",
                             "chosen": "yarn8", "variants": {
                                 "ntk8": {"rope": "ntk", "factor": 8.0, "rope_parameters": {"rope_theta": 856000.0},
                                          "accuracy_by_depth": [0.1, 0.2, 0.3, 0.4], "mean": 0.25},
                                 "yarn8": {"rope": "yarn", "factor": 8.0,
                                           "rope_parameters": {"rope_type": "yarn", "factor": 8.0},
                                           "accuracy_by_depth": [0.5, 0.5, 0.6, 0.6], "mean": 0.55}}}
    text = report.section(results)
    assert "RoPE of the 32K config: yarn made for 8x the native context (rope_type yarn, factor 8), chosen by " \
           "the probe below." in text
    assert "| ntk8 | rope_theta 856000 | 10% / 20% / 30% / 40% | 25% |" in text
    assert "| yarn8 | rope_type yarn, factor 8 | 50% / 50% / 60% / 60% | 55% |" in text and "chosen: **yarn8**" in text
    results["rope_probe"]["chosen"] = None
    assert "made for 8x the native context (2x the 4x extension: headroom) (the probe below found no candidate " \
           "above 0%)." in report.section(results)


def test_section_holds_the_new_evaluations(results):
    """The held-out prose line, the citation table per length (native: only where it was asked), the chat answers
    side by side (one line each, pipes escaped), the rope comparison when there is one."""
    results["rope_compare"] = {"steps": 12, "tokens_per_step": 131072, "rule": "lowest", "chosen": "yarn",
                               "variants": {"ntk": {"rope_parameters": {"rope_type": "default", "rope_theta": 418000.0},
                                                    "late_nll_untrained": 2.5, "late_nll_trained": 2.2},
                                            "yarn": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0},
                                                     "late_nll_untrained": 2.4, "late_nll_trained": 2.1}}}
    text = report.section(results)
    assert "3.0500 (+1.7%)" in text and "prose" in text  # 3.05 against the native model's 3.0
    assert "| 8K | 10% / 20% / 5% | 10% / 20% / 5% | 60% / 70% / 55% |" in text
    assert "| 32K | — | 0% / 5% / 0% | 45% / 50% / 40% |" in text
    assert "| What is the capital of France? | Paris. | Paris \\| France | Paris. It is. |" in text
    assert "chosen: **yarn**" in text and "| yarn | rope_type yarn, factor 4 | 2.400 | 2.100 |" in text
    assert "citation task at 32K (answer and citation) 0% → 40%" in report.readme_paragraph(results)


def test_figures_are_written(results, tmp_path):
    pytest.importorskip("matplotlib")
    paths = report.figures(results, tmp_path)
    assert sorted(p.name for p in paths) == ["multi_needle_before_after.png", "passkey_before_after.png",
                                             "ppl_before_after.png", "train_loss.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_publish_keeps_the_results_behind_the_section(results, tmp_path, monkeypatch):
    """publish writes the section into RESULTS.md and the run's results.json, byte for byte, beside the figures (the
    committed JSON is what the published numbers came from); a second publish of the kept file leaves it as is."""
    pytest.importorskip("matplotlib")
    import json

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "RESULTS.md").write_text("# Results\n\n## Learning proof\n")
    (docs / "smollm2_32k").mkdir()
    (docs / "smollm2_32k" / "results.json").write_text('{"an": "older run"}')
    (tmp_path / "README.md").write_text(f"# x\n{report.README_AFTER}\nrest\n")
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(report, "DOCS", docs)
    monkeypatch.setattr(report, "FIG_DIR", docs / "smollm2_32k")
    run = tmp_path / "out" / "results.json"
    run.parent.mkdir()
    run.write_text(json.dumps(results, indent=1))
    report.publish(run)
    kept = docs / "smollm2_32k" / "results.json"
    assert kept.read_bytes() == run.read_bytes()
    text = (docs / "RESULTS.md").read_text()
    assert report.BEGIN in text and "[smollm2_32k/results.json](smollm2_32k/results.json)" in text
    assert text.index(report.END) < text.index("## Learning proof")
    report.publish(kept)
    assert kept.read_bytes() == run.read_bytes() and not list(kept.parent.glob("*.tmp"))
