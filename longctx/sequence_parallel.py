"""Sequence parallelism (DeepSpeed Ulysses, from Arctic Long Sequence Training) and the tiled loss it relies on.

With --sequence-parallel N, the ranks form groups of N consecutive ranks; the N ranks of a group train on
the same rows, each holding a 1/N slice of the sequence. Everything outside attention is per token, so a
rank runs embeddings, norms, MLPs and the loss on its slice alone. Attention is wrapped by DeepSpeed's
`UlyssesSPAttentionHF` (registered through `register_with_transformers`): an all-to-all turns
"my tokens, all heads" into "all tokens, my heads" (so the query heads must divide by N), the core
attention runs on the full sequence, and a second all-to-all turns it back.

What this module adds around DeepSpeed's pieces, and why:

* Data: the batch schedule is made over the data-parallel groups (world / N of them), so the N ranks of a group
  collate the same rows and each keeps its slice (`Layout.collate`). No gather is needed, unlike
  `UlyssesSPDataLoaderAdapter`, which exchanges samples between ranks because each rank reads its own;
  the slicing itself follows the adapter: rows are padded to a multiple of N (label -100, positions
  restarting at 0 so the padding is its own document), the labels are shifted *before* slicing (its
  `shift_labels`: the target of a slice's last token is the first token of the next slice), then every
  tensor is cut on the sequence dimension.
* Packing: the core attention receives the full sequence's position_ids (Ulysses all-gathers them), and the
  varlen metadata (cu_seq_lens, max_length) passed to the model is the full padded row's, so documents stay
  separated after the all-to-all. For SDPA (CPU, V100) the Ulysses wrapper drops the attention mask, and
  transformers' SDPA would then attend across documents; the core used instead, `longctx_sdpa_segments`,
  rebuilds the block-diagonal causal mask from the full position_ids (or runs plain causal SDPA when every
  row is one document).
* Loss: each rank returns the cross-entropy *sum* over its slice's supervised tokens; train.py divides by the
  supervised-token count of the whole global batch. Summed over the group this is the unsharded loss,
  weighted by token counts (not a mean of per-rank means), and gradients from other ranks' tokens come back
  through the all-to-all's backward. DeepSpeed reduces gradients over all ranks and divides by
  world / N, so the per-micro-batch scale uses the data-parallel world size (`Layout.loss_scale`).
* Tiled MLP (chunks of the sequence through DeepSpeed's TiledMLP) lives in longctx.tiled_mlp.
* Tiled loss: the LM head + cross-entropy run chunk by chunk without a [tokens x vocab] logits tensor; this
  is modeling.LinearCrossEntropySum (or Liger's fused kernel). DeepSpeed's `TiledFusedLogitsLoss` is not
  used: it accumulates lm_head.weight's gradient inside forward with an implied upstream gradient of 1, so
  any later scaling of the loss (DeepSpeed's 1/grad_accum, the fp16 loss scale, train.py's 1/N) reaches
  the input gradient but not the weight's. `--no-tiled-loss` computes full logits (ablation / reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import batching
from .errors import LongctxError

IGNORE = -100
SEGMENT_SDPA = "longctx_sdpa_segments"


# --------------------------------------------------------------------------------------------
# Checks (before anything expensive) and the rank layout
# --------------------------------------------------------------------------------------------

def check(sp: int, world: int, model_config) -> None:
    """Refuse an SP size that cannot work, with the reason; called before any model or process group."""
    if sp < 1:
        raise LongctxError(f"--sequence-parallel must be >= 1, got {sp}")
    if sp == 1:
        return
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads, kv = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    problems = []
    if world % sp:
        problems.append(f"the world size {world} is not divisible by --sequence-parallel {sp} (SP groups are "
                        f"{sp} consecutive ranks; launch a multiple of {sp} processes)")
    if heads % sp:
        divisors = [d for d in range(2, heads + 1) if heads % d == 0 and world % d == 0]
        problems.append(f"the model's {heads} query heads are not divisible by --sequence-parallel {sp}: Ulysses "
                        f"gives every rank of the group heads/N whole heads. Use an SP size that divides {heads}"
                        + (f" (with this world size: {', '.join(map(str, divisors))})" if divisors else ""))
    if kv % sp and sp % kv:
        problems.append(f"the model's {kv} key/value heads and --sequence-parallel {sp} do not divide one "
                        "another (Ulysses splits or replicates KV heads)")
    if problems:
        raise LongctxError("--sequence-parallel: " + "; ".join(problems))


@dataclass
class Layout:
    """Where this rank sits: in an SP group of `size` consecutive ranks (rank `rank` inside it), and in data-parallel
    group `dp_rank` of `dp_world`. The trainer asks it how to slice a batch and scale a micro-batch's loss."""

    size: int
    rank: int  # rank inside the SP group
    dp_world: int
    dp_rank: int
    micro_batch_size: int = 1
    grads_divided_by_world: bool = False  # how DeepSpeed averages this run's gradients (see for_run)

    @classmethod
    def make(cls, sp: int, rank: int, world: int, micro_batch_size: int = 1,
             grads_divided_by_world: bool = False) -> "Layout":
        return cls(sp, rank % sp, world // sp, rank // sp, micro_batch_size, grads_divided_by_world)

    @classmethod
    def for_run(cls, sp: int, rank: int, world: int, micro_batch_size: int, ds_config: dict) -> "Layout":
        """The layout of a run, and how its gradients will be averaged. DeepSpeed 0.19 divides SP gradients by
        world / N everywhere except in ZeRO-3's reduce-scatter path, which divides by world; ZeRO-3 picks its other
        (contiguous) path per bucket when reduce_scatter is off, so under SP that setting is refused rather than
        mixed."""
        zero = ds_config.get("zero_optimization", {}) or {}
        by_world = False
        if sp > 1 and zero.get("stage", 0) == 3:
            if zero.get("reduce_scatter", True) is False:
                raise LongctxError("--sequence-parallel with ZeRO-3 needs zero_optimization.reduce_scatter true "
                                   "(the default): with it off, DeepSpeed averages some gradient buckets over "
                                   "world / N ranks and others over all ranks")
            by_world = True
        return cls.make(sp, rank, world, micro_batch_size, by_world)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def loss_scale(self, grad_accum: int, n_targets: int) -> float:
        """Multiplier of a micro-batch's CE sum so that the step's gradient is d(sum CE / n_targets).
        DeepSpeed divides by grad_accum and sums the gradients of all ranks, then divides by world / N
        (no ZeRO, ZeRO-1/2) or by world (ZeRO-3's reduce-scatter); see for_run()."""
        divisor = self.dp_world * self.size if self.grads_divided_by_world else self.dp_world
        return divisor * grad_accum / n_targets

    def collate(self, docs, rows, *, pad_id: int, packing: bool, max_seq_len: int, flatten: bool = False) -> dict:
        """batching.collate, then this rank's slice (see shard_batch). Same signature and keys."""
        batch = batching.collate(docs, rows, pad_id=pad_id, packing=packing, max_seq_len=max_seq_len,
                                 flatten=flatten)
        if not self.enabled:
            return batch
        return shard_batch(batch, self.size, self.rank, pad_id=pad_id,
                           rows=None if flatten else self.micro_batch_size)

    def describe(self) -> str:
        if not self.enabled:
            return "sequence parallel off"
        return (f"sequence parallel {self.size} (Ulysses; {self.dp_world} data-parallel group"
                f"{'s' if self.dp_world > 1 else ''})")


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

def shard_batch(batch: dict, sp: int, sp_rank: int, *, pad_id: int, rows: int | None = None) -> dict:
    """One rank's slice of a collated batch.

    Pads the rows to `rows` (the Ulysses wrapper is built for a fixed micro-batch size; extra rows are
    padding with no targets) and the length to a multiple of sp; shifts the labels (labels[t] becomes the
    target of token t) and cuts input_ids, labels, position_ids on the sequence dimension. cu_seq_lens and
    max_length describe the full padded rows, as the core attention sees them after the all-to-all.
    n_targets is this slice's count, so sums over the group add up to the row's.
    """
    from .attention import cu_seqlens_from_position_ids

    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    B, L = ids.shape
    extra_rows = max(0, (rows or B) - B)
    pad_len = (-L) % sp
    if extra_rows or pad_len:
        def grow(t, fill):
            out = torch.full((B + extra_rows, L + pad_len), fill, dtype=t.dtype)
            out[:B, :L] = t
            return out
        ids, labels = grow(ids, pad_id), grow(labels, IGNORE)
        new_pos = grow(pos, 0)
        new_pos[:B, L:] = torch.arange(pad_len)  # the padding tail is its own segment
        new_pos[B:, :] = torch.arange(L + pad_len)
        pos = new_pos
    shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    n = ids.shape[1] // sp
    cut = slice(sp_rank * n, (sp_rank + 1) * n)
    cu, max_len = cu_seqlens_from_position_ids(pos)
    out = dict(batch)
    out.update(input_ids=ids[:, cut].contiguous(), labels=shifted[:, cut].contiguous(),
               position_ids=pos[:, cut].contiguous(), cu_seq_lens=cu, max_length=max_len,
               n_targets=int((shifted[:, cut] != IGNORE).sum()), labels_shifted=True)
    return out


# --------------------------------------------------------------------------------------------
# Core attention for SDPA under Ulysses: the block-diagonal mask from the full position_ids
# --------------------------------------------------------------------------------------------

def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of every token: a new document starts wherever the position is 0."""
    return (position_ids == 0).cumsum(dim=-1)


def segment_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: float | None = None, **kwargs):
    """transformers attention-interface function. Causal SDPA where the rows are single documents,
    else SDPA with a dense block-diagonal causal mask (short rows only: --dense-mask-max-len)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    pos = kwargs.get("position_ids")
    S = query.shape[2]
    if pos is None:
        raise RuntimeError(f"{SEGMENT_SDPA} needs position_ids to find the documents of a packed row")
    pos = pos.expand(query.shape[0], S)
    if bool((pos == torch.arange(S, device=pos.device)).all()):
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=True, **kwargs)
    seg = segment_ids(pos)
    causal = torch.ones(S, S, dtype=torch.bool, device=query.device).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    return sdpa_attention_forward(module, query, key, value, mask[:, None], dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)


def core_attention(impl: str, sp: int) -> str:
    """The attention implementation to build the model with. Varlen kernels and SDPA per document take the full
    cu_seq_lens and work as they are; upstream's SDPA/eager become longctx_sdpa_segments (DeepSpeed refuses eager,
    and drops masks)."""
    if sp <= 1 or impl not in ("sdpa", "eager"):
        return impl
    from transformers import AttentionInterface

    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_forward)
    return SEGMENT_SDPA


def register_ulysses(lm, core_impl: str, sp: int, micro_batch_size: int):
    """Wrap the core attention with DeepSpeed's Ulysses and create the SP groups; returns the mpu for
    deepspeed.initialize (None when sp == 1). Needs torch.distributed initialized; call once per process."""
    if sp <= 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=lm, core_attn_implementation=core_impl, sequence_parallel_size=sp,
        micro_batch_size=micro_batch_size, seq_length_is_variable=True)


__all__ = ["Layout", "check", "core_attention", "register_ulysses", "shard_batch"]
