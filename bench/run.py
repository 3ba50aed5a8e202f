"""`make bench`: run one hardware profile's technique ladder and collect it into one JSON result file.

    python -m bench.run --profile 4xh200-8b-48g [--budget-s 480] [--dry-run]
    python -m bench.run --shape llama3.2-3b --gpus 1 --techniques baseline,liger --lengths 16K,32K --search
    python -m bench.run --collect bench/results/raw/<run_id>.jsonl      # rebuild the JSON after a kill

Rows are appended to bench/results/raw/<run_id>.jsonl by the worker (bench/train_bench.py) as they are
measured, and bench/results/<run_id>.json is rewritten from it (atomically) after every worker and on
--collect, so a killed run keeps every row already measured. `--resume <run_id>` runs again and skips the
(technique, length) pairs that already have a result. `--subprocess-per-try` starts a fresh worker for every
length (isolates each try from an earlier OOM; costs one model init per try) and runs the max-length
search here instead of inside the worker.

run_id = <date>_<device>_<shape>[-<layers>L]_<gpus>x_<cap>, e.g. 2026-11-22_h200_llama3.1-8b-8L_4x_48g.
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
import time
from pathlib import Path

from longctx import runs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SCHEMA = 1

# Profiles sized for one <= 10 minute call each (see bench/README.md). Reduced depth proves memory (the per-GPU
# working set does not depend on depth); the search runs only for the last rung, the one that goes furthest.
LADDER6 = "baseline,upstream_offload,varlen,liger_gc,liger,fork_offload"
PROFILES: dict[str, dict] = {
    "cpu-smoke": dict(shape="tiny-llama", gpus=1, cap=None, layers=None, techniques=LADDER6, lengths="256,512",
                      search=True, search_limit="2K", search_multiple="128", init_warmup_len="128",
                      env={"BENCH_LIGER_FALLBACK": "torch"}),
    # (a) one H100/H200: Llama-3.2-3B shape, full depth (3B + optimizer states fit a 125 GiB host)
    "1xgpu-3b": dict(shape="llama3.2-3b", gpus=1, cap=None, layers=None, techniques=LADDER6,
                     lengths="16K,32K,64K,128K", search=True, search_techniques="fork_offload",
                     search_limit="384K", budget_s=480),
    # (b) 4xH200, 8B shape at 8 of 32 layers, emulated 48 GiB and 16 GiB cards
    "4xh200-8b-48g": dict(shape="llama3.1-8b", gpus=4, cap=48, layers=8, techniques=LADDER6,
                          lengths="16K,32K,64K,128K,256K", search=True, search_techniques="fork_offload",
                          search_limit="4M", budget_s=480),
    "4xh200-8b-16g": dict(shape="llama3.1-8b", gpus=4, cap=16, layers=8, techniques=LADDER6,
                          lengths="8K,16K,32K,64K", search=True, search_techniques="fork_offload",
                          search_limit="2M", budget_s=480),
    # sequence parallel (Ulysses, one sample over the 4 GPUs) without and with tiled MLP; SP sets need their own
    # worker (SP is fixed at engine build). Throughput at 128K and 512K, then the max length of sp_tiled.
    "4xh200-8b-48g-sp": dict(shape="llama3.1-8b", gpus=4, cap=48, layers=8, techniques="sp,sp_tiled",
                             lengths="128K,512K", search=True, search_techniques="sp_tiled", search_limit="8M",
                             budget_s=480),
    "4xh200-8b-16g-sp": dict(shape="llama3.1-8b", gpus=4, cap=16, layers=8, techniques="sp,sp_tiled",
                             lengths="128K", search=True, search_techniques="sp_tiled", search_limit="4M",
                             budget_s=480),
    # tiled MLP alone (data parallel, one sample per GPU), against the last rung of the ladder
    "4xh200-8b-48g-tiled": dict(shape="llama3.1-8b", gpus=4, cap=48, layers=8, techniques="fork_offload,tiled_mlp",
                                lengths="128K,256K", search=True, search_techniques="tiled_mlp", search_limit="4M",
                                budget_s=480),
    "cpu-smoke-sp": dict(shape="tiny-llama", gpus=2, cap=None, layers=None, techniques="sp,sp_tiled",
                         lengths="256,512", search=False, init_warmup_len="128",
                         env={"BENCH_LIGER_FALLBACK": "torch"}),
    # full depth, last rung only: the headline step time / MFU / host RAM (start detached: it can outlast a call)
    "4xh200-8b-48g-full": dict(shape="llama3.1-8b", gpus=4, cap=48, layers=None, techniques="fork_offload",
                               lengths="64K,128K", search=False, budget_s=1500),
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
    """{"commit", "dirty"} of the code under test (LONGCTX_GIT_COMMIT overrides a stale checkout's HEAD)."""
    info = runs.git_info()
    return {"commit": info["hash"], "dirty": info["dirty"], **({"source": info["source"]} if "source" in info else {})}


# ---------------------------------------------------------------------------------------------- collect
def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return rows


def _with_resume(resumes: list, extra: dict) -> list:
    entry = {"config": extra["config"], "git": extra.get("git")}
    return resumes if entry in resumes else resumes + [entry]


def collect(raw: Path, out: Path | None = None, extra: dict | None = None) -> dict:
    """Fold a worker JSONL into the result JSON (written atomically). Dangling attempts become 'crashed'."""
    recs = read_jsonl(raw)
    metas = [r for r in recs if r.get("kind") == "meta"]
    rows, searches, pending = [], [], {}
    for r in recs:
        k = r.get("kind")
        key = (r.get("technique"), r.get("seq_len"))
        if k == "attempt":
            pending[key] = r
        elif k == "row":
            pending.pop(key, None)
            rows.append({x: v for x, v in r.items() if x != "kind"})
        elif k == "search":
            searches.append({x: v for x, v in r.items() if x != "kind"})
    for (tech, L), r in pending.items():
        rows.append({"technique": tech, "seq_len": L, "phase": r.get("phase"), "status": "crashed",
                     "error": "no result row: the worker died during this try (host OOM kill, timeout or signal)"})
    meta = metas[0] if metas else {}
    prev = json.loads(out.read_text()) if out and out.exists() else {}
    extra = extra or {}
    resumed = bool(extra.get("resumed") and prev.get("config"))
    res = {
        "schema": SCHEMA,
        "run_id": extra.get("run_id") or prev.get("run_id") or raw.stem,
        "date": meta.get("date") or prev.get("date"),
        "device": meta.get("device") or prev.get("device"),
        "n_gpus": meta.get("n_gpus") or prev.get("n_gpus"),
        "mem_cap_gib": meta.get("mem_cap_gib", prev.get("mem_cap_gib")),
        "gpu_total_gib": meta.get("gpu_total_gib", prev.get("gpu_total_gib")),
        "peak_tflops": meta.get("peak_tflops", prev.get("peak_tflops")),
        "host_ram_gib": meta.get("host_ram_gib", prev.get("host_ram_gib")),
        "versions": meta.get("versions") or prev.get("versions"),
        "shape": meta.get("shape") or prev.get("shape"),
        "layers": meta.get("layers") or prev.get("layers"),
        "model_shape": meta.get("model_shape") or prev.get("model_shape"),
        "ds_config": meta.get("ds_config") or prev.get("ds_config"),
        "init": [m.get("init") for m in metas],
        "worker_argv": [m.get("argv") for m in metas],
        # --resume: the first invocation's config and commit stay; every later one is listed under "resumes"
        "git": prev.get("git") if resumed else extra.get("git") or prev.get("git"),
        "config": prev.get("config") if resumed else extra.get("config") or prev.get("config"),
        "resumes": _with_resume(prev.get("resumes", []), extra) if resumed else prev.get("resumes", []),
        "rows": rows,
        "searches": searches,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, out)
    return res


# ------------------------------------------------------------------------------------------------- run
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES))
    p.add_argument("--shape")
    p.add_argument("--gpus", type=int)
    p.add_argument("--cap", type=float, help="GPU memory cap in GiB (emulated card); omit for none")
    p.add_argument("--layers", type=int)
    p.add_argument("--techniques")
    p.add_argument("--technique", help="one custom set, e.g. 'varlen+liger+fork_offload'")
    p.add_argument("--lengths")
    p.add_argument("--search", action="store_true", default=None)
    p.add_argument("--no-search", dest="search", action="store_false")
    p.add_argument("--search-limit")
    p.add_argument("--budget-s", type=float, help="wall-clock budget per worker process (includes init)")
    p.add_argument("--subprocess-per-try", action="store_true")
    p.add_argument("--resume", metavar="RUN_ID", help="append to this run, skipping lengths already measured")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--collect", metavar="JSONL", help="only rebuild the JSON from a raw JSONL and exit")
    p.add_argument("--dry-run", action="store_true", help="print the worker command(s) and exit")
    p.add_argument("--master-port", type=int, default=29512)
    p.add_argument("extra", nargs="*", help="passed to bench/train_bench.py after '--'")
    return p.parse_args(argv)


