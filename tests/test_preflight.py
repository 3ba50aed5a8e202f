"""Preflight: refuse what cannot fit (GPU, host RAM), with the message and the knob; read this machine."""

from __future__ import annotations

import resource

import pytest

from longctx.errors import LongctxError
from longctx.facts import Facts
from longctx.flops import ModelShape
from longctx.plan import plan
from longctx.plan_types import GiB, Setup
from longctx.preflight import Room, cgroup_room, check, memlock_limit, out_of_memory_message, probe, read_meminfo, run

LLAMA8B = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256)
TINY = ModelShape(hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32, intermediate=384, vocab=2048)


def room(gpus: int = 1, gpu_mem: float = 80 * GiB, host_mem: float = 512 * GiB, **free) -> Room:
    """What is free on a machine of `gpus` ranks on one host, each GPU of `gpu_mem`, sharing `host_mem`."""
    base = dict(gpu_free=int(79 * GiB), host_available=int(500 * GiB), rss_now=int(1 * GiB), memlock_limit=None,
                source="test")
    base.update(free)
    return Room(Facts.of_sizes(gpus=gpus, gpu_mem=int(gpu_mem), host_mem=int(host_mem)), **base)


def test_refuses_gpu_with_message_and_knob():
    # 8B at 128K with the chunked loss, checkpoints on the GPU: about 60 GiB per rank; a V100 has 16
    s = Setup(LLAMA8B, 131072, world=8, precision="fp16", loss="chunked", checkpointing="plain")
    need = plan(s).gpu_peak
    assert need > 40 * GiB
    problems, _ = check(plan(s), room(gpu_free=int(15.5 * GiB), gpu_mem=16 * GiB))
    assert len(problems) == 1
    msg = problems[0]
    assert msg.startswith("GPU:") and "15.5 GiB" in msg and "free" in msg
    assert "--offload-gradient-checkpointing" in msg or "--liger on" in msg
    assert "largest --max-seq-len that fits" in msg


def test_refuses_host_before_the_oom_killer():
    # ZeRO-3 offload of 8B on 8 ranks: ~24 GiB of model states and buffers per rank + 16 GiB of checkpoints, far above
    # 64 GiB of host RAM even with every checkpoint on the GPU: the knob is more RAM or more hosts, not fewer layers
    s = Setup(LLAMA8B, 65536, world=8, precision="fp16", loss="liger", liger_kernels=True, checkpointing="offload")
    problems, _ = check(plan(s), room(gpus=8, host_available=int(64 * GiB), host_mem=64 * GiB))
    assert len(problems) == 1 and problems[0].startswith("host RAM:")
    assert "offloaded checkpoints" in problems[0] and "Adam m, v (fp32)" in problems[0]
    assert "with no checkpoint in host RAM it still needs" in problems[0] and "more hosts" in problems[0]
    assert "--num-offloaded-layers" not in problems[0]
    # where the states fit and the checkpoints do not, fewer checkpoints in host RAM is the knob, re-planned
    problems, _ = check(plan(s), room(gpus=8, host_available=int(300 * GiB), host_mem=400 * GiB))
    assert "--num-offloaded-layers 28 (the other checkpoints on the GPU" in problems[0]


def test_fitting_run_passes_and_memlock_is_a_note():
    s = Setup(LLAMA8B, 16384, world=4, loss="liger", liger_kernels=True, checkpointing="offload")
    problems, notes = check(plan(s), room(gpus=4, memlock_limit=64 * 1024))
    assert problems == []
    assert len(notes) == 1 and "RLIMIT_MEMLOCK" in notes[0]


def test_run_raises_longctx_error_and_prints_nothing_else():
    s = Setup(TINY, 4096, world=1, zero_stage=0, offload_params=False, offload_optimizer=False, loss="full")
    said = []
    with pytest.raises(LongctxError) as e:
        run(s, Facts(), 0, say=said.append, room=room(gpu_free=int(0.01 * GiB)))
    assert "preflight refused" in str(e.value) and "GPU:" in str(e.value)
    p = run(s, Facts(), 0, say=said.append, room=room())
    assert p.gpu_peak > 0 and said and said[-1].startswith("preflight: predicted peak")


