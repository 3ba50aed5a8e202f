"""docs/RESULTS.md and the plots, generated from bench/results/*.json.

    python -m bench.report                 # rewrite the generated region of docs/RESULTS.md + docs/*.png
    python -m bench.report --check         # exit 1 if docs/RESULTS.md is not what the JSON files generate
    python -m bench.report --results-dir DIR --out FILE --plots-dir DIR --no-plots

Deterministic: runs sorted by (shape, GPUs, cap, layers, run_id), techniques in ladder order, lengths
ascending, fixed float formats, no timestamps except the dates inside the JSON. Only the region between
the markers below is generated; anything else in RESULTS.md (hand-written sections) is kept as is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- BEGIN GENERATED: bench (python -m bench.report; edit bench/report.py, not this region) -->"
END = "<!-- END GENERATED: bench -->"
DASH = "—"

# technique display order (kept in sync with bench.techniques.ORDER without importing torch)
ORDER = ("baseline", "upstream_offload", "varlen", "upstream_best", "liger_gc", "liger", "fork_offload", "tiled_mlp",
         "sp", "sp_tiled", "lora", "longlora")
TECH_DESC = {
    "baseline": "SDPA + GC (upstream transformers + ZeRO-3 CPU offload)",
    "upstream_offload": "+ upstream `activation_checkpointing_enable(offload=True)`",
    "varlen": "+ varlen FlashAttention (torch `varlen_attn`)",
    "upstream_best": "SDPA + upstream offload + Liger (best without this project)",
    "liger_gc": "varlen + Liger + GC without offload (overhead reference)",
    "liger": "+ Liger fused linear CE / RMSNorm / SwiGLU / RoPE",
    "fork_offload": "+ fork's offloaded checkpointing (instead of upstream's)",
    "tiled_mlp": "fork_offload + DeepSpeed TiledMLP (ceil(seq/hidden) shards)",
    "sp": "fork_offload + Ulysses sequence parallelism over all GPUs (one sample per node)",
    "sp_tiled": "sp + tiled MLP",
    "lora": "LoRA (peft) + trainable embeddings and norms, full attention",
    "longlora": "LongLoRA: LoRA + trainable embeddings/norms + S²-Attn",
}

TARGETS = (
    # (label, shape, n_gpus, cap, goal tokens)
    ("8B, 4 GPUs, 48 GiB cap: max trainable length", "llama3.1-8b", 4, 48.0, 1024 * 1024),
    ("8B, 4 GPUs, 16 GiB cap: max trainable length", "llama3.1-8b", 4, 16.0, 512 * 1024),
)
MFU_TARGET = (131072, 0.35)
OVERHEAD_TARGET = 0.05

ANCHORS = """\
### Public anchors (not measured here)

