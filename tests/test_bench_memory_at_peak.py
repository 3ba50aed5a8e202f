"""bench/memory_at_peak.py: what was live at a step's peak, and where it was allocated (the tool for the next
disagreement between the memory plan and a measured peak).

The replay is checked against hand-counted traces; the recorder against a step whose allocations the test makes
itself; the worker's row (tests/test_bench.py's smoke run) against the sizes of upstream's fp32 loss tensors."""

from __future__ import annotations

from helpers_train import REPO  # noqa: F401  (puts the repository on sys.path)

from bench.memory_at_peak import Event, record, summarize, where

MiB = 1 << 20
GiB = 1 << 30


def sizes(summary: dict) -> dict[str, int]:
    return {g["where"]: round(g["gib"] * GiB) for g in summary["live"]}


def test_the_peak_is_the_highest_allocated_total_and_what_was_live_then():
    ev = [Event("alloc", 1, 100 * MiB, "a"), Event("alloc", 2, 50 * MiB, "b"),        # 100, 150 <- peak
          Event("free_requested", 1, 100 * MiB), Event("free_completed", 1, 100 * MiB),  # 50
          Event("alloc", 3, 80 * MiB, "a"), Event("alloc", 4, 10 * MiB, "a")]        # 130, 140
    s = summarize(ev)
    assert round(s["peak_gib"] * GiB) == 150 * MiB
    assert sizes(s) == {"a": 100 * MiB, "b": 50 * MiB}
    assert s["live"][0]["where"] == "a" and s["from_before_gib"] == 0 and s["awaiting_stream_gib"] == 0


def test_a_block_a_stream_still_holds_no_longer_counts_but_is_reported():
    ev = [Event("alloc", 1, 100 * MiB, "a"), Event("free_requested", 1, 100 * MiB),  # 0, 100 held for a stream
          Event("alloc", 2, 120 * MiB, "b"), Event("free_completed", 1, 100 * MiB)]
    s = summarize(ev)
    assert round(s["peak_gib"] * GiB) == 120 * MiB and sizes(s) == {"b": 120 * MiB}
    assert round(s["awaiting_stream_gib"] * GiB) == 100 * MiB


def test_what_was_allocated_before_the_trace_counts_until_it_is_freed():
    ev = [Event("free_requested", 9, 150 * MiB), Event("alloc", 1, 100 * MiB, "a")]  # 200 -> 50 -> 150
    s = summarize(ev, base_bytes=200 * MiB)
    assert round(s["peak_gib"] * GiB) == 200 * MiB and s["live"] == []
    assert round(s["from_before_gib"] * GiB) == 200 * MiB
    s = summarize(ev + [Event("alloc", 2, 100 * MiB, "b")], base_bytes=200 * MiB)  # 250
    assert round(s["peak_gib"] * GiB) == 250 * MiB and round(s["from_before_gib"] * GiB) == 50 * MiB


def test_where_names_the_innermost_frames_of_ours():
    frames = [("/x/torch/nn/functional.py", 10, "linear"), ("/r/longctx/modeling.py", 365, "forward"),
              ("/r/bench/memory_at_peak.py", 1, "record"), ("/r/deepspeed/utils/nvtx.py", 33, "wrapped_fn"),
              ("/r/deepspeed/runtime/engine.py", 3007, "forward"), ("/r/longctx/trainer.py", 252, "forward"),
              ("/r/longctx/trainer.py", 278, "train_step")]
    assert where(frames) == "modeling.py:365:forward < engine.py:3007:forward < trainer.py:252:forward"
    assert where(frames[:1]) == "(no frame of ours)"


def test_recording_a_step_finds_the_tensors_that_made_its_peak():
    import torch

    def step():
        big = torch.empty(4 * MiB, dtype=torch.uint8)  # held to the end
        for _ in range(3):
            t = torch.empty(3 * MiB, dtype=torch.uint8)  # transient: 7 MiB, below the peak
            del t
        mid = torch.empty(2 * MiB, dtype=torch.uint8)
        both = torch.cat([big, mid])  # 4 + 2 + 6: the peak
        del both, mid
        small = torch.empty(1 * MiB, dtype=torch.uint8)
        return big, small

    s = record(step, keep=("test_bench_memory_at_peak",))
    assert s["allocator"] is None  # no CUDA here
    got = s["storages"]
    assert round(got["peak_gib"] * GiB) == 12 * MiB
    assert sorted(sizes(got).values(), reverse=True) == [6 * MiB, 4 * MiB, 2 * MiB]
    assert all(":step" in g["where"] for g in got["live"])
