"""Sequence parallelism (DeepSpeed Ulysses, from Arctic Long Sequence Training) plus tiled MLP and tiled loss.

With --sequence-parallel N, the ranks form groups of N consecutive ranks; the N ranks of a group train on
the same rows, each holding a 1/N slice of the sequence. Everything outside attention is per token, so a
rank runs embeddings, norms, MLPs and the loss on its slice alone. Attention is wrapped by DeepSpeed's
`UlyssesSPAttentionHF` (registered through `register_with_transformers`): an all-to-all turns
"my tokens, all heads" into "all tokens, my heads" (so the query heads must divide by N), the core
attention runs on the full sequence, and a second all-to-all turns it back.

What this module adds around DeepSpeed's pieces, and why:

* Data: the batch plan is made over the data-parallel groups (world / N of them), so the N ranks of a group
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
* Tiled MLP: DeepSpeed's `TiledMLP` runs a decoder MLP over ceil(seq / hidden) chunks of the sequence and
  recomputes each chunk in backward, so the [seq x intermediate] activations exist one chunk at a time.
  The chunk count is agreed across all ranks (all-reduce max): under ZeRO-3 every chunk gathers the MLP
  weights collectively, so ranks must make the same number of calls.
* Tiled loss: the LM head + cross-entropy run chunk by chunk without a [tokens x vocab] logits tensor; this
  is modeling.LinearCrossEntropySum (or Liger's fused kernel). DeepSpeed's `TiledFusedLogitsLoss` is not
  used: it accumulates lm_head.weight's gradient inside forward with an implied upstream gradient of 1, so
  any later scaling of the loss (DeepSpeed's 1/grad_accum, the fp16 loss scale, train.py's 1/N) reaches
  the input gradient but not the weight's. `--no-tiled-loss` computes full logits (ablation / reference).
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import LongctxError
from .modeling import HEAD_CHUNK_TOKENS, CausalLMWithLoss, LinearCrossEntropySum
from .plan import resolve_tiled_mlp  # the --tiled-mlp rule (pure: shared with the planner)

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
    """Where this rank sits (SP group of `size` consecutive ranks, data-parallel group `dp_rank` of
    `dp_world`) and the tiling choices: everything train.py asks of this module."""

    size: int
    rank: int  # rank inside the SP group
    dp_world: int
    dp_rank: int
    micro_batch_size: int = 1
    tiled_mlp: bool = False
    tiled_loss: bool = True
    grads_divided_by_world: bool = False  # set by ds_config(): how DeepSpeed averages this run's gradients

    @classmethod
    def make(cls, sp: int, rank: int, world: int, micro_batch_size: int = 1, **tiling: bool) -> "Layout":
        return cls(sp, rank % sp, world // sp, rank // sp, micro_batch_size, **tiling)

    @classmethod
    def from_config(cls, cfg, model_config, rank: int, world: int) -> "Layout":
        """Check --sequence-parallel against the world and the model (before anything expensive) and
        resolve --tiled-mlp auto."""
        check(cfg.sequence_parallel, world, model_config)
        text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        tiled_mlp = resolve_tiled_mlp(cfg.tiled_mlp, max_seq_len=cfg.max_seq_len, sp=cfg.sequence_parallel,
                                      hidden_size=text.hidden_size, micro_batch_size=cfg.micro_batch_size,
                                      intermediate_size=getattr(text, "intermediate_size", None))
        return cls.make(cfg.sequence_parallel, rank, world, cfg.micro_batch_size, tiled_mlp=tiled_mlp,
                        tiled_loss=cfg.tiled_loss)

    def core_attention(self, impl: str) -> str:
        return core_attention(impl, self.size)

    def prepare_model(self, model: CausalLMWithLoss, ds_config: dict, *, varlen: bool):
        """Tiled MLP, the loss head, and Ulysses around the core attention (after init_distributed and
        the model build). Returns (module to train, mpu for deepspeed.initialize or None)."""
        if self.tiled_mlp:
            enable_tiled_mlp(model.lm)
        zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
        model = wrap(model, sp=self.size, tiled_loss=self.tiled_loss, zero3=zero3)
        mpu = register_ulysses(model.lm, model.lm.config._attn_implementation, self.size,
                               1 if varlen else self.micro_batch_size)
        return model, mpu

    def describe(self, impl: str) -> str:
        return describe(self, self.tiled_mlp, self.tiled_loss, impl)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def loss_scale(self, grad_accum: int, n_targets: int) -> float:
        """Multiplier of a micro-batch's CE sum so that the step's gradient is d(sum CE / n_targets).
        DeepSpeed divides by grad_accum and sums the gradients of all ranks, then divides by world / N
        (no ZeRO, ZeRO-1/2) or by world (ZeRO-3's reduce-scatter); see ds_config()."""
        divisor = self.dp_world * self.size if self.grads_divided_by_world else self.dp_world
        return divisor * grad_accum / n_targets

    def collate(self, docs, rows, *, pad_id: int, packing: bool, max_seq_len: int, flatten: bool = False) -> dict:
        """data.collate, then this rank's slice (see shard_batch). Same signature and keys."""
        from . import data as data_mod

        batch = data_mod.collate(docs, rows, pad_id=pad_id, packing=packing, max_seq_len=max_seq_len,
                                 flatten=flatten)
        if not self.enabled:
            return batch
        return shard_batch(batch, self.size, self.rank, pad_id=pad_id,
                           rows=None if flatten else self.micro_batch_size)

    def ds_config(self, ds_config: dict) -> dict:
        """Add the SP size (zero.Init checks train_batch_size with it, having no mpu) and note how the
        gradients will be averaged. DeepSpeed 0.19 divides SP gradients by world / N everywhere except in
        ZeRO-3's reduce-scatter path, which divides by world; ZeRO-3 picks its other (contiguous) path per
        bucket when reduce_scatter is off, so under SP that setting is refused rather than mixed."""
        if not self.enabled:
            return ds_config
        ds_config["sequence_parallel_size"] = self.size
        zero = ds_config.get("zero_optimization", {}) or {}
        if zero.get("stage", 0) == 3:
            if zero.get("reduce_scatter", True) is False:
                raise LongctxError("--sequence-parallel with ZeRO-3 needs zero_optimization.reduce_scatter true "
                                   "(the default): with it off, DeepSpeed averages some gradient buckets over "
                                   "world / N ranks and others over all ranks")
            self.grads_divided_by_world = True
        return ds_config


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
    """The attention implementation to build the model with. Varlen kernels take the full cu_seq_lens and
    work as they are; SDPA/eager become longctx_sdpa_segments (DeepSpeed refuses eager, and drops masks)."""
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


# --------------------------------------------------------------------------------------------
# Tiled MLP
# --------------------------------------------------------------------------------------------

def agreed_shards(seq_len: int, hidden: int, device: torch.device) -> int:
    """ceil(seq / hidden), the maximum over all ranks (ZeRO-3 gathers per chunk, collectively)."""
    n = max(1, math.ceil(seq_len / hidden))
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        t = torch.tensor([n], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        n = int(t.item())
    return n


def _inner_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self._longctx_inner_forward(x)


def _tiled_forward(self, x: torch.Tensor) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    shards = self._longctx_shards or agreed_shards(x.shape[-2], x.shape[-1], x.device)
    return TiledMLP.apply(_inner_forward, self, x, shards, list(self.parameters()))


def decoder_mlps(lm) -> list[torch.nn.Module]:
    base = getattr(lm, getattr(lm, "base_model_prefix", "model"), lm)
    return [layer.mlp for layer in base.layers]


def _is_tiled(mlp) -> bool:
    return getattr(vars(mlp).get("forward"), "__func__", None) is _tiled_forward


def enable_tiled_mlp(lm, shards: int | None = None) -> int:
    """Run every decoder MLP through DeepSpeed's TiledMLP. The forward in place (the class's, or an instance
    patch such as Liger's SwiGLU applied to a live model) is what runs per chunk. `shards` fixes the count
    (tests); None agrees on ceil(seq / hidden) at every call."""
    mlps = decoder_mlps(lm)
    for mlp in mlps:
        mlp._longctx_shards = shards
        if not _is_tiled(mlp):
            mlp._longctx_inner_forward = mlp.forward
            mlp.forward = types.MethodType(_tiled_forward, mlp)
    return len(mlps)


def disable_tiled_mlp(lm) -> None:
    for mlp in decoder_mlps(lm):
        if _is_tiled(mlp):
            inner = mlp._longctx_inner_forward
            del mlp.forward
            if getattr(inner, "__func__", None) is not type(mlp).forward:
                mlp.forward = inner  # an instance patch that was there before
            del mlp._longctx_inner_forward


# --------------------------------------------------------------------------------------------
# The training module
# --------------------------------------------------------------------------------------------

class TrainingLM(CausalLMWithLoss):
    """CausalLMWithLoss with pre-shifted labels (a sequence slice cannot shift its own labels) and the
    choice of a tiled or a full-logits head. Returns the CE sum over the supervised tokens it holds."""

    def __init__(self, lm, fused_ce: bool = False, *, labels_shifted: bool = False, tiled_loss: bool = True):
        super().__init__(lm, fused_ce=fused_ce)
        self.labels_shifted = labels_shifted
        self.tiled_loss = tiled_loss

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                **attn_kwargs: Any) -> torch.Tensor:
        out = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **attn_kwargs)
        hidden = out.last_hidden_state
        if self.labels_shifted:
            h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        else:  # labels[t] is the target of the logits at t-1 (the Hugging Face convention)
            h, y = hidden[:, :-1, :].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)
        keep = (y != IGNORE).nonzero().view(-1)
        h, y = h.index_select(0, keep), y.index_select(0, keep)
        w = self.lm.lm_head.weight
        if self.fused_ce:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            return LigerFusedLinearCrossEntropyLoss(reduction="sum")(w, h, y)
        if self.tiled_loss:
            return LinearCrossEntropySum.apply(h, w, y, HEAD_CHUNK_TOKENS)
        logits = F.linear(h, w).to(torch.promote_types(h.dtype, torch.float32))  # fp32 at least, as transformers
        return F.cross_entropy(logits, y, reduction="sum")


