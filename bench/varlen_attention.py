"""Varlen FlashAttention for transformers models through PyTorch's own kernels (no flash-attn package).

`register()` adds an attention implementation named "bench_varlen" to transformers' AttentionInterface and
returns its name; set it with `model.set_attn_implementation(name)` or `config._attn_implementation = name`.
Packed documents are found from `position_ids` (a document starts where the position is 0), so a packed
sample never attends across documents, and no S x S mask is ever built (custom implementations get no mask).

`torch.nn.attention.varlen.varlen_attn` changed between releases: some take `is_causal`, torch 2.11 takes
`window_size=(-1, 0)` for causal, and `enable_gqa` is not everywhere. The call is built from
`inspect.signature`, and on CUDA a one-time probe checks it against SDPA (values and gradients) and decides
whether kv heads can be passed un-repeated (native GQA) or must be repeated (costs 2 x (H/K - 1) x S x K x d
extra bytes). Without CUDA (CPU tests) it falls back to a per-document SDPA loop with the same semantics.

If longctx.attention grows a varlen implementation, bench should switch to it; this module is the bench's
self-contained fallback.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

NAME = "bench_varlen"
_state: dict = {}


def cu_seqlens_from_position_ids(position_ids: torch.Tensor | None, batch: int, seq: int, device) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 of shape [docs+1], max doc length) for the flattened (batch*seq) token stream."""
    if position_ids is None:
        cu = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * seq
        return cu, seq
    pos = position_ids.reshape(-1)
    if pos.numel() != batch * seq:  # position_ids broadcast over the batch
        pos = position_ids.expand(batch, seq).reshape(-1)
    starts = torch.nonzero(pos == 0, as_tuple=False).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([torch.zeros(1, device=pos.device, dtype=starts.dtype), starts])
    # a new row of the batch always starts a document
    row_starts = torch.arange(0, batch, device=pos.device, dtype=starts.dtype) * seq
    starts = torch.unique(torch.cat([starts, row_starts]))
    cu = torch.cat([starts, torch.tensor([batch * seq], device=pos.device, dtype=starts.dtype)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return cu.to(device), max_len


def _varlen_fn():
    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn


def _call_varlen(q, k, v, cu, max_len, scale, gqa_mode):
    fn = _varlen_fn()
    params = inspect.signature(fn).parameters
    kw = {}
    if "scale" in params:
        kw["scale"] = scale
    if "is_causal" in params:
        kw["is_causal"] = True
    elif "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        raise RuntimeError(f"varlen_attn{inspect.signature(fn)} has neither is_causal nor window_size")
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        if gqa_mode == "enable_gqa":
            kw["enable_gqa"] = True
        elif gqa_mode == "repeat":
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        # "native": pass fewer kv heads as they are
    out = fn(q, k, v, cu, cu, max_len, max_len, **kw)
    return out[0] if isinstance(out, tuple) else out


def _sdpa_reference(q, k, v, cu, scale):
    """(T, H, d) per-document causal SDPA; the CPU fallback and the probe's reference."""
    n_rep = q.shape[1] // k.shape[1]
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qi, ki, vi = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if n_rep > 1:
            ki = ki.repeat_interleave(n_rep, dim=1)
            vi = vi.repeat_interleave(n_rep, dim=1)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def probe(device) -> str:
    """Pick how to call varlen_attn on this torch build; returns a mode string, cached."""
    if "mode" in _state:
        return _state["mode"]
    if not torch.cuda.is_available() or torch.device(device).type != "cuda":
        _state["mode"] = "cpu-sdpa-loop"
        return _state["mode"]
    params = inspect.signature(_varlen_fn()).parameters
    candidates = (["enable_gqa"] if "enable_gqa" in params else []) + ["native", "repeat"]
    g = torch.Generator(device=device).manual_seed(0)
    T, H, K, d = 96, 4, 2, 64
    cu = torch.tensor([0, 40, 96], device=device, dtype=torch.int32)
    errors = []
    for mode in candidates:
        try:
            q, k, v = (torch.randn(T, h, d, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
                       for h in (H, K, K))
            out = _call_varlen(q, k, v, cu, 56, d ** -0.5, mode)
            out.float().square().sum().backward()
            grads = [t.grad.clone() for t in (q, k, v)]
            for t in (q, k, v):
                t.grad = None
            ref = _sdpa_reference(q, k, v, cu, d ** -0.5)
            ref.float().square().sum().backward()
            ok = torch.allclose(out.float(), ref.float(), atol=3e-2, rtol=3e-2) and all(
                torch.allclose(a.float(), t.grad.float(), atol=1e-1, rtol=1e-1) for a, t in zip(grads, (q, k, v)))
            if ok:
                _state["mode"] = mode
                return mode
            errors.append(f"{mode}: mismatch vs SDPA")
        except Exception as e:  # noqa: BLE001 - any failure means: try the next calling convention
            errors.append(f"{mode}: {type(e).__name__}: {str(e)[:200]}")
    raise RuntimeError("varlen_attn unusable on this build: " + "; ".join(errors))


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             position_ids=None, **kwargs):
    """transformers attention interface: query (B, H, S, d), key/value (B, K, S, d) -> ((B, S, H, d), None)."""
    if dropout:
        raise ValueError("bench_varlen attention has no dropout")
    B, H, S, d = query.shape
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    q = query.transpose(1, 2).reshape(B * S, H, d)
    k = key.transpose(1, 2).reshape(B * S, key.shape[1], d)
    v = value.transpose(1, 2).reshape(B * S, value.shape[1], d)
    cu, max_len = cu_seqlens_from_position_ids(position_ids, B, S, query.device)
    mode = probe(query.device)
    if mode == "cpu-sdpa-loop":
        out = _sdpa_reference(q, k, v, cu, scale)
    else:
        out = _call_varlen(q, k, v, cu, max_len, scale, mode)
    return out.reshape(B, S, H, d), None


def register() -> str:
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, varlen_attention_forward)
    return NAME


def describe() -> str:
    return f"torch varlen_attn ({_state.get('mode', 'not probed')})"
