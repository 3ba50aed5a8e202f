"""Checkpoints: DeepSpeed engine state + client state + per-rank RNG, saved atomically.

Layout:  <output_dir>/checkpoints/step-00000010/
             <DeepSpeed's files for tag "step-00000010">
             rng_state_rank{r}.pt      python / numpy / torch / cuda RNG of rank r
             trainer_state.json        step, epoch, samples seen, ... (also in DeepSpeed's client state)
             COMPLETE                  written last, by rank 0, after every rank has finished saving

A directory without COMPLETE is a save that was interrupted: it is never resumed from, never counts
toward --keep-last, and is deleted by the next save. "latest" is the newest directory with COMPLETE.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import LongctxError

MARKER = "COMPLETE"
_TAG = re.compile(r"^step-(\d{8})$")


def tag(step: int) -> str:
    return f"step-{step:08d}"


def root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path, bool]]:
    r = root(output_dir)
    if not r.is_dir():
        return []
    out = []
    for d in r.iterdir():
        m = _TAG.match(d.name)
        if m and d.is_dir():
            out.append((int(m.group(1)), d, is_complete(d)))
    return sorted(out)


def latest_complete(output_dir: str | Path) -> Path | None:
    done = [p for _, p, ok in list_checkpoints(output_dir) if ok]
    return done[-1] if done else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(engine, output_dir: str | Path, step: int, client_state: dict, keep_last: int, *, rank: int,
         barrier, on_written: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint `step`, then mark it complete; `on_written(path)` runs in between (the Trainer's
    callbacks: a test parks the ranks there to kill -9 a save)."""
    output_dir = Path(output_dir)
    d = root(output_dir) / tag(step)
    if rank == 0:
        d.parent.mkdir(parents=True, exist_ok=True)
        if d.exists():  # an interrupted save of the same step
            shutil.rmtree(d)
    barrier()
    engine.save_checkpoint(str(d.parent), tag=d.name, client_state=client_state, save_latest=False)
    torch.save(rng_state(), d / f"rng_state_rank{rank}.pt")
    if on_written is not None:
        on_written(d)
    barrier()
    if rank == 0:
        _write_atomic(d / "trainer_state.json", json.dumps(client_state, indent=2, default=str))
        _write_atomic(d / MARKER, json.dumps({"step": step, "time": time.time()}))
        prune(output_dir, keep_last)
    barrier()
    return d


def prune(output_dir: Path, keep_last: int) -> None:
    ckpts = list_checkpoints(output_dir)
    complete = [s for s, _, ok in ckpts if ok]
    keep = set(complete[-keep_last:])
    newest = complete[-1] if complete else -1
    for s, p, ok in ckpts:
        if (ok and s not in keep) or (not ok and s < newest):
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        return latest_complete(output_dir)
    p = Path(resume)
    if not p.is_dir() or not _TAG.match(p.name):
        raise LongctxError(f"--resume {resume}: not a checkpoint directory (expected .../checkpoints/step-NNNNNNNN)")
    if not is_complete(p):
        raise LongctxError(f"--resume {resume}: checkpoint is incomplete (no {MARKER} marker; the save was "
                           "interrupted)")
    return p


def load(engine, path: Path, rank: int) -> dict:
    load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise LongctxError(f"DeepSpeed could not load the checkpoint {path}")
    rng_file = path / f"rng_state_rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}