| Source | Setting | Reported |
| --- | --- | --- |
| Arctic Long Sequence Training (ALST), Snowflake 2025 | Llama-3.1-8B, HF baseline, 1×H100 80 GB | 32K tokens/sample |
| ALST | same, with ALST (tiled compute, Ulysses SP, offloaded checkpoints), 1×H100 | 500K |
| ALST | same, 8×H100 (one node) | 3.7M; strict MFU about 22% by our arithmetic (`longctx/flops.py`) |
| Unsloth | QLoRA (not full-parameter) Llama-3.1-8B, 80 GB GPU | 342K |
"""


# ------------------------------------------------------------------------------------------- formatting
def fmt_len(n) -> str:
    if n is None:
        return DASH
    n = int(n)
    if n < 1024:
        return str(n)
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n % 1024 == 0:
        return f"{n >> 10}K"
    return f"{n / 1024:.1f}K"


def fmt_f(x, nd=2, suffix="") -> str:
    return DASH if x is None else f"{x:.{nd}f}{suffix}"


def fmt_pct(x) -> str:
    return DASH if x is None else f"{100 * x:.1f}%"


def fmt_cap(cap) -> str:
    return "none (full card)" if cap in (None, 0) else f"{float(cap):g} GiB"


def fmt_int(x) -> str:
    return DASH if x is None else f"{int(round(x)):,}"


def tech_key(name: str):
    return (ORDER.index(name), name) if name in ORDER else (len(ORDER), name)


# ------------------------------------------------------------------------------------------------- load
def load_results(results_dir: Path) -> list[dict]:
    runs = []
    for p in sorted(Path(results_dir).glob("*.json")):
        d = json.loads(p.read_text())
        if d.get("schema") != 1:
            continue
        d["_file"] = p.name
        runs.append(d)
    runs.sort(key=lambda r: (r.get("shape") or "", r.get("n_gpus") or 0, r.get("mem_cap_gib") or 0,
                             r.get("layers") or 0, r.get("run_id") or r["_file"]))
    return runs


def final_rows(run: dict) -> dict:
    """(technique, seq_len) -> row; later rows for the same pair (resume) win, except an ok is kept."""
    out: dict = {}
    for r in run.get("rows", []):
        key = (r.get("technique"), r.get("seq_len"))
        if key in out and out[key].get("status") == "ok" and r.get("status") != "ok":
            continue
        out[key] = r
    return out


def max_trainable(run: dict, tech: str):
    """(max_ok, first_fail, how) from the search row if any, else from the rows."""
    searches = [s for s in run.get("searches", []) if s.get("technique") == tech]
    rows = [r for (t, _), r in final_rows(run).items() if t == tech]
    oks = [r["seq_len"] for r in rows if r.get("status") == "ok"]
    fails = [r["seq_len"] for r in rows if r.get("status") in ("oom", "crashed")]
    for s in searches:  # a search's own verdicts count too (subprocess mode writes no rows for known lengths)
        oks += [s["max_ok"]] if s.get("max_ok") else []
        fails += [s["first_fail"]] if s.get("first_fail") else []
    best_ok = max(oks) if oks else None
    first_fail = min([f for f in fails if best_ok is None or f > best_ok], default=None)
    if searches:
        s = searches[-1]
        # a search the time budget cut short has not found the boundary, whatever its `converged` flag says
        converged = s.get("converged") and not s.get("stopped_by_budget") and first_fail is not None
        how = "search, ±10%" if converged else "search, stopped early (budget): a lower bound"
        return best_ok, first_fail, how
    return best_ok, first_fail, "fixed lengths only"


def as_run(run: dict, tech: str) -> str:
    """The implementations the worker actually used (attention; loss; checkpointing), or the skip reason."""
    rows = [r for (t, _), r in sorted(final_rows(run).items(), key=lambda kv: kv[0][1] or 0) if t == tech]
    seen = []
    for r in rows:
        parts = [r.get("attn_impl"), r.get("loss_impl"), r.get("checkpointing")]
        if any(parts):
            desc = "; ".join(p for p in parts if p)
        elif r.get("status") == "skipped" and str(r.get("error", "")).startswith("unavailable"):
            desc = str(r["error"])
        else:
            continue
        if desc not in seen:
            seen.append(desc)
    return " / ".join(seen).replace("|", "/") or DASH


def status_cell(r: dict) -> str:
    st = r.get("status")
    return {"oom": "OOM", "crashed": "crashed", "error": "error", "skipped": "skipped"}.get(st, st or DASH)


# ------------------------------------------------------------------------------------------------ render
def render_run(run: dict) -> list[str]:
    v = run.get("versions") or {}
    layers = run.get("layers")
    rows = final_rows(run)
    techs = sorted({t for t, _ in rows}, key=tech_key)
    L = [f"### {run.get('shape')}, {run.get('n_gpus')}× {run.get('device')}, cap {fmt_cap(run.get('mem_cap_gib'))}"
         f" — run `{run.get('run_id')}`", ""]
    depth = f"{layers} decoder layers" if layers else "full depth"
    git = run.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + (" (dirty)" if git.get("dirty") else "")
    L.append(f"Date {run.get('date') or DASH}; {depth}; micro-batch 1 sample per GPU; bf16; ZeRO-3 with parameters "
             f"and optimizer on CPU. torch {v.get('torch') or DASH}, transformers "
             f"{v.get('transformers_fork') or v.get('transformers') or DASH}, deepspeed {v.get('deepspeed') or DASH}, "
             f"liger-kernel {v.get('liger_kernel') or DASH}; git {commit}; peak "
             f"{fmt_f(run.get('peak_tflops'), 0)} TFLOP/s per GPU for MFU.")
    for res in run.get("resumes") or []:  # later invocations appended to this run (bench.run --resume)
        techniques = (res.get("config") or {}).get("techniques") or (res.get("config") or {}).get("technique")
        L.append(f"Resumed (`bench.run --resume`, a fresh worker on the same kind of machine, git "
                 f"{((res.get('git') or {}).get('commit') or 'unknown')[:10]}): {techniques}.")
    L.append("")
    L += ["| Technique | What it adds | Max trainable length | First failure | How found | As run |",
          "| --- | --- | --- | --- | --- | --- |"]
    for t in techs:
        ok, fail, how = max_trainable(run, t)
        bound = "≥ " if ok and fail is None else ""  # nothing failed: the real maximum is not known yet
        L.append(f"| {t} | {TECH_DESC.get(t, t)} | {bound}{fmt_len(ok)} | {fmt_len(fail)} | {how} | {as_run(run, t)} |")
    L += ["", "| Technique | Seq len | s/step | tokens/s/GPU | TFLOP/s/GPU | MFU (strict) | HFU | Peak GPU GiB "
          "| Peak RSS GiB (all ranks) | Pinned GiB |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (t, n) in sorted(rows, key=lambda k: (tech_key(k[0]), k[1] or 0)):
        r = rows[(t, n)]
        if r.get("status") == "skipped":
            continue
        if r.get("status") == "ok":
            L.append(f"| {t} | {fmt_len(n)} | {fmt_f(r.get('step_time_s'), 2)} | {fmt_int(r.get('tokens_per_s_per_gpu'))}"
                     f" | {fmt_f(r.get('tflops_per_gpu'), 1)} | {fmt_pct(r.get('mfu'))} | {fmt_pct(r.get('hfu'))}"
                     f" | {fmt_f(r.get('peak_gpu_alloc_gib'), 1)} | {fmt_f(r.get('peak_rss_sum_gib'), 1)}"
                     f" | {fmt_f(r.get('pinned_peak_gib'), 1)} |")
        else:
            L.append(f"| {t} | {fmt_len(n)} | {status_cell(r)} | {DASH} | {DASH} | {DASH} | {DASH}"
                     f" | {fmt_f(r.get('peak_gpu_alloc_gib'), 1)} | {fmt_f(r.get('peak_rss_sum_gib'), 1)}"
                     f" | {fmt_f(r.get('pinned_peak_gib'), 1)} |")
    L.append("")
    return L


def _best(cands):
    """Highest value; on a tie the first candidate (runs and techniques arrive in a fixed order)."""
    best = (None, None)
    for c in cands:
        if c[0] is not None and (best[0] is None or c[0] > best[0]):
            best = c
    return best


def render_targets(runs: list[dict], offload: list[dict] | None = None) -> list[str]:
    L = ["## Targets", "", "Reported, not asserted. Reduced-depth runs prove per-GPU memory (it does not depend on "
         "depth); the full-depth run is what counts for host RAM and step time.", "",
         "| Target | Goal | Measured | Where |", "| --- | ---: | ---: | --- |"]
    for label, shape, gpus, cap, goal in TARGETS:
        cands = []
        for run in runs:
            if run.get("shape") == shape and run.get("n_gpus") == gpus and (run.get("mem_cap_gib") or 0) == cap:
                for t in sorted({t for t, _ in final_rows(run)}, key=tech_key):
                    ok, _, _ = max_trainable(run, t)
                    depth = f"{run.get('layers')} layers" if run.get("layers") else "full depth"
                    cands.append((ok, f"{t}, {depth}, `{run.get('run_id')}`"))
        val, where = _best(cands)
        mark = "" if val is None else (" (met)" if val >= goal else " (not met)")
        L.append(f"| {label} | ≥ {fmt_len(goal)} | {fmt_len(val)}{mark} | {where or 'no run yet'} |")
    n, goal = MFU_TARGET
    cands = []
    for run in runs:
        if run.get("shape") != "llama3.1-8b":
            continue
        for (t, s), r in final_rows(run).items():
            if s == n and r.get("status") == "ok":
                depth = f"{run.get('layers')} layers" if run.get("layers") else "full depth"
                cands.append((r.get("mfu"), f"{t}, {run.get('n_gpus')} GPUs, cap {fmt_cap(run.get('mem_cap_gib'))}, "
                                            f"{depth}, `{run.get('run_id')}`"))
    val, where = _best(cands)
    mark = "" if val is None else (" (met)" if val >= goal else " (not met)")
    L.append(f"| 8B strict MFU at {fmt_len(n)} | ≥ {fmt_pct(goal)} | {fmt_pct(val)}{mark} | {where or 'no run yet'} |")
    # offloaded checkpointing overhead: fork_offload vs liger_gc (same stack, checkpoints kept on GPU)
    cands = []
    for run in runs:
        rows = final_rows(run)
        common = sorted(s for (t, s), r in rows.items() if t == "fork_offload" and r.get("status") == "ok"
                        and rows.get(("liger_gc", s), {}).get("status") == "ok")
        if common:
            s = common[-1]
            ov = rows[("fork_offload", s)]["step_time_s"] / rows[("liger_gc", s)]["step_time_s"] - 1
            cands.append((s, ov, f"at {fmt_len(s)}, `{run.get('run_id')}`"))
    for res in offload or []:  # bench/offload_checkpointing.py: the fork's checkpointer vs plain, side by side
        plain = {r["seq_len"]: r for r in res["rows"] if r["mode"] == "plain" and r["status"] == "ok"}
        for r in res["rows"]:
            if r["mode"] == "fork" and r["status"] == "ok" and r["seq_len"] in plain:
                ov = r["step_s"] / plain[r["seq_len"]]["step_s"] - 1
                cands.append((r["seq_len"], ov, f"at {fmt_len(r['seq_len'])}, fork vs plain checkpointing, "
                                                f"{res['config']['layers']} layers, 1× {res['device']} (section below)"))
    if cands:
        s, ov, where = max(cands, key=lambda c: c[0])
        mark = " (met)" if ov <= OVERHEAD_TARGET else " (not met)"
        L.append(f"| Offloaded checkpointing step-time overhead | ≤ {fmt_pct(OVERHEAD_TARGET)}"
                 f" | {'+' if ov >= 0 else ''}{fmt_pct(ov)}{mark} | {where} |")
    else:
        L.append(f"| Offloaded checkpointing step-time overhead | ≤ {fmt_pct(OVERHEAD_TARGET)}"
                 f" | {DASH} | no run with offloaded and plain checkpointing at a common length yet |")
    L.append("")
    return L


def load_offload_results(results_dir: Path) -> list[dict]:
    """Runs of bench/offload_checkpointing.py (the fork's checkpointer against plain and upstream offload)."""
    return [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("offload_checkpointing/*.json"))]


