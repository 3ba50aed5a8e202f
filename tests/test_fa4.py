"""flash-attention-4 as torch custom ops (longctx.fa4), and how longctx.resolve offers it.

The package needs an sm90+ GPU, so on CPU its two kernel entry points are replaced by a plain attention
implementation written here (forward with log-sum-exp; the textbook backward from the saved log-sum-exp). What is
checked is everything of ours around them: the layout the transformers attention function hands over, the
documents of a packed row kept apart, GQA, the scale, the autograd registration, and that selective
checkpointing and the replay keep the op's outputs (one call per layer instead of two) with the gradients of no
checkpointing. The kernels themselves are checked against an fp32 reference on a GPU by
`python -m bench.attention_kernels OUT --fa4` (docs/RESULTS.md)."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

from helpers_fa4 import FAKE, fake_modules
from helpers_train import attention_calls, tiny_lm
from longctx import attention, modeling
from longctx.errors import LongctxError
from longctx.resolve import FA4, SDPA_PER_DOC, Facts, resolve_attention

DOCS = [40, 56, 32]
LAYERS = 2


@pytest.fixture
def fake_kernels(monkeypatch):
    for name, module in fake_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    FAKE.forwards = 0


@pytest.mark.usefixtures("fake_kernels")
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_fa4_attention_equals_sdpa_per_document(scaling):
    """transformers' (B, H, S, D) views in, (B, S, H, D) out; packed documents kept apart; GQA; the scale."""
    H, K, D, S = 4, 2, 16, sum(DOCS)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, S, h, D, generator=g, dtype=torch.float64) for h in (H, K, K)]
    cu = torch.tensor([0] + DOCS).cumsum(0).to(torch.int32)

    def run(fn, impl):
        leaves = [t.clone().requires_grad_() for t in base]
        kw = attention.model_kwargs({"cu_seq_lens": cu, "max_length": max(DOCS)}, impl, torch.device("cpu"))
        out, _ = fn(None, *(t.transpose(1, 2) for t in leaves), None, scaling=scaling, **kw)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin())
        return [out.detach()] + [t.grad for t in leaves]

    got = run(attention.fa4_attention_forward, FA4)
    ref = run(attention.sdpa_per_doc_forward, SDPA_PER_DOC)
    assert FAKE.forwards == 1  # the whole packed row in one kernel call
    for name, x, r in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(x, r, rtol=1e-9, atol=1e-10, msg=name)


def model_run(keep_by: str | None):
    """Loss, gradients and attention-op calls of a tiny GQA model on one packed row, built with FA4; keep_by:
    how attention is kept through plain checkpointing (None: no checkpointing)."""
    from longctx import attention_replay

    impl = attention.register(FA4)
    if keep_by == "replay":
        impl = attention_replay.register(impl)
    lm = tiny_lm(attn_implementation=impl, num_hidden_layers=LAYERS)
    lm.train()
    if keep_by is not None:
        modeling.enable_checkpointing(lm, types.SimpleNamespace(
            checkpointing="plain", offload_impl="fork", keep_attention=keep_by != "none",
            keep_attention_by="replay" if keep_by == "replay" else "selective", reentrant=keep_by in ("replay", "none"),
            num_offloaded_layers=0))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, lm.config.vocab_size, (1, sum(DOCS)), generator=g)
    pos = torch.cat([torch.arange(n) for n in DOCS])[None]
    cu = torch.tensor([0] + DOCS).cumsum(0).to(torch.int32)
    kw = attention.model_kwargs({"cu_seq_lens": cu, "max_length": max(DOCS)}, FA4, ids.device)
    with attention_calls() as counted:
        logits = lm(input_ids=ids, position_ids=pos, **kw).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in lm.named_parameters()}, counted.calls


@pytest.mark.usefixtures("fake_kernels")
@pytest.mark.parametrize("keep_by", ["selective", "replay"])
def test_kept_fa4_attention_gives_the_gradients_of_no_checkpointing(keep_by):
    ref_loss, ref_grads, ref_calls = model_run(None)
    assert ref_calls == LAYERS  # the dispatcher sees the op: one call per layer for the packed row
    loss, grads, calls = model_run(keep_by)
    assert calls == ref_calls  # kept: backward did not rerun it
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    _, _, plain = model_run("none")
    assert plain == 2 * ref_calls  # the control: plain checkpointing reruns it