def resolve_profile(a) -> dict:
    prof = dict(PROFILES[a.profile]) if a.profile else {"techniques": "baseline", "lengths": "16K,32K", "gpus": 1}
    for k, attr in (("shape", "shape"), ("gpus", "gpus"), ("cap", "cap"), ("layers", "layers"),
                    ("techniques", "techniques"), ("lengths", "lengths"), ("search", "search"),
                    ("search_limit", "search_limit"), ("budget_s", "budget_s")):
        v = getattr(a, attr)
        if v is not None:
            prof[k] = v
    if a.technique:
        prof["techniques"] = None
        prof["technique"] = a.technique
    prof.setdefault("shape", "llama3.1-8b")
    return prof


def worker_cmd(prof: dict, out: Path, run_id: str, lengths: str | None = None, search: bool | None = None,
               master_port: int = 29512, extra=()) -> list[str]:
    script = str(ROOT / "bench" / "train_bench.py")
    gpus = int(prof.get("gpus") or 1)
    launch = (["deepspeed", "--num_gpus", str(gpus), "--master_port", str(master_port), script] if gpus > 1
              else [sys.executable, script])
    cmd = launch + ["--shape", prof["shape"], "--out", str(out), "--run-id", run_id,
                    "--lengths", lengths or prof["lengths"]]
    if prof.get("technique"):
        cmd += ["--technique", prof["technique"]]
    else:
        cmd += ["--techniques", prof["techniques"]]
    for k, flag in (("layers", "--layers"), ("cap", "--mem-cap-gib"), ("budget_s", "--time-budget-s"),
                    ("search_limit", "--search-limit"), ("search_multiple", "--search-multiple"),
                    ("init_warmup_len", "--init-warmup-len"), ("search_techniques", "--search-techniques"),
                    ("rel_tol", "--rel-tol")):
        if prof.get(k) not in (None, ""):
            cmd += [flag, str(prof[k])]
    if (prof.get("search") if search is None else search):
        cmd.append("--search")
    return cmd + list(extra)


