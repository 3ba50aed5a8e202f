#!/usr/bin/env python
"""train.py with faults injected through the Trainer's callbacks, for the tests (launched in place of train.py).

    LONGCTX_TEST_NAN_AT_STEP=k      rank 0's loss of step k is NaN ("k+": of every step from k on)
    LONGCTX_TEST_PAUSE_AFTER_STEP=k every rank parks after step k (its checkpoint saved), so a test can kill -9
    LONGCTX_TEST_PAUSE_IN_SAVE=k    every rank parks inside the save of step k, before it is marked complete
    LONGCTX_TEST_OOM_AT_STEP=k      the last rank raises torch.OutOfMemoryError (CUDA's) after the forward of step k
    LONGCTX_TEST_PAUSE_IN_CONVERSION=1  rank 0 parks when a checkpoint's universal form is written, before its
                                    rename into place (the other ranks wait for it in a barrier)
A parked run first writes the marker <output-dir>.PAUSED_<where> beside its run directory.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from longctx.trainer import Callback  # noqa: E402


def _park(trainer, where: str, step: int) -> None:
    if trainer.rank == 0:
        out = Path(trainer.cfg.output_dir)
        out.with_name(f"{out.name}.PAUSED_{where}").write_text(str(step))
    while True:
        time.sleep(1)


class Faults(Callback):
    def __init__(self, env):
        self.nan = env.get("LONGCTX_TEST_NAN_AT_STEP", "")
        self.after = env.get("LONGCTX_TEST_PAUSE_AFTER_STEP", "")
        self.in_save = env.get("LONGCTX_TEST_PAUSE_IN_SAVE", "")
        self.oom = env.get("LONGCTX_TEST_OOM_AT_STEP", "")
        self.in_conversion = env.get("LONGCTX_TEST_PAUSE_IN_CONVERSION", "")

    def on_loss(self, trainer, step, micro, loss):
        if self.oom == str(step) and trainer.rank == trainer.world - 1:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by "
                                         "tests/fault_train.py)\nsecond line of torch's message")
        v = self.nan
        hit = v and (step >= int(v[:-1]) if v.endswith("+") else step == int(v))
        return loss * float("nan") if hit and trainer.rank == 0 and micro == 0 else loss

    def on_checkpoint_written(self, trainer, step, path):
        if self.in_save == str(step):
            _park(trainer, "IN_SAVE", step)

    def on_universal_written(self, trainer, path):
        if self.in_conversion:
            _park(trainer, "IN_CONVERSION", trainer.resume_plan.step)

    def on_step_end(self, trainer, step, row):
        if self.after == str(step):
            _park(trainer, "AFTER_STEP", step)


if __name__ == "__main__":
    train.exit_now(train.main(sys.argv[1:], callbacks=[Faults(os.environ)]))
