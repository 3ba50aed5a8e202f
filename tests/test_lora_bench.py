"""The benchmark's LongLoRA sets (bench/techniques.py: lora, longlora): resolution, switching on a live model,
and the GPU worker on CPU (ZeRO-3 on gloo, tiny Llama)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_sets_and_worker_rules():
    from bench import techniques as T

    assert T.NAMED["longlora"].features_dict() == dict(T.NAMED["fork_offload"].features_dict(), lora=True, s2attn=True)
    assert T.parse_custom("lora+s2attn").features_dict() == T.NAMED["longlora"].features_dict()
    assert [t.name for t in T.resolve("lora,longlora")] == ["lora", "longlora"]
    with pytest.raises(ValueError, match="cannot share a worker"):
        T.resolve("fork_offload,longlora")


def test_longlora_on_a_live_model(monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AttentionInterface

    from bench import techniques as T
    from helpers_train import tiny_config

    monkeypatch.setenv("BENCH_LIGER_FALLBACK", "torch")
    cfg = tiny_config()
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg),
                                          attn_implementation="sdpa")
    model, state = T.BenchLM(lm), T.State()
    with pytest.raises(T.Unavailable, match="LoRA sets only"):
        T.apply(lm, model, T.NAMED["lora"], state, torch.device("cpu"))
    T.apply_lora(model, log=lambda *a: None)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "embed" in n or "norm" in n for n in trainable)
    T.apply(lm, model, T.NAMED["longlora"], state, torch.device("cpu"))
    assert T.set_s2_group(lm, state, 256) == 64
    fn = AttentionInterface._global_mapping[lm.config._attn_implementation]
    assert (lm.config._attn_implementation, fn.group_size, fn.base_impl) == ("longctx_s2attn", 64, "bench_varlen")
    assert state.attn_desc.endswith("| S²-Attn, group seq_len/4 (training)")
    T.apply(lm, model, T.NAMED["lora"], state, torch.device("cpu"))  # S²-Attn off again: the varlen base
    assert lm.config._attn_implementation == "bench_varlen" and state.s2_base is None


@pytest.mark.slow
def test_worker_runs_the_longlora_sets_on_cpu(tmp_path):
    raw = tmp_path / "raw.jsonl"
    env = dict(os.environ, BENCH_LIGER_FALLBACK="torch", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, str(ROOT / "bench" / "train_bench.py"), "--shape", "tiny-llama", "--techniques",
           "lora,longlora", "--lengths", "128,256", "--init-warmup-len", "64", "--out", str(raw)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "LongLoRA: LoRA r=8 alpha=16 on q_proj,k_proj,v_proj,o_proj" in p.stderr
    rows = {(r["technique"], r["seq_len"]): r for r in map(json.loads, raw.read_text().splitlines())
            if r["kind"] == "row"}
    for t in ("lora", "longlora"):
        for n in (128, 256):
            r = rows[(t, n)]
            assert r["status"] == "ok" and r["tokens_per_s_per_gpu"] > 0 and 4.0 < r["loss"] < 8.0
            assert r["mfu"] is None and r["features"]["lora"]
    assert [rows[("longlora", n)]["s2attn_group"] for n in (128, 256)] == [32, 64]
    assert "S²-Attn" in rows[("longlora", 128)]["attn_impl"] and "S²-Attn" not in rows[("lora", 256)]["attn_impl"]
