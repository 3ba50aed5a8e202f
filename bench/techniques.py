"""Technique sets of the ladder and how to switch them on a live (ZeRO-3 wrapped) model.

Features: attention (sdpa | varlen), checkpointing (gc | upstream_offload | fork_offload), liger (bool).

    baseline          sdpa   + gc                 what a user gets: upstream transformers + ZeRO-3 offload + SDPA + GC
    upstream_offload  sdpa   + upstream_offload   + upstream's activation_checkpointing_enable(offload=True)
    varlen            varlen + upstream_offload   + varlen FlashAttention (torch varlen_attn)
    liger             varlen + upstream_offload + liger   + Liger fused linear CE, RMSNorm, SwiGLU, RoPE
    fork_offload      varlen + fork_offload + liger       the fork's offloaded checkpointing instead of upstream's

Sequence-parallel and tiling sets (longctx/sequence_parallel.py; DeepSpeed's ALST pieces):

    tiled_mlp         fork_offload + DeepSpeed TiledMLP (ceil(seq / hidden) chunks)
    sp                fork_offload + Ulysses SP over all GPUs of the process: one sample spread over the node
    sp_tiled          sp + tiled MLP

SP is fixed when the engine is built (the mpu goes to deepspeed.initialize), so a worker runs either only SP
sets or none (`resolve` refuses a mix); the worker registers Ulysses over varlen attention at init.

LongLoRA sets (longctx/lora.py, longctx/s2attn.py), the fork_offload stack with the training reduced:

    lora              fork_offload + LoRA r=8 on q,k,v,o + trainable embeddings and norms (the rest frozen)
    longlora          lora + S²-Attn (group = seq_len / 4, half the heads shifted by half a group)

LoRA is also fixed when the engine is built (the optimizer holds only the trainable parameters), so a worker
runs either only LoRA sets or none; `bench.run --subprocess-per-try` gives each technique its own worker.
Their rows carry no TFLOPs/MFU (longctx/flops.py counts full fine-tuning with full attention): compare
tokens/s and memory with fork_offload at the same lengths.

Extra named sets: upstream_best = sdpa + upstream_offload + liger (the best stack without this project);
liger_gc = varlen + gc + liger (no offload: the reference for offloaded checkpointing's step-time overhead).
Custom: --technique 'varlen+gc+liger' (features joined with '+'; missing features take the baseline value).

Liger under ZeRO-3: Liger's own `lce_forward` reads `lm_head.weight` by attribute without calling the
lm_head module, so ZeRO-3's gather hook never fires and the kernel sees an empty shard. The fix used here
is Liger's own FSDP remedy, applied to ZeRO-3: the fused loss runs *through* the lm_head module
(`lm_head.forward` is temporarily redirected to the loss), so the module's pre-forward hook gathers the
weight, the post-forward hook re-partitions it, and the backward hooks see the module as usual. This keeps
the full weight alive only for the loss call, whereas `deepspeed.zero.register_external_parameter(model,
lm_head.weight)` would keep it gathered for the whole forward of the outer module (1 GiB for 8B, which
matters under a 16 GiB cap). TRL fixed the same bug with a GatheredParameters context around the call
(huggingface/trl#5891, #6372); that is fine for Liger's loss, which computes the weight gradient in
its forward, but it bypasses ZeRO's module hooks, so gradients must still reach the engine the normal way,
which they do here because the call happens inside the engine's forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

ATTN = ("sdpa", "varlen")
CKPT = ("gc", "upstream_offload", "fork_offload")


@dataclass(frozen=True)
class Technique:
    name: str
    attn: str = "sdpa"
    ckpt: str = "gc"
    liger: bool = False
    tiled_mlp: bool = False
    sp: bool = False  # sequence parallel over every rank of the worker
    lora: bool = False  # LongLoRA's trainable set (LoRA + embeddings + norms), fixed at engine build
    s2attn: bool = False  # S²-Attn over the chosen attention, group = seq_len / 4

    def features_dict(self) -> dict:
        d = asdict(self)
        d.pop("name")
        for k in ("tiled_mlp", "sp", "lora", "s2attn"):  # only when on: the original ladder's rows stay as they were
            if not d.get(k):
                d.pop(k, None)
        return d


_BASE = Technique("baseline")
NAMED = {
    "baseline": _BASE,
    "upstream_offload": replace(_BASE, name="upstream_offload", ckpt="upstream_offload"),
    "varlen": Technique("varlen", attn="varlen", ckpt="upstream_offload"),
    "liger": Technique("liger", attn="varlen", ckpt="upstream_offload", liger=True),
    "fork_offload": Technique("fork_offload", attn="varlen", ckpt="fork_offload", liger=True),
    "upstream_best": Technique("upstream_best", attn="sdpa", ckpt="upstream_offload", liger=True),
    "liger_gc": Technique("liger_gc", attn="varlen", ckpt="gc", liger=True),
    "tiled_mlp": Technique("tiled_mlp", attn="varlen", ckpt="fork_offload", liger=True, tiled_mlp=True),
    "sp": Technique("sp", attn="varlen", ckpt="fork_offload", liger=True, sp=True),
    "sp_tiled": Technique("sp_tiled", attn="varlen", ckpt="fork_offload", liger=True, tiled_mlp=True, sp=True),
    "lora": Technique("lora", attn="varlen", ckpt="fork_offload", liger=True, lora=True),
    "longlora": Technique("longlora", attn="varlen", ckpt="fork_offload", liger=True, lora=True, s2attn=True),
}
LADDER = ("baseline", "upstream_offload", "varlen", "liger", "fork_offload")
# display order in reports; liger_gc (no offload) is the reference for the offload step-time overhead
ORDER = {n: i for i, n in enumerate(("baseline", "upstream_offload", "varlen", "upstream_best", "liger_gc",
                                     "liger", "fork_offload", "tiled_mlp", "sp", "sp_tiled", "lora", "longlora"))}
FLAGS = ("liger", "tiled_mlp", "sp", "s2attn")  # "lora" is the named set (fixed at engine build), not a flag


def parse_custom(spec: str) -> Technique:
    t = _BASE
    for f in [x.strip() for x in spec.split("+") if x.strip()]:
        if f in ATTN:
            t = replace(t, attn=f)
        elif f in CKPT:
            t = replace(t, ckpt=f)
        elif f in FLAGS:
            t = replace(t, **{f: True})
        elif f in NAMED:
            t = NAMED[f]
        else:
            raise ValueError(f"unknown feature {f!r}: use {ATTN + CKPT + FLAGS} or a named set {tuple(NAMED)}")
    return replace(t, name=spec)


def resolve(techniques: str | None, override: str | None = None) -> list[Technique]:
    if override:
        return [parse_custom(override)]
    out = []
    for n in [x.strip() for x in (techniques or "").split(",") if x.strip()]:
        out.append(NAMED[n] if n in NAMED else parse_custom(n))
    seen_liger = False
    for t in out:  # Liger patches modules in place; it cannot be switched off again in the same process
        if seen_liger and not t.liger:
            raise ValueError(f"technique {t.name!r} (no liger) comes after a liger set; put liger-free sets first")
        seen_liger |= t.liger
    if len({t.sp for t in out}) > 1:
        raise ValueError("SP sets (sp, sp_tiled) and sets without SP cannot share a worker: SP is fixed when the "
                         "engine is built; run them in separate workers")
    if any(t.sp and t.attn != "varlen" for t in out):
        raise ValueError("SP sets need varlen attention (Ulysses is registered over it at init)")
    if len({t.lora for t in out}) > 1:
        raise ValueError("LoRA sets (lora, longlora) and full fine-tuning sets cannot share a worker: the trainable "
                         "set is fixed when the engine is built; run them in separate workers (--subprocess-per-try)")
    if any(t.lora and t.sp for t in out):
        raise ValueError("LoRA sets with SP are not supported")
    return out


class Unavailable(RuntimeError):
    """The technique cannot run with what is installed (e.g. not the fork, no liger-kernel)."""


@dataclass
class State:
    attn: str = "sdpa"
    ckpt: str | None = None
    liger: bool = False
    attn_desc: str = "sdpa"
    loss_desc: str = "transformers (fp32 logits)"
    gc_desc: str | None = None
    tiled_mlp: bool = False
    sp: int = 1  # the SP size the engine was built with (set by the worker)
    s2_base: str | None = None  # with S²-Attn: the implementation it runs on (its group is set per length)

    def recompute_layers(self, layers: int) -> int:
        return layers if self.ckpt else 0


# -------------------------------------------------------------------------------------------- the model
class BenchLM(torch.nn.Module):
    """The engine's module: returns the loss. Without a fused CE it is exactly what a user of transformers
    gets (`model(input_ids, labels=...)`, which upcasts the full logits to fp32); with one, the loss runs
    through the lm_head module so ZeRO-3's hooks gather its weight (see module docstring)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.fused_ce = None  # callable(hidden_2d, weight, target_1d, bias) -> scalar loss
        self.labels_shifted = False  # SP: every rank gets its slice of the already shifted labels

    def forward(self, input_ids, labels, position_ids=None):
        if self.fused_ce is None:
            return self.lm(input_ids=input_ids, labels=labels, position_ids=position_ids, use_cache=False).loss
        base = getattr(self.lm, self.lm.base_model_prefix)
        hidden = base(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        target = labels.reshape(-1) if self.labels_shifted else F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
        return loss_through_module(self.lm.get_output_embeddings(), self.fused_ce,
                                   hidden.reshape(-1, hidden.shape[-1]), target)


def loss_through_module(head: torch.nn.Module, fused_ce, hidden, target):
    """Run fused_ce(hidden, head.weight, target, head.bias) as `head`'s forward, so its hooks fire."""
    def forward(x):
        return fused_ce(x, head.weight, target, getattr(head, "bias", None))

    head.forward = forward
    try:
        return head(hidden)
    finally:
        del head.forward


class _ChunkedLinearCE(torch.autograd.Function):
    """Pure-torch fused linear cross-entropy (mean over non-ignored targets), gradients computed in forward
    chunk by chunk like Liger's. Only for CPU tests of the ZeRO-3 lm_head redirection; not a benchmark row."""

    @staticmethod
    def forward(ctx, x, weight, target, bias, chunk):
        n = (target != -100).sum().clamp(min=1)
        gx = torch.zeros_like(x)
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for a in range(0, x.shape[0], chunk):
            xc, tc = x[a:a + chunk], target[a:a + chunk]
            logits = (xc @ weight.t()).float()
            if bias is not None:
                logits = logits + bias.float()
            valid = tc != -100
            tcl = tc.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, tcl[:, None])[:, 0]) * valid).sum()
            g = torch.softmax(logits, dim=-1)
            g[torch.arange(len(tc)), tcl] -= 1
            g = g * valid[:, None] / n
            gx[a:a + chunk] = (g.to(weight.dtype) @ weight).to(x.dtype)
            gw += g.t() @ xc.float()
            if gb is not None:
                gb += g.sum(0)
        ctx.save_for_backward(gx, gw.to(weight.dtype), gb.to(bias.dtype) if gb is not None else None)
        return total / n

    @staticmethod
    def backward(ctx, go):
        gx, gw, gb = ctx.saved_tensors
        return gx * go, gw * go, None, (gb * go if gb is not None else None), None


