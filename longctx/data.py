"""The training data of a run: the files prepared once into the data cache (longctx.datastore), the eval
split, per-file sampling weights, and the rows and batch schedule (longctx.batching) the loop trains on.

Reading and the ledger: longctx.documents; labels and the SFT truncation: longctx.tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import datastore
from .batching import BatchSchedule, longest_first, make_rows
from .documents import Doc, Ledger, first_non_space
from .errors import LongctxError


@dataclass
class DataBundle:
    train_docs: Sequence[Doc]   # a datastore.DocStore (train.py) or a list (the benchmark's synthetic rows)
    eval_docs: Sequence[Doc]
    schedule: BatchSchedule
    eval_rows: list[list[int]]
    ledger: Ledger

    def step_sample_ids(self, step: int) -> list[str]:
        return [self.train_docs[d].sample_id for r in self.schedule.step_rows(step) for d in self.schedule.rows[r]]

    def resident_bytes(self) -> int:
        """Host RAM the data holds per rank beyond the shared, reclaimable page cache of the memory-mapped tokens:
        the documents' index and the rows (Python lists: ~100 bytes a document); in-memory documents whole."""
        def held(docs) -> int:
            if hasattr(docs, "resident_bytes"):
                return docs.resident_bytes()
            return sum(d.input_ids.nbytes + d.labels.nbytes + 200 for d in docs)
        n_rows = len(self.schedule.rows) + len(self.eval_rows)
        return held(self.train_docs) + held(self.eval_docs) + 100 * (len(self.train_docs) + len(self.eval_docs)) \
            + 64 * n_rows


# RAM a rank holds per training document of prepared data (datastore index ~60 B, its place in the rows ~100 B, the
# row lists): DataBundle.resident_bytes counts it exactly once the data is built; this is for estimates before that.
RESIDENT_BYTES_PER_DOC = 250


def estimate_resident_bytes(entries: Sequence[str]) -> int:
    """What a rank will hold of these files once prepared, before they are read: records (JSON lines, Parquet rows)
    x RESIDENT_BYTES_PER_DOC. Files it cannot count cheaply (a JSON array, Arrow, a save_to_disk directory) add 0."""
    records = 0
    for path in (Path(p) for p in parse_data_spec(entries)[0]):
        suffix = path.suffix.lower()
        try:
            if suffix == ".jsonl" or (suffix == ".json" and first_non_space(path) != b"["):
                with path.open("rb") as f:
                    records += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))
            elif suffix == ".parquet":
                import pyarrow.parquet as pq

                records += pq.ParquetFile(path).metadata.num_rows
        except (OSError, ValueError):
            continue
    return records * RESIDENT_BYTES_PER_DOC


def doc_lengths(docs: Sequence[Doc]) -> list[int]:
    return [int(n) for n in docs.lengths] if hasattr(docs, "lengths") else [len(d) for d in docs]


def doc_targets(docs: Sequence[Doc]) -> list[int]:
    return [int(n) for n in docs.targets] if hasattr(docs, "targets") else [d.n_supervised for d in docs]


def parse_data_spec(entries: Sequence[str]) -> tuple[list[str], Optional[list[float]]]:
    """`--data a.jsonl:0.7 b.parquet:0.3`: the paths, and their sampling weights (None when none is given). A
    weight is what follows the last ':' when that is a number and the path before it exists."""
    paths, weights = [], []
    for e in entries:
        head, sep, tail = str(e).rpartition(":")
        try:
            w = float(tail) if sep and Path(head).exists() and not Path(e).exists() else None
        except ValueError:
            w = None
        if w is not None and not (w > 0 and np.isfinite(w)):
            raise LongctxError(f"--data {e}: a sampling weight must be a positive number")
        paths.append(head if w is not None else str(e))
        weights.append(w)
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        raise LongctxError("--data: give a sampling weight to every file or to none (e.g. --data a.jsonl:0.7 "
                           f"b.jsonl:0.3); missing for {', '.join(p for p, g in zip(paths, given) if not g)}")
    return paths, (weights if all(given) else None)


def mix(docs, files: np.ndarray, names: Sequence[str], weights: Sequence[float], seed: int,
        ledger: Ledger) -> np.ndarray:
    """The positions of `docs` one epoch trains on when file f gets weights[f] / sum(weights) of the training
    tokens: each file's documents in a seeded order, repeated as often as its share needs (whole documents, so
    the share is met to within one document). Noted per file in the ledger."""
    lengths = np.asarray(doc_lengths(docs), dtype=np.int64)
    total, wsum = int(lengths.sum()), float(sum(weights))
    chosen = []
    for f, (name, w) in enumerate(zip(names, weights)):
        own = np.flatnonzero(files == f)
        if not len(own):
            continue
        target = w / wsum * total
        order = own[np.random.default_rng([seed, 11, f]).permutation(len(own))]
        cum = np.cumsum(lengths[order])
        reps, rest = divmod(target, float(cum[-1]))
        head = order[:int(np.searchsorted(cum, rest)) + 1] if rest > 0 or not reps else order[:0]
        pick = np.concatenate([np.tile(order, int(reps)), head])
        chosen.append(pick)
        ledger.notes.setdefault(name, []).append(
            f"sampling weight {w:g}: {len(pick):,} documents, {int(lengths[pick].sum()):,} tokens per epoch "
            f"({lengths[pick].sum() / max(1, total):.1%} of the training tokens; {len(own):,} documents available)")
    return np.concatenate(chosen)


