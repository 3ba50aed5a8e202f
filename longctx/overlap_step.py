"""The CPU optimizer step overlapped with the next forward, bit for bit the step DeepSpeed would take.

Why: with ZeRO-3 and the optimizer offloaded, DeepSpeed's step() updates the sub-groups one after the other on
the CPU while the GPU waits (1.0-1.3 s of a 2.0-2.4 s step at 16K on one H100, issue #32). Clipping needs the
global norm, so nothing can start before backward ends; but once the norm is known, the next forward only needs
the sub-groups of the module it is entering. Upstream request: DeepSpeed issue #6834 ("overlap CPU Adam with
backward"); ZenFlow's overlap changes the update (stale, top-k) and SuperOffload's async path is off under clipping.

How (OverlappedStepMixin, mixed into longctx.zero3_optimizer.LongctxZeroStage3):
- step() runs the synchronous part of DeepSpeed's step (overflow check, global norm, loss-scale update, the
  sub-groups placed on the GPU) in the caller, then hands the CPU sub-groups to one background thread, in the order
  the forward first needs them (learned from the first forward), each through the instance's own methods
  (_prepare_sub_group, unscale_and_clip_grads, _optimizer_step, _reassign_or_swap_out_partitioned_parameters,
  _release_sub_group), as DeepSpeed's loop does.
- A forward pre-hook on every module, ahead of DeepSpeed's fetch hook, waits for the sub-groups holding the
  parameters DeepSpeed is about to gather (its own iter_params), then all-gathers that module's persistent
  parameters (DeepSpeed's _post_step gathers them all at once after the update).
- DeepSpeed's prefetch stops at the first parameter whose sub-group the forward has not waited for yet
  (GatedParamCoordinator): a partition being written is never all-gathered. The gate opens where the forward waits,
  never where the background thread happens to be: a prefetch is a collective, and every rank must issue the same
  ones in the same order (a gate on each rank's own progress let a fast rank prefetch while a slow one did not: gloo
  aborted on the mismatched all-gathers, 2026-12-06; NCCL would hang or mix up the buffers).
- finish_step() waits for the whole update: at the next backward (backward_prologue), state_dict/load_state_dict
  (checkpoints) and, from the Trainer, evaluation, the final export and the end of training. An exception of the
  background thread is raised there (or in the hook that waits), in the main thread.
- The learning-rate scheduler steps right after step() returns, while the update runs: the update uses the
  hyperparameters of its own step, pinned when step() hands it over (CpuAdamKernel.pin).
- CPU Adam's pybind binding (ops/csrc/adam/cpu_adam.cpp adam_update) holds the GIL for the whole kernel, which
  would stall the forward's Python thread. CpuAdamKernel calls the same kernel without the GIL (see there).
"""

from __future__ import annotations

import collections
import ctypes
import threading
import time
from typing import Callable, Iterable, Optional

# ---- the CPU Adam kernel, off the GIL ------------------------------------------------------------------------------
# DeepSpeed's exported C++ entry point, `int ds_adam_step(int, size_t, float x5, bool, at::Tensor& x4)`, the function
# the pybind binding wraps (ops/csrc/adam/cpu_adam_impl.cpp). ctypes drops the GIL for the call. An at::Tensor is one
# intrusive pointer to its TensorImpl, which is what a tensor's `_cdata` is; the entry point only reads it.
DS_ADAM_STEP = "_Z12ds_adam_stepimfffffbRN2at6TensorES1_S1_S1_"
# Without it, the kernel runs on slices: the GIL is free between slices, never for longer than one slice. The kernel
# is elementwise, with a SIMD body and a scalar tail; slices that are multiples of every SIMD span (8 x 16 floats
# on AVX-512) give every element the same instructions as one whole call, the tail included (checked at start-up).
SLICE = 1 << 20

# the parts of a background update timed in OverlappedStepMixin.overlap_update_s; "whole update" runs from the
# hand-over to the last sub-group's end (the GIL and the thread's start included)
UPDATE_PARTS = ("unscale and clip", "Adam", "copy to the GPU", "whole update")


