"""One resolution of every "auto": the settings a run trains with, decided once.

    facts = Facts.detect()                      # or .as_target(...) for `--plan` on another machine
    settings = resolve(cfg, facts, model_config, world)
    settings = resolve_schedule(settings, cfg, steps_per_epoch)   # once the data are read (longctx.trainer)

`resolve` is a pure function of the typed Config, the device facts (longctx.facts) and the model config: no torch,
no allocation. train.py (through longctx.trainer), `--plan`, the preflight and the benchmark all call it, so the run
header, `resolved.json` in the run directory, the memory plan and a benchmark row describe the same run. Every field
of Resolved has its reason in `why`; `resolve()` is the sequence of the decisions below, one function each.

What it decides, and from what:
  precision      bf16 on sm80+, fp16 (dynamic loss scaling) on sm70, fp32 on CPU
  attention      fa4 (flash-attention-4's varlen kernels) where flash-attn-4 is installed on an sm90 GPU (the
                 architecture measured) in half precision (its step measured faster, docs/RESULTS.md); else
                 sdpa_per_doc wherever SDPA runs (every CUDA GPU and CPU): causal SDPA per document of a packed row,
                 cuDNN first on GPUs; no S x S mask either way. Named, transformers' own: flash_attention_2,
                 flash_attention_4 (stock's flash-attn-4 path: attention is never kept with it), sdpa, eager
  liger          on when liger-kernel is installed and a GPU is used
  checkpointing  none | plain | offload (fork's offloader or upstream's save_on_cpu), reentrant, offloaded layers
  lr             --lr, else 3e-3 for the embedded tiny model (random init), 1e-5 for a model you bring
  the schedule   total steps (--max-steps, else --epochs of the batch schedule), warmup, the cosine floor
  tokenizer      --tokenizer, else the model directory's, else the embedded one
  placement      by the memory plan (longctx.placement): ZeRO offload of parameters and optimizer states (on the GPU
                 together where the plan fits them all, else on the CPU, else a Twin-Flow split of the states), the
                 overlapped CPU optimizer step, checkpoints in host RAM, tiled MLP, kept attention
  tiled loss     chunked LM head + CE (no tokens x vocab logits) unless --no-tiled-loss
  the ds_config  longctx.dsconfig fills every "auto" from the above
  eval attention for evaluation's generation and scoring (longctx.evaluation): resolve_eval_attention
  S2-Attn group  --s2-attn N, or max_seq_len / 4 for --s2-attn alone (longctx.s2attn runs it)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import dsconfig, gpu_extras
from .config import DEFAULT_MODEL, DEFAULT_TOKENIZER
from .errors import LongctxError
from .facts import Facts  # noqa: F401  (callers name it resolve.Facts)
from .flops import ModelShape
from .placement import KEEP_ATTENTION_MIN_TOKENS  # noqa: F401  (bench/techniques.py reads it here)
from .placement import (Candidates, resolve_keep_attention, resolve_offloaded_layers,
                        resolve_overlap_step, resolve_tiled_mlp, resolve_zero_placement)
from .plan_settings import kept_attention_label

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


# Step times through train.py, one H100, 8B shape at 8 layers (bench/results/2026-12-05_h100_1xgpu-8b-8L-fa4.json,
# the slower of two timed steps): fa4 1.93 / 4.65 / 11.20 s against sdpa_per_doc's 1.96 / 4.90 / 12.18 s at 16K /
# 64K / 128K (one document: 1.014 / 1.054 / 1.088x), 5.04 against 5.35 s on stdlib rows at 128K; the same peaks.
FA4_AUTO = ("; auto: its step beat sdpa_per_doc's on an H100 (1.01-1.09x from 16K to 128K, 1.06x on packed real "
            "text)")
FA4_MISSING = (f"; flash-attn-4 would be auto here (with a CUDA 13 torch: pip install '{gpu_extras.FA4}'; 1.01-1.09x "
               "faster steps on an H100, docs/RESULTS.md)")


@dataclass(frozen=True)
class Resolved:
    """The settings of one run, every "auto" decided. `why` says, per field, what decided it."""
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
    tokenizer: str = ""              # the tokenizer directory
    total_steps: Optional[int] = None     # optimizer steps of the run (resolve_schedule; None before the data)
    warmup_steps: Optional[int] = None    # the lr schedule's warmup
    min_lr_rate: Optional[float] = None   # cosine_with_min_lr's floor, a fraction of lr (None: other schedules)

    # The reasons the run header and `--plan` print, in the order decided; the other fields' reasons (settings that
    # follow from these or are taken as given) are in resolved.json.
    REPORTED = ("precision", "liger", "attention", "checkpointing", "offload_params", "optimizer", "overlap_step",
                "tiled_mlp", "keep_attention")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def reasons(self) -> list[tuple[str, str]]:
        """(setting, why) of the decisions the run header and `--plan` report."""
        return [(k, v) for k, v in self.why.items() if k in self.REPORTED]

    @property
    def model_attn_impl(self) -> str:
        """What the model is built with: S2-Attn's name over the kernel with --s2-attn, else the kernel."""
        from .s2attn import NAME  # s2attn imports torch, which resolving does not

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
            [f"  {k}: {v}" for k, v in self.reasons()]


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


