"""The types every plan module shares: what a plan is asked about (Setup) and what it answers (Item, Plan), with the
size units and the fit-check constants (the machine a plan is checked against is longctx.facts.Facts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .flops import ModelShape

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Fit check, outside what torch reports as allocated: the CUDA context (driver, kernels, NCCL) and
# allocator slack between reserved and allocated (expandable segments keep it small).
CUDA_CONTEXT_BYTES = 0.75 * GiB
ALLOCATOR_SLACK = 0.08
# Host RAM usable by training: the rest is the OS, page cache for the data, other processes.
HOST_USABLE = 0.90

CHECKPOINTING = ("none", "plain", "offload")
OFFLOAD_IMPLS = ("fork", "upstream")
KEEP_ATTENTION_BY = ("selective", "replay")
LOSSES = ("full", "chunked", "liger", "none")
ATTENTIONS = ("flash", "fa4", "dense_mask", "eager")
PRECISIONS = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Setup:
    """Everything the memory of a step depends on. Tokens per rank = micro_batch x seq_len / sp."""
    shape: ModelShape
    seq_len: int
    micro_batch: int = 1
    world: int = 1
    zero_stage: int = 3
    offload_params: bool = True
    offload_optimizer: bool = True
    pin_memory: bool = True
    optimizer: str = "adamw"             # "adamw" | "none" (forward+backward only, grads kept: a benchmark)
    precision: str = "bf16"
    checkpointing: str = "plain"         # none | plain (checkpoints on GPU) | offload (in pinned host RAM)
    offload_impl: str = "fork"           # fork (offload_gradient_checkpointing_enable) | upstream (save_on_cpu)
    reentrant: bool = True               # torch.utils.checkpoint use_reentrant (train.py: True unless attention is kept)
    num_offloaded_layers: Optional[int] = None   # None: all layers
    keep_attention: bool = False         # attention outputs kept on the GPU through the recompute
    keep_attention_by: str = "selective"  # selective (torch's, non-reentrant) | replay (longctx.attention_replay)
    loss: str = "chunked"                # full (HF: fp32 logits) | chunked (longctx) | liger (fused) | none
    liger_kernels: bool = False          # Liger RMSNorm / RoPE / SwiGLU
    tiled_mlp_shards: int = 1
    attention: str = "flash"             # flash: O(S) (flash, varlen, SDPA mem-efficient) | fa4 | dense_mask | eager
    sp: int = 1                          # sequence-parallel degree (Ulysses)
    lm_head: bool = True                 # False: the decoder stack only (a benchmark)
    tied_embeddings: bool = False
    head_gathered_throughout: bool = True  # ZeRO-3 external parameter (train.py) vs only inside the loss call
    reduce_bucket_size: int = 0          # elements; 0: hidden^2 (the "auto" value)
    prefetch_bucket_size: int = 0        # elements; 0: 0.9 hidden^2
    overlap_comm: bool = True
    sub_group_size: int = 1_000_000_000  # ZeRO-3 elements per optimizer sub-group (DeepSpeed's default, our configs')
    optimizer_ratio: float = 1.0         # offload_optimizer.ratio: the CPU share of the sub-groups (the rest: GPU)
    pinned_cache_released: bool = False  # torch's cached pinned blocks emptied after init (train.py's ZeRO-3)
    grad_accum_dtype: Optional[str] = None  # ds_config data_types.grad_accum_dtype; None: the precision (DeepSpeed's)
    data_bytes: int = 0                  # the training data's resident part per rank (longctx.data.DataBundle)

    def __post_init__(self):
        problems = []
        if self.seq_len < 1 or self.micro_batch < 1 or self.world < 1 or self.sp < 1 or self.tiled_mlp_shards < 1:
            problems.append("seq_len, micro_batch, world, sp and tiled_mlp_shards must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"zero_stage {self.zero_stage} not in 0..3")
        for name, value, allowed in (("checkpointing", self.checkpointing, CHECKPOINTING),
                                     ("offload_impl", self.offload_impl, OFFLOAD_IMPLS),
                                     ("loss", self.loss, LOSSES), ("attention", self.attention, ATTENTIONS),
                                     ("precision", self.precision, tuple(PRECISIONS)),
                                     ("optimizer", self.optimizer, ("adamw", "none")),
                                     ("grad_accum_dtype", self.grad_accum_dtype, (None,) + tuple(PRECISIONS))):
            if value not in allowed:
                problems.append(f"{name}={value!r} not in {allowed}")
        if not 0.0 <= self.optimizer_ratio <= 1.0:
            problems.append(f"optimizer_ratio {self.optimizer_ratio} not in [0, 1]")
        if self.offload_params and self.zero_stage != 3:
            problems.append("offload_params needs ZeRO stage 3")
        if self.keep_attention and self.checkpointing == "none":
            problems.append("keep_attention needs checkpointing")
        if self.keep_attention and self.keep_attention_by == "selective" and self.reentrant:
            problems.append("keep_attention by selective checkpointing needs non-reentrant checkpointing")
        if self.keep_attention_by not in KEEP_ATTENTION_BY:
            problems.append(f"keep_attention_by={self.keep_attention_by!r} not in {KEEP_ATTENTION_BY}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def act_bytes(self) -> int:
        return PRECISIONS[self.precision]

    @property
    def tokens(self) -> int:
        """Tokens whose activations one rank holds."""
        return math.ceil(self.micro_batch * self.seq_len / self.sp)

    @property
    def offloaded_layers(self) -> int:
        if self.checkpointing != "offload":
            return 0
        n = self.shape.layers if self.num_offloaded_layers is None else self.num_offloaded_layers
        return max(0, min(self.shape.layers, n))


@dataclass(frozen=True)
class Item:
    name: str
    bytes: float
    note: str = ""


@dataclass
class Plan:
    setup: Setup
    persistent: list[Item]                  # GPU, alive during the whole step
    phases: dict[str, list[Item]]           # GPU, the peak is the largest phase
    host: list[Item]                        # per rank
    pinned: float                           # per rank, bytes (part of host)
    working_set_untiled: float = 0.0
    working_set_tiled: Optional[float] = None
    host_at_init: float = 0.0               # per rank, before the pinned cache is emptied (0: never emptied)
    host_at_flatten: float = 0.0            # per rank, while ZeRO-3 copies the GPU parameters through host RAM

    @property
    def phase_totals(self) -> dict[str, float]:
        return {k: sum(i.bytes for i in v) for k, v in self.phases.items()}

    @property
    def peak_phase(self) -> str:
        t = self.phase_totals
        return max(t, key=t.get)

    @property
    def gpu_peak(self) -> float:
        """Predicted torch.cuda.max_memory_allocated() of one rank, bytes."""
        return sum(i.bytes for i in self.persistent) + max(self.phase_totals.values())

    @property
    def host_steady(self) -> float:
        return sum(i.bytes for i in self.host)

    @property
    def host_per_rank(self) -> float:
        """The host peak: training; or the end of the optimizer's init where the emptied pinned cache was larger
        than what training adds (most optimizer states on the GPU); or, parameters on the GPU, the copy of this rank's
        parameter partitions DeepSpeed makes through host RAM to flatten them (longctx.plan.host_at_flatten)."""
        return max(self.host_steady, self.host_at_init, self.host_at_flatten)

    def host_total(self, ranks: int) -> float:
        return ranks * self.host_per_rank

    def components(self) -> dict[str, float]:
        """Flat name -> bytes of the persistent items and the peak phase (for tests and JSON)."""
        out = {i.name: i.bytes for i in self.persistent}
        out.update({i.name: i.bytes for i in self.phases[self.peak_phase]})
        return out
