"""The attention kernels `auto` chooses between, measured in isolation on one GPU (the numbers behind
longctx.attention.PER_DOC_MIN_TOKENS): longctx's SDPA-per-document function with its backend order (cuDNN first),
the same with SDPA restricted to flash or to cuDNN, and torch's varlen_attn, over 128K-token rows of equal
documents from one 128K document down to 256 documents of 512 tokens; then 128K rows packed with Python-stdlib
document lengths (bench/stdlib_doc_lengths.json) at several values of PER_DOC_MIN_TOKENS.

    python -m bench.attention_kernels bench/results/<date>_<device>_attention_kernels.json
    python -m bench.attention_kernels OUT.json --fa4     # packed-row candidates against the default path

`--fa4` needs the `flash-attn-4` package (flash_attn.cute; not a dependency of the project): flash-attention-4
through longctx.fa4's ops and cuDNN's ragged layout (SDPA on nested jagged tensors, cuDNN only) against SDPA per
document: error on packed rows against an fp32 reference, speed on one 128K document, 4 x 32K and stdlib rows of
fresh lengths. (bench/results/2026-12-05_h100_attention_fa4.json predates the cuDNN column and timed the package's
own flash_attn_varlen_func, which tests/test_fa4.py shows equal to longctx.fa4's ops.)
"""

from __future__ import annotations

import json
import sys
import time

import torch
from torch.nn.attention import SDPBackend

from bench.train_bench import row_doc_lengths
from longctx import attention

H, K, D, S = 32, 8, 128, 131072
# TFLOP/s here count causal attention only, forward + backward: 4 x (n^2 / 2) x H x D a document's forward (QK^T and
# PV over the causal half), and the backward as 2.5 forwards (flash-attention's own convention), so 3.5 x 4 x n^2/2.
FLOP_CONVENTION = "causal attention FLOPs, forward + backward = 3.5 x forward, forward = 4 x (n^2/2) x heads x head_dim"


def header() -> dict:
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "flop_convention": FLOP_CONVENTION,
            "cudnn": torch.backends.cudnn.version()}


def attention_flops(lens) -> float:
    return 3.5 * 4 * sum(n * n / 2 for n in lens) * H * D


