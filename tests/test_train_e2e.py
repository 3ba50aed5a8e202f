"""train.py end to end through the real `deepspeed` launcher: 2 CPU ranks on gloo.

* every shipped ds_config trains the tiny model and the loss falls (zero2 and zero3: the resume tests' uninterrupted
  runs, conftest.py's `uninterrupted`), and the held-out loss, sharded over the ranks, falls;
* the run directory holds what the issue asks for (run record, metrics fields, checkpoint marker);
* the consolidated final_model reloads with from_pretrained in a fresh process and gives exactly the
  logits of the weights in the last DeepSpeed checkpoint (read independently with zero_to_fp32).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers_train import REPO, fast_args, read_jsonl, run_train, small_dataset, tiny_config_file

pytestmark = pytest.mark.slow


METRIC_FIELDS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "peak_gpu_mem_gb",
                 "host_rss_gb"}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def model_cfg(tmp_path_factory):
    return tiny_config_file(tmp_path_factory.mktemp("model"))


def _train(tmp, name, data_files, model_cfg, ds, steps=8, extra=()):
    out = tmp / name
    args = fast_args(out, data_files, model_cfg, steps=steps, extra=["--grad-accum", "2", *extra])
    args[1] = f"ds_configs/{ds}.json"
    proc = run_train(args)
    return out, proc


@pytest.fixture(scope="module")
def offload_run(tmp_path_factory, data_files, model_cfg):
    """The ZeRO-3 + CPU offload run the record, reload, progress and summary tests all read (one launch): a cosine
    schedule and a held-out split evaluated every 4 steps, so the summary has an lr curve and a final eval loss to
    report."""
    return _train(tmp_path_factory.mktemp("runs"), "zero3_offload", data_files, model_cfg, "zero3_offload",
                  extra=["--lr-scheduler", "cosine", "--eval-fraction", "0.1", "--eval-interval", "4"])


def _assert_learns(out):
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    losses = [r["loss"] for r in rows]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    for r in rows:
        assert METRIC_FIELDS <= r.keys()
        assert r["grad_norm"] is not None and r["grad_norm"] > 0
        assert r["tokens_per_s"] > 0 and r["host_rss_gb"] > 0


@pytest.mark.parametrize("ds", ["zero2", "zero3"])
def test_ds_config_trains(uninterrupted, ds):
    """The resume tests' uninterrupted run of `ds` (2 ranks, grad accumulation 2, a cosine schedule, a checkpoint
    every step) learns."""
    out, _ = uninterrupted(f"ds_configs/{ds}.json")
    _assert_learns(out)


def test_zero3_offload_trains_and_records_the_run(offload_run):
    out, proc = offload_run
    _assert_learns(out)
    # the held-out split evaluated every 4 steps (its rows are sharded over the 2 ranks)
    evals = [(r["step"], r["eval_loss"]) for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r]
    assert [s for s, _ in evals] == [4, 8] and evals[1][1] < evals[0][1]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["precision"] == "fp32"
    assert "hash" in run["git"] and "patch_series_sha256" in run
    assert run["config"]["max_seq_len"] == 128
    assert run["ds_config"]["train_batch_size"] == 1 * 2 * 2
    assert (out / "config.yaml").exists() and (out / "ledger.json").exists()
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-00000008"] and (ckpts[0] / "COMPLETE").exists()
    samples = read_jsonl(out / "samples.jsonl")
    assert [s["step"] for s in samples] == list(range(1, 9)) and all(s["sample_ids"] for s in samples)
    assert "token ledger" in proc.stdout and "efficiency" in proc.stdout


RELOAD = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(path)
tok = AutoTokenizer.from_pretrained(path)
assert next(model.parameters()).dtype == torch.float32
ids = torch.tensor([tok("apple anchor bottle candle desk engine feather garden").input_ids])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, out)
"""

REFERENCE = r"""
import sys, json, torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
ckpt_root, tag, final, out = sys.argv[1:5]
sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_root, tag=tag)
sd = {k[len("lm."):]: v for k, v in sd.items()}
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(final), dtype=torch.float32)
missing, unexpected = model.load_state_dict(sd, strict=False)
assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
tok = AutoTokenizer.from_pretrained(final)
ids = torch.tensor([tok("apple anchor bottle candle desk engine feather garden").input_ids])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, out)
"""


def test_final_model_reloads_with_identical_logits(offload_run, tmp_path):
    import torch

    out, _ = offload_run
    final = out / "final_model"
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    a, b = tmp_path / "reloaded.pt", tmp_path / "reference.pt"
    subprocess.run([sys.executable, "-c", RELOAD, str(final), str(a)], check=True, cwd=REPO)
    subprocess.run([sys.executable, "-c", REFERENCE, str(out / "checkpoints"), "step-00000008", str(final), str(b)],
                   check=True, cwd=REPO)
    la, lb = torch.load(a), torch.load(b)
    assert la.shape == lb.shape and torch.equal(la, lb)
    # and the weights did change from initialization: the run trained something
    assert la.abs().max() > 0


def test_progress_is_plain_lines_in_a_pipe(offload_run):
    out, proc = offload_run
    assert "train: step 8/8 (100%)" in proc.stdout
    assert "\r" not in proc.stdout + proc.stderr  # no carriage-return bar when the output is not a terminal


def test_run_ends_with_a_summary_the_lr_used_and_an_inference_ready_model(offload_run):
    """Needs the training loop's calls from the wiring list of issue #20: metrics.lr_in_use before the step,
    modeling.restore_inference_settings before the final save, metrics.summary at the end."""
    import math

    out, proc = offload_run
    lrs = [r["lr"] for r in read_jsonl(out / "metrics.jsonl")]
    peak = 3e-3  # fast_args: --lr 3e-3 --warmup-steps 0
    assert lrs == pytest.approx([peak * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)], rel=1e-12)
    assert lrs[0] == peak and lrs[-1] > 0
    assert json.loads((out / "final_model" / "config.json").read_text())["use_cache"] is True
    assert "run finished: steps 8 of 8" in proc.stdout and "final eval loss" in proc.stdout
    assert f"final model  {out / 'final_model'}" in proc.stdout
    assert f"checkpoint   {out / 'checkpoints' / 'step-00000008'}" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["final_train_loss"] == read_jsonl(out / "metrics.jsonl")[-1]["loss"]
