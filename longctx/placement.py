"""The decisions the memory plan makes, for longctx.resolve: where the bytes of a run go and what the GPU room allows.

  parameters      ds_config offload_param.device "auto": on the GPU only beside every optimizer state, where the plan
                  fits them all with the step (zero3.json's placement); else on the CPU, where they were measured
                  faster with the optimizer offloaded (OFFLOADED_PARAMS_WHY)
  optimizer       ds_config offload_optimizer.ratio "auto": every state on the GPU where the plan fits them beside the
                  step's activations, kept attention included where it is wanted (else all on the CPU, if that keeps
                  it); else all on the CPU where the host holds them; else the largest GPU share of the optimizer's
                  sub-groups that fits (Twin-Flow, longctx.twin_flow)
  overlapped step on where ZeRO-3 updates the optimizer on the CPU (longctx.overlap_step); sub-groups of one layer
  checkpoints     with --offload-gradient-checkpointing and no --num-offloaded-layers: as many layers in host RAM as
                  it holds, the rest on the GPU
  tiled MLP       only where the untiled step does not fit the GPU
  kept attention  for rows of 64K tokens and more, where the plan fits every layer's attention output on the GPU

Each decision is a function of a Candidates (the run's settings decided so far, and the plan of any placement of
them) returning the value and its `why`. Pure: no torch, no allocation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

from . import dsconfig, opbuild
from .errors import LongctxError
from .facts import Facts
from .flops import ModelShape
from .plan import plan, tiled_mlp_shards
from .plan_search import check_fit, largest_gpu_share, layer_sub_group_size
from .plan_settings import attention_kind, setup_from_settings
from .plan_states import optimizer_sub_groups
from .plan_types import GiB, Setup

# Selective checkpointing pays where attention's recompute is large. Its cost is per op, not per token: torch's
# selective checkpointing runs every op of a checkpointed layer through a Python dispatch mode, which a short step
# cannot hide. Measured on one H200 (8B shape, 8 layers, one document per row, docs/RESULTS.md), against upstream's
# best stack in the same runs: 16K 0.88x-0.95x with it (0.98x without, an earlier run), 64K 1.10x, 128K 1.18x
# (1.02x without). Rows shorter than this (per rank's attention work: S / sqrt(sp) under Ulysses) recompute attention.
KEEP_ATTENTION_MIN_TOKENS = 65536
KEEP_ATTENTION_WHY = (f"rows under {KEEP_ATTENTION_MIN_TOKENS // 1024}K tokens: attention's recompute is cheap there "
                      "and selective checkpointing's per-op overhead measured slower at 16K")

# Parameters offloaded where the optimizer states are on the CPU, even where they would fit the GPU: on one H200 (8B
# shape, 8 layers, one document per row, optimizer on CPU, docs/RESULTS.md) offloaded parameters ran 2.00 / 5.31 /
# 14.07 s per step at 16K / 64K / 128K against 3.12 / 6.17 / 15.03 s on the GPU, and an H100 agreed at 128K. Several
# GPUs are not measured yet: the same there. They stay on the GPU only beside every optimizer state (optimizer_ratio).
OFFLOADED_PARAMS_WHY = "offloaded parameters measured faster on one H200 at 16K-128K with the optimizer offloaded"

# Kept attention is worth more than GPU optimizer states on long rows. 8B shape at 8 layers, one H100, one 128K
# document, where the GPU holds every state only with attention recomputed (docs/RESULTS.md): all on the GPU,
# attention recomputed 11.59 s (fa4, 2026-12-06) / 12.83 s (sdpa_per_doc); states on the CPU, attention kept 11.20 s
# (fa4, 2026-12-05, DeepSpeed's serial CPU step) / 11.93 s (sdpa_per_doc, overlapped step), and stock_best (SDPA kept)
# 11.09 s in the all-GPU row's run. Not yet measured as auto's own choice.
KEEP_OVER_GPU_STATES_WHY = ("auto: all on the CPU, so the attention outputs can be kept (with every state on the GPU "
                            "the plan fits the step only with attention recomputed, which measured slower at 128K); "
                            "their update overlaps the next forward")


@dataclass(frozen=True)
class Candidates:
    """The settings decided before placement, and the memory plan of any placement of them on `hw`."""
    cfg: Any
    shape: ModelShape
    world: int
    precision: str
    lr: float
    facts: Facts                         # the machine
    checkpointing: str
    offload_impl: str
    num_offloaded_layers: int
    attention: str                       # the user's name (longctx.resolve.AttentionChoice.name)
    liger: bool
    tied_embeddings: bool
    unkeepable: str = ""                 # why this attention's outputs cannot be kept ("": they can)

    @property
    def hw(self) -> Optional[Facts]:
        """The machine to plan against; None without GPU memory to plan against (a CPU run)."""
        return self.facts if self.facts.gpu_mem else None

    @property
    def sp(self) -> int:
        return int(self.cfg.sequence_parallel)

    @property
    def dp_world(self) -> int:
        return max(1, self.world // self.sp)

    def keep_attention_auto_off(self) -> Optional[str]:
        """Why auto keeps no attention whatever the plan says; None where it keeps it if the plan fits the outputs."""
        if self.unkeepable:
            return self.unkeepable
        if self.hw is None:
            return "no GPU memory to plan against"
        if self.cfg.max_seq_len / math.sqrt(self.sp) < KEEP_ATTENTION_MIN_TOKENS:
            return KEEP_ATTENTION_WHY
        return None

    @property
    def keep_attention_wanted(self) -> bool:
        """Auto keeps attention here where the plan fits the outputs, so the optimizer's placement must leave them
        room where it can."""
        return (self.cfg.keep_attention is None and self.checkpointing != "none"
                and self.keep_attention_auto_off() is None)

    @property
    def keep_requested(self) -> bool:
        return bool(self.cfg.keep_attention) and self.checkpointing != "none"

    @property
    def shards_if_tiled(self) -> int:
        """The tiled MLP's shard count at this length: the count the plan checks and the model runs."""
        return tiled_mlp_shards(math.ceil(self.cfg.max_seq_len / self.sp) * self.cfg.micro_batch_size,
                                self.shape.hidden)

    def reentrant(self, keep: bool) -> bool:
        """Reentrant is the cheaper path; selective checkpointing needs the other."""
        return not (keep and self.cfg.keep_attention_by == "selective")

    def ds_config(self, offload_params: Optional[bool], ratio: Optional[float] = 1.0) -> dict:
        cfg = self.cfg
        ds = dsconfig.build(cfg.deepspeed, cfg, world_size=self.dp_world, precision=self.precision, lr=self.lr,
                            hidden_size=self.shape.hidden, on_cuda=self.facts.cuda, offload_params=offload_params,
                            optimizer_ratio=ratio, layer_sub_group_size=layer_sub_group_size(self.shape, self.dp_world))
        if self.sp > 1:
            ds["sequence_parallel_size"] = self.sp
        return ds

    def setup(self, ds: dict, shards: int = 1, *, keep: Optional[bool] = None,
              offloaded: Optional[int] = None) -> Setup:
        keep = self.keep_requested if keep is None else keep
        cfg = self.cfg
        return setup_from_settings(
            shape=self.shape, seq_len=cfg.max_seq_len, micro_batch=cfg.micro_batch_size, world=self.world,
            ds_config=ds, precision=self.precision, checkpointing=self.checkpointing, offload_impl=self.offload_impl,
            reentrant=self.reentrant(keep),
            num_offloaded_layers=self.num_offloaded_layers if offloaded is None else offloaded, keep_attention=keep,
            keep_attention_by=cfg.keep_attention_by, liger=self.liger, tiled_loss=cfg.tiled_loss,
            attention=attention_kind(self.attention, cfg.packing), sp=self.sp, tiled_mlp_shards=shards,
            tied_embeddings=self.tied_embeddings)

    def gpu_fits(self, s: Setup) -> bool:
        """Host RAM is the preflight's concern, not a reason to tile or to move anything to the GPU."""
        return check_fit(plan(s), self.hw).gpu_ok

    def fits_untiled_or_tiled(self, s: Setup) -> bool:
        """Untiled, or tiled where auto would tile."""
        return any(self.gpu_fits(dataclasses.replace(s, tiled_mlp_shards=n)) for n in (1, self.shards_if_tiled))


