"""The ZeRO-3 optimizer train.py runs: DeepSpeed's DeepSpeedZeroOptimizer_Stage3 with our fixes mixed in, put in
place for deepspeed.initialize only.

    with zero3_optimizer.installed():
        engine, *_ = deepspeed.initialize(...)

Why a subclass: where DeepSpeed's ZeRO-3 step is wrong or slow for us, the fix lives in one named mixin with its
reason and the upstream issue in its module's header:
    longctx.overlap_step.OverlappedStepMixin  the CPU sub-groups' update overlapped with the next forward, bitwise the
                                              same step (DeepSpeed issue #6834)
    longctx.twin_flow.TwinFlowMixin           offload_optimizer.ratio < 1: lr schedule, checkpointed state, routing by
                                              index, pinned cache emptied after init
Each is idle where it does not apply (ds_configs/zero3.json runs DeepSpeed's code as it is). DeepSpeed's engine
imports DeepSpeedZeroOptimizer_Stage3 from its module when it builds the optimizer (engine.py
_configure_zero_optimizer), and DeepSpeedZeRoOffload looks PartitionedParameterCoordinator up in its module when it
builds the coordinator, so both are swapped there for the duration of deepspeed.initialize and restored after.
"""

from __future__ import annotations

import contextlib

from deepspeed.runtime.zero import parameter_offload, stage3
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

from .overlap_step import OverlappedStepMixin, gated_coordinator_class
from .twin_flow import TwinFlowMixin


class LongctxZeroStage3(OverlappedStepMixin, TwinFlowMixin, DeepSpeedZeroOptimizer_Stage3):
    """DeepSpeed 0.19.8's ZeRO-3 optimizer with longctx's fixes (see the mixins; the overlap calls the instance's
    own per-sub-group methods, so Twin-Flow's routing applies inside it)."""


GatedParamCoordinator = gated_coordinator_class()


@contextlib.contextmanager
def installed():
    """LongctxZeroStage3 and the gated parameter coordinator in DeepSpeed's modules inside the block."""
    saved = stage3.DeepSpeedZeroOptimizer_Stage3, parameter_offload.PartitionedParameterCoordinator
    stage3.DeepSpeedZeroOptimizer_Stage3 = LongctxZeroStage3
    parameter_offload.PartitionedParameterCoordinator = GatedParamCoordinator
    try:
        yield LongctxZeroStage3
    finally:
        stage3.DeepSpeedZeroOptimizer_Stage3, parameter_offload.PartitionedParameterCoordinator = saved
