"""Model: tokenizer, config checks, load or random-init (under ZeRO-3), Liger, checkpointing, loss.

The training loss is computed here, not by the Hugging Face forward: `CausalLMWithLoss` runs the
decoder stack, keeps only the positions that have a target, and applies the LM head + cross-entropy
as a *sum* over target tokens. The caller divides by the number of target tokens of the whole global
batch (see train.py), so the gradient does not depend on how documents are packed, micro-batched,
accumulated or spread over ranks.

The head is either Liger's fused linear cross-entropy (no [tokens x vocab] logits tensor) or a
chunked, checkpointed linear + cross-entropy (logits of one chunk at a time). Both read
`lm_head.weight` directly instead of calling `lm_head`, so under ZeRO-3 the weight is registered as
an external parameter of the wrapper's `LossHead`, a module of its own that runs after the decoder:
DeepSpeed gathers the weight for the head's forward and backward, where the lm_head module's own hooks
would never fire, and not at the start of the forward (see LossHead).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LongctxError
from .resolve import resolve_tokenizer

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
HEAD_CHUNK_TOKENS = 8192


# --------------------------------------------------------------------------------------------
# Environment checks
# --------------------------------------------------------------------------------------------

def fork_info() -> dict | None:
    """The patched transformers fork's marker, or None for an upstream transformers."""
    try:
        from transformers import fork_info as fi  # type: ignore[attr-defined]
    except Exception:
        return None
    return {"version": getattr(fi, "FORK_VERSION", None), "patches": [p[0] if isinstance(p, tuple) else p
                                                                       for p in getattr(fi, "PATCHES", ())]}


def check_offload_supported(model_config) -> None:
    """The fork's offloader is reached through offload_gradient_checkpointing_enable on the model's class: refuse
    before anything is built if that class lacks it."""
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping[type(model_config)]
    if not hasattr(cls, "offload_gradient_checkpointing_enable"):
        info = fork_info() or {}
        raise LongctxError(f"transformers fork {info.get('version')}: {cls.__name__} has no "
                           "offload_gradient_checkpointing_enable (the fork adds it to every PreTrainedModel: is the fork installed?)")


# --------------------------------------------------------------------------------------------
# Tokenizer and model config
# --------------------------------------------------------------------------------------------

def _has_weights(d: Path) -> bool:
    return any(d.glob("*.safetensors")) or any(d.glob("pytorch_model*.bin")) or any(d.glob("*.safetensors.index.json"))


