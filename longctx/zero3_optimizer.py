"""longctx's ZeRO-3 optimizer: DeepSpeed's DeepSpeedZeroOptimizer_Stage3 with our mixins, put in place for
deepspeed.initialize only.

    with zero3_optimizer.installed():
        engine, *_ = deepspeed.initialize(...)

Why a subclass: where DeepSpeed's ZeRO-3 step is wrong or slow for us, the fix lives in one named mixin with its
reason and upstream issue in its header (longctx/overlap_step.py: the CPU step overlapped with the next forward,
DeepSpeed issue #6834). DeepSpeed's engine imports DeepSpeedZeroOptimizer_Stage3 from its module when it builds
the optimizer, and DeepSpeedZeRoOffload looks PartitionedParameterCoordinator up in its module when it builds the
coordinator, so both are swapped there for the duration of deepspeed.initialize and restored after.
"""

from __future__ import annotations

import contextlib

from deepspeed.runtime.zero import parameter_offload, stage3
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

from .overlap_step import OverlappedStepMixin, gated_coordinator_class


class LongctxZeroStage3(OverlappedStepMixin, DeepSpeedZeroOptimizer_Stage3):
    """DeepSpeed's ZeRO-3 optimizer; each mixin is idle until enabled."""


GatedParamCoordinator = gated_coordinator_class()


@contextlib.contextmanager
def installed():
    saved = stage3.DeepSpeedZeroOptimizer_Stage3, parameter_offload.PartitionedParameterCoordinator
    stage3.DeepSpeedZeroOptimizer_Stage3 = LongctxZeroStage3
    parameter_offload.PartitionedParameterCoordinator = GatedParamCoordinator
    try:
        yield
    finally:
        stage3.DeepSpeedZeroOptimizer_Stage3, parameter_offload.PartitionedParameterCoordinator = saved
