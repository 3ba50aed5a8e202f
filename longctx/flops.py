"""Model FLOPs, hardware FLOPs and MFU for decoder-only GQA transformers (Llama, Mistral, Qwen2/3).

Stable API (train.py's metrics and bench/ both call these; keep names and signatures):

    ModelShape(hidden, layers, heads, kv_heads, head_dim, intermediate, vocab)
    ModelShape.from_config(hf_config) -> ModelShape
    train_flops(shape, seq_lens, *, causal=True) -> float
        Model FLOPs of one forward+backward over the documents in `seq_lens` (one entry per packed
        document; a batch of B samples of length S is [S] * B). No credit for recompute.
    hardware_flops(shape, seq_lens, *, causal=True, recompute_layers=None) -> float
        What the hardware actually computes: train_flops plus one more forward of the recomputed
        decoder layers (activation checkpointing). recompute_layers=None means all layers.
    mfu(flops, seconds, n_gpus, peak) -> float
        flops / (seconds * n_gpus * peak). `flops` is the total over all GPUs for that step,
        `peak` is FLOP/s of one GPU (see peak_flops). Pass hardware_flops(...) to get HFU.
    peak_flops(device_name, dtype="bf16") -> float | None
        Dense peak FLOP/s of one GPU from PEAK_TFLOPS, matched by substring of the device name.

Conventions (the "strict" form):
  * Matmuls only, 2 FLOPs per multiply-add. Norms, rotary, softmax, activations, embedding lookup
    and the optimizer are not counted (they are < 1% at these shapes).
  * Per token and layer, forward: q and o projections 2*h*(H*d) each, k and v 2*h*(K*d) each
    (GQA: K kv heads), gated MLP 3 matmuls of 2*h*I. lm_head 2*h*V per token, once.
  * Attention per document of length S, per layer, forward: scores Q K^T and P V are each
    2*H*d*S^2 for full attention; causal attention counts half of that (S^2/2 pairs), the usual
    convention (Megatron-LM, PaLM appendix B, ALST). Packed documents are summed separately,
    which is what a varlen kernel computes; documents never attend across each other.
  * Backward = 2 x forward, so a training step is 3 x forward.
  * HFU adds a 4th forward for checkpointed decoder layers (not the lm_head, which is not
    recomputed). It keeps the causal halving, since flash kernels skip fully masked blocks.

No torch import: usable from CPU tests, report generation and dry runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "ModelShape",
    "PEAK_TFLOPS",
    "forward_flops",
    "train_flops",
    "hardware_flops",
    "mfu",
    "peak_flops",
]


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """Read a transformers PretrainedConfig (or any object / mapping with the same field names)."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, Mapping) else (
            lambda k, d=None: getattr(config, k, d))
        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        kv_heads = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or hidden // heads
        return cls(hidden=hidden, layers=int(get("num_hidden_layers")), heads=heads, kv_heads=int(kv_heads),
                   head_dim=int(head_dim), intermediate=int(get("intermediate_size")), vocab=int(get("vocab_size")))

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def params(self) -> int:
        """Parameter count of the matmul weights plus embedding (untied); for orientation only."""
        h, d = self.hidden, self.head_dim
        per_layer = h * self.heads * d * 2 + h * self.kv_heads * d * 2 + 3 * h * self.intermediate
        return per_layer * self.layers + 2 * h * self.vocab


def _layer_linear_fwd_per_token(s: ModelShape) -> int:
    h, d = s.hidden, s.head_dim
    qo = 2 * (2 * h * s.heads * d)
    kv = 2 * (2 * h * s.kv_heads * d)
    mlp = 3 * (2 * h * s.intermediate)
    return qo + kv + mlp


def _attn_fwd_per_layer(s: ModelShape, seq_len: int, causal: bool) -> float:
    full = 2 * (2 * s.heads * s.head_dim * seq_len * seq_len)  # QK^T and PV
    return full / 2 if causal else float(full)


def _check(seq_lens: Iterable[int]) -> list[int]:
    lens = [int(x) for x in seq_lens]
    if any(x < 0 for x in lens):
        raise ValueError(f"negative sequence length in {lens}")
    return lens


def forward_flops(shape: ModelShape, seq_lens: Sequence[int], *, causal: bool = True,
                  layers: int | None = None, lm_head: bool = True) -> float:
    """One forward pass over the documents: `layers` decoder layers (default all) and optionally lm_head."""
    lens = _check(seq_lens)
    n_layers = shape.layers if layers is None else int(layers)
    tokens = sum(lens)
    per_layer = _layer_linear_fwd_per_token(shape) * tokens + sum(_attn_fwd_per_layer(shape, s, causal) for s in lens)
    head = 2 * shape.hidden * shape.vocab * tokens if lm_head else 0
    return float(n_layers * per_layer + head)


def train_flops(shape: ModelShape, seq_lens: Sequence[int], *, causal: bool = True) -> float:
    """Model FLOPs (strict: causal halving, no recompute) of forward+backward = 3 x forward."""
    return 3.0 * forward_flops(shape, seq_lens, causal=causal)


def hardware_flops(shape: ModelShape, seq_lens: Sequence[int], *, causal: bool = True,
                   recompute_layers: int | None = None) -> float:
    """train_flops plus the forward recomputed by activation checkpointing (`recompute_layers` decoder
    layers; None = all, 0 = no checkpointing)."""
    n = shape.layers if recompute_layers is None else int(recompute_layers)
    if not 0 <= n <= shape.layers:
        raise ValueError(f"recompute_layers={n} outside 0..{shape.layers}")
    return train_flops(shape, seq_lens, causal=causal) + forward_flops(shape, seq_lens, causal=causal,
                                                                       layers=n, lm_head=False)


def mfu(flops: float, seconds: float, n_gpus: int, peak: float) -> float:
    """Fraction of peak: `flops` done by all `n_gpus` together in `seconds`, `peak` FLOP/s per GPU."""
    if seconds <= 0 or n_gpus <= 0 or peak <= 0:
        raise ValueError(f"need positive seconds, n_gpus, peak; got {seconds}, {n_gpus}, {peak}")
    return flops / (seconds * n_gpus * peak)


# Dense (no sparsity) tensor-core peak in TFLOP/s per GPU, from vendor datasheets. Matched in order,
# by case-insensitive substring of torch.cuda.get_device_name(); more specific names first.
# bf16 and fp16 are the same on all of these except V100 (no bf16 tensor cores).
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0}),   # SXM
    ("H200", {"bf16": 989.0, "fp16": 989.0}),   # SXM, same compute as H100 SXM
    ("GH200", {"bf16": 989.0, "fp16": 989.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0}),
    # RTX A6000 datasheet: 154.8 dense bf16/fp16 tensor TFLOPS with fp32 accumulate (309.7 with sparsity).
    ("A6000", {"bf16": 154.8, "fp16": 154.8}),
    ("V100", {"fp16": 125.0}),                  # SXM2; no bf16 tensor cores
)

_DTYPE_ALIASES = {"bfloat16": "bf16", "torch.bfloat16": "bf16", "bf16": "bf16",
                  "float16": "fp16", "torch.float16": "fp16", "half": "fp16", "fp16": "fp16"}


def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """Peak FLOP/s of one GPU for `dtype` ("bf16"/"fp16", or torch dtype str), or None if unknown."""
    key = _DTYPE_ALIASES.get(str(dtype).lower())
    if key is None or not device_name:
        return None
    name = device_name.lower()
    for sub, table in PEAK_TFLOPS:
        if sub.lower() in name:
            tf = table.get(key)
            return None if tf is None else tf * 1e12
    return None
