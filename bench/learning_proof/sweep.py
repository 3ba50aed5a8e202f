"""Which training recipe forms the retrieval lookup fastest: a side-by-side sweep, one GPU, a few minutes.

    python -m bench.learning_proof.sweep --out OUT                     # every variant, in parallel processes
    python -m bench.learning_proof.sweep --out OUT --variants base,numbers --steps 300 --device cpu
    python -m bench.learning_proof.sweep --out OUT --report            # OUT/sweep.json + OUT/sweep.png

Why it exists: the learning proof (run.sh, train.py) failed twice because the from-scratch model never formed
the copy mechanism retrieval needs (an induction-style lookup) in its time budget. Each attempt costs a GPU
call, so the recipe (data mix, learning rate, model shape) is chosen here first, at short range where the
mechanism forms or not within minutes, and run.sh then uses the winner at 8K.

It is deliberately not train.py: a plain PyTorch loop (bf16 autocast, AdamW, warmup + cosine, one document per
row) over documents from make_data.train_doc, so that variants run side by side on one GPU in seconds each.
The score is teacher-forced retrieval: the fraction of fresh eval.py-style prompts (bank filler, another seed)
whose answer tokens are all the argmax, with one needle (passkey) and with four (three distractors), at the
training length and at 4x it (does the lookup stretch?).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.learning_proof import make_data  # noqa: E402

# The sweep's published run (2026-11-22_h100_sweep) used model.json when it had 2 layers; model.json has 4 since
# (attempt 6), so the sweep pins 2 and the variants stay what they were.
SWEEP_MODEL = dict(num_hidden_layers=2)
# name -> shares of repeat / number documents (rest: 70% needle, 30% recall), lr, model.json overrides
VARIANTS: dict[str, dict] = {
    "base": dict(repeat=0.3, numbers=0.0, lr=2e-3),  # attempt 2's mix (run.sh before the sweep)
    "needles": dict(repeat=0.0, numbers=0.0, lr=2e-3),  # needle and recall documents only
    "numbers": dict(repeat=0.2, numbers=0.3, lr=2e-3),
    "numbers_60": dict(repeat=0.1, numbers=0.6, lr=2e-3),
    "numbers_lr5e-3": dict(repeat=0.2, numbers=0.3, lr=5e-3),
    "numbers_std0.02": dict(repeat=0.2, numbers=0.3, lr=2e-3, model=dict(initializer_range=0.02)),
    "numbers_8heads": dict(repeat=0.2, numbers=0.3, lr=2e-3,
                           model=dict(num_attention_heads=8, num_key_value_heads=4, head_dim=32)),
    "numbers_4layers": dict(repeat=0.2, numbers=0.3, lr=2e-3, model=dict(num_hidden_layers=4)),
}


def model_config(v: dict) -> dict:
    """model.json as the sweep's variant `v` changes it (on the sweep's 2-layer base)."""
    cfg = json.loads((ROOT / "bench" / "learning_proof" / "model.json").read_text())
    return {**cfg, **SWEEP_MODEL, **v.get("model", {})}


def _doc_ids(job: tuple) -> list[int]:
    return make_data._TOK(make_data.train_doc(job), add_special_tokens=False)["input_ids"]


def documents(n: int, seq_len: int, repeat: float, numbers: float, seed: int, workers: int) -> list[list[int]]:
    jobs = [(seed, i, seq_len, seq_len // 4, repeat, numbers) for i in range(n)]
    tokenizer = str(ROOT / "longctx" / "default_data" / "tokenizer")
    if workers > 1:
        with mp.get_context("fork").Pool(workers, initializer=make_data._init, initargs=(tokenizer,)) as pool:
            return pool.map(_doc_ids, jobs, chunksize=64)
    make_data._init(tokenizer)
    return [_doc_ids(j) for j in jobs]


def eval_prompts(tok, length: int, n: int, needles: int, seed: int = 12345) -> list[tuple[list[int], list[int]]]:
    from longctx.evaluation import needle

    rng = random.Random(f"sweep|{seed}|{length}|{needles}")
    out = []
    for _ in range(n):
        s = needle.make_sample(tok, length - 4, rng.random(), rng=rng, filler=needle.BankFiller(rng.choice((8, 32, 128))),
                               n_needles=needles)
        out.append((s.input_ids, tok(" " + s.answer, add_special_tokens=False)["input_ids"]))
    return out


def retrieval(model, prompts, device) -> float:
    import torch

    hits = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for ids, ans in prompts:
            x = torch.tensor([ids + ans], device=device)
            pred = model(x).logits[0, len(ids) - 1:len(ids) - 1 + len(ans)].argmax(-1).tolist()
            hits += pred == ans
    return hits / len(prompts)


def run_variant(name: str, a: argparse.Namespace) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    v = VARIANTS[name]
    out = Path(a.out) / f"{name}.jsonl"
    device = torch.device(a.device)
    tok = AutoTokenizer.from_pretrained(str(ROOT / "longctx" / "default_data" / "tokenizer"))
    t0 = time.time()
    docs = documents(a.docs, a.seq_len, v["repeat"], v["numbers"], a.seed, a.workers)
    prompts = {(L, k): eval_prompts(tok, L, a.eval_samples, k) for L in (a.seq_len, 4 * a.seq_len) for k in (1, 4)}
    data_s = time.time() - t0

    cfg = model_config(v)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=v["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, int(0.03 * a.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / a.steps)))))
    rng = random.Random(a.seed)
    log = out.open("w")
    log.write(json.dumps({"variant": name, **v, "params": sum(p.numel() for p in model.parameters()),
                          "seq_len": a.seq_len, "rows": a.rows, "steps": a.steps, "device": str(device),
                          "data_s": round(data_s, 1)}) + "\n")
    t0 = time.time()
    for step in range(1, a.steps + 1):
        batch = [rng.choice(docs) for _ in range(a.rows)]
        ids = torch.full((a.rows, a.seq_len), tok.eos_token_id, dtype=torch.long)
        labels = torch.full((a.rows, a.seq_len), -100, dtype=torch.long)
        for b, d in enumerate(batch):
            d = [tok.bos_token_id] + d[:a.seq_len - 1]
            ids[b, :len(d)] = labels[b, :len(d)] = torch.tensor(d)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        last = step == a.steps or (a.max_seconds and time.time() - t0 > a.max_seconds)
        if step % a.eval_every == 0 or last:
            model.eval()
            rec = {"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.time() - t0, 1)}
            for (L, k), ps in prompts.items():
                rec[f"{'passkey' if k == 1 else 'multi'}@{L}"] = retrieval(model, ps, device)
            model.train()
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(name, json.dumps(rec), flush=True)
        if last:
            break


def report(out: Path) -> dict:
    from longctx.evaluation.plot import _plt

    runs = {}
    for f in sorted(out.glob("*.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if rows:
            runs[rows[0]["variant"]] = {"setup": rows[0], "evals": rows[1:]}
    (out / "sweep.json").write_text(json.dumps(runs, indent=1))
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for name, r in runs.items():
        ev = r["evals"]
        if not ev:
            continue
        L = r["setup"]["seq_len"]
        for ax, key in zip(axes, (f"passkey@{L}", f"passkey@{4 * L}")):
            ax.plot([e["step"] for e in ev], [e.get(key, float("nan")) for e in ev], marker=".", label=name)
            ax.set_title(f"teacher-forced passkey at {key.split('@')[1]} tokens", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0].set_ylabel("answers fully right")
    axes[1].legend(fontsize=8)
    fig.savefig(out / "sweep.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    for name, r in runs.items():
        print(name, json.dumps(r["evals"][-1] if r["evals"] else {}))
    return runs


def probe(model_dir: str, lengths: list[int], samples: int, device: str = "auto") -> dict:
    """Teacher-forced retrieval of a saved model (run.sh calls it after every stage): where does the lookup
    work, and does it reach past the stage's own length?"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    tok = AutoTokenizer.from_pretrained(str(ROOT / "longctx" / "default_data" / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").to(dev).eval()
    rec = {"model": str(model_dir)}
    for L in lengths:
        for k in (1, 4):
            rec[f"{'passkey' if k == 1 else 'multi'}@{L}"] = retrieval(model, eval_prompts(tok, L, samples, k), dev)
    return rec