def run_worker(cmd: list[str], env_extra: dict, log) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    log(f"$ {shlex.join(cmd)}")
    # The worker gets its own process group, and a signal that stops this process (timeout's SIGTERM, ^C) stops the
    # whole group first: an orphaned worker would hold the GPU and slow whatever runs next on it.
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)

    def stop(signum, _frame):
        _stop_group(proc)
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
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
    results = Path(a.results_dir)
    if a.collect:
        raw = Path(a.collect)
        res = collect(raw, results / f"{raw.stem}.json")
        print(f"{results / (raw.stem + '.json')}: {len(res['rows'])} rows, {len(res['searches'])} searches")
        return 0
    prof = resolve_profile(a)
    device = "cpu" if prof["shape"] == "tiny-llama" else detect_device()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    run_id = a.resume or run_id_for(date, device, prof["shape"], prof.get("layers"), int(prof.get("gpus") or 1),
                                    prof.get("cap"))
    raw = results / "raw" / f"{run_id}.jsonl"
    out = results / f"{run_id}.json"
    env_extra = prof.pop("env", {}) or {}
    config = {k: v for k, v in prof.items()}
    config["profile"] = a.profile
    extra = {"run_id": run_id, "git": git_info(), "config": config, "resumed": bool(a.resume)}
    log = lambda m: print(f"[bench.run] {m}", file=sys.stderr, flush=True)  # noqa: E731

    done = {(r.get("technique"), r.get("seq_len")) for r in collect(raw)["rows"]
            if r.get("status") in ("ok", "oom")} if a.resume else set()
    lengths = prof["lengths"]
    if done:
        from bench.train_bench import parse_len
        techs = (prof.get("techniques") or prof.get("technique")).split(",")
        left = [x for x in lengths.split(",") if any((t, parse_len(x)) not in done for t in techs)]
        log(f"resume {run_id}: {len(done)} results kept; lengths still to run: {left or 'none'}")
        lengths = ",".join(left) if left else None

    if a.dry_run:
        print(shlex.join(worker_cmd(prof, raw, run_id, lengths, master_port=a.master_port, extra=a.extra)))
        return 0
    raw.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if not a.subprocess_per_try:
        rc = 0
        if lengths or prof.get("search"):
            rc = run_worker(worker_cmd(prof, raw, run_id, lengths or prof["lengths"], master_port=a.master_port,
                                       extra=a.extra), env_extra, log)
        res = collect(raw, out, extra)
    else:
        rc = subprocess_per_try(prof, raw, out, run_id, env_extra, extra, a, log)
        res = collect(raw, out, extra)
    ok = sum(r.get("status") == "ok" for r in res["rows"])
    log(f"{out}: {len(res['rows'])} rows ({ok} ok), {len(res['searches'])} searches, "
        f"{time.monotonic() - t0:.0f}s, worker rc={rc}")
    return 0 if rc == 0 else rc


