"""Checkpoints: DeepSpeed engine state + client state + per-rank RNG, saved atomically.

Layout:  <output_dir>/checkpoints/step-00000010/
             <DeepSpeed's files for tag "step-00000010">
             rng_state_rank{r}.pt      python / numpy / torch / cuda RNG of rank r
             trainer_state.json        step, epoch, samples seen, ... (also in DeepSpeed's client state)
             COMPLETE                  written last, by rank 0, after every rank has finished saving

step-NNNNNNNN.universal/ beside a checkpoint is its world-size-free form, made when a run resumes on another
number of ranks (universal.py); it is pruned with its original.

A directory without COMPLETE is a save that was interrupted: it is never resumed from, never counts
toward --keep-last, and is deleted by the next save. "latest" is the newest directory with COMPLETE.

The end of a run is exported here too: save_final_model writes <output_dir>/final_model/ atomically (a --lora run's
adapter: lora.save_final).

Exact resume needs one thing DeepSpeed does not restore: CPU Adam's bias-correction powers (see
restore_cpu_adam_bias_correction); load() restores them.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import LongctxError
from .modeling import restore_inference_settings
from .runs import write_text_atomic as _write_atomic
from .units import size

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


def count_saves(total_steps: int, save_interval: int, start_step: int = 0) -> int:
    """Checkpoints a run writes over steps start_step+1 .. total_steps (every save_interval, and the last)."""
    steps = range(start_step + 1, total_steps + 1)
    return sum(1 for s in steps if (save_interval and s % save_interval == 0) or s == total_steps)


# Messages of torch's zip writer when a write fails (it keeps no errno): "[enforce fail at inline_container.cc]
# unexpected pos N vs M", "PytorchStreamWriter failed writing file ...".
TORCH_WRITER_FAILURES = ("inline_container", "PytorchStreamWriter", "unexpected pos", "file write failed")


def _chain(exc: BaseException) -> list[BaseException]:
    out = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def write_failure(exc: BaseException, what: str, target: Path, output_dir: str | Path) -> LongctxError | None:
    """The error to report when writing `what` to `target` raised `exc`; None if `exc` is not a failed write.

    Out of space when an OSError in the chain says ENOSPC/EDQUOT, or the filesystem is (nearly) full now, which
    also covers a rank whose own write succeeded but whose peer died of a full disk."""
    chain = _chain(exc)
    text = " | ".join(f"{type(e).__name__}: {e}" for e in chain)
    codes = {e.errno for e in chain if isinstance(e, OSError)}
    probe = Path(target).absolute()
    while not probe.exists():
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    full = bool(codes & {errno.ENOSPC, errno.EDQUOT}) or "No space left" in text or \
        usage.free <= min(64 << 20, 0.05 * usage.total)
    if not (full or codes or any(k in text for k in TORCH_WRITER_FAILURES)):
        return None
    reason = (f"the filesystem is out of space ({size(usage.free)} free of {size(usage.total)})" if full
              else "the file could not be written")
    prev = latest_complete(output_dir)
    after = (f"The previous complete checkpoint, {prev}, is intact: make room there (or lower --keep-last, or move "
             "the run directory) and continue with --resume auto." if prev else
             "There is no complete checkpoint yet: make room and start the run again.")
    return LongctxError(f"saving {what} to {target} failed: {reason}. {after}\n  cause: {text}")


@contextmanager
def reporting_write_failures(what: str, target: Path, output_dir: str | Path, *, remove_partial: bool = False):
    """Turn a failed write inside the block into a LongctxError that says why and what is still safe (see
    write_failure); with remove_partial, the half-written `target` is deleted to give the space back."""
    try:
        yield
    except LongctxError:
        raise
    except Exception as e:
        err = write_failure(e, what, target, output_dir)
        if err is None:
            raise
        if remove_partial:
            shutil.rmtree(target, ignore_errors=True)
        raise err from None


def save(engine, output_dir: str | Path, step: int, client_state: dict, keep_last: int, *, rank: int,
         barrier, on_written: Callable[[Path], None] | None = None) -> Path:
    """Save a checkpoint of every rank; COMPLETE is written last, and `on_written(path)` runs just before (the
    Trainer's callbacks: a test parks the ranks there to kill -9 a save). A write that fails (a full disk) stops
    with a LongctxError on the rank that saw it, the partial directory removed by rank 0 and the previous complete
    checkpoint untouched (pruning only follows a complete save)."""
    output_dir = Path(output_dir)
    d = root(output_dir) / tag(step)
    if rank == 0:
        d.parent.mkdir(parents=True, exist_ok=True)
        if d.exists():  # an interrupted save of the same step
            shutil.rmtree(d)
    barrier()
    with reporting_write_failures(f"checkpoint {d.name}", d, output_dir, remove_partial=rank == 0):
        engine.save_checkpoint(str(d.parent), tag=d.name, client_state=client_state, save_latest=False)
        torch.save(rng_state(), d / f"rng_state_rank{rank}.pt")
        if on_written is not None:
            on_written(d)
        barrier()
        if rank == 0:
            _write_atomic(d / "trainer_state.json", json.dumps(client_state, indent=2, default=str))
            _write_atomic(d / MARKER, json.dumps({"step": step, "time": time.time()}))
    if rank == 0:
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
    # a universal form (universal.py) goes with its original; an interrupted conversion (.tmp) goes at once
    for p in root(output_dir).glob("step-*.universal*"):
        base = p.with_name(p.name.split(".", 1)[0])
        if p.name.endswith(".tmp") or not is_complete(base):
            shutil.rmtree(p, ignore_errors=True)



def save_final_model(engine, tok, cfg, rank: int, zero3: bool, barrier) -> Path:
    """The run's export (lora.save_final is --lora's): gather the full weights (ZeRO-3: layer by layer onto rank 0)
    and write a from_pretrained-able directory atomically, final_model.tmp then a rename. Its config gets the input's
    inference settings back."""
    state = engine._zero3_consolidated_16bit_state_dict() if zero3 else (
        engine.module.state_dict() if rank == 0 else None)
    out = Path(cfg.output_dir) / "final_model"
    if rank == 0:
        lm = engine.module.lm
        state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        restore_inference_settings(lm.config, cfg.model)
        with reporting_write_failures("the final model", tmp, cfg.output_dir, remove_partial=True):
            lm.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            tok.save_pretrained(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    barrier()
    return out

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


def load(engine, path: Path, rank: int, *, universal: Path | None = None) -> dict:
    """Load checkpoint `path` into the engine; with `universal` (its world-size-free form, universal.py; the engine
    built with checkpoint.load_universal) a checkpoint of another number of ranks. Each rank takes the RNG state of
    its own rank, or, on a rank the checkpoint did not have, that of rank (rank mod its ranks)."""
    source = path.parent if universal is None else Path(universal)
    load_path, client_state = engine.load_checkpoint(str(source), tag=path.name, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise LongctxError(f"DeepSpeed could not load the checkpoint {path}")
    restore_cpu_adam_bias_correction(engine.optimizer)
    rng_file = path / f"rng_state_rank{rank}.pt"
    if universal is not None and not rng_file.exists():
        written = len(list(path.glob("rng_state_rank*.pt")))
        rng_file = path / f"rng_state_rank{rank % max(1, written)}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}


def cpu_adam_optimizers(optimizer) -> list:
    """The DeepSpeedCPUAdam instances inside a (ZeRO-wrapped) optimizer: the wrapper keeps the basic
    optimizer as `.optimizer`, sometimes one level further down."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return []
    found, seen, todo = [], set(), [optimizer]
    while todo:
        o = todo.pop()
        if o is None or id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, DeepSpeedCPUAdam):
            found.append(o)
        else:
            todo.append(getattr(o, "optimizer", None))
    return found