def requested_offload_param(ds_raw: dict) -> Optional[str]:
    """offload_param.device as the ds_config gives it ("auto", "cpu", "none", ...), or None (no such section)."""
    off = (ds_raw.get("zero_optimization") or {}).get("offload_param")
    if not isinstance(off, dict):
        return None
    return str(off.get("device", "none"))


def requested_optimizer_ratio(ds_raw: dict):
    """offload_optimizer.ratio as the ds_config gives it: "auto", a number, or None (no optimizer offload)."""
    off = (ds_raw.get("zero_optimization") or {}).get("offload_optimizer")
    if not isinstance(off, dict) or off.get("device", "none") in ("none", None):
        return None
    ratio = off.get("ratio", 1.0)
    if ratio == "auto":
        return ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise LongctxError(f"--deepspeed: zero_optimization.offload_optimizer.ratio must be \"auto\" or a number "
                           f"from 0 to 1 (the CPU share of the optimizer's sub-groups), got {ratio!r}")
    return float(ratio)


def resolve_zero_placement(c: Candidates, raw: dict) -> tuple[dict, dict[str, str]]:
    """(the ds_config with offload_param.device and offload_optimizer.ratio decided, their whys: "offload_params" and
    "optimizer", in the order decided)."""
    requested_params, requested_ratio = requested_offload_param(raw), requested_optimizer_ratio(raw)
    why: dict[str, str] = {}
    offload_params: Optional[bool] = None
    if requested_params == "auto":
        offload_params = c.hw is not None  # on the CPU, unless every optimizer state joins them on the GPU (below)
        if c.hw is None:
            why["offload_params"] = "auto: no GPU (CPU run): nothing to offload to"
        else:  # the reason: they would not fit the GPU, or they would and measured slower there
            fits = c.fits_untiled_or_tiled(c.setup(c.ds_config(False)))
            why["offload_params"] = ("auto: offloaded to CPU (" + ("the plan does not fit them on the GPU" if not fits
                                                                   else OFFLOADED_PARAMS_WHY) + ")")
    ratio: Optional[float] = None
    if requested_ratio == "auto":
        ratio, note, params_on_gpu = resolve_optimizer_ratio(c, requested_params, offload_params)
        why["optimizer"] = note
        if params_on_gpu:
            offload_params = False
            why["offload_params"] = ("auto: kept on the GPU with every optimizer state (ds_configs/zero3.json's "
                                     "placement: its step measured 3.2x faster at 16K on one H200)")
    elif requested_ratio is not None:
        ratio = requested_ratio
        why["optimizer"] = f"ds_config: offload_optimizer.ratio {ratio:g}" + (
            " (CPU share of the sub-groups; the rest on the GPU, longctx.twin_flow)" if ratio < 1 else "")
    if requested_params != "auto":
        why["offload_params"] = f"ds_config: offload_param.device {requested_params or 'none'}"
    return c.ds_config(offload_params, ratio), why


