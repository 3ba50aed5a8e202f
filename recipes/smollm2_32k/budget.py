"""The time budget of gpu_run.py: what each phase is expected to cost on one H100 or H200, and how many training
steps fit in what is left. Every number here is an estimate with its reason; the run records its own seconds per
phase, so the next run can replace them with measurements.

Training is sized last and from the clock: when the train phase starts, the steps are what fits between now and
the budget, less the after-evaluation (the before-evaluation of the extended model measured it: the same work) and
a margin. train.py's --max-train-minutes holds the loop to that time if the GPU is slower than assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

# bf16 forward FLOP rates assumed for evaluation (H100/H200 are the same chip for compute): attention through SDPA's
# flash kernel at head_dim 64 (FlashAttention-2's forward reaches ~300 TFLOP/s there; 250 leaves room), and the
# 576-wide matmuls of a 135M model, which run far from the card's peak.
ATTN_FLOPS = 250e12
MATMUL_FLOPS = 150e12
DECODE_STEP_S = 0.025   # one cached decode step of a 30-layer HF Llama in eager mode: launch-bound, ~25 ms
CITATION_DECODE_STEP_S = 0.07  # the citation questions' decode steps, batches of 8-32 prompts at 8K-32K: 52 s for
#                                the untrained config's 60 questions (96 tokens each, 6 batches) on an H100, 2026-12-07
LOAD_S = 3.0            # a 135M checkpoint from local disk to the GPU, per eval.py run
TRAIN_OVERHEAD_S = 75.0  # train.py outside its loop: launcher, imports, tokenizing ~30M tokens, the evals at the
#                          start and end, the DeepSpeed checkpoint and final model (76 s measured on an H100 with
#                          27M tokens, 2026-12-07; 57 s on the H200 with 2.5M tokens, 2026-12-04)
# Training speed by row length (no checkpointing, Liger, ZeRO-2 on one GPU), each a little under what was measured so
# that a slower card still anneals: 32K rows 65.2K/s and 66.9K/s medians on H100s (2026-12-07, 207 and 229 steps),
# 65K/s on the H200 (2026-12-04); 48K rows 57.6K/s on an H100 (2026-12-07, 85 steps). Rows hold shorter documents
# too, so a longer row costs less than its FLOPs a token say (48K by FLOPs: 44.9K/s; the run left 176 s idle).
TRAIN_TOKENS_PER_S_AT = {32768: 63_000.0, 49152: 55_000.0}
TRAIN_TOKENS_PER_S = TRAIN_TOKENS_PER_S_AT[32768]
CONVERT_S = 35.0        # measured 41, 26, 35 and 31 s on H100s, 33 s on the H200 (CPU work: the GGUF's tokenizer,
#                         tensors)
DATA_S = 90.0           # measured 104, 88, 86 and 58 s on H100s (2026-12-07): site-packages, tokenizing what is kept, the
#                         citation examples (one core)
FIGURES_S = 5.0
MARGIN_S = 60.0         # for the estimates above being short


@dataclass
class Model:
    """The shape the FLOP counts need (SmolLM2-135M's by default)."""
    layers: int = 30
    hidden: int = 576
    matmul_params: float = 106e6  # without the embedding (the head runs on the last position only when generating)


def prefill_s(length: int, m: Model = Model()) -> float:
    """A causal forward over `length` tokens: 4 L^2/2 d per layer in attention, 2 P per token in the matmuls."""
    attn = 2.0 * length * length * m.hidden * m.layers
    return attn / ATTN_FLOPS + 2.0 * m.matmul_params * length / MATMUL_FLOPS


def generation_s(lengths: list[int], new_tokens: int, batch_tokens: int, step_s: float = DECODE_STEP_S) -> float:
    """Prompts of these lengths answered with greedy_many: each prefill, and new_tokens decode steps per batch."""
    by_len: dict[int, int] = {}
    for n in lengths:
        by_len[n] = by_len.get(n, 0) + 1
    n_batches = sum(-(-k // max(1, batch_tokens // L)) for L, k in by_len.items())
    return sum(prefill_s(n) for n in lengths) + n_batches * new_tokens * step_s


def eval_s(*, lengths: list[int], depths: int, samples: int, ppl_docs: int, ppl_len: int, short_docs: int,
           short_len: int, citation_lengths: list[int], citation_n: int, batch_tokens: int,
           prose: bool = True, extra_prompts: list[int] = ()) -> dict:
    """Seconds of one model's evaluation as gpu_run.evaluate runs it, by part (extra_prompts: the lengths of the
    far-edge probe's passkey prompts)."""
    grid = [L for L in lengths for _ in range(depths * samples)]
    parts = {"retrieval": 2 * generation_s(grid, 7, batch_tokens),  # passkey + multi-needle, ~7 tokens an answer
             "ppl_long": ppl_docs * (prefill_s(ppl_len) + 2 * 135e6 * ppl_len / MATMUL_FLOPS),
             "ppl_short": (1 + prose) * short_docs * prefill_s(short_len),
             "citation": generation_s([L for L in citation_lengths for _ in range(citation_n)], 80, batch_tokens,
                                      CITATION_DECODE_STEP_S),
             "chat": generation_s([40] * 6, 64, batch_tokens),
             "passkey_edge": generation_s(list(extra_prompts), 7, batch_tokens) if extra_prompts else 0.0,
             "loads": LOAD_S * (5 if citation_lengths else 4)}
    parts["total"] = sum(parts.values())
    return parts


def train_flops_per_token(length: int, m: Model = Model(), params: float = 134e6) -> float:
    """6 P for the matmuls (the head included: it runs on every position in training) and 6 L d per layer for
    causal attention over documents as long as the row (forward 2 L d, backward twice that)."""
    return 6.0 * params + 6.0 * length * m.hidden * m.layers


def train_tokens_per_s(length: int) -> float:
    """The speed measured at this row length, or at the nearest measured one moved by the FLOPs a token costs
    (documents as long as the row: low for longer rows, which hold shorter documents too)."""
    near = min(TRAIN_TOKENS_PER_S_AT, key=lambda n: abs(n - length))
    return TRAIN_TOKENS_PER_S_AT[near] * train_flops_per_token(near) / train_flops_per_token(length)


def train_steps(seconds: float, tokens_per_step: int, tokens_per_s: float = TRAIN_TOKENS_PER_S) -> int:
    return max(1, int(seconds * tokens_per_s / tokens_per_step))
