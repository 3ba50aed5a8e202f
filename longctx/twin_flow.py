"""Twin-Flow (ZeRO-3 `offload_optimizer.ratio`) made correct: DeepSpeed 0.19.8's partial optimizer offload, fixed
in this one place (a mixin of longctx.zero3_optimizer.LongctxZeroStage3).

With `ratio` r < 1, DeepSpeedZeroOptimizer_Stage3 keeps the first int((1 - r) * n) of a rank's n optimizer
sub-groups (fp32 master, fp32 gradient, Adam moments) on the accelerator and updates them with `backup_optimizer`,
a torch.optim.AdamW it builds at init from the CPU optimizer's initial hyperparameters; the rest go through CPU
Adam. In 0.19.8 (runtime/zero/stage3.py):
  1. lr: the LR scheduler drives the CPU optimizer's param_groups; the backup's first group is a dict of its own,
     so the GPU sub-groups train at the initial lr for the whole run: no warmup, no decay. `_optimizer_step` here
     hands the CPU group's hyperparameters to the backup group before every GPU sub-group's update.
  2. checkpoints: `_rigid_state_dict` saves the CPU optimizer's state only. The backup's exp_avg, exp_avg_sq and
     step are lost, and a resume restarts the GPU sub-groups' Adam moments from zero. Here they are saved per
     sub-group (TWIN_FLOW_STATE) and restored into whichever optimizer updates that sub-group now (a resume may
     place the sub-groups differently).
  3. host memory: `initialize_optimizer_states` pins a staging buffer for every sub-group's fp32 gradient and, for
     a GPU sub-group, copies it to the GPU and drops it; zero.Init's per-parameter pinned partitions are dropped
     too once `_move_to_flat_buffer` has copied them into the flat buffer. Dropped pinned blocks stay in torch's
     caching host allocator for the life of the process (2 B per parameter, ~16.5 GiB for 8B after power-of-two
     rounding), where only a later request of the same rounded size can reuse them. Here the cache is emptied once
     the optimizer is built (torch._C._host_emptyCache: it frees the cached blocks no tensor uses and no pending
     copy waits on; live pinned tensors are untouched). longctx.plan_states models this (Setup.pinned_cache_released).
  4. speed: after a GPU sub-group's update, `_reassign_or_swap_out_partitioned_parameters` copies its fp32 master
     (GPU) into the 16-bit parameter partition, which lives in pinned host memory when the parameters are offloaded.
     torch's copy_ across devices and dtypes does that through a fresh pageable fp32 host tensor, then converts on
     the CPU: 4 B per element over a pageable copy, a page fault per page, and a CPU pass, for half the model. Here
     the rounding to 16 bits happens on the GPU (round-to-nearest-even, as the CPU's) and 2 B per element go by one
     pinned copy. (Suspected cause of DeepSpeed's step taking 11.2 s of a 28.8 s step at 64K with 8B at full depth
     on one H100, 2026-12-06; to be confirmed by the next GPU run.)
And which optimizer updates a sub-group is decided upstream by its device's name (subgroup_to_device[i] != 'cpu'),
so on the CPU accelerator every sub-group goes to CPU Adam and the backup path never runs. Here the routing is by
index with DeepSpeed's own rule (gpu_sub_groups), the same on every accelerator: on CPU the "GPU" sub-groups are
updated by the backup torch AdamW on CPU tensors, which is how the CPU tests check fixes 1 and 2.

Upstream issue to file (deepspeedai/DeepSpeed):
  Title: ZeRO-3 partial optimizer offload (offload_optimizer.ratio < 1): GPU sub-groups ignore the LR scheduler and
         their Adam state is not checkpointed
  Body:  With zero_optimization.offload_optimizer {"device": "cpu", "ratio": 0.5}, the sub-groups kept on the
         accelerator are stepped by DeepSpeedZeroOptimizer_Stage3.backup_optimizer (torch.optim.AdamW, stage3.py
         ~line 315). (a) The LR scheduler updates self.optimizer.param_groups only; backup_optimizer.param_groups[0]
         is a separate dict, so those sub-groups keep the initial lr (warmup/decay never applies; reproduce with any
         WarmupLR: the GPU half of the model moves at the initial lr). (b) _rigid_state_dict/_rigid_load_state_dict
         save and load self.optimizer only, so backup_optimizer's exp_avg/exp_avg_sq/step are lost on resume.
         (c) The routing `subgroup_to_device[i] == 'cpu'` cannot be exercised on the CPU accelerator.
         (d) Pinned staging buffers (the GPU sub-groups' gradient buffers in initialize_optimizer_states, zero.Init's
         per-parameter partitions) stay in torch's CachingHostAllocator after init; an empty_host_cache() at the end
         of __init__ returns them. (e) With offload_param, writing a GPU sub-group's fp32 master into the pinned
         16-bit partition (fp16_partitioned_groups_flat[i].data.copy_(fp32)) converts on the CPU through a pageable
         fp32 temporary; converting on the GPU first halves the bytes and uses the pinned path.
         Suggested fix: copy the hyperparameters from the CPU group in _optimizer_step, save backup_optimizer's
         per-sub-group state beside OPTIMIZER_STATE_DICT, route by index.
"""

