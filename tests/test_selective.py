"""Attention kept through the recompute (--keep-attention), both ways: torch's selective checkpointing
(longctx.selective) and the replay of the attention kernels' outputs (longctx.attention_replay, reentrant and not).
A packed batch gets the loss and gradients of a run without any checkpointing (the independent reference), and
the attention kernel runs once per layer and document instead of twice. Checked through the product's own
enable_checkpointing, with checkpoints on the GPU and with the fork's offloader (all layers, and some), on CPU in
fp32. The op count is what fails if the kept outputs stop matching the kernel SDPA dispatches to."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers_train import attention_calls, tiny_lm, tiny_model_config, tiny_model_weights
from longctx import attention, attention_replay, modeling, selective
from longctx.resolve import SDPA_PER_DOC

DOCS = [40, 56, 32]  # one packed row of three documents
LAYERS = 2


@pytest.fixture(scope="module")
def weights():
    return tiny_model_weights(LAYERS)


def build(weights, ckpt: SimpleNamespace | None, tiled_mlp: bool = False):
    from transformers import AutoModelForCausalLM

    config, state = weights
    impl = attention.register(SDPA_PER_DOC)
    if ckpt is not None and ckpt.keep_attention and ckpt.keep_attention_by == "replay":
        impl = attention_replay.register(impl)  # as modeling.build_model does
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=impl)
    lm.load_state_dict(state)
    lm.train()
    if ckpt is not None:
        modeling.enable_checkpointing(lm, ckpt)
    if tiled_mlp:  # DeepSpeed's TiledMLP (its own recompute) inside the selectively checkpointed layer
        from longctx import tiled_mlp

        tiled_mlp.enable(lm, shards=3)
    return lm


def packed_loss(lm) -> torch.Tensor:
    """Next-token CE of one packed row of DOCS (fixed random ids)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, lm.config.vocab_size, (1, sum(DOCS)), generator=g)
    pos = torch.cat([torch.arange(n) for n in DOCS])[None]
    cu = torch.tensor([0] + DOCS).cumsum(0).to(torch.int32)
    kw = attention.model_kwargs({"cu_seq_lens": cu, "max_length": max(DOCS)}, SDPA_PER_DOC, ids.device)
    logits = lm(input_ids=ids, position_ids=pos, **kw).logits.float()
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])


def run(weights, ckpt: SimpleNamespace | None, tiled_mlp: bool = False) -> tuple[float, dict, int]:
    lm = build(weights, ckpt, tiled_mlp)
    with attention_calls() as counted:
        loss = packed_loss(lm)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    if ckpt is not None and ckpt.checkpointing == "offload":
        assert lm.checkpoint_offloader.stored >= ckpt.num_offloaded_layers  # the fork's offloader held them
    return float(loss.detach()), grads, counted.calls


# how attention is kept: (keep_attention_by, reentrant)
WAYS = {"selective": ("selective", False), "replay": ("replay", True), "replay-nonreentrant": ("replay", False)}


def settings(checkpointing: str, keep: bool, offloaded: int = 0, way: str = "selective") -> SimpleNamespace:
    by, reentrant = WAYS[way]
    return SimpleNamespace(checkpointing=checkpointing, offload_impl="fork", keep_attention=keep, keep_attention_by=by,
                           reentrant=reentrant if keep else False, num_offloaded_layers=offloaded)


@pytest.fixture(scope="module")
def reference(weights):
    return run(weights, None)


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("mode", [("plain", 0), ("offload", LAYERS), ("offload", 1)],
                         ids=["on-gpu", "offload-all", "offload-some"])
def test_kept_attention_gives_the_gradients_of_no_checkpointing(weights, reference, mode, way):
    ref_loss, ref_grads, ref_calls = reference
    assert ref_calls == LAYERS * len(DOCS)  # the counter sees the kernel SDPA dispatches to on this machine
    loss, grads, calls = run(weights, settings(mode[0], True, mode[1], way))
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert calls == ref_calls  # forward only: the recompute took the kept outputs


