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
from torch.utils._python_dispatch import TorchDispatchMode

from helpers_train import tiny_config
from longctx import attention, attention_replay, modeling, selective
from longctx.resolve import SDPA_PER_DOC

DOCS = [40, 56, 32]  # one packed row of three documents
LAYERS = 2


class AttentionCalls(TorchDispatchMode):
    """Counts the attention kernels the dispatcher runs (the selective cache answers without dispatching)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += selective.is_attention_op(func)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def weights():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = tiny_config(num_hidden_layers=LAYERS)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    return config, AutoModelForCausalLM.from_config(config, dtype=torch.float32).state_dict()


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
        from longctx import sequence_parallel

        sequence_parallel.enable_tiled_mlp(lm, shards=3)
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
    with AttentionCalls() as counted:
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
    with AttentionCalls() as counted:
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
