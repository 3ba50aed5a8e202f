"""The data phase of gpu_run.py: everything training and evaluation read, written under WORK/data.

  prose/          held-out prose for short-text NLL on a domain no training text comes from (heldout_prose)
  citation/       cite-the-source questions about held-out modules (longctx.evaluation.citation): eval_<len>.jsonl
                  at target/4, /2 and x1, stats.json
  citation_train.jsonl  its training examples (chat) at the same lengths, from training modules only
  train.jsonl     long real text (long_text_data: stdlib, /usr/share/doc, installed packages), capped at what training
  eval.jsonl      consumes; held-out groups in eval.jsonl and eval_texts/ (NLL by position, short-text NLL)
  eval_texts/
  probe.jsonl     passkey prompts as {prompt, response}: train.py's --eval-data, so its held-out loss at every
                  --eval-interval is the answer's NLL, a retrieval learning curve (other prompts than the eval grid's)

No training file holds an eval question's answer: the long text is built without the files that contain a held-out
question's gold signature (a vendored copy of a held-out stdlib module in site-packages, say), and the citation
training examples use training modules only (the same hash of the same name holds the modules out of both).
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

EVAL_SHARE = 0.1  # default --eval-share: of the long groups and of the stdlib modules (citation), by one hash
PROBE_SEED = 1000  # the probe's prompts are not the eval grid's (seed 0)


def citation_lengths(target_len: int) -> list[int]:
    return [target_len // 4, target_len // 2, target_len]


def probe_records(tok, target_len: int, depths: list[float], per_depth: int) -> list[dict]:
    """Passkey prompts a little under target_len (the decoded text can re-tokenize a few tokens longer), the
    answer as the response."""
    from longctx.evaluation import needle

    filler, out = needle.make_filler("classic"), []
    length = target_len - max(16, target_len // 64)
    for d in depths:
        for i in range(per_depth):
            s = needle.make_sample(tok, length, d, rng=needle.cell_rng(PROBE_SEED, length, d, i, "probe"),
                                   filler=filler)
            out.append({"prompt": s.text, "response": f" {s.answer}.", "depth": d})
    return out


def _jsonl(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def build(tok, work: Path, args, planned_tokens: int, say=print) -> dict:
    """Write WORK/data; returns its stats (what results.json keeps under "data")."""
    from longctx.evaluation import citation, heldout_prose
    from longctx.models import long_text_data as ltd

    T, data = args.target_len, work / "data"
    data.mkdir(parents=True, exist_ok=True)
    stats: dict = {}
    if args.heldout_prose != "none":
        src = Path(args.heldout_prose) if args.heldout_prose else None
        if src and src.is_dir():
            stats["prose"] = {"source": str(src)}
        else:
            stats["prose"] = heldout_prose.write(data / "prose", src)
        say(f"held-out prose: {stats['prose']}")

    golds: list[str] = []
    share = args.citation_train_share
    if args.citation_eval or share:
        stdlib = Path(args.stdlib or sysconfig.get_paths()["stdlib"])
        docs = citation.stdlib_documents(stdlib, eval_share=args.eval_share)
        per_len = planned_tokens * share / 3
        train_lengths = {L: max(1, round(per_len / (0.95 * L))) for L in citation_lengths(T)} if share else None
        res = citation.build(tok, docs, context_len=T, n_train=0, n_eval=args.citation_eval,
                             eval_lengths=citation_lengths(T) if args.citation_eval else (),
                             train_lengths=train_lengths)
        citation.write(data / "citation", res)
        os.replace(data / "citation" / "train.jsonl", data / "citation_train.jsonl")  # a name of its own in the ledger
        stats["citation"] = res["stats"] | {"train_lengths": train_lengths,
                                            "train_tokens": sum(r["tokens"] for r in res["train"])}
        golds = sorted({r["signature"] for rows in res["eval"].values() for r in rows})
        say(f"citation: {len(res['train'])} training examples ({stats['citation']['train_tokens']:,} tokens), "
            f"{sum(map(len, res['eval'].values()))} held-out questions")

    stdlib_root = args.stdlib if args.stdlib is not None else sysconfig.get_paths()["stdlib"]
    sites = ltd.site_roots() if args.site_packages == "auto" else \
        [Path(x) for x in args.site_packages.split(",") if x.strip()]
    groups = (ltd.stdlib_groups(Path(stdlib_root)) if stdlib_root else []) + \
             (ltd.doc_groups(Path(args.doc_root)) if args.doc_root and Path(args.doc_root).is_dir() else []) + \
             (ltd.site_groups(sites) if sites else [])
    held = [g for g in groups if ltd.held_out(g.name, args.eval_share)]  # eval text: the filter is for training
    kept, dropped = ltd.drop_files_containing([g for g in groups if not ltd.held_out(g.name, args.eval_share)],
                                              golds)
    groups = kept + held
    long_share = 1 - share
    # documents are cut at the training length; a held-out piece gives one NLL window of the target length
    L = args.train_len
    eval_tokens = int(max(args.ppl_docs * L, args.short_docs * args.short_len) * 1.2)
    result = ltd.build(tok, groups, target_len=L, min_long_len=T // 4, short_share=0.2, eval_share=args.eval_share,
                       max_train_tokens=int(planned_tokens * long_share * 1.1), max_eval_tokens=eval_tokens)
    ltd.write(data, result)
    # how often one pass over the long text shows each distance, up to that of the needle at depth 0 of a prompt of
    # the target length (~T - 32: the needle's value sits a few tokens after BOS, the answer at the end)
    pairs = ltd.pairs_at_distance(result["train_long_lengths"], (T // 4, T // 2, 3 * T // 4, T - 32))
    stats["long_text"] = result["stats"] | {"pairs_at_distance": {str(d): n for d, n in pairs.items()},
                                            "sources": {"stdlib": bool(stdlib_root), "doc_root": args.doc_root,
                                                        "site_packages": [str(s) for s in sites]},
                                            "files_dropped_for_eval_answers": dropped[:50],
                                            "n_files_dropped_for_eval_answers": len(dropped)}
    probe = probe_records(tok, T, [float(d) for d in args.depths.split(",")], args.probe_samples)
    _jsonl(data / "probe.jsonl", probe)
    stats["probe"] = {"prompts": len(probe), "length": T - max(16, T // 64)}
    return stats
