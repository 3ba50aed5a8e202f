"""Model states per rank (parameters, gradients, optimizer states): parameter sizes, ZeRO-3's optimizer sub-groups,
what stays on the GPU and the host RAM and pinned memory as DeepSpeed allocates them.

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
hundredth of a GiB, RSS within HOST_PROCESS_BYTES (longctx.plan, which adds the process and the offloaded
checkpoints to these buffers; tests/test_plan_calibration.py).
"""

from __future__ import annotations

import math

from .flops import ModelShape
from .plan_types import PRECISIONS, Item, Setup


def layer_params(s: ModelShape) -> int:
    h, d = s.hidden, s.head_dim
    return h * s.heads * d * 2 + h * s.kv_heads * d * 2 + 3 * h * s.intermediate + 2 * h


def total_params(s: ModelShape, *, lm_head: bool = True, tied: bool = False) -> int:
    """Matmul weights, norms, embedding, and the LM head unless tied or left out."""
    emb = s.vocab * s.hidden
    return s.layers * layer_params(s) + emb + s.hidden + (emb if lm_head and not tied else 0)


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


def rank_partitions(setup: Setup) -> list[int]:
    """Elements of one rank's ZeRO-3 partition of every parameter, in module order (Init._aligned_size // world:
    each parameter padded to a multiple of the world size)."""
    sizes = parameter_sizes(setup.shape, lm_head=setup.lm_head, tied=setup.tied_embeddings)
    return [math.ceil(n / setup.world) for n in sizes]


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
    groups = sub_groups(rank_partitions(setup), setup.sub_group_size)
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
    P = sum(rank_partitions(setup))
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
