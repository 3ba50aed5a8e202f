"""Memory planner: predicted peak GPU memory per rank, host RAM and pinned memory of one training step.

    plan(Setup(...)) -> Plan                    the breakdown (bytes), GPU peak, host RAM, pinned
    max_seq_len_that_fits(setup, hw) -> int     the largest length that fits the hardware
    next_knobs(setup, hw) -> list[Knob]         which setting to change next, each re-planned
    format_plan(setup, hw) -> str               the text `train.py --plan` prints

Pure functions, no torch: usable on a CPU machine for any target hardware.

How the GPU peak is formed. Memory that lives for the whole step (model states, framework buffers, small
per-token buffers) plus the largest of three phases, which never overlap in time:
  * layer backward: backward of one checkpointed decoder layer just after its forward is recomputed,
    plus the checkpoints still held on the GPU and DeepSpeed's live parameters/gradients/buckets;
  * loss: the end of the forward, the LM head and cross-entropy (full logits, chunked or Liger's fused);
  * embedding backward (ZeRO-3): the gathered embedding and its dense gradient.

The per-layer working set is counted tensor by tensor, in units of one hidden-state tensor
U = tokens x hidden x act_bytes (q = H*d/hidden, kv = K*d/hidden, r = intermediate/hidden). The peak of a
Llama/Mistral/Qwen decoder layer's backward (transformers ops, non-Liger) is in the MLP's `act(gate) * up`
backward, where these are alive:
    saved by the layer's recomputed forward:
      2 RMSNorms x (fp32 copy of the input 4/a + normalized input 1 + output 1)   2 (4/a + 2)
      q and k after RoPE, v                                                    q + 2 kv
      attention output (saved by SDPA/flash) and its contiguous copy (o_proj)  2 q
      gate, up, act(gate)   (act(gate)*up was freed by down_proj's backward)   3 r
    gradients: of the layer output 1, of act(gate)*up r, of act(gate) r, of up r          1 + 3 r
  = 2 (4/a + 2) + 3 q + 2 kv + 6 r + 1        (33.5 U for Llama-3.1-8B in bf16)
With Liger (RMSNorm saves its input and output only; RoPE in place; SwiGLU saves gate and up and
recomputes the activation) the peak moves to down_proj's backward:
    2 x 2 (norms) + 3 q + 2 kv + 3 r (gate, up, product) + 1 + r (gradient of the product)
  = 4 + 3 q + 2 kv + 4 r + 1                  (22.5 U for Llama-3.1-8B)
Tiled MLP (n shards) holds the r-sized tensors of one shard at a time: every r above becomes r / n.
These counts were derived from the ops, then checked against measured peaks (2026-11 H100 rows of a harness since
removed, and the bench JSON since): tests/test_plan_calibration.py holds the plan within 10% (or 1 GiB) of them.

How host RAM is formed (per rank; host_state_items). ZeRO-3 with CPU offload in DeepSpeed 0.19.8 keeps, for P
parameters over W ranks (each parameter's partition padded to a multiple of W):
    bf16 params, per parameter   a P/W   pinned: zero.Init pins each partition, DeepSpeed frees it into torch's cache
    bf16 params (flat)           a P/W   pinned, whatever offload_param.pin_memory says
    fp32 master                  4 C/W   pageable, one flat tensor per optimizer sub-group (sub_group_size)
    fp32 grads                   4 C/W   pinned, one flat tensor per sub-group
    bf16 grad partitions         a P/W   pinned (the gradient-accumulation dtype: the model's by default)
    Adam m, v                    8 C/W   pageable, from the first optimizer step on
where C is the part of P whose optimizer sub-groups are on the CPU: all of it unless offload_optimizer.ratio keeps
the first sub-groups on the GPU (Twin-Flow, longctx.twin_flow), whose fp32 master, fp32 gradient and Adam moments
(16 B per element) are then GPU memory for the whole run.
Every pinned buffer goes through torch's caching host allocator: rounded up to a power of two, and not given back
unless emptied, so a freed block waits for the next request of its size (PinnedCache); the offloaded checkpoints draw
on it too. train.py's ZeRO-3 optimizer empties it once built (longctx.twin_flow, Setup.pinned_cache_released).
Checked against the one host measurement (Llama-3.2-3B shape, one H100, commits 9e6909e, ac2ce74): pinned to the
hundredth of a GiB, RSS within HOST_PROCESS_BYTES (tests/test_plan_calibration.py).

Global constants are below, each with its physical meaning and where its value comes from. Nothing is
tuned per configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from .flops import ModelShape

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# ---- global constants -------------------------------------------------------------------------------
# Allocated by torch on every GPU besides tensors of the model: cuBLAS/cuBLASLt workspaces, rotary
# inv_freq, small buffers. Measured: allocated after the warm-up step minus params, grads and ids (64.25 MiB on
# an H100 at both lengths, 2026-11, by a harness since removed).
FRAMEWORK_GPU_BYTES = 64 * MiB
# Per token, whatever the layer count: input_ids/labels/position_ids (int64, 8 B each), the rotary cos
# and sin (head_dim x act bytes each), flash's logsumexp (heads x fp32). In the offload benchmark
# (ids + positions only, no labels) these are exactly the 656 B/token left over beyond 33.5 U.
IDS_BYTES_PER_TOKEN = 24
# Extra checkpoint-sized tensors (units of one layer input) held on the GPU by each checkpointing
# implementation, besides the working set. Measured (2026-11 H100, a harness since removed: 32K rows; the
# 128K rows were the check):
#   plain: every layer's input stays on the GPU (counted separately, L x U); reentrant adds one more copy
#          (the detached input the reentrant function keeps for the recompute);
#   fork: the prefetched checkpoint of the next layer (copy-back buffer, 1 U); reentrant adds the
#         detached input and its copy (2 U);
#   upstream (save_on_cpu): nothing beyond the working set; reentrant assumed like plain (+1).
CKPT_EXTRA_UNITS = {("plain", False): 0, ("plain", True): 1, ("fork", False): 1, ("fork", True): 3,
                    ("upstream", False): 0, ("upstream", True): 1}
# Tiled MLP (DeepSpeed's TiledMLP): full-length tensors no shard count shrinks, as a floor under the MLP's part of
# the working set: the input gradient it allocates whole before the first shard and the concatenated output of the
# recompute; under reentrant checkpointing these come while the recomputed layer's outputs are still held. FITTED,
# provisional, on the two 96-shard rows at 384K (bench/results/2026-12-05_h100_1xgpu-8b-8L-long.json: without the
# floor the plan was 6% low for the fork's non-reentrant path and 30% low for upstream's reentrant one). The check:
# the 4-shard reentrant rows of 2026-12-04 (placement, 16K-128K) plan -11% / +12% / +10% with it (-12 / +8 / +5%
# without).
TILED_MLP_MIN_UNITS = {False: 1.5, True: 4.5}  # keyed by reentrant
# Ulysses sequence parallelism: all-to-all send/receive buffers of q, k, v and the attention output.
SP_A2A_UNITS = 2.0
# Fit check, outside what torch reports as allocated: the CUDA context (driver, kernels, NCCL) and
# allocator slack between reserved and allocated (expandable segments keep it small).
CUDA_CONTEXT_BYTES = 0.75 * GiB
ALLOCATOR_SLACK = 0.08
# Host RAM of a rank before the model: interpreter, torch + CUDA host-side libraries, DeepSpeed, NCCL. An estimate,
# not fitted: the one host measurement (Llama-3.2-3B shape, 1xH100, baseline 16K and 32K, commit 9e6909e's
# bench/results/2026-11-22_h100_llama3.2-3b_1x_nocap.json) leaves 1.97 GiB of RSS beyond the buffers counted below.
HOST_PROCESS_BYTES = 3.0 * GiB
# (HOST_INIT_BYTES_PER_PARAM = 3.5, fitted on that row as "ZeRO-3 init residue", is gone: it was the per-parameter
# partitions that zero.Init pins and DeepSpeed frees into torch's pinned cache, now counted block by block.)
# Host RAM usable by training: the rest is the OS, page cache for the data, other processes.
HOST_USABLE = 0.90
# Tokens per chunk of longctx.modeling's chunked LM-head loss (kept equal to modeling.HEAD_CHUNK_TOKENS, which
# imports torch; tests/test_plan.py checks they agree). Liger's fused CE picks its own chunk, about one
# hidden-state tensor of logits: next_pow2(ceil(tokens / ceil(vocab / hidden))) rows.
HEAD_CHUNK_TOKENS = 8192

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
class Hardware:
    gpus: int
    gpu_mem: int            # bytes per GPU
    host_mem: int           # bytes of host RAM shared by the `gpus` ranks (one node)
    pinned_limit: Optional[int] = None   # bytes, if the machine limits it (None: only host RAM limits)
    name: str = ""

    @property
    def gpu_usable(self) -> float:
        """Bytes torch may allocate: the card minus the CUDA context, divided by the allocator's slack."""
        return (self.gpu_mem - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_SLACK)

    @property
    def host_usable(self) -> float:
        return self.host_mem * HOST_USABLE


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
        """The host peak: training, or the end of the optimizer's init where the emptied pinned cache was larger
        than what training adds (most optimizer states on the GPU)."""
        return max(self.host_steady, self.host_at_init)

    def host_total(self, ranks: int) -> float:
        return ranks * self.host_per_rank

    def components(self) -> dict[str, float]:
        """Flat name -> bytes of the persistent items and the peak phase (for tests and JSON)."""
        out = {i.name: i.bytes for i in self.persistent}
        out.update({i.name: i.bytes for i in self.phases[self.peak_phase]})
        return out


