"""TRL's SFTTrainer with upstream's checkpoint offload (torch's save_on_cpu) against the fork's offloader, side by side.

    python -m bench.trl_offload --out RESULT.json                       # 8B shape at 8 layers, 32K/64K/128K, one GPU
    python -m bench.trl_offload --out RESULT.json --steps 4 --lengths 32K,64K
    python -m bench.trl_offload --tiny --out /tmp/trl_tiny.json         # CPU: tiny Llama, 256/512 tokens, fp32

Nothing of longctx's trainer runs here: this is what a TRL user gets from `pip install ./transformers-fork`. Each
variant is one `SFTTrainer` on a randomly initialised Llama-3.1-8B-shaped model (`bench/shapes.py`, `--layers`
decoder layers, bf16 weights) with `SFTConfig(bf16=True, per_device_train_batch_size=1, activation_checkpointing=True,
use_liger_kernel=True, optim="adamw_torch_fused", packing=False, max_length=<longest length>)` and

- `plain`:    activation_checkpointing_kwargs=None (checkpointing, nothing offloaded);
- `upstream`: {"offload": "save_on_cpu"} (upstream transformers' offload=True: torch's save_on_cpu);
- `fork`:     {"offload": True} (with the fork installed: the fork's offloader; its `stored` count is recorded).

Every variant runs in its own process (Liger patches classes for the life of a process; pinned host memory and the
CUDA caching allocator start clean), one `trainer.train()` over a pre-tokenised `datasets.Dataset` of random token
rows: --steps rows of each length, ascending, read in order (`train_sampling_strategy="sequential"`). A callback
times every optimizer step between `on_step_begin` and `on_step_end` with `torch.cuda.synchronize()` on both sides
and resets the peak-memory counter at the first step of each length. A row's step time is the median of its steps
after the first (the first at a length builds kernels and plans for the new shape; the very first also allocates
the optimizer state). An OOM ends the variant's ladder: that length is "oom", the longer ones "skipped".

TRL 1.16 computes the loss with its own chunked LM head (no tokens x vocab logits tensor), and with
`use_liger_kernel=True` applies Liger's RMSNorm/RoPE/SwiGLU, not Liger's fused cross-entropy.

The result JSON (schema "trl_offload") is rewritten after each variant, so a killed run keeps what it measured;
`python -m bench.report` renders it into docs/RESULTS.md ("TRL SFTTrainer: upstream save_on_cpu vs fork offloader").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024 ** 3
SCHEMA = "trl_offload"
TOKENIZER = ROOT / "longctx" / "default_data" / "tokenizer"  # only its pad token is used: the rows are token ids
VARIANTS = {  # name: (activation_checkpointing_kwargs, description)
    "plain": (None, "activation checkpointing, nothing offloaded"),
    "upstream": ({"offload": "save_on_cpu"}, "upstream's offload=True: torch's save_on_cpu around each checkpointed "
                 "layer (the fork keeps it as offload=\"save_on_cpu\")"),
    "fork": ({"offload": True}, "offload=True with the fork installed: the fork's offloader (side-stream copies to "
             "pinned host memory, prefetch in backward)"),
}
# The comparison that matters first; plain last, so a run cut short still has upstream against fork.
DEFAULT_VARIANTS = "upstream,fork,plain"


def parse_len(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(s[-1:], 1)
    return int(s[:-1] if mult > 1 else s) * mult


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the result JSON (rewritten after each variant)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke: tiny Llama, fp32, no Liger, 256/512 tokens, 2 steps")
    p.add_argument("--shape", default=None, help="bench/shapes.py name (default llama3.1-8b; tiny-llama with --tiny)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 8; 2 with --tiny)")
    p.add_argument("--lengths", default=None, help="ascending row lengths (default 32K,64K,128K; 256,512 with --tiny)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per length, the first untimed (default 3; 2 with --tiny)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated, run in this order, of {list(VARIANTS)}")
    p.add_argument("--plain-max-len", default=None,
                   help="run `plain` only up to this length (e.g. 64K) to save time; default: every length")
    p.add_argument("--note", default=None, help="a note stored in the JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run this one variant
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.shape = a.shape or ("tiny-llama" if a.tiny else "llama3.1-8b")
    a.layers = a.layers if a.layers is not None else (2 if a.tiny else 8)
    a.lengths = sorted(parse_len(x) for x in (a.lengths or ("256,512" if a.tiny else "32K,64K,128K")).split(",")
                       if x.strip())
    a.steps = a.steps if a.steps is not None else (2 if a.tiny else 3)
    if a.steps < 2:
        p.error("--steps must be at least 2 (the first step at each length is not timed)")
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    a.plain_max_len = parse_len(a.plain_max_len) if a.plain_max_len else None
    return a


def versions() -> dict:
    import importlib.metadata as md

    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__}
    for pkg in ("trl", "accelerate", "datasets", "liger-kernel", "triton"):
        try:
            out[pkg.replace("-", "_")] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg.replace("-", "_")] = None
    try:
        out["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001
        out["cudnn"] = None
    return out


# --- the worker: one variant, every length, in this process --------------------------------------------------------

def build_model(a, cuda: bool):
    import torch
    from transformers import AutoModelForCausalLM

    from bench.shapes import make_config

    config = make_config(a.shape, layers=a.layers)
    config._attn_implementation = "sdpa"  # upstream's default: what an SFTTrainer user gets
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def token_rows(lengths: list[int], steps: int, vocab: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, vocab, (n,), generator=g).tolist()} for n in lengths for _ in range(steps)]


def make_timer(plan: list[int], cuda: bool, model):
    """A TrainerCallback timing each optimizer step of `plan` (the row length of each step, in order)."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step = 0  # index into plan of the step running or about to run
            self.times, self.losses, self.seen, self.peaks = {}, {}, {}, {}
            self.stored, self.rss = {}, {}
            self._t0 = None
            self._seen_now = None

        def first_of_length(self, i):
            return i == 0 or plan[i - 1] != plan[i]

        def last_of_length(self, i):
            return i == len(plan) - 1 or plan[i + 1] != plan[i]

        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
                if self.first_of_length(self.step):
                    torch.cuda.reset_peak_memory_stats()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - self._t0
            n = plan[self.step]
            self.times.setdefault(n, []).append(dt)
            self.seen.setdefault(n, []).append(self._seen_now)
            if self.last_of_length(self.step):
                self.peaks[n] = ((torch.cuda.max_memory_allocated() / GiB, torch.cuda.max_memory_reserved() / GiB)
                                 if cuda else (None, None))
                offloader = getattr(model, "checkpoint_offloader", None)
                self.stored[n] = getattr(offloader, "stored", None)
                self.rss[n] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
            self.step += 1

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and self.step > 0:
                self.losses.setdefault(plan[self.step - 1], []).append(float(logs["loss"]))

    timer = StepTimer()

    def record_length(_module, args, kwargs):  # what the model is really given (no EOS added, no truncation)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            timer._seen_now = int(ids.shape[-1])

    model.register_forward_pre_hook(record_length, with_kwargs=True)
    return timer


