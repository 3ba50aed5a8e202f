"""`make bench`: run a profile's techniques through train.py's Trainer and collect them into one JSON file.

    python -m bench.run --profile 1xgpu-8b-8L [--results-dir DIR] [--dry-run]
    python -m bench.run --shape llama3.2-3b --techniques longctx,upstream_best --lengths 16K,32K --docs 1

One worker process (bench/train_bench.py) per technique and row shape (--docs): Liger patches the model classes
for the life of a process. A worker keeps one build across its lengths while they resolve alike; a length that
resolves to another build gets a fresh worker (a rebuild in one process died once, most likely of host memory
the first DeepSpeed engine kept). Workers append rows to <results-dir>/raw/<run_id>.jsonl as they measure them;
<results-dir>/<run_id>.json is rewritten from it after every worker (atomically), so a killed run keeps what it
measured. The raw JSONL is a working file: commit the collected JSON, not it.

run_id = <date>_<device>_<shape>[-<layers>L]_<gpus>x_<cap>, e.g. 2026-12-04_h200_llama3.1-8b-8L_1x_nocap, or
<date>_<device>_<--name> (--name opt-cpu-128K: 2026-12-07_h100_opt-cpu-128K), so that runs of one shape on one day
that measure different things keep their own files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from longctx import runs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SCHEMA = 2


def one_gpu_8b_8l(lengths: str, runs: str, **extra) -> dict:
    """A profile of one H100/H200 on the 8B shape at 8 decoder layers."""
    return dict(shape="llama3.1-8b", gpus=1, cap=None, layers=8, lengths=lengths, runs=runs, **extra)


# Each profile fits one <= 10 minute call of a lent GPU (reduced depth: the per-GPU working set does not depend on
# it). `runs` lists technique:docs pairs, one worker each; docs is the row shape: 1 = one document per row, N = N
# equal documents packed into each row, stdlib = Python's standard library's document lengths packed (upstream's
# SDPA cannot pack without an S x S mask, so its stacks run one document per row).
PROFILES: dict[str, dict] = {
    "cpu-smoke": dict(shape="tiny-llama", gpus=1, cap=None, layers=None, lengths="256,512",
                      runs="longctx:1,baseline:1,upstream_best:1,longctx:3"),
    # our default against upstream's best, one document and packed rows
    "1xgpu-8b-8L": one_gpu_8b_8l("16K,64K,128K", "longctx:1,upstream_best:1,recompute_attn:1@128K"),
    # the same with the README recipes' step: four 1-row micro-batches per optimizer step (the CPU Adam step, ~1 s
    # of the 8-layer model, once per four rows)
    "1xgpu-8b-8L-accum4": one_gpu_8b_8l("16K,64K,128K", "longctx:1,upstream_best:1,longctx:stdlib@128K",
                                        grad_accum=4),
    # how attention is kept, at every length: torch's selective checkpointing against the replay of the attention
    # outputs, next to plain checkpointing (the default under 64K) and upstream's best
    "1xgpu-8b-8L-keep": one_gpu_8b_8l("16K,64K,128K",
                                      "upstream_best:1,keep_replay:1,keep_selective:1,recompute_attn:1"),
    # packed real-text document lengths (Python's stdlib): the default against varlen_attn; and the 16K pair again,
    # where a step is ~2 s and one timed step is noisy (run with --steps 2 or more)
    "1xgpu-8b-8L-packed": one_gpu_8b_8l("128K", "longctx:stdlib,varlen:stdlib,longctx:1@16K,upstream_best:1@16K"),
    # flash-attention-4 (flash-attn-4 installed, sm90+) against SDPA per document, one document and packed real text:
    # the measurement by which auto takes it (2026-12-05, H100)
    "1xgpu-8b-8L-fa4": one_gpu_8b_8l("16K,64K,128K",
                                     "sdpa_per_doc:1,fa4:1,upstream_best:1,sdpa_per_doc:stdlib@128K,fa4:stdlib@128K"),
    # beyond 128K, to the longest both stacks run on the card: the default (fa4 where installed) against upstream's
    # best; a length the preflight refuses or that runs out of memory is recorded as such
    "1xgpu-8b-8L-long": one_gpu_8b_8l("192K,256K,384K", "longctx:1,upstream_best:1"),
    # the default against the strongest stock stack (stock_best: transformers' flash_attention_4 or SDPA kept by
    # selective checkpointing, checkpoints placed by the plan; bench/techniques.py) and upstream_best (upstream_sdpa);
    # longer than one 10-minute call (256K rows of three stacks): start it detached and poll
    "1xgpu-8b-8L-stock": one_gpu_8b_8l("16K,64K,128K,256K", "longctx:1,stock_best:1,upstream_best:1"),
    # the two stock candidates stock_best picks between, each at every length: whether its pick is the faster
    "1xgpu-8b-8L-stock-candidates": one_gpu_8b_8l("16K,64K,128K", "stock_fa4:1,stock_sdpa_keep:1"),
    # where the optimizer states go at 128K (issue 32): auto's choice against Twin-Flow at half and at the most the
    # plan fits beside kept attention (one document), and auto on packed stdlib rows (the overlapped step's MFU
    # target); with --breakdown --steps 2, ~9 minutes on an H100: start it detached and poll
    "1xgpu-8b-8L-split": one_gpu_8b_8l("128K", "longctx:1,twin_flow:1,twin_flow_most:1,longctx:stdlib"),
    # where parameters live, and tiled MLP, side by side on one GPU
    "1xgpu-8b-8L-placement": one_gpu_8b_8l("16K,64K,128K", "params_cpu:1,params_gpu:1,tiled_mlp:1"),
    # the 3B shape at full depth (3B + optimizer states fit a 125 GiB host): the default to 256K (the plan's longest
    # is 289K on an H100), upstream's best to 128K; about 17 minutes on an H100: start it detached and poll
    "1xgpu-3b": dict(shape="llama3.2-3b", gpus=1, cap=None, layers=None, lengths="16K,64K,128K",
                     runs="longctx:1@16K+64K+128K+256K,upstream_best:1"),
    # 4 GPUs, 8B at full depth, capped at 48 and 16 GiB (issue: several GPUs)
    "4xgpu-8b-48g": dict(shape="llama3.1-8b", gpus=4, cap=48, layers=None, lengths="128K,512K",
                         runs="longctx:1,upstream_best:1,sp:1"),
    "4xgpu-8b-16g": dict(shape="llama3.1-8b", gpus=4, cap=16, layers=None, lengths="64K,128K", runs="longctx:1,sp:1"),
}


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", s.lower()).strip("-")


def device_slug(name: str) -> str:
    m = re.search(r"(h100|h200|gh200|b200|a100|a6000|l40s|v100)", name.lower())
    return m.group(1) if m else slug(name)[:24] or "unknown"


def cap_slug(cap) -> str:
    return "nocap" if cap in (None, "", 0) else f"{float(cap):g}g"


def run_id_for(date: str, device: str, shape: str, layers, gpus: int, cap) -> str:
    depth = f"-{layers}L" if layers else ""
    return f"{date}_{device_slug(device)}_{shape}{depth}_{gpus}x_{cap_slug(cap)}"


def detect_device() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "cpu"


def git_info() -> dict:
    """{"commit", "dirty"} of the code under test (LONGCTX_GIT_COMMIT states it where a copied tree's HEAD is stale,
    as on the lent GPU machines)."""
    info = runs.git_info()
    return {"commit": info["hash"], "dirty": info["dirty"], **({"source": info["source"]} if "source" in info else {})}


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return rows


def collect(raw: Path, out: Path, extra: dict) -> dict:
    """Fold the workers' JSONL into the result JSON (atomically). A try with no result row is 'crashed'."""
    recs = read_jsonl(raw)
    metas, rows, pending = {}, [], {}
    for r in recs:
        key = (r.get("technique"), r.get("seq_len"), r.get("docs"))
        if r.get("kind") == "meta":
            metas[(r["technique"], r.get("docs"))] = {k: v for k, v in r.items() if k != "kind"}
        elif r.get("kind") == "attempt":
            pending[(r.get("technique"), r.get("seq_len"), r.get("docs"))] = r
        elif r.get("kind") == "restart":  # the try moved to a fresh worker, whose rows follow
            pending.pop(key, None)
        elif r.get("kind") == "row":
            pending.pop(key, None)
            rows.append({k: v for k, v in r.items() if k != "kind"})
    for (tech, length, docs) in pending:
        rows.append({"technique": tech, "seq_len": length, "docs": docs, "status": "crashed",
                     "error": "no result row: the worker died during this try (host OOM kill, timeout or signal)"})
    first = next(iter(metas.values()), {})
    res = {"schema": SCHEMA, **extra, "date": first.get("date"), "device": first.get("device"),
           "n_gpus": first.get("n_gpus"), "gpu_total_gib": first.get("gpu_total_gib"),
           "mem_cap_gib": first.get("mem_cap_gib"), "versions": first.get("versions"), "shape": first.get("shape"),
           "layers": first.get("layers"), "grad_accum": first.get("grad_accum", 1),
           "techniques": {m["technique"]: m.get("technique_desc") for m in metas.values()},
           "rows": sorted(rows, key=lambda r: (str(r.get("docs")), r["seq_len"], r["technique"]))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, out)
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES))
    p.add_argument("--shape")
    p.add_argument("--gpus", type=int)
    p.add_argument("--cap", type=float, help="GPU memory cap in GiB (emulated card); omit for none")
    p.add_argument("--layers", type=int)
    p.add_argument("--runs", help="technique:docs[@lengths] items, comma list (docs: 1, N or stdlib; lengths joined "
                                  "by '+'), e.g. longctx:1,longctx:stdlib@128K")
    p.add_argument("--lengths")
    p.add_argument("--steps", type=int, default=1, help="timed steps per length (after one warmup step)")
    p.add_argument("--grad-accum", type=int,
                   help="rows (micro-batches) per optimizer step, as train.py's --grad-accum (default 1, or the "
                        "profile's); the README's recipes use 4-8")
    p.add_argument("--breakdown", action="store_true",
                   help="time forward, backward and optimizer step of each timed step (syncs the device between them)")
    p.add_argument("--memory-at-peak", action="store_true",
                   help="each row also says what was live at one more (untimed) step's peak (bench/memory_at_peak.py)")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--name", help="what the run measures, in its run_id instead of the shape (letters, digits, '.', "
                                  "'_', '-'), e.g. 8b-8L_placement-128K: <date>_<device>_<name>")
    p.add_argument("--dry-run", action="store_true", help="print the worker commands and exit")
    p.add_argument("--master-port", type=int, default=29512)
    return p.parse_args(argv)


