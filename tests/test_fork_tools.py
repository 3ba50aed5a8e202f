"""The fork through the tools people fine-tune with, on CPU and tiny models: HF Trainer, HF Trainer with a DeepSpeed
ZeRO-3 config (one process) and TRL's SFTTrainer, each given `activation_checkpointing_kwargs={"offload": True}`.

Each run must go through the fork's offloader (its `stored` count: every layer's checkpoint at every micro-batch) and
give the losses and gradients of the same run without any checkpointing. Llama, Mistral, Qwen2, Qwen3, and Gemma,
which the fork never patched by name. The runs themselves are in tests/helpers_fork_tools.py.
"""

import subprocess
import sys

import pytest
import torch

import helpers_fork_tools
from helpers_fork_tools import BATCH, FAMILIES, LAYERS, SEQ, STEPS, TINY


def assert_same_training(base: dict, offloaded: dict) -> None:
    assert len(base["losses"]) == len(offloaded["losses"]) == STEPS
    torch.testing.assert_close(torch.stack(offloaded["losses"]), torch.stack(base["losses"]), rtol=1e-5, atol=1e-7)
    assert len(base["grads"]) == len(offloaded["grads"]) == STEPS
    for step, (grads, reference) in enumerate(zip(offloaded["grads"], base["grads"])):
        assert grads.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7, msg=f"step {step}: {name}")


def assert_fork_offloader_ran(result: dict, layers: int = LAYERS) -> None:
    assert result["offloaded_layers"] == layers
    # every offloaded layer's input, at every micro-batch, went through the fork's offloader (not save_on_cpu)
    assert result["stored"] == layers * result["micro_batches"] and result["micro_batches"] == STEPS


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cache = {}

    def get(tool, family, offload):
        key = (tool, family, repr(offload))
        if key not in cache:
            cache[key] = helpers_fork_tools.run(tool, family, offload, str(out / f"{tool}-{family}-{len(cache)}"))
        return cache[key]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_trainer_offload(runs, family):
    offloaded = runs("trainer", family, {"offload": True})
    assert_fork_offloader_ran(offloaded)
    assert offloaded["stored_bytes"] == offloaded["stored"] * BATCH * SEQ * TINY["hidden_size"] * 4  # fp32 inputs
    base = runs("trainer", family, None)
    assert base["stored"] is None and base["offloaded_layers"] == 0
    assert_same_training(base, offloaded)


def test_hf_trainer_num_offloaded_layers_and_save_on_cpu(runs):
    base = runs("trainer", "llama", None)
    # the number of offloaded layers travels in activation_checkpointing_kwargs, past Trainer, to the fork
    first = runs("trainer", "llama", {"offload": True, "num_offloaded_layers": 1})
    assert_fork_offloader_ran(first, layers=1)
    assert_same_training(base, first)
    # upstream's save_on_cpu stays selectable, and the fork's offloader is then not installed
    upstream = runs("trainer", "llama", {"offload": "save_on_cpu"})
    assert upstream["stored"] is None and upstream["offloaded_layers"] == 0
    assert_same_training(base, upstream)


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    """All families' ZeRO-3 runs, with and without offload, in one fresh process: a world of one on gloo."""
    out = tmp_path_factory.mktemp("deepspeed") / "runs.pt"
    proc = subprocess.run([sys.executable, helpers_fork_tools.__file__, str(out), *FAMILIES], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_trainer_deepspeed_zero3_offload(deepspeed_runs, family):
    offloaded, base = deepspeed_runs[(family, "offload")], deepspeed_runs[(family, "base")]
    assert_fork_offloader_ran(offloaded)
    assert base["stored"] is None
    assert_same_training(base, offloaded)


@pytest.mark.parametrize("family", FAMILIES)
def test_trl_sft_trainer_offload(runs, family):
    offloaded = runs("sft", family, {"offload": True})
    assert_fork_offloader_ran(offloaded)
    base = runs("sft", family, None)
    assert base["stored"] is None
    assert_same_training(base, offloaded)
