"""Selective activation checkpointing: each decoder layer's attention output survives to its backward.

Plain checkpointing reruns the whole layer in backward, attention included. At long context attention is most
of a layer's FLOPs (65% of the strict FLOPs of the 8B shape at 128K), so the recompute costs about a third of a
step, while what attention's backward needs from its forward (the output and the log-sum-exp) is small: one
layer input's worth of bytes (tokens x heads x head_dim) plus 4 bytes per token and head. Keeping those and
recomputing only the projections, norms and MLP is the trade FlashAttention makes inside a layer, one level up.

This is PyTorch's own mechanism (torch.utils.checkpoint's selective checkpointing, as torchtitan uses it): a
policy marks the attention kernels' outputs MUST_SAVE, and the recompute takes them from the cache instead of
running the kernel. It needs non-reentrant checkpointing (the fork's offloader has both paths). The outputs stay
on the GPU; longctx.plan counts them and longctx.resolve keeps attention only where the plan fits.

Its price is host time: every op of the layer goes through the policy's Python dispatch mode, in forward and in
the recompute. bench/keep_attention_host.py measures it on a CPU, where a tiny model's step is all host time: 1.85x
the host time per layer of plain reentrant checkpointing (24.9 against 13.5 ms). longctx.attention_replay keeps the
same outputs with the mode around the attention call only (`--keep-attention-by replay`: 14.4 ms).
"""

from __future__ import annotations

# Attention kernels whose outputs are kept: what SDPA dispatches to (cuDNN, flash, memory-efficient, CPU flash),
# transformers' flash-attention-2 ops if present, and torch's varlen_attn custom op.
ATTENTION_OPS = frozenset({
    "aten._scaled_dot_product_cudnn_attention",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._flash_attention_forward",
    "aten._efficient_attention_forward",
    "aten._cudnn_attention_forward",
    "torch_attn._varlen_attn",
    "longctx.fa4_varlen_fwd",
    "flash_attn._flash_attn_forward",
    "flash_attn._flash_attn_varlen_forward",
})


def op_name(func) -> str:
    """'aten._scaled_dot_product_cudnn_attention' for the OpOverload aten._scaled_dot_product_cudnn_attention.default."""
    schema = getattr(func, "_schema", None)
    return schema.name.replace("::", ".") if schema is not None else str(func)


def is_attention_op(func) -> bool:
    return op_name(func) in ATTENTION_OPS


def _policy(ctx, func, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if is_attention_op(func) else CheckpointPolicy.PREFER_RECOMPUTE


def context_fn():
    """torch.utils.checkpoint's `context_fn`: attention outputs saved, everything else recomputed."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_policy)


def checkpoint_kwargs() -> dict:
    """activation_checkpointing_kwargs for transformers / the fork (non-reentrant: selective checkpointing's need)."""
    return {"use_reentrant": False, "context_fn": context_fn}
