"""Memory model: predicted peak GPU memory per rank, host RAM and pinned memory of one training step.

    plan(Setup(...)) -> Plan                    the breakdown (bytes), GPU peak, host RAM, pinned

Pure functions, no torch: usable on a CPU machine for any target hardware. The rest of the planner builds on plan():
    longctx.plan_types      Setup, Item, Plan (the machine a plan is checked against: longctx.facts.Facts)
    longctx.plan_states     parameters, gradients and optimizer states per rank: GPU items, host RAM, pinned memory
    longctx.plan_search     optimizer-state placement, fit checks, max_seq_len_that_fits, next_knobs, host_knob
    longctx.plan_settings   the Setup of a run from its ds_config and resolved settings
    longctx.plan_report     format_plan (the text `train.py --plan` prints) and cli_plan

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

Host RAM per rank: the process (HOST_PROCESS_BYTES), the model states as DeepSpeed allocates them
(longctx.plan_states), the offloaded checkpoints, drawn from the same pinned cache, and the data's resident part;
the peak is that, or one of two moments of DeepSpeed's init when larger (host_at_init, host_at_flatten).

Global constants are below, each with its physical meaning and where its value comes from. Nothing is
tuned per configuration.
"""

from __future__ import annotations

import math

from .flops import ModelShape
from .plan_states import gpu_state_items, host_state_items, layer_params, pinned_block, rank_partitions
from .plan_types import GiB, MiB, Item, Plan, Setup


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
# Tiled MLP (DeepSpeed's TiledMLP): full-length tensors no shard count shrinks, as a floor under the MLP's part of the
# working set: the input gradient it allocates whole before the first shard and the concatenated output of the
# recompute; under reentrant checkpointing these come while the recomputed layer's outputs are still held. FITTED,
# provisional, on the two 96-shard rows at 384K (bench/results/2026-12-05_h100_1xgpu-8b-8L-long.json; left out of
# tests/test_plan_calibration.py's acceptance, FITTED_ON: without the floor the plan was 6% low for the fork's non-
# reentrant path and 30% low for upstream's reentrant one). The check: the 4-shard reentrant rows of 2026-12-04
# (placement, 16K-128K) plan -11% / +12% / +10% with it (-12 / +8 / +5% without).
TILED_MLP_MIN_UNITS = {False: 1.5, True: 4.5}  # keyed by reentrant
# Ulysses sequence parallelism: all-to-all send/receive buffers of q, k, v and the attention output.
SP_A2A_UNITS = 2.0
# Host RAM of a rank before the model: interpreter, torch + CUDA host-side libraries, DeepSpeed, NCCL. An estimate,
# not fitted: the one host measurement (Llama-3.2-3B shape, 1xH100, baseline 16K and 32K, commit 9e6909e's
# bench/results/2026-11-22_h100_llama3.2-3b_1x_nocap.json) leaves 1.97 GiB of RSS beyond the buffers counted below.
HOST_PROCESS_BYTES = 3.0 * GiB
# (HOST_INIT_BYTES_PER_PARAM = 3.5, fitted on that row as "ZeRO-3 init residue", is gone: it was the per-parameter
# partitions that zero.Init pins and DeepSpeed frees into torch's pinned cache, now counted block by block.)
# Tokens per chunk of longctx.modeling's chunked LM-head loss (kept equal to modeling.HEAD_CHUNK_TOKENS, which
# imports torch; tests/test_plan.py checks they agree). Liger's fused CE picks its own chunk, about one
# hidden-state tensor of logits: next_pow2(ceil(tokens / ceil(vocab / hidden))) rows.
HEAD_CHUNK_TOKENS = 8192


# ---- component formulas ---------------------------------------------------------------------------------
def _ratios(s: ModelShape) -> tuple[float, float, float]:
    h = s.hidden
    return s.heads * s.head_dim / h, s.kv_heads * s.head_dim / h, s.intermediate / h


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
                working_set_tiled=ws_units * U if setup.tiled_mlp_shards > 1 else None, host_at_init=at_init,
                host_at_flatten=host_at_flatten(setup))


def host_at_flatten(setup: Setup) -> float:
    """Host RAM of a rank while DeepSpeed 0.19.8's ZeRO-3 optimizer, its parameters on the GPU, flattens them
    (stage3.py _create_fp16_partitions_with_defragmentation -> zero/utils.py defragment): it copies this rank's
    parameter partitions into one pageable CPU buffer, frees them on the GPU and copies the buffer back. That is
    before any optimizer state exists and the buffer is freed after, so it is a peak of its own: 0 where it does
    not happen (parameters offloaded: flattened in pinned host memory counted among the states; no optimizer).
    One H100, 8B shape at 8 layers, all on the GPU: RSS rose 1.40 -> 6.66 GiB during the copy (2.79e9 x 2 B =
    5.20 GiB) and fell to 1.45 GiB after, a peak the steady plan (4.0 GiB) had missed."""
    if setup.zero_stage != 3 or setup.offload_params or setup.optimizer == "none":
        return 0.0
    return HOST_PROCESS_BYTES + sum(rank_partitions(setup)) * setup.act_bytes + setup.data_bytes
