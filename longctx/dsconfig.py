"""DeepSpeed config: load, reject unknown keys, fill "auto" from train.py's arguments, check batch math.

"auto" is filled as follows (the same convention as transformers' HfTrainerDeepSpeedConfig):
  train_micro_batch_size_per_gpu  <- --micro-batch-size
  gradient_accumulation_steps     <- --grad-accum
  train_batch_size                <- micro x accum x data-parallel world size
  gradient_clipping               <- --max-grad-norm
  optimizer.params lr/betas/eps/weight_decay <- --lr, --adam-beta1/2, --adam-eps, --weight-decay
  bf16.enabled / fp16.enabled     <- the resolved --precision
  zero_optimization bucket sizes  <- from the model's hidden size
  offload_*.pin_memory            <- true on CUDA, false on CPU
  offload_param.device            <- "cpu" or "none", as longctx.resolve decides (longctx.placement: on the GPU
                                     only beside every optimizer state, where the memory plan fits them all)
  offload_optimizer.ratio         <- the CPU share of the optimizer's sub-groups, as longctx.resolve decides from
                                     the memory plan (0: every state on the GPU, the offload_optimizer section
                                     dropped; between: Twin-Flow, longctx.twin_flow; 1: all on the CPU)
  zero_optimization.sub_group_size <- one layer's partition where the optimizer states are split (the granularity of the
                                     split), else DeepSpeed's 1e9
  optimizer.params.torch_adam     <- true unless the optimizer is offloaded (CPU Adam) or it is set
A value that is not "auto" must agree with the argument it mirrors, otherwise this is an error.
The LR schedule belongs to train.py (--lr-scheduler): a "scheduler" section is refused.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

from .errors import LongctxError

# Top-level keys this tool passes to DeepSpeed. Anything else is a typo or a feature we do not drive.
KNOWN_TOP = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer", "zero_optimization", "bf16", "fp16", "steps_per_print", "wall_clock_breakdown",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "communication_data_type",
    "prescale_gradients", "gradient_predivide_factor", "memory_breakdown", "flops_profiler", "comms_logger",
    "checkpoint", "aio", "data_types", "seq_parallel_communication_data_type", "dump_state", "torch_autocast",
}
REFUSED_TOP = {
    "scheduler": "the learning-rate schedule is set by train.py (--lr-scheduler, --warmup-steps/ratio)",
    "amp": "use --precision",
    "activation_checkpointing": "train.py uses transformers' checkpointing (--gradient-checkpointing, "
                                "--offload-gradient-checkpointing)",
}
OPTIMIZER_TYPES = {"adamw", "adam"}
# ZeRO-3 optimizer sub-group ("auto") where neither the states are split nor the step overlapped: DeepSpeed's default,
# as measured so far. Split or overlapped, it is one decoder layer's partition
# (longctx.plan_search.layer_sub_group_size), which longctx.resolve passes in: the split moves in steps of one layer's
# states (~3.4 GiB for 8B), and a module of the next forward waits for about its own layer's update.
UNSPLIT_SUB_GROUP_SIZE = 1_000_000_000
OPTIMIZER_PARAMS = {"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode", "fp32_optimizer_states"}


def load(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise LongctxError(f"--deepspeed {path}: file not found")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LongctxError(f"--deepspeed {path}:{e.lineno}: malformed JSON at column {e.colno}: {e.msg}. Fix the "
                           "file, or start from one of ds_configs/*.json.") from None
    except UnicodeDecodeError as e:
        raise LongctxError(f"--deepspeed {path}: not UTF-8 JSON text ({e.reason} at byte {e.start})") from None
    if not isinstance(cfg, dict):
        raise LongctxError(f"--deepspeed {path}: expected a JSON object")
    return cfg


def _unknown(where: str, key: str, known: set[str]) -> LongctxError:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return LongctxError(f"{where}: unknown key '{key}'{hint}")


def _is_auto(v: Any) -> bool:
    return isinstance(v, str) and v == "auto"


def build(path: str, cfg, *, world_size: int, precision: str, lr: float, hidden_size: int,
          on_cuda: bool, offload_params: bool | None = None, optimizer_ratio: float | None = None,
          layer_sub_group_size: int | None = None) -> dict:
    """Return the DeepSpeed config dict to pass to deepspeed.initialize, fully resolved."""
    raw = load(path)
    ds = copy.deepcopy(raw)
    where = f"--deepspeed {path}"
    for key in ds:
        if key in REFUSED_TOP:
            raise LongctxError(f"{where}: '{key}' is not supported here: {REFUSED_TOP[key]}")
        if key not in KNOWN_TOP:
            raise _unknown(where, key, KNOWN_TOP)

    mismatches = []

    def fill(section: dict, key: str, value: Any, label: str, arg: str | None) -> None:
        cur = section.get(key, "auto")
        if _is_auto(cur):
            section[key] = value
        elif arg is not None and cur != value:
            mismatches.append(f"{label} is {cur!r} but {arg} gives {value!r}")

    # ---- batch arithmetic
    micro, accum = cfg.micro_batch_size, cfg.grad_accum
    fill(ds, "train_micro_batch_size_per_gpu", micro, "train_micro_batch_size_per_gpu", "--micro-batch-size")
    fill(ds, "gradient_accumulation_steps", accum, "gradient_accumulation_steps", "--grad-accum")
    want = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    if _is_auto(ds.get("train_batch_size", "auto")):
        ds["train_batch_size"] = want
    elif ds["train_batch_size"] != want:
        mismatches.append(
            f"train_batch_size is {ds['train_batch_size']} but train_micro_batch_size_per_gpu "
            f"{ds['train_micro_batch_size_per_gpu']} x gradient_accumulation_steps "
            f"{ds['gradient_accumulation_steps']} x world size {world_size} = {want}")
    fill(ds, "gradient_clipping", float(cfg.max_grad_norm), "gradient_clipping", "--max-grad-norm")

    # ---- precision
    for sec, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        section = ds.setdefault(sec, {})
        if not isinstance(section, dict):
            raise LongctxError(f"{where}: '{sec}' must be an object")
        cur = section.get("enabled", "auto")
        if _is_auto(cur):
            section["enabled"] = on
        elif bool(cur) != on:
            mismatches.append(f"{sec}.enabled is {cur} but the precision is {precision} (--precision)")
    if precision == "fp16":
        ds["fp16"].setdefault("loss_scale", 0)  # 0 = dynamic loss scaling

    # ---- optimizer
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    for k in opt:
        if k not in ("type", "params"):
            raise _unknown(f"{where}: optimizer", k, {"type", "params"})
    if str(opt.get("type", "")).lower() not in OPTIMIZER_TYPES:
        raise LongctxError(f"{where}: optimizer.type {opt.get('type')!r} is not supported (AdamW or Adam)")
    params = opt.setdefault("params", {})
    for k in params:
        if k not in OPTIMIZER_PARAMS:
            raise _unknown(f"{where}: optimizer.params", k, OPTIMIZER_PARAMS)
    fill(params, "lr", lr, "optimizer.params.lr", "--lr")
    fill(params, "betas", [cfg.adam_beta1, cfg.adam_beta2], "optimizer.params.betas", "--adam-beta1/2")
    fill(params, "eps", cfg.adam_eps, "optimizer.params.eps", "--adam-eps")
    fill(params, "weight_decay", cfg.weight_decay, "optimizer.params.weight_decay", "--weight-decay")
    if isinstance(params.get("betas"), list):
        params["betas"] = [float(b) for b in params["betas"]]

    # ---- ZeRO
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if _is_auto(zero.get("reduce_bucket_size")):
        zero["reduce_bucket_size"] = hidden_size * hidden_size
    if _is_auto(zero.get("stage3_prefetch_bucket_size")):
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
    if _is_auto(zero.get("stage3_param_persistence_threshold")):
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    off_param = zero.get("offload_param")
    if isinstance(off_param, dict) and _is_auto(off_param.get("device")):
        if offload_params is None:
            raise LongctxError(f"{where}: zero_optimization.offload_param.device is \"auto\", which "
                               "longctx.resolve decides; call dsconfig.build with offload_params")
        if offload_params:
            off_param["device"] = "cpu"
        else:
            del zero["offload_param"]
    off_opt = zero.get("offload_optimizer")
    if isinstance(off_opt, dict) and _is_auto(off_opt.get("ratio")):
        if off_opt.get("device", "none") in ("none", None):  # nothing offloaded: nothing to split
            del off_opt["ratio"]
        elif optimizer_ratio is None:
            raise LongctxError(f"{where}: zero_optimization.offload_optimizer.ratio is \"auto\", which "
                               "longctx.resolve decides; call dsconfig.build with optimizer_ratio")
        elif optimizer_ratio == 0.0:  # every state on the GPU: DeepSpeed's own ZeRO-3 step, no offload path
            del zero["offload_optimizer"]
        else:
            off_opt["ratio"] = float(optimizer_ratio)
    if _is_auto(zero.get("sub_group_size")):
        off_opt = zero.get("offload_optimizer")
        split = isinstance(off_opt, dict) and isinstance(off_opt.get("ratio", 1.0), (int, float)) and \
            0 < off_opt.get("ratio", 1.0) < 1
        if split and layer_sub_group_size is None:
            raise LongctxError(f"{where}: zero_optimization.sub_group_size is \"auto\" with the optimizer states split; "
                               "call dsconfig.build with layer_sub_group_size")
        zero["sub_group_size"] = layer_sub_group_size if split else UNSPLIT_SUB_GROUP_SIZE
    offload_opt = False
    for sec in ("offload_optimizer", "offload_param"):
        off = zero.get(sec)
        if isinstance(off, dict):
            if _is_auto(off.get("pin_memory", "auto")):
                off["pin_memory"] = bool(on_cuda)
            if sec == "offload_optimizer" and off.get("device", "none") not in ("none", None):
                offload_opt = True
    if not offload_opt and "torch_adam" not in params:
        # torch's AdamW (foreach) instead of DeepSpeed's FusedAdam: no nvcc JIT build at start-up (it
        # needs the CUDA toolkit and fails on arch lists such as "9.0a"), and it runs on CPU too.
        # Put "torch_adam": false in the ds_config to get FusedAdam back.
        params["torch_adam"] = True
    ds.setdefault("steps_per_print", 10 ** 9)  # train.py does the logging
    ds.setdefault("wall_clock_breakdown", False)

    if mismatches:
        raise LongctxError(f"{where}: inconsistent with the arguments:\n  " + "\n  ".join(mismatches) +
                           "\nSet these keys to \"auto\" or make them agree.")
    left = [k for k, v in _walk(ds) if _is_auto(v)]
    if left:
        raise LongctxError(f"{where}: cannot resolve \"auto\" for {', '.join(left)}")
    _validate_sections(ds, where)
    return ds


def _walk(d: Any, prefix: str = ""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), d


def _validate_sections(ds: dict, where: str) -> None:
    """DeepSpeed's own pydantic models forbid unknown keys: use them for the nested sections."""
    from pydantic import ValidationError

    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):  # before pydantic, whose enum says "0, 1, 2, 3 or 3"
        raise LongctxError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")

    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for key, model in (("zero_optimization", DeepSpeedZeroConfig), ("bf16", DeepSpeedBF16Config),
                       ("fp16", DeepSpeedFP16Config)):
        try:
            model(**ds.get(key, {}))
        except ValidationError as e:
            msgs = []
            for err in e.errors():
                loc = ".".join(str(x) for x in err.get("loc", ()))
                msgs.append(f"{key}.{loc}: {err.get('msg')}")
            raise LongctxError(f"{where}: " + "; ".join(msgs)) from None
        except TypeError as e:
            raise LongctxError(f"{where}: {key}: {e}") from None


def is_zero3(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("stage", 0) == 3