class CpuAdamKernel:
    """Stands in for DeepSpeedCPUAdam.ds_opt_adam (the loaded op): adam_update runs the same kernel without holding
    the GIL, with the hyperparameters pinned for the update in progress; everything else goes to the op."""

    def __init__(self, op, *, entry_point: bool = True):
        self.op = op
        self.pinned: Optional[dict] = None
        self.mode, self._fn = "sliced", None
        fn = self._entry_point(op) if entry_point else None
        if fn is not None and self._same_bits(op, fn):
            self.mode, self._fn = "ctypes", fn

    def __getattr__(self, name):
        return getattr(self.op, name)

    @staticmethod
    def _entry_point(op):
        try:
            fn = getattr(ctypes.CDLL(op.__file__), DS_ADAM_STEP)
        except (OSError, AttributeError):
            return None
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_size_t] + [ctypes.c_float] * 5 + [ctypes.c_bool] + [ctypes.c_void_p] * 4
        return fn

    @staticmethod
    def _call(fn, opt_id, step, lr, beta1, beta2, eps, wd, bias_correction, *tensors) -> None:
        slots = [ctypes.c_void_p(t._cdata) for t in tensors]  # each an at::Tensor (one TensorImpl pointer)
        fn(opt_id, step, lr, beta1, beta2, eps, wd, bias_correction, *(ctypes.addressof(s) for s in slots))

    def _same_bits(self, op, fn, opt_id: int = 2 ** 30) -> bool:
        """The entry point, called through ctypes, gives the binding's bits on a small problem (else: sliced)."""
        import torch

        g = torch.Generator().manual_seed(0)
        n = 3 * 1024 + 77  # a SIMD body and a scalar tail

        def problem():
            return [torch.randn(n, generator=g) for _ in range(2)] + [torch.randn(n, generator=g) * 0.1,
                                                                       torch.rand(n, generator=g)]

        a = problem()
        b = [t.clone() for t in a]
        op.create_adam(opt_id, 1e-3, 0.9, 0.95, 1e-8, 0.01, True, False)
        try:
            args = (3, 1e-3, 0.9, 0.95, 1e-8, 0.01, True)
            op.adam_update(opt_id, *args, *a)
            self._call(fn, opt_id, *args, *b)
        except Exception:  # noqa: BLE001  (any failure: the sliced path)
            return False
        finally:
            op.destroy_adam(opt_id)
        return all(torch.equal(x, y) for x, y in zip(a, b))

    def pin(self, group: Optional[dict]) -> None:
        self.pinned = group

    def adam_update(self, opt_id, step, lr, beta1, beta2, eps, weight_decay, bias_correction, params, grads,
                    exp_avg, exp_avg_sq):
        h = self.pinned
        if h is not None:
            lr, (beta1, beta2), eps, weight_decay = h["lr"], h["betas"], h["eps"], h["weight_decay"]
            bias_correction = h.get("bias_correction", bias_correction)
        tensors = (params, grads, exp_avg, exp_avg_sq)
        if self._fn is not None and all(t.is_contiguous() for t in tensors):
            self._call(self._fn, opt_id, step, lr, beta1, beta2, eps, weight_decay, bias_correction, *tensors)
            return 0
        n = params.numel()
        for o in range(0, n, SLICE):  # the GIL is released between slices
            self.op.adam_update(opt_id, step, lr, beta1, beta2, eps, weight_decay, bias_correction,
                                *(t.view(-1)[o:o + SLICE] for t in tensors))
        return 0


# ---- DeepSpeed's prefetch, stopped at the first parameter not updated yet ------------------------------------------
_QUEUE = "_PartitionedParameterCoordinator__param_queue"  # DeepSpeed 0.19.8's prefetch queue (a deque of
                                                          # (param, step_id_last_used_at) in trace order)


class _GatedQueue(collections.deque):
    """The prefetch queue, empty to the loops that pop it while its head parameter is not ready: the prefetch
    loop (`while queue and numel < budget`) stops there and takes it up at a later module."""

    def __init__(self, items: Iterable, ready: Callable):
        super().__init__(items)
        self.ready = ready

    def __bool__(self) -> bool:
        return len(self) > 0 and self.ready(self[0].param)