def score(run: dict) -> float:
    """Retrieval at the training length, passkey and multi-needle, over the last two evaluations (less noise);
    4x the length breaks ties."""
    ev, L = run["evals"][-2:], run["setup"]["seq_len"]
    if not ev:
        return -1.0
    at = lambda k: sum(e.get(k, 0.0) for e in ev) / len(ev)  # noqa: E731
    return at(f"passkey@{L}") + at(f"multi@{L}") + 0.01 * at(f"passkey@{4 * L}")


def best(out: Path) -> str:
    """Shell assignments for run.sh from the best variant: REPEAT, NUMBERS, LR, MODEL_CONFIG (written to OUT)."""
    runs = report(out)
    name = max(runs, key=lambda n: score(runs[n]))
    v = VARIANTS[name]
    cfg = model_config(v)
    (out / "best_model.json").write_text(json.dumps(cfg, indent=2))
    (out / "best.txt").write_text(name + "\n")
    return (f"BEST={name} REPEAT={v['repeat']} NUMBERS={v['numbers']} LR={v['lr']} "
            f"MODEL_CONFIG={out / 'best_model.json'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=0, help="Stop training (and evaluate) after this long.")
    p.add_argument("--device", default="cuda", help="cuda, cpu, or auto (cuda when there is one).")
    p.add_argument("--workers", type=int, default=2, help="Data-generation processes per variant.")
    p.add_argument("--report", action="store_true", help="Only summarize OUT/*.jsonl into sweep.json/png.")
    p.add_argument("--best", action="store_true", help="Print run.sh's settings from the best variant in OUT.")
    p.add_argument("--docs", type=int, default=16000, help="Training documents per variant (drawn with replacement).")
    p.add_argument("--probe", default="", help="Only score this saved model (teacher-forced retrieval at "
                   "--probe-lengths, --eval-samples prompts each) and append the result to OUT/probe.jsonl.")
    p.add_argument("--probe-lengths", default="512,1024")
    p.add_argument("--probe-label", default="", help="Stored with the probe's result (run.sh: the stage).")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: one variant
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.probe:
        rec = {"label": a.probe_label,
               **probe(a.probe, [int(x) for x in a.probe_lengths.split(",")], a.eval_samples, a.device)}
        with (out / "probe.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
        return 0
    if a.best:
        print(best(out))
        return 0
    if a.report:
        report(out)
        return 0
    names = a.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if a.one or len(names) == 1:
        for n in names:
            run_variant(n, a)
        return 0
    args = list(argv if argv is not None else sys.argv[1:])
    procs = []
    for n in names:
        cmd = [sys.executable, "-m", "bench.learning_proof.sweep", *args, "--variants", n, "--one"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))))
    rc = max(pr.wait() for pr in procs)
    report(out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
