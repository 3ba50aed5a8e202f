"""The tiled loss gives the full-logits gradients; SP checks and batch slicing (one process)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import helpers_train  # noqa: F401  (puts the repo on sys.path)
from longctx import sequence_parallel as sp
from longctx.errors import LongctxError
from longctx import modeling
from longctx.modeling import CausalLMWithLoss

CONFIG = dict(vocab_size=256, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0)


def tiny_lm(**overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", **{**CONFIG, **overrides})
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64, attn_implementation="sdpa")
    lm.config.use_cache = False
    return lm


def batch(B=2, S=45, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, CONFIG["vocab_size"], (B, S), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[0, 20:25] = -100
    return ids, torch.arange(S).expand(B, S), labels


def loss_and_grads(model, ids, pos, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, position_ids=pos, labels=labels)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def assert_same(a, b, tol=1e-10):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=tol, atol=0)
    for k in ga:
        err, scale = (ga[k] - gb[k]).abs().max().item(), gb[k].abs().max().item()
        assert err <= tol * scale, f"{k}: {err:.3g} vs max |grad| {scale:.3g}"


def test_tiled_loss_gives_full_logits_gradients(monkeypatch):
    monkeypatch.setattr(modeling, "HEAD_CHUNK_TOKENS", 7)  # several chunks over the 2 x 44 targets
    lm = tiny_lm()
    ids, pos, labels = batch()
    tiled = loss_and_grads(CausalLMWithLoss(lm, tiled_loss=True), ids, pos, labels)
    full = loss_and_grads(CausalLMWithLoss(lm, tiled_loss=False), ids, pos, labels)
    assert_same(tiled, full)
    # and both are the Hugging Face loss (a mean, computed in fp32) times the number of targets
    n = int((labels[:, 1:] != -100).sum())
    hf = lm(input_ids=ids, labels=labels).loss.detach().double()
    torch.testing.assert_close(full[0] / n, hf, rtol=1e-6, atol=0)


def test_preshifted_labels_equal_hf_shift():
    lm = tiny_lm()
    ids, pos, labels = batch()
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    a = loss_and_grads(CausalLMWithLoss(lm, labels_shifted=True), ids, pos, shifted)
    b = loss_and_grads(CausalLMWithLoss(lm, labels_shifted=False), ids, pos, labels)
    assert_same(a, b)


def test_deepspeed_tiled_fused_logits_loss_drops_the_upstream_gradient_for_the_weight():
    """Why the tiled loss is ours: DeepSpeed's TiledFusedLogitsLoss forms lm_head.weight's gradient inside
    forward with an upstream gradient of 1, so scaling the loss (1/grad_accum, fp16 loss scale, 1/N) scales
    the hidden-state gradient but not the weight's."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 16, bias=False).double()
    x = torch.randn(1, 10, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 16, (1, 10))

    def fn(self, xs, ys):
        return F.cross_entropy(self(xs), ys.view(-1), reduction="sum")

    (TiledFusedLogitsLoss.apply(fn, head, x, y, None, 2, [head.weight], "sum") * 3.0).backward()
    ref_x, ref_w = x.detach().clone().requires_grad_(), head.weight.detach().clone().requires_grad_()
    (F.cross_entropy(ref_x.view(-1, 8) @ ref_w.t(), y.view(-1), reduction="sum") * 3.0).backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(head.weight.grad * 3.0, ref_w.grad)  # the weight's gradient missed the 3


def test_shard_batch_pads_shifts_and_slices():
    from longctx.data import IGNORE, Doc, collate
    import numpy as np

    docs = [Doc(f"d{i}", np.arange(3, 3 + n, dtype=np.int32), np.arange(3, 3 + n, dtype=np.int32))
            for i, n in enumerate([5, 4, 6])]
    full = collate(docs, [[0, 1, 2]], pad_id=0, packing=True, max_seq_len=17)  # 15 tokens, 2 padding
    parts = [sp.shard_batch(full, 4, r, pad_id=0) for r in range(4)]
    assert all(p["input_ids"].shape == (1, 5) for p in parts)  # 17 -> 20
    ids = torch.cat([p["input_ids"] for p in parts], 1)
    pos = torch.cat([p["position_ids"] for p in parts], 1)
    lab = torch.cat([p["labels"] for p in parts], 1)
    assert ids[0, :17].tolist() == full["input_ids"][0].tolist() and ids[0, 17:].tolist() == [0, 0, 0]
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2]
    assert lab[0, :16].tolist() == full["labels"][0, 1:].tolist() and (lab[0, 16:] == IGNORE).all()
    assert sum(p["n_targets"] for p in parts) == full["n_targets"] == 12
    assert parts[0]["cu_seq_lens"].tolist() == [0, 5, 9, 15, 17, 20] and parts[0]["max_length"] == 6
    rows = sp.shard_batch(collate(docs, [[0], [1]], pad_id=0, packing=False, max_seq_len=17), 2, 1, pad_id=0,
                          rows=3)
    assert rows["input_ids"].shape == (3, 3) and (rows["labels"][2] == IGNORE).all()


def test_check_refuses_heads_not_divisible_by_sp():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("llama", **{**CONFIG, "num_attention_heads": 6, "num_key_value_heads": 2,
                                           "hidden_size": 48})
    with pytest.raises(LongctxError, match="6 query heads are not divisible by --sequence-parallel 4"):
        sp.check(4, 4, cfg)
    with pytest.raises(LongctxError, match="world size 3 is not divisible by --sequence-parallel 2"):
        sp.check(2, 3, cfg)
    sp.check(2, 4, cfg)  # 6 heads / 2, 2 kv heads / 2
    with pytest.raises(LongctxError, match="key/value heads"):
        sp.check(3, 3, cfg)  # 6 heads / 3 fine, 2 kv heads vs 3 not