FA4_NOT_INSTALLED = (f"flash-attn-4 is not installed (pip install '{gpu_extras.FA4}' for a CUDA 13 torch; use auto "
                     "or sdpa_per_doc without it)")


def refuse_unless_runs(name: str, facts: Facts, precision: str, *, missing: str, sm: int, whose: str = "",
                       fa4_head_dim: Optional[int] = None) -> None:
    """Refuse a kernel named by --attn-implementation where it cannot run: `missing` says what is not installed and
    how to get it ("": installed); every such kernel needs a CUDA GPU of sm`sm`+ (`whose` requirement) and
    bf16/fp16; flash-attention-4's also a head size it has (`fa4_head_dim`, where given)."""
    flag = f"--attn-implementation {name}"
    if missing:
        raise LongctxError(f"{flag} is unavailable: {missing}")
    if not facts.sm_at_least(sm) or precision not in ("bf16", "fp16"):
        raise LongctxError(f"{flag} is unavailable here: it needs a CUDA GPU of sm{sm}+{whose} and bf16/fp16 "
                           f"(device: {facts.name}, precision: {precision})")
    if fa4_head_dim is not None and not fa4_head_dim_ok(fa4_head_dim, facts.capability):
        raise LongctxError(f"{flag}: head_dim {fa4_head_dim} is not among flash-attention-4's sizes on {facts.name} "
                           "(multiples of 8 up to 256 on sm90, up to 128 or 256 on sm100+); use auto or sdpa_per_doc")


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
        refuse_unless_runs("fa4", facts, precision, missing="" if facts.fa4 else FA4_NOT_INSTALLED, sm=90,
                           whose=" (its backward's requirement)", fa4_head_dim=head_dim)
        measured_version = gpu_extras.FA4_VERSION
        other = "" if facts.fa4 == measured_version else f"; measured with {measured_version}, not this version"
        return AttentionChoice("fa4", FA4, True, f"flash-attention-4 {facts.fa4} varlen (packed via cu_seqlens){other}")
    if requested == "sdpa_per_doc":
        return AttentionChoice("sdpa_per_doc", SDPA_PER_DOC, True,
                               "SDPA per document (cuDNN, then flash, then memory-efficient)" if facts.cuda else
                               "SDPA per document (CPU)")
    if requested == "flash_attention_2":
        refuse_unless_runs("flash_attention_2", facts, precision, sm=80, missing="" if facts.flash_attn else
                           "the flash-attn package is not installed (use auto, sdpa_per_doc or varlen)")
        return AttentionChoice("flash_attention_2", "flash_attention_2", True,
                               "flash-attn varlen (packed documents via cu_seqlens)")
    if requested == HF_FA4:
        # transformers' own registration (stock 5.23: ALL_ATTENTION_FUNCTIONS and the mask interface), importing
        # flash_attn.cute's functions; the same package, sm90+ and half-precision needs as fa4
        refuse_unless_runs(HF_FA4, facts, precision, missing="" if facts.fa4 else FA4_NOT_INSTALLED, sm=90,
                           fa4_head_dim=head_dim)
        return AttentionChoice(HF_FA4, HF_FA4, True, f"transformers' flash_attention_4 (flash-attn-4 {facts.fa4}'s "
                               "autograd Function; packed via cu_seqlens, transformers' padding-free path)")
    if requested == "varlen":
        refuse_unless_runs("varlen", facts, precision, sm=80, whose=" (PyTorch's varlen FlashAttention)",
                           missing="" if facts.varlen_attn else
                           "this torch has no torch.nn.attention.varlen.varlen_attn (needs torch >= 2.10)")
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


