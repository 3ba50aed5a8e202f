"""train.py --lora / --s2-attn / --merge: flags, refusals, and LongLoRA training under ZeRO-3 through the real
launcher (2 CPU ranks, CPU-offloaded parameters and optimizer, activation checkpointing, frozen parameters,
a resume from a DeepSpeed checkpoint), checked against a single-process ZeRO-2 run without checkpointing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers_train import REPO, fast_args, read_jsonl, run_train, small_dataset, tiny_model_dir
from longctx import config
from longctx.errors import LongctxError

LONGLORA = ["--lora", "--lora-rank", "4", "--lora-alpha", "8", "--s2-attn", "32", "--no-packing", "--merge"]


def test_flags_parse_and_resolve():
    cfg = config.parse(["--lora", "--s2-attn", "--no-packing", "--max-seq-len", "4096"])
    assert cfg.lora and cfg.s2_attn == 0 and cfg.trainable_modules == "embed,norm"
    assert cfg.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    from longctx.resolve import resolve_s2_group

    assert resolve_s2_group(cfg.s2_attn, cfg.max_seq_len)[0] == 1024
    cfg = config.parse(["--lora", "--s2-attn", "512", "--no-packing", "--lora-target-modules", "q_proj,v_proj",
                        "--trainable-modules", "none", "--merge"])
    assert cfg.s2_attn == 512 and cfg.merge and cfg.trainable_modules == "none"
    assert config.parse([]).s2_attn is None and not config.parse([]).lora


@pytest.mark.parametrize("argv,message", [
    (["--s2-attn"], "--s2-attn cannot be used with packing"),
    (["--s2-attn", "31", "--no-packing"], "even number"),
    (["--merge"], "--merge needs --lora"),
    (["--lora", "--lora-rank", "0"], "--lora-rank must be >= 1"),
    (["--lora", "--s2-attn", "--no-packing", "--attn-implementation", "eager"], "not eager"),
])
def test_bad_flags_are_refused(argv, message):
    with pytest.raises(LongctxError, match=message):
        config.parse(argv)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-rank ZeRO-3 LongLoRA run (resumed halfway) and its single-process reference (one go)."""
    tmp = tmp_path_factory.mktemp("longlora")
    data = small_dataset(tmp / "data", n_text=40, n_chat=10, n_pr=10)
    base = tiny_model_dir(tmp / "base", seed=1)
    common = ["--micro-batch-size", "1", "--eval-fraction", "0.1", "--eval-interval", "2", *LONGLORA]
    zero3 = tmp / "zero3"
    for steps, resume in ((2, []), (4, ["--resume", "auto"])):  # stopped after step 2 and resumed
        args = fast_args(zero3, data, base, steps=steps, extra=[*common, "--grad-accum", "2", "--save-interval", "2",
                                                               *resume])
        args[1] = "ds_configs/zero3_offload.json"
        run_train(args, nproc=2)
    # reference: one process, ZeRO-2, no checkpointing; the same global batch (1 x 4 x 1 = 1 x 2 x 2)
    ref = tmp / "ref"
    args = fast_args(ref, data, base, steps=4, extra=[*common, "--grad-accum", "4", "--no-gradient-checkpointing"])
    args[1] = "ds_configs/zero2.json"
    p = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return base, zero3, ref


@pytest.mark.slow
def test_zero3_longlora_matches_single_process_reference(runs):
    import torch
    from safetensors.torch import load_file

    base, zero3, ref = runs
    a, b = read_jsonl(zero3 / "metrics.jsonl"), read_jsonl(ref / "metrics.jsonl")
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        if "eval_loss" in rb:  # full attention in eval: its own path through the model
            assert ra["eval_loss"] == pytest.approx(rb["eval_loss"], rel=1e-5)
    assert sum("eval_loss" in r for r in a) == 2
    sa = load_file(zero3 / "adapter" / "adapter_model.safetensors")
    sb = load_file(ref / "adapter" / "adapter_model.safetensors")
    assert sa.keys() == sb.keys()
    n_layers = json.loads((zero3 / "final_model" / "config.json").read_text())["num_hidden_layers"]
    lora_keys = {k for k in sa if ".lora_" in k}
    assert len(lora_keys) == n_layers * 4 * 2
    assert {k for k in sa if k not in lora_keys} == {"base_model.model.model.embed_tokens.weight",
                                                    "base_model.model.model.norm.weight"} | {
        f"base_model.model.model.layers.{i}.{n}.weight" for i in range(n_layers)
        for n in ("input_layernorm", "post_attention_layernorm")}
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=2e-5, rtol=1e-4, msg=k)
    assert any(sa[k].abs().sum() > 0 for k in sa if ".lora_B." in k)  # the adapters did train


@pytest.mark.slow
def test_frozen_weights_stay_and_the_merged_model_is_base_plus_adapter(runs):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base, zero3, _ = runs
    b = load_file(f"{base}/model.safetensors")
    m = load_file(zero3 / "final_model" / "model.safetensors")
    assert m.keys() == b.keys()
    for k in b:
        frozen = not any(s in k for s in ("q_proj", "k_proj", "v_proj", "o_proj", "embed", "norm"))
        assert torch.equal(m[k], b[k]) == frozen, k  # frozen weights bit-identical, trained ones moved
    ids = torch.randint(3, 2000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(zero3 / "final_model", dtype=torch.float32)(input_ids=ids).logits
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base_model, str(zero3 / "adapter")).eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    run = json.loads((zero3 / "run.json").read_text())
    resolved = json.loads((zero3 / "resolved.json").read_text())
    assert resolved["s2_group"] == 32 and "S2-Attn in training (group 32" in resolved["why"]["attention"]
    assert run["config"]["s2_attn"] == 32
