"""The divergence guard of the training loop: stop the run, with the step and its samples, rather than train on
garbage (longctx.trainer checks it after every optimizer step; its count of skipped fp16 steps is part of the
trainer's checkpointed state)."""

from __future__ import annotations

import math

from .errors import TrainingDiverged


class DivergenceGuard:
    """Stops the run instead of training on garbage.

    bf16/fp32: a non-finite loss or grad norm stops at once (step and sample ids in the message).
    fp16: overflowing steps are skipped by DeepSpeed's dynamic loss scaler and counted here; if the
    scale sits at min_loss_scale and steps keep overflowing `patience` times in a row, it stops.
    """

    def __init__(self, precision: str, ds_config: dict, patience: int, engine):
        self.fp16 = precision == "fp16"
        self.min_scale = float(ds_config.get("fp16", {}).get("min_loss_scale", 1))
        self.patience = patience
        self.skipped = int(getattr(engine, "skipped_steps", 0))  # a resume's: Trainer.load_state_dict
        self.collapsed = 0
        self.loss_scale = None
        scaler = getattr(engine.optimizer, "loss_scaler", None)
        if self.fp16 and hasattr(scaler, "raise_error_at_min_scale"):
            # DeepSpeed would raise a bare exception at the first overflow at the minimum scale; this
            # guard stops instead, after `patience` of them, with a diagnosis.
            scaler.raise_error_at_min_scale = False

    def check(self, engine, step: int, loss: float, grad_norm: float | None, sample_ids: list[str]) -> None:
        ids = ", ".join(sample_ids[:20]) + (f", ... ({len(sample_ids)} in all)" if len(sample_ids) > 20 else "")
        if self.fp16:
            skipped = int(getattr(engine, "skipped_steps", 0))
            overflow = skipped > self.skipped
            self.skipped = skipped
            opt = engine.optimizer
            scale = getattr(opt, "cur_scale", None) or getattr(getattr(opt, "loss_scaler", None), "cur_scale", None)
            self.loss_scale = float(scale) if scale is not None else None
            if overflow and self.loss_scale is not None and self.loss_scale <= self.min_scale:
                self.collapsed += 1
            else:
                self.collapsed = 0
            if self.collapsed >= self.patience:
                raise TrainingDiverged(
                    f"fp16 loss scale collapsed: at step {step} the scale is at its minimum ({self.min_scale:g}) and "
                    f"the last {self.collapsed} steps overflowed anyway ({self.skipped} skipped in all). The "
                    "gradients are inf/NaN even unscaled, so training has diverged or the values exceed fp16's "
                    f"range. Last loss {loss:.4g}; samples of the step: {ids}. Try a lower --lr, a smaller "
                    "--max-grad-norm, or bf16 on sm80+ GPUs.")
            return
        if not math.isfinite(loss):
            raise TrainingDiverged(f"non-finite loss ({loss}) at step {step}; samples of the step: {ids}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise TrainingDiverged(f"non-finite grad norm ({grad_norm}) at step {step} (loss {loss:.4g}); "
                                   f"samples of the step: {ids}")
