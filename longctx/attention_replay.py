"""Attention kept through the recompute by replaying its outputs (`--keep-attention-by replay`).

torch's selective checkpointing (longctx.selective) finds the attention kernel by running every op of a
checkpointed layer through a Python dispatch mode, in forward and again in the recompute. On a CPU that mode
makes a layer's forward + backward take 1.85x the host time (bench/keep_attention_host.py), and where GPU work per
layer is short (16K rows on an H200) host time can show in the step. Here the mode is entered only around the
attention function:

  forward (inside the checkpoint)   the attention kernels' outputs are recorded, per checkpointed call, in order;
  recompute (in backward)           the same calls get the recorded outputs instead of running the kernels, so
                                    autograd builds attention's node over them and its backward runs as usual.

The rest of the layer runs as plain checkpointing runs it, reentrant or not (the fork's offloader included). The
recorded outputs belong to the checkpointed call's closure, so they are freed with its autograd state; a kernel
the replay cannot match (another op, other arguments or input shapes, or an output changed in place) simply runs
again.

Reentrant checkpointing runs the forward under no_grad, where SDPA asks cuDNN and memory-efficient attention for
no logsumexp (`compute_log_sumexp` is "inputs require grad and grad mode is on"), and backward needs it. So the
recording asks for it always: the recorded outputs are those of a call that backward can use, and the replay
matches the recompute's call, which asks for it, argument for argument. CPU flash attention always returns a
logsumexp, so a CPU test alone cannot catch its absence: tests/test_selective.py has an op with the GPU kernels'
contract, and a GPU test compares with no checkpointing.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from .selective import is_attention_op

NAME = "longctx_kept"
_active = threading.local()  # the dispatch mode of the checkpointed call running now, if any


LOG_SUMEXP_ARG = "compute_log_sumexp"  # cuDNN's and memory-efficient attention's: off under no_grad


def with_log_sumexp(func, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call with `compute_log_sumexp=True` where the op has that argument (what backward needs)."""
    names = [a.name for a in getattr(getattr(func, "_schema", None), "arguments", ())]
    if LOG_SUMEXP_ARG not in names:
        return args, kwargs
    i = names.index(LOG_SUMEXP_ARG)
    if i < len(args):
        return args[:i] + (True,) + args[i + 1:], kwargs
    return args, {**kwargs, LOG_SUMEXP_ARG: True}


def call_key(func, args: tuple, kwargs: dict) -> tuple:
    """What a replayed call must share with the recorded one: the op, its other arguments, its tensors' shapes,
    dtypes and devices."""
    def key(x):
        return (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else x
    return func, tree_map(key, (list(args), kwargs))


class _Recorded:
    """An attention kernel's outputs, stored as torch's selective checkpointing stores them: detached (no autograd
    history shared with the forward's tensors, no reference cycle), with their versions to tell an in-place change."""
    __slots__ = ("key", "out", "versions")

    def __init__(self, key, out):
        self.key = key
        self.out = tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, out)
        self.versions = [x._version for x in tree_leaves(self.out) if isinstance(x, torch.Tensor)]

    def matches(self, key) -> bool:
        return key == self.key and self.versions == [x._version for x in tree_leaves(self.out)
                                                     if isinstance(x, torch.Tensor)]


class _Mode(TorchDispatchMode):
    def __init__(self, recorded: deque):
        super().__init__()
        self.recorded = recorded


class _Record(_Mode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not is_attention_op(func):
            return func(*args, **kwargs)
        args, kwargs = with_log_sumexp(func, tuple(args), kwargs)
        out = func(*args, **kwargs)
        self.recorded.append(_Recorded(call_key(func, args, kwargs), out))
        return out


class _Replay(_Mode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_attention_op(func) and self.recorded:
            entry = self.recorded.popleft()
            if entry.matches(call_key(func, tuple(args), kwargs)):
                return entry.out
            self.recorded.clear()  # out of step with the forward: every kernel from here runs again
        return func(*args, **kwargs)


def _bind(function: Callable) -> Callable:
    """`function` as one checkpointed call runs it: its first run records, later runs (the recompute) replay."""
    recorded: deque = deque()
    runs = 0

    def run(*args, **kwargs):
        nonlocal runs
        mode = (_Record if runs == 0 else _Replay)(recorded)
        runs += 1
        outer = getattr(_active, "mode", None)
        _active.mode = mode
        try:
            return function(*args, **kwargs)
        finally:
            _active.mode = outer
            if isinstance(mode, _Replay):
                recorded.clear()  # a second recompute (retain_graph) runs the kernels again

    return run


def wrap_checkpoint(checkpoint_func: Callable) -> Callable:
    """A decoder layer's `_gradient_checkpointing_func` whose calls record and replay attention."""
    if getattr(checkpoint_func, "replays_attention", False):
        return checkpoint_func

    def checkpoint(function, *args, **kwargs):
        if not torch.is_grad_enabled():  # nothing will be recomputed
            return checkpoint_func(function, *args, **kwargs)
        return checkpoint_func(_bind(function), *args, **kwargs)

    checkpoint.replays_attention = True
    return checkpoint


def enable(lm: torch.nn.Module) -> int:
    """Every checkpointed decoder layer of `lm` replays attention; returns how many. After checkpointing is on."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    impl = getattr(lm.config, "_attn_implementation", None)
    if impl != NAME:  # the layers would record nothing and every kernel would run twice, silently
        raise ValueError(f"attention replay needs the model built with attn_implementation={NAME!r} "
                         f"(attention_replay.register), not {impl!r}")
    n = 0
    for m in lm.modules():
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
            m._gradient_checkpointing_func = wrap_checkpoint(m._gradient_checkpointing_func)
            n += 1
    return n


def register(base_impl: str) -> str:
    """Register NAME with transformers' AttentionInterface: `base_impl`, its kernels recorded and replayed inside
    checkpointed calls (anywhere else it is `base_impl` unchanged)."""
    from transformers import AttentionInterface

    base = AttentionInterface._global_mapping[base_impl]

    def kept_forward(module, query, key, value, attention_mask, **kwargs):
        mode = getattr(_active, "mode", None)
        if mode is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        with mode:
            return base(module, query, key, value, attention_mask, **kwargs)

    kept_forward.base_impl = base_impl
    AttentionInterface.register(NAME, kept_forward)
    return NAME
