"""The ZeRO-3 optimizer train.py runs: DeepSpeed's DeepSpeedZeroOptimizer_Stage3 with our fixes mixed in.

    with zero3_optimizer.installed():
        engine, *_ = deepspeed.initialize(...)

DeepSpeed's engine imports DeepSpeedZeroOptimizer_Stage3 from deepspeed.runtime.zero.stage3 when it builds the
ZeRO-3 optimizer (engine.py _configure_zero_optimizer, at call time), so `installed()` puts LongctxZeroStage3 under
that name for the duration of deepspeed.initialize and puts DeepSpeed's class back afterwards. Each fix is a mixin
with its own module and header (why, and the upstream issue to file):
    longctx.twin_flow.TwinFlowMixin    offload_optimizer.ratio < 1: lr schedule, checkpointed state, pinned cache
Without optimizer offload the mixins change nothing (ds_configs/zero3.json runs DeepSpeed's code as it is).
"""

from __future__ import annotations

import contextlib

from deepspeed.runtime.zero import stage3
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

from .twin_flow import TwinFlowMixin


class LongctxZeroStage3(TwinFlowMixin, DeepSpeedZeroOptimizer_Stage3):
    """DeepSpeed 0.19.8's ZeRO-3 optimizer with longctx's fixes (see the mixins)."""


@contextlib.contextmanager
def installed():
    """LongctxZeroStage3 as deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3 inside the block."""
    original = stage3.DeepSpeedZeroOptimizer_Stage3
    stage3.DeepSpeedZeroOptimizer_Stage3 = LongctxZeroStage3
    try:
        yield LongctxZeroStage3
    finally:
        stage3.DeepSpeedZeroOptimizer_Stage3 = original