def resolve_lr(cfg) -> tuple[float, str]:
    """--lr, else by what is trained: the embedded tiny model starts from random weights and learns in the few steps
    of `make run` at 3e-3; a model you bring is pretrained, and 1e-5 is full fine-tuning's usual peak for it."""
    if cfg.lr is not None:
        return cfg.lr, "requested"
    if cfg.uses_embedded_model:
        return 3e-3, "auto: 3e-3 for the embedded tiny model (random init, a few steps)"
    return 1e-5, "auto: 1e-5, full fine-tuning of a model you bring"


def resolve_tokenizer(cfg) -> tuple[str, str]:
    """The tokenizer directory: --tokenizer, else the model directory's own, else the embedded one (a config .json
    or a directory without a tokenizer). `cfg` needs only .tokenizer and .model (evaluation passes its own)."""
    if cfg.tokenizer:
        return cfg.tokenizer, "requested"
    m = Path(cfg.model)
    if m.is_dir() and ((m / "tokenizer.json").exists() or (m / "tokenizer_config.json").exists()):
        return str(m), "auto: the --model directory's own"
    embedded = Path(cfg.model).resolve() == Path(DEFAULT_MODEL)
    return DEFAULT_TOKENIZER, "auto: the embedded tokenizer" + ("" if embedded else f" (--model {cfg.model} has none)")


def resolve_schedule(settings: Resolved, cfg, steps_per_epoch: int) -> Resolved:
    """`settings` with the run's length and lr schedule decided, once the batch schedule's steps per epoch are known
    (longctx.trainer, after reading the data): --max-steps, else --epochs of it; the warmup, --warmup-steps or
    --warmup-ratio of the total; cosine_with_min_lr's floor, which transformers requires and does not default."""
    if cfg.max_steps > 0:
        total, why_total = cfg.max_steps, "requested (--max-steps)"
    else:
        total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
        why_total = f"--epochs {cfg.epochs:g} x {steps_per_epoch} steps per epoch (the batch schedule)"
    if cfg.warmup_steps >= 0:
        warmup, why_warmup = cfg.warmup_steps, "requested (--warmup-steps)"
    else:
        warmup = int(cfg.warmup_ratio * total)
        why_warmup = f"--warmup-ratio {cfg.warmup_ratio:g} of {total} steps"
    if cfg.lr_scheduler == "cosine_with_min_lr":
        floor, why_floor = 0.1, "cosine_with_min_lr: the lr decays to 10% of its peak"
    else:
        floor, why_floor = None, f"{cfg.lr_scheduler}: no floor"
    return dataclasses.replace(settings, total_steps=total, warmup_steps=warmup, min_lr_rate=floor,
                               why={**settings.why, "total_steps": why_total, "warmup_steps": why_warmup,
                                    "min_lr_rate": why_floor})


def resolve_eval_attention(requested: str, facts: Facts, precision: str) -> tuple[str, str]:
    """Evaluation's generation and scoring run one unpadded sequence with a KV cache (longctx.evaluation): upstream's
    SDPA, causal with no mask, or flash-attn where installed; train.py's packed-row kernels have no decode path."""
    half = precision in ("bf16", "fp16")
    can_fa2 = facts.flash_attn and facts.sm80 and half
    if requested == "auto":
        return ("flash_attention_2", "auto: flash-attn installed, sm80+, half precision") if can_fa2 else \
            ("sdpa", "auto: SDPA, causal with no mask (its fused kernels on a GPU)")
    if requested == "flash_attention_2" and not can_fa2:
        raise LongctxError("--attn-implementation flash_attention_2 needs the flash-attn package, an sm80+ GPU and "
                           "bf16/fp16")
    return requested, "requested"


