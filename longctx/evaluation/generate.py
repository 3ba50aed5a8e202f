"""Load a local Hugging Face model directory for evaluation; greedy decoding with a KV cache.

Attention for evaluation: flash_attention_2 when flash-attn is installed (sm80+, bf16/fp16), else SDPA.
One unpadded sequence at a time means SDPA runs causal with no mask, i.e. its FlashAttention kernel on
sm80+ GPUs; no S x S score matrix exists at any length. (train.py's varlen backend is for packed
training rows and has no KV-cache decode path.) Logits: the prompt's forward keeps only the last
position (logits_to_keep=1); perplexity computes them one chunk of positions at a time (perplexity.py).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import LongctxError
from .. import modeling
from ..resolve import resolve_eval_attention


def check_model_dir(path: str) -> dict:
    """The model directory's config.json, after checking that from_pretrained can load weights from it."""
    p = Path(path)
    if not p.is_dir():
        raise LongctxError(f"--model {path}: not a directory (give a local Hugging Face model directory)")
    if not (p / "config.json").is_file():
        raise LongctxError(f"--model {path}: no config.json in the directory")
    if not modeling._has_weights(p):
        raise LongctxError(f"--model {path}: no weights (*.safetensors / pytorch_model*.bin)")
    try:
        return json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise LongctxError(f"--model {path}/config.json: malformed JSON ({e.msg})") from None


def load_tokenizer(model: str, tokenizer: str = ""):
    """The same rule as train.py: --tokenizer, else the model directory's, else the shipped one."""
    tok, path = modeling.load_tokenizer(SimpleNamespace(model=model, tokenizer=tokenizer))
    return tok, path


def choose_attention(requested: str, device, precision: str) -> str:
    """Generation and scoring run one sequence with a KV cache: longctx.resolve.resolve_eval_attention decides.
    `device`: longctx.resolve.Facts."""
    return resolve_eval_attention(requested, device, precision)[0]


def load_model(path: str, *, precision: str, attn_impl: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_impl)
    except Exception as e:
        raise LongctxError(f"--model {path}: cannot load the model: {e}") from None
    if getattr(model.config, "final_logit_softcapping", None):
        raise LongctxError("models with final_logit_softcapping are not supported by the chunked perplexity")
    return model.to(device).eval()


def fused_attention_only(device: torch.device):
    """On CUDA, allow only SDPA's fused kernels (flash, memory-efficient, cuDNN) for the block's forwards."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def probe_fused_attention(model, device: torch.device) -> bool:
    """Whether a prefill and a cached decode step run on fused kernels alone (CPU: trivially yes). When not
    (an unusual head layout, an old torch), evaluation goes on with SDPA's free choice, and says so."""
    if device.type != "cuda":
        return True
    try:
        with fused_attention_only(device):
            greedy(model, [1, 2, 3, 4, 5, 6, 7, 8], 2)
        return True
    except RuntimeError as e:
        print(f"note: SDPA cannot run on fused kernels alone here ({str(e).splitlines()[0][:200]}); "
              "attention may use the math kernel, whose memory grows with length squared", flush=True)
        return False


@torch.no_grad()
def greedy(model, input_ids: list[int], max_new_tokens: int, stop_ids: set[int] | None = None) -> list[int]:
    """Greedy continuation of one prompt. The prompt's forward computes logits for its last position only."""
    dev = next(model.parameters()).device
    out = model(input_ids=torch.tensor([input_ids], device=dev), use_cache=True, logits_to_keep=1)
    new: list[int] = []
    while True:
        nxt = out.logits[0, -1].argmax()
        new.append(int(nxt))
        if len(new) >= max_new_tokens or (stop_ids and new[-1] in stop_ids):
            return new
        out = model(input_ids=nxt.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
