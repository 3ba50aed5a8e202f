"""Twin-Flow (ZeRO-3 with offload_optimizer.ratio: some optimizer sub-groups updated by a torch AdamW beside CPU
Adam) through longctx.zero3_optimizer, against an independent plain reference, step by step.

tests/twin_flow_worker.py trains a tiny fp32 MLP on 2 gloo ranks (the real launcher) with half the sub-groups on
the backup optimizer, a warmup + decay schedule and clipping active every step. The reference is the same model and
batches in plain torch, one process, torch.optim.AdamW (twin_flow_worker.reference_run). On CPU the "GPU"
sub-groups are updated by the backup AdamW on CPU tensors (longctx.twin_flow routes by index), so CI checks the
fixes. The same check runs on one GPU (marked gpu), where the backup's sub-groups live in GPU memory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers_train import deepspeed_cmd, run_launcher

TOL = 1e-5  # relative, on the weights of every step (measured on CPU: 3e-7; DeepSpeed's stock lr: 0.04-0.17)


def run_worker(out: Path, nproc: int, *more: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    p = run_launcher(deepspeed_cmd("tests/twin_flow_worker.py", ["--out", str(out), *more], nproc), timeout=300)
    assert p.returncode == 0, f"twin_flow_worker failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return torch.load(out / "result.pt")


def worst_step(result: dict, world: int) -> tuple[float, list]:
    """The largest relative weight difference over every step and tensor, and the per-step loss pairs."""
    import twin_flow_worker as w

    ref = w.reference_run(world)
    assert len(result["rows"]) == len(ref)
    worst, losses = 0.0, []
    for got, want in zip(result["rows"], ref):
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert want["grad_norm"] > w.CLIP  # clipping is active at every step
        losses.append((got["loss"], want["loss"]))
        for k, v in want["weights"].items():
            worst = max(worst, float((got["weights"][k] - v).abs().max() / v.abs().max()))
    return worst, losses


def check_against_reference(result: dict, world: int) -> None:
    assert result["gpu_sub_groups"] == [0, 1] and result["sub_groups"] == 4  # half on the backup optimizer
    worst, losses = worst_step(result, world)
    for got, want in losses:
        assert got == pytest.approx(want, rel=TOL)
    assert worst <= TOL, f"weights differ from the plain AdamW reference by {worst:.2e} (relative)"


@pytest.mark.slow
def test_split_optimizer_follows_schedule_and_clipping_like_plain_adamw(tmp_path):
    check_against_reference(run_worker(tmp_path / "twin_flow", 2), world=2)


@pytest.mark.slow
def test_the_comparison_catches_deepspeeds_stock_lr(tmp_path):
    """DeepSpeed 0.19.8's behaviour (the backup AdamW keeps its initial lr) must fail the same comparison."""
    worst, _ = worst_step(run_worker(tmp_path / "stock", 2, "--stock-lr"), world=2)
    assert worst > 100 * TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_split_optimizer_on_one_gpu(tmp_path):
    """The GPU sub-groups' fp32 master, gradients and Adam moments in GPU memory, updated by the backup AdamW."""
    result = run_worker(tmp_path / "gpu", 1)
    assert result["fp32_devices"][:2] != ["cpu", "cpu"] and result["fp32_devices"][2:] == ["cpu", "cpu"]
    check_against_reference(result, world=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_master_reaches_the_pinned_16bit_partition_as_deepspeeds_copy_does():
    """Fix 4: a GPU sub-group's fp32 master written into the bf16 partition in pinned host memory (parameters
    offloaded), rounded on the GPU: the bits of DeepSpeed's own method (a CPU rounding after a pageable copy)."""
    from types import SimpleNamespace

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    from longctx.twin_flow import TwinFlowMixin

    g = torch.Generator().manual_seed(0)
    master = torch.cat([torch.randn(1 << 20, generator=g) * s for s in (1e-3, 1.0, 1e3)]
                       + [torch.tensor([1e-40, -1e-42, 3.0e38, 1 + 2 ** -8, 1 + 3 * 2 ** -8])]).cuda()

    def holder(cls):
        h = cls.__new__(cls)  # the two methods read only these attributes
        flat = torch.zeros(master.numel(), dtype=torch.bfloat16).pin_memory()
        parts = [torch.empty(0, dtype=torch.bfloat16), torch.empty(0, dtype=torch.bfloat16)]
        h.fp16_partitioned_groups_flat, h.fp32_partitioned_groups_flat = [flat], [master]
        h.fp16_partitioned_groups = [[SimpleNamespace(data=p) for p in parts]]
        h.unflatten = lambda flat_, tensors: [flat_[:10], flat_[10:]]
        return h

    class Ours(TwinFlowMixin, Stage3):
        pass

    ours, theirs = holder(Ours), holder(Stage3)
    ours._reassign_or_swap_out_partitioned_parameters(0)
    Stage3._reassign_or_swap_out_partitioned_parameters(theirs, 0)
    a, b = ours.fp16_partitioned_groups_flat[0], theirs.fp16_partitioned_groups_flat[0]
    assert a.is_pinned() and a.device.type == "cpu"
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert ours.fp16_partitioned_groups[0][1].data.data_ptr() == a[10:].data_ptr()  # unflattened into the flat