def parse_runs(text: str) -> list[tuple[str, str, str]]:
    """'longctx:1,varlen:stdlib@64K+128K' -> [(technique, docs, lengths)]: docs defaults to 1, lengths (joined by
    '+') to the profile's."""
    out = []
    for r in filter(None, (x.strip() for x in text.split(","))):
        r, _, lengths = r.partition("@")
        t, _, d = r.partition(":")
        out.append((t, d or "1", lengths.replace("+", ",")))
    return out


def resolve_profile(a) -> dict:
    prof = dict(PROFILES[a.profile]) if a.profile else dict(gpus=1, cap=None, layers=None)
    for k in ("shape", "gpus", "cap", "layers", "runs", "lengths", "grad_accum"):
        if getattr(a, k) is not None:
            prof[k] = getattr(a, k)
    missing = [k for k in ("shape", "runs", "lengths") if not prof.get(k)]
    if missing:
        raise SystemExit(f"bench.run: give --profile or --{' --'.join(missing)}")
    return prof


def worker_cmd(prof: dict, technique: str, docs: str, out: Path, run_id: str, steps: int, port: int,
               lengths: str = "", breakdown: bool = False, memory_at_peak: bool = False) -> list[str]:
    script = str(ROOT / "bench" / "train_bench.py")
    gpus = int(prof.get("gpus") or 1)
    launch = (["deepspeed", "--num_gpus", str(gpus), "--master_port", str(port), script] if gpus > 1
              else [sys.executable, script])
    cmd = launch + ["--technique", technique, "--shape", prof["shape"], "--lengths", lengths or prof["lengths"],
                    "--docs", str(docs), "--steps", str(steps), "--out", str(out), "--run-id", run_id]
    if prof.get("layers"):
        cmd += ["--layers", str(prof["layers"])]
    if prof.get("cap"):
        cmd += ["--mem-cap-gib", str(prof["cap"])]
    if int(prof.get("grad_accum") or 1) > 1:
        cmd += ["--grad-accum", str(prof["grad_accum"])]
    return cmd + (["--breakdown"] if breakdown else []) + (["--memory-at-peak"] if memory_at_peak else [])


