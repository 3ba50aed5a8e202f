"""The benchmark's SP rungs run end to end on 2 CPU ranks: Ulysses over varlen attention under ZeRO-3 + CPU
offload, the fork's offloaded checkpointing, then tiled MLP on top (bench profile cpu-smoke-sp's worker)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_train import REPO, _env, free_port

pytestmark = pytest.mark.slow


def test_bench_sp_rungs(tmp_path):
    out = tmp_path / "rows.jsonl"
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    p = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "bench/train_bench.py",
                        "--shape", "tiny-llama", "--techniques", "sp,sp_tiled", "--lengths", "256,512", "--docs", "3",
                        "--init-warmup-len", "128", "--out", str(out)], cwd=REPO,
                       env=_env({"BENCH_LIGER_FALLBACK": "torch"}), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    meta = next(r for r in rows if r["kind"] == "meta")
    assert meta["sequence_parallel"] == 2
    got = {(r["technique"], r["seq_len"]): r for r in rows if r["kind"] == "row"}
    assert set(got) == {(t, n) for t in ("sp", "sp_tiled") for n in (256, 512)}
    for r in got.values():
        assert r["status"] == "ok", r
        assert r["sp"] == 2 and r["attn_impl"].startswith("ulysses sp=2")
        assert 4 < r["loss"] < 9  # ln(2048) = 7.6 at random init: a sane CE over the whole sample
    assert got[("sp_tiled", 512)]["tiled_mlp"] and not got[("sp", 512)]["tiled_mlp"]
