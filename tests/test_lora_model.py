"""longctx/lora.py on one process: the trainable set, gradients under checkpointing, the saved adapter and
the merged model (both checked against the unmerged base + adapter forward of peft's LoRA layers)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers_train import tiny_model_dir
from longctx import lora
from longctx.errors import LongctxError
from longctx.modeling import CausalLMWithLoss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def cfg_ns(**kw):
    base = dict(lora=True, lora_rank=4, lora_alpha=8, lora_target_modules=list(TARGETS), trainable_modules="embed,norm",
                gradient_checkpointing=True, merge=False)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("base"), seed=3)


@pytest.fixture(scope="module")
def tied_base_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tied"), seed=4, tie_word_embeddings=True)


def load(base_dir, checkpointing=False):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa")
    if checkpointing:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    return lm


def expected_trainable(lm, targets, extra=("embed", "norm")) -> set[str]:
    """From the plain model: embeddings + norms by module type/name, LoRA A/B for each targeted linear."""
    want = set()
    for mname, m in lm.named_modules():
        leaf = mname.rsplit(".", 1)[-1]
        if "embed" in extra and isinstance(m, torch.nn.Embedding):
            want.add(f"{mname}.weight")
        if "norm" in extra and type(m).__name__.endswith("RMSNorm"):
            want.add(f"{mname}.weight")
        if isinstance(m, torch.nn.Linear) and leaf in targets:
            want |= {f"{mname}.lora_A.default.weight", f"{mname}.lora_B.default.weight"}
    return want


@pytest.mark.parametrize("extra", [("embed", "norm"), ()])
def test_trainable_set_and_gradients_under_checkpointing(base_dir, extra):
    lm = load(base_dir, checkpointing=True)
    want = expected_trainable(lm, TARGETS, extra)
    model = CausalLMWithLoss(lm)
    lora.apply(model, cfg_ns(trainable_modules=",".join(extra) or "none"), say=lambda *a: None)
    assert set(lora.trainable_names(lm)) == want
    for n, p in lm.named_parameters():
        if n.endswith("lora_B.default.weight"):
            torch.nn.init.normal_(p, std=0.02)  # B starts at zero: A's gradient would be zero too
    model.train()
    ids = torch.randint(3, 2000, (2, 24))
    loss = model(input_ids=ids, position_ids=torch.arange(24).expand(2, 24), labels=ids)
    loss.backward()
    got = {n for n, p in lm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == want  # frozen embeddings: enable_input_require_grads keeps reentrant checkpoints alive


def test_bad_names_are_refused(base_dir):
    with pytest.raises(LongctxError, match="no parameter name contains"):
        lora.apply(CausalLMWithLoss(load(base_dir)), cfg_ns(trainable_modules="embed,nrom"), say=lambda *a: None)
    with pytest.raises(LongctxError, match="--lora-target-modules"):
        lora.apply(CausalLMWithLoss(load(base_dir)), cfg_ns(lora_target_modules=["qproj"]), say=lambda *a: None)
    assert lora.config_problems(cfg_ns(lora=False, merge=True)) == ["--merge needs --lora (it merges the adapter "
                                                                      "into the base weights)"]
    probs = lora.config_problems(cfg_ns(lora_rank=0, lora_alpha=0, lora_target_modules=[], trainable_modules="a b"))
    assert len(probs) == 4
    assert lora.split_list(["q_proj,k_proj", "v_proj"]) == ["q_proj", "k_proj", "v_proj"]
    assert lora.split_list("none") == []


@pytest.mark.parametrize("tied", [False, True])
def test_saved_adapter_and_merged_model_equal_base_plus_adapter(base_dir, tied_base_dir, tmp_path, tied):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = tied_base_dir if tied else base_dir
    cfg = cfg_ns()
    lm = load(base_dir)
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == tied
    lora.apply(CausalLMWithLoss(lm), cfg, say=lambda *a: None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a "trained" state: non-zero B, moved embeddings and norms
        for p in lm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(3, 2000, (2, 20), generator=g)
    lm.eval()
    with torch.no_grad():
        want = lm(input_ids=ids).logits  # peft's LoRA layers, unmerged: W x + (alpha/r) B A x
        plain = load(base_dir).eval()(input_ids=ids).logits
    assert not torch.allclose(want, plain, atol=1e-3)

    adapter = lora.write_adapter(tmp_path / "adapter", lora.gather_trainable(lm, False, 0), cfg, base_dir, tied=tied)
    merged = lora.write_hf_model(tmp_path / "merged", lora.merge_state_dict(lm.state_dict(), lora.scaling(cfg)),
                                 lm.config)
    with torch.no_grad():
        m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        assert not any("lora" in n or "base_layer" in n for n in m.state_dict())
        torch.testing.assert_close(m(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        peft_model = PeftModel.from_pretrained(load(base_dir), str(adapter)).eval()
        torch.testing.assert_close(peft_model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    later = lora.merge_saved(base_dir, str(adapter), str(tmp_path / "merged_later"), dtype="float32")
    with torch.no_grad():
        m2 = AutoModelForCausalLM.from_pretrained(later, dtype=torch.float32).eval()
        torch.testing.assert_close(m2(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
