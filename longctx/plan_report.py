"""The text of a plan and the `train.py --plan` command: format_plan, the hint to keep the states on the GPU, and
cli_plan, which resolves a run's config as train.py does (longctx.resolve) and plans it on the named hardware.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

from .data import estimate_resident_bytes
from .errors import LongctxError
from .facts import Facts
from .plan import HEAD_CHUNK_TOKENS, plan, tiled_mlp_shards, working_set_units
from .plan_search import check_fit, host_knob, max_seq_len_that_fits, next_knobs, placement_rows, short_of
from .plan_settings import kept_attention_label, setup_from_resolved
from .plan_states import total_params
from .plan_types import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, HOST_USABLE, GiB, KiB, MiB, Setup
from .resolve import resolve


# ---- text -------------------------------------------------------------------------------------------
def gib(x: float) -> str:
    return f"{x / GiB:7.2f}"


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def describe(setup: Setup) -> str:
    s = setup
    z = f"ZeRO-{s.zero_stage}" if s.zero_stage else "no ZeRO"
    off = [n for n, on in (("params", s.offload_params), ("optimizer", s.offload_optimizer)) if on]
    z += f", {' + '.join(off)} on CPU" + (" (pinned)" if s.pin_memory else "") if off else ""
    ck = {"none": "off", "plain": "on GPU" + (" (reentrant)" if s.reentrant else ""),
          "offload": f"offloaded ({s.offload_impl}, {s.offloaded_layers}/{s.shape.layers} layers)"}[s.checkpointing]
    ck += kept_attention_label(s.keep_attention, s.keep_attention_by)
    loss = {"full": "full fp32 logits", "chunked": f"chunked CE ({HEAD_CHUNK_TOKENS} tokens)",
            "liger": "Liger fused linear CE", "none": "none"}[s.loss]
    return (f"{s.precision} | {z} | checkpointing {ck} | loss {loss} | Liger kernels "
            f"{'on' if s.liger_kernels else 'off'} | attention {s.attention} | tiled MLP "
            f"{s.tiled_mlp_shards if s.tiled_mlp_shards > 1 else 'off'} | sequence parallel {s.sp}")


def format_plan(setup: Setup, hw: Facts, *, model_name: str = "", optional: tuple[str, ...] = (),
                setup_at=None) -> str:
    p = plan(setup)
    s, sh = setup, setup.shape
    P = total_params(sh, lm_head=s.lm_head, tied=s.tied_embeddings)
    v = check_fit(p, hw)
    lines = [f"Memory plan: {model_name or 'model'} ({P / 1e9:.2f}B params: {sh.layers} layers, hidden {sh.hidden}, "
             f"vocab {sh.vocab:,}); {s.seq_len:,} tokens x micro-batch {s.micro_batch} per GPU; "
             f"{hw.gpus} GPU(s) x {hw.gpu_mem / GiB:g} GiB, host {hw.host_mem / GiB:g} GiB"
             + (f" [{hw.name}]" if hw.name and not hw.assumed else ""),
             f"  {describe(s)}", "", "GPU, per rank                                                   GiB"]
    for i in p.persistent:
        lines.append(f"  {i.name:<60}{gib(i.bytes)}")
    totals = p.phase_totals
    for ph, items in p.phases.items():
        mark = "  <- peak" if ph == p.peak_phase else ""
        lines.append(f"  phase: {ph:<53}{gib(totals[ph])}{mark}")
        if ph == p.peak_phase:
            for i in items:
                if i.bytes:
                    note = f" ({i.note})" if i.note else ""
                    lines.append(f"    {(i.name + note)[:57]:<58}{gib(i.bytes)}")
    if p.working_set_tiled is not None:
        lines.append(f"  per-layer working set without tiling {gib(p.working_set_untiled).strip()} GiB, "
                     f"with {s.tiled_mlp_shards} shards {gib(p.working_set_tiled).strip()} GiB")
    else:
        t = working_set_units(sh, s.act_bytes, liger=s.liger_kernels,
                              mlp_shards=tiled_mlp_shards(s.tokens, sh.hidden), reentrant=s.reentrant)
        lines.append(f"  per-layer working set {gib(p.working_set_untiled).strip()} GiB; with tiled MLP "
                     f"{t * s.tokens * sh.hidden * s.act_bytes / GiB:.2f} GiB")
    need = p.gpu_peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES
    lines += [f"  {'predicted peak allocated':<60}{gib(p.gpu_peak)}",
              f"  {f'+ allocator slack {ALLOCATOR_SLACK:.0%} + CUDA context {CUDA_CONTEXT_BYTES / GiB:g} GiB = needed':<60}"
              f"{gib(need)}  of {hw.gpu_mem / GiB:g}: {'fits' if v.gpu_ok else 'DOES NOT FIT'}",
              "", f"Host RAM, per rank (x{hw.gpus} ranks on the host)"]
    for i in p.host:
        lines.append(f"  {(i.name + (f' ({i.note})' if i.note else ''))[:59]:<60}{gib(i.bytes)}")
    if p.host_at_init > p.host_steady:
        lines.append(f"  {'peak at init, before the pinned cache is emptied':<60}{gib(p.host_at_init)}")
    if p.host_at_flatten > max(p.host_steady, p.host_at_init):
        lines.append(f"  {'peak at init, parameters flattened through host RAM':<60}{gib(p.host_at_flatten)}")
    lines += [f"  {'total per rank':<60}{gib(p.host_per_rank)}",
              f"  {f'total, {hw.gpus} ranks (usable {HOST_USABLE:.0%} of {hw.host_mem / GiB:g} GiB)':<60}"
              f"{gib(p.host_total(hw.gpus))}  {'fits' if v.host_ok else 'DOES NOT FIT'}",
              f"  {'pinned host memory, all ranks':<60}{gib(p.pinned * hw.gpus)}", ""]
    placements = placement_rows(setup, hw)
    if placements:
        lines += placements + [""]
    best = max_seq_len_that_fits(setup, hw, setup_at=setup_at)
    lines.append(f"Largest max_seq_len that fits: {best:,} ({fmt_len(best)})" if best else
                 "Largest max_seq_len that fits: none (even 1K does not fit)")
    knobs = next_knobs(setup, hw, optional=optional)
    if not v.host_ok:
        lines.append(f"Host memory is the limit: {host_knob(p, hw)}")
    if not knobs and not v.gpu_ok:
        more = ("a larger --sequence-parallel (on more GPUs: each rank holds 1/N of a row)" if setup.sp > 1 else
                "--sequence-parallel N over N GPUs (now each rank holds its whole row)")
        lines.append("Next knob: none of the configured settings on these GPUs lowers the GPU peak further; "
                     f"{more}, a shorter --max-seq-len, or a GPU with more memory.")
    elif knobs:
        lines.append("Next knobs (re-planned at this length):")
        for k, before, after, mx in knobs:
            lines.append(f"  {k.flag}: {k.what}; peak {before / GiB:.2f} -> {after / GiB:.2f} GiB, "
                         + (f"max_seq_len {fmt_len(mx)}" if mx else f"but then {short_of(k.setup, hw)}"))
    return "\n".join(lines)


# ---- the `--plan` command: sizes, the model config, the run resolved as train.py resolves it -----------------
_UNITS = {"": 1, "b": 1, "k": KiB, "kb": 1000, "kib": KiB, "m": MiB, "mb": 1000 ** 2, "mib": MiB,
          "g": GiB, "gb": 1000 ** 3, "gib": GiB, "t": 1 << 40, "tb": 1000 ** 4, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'16GiB', '16G', '512 GB', '80' (GiB when no unit) -> bytes."""
    t = str(text).strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if not num or unit not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 16GiB, 512G, 48GB)")
    value = float(num)
    return int(value * (_UNITS[unit] if unit else GiB))