def gated_coordinator_class():
    """PartitionedParameterCoordinator whose prefetch queue (rebuilt by reset_step every forward) is gated by
    `coordinator.ready(param)`; always ready until an overlapped optimizer sets it."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    class GatedParamCoordinator(PartitionedParameterCoordinator):
        ready: Callable = staticmethod(lambda p: True)

        def _get_queue(self):
            return self.__dict__.get(_QUEUE)

        def _set_queue(self, q):
            self.__dict__[_QUEUE] = None if q is None else _GatedQueue(q, lambda p: self.ready(p))

    setattr(GatedParamCoordinator, _QUEUE, property(GatedParamCoordinator._get_queue,
                                                    GatedParamCoordinator._set_queue))
    return GatedParamCoordinator


class OverlapObserver:
    """What a test or a tool can watch (OverlappedStepMixin.overlap_observer); calls come from both threads."""

    def launched(self, optimizer) -> None:
        """Main thread: step() handed the CPU sub-groups to the background."""

    def before_update(self, optimizer, sub_group: int) -> None:
        """Background thread: sub-group `sub_group` is about to be updated."""

    def finishing(self, optimizer) -> None:
        """Main thread: about to wait for the whole update."""


class OverlappedStepMixin:
    """Mixed in before DeepSpeedZeroOptimizer_Stage3; idle (DeepSpeed's own step) until enable_overlap()."""

    _overlap = False
    overlap_observer: Optional[OverlapObserver] = None
    overlap_wait_s = 0.0  # seconds the main thread was blocked on the background update, in all
    # seconds of the background updates, in all, by part (UPDATE_PARTS): where an update slower than the serial
    # step spends its time (the benchmark's --breakdown reports them per step)
    overlap_update_s: Optional[dict] = None

    # ---- set-up ----------------------------------------------------------------------------------------------
    def enable_overlap(self, module) -> str:
        """Overlap from now on (module: the engine's module). Returns how CPU Adam is called off the GIL."""
        import torch

        problems = [why for bad, why in ((self.swap_optimizer, "optimizer states swapped to NVMe"),
                                         (getattr(self, "zenflow", False), "ZenFlow"),
                                         (getattr(self, "use_muon", False), "Muon"),
                                         (self.torch_autocast_gradscaler is not None, "torch autocast"),
                                         (not self.offload_optimizer, "the optimizer not offloaded")) if bad]
        if problems:
            from .errors import LongctxError

            raise LongctxError("--overlap-optimizer-step on is not supported with " + ", ".join(problems))
        self._kernel = CpuAdamKernel(self.optimizer.ds_opt_adam)
        self.optimizer.ds_opt_adam = self._kernel
        self._sub_group_of = {p: i for i, group in enumerate(self.fp16_groups) for p in group}
        self._persistent = set(self.persistent_parameters)
        self._order: list[int] = []  # sub-groups in the order the forward first needs them (learned once)
        self._pending: set[int] = set()   # not updated yet (this rank's progress: the background thread's)
        self._gated: set[int] = set()     # handed to the background at step(): the same on every rank
        self._released: set[int] = set()  # of those, the ones the forward has waited for: the same on every rank
        self._stale_persistent: set = set()
        self._error: Optional[BaseException] = None
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._copy_stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        coordinator = self._get_param_coordinator()
        if hasattr(type(coordinator), "ready"):
            coordinator.ready = self._param_ready
        else:
            from .errors import LongctxError

            raise LongctxError("the overlapped optimizer step needs its prefetch gate (longctx.zero3_optimizer."
                               "installed() around deepspeed.initialize)")
        self._hooks = [m.register_forward_pre_hook(self._before_module_forward, prepend=True)
                       for m in module.modules()]
        self._overlap = True
        return self._kernel.mode

    # ---- readiness -------------------------------------------------------------------------------------------
    def _param_ready(self, param) -> bool:
        """May DeepSpeed prefetch `param`? Decided by collective points only (see the module's docstring)."""
        i = self._sub_group_of.get(param)
        return i not in self._gated or i in self._released

    def _module_params(self, module) -> list:
        from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params
        from deepspeed.utils import z3_leaf_module

        return list(iter_params(module, recurse=z3_leaf_module(module)))

    def _before_module_forward(self, module, *args) -> None:
        if not self._learned:
            self._learn_order(module)
        if not self._gated and not self._stale_persistent and self._error is None:
            return
        params = self._module_params(module)
        needed = {self._sub_group_of[p] for p in params if p in self._sub_group_of}
        self._wait(lambda: not (needed & self._pending))
        self._released |= needed
        stale = [p for p in params if p in self._stale_persistent]
        if stale:  # every rank enters the same modules in the same order: a collective is safe here
            self._stale_persistent.difference_update(stale)
            stale[0].all_gather(stale)

    _learned = False
    _root = None

    def _learn_order(self, module) -> None:
        """The first forward (nothing in flight yet) records the order the sub-groups are first needed in; the
        root module's next forward ends the recording."""
        if self._root is None:
            self._root = module
        elif module is self._root:
            self._learned = True
            return
        for p in self._module_params(module):
            i = self._sub_group_of.get(p)
            if i is not None and i not in self._order:
                self._order.append(i)

    def pending_sub_groups(self) -> set[int]:
        """The sub-groups whose update has not finished (empty without an update in flight)."""
        with self._cond:
            return set(self._pending)

    def sub_group_of(self, param) -> Optional[int]:
        """The optimizer sub-group that holds `param` (None: not one of this optimizer's)."""
        return self._sub_group_of.get(param)

    def forward_order(self) -> list[int]:
        """Sub-groups in the order the forward needs them (those it never gathers last, in index order)."""
        return self._order + [i for i in range(len(self.fp16_groups)) if i not in self._order]

    # ---- waiting -------------------------------------------------------------------------------------------------
    def _wait(self, done: Callable[[], bool]) -> None:
        t = time.perf_counter()
        with self._cond:
            while not done() and self._error is None:
                if not self._cond.wait(timeout=60.0) and not (self._thread and self._thread.is_alive()):
                    if done() or self._error is not None:
                        break
                    raise RuntimeError("the overlapped optimizer update stopped without finishing")
        self.overlap_wait_s += time.perf_counter() - t
        if self._error is not None:
            err, self._error = self._error, None
            self._pending.clear()
            raise RuntimeError(f"the optimizer update running in the background failed: {err!r}") from err

    def finish_step(self) -> None:
        """Wait for the whole update (and gather the persistent parameters it changed); a no-op when none runs."""
        if not self._overlap:
            return
        if self._pending and self.overlap_observer is not None:
            self.overlap_observer.finishing(self)
        self._wait(lambda: not self._pending)
        self._gated, self._released = set(), set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._stale_persistent:  # collective: every rank finishes at the same points
            stale = [p for p in self.persistent_parameters if p in self._stale_persistent]
            self._stale_persistent.clear()
            stale[0].all_gather(stale)

    # ---- the step ------------------------------------------------------------------------------------------------
    def step(self, closure=None):
        """DeepSpeed's ZeRO-3 step (stage3.py step(), 0.19.8) with the CPU sub-groups' updates left running."""
        if not self._overlap:
            return super().step(closure)
        import torch
        from deepspeed.runtime.utils import is_invalid_grad_norm
        from deepspeed.runtime.zero.stage3 import combine_grad_norm_groups

        self.finish_step()
        self._pre_step()
        self._partition_all_parameters()
        self._overflow_check_and_loss_scale_update(update_scale=False)
        scaled_norm = None
        if not self.overflow:
            self._apply_muon_to_accumulated_grads()
            scaled_norm = combine_grad_norm_groups(self._get_norm_groups())
            if is_invalid_grad_norm(scaled_norm):
                self.overflow = True
        if self._loss_scale_update_and_overflow_cleanup():
            return
        self._global_grad_norm = scaled_norm / self.loss_scale
        timers: set = set()
        order = self.forward_order()
        on_gpu = [i for i in order if i in getattr(self, "twin_flow_gpu", ())]  # routed by index (longctx.twin_flow)
        for i in on_gpu:  # the GPU-placed sub-groups (Twin-Flow) now, in this thread
            self._update_sub_group(i, scaled_norm, timers)
        on_cpu = [i for i in order if i not in on_gpu]
        # _post_step's pieces that need no update: the norm buffers, hpZ's secondary partitions (stale from now)
        self.reset_cpu_buffers()
        self.invalidate_secondary_tensor()
        pinned = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self._gated, self._released = set(on_cpu), set()
        with self._cond:
            self._pending = set(on_cpu)
            self._stale_persistent = {p for i in on_cpu for p in self.fp16_groups[i] if p in self._persistent}
        stale_now = [p for i in on_gpu for p in self.fp16_groups[i] if p in self._persistent]
        if stale_now:
            stale_now[0].all_gather(stale_now)
        if self._copy_stream is not None:  # the update's GPU work (clip coefficient, 16-bit copies) after the norm
            self._copy_stream.wait_stream(torch.cuda.current_stream())
        if self.overlap_observer is not None:
            self.overlap_observer.launched(self)
        self._thread = threading.Thread(target=self._update_in_background, args=(on_cpu, scaled_norm, pinned),
                                        name="longctx-overlapped-step", daemon=True)
        self._thread.start()

    def _update_sub_group(self, i: int, scaled_norm, timers: set, clock: Optional[Callable] = None) -> None:
        """One sub-group, as DeepSpeed's step() loop does it (`clock(part)` after each part, if given)."""
        lap = clock or (lambda part: None)
        self._prepare_sub_group(i, timers)
        self.unscale_and_clip_grads(i, scaled_norm)
        lap("unscale and clip")
        self._optimizer_step(i)
        lap("Adam")
        self._reassign_or_swap_out_partitioned_parameters(i)
        if clock is not None and self._copy_stream is not None:  # the background's 16-bit copy on its own
            self._copy_stream.synchronize()                       # stream, done before the sub-group is `ready`
        lap("copy to the GPU")
        self._release_sub_group(i, timers)

    def _update_in_background(self, sub_groups: list[int], scaled_norm, pinned: list[dict]) -> None:
        import torch

        spent = self.overlap_update_s = self.overlap_update_s or dict.fromkeys(UPDATE_PARTS, 0.0)
        mark = last = time.perf_counter()

        def clock(part: str) -> None:
            nonlocal last
            now = time.perf_counter()
            spent[part] += now - last
            last = now

        try:
            for i in sub_groups:
                if self.overlap_observer is not None:
                    self.overlap_observer.before_update(self, i)
                self._kernel.pin(pinned[self.sub_group_to_group_id[i]])
                last = time.perf_counter()
                try:
                    if self._copy_stream is not None:
                        with torch.cuda.stream(self._copy_stream):
                            self._update_sub_group(i, scaled_norm, set(), clock)
                    else:
                        self._update_sub_group(i, scaled_norm, set(), clock)
                finally:
                    self._kernel.pin(None)
                now = time.perf_counter()
                spent["whole update"] += now - mark  # from the hand-over on, waits between the parts included
                mark = now
                with self._cond:
                    self._pending.discard(i)
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001  (raised in the main thread by the next wait)
            with self._cond:
                self._error = e
                self._cond.notify_all()

    # ---- whatever reads the update waits for it ------------------------------------------------------------------
    def backward_prologue(self):
        self.finish_step()
        return super().backward_prologue()

    def state_dict(self):
        self.finish_step()
        return super().state_dict()

    def load_state_dict(self, *args, **kwargs):
        self.finish_step()
        return super().load_state_dict(*args, **kwargs)


def finish(engine) -> None:
    """Wait for an overlapped update of `engine`'s optimizer, if one runs (collective where one runs)."""
    fin = getattr(engine.optimizer, "finish_step", None)
    if fin is not None:
        fin()


def waited_s(engine) -> float:
    """Seconds the main thread has been blocked on overlapped updates so far (0 without overlap)."""
    return float(getattr(engine.optimizer, "overlap_wait_s", 0.0))


def update_s(engine) -> dict:
    """Seconds of the background updates so far, by part (UPDATE_PARTS; empty without overlap)."""
    return dict(getattr(engine.optimizer, "overlap_update_s", None) or {})
