"""Memory planner: component formulas against hand-computed numbers, the search, the advice, the printout."""

from __future__ import annotations

from dataclasses import replace

import pytest

from longctx.flops import ModelShape
from longctx.plan import (GiB, Hardware, Setup, attention_workspace, format_plan, loss_items, max_seq_len_that_fits,
                          model_state_items, next_knobs, parse_size, plan, total_params, working_set_units)

LLAMA8B = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256)


def test_param_count_is_llama_3_1_8b():
    # Meta's published count for Llama-3.1-8B (untied embeddings)
    assert total_params(LLAMA8B) == 8_030_261_248
    assert total_params(LLAMA8B, lm_head=False) == 8_030_261_248 - 128256 * 4096


def test_working_set_units_by_hand():
    # transformers ops, bf16: norms 2 x (2 fp32 copy + 1 + 1) = 8; attention 3 x 1 (q) + 2 x 0.25 (k, v) = 3.5;
    # MLP 6 x 3.5 = 21 (gate, up, act saved; 3 gradients); gradient of the layer output 1  -> 33.5
    assert working_set_units(LLAMA8B, 2, liger=False) == pytest.approx(33.5)
    # Liger: norms 4; attention 3.5; gate, up, product 10.5 + product gradient 3.5; output gradient 1 -> 22.5
    assert working_set_units(LLAMA8B, 2, liger=True) == pytest.approx(22.5)
    # tiled MLP, 4 shards: r = 0.875 -> 8 + 3.5 + 5.25 + 1
    assert working_set_units(LLAMA8B, 2, liger=False, mlp_shards=4) == pytest.approx(17.75)
    # many shards (96 at 384K): TiledMLP's full-length tensors are the floor, higher when the recompute is reentrant
    assert working_set_units(LLAMA8B, 2, liger=True, mlp_shards=96) == pytest.approx(4 + 3.5 + 1.5 + 1)
    assert working_set_units(LLAMA8B, 2, liger=True, mlp_shards=96, reentrant=True) == pytest.approx(4 + 3.5 + 4.5 + 1)
    assert working_set_units(LLAMA8B, 2, liger=True, reentrant=True) == pytest.approx(22.5)  # untiled: no floor
    # fp32 activations: the RMSNorm upcast is not a copy of a different size: 2 x (1 + 2) = 6
    assert working_set_units(LLAMA8B, 4, liger=False) == pytest.approx(31.5)


def test_working_set_bytes_at_128k():
    s = Setup(LLAMA8B, 131072, zero_stage=0, offload_params=False, offload_optimizer=False, optimizer="none",
              checkpointing="offload", offload_impl="upstream", reentrant=False, loss="none", lm_head=False)
    layer = {i.name: i.bytes for i in plan(s).phases["layer backward"]}
    # one hidden-state tensor at 128K in bf16 is exactly 1 GiB
    assert layer["per-layer working set"] == 33.5 * GiB
    assert layer["checkpoints on GPU"] == 0


def test_checkpoints_on_gpu_and_in_host_ram():
    base = Setup(LLAMA8B, 32768, world=8, checkpointing="plain", reentrant=False)
    U = 32768 * 4096 * 2  # 0.25 GiB
    assert {i.name: i.bytes for i in plan(base).phases["layer backward"]}["checkpoints on GPU"] == 32 * U
    off = plan(replace(base, checkpointing="offload", num_offloaded_layers=24))
    assert {i.name: i.bytes for i in off.phases["layer backward"]}["checkpoints on GPU"] == (8 + 1) * U  # + prefetch
    host = {i.name: i.bytes for i in off.host}
    assert host["offloaded checkpoints"] == 24 * U == 6 * GiB  # 256 MiB blocks: already powers of two
    odd = plan(replace(base, seq_len=3 * 8192, checkpointing="offload"))  # 192 MiB per layer -> 256 MiB blocks
    assert {i.name: i.bytes for i in odd.host}["offloaded checkpoints"] == 32 * 256 * 2 ** 20


def test_loss_components_by_hand():
    T, V, h = 16384, 128256, 4096
    full = {i.name: i.bytes for i in loss_items(Setup(LLAMA8B, T, loss="full"))}
    assert full["logits (full, fp32 log-softmax + grads)"] == 16384 * 128256 * 12  # 23.49 GiB
    chunked = {i.name: i.bytes for i in loss_items(Setup(LLAMA8B, T, loss="chunked"))}
    assert chunked["logits chunk (fp32 + act copy)"] == 8192 * V * 6
    assert chunked["fp32 weight copy + fp32 weight gradient"] == V * h * 8
    liger = {i.name: i.bytes for i in loss_items(Setup(LLAMA8B, 131072, loss="liger"))}
    # Liger's chunk: next_pow2(ceil(131072 / ceil(128256 / 4096) = 32)) = 4096 rows
    assert liger["logits chunk (Liger fused CE)"] == 4096 * V * 2


def test_model_states_zero3_offload_by_hand():
    P = 8_030_261_248
    gpu, host, pinned = model_state_items(Setup(LLAMA8B, 1024, world=8, precision="fp16"))
    assert gpu == []
    h = {i.name: i.bytes for i in host}
    assert h["params (ZeRO-3 offload)"] == 2 * P / 8
    # 4 B x 8.03B / 8 = 3.74 GiB: one pinned flat buffer each, rounded up by the caching host allocator to 4 GiB
    assert h["fp32 master (flat, pinned)"] == h["fp32 grads (flat, pinned)"] == 4 * GiB
    assert h["Adam m, v"] == 8 * P / 8
    assert pinned == 2 * P / 8 + 8 * GiB
    gpu, host, _ = model_state_items(Setup(LLAMA8B, 1024, world=4, offload_params=False, offload_optimizer=False))
    g = {i.name: i.bytes for i in gpu}
    assert g == {"params (ZeRO-3 shard)": 2 * P / 4, "fp32 master + Adam m, v": 12 * P / 4, "grads (shard)": 2 * P / 4}
    gpu, _, _ = model_state_items(Setup(LLAMA8B, 1024, world=4, zero_stage=2, offload_params=False,
                                        offload_optimizer=False))
    assert {i.name: i.bytes for i in gpu}["params"] == 2 * P