def run_worker(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    variant = a.worker
    cuda = not a.tiny and torch.cuda.is_available()
    lengths = [n for n in a.lengths if not (variant == "plain" and a.plain_max_len and n > a.plain_max_len)]
    t_start = time.perf_counter()
    model = build_model(a, cuda)
    n_params = sum(p.numel() for p in model.parameters())
    build_s = time.perf_counter() - t_start
    plan = [n for n in lengths for _ in range(a.steps)]
    timer = make_timer(plan, cuda, model)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    kwargs, _ = VARIANTS[variant]
    out_dir = tempfile.mkdtemp(prefix=f"trl_offload_{variant}_")
    args = SFTConfig(
        output_dir=out_dir, bf16=cuda, use_cpu=not cuda, per_device_train_batch_size=1, gradient_accumulation_steps=1,
        activation_checkpointing=True, activation_checkpointing_kwargs=kwargs, use_liger_kernel=cuda,
        optim="adamw_torch_fused", learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
        max_length=max(lengths), packing=False, max_steps=len(plan), num_train_epochs=1,
        train_sampling_strategy="sequential", report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, dataset_num_proc=None)
    dataset = Dataset.from_list(token_rows(lengths, a.steps, model.config.vocab_size))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer])
    setup_s = time.perf_counter() - t_start
    failure, failed_at, error = None, None, None
    try:
        trainer.train()
    except Exception as e:  # noqa: BLE001 - an OOM (or anything else) ends the ladder; the rest is recorded
        msg = f"{type(e).__name__}: {e}"
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        failure = "oom" if oom else "error"
        failed_at = plan[timer.step] if timer.step < len(plan) else plan[-1]
        print(f"[{variant}] {failure} at {failed_at}: {msg[:500]}", flush=True)
        if not oom:
            traceback.print_exc()
        error = msg[:300]
    total_s = time.perf_counter() - t_start

    offloader = getattr(model, "checkpoint_offloader", None)  # the fork's property; None unless the fork's offload
    rows, stored_before = [], 0
    for n in lengths:
        times = timer.times.get(n, [])
        status = "ok"
        if failure is not None and n == failed_at:
            status = failure
        elif failure is not None and n > failed_at:
            status = "skipped"
        row = {"variant": variant, "seq_len": n, "status": status, "step_times_s": times}
        if status == "ok":
            timed = times[1:] or times
            row["step_time_s"] = statistics.median(timed)
            row["tokens_per_s"] = n / row["step_time_s"]
            row["peak_gpu_gib"], row["peak_reserved_gib"] = timer.peaks.get(n, (None, None))
            row["losses"] = timer.losses.get(n, [])
            row["seen_lengths"] = sorted(set(x for x in timer.seen.get(n, []) if x is not None))
            stored = timer.stored.get(n)  # cumulative: this length's layer inputs are the difference
            row["offload_stored"] = None if stored is None else stored - stored_before
            stored_before = stored or 0
            row["host_peak_rss_gib"] = timer.rss.get(n)
        else:
            row["error"] = error
        rows.append(row)
    meta = {"variant": variant, "activation_checkpointing_kwargs": kwargs, "n_params": n_params,
            "build_s": round(build_s, 1), "setup_s": round(setup_s, 1), "total_s": round(total_s, 1),
            "attn_implementation": model.config._attn_implementation,
            "rmsnorm": type(model.model.norm).__name__, "mlp": type(model.model.layers[0].mlp).__name__,
            "offloader": type(offloader).__name__ if offloader is not None else None,
            "offload_stored": getattr(offloader, "stored", None),
            "offload_stored_bytes": getattr(offloader, "stored_bytes", None),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "gpu_total_gib": torch.cuda.get_device_properties(0).total_memory / GiB if cuda else None,
            "versions": versions()}
    if variant == "fork" and failure is None and not (offloader is not None and offloader.stored > 0):
        raise SystemExit(f"[fork] the fork's offloader did not run (checkpoint_offloader={offloader!r}): "
                         "is the fork installed?")
    if variant != "fork" and offloader is not None:
        raise SystemExit(f"[{variant}] the fork's offloader is installed, but this variant should not use it")
    return {"meta": meta, "rows": rows}


