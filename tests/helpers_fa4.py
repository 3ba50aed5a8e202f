"""A plain stand-in for flash-attention-4's two kernel entry points (flash_attn.cute.interface._flash_attn_fwd /
_flash_attn_bwd, 4.0.0b36's signatures), so longctx.fa4's ops run on CPU: the forward with its log-sum-exp, and the
textbook backward from the saved log-sum-exp. Used by tests/test_fa4.py and, under Ulysses, tests/sp_worker.py."""

from __future__ import annotations

import sys
import types

import torch


def _up(t):  # fp32 at least; the fp64 test stays fp64
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _causal_scores(q, k, scale):
    """(H, n, n) fp32 scores of one document, k's heads repeated for GQA, the future masked."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.einsum("qhd,khd->hqk", _up(q), _up(k)) * scale
    n = q.shape[0]
    return s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))


def fake_fwd(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
             return_lse, **_):
    assert causal and return_lse and cu_seqlens_q is cu_seqlens_k
    assert max_seqlen_q == max(cu_seqlens_q.diff().tolist())
    FAKE.forwards += 1
    out = torch.empty(*q.shape[:2], v.shape[-1], dtype=q.dtype)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=_up(q).dtype)  # fp32 in the kernel
    bounds = cu_seqlens_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        s = _causal_scores(q[a:b], k[a:b], softmax_scale)
        lse[:, a:b] = torch.logsumexp(s, -1)
        vv = _up(v[a:b].repeat_interleave(q.shape[1] // v.shape[1], dim=1))
        out[a:b] = torch.einsum("hqk,khd->qhd", s.softmax(-1), vv).to(q.dtype)
    return out, lse, None, None, None


def fake_bwd(q, k, v, out, dout, lse, softmax_scale, causal, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
             max_seqlen_k, **_):
    """dV = P^T dO, dS = P (dO V^T - rowsum(dO O)), dQ = scale dS K, dK = scale dS^T Q; P from the saved lse;
    K/V gradients summed over the query heads of their group."""
    assert causal
    rep = q.shape[1] // k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bounds = cu_seqlens_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        p = (_causal_scores(q[a:b], k[a:b], softmax_scale) - lse[:, a:b, None]).exp()
        do, o = _up(dout[a:b]), _up(out[a:b])
        kk = _up(k[a:b].repeat_interleave(rep, dim=1))
        vv = _up(v[a:b].repeat_interleave(rep, dim=1))
        dvv = torch.einsum("hqk,qhd->khd", p, do)
        ds = p * (torch.einsum("qhd,khd->hqk", do, vv) - (do * o).sum(-1).T[:, :, None])
        dq[a:b] = (softmax_scale * torch.einsum("hqk,khd->qhd", ds, kk)).to(q.dtype)
        dkk = softmax_scale * torch.einsum("hqk,qhd->khd", ds, _up(q[a:b]))
        dk[a:b] = dkk.view(b - a, k.shape[1], rep, -1).sum(2).to(k.dtype)
        dv[a:b] = dvv.view(b - a, v.shape[1], rep, -1).sum(2).to(v.dtype)
    return dq, dk, dv


FAKE = types.SimpleNamespace(forwards=0)


def fake_modules() -> dict[str, types.ModuleType]:
    """sys.modules entries under which longctx.fa4 finds the stand-in."""
    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = fake_fwd, fake_bwd
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = interface
    return {"flash_attn.cute": cute, "flash_attn.cute.interface": interface}


def install() -> None:
    """For a process of its own (tests/sp_worker.py): the stand-in for the rest of the process."""
    sys.modules.update(fake_modules())
