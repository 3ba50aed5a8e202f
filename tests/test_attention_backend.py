"""Attention: the resolved choice (longctx.resolve), refusals, SDPA per document against a plain reference on CPU,
the varlen_attn signature adapter, and (GPU only) the real torch varlen kernel against one-by-one documents."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from longctx import attention, resolve
from longctx.errors import LongctxError

CPU = resolve.Facts()
V100 = resolve.Facts("cuda", "Tesla V100-SXM2-16GB", (7, 0), 16 << 30)
A6000 = resolve.Facts("cuda", "NVIDIA RTX A6000", (8, 6), 48 << 30, varlen_attn=True)


def choose(facts, precision, packing=True, max_seq_len=32768, **kw):
    return resolve.resolve_attention(kw.pop("requested", "auto"), facts, precision=precision, packing=packing,
                                     max_seq_len=max_seq_len, dense_mask_max_len=kw.pop("dense", 8192))


def test_auto_is_sdpa_per_document_without_flash_attention_4():
    """Every machine without flash-attn-4 (tests/test_fa4.py: where auto takes fa4, and where it does not)."""
    for facts, precision in ((A6000, "bf16"), (dataclasses.replace(A6000, flash_attn=True), "bf16"),
                             (V100, "fp16"), (CPU, "fp32")):
        c = choose(facts, precision, max_seq_len=1 << 20)  # no dense mask, so any length packs
        assert (c.name, c.impl, c.varlen_kwargs) == ("sdpa_per_doc", resolve.SDPA_PER_DOC, True)


def test_dense_mask_is_refused_at_long_context():
    with pytest.raises(LongctxError, match="refusing to build a dense 32,768 x 32,768"):
        choose(V100, "fp16", packing=True, requested="sdpa")
    with pytest.raises(LongctxError, match="eager attention materializes"):
        choose(CPU, "fp32", packing=False, requested="eager")
    assert choose(V100, "fp16", packing=False, max_seq_len=1 << 20, requested="sdpa").impl == "sdpa"


def test_unavailable_backends():
    with pytest.raises(LongctxError, match="flash-attn package is not installed"):
        choose(A6000, "bf16", requested="flash_attention_2")
    with pytest.raises(LongctxError, match="needs a CUDA GPU of sm80"):
        choose(dataclasses.replace(V100, varlen_attn=True), "fp16", requested="varlen")
    with pytest.raises(LongctxError, match="has no torch.nn.attention.varlen"):
        choose(dataclasses.replace(A6000, varlen_attn=False), "bf16", requested="varlen")
    assert choose(A6000, "bf16", requested="varlen").impl == resolve.VARLEN


def _reference(q, k, v, lens, scale):
    """Plain causal attention per document: softmax(q k^T * scale + causal mask) v, GQA by repeating k/v heads."""
    rep = q.shape[1] // k.shape[1]
    outs, s = [], 0
    for n in lens:
        qd, kd, vd = q[0, :, s:s + n], k[0, :, s:s + n].repeat_interleave(rep, 0), v[0, :, s:s + n].repeat_interleave(rep, 0)
        scores = (qd @ kd.transpose(-1, -2)) * scale
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((scores.softmax(-1) @ vd).transpose(0, 1))
        s += n
    return torch.cat(outs, 0)[None]


@pytest.mark.parametrize("boundaries", ["cu_seq_lens", "position_ids", "one_document"])
def test_sdpa_per_doc_matches_plain_attention_on_cpu(boundaries):
    torch.manual_seed(0)
    lens = [5, 17, 1, 40] if boundaries != "one_document" else [63]
    S, Hq, Hkv, D = sum(lens), 4, 2, 8
    q, k, v = (torch.randn(1, h, S, D, dtype=torch.float64, requires_grad=True) for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    kw = {"cu_seq_lens_q": cu} if boundaries == "cu_seq_lens" else {"position_ids": pos}
    out, _ = attention.sdpa_per_doc_forward(None, q, k, v, None, scaling=0.3, **kw)
    ref = _reference(q, k, v, lens, 0.3)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch 2.11's varlen_attn signature, in plain PyTorch: causal attention per segment of (T, H, D) tensors."""
    assert window_size == (-1, 0)
    out, b = [], cu_q.tolist()
    for s, e in zip(b[:-1], b[1:]):
        ref = _reference(q[None, s:e].transpose(1, 2), k[None, s:e].transpose(1, 2), v[None, s:e].transpose(1, 2),
                         [e - s], scale)
        out.append(ref[0])
    return torch.cat(out, 0)


def test_short_documents_go_to_varlen_in_runs(monkeypatch):
    """Where torch's varlen kernel runs (CUDA; here a plain reference stands in for it), documents shorter than
    PER_DOC_MIN_TOKENS, and long ones whose length is not a multiple of PLAN_CACHED_MULTIPLE (cuDNN would build a
    plan for it), go to it in runs of consecutive documents, the other long ones to SDPA one by one; the result is
    the same attention, gradients included."""
    monkeypatch.setattr(attention, "PER_DOC_MIN_TOKENS", 16)
    monkeypatch.setattr(attention, "PLAN_CACHED_MULTIPLE", 20)
    monkeypatch.setattr(attention, "_varlen_for_short_docs", lambda q: True)
    calls = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append(cu_q.tolist())
        return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)

    monkeypatch.setattr(attention, "_KERNEL", kernel)
    torch.manual_seed(0)
    lens = [5, 3, 40, 7, 33, 20, 2, 1]
    S, Hq, Hkv, D = sum(lens), 4, 2, 8
    q, k, v = (torch.randn(1, h, S, D, dtype=torch.float64, requires_grad=True) for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    out, _ = attention.sdpa_per_doc_forward(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu)
    assert calls == [[0, 5, 8], [0, 7, 40], [0, 2, 3]]  # runs (5, 3), (7, 33), (2, 1); 40 and 20 by SDPA
    ref = _reference(q, k, v, lens, 0.3)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)


def test_adapter_rejects_an_unknown_signature():
    q = torch.zeros(4, 2, 8)
    with pytest.raises(RuntimeError, match="no is_causal or window_size"):
        attention.call_varlen(lambda q, k, v, a, b, c, d: q, q, q, q, torch.tensor([0, 4]), 4, None)


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    cu, m = attention.cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 3, 5, 6, 10, 12] and m == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU of sm80+")
def test_torch_varlen_kernel_matches_one_by_one_on_gpu():
    import torch.nn.functional as F

    torch.manual_seed(0)
    lens = [5, 300, 17, 1000, 64]
    T, Hq, Hkv, D = sum(lens), 8, 2, 64
    q = torch.randn(T, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda", dtype=torch.int32)
    out = attention.call_varlen(attention.torch_varlen_attn(), q, k, v, cu, max(lens), D ** -0.5)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].repeat_interleave(4, 1).transpose(0, 1),
                                             v[s:e].repeat_interleave(4, 1).transpose(0, 1), is_causal=True)
        torch.testing.assert_close(out[s:e], ref.transpose(0, 1), atol=2e-2, rtol=2e-2)
