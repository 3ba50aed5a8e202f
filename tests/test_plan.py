"""Memory planner: component formulas against hand-computed numbers, the search, the advice, the printout."""

from __future__ import annotations

from dataclasses import replace

import pytest

from longctx.flops import ModelShape
from longctx.plan import attention_workspace, loss_items, plan, working_set_units
from longctx.plan_report import format_plan, parse_size
from longctx.plan_search import max_seq_len_that_fits, next_knobs
from longctx.plan_states import model_state_items, total_params
from longctx.facts import Facts
from longctx.plan_types import GiB, Setup

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
    # the last 8 layers' checkpoints, all live when the backward starts; the offloader's prefetch buffer comes in the
    # first 24 layers' backward, after those 8 have been freed
    assert {i.name: i.bytes for i in off.phases["layer backward"]}["checkpoints on GPU"] == 8 * U
    alloff = plan(replace(base, checkpointing="offload"))
    assert {i.name: i.bytes for i in alloff.phases["layer backward"]}["checkpoints on GPU"] == 1 * U  # the prefetch
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
    MiB = 2 ** 20
    # zero.Init pins each parameter's eighth: q, o 4 MiB; k, v 1 MiB; gate, up, down 14 -> 16 MiB; embedding and
    # head 125.25 -> 128 MiB; the norms stay on the GPU. Freed into torch's pinned cache once DeepSpeed flattens them.
    assert h["fp16 params, per parameter (pinned, cached)"] == 32 * (4 + 1 + 1 + 4 + 3 * 16) * MiB + 2 * 128 * MiB
    # 2 B x 8.03B / 8 = 1.87 GiB, rounded up by the caching host allocator to 2 GiB
    assert h["fp16 params (flat, pinned)"] == 2 * GiB
    assert h["fp32 master (flat per sub-group)"] == 4 * P / 8  # pageable: not rounded
    # the eighth is 1.004e9 elements: one sub-group of sub_group_size 1e9, closed by the LM head; 3.74 -> 4 GiB
    assert h["fp32 grads (flat per sub-group, pinned)"] == 4 * GiB
    assert h["fp16 grad partitions (flat, pinned)"] == 2 * GiB
    assert h["Adam m, v (fp32)"] == 8 * P / 8
    assert pinned == 2112 * MiB + 2 * GiB + 4 * GiB + 2 * GiB
    gpu, host, _ = model_state_items(Setup(LLAMA8B, 1024, world=4, offload_params=False, offload_optimizer=False))
    g = {i.name: i.bytes for i in gpu}
    assert g == {"params (ZeRO-3 shard)": 2 * P / 4, "fp32 master + Adam m, v": 12 * P / 4, "grads (shard)": 2 * P / 4}
    assert host == []
    gpu, _, _ = model_state_items(Setup(LLAMA8B, 1024, world=4, zero_stage=2, offload_params=False,
                                        offload_optimizer=False))
    assert {i.name: i.bytes for i in gpu}["params"] == 2 * P


LLAMA3B = ModelShape(hidden=3072, layers=28, heads=24, kv_heads=8, head_dim=128, intermediate=8192, vocab=128256)


