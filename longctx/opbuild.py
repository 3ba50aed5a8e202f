"""DeepSpeed's CPU Adam op (ZeRO with the optimizer offloaded): built in a per-environment directory,
announced before its first build, and never waited on silently.

DeepSpeed JIT-builds the op with torch.utils.cpp_extension, in $TORCH_EXTENSIONS_DIR/cpu_adam, or by default
in ~/.cache/torch_extensions/py<ver>_<accelerator>/cpu_adam, a directory every virtualenv of the user shares.
The first build takes minutes (3.5 on 2 cores) and prints nothing. The builder holds a lock file there; a
process that finds it sleeps until it disappears, forever if a killed build left it behind.

    prepare_cpu_adam(ds_config, local_rank=..., barrier=..., say=...)   before deepspeed.initialize
    probe_cpu_once()                                                      before DeepSpeed loads any op

sets TORCH_EXTENSIONS_DIR to this environment's directory unless the user set one, and on local rank 0
waits out a build in progress (saying whose), refuses a stale lock (saying what to delete), announces a
first build and builds; the other ranks load the op after it.
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Callable

from .errors import LongctxError

ENV = "TORCH_EXTENSIONS_DIR"
OP = "cpu_adam"


def environment_extensions_dir() -> Path:
    """This Python environment's own extensions directory: <sys.prefix>/torch_extensions where the environment
    is writable (the Makefile uses the same for .venv), else one under ~/.cache/torch_extensions named after it."""
    prefix = Path(sys.prefix)
    if os.access(prefix, os.W_OK):
        return prefix / "torch_extensions"
    tag = hashlib.sha256(str(prefix.resolve()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "torch_extensions" / f"{prefix.name}-{tag}"


def use_environment_extensions_dir(environ=os.environ) -> Path:
    """Point TORCH_EXTENSIONS_DIR at this environment's directory unless it is set; return the one in use."""
    if not environ.get(ENV):
        environ[ENV] = str(environment_extensions_dir())
    return Path(environ[ENV])


def build_dir(name: str = OP, environ=os.environ) -> Path:
    """Where torch.utils.cpp_extension builds the op `name` (its _get_build_directory, without creating it)."""
    if environ.get(ENV):
        return Path(environ[ENV]) / name
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    acc = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
           f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{py}_{acc}" / name


def probe_cpu_once() -> None:
    """py-cpuinfo's get_cpu_info() probes the CPU in a fresh Python subprocess (1.4 s of a core), and DeepSpeed calls
    it whenever an op builder works out its compiler flags (twice) and whenever a CPU Adam is made: three times per
    rank of a CPU run with the optimizer offloaded, about 2.5 s of each launch on 2 cores. The CPU does not change
    while a process runs: probe once per process, and give each caller its own copy of the answer."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed falls back to lscpu
        return
    probe = cpuinfo.get_cpu_info
    if getattr(probe, "probed_once", False):
        return
    answer: list[dict] = []

    def get_cpu_info() -> dict:
        if not answer:
            answer.append(probe())
        return copy.deepcopy(answer[0])

    get_cpu_info.probed_once = True  # type: ignore[attr-defined]
    cpuinfo.get_cpu_info = get_cpu_info


def needs_cpu_adam(ds_config: dict) -> bool:
    """DeepSpeed builds CPU Adam for an Adam optimizer offloaded to cpu/nvme, unless torch_adam is set."""
    off = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    opt = ds_config.get("optimizer") or {}
    return (isinstance(off, dict) and off.get("device") in ("cpu", "nvme")
            and str(opt.get("type", "adamw")).lower() in ("adam", "adamw")
            and not (opt.get("params") or {}).get("torch_adam", False))


def lock_holders(lock: Path) -> list[tuple[int, str]]:
    """(pid, command line) of the processes of this machine that hold `lock` open (torch's builder keeps its
    lock file open for the whole build). Processes whose descriptors cannot be read are not seen."""
    target = os.path.realpath(lock)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    found.append((int(proc.name), cmd))
                    break
            except OSError:
                continue
    return found


def wait_for_build_lock(lock: Path, say: Callable[[str], None], *, poll_s: float = 1.0, report_s: float = 30.0,
                        sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic
                        ) -> None:
    """Return once `lock` is gone. While a process holds it (a build in progress), say so every report_s
    seconds; a lock that no process holds is stale (a build was killed): LongctxError saying what to delete."""
    start, last = clock(), None
    while lock.exists():
        holders = lock_holders(lock)
        if not holders:
            if not lock.exists():  # released between the two looks
                return
            raise LongctxError(
                f"a stale build lock blocks DeepSpeed's {OP} op: {lock} exists but no process on this machine "
                f"holds it, so an earlier build was interrupted and every run would wait on it forever. If no build "
                f"is running on another machine sharing {lock.parent}, delete it:\n  rm {lock}")
        now = clock()
        if last is None or now - last >= report_s:
            pid, cmd = holders[0]
            say(f"waiting for another build of DeepSpeed's {OP} op to finish in {lock.parent} (pid {pid}: "
                f"{cmd[:120]}); {now - start:.0f} s so far")
            last = now
        sleep(poll_s)


def prepare_cpu_adam(ds_config: dict, *, local_rank: int, barrier: Callable[[], None],
                     say: Callable[[str], None] = print) -> bool:
    """Make DeepSpeed's CPU Adam loadable before deepspeed.initialize needs it (see the module docstring).
    Collective (every rank calls it: local rank 0 builds, then the others load). Returns whether the op is used."""
    if not needs_cpu_adam(ds_config):
        return False
    use_environment_extensions_dir()
    from deepspeed.ops.op_builder import CPUAdamBuilder

    if local_rank == 0:
        bdir = build_dir()
        wait_for_build_lock(bdir / "lock", say)
        first = not (bdir / f"{OP}.so").exists()
        if first:
            say(f"building DeepSpeed's CPU Adam op in {bdir} (once per environment; a few minutes) ...")
        t = time.perf_counter()
        CPUAdamBuilder().load(verbose=False)
        if first:
            say(f"built CPU Adam in {time.perf_counter() - t:.0f} s")
    barrier()
    if local_rank != 0:
        CPUAdamBuilder().load(verbose=False)
    return True
