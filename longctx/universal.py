"""World-size-free checkpoints: a ZeRO-3 checkpoint converted once into DeepSpeed's universal form, so that a run
continues on another number of ranks or another sequence-parallel degree (longctx/resume.py decides when).

    checkpoints/step-00000010/              the original, written by the ranks of its run; only ever read here
    checkpoints/step-00000010.universal/    step-00000010/  DeepSpeed's universal layout: zero/<param>/{fp32,
                                                            exp_avg,exp_avg_sq}.pt (whole tensors), zero/
                                                            optimizer_state.pt, the model_states files
                                            COMPLETE        written last

The conversion is DeepSpeed's own (deepspeed.checkpoint.ds_to_universal, which handles ZeRO-3 with the optimizer
offloaded: the optimizer files hold the same fp32 partitions and Adam moments either way), run in-process on rank 0
into step-N.universal.tmp, which is renamed into place once complete. A conversion killed at any point leaves the
original as it was and a .tmp that the next conversion deletes and redoes; checkpoint.prune removes a universal
form with its original. Loading is DeepSpeed's too: with the ds_config's checkpoint.load_universal, ZeRO-3 takes
each parameter's whole fp32 weight and moments and keeps its own partition of them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from .errors import LongctxError

SUFFIX = ".universal"
MARKER = "COMPLETE"


def path_for(ckpt: Path) -> Path:
    """Where the universal form of checkpoint `ckpt` (.../checkpoints/step-N) is kept: beside it."""
    ckpt = Path(ckpt)
    return ckpt.with_name(ckpt.name + SUFFIX)


def is_complete(ckpt: Path) -> bool:
    return (path_for(ckpt) / MARKER).is_file()


def is_zero3_checkpoint(ckpt: Path) -> bool:
    """ZeRO-3 writes one model_states file per rank (zero_pp_rank_R_mp_rank_00_model_states.pt)."""
    return (Path(ckpt) / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()


def ds_config_for_load(ds_config: dict) -> dict:
    """The ds_config that loads a universal checkpoint (a copy; the run's own is unchanged)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def convert(ckpt: Path, *, on_written: Optional[Callable[[Path], None]] = None) -> Path:
    """Rank 0: the universal form of `ckpt`, converted unless a complete one is there. `on_written(tmp)` runs when
    the files are written, before the rename (a test parks there to kill -9 the conversion)."""
    from deepspeed.checkpoint import ds_to_universal

    from .checkpoint import write_failure
    from .runs import write_text_atomic

    ckpt, final = Path(ckpt), path_for(ckpt)
    if is_complete(ckpt):
        return final
    tmp = final.with_name(final.name + ".tmp")
    for stale in (tmp, final):  # an interrupted conversion; a final without COMPLETE is never made by a rename
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(tmp / ckpt.name), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    log = io.StringIO()  # its progress bars and prints; shown only if it fails
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
        if on_written is not None:
            on_written(tmp)
        write_text_atomic(tmp / MARKER, json.dumps({"source": str(ckpt), "time": time.time()}))
    except Exception as e:  # the original is untouched either way; the partial form goes
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, LongctxError):
            raise
        raise write_failure(e, f"the universal form of {ckpt.name}", tmp, ckpt.parent.parent) or LongctxError(
            f"converting {ckpt} into the world-size-free (universal) form failed: {type(e).__name__}: {e}\n"
            f"  DeepSpeed's converter said:\n{log.getvalue()[-3000:]}") from None
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def ensure(ckpt: Path, *, rank: int, barrier, say=print,
           on_written: Optional[Callable[[Path], None]] = None) -> Path:
    """Collective: the universal form of `ckpt`, converted by rank 0 if it is not there yet."""
    if rank == 0:
        if is_complete(ckpt):
            say(f"resume: using the universal form {path_for(ckpt)} converted earlier")
        else:
            say(f"resume: converting {ckpt} into the world-size-free (universal) form {path_for(ckpt)} ...")
            t0 = time.monotonic()
            convert(ckpt, on_written=on_written)
            say(f"resume: converted in {time.monotonic() - t0:.1f} s; the original is unchanged")
    barrier()
    if not is_complete(ckpt):
        raise LongctxError(f"the universal form of {ckpt} is missing after its conversion by rank 0: is "
                           f"{ckpt.parent} on a filesystem that every rank sees?")
    return path_for(ckpt)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
