"""flash-attention-4 (the `flash-attn-4` package: CuTe DSL kernels, compiled at first use) as torch custom ops.

Why: on an H100 (torch 2.11, cuDNN 9.19, fwd + bwd, 32/8 heads, 128K rows; `python -m bench.attention_kernels OUT
--fa4`, docs/RESULTS.md) its varlen kernel ran 625 TFLOP/s on one 128K document against 542 for SDPA's cuDNN, and
twice the default's speed on rows packed with Python-stdlib document lengths (470-578 against 262-305), where
SDPA per document sends most documents to torch's varlen_attn. Its lengths need no per-length plan (its first call
on new lengths costs what the next does), and its error against an fp32 reference equals the default's.

Why custom ops and not the package's autograd Function: its kernels are launched outside torch's dispatcher, so
selective checkpointing (longctx.selective) and the replay (longctx.attention_replay) could not see them, and
attention would be recomputed in backward. As an op, `longctx::fa4_varlen_fwd` is dispatched like torch's own
varlen_attn: its outputs (the attention output and the log-sum-exp backward needs, always computed) can be kept.

The package is optional (not a dependency). It runs on sm90+ GPUs (its backward's requirement) in half precision;
`auto` takes it on sm90 only, the architecture measured: through train.py on an H100 (8B shape at 8 layers) its
step was 1.01-1.09x the default's from 16K to 128K and 1.06x on packed real text, with the same peaks
(bench/results/2026-12-05_h100_1xgpu-8b-8L-fa4.json). The kernels' entry points (`_flash_attn_fwd`,
`_flash_attn_bwd`) are the ones its own autograd Function calls; they are private, so `auto` takes only the version
measured (MEASURED_VERSION), and `--attn-implementation fa4` names another in the resolved note.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch

from .gpu_extras import FA4_VERSION

MEASURED_VERSION = FA4_VERSION  # pinned in one place: also what `make` installs on an sm90 GPU


def installed_version() -> str | None:
    """flash-attn-4's version where its kernels import (flash_attn.cute), else None."""
    try:  # finding a submodule imports the package: a broken install must not stop the probe
        if importlib.util.find_spec("flash_attn.cute") is None:
            return None
        return importlib.metadata.version("flash-attn-4")
    except Exception:  # noqa: BLE001
        return None


@torch.library.custom_op("longctx::fa4_varlen_fwd", mutates_args=())
def fa4_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over the documents cu delimits: (T, H, D) q, (T, Hkv, D) k and v (GQA by head groups);
    returns the output (T, H, Dv) and the log-sum-exp (H, T) in fp32."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                   max_seqlen_k=max_len, softmax_scale=scale, causal=True, return_lse=True)
    return out, lse


@fa4_varlen_fwd.register_fake
def _(q, k, v, cu, max_len, scale):
    return q.new_empty(*q.shape[:2], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("longctx::fa4_varlen_bwd", mutates_args=())
def fa4_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, cu: torch.Tensor, max_len: int,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, scale, True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                 max_seqlen_q=max_len, max_seqlen_k=max_len)[:3]
    return dq, dk, dv


@fa4_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu, max_len, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu, max_len, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu)
    ctx.max_len, ctx.scale = max_len, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    dq, dk, dv = fa4_varlen_bwd(dout.contiguous(), q, k, v, out, lse, cu, ctx.max_len, ctx.scale)
    return dq, dk, dv, None, None, None


fa4_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


def varlen_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  max_q: int, max_k: int, *, is_causal: bool = True, scale: float | None = None,
                  enable_gqa: bool = True) -> torch.Tensor:
    """torch varlen_attn's calling convention (what longctx.attention.call_varlen passes) over the custom op."""
    if not is_causal:
        raise RuntimeError("longctx's flash-attention-4 path is causal only")
    if max_q != max_k or (cu_k is not cu_q and not torch.equal(cu_q, cu_k)):  # call_varlen passes one cu twice
        raise RuntimeError("longctx's flash-attention-4 path is self-attention only (cu_seqlens_q == cu_seqlens_k)")
    out, _ = fa4_varlen_fwd(q, k, v, cu_q, int(max_q), float(scale if scale is not None else q.shape[-1] ** -0.5))
    return out
