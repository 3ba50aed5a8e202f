"""Position-bucketed perplexity with chunked logits equals a hand computation from the full logits."""

from __future__ import annotations

import math

import pytest
import torch

from helpers_train import tiny_lm


@pytest.fixture(scope="module")
def model():
    m = tiny_lm(attn_implementation="sdpa").eval()
    with torch.no_grad():  # a less uniform distribution than the init, so positions differ
        for p in m.parameters():
            p.mul_(4.0)
    return m


def reference_nll(model, ids: list[int]) -> list[float]:
    """-log p(x[t+1] | x[..t]) from the full [S x V] logits of the ordinary forward, one position at a time."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    out = []
    for t in range(len(ids) - 1):
        logp = logits[t] - torch.logsumexp(logits[t], dim=0)
        out.append(-float(logp[ids[t + 1]]))
    return out


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_token_nll_matches_full_logits(model, chunk):
    from longctx.evaluation.perplexity import token_nll

    ids = torch.randint(3, 2048, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    got = token_nll(model, ids, chunk=chunk)
    assert got.shape == (49,)
    assert got.tolist() == pytest.approx(reference_nll(model, ids), abs=1e-4)


def test_bucket_edges():
    from longctx.evaluation.perplexity import bucket_edges

    assert bucket_edges("log", 300) == [1, 64, 128, 256, 300]
    assert bucket_edges("log", 256) == [1, 64, 128, 256]
    assert bucket_edges("linear:4", 100) == [1, 25, 50, 75, 100]


def test_bucketed_perplexity_matches_hand_computation(model):
    from longctx.evaluation.perplexity import evaluate

    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(3, 2048, (40,), generator=g).tolist() for _ in range(3)]
    res = evaluate(model, docs, buckets="linear:4", chunk=5)
    edges = [1, 10, 20, 30, 40]
    refs = [reference_nll(model, d) for d in docs]
    for b, (lo, hi) in enumerate(zip(edges, edges[1:])):
        # the prediction of the token at position p (made from p tokens of context) is refs[d][p - 1]
        vals = [r[p - 1] for r in refs for p in range(lo, hi)]
        bucket = res["buckets"][b]
        assert (bucket["start"], bucket["end"], bucket["tokens"]) == (lo, hi, len(vals))
        assert bucket["nll"] == pytest.approx(sum(vals) / len(vals), abs=1e-4)
        assert bucket["ppl"] == pytest.approx(math.exp(sum(vals) / len(vals)), rel=1e-4)
    every = [x for r in refs for x in r]
    assert res["overall"]["tokens"] == 3 * 39
    assert res["overall"]["nll"] == pytest.approx(sum(every) / len(every), abs=1e-4)
