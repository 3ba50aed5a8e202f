"""LongLoRA mode: LoRA adapters (peft) plus trainable embeddings and norms, their saving, and the merge.

Training (`apply`): peft injects LoRA layers into the Hugging Face model in place
(inject_adapter_in_model, no PeftModel wrapper, so modeling.CausalLMWithLoss keeps working on it),
and every parameter is then frozen except the LoRA weights and the parameters whose name contains one
of --trainable-modules (LongLoRA's `trainable_params`, default "embed,norm": embed_tokens and every
*norm). The extra modules are made trainable through requires_grad, not peft's modules_to_save: that
would copy them (the embedding is ~1 GB for Llama-3) and the copies are known to break under ZeRO-3.
train.py hands DeepSpeed only the trainable parameters, so the optimizer state is that of the adapter.

Saving (`save_final`): <output-dir>/adapter/ is a standard peft adapter directory that
`PeftModel.from_pretrained(base, dir)` loads, LoRA weights and the trained embeddings and norms
together: the latter are declared as modules_to_save in adapter_config.json and stored under the keys
peft uses for them. Under ZeRO-3 only these parameters are gathered, one at a time. With --merge,
<output-dir>/final_model/ also gets a plain Hugging Face model: W + (alpha / r) B A for every adapted
linear layer, with the trained embeddings and norms, loadable by from_pretrained.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from .errors import LongctxError

ADAPTER = "default"  # peft's adapter name
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_TRAINABLE = "embed,norm"
_LORA_PARAM = re.compile(rf"\.lora_[AB]\.{ADAPTER}\.weight$")
_TOKEN = re.compile(r"^[A-Za-z0-9_.]+$")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

def split_list(values: list[str] | str) -> list[str]:
    """["q_proj,k_proj", "v_proj"] or "embed,norm" -> flat list; "" / "none" -> []."""
    items = [values] if isinstance(values, str) else list(values)
    out = [s.strip() for v in items for s in v.split(",") if s.strip()]
    return [] if out in (["none"], ["None"]) else out


def config_problems(cfg) -> list[str]:
    """Checks of the --lora flags that need only the config (called by config.validate)."""
    if not cfg.lora:
        return ["--merge needs --lora (it merges the adapter into the base weights)"] if cfg.merge else []
    problems = []
    if cfg.lora_rank < 1:
        problems.append(f"--lora-rank must be >= 1, got {cfg.lora_rank}")
    if cfg.lora_alpha <= 0:
        problems.append(f"--lora-alpha must be > 0, got {cfg.lora_alpha}")
    targets = split_list(cfg.lora_target_modules)
    if not targets:
        problems.append("--lora-target-modules: give at least one module name (e.g. q_proj,k_proj,v_proj,o_proj)")
    for name in targets + split_list(cfg.trainable_modules):
        if not _TOKEN.match(name):
            problems.append(f"--lora-target-modules / --trainable-modules: {name!r} is not a module name")
    return problems


def lora_config(cfg, modules_to_save: list[str] | None = None, tied: bool = False):
    from peft import LoraConfig

    targets = split_list(cfg.lora_target_modules)
    # tied embeddings: peft's copy of a trained embed_tokens must stay the lm_head's weight when loaded
    extra = {"ensure_weight_tying": True} if tied and modules_to_save else {}
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=targets[0] if targets == ["all-linear"] else targets,
                      modules_to_save=modules_to_save or None, task_type="CAUSAL_LM", **extra)


def scaling(cfg) -> float:
    return cfg.lora_alpha / cfg.lora_rank


def is_lora_param(name: str) -> bool:
    return bool(_LORA_PARAM.search(name))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 parameters are empty outside a gather


def apply(model, cfg, say: Callable = print):
    """Turn modeling.CausalLMWithLoss `model` into its LongLoRA version, in place; no-op without --lora."""
    if not cfg.lora:
        return model
    from peft import inject_adapter_in_model

    lm = model.lm
    try:
        inject_adapter_in_model(lora_config(cfg), lm, adapter_name=ADAPTER)
    except ValueError as e:  # e.g. "Target modules {...} not found in the base model"
        raise LongctxError(f"--lora-target-modules {','.join(split_list(cfg.lora_target_modules))}: {e}") from None
    tokens = split_list(cfg.trainable_modules)
    matched = dict.fromkeys(tokens, 0)
    for name, p in lm.named_parameters():
        extra = [t for t in tokens if t in name]
        for t in extra:
            matched[t] += 1
        p.requires_grad_(is_lora_param(name) or bool(extra))
    missing = [t for t, n in matched.items() if n == 0]
    if missing:
        raise LongctxError(f"--trainable-modules: no parameter name contains {missing} (names look like "
                           f"{next(n for n, _ in lm.named_parameters())})")
    embeddings_trainable = any(p.requires_grad for p in lm.get_input_embeddings().parameters())
    if cfg.gradient_checkpointing and not embeddings_trainable:
        # reentrant checkpointing only backpropagates into a segment whose input requires grad (transformers'
        # activation_checkpointing_enable does this too; done here so LoRA does not depend on it)
        lm.enable_input_require_grads()
    n_lora = sum(_numel(p) for n, p in lm.named_parameters() if is_lora_param(n))
    n_train = sum(_numel(p) for p in lm.parameters() if p.requires_grad)
    n_all = sum(_numel(p) for p in lm.parameters())
    say(f"LongLoRA: LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g} on {','.join(split_list(cfg.lora_target_modules))}"
        f" ({n_lora:,} params) + trainable {','.join(tokens) or 'nothing else'} ({n_train - n_lora:,}); "
        f"trainable {n_train:,} of {n_all:,} ({100 * n_train / max(n_all, 1):.2f}%)")
    return model


def trainable_names(lm) -> list[str]:
    return [n for n, p in lm.named_parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------
# Saving: adapter (+ embeddings and norms) and the merged model
# --------------------------------------------------------------------------------------------

def gather_trainable(lm, zero3: bool, rank: int) -> dict[str, torch.Tensor] | None:
    """The trainable parameters of `lm` on CPU (rank 0; None elsewhere). Under ZeRO-3 each one is gathered
    in turn (a collective: every rank walks the same list); frozen weights are never gathered."""
    out: dict[str, torch.Tensor] = {}
    for name, p in lm.named_parameters():
        if not p.requires_grad:
            continue
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    out[name] = p.detach().cpu().clone()
        elif rank == 0:
            out[name] = p.detach().cpu().clone()
    return out if rank == 0 else None


def adapter_state_dict(trainable: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """peft's on-disk keys: base_model.model.<module>.lora_A.weight, and base_model.model.<module>.weight
    for modules_to_save. Returns the state dict and the module names to declare as modules_to_save."""
    sd, to_save = {}, []
    for name, t in trainable.items():
        if is_lora_param(name):
            sd["base_model.model." + name.replace(f".{ADAPTER}.", ".")] = t.contiguous()
        else:
            sd["base_model.model." + name] = t.contiguous()
            module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            if module not in to_save:
                to_save.append(module)
    return sd, to_save


def write_adapter(out: Path, trainable: dict[str, torch.Tensor], cfg, base_model: str | None, tok=None,
                  tied: bool = False) -> Path:
    from safetensors.torch import save_file

    sd, to_save = adapter_state_dict(trainable)
    if tied:  # peft (ensure_weight_tying) stores the tied head too, and loads it from there
        for k in [k for k in sd if k.endswith(".embed_tokens.weight")]:
            sd["base_model.model.lm_head.weight"] = sd[k].clone()
    tmp = _fresh(out.with_name(out.name + ".tmp"))
    lc = lora_config(cfg, modules_to_save=to_save, tied=tied)
    lc.base_model_name_or_path = base_model
    lc.save_pretrained(str(tmp))
    save_file(sd, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    if tok is not None:
        tok.save_pretrained(str(tmp))
    return _replace(tmp, out)


def merge_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A model state dict with injected LoRA layers -> the plain model's: W + scale * B @ A (in fp32)."""
    out = {}
    for k, v in state.items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        if k.endswith(".base_layer.weight"):
            prefix = k[: -len(".base_layer.weight")]
            a, b = state[f"{prefix}.lora_A.{ADAPTER}.weight"], state[f"{prefix}.lora_B.{ADAPTER}.weight"]
            out[prefix + ".weight"] = (v.float() + scale * (b.float() @ a.float())).to(v.dtype)
        else:
            out[k.replace(".base_layer.", ".")] = v
    return out


