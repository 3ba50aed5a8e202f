"""S²-Attn (longctx/s2attn.py) against a straightforward reference written here, loop by loop."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from longctx import s2attn


def reference_s2(q, k, v, group: int, scale: float) -> torch.Tensor:
    """(B, H, S, D) q, (B, Hkv, S, D) k/v -> (B, S, H, D), by explicit token indices.

    Pad with zero vectors to a multiple of the group; for heads in the second half, the token order
    is i -> (i + group/2) mod S'; each run of `group` positions of that order is a group, attended
    causally in that order. A row of one group is plain causal attention.
    """
    B, H, S, D = q.shape
    rep = H // k.shape[1]
    Sp = math.ceil(S / group) * group
    pad = lambda t: torch.cat([t, t.new_zeros(Sp - S, D)])  # noqa: E731
    out = torch.zeros(B, Sp, H, D, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            qh, kh, vh = pad(q[b, h]), pad(k[b, h // rep]), pad(v[b, h // rep])
            shift = group // 2 if (h >= H // 2 and Sp > group) else 0
            order = [(i + shift) % Sp for i in range(Sp)]
            for g0 in range(0, Sp, group):
                idx = torch.tensor(order[g0:g0 + group])
                scores = qh[idx] @ kh[idx].T * scale
                scores = scores.masked_fill(torch.ones(group, group).triu(1).bool(), float("-inf"))
                out[b, idx, h] = torch.softmax(scores, -1) @ vh[idx]
    return out[:, :S]


def full_causal(q, k, v, scale):
    rep = q.shape[1] // k.shape[1]
    o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True,
                                       scale=scale)
    return o.transpose(1, 2)


def module(hq: int, hkv: int, training: bool = True):
    return SimpleNamespace(training=training, is_causal=True, num_key_value_groups=hq // hkv)


def rand_qkv(B, Hq, Hkv, S, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64),
            torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64),
            torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64))


def sdpa_base():
    from transformers import AttentionInterface

    return AttentionInterface._global_mapping["sdpa"]


def reference_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, scale=None):
    """torch 2.10's varlen_attn signature, one segment at a time (k/v heads already repeated)."""
    out = torch.empty_like(q)
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        out[s:e] = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                                  v[s:e].transpose(0, 1), is_causal=is_causal,
                                                  scale=scale).transpose(0, 1)
    return out


@pytest.mark.parametrize("B,Hq,Hkv,S,G", [
    (2, 4, 2, 32, 8),    # GQA, 4 groups
    (1, 4, 4, 24, 8),    # MHA
    (2, 4, 2, 27, 8),    # not a multiple of the group: padded
    (1, 8, 1, 20, 4),    # MQA (odd KV heads: repeated first)
    (1, 4, 2, 12, 16),   # one group: no shift
])
def test_matches_reference(B, Hq, Hkv, S, G):
    q, k, v = rand_qkv(B, Hq, Hkv, S)
    scale = 8 ** -0.5
    out, _ = s2attn.s2_attention(sdpa_base(), G, module(Hq, Hkv), q, k, v, None, scaling=scale)
    assert out.shape == (B, S, Hq, 8)
    torch.testing.assert_close(out, reference_s2(q, k, v, G, scale), atol=1e-10, rtol=1e-10)


def test_shifted_heads_cross_groups_and_differ_from_full():
    q, k, v = rand_qkv(1, 4, 2, 32)
    out, _ = s2attn.s2_attention(sdpa_base(), 8, module(4, 2), q, k, v, None, scaling=0.3)
    full = full_causal(q, k, v, 0.3)
    # the first group is causal attention in both; later tokens see only their group
    torch.testing.assert_close(out[:, :8, :2], full[:, :8, :2])
    assert not torch.allclose(out[:, 8:], full[:, 8:])


def test_group_equal_to_sequence_is_full_causal_attention():
    q, k, v = rand_qkv(2, 4, 2, 32)
    out, _ = s2attn.s2_attention(sdpa_base(), 32, module(4, 2), q, k, v, None, scaling=0.25)
    torch.testing.assert_close(out, full_causal(q, k, v, 0.25), atol=1e-10, rtol=1e-10)


