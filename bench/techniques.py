"""Benchmark techniques: each is a set of train.py flags (Config overrides), run through the product's Trainer.

The upstream stacks are configs too: transformers' own SDPA and loss, upstream checkpointing with and without
`activation_checkpointing_enable(offload=True)`, Liger or not, with the fork's features off and ZeRO-3 offloading
parameters and optimizer to CPU as `ds_configs/zero3_offload.json` did before placement was resolved.

    longctx          the README recipe: --offload-gradient-checkpointing, every other setting auto (Liger on with a GPU)
    longctx_gc       the same with checkpoints on the GPU (no offload)
    baseline         upstream SDPA + plain checkpointing + transformers' fp32 loss, no Liger
    upstream_offload baseline + upstream offload=True
    upstream_best    upstream SDPA + upstream offload=True + Liger (auto: on with a GPU), reentrant: the stack the
                     published ratios were taken against; really "upstream_sdpa" (an accepted alias), the weaker stock
                     stack: stock_best is the stronger one
    stock_best       the strongest stack of stock transformers + DeepSpeed + Liger, chosen at each length as a
                     skilled user would (below): transformers' own flash_attention_4 with attention recomputed under
                     64K, SDPA with its outputs kept by torch's selective checkpointing from 64K on;
                     checkpoints on the GPU where the plan fits them there, else upstream's offload (save_on_cpu)
    stock_fa4        the candidates stock_best picks between, each at every length (checkpoints placed as
    stock_sdpa_keep  stock_best's): to check the pick on a GPU (profile 1xgpu-8b-8L-stock-candidates)
    varlen           longctx with torch's varlen_attn (the default kernel before sdpa_per_doc)
    sdpa_per_doc     longctx with SDPA per document (auto without flash-attn-4; named, for runs beside fa4)
    fa4              longctx with flash-attention-4 (auto where flash-attn-4 is installed on an sm90 GPU)
    recompute_attn   longctx without selective checkpointing (attention rerun in backward, as before)
    params_cpu       longctx with parameters forced to CPU     } where parameters live, measured side by side
    params_gpu       longctx with parameters forced on the GPU }
    opt_gpu          longctx with the optimizer on the GPU (fp32 master + Adam states in GPU memory)
    opt_cpu          longctx with every optimizer state on the CPU (ratio 1), its update overlapping the next forward
    opt_cpu_serial   the same with the update after backward, as DeepSpeed runs it (--overlap-optimizer-step off)
    twin_flow        longctx with half the optimizer's sub-groups on the GPU (Twin-Flow, ratio 0.5)
    twin_flow_most   the same at ratio 0.15: 8 of the 8-layer slice's 10 sub-groups on the GPU, the most the plan
                     fits beside kept attention at 128K on an H100 (a candidate rule for auto, issue 32)
    all_gpu          longctx with parameters and optimizer on the GPU
    tiled_mlp        longctx with tiled MLP forced on
    sp               longctx with Ulysses sequence parallelism over every rank of the worker
    lora, longlora   LongLoRA: LoRA + trainable embeddings/norms (+ S2-Attn, one document per row)

Liger patches the model classes for the process, so a worker runs one technique (bench.run starts one per
technique).

The stock stacks (stock_*) use no feature of this project's: no fork offloader (upstream's save_on_cpu, which the
fork keeps as activation_checkpointing_enable(offload="save_on_cpu"), is stock 5.23's offload=True), transformers'
own attention implementations, no packing beyond transformers' padding-free flash-attention path (cu_seqlens), no
tiled MLP, no longctx.fa4 ops, no replay. Attention is kept the way a stock user writes it: torch's
create_selective_checkpoint_contexts policy (longctx.selective: save the attention ops' outputs, recompute the rest)
as transformers' activation_checkpointing_kwargs {"use_reentrant": False, "context_fn": ...}. Two stock features do
not combine: transformers' flash_attention_4 calls flash-attn-4's autograd Function, whose kernels run outside
torch's dispatcher, so selective checkpointing cannot keep them (longctx.resolve refuses --keep-attention with it).
So a stock user chooses, per length, between the faster kernel recomputed and SDPA kept:
  - under KEEP_ATTENTION_MIN_TOKENS (64K) flash_attention_4, recomputed (SDPA, recomputed, where flash-attn-4 is not
    installed): the selective policy's per-op dispatch cost measured larger than the recompute it saves at 16K;
  - from 64K on SDPA with its outputs kept: an estimate from this project's H100 rows, not a measurement. One 128K
    document, 8B shape at 8 layers: flash-attention-4 kept ran 11.20 s a step, SDPA (cuDNN) kept 12.18 s
    (2026-12-05_h100_1xgpu-8b-8L-fa4); recomputing flash-attention-4's forward adds about 8 x 0.79 s / 3.5 (its fwd +
    bwd per layer, 2026-12-05_h100_attention_fa4, with the forward's share of the FLOPs) = 1.8 s: ~13.0 against
    ~12.2 s, if stock SDPA runs one document as fast as SDPA per document (upstream_best 14.52 s against
    recompute_attn's 14.30 s at 128K says about so). stock_fa4 and stock_sdpa_keep measure both at every length.
Where the parameters and optimizer states live is the default's decision (the same ZeRO placement: the plan's
choice between zero3.json and zero3_offload.json, which `train.py --plan` shows a stock user), but never this
project's overlapped CPU step (--overlap-optimizer-step off). Where the checkpoints go is what `train.py --plan` tells that user: on the GPU where the plan fits the step there,
else upstream's offload. At reduced depth (the 8-layer profiles) the plan fits GPU checkpoints at lengths where the
full-depth model would need the offload: the stock stack there is as strong as the card allows, not the full model's.
Each row's `flags` and `settings` say what ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from longctx.resolve import KEEP_ATTENTION_MIN_TOKENS

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
    # offload_optimizer.ratio (the CPU share of the optimizer's sub-groups): None leaves the ds_config's "auto"
    optimizer_ratio: Optional[float] = None
    # stock stacks: the candidate flag sets at a row length, in order of preference; the first that train.py
    # resolves on the machine runs, with UPSTREAM_OFFLOAD added where the plan does not fit it on the GPU
    # (flags_at). None: `flags` at every length.
    pick: Optional[Callable[[int], tuple[tuple[str, ...], ...]]] = None


_RECIPE = ("--offload-gradient-checkpointing",)  # --liger auto: on wherever a GPU and liger-kernel are
# upstream SDPA packs only with an S x S mask; upstream checkpointing recomputes attention; upstream has no tiled MLP
# (train.py's auto would tile where the untiled step does not fit, and the row would no longer be upstream's)
_UPSTREAM_SDPA = ("--attn-implementation", "sdpa", "--no-packing", "--no-keep-attention", "--no-tiled-mlp",
                  "--overlap-optimizer-step", "off")
UPSTREAM_OFFLOAD = ("--offload-gradient-checkpointing", "--offload-impl", "upstream")
# the stock candidates (Liger auto: on with a GPU, as upstream_best). transformers' flash_attention_4 packs through
# its padding-free varlen path, so packing stays on; its kernels cannot be kept
# the overlapped CPU step is this project's (longctx.overlap_step): off in every stock stack
_STOCK_FA4 = ("--attn-implementation", "flash_attention_4", "--no-keep-attention", "--no-tiled-mlp",
              "--overlap-optimizer-step", "off")
_STOCK_SDPA_KEEP = ("--attn-implementation", "sdpa", "--no-packing", "--keep-attention", "--keep-attention-by",
                    "selective", "--no-tiled-mlp", "--overlap-optimizer-step", "off")


def _stock_best(seq_len: int) -> tuple[tuple[str, ...], ...]:
    if seq_len >= KEEP_ATTENTION_MIN_TOKENS:
        return (_STOCK_SDPA_KEEP,)
    return (_STOCK_FA4, _UPSTREAM_SDPA)  # SDPA recomputed where flash-attn-4 is not installed


TECHNIQUES = {t.name: t for t in (
    Technique("longctx", _RECIPE, desc="longctx defaults (README recipe: fork offload + Liger, the rest auto)"),
    Technique("longctx_gc", (), desc="longctx defaults with checkpoints on the GPU"),
    Technique("baseline", _UPSTREAM_SDPA + ("--liger", "off", "--no-tiled-loss"), UPSTREAM_OFFLOAD_PARAM,
              "upstream: SDPA + checkpointing + transformers' fp32 loss"),
    Technique("upstream_offload", _UPSTREAM_SDPA + ("--liger", "off", "--no-tiled-loss",
                                                    "--offload-gradient-checkpointing", "--offload-impl", "upstream"),
              UPSTREAM_OFFLOAD_PARAM, "upstream: + activation_checkpointing_enable(offload=True)"),
    Technique("upstream_best", _UPSTREAM_SDPA + UPSTREAM_OFFLOAD, UPSTREAM_OFFLOAD_PARAM,
              "upstream_sdpa (the weaker stock stack; named upstream_best in earlier runs): SDPA + offload=True + "
              "Liger, reentrant, attention recomputed"),
    Technique("stock_best", (),
              desc="the strongest stock stack (transformers + DeepSpeed + Liger, no fork feature) at each length: "
              "transformers' flash_attention_4 recomputed under 64K, SDPA kept by selective checkpointing from 64K; "
              "checkpoints on the GPU where the plan fits them, else upstream's offload", pick=_stock_best),
    Technique("stock_fa4", (),
              desc="stock: transformers' flash_attention_4 (attention recomputed) + Liger; checkpoints placed by the plan",
              pick=lambda n: (_STOCK_FA4,)),
    Technique("stock_sdpa_keep", (),
              desc="stock: SDPA kept by torch's selective checkpointing + Liger; checkpoints placed by the plan",
              pick=lambda n: (_STOCK_SDPA_KEEP,)),
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
    Technique("opt_cpu", _RECIPE, optimizer_ratio=1.0,
              desc="longctx with every optimizer state on the CPU, the update overlapping the next forward"),
    Technique("opt_cpu_serial", _RECIPE + ("--overlap-optimizer-step", "off"), optimizer_ratio=1.0,
              desc="longctx with every optimizer state on the CPU, updated after backward (DeepSpeed's order)"),
    Technique("twin_flow", _RECIPE, optimizer_ratio=0.5,
              desc="longctx with half the optimizer's sub-groups on the GPU (Twin-Flow ratio 0.5)"),
    Technique("twin_flow_most", _RECIPE, optimizer_ratio=0.15,
              desc="longctx with 8 of the 8-layer slice's 10 optimizer sub-groups on the GPU (Twin-Flow ratio 0.15)"),
    Technique("all_gpu", _RECIPE, "none", offload_optimizer="none",
              desc="longctx with parameters and optimizer on the GPU (ZeRO-3, no offload)"),
    Technique("tiled_mlp", _RECIPE + ("--tiled-mlp",), desc="longctx with tiled MLP forced on"),
    Technique("sp", _RECIPE, desc="longctx + Ulysses SP over the worker's GPUs",
              world_flags=("--sequence-parallel", "{world}")),
    Technique("lora", _RECIPE + ("--lora",), desc="LoRA + trainable embeddings and norms"),
    Technique("longlora", _RECIPE + ("--lora", "--s2-attn", "--no-packing"), desc="LongLoRA: LoRA + S2-Attn"),
)}
ORDER = tuple(TECHNIQUES)


# other names for a technique; rows carry the technique's own name
ALIASES = {"upstream_sdpa": "upstream_best"}


def get(name: str) -> Technique:
    name = ALIASES.get(name, name)
    if name not in TECHNIQUES:
        raise ValueError(f"unknown technique {name!r}; choose from {', '.join(TECHNIQUES)} (aliases: "
                         f"{', '.join(f'{a} = {t}' for a, t in ALIASES.items())})")
    return TECHNIQUES[name]


def flags_at(tech: Technique, seq_len: int, plan: Callable[[tuple[str, ...]], Optional[bool]]) -> tuple[str, ...]:
    """The train.py flags `tech` runs at `seq_len`. `plan(flags)` is the skilled user's `train.py --plan` on the
    machine: None where train.py refuses the flags there, else whether the plan fits the step on its GPU."""
    if tech.pick is None:
        return tech.flags
    refused = []
    for flags in tech.pick(seq_len):
        fits = plan(flags)
        if fits is None:
            refused.append(" ".join(flags))
            continue
        return flags if fits else flags + UPSTREAM_OFFLOAD
    raise ValueError(f"{tech.name} at {seq_len}: train.py refuses every candidate on this machine: "
                     + "; ".join(refused))


def plan_fits(argv: list[str], facts, model_config, world: int) -> Optional[bool]:
    """`plan` for flags_at: resolve `argv` as train.py would on the machine `facts` describes; None where it refuses
    them (LongctxError), else whether the memory plan of the resolved step fits its GPU (True without one)."""
    from longctx import config, resolve
    from longctx.errors import LongctxError
    from longctx.plan import plan
    from longctx.plan_search import check_fit
    from longctx.plan_settings import setup_from_resolved

    try:
        cfg = config.parse(argv)
        settings = resolve.resolve(cfg, facts, model_config, world)
    except LongctxError:
        return None
    if not facts.gpu_mem:
        return True
    return check_fit(plan(setup_from_resolved(settings, cfg, model_config)), facts).gpu_ok
