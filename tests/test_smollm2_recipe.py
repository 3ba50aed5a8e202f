"""The SmolLM2 8K -> 32K recipe (recipes/smollm2_32k/) is a valid train.py config: it parses, and its memory plan
for the extended model (the converter's 32K config) resolves and fits a 24 GiB GPU."""

from __future__ import annotations

import json
from pathlib import Path

from helpers_train import REPO
from longctx import config as config_mod
from longctx.models import from_gguf

RECIPE = REPO / "recipes" / "smollm2_32k" / "train.yaml"
H200 = REPO / "recipes" / "smollm2_32k" / "train_h200.yaml"


def test_recipe_config_parses():
    cfg = config_mod.parse(["--config", str(RECIPE)])
    assert cfg.max_seq_len == 32768 and cfg.eval_data and Path(cfg.deepspeed).name == "zero2.json"


def test_h200_config_is_a_fixed_budget_without_cpu_adam():
    cfg = config_mod.parse(["--config", str(H200)])
    assert cfg.max_seq_len == 32768 and cfg.max_steps > 0 and cfg.max_train_minutes > 0
    ds = json.loads((REPO / cfg.deepspeed).read_text())
    assert "offload_optimizer" not in ds["zero_optimization"]  # torch AdamW on the GPU: no CPU Adam build


def test_recipe_plans_for_the_extended_model(smollm2_dir, tmp_path, capsys):
    from transformers import AutoConfig

    from longctx.plan_report import cli_plan

    model_dir, _ = smollm2_dir
    mc = AutoConfig.from_pretrained(model_dir)
    from_gguf.extend_context(mc, 32768, None)
    d = mc.to_dict()
    path = tmp_path / "smollm2-32k.json"
    path.write_text(json.dumps(d))
    cfg = config_mod.parse(["--config", str(RECIPE), "--plan", "--model", str(path), "--tokenizer", str(model_dir),
                            "--gpus", "1", "--gpu-mem", "24GiB", "--host-mem", "64GiB", "--precision", "bf16"])
    text = cli_plan(cfg)
    assert "of 24: fits" in text and "32,768 tokens" in text, text
    cfg = config_mod.parse(["--config", str(H200), "--plan", "--model", str(path), "--tokenizer", str(model_dir),
                            "--gpus", "1", "--gpu-mem", "141GiB", "--host-mem", "125GiB", "--precision", "bf16"])
    text = cli_plan(cfg)  # no checkpointing: the activations of a 32K row on the H200
    assert "of 141: fits" in text and "checkpointing off" in text, text
    cfg = config_mod.parse(["--config", str(H200), "--plan", "--model", str(path), "--tokenizer", str(model_dir),
                            "--gpus", "1", "--gpu-mem", "80GiB", "--host-mem", "125GiB", "--precision", "bf16"])
    text = cli_plan(cfg)  # and on an H100: nothing recomputed, nothing offloaded
    assert "of 80: fits" in text and "checkpointing off" in text and "on CPU: nothing" in text, text
