"""longctx.attention: automatic choice, refusals, the varlen_attn signature adapter, and (GPU only) the
real torch varlen kernel against one-by-one documents."""

from __future__ import annotations

import pytest
import torch

from longctx import attention
from longctx.attention import Device
from longctx.errors import LongctxError

CPU = Device("cpu", None, "cpu")
V100 = Device("cuda", (7, 0), "Tesla V100-SXM2-16GB")
A6000 = Device("cuda", (8, 6), "NVIDIA RTX A6000")


def choose(device, precision, packing=True, max_seq_len=32768, **kw):
    return attention.choose(kw.pop("requested", "auto"), device, precision=precision, packing=packing,
                            max_seq_len=max_seq_len, dense_mask_max_len=kw.pop("dense", 8192))


def test_auto_choices(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    monkeypatch.setattr(attention, "torch_varlen_attn", lambda: (lambda *a, **k: None))
    assert choose(A6000, "bf16").impl == attention.VARLEN_NAME
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    assert choose(A6000, "bf16").impl == "flash_attention_2"
    assert choose(V100, "fp16", packing=False).impl == "sdpa"
    assert choose(CPU, "fp32", max_seq_len=1024).impl == "sdpa"


def test_dense_mask_is_refused_at_long_context():
    with pytest.raises(LongctxError, match="refusing to build a dense 32,768 x 32,768"):
        choose(V100, "fp16", packing=True)
    with pytest.raises(LongctxError, match="eager attention materializes"):
        choose(CPU, "fp32", packing=False, requested="eager")
    assert choose(V100, "fp16", packing=False, max_seq_len=1 << 20).impl == "sdpa"  # causal SDPA, no mask


def test_unavailable_backends(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    with pytest.raises(LongctxError, match="flash-attn package is not installed"):
        choose(A6000, "bf16", requested="flash_attention_2")
    with pytest.raises(LongctxError, match="needs a CUDA GPU of sm80"):
        choose(V100, "fp16", requested="varlen")
    monkeypatch.setattr(attention, "torch_varlen_attn", lambda: None)
    with pytest.raises(LongctxError, match="has no torch.nn.attention.varlen"):
        choose(A6000, "bf16", requested="varlen")


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