@pytest.mark.gpu
def test_fa4_op_on_gpu_equals_the_package_autograd_function():
    """The custom ops call the kernels the package's own autograd Function calls: same output and gradients on a
    packed bf16 row with GQA (up to the order of the backward's atomic adds)."""
    from longctx import fa4

    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0) and fa4.installed_version()):
        pytest.skip("needs flash-attn-4 on a CUDA GPU of sm90+")
    from flash_attn.cute import flash_attn_varlen_func

    lens = [1024, 3000, 517, 2048]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(sum(lens), h, 128, generator=g, device="cuda", dtype=torch.bfloat16) for h in (32, 8, 8)]
    dout = torch.randn(sum(lens), 32, 128, generator=g, device="cuda", dtype=torch.bfloat16)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in base]
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(dout)
        return [out.detach()] + [t.grad for t in leaves]

    ours = run(lambda q, k, v: fa4.varlen_kernel(q, k, v, cu, cu, max(lens), max(lens)))
    theirs = run(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                        max_seqlen_q=max(lens), max_seqlen_k=max(lens), causal=True))
    for name, x, r in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert float((x.float() - r.float()).norm() / r.float().norm()) < 5e-3, name


H100 = Facts("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30, 1, 128 * 2**30, varlen_attn=True, liger=True,
             fork=True, fa4="4.0.0b36")


def choose(facts: Facts, requested: str = "auto", precision: str = "bf16", head_dim: int = 128):
    return resolve_attention(requested, facts, precision=precision, packing=True, max_seq_len=131072,
                             dense_mask_max_len=8192, head_dim=head_dim)


def test_auto_takes_fa4_where_the_measured_version_runs():
    """auto is fa4 on sm90 in half precision with the version measured installed; another version is named in the
    note and left to --attn-implementation fa4; without flash-attn-4 on such a GPU the note says how to get it;
    elsewhere auto is sdpa_per_doc and says nothing of fa4."""
    named = choose(H100, "fa4")
    assert (named.name, named.impl, named.varlen_kwargs) == ("fa4", FA4, True) and "measured with" not in named.note
    assert "measured with 4.0.0b36, not this version" in choose(dataclasses.replace(H100, fa4="4.1.0"), "fa4").note
    auto = choose(H100)
    assert (auto.name, auto.impl) == ("fa4", FA4) and "auto: its step beat sdpa_per_doc's" in auto.note
    assert choose(H100, precision="fp16").name == "fa4"
    other = choose(dataclasses.replace(H100, fa4="4.1.0"))
    assert other.name == "sdpa_per_doc" and "flash-attn-4 4.1.0 is installed, but auto takes only" in other.note
    missing = choose(dataclasses.replace(H100, fa4=None))
    assert missing.name == "sdpa_per_doc" and "pip install 'flash-attn-4[cu13]" in missing.note
    a100 = dataclasses.replace(H100, name="A100", capability=(8, 0))
    for facts, precision in ((a100, "bf16"), (H100, "fp32"), (Facts(fa4="4.0.0b36"), "fp32")):
        auto = choose(facts, precision=precision)
        assert auto.name == "sdpa_per_doc" and "fa4" not in auto.note


@pytest.mark.parametrize("capability", [(10, 0), (10, 3), (12, 0)])
def test_auto_keeps_the_measured_default_off_sm90_and_says_why(capability):
    """Every fa4 measurement is from an H100: on sm100+, where it also runs, auto stays sdpa_per_doc (no install hint
    either); the name still takes it."""
    gpu = dataclasses.replace(H100, name="B200", capability=capability)
    auto = choose(gpu)
    assert auto.name == "sdpa_per_doc"
    assert (f"not fa4: flash-attention-4 was measured on sm90 only (this GPU is sm{capability[0]}{capability[1]}); "
            "--attn-implementation fa4 takes it anyway") in auto.note
    assert (choose(gpu, "fa4").name, choose(gpu, "fa4").impl) == ("fa4", FA4)
    assert "pip install" not in choose(dataclasses.replace(gpu, fa4=None)).note


def test_head_sizes_flash_attention_4_lacks_keep_auto_on_sdpa_and_refuse_the_name():
    """Its sizes (4.0.0b36): multiples of 8 up to 256 on sm90; up to 128, or 256, on sm100+."""
    b200 = dataclasses.replace(H100, name="B200", capability=(10, 0))
    for d in (32, 64, 256):
        assert choose(H100, head_dim=d).name == "fa4", d
    for d in (128, 256):  # named: auto does not take it off sm90 (test above)
        assert choose(b200, "fa4", head_dim=d).name == "fa4", d
    for facts, d in ((H100, 100), (H100, 4), (H100, 512), (b200, 192)):
        auto = choose(facts, head_dim=d)
        assert auto.name == "sdpa_per_doc" and f"not fa4: head_dim {d}" in auto.note, (facts.name, d)
        with pytest.raises(LongctxError, match=f"head_dim {d} is not among"):
            choose(facts, "fa4", head_dim=d)


def test_fa4_asked_for_where_it_cannot_run_is_refused():
    with pytest.raises(LongctxError, match="flash-attn-4 is not installed"):
        choose(dataclasses.replace(H100, fa4=None), "fa4")
    with pytest.raises(LongctxError, match="sm90"):
        choose(dataclasses.replace(H100, capability=(8, 0)), "fa4")
    with pytest.raises(LongctxError, match="sm90"):
        choose(Facts(fa4="4.0.0b36"), "fa4", precision="fp32")