# ---- component formulas ---------------------------------------------------------------------------------
def _ratios(s: ModelShape) -> tuple[float, float, float]:
    h = s.hidden
    return s.heads * s.head_dim / h, s.kv_heads * s.head_dim / h, s.intermediate / h


def layer_params(s: ModelShape) -> int:
    h, d = s.hidden, s.head_dim
    return h * s.heads * d * 2 + h * s.kv_heads * d * 2 + 3 * h * s.intermediate + 2 * h


def total_params(s: ModelShape, *, lm_head: bool = True, tied: bool = False) -> int:
    """Matmul weights, norms, embedding, and the LM head unless tied or left out."""
    emb = s.vocab * s.hidden
    return s.layers * layer_params(s) + emb + s.hidden + (emb if lm_head and not tied else 0)


def tiled_mlp_shards(tokens: int, hidden: int) -> int:
    """Chunks tiled MLP splits a rank's tokens into: ceil(tokens / hidden), at least 2 (resolve hands it to
    longctx.tiled_mlp). The one rule for resolve's plan, the knob and the plan's preview."""
    return max(2, math.ceil(tokens / hidden))


def working_set_units(s: ModelShape, act_bytes: int, *, liger: bool, mlp_shards: int = 1,
                      reentrant: bool = False) -> float:
    """Peak of one decoder layer's backward after recompute, in units of tokens x hidden x act_bytes. With tiled MLP
    the MLP's part is one shard's intermediates, but never less than TiledMLP's full-length tensors
    (TILED_MLP_MIN_UNITS, which depend on how the layer is recomputed)."""
    q, kv, r = _ratios(s)
    attn = 3 * q + 2 * kv
    mlp = (4 if liger else 6) * r / mlp_shards
    if mlp_shards > 1:
        mlp = max(mlp, TILED_MLP_MIN_UNITS[reentrant])
    if liger:
        return 4 + attn + mlp + 1
    return 2 * (4 / act_bytes + 2) + attn + mlp + 1


def saved_units(s: ModelShape, act_bytes: int, *, liger: bool) -> float:
    """Activations one layer saves for backward without checkpointing (units as above)."""
    q, kv, r = _ratios(s)
    attn = 3 * q + 2 * kv
    return (4 + attn + 3 * r) if liger else (2 * (4 / act_bytes + 2) + attn + 4 * r)


def kept_attention_units(s: ModelShape, act_bytes: int) -> float:
    """What selective checkpointing keeps per layer (longctx.selective), in units: the attention output
    (tokens x heads x head_dim) and its fp32 log-sum-exp (4 bytes per token and head)."""
    q, _, _ = _ratios(s)
    return q + 4 * s.heads / (s.hidden * act_bytes)


def per_token_bytes(s: ModelShape, act_bytes: int) -> int:
    """ids/labels/positions, rotary cos+sin, flash's logsumexp (fp32 per head)."""
    return IDS_BYTES_PER_TOKEN + 2 * s.head_dim * act_bytes + 4 * s.heads


def attention_workspace(setup: Setup) -> float:
    """Beyond the O(S) tensors already in the working set (calibrated on SDPA's cuDNN and varlen_attn): the dense
    mask or eager's S x S scores. flash-attention-4 adds nothing: its backward's fp32 accumulators (dQ, and dK/dV
    under GQA: ~3 GiB at 128K for the 8B shape) take the place of cuDNN's workspace, and its measured peaks equal
    the default's (one H100, 8B shape at 8 layers: 6.0 / 17.0 / 32.0 GiB at 16K / 64K / 128K for both; 31.9 vs
    34.4 GiB on stdlib rows at 128K; bench/results/2026-12-05_h100_1xgpu-8b-8L-fa4.json)."""
    S, B, a = setup.seq_len, setup.micro_batch, setup.act_bytes
    heads = setup.shape.heads / setup.sp
    if setup.attention == "dense_mask":   # boolean block-diagonal mask, one per row
        return B * S * S
    if setup.attention == "eager":        # additive mask, scores (act), fp32 softmax saved, probs (act)
        return B * S * S * a + B * heads * S * S * (a + 4 + a)
    return 0.0


def loss_items(setup: Setup) -> list[Item]:
    s, a, T = setup.shape, setup.act_bytes, setup.tokens
    V, h = s.vocab, s.hidden
    if setup.loss == "none" or not setup.lm_head:
        return []
    if setup.loss == "full":
        # transformers: bf16 logits, fp32 copy, log_softmax output; in backward the saved log-probs, the
        # dense gradient from nll_loss and log_softmax's gradient: 4 + 4 + 4 bytes per logit.
        return [Item("logits (full, fp32 log-softmax + grads)", 12 * T * V, f"{T:,} x {V:,} x 12 B"),
                Item("LM head input and its gradient", 2 * T * h * a)]
    if setup.loss == "chunked":
        c = min(T, HEAD_CHUNK_TOKENS)
        w32 = 0 if a == 4 else V * h * 4
        return [Item("logits chunk (fp32 + act copy)", c * V * (4 + a), f"{c:,} x {V:,} tokens x vocab"),
                Item("fp32 weight copy + fp32 weight gradient", w32 + V * h * 4),
                Item("LM head input (target rows) and its gradient", 2 * T * h * a)]
    # Liger fused linear cross-entropy: one logits chunk in act dtype, gradient of the weight (act),
    # gradient of the input, the kept input rows.
    c = min(T, 1 << max(0, math.ceil(math.log2(max(1, math.ceil(T / math.ceil(V / h)))))))
    return [Item("logits chunk (Liger fused CE)", c * V * a, f"{c:,} x {V:,}"),
            Item("LM head weight gradient", V * h * a),
            Item("LM head input (target rows) and its gradient", 2 * T * h * a)]


