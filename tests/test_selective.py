"""Selective checkpointing (--keep-attention, longctx.selective): with the attention outputs kept through the
recompute, a packed batch gets the loss and gradients of a run without any checkpointing (the independent
reference), and the attention kernel runs once per layer and document instead of twice. Checked through the
product's own enable_checkpointing, with checkpoints on the GPU and with the fork's offloader (all layers, and
some), on CPU in fp32. The op count is what fails if the policy stops matching the kernel SDPA dispatches to."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers_train import tiny_config
from longctx import attention, modeling, selective
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


def run(weights, ckpt: SimpleNamespace | None, tiled_mlp: bool = False) -> tuple[float, dict, int]:
    from transformers import AutoModelForCausalLM

    config, state = weights
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                          attn_implementation=attention.register(SDPA_PER_DOC))
    lm.load_state_dict(state)
    lm.train()
    if ckpt is not None:
        modeling.enable_checkpointing(lm, ckpt)
    if tiled_mlp:  # DeepSpeed's TiledMLP (its own recompute) inside the selectively checkpointed layer
        from longctx import sequence_parallel

        sequence_parallel.enable_tiled_mlp(lm, shards=3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, sum(DOCS)), generator=g)
    pos = torch.cat([torch.arange(n) for n in DOCS])[None]
    cu = torch.tensor([0] + DOCS).cumsum(0).to(torch.int32)
    kw = attention.model_kwargs({"cu_seq_lens": cu, "max_length": max(DOCS)}, SDPA_PER_DOC, ids.device)
    with AttentionCalls() as counted:
        logits = lm(input_ids=ids, position_ids=pos, **kw).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        loss.backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    if ckpt is not None and ckpt.checkpointing == "offload":
        assert lm.checkpoint_offloader.stored >= ckpt.num_offloaded_layers  # the fork's offloader held them
    return float(loss.detach()), grads, counted.calls


def settings(checkpointing: str, keep: bool, offloaded: int = 0) -> SimpleNamespace:
    return SimpleNamespace(checkpointing=checkpointing, offload_impl="fork", keep_attention=keep, reentrant=not keep,
                           num_offloaded_layers=offloaded)


@pytest.fixture(scope="module")
def reference(weights):
    return run(weights, None)


@pytest.mark.parametrize("mode", [("plain", 0), ("offload", LAYERS), ("offload", 1)],
                         ids=["on-gpu", "offload-all", "offload-some"])
def test_kept_attention_gives_the_gradients_of_no_checkpointing(weights, reference, mode):
    ref_loss, ref_grads, ref_calls = reference
    assert ref_calls == LAYERS * len(DOCS)  # the counter sees the kernel SDPA dispatches to on this machine
    loss, grads, calls = run(weights, settings(mode[0], True, mode[1]))
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert calls == ref_calls  # forward only: the recompute took the kept outputs


def test_without_keeping_attention_runs_twice(weights, reference):
    """The control: plain non-reentrant checkpointing reruns every attention call in backward."""
    _, _, ref_calls = reference
    loss, _, calls = run(weights, settings("plain", False))
    assert calls == 2 * ref_calls
    assert loss == pytest.approx(reference[0], rel=1e-6)


def test_kept_attention_with_tiled_mlp(weights, reference):
    ref_loss, ref_grads, ref_calls = reference
    loss, grads, calls = run(weights, settings("offload", True, LAYERS), tiled_mlp=True)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert calls == ref_calls
