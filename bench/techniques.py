"""Benchmark techniques: each is a set of train.py flags (Config overrides), run through the product's Trainer.

The upstream stacks are configs too: transformers' own SDPA and loss, upstream checkpointing with and without
`activation_checkpointing_enable(offload=True)`, Liger or not, with the fork's features off and ZeRO-3 offloading
parameters and optimizer to CPU as `ds_configs/zero3_offload.json` did before placement was resolved.

    longctx          the README recipe: --offload-gradient-checkpointing, every other setting auto (Liger on with a GPU)
    longctx_gc       the same with checkpoints on the GPU (no offload)
    baseline         upstream SDPA + plain checkpointing + transformers' fp32 loss, no Liger
    upstream_offload baseline + upstream offload=True
    upstream_best    upstream SDPA + upstream offload=True + Liger (auto: on with a GPU): the best stack without us
    varlen           longctx with torch's varlen_attn (the default kernel before sdpa_per_doc)
    sdpa_per_doc     longctx with SDPA per document (auto without flash-attn-4; named, for runs beside fa4)
    fa4              longctx with flash-attention-4 (auto where flash-attn-4 is installed on an sm90 GPU)
    recompute_attn   longctx without selective checkpointing (attention rerun in backward, as before)
    params_cpu       longctx with parameters forced to CPU     } where parameters live, measured side by side
    params_gpu       longctx with parameters forced on the GPU }
    opt_gpu          longctx with the optimizer on the GPU (fp32 master + Adam states in GPU memory)
    all_gpu          longctx with parameters and optimizer on the GPU
    tiled_mlp        longctx with tiled MLP forced on
    sp               longctx with Ulysses sequence parallelism over every rank of the worker
    lora, longlora   LongLoRA: LoRA + trainable embeddings/norms (+ S2-Attn, one document per row)

Liger patches the model classes for the process, so a worker runs one technique (bench.run starts one per
technique).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# offload_param.device as the technique wants it: "auto" (resolved), "cpu", or "none" (on the GPU)
UPSTREAM_OFFLOAD_PARAM = "cpu"


@dataclass(frozen=True)
class Technique:
    name: str
    flags: tuple[str, ...]
    offload_param: str = "auto"
    desc: str = ""
    world_flags: tuple[str, ...] = field(default=())  # flags that take the worker's world size ({world})
    offload_optimizer: str = "cpu"  # offload_optimizer.device: "cpu", or "none" (optimizer states on the GPU)


_RECIPE = ("--offload-gradient-checkpointing",)  # --liger auto: on wherever a GPU and liger-kernel are
# upstream SDPA packs only with an S x S mask; upstream checkpointing recomputes attention; upstream has no tiled MLP
# (train.py's auto would tile where the untiled step does not fit, and the row would no longer be upstream's)
_UPSTREAM_SDPA = ("--attn-implementation", "sdpa", "--no-packing", "--no-keep-attention", "--no-tiled-mlp")

TECHNIQUES = {t.name: t for t in (
    Technique("longctx", _RECIPE, desc="longctx defaults (README recipe: fork offload + Liger, the rest auto)"),
    Technique("longctx_gc", (), desc="longctx defaults with checkpoints on the GPU"),
    Technique("baseline", _UPSTREAM_SDPA + ("--liger", "off", "--no-tiled-loss"), UPSTREAM_OFFLOAD_PARAM,
              "upstream: SDPA + checkpointing + transformers' fp32 loss"),
    Technique("upstream_offload", _UPSTREAM_SDPA + ("--liger", "off", "--no-tiled-loss",
                                                    "--offload-gradient-checkpointing", "--offload-impl", "upstream"),
              UPSTREAM_OFFLOAD_PARAM, "upstream: + activation_checkpointing_enable(offload=True)"),
    Technique("upstream_best", _UPSTREAM_SDPA + ("--offload-gradient-checkpointing",
                                                 "--offload-impl", "upstream"),
              UPSTREAM_OFFLOAD_PARAM, "upstream's best: SDPA + offload=True + Liger"),
    Technique("varlen", _RECIPE + ("--attn-implementation", "varlen"), desc="longctx with torch varlen_attn"),
    Technique("sdpa_per_doc", _RECIPE + ("--attn-implementation", "sdpa_per_doc"),
              desc="longctx with SDPA per document (auto without flash-attn-4)"),
    Technique("fa4", _RECIPE + ("--attn-implementation", "fa4"), desc="longctx with flash-attention-4"),
    Technique("recompute_attn", _RECIPE + ("--no-keep-attention",),
              desc="longctx with plain checkpointing (attention recomputed in backward)"),
    Technique("keep_selective", _RECIPE + ("--keep-attention",),
              desc="longctx with attention kept by torch's selective checkpointing, at every length"),
    Technique("keep_replay", _RECIPE + ("--keep-attention", "--keep-attention-by", "replay"),
              desc="longctx with attention kept by replaying its outputs (reentrant checkpointing), at every length"),
    Technique("params_cpu", _RECIPE, "cpu", "longctx with parameters on CPU"),
    Technique("params_gpu", _RECIPE, "none", "longctx with parameters on the GPU"),
    Technique("opt_gpu", _RECIPE, offload_optimizer="none",
              desc="longctx with the optimizer states and update on the GPU (parameters resolved)"),
    Technique("all_gpu", _RECIPE, "none", offload_optimizer="none",
              desc="longctx with parameters and optimizer on the GPU (ZeRO-3, no offload)"),
    Technique("tiled_mlp", _RECIPE + ("--tiled-mlp",), desc="longctx with tiled MLP forced on"),
    Technique("sp", _RECIPE, desc="longctx + Ulysses SP over the worker's GPUs",
              world_flags=("--sequence-parallel", "{world}")),
    Technique("lora", _RECIPE + ("--lora",), desc="LoRA + trainable embeddings and norms"),
    Technique("longlora", _RECIPE + ("--lora", "--s2-attn", "--no-packing"), desc="LongLoRA: LoRA + S2-Attn"),
)}
ORDER = tuple(TECHNIQUES)


def get(name: str) -> Technique:
    if name not in TECHNIQUES:
        raise ValueError(f"unknown technique {name!r}; choose from {', '.join(TECHNIQUES)}")
    return TECHNIQUES[name]