def torch_fused_ce(x, weight, target, bias=None):
    return _ChunkedLinearCE.apply(x, weight, target, bias, 4096)


def _liger_fused_ce():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def fn(x, weight, target, bias=None):
        return liger_fused_linear_cross_entropy(x, weight, target, bias=bias, ignore_index=-100, reduction="mean")
    return fn


def _apply_liger(lm):
    try:
        import liger_kernel  # noqa: F401
        from liger_kernel.transformers import monkey_patch as mp
    except ImportError as e:
        raise Unavailable(f"liger-kernel not installed ({e})") from e
    fn = {"llama": getattr(mp, "apply_liger_kernel_to_llama", None),
          "qwen2": getattr(mp, "apply_liger_kernel_to_qwen2", None),
          "mistral": getattr(mp, "apply_liger_kernel_to_mistral", None),
          "qwen3": getattr(mp, "apply_liger_kernel_to_qwen3", None)}.get(lm.config.model_type)
    if fn is None:
        raise Unavailable(f"no liger patch for model_type {lm.config.model_type}")
    # fused linear CE is ours (through the lm_head module, for ZeRO-3); the rest is Liger's instance patch
    fn(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=lm)


def _set_attn(lm, name: str):
    try:
        lm.set_attn_implementation(name)
    except Exception:  # noqa: BLE001 - older/newer transformers: set the config field everywhere
        for m in lm.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = name


