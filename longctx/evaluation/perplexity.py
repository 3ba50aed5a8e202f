"""Perplexity of long documents, bucketed by token position.

If a model uses its long context, tokens late in a document (which see more of it) are predicted better
than early ones: the mean NLL per position bucket falls with position. Bucket b holds the predictions of
tokens at positions [start, end) of a document, i.e. made with a context of start..end-1 tokens.

The decoder runs once per document; the LM head and the cross-entropy then run over `chunk` positions at
a time, so the [positions x vocab] logits never exist for more than one chunk (128K positions of a 128K
vocabulary would be 64 GiB in fp32). Logits and log-softmax are fp32, as in training.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import LongctxError


def bucket_edges(spec: str, seq_len: int) -> list[int]:
    """"log": [1, 64, 128, 256, ..., seq_len];  "linear:K": K equal buckets over [1, seq_len)."""
    if spec == "log":
        edges = [1]
        e = 64
        while e < seq_len:
            edges.append(e)
            e *= 2
        return edges + [seq_len]
    if spec.startswith("linear:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            k = 0
        if k < 1:
            raise LongctxError(f"--ppl-buckets {spec}: expected linear:K with K >= 1")
        edges = sorted({1, *(max(1, round(i * seq_len / k)) for i in range(1, k)), seq_len})
        return edges
    raise LongctxError(f"--ppl-buckets {spec}: expected log or linear:K")


@torch.no_grad()
def token_nll(model, input_ids: Sequence[int], chunk: int = 1024) -> torch.Tensor:
    """nll[t] = -log p(x[t+1] | x[0..t]) for t in [0, S-1), fp32 on the CPU."""
    dev = next(model.parameters()).device
    ids = torch.as_tensor(list(input_ids), device=dev).view(1, -1)
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
    head = model.get_output_embeddings()
    targets = ids[0, 1:]
    out = torch.empty(targets.numel(), dtype=torch.float32)
    for s in range(0, targets.numel(), chunk):
        e = min(s + chunk, targets.numel())
        logits = head(hidden[s:e]).float()
        nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[s:e, None]).squeeze(1)
        out[s:e] = nll.cpu()
        del logits
    return out


def bucketed(nlls: Sequence[torch.Tensor], edges: Sequence[int]) -> dict:
    """Mean NLL and perplexity per position bucket over documents (nlls[i][t] predicts position t+1)."""
    sums = [0.0] * (len(edges) - 1)
    counts = [0] * (len(edges) - 1)
    for nll in nlls:
        pos = torch.arange(1, nll.numel() + 1)
        for b in range(len(edges) - 1):
            sel = nll[(pos >= edges[b]) & (pos < edges[b + 1])]
            sums[b] += float(sel.double().sum())
            counts[b] += int(sel.numel())
    buckets = []
    for b in range(len(edges) - 1):
        mean = sums[b] / counts[b] if counts[b] else float("nan")
        buckets.append({"start": edges[b], "end": edges[b + 1], "tokens": counts[b], "nll": mean,
                        "ppl": math.exp(mean) if counts[b] else float("nan")})
    total = sum(counts)
    mean = sum(sums) / total if total else float("nan")
    return {"buckets": buckets, "overall": {"tokens": total, "nll": mean,
                                            "ppl": math.exp(mean) if total else float("nan")}}


def evaluate(model, docs: Sequence[Sequence[int]], *, buckets: str = "log", chunk: int = 1024) -> dict:
    seq_len = max(len(d) for d in docs)
    res = bucketed([token_nll(model, d, chunk) for d in docs], bucket_edges(buckets, seq_len))
    res.update(documents=len(docs), seq_len=seq_len, chunk=chunk, bucket_spec=buckets)
    return res
