"""Exact resume through the launcher (2 CPU ranks): 2N steps uninterrupted == N steps, kill -9, resume.

The kill is a real SIGKILL of the launcher's whole process group, at a point the run reaches through a
test hook (LONGCTX_TEST_PAUSE_IN_SAVE parks every rank in a sleep inside a save and drops a marker file).
Per-step losses must be identical (bitwise, as logged) and so must the sample ids. A kill -9 after a complete
checkpoint is tests/test_overlap_step.py's accumulation test (the overlapped step, compared with the serial one).
"""

from __future__ import annotations

import json

import pytest

from helpers_train import REPO, fast_args, read_jsonl, run_train, run_until_paused, small_dataset, tiny_model_dir

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    data = small_dataset(d / "data")
    model = tiny_model_dir(d / "init")
    # dropout-free model, but a non-constant schedule and accumulation make the resume state matter
    extra = ["--grad-accum", "2", "--save-interval", "2", "--keep-last", "2", "--lr-scheduler", "cosine",
             "--warmup-steps", "2", "--no-save-final-model"]
    ref = d / "uninterrupted"
    run_train(fast_args(ref, data, model, steps=STEPS, extra=extra))
    return d, data, model, extra, ref


def _losses(out):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_jsonl(out / "metrics.jsonl")]


def _samples(out):
    return [(r["step"], r["sample_ids"]) for r in read_jsonl(out / "samples.jsonl")]


def test_kill_during_save_resumes_from_previous_complete_checkpoint(setup):
    d, data, model, extra, ref = setup
    out = d / "killed_in_save"
    run_until_paused(fast_args(out, data, model, steps=STEPS, extra=extra), out.with_name(f"{out.name}.PAUSED_IN_SAVE"),
                     env={"LONGCTX_TEST_PAUSE_IN_SAVE": "6"})
    partial = out / "checkpoints" / "step-00000006"
    assert partial.is_dir() and any(partial.iterdir()) and not (partial / "COMPLETE").exists()
    assert (out / "checkpoints" / "step-00000004" / "COMPLETE").exists()
    p = run_train(fast_args(out, data, model, steps=STEPS, extra=extra + ["--resume", "auto"]))
    assert "resumed at step 4" in p.stdout
    assert _losses(out) == _losses(ref)
    assert _samples(out) == _samples(ref)
    # the partial save was replaced; keep-last 2 keeps the two newest complete checkpoints
    names = sorted(c.name for c in (out / "checkpoints").glob("step-*"))
    assert names == ["step-00000006", "step-00000008"]
    assert all((out / "checkpoints" / n / "COMPLETE").exists() for n in names)


# ---- resume at any step, with every shipped ds_config -------------------------------------------------

RESUME_AT = (5, 7)  # next steps 6 and 8: CPU Adam's pow and running product differ there (beta2 0.95)


def _check_predicted_sizes(out, ds):
    """The preflight's disk prediction against what this run wrote (within 5%)."""
    from helpers_train import TOKENIZER, tiny_config
    from longctx import preflight
    from longctx.flops import ModelShape
    from longctx.plan_types import Setup

    stage, offload = {"zero2": (2, False), "zero3": (3, False), "zero3_offload": (3, True),
                      "zero3_twin_flow": (3, True)}[ds]
    s = Setup(ModelShape.from_config(tiny_config()), 128, world=2, zero_stage=stage, offload_params=offload,
              offload_optimizer=offload, precision="fp32")
    ckpt = preflight.dir_bytes(out / "checkpoints" / f"step-{STEPS:08d}")
    final = preflight.dir_bytes(out / "final_model")
    assert abs(preflight.checkpoint_bytes(s) / ckpt - 1) < 0.05, (preflight.checkpoint_bytes(s), ckpt)
    assert abs(preflight.final_model_bytes(s, TOKENIZER) / final - 1) < 0.05, (preflight.final_model_bytes(s), final)


def _final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "final_model" / "model.safetensors"))


def _twin_flow_config(d) -> str:
    """zero3_offload.json with half the optimizer's sub-groups (the first ones) updated by the backup torch AdamW
    (longctx.twin_flow; on CPU its tensors stay on the CPU), sub-groups small enough that the tiny model has 3."""
    ds = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    ds["zero_optimization"]["offload_optimizer"]["ratio"] = 0.5
    ds["zero_optimization"]["sub_group_size"] = 20000
    path = d / "zero3_twin_flow.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.mark.parametrize("ds", ["zero2", "zero3", "zero3_offload", "zero3_twin_flow"])
def test_resume_at_any_step_is_bitwise_exact(tmp_path_factory, ds):
    """One uninterrupted run saving every step; then, for each resume step, a copy of its directory resumed from
    that checkpoint. Losses, grad norms, lr and the final weights must be identical bitwise. CPU Adam (the
    offload config) is resumed at both RESUME_AT steps, where its arithmetic differs; the others at the first.
    zero3_twin_flow splits the optimizer states (offload_optimizer.ratio 0.5): the resume must bring back the
    backup AdamW's moments too (longctx.twin_flow)."""
    import shutil

    import torch

    d = tmp_path_factory.mktemp(f"any_step_{ds}")
    data = small_dataset(d / "data")
    model = tiny_model_dir(d / "init")
    extra = ["--grad-accum", "2", "--save-interval", "1", "--keep-last", str(STEPS), "--lr-scheduler", "cosine",
             "--warmup-steps", "2"]

    ds_file = _twin_flow_config(d) if ds == "zero3_twin_flow" else f"ds_configs/{ds}.json"

    def args(out, more=()):
        a = fast_args(out, data, model, steps=STEPS, extra=extra + list(more))
        a[1] = ds_file
        return a

    ref = d / "uninterrupted"
    p = run_train(args(ref))
    if ds == "zero3_twin_flow":
        assert "optimizer (ratio 0.5: the rest on the GPU)" in p.stdout
    ref_weights = _final_weights(ref)
    _check_predicted_sizes(ref, ds)
    for at in RESUME_AT if ds == "zero3_offload" else RESUME_AT[:1]:
        out = d / f"resumed_at_{at}"
        shutil.copytree(ref, out)
        shutil.rmtree(out / "final_model")
        for c in (out / "checkpoints").glob("step-*"):
            if int(c.name.split("-")[1]) > at:
                shutil.rmtree(c)
        p = run_train(args(out, ["--resume", "auto"]))
        assert f"resumed at step {at}" in p.stdout
        assert _losses(out) == _losses(ref), f"{ds}, resumed at step {at}"
        assert _samples(out) == _samples(ref)
        weights = _final_weights(out)
        assert weights.keys() == ref_weights.keys()
        different = [k for k in weights if not torch.equal(weights[k], ref_weights[k])]
        assert not different, f"{ds}, resumed at step {at}: {different[:5]}"