def test_probe_reads_this_machine(tmp_path):
    facts = Facts.detect(gpus=2)
    m = probe(facts, 0)
    assert m.facts is facts and 0 < m.host_available <= max(facts.host_mem, m.host_available) and m.rss_now > 0
    assert (m.gpu_free is None) == (not facts.cuda)
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    assert memlock_limit() == (None if soft == resource.RLIM_INFINITY else soft)
    (tmp_path / "meminfo").write_text("MemTotal:       1000 kB\nMemAvailable:    600 kB\nHugePages_Total: 0\n")
    assert read_meminfo(str(tmp_path / "meminfo")) == {"MemTotal": 1024000, "MemAvailable": 614400,
                                                       "HugePages_Total": 0}
    (tmp_path / "memory.max").write_text("8589934592\n")
    (tmp_path / "memory.current").write_text("2147483648\n")
    assert cgroup_room(str(tmp_path)) == 6 * GiB
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_room(str(tmp_path)) is None


def test_longest_batch_comes_first():
    from longctx.batching import longest_first

    lengths = [5, 90, 7, 100, 3, 100, 8]
    order = [6, 0, 5, 2, 1, 4, 3]           # a seeded permutation
    out = longest_first(order, lengths, k=2)  # global batch of 2 rows
    assert out[:2] == [5, 3]                 # both 100-token rows, in their seeded order
    assert out[2:] == [6, 0, 2, 1, 4]        # the rest keeps the seeded order
    assert sorted(out) == sorted(order)
    assert longest_first(order, lengths, k=0) == order
    assert longest_first(order, lengths, k=2) == out  # deterministic (resume replays it)


def test_out_of_memory_report_names_where_the_plan_the_checkpoint_and_the_knobs():
    # 8B at 128K on 8 V100s with checkpoints on the GPU: the plan is far above the card, so the report's knob
    # lines are the planner's own re-plan for a 16 GiB card
    s = Setup(LLAMA8B, 131072, world=8, precision="fp16", loss="chunked", checkpointing="plain")
    p = plan(s)
    msg = out_of_memory_message("CUDA out of memory. Tried to allocate 3.91 GiB.\nmore", where="in the backward of "
                                "micro-batch 2 of 4, 131,072 tokens, step 7 of 100", rank=3, p=p,
                                peak_allocated=int(15.2 * GiB),
                                facts=Facts.of_sizes(gpus=8, gpu_mem=int(16 * GiB), host_mem=int(512 * GiB)),
                                checkpoint="runs/x/checkpoints/step-00000005")
    assert msg.startswith("GPU out of memory on rank 3, in the backward of micro-batch 2 of 4, 131,072 tokens, "
                          "step 7 of 100.")
    assert "torch: CUDA out of memory. Tried to allocate 3.91 GiB." in msg and "more" not in msg
    assert f"predicted a peak of {p.gpu_peak / GiB:.1f} GiB per GPU (its '{p.peak_phase}' phase)" in msg
    assert "reached 15.2 GiB allocated of a 16.0 GiB card" in msg
    assert "runs/x/checkpoints/step-00000005; rerun the same command with --resume auto" in msg
    knobs = msg.split("Knobs that lower the peak (re-planned for this card):\n")[1]
    assert "the largest --max-seq-len that fits as configured" in knobs and "-> " in knobs

    on_gpu = plan(Setup(LLAMA8B, 131072, world=8, offload_params=False, offload_optimizer=False))
    msg = out_of_memory_message("", where="x", rank=0, p=on_gpu, peak_allocated=None,
                                facts=Facts(host_mem=int(512 * GiB)), checkpoint=None)
    assert "No checkpoint was complete yet" in msg and "Knobs" not in msg and "allocated" not in msg
