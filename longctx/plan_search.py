"""Where the optimizer states go (offload_optimizer.ratio splits), whether a plan fits the hardware, the longest
length that fits, and the knobs and advice that re-plan a setup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from .dsconfig import UNSPLIT_SUB_GROUP_SIZE
from .flops import ModelShape
from .plan import plan, tiled_mlp_shards
from .plan_states import layer_params, optimizer_sub_groups, ratio_for
from .facts import Facts
from .plan_types import GiB, Plan, Setup


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
    split = setup.offload_optimizer and setup.optimizer_ratio < 1
    return replace(setup, offload_optimizer=True, optimizer_ratio=1.0,
                   sub_group_size=UNSPLIT_SUB_GROUP_SIZE if split else setup.sub_group_size)


def placement_rows(setup: Setup, hw: Facts) -> list[str]:
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

    @property
    def ok(self) -> bool:
        return self.gpu_ok and self.host_ok


def check_fit(p: Plan, hw: Facts) -> Verdict:
    """Whether the plan fits one GPU of `hw` and, with its `gpus` ranks, the host's RAM. Pinned memory is part of the
    host's (CUDA's pinned allocations are not bound by RLIMIT_MEMLOCK: the preflight notes that limit only)."""
    return Verdict(gpu_ok=p.gpu_peak <= hw.gpu_usable, host_ok=p.host_total(hw.gpus) <= hw.host_usable)


def fits(setup: Setup, hw: Facts) -> bool:
    return check_fit(plan(setup), hw).ok


def max_seq_len_that_fits(setup: Setup, hw: Facts, *, multiple: int = 1024, limit: int = 1 << 24,
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

    def effect(self, base: Setup, hw: Facts) -> tuple[float, float, int]:
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


def next_knobs(setup: Setup, hw: Facts, n: int = 3,
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


def short_of(setup: Setup, hw: Facts) -> str:
    """What a setup that fits at no length runs out of, at the shortest length the search tries (1K)."""
    v = check_fit(plan(replace(setup, seq_len=1024)), hw)
    what = [n for n, ok in (("GPU memory", v.gpu_ok), ("host RAM", v.host_ok)) if not ok]
    return "no length fits (" + " and ".join(what) + ")"


def host_knob(p: Plan, hw: Facts, usable: Optional[float] = None) -> str:
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