def restore_cpu_adam_bias_correction(optimizer) -> int:
    """Bring DeepSpeed's CPU Adam to exactly the state an uninterrupted run has after the loaded step.

    The C++ side of DeepSpeedCPUAdam (csrc/includes/cpu_adam.h, Adam_Optimizer::IncrementStep) keeps
    beta1^t and beta2^t as floats and, when called with step == its own step + 1, multiplies them by
    beta once more; for any other step it recomputes them with std::pow. A fresh optimizer loaded from a
    checkpoint at step s starts at its step 0, so step s+1 takes the pow branch, and float(pow(beta,
    s+1)) differs in the last bit from s+1 float multiplications at many steps (betas 0.9/0.95: s+1 =
    6, 7, 8, 9, 10, ...). The bias corrections, and with them every later parameter, then differ from
    the uninterrupted run. This replays the multiplication: one update per past step on a 1-element
    scratch tensor, with the optimizer's own betas, so the C++ state becomes what s real steps leave.
    Call it after the optimizer state is loaded (the per-parameter 'step' is the step to replay to).
    Returns that step (0 when there is no CPU Adam or nothing to replay).
    """
    replayed = 0
    for opt in cpu_adam_optimizers(optimizer):
        steps = {int(st["step"]) for st in opt.state.values() if isinstance(st, dict) and "step" in st}
        if not steps:
            continue
        if len(steps) > 1:
            raise LongctxError(f"cannot restore CPU Adam exactly: its parameter groups are at different steps "
                               f"{sorted(steps)}")
        step = steps.pop()
        group = opt.param_groups[0]
        beta1, beta2 = group["betas"]
        scratch = [torch.zeros(1, dtype=torch.float32) for _ in range(4)]  # param, grad, exp_avg, exp_avg_sq
        for k in range(1, step + 1):
            opt.ds_opt_adam.adam_update(opt.opt_id, k, 0.0, beta1, beta2, group["eps"], 0.0,
                                        group["bias_correction"], *scratch)
        replayed = max(replayed, step)
    return replayed