def pinned_block(nbytes: float) -> float:
    """torch's caching host allocator (tensor.pin_memory(), torch.empty(pin_memory=True), save_on_cpu) rounds each
    block up to a power of two and keeps freed blocks cached for the life of the process (bench pinned peaks: 37.4 ->
    40.9 GiB = 28 checkpoints of 96 MiB taking 128 MiB each). DeepSpeed's get_accelerator().pin_memory() on CUDA is
    tensor.pin_memory(), so its pinned buffers are rounded too."""
    return float(1 << math.ceil(math.log2(nbytes))) if nbytes > 0 else 0.0


class PinnedCache:
    """torch's caching host allocator in miniature (ATen CachingHostAllocator): an allocation takes a cached free block
    of its power-of-two size if there is one, else pins a new block; a freed block stays pinned in the cache, never
    given back to the OS. `pinned` is every byte it pinned."""

    def __init__(self):
        self.free: dict[float, int] = {}
        self.pinned = 0.0
        self.at_init = 0.0  # host bytes of the states just before the cache is emptied (0: it is not)

    def take(self, nbytes: float) -> float:
        """Pin `nbytes`; returns the bytes newly pinned (0 when a cached block is reused)."""
        block = pinned_block(nbytes)
        if self.free.get(block):
            self.free[block] -= 1
            return 0.0
        self.pinned += block
        return block

    def give_back(self, nbytes: float) -> None:
        block = pinned_block(nbytes)
        self.free[block] = self.free.get(block, 0) + 1

    def empty(self) -> float:
        """torch._C._host_emptyCache: the free blocks go back to the OS. Returns their bytes."""
        freed = sum(block * n for block, n in self.free.items())
        self.free, self.pinned = {}, self.pinned - freed
        return freed


def parameter_sizes(s: ModelShape, *, lm_head: bool = True, tied: bool = False) -> list[int]:
    """Elements of every parameter in module order, the order ZeRO-3 partitions them and cuts optimizer sub-groups:
    the embedding; per layer q, k, v, o, gate, up, down and the two norms; the final norm; the LM head unless tied or
    left out. Sums to total_params."""
    h, d = s.hidden, s.head_dim
    layer = [h * s.heads * d, h * s.kv_heads * d, h * s.kv_heads * d, s.heads * d * h,
             h * s.intermediate, h * s.intermediate, s.intermediate * h, h, h]
    return [s.vocab * h] + layer * s.layers + [h] + ([s.vocab * h] if lm_head and not tied else [])


def sub_groups(partitions: list[int], sub_group_size: int) -> list[int]:
    """Elements of each ZeRO-3 optimizer sub-group (stage3.py _create_fp16_sub_groups): the parameters' partitions in
    order, a sub-group closed at the parameter that brings it to sub_group_size or more; one group if all fit."""
    total = sum(partitions)
    if sub_group_size >= total:
        return [total]
    out, acc = [], 0
    for i, n in enumerate(partitions):
        acc += n
        if acc >= sub_group_size or i == len(partitions) - 1:
            out.append(acc)
            acc = 0
    return out


def gpu_sub_group_count(ratio: float, n: int) -> int:
    """How many of n optimizer sub-groups (the first ones) DeepSpeed keeps on the GPU at offload_optimizer.ratio
    (stage3.py _create_fp32_partitions: sub-group i is on the CPU when i >= int((1 - ratio) * n)). One rule, used
    by longctx.twin_flow too."""
    return int((1 - ratio) * n)


def ratio_for(k: int, n: int) -> float:
    """The offload_optimizer.ratio that keeps exactly the first k of n sub-groups on the GPU: the middle of its
    interval, so float rounding cannot move the cut (rounded to 6 digits for the ds_config)."""
    if k <= 0:
        return 1.0
    if k >= n:
        return 0.0
    r = round(1 - (k + 0.5) / n, 6)
    assert gpu_sub_group_count(r, n) == k, (k, n, r)
    return r


def optimizer_sub_groups(setup: Setup) -> tuple[list[int], list[int]]:
    """(GPU sub-groups, CPU sub-groups) of one rank's optimizer, elements each (ZeRO-3 with the optimizer offloaded;
    otherwise ([], []))"""
    if setup.zero_stage != 3 or not setup.offload_optimizer or setup.optimizer == "none":
        return [], []
    sizes = parameter_sizes(setup.shape, lm_head=setup.lm_head, tied=setup.tied_embeddings)
    groups = sub_groups([math.ceil(n / setup.world) for n in sizes], setup.sub_group_size)
    k = gpu_sub_group_count(setup.optimizer_ratio, len(groups))
    return groups[:k], groups[k:]


ADAM_ITEM = "Adam m, v (fp32)"

# Parameters of at most this many hidden sizes stay on the GPU from zero.Init on (the norms): ds_config
# stage3_param_persistence_threshold, which longctx.dsconfig resolves from "auto" to 10 x hidden.
PERSISTENT_HIDDENS = 10


def host_state_items(setup: Setup) -> tuple[list[Item], PinnedCache]:
    """Host buffers of the model states of one rank as DeepSpeed 0.19.8 allocates them, pinned ones taken in
    allocation order from torch's pinned cache (which the offloaded checkpoints then draw on).

    Left out, since they are freed before the first optimizer step creates Adam's 8 B/param: the fp32 conversion of
    one sub-group at a time (`.to(fp32).clone()`, 8 B per element of the largest), initialize_optimizer_states'
    scratch `gradient_buffer` and the pageable zeros each pinned buffer is copied from (4 B per element of the
    largest sub-group each; 2 B/param for the gradient partitions)."""
    cache = PinnedCache()
    if setup.zero_stage == 3:
        items = _zero3_host_items(setup, cache)
        if setup.pinned_cache_released and setup.optimizer != "none":  # longctx.twin_flow.release_pinned_cache
            # what the host holds just before: everything but Adam's moments (created by the first step)
            cache.at_init = sum(i.bytes for i in items if i.name != ADAM_ITEM)
            freed = cache.empty()
            if freed:
                items.append(Item("pinned cache emptied once built", -freed, "dropped per-parameter and staging blocks"))
        return items, cache
    if setup.offload_optimizer and setup.optimizer != "none":
        return _zero12_host_items(setup, cache), cache
    return [], cache