def resolve_optimizer_ratio(c: Candidates, requested_params: Optional[str],
                            offload_params: Optional[bool]) -> tuple[float, str, bool]:
    """offload_optimizer.ratio "auto", by the plan: (ratio, why, whether the parameters go to the GPU with the states).

    Every state on the GPU where it fits them beside the step's activations (the parameters too where they are
    "auto": zero3.json's placement, whose step measured 3.2x faster at 16K on one H200); else all on the CPU where the
    host holds them (their update overlaps the next forward); else the largest GPU share of the sub-groups that fits
    (Twin-Flow), the only way to fit such a host at all. A split is not taken for speed: its one measurement (8B at 32
    layers, one H100, 64K, 2026-12-06) spent 11.2 s of a 28.8 s step in DeepSpeed's step, and it takes GPU room the
    activations would use (tiled MLP on, where all on the CPU would not need it)."""
    hw = c.hw
    if hw is None:
        return 1.0, "auto: all on the CPU (no GPU to plan against)", False
    if requested_params not in ("auto", None, "none"):
        # parameters on the CPU by the ds_config with states on the GPU: a placement never measured, and the one
        # tried (8B shape, 8 layers, one H100, 2026-12-06) stepped in 6.8 s against ~1 s with the states on the CPU
        return 1.0, ("auto: all on the CPU (the ds_config puts the parameters on the CPU; states on the GPU beside "
                     "CPU parameters measured 6.8 s a step)"), False
    all_gpu_ds = c.ds_config(False if requested_params == "auto" else offload_params, 0.0)
    all_gpu = c.setup(all_gpu_ds)
    states_on_cpu = c.ds_config(offload_params, 1.0)

    @functools.cache
    def cpu_host() -> float:
        """The states' host bytes with no checkpoint offloaded (checkpoints take what host RAM is left:
        resolve_offloaded_layers); planned only where a branch below asks."""
        return plan(c.setup(states_on_cpu, offloaded=0)).host_total(hw.gpus)

    def host_holds() -> bool:
        return not hw.host_mem or cpu_host() <= hw.host_usable

    if c.fits_untiled_or_tiled(all_gpu):
        if (c.keep_attention_wanted and host_holds() and not c.gpu_fits(c.setup(all_gpu_ds, keep=True))
                and c.gpu_fits(c.setup(states_on_cpu, keep=True))):
            return 1.0, KEEP_OVER_GPU_STATES_WHY, False
        return 0.0, "auto: every state on the GPU (the plan fits them beside the step's activations)", \
            requested_params == "auto"
    split = None if host_holds() else largest_gpu_share(c.setup(states_on_cpu), c.fits_untiled_or_tiled)
    need = min(plan(dataclasses.replace(all_gpu, tiled_mlp_shards=n)).gpu_peak
               for n in (1, c.shards_if_tiled)) / GiB
    if split is None:
        return 1.0, (f"auto: all on the CPU (all on the GPU would plan {need:.1f} GiB of {hw.gpu_usable / GiB:.1f} "
                     "usable" + ("; the host holds them, and their update overlaps the next forward)" if host_holds()
                                 else ", and not even one sub-group's states fit beside the step)")), False
    on, off = optimizer_sub_groups(split)
    ratio = split.optimizer_ratio
    return ratio, (f"auto: split (Twin-Flow, ratio {ratio:g}): {len(on)} of {len(on) + len(off)} sub-groups' states "
                   f"on the GPU, the largest share the plan fits (all on the GPU would plan {need:.1f} GiB of "
                   f"{hw.gpu_usable / GiB:.1f} usable; all on the CPU {cpu_host() / GiB:.1f} GiB of host RAM of "
                   f"{hw.host_usable / GiB:.1f} usable)"), False


