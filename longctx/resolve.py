"""One resolution of every "auto": the settings a run trains with, decided once.

    facts = Facts.detect()                      # or Facts.target(cfg) for `--plan` on another machine
    settings = resolve(cfg, facts, model_config, world)

`resolve` is a pure function of the typed Config, the device facts and the model config: no torch, no
allocation. train.py (through longctx.trainer), `--plan`, the preflight and the benchmark all call it, so the
run header, `resolved.json` in the run directory, the memory plan and a benchmark row describe the same run.

What it decides, and from what:
  precision      bf16 on sm80+, fp16 (dynamic loss scaling) on sm70, fp32 on CPU
  attention      fa4 (flash-attention-4's varlen kernels) where flash-attn-4 is installed on an sm90 GPU (the
                 architecture measured) in half precision (its step measured faster, docs/RESULTS.md); else
                 sdpa_per_doc wherever SDPA runs (every CUDA GPU and CPU): causal SDPA per document of a packed row,
                 cuDNN first on GPUs; no S x S mask either way. Named, transformers' own: flash_attention_2,
                 flash_attention_4 (stock's flash-attn-4 path: attention is never kept with it), sdpa, eager
  liger          on when liger-kernel is installed and a GPU is used
  checkpointing  none | plain | offload (fork's offloader or upstream's save_on_cpu), reentrant, offloaded layers
  ZeRO placement ds_config offload_param.device "auto": parameters stay on the GPU where the plan fits them,
                 else they go to CPU (PARAMS_ON_GPU_RULE)
                 ds_config offload_optimizer.ratio "auto": every optimizer state on the GPU (parameters too, where
                 they are "auto") where the plan fits them with the step's activations; else the largest GPU share
                 of the optimizer's sub-groups that fits (Twin-Flow, longctx.twin_flow); else all on the CPU
  tiled MLP      only when the memory plan says the untiled step does not fit the GPU (auto); a size rule no more
  tiled loss     chunked LM head + CE (no tokens x vocab logits) unless --no-tiled-loss
  overlapped step  the CPU optimizer sub-groups updated while the next forward runs (longctx.overlap_step): on
                 where ZeRO-3 has the optimizer offloaded to CPU; sub-groups of about one layer then (auto)
  the ds_config  longctx.dsconfig fills every "auto" from the above
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from . import gpu_extras
from .errors import LongctxError
from .plan import plan, tiled_mlp_shards
from .plan_search import check_fit, largest_gpu_share, layer_sub_group_size
from .plan_settings import attention_kind, kept_attention_label, setup_from_settings
from .plan_states import optimizer_sub_groups
from .plan_types import GiB, Hardware, Setup

# Attention choices the user can name, and what each is registered as with transformers.
SDPA_PER_DOC = "longctx_sdpa"   # longctx.attention.sdpa_per_doc_forward
VARLEN = "longctx_varlen"       # longctx.attention.varlen_attention_forward
FA4 = "longctx_fa4"             # longctx.attention.fa4_attention_forward (flash-attn-4's kernels, longctx.fa4)
# transformers' own flash-attention-4 (stock): flash-attn-4's autograd Function, whose kernels are launched outside
# torch's dispatcher, so neither selective checkpointing nor the replay can keep its outputs (longctx.fa4's docstring)
HF_FA4 = "flash_attention_4"
HF_FA4_KEEP = (f"transformers' {HF_FA4} runs flash-attn-4's kernels outside torch's dispatcher, where selective "
               "checkpointing and the replay cannot see them: attention would be recomputed anyway, with the "
               "dispatch mode's per-op cost on top")


@dataclass(frozen=True)
class Facts:
    """What the machine (or the target machine of a plan) offers. Probing imports torch; resolving does not."""
    kind: str = "cpu"                          # "cuda" | "cpu"
    name: str = "cpu"
    capability: Optional[tuple[int, int]] = None
    gpu_mem: Optional[int] = None              # bytes per GPU (total)
    gpus: int = 1                              # GPUs of the machine (planning) or ranks of this run
    host_mem: Optional[int] = None             # bytes of host RAM
    varlen_attn: bool = False                  # torch.nn.attention.varlen.varlen_attn exists
    flash_attn: bool = False                   # the flash-attn package is installed
    fa4: Optional[str] = None                  # flash-attn-4's version where its kernels import
    liger: bool = False                        # liger-kernel is installed
    liger_version: Optional[str] = None        # its version (the run header reports it)
    torch_cuda: Optional[str] = None           # torch.version.cuda (None: a CPU build)
    fork: bool = False                         # the installed transformers is our fork
    assumed: tuple[str, ...] = ()              # facts assumed rather than probed (plans for a target)

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def sm80(self) -> bool:
        return self.cuda and self.capability is not None and tuple(self.capability) >= (8, 0)

    @property
    def sm90(self) -> bool:
        return self.cuda and self.capability is not None and tuple(self.capability) >= (9, 0)

    @classmethod
    def detect(cls, gpus: Optional[int] = None) -> "Facts":
        import psutil
        import torch

        from .fa4 import installed_version

        liger = importlib.util.find_spec("liger_kernel") is not None
        common = dict(varlen_attn=_has_varlen_attn(), flash_attn=_has_flash_attn_2(), fa4=installed_version(),
                      liger=liger, liger_version=_version("liger-kernel") if liger else None,
                      torch_cuda=torch.version.cuda, fork=_is_fork(), host_mem=int(psutil.virtual_memory().total))
        if torch.cuda.is_available():
            dev = torch.cuda.current_device()
            return cls("cuda", torch.cuda.get_device_name(dev), tuple(torch.cuda.get_device_capability(dev)),
                       int(torch.cuda.get_device_properties(dev).total_memory),
                       gpus or torch.cuda.device_count(), **common)
        return cls("cpu", "cpu", None, None, gpus or 1, **common)

    def as_target(self, *, gpus: Optional[int], gpu_mem: Optional[int], host_mem: Optional[int],
                  precision: str) -> "Facts":
        """These facts, with the machine named by `--plan --gpus --gpu-mem --host-mem` put in. A GPU target
        named from a machine without one is assumed sm80+ (sm70 for --precision fp16) with the packages a GPU
        install of this project has (liger-kernel, torch's varlen attention)."""
        f = self
        if gpu_mem is not None and not self.cuda:
            cap = (7, 0) if precision == "fp16" else (8, 0)
            f = dataclasses.replace(f, kind="cuda", name="target GPU", capability=cap, varlen_attn=True, liger=True,
                                    assumed=f.assumed + (f"a GPU of sm{cap[0]}{cap[1]}+ with liger-kernel installed",))
        return dataclasses.replace(f, gpus=gpus or f.gpus, gpu_mem=gpu_mem or f.gpu_mem,
                                   host_mem=host_mem or f.host_mem)


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except Exception:  # noqa: BLE001
        return None


def _has_flash_attn_2() -> bool:
    """flash-attn (2.x) proper: flash-attn-4 installs into the same `flash_attn` package, without its functions."""
    try:  # finding a submodule imports the package: a broken install must not stop the probe
        return importlib.util.find_spec("flash_attn.flash_attn_interface") is not None
    except Exception:  # noqa: BLE001
        return False


def _has_varlen_attn() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _is_fork() -> bool:
    try:
        from transformers import fork_info  # type: ignore[attr-defined]  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


# Step times through train.py, one H100, 8B shape at 8 layers (bench/results/2026-12-05_h100_1xgpu-8b-8L-fa4.json,
# the slower of two timed steps): fa4 1.93 / 4.65 / 11.20 s against sdpa_per_doc's 1.96 / 4.90 / 12.18 s at 16K /
# 64K / 128K (one document: 1.014 / 1.054 / 1.088x), 5.04 against 5.35 s on stdlib rows at 128K; the same peaks.
FA4_AUTO = ("; auto: its step beat sdpa_per_doc's on an H100 (1.01-1.09x from 16K to 128K, 1.06x on packed real "
            "text)")
FA4_MISSING = (f"; flash-attn-4 would be auto here (with a CUDA 13 torch: pip install '{gpu_extras.FA4}'; 1.01-1.09x "
               "faster steps on an H100, docs/RESULTS.md)")


@dataclass(frozen=True)
class Resolved:
    """The settings of one run, every "auto" decided. `why` says, per setting, what decided it."""
    precision: str
    attention: str                   # the user's name: fa4 | sdpa_per_doc | varlen | flash_attention_2 |
                                     # flash_attention_4 (transformers') | sdpa | eager
    attn_impl: str                   # the name given to transformers
    attn_varlen_kwargs: bool         # the collator's cu_seq_lens / max_length go to the model forward
    liger: bool
    checkpointing: str               # none | plain | offload
    offload_impl: str                # fork | upstream (with checkpointing == offload)
    reentrant: bool                  # False when attention is kept by selective checkpointing (its need)
    num_offloaded_layers: int        # layers whose checkpoints live in host RAM
    keep_attention: bool             # attention outputs kept through the recompute (by keep_attention_by)
    tiled_mlp: bool
    tiled_mlp_shards: int            # ceil(tokens per rank / hidden) when tiled: the count the model runs
    tiled_loss: bool
    sequence_parallel: int
    offload_params: bool
    offload_optimizer: bool
    zero_stage: int
    lr: float
    world: int
    ds_config: dict = field(repr=False)
    s2_group: Optional[int] = None   # --s2-attn: LongLoRA's shifted sparse attention over attn_impl, in training
    keep_attention_by: str = "selective"  # selective | replay (how keep_attention keeps it)
    overlap_step: bool = False       # CPU optimizer sub-groups updated during the next forward (longctx.overlap_step)
    why: dict = field(default_factory=dict)
    optimizer_ratio: Optional[float] = None  # offload_optimizer.ratio (CPU share of the sub-groups) when offloaded

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def model_attn_impl(self) -> str:
        """What the model is built with: S2-Attn's name over the kernel with --s2-attn, else the kernel."""
        from .s2attn import NAME

        return NAME if self.s2_group else self.attn_impl

    @property
    def pass_varlen_kwargs(self) -> bool:
        """S2-Attn regroups rows itself: it takes (B, S) rows, not a flattened micro-batch."""
        return self.attn_varlen_kwargs and not self.s2_group

    def header(self) -> list[str]:
        """The run header's lines (also `--plan`'s)."""
        ck = {"none": "off", "plain": "on GPU",
              "offload": f"offloaded ({self.offload_impl}, {self.num_offloaded_layers} layers)"}[self.checkpointing]
        ck += kept_attention_label(self.keep_attention, self.keep_attention_by)
        opt = "optimizer" + (f" (ratio {self.optimizer_ratio:g}: the rest on the GPU)"
                             if self.optimizer_ratio is not None and self.optimizer_ratio < 1 else "")
        where = ", ".join(n for n, on in (("params", self.offload_params), (opt, self.offload_optimizer))
                          if on) or "nothing"
        return [f"precision {self.precision} | attention {self.attention} | liger {'on' if self.liger else 'off'} | "
                f"checkpointing {ck}{' (reentrant)' if self.reentrant and self.checkpointing != 'none' else ''}",
                f"ZeRO-{self.zero_stage}, on CPU: {where} | tiled MLP "
                f"{f'on ({self.tiled_mlp_shards} shards)' if self.tiled_mlp else 'off'} | tiled loss "
                f"{'on' if self.tiled_loss else 'off'} | sequence parallel {self.sequence_parallel} | optimizer step "
                f"{'overlapped with the next forward' if self.overlap_step else 'not overlapped'}"] + \
            [f"  {k}: {v}" for k, v in self.why.items()]


# ---- the decisions -------------------------------------------------------------------------------------
def resolve_precision(requested: str, facts: Facts) -> tuple[str, str]:
    if requested == "auto":
        if not facts.cuda:
            return "fp32", "auto: fp32 on CPU"
        return ("bf16", "auto: bf16 on sm80+") if facts.sm80 else ("fp16", "auto: fp16 with dynamic loss scaling "
                                                                       "below sm80")
    if requested == "bf16" and facts.cuda and not facts.sm80:
        cap = facts.capability or (0, 0)
        raise LongctxError(f"--precision bf16 needs sm80+; {facts.name} is sm{cap[0]}{cap[1]}: use fp16 (dynamic "
                           "loss scaling) or auto")
    if requested == "fp16" and not facts.cuda:
        raise LongctxError("--precision fp16 needs a CUDA GPU; on CPU use fp32 (auto) or bf16")
    return requested, "requested"


def resolve_liger(requested: str, facts: Facts) -> tuple[bool, str]:
    if requested == "off":
        return False, "requested"
    if requested == "on":
        if not facts.liger:
            raise LongctxError(f"--liger on, but liger-kernel is not installed (pip install {gpu_extras.LIGER})")
        if not facts.cuda:
            raise LongctxError("--liger on needs a CUDA GPU (Liger kernels are Triton kernels)")
        return True, "requested"
    on = facts.liger and facts.cuda
    return on, ("auto: liger-kernel installed, GPU" if on else
                "auto: off (" + ("no GPU" if not facts.cuda else "liger-kernel not installed") + ")")


@dataclass(frozen=True)
class AttentionChoice:
    name: str            # what the user names
    impl: str            # what transformers gets
    varlen_kwargs: bool  # pass cu_seq_lens_* / max_length_* to the model forward
    note: str


def fa4_head_dim_ok(head_dim: Optional[int], capability: Optional[tuple[int, int]]) -> bool:
    """flash-attention-4's head sizes (flash_attn.cute.interface._validate_head_dims, 4.0.0b36): multiples of 8 from
    8 to 256 on sm90; to 128, or 256, on sm100+. None: not known here (checked where the model is)."""
    if head_dim is None:
        return True
    if head_dim % 8 or not 8 <= head_dim <= 256:
        return False
    return capability is None or capability[0] < 10 or head_dim <= 128 or head_dim == 256


def resolve_attention(requested: str, facts: Facts, *, precision: str, packing: bool, max_seq_len: int,
                      dense_mask_max_len: int, head_dim: Optional[int] = None) -> AttentionChoice:
    """auto is fa4 where flash-attn-4 (the version measured) imports on an sm90 GPU in half precision: through
    train.py on an H100 its step was the faster at every length measured (FA4_AUTO), with the same peak. It runs on
    sm100+ too, but was never measured there: auto stays on the measured default and says so, and
    `--attn-implementation fa4` takes it anyway. Elsewhere auto is sdpa_per_doc: SDPA per document runs everywhere
    (cuDNN first, 530-543 TFLOP/s fwd + bwd on one 128K document on an H100/H200; on CPU and V100 SDPA's math /
    memory-efficient kernel), with no S x S mask, so packing works at any length on every device."""
    half = precision in ("bf16", "fp16")
    if requested == "auto":
        measured_cap, measured_version = gpu_extras.FA4_CAPABILITY, gpu_extras.FA4_VERSION
        measured_gpu = facts.cuda and tuple(facts.capability or ()) == measured_cap
        fa4_could_run = facts.fa4 and facts.sm90 and half
        if fa4_could_run and not fa4_head_dim_ok(head_dim, facts.capability):
            fa4_note = f"; not fa4: head_dim {head_dim} is outside flash-attention-4's sizes on this GPU"
        elif fa4_could_run and not measured_gpu:
            cap = facts.capability or (0, 0)
            fa4_note = (f"; not fa4: flash-attention-4 was measured on sm{measured_cap[0]}{measured_cap[1]} "
                        f"only (this GPU is sm{cap[0]}{cap[1]}); --attn-implementation fa4 takes it anyway")
        elif fa4_could_run:
            if facts.fa4 == measured_version:  # longctx.fa4 calls private entry points: only the version measured
                choice = resolve_attention("fa4", facts, precision=precision, packing=packing,
                                           max_seq_len=max_seq_len, dense_mask_max_len=dense_mask_max_len,
                                           head_dim=head_dim)
                return dataclasses.replace(choice, note=choice.note + FA4_AUTO)
            fa4_note = (f"; flash-attn-4 {facts.fa4} is installed, but auto takes only the version measured "
                        f"({measured_version}): --attn-implementation fa4 runs it")
        else:
            fa4_note = FA4_MISSING if measured_gpu and half else ""
        choice = resolve_attention("sdpa_per_doc", facts, precision=precision, packing=packing,
                                   max_seq_len=max_seq_len, dense_mask_max_len=dense_mask_max_len)
        return dataclasses.replace(choice, note=choice.note + fa4_note)
    if requested == "fa4":
        if not facts.fa4:
            raise LongctxError("--attn-implementation fa4 is unavailable: flash-attn-4 is not installed "
                               f"(pip install '{gpu_extras.FA4}' for a CUDA 13 torch; use auto or sdpa_per_doc without "
                               "it)")
        if not facts.sm90 or not half:
            raise LongctxError("--attn-implementation fa4 needs a CUDA GPU of sm90+ (its backward's requirement) and "
                               f"bf16/fp16 (device: {facts.name}, precision: {precision})")
        if not fa4_head_dim_ok(head_dim, facts.capability):
            raise LongctxError(f"--attn-implementation fa4: head_dim {head_dim} is not among flash-attention-4's "
                               f"sizes on {facts.name} (multiples of 8 up to 256 on sm90, up to 128 or 256 on "
                               "sm100+); use auto or sdpa_per_doc")
        measured_version = gpu_extras.FA4_VERSION
        other = "" if facts.fa4 == measured_version else f"; measured with {measured_version}, not this version"
        return AttentionChoice("fa4", FA4, True, f"flash-attention-4 {facts.fa4} varlen (packed via cu_seqlens){other}")
    if requested == "sdpa_per_doc":
        return AttentionChoice("sdpa_per_doc", SDPA_PER_DOC, True,
                               "SDPA per document (cuDNN, then flash, then memory-efficient)" if facts.cuda else
                               "SDPA per document (CPU)")
    if requested == "flash_attention_2":
        if not facts.flash_attn:
            raise LongctxError("--attn-implementation flash_attention_2 is unavailable: the flash-attn package "
                               "is not installed (use auto, sdpa_per_doc or varlen)")
        if not facts.sm80 or not half:
            raise LongctxError("--attn-implementation flash_attention_2 needs a CUDA GPU of sm80+ and bf16/fp16 "
                               f"(device: {facts.name}, precision: {precision})")
        return AttentionChoice("flash_attention_2", "flash_attention_2", True,
                               "flash-attn varlen (packed documents via cu_seqlens)")
    if requested == HF_FA4:
        # transformers' own registration (stock 5.23: ALL_ATTENTION_FUNCTIONS and the mask interface), importing
        # flash_attn.cute's functions; the same package, sm90+ and half-precision needs as fa4
        if not facts.fa4:
            raise LongctxError(f"--attn-implementation {HF_FA4} is unavailable: flash-attn-4 is not installed (pip "
                               f"install '{gpu_extras.FA4}' for a CUDA 13 torch)")
        if not facts.sm90 or not half:
            raise LongctxError(f"--attn-implementation {HF_FA4} needs a CUDA GPU of sm90+ and bf16/fp16 (device: "
                               f"{facts.name}, precision: {precision})")
        if not fa4_head_dim_ok(head_dim, facts.capability):
            raise LongctxError(f"--attn-implementation {HF_FA4}: head_dim {head_dim} is not among flash-attention-4's "
                               f"sizes on {facts.name}")
        return AttentionChoice(HF_FA4, HF_FA4, True, f"transformers' flash_attention_4 (flash-attn-4 {facts.fa4}'s "
                               "autograd Function; packed via cu_seqlens, transformers' padding-free path)")
    if requested == "varlen":
        if not facts.varlen_attn:
            raise LongctxError("--attn-implementation varlen is unavailable: this torch has no "
                               "torch.nn.attention.varlen.varlen_attn (needs torch >= 2.10)")
        if not facts.sm80 or not half:
            raise LongctxError("--attn-implementation varlen is unavailable here: PyTorch's varlen FlashAttention "
                               f"needs a CUDA GPU of sm80+ and bf16/fp16 (device: {facts.name}, "
                               f"precision: {precision})")
        return AttentionChoice("varlen", VARLEN, True, "torch.nn.attention.varlen.varlen_attn (packed via cu_seqlens)")
    # upstream's sdpa / eager: a dense mask is built for packed rows (sdpa) or always (eager's S x S scores)
    dense = requested == "eager" or packing
    if dense and max_seq_len > dense_mask_max_len:
        why = ("eager attention materializes S x S scores" if requested == "eager" else
               "packing with upstream's SDPA needs a dense block-diagonal S x S mask")
        raise LongctxError(
            f"refusing to build a dense {max_seq_len:,} x {max_seq_len:,} attention mask: {why} "
            f"(--dense-mask-max-len {dense_mask_max_len:,}). Use --attn-implementation auto (SDPA per document), "
            "or --no-packing, or a shorter --max-seq-len.")
    note = {"sdpa": "upstream SDPA, causal, no mask" if not packing else
            "upstream SDPA with a block-diagonal mask (short rows)", "eager": "eager (reference) attention"}[requested]
    return AttentionChoice(requested, requested, False, note)


def resolve_checkpointing(cfg, facts: Facts, layers: int) -> tuple[str, str, int, str]:
    """(mode, offload implementation, offloaded layers, why)."""
    if not cfg.gradient_checkpointing:
        return "none", "fork", 0, "requested: no checkpointing"
    if not cfg.offload_gradient_checkpointing:
        return "plain", "fork", 0, "checkpoints kept on the device"
    impl = cfg.offload_impl
    if impl == "fork" and not facts.fork:
        raise LongctxError(
            "--offload-gradient-checkpointing needs the patched transformers fork, but the installed transformers "
            "is upstream (no transformers.fork_info). Install ./transformers-fork (make apply-patches; pip install "
            "./transformers-fork), or pass --offload-impl upstream for upstream's save_on_cpu.")
    n = layers if cfg.num_offloaded_layers is None else max(0, min(layers, cfg.num_offloaded_layers))
    return "offload", impl, n, f"{impl} offloader, {n}/{layers} layers in host RAM"


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


def _offload_param_requested(ds_raw: dict) -> Optional[str]:
    off = (ds_raw.get("zero_optimization") or {}).get("offload_param")
    if not isinstance(off, dict):
        return None
    return str(off.get("device", "none"))


def _offload_ratio_requested(ds_raw: dict):
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


def resolve(cfg, facts: Facts, model_config: Any, world: int) -> Resolved:
    """Decide every setting of the run `cfg` describes on `world` ranks of the machine `facts` describes."""
    from . import dsconfig
    from .config import resolved_lr
    from .flops import ModelShape

    shape = ModelShape.from_config(model_config)
    why: dict[str, str] = {}
    precision, why["precision"] = resolve_precision(cfg.precision, facts)
    liger, why["liger"] = resolve_liger(cfg.liger, facts)
    attn = resolve_attention(cfg.attn_implementation, facts, precision=precision, packing=cfg.packing,
                             max_seq_len=cfg.max_seq_len, dense_mask_max_len=cfg.dense_mask_max_len,
                             head_dim=shape.head_dim)
    why["attention"] = attn.note
    mode, impl, n_off, why["checkpointing"] = resolve_checkpointing(cfg, facts, shape.layers)
    if not cfg.tiled_loss and liger:
        raise LongctxError("--no-tiled-loss needs Liger's fused cross-entropy off (--liger off): Liger's loss is "
                           "itself tiled")
    lr = resolved_lr(cfg)
    sp = int(cfg.sequence_parallel)
    dp_world = max(1, world // sp)

    raw = dsconfig.load(cfg.deepspeed)
    requested_params = _offload_param_requested(raw)
    requested_ratio = _offload_ratio_requested(raw)

    def build(offload_params: Optional[bool], ratio: Optional[float] = 1.0) -> dict:
        ds = dsconfig.build(cfg.deepspeed, cfg, world_size=dp_world, precision=precision, lr=lr,
                            hidden_size=shape.hidden, on_cuda=facts.cuda, offload_params=offload_params,
                            optimizer_ratio=ratio,
                            layer_sub_group_size=layer_sub_group_size(shape, dp_world))
        if sp > 1:
            ds["sequence_parallel_size"] = sp
        return ds

    keep_requested = bool(cfg.keep_attention) and mode != "none"
    keep_by = cfg.keep_attention_by

    def reentrant(keep: bool) -> bool:  # reentrant is the cheaper path; selective checkpointing needs the other
        return not (keep and keep_by == "selective")

    def setup(ds: dict, shards: int, keep: bool = keep_requested) -> Setup:
        return setup_from_settings(
            shape=shape, seq_len=cfg.max_seq_len, micro_batch=cfg.micro_batch_size, world=world, ds_config=ds,
            precision=precision, checkpointing=mode, offload_impl=impl, reentrant=reentrant(keep),
            num_offloaded_layers=n_off, keep_attention=keep, keep_attention_by=keep_by, liger=liger,
            tiled_loss=cfg.tiled_loss,
            attention=attention_kind(attn.name, cfg.packing), sp=sp, tiled_mlp_shards=shards,
            tied_embeddings=bool(_get(model_config, "tie_word_embeddings", False)))

    def setup_at_offloaded(ds: dict, n: int) -> Setup:
        nonlocal n_off
        saved, n_off = n_off, n
        try:
            return setup(ds, 1)
        finally:
            n_off = saved

    shards_if_tiled = tiled_mlp_shards(math.ceil(cfg.max_seq_len / sp) * cfg.micro_batch_size, shape.hidden)
    hw = Hardware(gpus=facts.gpus, gpu_mem=facts.gpu_mem, host_mem=facts.host_mem or 0) \
        if facts.gpu_mem else None

    def gpu_fits(s: Setup) -> bool:  # host RAM is the preflight's concern, not a reason to tile
        return check_fit(plan(s), hw).gpu_ok

    # Where the parameters live (ds_config offload_param.device "auto"): on the GPU when the plan fits them there.
    if requested_params == "auto":
        if hw is None:
            offload_params, why["offload_params"] = False, "auto: no GPU (CPU run): nothing to offload to"
        else:
            on_gpu = build(False)
            fits = any(gpu_fits(setup(on_gpu, s)) for s in (1, shards_if_tiled))
            offload_params = not (fits and PARAMS_ON_GPU_RULE(cfg.max_seq_len, facts))
            why["offload_params"] = "auto: " + ("kept on the GPU (the plan fits them there)" if not offload_params
                                                else "offloaded to CPU (" + ("the plan does not fit them on the GPU"
                                                                             if not fits else PARAMS_ON_GPU_WHY) + ")")
    else:
        offload_params = None

    # Where the optimizer states live (ds_config offload_optimizer.ratio "auto"), by the plan: every state on the
    # GPU where it fits them beside the step's activations (the parameters too where they are "auto": zero3.json's
    # placement, whose step measured 3.2x faster at 16K on one H200); else all on the CPU where the host holds them
    # (their update overlaps the next forward); else the largest GPU share of the sub-groups that fits (Twin-Flow),
    # the only way to fit such a host at all. A split is not taken for speed: its one measurement (8B at 32 layers,
    # one H100, 64K, 2026-12-06) spent 11.2 s of a 28.8 s step in DeepSpeed's step, and it takes GPU room the
    # activations would use (tiled MLP on, where all on the CPU would not need it).
    ratio: Optional[float] = None
    if requested_ratio == "auto":
        if hw is None:
            ratio, why["optimizer"] = 1.0, "auto: all on the CPU (no GPU to plan against)"
        elif requested_params not in ("auto", None, "none") and offload_params is not False:
            # parameters on the CPU by the ds_config with states on the GPU: a placement never measured, and the one
            # tried (8B shape, 8 layers, one H100, 2026-12-06) stepped in 6.8 s against ~1 s with the states on the CPU
            ratio, why["optimizer"] = 1.0, ("auto: all on the CPU (the ds_config puts the parameters on the CPU; "
                                            "states on the GPU beside CPU parameters measured 6.8 s a step)")
        else:
            def fits_any(s: Setup) -> bool:  # untiled, or tiled where auto would tile
                return any(gpu_fits(dataclasses.replace(s, tiled_mlp_shards=n)) for n in (1, shards_if_tiled))

            params_too = False if requested_params == "auto" else offload_params
            all_gpu = setup(build(params_too, 0.0), 1)
            if fits_any(all_gpu):
                ratio = 0.0
                why["optimizer"] = "auto: every state on the GPU (the plan fits them beside the step's activations)"
                if requested_params == "auto":
                    offload_params = False
                    why["offload_params"] = ("auto: kept on the GPU with every optimizer state (ds_configs/zero3.json's "
                                             "placement: its step measured 3.2x faster at 16K on one H200)")
            else:
                states_on_cpu = build(offload_params, 1.0)
                # the states' host bytes with no checkpoint offloaded: checkpoints take what host RAM is left (below)
                cpu_host = plan(setup_at_offloaded(states_on_cpu, 0)).host_total(hw.gpus)
                host_holds = not hw.host_mem or cpu_host <= hw.host_usable
                split = None if host_holds else largest_gpu_share(setup(states_on_cpu, 1), fits_any)
                need = min(plan(dataclasses.replace(all_gpu, tiled_mlp_shards=n)).gpu_peak
                           for n in (1, shards_if_tiled)) / GiB
                if split is None:
                    ratio = 1.0
                    why["optimizer"] = (f"auto: all on the CPU (all on the GPU would plan {need:.1f} GiB of "
                                        f"{hw.gpu_usable / GiB:.1f} usable" + (
                                            "; the host holds them, and their update overlaps the next forward)"
                                            if host_holds else
                                            ", and not even one sub-group's states fit beside the step)"))
                else:
                    ratio = split.optimizer_ratio
                    on, off = optimizer_sub_groups(split)
                    why["optimizer"] = (f"auto: split (Twin-Flow, ratio {ratio:g}): {len(on)} of {len(on) + len(off)} "
                                        f"sub-groups' states on the GPU, the largest share the plan fits (all on the "
                                        f"GPU would plan {need:.1f} GiB of {hw.gpu_usable / GiB:.1f} usable; "
                                        f"all on the CPU {cpu_host / GiB:.1f} GiB of host RAM of "
                                        f"{hw.host_usable / GiB:.1f} usable)")
    elif requested_ratio is not None:
        ratio = requested_ratio
        why["optimizer"] = f"ds_config: offload_optimizer.ratio {ratio:g}" + (
            " (CPU share of the sub-groups; the rest on the GPU, longctx.twin_flow)" if ratio < 1 else "")
    ds = build(offload_params, ratio)
    zero = ds.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0) or 0)
    on_cpu = {sec: isinstance(zero.get(sec), dict) and zero[sec].get("device") not in (None, "none")
              for sec in ("offload_param", "offload_optimizer")}
    if requested_params != "auto":
        why["offload_params"] = f"ds_config: offload_param.device {requested_params or 'none'}"

    overlap, why["overlap_step"] = resolve_overlap_step(cfg.overlap_optimizer_step, ds, raw, shape, dp_world)

    # How many layers' checkpoints go to host RAM (--num-offloaded-layers unset): all of them where the host holds
    # them, else as many as it holds, the others kept on the GPU (whether those fit the GPU is decided below, by
    # tiled MLP and the preflight, as for any other GPU bytes).
    if mode == "offload" and cfg.num_offloaded_layers is None and hw is not None and hw.host_mem:
        n_off, note = checkpoints_in_host(lambda n: plan(setup_at_offloaded(ds, n)).host_total(hw.gpus),
                                          shape.layers, hw.host_usable)
        if note:
            why["checkpointing"] = f"{impl} offloader, {n_off}/{shape.layers} layers in host RAM ({note})"

    # Tiled MLP: requested, or (auto) only when the untiled step does not fit the GPU.
    if cfg.tiled_mlp is not None:
        tiled, why["tiled_mlp"] = bool(cfg.tiled_mlp), "requested"
    elif hw is None:
        tiled, why["tiled_mlp"] = False, "auto: off (no GPU memory to plan against)"
    else:
        untiled_fits = gpu_fits(setup(ds, 1))
        tiled = not untiled_fits
        why["tiled_mlp"] = ("auto: off (the untiled step fits the GPU)" if untiled_fits else
                            "auto: on (the plan does not fit the GPU untiled)")
    shards = shards_if_tiled if tiled else 1

    # Selective checkpointing (longctx.selective): requested, or (auto) wherever the plan fits the kept outputs.
    if mode == "none":
        keep, why["keep_attention"] = False, "no checkpointing: nothing is recomputed"
    elif cfg.keep_attention and attn.name == HF_FA4:
        raise LongctxError(f"--keep-attention with --attn-implementation {HF_FA4}: {HF_FA4_KEEP}. Use "
                           f"--no-keep-attention with it, or fa4 (longctx's ops over the same kernels, which can be "
                           "kept)")
    elif cfg.keep_attention is not None:
        keep, why["keep_attention"] = bool(cfg.keep_attention), "requested"
    elif attn.name == HF_FA4:
        keep, why["keep_attention"] = False, f"auto: off ({HF_FA4_KEEP})"
    elif hw is None:
        keep, why["keep_attention"] = False, "auto: off (no GPU memory to plan against)"
    elif cfg.max_seq_len / math.sqrt(sp) < KEEP_ATTENTION_MIN_TOKENS:
        keep, why["keep_attention"] = False, f"auto: off ({KEEP_ATTENTION_WHY})"
    else:
        keep = gpu_fits(setup(ds, shards, keep=True))
        why["keep_attention"] = ("auto: on (the plan fits every layer's attention output on the GPU; backward "
                                 "does not rerun attention)" if keep else
                                 "auto: off (the kept attention outputs would not fit the GPU)")
    if keep and keep_by == "replay" and not (attn.varlen_kwargs or (attn.name == "sdpa" and not cfg.packing)):
        # the replay's attention function is a custom name, for which transformers builds no mask
        raise LongctxError(f"--keep-attention-by replay needs attention that is causal without a mask: "
                           f"sdpa_per_doc, fa4, varlen, flash_attention_2, or sdpa with --no-packing; not "
                           f"{attn.name}{' with packing' if attn.name == 'sdpa' else ''}")
    if keep and keep_by == "replay":
        why["keep_attention"] += ("; by replay (gradients checked against no checkpointing on CPU and, 2026-12-05, "
                                  "on an H100: tests/test_selective.py)")
    s2_group = None
    if cfg.s2_attn is not None:
        from .s2attn import resolve_group_size

        s2_group = resolve_group_size(cfg.s2_attn, cfg.max_seq_len)
        why["attention"] += f"; S2-Attn in training (group {s2_group}, half the heads shifted by {s2_group // 2})"
    return Resolved(precision=precision, attention=attn.name, attn_impl=attn.impl,
                    attn_varlen_kwargs=attn.varlen_kwargs, liger=liger, checkpointing=mode, offload_impl=impl,
                    reentrant=reentrant(keep), num_offloaded_layers=n_off, keep_attention=keep,
                    keep_attention_by=keep_by, tiled_mlp=tiled, tiled_mlp_shards=shards,
                    tiled_loss=cfg.tiled_loss, sequence_parallel=sp, offload_params=on_cpu["offload_param"],
                    offload_optimizer=on_cpu["offload_optimizer"], zero_stage=stage, lr=lr, world=world,
                    ds_config=ds, why=why, s2_group=s2_group, overlap_step=overlap,
                    optimizer_ratio=(float(zero["offload_optimizer"].get("ratio", 1.0))
                                     if on_cpu["offload_optimizer"] else None))