def _zero3_host_items(setup: Setup, cache: PinnedCache) -> list[Item]:
    s, a, W, pin, dt = setup.shape, setup.act_bytes, setup.world, setup.pin_memory, setup.precision
    sizes = parameter_sizes(s, lm_head=setup.lm_head, tied=setup.tied_embeddings)
    P = sum(math.ceil(n / W) for n in sizes)  # this rank's partitions, each padded to a multiple of W
    stage3_optimizer = setup.optimizer != "none"
    items = []
    if setup.offload_params:
        # partition_parameters.py Init._partition_param: each parameter's partition on the CPU, through
        # get_accelerator().pin_memory() when offload_param.pin_memory. A tied LM head is built and partitioned too
        # before tie_weights drops it, which frees its block into the cache.
        blocks = [a * math.ceil(n / W) for n in sizes if n > PERSISTENT_HIDDENS * s.hidden]
        orphan = [a * math.ceil(s.vocab * s.hidden / W)] if setup.tied_embeddings and setup.lm_head else []
        if not stage3_optimizer:  # DeepSpeedZeRoOffload alone keeps the partitions where zero.Init put them
            per_param = sum(cache.take(b) for b in blocks) if pin else a * P
            return [Item(f"{dt} params, one partition per parameter" + (" (pinned)" if pin else ""), per_param)]
        if pin:
            per_param = sum(cache.take(b) for b in blocks + orphan)
            for b in orphan:
                cache.give_back(b)
            items.append(Item(f"{dt} params, per parameter (pinned, cached)", per_param, "zero.Init"))
        # stage3.py _create_param_groups_fp16_flat_cpu_memory: one flat buffer per parameter group, pinned whatever
        # offload_param.pin_memory says; _move_to_flat_buffer then frees the per-parameter partitions above.
        items.append(Item(f"{dt} params (flat, pinned)", cache.take(a * P)))
        if pin:
            for b in blocks:
                cache.give_back(b)
    if not (setup.offload_optimizer and stage3_optimizer):
        return items
    on_gpu, groups = optimizer_sub_groups(setup)
    C = sum(groups)
    split = f" of {len(on_gpu) + len(groups)}; the other {len(on_gpu)} on the GPU" if on_gpu else ""
    ga = setup.grad_accum_dtype or dt
    # stage3.py _create_fp32_partitions: each CPU sub-group's bf16 flat `.to("cpu", fp32).clone()`, pageable
    items.append(Item("fp32 master (flat per sub-group)", 4 * C))
    # stage3.py initialize_optimizer_states: each sub-group's fp32 gradient, torch.zeros then pinned; a GPU
    # sub-group's pinned buffer is a staging copy, dropped into the cache once on the GPU
    grads = 0.0
    for i, n in enumerate(on_gpu + groups):
        if pin:
            grads += cache.take(4 * n)
            if i < len(on_gpu):
                cache.give_back(4 * n)
    items.append(Item("fp32 grads (flat per sub-group" + (", pinned)" if pin else ")"), grads if pin else 4 * C,
                      f"{len(groups)} sub-group{'s' if len(groups) != 1 else ''}{split}"))
    # stage3.py _setup_for_real_optimizer: grad_partitions_flat_buffer, where backward's reduced partitions land
    # (in gradient_accumulation_dtype, the model's unless data_types.grad_accum_dtype), on the CPU and pinned
    items.append(Item(f"{ga} grad partitions (flat" + (", pinned)" if pin else ")"),
                      cache.take(PRECISIONS[ga] * P) if pin else PRECISIONS[ga] * P))
    # ops/adam/cpu_adam.py DeepSpeedCPUAdam.step: exp_avg, exp_avg_sq (torch.zeros_like, fp32) at the first step
    items.append(Item(ADAM_ITEM, 8 * C))
    return items


def _zero12_host_items(setup: Setup, cache: PinnedCache) -> list[Item]:
    """ZeRO-1/2 with offload_optimizer (stage_1_and_2.py): one flat partition per buffer (one parameter group).
    Gradient accumulation over micro-batches adds a pinned copy of each parameter's gradient (not counted)."""
    s, a, W, pin = setup.shape, setup.act_bytes, setup.world, setup.pin_memory
    sizes = parameter_sizes(s, lm_head=setup.lm_head, tied=setup.tied_embeddings)
    P = math.ceil(sum(sizes) / W)

    def buf(nbytes: float) -> float:
        return cache.take(nbytes) if pin else nbytes

    sfx = ", pinned)" if pin else ")"
    return [Item("fp32 master (flat" + sfx, buf(4 * P)),                         # weights_partition
            Item(f"{setup.precision} params for the CPU step (flat" + sfx, buf(a * P)),  # param_buffer_of_bit16_...
            Item("fp32 grads (flat" + sfx, buf(4 * P)),                           # initialize_optimizer_states
            Item("largest parameter's gradient" + (" (pinned)" if pin else ""),  # temp_grad_buffer_for_cpu_offload
                 buf(a * max(sizes))),
            Item("Adam m, v (fp32)", 8 * P)]


def gpu_state_items(setup: Setup) -> list[Item]:
    """Parameters, gradients and optimizer states one rank keeps on its GPU."""
    s, a, W = setup.shape, setup.act_bytes, setup.world
    P = total_params(s, lm_head=setup.lm_head, tied=setup.tied_embeddings)
    z = setup.zero_stage
    gpu = []
    if not setup.offload_params:
        gpu.append(Item(f"params{' (ZeRO-3 shard)' if z == 3 else ''}", a * P / (W if z == 3 else 1)))
    if setup.optimizer == "none":
        return gpu + [Item("grads", a * P)]
    opt_div = W if z >= 1 else 1
    if not setup.offload_optimizer:
        gpu.append(Item("fp32 master + Adam m, v", 12 * P / opt_div))
    on_gpu, cpu = optimizer_sub_groups(setup)
    if on_gpu:
        gpu.append(Item("Twin-Flow sub-groups: fp32 master, grad, Adam m, v", 16 * sum(on_gpu),
                        f"{len(on_gpu)} of {len(on_gpu) + len(cpu)} sub-groups, ratio {setup.optimizer_ratio:g}"))
    if z <= 1:
        gpu.append(Item("grads", a * P))
    elif not setup.offload_optimizer:
        gpu.append(Item("grads (shard)", a * P / W))
    return gpu


def model_state_items(setup: Setup) -> tuple[list[Item], list[Item], float]:
    """(GPU items, host items, pinned bytes) of parameters, gradients and optimizer states per rank."""
    host, cache = host_state_items(setup)
    return gpu_state_items(setup), host, cache.pinned


def deepspeed_items(setup: Setup) -> list[Item]:
    """Live DeepSpeed buffers during a layer's backward.

    ZeRO-3 gathers the layer being recomputed (and the prefetch bucket of the next one). Gradients are
    reduced in buckets (double-buffered with overlap_comm); a gradient larger than the bucket is reduced
    from its own tensor on the side stream, so the largest one produced so far (the LM head's, for the
    last layer's backward) is still allocated while that layer's backward runs."""
    s, a = setup.shape, setup.act_bytes
    if setup.zero_stage == 0:
        return []
    reduce = setup.reduce_bucket_size or s.hidden * s.hidden
    items = [Item("reduce bucket(s)", reduce * a * (2 if setup.overlap_comm else 1))]
    if setup.zero_stage == 3:
        prefetch = setup.prefetch_bucket_size or int(0.9 * s.hidden * s.hidden)
        lp = layer_params(s)
        head = s.vocab * s.hidden if setup.lm_head else 0
        items += [Item("gathered layer params + prefetch", (lp + min(prefetch, lp)) * a * gathered_fraction(setup)),
                  Item("largest gradient in the reduce queue", max(head, s.hidden * s.intermediate) * a,
                       "LM head" if head > s.hidden * s.intermediate else "MLP matrix")]
    return items


def gathered_fraction(setup: Setup) -> float:
    """Share of a ZeRO-3 gathered parameter that is new GPU memory: all of it when parameters live on the CPU;
    without param offload the rank's own shard is already there (1/world of it; with one rank, all of it).
    Measured on one H200 (8B shape, 8 layers): with parameters on the GPU the plan was 3.3-4.3 GiB high before."""
    return 1.0 if setup.offload_params else 1.0 - 1.0 / setup.world


