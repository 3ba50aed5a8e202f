"""Step-0 preflight: compare the memory plan with this machine and refuse before an OOM crash or an OOM kill.

    room = probe(facts, local_rank)                  what is free on the machine `facts` describes, now: GPU memory,
                                                     host RAM (cgroup-aware); the memlock limit
    problems, notes = check(the_plan, room)          pure: what does not fit, and the knob to turn
    run(setup, facts, local_rank, say)               probe + check + agree over ranks; LongctxError if refused

GPU: the predicted peak allocated x (1 + allocator slack) must fit in the free memory that
torch.cuda.mem_get_info reports now (the CUDA context is already taken out of it). Host: the RAM the ranks of
this host will still add (predicted per-rank RSS minus what each already uses) must fit in MemAvailable, or in
the cgroup's memory.max minus its usage when that is smaller (a container's OOM killer acts on the cgroup).
Pinned: pinned pages can be neither swapped nor reclaimed, so they are part of the host check. The
RLIMIT_MEMLOCK (`ulimit -l`) limit is reported when it is below the plan, but does not refuse: CUDA pins
host memory through its driver (cudaHostAlloc), which that limit does not govern; NCCL/RDMA registration is.

Disk (run_disk, after run): one DeepSpeed checkpoint is predicted from the model and the ZeRO stage
(checkpoint_bytes), the consolidated final model from the weights and the tokenizer (final_model_bytes).
The output filesystem must hold the most the run keeps at once: --keep-last checkpoints plus the one being
written (pruning follows a complete save), or --keep-last checkpoints plus the final model. Less than that
refuses the run; less than that plus DISK_HEADROOM is a warning.
"""

from __future__ import annotations

import dataclasses
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .dist import all_reduce
from .errors import GpuOutOfMemory, LongctxError
from .facts import Facts
from .plan import plan
from .plan_report import fmt_len
from .plan_search import host_knob, max_seq_len_that_fits, next_knobs
from .plan_types import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, GiB, Plan, Setup
from .units import size


@dataclass(frozen=True)
class Room:
    """What is free now on the machine `facts` describes (its sizes and `gpus`, the ranks sharing its RAM, are
    facts.gpu_mem, facts.host_mem and facts.gpus)."""
    facts: Facts
    gpu_free: Optional[int]         # bytes free on this rank's GPU now (None: no GPU)
    host_available: int             # bytes the ranks of this host may still take
    rss_now: int                    # this process's RSS now (already out of host_available)
    memlock_limit: Optional[int]    # RLIMIT_MEMLOCK soft limit in bytes; None = unlimited
    source: str = ""                # where host_available was read


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo as bytes ("MemAvailable: 123 kB" -> 125952)."""
    out = {}
    try:
        for line in Path(path).read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key.strip()] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1)
    except OSError:
        pass
    return out


def cgroup_room(root: str = "/sys/fs/cgroup") -> Optional[int]:
    """Bytes left under the cgroup memory limit (v2 memory.max, or v1), None when unlimited/unknown."""
    r = Path(root)
    for limit_f, usage_f in (("memory.max", "memory.current"),
                             ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = (r / limit_f).read_text().strip()
            usage = int((r / usage_f).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def memlock_limit() -> Optional[int]:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def probe(facts: Facts, local_rank: int) -> Room:
    import psutil

    gpu_free = None
    if facts.cuda:
        try:
            import torch

            gpu_free = torch.cuda.mem_get_info(local_rank)[0]
        except Exception:  # noqa: BLE001 - no usable GPU: host checks only
            pass
    mem = read_meminfo()
    available = mem.get("MemAvailable", psutil.virtual_memory().available)
    room = cgroup_room()
    source = "MemAvailable"
    if room is not None and room < available:
        available, source = room, "cgroup memory.max - memory.current"
    return Room(facts=facts, gpu_free=gpu_free, host_available=int(available),
                rss_now=int(psutil.Process().memory_info().rss), memlock_limit=memlock_limit(), source=source)


def _g(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


def knob_advice(setup: Setup, gpu_budget: float, host_mem: int, world: int) -> str:
    """The knob lines for a GPU refusal, re-planned for `gpu_budget` bytes of a GPU (what is free or the card, the
    CUDA context out of it) and `host_mem`, over the run's `world` ranks."""
    hw = Facts.of_sizes(gpus=world, gpu_mem=int(gpu_budget + CUDA_CONTEXT_BYTES), host_mem=int(host_mem))
    best = max_seq_len_that_fits(setup, hw)
    lines = [f"  the largest --max-seq-len that fits as configured: {fmt_len(best) if best else 'none'}"]
    for k, before, after, mx in next_knobs(setup, hw):
        lines.append(f"  {k.flag}: {k.what} (peak {before / GiB:.1f} -> {after / GiB:.1f} GiB; "
                     f"fits up to --max-seq-len {fmt_len(mx) if mx else 'none'})")
    return "\n".join(lines)


