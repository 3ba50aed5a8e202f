"""bench.report: RESULTS.md regenerates byte-identically from committed JSON; hand-written text survives."""

import json
import shutil
from pathlib import Path

import pytest

from bench import report
from bench.run import collect

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "bench_results"
GOLDEN = FIXTURES / "RESULTS.expected.md"


def generate(results_dir, out, *extra):
    assert report.main(["--results-dir", str(results_dir), "--out", str(out), "--no-plots", *extra]) == 0
    return out.read_bytes()


def test_fixture_regenerates_byte_identically(tmp_path):
    a = generate(FIXTURES, tmp_path / "a.md")
    b = generate(FIXTURES, tmp_path / "b.md")
    assert a == b
    assert a == GOLDEN.read_bytes(), "report format changed: regenerate the golden with " \
        "`python -m bench.report --results-dir tests/fixtures/bench_results --out " \
        "tests/fixtures/bench_results/RESULTS.expected.md --no-plots`"


def test_check_mode(tmp_path):
    out = tmp_path / "RESULTS.md"
    generate(FIXTURES, out)
    assert report.main(["--results-dir", str(FIXTURES), "--out", str(out), "--check"]) == 0
    out.write_text(out.read_text().replace("OOM", "oom", 1))
    assert report.main(["--results-dir", str(FIXTURES), "--out", str(out), "--check"]) == 1


def test_hand_written_sections_survive(tmp_path):
    out = tmp_path / "RESULTS.md"
    generate(FIXTURES, out)
    text = out.read_text()
    edited = "# Results\n\nHand-written intro.\n\n" + text[text.index(report.BEGIN):] + "\n## Discussion\n\nBy hand.\n"
    out.write_text(edited)
    generate(FIXTURES, out)
    assert out.read_text() == edited
    # new results change only the generated region
    res = tmp_path / "results"
    shutil.copytree(FIXTURES, res)
    for p in res.glob("*cpu*.json"):
        p.unlink()
    generate(res, out)
    new = out.read_text()
    assert new.startswith("# Results\n\nHand-written intro.\n\n") and new.endswith("\n## Discussion\n\nBy hand.\n")
    assert new != edited


def test_report_content():
    text = GOLDEN.read_text()
    assert "| baseline | 32K | OOM |" in text
    assert "| fork_offload | 256K |" in text
    assert "≥ 1M | 256K (not met)" in text
    assert "+2.5% (met)" in text   # fork_offload 12.30 s vs liger_gc 12.00 s at 64K
    assert "Arctic Long Sequence Training" in text


def test_repo_results_md_is_current():
    """docs/RESULTS.md matches what bench/results/*.json generate (the committed state)."""
    doc = ROOT / "docs" / "RESULTS.md"
    if not doc.exists():
        pytest.skip("docs/RESULTS.md not generated yet")
    assert report.main(["--results-dir", str(ROOT / "bench" / "results"), "--out", str(doc), "--check"]) == 0


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results-dir", str(FIXTURES), "--out", str(out)]) == 0
    for name in ("memory_vs_seqlen.png", "tokens_per_s_vs_seqlen.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collect_keeps_rows_of_a_killed_run(tmp_path):
    raw = tmp_path / "run.jsonl"
    lines = [{"kind": "meta", "device": "X", "n_gpus": 1, "date": "2026-11-22", "shape": "tiny-llama"},
             {"kind": "attempt", "technique": "baseline", "seq_len": 256},
             {"kind": "row", "technique": "baseline", "seq_len": 256, "status": "ok", "step_time_s": 1.0},
             {"kind": "attempt", "technique": "baseline", "seq_len": 512}]
    raw.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "row", "techn')  # cut mid-line
    res = collect(raw, tmp_path / "run.json")
    assert [(r["seq_len"], r["status"]) for r in res["rows"]] == [(256, "ok"), (512, "crashed")]
    assert json.loads((tmp_path / "run.json").read_text())["device"] == "X"


def test_overhead_target_from_the_offload_benchmark():
    """Without a liger_gc row beside fork_offload, the target reads the side-by-side offload benchmark."""
    res = {"device": "GPU X", "config": {"layers": 8}, "rows": [
        {"mode": "plain", "seq_len": 1024, "status": "ok", "step_s": 2.0},
        {"mode": "fork", "seq_len": 1024, "status": "ok", "step_s": 2.3},
        {"mode": "plain", "seq_len": 4096, "status": "ok", "step_s": 10.0},
        {"mode": "fork", "seq_len": 4096, "status": "ok", "step_s": 10.2},
        {"mode": "upstream", "seq_len": 4096, "status": "ok", "step_s": 99.0}]}
    line = next(x for x in report.render_targets([], [res]) if "step-time overhead" in x)
    assert "+2.0% (met)" in line and "at 4K" in line   # the longest common length, fork vs plain
    res["rows"][3]["step_s"] = 11.0
    line = next(x for x in report.render_targets([], [res]) if "step-time overhead" in x)
    assert "+10.0% (not met)" in line


def test_resume_keeps_the_first_config_and_lists_later_ones(tmp_path):
    raw, out = tmp_path / "r.jsonl", tmp_path / "r.json"
    rows = [{"kind": "meta", "date": "2026-11-22", "device": "X"},
            {"kind": "row", "technique": "baseline", "seq_len": 16, "status": "ok"}]
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = {"run_id": "r", "git": {"commit": "a"}, "config": {"techniques": "baseline,liger"}, "resumed": False}
    collect(raw, out, first)
    with raw.open("a") as f:
        f.write(json.dumps({"kind": "row", "technique": "liger", "seq_len": 16, "status": "ok"}) + "\n")
    later = {"run_id": "r", "git": {"commit": "b"}, "config": {"techniques": "liger"}, "resumed": True}
    collect(raw, out, later)
    res = collect(raw, out, later)  # collected again after every worker: listed once
    assert res["config"] == first["config"] and res["git"] == first["git"]
    assert res["resumes"] == [{"config": later["config"], "git": later["git"]}]
    assert [r["technique"] for r in res["rows"]] == ["baseline", "liger"]
