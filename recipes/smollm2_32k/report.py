"""Figures and the docs/RESULTS.md section of a SmolLM2 8K -> 32K run, from gpu_run.py's results.json (CPU only).

    python -m recipes.smollm2_32k.report figures --results OUT/results.json --to DIR   # the PNGs
    python -m recipes.smollm2_32k.report section --results OUT/results.json           # the markdown, to stdout
    python -m recipes.smollm2_32k.report publish --results OUT/results.json           # results.json and the PNGs
                                                                                      # into docs/smollm2_32k/, the
                                                                                      # region in docs/RESULTS.md
Every number comes from results.json; nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BEGIN = "<!-- BEGIN GENERATED: smollm2_32k (python -m recipes.smollm2_32k.report publish) -->"
END = "<!-- END GENERATED: smollm2_32k -->"
DOCS = ROOT / "docs"
FIG_DIR = DOCS / "smollm2_32k"
SIDES = (("native_before", "native 8K, untrained"), ("extended_before", "32K config, untrained"),
         ("after", "32K, fine-tuned"))


def _sides(results: dict) -> list[tuple[str, str, dict]]:
    ev = results.get("eval", {})
    return [(k, label, ev[k]) for k, label in SIDES if ev.get(k)]


def _row_len(args: dict) -> int:
    """The training row length: --train-len, or the target before that flag existed (rows were the target)."""
    return args.get("train_len") or args["target_len"]


def _fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


def figures(results: dict, to: Path) -> list[Path]:
    from longctx.evaluation import plot

    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    sides, paths = _sides(results), []
    for task, label in (("passkey", "passkey"), ("multi_needle", "multi-needle")):
        panels = [(f"{name}: mean {ev[task]['mean_accuracy']:.0%}", ev[task]) for _, name, ev in sides if ev.get(task)]
        if panels:
            extra = f" ({sides[0][2][task]['needles']} needles, 1 asked)" if task == "multi_needle" else ""
            paths.append(plot.heatmaps(panels, to / f"{task}_before_after.png",
                                       suptitle=f"SmolLM2-135M-Instruct, {label}{extra} retrieval accuracy"))
    ppl_panels = []
    for key, what in (("ppl_long", "held-out long documents"), ("ppl_short", "held-out short windows"),
                      ("ppl_prose", "held-out prose (another domain)")):
        curves = [(name, ev[key]) for _, name, ev in sides if ev.get(key)]
        if curves:
            r = curves[0][1]
            ppl_panels.append((f"{what}: {r['documents']} x {r['seq_len']:,} tokens", curves))
    if ppl_panels:
        paths.append(plot.ppl_panels(ppl_panels, to / "ppl_before_after.png"))
    metrics = (results.get("train") or {}).get("metrics") or []
    if metrics:
        paths.append(_learning_curve(results, metrics, to / "train_loss.png"))
    return paths


def _tokens_seen(metrics: list[dict]) -> list[float]:
    out, total = [], 0
    for r in metrics:
        total += r.get("tokens") or 0
        out.append(total / 1e6)
    return out


def _learning_curve(results: dict, metrics: list[dict], path: Path) -> Path:
    """Train loss, and the passkey probe's answer NLL (train.py's held-out loss), against tokens trained."""
    from longctx.evaluation import plot

    plt = plot._plt()
    fig, ax = plt.subplots(figsize=(6.8, 3.6))
    x = _tokens_seen(metrics)
    ax.plot(x, [r["loss"] for r in metrics], lw=0.8, label="train loss (long text + citation)")
    ev = [(t, r["eval_loss"]) for t, r in zip(x, metrics) if r.get("eval_loss") is not None]
    if ev:
        ax.plot(*zip(*ev), "s-", label=f"passkey probe: answer NLL ({_fmt_len(results['args']['target_len'])}, "
                                       "held-out prompts)")
    ax.axhline(math.log(10), color="grey", ls=":", lw=0.8, label="a random digit (ln 10)")
    ax.set_xlabel("tokens trained (millions)")
    ax.set_ylabel("nats/token")
    ax.set_title(f"train.py, SmolLM2-135M, rows of {_fmt_len(_row_len(results['args']))} tokens", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def _pct(a: float, b: float) -> str:
    return f"{(b - a) / a:+.1%}" if a and math.isfinite(a) and b is not None and math.isfinite(b) else "n/a"


def _acc_by_length(task_res: dict) -> list[float]:
    acc = task_res["accuracy"]  # rows: depths, columns: lengths
    return [sum(row[j] for row in acc) / len(acc) for j in range(len(task_res["lengths"]))]


def _acc_at(task_res: dict, length: int) -> float | None:
    by = dict(zip(task_res["lengths"], _acc_by_length(task_res)))
    return by.get(length)


def _cell(v: float | None, fmt: str = "{:.0%}") -> str:
    return "—" if v is None else fmt.format(v)


def _md(text: str, limit: int = 160) -> str:
    t = " ".join(str(text).split())
    t = t if len(t) <= limit else t[:limit - 1] + "…"
    return t.replace("|", "\\|")


def section(results: dict, fig_prefix: str = "smollm2_32k/") -> str:
    sides = _sides(results)
    if not sides:
        return "No evaluation in results.json yet.\n"
    args, env = results["args"], results.get("environment", {})
    tr = results.get("train") or {}
    metrics, summary = tr.get("metrics") or [], tr.get("summary") or {}
    lines = [f"## SmolLM2-135M-Instruct, 8K → {_fmt_len(args['target_len'])} context by full fine-tuning "
             f"(one {', '.join(env.get('gpus') or ['CPU'])})", "",
             "Written by `python -m recipes.smollm2_32k.report publish` from the results.json of "
             "`recipes/smollm2_32k/gpu_run.sh` (kept beside the figures: [smollm2_32k/results.json]"
             "(smollm2_32k/results.json); the recipe: [recipes/smollm2_32k/](../recipes/smollm2_32k/README.md)). "
             f"torch {env.get('torch')}, transformers {env.get('transformers')}, deepspeed {env.get('deepspeed')}.", ""]
    if metrics:
        last = metrics[-1]
        steady = metrics[1:] or metrics  # the first step holds warm-up (cuDNN plans, allocator)
        tps = _median([r.get("tokens_per_s") for r in steady])
        tfl = _median([r.get("tflops") for r in steady])
        tokens = sum(r.get("tokens") or 0 for r in metrics)
        lines += [f"Training: {last['step']} steps, {tokens:,} tokens in rows of {_fmt_len(_row_len(args))}, train loss {metrics[0]['loss']:.3f} → "
                  f"{last['loss']:.3f}"
                  + (f", passkey-probe answer NLL {last['eval_loss']:.3f}" if last.get("eval_loss") is not None
                     else "")
                  + (f", median {tps:,.0f} tokens/s" if tps else "")
                  + (f", {tfl:.0f} TFLOP/s" if tfl and tfl >= 1 else "")
                  + ".", ""]
    ph = results.get("phases", {})
    if ph:
        lines += ["Wall time by phase: " + ", ".join(f"{k} {v['seconds']:.0f} s" + ("" if v["ok"] else " (failed)")
                                                     for k, v in ph.items())
                  + f"; total {results.get('total_seconds', 0):.0f} s"
                  + (f" (training {ph['train']['seconds'] / results['total_seconds']:.0%})"
                     if ph.get("train") and results.get("total_seconds") else "") + ".", ""]
    d = results.get("data") or {}
    d = d.get("long_text", d)  # results.json before the citation task had the long-text stats alone
    if d:
        src = "stdlib + /usr/share/doc" + (" + installed packages" if (d.get("sources") or {}).get("site_packages")
                                           else "")
        lines += [f"Data ({src} of the GPU machine, `long_text_data` capped): {d['train_long_docs']} long "
                  f"documents ({d['train_long_tokens']:,} tokens), {d['train_short_docs']} short ones "
                  f"({d['train_short_tokens']:,} tokens, {d['short_share']:.0%}), held out {d['eval_docs']} documents "
                  f"({d['eval_tokens']:,} tokens) from groups no training text shares a file with."
                  + ("" if not d.get("pairs_at_distance") else " Token pairs one pass shows at distance "
                     + ", ".join(f"{int(k):,}: {v / 1e6:.2f}M" for k, v in d["pairs_at_distance"].items())
                     + " (within one long document; the last is the needle's at depth 0 of the target length)."),
                  ""]
    lines += _rope_setting(results)
    c = (results.get("data") or {}).get("citation")
    if c:
        lines += [f"Citation task: {c['train']['examples']} training examples ({c.get('train_tokens', 0):,} tokens, "
                  f"context lengths {', '.join(_fmt_len(int(L)) for L in (c.get('train_lengths') or {}))}) from "
                  f"training modules; held-out questions about {len(c['held_out_modules'])} modules no training "
                  "text contains.", ""]
    head = "| | " + " | ".join(name for _, name, _ in sides) + " |"
    sep = "| --- |" + " --- |" * len(sides)
    for task, label in (("passkey", "Passkey"), ("multi_needle", "Multi-needle")):
        res = [ev.get(task) for _, _, ev in sides]
        if not all(res):
            continue
        n = max(res, key=lambda r: len(r["lengths"]))
        lines += [f"**{label} accuracy by context length** (mean over depths {', '.join(f'{x:.0%}' for x in n['depths'])}; "
                  f"{n['samples_per_cell']} prompts per cell"
                  + (f", {n['needles']} needles, 1 asked" if task == "multi_needle" else "")
                  + ("; — : not evaluated, beyond the model's native context" if any(
                      len(r["lengths"]) < len(n["lengths"]) for r in res) else "") + ")", "", head, sep]
        for L in n["lengths"]:
            lines.append(f"| {_fmt_len(L)} | " + " | ".join(_cell(_acc_at(r, L)) for r in res) + " |")
        depth_min = [min(row[n["lengths"].index(L)] for row in r["accuracy"]) if L in r["lengths"] else None
                     for r in res for L in [n["lengths"][-1]]]
        lines += [f"| {_fmt_len(n['lengths'][-1])}, worst depth | " + " | ".join(_cell(v) for v in depth_min) + " |",
                  "| mean of the evaluated lengths | " + " | ".join(f"{r['mean_accuracy']:.0%}" for r in res) + " |",
                  ""]
    lines += _edge_table(sides)
    longs = [ev.get("ppl_long") for _, _, ev in sides]
    if all(longs):
        r0 = longs[0]
        lines += [f"**NLL by token position** (nats/token, {r0['documents']} held-out windows of {r0['seq_len']:,} tokens)",
                  "", "| positions | " + " | ".join(name for _, name, _ in sides) + " |", sep]
        for b, bucket in enumerate(r0["buckets"]):
            lines.append(f"| {bucket['start']:,}–{bucket['end']:,} | "
                         + " | ".join(f"{r['buckets'][b]['nll']:.3f}" for r in longs) + " |")
        lines += ["| all | " + " | ".join(f"{r['overall']['nll']:.3f}" for r in longs) + " |", ""]
    for key, what in (("ppl_short", "held-out files of the training domains"),
                      ("ppl_prose", "held-out prose, a domain no training text comes from")):
        shorts = [ev.get(key) for _, _, ev in sides]
        if all(shorts):
            base = shorts[0]["overall"]["nll"]
            lines += [f"**Short text, {what}** ({shorts[0]['documents']} windows of {shorts[0]['seq_len']:,} "
                      "tokens): NLL "
                      + ", ".join(f"{name} {r['overall']['nll']:.4f}"
                                  + ("" if i == 0 else f" ({_pct(base, r['overall']['nll'])})")
                                  for i, ((_, name, _), r) in enumerate(zip(sides, shorts)))
                      + f" nats/token (change against the {sides[0][1]}).", ""]
    lines += _citation_lines(sides) + _chat_lines(sides) + _rope_lines(results)
    figs = [f for f in ("passkey_before_after.png", "multi_needle_before_after.png", "ppl_before_after.png",
                        "train_loss.png") if f in (results.get("figures") or []) or (FIG_DIR / f).exists()]
    lines += [f"![{f.removesuffix('.png')}]({fig_prefix}{f})" for f in figs]
    return "\n".join(lines).rstrip() + "\n"


def _citation_lines(sides) -> list[str]:
    cites = [(name, ev.get("citation")) for _, name, ev in sides if ev.get("citation")]
    if not cites:
        return []
    lengths = sorted({int(L) for _, c in cites for L in c["by_length"]})
    n = max(v["n"] for _, c in cites for v in c["by_length"].values())
    missing = any(len(c["by_length"]) < len(lengths) for _, c in cites)
    out = [f"**Citation task** (held-out modules; answer: the signature; citation: the document; {n} questions "
           "per length; answer / citation / both"
           + ("; — : not asked at that length" if missing else "") + ")", "", "| length | " + " | ".join(name for name, _ in cites) + " |",
           "| --- |" + " --- |" * len(cites)]
    for L in lengths:
        row = []
        for _, c in cites:
            v = c["by_length"].get(str(L))
            row.append("—" if v is None else f"{v['answer']:.0%} / {v['citation']:.0%} / {v['both']:.0%}")
        out.append(f"| {_fmt_len(L)} | " + " | ".join(row) + " |")
    return out + [""]


def _chat_lines(sides) -> list[str]:
    chats = [(name, ev["chat"]["answers"]) for _, name, ev in sides if ev.get("chat")]
    if not chats:
        return []
    out = ["**Chat prompts, greedy** (answers cut at 160 characters)", "",
           "| prompt | " + " | ".join(name for name, _ in chats) + " |", "| --- |" + " --- |" * len(chats)]
    for i, first in enumerate(chats[0][1]):
        out.append(f"| {_md(first['prompt'])} | " + " | ".join(_md(a[i]["answer"]) if i < len(a) else "—"
                                                               for _, a in chats) + " |")
    return out + [""]


def _edge_table(sides) -> list[str]:
    """The far-edge probe (gpu_run --edge-samples) of the sides that ran it, with the main grid's depth-0 cells."""
    have = [(name, ev) for _, name, ev in sides if ev.get("passkey_edge")]
    if not have:
        return []
    e0 = have[0][1]["passkey_edge"]
    T = e0["target_len"]

    def depth0(ev, L):
        main = ev.get("passkey") or {}
        if L in main.get("lengths", []) and 0.0 in main.get("depths", []):
            return main["accuracy"][main["depths"].index(0.0)][main["lengths"].index(L)]
        return ev["passkey_edge"]["depth0_by_length"].get(str(L))

    lengths = sorted({int(L) for L in e0["depth0_by_length"]} | {L for _, ev in have
                                                                  for L in (ev.get("passkey") or {}).get("lengths", [])})
    lines = [f"**Passkey at the far edge** (the needle at depth 0, right after BOS, by context length; then at "
             f"{_fmt_len(T)} the needle a little later: distance to the question in tokens; {e0['samples']} prompts "
             f"a cell at the probe's lengths and depths, the main grid's "
             f"{(have[0][1].get('passkey') or {}).get('samples_per_cell', '—')} elsewhere)", "",
             "| needle | " + " | ".join(name for name, _ in have) + " |", "| --- |" + " --- |" * len(have)]
    for L in lengths:
        lines.append(f"| depth 0 of {_fmt_len(L)} | " + " | ".join(_cell(depth0(ev, L)) for _, ev in have) + " |")
    for d in e0["by_depth_at_target"]:
        lines.append(f"| depth {float(d):.0%} of {_fmt_len(T)} (~{round(T * (1 - float(d))):,} back) | "
                     + " | ".join(_cell(ev["passkey_edge"]["by_depth_at_target"].get(d)) for _, ev in have) + " |")
    return lines + [""]