def ckpt_gpu_units(setup: Setup) -> float:
    L = setup.shape.layers
    if setup.checkpointing == "none":
        return 0.0
    on_gpu = L - setup.offloaded_layers
    plain_extra = CKPT_EXTRA_UNITS[("plain", setup.reentrant)]
    if setup.checkpointing == "plain":
        return on_gpu + plain_extra
    offload_extra = CKPT_EXTRA_UNITS[(setup.offload_impl, setup.reentrant)]
    if on_gpu == 0:
        return offload_extra
    # The offloader takes the first layers; the last `on_gpu` keep their checkpoints on the GPU and are the first the
    # backward reaches, as plain checkpointing's layers are. The offloader's buffers in flight (its extra units) come
    # in the offloaded layers' backward, after the GPU-held checkpoints have been freed. Checked on one row (3B, 10 of
    # 28 on the GPU at 256K, H100, 2026-12-06): +4.5%, where on_gpu + the offloader's extra planned +11.1%.
    return max(on_gpu + plain_extra, offload_extra)


def plan(setup: Setup) -> Plan:
    s, a, T = setup.shape, setup.act_bytes, setup.tokens
    U = T * s.hidden * a
    V, h = s.vocab, s.hidden
    head_bytes = V * h * a if setup.lm_head else 0  # tied: the embedding matrix, gathered as the head

    host_states, cache = host_state_items(setup)
    persistent = gpu_state_items(setup) + [Item("framework (cuBLAS workspaces, buffers)", FRAMEWORK_GPU_BYTES),
                                           Item("ids, rotary cos/sin, logsumexp", T * per_token_bytes(s, a))]

    liger = setup.liger_kernels
    ws_units = working_set_units(s, a, liger=liger, mlp_shards=setup.tiled_mlp_shards, reentrant=setup.reentrant)
    untiled = working_set_units(s, a, liger=liger) * U
    ckpt_units = ckpt_gpu_units(setup)
    ckpt_note = {"none": "no checkpointing", "plain": f"{s.layers} layers on GPU",
                 "offload": f"{setup.offloaded_layers}/{s.layers} layers in host RAM ({setup.offload_impl})"}
    ds = deepspeed_items(setup)
    zero3_head = setup.zero_stage == 3 and head_bytes > 0
    head_bytes *= gathered_fraction(setup) if setup.zero_stage == 3 else 1.0
    head_live = [Item("LM head weight (ZeRO-3 external param)", head_bytes)] if (
        zero3_head and setup.head_gathered_throughout) else []

    layer = [Item("checkpoints on GPU", ckpt_units * U, ckpt_note[setup.checkpointing])]
    kept = []
    if setup.keep_attention:
        kept = [Item("kept attention outputs", s.layers * kept_attention_units(s, a) * U,
                     f"{s.layers} layers x (output + log-sum-exp)")]
    layer += kept
    if setup.checkpointing == "none":
        # every layer's saved activations, plus the backward transient of the last layer
        full = saved_units(s, a, liger=liger)
        layer = [Item("saved activations (no checkpointing)", (s.layers - 1) * full * U, f"{s.layers - 1} layers")]
    layer.append(Item("per-layer working set", ws_units * U,
                      f"{ws_units:.2f} x tokens x hidden x {a} B" +
                      (f" (untiled {working_set_units(s, a, liger=liger):.2f})" if setup.tiled_mlp_shards > 1 else "")))
    attn_ws = attention_workspace(setup)
    if attn_ws:
        layer.append(Item("attention workspace", attn_ws, setup.attention))
    if setup.sp > 1:
        q, kv, _ = _ratios(s)
        layer.append(Item("sequence-parallel all-to-all buffers", SP_A2A_UNITS * (q + kv) * U))
    layer += ds + head_live

    phases = {"layer backward": layer}
    if setup.lm_head and setup.loss != "none":
        norm = (2 if liger else 2 * (4 / a + 2)) * U
        loss = [Item("checkpoints on GPU", ckpt_units * U if setup.checkpointing != "none" else
                     s.layers * saved_units(s, a, liger=liger) * U),
                Item("final norm (saved)", norm)] + kept + loss_items(setup)
        if zero3_head:
            loss.append(Item("LM head weight (gathered)", head_bytes))
        loss += [i for i in ds if i.name.startswith("reduce")]
        phases["loss"] = loss
    if setup.zero_stage == 3:
        phases["embedding backward"] = [Item("embedding weight (gathered) + dense grad",
                                             (1 + gathered_fraction(setup)) * V * h * a),
                                        Item("gradient of the embedding output", U)] + head_live

    host = [Item("process (python, torch, CUDA, DeepSpeed)", HOST_PROCESS_BYTES)] + host_states
    if setup.offloaded_layers:  # one pinned host buffer per layer input, drawn from the cache the init left
        n = setup.offloaded_layers
        ck = sum(cache.take(U) for _ in range(n))
        reused = n - round(ck / pinned_block(U))
        host.append(Item("offloaded checkpoints", ck, f"{n} layers, {reused} in cached blocks" if reused else
                         f"{n} layers x {T:,} tokens"))
    if setup.data_bytes >= 0.005 * GiB:  # shown from 0.01 GiB on: the embedded data's few KB would print as 0.00
        host.append(Item("data (document index and rows; tokens memory-mapped)", setup.data_bytes))
    at_init = HOST_PROCESS_BYTES + cache.at_init + setup.data_bytes if cache.at_init else 0.0
    return Plan(setup, persistent, phases, host, cache.pinned, working_set_untiled=untiled,
                working_set_tiled=ws_units * U if setup.tiled_mlp_shards > 1 else None, host_at_init=at_init)


# ---- where the optimizer states go (offload_optimizer.ratio) -----------------------------------------------
def layer_sub_group_size(shape: ModelShape, dp_world: int) -> int:
    """The ZeRO-3 optimizer sub-group ("auto") where the states are split (Twin-Flow) or the step overlapped: one
    decoder layer's partition, so a split moves one layer's states and a module waits for about its own layer."""
    return max(1, math.ceil(layer_params(shape) / max(1, dp_world)))