def resolve(cfg, facts: Facts, model_config: Any, world: int) -> Resolved:
    """Decide every setting of the run `cfg` describes on `world` ranks of the machine `facts` describes (all but the
    schedule, which needs the data: resolve_schedule)."""
    shape = ModelShape.from_config(model_config)
    why: dict[str, str] = {}
    precision, why["precision"] = resolve_precision(cfg.precision, facts)
    liger, why["liger"] = resolve_liger(cfg.liger, facts)
    attn = resolve_attention(cfg.attn_implementation, facts, precision=precision, packing=cfg.packing,
                             max_seq_len=cfg.max_seq_len, dense_mask_max_len=cfg.dense_mask_max_len,
                             head_dim=shape.head_dim)
    why["attention"] = attn.note
    mode, impl, n_off, why["checkpointing"] = resolve_checkpointing(cfg, facts, shape.layers)
    tiled_loss, why["tiled_loss"] = resolve_tiled_loss(cfg.tiled_loss, liger)
    lr, why["lr"] = resolve_lr(cfg)
    tokenizer, why["tokenizer"] = resolve_tokenizer(cfg)

    c = Candidates(cfg=cfg, shape=shape, world=world, precision=precision, lr=lr, facts=facts, checkpointing=mode,
                   offload_impl=impl, num_offloaded_layers=n_off, attention=attn.name, liger=liger,
                   tied_embeddings=bool(_get(model_config, "tie_word_embeddings")),
                   unkeepable=HF_FA4_KEEP if attn.name == HF_FA4 else "")
    raw = dsconfig.load(cfg.deepspeed)
    ds, placed = resolve_zero_placement(c, raw)
    why.update(placed)
    overlap, why["overlap_step"] = resolve_overlap_step(cfg.overlap_optimizer_step, ds, raw, shape, c.dp_world)
    n_off, all_not_held = resolve_offloaded_layers(c, ds)
    if all_not_held:
        why["checkpointing"] = all_not_held
    c = dataclasses.replace(c, num_offloaded_layers=n_off)
    tiled, shards, why["tiled_mlp"] = resolve_tiled_mlp(c, ds)
    keep, why["keep_attention"] = resolve_keep_attention(c, ds, shards, varlen_kwargs=attn.varlen_kwargs)
    s2_group, why["s2_group"] = resolve_s2_group(cfg.s2_attn, cfg.max_seq_len)
    if s2_group:
        why["attention"] += f"; S2-Attn in training (group {s2_group}, half the heads shifted by {s2_group // 2})"

    zero = ds.get("zero_optimization", {}) or {}
    on_cpu = {sec: isinstance(zero.get(sec), dict) and zero[sec].get("device") not in (None, "none")
              for sec in ("offload_param", "offload_optimizer")}
    ratio = float(zero["offload_optimizer"].get("ratio", 1.0)) if on_cpu["offload_optimizer"] else None
    settings = Resolved(
        precision=precision, attention=attn.name, attn_impl=attn.impl, attn_varlen_kwargs=attn.varlen_kwargs,
        liger=liger, checkpointing=mode, offload_impl=impl, reentrant=c.reentrant(keep), num_offloaded_layers=n_off,
        keep_attention=keep, keep_attention_by=cfg.keep_attention_by, tiled_mlp=tiled, tiled_mlp_shards=shards,
        tiled_loss=tiled_loss, sequence_parallel=c.sp, offload_params=on_cpu["offload_param"],
        offload_optimizer=on_cpu["offload_optimizer"], zero_stage=int(zero.get("stage", 0) or 0), lr=lr, world=world,
        ds_config=ds, why=why, s2_group=s2_group, overlap_step=overlap, optimizer_ratio=ratio, tokenizer=tokenizer)
    return dataclasses.replace(settings, why={**why, **follows(settings, cfg, raw, shape.hidden)})