def deepspeed_host_table(s: ModelShape, W: int, a: int, *, tied: bool, sub_group_size: int, ckpt_tokens: int) -> dict:
    """One rank's host buffers under DeepSpeed 0.19.8's ZeRO-3 with parameters and optimizer offloaded to pinned CPU
    memory, re-derived from its source for this test (not from longctx.plan_states): buffer -> bytes newly taken from the
    OS. torch's caching host allocator serves every pinned buffer: a power-of-two block, a cached one of that size if
    free.
    """
    h, V = s.hidden, s.vocab
    layer = [h * s.heads * s.head_dim, h * s.kv_heads * s.head_dim, h * s.kv_heads * s.head_dim,
             s.heads * s.head_dim * h, h * s.intermediate, h * s.intermediate, s.intermediate * h, h, h]
    full = [V * h] + layer * s.layers + [h] + ([] if tied else [V * h])  # module order
    part = [(n + W - 1) // W for n in full]                                # Init._aligned_size // world
    P = sum(part)
    cached: dict[int, int] = {}

    def block(nbytes: int) -> int:
        return 1 << (nbytes - 1).bit_length()

    def pin(nbytes: int) -> int:
        b = block(nbytes)
        if cached.get(b):
            cached[b] -= 1
            return 0
        return b

    # Init._partition_param: partitions of every non-persistent parameter (norms persist: <= 10 x hidden), and of
    # the LM head nn.Linear that tie_weights then drops
    zero_init = [a * p for n, p in zip(full, part) if n > 10 * h] + ([a * ((V * h + W - 1) // W)] if tied else [])
    row = {"per parameter": sum(pin(b) for b in zero_init)}
    if tied:
        cached[block(zero_init[-1])] = cached.get(block(zero_init[-1]), 0) + 1
    row["flat params"] = pin(a * P)                    # _create_param_groups_fp16_flat_cpu_memory
    for b in zero_init[:-1] if tied else zero_init:  # _move_to_flat_buffer frees them
        cached[block(b)] = cached.get(block(b), 0) + 1
    groups, acc = [], 0                                # _create_fp16_sub_groups
    if sub_group_size >= P:
        groups = [P]
    else:
        for i, n in enumerate(part):
            acc += n
            if acc >= sub_group_size or i == len(part) - 1:
                groups.append(acc)
                acc = 0
    row["master"] = 4 * P                              # _create_fp32_partitions: pageable
    row["grads"] = sum(pin(4 * n) for n in groups)     # initialize_optimizer_states
    row["grad partitions"] = pin(a * P)                # grad_partitions_flat_buffer
    row["adam"] = 8 * P                                # DeepSpeedCPUAdam.step
    row["checkpoints"] = sum(pin(ckpt_tokens * h * a) for _ in range(s.layers))  # the fork's pinned layer inputs
    row["sub-groups"] = len(groups)
    row["partition elements"] = P
    return row


@pytest.mark.parametrize("shape,W,precision,tied,sub_group_size,tokens", [
    (LLAMA8B, 1, "bf16", False, 10 ** 9, 16384),        # 128 MiB checkpoints: all in cached MLP-weight blocks
    (LLAMA8B, 1, "bf16", False, 10 ** 9, 32768),
    (LLAMA8B, 8, "fp16", False, 10 ** 9, 65536),
    (LLAMA8B, 4, "bf16", False, 2 * 10 ** 8, 131072),
    (LLAMA3B, 1, "bf16", True, 10 ** 9, 16384),         # the tied head's block is reused by the last sub-group
    (LLAMA3B, 2, "bf16", True, 10 ** 12, 24576),
])
def test_host_items_are_deepspeeds_buffers(shape, W, precision, tied, sub_group_size, tokens):
    s = Setup(shape, tokens, world=W, precision=precision, tied_embeddings=tied, sub_group_size=sub_group_size,
              checkpointing="offload", loss="liger", liger_kernels=True)
    want = deepspeed_host_table(shape, W, s.act_bytes, tied=tied, sub_group_size=sub_group_size, ckpt_tokens=tokens)
    p = plan(s)
    got = {i.name: i for i in p.host}
    dt = precision
    assert {n: i.bytes for n, i in got.items()} == {
        "process (python, torch, CUDA, DeepSpeed)": 3 * GiB,
        f"{dt} params, per parameter (pinned, cached)": want["per parameter"],
        f"{dt} params (flat, pinned)": want["flat params"],
        "fp32 master (flat per sub-group)": want["master"],
        "fp32 grads (flat per sub-group, pinned)": want["grads"],
        f"{dt} grad partitions (flat, pinned)": want["grad partitions"],
        "Adam m, v (fp32)": want["adam"],
        "offloaded checkpoints": want["checkpoints"]}
    assert got["fp32 grads (flat per sub-group, pinned)"].note.startswith(f"{want['sub-groups']} sub-group")
    pinned = sum(want[k] for k in ("per parameter", "flat params", "grads", "grad partitions", "checkpoints"))
    assert p.pinned == pinned
    assert p.host_per_rank == 3 * GiB + pinned + want["master"] + want["adam"]


@pytest.mark.parametrize("shape,W,precision,tied", [(LLAMA8B, 1, "bf16", False), (LLAMA8B, 4, "bf16", False),
                                                    (LLAMA8B, 8, "fp16", False), (LLAMA3B, 2, "bf16", True)])
def test_parameters_on_the_gpu_are_flattened_through_host_ram(shape, W, precision, tied):
    """ZeRO-3 with the parameters on the GPU: DeepSpeed 0.19.8 copies this rank's parameter partitions into one
    pageable CPU buffer to flatten them (stage3.py _create_fp16_partitions_with_defragmentation -> zero/utils.py
    defragment), before any optimizer state exists: a host peak of its own, the rank's partitions plus the process.
    Not with the parameters offloaded (flattened in the pinned buffer the states count) nor without an optimizer."""
    s = Setup(shape, 16384, world=W, precision=precision, tied_embeddings=tied, offload_params=False,
              offload_optimizer=False, checkpointing="offload", loss="liger", liger_kernels=True)
    want = deepspeed_host_table(shape, W, s.act_bytes, tied=tied, sub_group_size=10 ** 9, ckpt_tokens=16384)
    p = plan(s)
    assert p.host_at_flatten == 3 * GiB + s.act_bytes * want["partition elements"]
    assert p.host_per_rank == max(p.host_steady, p.host_at_flatten)
    assert plan(replace(s, offload_optimizer=True)).host_at_flatten == p.host_at_flatten
    assert plan(replace(s, offload_params=True, offload_optimizer=True)).host_at_flatten == 0
    assert plan(replace(s, optimizer="none")).host_at_flatten == 0
    assert plan(replace(s, zero_stage=2)).host_at_flatten == 0


def test_host_items_by_hand_8b_one_gpu():
    """Llama-3.1-8B on one rank, bf16: the numbers a reader can check on paper."""
    MiB = 2 ** 20
    h = {i.name: i.bytes for i in plan(Setup(LLAMA8B, 16384, checkpointing="offload")).host}
    # per layer q, o 32 MiB; k, v 8 MiB; gate, up, down 112 -> 128 MiB; embedding and head 1002 -> 1024 MiB
    assert h["bf16 params, per parameter (pinned, cached)"] == 32 * (2 * 32 + 2 * 8 + 3 * 128) * MiB + 2 * GiB
    assert h["bf16 params (flat, pinned)"] == 16 * GiB                     # 14.96 GiB
    assert h["fp32 grads (flat per sub-group, pinned)"] == 8 * 4 * GiB     # 8 sub-groups of ~1e9 elements
    assert h["bf16 grad partitions (flat, pinned)"] == 16 * GiB
    assert h["offloaded checkpoints"] == 0  # 32 x 128 MiB: 32 of the 96 cached gate/up/down blocks


def test_host_buffers_without_pinning():
    """pin_memory false: the per-parameter partitions are pageable and given back; the flat bf16 parameters are
    pinned all the same (DeepSpeed pins them unconditionally); the rest pageable and not rounded."""
    P = 8_030_261_248
    h = {i.name: i.bytes for i in plan(Setup(LLAMA8B, 16384, pin_memory=False)).host}
    assert h == {"process (python, torch, CUDA, DeepSpeed)": 3 * GiB, "bf16 params (flat, pinned)": 16 * GiB,
                 "fp32 master (flat per sub-group)": 4 * P, "fp32 grads (flat per sub-group)": 4 * P,
                 "bf16 grad partitions (flat)": 2 * P, "Adam m, v (fp32)": 8 * P}
    assert plan(Setup(LLAMA8B, 16384, pin_memory=False)).pinned == 16 * GiB


def test_sub_groups_and_grad_accum_dtype_come_from_the_ds_config():
    from longctx.plan_settings import setup_from_settings

    def setup(zero: dict, **top) -> Setup:
        return setup_from_settings(
            shape=LLAMA8B, seq_len=16384, micro_batch=1, world=1, precision="bf16", checkpointing="plain",
            offload_impl="fork", reentrant=True, num_offloaded_layers=0, keep_attention=False, liger=True,
            tiled_loss=True, attention="flash", sp=1, tiled_mlp_shards=1, tied_embeddings=False,
            ds_config={"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                             "offload_param": {"device": "cpu", "pin_memory": True}, **zero}, **top})

    assert (setup({}).sub_group_size, setup({}).grad_accum_dtype) == (10 ** 9, None)
    s = setup({"sub_group_size": 10 ** 12}, data_types={"grad_accum_dtype": "fp32"})
    assert (s.sub_group_size, s.grad_accum_dtype) == (10 ** 12, "fp32")
    h = {i.name: i for i in plan(s).host}
    assert h["fp32 grads (flat per sub-group, pinned)"].note == "1 sub-group"  # 29.9 GiB -> one 32 GiB block
    assert h["fp32 grad partitions (flat, pinned)"].bytes == 32 * GiB
    assert setup({}, data_types={"grad_accum_dtype": "torch.bfloat16"}).grad_accum_dtype == "bf16"


def test_full_depth_8b_on_one_gpu_is_refused_for_host_ram(tmp_path):
    """Llama-3.1-8B at 32 layers on one 80 GiB GPU with 125 GiB of host RAM, every optimizer state on the CPU
    (offload_optimizer.ratio 1): the GPU fits, the host does not, and the plan says so line by line and names what
    would change it, a split of the optimizer states among it (what "auto" chooses)."""
    import json

    from helpers_train import REPO
    from longctx import config
    from longctx.plan_report import cli_plan

    ds = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    ds["zero_optimization"]["offload_optimizer"]["ratio"] = 1
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    # DeepSpeed's default sub-groups (1e9 elements): the overlapped step's one-layer sub-groups pin 2 GiB more fp32
    # gradients here (each sub-group's buffer rounded up by the pinned cache)
    args = ["--model", str(REPO / "longctx" / "default_data" / "llama3.1-8b.json"), "--max-seq-len", "32768",
            "--gpus", "1", "--gpu-mem", "80GiB", "--host-mem", "125GiB", "--plan", "--overlap-optimizer-step", "off"]
    text = cli_plan(config.parse(args + ["--deepspeed", str(tmp_path / "ds.json")]))
    lines = text.splitlines()

    def row(name: str) -> float:
        return float(next(x for x in lines if x.strip().startswith(name)).split()[-1])

    assert "of 80: fits" in text
    assert row("bf16 params, per parameter (pinned, cached)") == 16.50
    assert row("bf16 params (flat, pinned)") == 16.00
    assert row("fp32 master (flat per sub-group)") == 29.92
    assert row("fp32 grads (flat per sub-group, pinned)") == 32.00
    assert row("bf16 grad partitions (flat, pinned)") == 16.00
    assert row("Adam m, v (fp32)") == 59.83
    assert row("pinned cache emptied once built") == -16.50  # zero.Init's per-parameter blocks (longctx.twin_flow)
    assert row("total per rank") == 156.75
    assert next(x for x in lines if "total, 1 ranks" in x).endswith("DOES NOT FIT")
    assert "Largest max_seq_len that fits: none" in text
    knob = next(x for x in lines if x.startswith("Host memory is the limit: "))
    assert "offload_param none in the ds_config (parameters on the GPU): host 140.7 GiB, still above" in knob
    assert "offload_optimizer.ratio 0.602941 in the ds_config (13 of 34 sub-groups' optimizer states on the GPU): " \
           "host 111.6 GiB, GPU peak 63.2 GiB;" in knob
    assert "more host RAM" in knob and "more hosts" in knob
    # the shipped config's "auto" splits the states: 16 of 34 sub-groups on the GPU, and both sides fit
    auto = cli_plan(config.parse(args + ["--deepspeed", str(REPO / "ds_configs" / "zero3_offload.json")]))
    assert "optimizer: auto: split (Twin-Flow, ratio 0.514706): 16 of 34 sub-groups' states on the GPU" in auto
    assert "of 80: fits" in auto and "Host memory is the limit" not in auto


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
    hw = Facts.of_sizes(gpus=4, gpu_mem=48 * GiB, host_mem=512 * GiB)
    s = Setup(LLAMA8B, 1024, world=4, loss="liger", liger_kernels=True, checkpointing="offload")
    best = max_seq_len_that_fits(s, hw)
    assert best % 1024 == 0 and best > 64 * 1024
    from longctx.plan_search import fits
    assert fits(replace(s, seq_len=best), hw)
    assert not fits(replace(s, seq_len=best + 1024), hw)


def test_next_knob_names_liger_when_logits_dominate():
    hw = Facts.of_sizes(gpus=8, gpu_mem=16 * GiB, host_mem=512 * GiB)
    s = Setup(LLAMA8B, 32768, world=8, precision="fp16", loss="chunked", checkpointing="offload")
    knobs = next_knobs(s, hw)
    assert knobs and knobs[0][0].flag == "--liger on"
    assert knobs[0][2] < knobs[0][1]


def test_a_knob_that_fits_at_no_length_says_what_runs_out():
    """8B with its optimizer states on one 139 GiB GPU: offloading them lowers the GPU peak, but 8B's CPU Adam
    states do not fit a 125 GiB host at any length; the advice says so instead of "max_seq_len 0"."""
    hw = Facts.of_sizes(gpus=1, gpu_mem=139 * GiB, host_mem=125 * GiB)
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
    hw = Facts("cuda", "8xV100-16GB", (7, 0), 16 * GiB, 8, 512 * GiB)
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
    from longctx.plan_search import candidate_knobs
    from longctx.plan_settings import attention_kind

    assert attention_kind("fa4", packing=True) == "fa4" and attention_kind("varlen", packing=True) == "flash"
    for sp, length in ((1, 16384), (1, 131072), (4, 131072)):
        flash = Setup(LLAMA8B, length, world=sp, sp=sp)
        assert plan(replace(flash, attention="fa4")).gpu_peak == plan(flash).gpu_peak
    assert plan(Setup(LLAMA8B, 131072, attention="dense_mask")).gpu_peak > plan(Setup(LLAMA8B, 131072)).gpu_peak
    assert not any("varlen" in k.flag for k in candidate_knobs(Setup(LLAMA8B, 131072, attention="fa4")))
    assert any("varlen" in k.flag for k in candidate_knobs(Setup(LLAMA8B, 8192, attention="dense_mask")))


def test_optimizer_ratio_keeps_exactly_the_sub_groups_deepspeed_keeps():
    """ratio_for(k, n) is a ratio at which DeepSpeed's rule (stage3.py: sub-group i on the CPU when
    i >= int((1 - ratio) * n)) keeps exactly the first k sub-groups on the GPU; longctx.twin_flow routes by it."""
    from longctx.plan_states import gpu_sub_group_count, ratio_for

    for n in range(1, 120):
        for k in range(n + 1):
            assert gpu_sub_group_count(ratio_for(k, n), n) == k, (k, n)
            assert int((1 - ratio_for(k, n)) * n) == k