def wrap(model: CausalLMWithLoss, *, sp: int, tiled_loss: bool, zero3: bool) -> CausalLMWithLoss:
    """The module to train: `model` itself when nothing changes, else a TrainingLM over the same lm."""
    if sp <= 1 and tiled_loss:
        return model
    if not tiled_loss and model.fused_ce:
        raise LongctxError("--no-tiled-loss needs Liger's fused cross-entropy off (--liger off): Liger's loss is "
                           "itself tiled")
    out = TrainingLM(model.lm, fused_ce=model.fused_ce, labels_shifted=sp > 1, tiled_loss=tiled_loss)
    if zero3:
        import deepspeed

        deepspeed.zero.register_external_parameter(out, out.lm.lm_head.weight)
    return out


def describe(layout: Layout, tiled_mlp: bool, tiled_loss: bool, impl: str) -> str:
    sp = (f"sequence parallel {layout.size} (Ulysses over {impl}; {layout.dp_world} data-parallel group"
          f"{'s' if layout.dp_world > 1 else ''})" if layout.enabled else "sequence parallel off")
    return f"{sp} | tiled MLP {'on' if tiled_mlp else 'off'} | tiled loss {'on' if tiled_loss else 'off'}"


__all__ = ["Layout", "TrainingLM", "check", "core_attention", "describe", "enable_tiled_mlp", "register_ulysses",
           "resolve_tiled_mlp", "shard_batch", "wrap"]