def split_at(setup: Setup, k: int) -> Setup:
    """`setup` with the first k optimizer sub-groups' states on the GPU (Twin-Flow) at the split granularity."""
    granularity = layer_sub_group_size(setup.shape, setup.world // max(1, setup.sp))
    base = replace(setup, offload_optimizer=True, sub_group_size=granularity, optimizer_ratio=1.0)
    _, groups = optimizer_sub_groups(base)
    return replace(base, optimizer_ratio=ratio_for(k, len(groups)))


def largest_gpu_share(setup: Setup, fits) -> Optional[Setup]:
    """The split with the most sub-groups' states on the GPU for which `fits(setup)` holds (the GPU peak grows with
    each one), short of all of them; None when not even one fits. Bisects: a few plans, not one per sub-group."""
    n = len(optimizer_sub_groups(split_at(setup, 0))[1])
    if n < 2 or not fits(split_at(setup, 1)):
        return None
    lo, hi = 1, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(split_at(setup, mid)) else (lo, mid - 1)
    return split_at(setup, lo)


def all_states_on_gpu(setup: Setup) -> Setup:
    """Parameters and every optimizer state on the GPU: ds_configs/zero3.json's placement."""
    return replace(setup, offload_params=False, offload_optimizer=False, optimizer_ratio=1.0)


def all_states_on_cpu(setup: Setup) -> Setup:
    from .dsconfig import UNSPLIT_SUB_GROUP_SIZE

    split = setup.offload_optimizer and setup.optimizer_ratio < 1
    return replace(setup, offload_optimizer=True, optimizer_ratio=1.0,
                   sub_group_size=UNSPLIT_SUB_GROUP_SIZE if split else setup.sub_group_size)


def placement_rows(setup: Setup, hw: Hardware) -> list[str]:
    """`--plan`'s optimizer-state choices at this length: GPU peak and host RAM of each (ZeRO-3 with AdamW)."""
    if setup.zero_stage != 3 or setup.optimizer == "none":
        return []

    def gpu_ok(x: Setup) -> bool:
        return check_fit(plan(x), hw).gpu_ok

    chosen = setup.offload_optimizer and 0 < setup.optimizer_ratio < 1
    split = setup if chosen else largest_gpu_share(setup, gpu_ok)
    rows = [("all on the GPU (parameters too: zero3.json's placement)", all_states_on_gpu(setup))]
    if split is not None:
        on, off = optimizer_sub_groups(split)
        rows.append((f"split, ratio {split.optimizer_ratio:g}: {len(on)}/{len(on) + len(off)} "
                     + ("sub-groups on the GPU" if chosen else "on the GPU (most that fit)"), split))
    rows.append(("all on the CPU (ratio 1)", all_states_on_cpu(setup)))
    out = ["Optimizer states: each placement re-planned at this length (GPU peak per rank, host RAM all ranks)"]
    for label, x in rows:
        p, v = plan(x), check_fit(plan(x), hw)
        now = "  <- this run" if (x.offload_optimizer, x.optimizer_ratio, x.offload_params) == (
            setup.offload_optimizer, setup.optimizer_ratio, setup.offload_params) else ""
        out.append(f"  {label:<58} GPU {p.gpu_peak / GiB:6.1f} {'ok' if v.gpu_ok else 'NO'} | host "
                   f"{p.host_total(hw.gpus) / GiB:6.1f} {'ok' if v.host_ok else 'NO'}{now}")
    return out


# ---- fit, search, advice ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    gpu_ok: bool
    host_ok: bool
    pinned_ok: bool

    @property
    def ok(self) -> bool:
        return self.gpu_ok and self.host_ok and self.pinned_ok


def check_fit(p: Plan, hw: Hardware) -> Verdict:
    ranks = hw.gpus
    pinned_total = p.pinned * ranks
    return Verdict(gpu_ok=p.gpu_peak <= hw.gpu_usable,
                   host_ok=p.host_total(ranks) <= hw.host_usable,
                   pinned_ok=hw.pinned_limit is None or pinned_total <= hw.pinned_limit)


def fits(setup: Setup, hw: Hardware) -> bool:
    return check_fit(plan(setup), hw).ok


def max_seq_len_that_fits(setup: Setup, hw: Hardware, *, multiple: int = 1024, limit: int = 1 << 24,
                          setup_at=None) -> int:
    """Largest seq_len (a multiple of `multiple`, up to `limit`) for which the plan fits `hw`; 0 if none.
    `setup_at(seq_len)` gives the Setup at another length (train.py's resolution changes with it: tiled MLP turns on
    where the untiled step does not fit); default: this setup with only the length changed."""
    at = setup_at or (lambda n: replace(setup, seq_len=n))
    hi = limit // multiple
    if not fits(at(multiple), hw):
        return 0
    lo = 1
    while lo < hi:  # memory grows with seq_len: bisect on the multiple count
        mid = (lo + hi + 1) // 2
        if fits(at(mid * multiple), hw):
            lo = mid
        else:
            hi = mid - 1
    return lo * multiple


@dataclass(frozen=True)
class Knob:
    flag: str
    what: str
    setup: Setup

    def effect(self, base: Setup, hw: Hardware) -> tuple[float, float, int]:
        """(GPU peak before, after, max_seq_len after), bytes and tokens."""
        return plan(base).gpu_peak, plan(self.setup).gpu_peak, max_seq_len_that_fits(self.setup, hw)


# Knobs that need a feature train.py may not have yet; offered only when the caller says it exists.
OPTIONAL_KNOBS = ("tiled_mlp", "sequence_parallel")


def candidate_knobs(setup: Setup, optional: tuple[str, ...] = ()) -> list[Knob]:
    s = setup
    out: list[Knob] = []
    if s.lm_head and s.loss != "liger":
        out.append(Knob("--liger on", "Liger fused linear cross-entropy: no tokens x vocab logits",
                        replace(s, loss="liger", liger_kernels=True)))
    elif not s.liger_kernels:
        out.append(Knob("--liger on", "Liger RMSNorm/SwiGLU/RoPE kernels: a smaller per-layer working set",
                        replace(s, liger_kernels=True)))
    if s.checkpointing == "none":
        out.append(Knob("--gradient-checkpointing", "recompute layers in backward", replace(s, checkpointing="plain")))
    elif s.checkpointing == "plain":
        out.append(Knob("--offload-gradient-checkpointing", "checkpoints to pinned host RAM",
                        replace(s, checkpointing="offload", offload_impl="fork", num_offloaded_layers=None)))
    elif s.offloaded_layers < s.shape.layers:
        out.append(Knob("--num-offloaded-layers", "offload every layer's checkpoint",
                        replace(s, num_offloaded_layers=None)))
    if s.zero_stage < 3:
        out.append(Knob("ZeRO-3 (ds_configs/zero3_offload.json)", "partition parameters too",
                        replace(s, zero_stage=3, offload_params=True, offload_optimizer=True)))
    else:
        if not s.offload_optimizer:
            out.append(Knob("offload_optimizer cpu (ds_configs/zero3_offload.json)", "optimizer states to host RAM",
                            replace(s, offload_optimizer=True)))
        if not s.offload_params:
            out.append(Knob("offload_param cpu (ds_configs/zero3_offload.json)", "parameters to host RAM",
                            replace(s, offload_params=True)))
    if s.attention in ("dense_mask", "eager"):
        out.append(Knob("--attn-implementation varlen (sm80+) or --no-packing", "no S x S mask or scores",
                        replace(s, attention="flash")))
    if s.micro_batch > 1:
        out.append(Knob("--micro-batch-size 1 (raise --grad-accum)", "fewer tokens per forward",
                        replace(s, micro_batch=1)))
    if s.tiled_mlp_shards == 1 and "tiled_mlp" in optional:
        n = tiled_mlp_shards(s.tokens, s.shape.hidden)
        out.append(Knob(f"tiled MLP ({n} shards)", "MLP intermediates one shard at a time",
                        replace(s, tiled_mlp_shards=n)))
    if "sequence_parallel" in optional and s.world % max(1, s.sp * 2) == 0 and s.world > s.sp:
        out.append(Knob(f"sequence parallel {s.sp * 2}", "split each sequence over more GPUs",
                        replace(s, sp=s.sp * 2)))
    return out


def next_knobs(setup: Setup, hw: Hardware, n: int = 3,
               optional: tuple[str, ...] = ()) -> list[tuple[Knob, float, float, int]]:
    """The knobs that lower the GPU peak most, re-planned: (knob, peak before, peak after, max length),
    best first (the longest max_seq_len after the change)."""
    base = plan(setup).gpu_peak
    scored = []
    for k in candidate_knobs(setup, optional):
        after = plan(k.setup).gpu_peak
        if after < base * 0.99:
            scored.append((k, base, after, max_seq_len_that_fits(replace(k.setup), hw)))
    scored.sort(key=lambda t: (-t[3], t[2]))
    return scored[:n]


def short_of(setup: Setup, hw: Hardware) -> str:
    """What a setup that fits at no length runs out of, at the shortest length the search tries (1K)."""
    v = check_fit(plan(replace(setup, seq_len=1024)), hw)
    what = [n for n, ok in (("GPU memory", v.gpu_ok), ("host RAM", v.host_ok), ("pinnable memory", v.pinned_ok))
            if not ok]
    return "no length fits (" + " and ".join(what) + ")"


def host_knob(p: Plan, hw: Hardware, usable: Optional[float] = None) -> str:
    """What lowers host RAM, each re-planned against `usable` bytes for all of `hw`'s ranks (default: hw.host_usable):
    fewer checkpoints in host RAM, the parameters on the GPU, more optimizer states on the GPU (the smallest
    offload_optimizer.ratio split that fits the host, with its GPU peak), then more RAM or more ranks to divide the
    states over."""
    s, ranks = p.setup, hw.gpus
    usable = hw.host_usable if usable is None else usable

    def host(x: Setup) -> float:
        return plan(x).host_total(ranks)

    def g(x: float) -> str:
        return f"{x / GiB:.1f} GiB"

    out = []
    states = replace(s, num_offloaded_layers=0) if s.offloaded_layers else s
    if s.offloaded_layers:
        fit = next((n for n in range(s.offloaded_layers - 1, -1, -1)
                    if host(replace(s, num_offloaded_layers=n)) <= usable), None)
        if fit is not None:
            out.append(f"--num-offloaded-layers {fit} (the other checkpoints on the GPU: host "
                       f"{g(host(replace(s, num_offloaded_layers=fit)))})")
        else:
            out.append(f"with no checkpoint in host RAM it still needs {g(host(states))} of {g(usable)}")
    if s.zero_stage == 3 and s.offload_params:
        alt = replace(s, offload_params=False)
        gpu = "" if not hw.gpu_mem else (f", GPU peak {g(plan(alt).gpu_peak)}"
                                         + ("" if plan(alt).gpu_peak <= hw.gpu_usable else " (does not fit)"))
        out.append(f"offload_param none in the ds_config (parameters on the GPU): host {g(host(alt))}"
                   + ("" if host(alt) <= usable else ", still above") + gpu)
    on_gpu_now = len(optimizer_sub_groups(s)[0])
    if s.zero_stage == 3 and s.offload_optimizer and s.optimizer != "none":
        n = len(optimizer_sub_groups(split_at(s, 0))[1])
        k = next((k for k in range(max(1, on_gpu_now + 1), n) if host(split_at(s, k)) <= usable), None)
        if k is None and n > 1:
            out.append(f"even with {n - 1} of {n} optimizer sub-groups' states on the GPU the host needs "
                       f"{g(host(split_at(s, n - 1)))}")
        elif k is not None:
            alt = split_at(s, k)
            gpu = "" if not hw.gpu_mem else (f", GPU peak {g(plan(alt).gpu_peak)}"
                                             + ("" if plan(alt).gpu_peak <= hw.gpu_usable else " (does not fit)"))
            out.append(f"offload_optimizer.ratio {alt.optimizer_ratio:g} in the ds_config ({k} of {n} sub-groups' "
                       f"optimizer states on the GPU): host {g(host(alt))}{gpu}")
    out.append(f"more host RAM (the plan takes {g(p.host_total(ranks))} of {g(usable)} usable)"
               + (", fewer GPUs per host" if ranks > 1 else "")
               + (" or more hosts (ZeRO-3 divides the states over every rank)" if s.zero_stage == 3 else
                  " or a shorter --max-seq-len"))
    return "; ".join(out)


# ---- text -------------------------------------------------------------------------------------------
def gib(x: float) -> str:
    return f"{x / GiB:7.2f}"


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def describe(setup: Setup) -> str:
    s = setup
    z = f"ZeRO-{s.zero_stage}" if s.zero_stage else "no ZeRO"
    off = [n for n, on in (("params", s.offload_params), ("optimizer", s.offload_optimizer)) if on]
    z += f", {' + '.join(off)} on CPU" + (" (pinned)" if s.pin_memory else "") if off else ""
    ck = {"none": "off", "plain": "on GPU" + (" (reentrant)" if s.reentrant else ""),
          "offload": f"offloaded ({s.offload_impl}, {s.offloaded_layers}/{s.shape.layers} layers)"}[s.checkpointing]
    ck += kept_attention_label(s.keep_attention, s.keep_attention_by)
    loss = {"full": "full fp32 logits", "chunked": f"chunked CE ({HEAD_CHUNK_TOKENS} tokens)",
            "liger": "Liger fused linear CE", "none": "none"}[s.loss]
    return (f"{s.precision} | {z} | checkpointing {ck} | loss {loss} | Liger kernels "
            f"{'on' if s.liger_kernels else 'off'} | attention {s.attention} | tiled MLP "
            f"{s.tiled_mlp_shards if s.tiled_mlp_shards > 1 else 'off'} | sequence parallel {s.sp}")


def format_plan(setup: Setup, hw: Hardware, *, model_name: str = "", optional: tuple[str, ...] = (),
                setup_at=None) -> str:
    p = plan(setup)
    s, sh = setup, setup.shape
    P = total_params(sh, lm_head=s.lm_head, tied=s.tied_embeddings)
    v = check_fit(p, hw)
    lines = [f"Memory plan: {model_name or 'model'} ({P / 1e9:.2f}B params: {sh.layers} layers, hidden {sh.hidden}, "
             f"vocab {sh.vocab:,}); {s.seq_len:,} tokens x micro-batch {s.micro_batch} per GPU; "
             f"{hw.gpus} GPU(s) x {hw.gpu_mem / GiB:g} GiB, host {hw.host_mem / GiB:g} GiB"
             + (f" [{hw.name}]" if hw.name else ""),
             f"  {describe(s)}", "", "GPU, per rank                                                   GiB"]
    for i in p.persistent:
        lines.append(f"  {i.name:<60}{gib(i.bytes)}")
    totals = p.phase_totals
    for ph, items in p.phases.items():
        mark = "  <- peak" if ph == p.peak_phase else ""
        lines.append(f"  phase: {ph:<53}{gib(totals[ph])}{mark}")
        if ph == p.peak_phase:
            for i in items:
                if i.bytes:
                    note = f" ({i.note})" if i.note else ""
                    lines.append(f"    {(i.name + note)[:57]:<58}{gib(i.bytes)}")
    if p.working_set_tiled is not None:
        lines.append(f"  per-layer working set without tiling {gib(p.working_set_untiled).strip()} GiB, "
                     f"with {s.tiled_mlp_shards} shards {gib(p.working_set_tiled).strip()} GiB")
    else:
        t = working_set_units(sh, s.act_bytes, liger=s.liger_kernels,
                              mlp_shards=tiled_mlp_shards(s.tokens, sh.hidden), reentrant=s.reentrant)
        lines.append(f"  per-layer working set {gib(p.working_set_untiled).strip()} GiB; with tiled MLP "
                     f"{t * s.tokens * sh.hidden * s.act_bytes / GiB:.2f} GiB")
    need = p.gpu_peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES
    lines += [f"  {'predicted peak allocated':<60}{gib(p.gpu_peak)}",
              f"  {f'+ allocator slack {ALLOCATOR_SLACK:.0%} + CUDA context {CUDA_CONTEXT_BYTES / GiB:g} GiB = needed':<60}"
              f"{gib(need)}  of {hw.gpu_mem / GiB:g}: {'fits' if v.gpu_ok else 'DOES NOT FIT'}",
              "", f"Host RAM, per rank (x{hw.gpus} ranks on the host)"]
    for i in p.host:
        lines.append(f"  {(i.name + (f' ({i.note})' if i.note else ''))[:59]:<60}{gib(i.bytes)}")
    if p.host_at_init > p.host_steady:
        lines.append(f"  {'peak at init, before the pinned cache is emptied':<60}{gib(p.host_at_init)}")
    lines += [f"  {'total per rank':<60}{gib(p.host_per_rank)}",
              f"  {f'total, {hw.gpus} ranks (usable {HOST_USABLE:.0%} of {hw.host_mem / GiB:g} GiB)':<60}"
              f"{gib(p.host_total(hw.gpus))}  {'fits' if v.host_ok else 'DOES NOT FIT'}",
              f"  {'pinned host memory, all ranks':<60}{gib(p.pinned * hw.gpus)}"
              + ("" if hw.pinned_limit is None else
                 f"  of {hw.pinned_limit / GiB:.1f} limit: {'fits' if v.pinned_ok else 'DOES NOT FIT'}"), ""]
    placements = placement_rows(setup, hw)
    if placements:
        lines += placements + [""]
    best = max_seq_len_that_fits(setup, hw, setup_at=setup_at)
    lines.append(f"Largest max_seq_len that fits: {best:,} ({fmt_len(best)})" if best else
                 "Largest max_seq_len that fits: none (even 1K does not fit)")
    knobs = next_knobs(setup, hw, optional=optional)
    if not v.host_ok or not v.pinned_ok:
        lines.append(f"Host memory is the limit: {host_knob(p, hw)}")
    if not knobs and not v.gpu_ok:
        more = ("a larger --sequence-parallel (on more GPUs: each rank holds 1/N of a row)" if setup.sp > 1 else
                "--sequence-parallel N over N GPUs (now each rank holds its whole row)")
        lines.append("Next knob: none of the configured settings on these GPUs lowers the GPU peak further; "
                     f"{more}, a shorter --max-seq-len, or a GPU with more memory.")
    elif knobs:
        lines.append("Next knobs (re-planned at this length):")
        for k, before, after, mx in knobs:
            lines.append(f"  {k.flag}: {k.what}; peak {before / GiB:.2f} -> {after / GiB:.2f} GiB, "
                         + (f"max_seq_len {fmt_len(mx)}" if mx else f"but then {short_of(k.setup, hw)}"))
    return "\n".join(lines)


# ---- parsing helpers for the CLI ------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": KiB, "kb": 1000, "kib": KiB, "m": MiB, "mb": 1000 ** 2, "mib": MiB,
          "g": GiB, "gb": 1000 ** 3, "gib": GiB, "t": 1 << 40, "tb": 1000 ** 4, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'16GiB', '16G', '512 GB', '80' (GiB when no unit) -> bytes."""
    t = str(text).strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if not num or unit not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 16GiB, 512G, 48GB)")
    value = float(num)
    return int(value * (_UNITS[unit] if unit else GiB))


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


def _read_model_config(path: str) -> dict:
    import json
    from pathlib import Path

    from .errors import LongctxError

    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise LongctxError(f"--model {path}: cannot read the model config ({e})") from None
    if "text_config" in d:
        d = {**d, **d["text_config"]}
    return d


def cli_plan(cfg, optional: tuple[str, ...] = ()) -> str:
    """`train.py --plan`: the plan of the run `cfg` describes, resolved as train.py resolves it, on the hardware
    named by --gpus/--gpu-mem/--host-mem (default: this machine). Reads only JSON: no model, no GPU needed."""
    import dataclasses
    import os
    from pathlib import Path

    from . import resolve as resolve_mod
    from .errors import LongctxError

    try:
        gpu_bytes = parse_size(cfg.gpu_mem) if cfg.gpu_mem else None
        host_bytes = parse_size(cfg.host_mem) if cfg.host_mem else None
    except ValueError as e:
        raise LongctxError(str(e)) from None
    here = resolve_mod.Facts.detect()
    facts = here.as_target(gpus=cfg.gpus or (None if here.cuda else int(os.environ.get("WORLD_SIZE", 1))),
                           gpu_mem=gpu_bytes, host_mem=host_bytes, precision=cfg.precision)
    if facts.gpu_mem is None:
        raise LongctxError("--plan: no GPU here; name the target with --gpus N --gpu-mem SIZE (e.g. --gpu-mem 16GiB)")
    mc = _read_model_config(cfg.model)
    settings = resolve_mod.resolve(cfg, facts, mc, world=facts.gpus)
    from .data import estimate_resident_bytes

    data_bytes = estimate_resident_bytes(cfg.data)  # per rank; the tokens stay memory-mapped
    setup = dataclasses.replace(setup_from_resolved(settings, cfg, mc), data_bytes=data_bytes)
    hw = Hardware(gpus=facts.gpus, gpu_mem=int(facts.gpu_mem), host_mem=int(facts.host_mem or 0),
                  name="" if facts.assumed else facts.name)

    def setup_at(n: int) -> Setup:  # train.py's resolution at another --max-seq-len
        c = dataclasses.replace(cfg, max_seq_len=n)
        return dataclasses.replace(setup_from_resolved(resolve_mod.resolve(c, facts, mc, world=facts.gpus), c, mc),
                                   data_bytes=data_bytes)

    text = format_plan(setup, hw, model_name=Path(cfg.model).stem if Path(cfg.model).is_file() else cfg.model,
                       optional=optional, setup_at=setup_at)
    notes = ["; ".join(settings.header()[:2])] + [f"{k}: {v}" for k, v in settings.why.items()]
    if facts.assumed:
        notes.append("assumed: " + "; ".join(facts.assumed))
    on_gpu = states_on_gpu_hint(setup, hw)
    return (text + "\n\nResolved (as train.py would run it):\n  " + "\n  ".join(notes)
            + (f"\n\n{on_gpu}" if on_gpu else ""))


def states_on_gpu_hint(setup: Setup, hw: Hardware) -> Optional[str]:
    """Where ZeRO-3 offloads the optimizer but the whole model's states would fit the GPUs, what keeping them there
    would plan to: ds_configs/zero3.json skips the CPU Adam step. A hint, not a resolution: the ds_config is the
    user's choice (DeepSpeed's partial offload would leave GPU sub-groups' Adam states out of checkpoints)."""
    if setup.zero_stage != 3 or not setup.offload_optimizer or setup.optimizer == "none":
        return None
    alt = replace(setup, offload_params=False, offload_optimizer=False)
    peak = plan(alt).gpu_peak
    if peak > hw.gpu_usable:
        return None
    return (f"The whole model's states fit the GPUs: with --deepspeed ds_configs/zero3.json (parameters and optimizer "
            f"on the GPU) the plan is {peak / GiB:.1f} GiB per GPU of {hw.gpu_usable / GiB:.1f} usable. It skips the "
            "CPU Adam step: 3.2x faster at 16K and 1.1x at 128K on one H200 (8B shape at 8 layers, docs/RESULTS.md).")
