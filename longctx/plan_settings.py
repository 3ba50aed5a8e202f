"""The Setup of a run from its settings: the ds_config and the flags longctx.resolve decides (setup_from_settings
while deciding, setup_from_resolved once decided), and how those settings read in the run header and the plan.
"""

from __future__ import annotations

from typing import Optional

from .flops import ModelShape
from .plan_types import Setup


def kept_attention_label(keep: bool, by: str) -> str:
    """What the checkpointing line of the run header and the plan adds for kept attention."""
    return (", attention kept" + (" (replayed)" if by == "replay" else "")) if keep else ""


# ---- from the resolved settings ------------------------------------------------------------------------
def setup_from_settings(*, shape: ModelShape, seq_len: int, micro_batch: int, world: int, ds_config: dict,
                        precision: str, checkpointing: str, offload_impl: str, reentrant: bool,
                        num_offloaded_layers: int, keep_attention: bool, liger: bool, tiled_loss: bool, attention: str, sp: int,
                        tiled_mlp_shards: int, tied_embeddings: bool, keep_attention_by: str = "selective") -> Setup:
    """The Setup of what longctx.trainer builds from these settings (longctx.resolve calls this while deciding;
    `setup_from_resolved` once decided)."""
    zero = ds_config.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0) or 0)

    def offloaded(sec: str) -> bool:
        d = zero.get(sec) or {}
        return isinstance(d, dict) and d.get("device") not in (None, "none")

    pin = any(bool((zero.get(sec) or {}).get("pin_memory", False)) for sec in ("offload_param", "offload_optimizer"))
    return Setup(shape=shape, seq_len=seq_len, micro_batch=micro_batch, world=world, zero_stage=stage,
                 offload_params=stage == 3 and offloaded("offload_param"),
                 offload_optimizer=offloaded("offload_optimizer"),
                 pin_memory=pin or not (offloaded("offload_param") or offloaded("offload_optimizer")),
                 precision=precision, checkpointing=checkpointing, offload_impl=offload_impl, reentrant=reentrant,
                 num_offloaded_layers=num_offloaded_layers, keep_attention=keep_attention,
                 keep_attention_by=keep_attention_by, loss="liger" if liger else ("chunked" if tiled_loss
                                                                                         else "full"),
                 liger_kernels=liger, attention=attention, sp=sp, tiled_mlp_shards=tiled_mlp_shards,
                 tied_embeddings=tied_embeddings, head_gathered_throughout=True,
                 reduce_bucket_size=int(zero.get("reduce_bucket_size") or 0),
                 prefetch_bucket_size=int(zero.get("stage3_prefetch_bucket_size") or 0),
                 overlap_comm=bool(zero.get("overlap_comm", stage > 0)),
                 sub_group_size=int(zero.get("sub_group_size", Setup.sub_group_size)),
                 optimizer_ratio=float((zero.get("offload_optimizer") or {}).get("ratio", 1.0)),
                 # train.py's ZeRO-3 optimizer (longctx.zero3_optimizer) empties the pinned cache once built
                 pinned_cache_released=stage == 3 and (offloaded("offload_param") or offloaded("offload_optimizer")),
                 grad_accum_dtype=dtype_name((ds_config.get("data_types") or {}).get("grad_accum_dtype")))


def dtype_name(ds_dtype) -> Optional[str]:
    """A DeepSpeed dtype spelling (runtime/config.py DtypeEnum: "bf16", "bfloat16", "torch.float32", ...) as one of
    PRECISIONS; None for None."""
    if ds_dtype is None:
        return None
    names = {"fp16": ("fp16", "float16", "half"), "fp32": ("fp32", "float32", "float"), "bf16": ("bf16", "bfloat16")}
    key = str(ds_dtype).lower().removeprefix("torch.")
    found = next((n for n, spellings in names.items() if key in spellings), None)
    if found is None:
        raise ValueError(f"data_types.grad_accum_dtype {ds_dtype!r} is not one of {sorted(names)}")
    return found


def setup_from_resolved(settings, cfg, model_config) -> Setup:
    """The Setup of a run: its resolved settings (longctx.resolve.Resolved) and its length and batch."""
    tied = model_config.get("tie_word_embeddings", False) if isinstance(model_config, dict) else \
        getattr(model_config, "tie_word_embeddings", False)
    return setup_from_settings(
        shape=ModelShape.from_config(model_config), seq_len=cfg.max_seq_len, micro_batch=cfg.micro_batch_size,
        world=settings.world, ds_config=settings.ds_config, precision=settings.precision,
        checkpointing=settings.checkpointing, offload_impl=settings.offload_impl, reentrant=settings.reentrant,
        num_offloaded_layers=settings.num_offloaded_layers, keep_attention=settings.keep_attention,
        keep_attention_by=settings.keep_attention_by,
        liger=settings.liger, tiled_loss=settings.tiled_loss,
        attention=attention_kind(settings.attention, cfg.packing), sp=settings.sequence_parallel,
        tiled_mlp_shards=settings.tiled_mlp_shards, tied_embeddings=bool(tied))


def attention_kind(name: str, packing: bool) -> str:
    """Memory class of an attention choice (longctx.resolve's names)."""
    if name == "eager":
        return "eager"
    if name == "sdpa" and packing:
        return "dense_mask"
    if name == "fa4":
        return "fa4"
    return "flash"  # sdpa_per_doc, varlen, flash_attention_2, SDPA without a mask: O(S)