def write_hf_model(out: Path, state: dict[str, torch.Tensor], config, tok=None, generation_config=None) -> Path:
    """A from_pretrained-able directory from a plain state dict and the model config (safetensors shards)."""
    from huggingface_hub import save_torch_state_dict

    config = copy.deepcopy(config)
    config.use_cache = True  # training turned it off; generation wants it
    if getattr(config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    tmp = _fresh(out.with_name(out.name + ".tmp"))
    config.save_pretrained(str(tmp))
    if generation_config is not None:
        generation_config.save_pretrained(str(tmp))
    save_torch_state_dict({k: _own_storage(v) for k, v in state.items()}, str(tmp), max_shard_size="5GB")
    if tok is not None:
        tok.save_pretrained(str(tmp))
    return _replace(tmp, out)


def save_final(engine, tok, cfg, rank: int, zero3: bool, barrier, say: Callable = print) -> list[Path]:
    """End of a --lora run: <output-dir>/adapter/, and with --merge <output-dir>/final_model/ (all ranks call)."""
    lm = engine.module.lm
    base = cfg.model if Path(cfg.model).is_dir() else None
    out = Path(cfg.output_dir)
    trainable = gather_trainable(lm, zero3, rank)
    if rank == 0:
        write_adapter(out / "adapter", trainable, cfg, base, tok, tied=bool(lm.config.tie_word_embeddings))
    paths = [out / "adapter"]
    if cfg.merge:
        # every weight is needed once: ZeRO-3 gathers layer by layer onto rank 0
        state = engine._zero3_consolidated_16bit_state_dict() if zero3 else (
            engine.module.state_dict() if rank == 0 else None)
        if rank == 0:
            state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
            write_hf_model(out / "final_model", merge_state_dict(state, scaling(cfg)), lm.config, tok,
                           getattr(lm, "generation_config", None))
        paths.append(out / "final_model")
    barrier()
    return paths


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses views into a larger buffer (ZeRO-1/2 keep parameters in flat groups): copy those."""
    t = t.detach()
    nbytes = t.numel() * t.element_size()
    whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == nbytes
    return t if whole else t.clone()


def _fresh(d: Path) -> Path:
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def _replace(tmp: Path, out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------
# Merging a saved adapter later:  python -m longctx.lora --base MODEL --adapter DIR --out DIR
# --------------------------------------------------------------------------------------------

def merge_saved(base: str, adapter: str, out: str, dtype: str = "auto") -> Path:
    """Load base + adapter with peft (LoRA, embeddings, norms), merge_and_unload, save a plain HF model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tmp = _fresh(Path(out).with_name(Path(out).name + ".tmp"))
    merged.save_pretrained(str(tmp))
    for src in (adapter, base):
        try:
            AutoTokenizer.from_pretrained(src).save_pretrained(str(tmp))
            break
        except Exception:
            continue
    return _replace(tmp, Path(out))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Merge a LongLoRA adapter directory into its base model.")
    ap.add_argument("--base", required=True, help="base Hugging Face model directory")
    ap.add_argument("--adapter", required=True, help="<output-dir>/adapter of a --lora run")
    ap.add_argument("--out", required=True, help="where to write the merged model")
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    print(merge_saved(a.base, a.adapter, a.out, a.dtype))