def resolve_overlap_step(requested: str, ds: dict, raw: dict, shape, dp_world: int) -> tuple[bool, str]:
    """On where ZeRO-3 updates the optimizer on the CPU (DeepSpeed's CPU Adam): the update then overlaps the next
    forward, bitwise the same step (longctx/overlap_step.py). A sub_group_size of "auto" becomes one decoder layer's
    partition, so that a module waits for about its own layer's update; DeepSpeed's default (1e9) otherwise."""
    from . import opbuild

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


# Selective checkpointing pays where attention's recompute is large. Its cost is per op, not per token: torch's
# selective checkpointing runs every op of a checkpointed layer through a Python dispatch mode, which a short step
# cannot hide. Measured on one H200 (8B shape, 8 layers, one document per row, docs/RESULTS.md), against upstream's
# best stack in the same runs: 16K 0.88x-0.95x with it (0.98x without, an earlier run), 64K 1.10x, 128K 1.18x
# (1.02x without). Rows shorter than this (per rank's attention work: S / sqrt(sp) under Ulysses) recompute attention.
KEEP_ATTENTION_MIN_TOKENS = 65536
KEEP_ATTENTION_WHY = (f"rows under {KEEP_ATTENTION_MIN_TOKENS // 1024}K tokens: attention's recompute is cheap there "
                      "and selective checkpointing's per-op overhead measured slower at 16K")


# Parameters on the GPU or offloaded (ds_config offload_param.device "auto"), where both fit: decided by
# measurement. On one H200 (8B shape, 8 layers, one document per row, optimizer on CPU, docs/RESULTS.md) offloaded
# parameters ran 2.00 / 5.31 / 14.07 s per step at 16K / 64K / 128K against 3.12 / 6.17 / 15.03 s on the GPU, and
# the H100 measurement agreed at 128K. Several GPUs are not measured yet: the rule is the same there.
PARAMS_ON_GPU_WHY = "offloaded parameters measured faster on one H200 at 16K-128K with the optimizer offloaded"


def PARAMS_ON_GPU_RULE(max_seq_len: int, facts: Facts) -> bool:  # noqa: N802  (a named rule, not a helper)
    return False


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def write(settings: Resolved, path) -> None:
    """resolved.json in the run directory (atomic)."""
    import os
    from pathlib import Path

    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(settings.to_dict(), indent=2, default=str))
    os.replace(tmp, p)
