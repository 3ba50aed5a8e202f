"""Attention kernels registered with transformers' AttentionInterface; longctx.resolve chooses among them.

  * "longctx_sdpa" (`--attn-implementation sdpa_per_doc`, the default): causal SDPA run per document of a
    packed row, with GQA (enable_gqa) and a backend order of cuDNN, flash, memory-efficient, math. Rows that are
    one document each take one SDPA call for the whole micro-batch. In rows of several documents, short ones and
    lengths cuDNN would have to build a new plan for go to varlen_attn where it runs (see PLAN_CACHED_MULTIPLE).
    No mask is ever built, so packing works at
    any length; the document boundaries come from the collator's cu_seq_lens (kept on the host: slicing needs
    them there) or, failing that, from the position_ids.
  * "longctx_varlen" (`varlen`): torch.nn.attention.varlen.varlen_attn over the flattened micro-batch.
  * "longctx_fa4" (`fa4`): the same over flash-attention-4's kernels as torch ops (longctx.fa4; sm90+).
  * transformers' own "flash_attention_2", "sdpa" and "eager" (upstream's; packing needs a dense mask).

Varlen paths get cu_seq_lens_q/k and max_length_q/k (transformers' flash-attention kwargs) from the collator,
flattened over the micro-batch, so packed documents never attend to each other: an implementation name that has
no entry in transformers' mask interface makes create_causal_mask return None.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from .resolve import FA4, SDPA_PER_DOC, VARLEN

VARLEN_NAME = VARLEN
_KERNEL: Callable | None = None  # what longctx_varlen calls; torch's varlen_attn unless a test swaps it


def torch_varlen_attn() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


def register(impl: str) -> str:
    """Register a longctx implementation name with transformers (a no-op for transformers' own names)."""
    if impl == VARLEN:
        register_varlen()
    elif impl == FA4:
        from transformers import AttentionInterface

        AttentionInterface.register(FA4, fa4_attention_forward)
    elif impl == SDPA_PER_DOC:
        from transformers import AttentionInterface

        AttentionInterface.register(SDPA_PER_DOC, sdpa_per_doc_forward)
    return impl


# --------------------------------------------------------------------------------------------
# SDPA per document
# --------------------------------------------------------------------------------------------

def _sdpa_backends() -> list:
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa_context():
    """SDPA with cuDNN first: torch's default order prefers flash, which ran 235 TFLOP/s against cuDNN's 408 on
    an H100 at 128K (docs/RESULTS.md). A backend that cannot take the inputs is skipped, so CPU and sm70 run."""
    from torch.nn.attention import sdpa_kernel

    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(_sdpa_backends(), set_priority=True)
    return sdpa_kernel(_sdpa_backends())


def _segments(B: int, S: int, kwargs: dict) -> list[list[tuple[int, int]]]:
    """(start, length) of every document of each row; rows are contiguous S-token blocks of the flat batch."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        pos = kwargs.get("position_ids")
        if pos is None:
            return [[(0, S)] for _ in range(B)]
        cu, _ = cu_seqlens_from_position_ids(pos.expand(B, S))
    bounds = cu.tolist() if isinstance(cu, torch.Tensor) else list(cu)
    rows: list[list[tuple[int, int]]] = [[] for _ in range(B)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        r = a // S
        rows[r].append((a - r * S, b - a))
    return rows


# Documents shorter than this go to torch's varlen kernel in runs of consecutive short documents, where it is
# available (CUDA sm80+, half precision): one SDPA call per document costs a launch and Python per call, which
# short documents do not amortize. Measured on an H200 (torch 2.11, cuDNN 9.19, fwd + bwd, 32/8 heads, 128K rows,
# TFLOP/s, docs/RESULTS.md): per-document SDPA (cuDNN) against varlen_attn 543 vs 327 at 128K documents, 529 vs 323
# at 32K, 353 vs 298 at 8K, 60 vs 221 at 2K, 4 vs 101 at 512.
PER_DOC_MIN_TOKENS = 8192
# cuDNN builds an execution plan for every new sequence length (torch caches plans by shape): on an H200 a length
# seen for the first time cost 120-230 ms fwd + bwd against 5-105 ms for the call itself, and packed real text
# brings new lengths at every step (stdlib rows: 356-498 ms per row with every long document through cuDNN,
# 133-167 ms through varlen_attn; bench/results/*fresh_lengths*). So in rows of several documents, cuDNN gets only
# lengths that recur: multiples of this (chunked corpora cut documents to such sizes, e.g. 4 x 32K rows); other
# lengths go to varlen with the short documents. Deterministic: the choice depends on the length alone.
PLAN_CACHED_MULTIPLE = 1024


def _through_varlen(n: int) -> bool:
    """In a row of several documents: is a document of n tokens better off in torch's varlen kernel?"""
    return n < PER_DOC_MIN_TOKENS or n % PLAN_CACHED_MULTIPLE != 0


def sdpa_per_doc_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: (B, H, S, D) in, (B, S, H, D) out; causal within documents."""
    if attention_mask is not None:
        raise RuntimeError(f"{SDPA_PER_DOC} takes no attention mask; packing is expressed by cu_seq_lens")
    B, Hq, S, _ = query.shape
    gqa = key.shape[1] != Hq
    rows = _segments(B, S, kwargs)
    F = torch.nn.functional

    def sdpa(b: int, s: int, n: int) -> torch.Tensor:  # (1, n, H, D)
        q, k, v = (t[b:b + 1, :, s:s + n] for t in (query, key, value))
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                              enable_gqa=gqa).transpose(1, 2)

    with _sdpa_context():
        if all(len(r) == 1 for r in rows):  # one document per row: one call for the micro-batch
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling,
                                                 enable_gqa=gqa)
            return out.transpose(1, 2), None
        varlen = _varlen_for_short_docs(query) and not dropout
        outs = []
        for b, segs in enumerate(rows):
            run: list[tuple[int, int]] = []  # consecutive short documents, for one varlen call
            for s, n in segs + [(S, 0)]:  # a sentinel closes the last run
                if varlen and n and _through_varlen(n):
                    run.append((s, n))
                    continue
                if run:
                    outs.append(_varlen_run(query, key, value, b, run, scaling))
                    run = []
                if n:
                    outs.append(sdpa(b, s, n))
    return torch.cat(outs, dim=1).view(B, S, Hq, value.shape[-1]), None


def _varlen_for_short_docs(query: torch.Tensor) -> bool:
    return (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(query.device) >= (8, 0) and torch_varlen_attn() is not None)


def _varlen_run(query, key, value, b: int, run: list[tuple[int, int]], scaling) -> torch.Tensor:
    """torch's varlen kernel over consecutive documents of row b: (1, tokens, H, D)."""
    start, end = run[0][0], run[-1][0] + run[-1][1]
    q, k, v = (t[b, :, start:end].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    lens = [n for _, n in run]
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(device=query.device, dtype=torch.int32)
    return call_varlen(_KERNEL or torch_varlen_attn(), q, k, v, cu, max(lens), scaling)[None]


# --------------------------------------------------------------------------------------------
# torch varlen_attn through transformers' AttentionInterface
# --------------------------------------------------------------------------------------------

def call_varlen(kernel: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                max_len: int, scale: float | None) -> torch.Tensor:
    """Causal varlen attention on (T, H, D) tensors, whatever varlen_attn's signature is.

    torch 2.10: varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=..., ...)
    torch 2.11+: varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, ..., window_size=(-1, -1), ...)
    where window_size=(-1, 0) is causal. GQA: enable_gqa where the kernel has it, else repeat k/v heads.
    """
    params = inspect.signature(kernel).parameters
    kw = {}
    if "is_causal" in params:
        kw["is_causal"] = True
    elif "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        raise RuntimeError(f"unsupported varlen_attn signature {inspect.signature(kernel)}: no is_causal or "
                           "window_size argument")
    if scale is not None:
        if "scale" in params:
            kw["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
            raise RuntimeError("this varlen_attn has no scale argument and the model's scaling is not 1/sqrt(d)")
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = kernel(q, k, v, cu, cu, max_len, max_len, **kw)
    return out[0] if isinstance(out, tuple) else out


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Segment starts wherever the position restarts at 0 (every row starts one), over the flattened batch."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1).to(torch.int32)
    cu = torch.cat([starts, torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)])
    return cu, int(cu.diff().max())


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: (B, H, S, D) in, (B, S, H, D) out."""
    return _varlen_forward(_KERNEL or torch_varlen_attn(), VARLEN_NAME, query, key, value, attention_mask, dropout,
                           scaling, kwargs)


def fa4_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The same over flash-attention-4's kernels (longctx.fa4)."""
    from .fa4 import varlen_kernel

    return _varlen_forward(varlen_kernel, FA4, query, key, value, attention_mask, dropout, scaling, kwargs)


def _varlen_forward(kernel: Callable, name: str, query, key, value, attention_mask, dropout, scaling,
                    kwargs: dict) -> tuple[torch.Tensor, None]:
    if attention_mask is not None:
        raise RuntimeError(f"{name} takes no attention mask; packing is expressed by cu_seq_lens")
    if dropout:
        raise RuntimeError(f"{name} does not implement attention dropout")
    B, Hq, S, D = query.shape
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or max_len is None:
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(S, device=query.device).expand(B, S)
        cu, max_len = cu_seqlens_from_position_ids(pos.expand(B, S))
    q = query.transpose(1, 2).reshape(B * S, Hq, D)
    k = key.transpose(1, 2).reshape(B * S, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * S, value.shape[1], value.shape[-1])
    out = call_varlen(kernel, q, k, v, cu.to(device=q.device, dtype=torch.int32), int(max_len), scaling)
    return out.view(B, S, Hq, out.shape[-1]), None


def register_varlen(kernel: Callable | None = None) -> str:
    """Register longctx_varlen with transformers. `kernel` replaces torch's varlen_attn (tests use a
    pure-PyTorch reference with either signature to check this path on CPU)."""
    global _KERNEL
    from transformers import AttentionInterface

    _KERNEL = kernel
    AttentionInterface.register(VARLEN_NAME, varlen_attention_forward)
    return VARLEN_NAME


def model_kwargs(batch: dict, impl: str | None, device: torch.device) -> dict:
    """The attention kwargs of one collated micro-batch for the kernel `impl` (None: the kernel takes none).
    SDPA per document slices on the host, so its boundaries stay there (no device sync per layer); varlen
    kernels need them on the device."""
    if impl is None:
        return {}
    cu = batch["cu_seq_lens"]
    if impl != SDPA_PER_DOC:
        cu = cu.to(device=device, non_blocking=True)
    m = int(batch["max_length"])
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m}
