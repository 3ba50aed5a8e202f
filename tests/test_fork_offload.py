"""The fork's offloaded gradient checkpointing: gradient parity, that it really offloads, and that eval is untouched.

The reference is the same tiny model run without any checkpointing, in fp32. The fork installs its offloader for
`activation_checkpointing_enable(offload=True)` on every model, so besides the four families the study names, Gemma and
Phi-3 (never patched by name) are checked too.
"""

import logging

import pytest
import torch
from transformers import modeling_utils
from transformers import offloaded_checkpointing as offloading

from helpers_fork_tools import FAMILIES as TOOL_FAMILIES, MORE_FAMILIES, TINY, tiny_model

FAMILIES = {**TOOL_FAMILIES, **MORE_FAMILIES}
MODES = {
    "none": lambda m: None,
    "plain_reentrant": lambda m: m.activation_checkpointing_enable({"use_reentrant": True}),
    "plain_nonreentrant": lambda m: m.activation_checkpointing_enable({"use_reentrant": False}),
    "offload_default": lambda m: m.offload_gradient_checkpointing_enable(),
    "offload_reentrant": lambda m: m.offload_gradient_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": True}),
    "offload_nonreentrant": lambda m: m.offload_gradient_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}),
    "offload_first_two": lambda m: m.offload_gradient_checkpointing_enable(num_offloaded_layers=2),
    # what HF Trainer and TRL call for activation_checkpointing_kwargs={"offload": True, ...}
    "offload_true": lambda m: m.activation_checkpointing_enable(offload=True),
    "offload_true_reentrant": lambda m: m.activation_checkpointing_enable({"use_reentrant": True}, offload=True),
    "offload_true_first_two": lambda m: m.activation_checkpointing_enable(
        {"use_reentrant": False, "num_offloaded_layers": 2}, offload=True),
    "offload_true_every_second": lambda m: m.activation_checkpointing_enable(offload=True, every_n_layers=2),
    "upstream_offload": lambda m: m.activation_checkpointing_enable(offload="save_on_cpu"),
}


def train_step(model, mode: str, input_ids, seed: int = 1, autocast_dtype=None):
    model.activation_checkpointing_disable()
    MODES[mode](model)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks in every mode, if the recompute replays the RNG
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def assert_same(a, b, rtol=1e-5, atol=1e-7):
    loss_a, grads_a = a
    loss_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seq_len", [16, 17])
def test_gradient_parity_fp32(family, seq_len):
    model = tiny_model(family)
    input_ids = torch.randint(0, TINY["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(seq_len))
    reference = train_step(model, "none", input_ids)
    for mode in MODES:
        if mode != "none":
            assert_same(train_step(model, mode, input_ids), reference)


def test_parity_with_dropout_replays_rng():
    # Dropout draws random masks; the recompute must draw the same ones, or the gradients differ.
    model = tiny_model("llama", attention_dropout=0.3)
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(0))
    reference = train_step(model, "none", input_ids)
    assert_same(train_step(model, "offload_reentrant", input_ids), reference)
    assert_same(train_step(model, "offload_nonreentrant", input_ids), reference)
    # and the check can fail: a different seed gives different masks, hence different gradients
    with pytest.raises(AssertionError):
        assert_same(train_step(model, "offload_reentrant", input_ids, seed=2), reference)


def test_parity_under_bf16_autocast():
    # Autocast must be replayed in the recompute: compare with plain checkpointing, which replays it too,
    # and with no checkpointing at all.
    model = tiny_model("llama")
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    reference = train_step(model, "none", input_ids, autocast_dtype=torch.bfloat16)
    assert_same(train_step(model, "offload_reentrant", input_ids, autocast_dtype=torch.bfloat16), reference)
    assert_same(train_step(model, "plain_reentrant", input_ids, autocast_dtype=torch.bfloat16), reference)


@pytest.mark.parametrize("mode,expected", [("offload_default", 3), ("offload_reentrant", 3), ("offload_nonreentrant", 3),
                                           ("offload_first_two", 2), ("offload_true", 3), ("offload_true_reentrant", 3),
                                           ("offload_true_first_two", 2), ("offload_true_every_second", 2),
                                           ("plain_reentrant", 0), ("upstream_offload", 0)])
def test_checkpoints_really_go_through_the_offloader(monkeypatch, mode, expected):
    stored = []
    original = modeling_utils.CheckpointOffloader.store

    def spy(self, tensor):
        if tensor.numel():  # non-reentrant checkpointing also saves an empty placeholder
            stored.append(tuple(tensor.shape))
        return original(self, tensor)

    monkeypatch.setattr(modeling_utils.CheckpointOffloader, "store", spy)
    model = tiny_model("llama")
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    train_step(model, mode, input_ids)
    assert stored == [(2, 9, TINY["hidden_size"])] * expected
    assert model.offloaded_checkpointing_layers == expected
    # the offloader's own count, which tools can read without patching anything
    offloader = model.checkpoint_offloader
    assert (offloader is None) if mode in ("plain_reentrant", "upstream_offload") else offloader.stored == expected
    if offloader is not None:
        assert offloader.stored_bytes == expected * 2 * 9 * TINY["hidden_size"] * 4


def test_offload_knob_is_validated():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="between 0 and 3"):
        model.offload_gradient_checkpointing_enable(num_offloaded_layers=4)
    with pytest.raises(ValueError, match="between 0 and 2"):  # only the checkpointed layers count
        model.activation_checkpointing_enable(offload=True, every_n_layers=2, num_offloaded_layers=3)
    with pytest.raises(ValueError, match="needs `offload=True`"):
        model.activation_checkpointing_enable({"use_reentrant": False, "num_offloaded_layers": 2})
    with pytest.raises(ValueError, match="needs `offload=True`"):
        model.activation_checkpointing_enable(offload="save_on_cpu", num_offloaded_layers=2)
    with pytest.raises(ValueError, match="'fork' or 'save_on_cpu'"):
        model.activation_checkpointing_enable(offload="disk")