def resolve_overlap_step(requested: str, ds: dict, raw: dict, shape, dp_world: int) -> tuple[bool, str]:
    """On where ZeRO-3 updates the optimizer on the CPU (DeepSpeed's CPU Adam): the update then overlaps the next
    forward, bitwise the same step (longctx/overlap_step.py). A sub_group_size of "auto" becomes one decoder layer's
    partition, so that a module waits for about its own layer's update; DeepSpeed's default (1e9) otherwise."""
    zero = ds.get("zero_optimization", {}) or {}
    off = zero.get("offload_optimizer") if isinstance(zero.get("offload_optimizer"), dict) else {}
    blockers = [why for bad, why in ((int(zero.get("stage", 0) or 0) != 3, "it needs ZeRO-3"),
                                     ((off or {}).get("device") != "cpu", "it needs offload_optimizer.device cpu"),
                                     (not opbuild.needs_cpu_adam(ds), "it needs DeepSpeed's CPU Adam"))
                if bad]
    if requested == "on" and blockers:
        raise LongctxError("--overlap-optimizer-step on: " + "; ".join(blockers) + " (ds_config)")
    on = requested == "on" or (requested == "auto" and not blockers)
    note = "requested" if requested != "auto" else (
        "auto: on (ZeRO-3, optimizer on CPU: its update runs during the next forward)" if on
        else f"auto: off ({blockers[0]})")
    raw_zero = raw.get("zero_optimization", {}) or {}
    if on and "sub_group_size" in zero and str(raw_zero.get("sub_group_size")).lower() == "auto":
        zero["sub_group_size"] = layer_sub_group_size(shape, dp_world)
        note += f"; sub_group_size auto: one layer's partition ({zero['sub_group_size']:,} elements)"
    return on, note