def timeit(fn, n: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def main(out: str) -> None:
    rows = []
    for doc in (131072, 32768, 8192, 2048, 512):
        lens = [doc] * (S // doc)
        q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(1, K, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        g = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
        flops = attention_flops(lens)

        def per_doc():
            o, _ = attention.sdpa_per_doc_forward(None, q, k, v, None, cu_seq_lens_q=cu)
            o.backward(g)

        def varlen():
            qq, kk, vv = (t.transpose(1, 2).reshape(S, t.shape[1], D) for t in (q, k, v))
            attention.call_varlen(attention.torch_varlen_attn(), qq, kk, vv, cu.cuda(), doc, None).backward(g[0])

        row = {"doc": doc}
        for name, fn in (("sdpa_per_doc", per_doc), ("varlen", varlen)):
            row[name] = round(flops / timeit(fn) / 1e12, 1)
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
            saved = attention._sdpa_backends
            attention._sdpa_backends = lambda b=backend: [getattr(SDPBackend, b)]
            try:
                row["only_" + backend] = round(flops / timeit(per_doc) / 1e12, 1)
            finally:
                attention._sdpa_backends = saved
        rows.append(row)
        print(json.dumps(row), flush=True)
    mixed = []
    for seed in range(3):
        lens = row_doc_lengths(S, "stdlib", seed)
        lens[-1] += S - sum(lens)  # fill the row
        q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(1, K, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        g = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
        row = {"seed": seed, "docs": len(lens), "median_doc": sorted(lens)[len(lens) // 2]}
        saved = attention.PER_DOC_MIN_TOKENS
        for threshold in (2048, 4096, 8192, 16384, 32768, S + 1):
            attention.PER_DOC_MIN_TOKENS = threshold

            def per_doc():
                o, _ = attention.sdpa_per_doc_forward(None, q, k, v, None, cu_seq_lens_q=cu)
                o.backward(g)
            row[f"ms_threshold_{threshold}"] = round(1e3 * timeit(per_doc), 1)
        attention.PER_DOC_MIN_TOKENS = saved
        mixed.append(row)
        print(json.dumps(row), flush=True)
    fresh = fresh_lengths()
    with open(out, "w") as f:
        json.dump({**header(), "rows": rows, "stdlib_rows": mixed,
                   "fresh_lengths": fresh}, f, indent=1)


def fresh_lengths(steps: int = 4) -> dict:
    """What training meets and the rows above do not: every step's row brings document lengths never seen before.
    First, cuDNN's cost for a length seen for the first time (fwd + bwd, one document) against the same length
    again; then stdlib rows, each variant on its own never-seen rows (torch's plan cache is per process and per
    shape), per step: SDPA per document as it is (PLAN_CACHED_MULTIPLE), with every long document through cuDNN
    (the rule before it), and varlen for everything."""
    out: dict = {"one_document_ms": []}
    for n in (9001, 12345, 23457, 45679):
        q = torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(1, K, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))

        def once():
            with attention._sdpa_context():
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        torch.cuda.synchronize()
        t = time.perf_counter()
        once()
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        out["one_document_ms"].append({"n": n, "first": round(1e3 * first, 1), "again": round(1e3 * timeit(once), 1)})
        print(json.dumps(out["one_document_ms"][-1]), flush=True)
    # (PER_DOC_MIN_TOKENS, PLAN_CACHED_MULTIPLE): the default; every long document through cuDNN (the rule
    # before); everything through varlen
    variants = {"per_doc": (attention.PER_DOC_MIN_TOKENS, attention.PLAN_CACHED_MULTIPLE),
                "per_doc_every_length": (attention.PER_DOC_MIN_TOKENS, 1), "varlen": (S + 1, 1)}
    saved = attention.PER_DOC_MIN_TOKENS, attention.PLAN_CACHED_MULTIPLE
    for vi, (name, (threshold, multiple)) in enumerate(variants.items()):
        attention.PER_DOC_MIN_TOKENS, attention.PLAN_CACHED_MULTIPLE = threshold, multiple
        times, flops_done = [], 0.0
        for step in range(steps):
            lens = row_doc_lengths(S, "stdlib", 1000 + 100 * vi + step)
            lens[-1] += S - sum(lens)
            q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(1, K, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
            cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
            g = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
            torch.cuda.synchronize()
            t = time.perf_counter()
            o, _ = attention.sdpa_per_doc_forward(None, q, k, v, None, cu_seq_lens_q=cu)
            o.backward(g)
            torch.cuda.synchronize()
            times.append(round(1e3 * (time.perf_counter() - t), 1))
            flops_done += attention_flops(lens)
        out[name] = {"ms_per_step": times, "tflops": round(flops_done / (sum(times) / 1e3) / 1e12, 1)}
        print(name, json.dumps(out[name]), flush=True)
    attention.PER_DOC_MIN_TOKENS, attention.PLAN_CACHED_MULTIPLE = saved
    return out


def candidates_against_default(steps: int = 4) -> dict:
    """The packed-row candidates against longctx's SDPA per document (the default), same inputs: flash-attention-4
    through longctx.fa4's ops (what `--attn-implementation fa4` runs) and cuDNN's ragged (THD) layout, reached
    through SDPA on nested jagged tensors with only the cuDNN backend allowed. A candidate that fails records its
    error and is left out of the rows after. Error first: a packed row of 8 documents (16K tokens), output and the
    three gradients, relative to an fp32 SDPA per document on upcast inputs (math backend). Then speed (fwd + bwd),
    the first call on each row's lengths separately (a training step meets new lengths every time)."""
    from torch.nn.attention import sdpa_kernel

    from longctx.fa4 import varlen_kernel

    # Inputs are (1, S, H, D), the projections' layout; the default gets transformers' transposed views
    # (1, H, S, D). All return (1, S, H, D).
    def fa4(q, k, v, cu, max_len):
        return varlen_kernel(q[0], k[0], v[0], cu, cu, max_len, max_len).unsqueeze(0)

    def cudnn_thd(q, k, v, cu, max_len):
        off = cu.long()
        nq, nk, nv = (torch.nested.nested_tensor_from_jagged(t[0], off, max_seqlen=max_len).transpose(1, 2)
                      for t in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = torch.nn.functional.scaled_dot_product_attention(nq, nk, nv, is_causal=True, enable_gqa=True)
        return o.transpose(1, 2).values().unsqueeze(0)

    def default(q, k, v, cu, max_len):
        return attention.sdpa_per_doc_forward(None, *(t.transpose(1, 2) for t in (q, k, v)), None,
                                              cu_seq_lens_q=cu)[0]

    kernels = {"fa4": fa4, "cudnn_thd": cudnn_thd, "default": default}
    out: dict = {"error": {}, "failed": {}}
    lens = [4096, 3000, 2500, 2048, 1900, 1200, 1000, 640]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32).cuda()
    n = sum(lens)
    q = torch.randn(1, n, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, n, K, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    g = torch.randn(1, n, H, D, device="cuda", dtype=torch.bfloat16)

    def grads(fn, dtype):
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o = fn(*x)
        o.backward(g.to(dtype))
        return [o.detach().float()] + [t.grad.float() for t in x]

    def reference(q32, k32, v32):
        outs = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            with torch.nn.attention.sdpa_kernel([SDPBackend.MATH]):
                outs.append(torch.nn.functional.scaled_dot_product_attention(
                    *(t[:, a:b].transpose(1, 2) for t in (q32, k32, v32)), is_causal=True, enable_gqa=True))
        return torch.cat(outs, 2).transpose(1, 2)

    ref = grads(reference, torch.float32)
    for name, fn in list(kernels.items()):
        try:
            got = grads(lambda a, b, c: fn(a, b, c, cu, max(lens)), torch.bfloat16)
        except Exception as e:  # noqa: BLE001  (a candidate this torch or card cannot run)
            out["failed"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            del kernels[name]
            continue
        out["error"][name] = {t: float((x - r).norm() / r.norm()) for t, x, r in zip(("o", "dq", "dk", "dv"), got, ref)}
    print("error", json.dumps(out["error"]), "failed", json.dumps(out["failed"]), flush=True)

    t0 = time.perf_counter()
    rows = {"one_document": [S], "4_documents": [S // 4] * 4}
    rows.update({f"stdlib_{seed}": row_doc_lengths(S, "stdlib", 2000 + seed) for seed in range(steps)})
    for name, lens in rows.items():
        lens[-1] += S - sum(lens)
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32).cuda()
        q = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(1, S, K, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        g = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
        flops = attention_flops(lens)
        row = {"docs": len(lens)}
        for kname, fn in kernels.items():
            def once():
                fn(q, k, v, cu, max(lens)).backward(g)
            torch.cuda.synchronize()
            t = time.perf_counter()
            once()  # the first call on these lengths: what a training step on fresh rows pays
            torch.cuda.synchronize()
            row[kname + "_first_ms"] = round(1e3 * (time.perf_counter() - t), 1)
            sec = timeit(once)
            row[kname + "_ms"], row[kname + "_tflops"] = round(1e3 * sec, 1), round(flops / sec / 1e12, 1)
        out[name] = row
        print(name, json.dumps(row), flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "--fa4":
        import importlib.metadata as md
        with open(sys.argv[1], "w") as f:
            json.dump({**header(), "flash_attn_4": md.version("flash-attn-4"),
                       "fa4": candidates_against_default()}, f, indent=1)
    elif len(sys.argv) > 2 and sys.argv[2] == "--fresh-only":
        with open(sys.argv[1], "w") as f:
            json.dump({**header(), "fresh_lengths": fresh_lengths()}, f, indent=1)
    else:
        main(sys.argv[1])