def _rope_setting(results: dict) -> list[str]:
    """One sentence: the RoPE the 32K config was given (the converter's facts, or the compared variant chosen)."""
    rc = results.get("rope_compare")
    if rc:
        return [f"RoPE: {rc['chosen']}, chosen by the comparison below.", ""]
    probe = results.get("rope_probe")
    if probe and probe.get("chosen"):
        v = probe["variants"][probe["chosen"]]
        return [f"RoPE of the {_fmt_len(probe['length'])} config: {v['rope']} made for {v['factor']:g}x the native "
                f"context ({_params(v['rope_parameters'])}), chosen by the probe below.", ""]
    conv = results.get("convert") or {}
    changed = conv.get("changed") or {}
    if "rope_theta" in changed:
        what = "NTK-aware base: rope_theta {:,.0f} → {:,.0f}".format(*changed["rope_theta"])
    elif "rope_parameters" in changed:
        new = changed["rope_parameters"][1]
        what = f"rope_type {new.get('rope_type')}"
    else:
        return []
    native, new_len = changed.get("max_position_embeddings") or (0, 0)
    extension = new_len / native if native else 0
    factor = conv.get("rope_factor") or extension  # results.json before --rope-factor: scaled by the extension
    how = f", made for {factor:g}x the native context" if factor else ""
    if factor and extension and factor != extension:
        how += f" ({factor / extension:g}x the {extension:g}x extension: headroom)"
    none = " (the probe below found no candidate above 0%)" if probe else ""
    return [f"RoPE of the {_fmt_len(new_len)} config: {what}{how}{none}.", ""]


