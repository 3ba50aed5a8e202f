"""Figures and summary of a learning-proof run (bench/learning_proof/run.sh), and its section of docs/RESULTS.md.

    python -m bench.learning_proof.report summarize --run OUT       # OUT/summary.json, OUT/*.png, OUT/section.md
    python -m bench.learning_proof.report collect --run OUT --to DIR  # the 8 files worth keeping, flat
    python -m bench.learning_proof.report publish --run OUT|DIR     # copy into docs/learning_proof/ and
                                                                    # rewrite the region in docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BEGIN = "<!-- BEGIN GENERATED: learning_proof (python -m bench.learning_proof.report publish) -->"
END = "<!-- END GENERATED: learning_proof -->"
FIGURES = ("passkey_before_after.png", "multi_needle_before_after.png", "ppl_before_after.png", "train_loss.png")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarize(run: Path) -> dict:
    from longctx.evaluation import plot

    before = json.loads((run / "eval_before" / "eval.json").read_text())
    after = json.loads((run / "eval_after" / "eval.json").read_text())
    metrics, stages = [], []  # every stage's rows, steps numbered across stages (run.sh's stages.txt order)
    names = (run / "stages.txt").read_text().split() if (run / "stages.txt").exists() else ["train"]
    for name in names:
        rows, offset = _jsonl(run / name / "metrics.jsonl"), metrics[-1]["step"] if metrics else 0
        metrics += [{**r, "step": r["step"] + offset} for r in rows]
        stages.append({"max_seq_len": _run_len(run / name), "steps": rows[-1]["step"] if rows else 0})
    for task in ("passkey", "multi_needle"):
        label = "passkey" if task == "passkey" else f"multi-needle ({after[task]['needles']} needles, 1 asked)"
        plot.heatmaps([(f"untrained: mean {before[task]['mean_accuracy']:.0%}", before[task]),
                       (f"trained: mean {after[task]['mean_accuracy']:.0%}", after[task])],
                      run / f"{task}_before_after.png", suptitle=f"{label} retrieval accuracy")
    ppl_sets = _ppl_sets(run, before, after)
    plot.ppl_panels([(f"{PPL_TITLES.get(name, name)}\n{a['documents']} held-out documents of {a['seq_len']:,} tokens",
                      [("untrained", b), ("trained", a)]) for name, (b, a) in ppl_sets.items()],
                    run / "ppl_before_after.png")
    _loss_plot(metrics, run / "train_loss.png", stages)

    timing, prev = {}, 0  # seconds per phase of run.sh, from its cumulative stamps
    if (run / "timing.txt").exists():
        for line in (run / "timing.txt").read_text().splitlines():
            name, sec = line.rsplit(" ", 1)
            timing[name], prev = int(sec) - prev, int(sec)
        timing["total"] = prev
    run_json = json.loads((run / "train" / "run.json").read_text()) if (run / "train" / "run.json").exists() else {}
    last = metrics[-1] if metrics else {}
    cfg_path = run / "train" / "final_model" / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    summary = {
        "model_params": after.get("params"),
        "model": {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                      "intermediate_size", "vocab_size", "tie_word_embeddings") if k in cfg},
        "device": after.get("device"),
        "train": {"steps": last.get("step"), "final_loss": last.get("loss"),
                  "first_loss": metrics[0]["loss"] if metrics else None,
                  "tokens_per_step": statistics.median([r["tokens"] for r in metrics]) if metrics else None,
                  "median_tokens_per_s": statistics.median([r["tokens_per_s"] for r in metrics if r.get("tokens_per_s")])
                  if metrics else None,
                  "attention": run_json.get("attention"), "precision": run_json.get("precision"),
                  "max_seq_len": run_json.get("config", {}).get("max_seq_len"), "stages": stages},
        "before": _scores(before), "after": _scores(after), "timing_s": timing,
        "probes": _jsonl(run / "probe.jsonl"),  # teacher-forced retrieval after each stage (run.sh)
        "ppl_sets": {name: {"before": _nll(b), "after": _nll(a), "edges": [[x["start"], x["end"]] for x in a["buckets"]]}
                     for name, (b, a) in ppl_sets.items()},
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=1))
    (run / "section.md").write_text(section(summary, before, after))
    print(json.dumps({k: summary[k] for k in ("before", "after")}, indent=1))
    return summary


PPL_TITLES = {"recall": "recall (sentences, then the same shuffled)",
              "bank": "bank filler (256 sentences, random order)",
              "numbers": "numbers (a run of values, then the run again)"}


def _ppl_sets(run: Path, before: dict, after: dict) -> dict[str, tuple[dict, dict]]:
    """name -> (untrained, trained) perplexity results: the recall set of eval_{before,after}/, then each further
    set run.sh evaluated (eval_{before,after}_ppl_<name>/)."""
    sets = {"recall": (before["ppl"], after["ppl"])}
    for d in sorted(run.glob("eval_after_ppl_*")):
        name = d.name.removeprefix("eval_after_ppl_")
        b = run / f"eval_before_ppl_{name}" / "eval.json"
        if (d / "eval.json").exists() and b.exists():
            sets[name] = (json.loads(b.read_text())["ppl"], json.loads((d / "eval.json").read_text())["ppl"])
    return sets


def _nll(res: dict) -> list[float]:
    return [round(b["nll"], 4) for b in res["buckets"]]


def _scores(ev: dict) -> dict:
    ppl = ev["ppl"]["buckets"]
    return {"passkey": ev["passkey"]["mean_accuracy"], "multi_needle": ev["multi_needle"]["mean_accuracy"],
            "passkey_at_max_len": [row[-1] for row in ev["passkey"]["accuracy"]],
            "nll_first_bucket": ppl[0]["nll"], "nll_last_bucket": ppl[-1]["nll"],
            "nll_by_bucket": [round(b["nll"], 4) for b in ppl], "ppl_overall": ev["ppl"]["overall"]["ppl"]}


def _run_len(stage_dir: Path) -> int | None:
    p = stage_dir / "run.json"
    return json.loads(p.read_text()).get("config", {}).get("max_seq_len") if p.exists() else None


def _loss_plot(metrics: list[dict], path: Path, stages: list[dict]) -> None:
    from longctx.evaluation.plot import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot([r["step"] for r in metrics], [r["loss"] for r in metrics], lw=0.8)
    at = 0
    for st in stages if len(stages) > 1 else []:
        ax.axvline(at, color="grey", ls="--", lw=0.8)
        ax.text(at, ax.get_ylim()[1], f" {_fmt_len(st['max_seq_len'] or 0)}", va="top", fontsize=7, color="grey")
        at += st["steps"]
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("train.py from scratch" + (": row length by stage" if len(stages) > 1 else ""), fontsize=10)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"


def _stages(t: dict) -> str:
    st = t.get("stages") or []
    if len(st) > 1:
        return " in stages of growing row length (" + ", ".join(
            f"{x['steps']:,} on {x['max_seq_len']:,}-token rows" for x in st) + ")"
    if t.get("stage1_steps"):  # runs published before stages.txt (two stages)
        return (f" (the first {t['stage1_steps']} on {t['stage1_max_seq_len']:,}-token packed rows, the rest on "
                f"{t['max_seq_len']:,}-token rows)")
    return f" on {t['max_seq_len']:,}-token packed rows"


def _shape(m: dict) -> str:
    if not m:  # runs published before the summary recorded the shape
        return "bench/learning_proof/model.json at the run's commit"
    return (f"{m['num_hidden_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} query and "
            f"{m['num_key_value_heads']} key/value heads, vocabulary {m['vocab_size']:,}, "
            f"{'tied' if m.get('tie_word_embeddings') else 'untied'} embeddings")


def _probe_table(probes: list[dict]) -> str:
    """After each stage: teacher-forced retrieval at the stage's row length L and at 2L (sweep.py --probe)."""
    if not probes:
        return ""
    lines = ["After each stage, teacher-forced (answer tokens all argmax; fresh prompts, "
             "sweep.py --probe) at the stage's row length L and at 2L:", "",
             "| stage (L) | passkey @L | passkey @2L | multi-needle @L | multi-needle @2L |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in probes:
        L = int(r["label"])
        lines.append(f"| {_fmt_len(L)} | {_pct(r.get(f'passkey@{L}'))} | {_pct(r.get(f'passkey@{2 * L}'))} | "
                     f"{_pct(r.get(f'multi@{L}'))} | {_pct(r.get(f'multi@{2 * L}'))} |")
    return "\n".join(lines) + "\n\n"


def _pct(x) -> str:
    return "—" if x is None else f"{x:.0%}"


def _late_gain(nll: list[float]) -> bool:
    return nll[-1] < nll[0] - 0.1


def _summary_ppl_sets(s: dict) -> dict[str, dict]:
    """name -> {"before", "after"} NLL by position per held-out set (summaries before ppl_sets: the recall set)."""
    return s.get("ppl_sets") or {"recall": {"before": s["before"]["nll_by_bucket"], "after": s["after"]["nll_by_bucket"]}}


def _ppl_by_set(s: dict) -> dict[str, list[float]]:
    """Trained NLL by position per held-out set."""
    return {name: v["after"] for name, v in _summary_ppl_sets(s).items()}


def learned(s: dict) -> bool:
    """Retrieval well above chance after training, and late positions predicted better than early ones on a
    held-out set."""
    return (s["after"]["passkey"] or 0) >= 0.5 and any(_late_gain(n) for n in _ppl_by_set(s).values())


def _late(s: dict) -> str:
    sets = _ppl_by_set(s)
    gain = [name for name, n in sets.items() if _late_gain(n)]
    if not gain:
        return "late positions no better than early ones"
    shown = ", ".join(f"{sets[name][0]:.2f} → {sets[name][-1]:.2f} nats on the {name} set" for name in gain)
    missing = [name for name in sets if name not in gain]
    return (f"late positions predicted better than early ones ({shown}"
            + (f"; not on the {', '.join(missing)} set)" if missing else ")"))


def verdict(s: dict) -> str:
    a = s["after"]
    late = _late(s)
    if learned(s):
        return (f"a Llama trained from scratch learns 8K retrieval ({a['passkey']:.0%} passkey, {a['multi_needle']:.0%} "
                f"multi-needle); {late}")
    if (a["passkey"] or 0) >= 0.05:  # chance is 1e-5: far above it, short of the bar
        return (f"partly shown: after {s['train']['steps']} steps from scratch, passkey retrieval "
                f"{a['passkey']:.0%} (chance 0.001%), multi-needle {a['multi_needle']:.0%}; {late}")
    return (f"not shown: after {s['train']['steps']} steps from scratch the model did not learn retrieval "
            f"(accuracy stayed at chance; {late})")


def section(s: dict, before: dict, after: dict) -> str:
    t = s["train"]
    L = after["passkey"]["lengths"]
    rows = "\n".join(
        f"| {name} | {_pct(s['before'][k])} | {_pct(s['after'][k])} |"
        for name, k in (("passkey, mean over the grid", "passkey"),
                        ("multi-needle (4 needles, 1 asked), mean", "multi_needle")))
    edges = [(b["start"], b["end"]) for b in after["ppl"]["buckets"]]
    sets = _summary_ppl_sets(s)
    head = "| positions | " + " | ".join(f"{n}: untrained | {n}: trained" for n in sets) + " |"
    rule = "| --- |" + " ---: | ---: |" * len(sets)
    nll = "\n".join([head, rule] + [f"| {a:,}–{b:,} | " + " | ".join(
        f"{v['before'][i]:.3f} | {v['after'][i]:.3f}" for v in sets.values()) + " |" for i, (a, b) in enumerate(edges)])
    L2 = after['ppl']['seq_len'] // 2
    what = {"recall": f"random sentences, then the same sentences shuffled: the second half is predictable only "
                      f"from up to {L2:,} tokens back, and only after a sentence's first words",
            "bank": "the retrieval prompts' filler, a bank of 256 random sentences drawn in random order: a "
                    "sentence is predictable (after its first words) once it has been seen, so the more context, "
                    "the more of it is",
            "numbers": f"a run of random 5-digit values filling half the document, then the run again: the second "
                       f"half is a copy from {L2:,} tokens back, the first predictable by nothing"}
    ppl_text = "; ".join(f"**{n}**: {what.get(n, n)}" for n in sets)
    tm = s.get("timing_s", {})
    return f"""## Learning proof: {verdict(s)}

`bash bench/learning_proof/run.sh OUT` on one {s.get('device') or 'GPU'}: a {s['model_params'] / 1e6:.1f}M-parameter
Llama ({_shape(s.get('model') or {})}) trained from random initialization by train.py ({t['precision']},
attention `{t['attention']}`) for {t['steps']:,} steps{_stages(t)} on locally generated
long-context documents (bench/learning_proof/make_data.py), then evaluated with eval.py on fresh prompts
(other keys, values, filler banks and positions). Chance for a 5-digit value is 0.001%.
Training loss {t['first_loss']:.2f} → {t['final_loss']:.3f} ({t['tokens_per_step']:,.0f} tokens per step,
{t['median_tokens_per_s']:,.0f} tokens/s); wall clock {tm.get('total', '—')} s for everything, of which train.py
{sum(v for k, v in tm.items() if k.startswith('train')) or '—'} s (seconds per phase: {', '.join(f'{k} {v}' for k, v in tm.items() if k != 'total')}).

| Retrieval accuracy ({', '.join(_fmt_len(x) for x in L)} tokens × depths 0–100%) | untrained | trained |
| --- | ---: | ---: |
{rows}

{_probe_table(s.get("probes") or [])}![passkey before/after](learning_proof/passkey_before_after.png)
![multi-needle before/after](learning_proof/multi_needle_before_after.png)

Perplexity by position on held-out documents made like the training data but never trained on (another seed).
{ppl_text}. Mean NLL (nats/token) per position bucket (uniform over the 2,048-token vocabulary: 7.62):

{nll}

![NLL by position](learning_proof/ppl_before_after.png)
![training loss](learning_proof/train_loss.png)
"""


def _kept_files(run: Path) -> dict[str, Path]:
    """name -> source, from a run directory or from a flat `collect`ed one."""
    files = {name: run / name for name in FIGURES + ("summary.json", "section.md")}
    for sub in ("eval_before", "eval_after"):
        files[f"{sub}.json"] = run / sub / "eval.json" if (run / sub / "eval.json").exists() else run / f"{sub}.json"
    return files


def collect(run: Path, to: Path) -> None:
    to.mkdir(parents=True, exist_ok=True)
    for name, src in _kept_files(run).items():
        shutil.copy2(src, to / name)


def publish(run: Path, docs: Path) -> None:
    dest = docs / "learning_proof"
    dest.mkdir(parents=True, exist_ok=True)
    files = _kept_files(run)
    for name, src in files.items():
        if name != "section.md":
            shutil.copy2(src, dest / name)
    # the section is rendered again from the run's JSON, so a change of wording here reaches published runs too
    text = section(json.loads(files["summary.json"].read_text()), json.loads(files["eval_before.json"].read_text()),
                   json.loads(files["eval_after.json"].read_text()))
    results = docs / "RESULTS.md"
    cur = results.read_text() if results.exists() else "# Results\n"
    block = f"{BEGIN}\n\n{text.rstrip()}\n\n{END}"
    if BEGIN in cur and END in cur:
        head, rest = cur.split(BEGIN, 1)
        cur = head + block + rest.split(END, 1)[1]
    else:
        cur = cur.rstrip() + "\n\n" + block + "\n"
    results.write_text(cur)
    print(f"updated {results} and {dest}/")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("summarize")
    m.add_argument("--run", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--run", required=True)
    c.add_argument("--to", required=True)
    u = sub.add_parser("publish")
    u.add_argument("--run", required=True)
    u.add_argument("--docs", default=str(ROOT / "docs"))
    a = p.parse_args(argv)
    if a.cmd == "summarize":
        summarize(Path(a.run))
    elif a.cmd == "collect":
        collect(Path(a.run), Path(a.to))
    else:
        publish(Path(a.run), Path(a.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
