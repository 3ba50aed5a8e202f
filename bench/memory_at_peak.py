"""What is live at the peak of one training step, and where it was allocated.

The memory plan (longctx.plan) predicts a step's peak; when a measured peak disagrees (the optimizer-on-GPU rows of
2026-12-05: 113 GiB measured, 74 planned, at 128K), the first question is what was allocated at that moment.
`record(step)` runs one step under two recorders and `summarize` replays each trace of allocations and frees:

- on every device, a dispatch mode that sees every tensor storage an op creates and when Python drops it, labelled
  with the code that made it and, in backward, the autograd node (Python's stack there is only `.backward()`);
- on CUDA also the caching allocator's own trace (`torch.cuda.memory._record_memory_history`, Python stacks), which
  counts what `torch.cuda.max_memory_allocated` counts: a block stops counting when Python frees it
  ("free_requested"); one a side stream still uses stays reserved until "free_completed" (reported apart).

The summary groups the blocks live at the peak by the innermost frames of the code that allocated them.
"""

from __future__ import annotations

import collections
import contextlib
import os
import traceback
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

GiB = 1024 ** 3
# Frames worth naming: our code, the libraries whose allocations the plan models, and torch's checkpointing.
KEEP_FRAMES = ("longctx", "bench", "transformers", "deepspeed", "liger_kernel", "torch/utils/checkpoint")
SKIP_FRAMES = ("bench/memory_at_peak.py", "nvtx.py")  # the recorder itself; DeepSpeed's profiling-range decorator
DEPTH = 3  # frames per "where"


@dataclass(frozen=True)
class Event:
    action: str  # "alloc", "free_requested" or "free_completed" (the allocator's trace actions we replay)
    addr: int
    size: int
    where: str = ""


def where(frames: Iterable[tuple[str, int, str]], keep: tuple[str, ...] = KEEP_FRAMES) -> str:
    """'file:line:function < ...' of the innermost DEPTH frames whose path contains one of `keep` (innermost
    first)."""
    out = []
    for filename, line, name in frames:
        f = filename.replace(os.sep, "/")
        if any(k in f for k in keep) and not any(k in f for k in SKIP_FRAMES):
            out.append(f"{os.path.basename(f)}:{line}:{name}")
            if len(out) == DEPTH:
                break
    return " < ".join(out) or "(no frame of ours)"


def summarize(events: Iterable[Event], base_bytes: int = 0, top: int = 12) -> dict:
    """Replay `events`; at the highest allocated total, the blocks the trace saw allocated that were live, grouped
    by where, largest first. base_bytes: what was allocated before the trace began (freeing some of it during the
    step lowers the total; whatever of it is left at the peak is `from_before_gib`)."""
    events = list(events)
    cur = peak = base_bytes
    peak_at = -1  # index of the event that reached the peak (-1: before the trace)
    for i, e in enumerate(events):
        if e.action == "alloc":
            cur += e.size
            if cur > peak:
                peak, peak_at = cur, i
        elif e.action == "free_requested":
            cur -= e.size  # a block from before the trace too
    # Replay again up to the peak for what was live then (a copy of the live set at every new peak is quadratic).
    at_peak: dict[int, Event] = {}
    awaiting: dict[int, Event] = {}  # freed by Python, held for a stream (CUDA only)
    for e in events[:peak_at + 1]:
        if e.action == "alloc":
            at_peak[e.addr] = e
        elif e.action == "free_requested":
            b = at_peak.pop(e.addr, None)
            if b is not None:
                awaiting[e.addr] = b
        elif e.action == "free_completed":
            awaiting.pop(e.addr, None)
    awaiting_at_peak = sum(b.size for b in awaiting.values())
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for b in at_peak.values():
        groups[b.where][0] += b.size
        groups[b.where][1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    in_step = sum(b.size for b in at_peak.values())
    return {"peak_gib": peak / GiB, "before_step_gib": base_bytes / GiB, "from_before_gib": (peak - in_step) / GiB,
            "awaiting_stream_gib": awaiting_at_peak / GiB,
            "live": [{"gib": n / GiB, "blocks": k, "where": w} for w, (n, k) in ranked[:top]],
            "other_gib": sum(n for _, (n, _k) in ranked[top:]) / GiB}


def cuda_events(snapshot: dict, device: int, keep: tuple[str, ...] = KEEP_FRAMES) -> Iterator[Event]:
    for e in snapshot["device_traces"][device]:
        if e["action"] in ("alloc", "free_requested", "free_completed"):
            yield Event(e["action"], e["addr"], e["size"],
                        where(((f["filename"], f["line"], f["name"]) for f in e.get("frames", ())), keep))


class StorageTrace:
    """Dispatch-mode recorder: an "alloc" for every new tensor storage an op returns, a "free_requested" and
    "free_completed" when Python drops it. Storages made outside the step are not seen (base_bytes is 0)."""

    def __init__(self, keep: tuple[str, ...] = KEEP_FRAMES):
        self.events: list[Event] = []
        self.keep = keep

    @contextlib.contextmanager
    def recording(self) -> Iterator["StorageTrace"]:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        from torch.utils.weak import WeakIdKeyDictionary

        events, keep, seen, refs = self.events, self.keep, WeakIdKeyDictionary(), set()

        def dropped(ref, addr: int, size: int) -> None:
            refs.discard(ref)
            events.append(Event("free_requested", addr, size))
            events.append(Event("free_completed", addr, size))

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if not isinstance(t, torch.Tensor) or t.is_meta:
                        continue
                    st = t.untyped_storage()
                    if st in seen or st.nbytes() == 0:
                        continue
                    seen[st] = True
                    addr, size = st.data_ptr(), st.nbytes()
                    frames = [(f.filename, f.lineno, f.name) for f in reversed(traceback.extract_stack())]
                    label = where(frames, keep)
                    node = torch._C._current_autograd_node()  # in backward, Python's stack is only .backward()
                    if node is not None:
                        label = f"{node.name()} < {label}"
                    events.append(Event("alloc", addr, size, label))
                    refs.add(weakref.ref(st, lambda r, a=addr, n=size: dropped(r, a, n)))
                return out

        with Mode():
            yield self


def record(step: Callable[[], object], top: int = 12, keep: tuple[str, ...] = KEEP_FRAMES) -> dict:
    """Run `step` once under the recorders and summarize what was live at its peak; `keep` says whose frames name
    an allocation. "storages": every tensor the step's ops made (in backward, labelled with the autograd node that
    made it). "allocator" (CUDA only): the caching allocator's trace of the same step, which is what
    max_memory_allocated counts (workspaces and allocations outside tensor ops included; backward's allocations
    carry only Python's stack)."""
    import torch

    cuda = torch.cuda.is_available()
    trace = StorageTrace(keep)
    if not cuda:
        with trace.recording():
            step()
        return {"storages": summarize(trace.events, 0, top), "allocator": None}
    dev = torch.cuda.current_device()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                             max_entries=2_000_000, clear_history=True)
    try:
        with trace.recording():
            step()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    # The storage trace cannot see frees of tensors made before the step: its "before" is the allocator's.
    return {"storages": summarize(trace.events, base, top),
            "allocator": summarize(cuda_events(snap, dev, keep), base, top)}