def run_worker(cmd: list[str]) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    print(f"$ {shlex.join(cmd)}", flush=True)
    # The worker gets its own process group, and a signal that stops this process (timeout's SIGTERM, ^C) stops the
    # whole group first: an orphaned worker would hold the GPU and slow whatever runs next on it.
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)

    def stop(signum, _frame):
        stop_group(proc)
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        stop_group(proc)


def run_until_done(cmd: list[str], raw: Path) -> int:
    """Run a worker; where it asks for a fresh process (a length that needs another build: bench/train_bench.py),
    run it again for the lengths its restart record names. Decided from the record, not the exit code, which a
    multi-rank launcher need not pass on."""
    while True:
        before = sum(r.get("kind") == "restart" for r in read_jsonl(raw))
        rc = run_worker(cmd)
        restarts = [r for r in read_jsonl(raw) if r.get("kind") == "restart"]
        if len(restarts) == before:
            return rc
        i = cmd.index("--lengths")
        cmd = cmd[:i + 1] + [",".join(str(n) for n in restarts[-1]["lengths"])] + cmd[i + 2:]


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers (deepspeed ranks) that ignored SIGTERM
    except ProcessLookupError:
        pass


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", a.name):
        sys.exit(f"bench.run: --name {a.name!r}: letters, digits, '.', '_' and '-' only (it names the results file)")
    prof = resolve_profile(a)
    device = "cpu" if prof["shape"] == "tiny-llama" else detect_device()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    run_id = run_id_for(date, device, prof["shape"], prof.get("layers"), int(prof.get("gpus") or 1), prof.get("cap"))
    if a.profile or a.name:  # runs of one shape and machine (placement, packed) must not overwrite each other
        run_id = f"{date}_{device_slug(device)}_{a.name or a.profile}"
    if a.grad_accum and a.grad_accum > 1:  # another step than the profile's: its own results
        run_id += f"_accum{a.grad_accum}"
    if a.breakdown:  # its step times include the phase syncs: not comparable with a plain run's, kept apart
        run_id += "_breakdown"
    results = Path(a.results_dir)
    raw, out = results / "raw" / f"{run_id}.jsonl", results / f"{run_id}.json"
    extra = {"run_id": run_id, "git": git_info(),
             "command": "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:]),
             "profile": prof}
    cmds = [worker_cmd(prof, t, d, raw, run_id, a.steps, a.master_port, n, a.breakdown, a.memory_at_peak)
            for t, d, n in parse_runs(prof["runs"])]
    if a.dry_run:
        print("\n".join(shlex.join(c) for c in cmds))
        return 0
    raw.parent.mkdir(parents=True, exist_ok=True)
    worst = 0
    for cmd in cmds:
        worst = max(worst, run_until_done(cmd, raw))
        collect(raw, out, extra)
    print(f"{out}: {len(json.loads(out.read_text())['rows'])} rows", flush=True)
    return worst


if __name__ == "__main__":
    sys.exit(main())
