"""Load a local Hugging Face model directory for evaluation; greedy decoding with a KV cache.

Attention for evaluation: flash_attention_2 when flash-attn is installed (sm80+, bf16/fp16), else SDPA.
greedy_many() decodes many prompts together (a retrieval grid, the citation questions, the chat prompts): prompts of
one length are prefilled as one batch, others one by one with their caches stacked left-padded for the decode.
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
from typing import Callable, Sequence

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


def batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices of prompts grouped for greedy_many: by length (equal lengths together, so most batches need no
    padding), each batch at most `batch_tokens` prompt tokens (one prompt at least; 0: every prompt in one)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    used = 0
    for i in order:
        if out and (not batch_tokens or used + lengths[i] <= batch_tokens):
            out[-1].append(i)
            used += lengths[i]
        else:
            out.append([i])
            used = lengths[i]
    return out


def _prefill(model, prompts: Sequence[Sequence[int]], dev):
    """(first tokens [B], cache, prompt lengths, pad mask [B, Lmax] or None). Prompts of one length run as one
    batch without a mask (SDPA's fused causal kernels); others one by one, their caches then stacked with left
    padding, which the decode steps mask out."""
    from transformers import DynamicCache

    lens = [len(p) for p in prompts]
    if len(set(lens)) == 1:
        out = model(input_ids=torch.tensor([list(p) for p in prompts], device=dev), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1), out.past_key_values, lens, None
    longest, firsts, layers = max(lens), [], None
    for p in prompts:
        out = model(input_ids=torch.tensor([list(p)], device=dev), use_cache=True, logits_to_keep=1)
        firsts.append(out.logits[0, -1].argmax())
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        layers = [([], []) for _ in kv] if layers is None else layers
        for (ks, vs), (k, v) in zip(layers, kv):
            pad = longest - k.shape[-2]
            ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
            vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        del out, kv
    cache = DynamicCache(ddp_cache_data=[(torch.cat(ks), torch.cat(vs)) for ks, vs in layers])
    mask = torch.tensor([[0] * (longest - n) + [1] * n for n in lens], device=dev)
    return torch.stack(firsts), cache, lens, mask


@torch.no_grad()
def greedy_many(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: set[int] | None = None,
                *, batch_tokens: int = 0, done: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy continuations of many prompts, decoded several at a time (see batches()): per prompt the tokens
    greedy() gives (to round-off), each continuation ending at a stop token, at max_new_tokens, or once
    done(tokens so far) says the answer is complete. A prefill costs the same batched or not; decoding a batch
    costs about what one prompt's decoding does, which is where the time of short answers goes."""
    dev = next(model.parameters()).device
    results: list[list[int]] = [[] for _ in prompts]
    for idx in batches([len(p) for p in prompts], batch_tokens):
        nxt, cache, lens, mask = _prefill(model, [prompts[i] for i in idx], dev)
        outs = [[] for _ in idx]
        live = list(range(len(idx)))
        for step in range(max_new_tokens):
            toks = nxt.tolist()
            for j in live:
                outs[j].append(int(toks[j]))
            live = [j for j in live if not ((stop_ids and outs[j][-1] in stop_ids) or (done and done(outs[j])))]
            if not live or step + 1 == max_new_tokens:
                break
            kw = {}
            if mask is not None:  # left-padded rows: their own positions, pads masked (a [B, 1, 1, K] mask)
                mask = torch.cat([mask, mask.new_ones(len(idx), 1)], dim=1)
                kw = dict(attention_mask=mask, position_ids=torch.tensor(lens, device=dev).view(-1, 1) + step)
            with _any_sdpa_kernel(dev, mask is not None):
                out = model(input_ids=nxt.view(-1, 1), past_key_values=cache, use_cache=True, **kw)
            nxt = out.logits[:, -1].argmax(-1)
        for j, i in enumerate(idx):
            results[i] = outs[j]
        del cache
    return results


def _any_sdpa_kernel(device: torch.device, masked: bool):
    """A masked one-token decode step may use any SDPA kernel (its scores are [B, heads, 1, K]: the math kernel is
    cheap there), also inside fused_attention_only."""
    if device.type != "cuda" or not masked:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.CUDNN_ATTENTION])