# --- the driver: one process per variant, one JSON ----------------------------------------------------------------

def worker_cmd(a, variant: str, worker_out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "bench.trl_offload", "--out", str(a.out), "--shape", a.shape, "--layers",
           str(a.layers), "--lengths", ",".join(map(str, a.lengths)), "--steps", str(a.steps),
           "--variants", variant, "--worker", variant, "--worker-out", str(worker_out)]
    if a.tiny:
        cmd.append("--tiny")
    if a.plain_max_len:
        cmd += ["--plain-max-len", str(a.plain_max_len)]
    return cmd


def run_variant(a, variant: str, tmp: Path) -> dict:
    worker_out = tmp / f"{variant}.json"
    cmd = worker_cmd(a, variant, worker_out)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    print(f"$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in proc.stdout:
        sys.stdout.write(f"[{variant}] {line}")
        sys.stdout.flush()
        tail = (tail + [line.rstrip()])[-20:]
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc == 0 and worker_out.exists():
        res = json.loads(worker_out.read_text())
        res["meta"]["process_wall_s"] = round(wall, 1)
        return res
    lengths = [n for n in a.lengths if not (variant == "plain" and a.plain_max_len and n > a.plain_max_len)]
    err = f"worker exited {rc}: " + " | ".join(tail[-5:])
    return {"meta": {"variant": variant, "process_wall_s": round(wall, 1), "error": err[-1000:]},
            "rows": [{"variant": variant, "seq_len": n, "status": "crashed", "error": err[-300:]} for n in lengths]}


def run_id_for(date: str, device: str, shape: str, layers: int) -> str:
    from bench.run import device_slug

    return f"{date}_{device_slug(device)}_trl_offload_{shape}-{layers}L"


def write_result(a, results: dict, command: str, git: dict) -> dict:
    metas = [r["meta"] for r in results.values()]
    first = next((m for m in metas if m.get("versions")), {})
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    device = first.get("device") or ("cpu" if a.tiny else "unknown")
    out = {"schema": SCHEMA, "run_id": run_id_for(date, device, a.shape, a.layers), "date": date, "device": device,
           "n_gpus": 0 if device == "cpu" else 1, "gpu_total_gib": first.get("gpu_total_gib"),
           "shape": a.shape, "layers": a.layers, "lengths": a.lengths, "steps": a.steps,
           "timing": "median of the steps after the first at each length, torch.cuda.synchronize() on both sides",
           "versions": first.get("versions"), "git": git, "command": command, "note": a.note,
           "sft_config": {"bf16": not a.tiny, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                          "activation_checkpointing": True, "use_liger_kernel": not a.tiny,
                          "optim": "adamw_torch_fused", "packing": False, "max_length": max(a.lengths),
                          "attn_implementation": "sdpa", "train_sampling_strategy": "sequential"},
           "variants": {v: {"activation_checkpointing_kwargs": VARIANTS[v][0], "desc": VARIANTS[v][1]}
                        for v in a.variants},
           "workers": {m["variant"]: m for m in metas},
           "rows": [r for v in a.variants if v in results for r in results[v]["rows"]]}
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        res = run_worker(a)
        Path(a.worker_out).write_text(json.dumps(res, default=str))
        return 0
    from bench.run import git_info

    command = "python -m bench.trl_offload " + shlex.join(argv if argv is not None else sys.argv[1:])
    git = git_info()
    results = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trl_offload_") as tmp:
        for variant in a.variants:
            results[variant] = run_variant(a, variant, Path(tmp))
            out = write_result(a, results, command, git)
            print(f"{a.out}: {variant} done ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    for r in out["rows"]:
        extra = (f"{r['step_time_s']:.3f} s/step, peak {r['peak_gpu_gib'] or 0:.2f} GiB, stored {r['offload_stored']}"
                 if r["status"] == "ok" else r.get("error", ""))
        print(f"{r['variant']:>9} {r['seq_len']:>7} {r['status']:>7}  {extra}", flush=True)
    return 0 if all(r["status"] in ("ok", "oom", "skipped") for r in out["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
