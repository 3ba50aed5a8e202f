"""Packing parity (fp32): a packed batch gives the loss and gradients of its documents run one by one.

The reference is independent of longctx: transformers' own LlamaForCausalLM forward with labels
(its ForCausalLMLoss), one document at a time, unpadded. Checked for every attention path a packed row
can take: SDPA and eager (block-diagonal mask, the CPU path), and longctx_varlen through the
varlen_attn signature adapter (with a pure-PyTorch reference kernel in both the torch 2.10
`is_causal` and the torch 2.11+ `window_size` forms). A negative control shows that the comparison
catches cross-document attention. The last test does the same through the deepspeed launcher.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers_train import (chat_rows, fast_args, pr_rows, read_jsonl, reference_step, run_train,
                           text_rows, tiny_lm, tiny_model_dir, write_jsonl)
from longctx import attention, batching, documents, resolve
from longctx.modeling import CausalLMWithLoss, LinearCrossEntropySum


# ---- pure-PyTorch stand-ins for torch.nn.attention.varlen.varlen_attn (CUDA-only) -----------------

def _segments(cu):
    cu = cu.tolist()
    return list(zip(cu[:-1], cu[1:]))


def _ref(q, k, v, cu, causal, scale):
    out = torch.empty_like(q)
    for s, e in _segments(cu):
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                           is_causal=causal, scale=scale)
        out[s:e] = o.transpose(0, 1)
    return out


def varlen_torch210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None,
                    scale=None):
    assert key.shape[1] == query.shape[1], "this signature has no GQA: the adapter must repeat k/v"
    return _ref(query, key, value, cu_seq_q, is_causal, scale)


def varlen_torch211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):
    assert window_size in ((-1, -1), (-1, 0))
    if enable_gqa:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    return _ref(query, key, value, cu_seq_q, window_size == (-1, 0), scale)


# ---- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docs(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("pack")
    files = [write_jsonl(d / "t.jsonl", text_rows(7, seed=3, lo=3, hi=40)), write_jsonl(d / "c.jsonl", chat_rows(3)),
             write_jsonl(d / "p.jsonl", pr_rows(3))]
    return documents.load_docs([str(f) for f in files], tok, 512, "error", documents.Ledger())


def make_lm(impl):
    return tiny_lm(attn_implementation=impl)


def reference(lm, docs):
    """Sum of target-token CE and its gradients, one document at a time, through HF's own loss."""
    lm.zero_grad()
    total = 0.0
    for d in docs:
        ids = torch.tensor(d.input_ids, dtype=torch.long)[None]
        labels = torch.tensor(d.labels, dtype=torch.long)[None]
        n = int((labels[:, 1:] != -100).sum())
        loss = lm(input_ids=ids, labels=labels).loss * n
        loss.backward()
        total += float(loss.detach())
    return total, {k: p.grad.clone() for k, p in lm.named_parameters()}


def packed(lm, docs, impl, capacity=256, restart_positions=True):
    """`impl`: the kernel that takes the document boundaries (longctx_sdpa, longctx_varlen), or None (a mask)."""
    model = CausalLMWithLoss(lm)
    lm.zero_grad()
    rows = batching.pack([len(d) for d in docs], capacity)
    assert len(rows) < len(docs), "the test must actually pack several documents per row"
    batch = batching.collate(docs, rows, pad_id=0, packing=True, max_seq_len=capacity,
                             flatten=impl is not None)
    pos = batch["position_ids"]
    if not restart_positions:  # negative control: one long sequence per row
        pos = torch.arange(pos.shape[-1]).expand_as(pos).contiguous()
    loss = model(batch["input_ids"], pos, batch["labels"], **attention.model_kwargs(batch, impl, "cpu"))
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in lm.named_parameters()}


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert la == pytest.approx(lb, rel=1e-5)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_equals_one_by_one_dense_mask(docs, impl):
    lm = make_lm(impl)
    assert_same(packed(lm, docs, None), reference(lm, docs))


@pytest.mark.parametrize("capacity", [256, 96])
def test_packed_equals_one_by_one_sdpa_per_doc(docs, capacity):
    """The default kernel (`auto`): SDPA per document, boundaries from the collator, one or several rows."""
    lm = make_lm(attention.register(resolve.SDPA_PER_DOC))
    assert_same(packed(lm, docs, resolve.SDPA_PER_DOC, capacity=capacity), reference(make_lm("sdpa"), docs))


@pytest.mark.parametrize("kernel", [varlen_torch210, varlen_torch211], ids=["torch2.10-is_causal", "torch2.11-window"])
@pytest.mark.parametrize("micro_rows", [1, 3])
def test_packed_equals_one_by_one_varlen(docs, kernel, micro_rows):
    attention.register_varlen(kernel=kernel)
    try:
        lm = make_lm(attention.VARLEN_NAME)
        cap = 512 if micro_rows == 1 else 160
        got = packed(lm, docs, attention.VARLEN_NAME, capacity=cap)
        ref = reference(make_lm("sdpa"), docs)
        assert_same(got, ref)
    finally:
        attention.register_varlen(kernel=None)


def test_negative_control_cross_document_attention_is_caught(docs):
    lm = make_lm("sdpa")
    leak = packed(lm, docs, None, restart_positions=False)
    ref = reference(lm, docs)
    assert leak[0] != pytest.approx(ref[0], rel=1e-5)


def test_linear_cross_entropy_sum_matches_autograd():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    got = LinearCrossEntropySum.apply(h, w, y, 8)  # several chunks
    g = torch.randn((), dtype=torch.float64)
    gh, gw = torch.autograd.grad(got * g, (h, w))
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    rh, rw = torch.autograd.grad(ref * g, (h, w))
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)


# ---- through the launcher ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("ckpt", [[], ["--offload-gradient-checkpointing", "--keep-attention"],
                                  ["--offload-gradient-checkpointing", "--keep-attention", "--keep-attention-by",
                                   "replay"]],
                         ids=["checkpointing", "offloaded+kept-attention", "offloaded+replayed-attention"])
def test_launcher_step_equals_one_by_one_reference(tmp_path, tok, ckpt):
    """2 ranks x grad_accum 2 x packed rows (ZeRO-3): the logged loss and grad norm of step 1 equal the
    target-token mean loss and its gradient norm computed one document at a time from the same initial weights;
    also with the fork's offloader and attention kept, by selective checkpointing (non-reentrant) and by replay
    (reentrant)."""
    data_file = write_jsonl(tmp_path / "docs.jsonl", text_rows(40, seed=5, lo=5, hi=50))
    model_dir = tiny_model_dir(tmp_path / "init")
    out = tmp_path / "run"
    run_train(fast_args(out, [str(data_file)], model_dir, steps=1,
                        extra=["--grad-accum", "2", "--max-seq-len", "256", "--no-save-final-model", *ckpt]))
    if ckpt:
        resolved = json.loads((out / "resolved.json").read_text())
        by = "replay" if "replay" in ckpt else "selective"
        assert resolved["keep_attention"] and resolved["keep_attention_by"] == by
        assert resolved["reentrant"] == (by == "replay")
    row = read_jsonl(out / "metrics.jsonl")[0]
    ids = read_jsonl(out / "samples.jsonl")[0]["sample_ids"]
    assert len(ids) > 4  # several documents per row, 4 rows

    ref_loss, ref_norm = reference_step(model_dir, data_file, ids)
    assert row["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert row["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