def apply(lm, model: BenchLM, tech: Technique, state: State, device) -> None:
    """Switch the live model to `tech` (cumulative; Liger cannot be switched off)."""
    if state.liger and not tech.liger:
        raise Unavailable("liger is already on in this process")
    # attention
    if tech.attn != state.attn:
        if tech.attn == "varlen":
            from bench import varlen_attention
            try:
                mode = varlen_attention.probe(device)
            except Exception as e:  # noqa: BLE001
                raise Unavailable(f"varlen attention: {e}") from e
            _set_attn(lm, varlen_attention.register())
            state.attn_desc = f"torch varlen_attn ({mode})"
        else:
            _set_attn(lm, "sdpa")
            state.attn_desc = "sdpa"
        state.attn = tech.attn
    # liger
    if tech.liger and not state.liger:
        try:
            _apply_liger(lm)
            model.fused_ce = _liger_fused_ce()
            state.loss_desc = "liger fused linear CE (through lm_head module)"
        except Unavailable:
            import os
            if os.environ.get("BENCH_LIGER_FALLBACK") != "torch":
                raise
            model.fused_ce = torch_fused_ce  # CPU tests only
            state.loss_desc = "torch chunked fused linear CE (BENCH_LIGER_FALLBACK=torch; not liger)"
        state.liger = True
    # checkpointing
    if tech.ckpt != state.ckpt:
        if tech.ckpt == "gc":
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            state.gc_desc = "activation_checkpointing_enable()"
        elif tech.ckpt == "upstream_offload":
            try:
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                                   offload=True)
            except (TypeError, AttributeError) as e:
                raise Unavailable(f"this transformers has no activation_checkpointing_enable(offload=True): {e}") from e
            state.gc_desc = "activation_checkpointing_enable(offload=True)"
        elif tech.ckpt == "fork_offload":
            if not hasattr(lm, "offload_gradient_checkpointing_enable"):
                raise Unavailable("transformers is not the longctx fork (no offload_gradient_checkpointing_enable)")
            lm.offload_gradient_checkpointing_enable(num_offloaded_layers=None)
            state.gc_desc = f"offload_gradient_checkpointing_enable() ({getattr(lm, 'offloaded_checkpointing_layers', '?')} layers)"
        state.ckpt = tech.ckpt
    # tiled MLP (after Liger: the MLP forward in place, Liger's SwiGLU included, is what runs per chunk)
    if tech.tiled_mlp != state.tiled_mlp:
        from longctx import sequence_parallel as sp_mod
        if tech.tiled_mlp:
            sp_mod.enable_tiled_mlp(lm)
        else:
            sp_mod.disable_tiled_mlp(lm)
        state.tiled_mlp = tech.tiled_mlp
    if tech.sp and (state.sp <= 1 or model.fused_ce is None):
        raise Unavailable("SP needs the worker started with SP sets only (Ulysses at init) and a fused CE")
    if tech.lora and not getattr(model, "lora", False):
        raise Unavailable("LoRA needs the worker started with LoRA sets only (applied before the engine is built)")
    # S²-Attn last: it wraps whatever attention is now set (set_s2_group fixes the group per length)
    if tech.s2attn and state.s2_base is None:
        state.s2_base = lm.config._attn_implementation
    elif not tech.s2attn and state.s2_base is not None:
        _set_attn(lm, state.s2_base)
        state.s2_base = None


# -------------------------------------------------------------------------------------------- LongLoRA
def apply_lora(model: BenchLM, log=print) -> None:
    """LongLoRA's trainable set on the (ZeRO-3 Init'ed) model, before deepspeed.initialize: LoRA r=8, alpha=16
    on q,k,v,o plus embeddings and norms, everything else frozen (longctx.lora.apply)."""
    from types import SimpleNamespace

    from longctx import lora

    cfg = SimpleNamespace(lora=True, lora_rank=8, lora_alpha=16, lora_target_modules=list(lora.DEFAULT_TARGETS),
                          trainable_modules=lora.DEFAULT_TRAINABLE, gradient_checkpointing=True)
    lora.apply(model, cfg, say=log)
    model.lora = True


def set_s2_group(lm, state: State, seq_len: int) -> int:
    """Before each length of an S²-Attn set: register S²-Attn with group seq_len / 4 over state.s2_base."""
    from longctx import s2attn

    group = s2attn.resolve_group_size(0, seq_len)
    _set_attn(lm, s2attn.register(state.s2_base, group))
    if " | S²-Attn" not in state.attn_desc:  # one description for every length (the row has the group)
        state.attn_desc += " | S²-Attn, group seq_len/4 (training)"
    return group
