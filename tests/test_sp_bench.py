"""The benchmark's `sp` technique end to end on 2 CPU ranks through train.py's Trainer: Ulysses over the default
attention (SDPA per document) under ZeRO-3, the fork's offloaded checkpointing, packed rows."""

from __future__ import annotations

import json

import pytest

from helpers_train import deepspeed_cmd, run_launcher

pytestmark = pytest.mark.slow


def test_bench_sp_technique(tmp_path):
    out = tmp_path / "rows.jsonl"
    p = run_launcher(deepspeed_cmd("bench/train_bench.py", ["--technique", "sp", "--shape", "tiny-llama", "--lengths",
                                                            "256,512", "--docs", "3", "--out", str(out)]), timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    got = {r["seq_len"]: r for r in rows if r["kind"] == "row"}
    assert set(got) == {256, 512}
    for r in got.values():
        assert r["status"] == "ok", r
        s = r["settings"]
        assert s["sequence_parallel"] == 2 and s["attention"] == "sdpa_per_doc" and s["checkpointing"] == "offload"
        assert r["n_docs"] == 3 and r["tokens"] == r["seq_len"]
        assert all(6 < x < 9 for x in r["losses"])  # ln(2048) = 7.6 at random init: a sane CE over the whole row