def test_eval_mode_is_full_attention():
    q, k, v = rand_qkv(1, 4, 2, 32)
    out, _ = s2attn.s2_attention(sdpa_base(), 8, module(4, 2, training=False), q, k, v, None, scaling=0.25)
    torch.testing.assert_close(out, full_causal(q, k, v, 0.25), atol=1e-10, rtol=1e-10)


def test_on_the_varlen_base_with_a_reference_kernel():
    from longctx import attention

    attention.register_varlen(reference_varlen_kernel)
    base = attention.varlen_attention_forward
    q, k, v = rand_qkv(2, 4, 2, 27)
    pos = torch.arange(27).expand(2, 27)  # the row's metadata must not leak into the grouped call
    out, _ = s2attn.s2_attention(base, 8, module(4, 2), q, k, v, None, scaling=0.3, position_ids=pos)
    torch.testing.assert_close(out, reference_s2(q, k, v, 8, 0.3), atol=1e-10, rtol=1e-10)


def test_gradients_flow_through_the_layout_change():
    q, k, v = (t.requires_grad_() for t in rand_qkv(1, 4, 2, 16))
    out, _ = s2attn.s2_attention(sdpa_base(), 8, module(4, 2), q, k, v, None, scaling=0.3)
    ref = reference_s2(q, k, v, 8, 0.3)
    w = torch.randn_like(ref)
    g = torch.autograd.grad((out * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_in_a_model_train_vs_eval():
    """Registered through AttentionInterface: eval is the sdpa model, so is training with one group; groups differ."""
    from transformers import AutoModelForCausalLM

    from helpers_train import tiny_lm, tiny_model_config

    ref = tiny_lm(attn_implementation="sdpa").eval()
    ids = torch.randint(3, 2000, (2, 48))
    with torch.no_grad():
        want = ref(input_ids=ids).logits

        def logits(group, training):
            name = s2attn.register("sdpa", group)
            m = AutoModelForCausalLM.from_config(tiny_model_config(), attn_implementation=name)
            m.load_state_dict(ref.state_dict())
            return m.train(training)(input_ids=ids).logits

        torch.testing.assert_close(logits(12, False), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits(48, True), want, atol=1e-5, rtol=1e-5)
        grouped = logits(12, True)
    assert not torch.allclose(grouped, want, atol=1e-3)


def cfg_ns(**kw):
    base = dict(s2_attn=0, max_seq_len=1024, packing=False, attn_implementation="auto")
    base.update(kw)
    return SimpleNamespace(**base)


def test_group_size_and_config_checks():
    from longctx.resolve import resolve_s2_group

    assert resolve_s2_group(None, 1024)[0] is None
    assert resolve_s2_group(0, 1024)[0] == 256
    assert resolve_s2_group(0, 1030)[0] == 256
    assert resolve_s2_group(0, 8)[0] == 2
    assert resolve_s2_group(100, 1024)[0] == 100
    assert s2attn.config_problems(cfg_ns()) == []
    assert s2attn.config_problems(cfg_ns(s2_attn=None, packing=True)) == []
    assert any("Add --no-packing" in p for p in s2attn.config_problems(cfg_ns(packing=True)))
    assert any("even number" in p for p in s2attn.config_problems(cfg_ns(s2_attn=7)))
    assert any("larger than --max-seq-len" in p for p in s2attn.config_problems(cfg_ns(s2_attn=2048)))
    assert any("not eager" in p for p in s2attn.config_problems(cfg_ns(attn_implementation="eager")))
    assert any("--sequence-parallel" in p for p in s2attn.config_problems(cfg_ns(sequence_parallel=2)))
    for name in ("eager", "flex_attention", "no_such_kernel"):
        with pytest.raises(ValueError, match="S²-Attn runs on"):
            s2attn.register(name, 8)