def resolve_tiled_loss(requested: bool, liger: bool) -> tuple[bool, str]:
    if not requested and liger:
        raise LongctxError("--no-tiled-loss needs Liger's fused cross-entropy off (--liger off): Liger's loss is "
                           "itself tiled")
    if not requested:
        return False, "requested: --no-tiled-loss (the LM head's tokens x vocab logits in full)"
    return True, ("Liger's fused linear cross-entropy, itself tiled" if liger else
                  "LM head + cross-entropy in chunks: no tokens x vocab logits")


def resolve_s2_group(s2_attn: Optional[int], max_seq_len: int) -> tuple[Optional[int], str]:
    """The group size of S2-Attn (LongLoRA's shifted sparse attention in training, longctx.s2attn): --s2-attn N, or
    for --s2-attn alone (0) LongLoRA's quarter of the row, max_seq_len / 4 rounded down to even (half a group is the
    shift; config.validate refuses an odd N); None without --s2-attn."""
    if s2_attn is None:
        return None, "off (no --s2-attn)"
    if s2_attn:
        return s2_attn, f"requested: --s2-attn {s2_attn} tokens a group"
    g = max(2, (max_seq_len // 4) // 2 * 2)
    return g, f"auto (--s2-attn alone): max_seq_len / 4 rounded down to even, {g} tokens a group"


def follows(s: Resolved, cfg, raw: dict, hidden: int) -> dict[str, str]:
    """The reasons of the fields that follow from the decisions above or are taken as given."""
    sp = s.sequence_parallel
    zero_raw, zero = raw.get("zero_optimization") or {}, s.ds_config.get("zero_optimization") or {}
    had_optimizer_offload = isinstance(zero_raw.get("offload_optimizer"), dict)
    return {
        "attn_impl": (f"transformers' own {s.attn_impl}" if s.attn_impl == s.attention else
                      f"{s.attention} as registered with transformers (longctx.attention)"),
        "attn_varlen_kwargs": ("the kernel takes the collator's document boundaries (cu_seq_lens, max_length)"
                               if s.attn_varlen_kwargs else "the kernel takes a mask or none, not the boundaries"),
        "offload_impl": (f"--offload-impl {s.offload_impl}" if s.checkpointing == "offload" else
                         "unused: checkpoints are not offloaded"),
        "reentrant": ("unused: no checkpointing" if s.checkpointing == "none" else
                      "reentrant: the cheaper path" if s.reentrant else
                      "non-reentrant: selective checkpointing keeps attention, which needs it"),
        "num_offloaded_layers": (s.why["checkpointing"] if s.checkpointing == "offload" else
                                 "none: checkpoints are not offloaded"),
        "keep_attention_by": f"--keep-attention-by {s.keep_attention_by}" + ("" if s.keep_attention else
                                                                             " (unused: attention not kept)"),
        "tiled_mlp_shards": (f"ceil(tokens per rank / hidden {hidden}), at least 2: the count the plan checks and "
                             "the model runs" if s.tiled_mlp else "1: tiled MLP off"),
        "sequence_parallel": (f"requested: Ulysses over {sp} ranks" if sp > 1 else "off (--sequence-parallel 1)"),
        "zero_stage": f"ds_config: zero_optimization.stage {s.zero_stage}",
        "offload_optimizer": (f"ds_config: offload_optimizer.device {zero['offload_optimizer']['device']}"
                              if s.offload_optimizer else
                              "every optimizer state on the GPU (optimizer: ratio 0)" if had_optimizer_offload else
                              "ds_config: no offload_optimizer"),
        "optimizer_ratio": s.why.get("optimizer", "ds_config: the optimizer is not offloaded"),
        "world": f"{s.world} rank{'s' if s.world != 1 else ''}: the launcher's (--plan: --gpus)",
        "ds_config": f"{cfg.deepspeed}, every \"auto\" filled from these settings (longctx.dsconfig)",
        "total_steps": "decided with the data (resolve_schedule)",
        "warmup_steps": "decided with the data (resolve_schedule)",
        "min_lr_rate": "decided with the data (resolve_schedule)",
    }


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)