def check(p: Plan, m: Room) -> tuple[list[str], list[str]]:
    """(problems that refuse the run, notes). Pure: the machine and what is free on it are given."""
    problems, notes = [], []
    s, f = p.setup, m.facts
    if m.gpu_free is not None:
        need = p.gpu_peak * (1 + ALLOCATOR_SLACK)
        if need > m.gpu_free:
            problems.append(
                f"GPU: the plan needs {_g(need)} per rank (peak allocated {_g(p.gpu_peak)} in the "
                f"'{p.peak_phase}' phase + {ALLOCATOR_SLACK:.0%} allocator slack), but only {_g(m.gpu_free)} of "
                f"{_g(f.gpu_mem or 0)} is free on this GPU. Knobs:\n"
                + knob_advice(s, m.gpu_free, f.host_mem, s.world))
    add = f.gpus * max(0.0, p.host_per_rank - m.rss_now)
    if add > m.host_available:
        problems.append(
            f"host RAM: {f.gpus} rank(s) on this host would add {_g(add)} ({_g(p.host_per_rank)} per rank: "
            + ", ".join(f"{i.name} {_g(i.bytes)}" for i in p.host[1:] if i.bytes)
            + f"), but only {_g(m.host_available)} is available ({m.source}); this would end in an OOM kill. "
            # the host's knobs alone (no GPU verdicts): re-planned against what the ranks may take
            "Knobs: " + host_knob(p, dataclasses.replace(f, gpu_mem=None),
                                  usable=m.host_available + f.gpus * m.rss_now))
    pinned = p.pinned * f.gpus
    if pinned and m.memlock_limit is not None and pinned > m.memlock_limit:
        notes.append(f"pinned host memory: the plan pins {_g(pinned)} on this host, above RLIMIT_MEMLOCK "
                     f"(ulimit -l = {m.memlock_limit // 1024} KiB). CUDA's pinned allocations do not count against "
                     "it; raise it (ulimit -l unlimited) if NCCL or RDMA registration fails.")
    return problems, notes


def _worst_over_ranks(m: Room) -> Room:
    """Every rank judges by the least free GPU memory and host room of all ranks, so all decide alike."""
    big = float(1 << 62)
    free, avail, rss = all_reduce([float(m.gpu_free) if m.gpu_free is not None else big, float(m.host_available),
                                   float(m.rss_now)], "min")
    return dataclasses.replace(m, gpu_free=None if free >= big else int(free), host_available=int(avail),
                               rss_now=int(rss))


