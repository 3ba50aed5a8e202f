"""Batching: documents packed into rows, the batch schedule that gives every rank its rows at every step, and
collation into model inputs.

Batches are scheduled, not streamed: rows are fixed once (packing is deterministic), the row order of
epoch e is a permutation seeded by (seed, e), and optimizer step s uses the s-th slice of that order.
So the data position is just the step number, which makes resume exact.

In a packed row the first token of every document has label -100 (longctx.tokenization.IGNORE): that
is what stops the last token of one document from being trained to predict the first token of the next.
Attention is separated by position_ids, which restart at 0 for every document (and for the padding
tail of a packed row).
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np

from .documents import Doc
from .tokenization import IGNORE


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each document (longest first) goes into the fullest row it fits in.

    Deterministic (ties broken by index). Returns rows as lists of document indices.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row id)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"document of {n} tokens exceeds row capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            rem, rid = free.pop(k)
        else:
            rid, rem = len(rows), capacity
            rows.append([])
        rows[rid].append(i)
        if rem - n > 0:
            bisect.insort(free, (rem - n, rid))
    return rows


class BatchSchedule:
    """Which rows every rank uses at every optimizer step; a pure function of (rows, seed, sizes)."""

    def __init__(self, rows: list[list[int]], row_lengths: Sequence[int], row_targets: Sequence[int], *,
                 micro: int, accum: int, world: int, seed: int, group_by_length: bool = False):
        self.rows, self.row_lengths, self.row_targets = rows, list(row_lengths), list(row_targets)
        self.micro, self.accum, self.world, self.seed = micro, accum, world, seed
        self.group_by_length = group_by_length
        self.global_batch = micro * accum * world
        self.steps_per_epoch = len(rows) // self.global_batch
        self._order_cache: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._order_cache:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            if self.group_by_length:
                mega = self.global_batch * 16
                chunks = [order[i:i + mega] for i in range(0, len(order), mega)]
                order = np.concatenate([sorted(c, key=lambda r: -self.row_lengths[r]) for c in chunks])
            if epoch == 0:  # the longest rows make up the first step: a batch that cannot fit fails at step 0
                order = longest_first(order, self.row_lengths, self.global_batch)
            self._order_cache = {epoch: np.asarray(order)}  # keep one epoch in memory
        return self._order_cache[epoch]

    def step_rows(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        return [int(r) for r in order[i * self.global_batch:(i + 1) * self.global_batch]]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        g = self.step_rows(step)
        out = []
        for m in range(self.accum):
            start = (m * self.world + rank) * self.micro
            out.append(g[start:start + self.micro])
        return out

    def step_targets(self, step: int) -> int:
        return sum(self.row_targets[r] for r in self.step_rows(step))


def longest_first(order, lengths, k: int) -> list[int]:
    """`order` with the `k` longest rows (ties: earlier in `order`) moved to the front, longest first, the
    rest in their given (seeded) order. Deterministic, so an exact resume replays the same sequence."""
    order = [int(i) for i in order]
    pos = {r: n for n, r in enumerate(order)}
    head = sorted(order, key=lambda r: (-lengths[r], pos[r]))[:max(0, k)]
    chosen = set(head)
    return head + [r for r in order if r not in chosen]


def make_rows(lengths: Sequence[int], max_seq_len: int, packing: bool) -> list[list[int]]:
    """Rows of document indices: packed (best-fit decreasing) or one document each."""
    if packing:
        return pack(lengths, max_seq_len)
    return [[i] for i in range(len(lengths))]


def collate(docs: list[Doc], rows: list[list[int]], *, pad_id: int, packing: bool, max_seq_len: int,
            flatten: bool = False) -> dict:
    """Build one micro-batch (B rows) as CPU tensors plus varlen metadata.

    Packed rows are max_seq_len long; unpacked rows are padded to the longest row in the batch.
    Padding is at the end of a row with label -100; causal attention keeps real tokens from seeing it.
    flatten=True (varlen backends) returns the B rows as one (1, B*L) row: every row starts a new
    segment (position 0), so this changes nothing for attention or loss, and transformers' own
    flash-attention path then also recognizes the packing from position_ids alone.
    """
    import torch

    lengths = [sum(len(docs[d]) for d in row) for row in rows]
    L = max_seq_len if packing else max(lengths)
    B = len(rows)
    ids = np.full((B, L), pad_id, dtype=np.int64)
    labels = np.full((B, L), IGNORE, dtype=np.int64)
    pos = np.zeros((B, L), dtype=np.int64)
    doc_lens, sample_ids = [], []
    seg_starts = []  # flattened starts of attention segments (documents and padding tails)
    for b, row in enumerate(rows):
        t = 0
        for d in row:
            doc = docs[d]
            n = len(doc)
            ids[b, t:t + n] = doc.input_ids
            labels[b, t:t + n] = doc.labels
            labels[b, t] = IGNORE  # never predict a document's first token from the previous document
            pos[b, t:t + n] = np.arange(n)
            seg_starts.append(b * L + t)
            doc_lens.append(n)
            sample_ids.append(doc.sample_id)
            t += n
        if t < L:
            pos[b, t:] = np.arange(L - t) if packing else np.arange(t, L)
            if packing:
                seg_starts.append(b * L + t)
    cu = np.asarray(seg_starts + [B * L], dtype=np.int32)
    if flatten:
        ids, labels, pos = ids.reshape(1, -1), labels.reshape(1, -1), pos.reshape(1, -1)
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(pos),
        "cu_seq_lens": torch.from_numpy(cu),
        "max_length": int(np.diff(cu).max()),
        "doc_lens": doc_lens,
        "sample_ids": sample_ids,
        "n_tokens": int(sum(lengths)),
        "n_targets": int((labels != IGNORE).sum()),
    }
