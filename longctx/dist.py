"""The distributed environment of a run: who this rank is, the process group, the one reduction over ranks, and the
cleanups DeepSpeed and the libraries leave to us.

    rank, world, local_rank = env()                  the launcher's variables; a plain `python` is a world of one
    init(cuda, rank)                                 NCCL on GPUs, gloo on CPU (through DeepSpeed), once
    all_reduce([gpu, host], "max")                   every rank's values reduced element-wise; all ranks agree

torch is imported inside the functions that use it: train.py calls env() before it knows whether it trains, and
`--plan` and the argument errors should not wait for torch.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path

OPS = ("sum", "max", "min")


def env() -> tuple[int, int, int]:
    """Rank, world size, local rank; a plain `python train.py` becomes a world of one on a free port."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def local_world(world: int) -> int:
    """The ranks of this host (they share its RAM and GPUs); `world` where the launcher does not say."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def init(cuda: bool, rank: int) -> None:
    """The process group, unless one exists: NCCL on GPUs, gloo on CPU. On CPU, DeepSpeed's shared-memory buffers
    are unlinked once every rank has mapped them (release_deepspeed_shm)."""
    import deepspeed  # heavy, and only a run that trains gets here
    import torch

    from .opbuild import probe_cpu_once

    probe_cpu_once()  # before DeepSpeed's CPU backend loads its shared-memory comm op (below) and CPU Adam (later)
    if torch.distributed.is_initialized():
        return
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if not cuda:
        torch.distributed.barrier()  # every rank has mapped every peer's buffer: the names can go
        release_deepspeed_shm(rank)


def barrier() -> None:
    import torch

    torch.distributed.barrier()


def is_distributed() -> bool:
    """A process group of more than one rank exists."""
    import torch.distributed as td

    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def all_reduce(x, op: str = "sum", device=None):
    """`x` (a number, a list of numbers or a tensor) reduced element-wise over every rank by `op` (sum, max, min):
    the same kind back (a tensor on x's device; numbers as float64), x's values where there is one rank. The
    collective runs on `device`, by default this rank's GPU where there is one (NCCL reduces CUDA tensors only), else
    the CPU. A tensor passed in is not changed."""
    import torch
    import torch.distributed as td

    t = x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)
    if is_distributed():
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        r = t.to(device, copy=True)
        td.all_reduce(r, op={"sum": td.ReduceOp.SUM, "max": td.ReduceOp.MAX, "min": td.ReduceOp.MIN}[op])
        t = r.to(t.device)
    return t if isinstance(x, torch.Tensor) else t.tolist()


def announce(rank: int):
    """print() for what any rank may have to say (the process that prepares the data), its rank named."""
    prefix = f"[rank {rank}] " if rank else ""
    return lambda msg: print(prefix + msg, flush=True)


def release_deepspeed_shm(rank: int) -> None:
    """DeepSpeed's CPU backend maps a 66 MB shared-memory all-reduce buffer per rank under /dev/shm and never
    unlinks it, so every CPU run (or killed run) leaves it behind in RAM. Unlinking our own name once all ranks
    have mapped it keeps the mapping alive and frees the memory when the processes exit."""
    port = os.environ.get("MASTER_PORT", "")
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_{rank}"):
        path.unlink(missing_ok=True)


def quiet_libraries() -> None:
    """transformers' and DeepSpeed's chatter off (errors and warnings stay), tokenizers' fork warning off."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch.utils.checkpoint.*")
    try:
        import transformers  # heavy; imported here only to silence it

        transformers.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