def test_attention_workspace_by_hand():
    assert attention_workspace(Setup(LLAMA8B, 8192, attention="flash")) == 0
    assert attention_workspace(Setup(LLAMA8B, 8192, attention="dense_mask")) == 8192 ** 2
    # additive mask (2 B) + per head: scores 2 B, fp32 softmax 4 B, probabilities 2 B
    assert attention_workspace(Setup(LLAMA8B, 4096, attention="eager")) == 4096 ** 2 * (2 + 32 * 8)


def test_peak_is_the_largest_phase():
    p = plan(Setup(LLAMA8B, 16384, world=4, loss="full", checkpointing="plain"))
    assert p.peak_phase == "loss"  # 23.5 GiB of logits beat one layer's working set
    p = plan(Setup(LLAMA8B, 262144, world=4, loss="liger", liger_kernels=True, checkpointing="offload"))
    assert p.peak_phase == "layer backward"
    assert p.gpu_peak == sum(i.bytes for i in p.persistent) + p.phase_totals["layer backward"]


def test_max_seq_len_is_the_boundary():
    hw = Hardware(gpus=4, gpu_mem=48 * GiB, host_mem=512 * GiB)
    s = Setup(LLAMA8B, 1024, world=4, loss="liger", liger_kernels=True, checkpointing="offload")
    best = max_seq_len_that_fits(s, hw)
    assert best % 1024 == 0 and best > 64 * 1024
    from longctx.plan import fits
    assert fits(replace(s, seq_len=best), hw)
    assert not fits(replace(s, seq_len=best + 1024), hw)


def test_next_knob_names_liger_when_logits_dominate():
    hw = Hardware(gpus=8, gpu_mem=16 * GiB, host_mem=512 * GiB)
    s = Setup(LLAMA8B, 32768, world=8, precision="fp16", loss="chunked", checkpointing="offload")
    knobs = next_knobs(s, hw)
    assert knobs and knobs[0][0].flag == "--liger on"
    assert knobs[0][2] < knobs[0][1]


def test_a_knob_that_fits_at_no_length_says_what_runs_out():
    """8B with its optimizer states on one 139 GiB GPU: offloading them lowers the GPU peak, but 8B's CPU Adam
    states do not fit a 125 GiB host at any length; the advice says so instead of "max_seq_len 0"."""
    hw = Hardware(gpus=1, gpu_mem=139 * GiB, host_mem=125 * GiB)
    s = Setup(LLAMA8B, 32768, world=1, offload_params=True, offload_optimizer=False, loss="liger",
              liger_kernels=True, checkpointing="offload")
    text = format_plan(s, hw, model_name="llama3.1-8b")
    line = next(x for x in text.splitlines() if x.strip().startswith("offload_optimizer cpu"))
    assert line.endswith("but then no length fits (host RAM)") and "max_seq_len 0" not in text


def test_parse_size():
    assert parse_size("16GiB") == 16 * GiB
    assert parse_size("512G") == 512 * GiB
    assert parse_size("48GB") == 48 * 10 ** 9
    assert parse_size("80") == 80 * GiB
    with pytest.raises(ValueError):
        parse_size("lots")


def test_format_plan_has_every_section():
    hw = Hardware(gpus=8, gpu_mem=16 * GiB, host_mem=512 * GiB, name="8xV100-16GB")
    text = format_plan(Setup(LLAMA8B, 32768, world=8, precision="fp16", checkpointing="offload", loss="liger",
                             liger_kernels=True), hw, model_name="llama3.1-8b")
    for needle in ("GPU, per rank", "per-layer working set", "with tiled MLP", "Host RAM", "pinned host memory",
                   "Largest max_seq_len that fits", "predicted peak allocated", "offloaded checkpoints"):
        assert needle in text, needle


def test_chunk_size_agrees_with_the_training_loss():
    from longctx import modeling, plan as plan_mod

    assert plan_mod.HEAD_CHUNK_TOKENS == modeling.HEAD_CHUNK_TOKENS


def test_fa4_plans_as_the_default_attention():
    """flash-attention-4's peaks measured equal to the default's (H100, 16K-128K): its backward accumulators take
    the place of cuDNN's workspace, so its plan is the calibrated O(S) one, at any length and under Ulysses; no
    mask knob is offered for it."""
    from longctx.plan import attention_kind, candidate_knobs

    assert attention_kind("fa4", packing=True) == "fa4" and attention_kind("varlen", packing=True) == "flash"
    for sp, length in ((1, 16384), (1, 131072), (4, 131072)):
        flash = Setup(LLAMA8B, length, world=sp, sp=sp)
        assert plan(replace(flash, attention="fa4")).gpu_peak == plan(flash).gpu_peak
    assert plan(Setup(LLAMA8B, 131072, attention="dense_mask")).gpu_peak > plan(Setup(LLAMA8B, 131072)).gpu_peak
    assert not any("varlen" in k.flag for k in candidate_knobs(Setup(LLAMA8B, 131072, attention="fa4")))
    assert any("varlen" in k.flag for k in candidate_knobs(Setup(LLAMA8B, 8192, attention="dense_mask")))