def build(cfg, tok, world_size: int, say=print, announce=print) -> DataBundle:
    """The training (and evaluation) documents, prepared once into the data cache (datastore), the eval split,
    per-file sampling weights, rows and the batch schedule. `say` prints on rank 0; `announce` prints from whichever
    process prepares the data."""
    paths, weights = parse_data_spec(cfg.data)
    opts = datastore.Options(cfg.max_seq_len, cfg.truncation, cfg.sft_truncation)
    root = datastore.cache_root(cfg.data_cache)
    store = datastore.prepare(paths, tok, opts, root, num_proc=cfg.data_workers, say=say, announce=announce)
    ledger = store.ledger
    tot = ledger.total()
    if not len(store):
        raise LongctxError(
            f"no usable training documents in {', '.join(paths)}: {tot.get('documents', 0)} read, "
            f"{tot.get('docs_dropped_no_targets', 0)} without any supervised token, "
            f"{tot.get('docs_dropped_too_long', 0)} dropped as too long")
    ledger.check_sft(cfg.sft_drop_limit)
    if cfg.eval_data:
        eval_paths, _ = parse_data_spec(cfg.eval_data)
        eval_docs = datastore.prepare(eval_paths, tok, opts, root, num_proc=cfg.data_workers, say=say,
                                      announce=announce)
        eval_docs.ledger.check_sft(cfg.sft_drop_limit, "evaluation")
        train_docs = store
    elif cfg.eval_fraction > 0 and len(store) >= 2:
        perm = np.random.default_rng([cfg.seed, 7]).permutation(len(store))
        k = min(len(store) - 1, max(1, round(cfg.eval_fraction * len(store))))
        held = np.zeros(len(store), dtype=bool)
        held[perm[:k]] = True
        eval_docs, train_docs = store.subset(np.flatnonzero(held)), store.subset(np.flatnonzero(~held))
    else:
        eval_docs, train_docs = store.subset(np.arange(0)), store
    if weights is not None:
        train_docs = train_docs.subset(mix(train_docs, train_docs.file_of(), store.names, weights, cfg.seed, ledger))

    lengths, targets = doc_lengths(train_docs), doc_targets(train_docs)
    rows = make_rows(lengths, cfg.max_seq_len, cfg.packing)
    row_len = [sum(lengths[d] for d in r) for r in rows]
    row_tgt = [sum(targets[d] for d in r) for r in rows]
    schedule = BatchSchedule(rows, row_len, row_tgt, micro=cfg.micro_batch_size, accum=cfg.grad_accum,
                             world=world_size, seed=cfg.seed, group_by_length=cfg.group_by_length and not cfg.packing)
    if schedule.steps_per_epoch == 0:
        raise LongctxError(
            f"the training data gives {len(rows)} rows but one optimizer step needs {schedule.global_batch} "
            f"(micro_batch_size {cfg.micro_batch_size} x grad_accum {cfg.grad_accum} x {world_size} ranks); "
            "add data or lower the batch size")
    eval_len = doc_lengths(eval_docs)
    eval_rows = make_rows(eval_len, cfg.max_seq_len, cfg.packing)
    # longest first: train.py runs the first eval batch before step 0, so an eval OOM shows at once
    eval_rows = [eval_rows[i] for i in longest_first(range(len(eval_rows)),
                                                      [sum(eval_len[d] for d in r) for r in eval_rows],
                                                      len(eval_rows))]

    kept = sum(row_len)
    if cfg.packing:
        padded = len(rows) * cfg.max_seq_len
    else:  # what an epoch actually pads to: the longest row of each micro-batch
        padded, order = 0, schedule.epoch_order(0)
        for i in range(0, len(order), schedule.micro):
            chunk = [row_len[r] for r in order[i:i + schedule.micro]]
            padded += max(chunk) * len(chunk)
    ledger.packing = {
        "train documents": len(train_docs), "eval documents": len(eval_docs),
        "rows": len(rows), "row capacity (max_seq_len)": cfg.max_seq_len,
        "documents per row (mean)": f"{len(train_docs) / max(1, len(rows)):.2f}",
        "packing" if cfg.packing else "padding": "on" if cfg.packing else "per micro-batch",
        "efficiency (real tokens / row tokens)": kept / max(1, padded),
        "steps per epoch": schedule.steps_per_epoch,
        "rows unused per epoch (incomplete last step)": len(rows) - schedule.steps_per_epoch * schedule.global_batch,
        "data cache": str(store.path),
    }
    return DataBundle(train_docs, eval_docs, schedule, eval_rows, ledger)