def _params(rope_parameters: dict) -> str:
    return ", ".join(f"{k} {x:g}" if isinstance(x, float) else f"{k} {x}" for k, x in rope_parameters.items())


def _rope_lines(results: dict) -> list[str]:
    return _probe_lines(results.get("rope_probe")) + _compare_lines(results.get("rope_compare"))


def _probe_lines(probe: dict | None) -> list[str]:
    if not probe:
        return []
    depths = " / ".join(f"{d:.0%}" for d in probe["depths"])
    out = [f"**RoPE probe** (each candidate untrained, passkey at {_fmt_len(probe['length'])}, {probe['samples']} "
           f"prompts per depth; rule: {probe['rule']}; chosen: **{probe['chosen'] or 'none'}**)", "",
           f"| RoPE | rope_parameters | accuracy at depths {depths} | mean |", "| --- | --- | --- | --- |"]
    for name, v in probe["variants"].items():
        out.append(f"| {name} | {_params(v['rope_parameters'])} | "
                   + " / ".join(f"{a:.0%}" for a in v["accuracy_by_depth"]) + f" | {v['mean']:.0%} |")
    return out + [""]


def _compare_lines(rc: dict | None) -> list[str]:
    if not rc:
        return []
    out = [f"**RoPE extension, compared** ({rc['steps']} steps of {rc['tokens_per_step']:,} tokens each, same data; "
           f"rule: {rc['rule']}; chosen: **{rc['chosen']}**)", "",
           "| RoPE | rope_parameters | NLL untrained | NLL trained |", "| --- | --- | --- | --- |"]
    for name, v in rc["variants"].items():
        out.append(f"| {name} | {_params(v['rope_parameters'])} | {v['late_nll_untrained']:.3f} | "
                   f"{v['late_nll_trained']:.3f} |")
    return out + [""]