from __future__ import annotations

import torch

from .plan_states import gpu_sub_group_count

TWIN_FLOW_STATE = "longctx_twin_flow_state"  # checkpoint key: {sub-group id: the backup AdamW's state of it}
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "amsgrad")


def gpu_sub_groups(ratio: float, n: int) -> range:
    """The sub-groups whose optimizer states stay on the accelerator: the first ones, by DeepSpeed's rule
    (longctx.plan_states.gpu_sub_group_count, which the memory plan and `auto` use too)."""
    return range(gpu_sub_group_count(ratio, n))


def release_pinned_cache() -> bool:
    """Return torch's cached, unused pinned host blocks to the OS (fix 3). False where there is no such cache."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is None or not torch.cuda.is_available():
        return False
    torch.cuda.synchronize()  # copies from pinned staging buffers are done: their blocks can go
    empty()
    return True


class TwinFlowMixin:
    """Put before DeepSpeedZeroOptimizer_Stage3 in the bases. Without optimizer offload it changes nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n = len(self.fp16_groups)
        self.twin_flow_gpu = frozenset(gpu_sub_groups(self.partial_offload, n) if self.offload_optimizer else ())
        if self.offload_optimizer or self.offload_param:
            release_pinned_cache()

    # ---- fix 1: the GPU sub-groups follow the schedule, routed by index ------------------------------------
    def _optimizer_step(self, sub_group_id):
        if sub_group_id not in self.twin_flow_gpu:
            return super()._optimizer_step(sub_group_id)
        group_id = self.sub_group_to_group_id[sub_group_id]
        source, backup = self.optimizer.param_groups[group_id], self.backup_optimizer.param_groups[group_id]
        for key in HYPERPARAMETERS:
            if key in source:
                backup[key] = source[key]
        backup["params"] = [self.fp32_partitioned_groups_flat[sub_group_id]]
        self.backup_optimizer.step()
        backup["params"] = []

    # ---- fix 4: the updated 16-bit partition reaches the host at pinned-copy speed ---------------------------
    def _reassign_or_swap_out_partitioned_parameters(self, sub_group_id):
        low, master = self.fp16_partitioned_groups_flat[sub_group_id], self.fp32_partitioned_groups_flat[sub_group_id]
        if low is None or low.device == master.device or low.dtype == master.dtype:
            return super()._reassign_or_swap_out_partitioned_parameters(sub_group_id)
        low.data.copy_(master.data.to(low.dtype))  # rounded on the master's device, then one copy of 16-bit values
        self._unflatten_partitioned_parameters(sub_group_id)

    # ---- fix 2: their Adam state in the checkpoint -----------------------------------------------------------
    def _rigid_state_dict(self):
        state = super()._rigid_state_dict()
        if self.twin_flow_gpu:
            flats = self.fp32_partitioned_groups_flat
            state[TWIN_FLOW_STATE] = {i: dict(self.backup_optimizer.state[flats[i]]) for i in sorted(self.twin_flow_gpu)
                                      if flats[i] in self.backup_optimizer.state}
        return state

    def _rigid_load_state_dict(self, state_dict, load_optimizer_states=True):
        super()._rigid_load_state_dict(state_dict, load_optimizer_states=load_optimizer_states)
        if not (load_optimizer_states and self.offload_optimizer):
            return
        saved = state_dict.get(TWIN_FLOW_STATE) or {}
        cpu_state = self.optimizer.state
        # DeepSpeed builds backup_optimizer only where ratio < 1: a run with every state on the CPU has none
        for i, flat in enumerate(self.fp32_partitioned_groups_flat):
            if i in self.twin_flow_gpu:  # from the saved backup state, or from CPU Adam's if it was a CPU one then
                st = saved.get(i) or cpu_state.pop(flat, None)
                if st:
                    self.backup_optimizer.state[flat] = as_torch_adam_state(st, flat.device)
            elif i in saved:  # a GPU sub-group then, a CPU one now
                cpu_state[flat] = as_cpu_adam_state(saved[i])


def as_torch_adam_state(st: dict, device) -> dict:
    """An Adam state (CPU Adam's: 'step' an int; torch's: a float32 tensor) as torch.optim.AdamW keeps it."""
    step = st["step"]
    out = {k: v.to(device) for k, v in st.items() if k != "step" and torch.is_tensor(v)}
    out["step"] = step.detach().clone().float().cpu() if torch.is_tensor(step) else torch.tensor(float(step))
    return out


def as_cpu_adam_state(st: dict) -> dict:
    step = st["step"]
    out = {k: v.to("cpu") for k, v in st.items() if k != "step" and torch.is_tensor(v)}
    out["step"] = int(step.item()) if torch.is_tensor(step) else int(step)
    return out