def _read_model_config(path: str) -> dict:
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise LongctxError(f"--model {path}: cannot read the model config ({e})") from None
    if "text_config" in d:
        d = {**d, **d["text_config"]}
    return d


def cli_plan(cfg, optional: tuple[str, ...] = ()) -> str:
    """`train.py --plan`: the plan of the run `cfg` describes, resolved as train.py resolves it, on the hardware
    named by --gpus/--gpu-mem/--host-mem (default: this machine). Reads only JSON: no model, no GPU needed."""
    try:
        gpu_bytes = parse_size(cfg.gpu_mem) if cfg.gpu_mem else None
        host_bytes = parse_size(cfg.host_mem) if cfg.host_mem else None
    except ValueError as e:
        raise LongctxError(str(e)) from None
    here = Facts.detect()
    facts = here.as_target(gpus=cfg.gpus or (None if here.cuda else int(os.environ.get("WORLD_SIZE", 1))),
                           gpu_mem=gpu_bytes, host_mem=host_bytes, precision=cfg.precision)
    if facts.gpu_mem is None:
        raise LongctxError("--plan: no GPU here; name the target with --gpus N --gpu-mem SIZE (e.g. --gpu-mem 16GiB)")
    mc = _read_model_config(cfg.model)
    settings = resolve(cfg, facts, mc, world=facts.gpus)
    data_bytes = estimate_resident_bytes(cfg.data)  # per rank; the tokens stay memory-mapped
    setup = dataclasses.replace(setup_from_resolved(settings, cfg, mc), data_bytes=data_bytes)

    def setup_at(n: int) -> Setup:  # train.py's resolution at another --max-seq-len
        c = dataclasses.replace(cfg, max_seq_len=n)
        return dataclasses.replace(setup_from_resolved(resolve(c, facts, mc, world=facts.gpus), c, mc),
                                   data_bytes=data_bytes)

    text = format_plan(setup, facts, model_name=Path(cfg.model).stem if Path(cfg.model).is_file() else cfg.model,
                       optional=optional, setup_at=setup_at)
    notes = ["; ".join(settings.header()[:2])] + [f"{k}: {v}" for k, v in settings.reasons()]
    if facts.assumed:
        notes.append("assumed: " + "; ".join(facts.assumed))
    on_gpu = states_on_gpu_hint(setup, facts)
    return (text + "\n\nResolved (as train.py would run it):\n  " + "\n  ".join(notes)
            + (f"\n\n{on_gpu}" if on_gpu else ""))


def states_on_gpu_hint(setup: Setup, hw: Facts) -> Optional[str]:
    """Where ZeRO-3 offloads the optimizer but the whole model's states would fit the GPUs, what keeping them there
    would plan to: ds_configs/zero3.json skips the CPU Adam step. A hint, not a resolution: the ds_config is the
    user's choice (DeepSpeed's partial offload would leave GPU sub-groups' Adam states out of checkpoints)."""
    if setup.zero_stage != 3 or not setup.offload_optimizer or setup.optimizer == "none":
        return None
    alt = replace(setup, offload_params=False, offload_optimizer=False)
    peak = plan(alt).gpu_peak
    if peak > hw.gpu_usable:
        return None
    return (f"The whole model's states fit the GPUs: with --deepspeed ds_configs/zero3.json (parameters and optimizer "
            f"on the GPU) the plan is {peak / GiB:.1f} GiB per GPU of {hw.gpu_usable / GiB:.1f} usable. It skips the "
            "CPU Adam step: 3.2x faster at 16K and 1.1x at 128K on one H200 (8B shape at 8 layers, docs/RESULTS.md).")
