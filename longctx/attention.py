"""Attention backend: choose one, and register PyTorch's varlen FlashAttention with transformers.

Choice for --attn-implementation auto:
  * CUDA sm80+ with the flash-attn package: "flash_attention_2" (transformers' own integration);
  * CUDA sm80+ otherwise: "longctx_varlen", i.e. torch.nn.attention.varlen.varlen_attn registered
    through transformers.AttentionInterface;
  * CUDA sm70 (V100) and CPU: "sdpa". Without packing it runs causal SDPA with no mask (the
    memory-efficient kernel on sm70). With packing, transformers builds a dense block-diagonal
    S x S mask from the position_ids: allowed only up to --dense-mask-max-len (short CPU/test rows),
    refused beyond it.

Varlen paths get cu_seq_lens_q/k and max_length_q/k (transformers' flash-attention kwargs, see
modeling_flash_attention_utils._flash_attention_forward) from the collator, flattened over the
micro-batch, so packed documents never attend to each other and no mask is ever built: an
implementation name that has no entry in transformers' mask interface makes create_causal_mask
return None.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import LongctxError

VARLEN_NAME = "longctx_varlen"
_KERNEL: Callable | None = None  # what longctx_varlen calls; torch's varlen_attn unless a test swaps it


@dataclass
class Device:
    kind: str  # "cuda" or "cpu"
    capability: tuple[int, int] | None
    name: str

    @classmethod
    def detect(cls) -> "Device":
        if torch.cuda.is_available():
            return cls("cuda", torch.cuda.get_device_capability(), torch.cuda.get_device_name())
        return cls("cpu", None, "cpu")

    @property
    def sm80(self) -> bool:
        return self.kind == "cuda" and self.capability >= (8, 0)


@dataclass
class AttentionChoice:
    impl: str  # the name given to transformers (config._attn_implementation)
    varlen_kwargs: bool  # pass cu_seq_lens_* / max_length_* to the model forward
    note: str


def torch_varlen_attn() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose(requested: str, device: Device, *, precision: str, packing: bool, max_seq_len: int,
           dense_mask_max_len: int) -> AttentionChoice:
    half = precision in ("bf16", "fp16")
    if requested == "auto":
        if device.sm80 and half and flash_attn_installed():
            requested = "flash_attention_2"
        elif device.sm80 and half and torch_varlen_attn() is not None:
            requested = "varlen"
        else:
            requested = "sdpa"
    if requested == "flash_attention_2":
        if not flash_attn_installed():
            raise LongctxError("--attn-implementation flash_attention_2 is unavailable: the flash-attn package "
                               "is not installed (use auto, varlen or sdpa)")
        if not device.sm80 or not half:
            raise LongctxError("--attn-implementation flash_attention_2 needs a CUDA GPU of sm80+ and bf16/fp16 "
                               f"(device: {device.name}, precision: {precision})")
        return AttentionChoice("flash_attention_2", True, "flash-attn varlen (packed documents via cu_seqlens)")
    if requested == "varlen":
        if torch_varlen_attn() is None:
            raise LongctxError(f"--attn-implementation varlen is unavailable: torch {torch.__version__} has no "
                               "torch.nn.attention.varlen.varlen_attn (needs torch >= 2.10)")
        if not device.sm80 or not half:
            raise LongctxError("--attn-implementation varlen is unavailable here: PyTorch's varlen FlashAttention "
                               f"needs a CUDA GPU of sm80+ and bf16/fp16 (device: {device.name}, "
                               f"precision: {precision})")
        register_varlen()
        return AttentionChoice(VARLEN_NAME, True, "torch.nn.attention.varlen.varlen_attn (packed via cu_seqlens)")
    # sdpa / eager: a dense mask is built for packed rows (sdpa) or always (eager's S x S scores)
    dense = requested == "eager" or packing
    if dense and max_seq_len > dense_mask_max_len:
        why = ("eager attention materializes S x S scores" if requested == "eager" else
               "packing with SDPA needs a dense block-diagonal S x S mask")
        raise LongctxError(
            f"refusing to build a dense {max_seq_len:,} x {max_seq_len:,} attention mask: {why} "
            f"(--dense-mask-max-len {dense_mask_max_len:,}). Use a varlen backend (sm80+ GPU: "
            "--attn-implementation auto/varlen/flash_attention_2), or --no-packing with SDPA, or a shorter "
            "--max-seq-len.")
    note = {"sdpa": "SDPA, causal, no mask" if not packing else "SDPA with a block-diagonal mask (short rows)",
            "eager": "eager (reference) attention"}[requested]
    return AttentionChoice(requested, False, note)


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
    if attention_mask is not None:
        raise RuntimeError(f"{VARLEN_NAME} takes no attention mask; packing is expressed by cu_seq_lens")
    if dropout:
        raise RuntimeError(f"{VARLEN_NAME} does not implement attention dropout")
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
    kernel = _KERNEL or torch_varlen_attn()
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


def model_kwargs(batch: dict, choice: AttentionChoice, device: torch.device) -> dict:
    """The attention-related forward kwargs for one collated micro-batch."""
    if not choice.varlen_kwargs:
        return {}
    cu = batch["cu_seq_lens"].to(device=device, non_blocking=True)
    m = int(batch["max_length"])
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m}