README_BEGIN = "<!-- BEGIN GENERATED: smollm2_32k summary (python -m recipes.smollm2_32k.report publish) -->"
README_END = "<!-- END GENERATED: smollm2_32k summary -->"
README_AFTER = "its figures are at the end of docs/RESULTS.md.\n"  # the learning-proof paragraph of the eval section


def readme_paragraph(results: dict) -> str:
    """The README's pointer to the section, with its headline numbers (the longest length, before -> after)."""
    ev = results.get("eval", {})
    before, after = ev.get("extended_before") or ev.get("native_before"), ev.get("after")
    T = _fmt_len(results["args"]["target_len"])
    gpus = ", ".join((results.get("environment") or {}).get("gpus") or ["CPU"])
    text = (f"A real pretrained model extended by train.py: SmolLM2-135M-Instruct, 8K → {T} context by full "
            f"fine-tuning on one {gpus} ([recipes/smollm2_32k/](recipes/smollm2_32k/README.md))")
    if before and after and before.get("passkey") and after.get("passkey"):
        pk_b, pk_a = _acc_by_length(before["passkey"])[-1], _acc_by_length(after["passkey"])[-1]
        text += f": passkey at {T} {pk_b:.0%} → {pk_a:.0%}"
        if before.get("multi_needle") and after.get("multi_needle"):
            mn_b, mn_a = _acc_by_length(before["multi_needle"])[-1], _acc_by_length(after["multi_needle"])[-1]
            text += f", multi-needle at {T} {mn_b:.0%} → {mn_a:.0%}"
        key = "ppl_prose" if after.get("ppl_prose") else "ppl_short"
        native = (ev.get("native_before") or before).get(key)
        if native and after.get(key):
            text += (f", short-text NLL {_pct(native['overall']['nll'], after[key]['overall']['nll'])} "
                     f"against the native model ({'held-out prose' if key == 'ppl_prose' else 'held-out files'})")
        cb, ca = before.get("citation"), after.get("citation")
        L = str(results["args"]["target_len"])
        if cb and ca and L in cb["by_length"] and L in ca["by_length"]:
            text += (f", citation task at {T} (answer and citation) {cb['by_length'][L]['both']:.0%} → "
                     f"{ca['by_length'][L]['both']:.0%}")
    return (text + "; the heatmaps, NLL by position to the full length and the tables are in "
            "[docs/RESULTS.md](docs/RESULTS.md) (figures in `docs/smollm2_32k/`).\n")