def resolve_offloaded_layers(c: Candidates, ds: dict) -> tuple[int, Optional[str]]:
    """How many layers' checkpoints go to host RAM where --num-offloaded-layers is unset: all where the host holds
    them, else as many as it holds, the others kept on the GPU (whether those fit the GPU is decided by tiled MLP and
    the preflight, as for any other GPU bytes). The why replaces the checkpointing one where not all go."""
    hw = c.hw
    if c.checkpointing != "offload" or c.cfg.num_offloaded_layers is not None or hw is None or not hw.host_mem:
        return c.num_offloaded_layers, None
    layers = c.shape.layers
    n, note = checkpoints_in_host(lambda k: plan(c.setup(ds, offloaded=k)).host_total(hw.gpus), layers,
                                  hw.host_usable)
    return n, (f"{c.offload_impl} offloader, {n}/{layers} layers in host RAM ({note})" if note else None)


def checkpoints_in_host(host_bytes, layers: int, usable: float) -> tuple[int, str]:
    """The number of layers whose checkpoints go to host RAM, given `host_bytes(n)` (the plan's host total with n of
    them there): all where they fit, else the most that fit, with a note saying so ("" for all). Where not even the
    states fit with none there, all stay requested: the preflight refuses that run and names the knobs."""
    if host_bytes(layers) <= usable:
        return layers, ""
    fit = next((n for n in range(layers - 1, -1, -1) if host_bytes(n) <= usable), None)
    if fit is None:
        return layers, ""
    return fit, (f"auto: all {layers} would need {host_bytes(layers) / 2**30:.1f} GiB of host RAM, "
                 f"{usable / 2**30:.1f} usable; the other {layers - fit} stay on the GPU")


def resolve_tiled_mlp(c: Candidates, ds: dict) -> tuple[bool, int, str]:
    """(tiled, shards, why): requested, or (auto) only when the untiled step does not fit the GPU."""
    if c.cfg.tiled_mlp is not None:
        tiled, why = bool(c.cfg.tiled_mlp), "requested"
    elif c.hw is None:
        tiled, why = False, "auto: off (no GPU memory to plan against)"
    else:
        tiled = not c.gpu_fits(c.setup(ds))
        why = ("auto: on (the plan does not fit the GPU untiled)" if tiled else
               "auto: off (the untiled step fits the GPU)")
    return tiled, c.shards_if_tiled if tiled else 1, why


def resolve_keep_attention(c: Candidates, ds: dict, shards: int, *, varlen_kwargs: bool) -> tuple[bool, str]:
    """Selective checkpointing (longctx.selective) or the replay keeps attention's outputs: requested, or (auto)
    wherever the plan fits the kept outputs and nothing else stands in the way (Candidates.keep_attention_auto_off:
    an attention whose outputs cannot be kept, no GPU, rows too short to pay)."""
    cfg = c.cfg
    if c.checkpointing == "none":
        keep, why = False, "no checkpointing: nothing is recomputed"
    elif cfg.keep_attention and c.unkeepable:
        raise LongctxError(f"--keep-attention with --attn-implementation {c.attention}: {c.unkeepable}. Use "
                           f"--no-keep-attention with it, or fa4 (longctx's ops over the same kernels, which can be "
                           "kept)")
    elif cfg.keep_attention is not None:
        keep, why = bool(cfg.keep_attention), "requested"
    elif (off := c.keep_attention_auto_off()) is not None:
        keep, why = False, f"auto: off ({off})"
    else:
        keep = c.gpu_fits(c.setup(ds, shards, keep=True))
        why = ("auto: on (the plan fits every layer's attention output on the GPU; backward does not rerun "
               "attention)" if keep else "auto: off (the kept attention outputs would not fit the GPU)")
    by_replay = keep and cfg.keep_attention_by == "replay"
    if by_replay and not (varlen_kwargs or (c.attention == "sdpa" and not cfg.packing)):
        # the replay's attention function is a custom name, for which transformers builds no mask
        raise LongctxError(f"--keep-attention-by replay needs attention that is causal without a mask: "
                           f"sdpa_per_doc, fa4, varlen, flash_attention_2, or sdpa with --no-packing; not "
                           f"{c.attention}{' with packing' if c.attention == 'sdpa' else ''}")
    if by_replay:
        why += ("; by replay (gradients checked against no checkpointing on CPU and, 2026-12-05, on an H100: "
                "tests/test_selective.py)")
    return keep, why

