"""The overlapped optimizer step (longctx/overlap_step.py): the CPU sub-groups updated while the next forward runs,
bitwise the step DeepSpeed takes without it.

- CPU Adam called off the GIL (ctypes entry point, or slices) gives the pybind binding's bits, and the update uses
  the hyperparameters pinned at step() even when the scheduler has moved on.
- `auto` is decided in longctx.resolve (on with ZeRO-3 and the optimizer on CPU).
- Through the deepspeed launcher (2 gloo ranks, ZeRO-3 with the optimizer offloaded, tiny model, clipping active):
  losses, grad norms, lr and the final weights are bitwise those of the same run with --overlap-optimizer-step off,
  at grad accumulation 1 and at 4 with a kill -9 and a resume in the middle; and the next forward really runs
  during the update (tests/fault_train_worker.py's OverlapRecorder holds the last sub-group's update until layer 0's
  forward has begun, and that forward records the sub-groups still pending).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers_train import (REPO, fast_args, read_jsonl, run_train, run_until_paused, small_dataset, tiny_config,
                           tiny_model_dir)
from longctx import config, resolve
from longctx.errors import LongctxError

STEPS = 8
MAX_GRAD_NORM = 0.5  # the tiny model's grad norms are 1.5-3.2: every step is clipped (asserted)


# ---- the kernel ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_adam_op():
    from deepspeed.ops.op_builder import CPUAdamBuilder

    from longctx import opbuild

    opbuild.use_environment_extensions_dir()
    return CPUAdamBuilder().load(verbose=False)


def _problem(n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.1,
            torch.rand(n, generator=g)]


@pytest.mark.parametrize("path", ["ctypes", "sliced"])
def test_kernel_off_the_gil_gives_the_bindings_bits(cpu_adam_op, path):
    from longctx import overlap_step

    k = overlap_step.CpuAdamKernel(cpu_adam_op, entry_point=path == "ctypes")
    assert k.mode == path  # DeepSpeed 0.19.8's entry point is found, and agrees with the binding, on this machine
    n = 2 * overlap_step.SLICE + 1000 + 13  # several slices and a scalar tail
    cpu_adam_op.create_adam(7, 1e-3, 0.9, 0.95, 1e-8, 0.01, True, False)
    try:
        for step in (1, 2, 3):
            want, got = _problem(n, step), _problem(n, step)
            cpu_adam_op.adam_update(7, step, 1e-3, 0.9, 0.95, 1e-8, 0.01, True, *want)
            k.adam_update(7, step, 1e-3, 0.9, 0.95, 1e-8, 0.01, True, *got)
            assert all(torch.equal(a, b) for a, b in zip(want, got))
        # pinned hyperparameters win over the (already rescheduled) ones the optimizer passes
        want, got = _problem(n, 9), _problem(n, 9)
        cpu_adam_op.adam_update(7, 4, 2e-3, 0.8, 0.9, 1e-7, 0.0, True, *want)
        k.pin({"lr": 2e-3, "betas": (0.8, 0.9), "eps": 1e-7, "weight_decay": 0.0, "bias_correction": True})
        k.adam_update(7, 4, 5e-3, 0.9, 0.95, 1e-8, 0.01, True, *got)
        k.pin(None)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    finally:
        cpu_adam_op.destroy_adam(7)


# ---- the resolution ------------------------------------------------------------------------------------------------
def _settings(*flags):
    return resolve.resolve(config.parse(["--max-seq-len", "512", *flags]), resolve.Facts(), tiny_config(), 2)


def test_auto_is_on_where_zero3_offloads_the_optimizer():
    s = _settings()
    assert s.overlap_step and s.why["overlap_step"].startswith("auto: on")
    per_layer = s.ds_config["zero_optimization"]["sub_group_size"]
    assert 0 < per_layer < 100_000 and "one layer's partition" in s.why["overlap_step"]
    assert "overlapped with the next forward" in "\n".join(s.header())
    off = _settings("--overlap-optimizer-step", "off")
    assert not off.overlap_step and off.ds_config["zero_optimization"]["sub_group_size"] == 10 ** 9
    s = _settings("--deepspeed", "ds_configs/zero3.json")
    assert not s.overlap_step and "offload_optimizer" in s.why["overlap_step"]
    with pytest.raises(LongctxError, match="--overlap-optimizer-step on: it needs offload_optimizer.device cpu"):
        _settings("--deepspeed", "ds_configs/zero3.json", "--overlap-optimizer-step", "on")


# ---- through the launcher ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("overlap")
    data = small_dataset(d / "data")
    model = tiny_model_dir(d / "init", num_hidden_layers=3)
    # the same sub-groups with and without the overlap (its "auto" size is one layer's partition; the global norm
    # is combined per sub-group, so the comparison needs the same ones): about half a layer each here
    ds = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    ds["zero_optimization"]["sub_group_size"] = 12_000
    (d / "ds.json").write_text(json.dumps(ds))
    return d, data, model, str(d / "ds.json")


def _args(setup, out: Path, overlap: str, *extra: str) -> list[str]:
    d, data, model, ds = setup
    args = fast_args(out, data, model, steps=STEPS, extra=["--lr-scheduler", "cosine", "--warmup-steps", "2",
                                                           "--max-grad-norm", str(MAX_GRAD_NORM),
                                                           "--overlap-optimizer-step", overlap, *extra])
    args[args.index("--deepspeed") + 1] = ds
    return args


def _rows(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_jsonl(out / "metrics.jsonl")]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final_model" / "model.safetensors"))


def _assert_same_run(out: Path, ref: Path) -> None:
    rows, want = _rows(out), _rows(ref)
    assert [r[0] for r in rows] == list(range(1, STEPS + 1))
    assert rows == want  # loss, grad norm and lr of every step, bit for bit (as logged: repr of the floats)
    assert all(r[2] > MAX_GRAD_NORM for r in rows)  # clipping was active at every step
    a, b = _weights(out), _weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_overlapped_step_is_bitwise_and_overlaps_the_next_forward(setup):
    d = setup[0]
    ref, out, record = d / "plain_ga1", d / "overlapped_ga1", d / "overlap_record.jsonl"
    run_train(_args(setup, ref, "off"))
    p = run_train(_args(setup, out, "on"), env={"LONGCTX_TEST_OVERLAP_RECORD": str(record)})
    assert "CPU sub-groups updated during the next forward (CPU Adam called ctypes" in p.stdout
    _assert_same_run(out, ref)
    assert json.loads((out / "resolved.json").read_text())["overlap_step"]
    rows = read_jsonl(record)
    began = {r["update"]: r for r in rows if r["event"] == "layer 0 forward began"}
    last = {r["update"]: r for r in rows if r["event"] == "last sub-group update starts"}
    # the update of step k (k < STEPS) was still running when step k + 1's forward entered layer 0: its last
    # sub-group had not even started; the last update is waited for by the final checkpoint
    assert sorted(last) == list(range(1, STEPS + 1))
    for k in range(1, STEPS):
        assert last[k]["after_layer0_forward"], last[k]
        assert last[k]["sub_group"] in began[k]["pending"], began[k]
    assert not last[STEPS]["after_layer0_forward"]
    # the sub-groups are updated in the order the forward needs them: the embedding's first, the head's not before
    # the last decoder layer's (the loss head gathers lm_head's weight at the end of the forward, not at its start;
    # a sub-group can also hold a layer's norms, which the layer needs first)
    orders = [r for r in rows if r["event"] == "order"]
    assert len(orders) == STEPS
    assert all(r["order"][0] == r["embedding"] != r["head"] for r in orders)
    assert all(r["order"].index(r["head"]) >= r["order"].index(r["last_layer"]) for r in orders), orders[0]


@pytest.mark.slow
def test_ranks_updating_at_different_paces_prefetch_the_same_parameters(setup):
    """A prefetch is a collective: every rank must issue the same ones. With the last rank's update held back
    (0.1 s before each sub-group), a gate on each rank's own progress let the fast rank prefetch what the slow one
    did not (gloo aborted on the mismatched all-gathers). The run must be the plain run's, bit for bit."""
    d = setup[0]
    ref, out = d / "plain_ga1", d / "overlapped_skewed"
    if not (ref / "final_model").exists():
        run_train(_args(setup, ref, "off"))
    run_train(_args(setup, out, "on"), env={"LONGCTX_TEST_OVERLAP_SKEW": "0.1"}, timeout=300)
    _assert_same_run(out, ref)


