"""bench/trl_offload.py's own plumbing, on CPU (tests/test_fork_tools.py checks that TRL's SFTTrainer with the fork's
offload trains exactly as without it; this checks what the benchmark records and renders).

One `--tiny` run of the `fork` variant through the driver (one worker process): every length ran, in order, and the
model saw rows of exactly that length (TRL added no EOS and cut nothing), the fork's offloader held every layer's
input at every step of each length, and the report renders the row with the variants that did not run as dashes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from helpers_train import REPO


@pytest.mark.slow  # one worker process (~20 s of imports on 2 cores)
def test_tiny_fork_run_is_recorded_and_rendered(tmp_path):
    out = tmp_path / "trl.json"
    p = subprocess.run([sys.executable, "-m", "bench.trl_offload", "--tiny", "--variants", "fork", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["schema"] == "trl_offload" and res["lengths"] == [256, 512] and res["steps"] == 2
    worker = res["workers"]["fork"]
    assert worker["offloader"] == "CheckpointOffloader"
    rows = {r["seq_len"]: r for r in res["rows"]}
    assert sorted(rows) == [256, 512]
    for n, r in rows.items():
        assert r["status"] == "ok" and r["variant"] == "fork"
        assert r["seen_lengths"] == [n]
        assert len(r["step_times_s"]) == 2 and r["step_time_s"] == r["step_times_s"][1]
        assert r["offload_stored"] == res["layers"] * res["steps"]
        assert len(r["losses"]) == 2 and all(abs(x - math.log(512)) < 0.5 for x in r["losses"])  # random init
    assert worker["offload_stored"] == res["layers"] * res["steps"] * 2

    from bench import report

    text = report.render_trl(report.load_trl_results(tmp_path))
    assert "## TRL SFTTrainer: upstream save_on_cpu vs fork offloader" in text
    assert f"| 512 | {report.DASH} | {report.DASH} | {rows[512]['step_time_s']:.2f} | {report.DASH} |" in text
    doc = report.update_region("# R\n\n" + report.BEGIN + "\nx\n" + report.END + "\n\ntail\n", text)
    assert doc.index(report.END) < doc.index(report.TRL_BEGIN) < doc.index("tail")
    assert report.update_region(doc, text) == doc
    assert report.update_region(doc, "") == "# R\n\n" + report.BEGIN + "\nx\n" + report.END + "\n\ntail\n"


def test_results_md_trl_region_is_generated_from_the_committed_json():
    from bench import report

    existing = (REPO / "docs" / "RESULTS.md").read_text()
    assert report.generate_document(existing, REPO / "bench" / "results") == existing
