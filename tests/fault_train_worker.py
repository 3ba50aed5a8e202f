#!/usr/bin/env python
"""train.py with faults injected through the Trainer's callbacks, for the tests (launched in place of train.py).

    LONGCTX_TEST_NAN_AT_STEP=k      rank 0's loss of step k is NaN ("k+": of every step from k on)
    LONGCTX_TEST_PAUSE_AFTER_STEP=k every rank parks after step k (its checkpoint saved), so a test can kill -9
    LONGCTX_TEST_PAUSE_IN_SAVE=k    every rank parks inside the save of step k, before it is marked complete
    LONGCTX_TEST_OOM_AT_STEP=k      the last rank raises torch.OutOfMemoryError (CUDA's) after the forward of step k
    LONGCTX_TEST_PAUSE_IN_CONVERSION=1  rank 0 parks when a checkpoint's universal form is written, before its
                                    rename into place (the other ranks wait for it in a barrier)
    LONGCTX_TEST_OVERLAP_RECORD=f   with the overlapped optimizer step: each update's last sub-group (in forward
                                    order) waits until the next forward enters decoder layer 0 (or the main thread
                                    waits for the whole update); rank 0 writes what it saw to f (JSON lines)
    LONGCTX_TEST_OVERLAP_SKEW=s     with the overlapped optimizer step: the last rank sleeps s seconds before each
                                    sub-group's update, so the ranks' background updates run at different paces
A parked run first writes the marker <output-dir>.PAUSED_<where> beside its run directory.
"""

import json
import os
import sys
import threading
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
                                         "tests/fault_train_worker.py)\nsecond line of torch's message")
        v = self.nan
        hit = v and (step >= int(v[:-1]) if v.endswith("+") else step == int(v))
        return loss * float("nan") if hit and trainer.rank == 0 and micro == 0 else loss

    def on_checkpoint_written(self, trainer, step, path):
        if self.in_save == str(step):
            _park(trainer, "IN_SAVE", step)

    def on_universal_written(self, trainer, path):
        if self.in_conversion:
            _park(trainer, "IN_CONVERSION", trainer.resuming.step)

    def on_step_end(self, trainer, step, row):
        if self.after == str(step):
            _park(trainer, "AFTER_STEP", step)


class OverlapRecorder(Callback):
    """Shows that the next forward runs while the update is still running: the last sub-group's update (in forward
    order) is held until decoder layer 0's forward has begun, and that forward records which sub-groups were still
    being updated when it began. A step that waited for the whole update first lets it go on (recorded too); the
    timeout only bounds a broken run."""

    def __init__(self, path: str):
        self.path, self.rows, self.update = path, [], 0
        self.began, self.finish_wait = threading.Event(), threading.Event()

    def on_built(self, trainer):
        self.opt, self.rank = trainer.engine.optimizer, trainer.rank
        self.opt.overlap_observer = self
        lm = trainer.engine.module.lm
        lm.model.layers[0].register_forward_pre_hook(self._layer0_forward)
        self.holders = {"embedding": lm.model.embed_tokens.weight, "head": lm.lm_head.weight,
                        "last_layer": lm.model.layers[-1].self_attn.q_proj.weight}

    def _layer0_forward(self, module, args):
        if self.update and not self.began.is_set():
            self.rows.append({"update": self.update, "event": "layer 0 forward began",
                              "pending": sorted(self.opt.pending_sub_groups())})
            self.began.set()

    # the observer (longctx.overlap_step.OverlapObserver)
    def launched(self, optimizer):
        self.update += 1
        self.began.clear()
        self.finish_wait.clear()
        order = optimizer.forward_order()
        self.last = order[-1]
        self.rows.append({"update": self.update, "event": "order", "order": order,
                          **{k: optimizer.sub_group_of(p) for k, p in self.holders.items()}})

    def before_update(self, optimizer, sub_group):
        if sub_group == self.last:
            t = time.monotonic()
            while not (self.began.is_set() or self.finish_wait.is_set()) and time.monotonic() - t < 120:
                self.began.wait(0.05)
            self.rows.append({"update": self.update, "event": "last sub-group update starts", "sub_group": sub_group,
                              "after_layer0_forward": self.began.is_set()})

    def finishing(self, optimizer):
        self.finish_wait.set()

    def on_step_end(self, trainer, step, row):
        if self.rank == 0:
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)


class OverlapSkew(Callback):
    """The last rank's background update runs behind the others' (an observer's hook sleeps in its thread)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_built(self, trainer):
        if trainer.rank == trainer.world - 1:
            trainer.engine.optimizer.overlap_observer = self

    def launched(self, optimizer):
        pass

    def before_update(self, optimizer, sub_group):
        time.sleep(self.seconds)

    def finishing(self, optimizer):
        pass


def callbacks(env) -> list:
    extra = [OverlapRecorder(env["LONGCTX_TEST_OVERLAP_RECORD"])] if env.get("LONGCTX_TEST_OVERLAP_RECORD") else []
    if env.get("LONGCTX_TEST_OVERLAP_SKEW"):
        extra.append(OverlapSkew(float(env["LONGCTX_TEST_OVERLAP_SKEW"])))
    return [Faults(env)] + extra


if __name__ == "__main__":
    train.exit_now(train.main(sys.argv[1:], callbacks=callbacks(os.environ)))