def render_offload(results: list[dict]) -> list[str]:
    L = []
    for res in results:
        cfg = res["config"]
        L += [f"## Offloaded checkpointing: {cfg['shape']} shape, {cfg['layers']} layers, 1× {res['device']}", "",
              f"Date {res['date']}; torch {res['versions']['torch']}, transformers {res['versions']['transformers']}; "
              f"{cfg['dtype']}, {cfg['attention']}, loss: {cfg['loss']}; median of {cfg['steps']} steps after a "
              f"warm-up. `bench/offload_checkpointing.py`. {res.get('note', '')}".rstrip(), "",
              "| Seq len | Mode | s/step | vs plain | Peak GPU GiB (allocated) | Saved vs plain GiB "
              "| Predicted checkpoints GiB (L×S×hidden×2) | Peak reserved GiB |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        plain = {r["seq_len"]: r for r in res["rows"] if r["mode"] == "plain" and r["status"] == "ok"}
        for r in res["rows"]:
            p = plain.get(r["seq_len"])
            if r["status"] != "ok":
                L.append(f"| {fmt_len(r['seq_len'])} | {r['mode']} | OOM | — | — | — | — | — |")
                continue
            ratio = f"{r['step_s'] / p['step_s']:.3f}×" if p else "—"
            saved = f"{p['peak_gib'] - r['peak_gib']:.1f}" if p else "—"
            L.append(f"| {fmt_len(r['seq_len'])} | {r['mode']} | {r['step_s']:.2f} | {ratio} | {r['peak_gib']:.1f} "
                     f"| {saved} | {r['predicted_checkpoint_gib']:.1f} | {r['reserved_gib']:.1f} |")
        L.append("")
    return L


def render(runs: list[dict], offload: list[dict] | None = None) -> str:
    L = [BEGIN, "", "## Definitions", "",
         "- **Max trainable length**: longest sequence (one sample per GPU) for which a full optimizer step "
         "(forward, backward, optimizer step) completed; step-up search doubling then refined to 10%.",
         "- **MFU (strict)**: model FLOPs (matmuls, causal attention counted as S²/2 per document, no credit "
         "for recompute; `longctx/flops.py`) / (step time × peak). **HFU** adds the recomputed forward of "
         "checkpointed layers. Peak: 989 TFLOP/s bf16 dense for H100/H200 SXM.",
         "- **Cap**: per-process GPU memory cap set with `torch.cuda.set_per_process_memory_fraction`, to "
         "emulate smaller cards (48 GiB ≈ A6000/L40S class, 16 GiB ≈ V100 class) on the same GPUs.",
         "- **Peak RSS (all ranks)**: per-rank peak resident host memory, summed over ranks on the host. "
         "**Pinned**: peak of torch's pinned host allocator, summed over ranks. Both are the process's figures "
         "while the row ran: torch keeps pinned blocks cached, so a row that ran after a longer one in the same "
         "worker shows that one's host memory (the order of the rows' runs is `worker_argv` in the JSON).",
         "- **Rows longer than 64K run a single step** (warm-up and timed at once): it includes one-time costs "
         "such as allocating pinned host buffers for the new length, so those rows are pessimistic.",
         ""]
    L += render_targets(runs, offload)
    L += ["## Ladder per hardware profile", ""]
    if not runs:
        L += ["No benchmark results yet: run `make bench` on a GPU machine (see bench/README.md).", ""]
    for run in runs:
        L += render_run(run)
    L += render_offload(offload or [])
    L.append(ANCHORS)
    L.append(END)
    return "\n".join(L) + "\n"


DEFAULT_DOC = """# Results

Measured by `make bench` (bench/README.md) and generated by `make report` from bench/results/*.json.
Text outside the generated region is kept when the report is regenerated.

![Peak GPU memory vs sequence length](memory_vs_seqlen.png)
![Tokens/s per GPU vs sequence length](tokens_per_s_vs_seqlen.png)

"""


def update_document(existing: str | None, generated: str) -> str:
    if not existing:
        return DEFAULT_DOC + generated
    if BEGIN in existing and END in existing:
        head, rest = existing.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        return head + generated.rstrip("\n") + tail if tail.strip() else head + generated
    return existing.rstrip("\n") + "\n\n" + generated


# ------------------------------------------------------------------------------------------------- plots
def plot(runs: list[dict], plots_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = [r for r in runs if any(x.get("status") == "ok" for x in final_rows(r).values())]
    outs = []
    specs = (("memory_vs_seqlen.png", "peak_gpu_alloc_gib", "Peak GPU memory (GiB)"),
             ("tokens_per_s_vs_seqlen.png", "tokens_per_s_per_gpu", "Tokens/s per GPU"))
    for fname, key, ylabel in specs:
        n = max(1, len(plotted))
        fig, axes = plt.subplots(n, 1, figsize=(9.5, 3.6 * n), squeeze=False)
        for ax, run in zip(axes[:, 0], plotted):
            rows = final_rows(run)
            for t in sorted({t for t, _ in rows}, key=tech_key):
                pts = sorted((s, r.get(key)) for (tt, s), r in rows.items()
                             if tt == t and r.get("status") == "ok" and r.get(key) is not None)
                if pts:
                    line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=t)
                    oom = [s for (tt, s), r in rows.items() if tt == t and r.get("status") == "oom"]
                    if oom and key == "peak_gpu_alloc_gib" and run.get("mem_cap_gib"):  # where it ran out
                        ax.plot(oom, [run["mem_cap_gib"]] * len(oom), marker="x", markersize=9, linestyle="none",
                                color=line.get_color())
            cap = run.get("mem_cap_gib")
            if key == "peak_gpu_alloc_gib" and cap:
                ax.axhline(cap, color="grey", linestyle="--", linewidth=1, label=f"cap {cap:g} GiB")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length (tokens per sample)")
            ax.set_ylabel(ylabel + (" (x: OOM at the cap)" if key == "peak_gpu_alloc_gib" else ""))
            depth = f", {run.get('layers')} layers" if run.get("layers") else ""
            ax.set_title(f"{run.get('shape')}{depth}, {run.get('n_gpus')}× {run.get('device')}, "
                         f"cap {fmt_cap(cap)}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        if not plotted:
            axes[0, 0].text(0.5, 0.5, "no results yet", ha="center", va="center")
            axes[0, 0].set_axis_off()
        fig.tight_layout()
        out = plots_dir / fname
        fig.savefig(out, dpi=90, metadata={"Software": None})
        plt.close(fig)
        outs.append(out)
    return outs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--out", default=str(ROOT / "docs" / "RESULTS.md"))
    p.add_argument("--plots-dir", default=None, help="default: the directory of --out")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--check", action="store_true", help="exit 1 if --out differs from what would be generated")
    a = p.parse_args(argv)
    runs = load_results(Path(a.results_dir))
    out = Path(a.out)
    existing = out.read_text() if out.exists() else None
    new = update_document(existing, render(runs, load_offload_results(Path(a.results_dir))))
    if a.check:
        if existing != new:
            print(f"{out} is stale: run `python -m bench.report` (or `make report`)", file=sys.stderr)
            return 1
        print(f"{out} is up to date ({len(runs)} runs)")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(new)
    print(f"wrote {out} ({len(runs)} runs)")
    if not a.no_plots:
        for f in plot(runs, Path(a.plots_dir) if a.plots_dir else out.parent):
            print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