@pytest.mark.slow
def test_overlapped_step_with_accumulation_and_a_resume_is_bitwise(setup):
    """Also the exact-resume test of a kill -9 after a complete checkpoint (tests/test_train_resume.py has the kill
    inside a save): the killed run's step 5 was logged after the step-4 checkpoint, and the resume redoes it."""
    d = setup[0]
    ref, out = d / "plain_ga4", d / "overlapped_ga4"
    extra = ("--grad-accum", "4", "--save-interval", "4")
    run_train(_args(setup, ref, "off", *extra))
    run_until_paused(_args(setup, out, "on", *extra), out.with_name(f"{out.name}.PAUSED_AFTER_STEP"),
                     env={"LONGCTX_TEST_PAUSE_AFTER_STEP": "5"})
    assert (out / "checkpoints" / "step-00000004" / "COMPLETE").exists()
    assert max(r["step"] for r in read_jsonl(out / "metrics.jsonl")) == 5
    p = run_train(_args(setup, out, "on", *extra, "--resume", "auto"))
    assert "resumed at step 4" in p.stdout
    _assert_same_run(out, ref)
    assert read_jsonl(out / "samples.jsonl") == read_jsonl(ref / "samples.jsonl")
    assert json.loads((out / "run.json").read_text())["resumed"]


# ---- on a GPU ------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_overlapped_step_is_bitwise_on_a_gpu(setup):
    """One GPU, bf16, parameters on the GPU (the 16-bit copies go host to device from the update's thread):
    the same bits as without the overlap, at grad accumulation 2."""
    d = setup[0]
    ds = json.loads(Path(setup[3]).read_text())
    ds["zero_optimization"]["offload_param"] = {"device": "none"}
    # every state on the CPU: ratio "auto" would put them all on a GPU that fits them (then nothing overlaps; the
    # first GPU run of this test was refused for that, 2026-12-06)
    ds["zero_optimization"]["offload_optimizer"]["ratio"] = 1.0
    (d / "ds_gpu.json").write_text(json.dumps(ds))
    on_gpu = (d, setup[1], setup[2], str(d / "ds_gpu.json"))
    ref, out = d / "gpu_plain", d / "gpu_overlapped"
    extra = ("--grad-accum", "2")
    run_train(_args(on_gpu, ref, "off", *extra), nproc=1)
    p = run_train(_args(on_gpu, out, "on", *extra), nproc=1)
    assert "CPU sub-groups updated during the next forward" in p.stdout
    _assert_same_run(out, ref)
