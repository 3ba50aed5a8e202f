"""The tiled loss gives the full-logits gradients; SP checks and batch slicing (one process)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers_train import (GRAD_CHECK_CONFIG, assert_same_loss_and_grads, loss_and_grads, tiny_lm_fp64,
                           token_batch)
from longctx import sequence_parallel as sp
from longctx.errors import LongctxError
from longctx import modeling
from longctx.modeling import CausalLMWithLoss

def test_tiled_loss_gives_full_logits_gradients(monkeypatch):
    monkeypatch.setattr(modeling, "HEAD_CHUNK_TOKENS", 7)  # several chunks over the 2 x 44 targets
    lm = tiny_lm_fp64()
    ids, pos, labels = token_batch()
    tiled = loss_and_grads(CausalLMWithLoss(lm, tiled_loss=True), ids, pos, labels)
    full = loss_and_grads(CausalLMWithLoss(lm, tiled_loss=False), ids, pos, labels)
    assert_same_loss_and_grads(tiled, full)
    # and both are the Hugging Face loss (a mean, computed in fp32) times the number of targets
    n = int((labels[:, 1:] != -100).sum())
    hf = lm(input_ids=ids, labels=labels).loss.detach().double()
    torch.testing.assert_close(full[0] / n, hf, rtol=1e-6, atol=0)


def test_preshifted_labels_equal_hf_shift():
    lm = tiny_lm_fp64()
    ids, pos, labels = token_batch()
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    a = loss_and_grads(CausalLMWithLoss(lm, labels_shifted=True), ids, pos, shifted)
    b = loss_and_grads(CausalLMWithLoss(lm, labels_shifted=False), ids, pos, labels)
    assert_same_loss_and_grads(a, b)


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
    from longctx.batching import collate
    from longctx.documents import Doc
    from longctx.tokenization import IGNORE
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

    cfg = AutoConfig.for_model("llama", **{**GRAD_CHECK_CONFIG, "num_attention_heads": 6, "num_key_value_heads": 2,
                                           "hidden_size": 48})
    with pytest.raises(LongctxError, match="6 query heads are not divisible by --sequence-parallel 4"):
        sp.check(4, 4, cfg)
    with pytest.raises(LongctxError, match="world size 3 is not divisible by --sequence-parallel 2"):
        sp.check(2, 3, cfg)
    sp.check(2, 4, cfg)  # 6 heads / 2, 2 kv heads / 2
    with pytest.raises(LongctxError, match="key/value heads"):
        sp.check(3, 3, cfg)  # 6 heads / 3 fine, 2 kv heads vs 3 not