def keep(results_path: Path) -> Path:
    """The run's results.json, byte for byte, into FIG_DIR: the numbers behind the section and the figures are
    committed with them (written beside, then renamed)."""
    kept = FIG_DIR / "results.json"
    if Path(results_path).resolve() != kept.resolve():
        FIG_DIR.mkdir(parents=True, exist_ok=True)
        tmp = kept.with_name(kept.name + ".tmp")
        tmp.write_bytes(Path(results_path).read_bytes())
        os.replace(tmp, kept)
    return kept


def publish(results_path: Path) -> None:
    results = json.loads(Path(results_path).read_text())
    print(f"kept {keep(results_path)}")
    for p in figures(results, FIG_DIR):
        print(f"wrote {p}")
    text = f"{BEGIN}\n{section(results)}{END}"
    doc = DOCS / "RESULTS.md"
    cur = doc.read_text()
    if BEGIN in cur and END in cur:
        new = cur[:cur.index(BEGIN)] + text + cur[cur.index(END) + len(END):]
    elif "\n## Learning proof" in cur:  # first time: before the learning proof (a real model before a toy one)
        i = cur.index("\n## Learning proof") + 1
        new = cur[:i] + text + "\n\n" + cur[i:]
    else:
        new = cur.rstrip() + "\n\n" + text + "\n"
    doc.write_text(new)
    print(f"rewrote the smollm2_32k region of {doc}")
    readme = ROOT / "README.md"
    cur = readme.read_text()
    block = f"{README_BEGIN}\n{readme_paragraph(results)}{README_END}\n"
    if README_BEGIN in cur and README_END in cur:
        new = cur[:cur.index(README_BEGIN)] + block + cur[cur.index(README_END) + len(README_END) + 1:]
    elif README_AFTER in cur:
        i = cur.index(README_AFTER) + len(README_AFTER)
        new = cur[:i] + "\n" + block + cur[i:]
    else:
        raise SystemExit(f"README.md: the evaluation section's line {README_AFTER.strip()!r} is gone; add the "
                         f"paragraph by hand:\n{block}")
    readme.write_text(new)
    print(f"rewrote the smollm2_32k paragraph of {readme}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.smollm2_32k.report", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["figures", "section", "publish"])
    p.add_argument("--results", required=True, help="gpu_run.py's results.json")
    p.add_argument("--to", default="", help="figures: where the PNGs go")
    a = p.parse_args(argv)
    if a.action == "publish":
        publish(Path(a.results))
        return 0
    results = json.loads(Path(a.results).read_text())
    if a.action == "figures":
        for f in figures(results, Path(a.to or ".")):
            print(f"wrote {f}")
    else:
        print(section(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