def run(setup: Setup, facts: Facts, local_rank: int, say: Callable[[str], None] = print,
        room: Optional[Room] = None) -> Plan:
    """Probe what is free on the machine `facts` describes (unless `room` is given), check, agree over all ranks:
    every rank judges by the worst rank's free memory, so all refuse together. Raises LongctxError with the reason
    and the knob."""
    p = plan(setup)
    m = _worst_over_ranks(room or probe(facts, local_rank))
    problems, notes = check(p, m)
    refused = bool(problems)
    for n in notes:
        say(f"preflight note: {n}")
    if refused:
        raise LongctxError("preflight refused the run before building the model (train.py --plan shows the "
                           "breakdown; --no-preflight skips this check):\n" + "\n".join(problems))
    free = f", {_g(m.gpu_free)} free on the GPU" if m.gpu_free is not None else ""
    say(f"preflight: predicted peak {_g(p.gpu_peak)} per GPU{free}; host {_g(p.host_per_rank)} per rank "
        f"x {m.facts.gpus}, {_g(m.host_available)} available; pinned {_g(p.pinned * m.facts.gpus)}")
    return p


def out_of_memory(error: BaseException, *, where: str, rank: int, setup: Setup, facts: Facts,
                  output_dir) -> GpuOutOfMemory:
    """The report of a CUDA out-of-memory error mid-run on the machine `facts` describes, with this rank's figures
    (train.py prints it and exits with its code; the launcher stops the other ranks)."""
    import torch  # the preflight's checks are pure: only this report and the probe read the device

    from .checkpoint import latest_complete  # checkpoint imports torch and DeepSpeed's state; only this report needs it

    cuda = torch.cuda.is_available()
    done = latest_complete(output_dir)
    return GpuOutOfMemory(out_of_memory_message(
        str(error), where=where, rank=rank, p=plan(setup), peak_allocated=torch.cuda.max_memory_allocated() if cuda
        else None, facts=facts, checkpoint=str(done) if done else None))