def read_config_json(path: Path, what: str) -> dict:
    """A model's config.json (or a config .json given as --model) as a dict; a corrupt file is reported as such,
    with its line and column, whatever was about to read it."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LongctxError(f"{path}:{e.lineno}: {what} is not valid JSON (column {e.colno}: {e.msg}). The model "
                           "config is corrupt or cut off: restore it (e.g. copy it again from the model's source)."
                           ) from None
    except UnicodeDecodeError as e:
        raise LongctxError(f"{path}: {what} is not UTF-8 JSON text ({e.reason} at byte {e.start}); restore it") \
            from None
    if not isinstance(d, dict):
        raise LongctxError(f"{path}: {what} must be a JSON object, got {type(d).__name__}")
    return d


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    path, _ = resolve_tokenizer(cfg)
    if not Path(path).exists():
        raise LongctxError(f"tokenizer not found: {path}")
    if (Path(path) / "config.json").is_file():  # AutoTokenizer reads it too: a corrupt one is the model's problem
        read_config_json(Path(path) / "config.json", "the model config (config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise LongctxError(f"cannot load the tokenizer from {path}: {e}") from None
    if tok.pad_token_id is None and tok.eos_token_id is None:
        raise LongctxError(f"tokenizer {path} has neither a pad nor an eos token to pad with")
    return tok, path


# Config values build_model switches for training, with transformers' default for a config that does not set them.
TRAINING_SWITCHES = {"use_cache": True}


def restore_inference_settings(config, model: str) -> dict:
    """Put back on `config` (the trained model's, before save_pretrained) the inference settings that training
    switched (use_cache), as the input model's config has them or else transformers' default. Returns
    {key: (training value, restored value)} for what changed."""
    p = Path(model)
    src = p / "config.json" if p.is_dir() else p
    source = read_config_json(src, "the model config") if src.is_file() else {}
    changed = {}
    for key, default in TRAINING_SWITCHES.items():
        want = source.get(key, default)
        if getattr(config, key, None) != want:
            changed[key] = (getattr(config, key, None), want)
            setattr(config, key, want)
    return changed


def load_model_config(cfg, tok):
    """Return (config, kind) with kind "pretrained" (a directory with weights) or "random"."""
    from transformers import AutoConfig

    p = Path(cfg.model)
    if not p.exists():
        raise LongctxError(f"--model {cfg.model}: not found (give a model directory or a config .json)")
    try:
        if p.is_dir():
            if not (p / "config.json").exists():
                raise LongctxError(f"--model {cfg.model}: no config.json in the directory")
            if not _has_weights(p):
                raise LongctxError(f"--model {cfg.model}: no weights (*.safetensors / pytorch_model*.bin); to "
                                   "initialize randomly, pass the config .json file itself")
            read_config_json(p / "config.json", "the model config (config.json)")
            config, kind = AutoConfig.from_pretrained(str(p)), "pretrained"
        else:
            d = read_config_json(p, "the model config")
            model_type = d.pop("model_type", None)
            if model_type is None:
                raise LongctxError(f"--model {cfg.model}: config has no model_type")
            config, kind = AutoConfig.for_model(model_type, **d), "random"
    except LongctxError:
        raise
    except Exception as e:
        raise LongctxError(f"--model {cfg.model}: cannot read the config: {e}") from None
    if config.model_type not in SUPPORTED_TYPES:
        raise LongctxError(f"model_type {config.model_type!r} is not supported (supported: {SUPPORTED_TYPES})")
    if len(tok) > config.vocab_size:
        raise LongctxError(f"the tokenizer has {len(tok)} tokens but the model's vocab_size is {config.vocab_size}")
    check_positions(config, cfg.max_seq_len)
    return config, kind


def _rope_type(config) -> str:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rp, dict) and "rope_type" not in rp and any(isinstance(v, dict) for v in rp.values()):
        rp = next(v for v in rp.values() if isinstance(v, dict))  # per-layer-type parameters
    return (rp.get("rope_type") or rp.get("type") or "default") if isinstance(rp, dict) else "default"


def check_positions(config, max_seq_len: int) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or max_seq_len <= limit:
        return
    rope = _rope_type(config)
    if rope == "default":
        raise LongctxError(
            f"--max-seq-len {max_seq_len:,} is beyond the model's position range (max_position_embeddings "
            f"{limit:,}) and the model has no RoPE scaling. Add rope scaling to the model config (e.g. "
            "rope_parameters {rope_type: yarn, factor: ...}) or lower --max-seq-len.")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

_HF_DS_CONFIG = None  # must stay alive while models are created under ZeRO-3


def apply_liger(model_type: str):
    """Patch the model family's classes before instantiation; return a checker for an instance."""
    import liger_kernel.transformers as lt

    fn = getattr(lt, f"apply_liger_kernel_to_{model_type}", None)
    if fn is None:
        raise LongctxError(f"liger-kernel has no apply_liger_kernel_to_{model_type}")
    want = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    params = inspect.signature(fn).parameters
    fn(**{k: v for k, v in want.items() if k in params})

    def check(lm: nn.Module) -> list[str]:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

        problems = []
        if not isinstance(lm.model.norm, LigerRMSNorm):
            problems.append(f"final norm is {type(lm.model.norm).__name__}, not LigerRMSNorm")
        layer = lm.model.layers[0]
        if not isinstance(layer.mlp, LigerSwiGLUMLP):
            problems.append(f"MLP is {type(layer.mlp).__name__}, not LigerSwiGLUMLP")
        if not isinstance(layer.input_layernorm, LigerRMSNorm):
            problems.append(f"input_layernorm is {type(layer.input_layernorm).__name__}, not LigerRMSNorm")
        mod = inspect.getmodule(type(lm))
        rope = getattr(mod, "apply_rotary_pos_emb", None)
        if rope is None or not getattr(rope, "__module__", "").startswith("liger_kernel"):
            problems.append("apply_rotary_pos_emb was not replaced by Liger's")
        return problems

    return check


def build_model(cfg, model_config, kind: str, settings, layout):
    """The module to train and the mpu for deepspeed.initialize: the HF model (under zero.Init for ZeRO-3), with
    Liger, the attention kernel, checkpointing and tiled MLP as `settings` (longctx.resolve.Resolved) says,
    wrapped with the training loss, and Ulysses around the attention when sequence-parallel. Built once."""
    global _HF_DS_CONFIG
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from . import attention, attention_replay, s2attn, sequence_parallel as sp_mod, tiled_mlp

    ds_config = settings.ds_config
    zero3 = settings.zero_stage == 3
    _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config) if zero3 else None
    liger_check = apply_liger(model_config.model_type) if settings.liger else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[settings.precision]
    impl = sp_mod.core_attention(attention.register(settings.attn_impl), layout.size)
    if settings.s2_group:
        impl = s2attn.register(impl, settings.s2_group)
    if settings.keep_attention and settings.keep_attention_by == "replay":
        impl = attention_replay.register(impl)
    torch.manual_seed(cfg.seed)
    if kind == "pretrained":
        lm = AutoModelForCausalLM.from_pretrained(cfg.model, config=model_config, dtype=dtype, attn_implementation=impl)
    else:
        lm = AutoModelForCausalLM.from_config(model_config, dtype=dtype, attn_implementation=impl)
    lm.config.use_cache = False
    if liger_check is not None:
        problems = liger_check(lm)
        if problems:
            raise LongctxError("Liger kernels were requested but not applied: " + "; ".join(problems))
    enable_checkpointing(lm, settings)
    if settings.tiled_mlp:  # after Liger: the MLP forward in place (Liger's SwiGLU) is what runs per chunk
        tiled_mlp.enable(lm, settings.tiled_mlp_shards)
    model = CausalLMWithLoss(lm, fused_ce=settings.liger, labels_shifted=layout.size > 1,
                             tiled_loss=settings.tiled_loss)
    if zero3:
        import deepspeed

        deepspeed.zero.register_external_parameter(model.head, lm.lm_head.weight)
    mpu = sp_mod.register_ulysses(lm, impl, layout.size, 1 if settings.pass_varlen_kwargs else cfg.micro_batch_size)
    return model, mpu