@pytest.mark.parametrize("reentrant", [False, True])
def test_without_keeping_attention_runs_twice(weights, reference, reentrant):
    """The control: plain checkpointing reruns every attention call in backward."""
    _, _, ref_calls = reference
    ck = settings("plain", False)
    ck.reentrant = reentrant
    loss, _, calls = run(weights, ck)
    assert calls == 2 * ref_calls
    assert loss == pytest.approx(reference[0], rel=1e-6)


def test_replay_refuses_a_model_built_without_its_attention(weights):
    """Without attention_replay's attention function nothing would be recorded: refused, not silently slower."""
    lm = build(weights, None)
    with pytest.raises(ValueError, match="attention replay needs"):
        modeling.enable_checkpointing(lm, settings("plain", True, way="replay"))


def test_replay_runs_the_kernel_again_for_a_second_backward(weights, reference):
    """retain_graph: the first backward consumed the recorded outputs, so the second recompute runs the kernels,
    and both backwards give the reference gradients."""
    lm = build(weights, settings("plain", True, way="replay-nonreentrant"))
    with attention_calls() as counted:
        loss = packed_loss(lm)
        loss.backward(retain_graph=True)
        once = counted.calls
        loss.backward()
    assert once == reference[2] and counted.calls == 2 * reference[2]
    for name, p in lm.named_parameters():
        torch.testing.assert_close(p.grad, 2 * reference[1][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("way", list(WAYS))
def test_kept_attention_with_tiled_mlp(weights, reference, way):
    ref_loss, ref_grads, ref_calls = reference
    loss, grads, calls = run(weights, settings("offload", True, LAYERS, way), tiled_mlp=True)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert calls == ref_calls


# ---- the replay under reentrant checkpointing, where the forward runs under no_grad -------------------------------
# SDPA asks cuDNN and memory-efficient attention for a logsumexp only when grad mode is on and an input requires
# grad, so the no_grad forward of reentrant checkpointing calls the kernel without it and the recompute with it.
# No CPU kernel has that argument; this op is a plain causal attention with the same contract (and a backward that
# needs the logsumexp), called the way SDPA's composite calls its kernels.

@torch.library.custom_op("longctx_test::attn", mutates_args=())
def _attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, compute_log_sumexp: bool) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    lse = s.logsumexp(-1)
    return torch.exp(s - lse[..., None]) @ v, (lse if compute_log_sumexp else lse.new_empty(0))


@_attn.register_fake
def _(q, k, v, compute_log_sumexp):
    return torch.empty_like(q), q.new_empty(q.shape[:-1] if compute_log_sumexp else (0,))


def _attn_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], output[1])


