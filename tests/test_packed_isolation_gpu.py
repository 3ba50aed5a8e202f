"""Packed rows on a GPU: no document sees another, through every kernel the default path dispatches to.

The CPU tests check the dispatch logic against a plain reference in float64; here the real kernels run: cuDNN (through
SDPA, documents of at least PER_DOC_MIN_TOKENS whose length is a multiple of PLAN_CACHED_MULTIPLE), torch's varlen
FlashAttention (the short documents and the other long ones, in runs), and flash-attention-4's ops where flash-attn-4
is installed. Two checks per kernel path, each able to catch a leak a loose tolerance would hide:
  - isolation, exact: the outputs of every document are bitwise unchanged when every other document's q/k/v is
    replaced by different random values, and the gradient of one document's outputs with respect to every other
    document's q/k/v is exactly zero;
  - accuracy, per document: each document's output and q/k/v gradients against causal attention of that document
    alone in float32 (torch's math backend), relative error under 2% of the reference's norm (bf16 inputs; a floor of 0.05 per element's RMS where the
    reference is ~0, as dq of a one-token document).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch

from longctx import attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                                 reason="needs a CUDA GPU of sm80+")]

# 9K and 8K through cuDNN; 5000 (not a multiple of 1024) and the short ones through varlen, in runs
LENS = [3, 9216, 700, 1, 8192, 5000, 64, 17]
HQ, HKV, D = 8, 2, 128


def _qkv(seed: int, lens=LENS):
    g = torch.Generator(device="cuda").manual_seed(seed)
    S = sum(lens)
    return [torch.randn(1, h, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for h in (HQ, HKV, HKV)]


def _forward(name: str):
    if name == "fa4":
        pytest.importorskip("flash_attn.cute")
        return attention.fa4_attention_forward
    return attention.sdpa_per_doc_forward


def _run(fwd, q, k, v, cu):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, _ = fwd(None, q, k, v, None, scaling=D ** -0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                 max_length_q=max(LENS), max_length_k=max(LENS))
    return out, (q, k, v)


class Packed(NamedTuple):
    fwd: Callable
    cu: torch.Tensor              # cu_seqlens of LENS
    spans: list[tuple[int, int]]  # each document's [start, end) in the row
    qkv: list[torch.Tensor]
    out: torch.Tensor
    leaves: tuple                 # the q/k/v `out` was computed from, for gradients


def _packed(kernel: str, seed: int) -> Packed:
    """One packed row of LENS through `kernel`: its inputs, boundaries and output."""
    fwd = _forward(kernel)
    cu = torch.tensor([0] + LENS, device="cuda").cumsum(0).to(torch.int32)
    qkv = _qkv(seed)
    return Packed(fwd, cu, list(zip(cu[:-1].tolist(), cu[1:].tolist())), qkv, *_run(fwd, *qkv, cu))


@pytest.mark.parametrize("kernel", ["sdpa_per_doc", "fa4"])
def test_no_document_sees_another(kernel):
    fwd, cu, spans, (q, k, v), out, _ = _packed(kernel, 0)
    other = _qkv(1)
    for i, (s, e) in enumerate(spans):
        mixed = [o.clone() for o in other]
        for m, t in zip(mixed, (q, k, v)):
            m[:, :, s:e] = t[:, :, s:e]
        out_i, _ = _run(fwd, *mixed, cu)
        assert torch.equal(out_i[:, s:e], out[:, s:e]), f"document {i} ({e - s} tokens) changed with the others"
    for i, (s, e) in enumerate(spans):
        out_i, leaves = _run(fwd, q, k, v, cu)
        grads = torch.autograd.grad(out_i[:, s:e].float().square().sum(), leaves)
        for name, g in zip("qkv", grads):
            outside = torch.cat([g[:, :, :s], g[:, :, e:]], dim=2)
            assert outside.abs().max().item() == 0, f"d(doc {i})/d{name} of other documents is not zero"
            assert g[:, :, s:e].abs().max().item() > 0


@pytest.mark.parametrize("kernel", ["sdpa_per_doc", "fa4"])
def test_each_document_matches_fp32_attention_of_it_alone(kernel):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, _, spans, (q, k, v), out, leaves = _packed(kernel, 2)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, go)

    def rel(a, b):  # relative to the reference, with a floor where it is ~0 (dq of a one-token document)
        return ((a.float() - b.float()).norm() / (b.float().norm() + 0.05 * b.numel() ** 0.5)).item()

    for i, (s, e) in enumerate(spans):
        ref_leaves = [t[:, :, s:e].float().detach().requires_grad_(True) for t in (q, k, v)]
        rq, rk, rv = ref_leaves
        with sdpa_kernel(SDPBackend.MATH):
            ref = torch.nn.functional.scaled_dot_product_attention(
                rq, rk.repeat_interleave(HQ // HKV, 1), rv.repeat_interleave(HQ // HKV, 1), is_causal=True,
                scale=D ** -0.5).transpose(1, 2)
        ref_grads = torch.autograd.grad(ref, ref_leaves, go[:, s:e].float())
        assert rel(out[:, s:e], ref) < 2e-2, f"document {i} ({e - s} tokens): output"
        for name, g, rg in zip("qkv", grads, ref_grads):
            assert rel(g[:, :, s:e], rg) < 2e-2, f"document {i} ({e - s} tokens): d{name}"