def subprocess_per_try(prof, raw, out, run_id, env_extra, extra, a, log) -> int:
    """One worker per (technique, length); the search runs here. Slow (init per try) but isolated."""
    from bench import techniques as T
    from bench.search import find_max_length
    from bench.train_bench import parse_len

    techs = [prof["technique"]] if prof.get("technique") else prof["techniques"].split(",")
    deadline = time.monotonic() + float(prof["budget_s"]) if prof.get("budget_s") else None
    rc_all = 0
    for tech in techs:
        T.resolve(tech)  # validate the name early

        def status_of(L):
            for r in reversed(collect(raw)["rows"]):
                if r.get("technique") in (tech, T.NAMED.get(tech, T.Technique(tech)).name) and r.get("seq_len") == L:
                    return r.get("status")
            return None

        def try_len(L):
            nonlocal rc_all
            p = dict(prof, technique=tech, techniques=None, budget_s=None)
            rc = run_worker(worker_cmd(p, raw, run_id, str(L), search=False, master_port=a.master_port,
                                       extra=list(a.extra) + ["--init-warmup-len", "0"]), env_extra, log)
            if rc:
                rc_all = rc
            collect(raw, out, extra)
            return status_of(L) == "ok"

        known = {}
        for L in [parse_len(x) for x in prof["lengths"].split(",")]:
            if deadline and time.monotonic() > deadline:
                break
            known[L] = try_len(L)
            if not known[L]:
                break
        if prof.get("search"):
            oks = [L for L, ok in known.items() if ok]
            start = max(oks) if oks else parse_len(prof["lengths"].split(",")[0])
            res = find_max_length(try_len, start, parse_len(str(prof.get("search_limit") or "4M")), 0.10,
                                  multiple_of=4096, known=known,
                                  can_try=lambda L: deadline is None or time.monotonic() < deadline)
            with open(raw, "a") as f:
                f.write(json.dumps({"kind": "search", "technique": tech, "max_ok": res.max_ok,
                                    "first_fail": res.first_fail, "tried": [[L, ok] for L, ok in res.tried],
                                    "converged": res.converged(0.10), "mode": "subprocess-per-try",
                                    "n_gpus": prof.get("gpus"), "mem_cap_gib": prof.get("cap"),
                                    "layers": prof.get("layers")}, sort_keys=True) + "\n")
    return rc_all


if __name__ == "__main__":
    sys.exit(main())