def _attn_backward(ctx, grad_out, _grad_lse):
    q, k, v, lse = ctx.saved_tensors  # an empty lse (asked for none) breaks this, as it breaks cuDNN's backward
    scale = q.shape[-1] ** -0.5
    s = (q @ k.transpose(-1, -2)) * scale
    p = torch.exp(s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf")) - lse[..., None])
    dp = grad_out @ v.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    return ds @ k * scale, ds.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ grad_out, None


_attn.register_autograd(_attn_backward, setup_context=_attn_setup)


def _composite_attention(module, q, k, v, attention_mask, **kwargs):
    """What SDPA's composite does: the logsumexp only if backward can need it."""
    need = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return torch.ops.longctx_test.attn(q, k, v, need)[0], None


def test_replay_under_reentrant_checkpointing_keeps_what_backward_needs(monkeypatch):
    from functools import partial

    from torch.utils.checkpoint import checkpoint
    from transformers import AttentionInterface

    monkeypatch.setattr(selective, "ATTENTION_OPS", selective.ATTENTION_OPS | {"longctx_test.attn"})
    AttentionInterface.register("longctx_test_composite", _composite_attention)
    kept = AttentionInterface._global_mapping[attention_replay.register("longctx_test_composite")]
    torch.manual_seed(0)
    x = torch.randn(2, 24, 16, requires_grad=True)
    w = [torch.randn(16, 16, requires_grad=True) for _ in range(4)]

    def layer(h):
        q, k, v = (h @ wi for wi in w[:3])
        return h + kept(None, q, k, v, None)[0] @ w[3]

    def grads(out):
        out.square().mean().backward()
        g = [t.grad.clone() for t in (x, *w)]
        for t in (x, *w):
            t.grad = None
        return g

    ref = grads(layer(layer(x)))  # no checkpointing
    step = attention_replay.wrap_checkpoint(partial(checkpoint, use_reentrant=True))
    with attention_calls() as counted:
        got = grads(step(layer, step(layer, x)))
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert counted.calls == 2  # each layer's kernel ran once: the recompute took the recorded outputs


def test_replay_runs_the_kernel_again_when_the_call_differs():
    """A recompute whose call is not the recorded one (other arguments or shapes) gets the kernel, not the record."""
    q = torch.randn(1, 2, 8, 4)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    key = attention_replay.call_key(op, (q, q, q, 0.0, True), {})
    assert key == attention_replay.call_key(op, (q.clone(), q, q, 0.0, True), {})
    assert key != attention_replay.call_key(op, (q, q, q, 0.0, False), {})
    assert key != attention_replay.call_key(op, (q[..., :6, :], q, q, 0.0, True), {})
    eff = torch.ops.aten._scaled_dot_product_efficient_attention.default
    args, _ = attention_replay.with_log_sumexp(eff, (q, q, q, None, False), {})
    assert args[4] is True and attention_replay.with_log_sumexp(op, (q, q, q), {})[0] == (q, q, q)


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["sdpa_per_document", "varlen"])
def test_replay_on_gpu_gives_the_gradients_of_no_checkpointing(route, monkeypatch):
    """On a GPU, in bf16, SDPA dispatches to cuDNN (or flash / memory-efficient) and varlen_attn to flash: the
    replay, reentrant as the product runs it, gives the gradients of the same model without checkpointing, one
    kernel call per layer and document (SDPA per document, the documents' lengths let through to it here) or per
    layer (varlen_attn, where these short documents go by default)."""
    from transformers import AutoModelForCausalLM

    if route == "sdpa_per_document":
        monkeypatch.setattr(attention, "PER_DOC_MIN_TOKENS", 128)
        monkeypatch.setattr(attention, "PLAN_CACHED_MULTIPLE", 128)

    shape = dict(num_hidden_layers=LAYERS, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=2)
    config = tiny_model_config(**shape)
    state = tiny_lm(dtype=torch.bfloat16, **shape).state_dict()

    def grads_of(ckpt):
        impl = attention.register(SDPA_PER_DOC)
        if ckpt is not None:
            impl = attention_replay.register(impl)
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=impl).cuda()
        lm.load_state_dict(state)
        lm.train()
        if ckpt is not None:
            modeling.enable_checkpointing(lm, ckpt)
        g = torch.Generator().manual_seed(1)
        docs = [128, 256, 128]
        ids = torch.randint(0, lm.config.vocab_size, (1, sum(docs)), generator=g).cuda()
        pos = torch.cat([torch.arange(n) for n in docs])[None].cuda()
        cu = torch.tensor([0] + docs).cumsum(0).to(torch.int32).cuda()
        kw = attention.model_kwargs({"cu_seq_lens": cu, "max_length": max(docs)}, SDPA_PER_DOC, ids.device)
        with attention_calls() as counted:
            logits = lm(input_ids=ids, position_ids=pos, **kw).logits.float()
            torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
        return {n: p.grad.float() for n, p in lm.named_parameters()}, counted.calls

    ref, ref_calls = grads_of(None)
    got, calls = grads_of(settings("plain", True, way="replay"))
    assert calls == ref_calls == LAYERS * (3 if route == "sdpa_per_document" else 1)
    for name, g in ref.items():  # the same kernels on the same inputs: equal up to bf16 accumulation order
        torch.testing.assert_close(got[name], g, rtol=2e-2, atol=2e-3, msg=name)
