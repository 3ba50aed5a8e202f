"""The one exception train.py turns into a clear message and a non-zero exit."""

import sys


class LongctxError(Exception):
    """A problem with the user's input or environment, reported without a traceback.

    Raised before training starts for bad input (config, data, model, ds_config, output dir), and
    during training when the run must stop (non-finite loss, fp16 loss-scale collapse).
    """

    exit_code = 2


class TrainingDiverged(LongctxError):
    """Training stopped because continuing would train on garbage."""

    exit_code = 3


class GpuOutOfMemory(LongctxError):
    """The GPU ran out of memory during training: reported with where, the plan's prediction against the peak
    reached, the checkpoint to resume from and the knobs that lower the peak, instead of a CUDA traceback."""

    exit_code = 4


def below_minimum(cfg, minimums: dict[str, float]) -> list[str]:
    """The problem line of each of `cfg`'s options under its minimum, named as its flag: "--grad-accum must be >= 1,
    got 0"."""
    return [f"--{name.replace('_', '-')} must be >= {low}, got {getattr(cfg, name)}"
            for name, low in minimums.items() if getattr(cfg, name) < low]


def refuse_arguments(problems: list[str]) -> None:
    """A command line's argument checks, all reported at once: one LongctxError listing every problem (none: none)."""
    if problems:
        raise LongctxError("invalid arguments:\n  " + "\n  ".join(problems))


def report(error: LongctxError) -> int:
    """A command-line tool's way out on a LongctxError: the message on stderr, no traceback; returns its exit code."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return error.exit_code