def enable_checkpointing(lm, settings) -> None:
    """Checkpointing as `settings` says. Attention kept by replay also needs the model built with
    attention_replay's attention function (build_model does both)."""
    from . import attention_replay, selective

    by = settings.keep_attention_by
    kept = settings.keep_attention and settings.checkpointing != "none"
    kwargs = selective.checkpoint_kwargs() if kept and by == "selective" else {"use_reentrant": settings.reentrant}
    if settings.checkpointing == "offload" and settings.offload_impl == "fork":
        if not hasattr(lm, "offload_gradient_checkpointing_enable"):
            raise LongctxError(f"transformers fork: {type(lm).__name__} has no offload_gradient_checkpointing_enable "
                               "(the fork patches Llama, Mistral, Qwen2, Qwen3)")
        lm.offload_gradient_checkpointing_enable(num_offloaded_layers=settings.num_offloaded_layers,
                                                 activation_checkpointing_kwargs=kwargs)
    elif settings.checkpointing == "offload":  # upstream's save_on_cpu, for comparison
        # the fork's offload=True is its own offloader (patch 0003); upstream's is named "save_on_cpu" there
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                           offload="save_on_cpu" if fork_info() else True)
    elif settings.checkpointing == "plain":
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    if kept and by == "replay":
        attention_replay.enable(lm)


class LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(h_i @ w^T, y_i), computed chunk by chunk with gradients formed in forward.

    Never holds more than [chunk x vocab] logits, and backward needs neither w nor the logits (the
    same trick as Liger's fused linear cross-entropy), which also keeps it valid under ZeRO-3 where
    w is only gathered during forward. Logits and softmax are fp32, as in transformers' loss.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s:s + chunk], y[s:s + chunk]
            logits = F.linear(hc, w).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                g = torch.exp_(logits.sub_(lse[:, None]))  # softmax, in place
                g[torch.arange(g.shape[0], device=g.device), yc] -= 1.0
                if need_h:
                    grad_h[s:s + chunk] = (g @ w.to(acc)).to(h.dtype)
                if need_w:
                    grad_w.addmm_(g.t(), hc.to(acc))
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (need_h, need_w)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_out if ctx.has[0] else None
        grad_w = (saved.pop(0) * grad_out).to(ctx.w_dtype) if ctx.has[1] else None
        return grad_h, grad_w, None, None


class CausalLMWithLoss(nn.Module):
    """The HF causal LM plus the training loss: the sum of target-token cross-entropy over the tokens it holds.

    labels_shifted: labels[t] is already the target of token t (a sequence-parallel slice cannot shift its own
    labels; longctx.sequence_parallel.shard_batch shifts before slicing); else the Hugging Face convention,
    labels[t] the target of the logits at t-1. The head is Liger's fused linear CE, the chunked
    LinearCrossEntropySum (tiled_loss), or full fp32 logits (--no-tiled-loss: the reference)."""

    def __init__(self, lm: nn.Module, fused_ce: bool = False, *, labels_shifted: bool = False,
                 tiled_loss: bool = True):
        super().__init__()
        self.lm = lm
        self.head = LossHead(lm.lm_head, fused_ce=fused_ce, tiled_loss=tiled_loss)
        self.labels_shifted = labels_shifted
        if getattr(lm.config, "final_logit_softcapping", None):
            raise LongctxError("models with final_logit_softcapping are not supported by the training loss")
        if getattr(lm.lm_head, "bias", None) is not None:
            raise LongctxError("an lm_head with a bias is not supported by the training loss")

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                **attn_kwargs: Any) -> torch.Tensor:
        out = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **attn_kwargs)
        hidden = out.last_hidden_state
        if self.labels_shifted:
            h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        else:
            h, y = hidden[:, :-1, :].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)
        keep = (y != -100).nonzero().view(-1)
        return self.head(h.index_select(0, keep), y.index_select(0, keep))


class LossHead(nn.Module):
    """lm_head + the summed cross-entropy of the target tokens, as a module of its own, called after the decoder.

    Why a module: under ZeRO-3, lm_head's weight is an external parameter of the module that reads it, and DeepSpeed
    gathers a module's external parameters when that module's forward starts. Registered on the wrapper, the head
    was gathered before the first layer ran, so the overlapped optimizer step (longctx.overlap_step) made the
    forward wait for the head's update (a fifth of the 8B shape's 8-layer slice) before anything else. lm_head
    stays the model's (not a child here: its state_dict keys are unchanged)."""

    def __init__(self, lm_head: nn.Module, *, fused_ce: bool, tiled_loss: bool):
        super().__init__()
        object.__setattr__(self, "lm_head", lm_head)  # a plain reference, not a registered submodule
        self.fused_ce = fused_ce
        self.tiled_loss = tiled_loss

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self.lm_head.weight
        if self.fused_ce:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            return LigerFusedLinearCrossEntropyLoss(reduction="sum")(w, h, y)
        if self.tiled_loss:
            return LinearCrossEntropySum.apply(h, w, y, HEAD_CHUNK_TOKENS)
        logits = F.linear(h, w).to(torch.promote_types(h.dtype, torch.float32))  # fp32 at least, as transformers
        return F.cross_entropy(logits, y, reduction="sum")
