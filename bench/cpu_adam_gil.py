"""How long DeepSpeed's CPU Adam blocks the Python main thread when it runs in a background thread (CPU only).

    python -m bench.cpu_adam_gil [--elements 20000000] [--calls 5]

A background thread updates `--elements` fp32 parameters `--calls` times, called three ways: the pybind binding
(holds the GIL for the whole kernel), slices of longctx.overlap_step.SLICE elements through the binding (the GIL
free between slices) and DeepSpeed's C++ entry point through ctypes (the GIL free for the whole call: what a binding
with gil_scoped_release would give, without a second build). Meanwhile the main thread runs small torch ops, as a
forward's Python thread does, and records the gaps between them: the longest, and the time in gaps over 1 ms
(blocked, against the same loop alone). On a machine shared with other work the gaps include that work too.
"""

from __future__ import annotations

import argparse
import threading
import time


def main(argv=None) -> None:
    import torch
    from deepspeed.ops.op_builder import CPUAdamBuilder

    from longctx import opbuild, overlap_step

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=20_000_000)
    ap.add_argument("--calls", type=int, default=5)
    a = ap.parse_args(argv)
    opbuild.use_environment_extensions_dir()
    op = CPUAdamBuilder().load(verbose=False)
    op.create_adam(0, 1e-3, 0.9, 0.95, 1e-8, 0.0, True, False)
    kernel = overlap_step.CpuAdamKernel(op)
    tensors = [torch.randn(a.elements), torch.randn(a.elements), torch.zeros(a.elements), torch.zeros(a.elements)]

    def forward_like(alive) -> tuple[float, int, float, float]:
        x, y = torch.ones(256), torch.ones(256)
        gaps, n, t0 = [], 0, time.perf_counter()
        last = t0
        while alive():
            x = x * 1.0001 + y
            now = time.perf_counter()
            gaps.append(now - last)
            last, n = now, n + 1
        return time.perf_counter() - t0, n, max(gaps), sum(g for g in gaps if g > 1e-3)

    alone_n = [0]
    el, n, mg, blocked = forward_like(lambda: (alone_n.__setitem__(0, alone_n[0] + 1) or alone_n[0] <= 20000))
    print(f"main thread alone: {el / n * 1e6:.1f} us per op, longest gap {mg * 1e3:.2f} ms, "
          f"{blocked * 1e3:.0f} ms in gaps > 1 ms")
    ways = {"pybind (GIL held)": lambda s: op.adam_update(0, s, 1e-3, 0.9, 0.95, 1e-8, 0.0, True, *tensors)}
    if kernel.mode == "ctypes":
        ways["ctypes (GIL released)"] = lambda s: kernel.adam_update(0, s, 1e-3, 0.9, 0.95, 1e-8, 0.0, True, *tensors)
    sliced = overlap_step.CpuAdamKernel(op, entry_point=False)
    ways[f"sliced ({overlap_step.SLICE} elements)"] = lambda s: sliced.adam_update(0, s, 1e-3, 0.9, 0.95, 1e-8, 0.0,
                                                                                    True, *tensors)
    for name, call in ways.items():
        took = []

        def work():
            t = time.perf_counter()
            for s in range(1, a.calls + 1):
                call(s)
            took.append(time.perf_counter() - t)

        th = threading.Thread(target=work)
        th.start()
        el, n, mg, blocked = forward_like(th.is_alive)
        th.join()
        print(f"{name:28s} update {took[0] * 1e3:6.0f} ms | main thread: {el / n * 1e6:6.1f} us per op, longest gap "
              f"{mg * 1e3:6.2f} ms, {blocked * 1e3:5.0f} ms in gaps > 1 ms ({blocked / el:.0%} of its time)")


if __name__ == "__main__":
    main()