def out_of_memory_message(error: str, *, where: str, rank: int, p: Plan, peak_allocated: Optional[int],
                          facts: Facts, checkpoint: Optional[str]) -> str:
    """What train.py says when CUDA runs out of memory mid-run (pure: every figure is given).

    error: torch's message; where: what the rank was doing; p: the plan the preflight checked; peak_allocated:
    torch.cuda.max_memory_allocated() at the failure; facts: the machine (without gpu_mem: no card size, no knob
    lines); checkpoint: the last complete checkpoint, or None."""
    card_bytes = facts.gpu_mem
    first = error.strip().splitlines()[0] if error.strip() else "out of memory"
    lines = [f"GPU out of memory on rank {rank}, {where}.", f"  torch: {first}",
             f"  the memory plan predicted a peak of {_g(p.gpu_peak)} per GPU (its '{p.peak_phase}' phase)"
             + (f"; this rank had reached {_g(peak_allocated)} allocated" if peak_allocated is not None else "")
             + (f" of a {_g(card_bytes)} card" if card_bytes is not None else "") + "."]
    lines.append(f"Nothing is lost: the last complete checkpoint is {checkpoint}; rerun the same command with "
                 "--resume auto to continue from it." if checkpoint else
                 "No checkpoint was complete yet; the run starts over once it fits.")
    if card_bytes is not None:
        lines.append("Knobs that lower the peak (re-planned for this card):\n"
                     + knob_advice(p.setup, card_bytes - CUDA_CONTEXT_BYTES, facts.host_mem, p.setup.world))
    lines.append("train.py --plan (same arguments) shows the breakdown.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Disk
# --------------------------------------------------------------------------------------------

OPTIMIZER_BYTES_PER_PARAM = 12  # ZeRO's saved optimizer partitions: fp32 master + Adam exp_avg + exp_avg_sq
PER_RANK_OVERHEAD = 64 << 10   # per-rank model-states file (ZeRO-3 placeholders, shapes), RNG state, markers
DISK_HEADROOM = 0.10            # below need x (1 + this): a warning, since the prediction is not exact


def model_params(setup: Setup) -> int:
    """Parameters of the model: matmul weights, embeddings (the LM head too unless tied) and the norms."""
    s = setup.shape
    n = s.params + (2 * s.layers + 1) * s.hidden
    return n - s.hidden * s.vocab if setup.tied_embeddings else n


def checkpoint_bytes(setup: Setup) -> int:
    """One DeepSpeed checkpoint of this run, all ranks together: the optimizer partitions (12 B per parameter,
    whatever the precision or offload), plus below ZeRO-3 the module's weights in the training dtype (written
    by rank 0); ZeRO-3 ranks write only placeholders for them. Checked against the checkpoints of the tiny model's
    runs with zero2, zero3 and zero3_offload (tests/test_train_resume.py: within 5%)."""
    n = model_params(setup)
    weights = n * setup.act_bytes if setup.zero_stage < 3 else 0
    return n * OPTIMIZER_BYTES_PER_PARAM + weights + setup.world * PER_RANK_OVERHEAD


def dir_bytes(path) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def final_model_bytes(setup: Setup, tokenizer_dir=None) -> int:
    """The consolidated Hugging Face model: every weight in the training dtype, plus the tokenizer's files."""
    return model_params(setup) * setup.act_bytes + (dir_bytes(tokenizer_dir) if tokenizer_dir else 0) + (64 << 10)


@dataclass(frozen=True)
class DiskPlan:
    checkpoint: int       # bytes of one checkpoint
    checkpoints_at_once: int
    final_model: int      # 0 when not saved
    need: int             # the most the run adds at once

    def describe(self) -> str:
        parts = f"{self.checkpoints_at_once} checkpoint(s) of {size(self.checkpoint)} at once"
        if self.final_model:
            parts += f"; the final model {size(self.final_model)}"
        return parts


def disk_plan(setup: Setup, *, keep_last: int, saves: int, save_final_model: bool, tokenizer_dir=None) -> DiskPlan:
    """`saves`: checkpoints this run will write (at least the last step's)."""
    ckpt = checkpoint_bytes(setup)
    final = final_model_bytes(setup, tokenizer_dir) if save_final_model else 0
    at_once = min(keep_last + 1, max(1, saves))
    need = max(at_once * ckpt, min(keep_last, max(1, saves)) * ckpt + final)
    return DiskPlan(ckpt, at_once, final, need)


def check_disk(d: DiskPlan, free: int, where: str) -> tuple[list[str], list[str]]:
    """(problems that refuse the run, notes). Pure."""
    if free < d.need:
        return [f"disk: the run will keep up to {size(d.need)} in {where} ({d.describe()}), but only {size(free)} "
                "is free there, so a save would fail part-way. Knobs: free space there, a lower --keep-last, "
                "--no-save-final-model, or another --output-dir."], []
    if free < d.need * (1 + DISK_HEADROOM):
        return [], [f"disk: the run will keep up to {size(d.need)} in {where} ({d.describe()}) and {size(free)} is "
                    f"free: less than {DISK_HEADROOM:.0%} to spare if the prediction is low or something else "
                    "writes there"]
    return [], []


def free_bytes(output_dir) -> int:
    """Free bytes (for this user) on the filesystem that holds, or will hold, `output_dir`."""
    p = Path(output_dir).absolute()
    while not p.exists():
        p = p.parent
    return int(shutil.disk_usage(p).free)


def run_disk(setup: Setup, *, output_dir, keep_last: int, saves: int, save_final_model: bool,
             say: Callable[[str], None] = print, tokenizer_dir=None, free: Optional[int] = None) -> DiskPlan:
    """Predict what the run writes, compare it with the free space of the output filesystem (the least any rank
    sees; collective when distributed), and refuse (LongctxError) or warn. `free` overrides the probe."""
    d = disk_plan(setup, keep_last=keep_last, saves=saves, save_final_model=save_final_model,
                  tokenizer_dir=tokenizer_dir)
    free = int(all_reduce(float(free_bytes(output_dir) if free is None else free), "min"))
    problems, notes = check_disk(d, free, str(output_dir))
    for n in notes:
        say(f"preflight warning: {n}")
    if problems:
        raise LongctxError("preflight refused the run before building the model (--no-preflight skips this "
                           "check):\n" + "\n".join(problems))
    say(f"preflight: disk {size(d.need)} at most in {output_dir} ({d.describe()}), {size(free)} free")
    return d
