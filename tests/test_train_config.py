"""longctx.config (YAML/JSON + CLI) and longctx.dsconfig ("auto" filling and validation)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers_train import REPO
from longctx import config, dsconfig
from longctx.errors import LongctxError


def test_file_then_cli_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max-seq-len: 4096\nlr: 2.0e-5\npacking: false\ndata: [a.jsonl, b.jsonl]\n")
    cfg = config.parse(["--config", str(f), "--lr", "1e-4", "--local_rank=1"])
    assert cfg.max_seq_len == 4096 and cfg.lr == 1e-4 and cfg.packing is False
    assert cfg.data == ["a.jsonl", "b.jsonl"]
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"max_seq_len": 8192}))
    assert config.parse(["--config", str(j)]).max_seq_len == 8192


def test_config_file_type_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max_seq_len: lots\n")
    with pytest.raises(LongctxError, match="'max_seq_len' has value 'lots'"):
        config.parse(["--config", str(f)])


def test_help_lists_every_group():
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    for s in ("Model, precision and techniques", "--offload-gradient-checkpointing", "--truncation",
              "--resume", "--deepspeed", "{truncate,drop,error}"):
        assert s in p.stdout


def ds(path, cfg, world=2, precision="bf16", on_cuda=True, offload_params=True, optimizer_ratio=1.0):
    return dsconfig.build(path, cfg, world_size=world, precision=precision, lr=2e-5, hidden_size=4096,
                          on_cuda=on_cuda, offload_params=offload_params, optimizer_ratio=optimizer_ratio,
                          layer_sub_group_size=12345)


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_shipped_configs_resolve(name):
    cfg = config.parse(["--micro-batch-size", "1", "--grad-accum", "4"])
    d = ds(str(REPO / "ds_configs" / f"{name}.json"), cfg, world=8, precision="fp16")
    assert d["train_batch_size"] == 32 and d["gradient_accumulation_steps"] == 4
    assert d["fp16"]["enabled"] is True and d["bf16"]["enabled"] is False
    assert d["optimizer"]["params"]["lr"] == 2e-5
    assert not [k for k, v in dsconfig._walk(d) if v == "auto"]
    if name == "zero3_offload":
        assert d["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
        assert d["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
        on_gpu = ds(str(REPO / "ds_configs" / f"{name}.json"), cfg, world=8, precision="fp16", offload_params=False)
        assert "offload_param" not in on_gpu["zero_optimization"]  # resolve kept the parameters on the GPU
        assert on_gpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        with pytest.raises(LongctxError, match="offload_param.device is \"auto\""):
            ds(str(REPO / "ds_configs" / f"{name}.json"), cfg, offload_params=None)
        # offload_optimizer.ratio "auto", as longctx.resolve decides: all on the CPU, split, all on the GPU
        opt = d["zero_optimization"]
        assert opt["offload_optimizer"]["ratio"] == 1.0 and opt["sub_group_size"] == dsconfig.UNSPLIT_SUB_GROUP_SIZE
        split = ds(str(REPO / "ds_configs" / f"{name}.json"), cfg, optimizer_ratio=0.25)["zero_optimization"]
        assert split["offload_optimizer"]["ratio"] == 0.25 and split["sub_group_size"] == 12345
        gpu = ds(str(REPO / "ds_configs" / f"{name}.json"), cfg, optimizer_ratio=0.0)
        assert "offload_optimizer" not in gpu["zero_optimization"] and gpu["optimizer"]["params"]["torch_adam"]
        with pytest.raises(LongctxError, match="offload_optimizer.ratio is \"auto\""):
            ds(str(REPO / "ds_configs" / f"{name}.json"), cfg, optimizer_ratio=None)


def test_explicit_values_must_agree(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "bf16": {"enabled": True},
                             "zero_optimization": {"stage": 2}}))
    with pytest.raises(LongctxError) as e:
        ds(str(f), config.parse([]), precision="fp16")
    assert "optimizer.params.lr is 0.001 but --lr gives 2e-05" in str(e.value)
    assert "bf16.enabled is True but the precision is fp16" in str(e.value)
