"""eval.py's config and run: check every input, load the model once, run the tasks, write eval.json + PNGs.

Tasks (--tasks, comma-separated; default all but chat that have their input):
  passkey       one needle per prompt, accuracy per (length, depth) cell  -> passkey_heatmap.png
  multi_needle  --needles needles per prompt, the one at the cell's depth is asked for
                                                                          -> multi_needle_heatmap.png
  ppl           NLL / perplexity by token position on --ppl-data (default: Python stdlib sources)
                                                                          -> ppl_by_position.png
  longbench     exact match and token F1 on --longbench-data (skipped when not given)
  citation      answer and citation accuracy per context length on --citation-data (citation.py's eval files;
                skipped when not given)
  chat          chat.py's fixed short prompts answered greedily (not scored: read before and after side by side)

Generation decodes several prompts at a time (generate.greedy_many, --batch-tokens prompt tokens per batch).

eval.json is rewritten after every task, so a stopped run keeps what it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LongctxError, below_minimum, refuse_arguments

TASKS = ("passkey", "multi_needle", "ppl", "longbench", "citation", "chat")
DEFAULT_TASKS = TASKS[:-1]  # chat only when asked: it needs a chat template


@dataclass
class EvalConfig:
    # what is evaluated, and where the results go
    model: str
    tokenizer: str = ""
    output_dir: str = "runs/eval"
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    # the retrieval grid (passkey, multi_needle)
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 10
    needles: int = 4
    filler: str = "classic"
    seed: int = 0
    max_new_tokens: int = 10
    # perplexity by position (0: the longest of `lengths`)
    ppl_data: str = ""
    ppl_seq_len: int = 0
    ppl_docs: int = 8
    ppl_buckets: str = "log"
    logits_chunk: int = 1024
    # LongBench-style QA (0: the longest of `lengths`)
    longbench_data: str = ""
    longbench_template: str = ""
    longbench_max_len: int = 0
    longbench_max_new_tokens: int = 32
    # the citation task and the chat prompts
    citation_data: str = ""
    citation_max_new_tokens: int = 128
    citation_samples: int = 0
    citation_lengths: list[int] = field(default_factory=list)  # empty: every length the data has
    chat_max_new_tokens: int = 64
    # how the model runs
    batch_tokens: int = 262144
    precision: str = "auto"
    attn_implementation: str = "auto"

    def __post_init__(self):
        self.ppl_seq_len = self.ppl_seq_len or max(self.lengths, default=0)
        self.longbench_max_len = self.longbench_max_len or max(self.lengths, default=0)
        from .longbench import DEFAULT_TEMPLATE

        self.longbench_template = self.longbench_template or DEFAULT_TEMPLATE


def _csv(kind):
    def parse(s: str):
        try:
            return [kind(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {s!r}") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig(model="")
    p = argparse.ArgumentParser(
        prog="eval.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Long-context evaluation of a local Hugging Face model directory: passkey and multi-needle "
                    "retrieval heatmaps, perplexity by token position, LongBench-style QA. Nothing is downloaded.",
        epilog="Example: python eval.py --model runs/llama64k/final_model --lengths 8192,32768,65536 "
               "--output-dir runs/llama64k/eval")
    a = p.add_argument
    a("--model", required=True, help="Local Hugging Face model directory (config.json + weights).")
    a("--tokenizer", default="", help="Tokenizer directory (default: the model's, else the shipped one).")
    a("--output-dir", default=d.output_dir, help="Where eval.json and the PNGs go.")
    a("--tasks", type=_csv(str), default=d.tasks, help=f"Comma-separated subset of {','.join(TASKS)}.")
    a("--lengths", type=_csv(int), default=d.lengths, help="Context lengths (tokens) of the retrieval grid.")
    a("--depths", type=_csv(float), default=d.depths, help="Needle depths in [0, 1] of the retrieval grid.")
    a("--samples", type=int, default=d.samples, help="Prompts per (length, depth) cell.")
    a("--needles", type=int, default=d.needles, help="Needles per multi_needle prompt (1 asked, the rest distract).")
    a("--filler", default=d.filler, help="Haystack: classic, bank[:N] (random sentences repeated), or a text file.")
    a("--seed", type=int, default=d.seed, help="Seed of the generated prompts.")
    a("--max-new-tokens", type=int, default=d.max_new_tokens, help="Tokens generated per retrieval prompt.")
    a("--ppl-data", default="", help="Perplexity corpus: a .jsonl of {text}, a text file or a directory. "
      "Default: the Python standard library's sources, read at run time.")
    a("--ppl-seq-len", type=int, default=0, help="Tokens per perplexity window (default: the longest --lengths).")
    a("--ppl-docs", type=int, default=d.ppl_docs, help="Perplexity windows to evaluate.")
    a("--ppl-buckets", default=d.ppl_buckets, help="Position buckets: log (1, 64, 128, ...) or linear:K.")
    a("--logits-chunk", type=int, default=d.logits_chunk, help="Positions per LM-head chunk in perplexity.")
    a("--longbench-data", default="", help="A local jsonl of {context, question|input, answers}.")
    a("--longbench-template", default="", help="Prompt with {context} and {question} (default: a LongBench-like "
      "QA prompt).")
    a("--longbench-max-len", type=int, default=0, help="Prompt tokens; longer contexts are cut in the middle "
      "(default: the longest --lengths).")
    a("--longbench-max-new-tokens", type=int, default=d.longbench_max_new_tokens, help="Tokens generated per question.")
    a("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=d.precision,
      help="auto: bf16 on sm80+, fp16 on older GPUs, fp32 on CPU.")
    a("--citation-data", default="", help="Citation QA: a directory of eval_<len>.jsonl (python -m "
      "longctx.evaluation.citation) or one such file.")
    a("--citation-max-new-tokens", type=int, default=d.citation_max_new_tokens, help="Tokens generated per "
      "citation question.")
    a("--citation-samples", type=int, default=d.citation_samples, help="Citation questions per context length "
      "(the first N; 0: all).")
    a("--citation-lengths", type=_csv(int), default=d.citation_lengths, help="Context lengths of the citation "
      "data to evaluate (default: all it has).")
    a("--chat-max-new-tokens", type=int, default=d.chat_max_new_tokens, help="Tokens generated per chat prompt.")
    a("--batch-tokens", type=int, default=d.batch_tokens, help="Prompt tokens decoded together at most (the KV "
      "cache of a batch is held at once; 0: all prompts of a task in one batch).")
    a("--attn-implementation", choices=["auto", "sdpa", "flash_attention_2", "eager"], default=d.attn_implementation,
      help="auto: flash_attention_2 if installed, else SDPA (its FlashAttention kernel on sm80+).")
    return p


def parse(argv: list[str] | None = None) -> EvalConfig:
    ns = build_parser().parse_args(argv)
    cfg = EvalConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(EvalConfig)})
    validate(cfg)
    return cfg


def validate(cfg: EvalConfig) -> None:
    """Checks that need nothing but the config (files are checked in check_inputs)."""
    problems = []
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown or not cfg.tasks:
        problems.append(f"--tasks: unknown {unknown or 'empty'} (choose from {', '.join(TASKS)})")
    if not cfg.lengths or min(cfg.lengths) < 64:
        problems.append(f"--lengths must be integers >= 64, got {cfg.lengths}")
    if not cfg.depths or any(not 0 <= d <= 1 for d in cfg.depths):
        problems.append(f"--depths must be in [0, 1], got {cfg.depths}")
    if "multi_needle" in cfg.tasks and cfg.needles < 2:
        problems.append(f"--needles must be >= 2 for multi_needle, got {cfg.needles}")
    problems += below_minimum(cfg, {"samples": 1, "max_new_tokens": 1, "ppl_docs": 1, "logits_chunk": 1,
                                    "longbench_max_new_tokens": 1, "citation_max_new_tokens": 1,
                                    "chat_max_new_tokens": 1, "batch_tokens": 0, "citation_samples": 0,
                                    "ppl_seq_len": 2})
    refuse_arguments(problems)


def check_inputs(cfg: EvalConfig):
    """Everything that can be wrong with the inputs, before the model is loaded. Returns the tokenizer, its
    path, the filler, the LongBench samples (or None) and the citation records by length (or None)."""
    from . import citation, corpus, generate, longbench, needle, perplexity

    model_cfg = generate.check_model_dir(cfg.model)
    tok, tok_path = generate.load_tokenizer(cfg.model, cfg.tokenizer)
    vocab = model_cfg.get("vocab_size") or (model_cfg.get("text_config") or {}).get("vocab_size")
    if vocab and len(tok) > vocab:
        raise LongctxError(f"the tokenizer ({tok_path}) has {len(tok)} tokens but the model's vocab_size is {vocab}")
    filler = needle.make_filler(cfg.filler)
    if "ppl" in cfg.tasks:
        corpus.check(cfg.ppl_data)
        perplexity.bucket_edges(cfg.ppl_buckets, cfg.ppl_seq_len)
    samples = None
    if "longbench" in cfg.tasks and cfg.longbench_data:
        longbench.check_template(cfg.longbench_template)
        samples = longbench.read(cfg.longbench_data)
    cites = None
    if "chat" in cfg.tasks and not getattr(tok, "chat_template", None):
        raise LongctxError(f"--tasks chat: the tokenizer ({tok_path}) has no chat template")
    if "citation" in cfg.tasks and cfg.citation_data:
        if not getattr(tok, "chat_template", None):
            raise LongctxError(f"--citation-data: the tokenizer ({tok_path}) has no chat template")
        cites = citation.read(cfg.citation_data)
        if cfg.citation_lengths:
            missing = sorted(set(cfg.citation_lengths) - set(cites))
            if missing:
                raise LongctxError(f"--citation-lengths {','.join(map(str, missing))}: not in --citation-data "
                                   f"{cfg.citation_data} (it has {','.join(map(str, sorted(cites)))})")
            cites = {L: rows for L, rows in cites.items() if L in cfg.citation_lengths}
        if cfg.citation_samples:
            cites = {L: rows[:cfg.citation_samples] for L, rows in cites.items()}
    limit = model_cfg.get("max_position_embeddings")
    longest = max([*cfg.lengths, cfg.ppl_seq_len if "ppl" in cfg.tasks else 0, *(cites or {})])
    if limit and longest > limit:
        print(f"note: lengths up to {longest:,} exceed the model's max_position_embeddings {limit:,}: "
              "those cells measure extrapolation", flush=True)
    return tok, tok_path, filler, samples, cites


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------

def retrieval(model, tok, cfg: EvalConfig, filler, *, task: str, n_needles: int) -> dict:
    from . import generate, needle

    grid = needle.make_grid(tok, cfg.lengths, cfg.depths, cfg.samples, seed=cfg.seed, filler=filler,
                            n_needles=n_needles, task=task)
    stop = {tok.eos_token_id} if tok.eos_token_id is not None else None
    acc = [[0.0] * len(cfg.lengths) for _ in cfg.depths]
    cells, examples = [], []
    wrong = other = 0  # wrong answers, and those that are another needle's value (the key was not matched)

    def done(ids: list[int]) -> bool:  # the first run of digits has ended: extract_answer's value is final
        return needle.answer_complete(tok.decode(ids, skip_special_tokens=True))

    for j, L in enumerate(cfg.lengths):
        samples = [s for d in cfg.depths for s in grid[(L, d)]]  # one length: batches of equal prompts, no padding
        outs = iter(tok.decode(o, skip_special_tokens=True) for o in generate.greedy_many(
            model, [s.input_ids for s in samples], cfg.max_new_tokens, stop, batch_tokens=cfg.batch_tokens,
            done=done))
        for i, d in enumerate(cfg.depths):
            hits = 0
            for s in grid[(L, d)]:
                out = next(outs)
                got = needle.extract_answer(out)
                ok = got == s.answer
                hits += ok
                if not ok:
                    wrong += 1
                    other += any(got == n.value for n in s.needles)
                if len(examples) < 8 or (not ok and len(examples) < 16):
                    examples.append({"length": L, "depth": d, "key": s.key, "answer": s.answer, "output": out,
                                     "correct": bool(ok)})
            acc[i][j] = hits / len(grid[(L, d)])
            cells.append({"length": L, "depth": d, "accuracy": acc[i][j], "n": len(grid[(L, d)]),
                          "actual_depth_mean": sum(s.actual_depth for s in grid[(L, d)]) / len(grid[(L, d)])})
        print(f"  {task} {L:>7,} tokens: " + " ".join(f"{acc[i][j]:.0%}" for i in range(len(cfg.depths))),
              flush=True)
    mean = sum(map(sum, acc)) / (len(cfg.lengths) * len(cfg.depths))
    if n_needles > 1 and wrong:
        print(f"  {task}: {other} of {wrong} wrong answers are another needle's value", flush=True)
    return {"lengths": cfg.lengths, "depths": cfg.depths, "accuracy": acc, "mean_accuracy": mean,
            "samples_per_cell": cfg.samples, "needles": n_needles, "filler": filler.name,
            "chance": 10.0 ** -needle.NeedleFormat().digits, "cells": cells, "examples": examples,
            # of the wrong answers, the share that is another needle's value: the lookup found a needle but not
            # the asked key's (with k needles and no key matching, accuracy sits near 1/k)
            "wrong": wrong, "wrong_other_needle": other}


def ppl(model, tok, cfg: EvalConfig) -> dict:
    from . import corpus, perplexity

    docs = corpus.windows(corpus.texts(cfg.ppl_data), tok, cfg.ppl_seq_len, cfg.ppl_docs)
    res = perplexity.evaluate(model, docs, buckets=cfg.ppl_buckets, chunk=cfg.logits_chunk)
    res["corpus"] = cfg.ppl_data or "python-stdlib"
    for b in res["buckets"]:
        print(f"  ppl positions [{b['start']:>7,}, {b['end']:>7,}): nll {b['nll']:.3f}  ppl {b['ppl']:.3g}", flush=True)
    return res


def qa(model, tok, cfg: EvalConfig, samples) -> dict:
    from . import generate, longbench

    stop = {tok.eos_token_id} if tok.eos_token_id is not None else None
    rows = []
    for s in samples:
        ids, cut = longbench.prompt_ids(tok, s, cfg.longbench_template, cfg.longbench_max_len)
        out = tok.decode(generate.greedy(model, ids, cfg.longbench_max_new_tokens, stop), skip_special_tokens=True)
        pred = longbench.first_line(out)
        rows.append({"id": s.id, "prediction": pred, "answers": s.answers, "prompt_tokens": len(ids),
                     "context_cut": cut, **longbench.score(pred, s.answers)})
    n = len(rows)
    res = {"data": cfg.longbench_data, "n": n, "em": sum(r["em"] for r in rows) / n,
           "f1": sum(r["f1"] for r in rows) / n, "max_len": cfg.longbench_max_len, "samples": rows}
    print(f"  longbench: {n} samples, exact match {res['em']:.3f}, F1 {res['f1']:.3f}", flush=True)
    return res


def cite(model, tok, cfg: EvalConfig, records: dict[int, list[dict]]) -> dict:
    from . import citation, generate

    stop = citation.stop_ids(tok) or None
    by_length, rows = {}, []
    for L, recs in records.items():
        prompts = [citation.prompt_ids(tok, r) for r in recs]
        n_prompt = sum(map(len, prompts))
        outs = [tok.decode(o, skip_special_tokens=True) for o in generate.greedy_many(
            model, prompts, cfg.citation_max_new_tokens, stop, batch_tokens=cfg.batch_tokens)]
        s = citation.score_all(outs, recs)
        by_length[str(L)] = {"n": s["n"], "answer": s["answer"], "citation": s["citation"], "both": s["both"],
                             "prompt_tokens_mean": n_prompt / max(1, len(recs))}
        rows += [{"id": r["id"], "length": L, "name": r["name"], "gold": r["messages"][-1]["content"],
                  "output": out, **sc} for r, out, sc in zip(recs, outs, s["rows"])]
        print(f"  citation {L:>7,} tokens: {s['n']} questions, answer {s['answer']:.0%}, "
              f"citation {s['citation']:.0%}, both {s['both']:.0%}", flush=True)
    n = max(1, len(rows))
    return {"data": cfg.citation_data, "lengths": list(records), "by_length": by_length,
            **{k: sum(r[k] for r in rows) / n for k in ("answer", "citation", "both")}, "samples": rows}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def run_task(task: str, model, tok, cfg: EvalConfig, filler, lb_samples, cites=None) -> dict:
    if task in ("passkey", "multi_needle"):
        return retrieval(model, tok, cfg, filler, task=task, n_needles=1 if task == "passkey" else cfg.needles)
    if task == "ppl":
        return ppl(model, tok, cfg)
    if task == "citation":
        return cite(model, tok, cfg, cites)
    if task == "chat":
        from . import chat

        rows = chat.answer_all(model, tok, max_new_tokens=cfg.chat_max_new_tokens)
        for r in rows:
            print(f"  chat: {r['prompt']!r} -> {r['answer'][:100]!r}", flush=True)
        return {"max_new_tokens": cfg.chat_max_new_tokens, "answers": rows}
    return qa(model, tok, cfg, lb_samples)


def quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run(cfg: EvalConfig) -> dict:
    import torch

    from .. import resolve
    from . import generate, plot

    tok, tok_path, filler, lb_samples, cites = check_inputs(cfg)
    device = resolve.Facts.detect()
    precision, _ = resolve.resolve_precision(cfg.precision, device)
    attn = generate.choose_attention(cfg.attn_implementation, device, precision)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    quiet_libraries()
    dev = torch.device("cuda" if device.kind == "cuda" else "cpu")
    model = generate.load_model(cfg.model, precision=precision, attn_impl=attn, device=dev)
    fused = generate.probe_fused_attention(model, dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"eval {cfg.model} ({n_params / 1e6:.1f}M params) | device {device.name} | {precision} | attention {attn} "
          f"| tokenizer {tok_path}", flush=True)
    result: dict = {"model": cfg.model, "tokenizer": tok_path, "device": device.name, "precision": precision,
                    "attention": attn, "fused_attention_only": fused, "params": n_params,
                    "config": dataclasses.asdict(cfg), "seconds": {}}
    path = out_dir / "eval.json"

    def save():
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_json_safe(result), indent=1))
        os.replace(tmp, path)

    name = Path(cfg.model.rstrip("/")).name
    try:
        import matplotlib  # noqa: F401
        plots = True
    except ImportError:
        plots = False
        print("note: matplotlib is not installed: no PNGs (eval.json has every number)", flush=True)
    for task in cfg.tasks:
        if (task == "longbench" and lb_samples is None) or (task == "citation" and cites is None):
            continue
        t0 = time.perf_counter()
        with generate.fused_attention_only(dev) if fused else contextlib.nullcontext():
            res = run_task(task, model, tok, cfg, filler, lb_samples, cites)
        if not plots:
            pass
        elif task in ("passkey", "multi_needle"):
            label = "passkey" if task == "passkey" else f"multi-needle ({cfg.needles} needles, 1 asked)"
            plot.heatmaps([(f"{name}: {label}, mean {res['mean_accuracy']:.0%}", res)],
                          out_dir / f"{task}_heatmap.png")
        elif task == "ppl":
            plot.ppl_by_position([(name, res)], out_dir / "ppl_by_position.png",
                                 title=f"NLL by position: {res['corpus']}, {res['documents']} x {res['seq_len']:,} tokens")
        result[task] = res
        result["seconds"][task] = round(time.perf_counter() - t0, 2)
        save()
    print(f"wrote {path}", flush=True)
    return result