@pytest.mark.parametrize("family", FAMILIES)
def test_entry_point_on_base_and_causal_lm_models(family):
    model = tiny_model(family)
    for m in (model, model.model):
        m.offload_gradient_checkpointing_enable()
        assert m.offloaded_checkpointing_layers == 3
        m.activation_checkpointing_disable()
        assert m.offloaded_checkpointing_layers == 0
        m.activation_checkpointing_enable(offload=True)
        assert m.offloaded_checkpointing_layers == 3
        m.activation_checkpointing_enable(offload="save_on_cpu")
        assert m.offloaded_checkpointing_layers == 0 and m.checkpoint_offloader is None


def test_eval_and_generation_unchanged(monkeypatch):
    plain = tiny_model("llama")
    patched = tiny_model("llama")
    patched.offload_gradient_checkpointing_enable()
    calls = []
    monkeypatch.setattr(modeling_utils.CheckpointOffloader, "store", lambda self, t: calls.append(t))
    plain.eval()
    patched.eval()
    input_ids = torch.randint(0, TINY["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids).logits, plain(input_ids).logits, rtol=0, atol=0)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(input_ids, **kwargs), plain.generate(input_ids, **kwargs))
    assert calls == []


def test_pinned_memory_fallback_warns_once():
    if torch.cuda.is_available():
        pytest.skip("pinned memory is available here; the fallback is for machines without it")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    offloading.logger.addHandler(handler)
    offloading.logger.warning_once.cache_clear()
    try:
        a = offloading._empty_host_like(torch.ones(4, 3), pin_memory=True)
        b = offloading._empty_host_like(torch.ones(2), pin_memory=True)
    finally:
        offloading.logger.removeHandler(handler)
    assert a.shape == (4, 3) and b.shape == (2,) and not a.is_pinned()
    assert sum("falling back to pageable memory" in r.getMessage() for r in records) == 1


def test_in_place_change_of_a_checkpoint_is_detected():
    offloader = modeling_utils.CheckpointOffloader()
    x = torch.ones(3)
    checkpoint = offloader.store(x)
    x.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        checkpoint.fetch()


# ---------------------------------------------------------------------------------------------------------------------
# GPU: the side-stream copies, pinned buffers and prefetch give the same gradients as no checkpointing.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["offload_reentrant", "offload_nonreentrant", "offload_first_two"])
def test_gpu_parity_fp32(mode):
    model = tiny_model("llama", num_hidden_layers=4, hidden_size=256, intermediate_size=512).cuda()
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 257), device="cuda")
    reference = train_step(model, "none", input_ids)
    assert_same(train_step(model, mode, input_ids), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_checkpoints_are_pinned_host_copies(monkeypatch):
    stored = []
    original = modeling_utils.CheckpointOffloader.store
    monkeypatch.setattr(modeling_utils.CheckpointOffloader, "store",
                        lambda self, t: stored.append(original(self, t)) or stored[-1])
    model = tiny_model("llama").cuda()
    model.offload_gradient_checkpointing_enable()
    model.train()
    loss = model(input_ids=torch.randint(0, 101, (1, 64), device="cuda"), labels=None).logits.float().mean()
    assert len(stored) == 3 and all(c.host.device.type == "cpu" and c.host.is_pinned() for c in stored)
    loss.backward()
    assert all(c.host is None for c in stored)  # released once used


@pytest.mark.gpu
def test_gpu_parity_bf16_autocast():
    model = tiny_model("llama", hidden_size=256, intermediate_size=512).cuda()
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 129), device="cuda")

    def step(mode):
        model.activation_checkpointing_disable()
        MODES[mode](model)
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    assert_same(step("offload_reentrant"), step("plain_reentrant"), rtol=1e-5, atol=1e-6)


